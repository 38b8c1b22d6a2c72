"""Fetching a task's image: the URL in a task's ``data`` -> bytes, the way Label Studio's browser would.

The adapter around :mod:`.urls` (one parse of each URL, which addresses may be reached), :mod:`.auth`
(which requests carry Label Studio's credentials) and :mod:`.decode` (bytes -> pixels).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_to_bytes, urljoin

import numpy as np
import requests
import urllib3

from ..deadline import NO_DEADLINE, Deadline
from .auth import LabelStudioAuth
from .decode import PixelBudget, decode_image, image_pixels
from .errors import ImageError, ImageFetchError
from .urls import (
    CLOUD_SCHEMES,
    MEDIA_ROUTES,
    Target,
    display,
    is_media_route,
    is_public_address,
    parse_target,
    resolve,
)

if TYPE_CHECKING:  # requests is imported lazily: decoding does not need it
    import requests
    import urllib3

    from ..settings import Settings

__all__ = ["ImageFetcher"]

_MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")


class ImageFetcher:
    """Download a task's image by the URL in its ``data``, the way Label Studio's browser client would.

    - relative URLs resolve against ``label_studio_url`` and must be one of Label Studio's media routes
      (``/data/upload/...``, ``/data/local-files/?d=...``; see :data:`.urls.MEDIA_ROUTES`): a task cannot
      make the backend call Label Studio's API with its credentials. Cloud URIs (``s3://``, ``gs://``,
      ``gcs://``, ``azure-blob://``) go through Label Studio's ``GET /tasks/{task_id}/presign/?fileuri=<urlsafe
      base64>`` (a 303 to a presigned URL, or the bytes proxied when the storage has presign off); ``data:``
      URIs are decoded in place.
    - each URL is parsed once, as the HTTP client parses it (:func:`.urls.parse_target`); URLs that parsers
      read differently are refused. The address check, the credentials decision and the request use that
      parse.
    - requests to Label Studio's exact origin carry ``Authorization`` (see :mod:`.auth`); other hosts get no
      auth header. On Label Studio's host only the media routes are fetched.
    - every hop (redirects followed here, at most 5) must be http(s) and resolve only to public addresses,
      unless it is Label Studio's host and port or ``allow_private`` is set. A host is checked when the
      request is made; a DNS answer that changes between the check and the connection is not caught.
    - the body is streamed and capped at ``max_bytes``; ``timeout`` bounds each request in total, and an
      optional :class:`~labelstudio_maskclip.deadline.Deadline` (e.g. the end of a ``/predict``'s time
      budget) bounds the whole fetch, redirects included: a fetch that starts after it makes no request,
      one in flight is cut off at it ("deadline reached"). DNS resolution is not bounded by it.
    - error messages say what failed without quoting what the server sent; URLs in them are redacted
      (:func:`.urls.display`).

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
        pixel_budget: PixelBudget | None = None,
    ) -> None:
        self.pixel_budget = pixel_budget
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
            pixel_budget=PixelBudget(settings.max_pixels_in_flight),
        )

    def __repr__(self) -> str:  # never show the key
        return f"ImageFetcher(label_studio_url={display(self.label_studio_url)!r}, allow_private={self.allow_private})"

    # --- public ---------------------------------------------------------------------------------------

    def load(
        self,
        url: str,
        task_id: int | None = None,
        *,
        max_pixels: int,
        deadline: Deadline = NO_DEADLINE,
        hold_pixels: bool = False,
    ) -> np.ndarray:
        """Fetch and decode: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied (see :func:`decode_image`).

        With a ``pixel_budget``, decoding waits (until the deadline, or ``timeout``) while too many pixels are
        being decoded in this process. ``hold_pixels``: the returned array keeps its pixels reserved until it
        is freed (for callers that drop their arrays promptly: a caller holding many arrays while loading
        more would wait on itself until the deadline).
        """
        data = self.fetch(url, task_id, deadline=deadline)
        try:
            if self.pixel_budget is None:
                return decode_image(data, max_pixels=max_pixels)
            pixels = image_pixels(data, max_pixels=max_pixels)
            with self.pixel_budget.reserve(pixels, deadline.within(self.timeout)) as lease:
                array = decode_image(data, max_pixels=max_pixels)
                return lease.attach(array) if hold_pixels else array
        except ImageError as exc:
            raise type(exc)(f"{display(url)}: {exc}") from None

    def fetch(self, url: str, task_id: int | None = None, *, deadline: Deadline = NO_DEADLINE) -> bytes:
        """The bytes behind a task's image URL (see the class docstring for what URLs are accepted).

        ``deadline``: the :class:`~labelstudio_maskclip.deadline.Deadline` after which the fetch gives up with
        an :class:`ImageFetchError` saying "deadline reached" (none: only ``timeout`` per request).
        """
        url = url.strip()
        if deadline.expired():
            raise self._deadline_error(display(url), started=False)
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match else ""
        if scheme == "data":
            return self._decode_data_uri(url)
        if scheme in CLOUD_SCHEMES:
            return self._download(self._presign_target(url, task_id), deadline)
        if not scheme:
            return self._download(self._relative_target(url), deadline)
        if scheme not in ("http", "https"):
            raise ImageFetchError(
                f"{display(url)}: unsupported URL scheme {scheme!r}; use http(s), a Label Studio path, "
                f"a cloud storage URI ({', '.join(s + '://' for s in CLOUD_SCHEMES)}) or a data: URI",
                url=display(url),
            )
        return self._download(parse_target(url), deadline)

    # --- URL forms ------------------------------------------------------------------------------------

    def _label_studio(self, url: str) -> Target:
        if not self.label_studio_url:
            raise ImageFetchError(
                f"{display(url)} is relative to Label Studio: set LABEL_STUDIO_URL (the address this backend "
                "reaches Label Studio at, e.g. http://label-studio:8080)",
                url=display(url),
            )
        return self._auth.target

    def _relative_target(self, url: str) -> Target:
        base = self._label_studio(url)
        if url.startswith("//"):  # scheme-relative: another host, Label Studio's scheme
            return parse_target(f"{base.scheme}:{url}")
        target = parse_target(base.url.rstrip("/") + "/" + url.lstrip("/"))
        if not (self._auth.is_label_studio(target) and is_media_route(target, self._auth.base_path)):
            raise self._not_media_error(target)
        return target

    def _presign_target(self, uri: str, task_id: int | None) -> Target:
        if task_id is None or isinstance(task_id, bool) or not isinstance(task_id, int):
            raise ImageFetchError(
                f"{display(uri)}: a cloud storage URI is resolved by Label Studio per task, and no task id (an integer) was given",
                url=display(uri),
            )
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return self._relative_target(f"/tasks/{task_id}/presign/?fileuri={quote(fileuri)}")

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
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ImageFetchError(f"{display(url)}: invalid base64 in data: URI", url=display(url)) from None

    # --- HTTP -----------------------------------------------------------------------------------------

    def _download(self, target: Target, deadline: Deadline) -> bytes:
        refreshed = False
        for hop in range(_MAX_REDIRECTS + 1):
            self._check(target)
            if deadline.expired():
                raise self._deadline_error(target.display, started=hop > 0)
            response = self._get(target, deadline)
            if response.status_code in _REDIRECTS and response.headers.get("Location"):
                location = response.headers["Location"]
                response.close()
                target = parse_target(urljoin(target.url, location))
                continue
            if (
                response.status_code == 401
                and self._auth.is_pat
                and self._auth.is_label_studio(target)
                and not refreshed
            ):
                response.close()
                self._auth.refresh(stale=True)
                refreshed = True
                continue
            return self._read_body(target, response, deadline)
        raise ImageFetchError(f"{target.display}: more than {_MAX_REDIRECTS} redirects", url=target.display)

    def _get(self, target: Target, deadline: Deadline) -> requests.Response:
        left = deadline.remaining()
        timeout = self.timeout if left is None else max(0.001, min(self.timeout, left))
        try:
            return self._session.get(
                target.url,
                headers=self._auth.headers(target),
                stream=True,
                allow_redirects=False,
                timeout=timeout,
            )
        except requests.Timeout:
            if deadline.expired():
                raise self._deadline_error(target.display, started=True) from None
            raise self._timeout_error(target) from None
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"{target.display}: could not connect ({type(exc).__name__}); is the host up and reachable "
                "from this backend?",
                url=target.display,
            ) from None

    def _read_body(self, target: Target, response: requests.Response, deadline: Deadline) -> bytes:
        with response:
            if response.status_code >= 400:
                raise self._status_error(target, response.status_code)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise ImageFetchError(
                    self._too_large_message(target.display), url=target.display, status=response.status_code
                )
            return self._read_capped(target, response.raw, deadline)

    def _read_capped(self, target: Target, raw: urllib3.response.BaseHTTPResponse, deadline: Deadline) -> bytes:
        """The decoded body, stopped at ``max_bytes``, after ``timeout`` and at ``deadline``.

        ``read1`` returns whatever arrived (a slow sender cannot hold one read for long), so the time is
        checked often; each socket read is itself bounded by the time left when the request was made.
        """
        read = raw.read1 if hasattr(raw, "read1") else raw.read  # read1: recent urllib3 2.x
        own = time.monotonic() + self.timeout
        stop = min(own, deadline.at)
        body = bytearray()

        def late() -> ImageFetchError:
            if deadline.at <= own:
                return self._deadline_error(target.display, started=True)
            return self._timeout_error(target)

        try:
            while chunk := read(_CHUNK, decode_content=True):
                body += chunk
                if len(body) > self.max_bytes:
                    raise ImageFetchError(self._too_large_message(target.display), url=target.display)
                if time.monotonic() > stop:
                    raise late()
        except urllib3.exceptions.ReadTimeoutError:
            raise late() from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ImageFetchError(
                f"{target.display}: the download broke off ({type(exc).__name__})", url=target.display
            ) from None
        return bytes(body)

    def _check(self, target: Target) -> None:
        """Refuse a hop before connecting: Label Studio's host only on its media routes; other hosts only
        at public addresses (unless ``allow_private``)."""
        if self._auth.is_label_studio_host(target):
            if not is_media_route(target, self._auth.base_path):
                raise self._not_media_error(target)
            return
        if self.allow_private:
            return
        for ip in resolve(target):
            if not is_public_address(ip):
                raise ImageFetchError(
                    f"{target.display}: refused, host {target.host!r} resolves to {ip}, a private, loopback, "
                    "link-local or reserved address, and is not LABEL_STUDIO_URL's host; set "
                    "MASKCLIP_ALLOW_PRIVATE_URLS=true to allow",
                    url=target.display,
                )

    # --- auth -----------------------------------------------------------------------------------------

    def auth_headers(self, url: str) -> dict[str, str]:
        """The ``Authorization`` header for ``url`` (empty unless it is Label Studio's origin)."""
        return self._auth.headers(url)

    @property
    def uses_personal_access_token(self) -> bool:
        """True when the API key is a personal access token (refreshed for access tokens), False for a legacy one."""
        return self._auth.has_key and self._auth.is_pat

    def refresh_auth(self) -> None:
        """Exchange the personal access token again (after a 401); no-op for a legacy token."""
        if self._auth.has_key and self._auth.is_pat:
            self._auth.refresh(stale=True)

    # --- messages -------------------------------------------------------------------------------------

    def _not_media_error(self, target: Target) -> ImageFetchError:
        return ImageFetchError(
            f"{target.display}: refused, on Label Studio's host only its media routes are fetched "
            f"({', '.join(MEDIA_ROUTES)}); a task's image URL cannot point at other Label Studio pages or its API",
            url=target.display,
        )

    def _status_error(self, target: Target, status: int) -> ImageFetchError:
        shown, path = target.display, target.path
        if status in (401, 403) and self._auth.is_label_studio(target):
            hint = (
                "Label Studio refused the credentials; check LABEL_STUDIO_API_KEY (a legacy token or a personal "
                "access token of a user who can see the project)"
            )
            if not self._auth.has_key:
                hint = "Label Studio needs credentials; set LABEL_STUDIO_API_KEY"
            if "/data/local-files" in path:
                hint += "; local files are served only under a Local Storage path of the project"
        elif status in (401, 403):
            hint = "the server refused access (an expired presigned URL, or a private bucket?)"
        elif status == 404:
            hint = "not found"
            if "/presign" in path:
                hint += " (is a cloud storage matching this URI connected to the task's project?)"
            elif "/data/local-files" in path:
                hint += " (is the file under a Local Storage path of the project?)"
        elif status >= 500 and self._auth.is_label_studio(target) and "/data/upload/" in path:
            hint = "Label Studio failed to serve the upload (LS 1.23 answers 500 for a missing upload file)"
        else:
            hint = "the server answered with an error"
        return ImageFetchError(f"{shown}: HTTP {status}, {hint}", url=shown, status=status)

    def _timeout_error(self, target: Target) -> ImageFetchError:
        return ImageFetchError(
            f"{target.display}: timed out after {self.timeout:g} s (MASKCLIP_DOWNLOAD_TIMEOUT)", url=target.display
        )

    def _deadline_error(self, shown: str, *, started: bool) -> ImageFetchError:
        when = "before the download finished" if started else "before the download started"
        return ImageFetchError(f"{shown}: deadline reached {when} (the request's time budget ran out)", url=shown)

    def _too_large_message(self, shown: str) -> str:
        return f"{shown}: larger than {self.max_bytes} bytes (MASKCLIP_MAX_DOWNLOAD_BYTES)"
