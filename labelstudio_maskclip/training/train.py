"""MaskCLIP+ training: distil the MaskCLIP teacher (plus people's masks) into a student, validate, promote.

One run (METHOD.md section 2):

1. Data from the store (:func:`read_store`, the one adapter to :class:`~labelstudio_maskclip.learning.store.Store`):
   accepted samples (image + per-label masks) and the unlabeled pool. Images are fetched once through
   ``load_image(ref, task_id)`` and cached under ``MODEL_DIR/cache/`` (short side at most twice the crop).
   A fixed share of the people's masks is held out for validation, chosen by task id
   (:func:`is_validation`), so a task stays on its side across runs.
2. Each step: a random resized crop (``train_crop``), flip and photometric jitter of a batch; the frozen
   teacher runs on the same crop; targets = argmax of its upsampled probabilities, pixels below
   ``train_pseudo_threshold`` ignored (255); pixels covered by people's masks take their label instead
   (:func:`build_targets`). After ``train_self_training_start`` of the schedule, the student's own
   predictions replace the teacher's on pixels people did not label. Pixels outside every accepted mask
   are treated as unlabeled (people rarely paint everything).
3. Cross-entropy (ignore 255); SGD (lr ``train_lr``, momentum, weight decay from Settings), poly decay
   power 0.9 to 1e-4; bf16 autocast and channels_last on CUDA; DistributedDataParallel under torchrun.
4. Validation on the held-out masks: mIoU over labels (confusion matrix on the pixels people labelled) of
   the teacher, the served student (if its labels match) and the candidate; the decision is :func:`decide`.
5. Output in ``MODEL_DIR/runs/<run-id>/``: ``metrics.json``, ``curves.png``, ``last.pt`` (resume state);
   a promotion goes through :func:`labelstudio_maskclip.training.checkpoints.promote` (atomic).

Promotion rule (:func:`decide`): ``promote="always"`` promotes every finished run. ``promote="better"``
promotes when the candidate's mIoU beats both the teacher's and the served student's on at least
:data:`MIN_VAL_MASKS` held-out annotated tasks. With fewer held-out masks there is nothing trustworthy to
compare on: the run is kept in ``runs/`` but NOT promoted, and metrics and log say so; set
``MASKCLIP_PROMOTE=always`` to serve an unvalidated student (e.g. annotation-free MaskCLIP+).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..settings import Settings
from .checkpoints import current_checkpoint, save_checkpoint
from .checkpoints import promote as promote_checkpoint
from .student import IMAGENET_MEAN, IMAGENET_STD, StudentModel, StudentNet, build_student, class_key

__all__ = [
    "IGNORE",
    "MIN_VAL_MASKS",
    "Teacher",
    "CLIPTeacher",
    "TrainError",
    "TrainResult",
    "Item",
    "read_store",
    "is_validation",
    "build_targets",
    "poly_lr",
    "confusion",
    "miou",
    "decide",
    "train",
    "train_main",
]

log = logging.getLogger(__name__)

IGNORE = 255  # target value of pixels without a label
MIN_VAL_MASKS = 4  # fewer held-out annotated tasks than this: no "better" comparison, no promotion
MIN_LR = 1e-4  # poly decay floor
POLY_POWER = 0.9
JITTER = 0.2  # brightness / contrast / saturation factors drawn from [1 - JITTER, 1 + JITTER]
CROP_SCALE = (0.25, 1.0)  # random resized crop: share of the image's area
CROP_RATIO = (3 / 4, 4 / 3)


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says what to provide."""


class Teacher(Protocol):
    """What the trainer needs of a teacher (MaskCLIP, or a stand-in in tests)."""

    embeddings: torch.Tensor  # (C, D) L2-normalised class text embeddings: K labels, then Kb background

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, C, h, w) class probabilities on any grid."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in the checkpoint (text model name, pretrained, templates)."""
        ...


class CLIPTeacher:
    """The frozen MaskCLIP teacher over fixed classes: :meth:`MaskCLIP.grid_probs` on the training crop."""

    def __init__(self, maskclip: Any, classes: Sequence[Any], background: Sequence[Any], opts: Any):
        self.maskclip = maskclip
        self.opts = opts
        self.embeddings = maskclip.text_embeddings(list(classes) + list(background)).float()  # (C, D)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.maskclip.input_size(images.shape[2], images.shape[3], 0)  # rounded to the encoder stride
        x = images.to(self.maskclip.device, torch.float32)
        if (h, w) != tuple(images.shape[2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return self.maskclip.grid_probs(self.maskclip.normalize(x), self.embeddings, self.opts).float().clone()

    def describe(self) -> dict[str, Any]:
        clip = self.maskclip.clip
        return {"model": clip.name, "pretrained": clip.pretrained, "templates": list(self.maskclip.templates)}


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    promoted: bool
    version: str | None  # the promoted version, None when not promoted
    decision: str  # one sentence: why promoted or not
    metrics: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Item:
    """A training or validation image: cached (H, W, 3) uint8 ``.npy``; ``labels``: (H, W) uint8 ``.npy`` of
    people's labels (class index, 255 = unlabeled), None for the unlabeled pool."""

    task_id: int
    image: Path
    labels: Path | None = None


# --- the store adapter -------------------------------------------------------------------------------------


def read_store(store: Any, project: int | None = None) -> tuple[list[Any], list[Any], int | None]:
    """(accepted samples, unlabeled tasks, change counter now). The ONLY place that talks to the store.

    Samples have ``task_id``, ``image``, ``masks`` (label -> (H, W) bool); tasks have ``id``, ``image``.
    """
    seq = store.current_seq() if hasattr(store, "current_seq") else None
    samples = list(store.accepted_samples(project))
    unlabeled = [t for t in store.unlabeled_tasks(project) if t.image]
    return samples, unlabeled, seq


def _mark_trained(store: Any, seq: int | None, project: int | None, version: str, metrics: dict) -> None:
    if hasattr(store, "mark_trained"):
        store.mark_trained(seq=seq, project=project, model_version=version, metrics=metrics)


# --- pure helpers ------------------------------------------------------------------------------------------


def is_validation(task_id: int, fraction: float) -> bool:
    """Deterministic hold-out by task id: a fixed pseudo-random ``fraction`` of ids (stable across runs)."""
    digest = hashlib.sha256(f"maskclip-val-{int(task_id)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def build_targets(pseudo_probs: torch.Tensor, human: torch.Tensor, threshold: float) -> torch.Tensor:
    """Training targets (B, H, W) int64.

    ``pseudo_probs``: (B, C, H, W) probabilities (teacher or student) at the crop size; ``human``: (B, H, W)
    integer labels from people's masks, 255 where nobody labelled. People's labels win; elsewhere the argmax
    of ``pseudo_probs``, or 255 where its probability is below ``threshold``.
    """
    conf, pseudo = pseudo_probs.max(1)  # (B, H, W) each
    pseudo = pseudo.masked_fill(conf < threshold, IGNORE)
    human = human.to(pseudo.device, torch.long)
    return torch.where(human != IGNORE, human, pseudo)


def poly_lr(step: int, steps: int, base: float, min_lr: float = MIN_LR, power: float = POLY_POWER) -> float:
    """Poly decay from ``base`` at step 0 to ``min_lr`` at ``steps``."""
    return (base - min_lr) * (1 - min(step, steps) / max(1, steps)) ** power + min_lr


def confusion(pred: np.ndarray, gt: np.ndarray, n_labels: int) -> np.ndarray:
    """(n+1, n+1) int64 counts [gt, pred] over pixels with gt != 255; index n = no label.

    ``pred``: (H, W) int, label index or < 0 / >= n for no label; ``gt``: (H, W) uint8 label or 255.
    """
    valid = gt != IGNORE
    p = pred[valid].astype(np.int64)
    p = np.where((p < 0) | (p >= n_labels), n_labels, p)
    g = gt[valid].astype(np.int64)
    return np.bincount(g * (n_labels + 1) + p, minlength=(n_labels + 1) ** 2).reshape(n_labels + 1, n_labels + 1)


def miou(conf: np.ndarray) -> float | None:
    """Mean IoU over labels present in the ground truth (the last row/column, no label, is not a class)."""
    n = conf.shape[0] - 1
    ious = []
    for k in range(n):
        tp, gt_k, pred_k = conf[k, k], conf[k, :].sum(), conf[:, k].sum()
        if gt_k > 0:
            ious.append(tp / (gt_k + pred_k - tp))
    return float(np.mean(ious)) if ious else None


def decide(
    promote: str, candidate: float | None, teacher: float | None, current: float | None, n_val: int
) -> tuple[bool, str]:
    """The promotion rule (see the module docstring). Returns (promote?, reason)."""
    if promote == "always":
        return True, "promoted: MASKCLIP_PROMOTE=always"
    if n_val < MIN_VAL_MASKS or candidate is None:
        return False, (
            f"not promoted: only {n_val} held-out annotated task(s) (< {MIN_VAL_MASKS}) to validate on; "
            "set MASKCLIP_PROMOTE=always to serve an unvalidated student"
        )
    rivals = {"teacher": teacher, "current student": current}
    best_name, best = max(
        ((k, v) for k, v in rivals.items() if v is not None), key=lambda kv: kv[1], default=("", None)
    )
    if best is None or candidate > best:
        return True, f"promoted: candidate mIoU {candidate:.4f} beats {best_name or 'nothing'} ({best})"
    return False, f"not promoted: candidate mIoU {candidate:.4f} <= {best_name} {best:.4f}"


# --- data --------------------------------------------------------------------------------------------------


def _resize_image(img: np.ndarray, max_short: int) -> np.ndarray:
    h, w = img.shape[:2]
    if min(h, w) <= max_short:
        return img
    s = max_short / min(h, w)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _cached_image(cache: Path, ref: str, task_id: int, load_image: Callable, max_short: int) -> Path:
    path = cache / f"{hashlib.sha1(f'{ref}|{max_short}'.encode()).hexdigest()[:24]}.npy"
    if not path.is_file():
        img = _resize_image(load_image(ref, task_id), max_short)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, img)
        os.replace(tmp, path)
    return path


def _label_map(masks: dict[str, np.ndarray], index: dict[str, int], size: tuple[int, int]) -> np.ndarray:
    """Per-label masks -> (H, W) uint8 class indices at ``size`` (nearest), 255 where no known label."""
    out = None
    for label in sorted(masks):
        if label not in index:
            continue
        m = np.asarray(masks[label], dtype=bool)
        if out is None:
            out = np.full(m.shape, IGNORE, np.uint8)
        out[m] = index[label]
    if out is None:
        return np.full(size, IGNORE, np.uint8)
    if out.shape != size:
        t = torch.from_numpy(out)[None, None].float()
        out = F.interpolate(t, size=size, mode="nearest")[0, 0].to(torch.uint8).numpy()
    return out


def _prepare(
    samples: list[Any],
    unlabeled: list[Any],
    classes: Sequence[tuple[str, ...]],
    s: Settings,
    load_image: Callable,
    run_dir: Path,
) -> tuple[list[Item], list[Item], dict[str, int]]:
    """Fetch and cache images, write label maps; split. Returns (train items, val items, counts)."""
    cache = Path(s.model_dir) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (run_dir / "labels").mkdir(parents=True, exist_ok=True)
    index = {name: k for k, names in enumerate(classes) for name in names}
    max_short = max(2 * s.train_crop, 64)
    train_items: list[Item] = []
    val_items: list[Item] = []
    counts = {"annotated": 0, "unlabeled": 0, "validation": 0, "failed_images": 0, "unknown_label_masks": 0}
    for sample in samples:
        known = [lab for lab in sample.masks if lab in index]
        counts["unknown_label_masks"] += len(sample.masks) - len(known)
        try:
            image = _cached_image(cache, sample.image, sample.task_id, load_image, max_short)
        except Exception as e:  # a bad or vanished image must not stop the run
            log.warning("task %s: image %r skipped: %s", sample.task_id, sample.image, e)
            counts["failed_images"] += 1
            continue
        shape = np.load(image, mmap_mode="r").shape[:2]
        labels_path = run_dir / "labels" / f"{sample.task_id}.npy"
        np.save(labels_path, _label_map(sample.masks, index, shape))
        item = Item(sample.task_id, image, labels_path)
        if known and is_validation(sample.task_id, s.train_val_fraction):
            val_items.append(item)
        else:
            train_items.append(item)
    for task in unlabeled:
        try:
            image = _cached_image(cache, task.image, task.id, load_image, max_short)
        except Exception as e:
            log.warning("task %s: image %r skipped: %s", task.id, task.image, e)
            counts["failed_images"] += 1
            continue
        train_items.append(Item(task.id, image))
    counts["validation"] = len(val_items)
    counts["annotated"] = sum(1 for it in train_items if it.labels is not None)
    counts["unlabeled"] = sum(1 for it in train_items if it.labels is None)
    return train_items, val_items, counts


def _crop_params(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random resized crop box (y0, x0, ch, cw): area share in CROP_SCALE, aspect ratio in CROP_RATIO."""
    for _ in range(10):
        area = h * w * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _augment(item: Item, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One item -> (3, crop, crop) float RGB in [0, 1] and (crop, crop) uint8 people's labels (255 = none)."""
    img = np.load(item.image, mmap_mode="r")
    h, w = img.shape[:2]
    y0, x0, ch, cw = _crop_params(h, w, rng)
    x = torch.from_numpy(np.array(img[y0 : y0 + ch, x0 : x0 + cw])).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)[0]
    if item.labels is not None:
        lab = np.load(item.labels, mmap_mode="r")[y0 : y0 + ch, x0 : x0 + cw]
        y = F.interpolate(torch.from_numpy(np.array(lab))[None, None].float(), size=(crop, crop), mode="nearest")
        y = y[0, 0].to(torch.uint8)
    else:
        y = torch.full((crop, crop), IGNORE, dtype=torch.uint8)
    if rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return _jitter(x, rng), y


def _jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of a (3, H, W) [0, 1] image (no hue: colour names matter)."""
    b, c, s = (1 + rng.uniform(-JITTER, JITTER, 3)).tolist()
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # (1, H, W)
    x = (x - gray) * s + gray
    return x.clamp(0, 1)


def _batch(items: list[Item], n: int, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    picks = rng.integers(0, len(items), n)
    pairs = [_augment(items[i], crop, rng) for i in picks]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (B, 3, c, c), (B, c, c)


# --- evaluation --------------------------------------------------------------------------------------------


def _teacher_labels(teacher: Teacher, image: np.ndarray, short_side: int, min_conf: float) -> np.ndarray:
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    if short_side:
        s = short_side / min(h, w)
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = teacher.probs(x).float()
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0]  # (C, H, W)
    conf, lab = probs.max(0)
    lab = lab.masked_fill(conf < min_conf, -1)
    return lab.cpu().numpy()


def _evaluate(predict: Callable[[np.ndarray], np.ndarray], items: list[Item], n_labels: int) -> float | None:
    """mIoU of ``predict(image) -> (H, W) label indices`` against people's masks of ``items``."""
    if not items:
        return None
    total = np.zeros((n_labels + 1, n_labels + 1), np.int64)
    for it in items:
        image = np.load(it.image)
        total += confusion(predict(image), np.load(it.labels), n_labels)
    return miou(total)


def _student_predictor(model: StudentModel, opts: Any, classes: Sequence, background: Sequence) -> Callable:
    """image -> (H, W) label indices in the order of ``classes`` (whatever the checkpoint's order)."""
    return lambda image: model.segment([image], classes, background, opts)[0].labels.astype(np.int64)


def _current_student(s: Settings, classes: Sequence, background: Sequence, device: torch.device) -> StudentModel | None:
    """The served student if it exists, loads and has these labels (in any order); else None."""
    from .student import load_student

    path = current_checkpoint(s.model_dir)
    if path is None:
        return None
    try:
        model = load_student(path, device)
    except Exception as e:
        log.warning("served student %s cannot be loaded for comparison: %s", path, e)
        return None
    if not model.serves(classes, background):
        log.info("served student %s has other labels %s: not compared", model.version, model.labels)
        return None
    return model


# --- distributed -------------------------------------------------------------------------------------------


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _broadcast(value: Any, world: int) -> Any:
    if world <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- the run -----------------------------------------------------------------------------------------------


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def _default_classes(samples: Iterable[Any]) -> list[tuple[str, ...]]:
    return [(name,) for name in sorted({lab for smp in samples for lab in smp.masks})]


def _optimizer(net: StudentNet, s: Settings) -> torch.optim.SGD:
    scale = [p for n, p in net.named_parameters() if p.requires_grad and n == "log_scale"]
    rest = [p for n, p in net.named_parameters() if p.requires_grad and n != "log_scale"]
    groups = [{"params": rest, "weight_decay": s.train_weight_decay}, {"params": scale, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=s.train_lr, momentum=s.train_momentum)


def train(
    settings: Settings,
    store: Any,
    *,
    load_image: Callable[[str, int], np.ndarray] | None = None,
    teacher: Teacher | None = None,
    classes: Sequence[Any] | None = None,
    background: Sequence[Any] = (),
    project: int | None = None,
    progress: bool = True,
    resume: str | None = None,
    checkpoint_every: int = 500,
    seed: int = 0,
) -> TrainResult:
    """Run one MaskCLIP+ training (see the module docstring) and return what happened.

    ``load_image(ref, task_id) -> (H, W, 3) uint8``: default, the Label Studio image fetcher of ``settings``.
    ``teacher``: default MaskCLIP (``shared_maskclip``) over ``classes`` + ``background``.
    ``classes``: label names or synonym tuples; default, every label found in the accepted masks, sorted.
    ``resume``: a run id whose ``last.pt`` to continue from. Under torchrun every rank calls this; rank 0
    fetches data, evaluates, writes and promotes.
    """
    rank, world, local_rank = _dist()
    s = settings
    from ..engine.loading import resolve_device

    device = resolve_device(s.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        s = s.replace(device=str(device))
    samples, unlabeled, seq = read_store(store, project)
    classes = class_key(classes) if classes else _default_classes(samples)
    background = class_key(background)
    if not classes:
        raise TrainError("no labels to train: no accepted masks in the store and no labels given (--labels)")
    run_id = _broadcast(resume or _new_run_id(), world)
    run_dir = Path(s.model_dir) / "runs" / run_id
    if load_image is None:
        load_image = _fetcher(s)
    if rank == 0:
        train_items, val_items, counts = _prepare(samples, unlabeled, classes, s, load_image, run_dir)
    _barrier(world)
    if rank != 0:  # images are cached now; the label maps are in run_dir
        train_items, val_items, counts = _prepare(samples, unlabeled, classes, s, load_image, run_dir)
    if not train_items:
        raise TrainError(f"no training images: {counts}; add tasks to the project or fix image access")
    if teacher is None:
        from ..models import segment_options, shared_maskclip

        teacher = CLIPTeacher(shared_maskclip(s), classes, background, segment_options(s))
    log.info(
        "run %s: %d labels, data %s, %d steps x %d images (world %d)",
        run_id,
        len(classes),
        counts,
        s.train_steps,
        s.train_batch_size,
        world,
    )

    net = build_student(s.student, teacher.embeddings.cpu(), s.student_pretrained).to(device)
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = _optimizer(net, s)
    state = {"step": 0, "losses": [], "evals": []}
    if resume:
        state = _load_resume(run_dir, net, opt)
    model = net
    if world > 1:
        if cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    rng = np.random.default_rng([seed, rank, state["step"]])
    shard = train_items[rank::world] or train_items
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    switch = int(s.train_self_training_start * s.train_steps)
    from ..models import segment_options

    eval_opts = segment_options(s)
    bar = _bar(progress and rank == 0, s.train_steps, state["step"])
    for step in range(state["step"], s.train_steps):
        lr = poly_lr(step, s.train_steps, s.train_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        images, human = _batch(shard, s.train_batch_size, s.train_crop, rng)
        images, human = images.to(device), human.to(device)
        self_training = step >= switch
        if not self_training:
            with torch.no_grad():
                pseudo = F.interpolate(teacher.probs(images).float().to(device), size=images.shape[2:], mode="bilinear")
        x = (images - mean) / std
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(x)
        logits = F.interpolate(logits.float(), size=images.shape[2:], mode="bilinear", align_corners=False)
        if self_training:
            pseudo = logits.detach().softmax(1)
        targets = build_targets(pseudo, human, s.train_pseudo_threshold)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE) if (targets != IGNORE).any() else logits.sum() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["losses"].append(float(loss.detach()))
        state["step"] = step + 1
        _report(bar, step + 1, s.train_steps, state["losses"][-1], lr, self_training)
        if rank == 0 and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < s.train_steps:
            cand = StudentModel(net, classes, background)
            state["evals"].append(
                {
                    "step": step + 1,
                    "miou": _evaluate(
                        _student_predictor(cand, eval_opts, classes, background), val_items, len(classes)
                    ),
                }
            )
            net.train()
            _save_resume(run_dir, net, opt, state)
    if bar is not None:
        bar.close()
    result = None
    if rank == 0:
        result = _finish(
            s,
            store,
            project,
            seq,
            run_id,
            run_dir,
            net,
            teacher,
            classes,
            background,
            val_items,
            counts,
            state,
            device,
            eval_opts,
        )
    _barrier(world)
    return result  # type: ignore[return-value]


def _fetcher(s: Settings) -> Callable[[str, int], np.ndarray]:
    from ..labelstudio.images import ImageFetcher

    fetcher = ImageFetcher.from_settings(s)
    return lambda ref, task_id: fetcher.load(ref, task_id, max_pixels=s.max_image_pixels)


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step")


def _report(bar, step: int, steps: int, loss: float, lr: float, self_training: bool) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", src="self" if self_training else "teacher")
    elif step == 1 or step % 50 == 0 or step == steps:
        log.info(
            "step %d/%d loss %.4f lr %.2e targets from %s",
            step,
            steps,
            loss,
            lr,
            "student" if self_training else "teacher",
        )


def _save_resume(run_dir: Path, net: StudentNet, opt: torch.optim.Optimizer, state: dict) -> None:
    save_checkpoint(run_dir / "last.pt", {"state_dict": net.state_dict(), "optimizer": opt.state_dict(), **state})


def _load_resume(run_dir: Path, net: StudentNet, opt: torch.optim.Optimizer) -> dict:
    path = run_dir / "last.pt"
    if not path.is_file():
        raise TrainError(f"cannot resume: {path} does not exist (is the run id right?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    log.info("resumed %s at step %d", run_dir.name, ckpt["step"])
    return {"step": ckpt["step"], "losses": list(ckpt["losses"]), "evals": list(ckpt["evals"])}


def _finish(
    s,
    store,
    project,
    seq,
    run_id,
    run_dir,
    net,
    teacher,
    classes,
    background,
    val_items,
    counts,
    state,
    device,
    eval_opts,
) -> TrainResult:
    """Validate teacher, served student and candidate; decide; promote; write metrics and plot."""
    n = len(classes)
    candidate = StudentModel(net, classes, background)
    cand_miou = _evaluate(_student_predictor(candidate, eval_opts, classes, background), val_items, n)
    state["evals"].append({"step": state["step"], "miou": cand_miou})
    teacher_miou = _evaluate(lambda img: _teacher_labels(teacher, img, s.short_side, s.min_confidence), val_items, n)
    current = _current_student(s, classes, background, device)
    current_miou = (
        None
        if current is None
        else _evaluate(_student_predictor(current, eval_opts, classes, background), val_items, n)
    )
    promoted, decision = decide(s.promote, cand_miou, teacher_miou, current_miou, len(val_items))
    metrics = {
        "run_id": run_id,
        "steps": state["step"],
        "loss": state["losses"],
        "val_miou": state["evals"],
        "miou": {
            "candidate": cand_miou,
            "teacher": teacher_miou,
            "current": current_miou,
            "current_version": None if current is None else current.version,
        },
        "data": counts,
        "few_masks": len(val_items) < MIN_VAL_MASKS,
        "promoted": promoted,
        "decision": decision,
    }
    log.info("run %s: %s", run_id, decision)
    version = None
    if promoted:
        payload = {
            "student": s.student,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "embeddings": teacher.embeddings.detach().float().cpu(),
            "classes": [list(c) for c in classes],
            "background": [list(c) for c in background],
            "clip": teacher.describe(),
            "settings": asdict(s),
            "metrics": {k: metrics[k] for k in ("miou", "decision", "steps")},
            "data": counts,
            "run_id": run_id,
        }
        version = promote_checkpoint(s.model_dir, payload)
        log.info("promoted %s", version)
    metrics["version"] = version
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    _plot(metrics, run_dir / "curves.png")
    (run_dir / "last.pt").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "labels", ignore_errors=True)  # rebuilt from the store by every run
    _mark_trained(store, seq, project, version or "", {k: metrics[k] for k in ("miou", "decision", "data")})
    return TrainResult(run_id, run_dir, promoted, version, decision, metrics)


def _plot(metrics: dict, path: Path) -> None:
    """Loss per step (raw and smoothed) and validation mIoU (candidate over the run, teacher and served)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    loss = np.asarray(metrics["loss"], dtype=float)
    ax1.plot(np.arange(1, len(loss) + 1), loss, alpha=0.3, label="loss")
    if len(loss) >= 10:
        k = max(1, len(loss) // 20)
        ax1.plot(np.arange(k, len(loss) + 1), np.convolve(loss, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
    ax1.set_xlabel("step"), ax1.set_ylabel("cross-entropy"), ax1.legend()
    evals = [(e["step"], e["miou"]) for e in metrics["val_miou"] if e["miou"] is not None]
    if evals:
        ax2.plot(*zip(*evals), marker="o", label="candidate")
    for name, style in (("teacher", "--"), ("current", ":")):
        value = metrics["miou"].get(name)
        if value is not None:
            ax2.axhline(value, linestyle=style, color="gray", label=name)
    ax2.set_xlabel("step"), ax2.set_ylabel("validation mIoU"), ax2.set_title(metrics["decision"][:60], fontsize=8)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no held-out people's masks yet:\nnothing to validate on", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- the trainer process -----------------------------------------------------------------------------------


def _parse_classes(text: str | None) -> list[tuple[str, ...]]:
    """``"car|automobile,person"`` -> [("car", "automobile"), ("person",)]."""
    return [tuple(n.strip() for n in part.split("|") if n.strip()) for part in (text or "").split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m labelstudio_maskclip.training.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--labels", help="classes, comma-separated, synonyms with | (default: labels in the store)")
    p.add_argument("--background", help="background classes, comma-separated (pixels become no label)")
    p.add_argument("--project", type=int, help="train on one Label Studio project's tasks only")
    p.add_argument("--steps", type=int, help="override MASKCLIP_TRAIN_STEPS")
    p.add_argument("--resume", metavar="RUN_ID", help="continue the run MODEL_DIR/runs/RUN_ID from its last.pt")
    p.add_argument("--service", action="store_true", help="log lines instead of a progress bar (trigger)")
    p.add_argument("--reason", default="manual", help="why this run started (logged)")
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # inherited locked train.lock (trigger)
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m labelstudio_maskclip.training.train``; exit 0 done, 3 another training runs."""
    from ..learning.store import Store
    from ..learning.trigger import acquire_training_lock

    args = build_parser().parse_args(argv)
    s = Settings.from_env()
    if args.steps:
        s = s.replace(train_steps=args.steps)
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    lock = None
    if rank == 0:
        lock = os.fdopen(args.lock_fd, "a") if args.lock_fd is not None else acquire_training_lock(s.model_dir)
        if lock is None:
            log.error("another training holds %s/train.lock; not starting", s.model_dir)
            return 3
    log.info("training starts (reason: %s, pid %d)", args.reason, os.getpid())
    result = train(
        s,
        Store(s.model_dir),
        classes=_parse_classes(args.labels) or None,
        background=_parse_classes(args.background),
        project=args.project,
        progress=not args.service,
        resume=args.resume,
    )
    if result is not None and result.promoted:
        from ..labelstudio.rescore import start_rescore

        start_rescore(s, args.project, reason=f"promotion of {result.version}")
    if result is not None:
        print(
            json.dumps(
                {
                    "run_id": result.run_id,
                    "promoted": result.promoted,
                    "version": result.version,
                    "decision": result.decision,
                    "miou": result.metrics["miou"],
                }
            )
        )
    del lock  # released when the process exits anyway
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
