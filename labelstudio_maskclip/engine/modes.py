"""The dense modes: how the last block of a ViT turns into patch features (see ``dense.py``).

Kept apart from ``dense.py`` (which needs torch) so settings validation and the command line can list
them without loading a model.
"""

from __future__ import annotations

__all__ = ["DENSE_MODES"]

#: MaskCLIP's value path, then its training-free successors SCLIP, ClearCLIP and NACLIP (docs/method.md).
DENSE_MODES: tuple[str, ...] = ("maskclip", "sclip", "clearclip", "naclip")
