"""The errors of turning a task's image reference into pixels; every one is an :class:`ImageError`.

Messages name the URL in its display form (credentials and signatures redacted, see
:func:`.urls.display`) and the setting that changes the outcome; they never quote what a remote server
sent back.
"""

from __future__ import annotations

__all__ = ["ImageError", "ImageDecodeError", "ImageTooLargeError", "ImageFetchError"]


class ImageError(Exception):
    """Any failure to turn a task's image reference into pixels."""


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image (not an image, truncated, unsupported mode)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (decompression-bomb protection)."""


class ImageFetchError(ImageError):
    """Downloading failed. ``url`` is the display form of the URL, ``status`` the HTTP status or None."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
