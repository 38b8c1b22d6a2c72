"""JPEG decoding on the model's device (nvJPEG through torchvision), for GPU hosts.

On a GPU host the CPU work per image bounds throughput; decoding is a large part of it. JPEG files (most task
images) are decoded here in one batched call on the GPU, with EXIF orientation applied as
:func:`~labelstudio_maskclip.fetching.images.decode_image` does; anything this path does not take (another
format, CMYK, a decoder error) is left to the CPU decoder, which also gives the error messages.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["is_jpeg", "decode_jpegs", "decode_jpeg_on_cpu"]


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _eligible(data: bytes, max_pixels: int) -> bool:
    """A baseline/progressive JPEG in YCbCr or grayscale within the pixel limit (header only)."""
    if not is_jpeg(data):
        return False
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        return False
    width, height = image.size
    return image.format == "JPEG" and image.mode in ("RGB", "L") and 0 < width * height <= max_pixels


# torchvision 0.29 points to torchcodec at every decode; decode_jpeg still works. One targeted filter (a
# catch_warnings() around each call would race between the fetch threads).
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)


def _decoder():
    from torchvision.io import ImageReadMode, decode_jpeg

    return ImageReadMode, decode_jpeg


def decode_jpeg_on_cpu(data: bytes) -> np.ndarray | None:
    """One JPEG (YCbCr or grayscale, already checked by the caller) -> (H, W, 3) uint8 RGB, EXIF orientation
    applied; None when torchvision refuses the file (truncated, corrupt), which Pillow then reports.

    torchvision and Pillow both decode with libjpeg-turbo's defaults: the pixels are the same (every test
    photo, checked in tests/test_decode.py), and torchvision takes about 60 % of Pillow's time, most of the
    difference being Pillow's copy out of its own image memory (BENCHMARKS.md, host side).
    """
    mode, decode_jpeg = _decoder()
    try:
        chw = decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode.RGB, apply_exif_orientation=True
        )
    except RuntimeError:
        return None
    return chw.permute(1, 2, 0).contiguous().numpy()  # (3, H, W) -> (H, W, 3)


def decode_jpegs(blobs: Sequence[bytes], device: torch.device | str, *, max_pixels: int) -> list[torch.Tensor | None]:
    """JPEG file bytes -> (H, W, 3) uint8 RGB tensors on ``device``, EXIF orientation applied; None for each
    blob this path leaves to the CPU decoder (not a plain JPEG, over ``max_pixels``, or a decoder error)."""
    ImageReadMode, decode_jpeg = _decoder()
    out: list[torch.Tensor | None] = [None] * len(blobs)
    take = [i for i, b in enumerate(blobs) if _eligible(b, max_pixels)]
    if not take:
        return out
    data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in take]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the batch: decode one by one
        images = []
        for d in data:
            try:
                images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError:
                images.append(None)
    for i, image in zip(take, images):
        out[i] = None if image is None else image.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3) view
    return out
