"""Label Studio's credentials: which requests carry them, and the personal access token exchange.

``LABEL_STUDIO_API_KEY`` is either a legacy token (40 hex characters, sent as ``Authorization: Token
<key>``) or a personal access token (a JWT refresh token, exchanged at ``POST /api/token/refresh/`` for an
access token sent as ``Authorization: Bearer <access>``, cached and exchanged again after a 401).
Credentials go to Label Studio's exact origin (scheme, host and port of ``LABEL_STUDIO_URL``, compared on
the :class:`~.urls.Target` the request is made with) and nowhere else.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import requests

from .errors import ImageFetchError
from .urls import Target, display, parse_target

if TYPE_CHECKING:
    import requests

__all__ = ["LabelStudioAuth"]


class LabelStudioAuth:
    """The ``Authorization`` header for requests to Label Studio. Safe to share between threads.

    ``label_studio_url`` is parsed once; when it is not a valid http(s) URL, no request gets credentials
    and :attr:`target` raises the reason.
    """

    def __init__(self, label_studio_url: str, api_key: str, session: requests.Session, timeout: float) -> None:
        self.label_studio_url = label_studio_url.strip().rstrip("/")
        self._api_key = api_key.strip()
        self._session = session
        self._timeout = timeout
        self._access: str | None = None  # cached access token for a personal access token
        self._lock = threading.Lock()
        self._target: Target | None = None
        self._error: ImageFetchError | None = None
        if self.label_studio_url:
            try:
                self._target = parse_target(self.label_studio_url)
            except ImageFetchError as exc:
                self._error = ImageFetchError(f"LABEL_STUDIO_URL {exc}", url=exc.url)

    def __repr__(self) -> str:  # never show the key
        return f"LabelStudioAuth(label_studio_url={display(self.label_studio_url)!r})"

    @property
    def target(self) -> Target:
        """LABEL_STUDIO_URL parsed (raises :class:`ImageFetchError` when unset or invalid)."""
        if self._target is None:
            raise self._error or ImageFetchError("LABEL_STUDIO_URL is not set")
        return self._target

    @property
    def base_path(self) -> str:
        """The path Label Studio is served under ('' at the root)."""
        return self._target.path.rstrip("/") if self._target is not None else ""

    @property
    def has_key(self) -> bool:
        return bool(self._api_key)

    @property
    def is_pat(self) -> bool:
        """A personal access token is a JWT (header.payload.signature); a legacy token is 40 hex characters."""
        return self._api_key.count(".") == 2

    def is_label_studio(self, target: Target) -> bool:
        """Same origin (scheme, host, port) as LABEL_STUDIO_URL: the only place credentials go."""
        return self._target is not None and target.origin == self._target.origin

    def is_label_studio_host(self, target: Target) -> bool:
        """Same host and port as LABEL_STUDIO_URL (either scheme)."""
        return self._target is not None and target.origin[1:] == self._target.origin[1:]

    def headers(self, target: Target | str) -> dict[str, str]:
        """The ``Authorization`` header for a request to ``target`` (empty unless Label Studio's origin)."""
        if isinstance(target, str):
            try:
                target = parse_target(target)
            except ImageFetchError:
                return {}
        if not self._api_key or not self.is_label_studio(target):
            return {}
        if not self.is_pat:
            return {"Authorization": f"Token {self._api_key}"}
        with self._lock:
            access = self._access
        return {"Authorization": f"Bearer {access or self.refresh(stale=False)}"}

    def refresh(self, *, stale: bool) -> str:
        """Exchange the personal access token for an access token (once per thread race)."""
        with self._lock:
            if self._access and not stale:
                return self._access
            url = self.target.url.rstrip("/") + "/api/token/refresh/"
            shown = display(url)
            try:
                response = self._session.post(
                    url, json={"refresh": self._api_key}, timeout=self._timeout, allow_redirects=False
                )
            except requests.Timeout:
                raise ImageFetchError(
                    f"{shown}: timed out after {self._timeout:g} s refreshing the access token "
                    "(MASKCLIP_DOWNLOAD_TIMEOUT)",
                    url=shown,
                ) from None
            except requests.RequestException as exc:
                raise ImageFetchError(
                    f"{shown}: could not reach Label Studio to refresh the access token ({type(exc).__name__}); "
                    "check LABEL_STUDIO_URL",
                    url=shown,
                ) from None
            with response:
                access = _json_field(response, "access") if response.status_code == 200 else None
            if not access:
                raise ImageFetchError(
                    f"POST {shown} -> {response.status_code}: Label Studio did not accept LABEL_STUDIO_API_KEY as a "
                    "personal access token (expired or revoked? create a new one in Account & Settings, or use "
                    "a legacy token)",
                    url=shown,
                    status=response.status_code,
                )
            self._access = access
            return access


def _json_field(response: requests.Response, name: str) -> str | None:
    try:
        value = response.json().get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
