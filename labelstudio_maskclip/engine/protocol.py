"""The authors' inference around the dense features (the ``"authors"`` pipeline of engine/presets.py).

Per image, as SCLIP, ClearCLIP, NACLIP and MaskCLIP run it (docs/method.md, "Presets"):
1. resize with mmcv's keep-ratio rule (:func:`mmcv_size`) and OpenCV's bilinear interpolation on the uint8
   image (:func:`mmcv_resize`), then normalise;
2. each window (or the whole image) -> cosine logits on the patch grid -> upsampled bilinearly to the
   window's pixels (:func:`window_logits`, with the method's rule for sides that are not a multiple of the
   patch); windows summed and divided by their count per pixel (:func:`merged_logits`);
3. logits upsampled to the original size, optionally refined by PAMR there (the normalised resized image
   upsampled to the original size gives the affinities), then ``softmax(temperature * logits)``.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["mmcv_size", "mmcv_resize", "slide_boxes", "window_logits", "merged_logits", "PADS"]

PADS = ("truncate", "corner", "center")
#: grid logits of a normalised batch: (B, 3, h, w), h and w multiples of the stride -> (B, N, h/s, w/s)
GridLogits = Callable[[torch.Tensor], torch.Tensor]


def mmcv_size(height: int, width: int, short_side: int, max_long_side: int, stride: int = 1) -> tuple[int, int]:
    """(H', W') of mmcv's keep-ratio rescale to the scale (max_long_side, short_side): factor
    ``min(max_long_side / long side, short_side / short side)``, each side ``int(side * factor + 0.5)``.
    ``short_side`` 0 keeps the size. Sides are at least ``stride`` (an image thinner than one patch
    would have no patch at all; the authors' code fails there)."""
    if not short_side:
        return max(stride, height), max(stride, width)
    scale = min(max_long_side / max(height, width), short_side / min(height, width))
    return max(stride, int(height * scale + 0.5)), max(stride, int(width * scale + 0.5))


def mmcv_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (H', W', 3) uint8 with ``cv2.INTER_LINEAR`` (mmcv's ``bilinear``), no antialiasing."""
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def slide_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The authors' window boxes (y0, y1, x0, x1): starts every ``stride``, as many as cover the side, the
    last pushed back flush with the border; a side shorter than ``crop`` is one window of that side."""

    def spans(n: int) -> list[tuple[int, int]]:
        count = max(n - crop + stride - 1, 0) // stride + 1
        out = []
        for i in range(count):
            end = min(i * stride + crop, n)
            out.append((max(end - crop, 0), end))
        return out

    return [(y0, y1, x0, x1) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def window_logits(pixels: torch.Tensor, grid_logits: GridLogits, stride: int, pad: str) -> torch.Tensor:
    """(B, 3, h, w) normalised window -> (B, N, h, w) cosine logits at its pixels (bilinear upsampling).

    Sides that are not a multiple of ``stride``: ``"truncate"`` (SCLIP, NACLIP: the patch embedding drops
    the remainder and the smaller grid is stretched over the window), ``"corner"`` (MaskCLIP: zeros added
    bottom/right, the padded grid stretched over the window), ``"center"`` (ClearCLIP: zeros split between
    both sides, the grid upsampled to the padded window and cut back).
    """
    h, w = pixels.shape[-2:]
    if pad == "truncate":
        grid = grid_logits(pixels[..., : h // stride * stride, : w // stride * stride])
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    ph, pw = -h % stride, -w % stride
    if pad == "corner":
        grid = grid_logits(F.pad(pixels, (0, pw, 0, ph)) if ph or pw else pixels)
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    if pad == "center":
        left, top = pw // 2, ph // 2
        grid = grid_logits(F.pad(pixels, (left, pw - left, top, ph - top)) if ph or pw else pixels)
        up = F.interpolate(grid, size=(h + ph, w + pw), mode="bilinear", align_corners=False)
        return up[..., top : top + h, left : left + w]
    raise ValueError(f"unknown pad rule {pad!r}: choose one of {', '.join(PADS)}")


def merged_logits(
    pixels: torch.Tensor, grid_logits: GridLogits, stride: int, pad: str, window: int, step: int
) -> torch.Tensor:
    """(1, 3, h, w) normalised image -> (1, N, h, w) logits: the whole image (``window`` 0) or windows of
    ``window`` pixels ``step`` apart, each upsampled to its pixels, summed and divided by the count."""
    h, w = pixels.shape[-2:]
    if not window:
        return window_logits(pixels, grid_logits, stride, pad)
    boxes = slide_boxes(h, w, window, step)
    crops = torch.cat([pixels[..., y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])  # all the same size
    logits = window_logits(crops, grid_logits, stride, pad)  # (n, N, wh, ww)
    total = torch.zeros(1, logits.shape[1], h, w, device=logits.device, dtype=logits.dtype)
    count = torch.zeros(1, 1, h, w, device=logits.device, dtype=logits.dtype)
    for (y0, y1, x0, x1), crop in zip(boxes, logits):
        total[0, :, y0:y1, x0:x1] += crop
        count[0, :, y0:y1, x0:x1] += 1
    return total / count
