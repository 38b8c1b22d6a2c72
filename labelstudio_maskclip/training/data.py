"""Training data: the store adapter, the image cache, people's label maps, targets and augmentation.

:func:`read_store` is the one place that talks to :class:`~labelstudio_maskclip.learning.store.Store`.
:func:`prepare` fetches every image once through ``load_image(ref, task_id)``, caches it under
``MODEL_DIR/cache/`` (short side at most twice the crop), writes each annotated task's people's labels as
an (H, W) uint8 map (class index, :data:`IGNORE` = nobody labelled) under the run folder, and holds out a
fixed share of the annotated tasks for validation, chosen by task id (:func:`is_validation`), so a task
stays on its side across runs. :func:`batch` draws augmented crops; :func:`build_targets` merges a
teacher's (or the student's) probabilities with people's labels.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation.metrics import IGNORE

__all__ = [
    "IGNORE",
    "Item",
    "Prepared",
    "TrainingStore",
    "read_store",
    "mark_trained",
    "default_classes",
    "label_index",
    "is_validation",
    "prepare",
    "build_targets",
    "batch",
]

log = logging.getLogger(__name__)

JITTER = 0.2  # brightness / contrast / saturation factors drawn from [1 - JITTER, 1 + JITTER]
CROP_SCALE = (0.25, 1.0)  # random resized crop: share of the image's area
CROP_RATIO = (3 / 4, 4 / 3)

#: ``load_image(ref, task_id) -> (H, W, 3) uint8 RGB``
ImageLoader = Callable[[str, int], np.ndarray]


@dataclass(frozen=True)
class Item:
    """A training or validation image: cached (H, W, 3) uint8 ``.npy``; ``labels``: (H, W) uint8 ``.npy`` of
    people's labels (class index, 255 = unlabeled), None for the unlabeled pool."""

    task_id: int
    image: Path
    labels: Path | None = None


@dataclass
class Prepared:
    """What :func:`prepare` made of the store: training items, held-out items and counts for metrics.json."""

    train: list[Item]
    val: list[Item]
    counts: dict[str, int] = field(default_factory=dict)


# --- the store adapter -------------------------------------------------------------------------------------


class TrainingStore(Protocol):
    """What the trainer needs of the store (:class:`~labelstudio_maskclip.learning.store.Store`)."""

    def current_seq(self) -> int: ...

    def accepted_samples(self, project: int | None = None) -> Iterable[Any]: ...

    def unlabeled_tasks(self, project: int | None = None) -> Iterable[Any]: ...

    def mark_trained(
        self, *, seq: int | None = None, project: int | None = None, model_version: str = "", metrics: Any = None
    ) -> Any: ...


def read_store(store: TrainingStore, project: int | None = None) -> tuple[list[Any], list[Any], int]:
    """(accepted samples, unlabeled tasks, change counter now). The ONLY place that reads the store.

    Samples have ``task_id``, ``image``, ``masks`` (label value -> (H, W) bool); tasks have ``id``, ``image``.
    """
    seq = store.current_seq()
    samples = list(store.accepted_samples(project))
    unlabeled = [t for t in store.unlabeled_tasks(project) if t.image]
    return samples, unlabeled, seq


def mark_trained(store: TrainingStore, seq: int | None, project: int | None, version: str, metrics: dict) -> None:
    """Record the run in the store: what it saw up to ``seq``, the version it promoted, its metrics."""
    store.mark_trained(seq=seq, project=project, model_version=version, metrics=metrics)


def default_classes(samples: Iterable[Any]) -> list[tuple[str, ...]]:
    """Every label value found in the accepted masks, sorted, each its own one-name class."""
    return [(name,) for name in sorted({lab for smp in samples for lab in smp.masks})]


def label_index(classes: Sequence[tuple[str, ...]], values: Sequence[str] | None = None) -> dict[str, int]:
    """Mask key -> class index. People's masks are keyed by their label's ``value``; ``values[k]`` is class
    k's (from the labeling config, where ``predicted_values`` gives the label other, model-side names).
    Without ``values`` (labels typed on the command line), each of a class's names is taken as a value."""
    if values is not None:
        if len(values) != len(classes):
            raise ValueError(f"{len(values)} label values for {len(classes)} classes: give one value per class")
        return {value: k for k, value in enumerate(values)}
    return {name: k for k, names in enumerate(classes) for name in names}


def is_validation(task_id: int, fraction: float) -> bool:
    """Deterministic hold-out by task id: a fixed pseudo-random ``fraction`` of ids (stable across runs)."""
    digest = hashlib.sha256(f"maskclip-val-{int(task_id)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


# --- the image cache and label maps ------------------------------------------------------------------------


def _resize_image(img: np.ndarray, max_short: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same, short side at most ``max_short`` (antialiased bilinear)."""
    h, w = img.shape[:2]
    if min(h, w) <= max_short:
        return img
    s = max_short / min(h, w)
    t = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)[None].float()  # copies if read-only
    t = F.interpolate(t, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _cached_image(cache: Path, ref: str, task_id: int, load_image: ImageLoader, max_short: int) -> Path:
    """Path of the cached ``.npy`` of image ``ref``, fetched and written (atomically) on first use."""
    path = cache / f"{hashlib.sha1(f'{ref}|{max_short}'.encode()).hexdigest()[:24]}.npy"
    if not path.is_file():
        img = _resize_image(load_image(ref, task_id), max_short)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, img)
        os.replace(tmp, path)
    return path


def _label_map(masks: Mapping[str, np.ndarray], index: Mapping[str, int], size: tuple[int, int]) -> np.ndarray:
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


@dataclass
class _Cache:
    """Where and how :func:`prepare` caches images; counts the images it could not fetch."""

    folder: Path
    load_image: ImageLoader
    max_short: int
    failed: int = 0

    def image(self, ref: str, task_id: int) -> Path | None:
        try:
            return _cached_image(self.folder, ref, task_id, self.load_image, self.max_short)
        except Exception as e:  # a bad or vanished image must not stop the run
            log.warning("task %s: image %r skipped: %s", task_id, ref, e)
            self.failed += 1
            return None


def prepare(
    samples: Sequence[Any],
    unlabeled: Sequence[Any],
    index: Mapping[str, int],
    *,
    cache_dir: Path,
    run_dir: Path,
    load_image: ImageLoader,
    crop: int,
    val_fraction: float,
) -> Prepared:
    """Fetch and cache images, write people's label maps under ``run_dir/labels``; split train/validation."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "labels").mkdir(parents=True, exist_ok=True)
    cache = _Cache(cache_dir, load_image, max(2 * crop, 64))
    out = Prepared([], [])
    unknown = 0
    for sample in samples:
        known = [lab for lab in sample.masks if lab in index]
        unknown += len(sample.masks) - len(known)
        image = cache.image(sample.image, sample.task_id)
        if image is None:
            continue
        labels = run_dir / "labels" / f"{sample.task_id}.npy"
        np.save(labels, _label_map(sample.masks, index, np.load(image, mmap_mode="r").shape[:2]))
        held_out = known and is_validation(sample.task_id, val_fraction)
        (out.val if held_out else out.train).append(Item(sample.task_id, image, labels))
    for task in unlabeled:
        image = cache.image(task.image, task.id)
        if image is not None:
            out.train.append(Item(task.id, image))
    out.counts = {
        "annotated": sum(1 for it in out.train if it.labels is not None),
        "unlabeled": sum(1 for it in out.train if it.labels is None),
        "validation": len(out.val),
        "failed_images": cache.failed,
        "unknown_label_masks": unknown,
    }
    return out


# --- targets and augmentation ------------------------------------------------------------------------------


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


def batch(items: Sequence[Item], n: int, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random items, augmented: (B, 3, crop, crop) float RGB in [0, 1], (B, crop, crop) uint8 labels."""
    picks = rng.integers(0, len(items), n)
    pairs = [_augment(items[i], crop, rng) for i in picks]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
