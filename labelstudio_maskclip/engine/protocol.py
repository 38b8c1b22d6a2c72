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

__all__ = [
    "mmcv_size", "mmcv_resize", "slide_boxes", "window_input", "window_output", "window_logits", "merge_windows",
    "merged_logits", "PADS",
]  # fmt: skip

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


def window_input(pixels: torch.Tensor, stride: int, pad: str) -> torch.Tensor:
    """(B, 3, h, w) normalised window -> what the encoder sees, its sides multiples of ``stride`` by the
    method's rule for sides that are not: ``"truncate"`` (SCLIP, NACLIP: the patch embedding drops the
    remainder), ``"corner"`` (MaskCLIP: zeros added bottom/right), ``"center"`` (ClearCLIP: zeros split
    between both sides)."""
    h, w = pixels.shape[-2:]
    if pad == "truncate":
        return pixels[..., : h // stride * stride, : w // stride * stride]
    ph, pw = -h % stride, -w % stride
    if pad == "corner":
        return F.pad(pixels, (0, pw, 0, ph)) if ph or pw else pixels
    if pad == "center":
        left, top = pw // 2, ph // 2
        return F.pad(pixels, (left, pw - left, top, ph - top)) if ph or pw else pixels
    raise ValueError(f"unknown pad rule {pad!r}: choose one of {', '.join(PADS)}")


def window_output(grid: torch.Tensor, size: tuple[int, int], stride: int, pad: str) -> torch.Tensor:
    """(B, C, gh, gw) on the grid of :func:`window_input`'s output -> (B, C, *size) at the window's (h, w)
    pixels, bilinear: the grid stretched over the window (``"truncate"``, ``"corner"``) or upsampled to the
    padded window and cut back (``"center"``)."""
    h, w = size
    if pad in ("truncate", "corner"):
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    if pad == "center":
        ph, pw = -h % stride, -w % stride
        up = F.interpolate(grid, size=(h + ph, w + pw), mode="bilinear", align_corners=False)
        return up[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
    raise ValueError(f"unknown pad rule {pad!r}: choose one of {', '.join(PADS)}")


def window_logits(pixels: torch.Tensor, grid_logits: GridLogits, stride: int, pad: str) -> torch.Tensor:
    """(B, 3, h, w) normalised window -> (B, N, h, w) cosine logits at its pixels: the encoder on
    :func:`window_input`, its grid logits brought to the pixels by :func:`window_output`."""
    grid = grid_logits(window_input(pixels, stride, pad))
    return window_output(grid, (pixels.shape[-2], pixels.shape[-1]), stride, pad)


def merge_windows(logits: torch.Tensor, boxes: list[tuple[int, int, int, int]], size: tuple[int, int]) -> torch.Tensor:
    """(n, N, wh, ww) logits of the windows ``boxes`` (y0, y1, x0, x1) -> (1, N, *size): summed where
    they overlap and divided by the count."""
    total = torch.zeros(1, logits.shape[1], *size, device=logits.device, dtype=logits.dtype)
    count = torch.zeros(1, 1, *size, device=logits.device, dtype=logits.dtype)
    for (y0, y1, x0, x1), crop in zip(boxes, logits):
        total[0, :, y0:y1, x0:x1] += crop
        count[0, :, y0:y1, x0:x1] += 1
    return total / count


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
    return merge_windows(window_logits(crops, grid_logits, stride, pad), boxes, (h, w))  # (1, N, h, w)
