"""A task's image as pixels: decode bytes safely, fetch Label Studio task URLs safely.

Decoding (pure): :func:`decode_image` turns file bytes into an ``(H, W, 3)`` uint8 RGB array, as a person
sees the image in Label Studio. Fetching (adapter): :class:`ImageFetcher` turns the URL found in a task's
``data`` (``/data/upload/...``, ``/data/local-files/?d=...``, ``s3://...``, ``data:...``, ``https://...``)
into bytes, with Label Studio's auth, protection against server-side request forgery and size/time caps.

Every error is an :class:`ImageError`; messages name the URL (secrets in query strings redacted, the API key
never included) and the setting that changes the outcome.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .uris import CLOUD_SCHEMES

if TYPE_CHECKING:  # requests is imported lazily: decoding does not need it
    import requests
    import urllib3

    from ..settings import Settings

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


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------

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
        raise ImageDecodeError(f"not an image: {len(data)} bytes starting {data[:16]!r}") from None
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


# ---------------------------------------------------------------------------------------------------------
# Address policy (server-side request forgery)
# ---------------------------------------------------------------------------------------------------------


def is_public_address(ip: str) -> bool:
    """True for a globally routable unicast address (IPv4 or IPv6).

    False for private, loopback, link-local, multicast, reserved, unspecified, shared (100.64/10) and
    documentation ranges, and for IPv6 forms that embed one (IPv4-mapped, 6to4, Teredo).
    """
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    if (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        return False
    return address.is_global


# ---------------------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------------------


_MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_SECRET_QUERY_KEY = re.compile(r"sig|token|key|credential|auth|secret|password", re.IGNORECASE)


class ImageFetcher:
    """Download a task's image by the URL in its ``data``, the way Label Studio's browser client would.

    - relative URLs (``/data/upload/...``, ``/data/local-files/?d=...``) resolve against
      ``label_studio_url``; cloud URIs (``s3://``, ``gs://``, ``gcs://``, ``azure-blob://``) go through
      Label Studio's ``GET /tasks/{task_id}/presign/?fileuri=<urlsafe base64>`` (a 303 to a presigned URL,
      or the bytes proxied when the storage has presign off); ``data:`` URIs are decoded in place.
    - requests to Label Studio's origin carry ``Authorization``: ``Token <key>`` for a legacy token,
      ``Bearer <access>`` for a personal access token (a JWT refresh token, exchanged at
      ``POST /api/token/refresh/``, cached and refreshed once on a 401). Other hosts get no auth header.
    - every hop (redirects followed here, at most 5) must be http(s) and resolve only to public addresses,
      unless it is Label Studio's host and port or ``allow_private`` is set. A host is checked when the
      request is made; a DNS answer that changes between the check and the connection is not caught.
    - the body is streamed and capped at ``max_bytes``; ``timeout`` bounds each request in total.

    Safe to share between threads.
    """

    def __init__(
        self,
        label_studio_url: str = "",
        api_key: str = "",
        *,
        allow_private: bool = False,
        max_bytes: int = 50_000_000,
        timeout: float = 20.0,
        session: requests.Session | None = None,
    ) -> None:
        import requests

        self.label_studio_url = label_studio_url.strip().rstrip("/")
        self.allow_private = allow_private
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._api_key = api_key.strip()
        self._session = session if session is not None else requests.Session()
        self._access: str | None = None  # cached access token for a personal access token
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, session: requests.Session | None = None) -> ImageFetcher:
        return cls(
            settings.label_studio_url,
            settings.label_studio_api_key,
            allow_private=settings.allow_private_urls,
            max_bytes=settings.max_download_bytes,
            timeout=settings.download_timeout,
            session=session,
        )

    def __repr__(self) -> str:  # never show the key
        return f"ImageFetcher(label_studio_url={self.label_studio_url!r}, allow_private={self.allow_private})"

    # --- public ---------------------------------------------------------------------------------------

    def load(self, url: str, task_id: int | None = None, *, max_pixels: int) -> np.ndarray:
        """Fetch and decode: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied (see :func:`decode_image`)."""
        data = self.fetch(url, task_id)
        try:
            return decode_image(data, max_pixels=max_pixels)
        except ImageError as exc:
            raise type(exc)(f"{_display(url)}: {exc}") from None

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes behind a task's image URL (see the class docstring for what URLs are accepted)."""
        url = url.strip()
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return self._decode_data_uri(url)
        if scheme in CLOUD_SCHEMES:
            return self._download(self._presign_url(url, task_id))
        if not scheme:
            return self._download(self._absolute(url))
        if scheme not in ("http", "https"):
            raise ImageFetchError(
                f"{_display(url)}: unsupported URL scheme {scheme!r}; use http(s), a Label Studio path, "
                f"a cloud storage URI ({', '.join(s + '://' for s in CLOUD_SCHEMES)}) or a data: URI",
                url=_display(url),
            )
        return self._download(url)

    # --- URL forms ------------------------------------------------------------------------------------

    def _absolute(self, url: str) -> str:
        if not self.label_studio_url:
            raise ImageFetchError(
                f"{_display(url)} is relative to Label Studio: set LABEL_STUDIO_URL (the address this backend "
                "reaches Label Studio at, e.g. http://label-studio:8080)",
                url=_display(url),
            )
        if url.startswith("//"):
            return urljoin(self.label_studio_url + "/", url)
        return self.label_studio_url + "/" + url.lstrip("/")

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise ImageFetchError(
                f"{_display(uri)}: a cloud storage URI is resolved by Label Studio per task, and no task id was given",
                url=_display(uri),
            )
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return self._absolute(f"/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri)}")

    def _decode_data_uri(self, url: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma:
            raise ImageFetchError(f"{_display(url)}: a data: URI without a comma", url=_display(url))
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ImageFetchError(self._too_large_message(_display(url)), url=_display(url))
        try:
            if header.lower().endswith(";base64"):
                compact = re.sub(r"\s+", "", unquote_to_bytes(payload).decode("ascii"))
                return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
            return unquote_to_bytes(payload)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ImageFetchError(f"{_display(url)}: invalid base64 in data: URI ({exc})", url=_display(url)) from None

    # --- HTTP -----------------------------------------------------------------------------------------

    def _download(self, url: str) -> bytes:
        refreshed = False
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_target(url)
            response = self._get(url)
            if response.status_code in _REDIRECTS and response.headers.get("Location"):
                response.close()
                url = urljoin(url, response.headers["Location"])
                continue
            if response.status_code == 401 and self._is_pat() and self._is_label_studio(url) and not refreshed:
                response.close()
                self._refresh_access(stale=True)
                refreshed = True
                continue
            return self._read_body(url, response)
        raise ImageFetchError(f"{_display(url)}: more than {_MAX_REDIRECTS} redirects", url=_display(url))

    def _get(self, url: str) -> requests.Response:
        import requests

        try:
            return self._session.get(
                url, headers=self._headers(url), stream=True, allow_redirects=False, timeout=self.timeout
            )
        except requests.Timeout:
            raise self._timeout_error(url) from None
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"{_display(url)}: could not connect ({type(exc).__name__}); is the host up and reachable "
                "from this backend?",
                url=_display(url),
            ) from None

    def _read_body(self, url: str, response: requests.Response) -> bytes:
        with response:
            if response.status_code >= 400:
                raise self._status_error(url, response.status_code)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise ImageFetchError(
                    self._too_large_message(_display(url)), url=_display(url), status=response.status_code
                )
            return self._read_capped(url, response.raw)

    def _read_capped(self, url: str, raw: urllib3.response.BaseHTTPResponse) -> bytes:
        """The decoded body, stopped at ``max_bytes`` and at the ``timeout`` deadline.

        ``read1`` returns whatever arrived (a slow sender cannot hold one read for long), so the deadline is
        checked often; each socket read is itself bounded by ``timeout``.
        """
        import urllib3

        read = raw.read1 if hasattr(raw, "read1") else raw.read  # read1: recent urllib3 2.x
        deadline = time.monotonic() + self.timeout
        body = bytearray()
        try:
            while chunk := read(_CHUNK, decode_content=True):
                body += chunk
                if len(body) > self.max_bytes:
                    raise ImageFetchError(self._too_large_message(_display(url)), url=_display(url))
                if time.monotonic() > deadline:
                    raise self._timeout_error(url)
        except urllib3.exceptions.ReadTimeoutError:
            raise self._timeout_error(url) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ImageFetchError(
                f"{_display(url)}: the download broke off ({type(exc).__name__})", url=_display(url)
            ) from None
        return bytes(body)

    def _check_target(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ImageFetchError(
                f"{_display(url)}: refused, only http(s) URLs are fetched (scheme {parts.scheme!r})", url=_display(url)
            )
        host = parts.hostname
        if not host:
            raise ImageFetchError(f"{_display(url)}: the URL has no host", url=_display(url))
        if self.allow_private or self._is_label_studio_host(url):
            return
        for ip in _resolve(host, parts.port or (443 if parts.scheme.lower() == "https" else 80), url):
            if not is_public_address(ip):
                raise ImageFetchError(
                    f"{_display(url)}: refused, host {host!r} resolves to {ip}, a private, loopback, link-local "
                    "or reserved address, and is not LABEL_STUDIO_URL's host; set "
                    "MASKCLIP_ALLOW_PRIVATE_URLS=true to allow",
                    url=_display(url),
                )

    # --- auth -----------------------------------------------------------------------------------------

    def auth_headers(self, url: str) -> dict[str, str]:
        """The ``Authorization`` header for ``url`` (empty unless it is Label Studio's origin)."""
        return self._headers(url)

    def refresh_auth(self) -> None:
        """Exchange the personal access token again (after a 401); no-op for a legacy token."""
        if self._api_key and self._is_pat():
            self._refresh_access(stale=True)

    def _headers(self, url: str) -> dict[str, str]:
        if not self._api_key or not self._is_label_studio(url):
            return {}
        if not self._is_pat():
            return {"Authorization": f"Token {self._api_key}"}
        with self._lock:
            access = self._access
        return {"Authorization": f"Bearer {access or self._refresh_access(stale=False)}"}

    def _is_pat(self) -> bool:
        # A personal access token is a JWT (header.payload.signature); a legacy token is 40 hex characters.
        return self._api_key.count(".") == 2

    def _refresh_access(self, *, stale: bool) -> str:
        """Exchange the personal access token for an access token (once per thread race)."""
        import requests

        with self._lock:
            if self._access and not stale:
                return self._access
            url = self.label_studio_url + "/api/token/refresh/"
            try:
                response = self._session.post(
                    url, json={"refresh": self._api_key}, timeout=self.timeout, allow_redirects=False
                )
            except requests.Timeout:
                raise self._timeout_error(url) from None
            except requests.RequestException as exc:
                raise ImageFetchError(
                    f"{url}: could not reach Label Studio to refresh the access token ({type(exc).__name__}); "
                    "check LABEL_STUDIO_URL",
                    url=url,
                ) from None
            with response:
                access = _json_field(response, "access") if response.status_code == 200 else None
            if not access:
                raise ImageFetchError(
                    f"POST {url} -> {response.status_code}: Label Studio did not accept LABEL_STUDIO_API_KEY as a "
                    "personal access token (expired or revoked? create a new one in Account & Settings, or use "
                    "a legacy token)",
                    url=url,
                    status=response.status_code,
                )
            self._access = access
            return access

    def _is_label_studio(self, url: str) -> bool:
        """Same origin (scheme, host, port) as LABEL_STUDIO_URL: the only place credentials go."""
        return bool(self.label_studio_url) and _origin(url) == _origin(self.label_studio_url)

    def _is_label_studio_host(self, url: str) -> bool:
        """Same host and port as LABEL_STUDIO_URL (either scheme): exempt from the private-address rule."""
        return bool(self.label_studio_url) and _origin(url)[1:] == _origin(self.label_studio_url)[1:]

    # --- messages -------------------------------------------------------------------------------------

    def _status_error(self, url: str, status: int) -> ImageFetchError:
        shown = _display(url)
        if status in (401, 403) and self._is_label_studio(url):
            hint = (
                "Label Studio refused the credentials; check LABEL_STUDIO_API_KEY (a legacy token or a personal "
                "access token of a user who can see the project)"
            )
            if not self._api_key:
                hint = "Label Studio needs credentials; set LABEL_STUDIO_API_KEY"
            if "/data/local-files" in url:
                hint += "; local files are served only under a Local Storage path of the project"
        elif status in (401, 403):
            hint = "the server refused access (an expired presigned URL, or a private bucket?)"
        elif status == 404:
            hint = "not found"
            if "/presign/" in url:
                hint += " (is a cloud storage matching this URI connected to the task's project?)"
            elif "/data/local-files" in url:
                hint += " (is the file under a Local Storage path of the project?)"
        elif status >= 500 and self._is_label_studio(url) and "/data/upload/" in url:
            hint = "Label Studio failed to serve the upload (LS 1.23 answers 500 for a missing upload file)"
        else:
            hint = "the server answered with an error"
        return ImageFetchError(f"{shown}: HTTP {status}, {hint}", url=shown, status=status)

    def _timeout_error(self, url: str) -> ImageFetchError:
        return ImageFetchError(
            f"{_display(url)}: timed out after {self.timeout:g} s (MASKCLIP_DOWNLOAD_TIMEOUT)", url=_display(url)
        )

    def _too_large_message(self, shown: str) -> str:
        return f"{shown}: larger than {self.max_bytes} bytes (MASKCLIP_MAX_DOWNLOAD_BYTES)"


def _resolve(host: str, port: int, url: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(f"{_display(url)}: cannot resolve host {host!r} ({exc})", url=_display(url)) from None
    return sorted({info[4][0] for info in infos})


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def _json_field(response: requests.Response, name: str) -> str | None:
    try:
        value = response.json().get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _display(url: str) -> str:
    """The URL for messages: data: URIs shortened, secret-looking query values (signatures) redacted."""
    if url[:5].lower() == "data:":
        return f"{url[:32]}... ({len(url)} characters)"
    base, question, query = url.partition("?")
    if not question:
        return url
    pairs = []
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        pairs.append(f"{key}=REDACTED" if equals and _SECRET_QUERY_KEY.search(key) else pair)
    return base + "?" + "&".join(pairs)
