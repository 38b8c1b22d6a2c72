"""Evaluation like the papers: mIoU of MaskCLIP on a standard benchmark or on a folder of masks.

``run_eval(settings, "voc20", root, out, protocol="whole512")`` reads the dataset, segments every image,
accumulates one confusion matrix over the whole set and writes ``out/metrics.json``,
``out/predictions/<name>.png`` and a few ``out/overlays/<name>.png`` (prediction | ground truth).

Datasets (``--root`` may point at the folder named first or at one of its parents named after it):
- ``voc20`` / ``voc21``: ``VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png,
  ImageSets/Segmentation/val.txt}``. voc20 drops the background (label 0 -> ignore); voc21 keeps it.
- ``context59`` / ``context60``: ``VOCdevkit/VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png,
  ImageSets/SegmentationContext/val.txt}`` (mmsegmentation's converted layout, 0 = background).
- ``cocostuff171``: ``{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png}``.
- ``ade150``: ``ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}``, 0 -> ignore.
- ``cityscapes``: ``{leftImg8bit/val/CITY/*_leftImg8bit.png, gtFine/val/CITY/*_gtFine_labelTrainIds.png}``.
- ``folder``: ``images/NAME.{jpg,png,...}``, ``masks/NAME.png`` (class index per pixel, 255 = ignore) and
  ``classes.txt``: line k names class k. A line may hold synonyms separated by commas
  (``car, automobile``), whose text embeddings are averaged. A line whose first name is ``background``
  is the background class: each of its names is a separate *background query*, and pixels won by a
  background query or whose best probability is below the background threshold get that class.

Ground truth as mmsegmentation reads it: ``reduce_zero_label`` datasets map 0 -> 255 and k -> k - 1; any
value outside 0..K-1 is ignored (255 is the ignore index). Images are read as stored (no EXIF rotation),
so they stay aligned with their masks.

Protocols (the image is rescaled keeping its aspect ratio as mmcv does: factor = min(L / long side,
S / short side) for a scale (L, S), i.e. short side S unless the long side would exceed L):
- ``whole512``: the paper's (docs/method.md, section 1.6). Scale (2048, 512), i.e. short side 512 - PASCAL Context short
  side 520, scale (2048, 520) - whole image, no sliding window.
- ``slide448``: the common re-evaluation protocol. Scale (2048, 448), windows of 448 with stride 224.
Refinements (key smoothing, prompt denoising) are off unless ``refinements=True`` (the paper's plain
configs); then the settings' switches decide.

Metrics as mmsegmentation computes them (:mod:`labelstudio_maskclip.evaluation.metrics`, the package's one
mIoU): a confusion matrix over all images (ignore index 255); IoU of a class = TP / (TP + FP + FN), NaN
where that union is 0; mIoU = nanmean; aAcc = correct / labelled pixels; per-class Acc = TP / ground-truth
pixels. Values in metrics.json are percentages.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..engine.names import normalize_names
from ..engine.presets import DATASET_PROTOCOLS
from ..errors import BadInput
from ..masks.overlay import overlay, save_label_png
from ..models import pipeline_description, segment_options, shared_maskclip
from ..settings import Settings
from . import class_names as cn
from .metrics import IGNORE, confusion_matrix, scores

__all__ = [
    "IGNORE",
    "DATASETS",
    "PROTOCOLS",
    "DatasetError",
    "Sample",
    "EvalSet",
    "Protocol",
    "load_dataset",
    "read_classes_file",
    "confusion_matrix",
    "scores",
    "evaluate",
    "maskclip_predictor",
    "run_eval",
    "preset_protocol",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_BG_THRESHOLD = 0.1  # SCLIP / ClearCLIP / NACLIP's value for VOC21 and Context60


class DatasetError(BadInput):
    """A dataset is missing files or has an unusable layout; the message names the expected layout."""


# --- datasets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str  # unique, used for predictions/<name>.png
    image: Path
    mask: Path


@dataclass(frozen=True)
class EvalSet:
    """A labelled set: images, masks and what each ground-truth label means."""

    name: str
    classes: tuple[tuple[str, ...], ...]  # class k = ground-truth label k: its text names (synonyms)
    samples: tuple[Sample, ...]
    background: int | None = None  # ground-truth label given to background queries and low-confidence pixels
    background_queries: tuple[str, ...] = ()  # one text query each
    reduce_zero_label: bool = False  # raw 0 -> ignore, raw k -> k - 1
    whole_scale: tuple[int, int] = (2048, 512)  # (long, short) limits of the whole-image protocol

    @property
    def names(self) -> tuple[str, ...]:
        """Display name of each class (its first name): the keys of the per-class metrics."""
        return tuple(c[0] for c in self.classes)

    def queries(self) -> tuple[list[tuple[str, ...]], np.ndarray]:
        """Text classes to ask the segmenter for (every class but the background) and (Q,) int64 map
        from query index to ground-truth label."""
        labels = [k for k in range(len(self.classes)) if k != self.background]
        return [self.classes[k] for k in labels], np.array(labels, dtype=np.int64)

    def read_mask(self, sample: Sample) -> np.ndarray:
        """(H, W) int64 ground-truth labels in 0..K-1, IGNORE elsewhere."""
        with Image.open(sample.mask) as m:
            if m.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetError(f"{sample.mask}: mask mode {m.mode}; expected one class index per pixel")
            raw = np.asarray(m).astype(np.int64)
        return gt_labels(raw, len(self.classes), self.reduce_zero_label)


def gt_labels(raw: np.ndarray, num_classes: int, reduce_zero_label: bool = False) -> np.ndarray:
    """Raw mask values -> (H, W) int64 labels in 0..K-1 or IGNORE (mmseg's reduce_zero_label rule)."""
    labels = raw.astype(np.int64)
    if reduce_zero_label:
        labels = np.where((raw == 0) | (raw == IGNORE), IGNORE, labels - 1)
    return np.where((labels >= 0) & (labels < num_classes), labels, IGNORE)


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, pixels as stored (no EXIF rotation, so masks stay aligned)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _locate(root: Path, dataset: str, layout: str, marker: str, candidates: Sequence[str]) -> Path:
    for c in candidates:
        base = root / c if c else root
        if (base / marker).exists():
            return base
    raise DatasetError(f"{dataset}: no {marker} under {root}. Expected layout under --root: {layout}")


def _require(path: Path, dataset: str, layout: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{dataset}: {path} not found. Expected layout under --root: {layout}")
    return path


def _split_samples(base: Path, split: str, images: str, masks: str, dataset: str, layout: str) -> list[Sample]:
    """Samples listed in a split file (one id per line): images/<id>.jpg, masks/<id>.png."""
    ids = [line.strip() for line in _require(base / split, dataset, layout).read_text().splitlines()]
    samples = [Sample(i, base / images / f"{i}.jpg", base / masks / f"{i}.png") for i in ids if i]
    _check_files(samples, dataset, layout)
    return samples


def _check_files(samples: Sequence[Sample], dataset: str, layout: str) -> None:
    if not samples:
        raise DatasetError(f"{dataset}: no images found. Expected layout under --root: {layout}")
    missing = [str(p) for s in samples for p in (s.image, s.mask) if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DatasetError(f"{dataset}: missing {', '.join(missing[:3])}{more}. Expected layout: {layout}")


def _voc(root: Path, with_background: bool) -> EvalSet:
    name = "voc21" if with_background else "voc20"
    layout = "VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/val.txt}"
    base = _locate(root, name, layout, "SegmentationClass", ("", "VOC2012", "VOCdevkit/VOC2012"))
    samples = _split_samples(base, "ImageSets/Segmentation/val.txt", "JPEGImages", "SegmentationClass", name, layout)
    classes = tuple((c,) for c in cn.VOC20)
    if with_background:
        return EvalSet(name, (("background",),) + classes, tuple(samples), 0, cn.VOC21_BACKGROUND)
    return EvalSet(name, classes, tuple(samples), reduce_zero_label=True)


def _context(root: Path, with_background: bool) -> EvalSet:
    name = "context60" if with_background else "context59"
    layout = (
        "VOCdevkit/VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png, ImageSets/SegmentationContext/val.txt}"
    )
    base = _locate(root, name, layout, "SegmentationClassContext", ("", "VOC2010", "VOCdevkit/VOC2010"))
    split = "ImageSets/SegmentationContext/val.txt"
    samples = _split_samples(base, split, "JPEGImages", "SegmentationClassContext", name, layout)
    classes = tuple((c,) for c in cn.CONTEXT59)
    scale = (2048, 520)  # short side 520 (docs/method.md, section 1.6)
    if with_background:
        return EvalSet(name, (("background",),) + classes, tuple(samples), 0, cn.CONTEXT60_BACKGROUND, False, scale)
    return EvalSet(name, classes, tuple(samples), reduce_zero_label=True, whole_scale=scale)


def _paired(images: Path, masks: Path, mask_name: Callable[[Path], Path], pattern: str) -> list[Sample]:
    """Every image under ``images`` matching ``pattern`` with its mask at ``masks / mask_name(rel)``."""
    found = sorted(images.glob(pattern))
    return [Sample(_sample_name(p, images), p, masks / mask_name(p.relative_to(images))) for p in found]


def _sample_name(path: Path, top: Path) -> str:
    return path.relative_to(top).with_suffix("").as_posix().replace("/", "__")


def _coco_stuff(root: Path) -> EvalSet:
    layout = "{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png} (mmseg's coco_stuff164k)"
    base = _locate(root, "cocostuff171", layout, "images/val2017", ("", "coco_stuff164k"))
    _require(base / "annotations/val2017", "cocostuff171", layout)
    samples = _paired(
        base / "images/val2017",
        base / "annotations/val2017",
        lambda r: r.with_name(f"{r.stem}_labelTrainIds.png"),
        "*.jpg",
    )
    _check_files(samples, "cocostuff171", layout)
    return EvalSet("cocostuff171", tuple((c,) for c in cn.COCO_STUFF171), tuple(samples))


def _ade(root: Path) -> EvalSet:
    layout = "ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}"
    base = _locate(
        root, "ade150", layout, "images/validation", ("", "ADEChallengeData2016", "ade/ADEChallengeData2016")
    )
    _require(base / "annotations/validation", "ade150", layout)
    samples = _paired(
        base / "images/validation", base / "annotations/validation", lambda r: r.with_suffix(".png"), "*.jpg"
    )
    _check_files(samples, "ade150", layout)
    return EvalSet("ade150", tuple((c,) for c in cn.ADE150), tuple(samples), reduce_zero_label=True)


def _cityscapes(root: Path) -> EvalSet:
    layout = "{leftImg8bit/val/CITY/*_leftImg8bit.png, gtFine/val/CITY/*_gtFine_labelTrainIds.png}"
    base = _locate(root, "cityscapes", layout, "leftImg8bit/val", ("", "cityscapes"))
    _require(base / "gtFine/val", "cityscapes", layout)

    def mask_name(rel: Path) -> Path:
        return rel.with_name(rel.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"))

    samples = _paired(base / "leftImg8bit/val", base / "gtFine/val", mask_name, "*/*_leftImg8bit.png")
    samples = [dataclasses.replace(s, name=s.name.split("__")[-1].replace("_leftImg8bit", "")) for s in samples]
    _check_files(samples, "cityscapes", layout)
    return EvalSet("cityscapes", tuple((c,) for c in cn.CITYSCAPES19), tuple(samples))


def read_classes_file(path: Path) -> tuple[tuple[tuple[str, ...], ...], int | None]:
    """``classes.txt`` -> (classes, background label or None). Line k = class k, synonyms split by commas;
    a line whose first name is ``background`` (any case) is the background class."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    classes, background = [], None
    for k, line in enumerate(lines):
        names = normalize_names(line.split(","))
        if not names:
            raise DatasetError(f"{path}: line {k + 1} is empty; every line up to the last names class k = line - 1")
        if names[0].lower() == "background":
            if background is not None:
                raise DatasetError(f"{path}: two background lines ({background + 1} and {k + 1}); keep one")
            background = k
        classes.append(names)
    if not classes:
        raise DatasetError(f"{path}: no classes; write one class name per line")
    firsts = [c[0] for c in classes]
    dupes = sorted({n for n in firsts if firsts.count(n) > 1})
    if dupes:
        raise DatasetError(f"{path}: class names must be unique, repeated: {', '.join(dupes)}")
    return tuple(classes), background


def _folder(root: Path) -> EvalSet:
    layout = "{images/NAME.jpg|png, masks/NAME.png (class index per pixel, 255 = ignore), classes.txt}"
    for part in ("images", "masks", "classes.txt"):
        _require(root / part, "folder", layout)
    classes, background = read_classes_file(root / "classes.txt")
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    samples = [Sample(p.stem, p, root / "masks" / f"{p.stem}.png") for p in images]
    names = [s.name for s in samples]
    if len(set(names)) != len(names):
        raise DatasetError(f"folder: two images share a name under {root / 'images'}; names must be unique")
    _check_files(samples, "folder", layout)
    bg_queries = classes[background] if background is not None else ()
    return EvalSet("folder", classes, tuple(samples), background, bg_queries)


#: dataset name -> reader(root) -> EvalSet
DATASETS: dict[str, Callable[[Path], EvalSet]] = {
    "voc20": lambda root: _voc(root, False),
    "voc21": lambda root: _voc(root, True),
    "context59": lambda root: _context(root, False),
    "context60": lambda root: _context(root, True),
    "cocostuff171": _coco_stuff,
    "ade150": _ade,
    "cityscapes": _cityscapes,
    "folder": _folder,
}


def load_dataset(dataset: str, root: Path | str) -> EvalSet:
    """Read a dataset's file list and classes (see the module docstring for the layouts)."""
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{dataset}: --root {root} is not a folder")
    return DATASETS[dataset](root)


# --- protocols ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    scale: tuple[int, int] | None  # (long, short) rescale limits; None: the dataset's whole_scale
    window: int  # sliding-window size in resized pixels; 0 = whole image
    stride: int


PROTOCOLS: dict[str, Protocol] = {
    "whole512": Protocol(None, 0, 224),
    "slide448": Protocol((2048, 448), 448, 224),
}


def rescaled_short_side(height: int, width: int, scale: tuple[int, int]) -> int:
    """Short side after mmcv's keep-ratio rescale to ``scale`` = (long limit, short limit)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(min(height, width) * factor + 0.5))


def _pct(x: float) -> float | None:
    return None if math.isnan(x) else round(100.0 * float(x), 4)


# --- the loop ----------------------------------------------------------------------------------------

#: image (H, W, 3) uint8 RGB -> (H, W) ground-truth label per pixel, IGNORE for no label
Predictor = Callable[[np.ndarray], np.ndarray]


def evaluate(
    ds: EvalSet,
    predict: Predictor,
    out: Path | str,
    *,
    limit: int | None = None,
    overlays: int = 8,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Run ``predict`` on the first ``limit`` samples (all when None) and write ``out/metrics.json``,
    ``out/predictions/<name>.png`` (labels as in the ground truth, 255 = no label) and ``overlays``
    pictures ``out/overlays/<name>.png`` (prediction | ground truth) for evenly spaced samples.
    Returns the metrics (also ``meta``'s entries)."""
    out = Path(out)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    samples = ds.samples[:limit] if limit is not None else ds.samples
    if not samples:
        raise DatasetError(f"{ds.name}: nothing to evaluate (limit={limit})")
    pictures = set(np.linspace(0, len(samples) - 1, overlays).round().astype(int).tolist()) if overlays > 0 else set()
    if pictures:
        (out / "overlays").mkdir(exist_ok=True)
    k = len(ds.classes)
    conf = np.zeros((k, k + 1), dtype=np.int64)
    for i, sample in enumerate(tqdm(samples, desc=f"eval {ds.name}", unit="img", disable=not progress)):
        image, gt = read_image(sample.image), ds.read_mask(sample)
        if image.shape[:2] != gt.shape:
            raise DatasetError(f"{sample.image} is {image.shape[:2]} but its mask {sample.mask} is {gt.shape}")
        pred = np.asarray(predict(image))
        conf += confusion_matrix(gt, pred, k)
        pred_png = np.where((pred >= 0) & (pred < k), pred, -1)
        save_label_png(pred_png, out / "predictions" / f"{sample.name}.png")
        if i in pictures:
            _side_by_side(
                overlay(image, pred_png, ds.names), overlay(image, np.where(gt == IGNORE, -1, gt), ds.names)
            ).save(out / "overlays" / f"{sample.name}.png")
    metrics = _metrics_record(ds, conf, len(samples), meta or {})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    canvas = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def _metrics_record(ds: EvalSet, conf: np.ndarray, n_images: int, meta: dict) -> dict:
    s = scores(conf)
    return {
        "dataset": ds.name,
        **meta,
        "n_images": n_images,
        "mIoU": _pct(s["mIoU"]),
        "aAcc": _pct(s["aAcc"]),
        "mAcc": _pct(s["mAcc"]),
        "IoU": {n: _pct(v) for n, v in zip(ds.names, s["IoU"])},
        "Acc": {n: _pct(v) for n, v in zip(ds.names, s["Acc"])},
        "units": "percent; null where a class is absent from both ground truth and prediction (IoU) "
        "or from the ground truth (Acc); means skip nulls",
        "confusion": conf.tolist(),
    }


# --- MaskCLIP as the predictor -----------------------------------------------------------------------


def maskclip_predictor(seg, ds: EvalSet, opts, scale: tuple[int, int]) -> Predictor:
    """A predictor running ``seg`` (a MaskCLIP) with ``opts`` (SegmentOptions), the image rescaled to
    ``scale`` = (long, short) limits. Query k -> its ground-truth label; a pixel with no label (a
    background query won, or below ``opts.min_confidence``) -> the background label, else IGNORE."""
    queries, to_gt = ds.queries()
    no_label = ds.background if ds.background is not None else IGNORE

    def predict(image: np.ndarray) -> np.ndarray:
        short = rescaled_short_side(image.shape[0], image.shape[1], scale)
        o = dataclasses.replace(opts, short_side=short)
        labels = seg.segment([image], queries, ds.background_queries, o)[0].labels.astype(np.int64)  # (H, W)
        return np.where(labels >= 0, to_gt[np.clip(labels, 0, None)], no_label)

    return predict


_RECORDED = ("model", "pretrained", "precision", "dense_mode", "templates", "temperature", "batch_size")


def run_eval(
    settings: Settings,
    dataset: str,
    root: Path | str,
    out: Path | str,
    *,
    protocol: str = "whole512",
    limit: int | None = None,
    overlays: int = 8,
    progress: bool = True,
    bg_threshold: float | None = None,
    refinements: bool = False,
    preset: str | None = None,
) -> dict:
    """Evaluate MaskCLIP (``shared_maskclip(settings)``) on ``dataset`` under ``root`` like the papers;
    writes ``out/metrics.json``, ``out/predictions/``, ``out/overlays/`` and returns the metrics.

    ``protocol``: ``whole512`` (the paper's) or ``slide448``. ``bg_threshold``: for datasets with a
    background class, pixels whose best probability is below it become background (default 0.1);
    ignored otherwise. ``refinements``: False forces key smoothing and prompt denoising off (the
    paper's plain configs); True leaves them to the settings.

    ``preset``: run that method's published inference instead (engine/presets.py: its resize, windows,
    temperature, templates, PAMR...; settings set explicitly still override it); ``protocol`` and
    ``refinements`` are then unused. Without it the ``protocol`` runs on the ``legacy`` pipeline."""
    if preset is not None:
        return _run_preset_eval(settings.replace(preset=preset), dataset, root, out, limit=limit,
                                overlays=overlays, progress=progress, bg_threshold=bg_threshold)  # fmt: skip
    settings = settings.replace(preset="legacy")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    ds = load_dataset(dataset, root)
    proto = PROTOCOLS[protocol]
    scale = proto.scale or ds.whole_scale
    opts = _legacy_options(settings, ds, proto, bg_threshold, refinements)
    seg = shared_maskclip(settings)
    meta = {
        "protocol": protocol,
        "model": seg.version,
        "scale": list(scale),
        "window": proto.window,
        "stride": proto.stride,
        "key_smoothing": opts.key_smoothing,
        "prompt_denoising": opts.prompt_denoising,
        "bg_threshold": opts.min_confidence if ds.background is not None else None,
        "limit": limit,
        "settings": {k: getattr(settings, k) for k in _RECORDED},
    }
    predict = maskclip_predictor(seg, ds, opts, scale)
    return evaluate(ds, predict, out, limit=limit, overlays=overlays, progress=progress, meta=meta)


def _legacy_options(
    settings: Settings, ds: EvalSet, proto: Protocol, bg_threshold: float | None, refinements: bool
) -> Any:
    """The ``SegmentOptions`` of :func:`run_eval` without a preset: the protocol's windows at its own sizes,
    the refinements off unless asked for, and the background threshold (``bg_threshold``, else
    :data:`DEFAULT_BG_THRESHOLD`) for a dataset with a background class (0 otherwise)."""
    threshold = 0.0
    if ds.background is not None:
        threshold = DEFAULT_BG_THRESHOLD if bg_threshold is None else float(bg_threshold)
    return dataclasses.replace(
        segment_options(settings),
        window=proto.window,
        stride=proto.stride,
        key_smoothing=bool(settings.key_smoothing) and refinements,
        prompt_denoising=bool(settings.prompt_denoising) and refinements,
        min_confidence=threshold,
        size_multiple=0,  # the protocol's sizes, rounded to the encoder stride only
    )


def preset_protocol(
    settings: Settings, dataset: str, ds: EvalSet, bg_threshold: float | None = None
) -> tuple[EvalSet, Any]:
    """The dataset and ``SegmentOptions`` of ``eval --preset``: the preset (``settings.preset`` and its
    overrides), then what the method's config for this benchmark changes (``engine.presets.DATASET_PROTOCOLS``:
    the authors' class names and background words, the probability and area thresholds, a temperature or
    windows of its own; a setting set explicitly still wins). ``bg_threshold`` (``--bg-threshold``) replaces
    the config's threshold; a dataset with a background class and no config of the method's takes
    :data:`DEFAULT_BG_THRESHOLD`."""
    opts = segment_options(settings)
    proto = DATASET_PROTOCOLS.get(settings.preset, {}).get(dataset)
    threshold = DEFAULT_BG_THRESHOLD if ds.background is not None else 0.0
    if proto is not None:
        names, background = cn.AUTHORS_VOCABULARIES[proto.vocabulary]
        classes = ((ds.classes[0],) + names) if ds.background == 0 else names
        if len(classes) != len(ds.classes):
            raise DatasetError(f"{dataset}: {len(ds.classes)} classes, the {settings.preset} names list {len(classes)}")
        ds = dataclasses.replace(ds, classes=classes, background_queries=background if ds.background == 0 else ())
        threshold = proto.bg_threshold if ds.background is not None else 0.0
        wanted = {"temperature": proto.temperature, "window": proto.window, "stride": proto.stride}
        changes: dict[str, Any] = {k: v for k, v in wanted.items() if v is not None and k not in settings.overrides}
        opts = dataclasses.replace(opts, area_threshold=proto.area_threshold, **changes)
    if bg_threshold is not None and ds.background is not None:
        threshold = float(bg_threshold)
    return ds, dataclasses.replace(opts, min_confidence=threshold)


def _run_preset_eval(
    settings: Settings,
    dataset: str,
    root: Path | str,
    out: Path | str,
    *,
    limit: int | None,
    overlays: int,
    progress: bool,
    bg_threshold: float | None,
) -> dict:
    """:func:`run_eval` with ``settings.preset``'s own protocol; predictions at the original size."""
    ds, opts = preset_protocol(settings, dataset, load_dataset(dataset, root), bg_threshold)
    threshold = opts.min_confidence
    seg = shared_maskclip(settings)
    queries, to_gt = ds.queries()
    no_label = ds.background if ds.background is not None else IGNORE

    def predict(image: np.ndarray) -> np.ndarray:
        labels = seg.segment([image], queries, ds.background_queries, opts)[0].labels.astype(np.int64)  # (H, W)
        return np.where(labels >= 0, to_gt[np.clip(labels, 0, None)], no_label)

    meta = {
        "preset": pipeline_description(settings),
        "model": seg.version,
        "short_side": opts.short_side,
        "window": opts.window,
        "stride": opts.stride,
        "refine": opts.refine,
        "temperature": opts.temperature,
        "bg_threshold": threshold if ds.background is not None else None,
        "area_threshold": opts.area_threshold,
        "limit": limit,
        "settings": {k: getattr(settings, k) for k in _RECORDED},
    }
    return evaluate(ds, predict, out, limit=limit, overlays=overlays, progress=progress, meta=meta)
