"""The training loop in one process (training/loop.py): the schedule, the optimiser's groups, one step's
targets and update, self-training, resuming, checkpoints and progress, and the torchrun helpers on a real
process group of one and with a second process. A tiny student on 32 x 32 crops, 1 to 9 steps."""

from __future__ import annotations

import copy
import logging
import os
import re

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import data as td
from labelstudio_maskclip.training import loop as tl
from labelstudio_maskclip.training.student import IMAGENET_MEAN, IMAGENET_STD, build_student
from tests.test_training import _settings, synthetic

DIM = 16
CPU = torch.device("cpu")


class CoarseTeacher:
    """A teacher on an 8 x 8 grid whatever the crop's size (as MaskCLIP's patch grid is): class 0 on the left
    half, 1 on the right, 2 nowhere; the top two rows are unsure (no class above 0.5). Counts its calls."""

    def __init__(self) -> None:
        self.embeddings = F.normalize(torch.randn(3, DIM, generator=torch.Generator().manual_seed(0)), dim=1)
        self.calls = 0

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        p = torch.zeros(images.shape[0], 3, 8, 8)
        p[:, 0, :, :4], p[:, 1, :, :4], p[:, 2, :, :4] = 0.8, 0.1, 0.1
        p[:, 0, :, 4:], p[:, 1, :, 4:], p[:, 2, :, 4:] = 0.1, 0.8, 0.1
        p[:, :, :2] = torch.tensor([0.4, 0.3, 0.3])[:, None, None]
        return p

    def describe(self) -> dict:
        return {"model": "coarse", "pretrained": "none", "templates": []}


def _s(tmp_path, **kw) -> Settings:
    base = dict(train_steps=10, train_lr=0.05, train_momentum=0.5, train_weight_decay=0.01,
                train_pseudo_threshold=0.5, train_self_training_start=0.3)  # fmt: skip
    return _settings(tmp_path, **{**base, **kw})


def _loop(s: Settings, teacher=None, resume=None, dist: tl.Dist | None = None) -> tl.Loop:
    torch.manual_seed(0)
    return tl.Loop.build(s, teacher or CoarseTeacher(), CPU, dist or tl.Dist(), resume)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32 x 32 crops and people's labels: class 2 painted in a square of the first, nothing elsewhere."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    human = torch.full((2, 32, 32), 255, dtype=torch.uint8)
    human[0, 20:28, 2:10] = 2
    return images, human


def _logits(net, images: torch.Tensor) -> torch.Tensor:
    """What the loop's student computes: ImageNet-normalised pixels, train mode, logits at the image size."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    net.train()
    return F.interpolate(net((images - mean) / std).float(), size=images.shape[2:], mode="bilinear")


def _items(tmp_path, n: int = 2) -> list[td.Item]:
    items = []
    for k in range(n):
        np.save(path := tmp_path / f"img{k}.npy", synthetic(k)[0])
        items.append(td.Item(k, path))
    return items


# --- schedule and optimiser ----------------------------------------------------------------------------------


def test_the_poly_schedule_reaches_its_floor_at_the_last_step_and_stays_there():
    assert tl.poly_lr(150, 100, 0.01) == pytest.approx(1e-4)  # past the end (a resumed longer run): the floor
    assert tl.poly_lr(1, 1, 0.01) == pytest.approx(1e-4)
    assert tl.poly_lr(0, 0, 0.01) == pytest.approx(0.01)  # no steps: no division by zero
    assert tl.poly_lr(25, 100, 0.01, min_lr=0.001, power=2.0) == pytest.approx(0.009 * 0.75**2 + 0.001)


def test_the_optimizer_decays_every_trainable_weight_but_the_logit_scale(tmp_path):
    s = _s(tmp_path, train_lr=0.02, train_momentum=0.8, train_weight_decay=0.001)
    net = build_student("tiny", CoarseTeacher().embeddings)
    opt = tl.optimizer(net, s)
    decayed, scale = opt.param_groups
    trainable = [p for n, p in net.named_parameters() if p.requires_grad and n != "log_scale"]
    assert [id(p) for p in decayed["params"]] == [id(p) for p in trainable] and decayed["weight_decay"] == 0.001
    assert scale["params"] == [net.log_scale] and scale["weight_decay"] == 0.0
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.8 for g in opt.param_groups)
    frozen = net.classifier.weight  # the text embeddings are not trained
    assert all(p is not frozen for g in opt.param_groups for p in g["params"])


# --- one step ------------------------------------------------------------------------------------------------


def _expected_step(loop: tl.Loop, images, human, pseudo_fn) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the parameters after one plain SGD step (momentum's first step: the gradient), computed
    on a copy of the loop's student."""
    s, net = loop.settings, copy.deepcopy(loop.net)
    lr = tl.poly_lr(loop.state.step, s.train_steps, s.train_lr)
    logits = _logits(net, images)
    targets = td.build_targets(pseudo_fn(logits), human, s.train_pseudo_threshold)
    loss = F.cross_entropy(logits, targets, ignore_index=255)
    loss.backward()
    after = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            decay = 0.0 if name == "log_scale" else s.train_weight_decay
            after[name] = (p - lr * (p.grad + decay * p)).detach()
    return float(loss.detach()), after


def test_a_step_learns_the_teachers_upsampled_labels_where_people_painted_nothing(tmp_path):
    """Targets: the teacher's 8 x 8 probabilities upsampled bilinearly to the crop, unsure pixels (< 0.5)
    ignored, people's labels where they painted; the SGD update uses the schedule's rate at the run's step
    (here step 2 of 10, resumed) in every group and decays all but the logit scale."""
    loop = _loop(_s(tmp_path))
    loop.state.step = 2
    images, human = _batch()
    teacher = loop.teacher

    def pseudo(logits):
        return F.interpolate(CoarseTeacher().probs(images), size=(32, 32), mode="bilinear")

    loss, after = _expected_step(loop, images, human, pseudo)
    got, lr, self_training = loop.step(images, human)
    assert got == pytest.approx(loss, rel=1e-5) and not self_training and teacher.calls == 1
    assert lr == pytest.approx(tl.poly_lr(2, 10, 0.05)) and lr < 0.045
    params = dict(loop.net.named_parameters())
    for name, want in after.items():
        torch.testing.assert_close(params[name].detach(), want, rtol=1e-4, atol=1e-6, msg=name)
    assert loop.state.step == 3 and loop.state.losses == [got]
    got2, lr2, _ = loop.step(images, human)  # the next step: the next rate of the schedule
    assert lr2 == pytest.approx(tl.poly_lr(3, 10, 0.05)) and loop.state.losses == [got, got2]


def test_from_the_self_training_start_the_student_labels_its_own_crops(tmp_path):
    """``train_self_training_start`` 0.3 of 10 steps: the teacher labels steps 0 to 2; from step 3 the
    targets are the student's own argmax (people's labels still win) and the teacher is not asked."""
    loop = _loop(_s(tmp_path))
    images, human = _batch()
    loop.state.step = 2
    assert loop.step(images, human)[2] is False and loop.teacher.calls == 1
    loss, after = _expected_step(loop, images, human, lambda logits: logits.detach().softmax(1))
    got, _, self_training = loop.step(images, human)
    assert self_training and loop.teacher.calls == 1 and loop.state.step == 4
    assert got == pytest.approx(loss, rel=1e-5)


def test_a_batch_without_a_single_target_pixel_is_a_zero_loss_step(tmp_path):
    """Nobody painted and the teacher is sure of nothing (threshold 0.9): the loss is 0, the step counts."""
    loop = _loop(_s(tmp_path, train_pseudo_threshold=0.9))
    images, _ = _batch()
    loss, _, _ = loop.step(images, torch.full((2, 32, 32), 255, dtype=torch.uint8))
    assert loss == 0.0 and loop.state.step == 1 and loop.state.losses == [0.0]


def test_the_student_sees_imagenet_normalised_pixels_in_train_mode_at_the_crops_size(tmp_path):
    loop = _loop(_s(tmp_path))
    images, _ = _batch()
    want = _logits(copy.deepcopy(loop.net), images)
    loop.net.eval()  # as validation leaves it
    got = loop._logits(images)
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32 and loop.model.training
    torch.testing.assert_close(got, want.detach())


def test_the_students_pretrained_weights_setting_is_honoured_not_ignored(tmp_path):
    """The tiny student has no pretrained weights: asking for ImageNet's is an error, not a silent default."""
    from labelstudio_maskclip.training.student import StudentWeightsError

    with pytest.raises(StudentWeightsError, match="MASKCLIP_STUDENT_PRETRAINED='imagenet'"):
        _loop(_s(tmp_path, student_pretrained="imagenet"))


# --- resume --------------------------------------------------------------------------------------------------


def test_resuming_restores_weights_optimizer_and_state_and_continues_with_the_same_step(tmp_path):
    s = _s(tmp_path)
    images, human = _batch()
    run_dir = tmp_path / "runs" / "r1"
    first = _loop(s)
    for _ in range(2):
        first.step(images, human)
    first.state.evals.append({"step": 2, "miou": 0.25})
    tl.save_resume(run_dir, first.net, first.opt, first.state)
    torch.manual_seed(1)  # another starting point: the resumed student must come from the file
    resumed = tl.Loop.build(s, CoarseTeacher(), CPU, tl.Dist(), run_dir)
    assert resumed.state == tl.RunState(2, first.state.losses, [{"step": 2, "miou": 0.25}])
    assert resumed.state.losses is not first.state.losses
    for (name, a), b in zip(first.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    momentum = [first.opt.state[p]["momentum_buffer"] for g in first.opt.param_groups for p in g["params"]]
    again = [resumed.opt.state[p]["momentum_buffer"] for g in resumed.opt.param_groups for p in g["params"]]
    for a, b in zip(momentum, again, strict=True):
        torch.testing.assert_close(a, b)
    assert first.step(images, human) == resumed.step(images, human)
    for a, b in zip(first.net.parameters(), resumed.net.parameters()):
        torch.testing.assert_close(a, b)


def test_resuming_a_run_without_its_state_names_the_file(tmp_path):
    net = build_student("tiny", CoarseTeacher().embeddings)
    with pytest.raises(tl.TrainError, match=re.escape(f"cannot resume: {tmp_path / 'gone' / 'last.pt'} does not")):
        tl.load_resume(tmp_path / "gone", net, tl.optimizer(net, _s(tmp_path)))


# --- a run: checkpoints and progress -------------------------------------------------------------------------


def test_a_run_takes_the_remaining_steps_and_checkpoints_every_n_but_not_after_the_last(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=tl.__name__)
    loop = _loop(_s(tmp_path, train_steps=6, train_self_training_start=0.5))
    seen: list[int] = []
    loop.run(_items(tmp_path), np.random.default_rng(0), progress=False, checkpoint_every=2,
             on_checkpoint=lambda: seen.append(loop.state.step))  # fmt: skip
    assert seen == [2, 4] and loop.state.step == 6 and len(loop.state.losses) == 6  # not at 6: the run ends
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" loss")[0] for line in lines] == ["step 1/6", "step 6/6"]  # first and last only
    assert lines[0].endswith("targets from teacher") and lines[1].endswith("targets from student")
    loop.state.step = 3  # resumed: steps 4 to 6 only
    loop.run(_items(tmp_path), np.random.default_rng(0), progress=False, checkpoint_every=2,
             on_checkpoint=lambda: seen.append(loop.state.step))  # fmt: skip
    assert seen == [2, 4, 4] and loop.state.step == 6 and len(loop.state.losses) == 9
    loop.state.step = 0
    loop.run(_items(tmp_path), np.random.default_rng(0), progress=False, on_checkpoint=lambda: seen.append(-1))
    assert seen == [2, 4, 4]  # checkpoint_every 0: never


def test_progress_is_logged_every_fiftieth_step():
    log = logging.getLogger(tl.__name__)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        for step in (2, 49, 50, 51, 100, 120):
            tl._report(None, step, 120, 0.5, 0.01, False)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    assert [line.split(" loss")[0] for line in lines] == ["step 50/120", "step 100/120", "step 120/120"]


def test_the_progress_bar_counts_from_where_the_run_stands_and_shows_loss_rate_and_source(tmp_path, capsys):
    loop = _loop(_s(tmp_path, train_steps=4, train_self_training_start=0.5))
    loop.state.step = 1
    loop.run(_items(tmp_path), np.random.default_rng(0), progress=True)
    err = capsys.readouterr().err
    assert "train:  25%" in err and "1/4" in err and "4/4" in err and ("step/s" in err or "s/step" in err)
    assert re.search(r"loss=\d\.\d{3}, lr=\d\.\d\de-\d\d, src=teacher", err)
    assert re.search(r"4/4 .*src=self", err) and err.endswith("\n")


# --- torchrun's helpers --------------------------------------------------------------------------------------


def test_a_process_alone_is_rank_zero_of_one_and_its_helpers_change_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = tl.Dist.init()
    assert alone == tl.Dist(0, 1, 0) and alone.main and not tdist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert tl.Dist.init() == tl.Dist(0, 1, 0) and not tdist.is_initialized()
    value = {"run": "r1"}
    assert alone.broadcast(value) is value and alone.barrier() is None
    assert not tl.Dist(1, 2, 1).main


@pytest.fixture
def group_of_one(tmp_path, monkeypatch):
    """A real gloo process group with this process as its only member, as torchrun's rank 0 has one."""
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def test_under_torchrun_the_ranks_variables_are_read_and_the_student_is_wrapped_for_ddp(
    tmp_path, monkeypatch, group_of_one
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert tl.Dist.init() == tl.Dist(0, 2, 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = tl.Dist.init()
    assert d == tl.Dist(0, 2, 1) and d.main
    assert d.broadcast("r-7") == "r-7" and d.barrier() is None
    loop = _loop(_s(tmp_path), dist=d)
    assert isinstance(loop.model, torch.nn.parallel.DistributedDataParallel) and loop.model.module is loop.net
    assert loop.step(*_batch())[0] > 0


PARTNER = """
import datetime, torch.distributed as d
d.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
box = [None]
d.broadcast_object_list(box, src=0)
print("rank", d.get_rank(), "got", box[0], flush=True)
d.barrier()
d.destroy_process_group()
"""


def test_rank_zero_joins_torchruns_group_and_its_broadcast_and_barrier_reach_the_other_rank(monkeypatch):
    """torchrun's variables for rank 0 of 2 (no LOCAL_RANK: 0); the other rank is a second process. Dist
    starts the process group (gloo without a GPU); the run id rank 0 broadcasts is the other's; both meet at
    the barrier."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    other = subprocess.Popen([sys.executable, "-c", PARTNER], env={**os.environ, **env, "RANK": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for name, value in {**env, "RANK": "0"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the partner has gloo, GPU or not
        d = tl.Dist.init()
        try:
            assert d == tl.Dist(0, 2, 0) and tdist.get_backend() == "gloo"
            assert d.broadcast("20261204-120000-7") == "20261204-120000-7"
            d.barrier()
        finally:
            tdist.destroy_process_group()
        out, err = other.communicate(timeout=60)
    finally:
        if other.poll() is None:
            other.kill()
            other.communicate()
    assert other.returncode == 0, err[-2000:]
    assert out.strip() == "rank 1 got 20261204-120000-7"
