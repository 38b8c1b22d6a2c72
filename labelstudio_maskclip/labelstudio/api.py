"""The Label Studio REST calls of the bulk commands (pre-annotation, re-scoring, backfill, export).

Authentication is the image fetcher's (legacy token or personal access token, see :mod:`.images`), so
there is one implementation of it. Why plain HTTP and not ``label-studio-sdk``'s client: its JSON encoder
walks every integer of a brush RLE (bulk import of brush predictions several times slower), it retries
POSTs on 5xx and connection errors (which duplicates a bulk import that was applied), and its task pager
pages by offset (which skips tasks when the filtered set shrinks while predictions are written). The
README's "Active learning" section has the figures.

Retries: reads (GET) are retried on connection errors and 5xx with exponential backoff. Writes are
retried only when the request surely never reached Label Studio (the connection was refused or could not
be opened); any other failure of a write raises :class:`AmbiguousWriteError` so the caller can check what
was applied before sending anything again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..fetching.images import ImageFetcher
from ..settings import Settings
from .wire import json_bytes

__all__ = ["LabelStudioAPI", "LabelStudioAPIError", "AmbiguousWriteError", "task_filter", "model_versions_of"]

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({500, 502, 503, 504})


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; the message names the call and the status (also ``.status``)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AmbiguousWriteError(LabelStudioAPIError):
    """A write failed in a way that does not say whether Label Studio applied it (a 5xx, a timeout or a
    connection lost after sending): never resend it blindly."""


def task_filter(
    *, after_id: int = 0, without_version: str | None = None, with_version: str | None = None, unlabeled: bool = False
) -> dict[str, Any]:
    """A Data Manager ``query`` for ``GET /api/tasks``: tasks with ``id > after_id``, ordered by id
    (keyset paging, which stays right while the set shrinks), optionally only those without (or with) a
    prediction of ``without_version`` (``with_version``; substring matches on Label Studio's side) and only
    those without annotations."""
    items: list[dict[str, Any]] = [
        {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": int(after_id)}
    ]
    for operator, version in (("not_contains", without_version), ("contains", with_version)):
        if version:
            items.append({"filter": "filter:tasks:predictions_model_versions", "operator": operator,
                          "type": "List", "value": [version]})  # fmt: skip
    if unlabeled:
        items.append({"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0})
    return {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}


def prediction_score(task: Mapping[str, Any], version: str | None) -> float | None:
    """The score of a task's prediction of ``version`` (``None``: of its newest prediction with a score),
    from a task listed with ``fields=all``; ``None`` when it has no such prediction."""
    preds = [p for p in task.get("predictions") or [] if isinstance(p, Mapping)]
    scored = [p for p in preds if isinstance(p.get("score"), (int, float)) and not isinstance(p.get("score"), bool)]
    if version is not None:
        scored = [p for p in scored if str(p.get("model_version")) == version]
    if not scored:
        return None
    return float(max(scored, key=lambda p: int(p.get("id") or 0))["score"])


def model_versions_of(task: Mapping[str, Any]) -> list[str]:
    """Model versions of a task's predictions, from a task listed with ``fields=all`` (its
    ``predictions`` inline). Light listings do not carry them: Label Studio 1.23 answers
    ``predictions_model_versions`` with an empty string unless it filters on it."""
    return [str(p.get("model_version")) for p in task.get("predictions") or [] if isinstance(p, Mapping)]


def _never_sent(error: Exception) -> bool:
    """True when a requests exception happened before the request could reach the server."""
    import requests

    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(error, requests.exceptions.ConnectionError):
        text = repr(error)
        return "NewConnectionError" in text or "Connection refused" in text or "Failed to resolve" in text
    return False


class LabelStudioAPI:
    def __init__(self, fetcher: ImageFetcher, timeout: float = 120.0, retries: int = 5, backoff: float = 0.5):
        if not fetcher.label_studio_url:
            raise LabelStudioAPIError("set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) to talk to Label Studio")
        self.fetcher = fetcher
        self.url = fetcher.label_studio_url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        import requests
        from requests.adapters import HTTPAdapter

        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @classmethod
    def from_settings(cls, settings: Settings) -> LabelStudioAPI:
        return cls(ImageFetcher.from_settings(settings))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON of ``method path``. Retries as the module docstring says; one more try after refreshing a
        personal access token on 401."""
        import requests

        url = self.url + path
        extra_headers = kwargs.pop("headers", None) or {}
        write = method.upper() not in ("GET", "HEAD", "OPTIONS")
        refreshed = False
        attempt = 0
        while True:
            try:
                r = self.session.request(
                    method,
                    url,
                    headers={**extra_headers, **self.fetcher.auth_headers(url)},
                    timeout=self.timeout,
                    **kwargs,
                )
            except requests.RequestException as e:
                if attempt < self.retries and (not write or _never_sent(e)):
                    attempt += 1
                    self._wait(attempt, f"{method} {path}: {type(e).__name__}")
                    continue
                cls = AmbiguousWriteError if write and not _never_sent(e) else LabelStudioAPIError
                raise cls(f"{method} {url}: {type(e).__name__}: is LABEL_STUDIO_URL right? ({e})") from e
            if r.status_code == 401 and not refreshed:
                refreshed = True
                self.fetcher.refresh_auth()
                continue
            if r.status_code in RETRY_STATUS:
                if not write and attempt < self.retries:
                    attempt += 1
                    self._wait(attempt, f"{method} {path} -> {r.status_code}")
                    continue
                if write:
                    raise AmbiguousWriteError(f"{method} {path} -> {r.status_code}: {r.text[:300]}", r.status_code)
            break
        if r.status_code >= 400:
            hint = " (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403) else ""
            raise LabelStudioAPIError(f"{method} {path} -> {r.status_code}{hint}: {r.text[:300]}", r.status_code)
        return r.json() if r.content else None

    def _wait(self, attempt: int, what: str) -> None:
        delay = self.backoff * 2 ** (attempt - 1)
        log.warning("%s; retry %d/%d in %.1f s", what, attempt, self.retries, delay)
        time.sleep(delay)

    # -- reads ---------------------------------------------------------------------------------------
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

    def task_pages(
        self,
        project_id: int,
        *,
        include: Sequence[str] = ("id", "data"),
        without_version: str | None = None,
        with_version: str | None = None,
        unlabeled: bool = False,
        page_size: int = 500,
        after_id: int = 0,
        full: bool = False,
    ) -> Iterator[list[dict[str, Any]]]:
        """Pages of the project's tasks in id order with only the ``include`` fields (light: no predictions
        or annotations inline; ``full``: every field, predictions included), filtered as
        :func:`task_filter` says. Keyset paging (``id > last``) so tasks predicted meanwhile do not shift
        the pages."""
        fields = ",".join(dict.fromkeys(["id", *include]))
        while True:
            query = task_filter(after_id=after_id, without_version=without_version, with_version=with_version,
                                unlabeled=unlabeled)  # fmt: skip
            params = {"project": project_id, "page": 1, "page_size": page_size, "query": json.dumps(query)}
            params.update({"fields": "all"} if full else {"fields": "task_only", "include": fields})
            try:
                body = self.request("GET", "/api/tasks", params=params)
            except LabelStudioAPIError as e:
                if e.status == 404:  # an empty result set answers 404 for page 1 on some versions
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            if not tasks:
                return
            yield tasks
            after_id = max(int(t["id"]) for t in tasks)
            if len(tasks) < page_size:
                return

    def count_tasks(self, project_id: int, **filters: Any) -> int:
        """How many tasks match :func:`task_filter`'s ``filters`` (one light request)."""
        query = task_filter(**filters)
        params = {"project": project_id, "page": 1, "page_size": 1, "fields": "task_only", "include": "id",
                  "query": json.dumps(query)}  # fmt: skip
        try:
            body = self.request("GET", "/api/tasks", params=params)
        except LabelStudioAPIError as e:
            if e.status == 404:
                return 0
            raise
        return int(body.get("total", len(body.get("tasks", [])))) if isinstance(body, dict) else len(body)

    def model_versions(self, project_id: int) -> list[str]:
        """Model versions of the project's predictions (``GET /api/projects/{id}/model-versions``)."""
        body = self.request("GET", f"/api/projects/{project_id}/model-versions")
        if isinstance(body, Mapping):  # {version: count} (1.x), or {"static": [...], "live": [...]}
            if all(isinstance(v, int) for v in body.values()):
                return [str(k) for k in body]
            return [str(x) for v in body.values() if isinstance(v, list) for x in v]
        return [str(v) for v in body or []]

    def next_tasks(self, project_id: int, n: int, version: str | None = None) -> list[dict[str, Any]]:
        """The ``n`` unlabeled tasks to label next, lowest score first (ties by id), each as ``{"id", "data",
        "predictions_score"}``. The score is that of the task's prediction of ``version`` (``None``: of its
        newest scored prediction, whatever its version); tasks without one are left out. Ranked here, not by
        Label Studio's ``predictions_score``, which averages only the project's ``model_version``: after
        *Connect Model* that holds the backend's title, which no prediction carries. Reads the unlabeled
        tasks' predictions in pages of 100."""
        ranked: list[dict[str, Any]] = []
        for tasks in self.task_pages(project_id, with_version=version, unlabeled=True, page_size=100, full=True):
            for t in tasks:
                score = prediction_score(t, version)
                if score is not None:
                    ranked.append({"id": int(t["id"]), "data": t.get("data"), "predictions_score": score})
        ranked.sort(key=lambda t: (t["predictions_score"], t["id"]))
        return ranked[:n]

    def versions_of(self, project_id: int, task_ids: Sequence[int]) -> dict[int, list[str]]:
        """Model versions of the predictions each of ``task_ids`` has (tasks that no longer exist are
        absent). Reads the tasks with every field: for checks after a failed write, not for listing."""
        out: dict[int, list[str]] = {}
        ids = [int(t) for t in task_ids]
        for i in range(0, len(ids), 100):
            chunk = ids[i : i + 100]
            query = {"selectedItems": {"all": False, "included": chunk}}
            params = {"project": project_id, "page": 1, "page_size": len(chunk), "fields": "all",
                      "query": json.dumps(query)}  # fmt: skip
            body = self.request("GET", "/api/tasks", params=params)
            for t in body.get("tasks", []):
                out[int(t["id"])] = model_versions_of(t)
        return out

    def duplicated_predictions(self, project_id: int, version: str) -> dict[int, list[int]]:
        """Tasks with more than one prediction of ``version``: task id -> those predictions' ids, oldest
        first. One light query for the tasks with several predictions that contain ``version``, then those
        tasks read in full."""
        items = [
            {"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 1},
            {"filter": "filter:tasks:predictions_model_versions", "operator": "contains", "type": "List",
             "value": [version]},
        ]  # fmt: skip
        query = {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}
        out: dict[int, list[int]] = {}
        for page in self._pages(project_id, query):
            for t in page:
                ids = sorted(int(p["id"]) for p in t.get("predictions") or []
                             if isinstance(p, Mapping) and p.get("model_version") == version)  # fmt: skip
                if len(ids) > 1:
                    out[int(t["id"])] = ids
        return out

    def _pages(self, project_id: int, query: dict[str, Any], page_size: int = 100) -> Iterator[list[dict[str, Any]]]:
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size, "fields": "all",
                      "query": json.dumps(query)}  # fmt: skip
            try:
                body = self.request("GET", "/api/tasks", params=params)
            except LabelStudioAPIError as e:
                if e.status == 404:
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            if not tasks:
                return
            yield tasks
            if len(tasks) < page_size:
                return
            page += 1

    def delete_prediction(self, prediction_id: int) -> None:
        """``DELETE /api/predictions/{id}``; one already gone counts as deleted."""
        try:
            self.request("DELETE", f"/api/predictions/{int(prediction_id)}")
        except LabelStudioAPIError as e:
            if e.status != 404:
                raise

    def set_live_version(self, project_id: int, version: str) -> bool:
        """Make ``version`` the project's live model version (*Settings -> Model*), which Label Studio's
        *Prediction score* column averages, unless the project has chosen another model: only an empty
        setting or one of this backend's versions (``maskclip...``) is replaced. True if it changed."""
        current = self.project(project_id).get("model_version") or ""
        if current == version or (current and not current.startswith("maskclip")):
            return False
        self.request("PATCH", f"/api/projects/{project_id}", json={"model_version": version})
        return True

    # -- writes --------------------------------------------------------------------------------------
    def create_prediction(self, task_id: int, prediction: dict[str, Any]) -> dict[str, Any]:
        """One prediction (``POST /api/predictions``, about 90 ms of Label Studio's time per call)."""
        return self.request("POST", "/api/predictions", json={"task": task_id, **prediction})

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> int:
        """Bulk write (``POST /api/projects/{id}/import/predictions``): each item ``{"task", "result",
        "score", "model_version"}``. Returns how many Label Studio created (it drops invalid ones without
        saying which). One unknown task id fails the whole request (400, nothing written); a 5xx or a
        lost connection raises :class:`AmbiguousWriteError`."""
        body = self.request(
            "POST",
            f"/api/projects/{project_id}/import/predictions",
            data=json_bytes(list(predictions)),
            headers={"Content-Type": "application/json"},
        )
        return int((body or {}).get("created", 0))
