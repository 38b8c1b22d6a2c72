"""COCO RLE, the codec pair: ``(H, W)`` bool masks <-> pycocotools' compressed RLE as JSON.

The JSON form is ``{"size": [H, W], "counts": "<ascii>"}``; counts run column-major, as COCO defines.
pycocotools is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import BadInput

__all__ = ["CocoRLEError", "mask_to_coco_rle", "coco_rle_to_mask"]


class CocoRLEError(BadInput):
    """A mask or an RLE is malformed; the message says how."""


def mask_to_coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """``(H, W)`` bool mask -> compressed COCO RLE ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise CocoRLEError(f"mask must be (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))  # column-major, like COCO
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def coco_rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """COCO RLE (compressed ``counts`` str/bytes, or uncompressed list of run lengths) -> ``(H, W)`` bool."""
    from pycocotools import mask as mask_utils

    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CocoRLEError(f"COCO RLE needs 'size': [H, W] and 'counts', got {type(rle).__name__}: {exc}") from None
    if isinstance(counts, list):  # uncompressed RLE
        if sum(counts) != height * width:
            raise CocoRLEError(f"uncompressed RLE covers {sum(counts)} pixels, size says {height}x{width}")
        compressed = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    else:
        compressed = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools 2.0.x warns on every decode under numpy 2
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(compressed).astype(bool)
