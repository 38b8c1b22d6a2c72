"""MaskCLIP+ training: targets, schedule, metrics, promotion, and the premise (student beats its teacher)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labelstudio_maskclip.evaluation import evaluate as ev
from labelstudio_maskclip.evaluation import metrics
from labelstudio_maskclip.evaluation.metrics import IGNORE
from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training import data as td
from labelstudio_maskclip.training import loop as tl
from labelstudio_maskclip.training import train as tr
from labelstudio_maskclip.training import validation as tv
from labelstudio_maskclip.training.student import load_student
from labelstudio_maskclip.training.trigger import acquire_training_lock
from tests.tiny import TINY_VIT

CLASSES = ["disc", "box", "ground"]
COLOURS = {0: (200, 40, 40), 1: (40, 40, 200)}  # disc red, box blue; ground is textured grey


# --- a synthetic task with known ground truth --------------------------------------------------------------


def synthetic(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 ground truth: red discs (0), blue boxes (1), grey ground (2)."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(70, 180, (size, size, 1))
    img = np.clip(grey + rng.integers(-8, 9, (size, size, 3)), 0, 255)
    gt = np.full((size, size), 2, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(1, 3)):
        y0, x0, w, h = rng.integers(0, size - 16, 2).tolist() + rng.integers(10, 24, 2).tolist()
        gt[y0 : y0 + h, x0 : x0 + w] = 1
    for _ in range(rng.integers(1, 3)):
        cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(6, 12))]
        gt[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 0
    for k, colour in COLOURS.items():
        img[gt == k] = np.clip(np.array(colour) + rng.integers(-20, 21, ((gt == k).sum(), 3)), 0, 255)
    return img.astype(np.uint8), gt


class NoisyOracle:
    """A teacher with MaskCLIP's interface: the true labels (from the colours) corrupted like a dense CLIP
    prediction: a coarse grid (blocky boundaries, stride ``block``) and random blobs of wrong labels."""

    def __init__(self, blobs: int = 3, block: int = 8, seed: int = 0, dim: int = 16):
        self.blobs, self.block = blobs, block
        self.gen = torch.Generator().manual_seed(seed)
        self.embeddings = F.normalize(torch.randn(3, dim, generator=self.gen), dim=1)

    @staticmethod
    def truth(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, H, W) labels from colour dominance (robust to the jitter)."""
        r, g, b = images[:, 0], images[:, 1], images[:, 2]
        lab = torch.full_like(r, 2, dtype=torch.long)
        lab[r - torch.maximum(g, b) > 0.2] = 0
        lab[b - torch.maximum(r, g) > 0.2] = 1
        return lab

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        lab = self.truth(images.float().cpu())
        bsz, height, width = lab.shape
        onehot = F.one_hot(lab, 3).permute(0, 3, 1, 2).float()
        if self.block > 1:  # coarse grid: majority label per block
            coarse = F.avg_pool2d(onehot, self.block, ceil_mode=True)
            onehot = F.one_hot(coarse.argmax(1), 3).permute(0, 3, 1, 2).float()
            onehot = F.interpolate(onehot, size=(height, width), mode="nearest")
        yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        for i in range(bsz):
            for _ in range(self.blobs):
                cy, cx = (torch.rand(2, generator=self.gen) * torch.tensor([height, width])).tolist()
                rad = 4 + 8 * float(torch.rand(1, generator=self.gen))
                k = int(torch.randint(0, 3, (1,), generator=self.gen))
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
                onehot[i, :, blob] = 0.0
                onehot[i, k, blob] = 1.0
        return 0.1 + 0.7 * onehot  # (B, 3, H, W), rows sum to 1

    def describe(self) -> dict:
        return {"model": "noisy-oracle", "pretrained": "none", "templates": []}


def _png_data_uri(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _settings(model_dir, **kw) -> Settings:
    base = dict(
        model_dir=str(model_dir),
        device="cpu",
        student="tiny",
        student_pretrained="none",
        short_side=0,
        train_steps=2,
        train_batch_size=2,
        train_crop=32,
        promote="always",
        train_val_fraction=0.0,
    )
    base.update(kw)
    return Settings(**base)


def _fill(store: Store, ids, *, annotated=(), seed0: int = 0) -> dict[str, np.ndarray]:
    """Tasks with synthetic images (refs = data URIs); ``annotated`` ids get their true masks."""
    images = {}
    for tid in ids:
        img, gt = synthetic(seed0 + tid)
        ref = f"img-{tid}"
        images[ref] = img
        store.put_tasks([TaskRecord(tid, image=ref)])
        if tid in annotated:
            masks = {CLASSES[k]: gt == k for k in range(3) if (gt == k).any()}
            store.put_annotation(
                AnnotationWrite(id=1000 + tid, task=TaskRecord(tid, image=ref), masks=masks, height=64, width=64)
            )
    return images


def _miou(pred_fn, seeds) -> float:
    total = np.zeros((3, 4), np.int64)
    for sd in seeds:
        img, gt = synthetic(sd)
        total += metrics.confusion_matrix(gt, pred_fn(img), 3)
    return metrics.mean_iou(total)


# --- pure parts --------------------------------------------------------------------------------------------


def test_peoples_masks_take_precedence_over_pseudo_labels():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 3)
    human = torch.tensor([[[255, 255, 0]]], dtype=torch.uint8)
    got = td.build_targets(probs, human, threshold=0.5)
    assert got.tolist() == [[[0, 255, 0]]]  # confident pseudo label; unsure -> ignored; person wins over 0.8
    assert td.build_targets(probs, human, threshold=0.0).tolist() == [[[0, 0, 0]]]


def test_poly_schedule_and_validation_split():
    assert tl.poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert tl.poly_lr(100, 100, 0.01) == pytest.approx(1e-4)
    assert tl.poly_lr(50, 100, 0.01) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    picks = [td.is_validation(t, 0.2) for t in range(2000)]
    assert picks == [td.is_validation(t, 0.2) for t in range(2000)]  # deterministic by task id
    assert 0.17 < np.mean(picks) < 0.23
    assert not any(td.is_validation(t, 0.0) for t in range(100)) and all(td.is_validation(t, 1.0) for t in range(100))


def _items(tmp_path, gts) -> list:
    """Validation items on disk: a blank image and each (H, W) uint8 ground truth (255 = nobody labelled)."""
    items = []
    for i, gt in enumerate(gts):
        np.save(image := tmp_path / f"img{i}.npy", np.zeros((*gt.shape, 3), np.uint8))
        np.save(labels := tmp_path / f"lab{i}.npy", gt.astype(np.uint8))
        items.append(td.Item(i, image, labels))
    return items


def test_validation_counts_only_labelled_pixels(tmp_path):
    gt = np.array([[0, 0, 1, 255]], np.uint8)
    items = _items(tmp_path, [gt])
    assert tv.evaluate(lambda img: np.array([[0, 1, 1, 0]]), items, 2) == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert tv.evaluate(lambda img: np.array([[-1, -1, -1, 0]]), items, 2) == 0.0  # no label = miss
    assert tv.evaluate(lambda img: np.array([[0, 0, 1, 7]]), items, 2) == 1.0  # the 255 pixel is not counted
    assert tv.evaluate(lambda img: np.zeros((1, 4)), _items(tmp_path, [np.full((1, 4), 255)]), 2) is None
    assert tv.evaluate(lambda img: np.zeros((1, 4)), [], 2) is None


def test_validation_penalises_labels_absent_from_the_image(tmp_path):
    """People labelled only "disc" (0): a candidate that paints "box" (1) on a tenth of it must lose to a
    teacher that leaves a fifth unlabelled (mmsegmentation's mIoU: box's IoU 0 counts), not win as it did
    when the mean ran over ground-truth labels only."""
    gt = np.full((10, 10), IGNORE, np.uint8)
    gt[:, :5] = 0
    items = _items(tmp_path, [gt])
    painter = np.zeros((10, 10), np.int64)
    painter[:5, 0] = 1  # 5 of the 50 labelled pixels
    shy = np.zeros((10, 10), np.int64)
    shy[:, 0] = -1  # 10 of 50 without a label
    candidate = tv.evaluate(lambda img: painter, items, 3)
    teacher = tv.evaluate(lambda img: shy, items, 3)
    assert candidate == pytest.approx((0.9 + 0.0) / 2) and teacher == pytest.approx(0.8)
    assert not tv.decide("better", candidate, teacher, None, tv.MIN_VAL_MASKS)[0]


def test_validation_and_eval_agree(tmp_path):
    """Training validation and `eval` compute one mIoU (the same confusion matrix and mean)."""
    rng = np.random.default_rng(0)
    gts = [rng.choice([0, 1, 2, 3, 255], (12, 9)).astype(np.uint8) for _ in range(3)]
    preds = [rng.integers(-1, 4, (12, 9)) for _ in range(3)]
    by_image = iter(preds)
    got = tv.evaluate(lambda img: next(by_image), _items(tmp_path, gts), 4)
    conf = sum(ev.confusion_matrix(g, p, 4) for g, p in zip(gts, preds))
    assert got == pytest.approx(ev.scores(conf)["mIoU"])


def test_promotion_rule():
    assert tv.decide("always", None, None, None, 0)[0]
    ok, why = tv.decide("better", 0.6, 0.5, None, 2)
    assert not ok and "only 2 held-out" in why and "MASKCLIP_PROMOTE=always" in why
    assert tv.decide("better", 0.6, 0.5, 0.55, 4)[0]
    ok, why = tv.decide("better", 0.6, 0.5, 0.7, 4)
    assert not ok and "current student" in why
    assert not tv.decide("better", 0.5, 0.5, None, 10)[0]  # a tie is not better


# --- runs --------------------------------------------------------------------------------------------------


def test_two_step_run_with_the_clip_teacher_writes_a_loadable_checkpoint(tmp_path, weights):
    s = _settings(tmp_path, model=TINY_VIT, pretrained=str(weights), templates="simple")
    store = Store(tmp_path)
    images = _fill(store, range(4), annotated={0})
    fetched = []
    result = tr.train(s, store, load_image=lambda ref, tid: fetched.append(ref) or images[ref], progress=False)
    assert result.promoted and result.version == "maskclip+-1" == ck.current_version(tmp_path)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["data"] == {
        "annotated": 1,
        "unlabeled": 3,
        "validation": 0,
        "failed_images": 0,
        "unknown_label_masks": 0,
    }
    assert len(metrics["loss"]) == 2 and metrics["few_masks"] and metrics["promoted"]
    assert (result.run_dir / "curves.png").stat().st_size > 1000
    model = load_student(ck.current_checkpoint(tmp_path), "cpu")
    assert model.labels == ["box", "disc", "ground"]  # default: labels found in the store, sorted
    assert model.meta["clip"]["model"] == "MaskCLIP-Tiny-ViT" and model.meta["settings"]["train_steps"] == 2
    seg = model.segment([images["img-1"]], ["disc", "box", "ground"])[0]
    assert seg.labels.shape == (64, 64) and seg.class_areas.sum() == 64 * 64
    assert store.count_since_last_training() == 0  # the run was recorded in the store
    # images are cached: a second run fetches nothing
    fetched.clear()
    tr.train(s, store, load_image=lambda ref, tid: fetched.append(ref) or images[ref], progress=False)
    assert fetched == [] and ck.current_version(tmp_path) == "maskclip+-2"


def test_student_beats_its_noisy_teacher(tmp_path):
    """The MaskCLIP+ premise on a synthetic task: trained only on a noisy teacher's labels (no people's
    masks), the student's mIoU against the truth on held-out images exceeds the teacher's."""
    torch.manual_seed(0)
    s = _settings(
        tmp_path, train_steps=100, train_batch_size=8, train_crop=48, train_lr=0.05, train_self_training_start=0.8
    )
    store = Store(tmp_path)
    images = _fill(store, range(24))
    teacher = NoisyOracle(seed=1)
    result = tr.train(
        s, store, load_image=lambda ref, tid: images[ref], teacher=teacher, classes=CLASSES, progress=False
    )
    student = load_student(ck.checkpoint_path(tmp_path, result.version), "cpu")
    held_out = range(500, 516)
    student_miou = _miou(lambda img: student.segment([img], CLASSES)[0].labels, held_out)
    teacher_miou = _miou(lambda img: tv.teacher_labels(teacher, img, 0, 0.0), held_out)
    print(f"student {student_miou:.3f} teacher {teacher_miou:.3f}")
    assert student_miou > teacher_miou + 0.03


def test_worse_candidate_is_not_promoted_and_served_model_stays(tmp_path):
    s = _settings(tmp_path, promote="better", train_val_fraction=1.0, train_lr=1e-6)
    store = Store(tmp_path)
    images = _fill(store, range(8), annotated=set(range(4)))
    served = ck.promote(
        tmp_path,
        {
            "student": "tiny",
            "state_dict": {},
            "embeddings": torch.zeros(3, 16),
            "classes": [["other"]],
            "background": [],
        },
    )
    perfect = NoisyOracle(blobs=0, block=1)
    result = tr.train(
        s, store, load_image=lambda ref, tid: images[ref], teacher=perfect, classes=CLASSES, progress=False
    )
    m = result.metrics
    assert m["data"]["validation"] == 4 and not m["few_masks"]
    assert m["miou"]["teacher"] == pytest.approx(1.0) and m["miou"]["candidate"] < 1.0
    assert m["miou"]["current"] is None  # the served student has other labels: not compared
    assert not result.promoted and result.version is None and "<= teacher" in result.decision
    assert ck.current_version(tmp_path) == served and len(ck.history(tmp_path)) == 1


def test_few_masks_are_reported_and_block_promote_better(tmp_path):
    s = _settings(tmp_path, promote="better", train_val_fraction=1.0)
    store = Store(tmp_path)
    images = _fill(store, range(4), annotated={0, 1})
    result = tr.train(
        s, store, load_image=lambda ref, tid: images[ref], teacher=NoisyOracle(), classes=CLASSES, progress=False
    )
    assert result.metrics["few_masks"] and result.metrics["data"]["validation"] == 2
    assert not result.promoted and "only 2 held-out" in result.decision and ck.current_version(tmp_path) is None


def test_checkpoint_resume_continues_the_schedule(tmp_path):
    s = _settings(tmp_path, train_steps=4)
    store = Store(tmp_path)
    images = _fill(store, range(3))
    load = lambda ref, tid: images[ref]  # noqa: E731
    first = tr.train(
        s.replace(train_steps=2), store, load_image=load, teacher=NoisyOracle(), classes=CLASSES, progress=False
    )
    # a run that checkpointed at step 2 of 4 and was killed: recreate its last.pt from the first run's state
    net = load_student(ck.checkpoint_path(tmp_path, first.version), "cpu").net
    opt = tl.optimizer(net, s)
    tl.save_resume(first.run_dir, net, opt, tl.RunState(2, [1.0, 0.9], []))
    resumed = tr.train(
        s, store, load_image=load, teacher=NoisyOracle(), classes=CLASSES, progress=False, resume=first.run_id
    )
    assert resumed.run_id == first.run_id and resumed.metrics["loss"][:2] == [1.0, 0.9]
    assert len(resumed.metrics["loss"]) == 4 and not (first.run_dir / "last.pt").exists()
    with pytest.raises(tr.TrainError, match="cannot resume"):
        tr.train(s, store, load_image=load, teacher=NoisyOracle(), classes=CLASSES, resume="no-such-run")


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    s = _settings(tmp_path)
    store = Store(tmp_path)
    images = _fill(store, range(3))

    def load(ref, tid):
        if tid == 1:
            raise OSError("gone")
        return images[ref]

    result = tr.train(s, store, load_image=load, teacher=NoisyOracle(), classes=CLASSES, progress=False)
    assert result.metrics["data"]["failed_images"] == 1 and result.metrics["data"]["unlabeled"] == 2
    with pytest.raises(tr.TrainError, match="no labels"):
        tr.train(s, Store(tmp_path / "empty"), load_image=load, teacher=NoisyOracle())


def test_two_process_distributed_run_on_cpu(tmp_path, weights):
    """torchrun with 2 gloo processes: both ranks train their shard, rank 0 promotes once (about 15 s)."""
    import subprocess
    import sys

    from labelstudio_maskclip.jobs import settings_env

    s = _settings(
        tmp_path / "md", model=TINY_VIT, pretrained=str(weights), templates="simple", short_side=32, train_steps=3
    )
    store = Store(tmp_path / "md")
    for tid in range(4):
        store.put_tasks([TaskRecord(tid, image=_png_data_uri(synthetic(tid)[0]))])
    env = settings_env(s)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        torchrun + ["-m", "labelstudio_maskclip.training.train", "--service", "--labels", "disc,box,ground"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a generous bound: about 15 s on an idle machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("step 3/3") == 2 and "(world 2)" in proc.stderr
    assert [h["version"] for h in ck.history(tmp_path / "md")] == ["maskclip+-1"]


def test_cli_train_hands_the_trainer_a_settings_object_and_leaves_the_environment_alone(tmp_path, monkeypatch):
    """`labelstudio-maskclip train` runs in-process: CLI flags reach the trainer in the Settings it is
    given (not by rewriting os.environ and re-parsing), and the lock is released afterwards."""
    import os

    from labelstudio_maskclip import cli

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("MASKCLIP_TRAIN_LR", "0.03")
    seen = {}

    def fake_train(settings, store, **kw):
        seen.update(settings=settings, **kw)
        return tr.TrainResult("r1", tmp_path / "runs" / "r1", False, None, "not promoted: test", {"miou": {}})

    monkeypatch.setattr(tr, "train", fake_train)
    before = dict(os.environ)
    argv = ["train", "--steps", "7", "--promote", "always", "--student", "tiny", "--device", "cpu",
            "--labels", "car | automobile, dog", "--background", "sky", "--project", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    assert dict(os.environ) == before
    s = seen["settings"]
    assert isinstance(s, Settings)
    assert (s.train_steps, s.promote, s.student, s.device, s.train_lr) == (7, "always", "tiny", "cpu", 0.03)
    assert s.model_dir == str(tmp_path)
    assert seen["classes"] == (("car", "automobile"), ("dog",)) and seen["background"] == (("sky",),)
    assert seen["project"] == 3 and seen["resume"] is None
    lock = acquire_training_lock(tmp_path)  # the in-process run released the training lock
    assert lock is not None
    lock.close()


SECRETS = {"label_studio_api_key": "lsk-0123456789-secret", "basic_auth_pass": "pw-9876543210-secret"}


def test_secrets_never_reach_the_disk(tmp_path):
    """The promoted checkpoint records the training settings, but not the credentials among them; no file
    a run leaves behind holds them."""
    s = _settings(tmp_path, basic_auth_user="ls", **SECRETS)
    store = Store(tmp_path)
    images = _fill(store, range(2), annotated={0})
    result = tr.train(s, store, load_image=lambda ref, tid: images[ref], teacher=NoisyOracle(), classes=CLASSES,
                      progress=False)  # fmt: skip
    assert result.promoted
    saved = torch.load(ck.checkpoint_path(tmp_path, result.version), weights_only=True)["settings"]
    assert saved["train_steps"] == 2 and saved["basic_auth_user"] == "ls" and "basic_auth_pass" not in saved
    leaks = [
        p for p in tmp_path.rglob("*") if p.is_file() and any(v.encode() in p.read_bytes() for v in SECRETS.values())
    ]
    assert leaks == []


def test_masks_of_labels_with_predicted_values_are_trained_on(tmp_path):
    """People's masks are keyed by label value ("Disc"); the model knows the label by its predicted_values
    ("red disc", "disc"). Every mask must reach the label maps: none dropped as unknown, and a perfect
    teacher scores 1.0 on the held-out masks."""
    s = _settings(tmp_path, promote="better", train_val_fraction=1.0)
    values = ("Disc", "Box", "Ground")
    names = (("red disc", "disc"), ("blue box",), ("ground", "floor"))
    store = Store(tmp_path)
    images = {}
    for tid in range(4):
        img, gt = synthetic(tid)
        images[ref := f"img-{tid}"] = img
        masks = {values[k]: gt == k for k in range(3) if (gt == k).any()}
        store.put_annotation(AnnotationWrite(id=tid + 1, task=TaskRecord(tid, image=ref), masks=masks, height=64,
                                             width=64))  # fmt: skip
    images.update(_fill(store, range(10, 12)))  # unlabeled tasks to train on: the annotated ones are held out
    perfect = NoisyOracle(blobs=0, block=1)
    result = tr.train(s, store, load_image=lambda ref, tid: images[ref], teacher=perfect, classes=names,
                      values=values, progress=False)  # fmt: skip
    assert result.metrics["data"]["unknown_label_masks"] == 0 and result.metrics["data"]["validation"] == 4
    assert result.metrics["miou"]["teacher"] == pytest.approx(1.0)
    with pytest.raises(tr.TrainError, match="2 label values for 3 classes"):
        tr.train(s, store, load_image=lambda ref, tid: images[ref], teacher=perfect, classes=names, values=values[:2])


def test_a_run_for_labels_with_synonyms_reads_the_servers_rows_per_name(tmp_path, weights):
    """The run's teacher takes the server's stored text embeddings, one row per name (the store rejects
    anything else), and the student's classifier gets one row per label: its names averaged."""
    from labelstudio_maskclip.embeddings import label_set
    from labelstudio_maskclip.engine.text import synonym_means
    from labelstudio_maskclip.models import text_embedding_store

    s = _settings(tmp_path, model=TINY_VIT, pretrained=str(weights), templates="simple")
    store = Store(tmp_path)
    images = _fill(store, range(3), annotated={0})
    classes = [("disc", "round thing", "circle"), ("box",), ("ground",)]
    result = tr.train(s, store, load_image=lambda ref, tid: images[ref], classes=classes, progress=False)
    stored = text_embedding_store(s, lambda labels: pytest.fail("not stored")).prepare(label_set(classes)).result(0)
    assert stored.shape[0] == 5  # one row per name
    ckpt = ck.read_checkpoint(ck.checkpoint_path(tmp_path, result.version))
    torch.testing.assert_close(ckpt["embeddings"], synonym_means(stored, torch.tensor([0, 0, 0, 1, 2])))
