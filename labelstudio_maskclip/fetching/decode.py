"""Image file bytes -> an ``(H, W, 3)`` uint8 RGB array, as a person sees the image in Label Studio.

Pure: no network. The pixel count is checked from the header before any pixel is decoded, so a small file
that claims billions of pixels (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError, ImageError, ImageTooLargeError

__all__ = ["decode_image", "image_pixels", "PixelBudget"]

# EXIF orientation: Label Studio shows images in an <img>/canvas, and browsers apply EXIF orientation by
# default (CSS `image-orientation: from-image`). Label Studio's ML-backend maintainers confirmed it:
# HumanSignal/label-studio-ml-backend issue #535 ("images are displayed with the correct orientation in
# Label Studio based on their EXIF data") fixed by PR #536 (`ImageOps.exif_transpose` in the examples), and
# earlier issue #156 / PR #158 (width and height swapped in `original_width/height` without it). So we
# transpose too: the array, and therefore `original_width/height` and every mask, match what LS shows.

# Transparent pixels are composited on white (not alpha-dropped): the RGB under alpha=0 is arbitrary
# (often black or leftover colours) and would mislead CLIP; white is what a viewer sees on a white page.
_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode image file bytes into an ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded; more than ``max_pixels``
    raises :class:`ImageTooLargeError`. Modes: 1, L, P (with transparency), LA/PA/RGBA (composited on
    white), CMYK/YCbCr/LAB (Pillow's conversion, ICC profiles ignored), 16-bit (``I;16*``: value / 257),
    32-bit ``I`` (as 16-bit when within 0..65535, else min-max stretched), float ``F`` (0..1 scaled by 255
    when within it, else min-max stretched). Multi-frame files give their first frame.
    """
    image = _open(data, max_pixels)
    if image.format == "JPEG" and image.mode in ("RGB", "L"):  # most task images: the faster decoder
        from .jpeg import decode_jpeg_on_cpu

        pixels = decode_jpeg_on_cpu(data)
        if pixels is not None:
            return pixels
    try:
        image.load()
        image = _apply_orientation(image)
        return _to_rgb_array(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"image refused as a decompression bomb by Pillow's own limit ({exc}); images this large are not "
            "served, whatever MASKCLIP_MAX_IMAGE_PIXELS says"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        kind = image.format or "image"
        raise ImageDecodeError(f"cannot decode the {kind} data: {exc} (truncated or corrupt file?)") from exc


def image_pixels(data: bytes, *, max_pixels: int) -> int:
    """Width x height from the header alone (the same checks and errors as :func:`decode_image`)."""
    width, height = _open(data, max_pixels).size
    return width * height


class PixelBudget:
    """Decoded pixels in flight, bounded: a counting semaphore weighted by pixels, shared by a worker's threads.

    :meth:`reserve` waits until the pixels fit (or nothing else is in flight, so one image larger than the
    budget still passes alone), and the reservation lasts as long as the decoded array it is attached to:
    it is released when the array is garbage collected, wherever the array went (segmentation, encoding).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._free = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int, deadline: float) -> Iterator[PixelBudget._Lease]:
        """Reserve ``pixels`` until ``deadline`` (:func:`time.monotonic`); ``lease.attach(array)`` hands the
        release to the array's lifetime, else the pixels are released when the block ends."""
        with self._free:
            while self.in_flight and self.in_flight + pixels > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageError(
                        f"gave up waiting for {self.in_flight + pixels - self.limit} pixels of decoding room: "
                        f"{self.in_flight} decoded pixels are in flight in this worker, the limit is {self.limit} "
                        "(MASKCLIP_MAX_PIXELS_IN_FLIGHT)"
                    )
                self._free.wait(min(left, 1.0))
            self.in_flight += pixels
        lease = PixelBudget._Lease(self, pixels)
        try:
            yield lease
        finally:
            if not lease.attached:
                self.release(pixels)

    def release(self, pixels: int) -> None:
        with self._free:
            self.in_flight -= pixels
            self._free.notify_all()

    class _Lease:
        def __init__(self, budget: PixelBudget, pixels: int) -> None:
            self.budget, self.pixels, self.attached = budget, pixels, False

        def attach(self, array: np.ndarray) -> np.ndarray:
            weakref.finalize(array, self.budget.release, self.pixels)
            self.attached = True
            return array


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse images over ``max_pixels`` before decoding pixels."""
    if not data:
        raise ImageDecodeError("cannot decode an empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own, global limit, checked in open()
        raise ImageTooLargeError(
            f"image refused as a decompression bomb by Pillow's own limit ({exc}); images this large are not "
            "served, whatever MASKCLIP_MAX_IMAGE_PIXELS says"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image: {len(data)} bytes in no image format this backend reads") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"cannot read the image header: {exc} (truncated or corrupt file?)") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels} "
            "(MASKCLIP_MAX_IMAGE_PIXELS)"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError(f"image has no pixels ({width} x {height})")
    return image


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (see the note on Label Studio above)."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error):
        return image  # a corrupt EXIF block: browsers ignore it too


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> ``(H, W, 3)`` uint8 RGB."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image), mode)  # (H, W)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, _BACKGROUND + (255,))
        image = Image.alpha_composite(background, image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return np.ascontiguousarray(array)


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel 16/32-bit integer or float pixels ``(H, W)`` -> uint8 ``(H, W)``."""
    if mode in _SIXTEEN_BIT:
        return np.round(values.astype(np.float32) / 257.0).astype(np.uint8)
    values = values.astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    low, high = float(values.min()), float(values.max())
    if mode == "I" and low >= 0 and high <= 65535:  # 16-bit data in a 32-bit container (PNG, TIFF)
        return np.round(values / 257.0).astype(np.uint8)
    if mode == "F" and low >= 0 and high <= 1:
        return np.round(values * 255.0).astype(np.uint8)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
