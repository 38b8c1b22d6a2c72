"""Presets: each method's published inference protocol as a whole (docs/method.md, "Presets").

A preset fixes everything between the decoded image and the label map: the resize rule and short side,
windows and how they merge, padding, temperature, templates, pixel normalisation, LayerNorm epsilon,
synonyms, refinements. ``maskclip``, ``sclip``, ``clearclip`` and ``naclip`` follow their authors' code
(tests/test_presets.py compares each with a transcription of that code); ``legacy`` is this project's
earlier pipeline (antialiased resize to multiples of the stride, probabilities averaged on the patch grid,
key smoothing and prompt denoising). Pure data: no torch, so settings can validate against it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "GOVERNED", "DatasetProtocol", "DATASET_PROTOCOLS"]


@dataclass(frozen=True)
class Preset:
    name: str
    mode: str  # dense mode (engine.modes.DENSE_MODES)
    pipeline: str  # "authors": mmcv resize, logits merged per pixel, softmax at the original size; "grid": legacy
    short_side: int  # resize: short side this many pixels (long side at most max_long_side)
    window: int  # sliding-window crop in resized pixels; 0: whole image
    stride: int  # sliding-window stride
    pad: str  # a side not a multiple of the patch: "truncate" (dropped), "corner" (zeros bottom/right), "center"
    temperature: float  # softmax(temperature * cosine logits); 1.0 is a plain softmax (MaskCLIP's)
    templates: str  # engine.text.resolve_templates name
    normalize: str  # "model": the weights' mean/std; "imagenet": ImageNet's (MaskCLIP's mmseg configs)
    layer_norm_eps: float | None  # the image tower's LayerNorm epsilon; None: the model's own
    synonyms: str  # "max": a class's probability is the max over its names; "mean": embeddings averaged
    refine: str  # "pamr" (at the original image size with "authors") or "none"
    key_smoothing: bool
    prompt_denoising: bool
    figure: str  # the authors' published figure this preset reproduces (with their weights)
    max_long_side: int = 2048  # mmcv's (2048, S) scale: the long side never beyond this


PRESETS: dict[str, Preset] = {
    "maskclip": Preset(
        "maskclip", "maskclip", "authors", 512, 0, 224, "corner", 1.0, "maskclip85", "imagenet", 1e-6, "mean",
        "none", False, False, "MaskCLIP (ECCV 2022), ViT-B/16, PASCAL VOC20 49.5 mIoU (released config: no key "
        "smoothing, no prompt denoising)",
    ),
    "sclip": Preset(
        "sclip", "sclip", "authors", 336, 224, 112, "truncate", 40.0, "imagenet80", "model", None, "max",
        "none", False, False, "SCLIP (ECCV 2024), ViT-B/16, 38.2 mIoU averaged over 8 benchmarks",
    ),
    "clearclip": Preset(
        "clearclip", "clearclip", "authors", 448, 448, 224, "center", 50.0, "imagenet80", "model", None, "max",
        "none", False, False, "ClearCLIP (ECCV 2024), ViT-B/16, 38.1 mIoU averaged over 8 benchmarks; q-q attention as in the paper",
    ),
    "naclip": Preset(
        "naclip", "naclip", "authors", 336, 0, 112, "truncate", 40.0, "imagenet80", "model", None, "max",
        "pamr", False, False, "NACLIP (WACV 2025), ViT-B/16 with PAMR, 42.5 mIoU averaged over 8 benchmarks",
    ),
    "legacy": Preset(
        "legacy", "naclip", "grid", 448, 0, 224, "truncate", 100.0, "maskclip85", "model", None, "mean",
        "none", True, True, "none: this project's earlier pipeline, not an authors' protocol",
    ),
}  # fmt: skip

#: the served default: the best published preset
DEFAULT_PRESET = "naclip"

#: Settings field -> Preset attribute, for the settings a preset governs (an explicit setting overrides it)
GOVERNED: dict[str, str] = {
    "dense_mode": "mode",
    "short_side": "short_side",
    "window": "window",
    "stride": "stride",
    "temperature": "temperature",
    "templates": "templates",
    "refine": "refine",
    "key_smoothing": "key_smoothing",
    "prompt_denoising": "prompt_denoising",
}


@dataclass(frozen=True)
class DatasetProtocol:
    """What a method's benchmark config changes from its preset (the authors' ``configs/cfg_<dataset>.py``
    and ``cls_<dataset>.txt``), for ``eval --preset NAME --dataset DATASET``."""

    vocabulary: str  # evaluation.class_names.AUTHORS_VOCABULARIES key: the authors' names (and background words)
    figure: str  # the authors' figure for this benchmark, and where it is published
    bg_threshold: float = 0.0  # prob_thd: a pixel whose best probability is below it is background
    area_threshold: float = 0.0  # SCLIP's area_thd: a class winning at most this share of the object pixels is dropped
    temperature: float | None = None  # logit_scale, when it differs from the preset's
    window: int | None = None  # slide_crop / slide_stride, when they differ from the preset's
    stride: int | None = None


_P = DatasetProtocol
#: preset -> dataset -> protocol (the PASCAL benchmarks; MaskCLIP's VOC20 names are evaluate.py's defaults)
DATASET_PROTOCOLS: dict[str, dict[str, DatasetProtocol]] = {
    "sclip": {
        "voc20": _P("successors-voc", "81.54 (repository README); 80.4 (paper)"),
        "voc21": _P("successors-voc", "59.63 (repository README)", 0.1, 0.1, temperature=65.0),
        "context59": _P("successors-context", "34.46 (repository README)"),
        "context60": _P("successors-context", "31.74 (repository README)", 0.1, temperature=50.0),
    },
    "naclip": {
        "voc20": _P("successors-voc", "83.03 (repository README)"),
        "voc21": _P("successors-voc", "64.07 (repository README)", 0.1),
        "context59": _P("successors-context", "38.35 (repository README)", window=224, stride=112),
        "context60": _P("successors-context", "34.99 (repository README)", 0.1, window=224, stride=112),
    },
    "clearclip": {
        "voc20": _P("clearclip-voc", "80.9 (paper)"),
        "voc21": _P("clearclip-voc", "51.8 (paper)", 0.5),
        "context59": _P("successors-context", "35.9 (paper)"),
        "context60": _P("successors-context", "32.6 (paper)", 0.15),
    },
}  # fmt: skip
