"""Heavy models, loaded once per process and shared by its threads; and the settings -> engine bridge.

The engine takes plain arguments; this is the one place that reads a :class:`Settings` for it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine.presets import PRESETS
from .settings import Settings

if TYPE_CHECKING:
    from .engine.segmenter import MaskCLIP, SegmentOptions

__all__ = [
    "segment_options", "shared_maskclip", "pipeline_description", "text_embedding_store", "text_width",
    "embedding_identity",
]  # fmt: skip

_shared: dict[tuple, MaskCLIP] = {}
_shared_lock = threading.Lock()


def segment_options(s: Settings) -> SegmentOptions:
    """The engine's per-call options: the preset (``s.preset``) with the settings that override it. Every
    segmenter (serving, interactive prompts, the trainer's teacher, eval, rescoring) is built from this."""
    from .engine.segmenter import SegmentOptions

    preset = PRESETS[s.preset]
    assert s.dense_mode is not None and s.short_side is not None and s.window is not None  # resolved
    assert s.stride is not None and s.refine is not None and s.temperature is not None
    return SegmentOptions(
        mode=s.dense_mode,
        short_side=s.short_side,
        size_multiple=s.size_multiple,
        max_input_pixels=s.max_input_pixels,
        window=s.window,
        stride=s.stride,
        key_smoothing=bool(s.key_smoothing),
        prompt_denoising=bool(s.prompt_denoising),
        refine=s.refine,
        temperature=s.temperature,
        min_confidence=s.min_confidence,
        batch_size=s.batch_size,
        score=s.score,
        pipeline=preset.pipeline,
        pad=preset.pad,
        synonyms=preset.synonyms,
        max_long_side=preset.max_long_side,
    )


def pipeline_description(s: Settings) -> str:
    """The preset and its overrides in a few words, for model versions and /metrics: ``"naclip"``,
    ``"naclip+short_side=448+refine=none"``. Never a comma: Label Studio lists a task's model versions
    joined by commas (``predictions_model_versions``), so a comma would split ours in two."""
    return "+".join([s.preset, *(f"{k}={v}".replace(",", ";") for k, v in s.overrides.items())])


def shared_maskclip(s: Settings) -> MaskCLIP:
    """The process-wide MaskCLIP for these settings, loaded on first use (thread-safe)."""
    from .engine.segmenter import MaskCLIP

    preset = PRESETS[s.preset]
    key = (s.model, s.pretrained, s.device, s.precision, s.allow_random, s.cache_dir, s.templates, s.compile,
           preset.normalize, preset.layer_norm_eps)  # fmt: skip
    with _shared_lock:
        if key not in _shared:
            _shared[key] = MaskCLIP.load(
                s.model,
                s.pretrained,
                s.device,
                s.precision,
                allow_random=s.allow_random,
                cache_dir=s.cache_dir,
                templates=s.templates,
                compile=s.compile,
                normalize=preset.normalize,
                layer_norm_eps=preset.layer_norm_eps,
            )
        return _shared[key]


def text_embedding_store(s: Settings, compute: Any) -> Any:
    """The :class:`~labelstudio_maskclip.embeddings.EmbeddingStore` of the teacher's text embeddings under
    ``MODEL_DIR/text_embeddings``, ``compute(label_set) -> (N, D)`` (one row per name) making missing ones: the one store of every
    worker and of the trainer, which read each other's files and wait for each other's computations."""
    from .embeddings import EmbeddingStore

    return EmbeddingStore(
        Path(s.model_dir) / "text_embeddings", embedding_identity(s), compute,
        persist=s.pretrained.strip().lower() not in ("random", "none", ""), device=_device(s.device),
        width=text_width(s),
    )  # fmt: skip


def text_width(s: Settings) -> int | None:
    """The width D of the model's text embeddings, from its open_clip config (None when unknown)."""
    import open_clip

    try:
        if s.model.endswith(".json") and Path(s.model).is_file():
            config = json.loads(Path(s.model).read_text())
        else:
            config = open_clip.get_model_config(s.model) or {}
        return int(config["embed_dim"])
    except (KeyError, TypeError, ValueError, OSError):
        return None


def embedding_identity(s: Settings) -> dict[str, str]:
    """What the teacher's text embeddings depend on besides the label names: architecture (a config file
    by its content), weights, precision, prompt templates, open_clip's version (its tokenizer)."""
    import open_clip

    from .embeddings import weights_identity
    from .engine.loading import resolve_dtype
    from .engine.text import resolve_templates

    arch = s.model
    if s.model.endswith(".json") and Path(s.model).is_file():
        arch = f"{Path(s.model).stem}:{hashlib.sha256(Path(s.model).read_bytes()).hexdigest()[:16]}"
    templates = "\n".join(resolve_templates(s.templates))
    return {
        "architecture": arch,
        "weights": weights_identity(s.pretrained),
        "precision": str(resolve_dtype(s.precision, _device(s.device))),
        "templates": hashlib.sha256(templates.encode()).hexdigest()[:16],
        "open_clip": open_clip.__version__,
    }


def _device(device: str) -> Any:
    """The torch device a ``MASKCLIP_DEVICE`` value names (``auto``: CUDA when present)."""
    from .engine.loading import resolve_device

    return resolve_device(device)
