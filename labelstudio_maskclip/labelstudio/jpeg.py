"""JPEG decoding on the model's device (nvJPEG through torchvision), for GPU hosts.

On a GPU host the CPU work per image bounds throughput; decoding is a large part of it. JPEG files (most task
images) are decoded here in one batched call on the GPU, with EXIF orientation applied as
:func:`~labelstudio_maskclip.labelstudio.images.decode_image` does; anything this path does not take (another
format, CMYK, a decoder error) is left to the CPU decoder, which also gives the error messages.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import torch
from PIL import Image

__all__ = ["is_jpeg", "decode_jpegs"]


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


def decode_jpegs(blobs: Sequence[bytes], device: torch.device | str, *, max_pixels: int) -> list[torch.Tensor | None]:
    """JPEG file bytes -> (H, W, 3) uint8 RGB tensors on ``device``, EXIF orientation applied; None for each
    blob this path leaves to the CPU decoder (not a plain JPEG, over ``max_pixels``, or a decoder error)."""
    with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; decode_jpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

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
