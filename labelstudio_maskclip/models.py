"""Heavy models, loaded once per process and shared by its threads; and the settings -> engine bridge.

The engine takes plain arguments; this is the one place that reads a :class:`Settings` for it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from .engine.segmenter import MaskCLIP, SegmentOptions

__all__ = ["segment_options", "shared_maskclip", "pipeline_description"]

_shared: dict[tuple, MaskCLIP] = {}
_shared_lock = threading.Lock()


def segment_options(s: Settings) -> SegmentOptions:
    """The engine's per-call options: the preset (``s.preset``) with the settings that override it. Every
    segmenter (serving, interactive prompts, the trainer's teacher, eval, rescoring) is built from this."""
    from .engine.presets import PRESETS
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
    from .engine.presets import PRESETS
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
