"""A task's image as pixels: the entry point of the task-image modules.

- :mod:`.decode`: file bytes -> ``(H, W, 3)`` uint8 RGB (EXIF orientation, every Pillow mode, pixel limit).
- :mod:`.urls`: which URLs may be fetched (one parse shared with the HTTP client, private addresses).
- :mod:`.auth`: which requests carry Label Studio's credentials; the personal access token exchange.
- :mod:`.fetch`: :class:`ImageFetcher`, a task's URL (``/data/upload/...``, ``s3://...``, ``data:``,
  ``https://...``) -> bytes -> pixels, with redirects, size and time caps.

Every error is an :class:`ImageError` (see :mod:`.errors`).
"""

from __future__ import annotations

from .decode import decode_image
from .errors import ImageDecodeError, ImageError, ImageFetchError, ImageTooLargeError
from .fetch import ImageFetcher
from .urls import CLOUD_SCHEMES, is_public_address

__all__ = [
    "ImageError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "ImageFetchError",
    "decode_image",
    "is_public_address",
    "ImageFetcher",
    "CLOUD_SCHEMES",
]
