"""Fetching a task's image: the URL in a task's ``data`` -> bytes, the way Label Studio's browser would.

The adapter around :mod:`.urls` (which addresses may be reached), :mod:`.auth` (which requests carry Label
Studio's credentials) and :mod:`.decode` (bytes -> pixels).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

import numpy as np

from .auth import LabelStudioAuth
from .decode import decode_image
from .errors import ImageError, ImageFetchError
from .urls import CLOUD_SCHEMES, display, is_public_address, resolve

if TYPE_CHECKING:  # requests is imported lazily: decoding does not need it
    import requests
    import urllib3

    from ..settings import Settings

__all__ = ["ImageFetcher"]

_MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


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
        self._session = session if session is not None else requests.Session()
        self._auth = LabelStudioAuth(self.label_studio_url, api_key, self._session, timeout)

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
            raise type(exc)(f"{display(url)}: {exc}") from None

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
                f"{display(url)}: unsupported URL scheme {scheme!r}; use http(s), a Label Studio path, "
                f"a cloud storage URI ({', '.join(s + '://' for s in CLOUD_SCHEMES)}) or a data: URI",
                url=display(url),
            )
        return self._download(url)

    # --- URL forms ------------------------------------------------------------------------------------

    def _absolute(self, url: str) -> str:
        if not self.label_studio_url:
            raise ImageFetchError(
                f"{display(url)} is relative to Label Studio: set LABEL_STUDIO_URL (the address this backend "
                "reaches Label Studio at, e.g. http://label-studio:8080)",
                url=display(url),
            )
        if url.startswith("//"):
            return urljoin(self.label_studio_url + "/", url)
        return self.label_studio_url + "/" + url.lstrip("/")

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise ImageFetchError(
                f"{display(uri)}: a cloud storage URI is resolved by Label Studio per task, and no task id was given",
                url=display(uri),
            )
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return self._absolute(f"/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri)}")

    def _decode_data_uri(self, url: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma:
            raise ImageFetchError(f"{display(url)}: a data: URI without a comma", url=display(url))
        if len(payload) * 3 // 4 > self.max_bytes:
            raise ImageFetchError(self._too_large_message(display(url)), url=display(url))
        try:
            if header.lower().endswith(";base64"):
                compact = re.sub(r"\s+", "", unquote_to_bytes(payload).decode("ascii"))
                return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
            return unquote_to_bytes(payload)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise ImageFetchError(f"{display(url)}: invalid base64 in data: URI ({exc})", url=display(url)) from None

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
            if response.status_code == 401 and self._auth.is_pat and self._auth.is_label_studio(url) and not refreshed:
                response.close()
                self._auth.refresh(stale=True)
                refreshed = True
                continue
            return self._read_body(url, response)
        raise ImageFetchError(f"{display(url)}: more than {_MAX_REDIRECTS} redirects", url=display(url))

    def _get(self, url: str) -> requests.Response:
        import requests

        try:
            return self._session.get(
                url, headers=self._auth.headers(url), stream=True, allow_redirects=False, timeout=self.timeout
            )
        except requests.Timeout:
            raise self._timeout_error(url) from None
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"{display(url)}: could not connect ({type(exc).__name__}); is the host up and reachable "
                "from this backend?",
                url=display(url),
            ) from None

    def _read_body(self, url: str, response: requests.Response) -> bytes:
        with response:
            if response.status_code >= 400:
                raise self._status_error(url, response.status_code)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise ImageFetchError(
                    self._too_large_message(display(url)), url=display(url), status=response.status_code
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
                    raise ImageFetchError(self._too_large_message(display(url)), url=display(url))
                if time.monotonic() > deadline:
                    raise self._timeout_error(url)
        except urllib3.exceptions.ReadTimeoutError:
            raise self._timeout_error(url) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ImageFetchError(
                f"{display(url)}: the download broke off ({type(exc).__name__})", url=display(url)
            ) from None
        return bytes(body)

    def _check_target(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ImageFetchError(
                f"{display(url)}: refused, only http(s) URLs are fetched (scheme {parts.scheme!r})", url=display(url)
            )
        host = parts.hostname
        if not host:
            raise ImageFetchError(f"{display(url)}: the URL has no host", url=display(url))
        if self.allow_private or self._auth.is_label_studio_host(url):
            return
        for ip in resolve(host, parts.port or (443 if parts.scheme.lower() == "https" else 80), url):
            if not is_public_address(ip):
                raise ImageFetchError(
                    f"{display(url)}: refused, host {host!r} resolves to {ip}, a private, loopback, link-local "
                    "or reserved address, and is not LABEL_STUDIO_URL's host; set "
                    "MASKCLIP_ALLOW_PRIVATE_URLS=true to allow",
                    url=display(url),
                )

    # --- auth -----------------------------------------------------------------------------------------

    def auth_headers(self, url: str) -> dict[str, str]:
        """The ``Authorization`` header for ``url`` (empty unless it is Label Studio's origin)."""
        return self._auth.headers(url)

    def refresh_auth(self) -> None:
        """Exchange the personal access token again (after a 401); no-op for a legacy token."""
        if self._auth.has_key and self._auth.is_pat:
            self._auth.refresh(stale=True)

    # --- messages -------------------------------------------------------------------------------------

    def _status_error(self, url: str, status: int) -> ImageFetchError:
        shown = display(url)
        if status in (401, 403) and self._auth.is_label_studio(url):
            hint = (
                "Label Studio refused the credentials; check LABEL_STUDIO_API_KEY (a legacy token or a personal "
                "access token of a user who can see the project)"
            )
            if not self._auth.has_key:
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
        elif status >= 500 and self._auth.is_label_studio(url) and "/data/upload/" in url:
            hint = "Label Studio failed to serve the upload (LS 1.23 answers 500 for a missing upload file)"
        else:
            hint = "the server answered with an error"
        return ImageFetchError(f"{shown}: HTTP {status}, {hint}", url=shown, status=status)

    def _timeout_error(self, url: str) -> ImageFetchError:
        return ImageFetchError(
            f"{display(url)}: timed out after {self.timeout:g} s (MASKCLIP_DOWNLOAD_TIMEOUT)", url=display(url)
        )

    def _too_large_message(self, shown: str) -> str:
        return f"{shown}: larger than {self.max_bytes} bytes (MASKCLIP_MAX_DOWNLOAD_BYTES)"
