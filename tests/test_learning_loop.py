"""The learning loop's silent failures, each pinned by a behavioural test (issue: the loop proven).

- a served student follows every promotion and rollback within one running app (no stale model under a new
  version);
- the promotion gate's baseline is the served student's own validation score, and a better candidate is
  promoted over it;
- training never sees a held-out validation task;
- a student's masks carry the request's labels whatever the order of its checkpoint's classes;
- two DistributedDataParallel ranks hold equal parameters after their steps;
- augmentation keeps an image and its people's labels aligned (flips, crops).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelstudio_maskclip.evaluation import metrics
from labelstudio_maskclip.learning.store import Store
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training import data as td
from labelstudio_maskclip.training import train as tr
from labelstudio_maskclip.training.student import StudentModel, build_student, class_key, load_student
from tests.test_training import CLASSES, _fill, _settings, synthetic
from tests.tiny import TINY_VIT, save_random_state

DIM = 16


def _embeddings(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def constant_student(emb: torch.Tensor, k: int):
    """A tiny student whose every pixel's feature is class ``k``'s text embedding: it answers ``k`` everywhere
    (softmax of 10 x cosines: about 0.99 on ``k`` for random 16-d embeddings)."""
    net = build_student("tiny", emb, "none")
    with torch.no_grad():
        net.trunk.proj.weight.zero_()
        net.trunk.proj.bias.copy_(emb[k] * 5)
    return net


def _promote(model_dir, net, classes) -> str:
    payload = {"student": "tiny", "state_dict": net.state_dict(), "embeddings": net.classifier.weight[:, :, 0, 0],
               "classes": [list(c) for c in class_key(classes)], "background": [], "settings": {}}  # fmt: skip
    return ck.promote(model_dir, payload)


# --- serving follows promotions and rollbacks ----------------------------------------------------------------

BRUSH = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Food"/><Label value="Sky"/></BrushLabels>
</View>"""
BRUSH_CLASSES = [("Cat",), ("Food",), ("Sky",)]


def _data_uri(img: np.ndarray) -> str:
    from tests.test_training import _png_data_uri

    return _png_data_uri(img)


def test_every_promotion_and_rollback_changes_what_one_running_app_serves(tmp_path):
    """One app (one worker process) answers /predict between two promotions and two rollbacks: each answer
    comes from the model its version names (a student answering one label everywhere), never the one
    loaded before."""
    from labelstudio_maskclip.serving.server import create_app

    weights = save_random_state(TINY_VIT, tmp_path / "tiny.pt")
    s = Settings(model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=32, templates="simple",
                 model_dir=str(tmp_path / "md"), min_area=0.0, min_confidence=0.0)  # fmt: skip
    client = create_app(s, warm=False).test_client()
    tasks = [{"id": 1, "data": {"image": _data_uri(synthetic(3)[0])}}]
    emb = _embeddings(3)

    def served() -> tuple[str, set[str]]:
        body = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH}).get_json()
        assert body["errors"] == [], body["errors"]
        labels = {r["value"]["brushlabels"][0] for r in body["results"][0]["result"]}
        return body["model_version"], labels

    teacher_version, _ = served()
    assert teacher_version.startswith("maskclip-")
    food = _promote(s.model_dir, constant_student(emb, 1), BRUSH_CLASSES)
    assert served() == (food, {"Food"})
    sky = _promote(s.model_dir, constant_student(emb, 2), BRUSH_CLASSES)
    assert served() == (sky, {"Sky"})
    ck.rollback(s.model_dir, food)
    assert served() == (food, {"Food"})
    ck.rollback(s.model_dir, "maskclip")
    assert served()[0] == teacher_version


# --- the promotion gate --------------------------------------------------------------------------------------


class ConstantTeacher:
    """A teacher with MaskCLIP's interface that answers class ``k`` everywhere (certain of it)."""

    def __init__(self, k: int, n: int = 3):
        self.k, self.n = k, n
        self.embeddings = _embeddings(n, seed=7)
        self.seen: list[torch.Tensor] = []  # the image batches it was asked about

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().cpu().clone())
        out = torch.zeros(images.shape[0], self.n, *images.shape[2:])
        out[:, self.k] = 1.0
        return out

    def describe(self) -> dict:
        return {"model": "constant", "pretrained": "none", "templates": []}


def _constant_miou(task_ids, k: int) -> float:
    """mIoU of answering class ``k`` everywhere, against the synthetic truth of ``task_ids``."""
    total = np.zeros((3, 4), np.int64)
    for tid in task_ids:
        gt = synthetic(tid)[1]
        total += metrics.confusion_matrix(gt, np.full(gt.shape, k), 3)
    return metrics.mean_iou(total)


def test_the_served_students_own_score_is_the_baseline_and_a_better_candidate_is_promoted(tmp_path):
    """The served student (answering "box" everywhere) is scored on the held-out tasks; that score, and not
    the candidate's, is what the candidate must beat. Teacher ("disc" everywhere) and served student are
    poor; the candidate, trained on people's masks, beats both and is promoted."""
    torch.manual_seed(0)
    s = _settings(tmp_path, promote="better", train_val_fraction=0.5, train_steps=30, train_batch_size=4,
                  train_lr=0.05)  # fmt: skip
    store = Store(tmp_path)
    ids = range(16)
    images = _fill(store, ids, annotated=set(ids))
    val_ids = [t for t in ids if td.is_validation(t, 0.5)]
    assert len(val_ids) >= 4
    served = _promote(tmp_path, constant_student(_embeddings(3), CLASSES.index("box")), CLASSES)
    result = tr.train(s, store, load_image=lambda ref, tid: images[ref], teacher=ConstantTeacher(0),
                      classes=CLASSES, progress=False)  # fmt: skip
    scores = result.metrics["miou"]
    assert scores["current_version"] == served
    assert scores["current"] == pytest.approx(_constant_miou(val_ids, CLASSES.index("box")))
    assert scores["teacher"] == pytest.approx(_constant_miou(val_ids, 0))
    assert scores["candidate"] > max(scores["current"], scores["teacher"]) + 0.05, scores
    assert result.promoted and ck.current_version(tmp_path) == result.version != served, result.decision
    # a shorter run beats the teacher but not the student it just promoted: that student holds it back
    short = tr.train(s.replace(train_steps=3), store, load_image=lambda ref, tid: images[ref],
                     teacher=ConstantTeacher(0), classes=CLASSES, progress=False)  # fmt: skip
    again = short.metrics["miou"]
    assert again["current_version"] == result.version and again["current"] == pytest.approx(scores["candidate"])
    assert again["teacher"] < again["candidate"] < again["current"], again
    assert not short.promoted and "<= current student" in short.decision
    assert ck.current_version(tmp_path) == result.version


# --- validation tasks are never trained on -------------------------------------------------------------------


def test_training_and_validation_task_ids_are_disjoint(tmp_path):
    store = Store(tmp_path)
    ids = range(24)
    images = _fill(store, ids, annotated=set(ids))
    samples, unlabeled, _ = td.read_store(store)
    data = td.prepare(samples, unlabeled, td.label_index([(c,) for c in CLASSES]), cache_dir=tmp_path / "cache",
                      run_dir=tmp_path / "run", load_image=lambda ref, tid: images[ref], crop=32,
                      val_fraction=0.5)  # fmt: skip
    train_ids = {it.task_id for it in data.train}
    val_ids = {it.task_id for it in data.val}
    assert val_ids == {t for t in ids if td.is_validation(t, 0.5)} and train_ids and val_ids
    assert not train_ids & val_ids and train_ids | val_ids == set(ids)


def test_the_loop_never_draws_a_validation_image(tmp_path):
    """Held-out tasks are painted green (no training task has green): none of the crops the loop asks the
    teacher about is green; the held-out images are seen only whole, at validation."""
    s = _settings(tmp_path, promote="better", train_val_fraction=0.5, train_steps=6, train_batch_size=4,
                  train_self_training_start=1.0)  # fmt: skip
    store = Store(tmp_path)
    ids = range(12)
    images = _fill(store, ids, annotated=set(ids))
    val_ids = {t for t in ids if td.is_validation(t, 0.5)}
    for tid in val_ids:
        images[f"img-{tid}"] = np.tile(np.array([20, 220, 20], np.uint8), (64, 64, 1))
    teacher = ConstantTeacher(2)
    tr.train(s, store, load_image=lambda ref, tid: images[ref], teacher=teacher, classes=CLASSES, progress=False)
    crops = torch.cat([b for b in teacher.seen if b.shape[-1] == s.train_crop])
    whole = [b for b in teacher.seen if b.shape[-1] == 64]
    assert crops.shape[0] == s.train_steps * s.train_batch_size and len(whole) == len(val_ids)

    def green(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B,) share of green-dominant pixels
        return ((x[:, 1] - torch.maximum(x[:, 0], x[:, 2])) > 0.3).float().mean((1, 2))

    assert (green(crops) < 0.5).all()
    assert all(green(b)[0] > 0.9 for b in whole)


# --- the request's label order -------------------------------------------------------------------------------


def test_each_mask_carries_its_own_label_whatever_the_request_order(tmp_path):
    emb = _embeddings(3)
    classes = [("cat",), ("car", "automobile"), ("tree",)]
    model = StudentModel(constant_student(emb, 0), classes)  # answers "cat" everywhere
    img = synthetic(1)[0]
    for order in (classes, [classes[1], classes[0], classes[2]], [classes[2], classes[1], classes[0]]):
        seg = model.segment([img], order)[0]
        assert (seg.labels == order.index(("cat",))).all(), order
        assert (seg.probabilities().argmax(0) == order.index(("cat",))).all()
    version = _promote(tmp_path, constant_student(emb, 1), classes)  # "car" everywhere, through a checkpoint
    loaded = load_student(ck.checkpoint_path(tmp_path, version), "cpu")
    assert (loaded.segment([img], [classes[2], classes[1], classes[0]])[0].labels == 1).all()
    assert (loaded.segment([img], [classes[1], classes[2], classes[0]])[0].labels == 0).all()


# --- distributed training ------------------------------------------------------------------------------------


def test_two_ranks_hold_equal_parameters_after_their_steps(tmp_path):
    """torchrun, 2 gloo processes, each on different images: after 2 steps both ranks' students are equal
    (gradients are averaged) and differ from where they started."""
    out = tmp_path / "ranks"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + ["-m", "tests.ddp_steps", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    start, r0, r1 = (torch.load(out / f"{name}.pt", weights_only=True) for name in ("start", "rank0", "rank1"))
    assert r0.keys() == r1.keys()
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], msg=f"ranks differ in {key}")
    assert any(not torch.equal(start[k], r0[k]) for k in r0 if r0[k].is_floating_point())


# --- augmentation --------------------------------------------------------------------------------------------


def test_an_image_and_its_peoples_labels_stay_aligned_through_augmentation(tmp_path):
    """An image whose colours are its labels (red 0, blue 1, grey 2, laid out without symmetry): over many
    random crops and flips, every labelled pixel of the crop has its label's colour (up to the boundary
    pixels, where bilinear and nearest resampling differ)."""
    img, gt = synthetic(5, size=96)
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "lab.npy", gt)
    item = td.Item(5, tmp_path / "img.npy", tmp_path / "lab.npy")
    rng = np.random.default_rng(0)
    for _ in range(40):
        x, y = td._augment(item, 32, rng)
        r, g, b = x
        colour = torch.full_like(r, 2, dtype=torch.long)
        colour[r - torch.maximum(g, b) > 0.15] = 0
        colour[b - torch.maximum(r, g) > 0.15] = 1
        agree = (colour == y.long()).float().mean()
        assert agree > 0.9, float(agree)


# --- the trainer reuses the server's text embeddings ---------------------------------------------------------


def test_a_run_waits_for_the_servers_text_embeddings_and_reuses_them(tmp_path):
    """While a server process computes a label set's text embeddings (slowly, here), a training run for the
    same labels waits for them and trains on exactly those numbers instead of computing its own; the next
    run reads the stored file."""
    import threading
    import time

    from labelstudio_maskclip.embeddings import label_set
    from labelstudio_maskclip.models import shared_maskclip, text_embedding_store

    weights = save_random_state(TINY_VIT, tmp_path / "tiny.pt")
    s = _settings(tmp_path / "md", model=TINY_VIT, pretrained=str(weights), templates="simple")
    classes = [(c,) for c in CLASSES]
    own = shared_maskclip(s).text_embeddings(classes).float().cpu()
    served = F.normalize(own + torch.randn(own.shape, generator=torch.Generator().manual_seed(3)), dim=1)
    started = threading.Event()

    def slow(labels):  # the server's computation, still running when the run starts
        started.set()
        time.sleep(3)
        return served

    server = text_embedding_store(s, slow).prepare(label_set(classes))
    assert started.wait(30)
    store = Store(tmp_path / "md")
    images = _fill(store, range(3))
    load = lambda ref, tid: images[ref]  # noqa: E731
    first = tr.train(s, store, load_image=load, classes=CLASSES, progress=False)
    assert server.done()
    for result in (first, tr.train(s, store, load_image=load, classes=CLASSES, progress=False)):
        ckpt = ck.read_checkpoint(ck.checkpoint_path(tmp_path / "md", result.version))
        torch.testing.assert_close(ckpt["embeddings"], served)
        assert not torch.allclose(ckpt["embeddings"], own)
