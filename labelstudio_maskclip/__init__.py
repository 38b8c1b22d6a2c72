"""labelstudio-maskclip: MaskCLIP / MaskCLIP+ segmentation pre-annotations for Label Studio.

Importing the package is cheap: torch and open_clip load when a model is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MaskCLIP", "Segmentation", "SegmentOptions", "Settings", "NO_LABEL", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine.segmenter import NO_LABEL, MaskCLIP, Segmentation, SegmentOptions
    from .settings import Settings


def __getattr__(name: str) -> Any:
    if name in ("MaskCLIP", "Segmentation", "SegmentOptions", "NO_LABEL"):
        from .engine import segmenter

        return getattr(segmenter, name)
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(f"module 'labelstudio_maskclip' has no attribute {name!r}")
