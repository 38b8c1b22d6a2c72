"""Heavy models, loaded once per process and shared by its threads; and the settings -> engine bridge.

The engine takes plain arguments; this is the one place that reads a :class:`Settings` for it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from .engine.segmenter import MaskCLIP, SegmentOptions

__all__ = ["segment_options", "shared_maskclip"]

_shared: dict[tuple, MaskCLIP] = {}
_shared_lock = threading.Lock()


def segment_options(s: Settings) -> SegmentOptions:
    """The engine's per-call options as the settings give them."""
    from .engine.segmenter import SegmentOptions

    return SegmentOptions(
        mode=s.dense_mode,
        short_side=s.short_side,
        size_multiple=s.size_multiple,
        max_input_pixels=s.max_input_pixels,
        window=s.window,
        stride=s.stride,
        key_smoothing=s.key_smoothing,
        prompt_denoising=s.prompt_denoising,
        refine=s.refine,
        temperature=s.temperature,
        min_confidence=s.min_confidence,
        batch_size=s.batch_size,
        score=s.score,
    )


def shared_maskclip(s: Settings) -> MaskCLIP:
    """The process-wide MaskCLIP for these settings, loaded on first use (thread-safe)."""
    from .engine.segmenter import MaskCLIP

    key = (s.model, s.pretrained, s.device, s.precision, s.allow_random, s.cache_dir, s.templates, s.compile)
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
            )
        return _shared[key]
