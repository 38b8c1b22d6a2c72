"""A small Label Studio REST client for the bulk commands (pre-annotation, backfill, export).

Authentication is the image fetcher's (legacy token or personal access token, see :mod:`.images`), so
there is one implementation of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..settings import Settings
from .images import ImageFetcher

__all__ = ["LabelStudioAPI", "LabelStudioAPIError"]


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; the message names the call and the status (also ``.status``)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LabelStudioAPI:
    def __init__(self, fetcher: ImageFetcher, timeout: float = 60.0):
        if not fetcher.label_studio_url:
            raise LabelStudioAPIError("set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) to talk to Label Studio")
        self.fetcher = fetcher
        self.url = fetcher.label_studio_url
        self.timeout = timeout
        import requests

        self.session = requests.Session()

    @classmethod
    def from_settings(cls, settings: Settings) -> LabelStudioAPI:
        return cls(ImageFetcher.from_settings(settings))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON of ``method path``; one retry after refreshing a personal access token on 401."""
        import requests

        url = self.url + path
        for attempt in (0, 1):
            try:
                r = self.session.request(
                    method, url, headers=self.fetcher.auth_headers(url), timeout=self.timeout, **kwargs
                )
            except requests.RequestException as e:
                raise LabelStudioAPIError(f"{method} {url}: {type(e).__name__}: is LABEL_STUDIO_URL right?") from e
            if r.status_code == 401 and attempt == 0:
                self.fetcher.refresh_auth()
                continue
            break
        if r.status_code >= 400:
            hint = " (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403) else ""
            raise LabelStudioAPIError(f"{method} {path} -> {r.status_code}{hint}: {r.text[:300]}", r.status_code)
        return r.json() if r.content else None

    def project(self, project_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/projects/{project_id}")

    def tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every task of the project with its annotations and predictions, page by page."""
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size, "fields": "all"}
            try:
                body = self.request("GET", "/api/tasks", params=params)
            except LabelStudioAPIError as e:
                if e.status == 404 and page > 1:  # past the last page
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            if not tasks:
                return
            yield from tasks
            total = body.get("total") if isinstance(body, dict) else None
            if total is not None and page * page_size >= total:
                return
            page += 1

    def create_prediction(self, task_id: int, prediction: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/predictions", json={"task": task_id, **prediction})
