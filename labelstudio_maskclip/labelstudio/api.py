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

import requests
from requests.adapters import HTTPAdapter

from ..errors import Unavailable
from ..fetching.images import ImageFetcher
from ..settings import Settings
from .wire import json_bytes

__all__ = ["LabelStudioAPI", "LabelStudioAPIError", "AmbiguousWriteError", "task_filter", "model_versions_of"]

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({500, 502, 503, 504})


class LabelStudioAPIError(Unavailable):
    """A Label Studio API call failed; the message names the call and the status (also ``.status``)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class AmbiguousWriteError(LabelStudioAPIError):
    """A write failed in a way that does not say whether Label Studio applied it (a 5xx, a timeout or a
    connection lost after sending): never resend it blindly."""


def task_filter(
    *,
    after_id: int = 0,
    without_version: str | None = None,
    with_version: str | None = None,
    unlabeled: bool = False,
    predicted: bool = False,
) -> dict[str, Any]:
    """A Data Manager ``query`` for ``GET /api/tasks``: tasks with ``id > after_id``, ordered by id
    (keyset paging, which stays right while the set shrinks), optionally only those without (or with) a
    prediction of ``without_version`` (``with_version``; substring matches on Label Studio's side), only
    those without annotations, and only those with a prediction (``predicted``)."""
    items: list[dict[str, Any]] = [
        {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": int(after_id)}
    ]
    if predicted:
        items.append({"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 0})
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
        predicted: bool = False,
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
                                unlabeled=unlabeled, predicted=predicted)  # fmt: skip
            params = {"project": project_id, "page": 1, "page_size": page_size, "query": json.dumps(query)}
            params.update({"fields": "all"} if full else {"fields": "task_only", "include": fields})
            tasks = self._tasks_page(params)
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
        newest scored prediction, whatever its version); tasks without one are left out.

        When ``version`` is the project's live model version, Label Studio's own ``predictions_score`` (the
        average score of that version's predictions) ranks the tasks and only the first ones are read
        (:meth:`_next_by_live_score`). Otherwise (after *Connect Model* the live version holds the backend's
        title, which no prediction carries) the unlabeled tasks with such a prediction are read with their
        predictions, in pages of 100, and ranked here."""
        if version is not None and n > 0 and self.project(project_id).get("model_version") == version:
            ranked = self._next_by_live_score(project_id, n, version)
            if ranked is not None:
                return ranked
        ranked = []
        for tasks in self.task_pages(project_id, with_version=version, unlabeled=True, predicted=True, page_size=100,
                                     full=True):  # fmt: skip
            for t in tasks:
                score = prediction_score(t, version)
                if score is not None:
                    ranked.append({"id": int(t["id"]), "data": t.get("data"), "predictions_score": score})
        ranked.sort(key=lambda t: (t["predictions_score"], t["id"]))
        return ranked[:n]

    def _next_by_live_score(self, project_id: int, n: int, version: str) -> list[dict[str, Any]] | None:
        """:meth:`next_tasks` from light pages ordered by Label Studio's ``predictions_score`` (ties at the
        ``n``-th score read to the end, then by id). The chosen tasks' predictions are read to check that
        Label Studio averaged ``version`` alone (a feature flag makes it average the connected backends'
        versions instead); None when it did not, or when a task has several predictions of it."""
        query = task_filter(with_version=version, unlabeled=True)
        query["ordering"] = ["tasks:predictions_score"]  # ascending, tasks without a score last
        ranked: list[dict[str, Any]] = []
        size = max(n, 10) + 1
        for page in self._pages(project_id, query, page_size=size, full=False):
            scored = [t for t in page if isinstance(t.get("predictions_score"), (int, float))]
            ranked += [{"id": int(t["id"]), "data": t.get("data"), "predictions_score": float(t["predictions_score"])}
                       for t in scored]  # fmt: skip
            if len(scored) < len(page) or (len(ranked) > n and ranked[-1]["predictions_score"] > ranked[n - 1][
                    "predictions_score"]):  # fmt: skip
                break
        ranked = sorted({t["id"]: t for t in ranked}.values(), key=lambda t: (t["predictions_score"], t["id"]))[:n]
        full = self.tasks_by_id(project_id, [t["id"] for t in ranked])
        for t in ranked:
            task = full.get(t["id"])
            mine = [p for p in (task or {}).get("predictions") or [] if str(p.get("model_version")) == version]
            score = prediction_score(task, version) if task is not None else None
            if len(mine) != 1 or score is None or abs(score - t["predictions_score"]) > 1e-6:
                log.info("project %s: Label Studio's predictions_score is not %s's alone; reading every task",
                         project_id, version)  # fmt: skip
                return None
        return ranked

    def tasks_by_id(self, project_id: int, task_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """The tasks ``task_ids`` of the project with every field (predictions inline), by id; tasks that no
        longer exist are absent."""
        out: dict[int, dict[str, Any]] = {}
        ids = [int(t) for t in task_ids]
        for i in range(0, len(ids), 100):
            chunk = ids[i : i + 100]
            query = {"selectedItems": {"all": False, "included": chunk}}
            params = {"project": project_id, "page": 1, "page_size": len(chunk), "fields": "all",
                      "query": json.dumps(query)}  # fmt: skip
            body = self.request("GET", "/api/tasks", params=params)
            out.update({int(t["id"]): t for t in body.get("tasks", [])})
        return out

    def versions_of(self, project_id: int, task_ids: Sequence[int]) -> dict[int, list[str]]:
        """Model versions of the predictions each of ``task_ids`` has (tasks that no longer exist are
        absent). Reads the tasks with every field: for checks after a failed write, not for listing."""
        return {t: model_versions_of(task) for t, task in self.tasks_by_id(project_id, task_ids).items()}

    def duplicated_predictions(self, project_id: int, version: str) -> dict[int, list[int]]:
        """Tasks with more than one prediction of ``version``: task id -> those predictions' ids, oldest
        first. Light pages of the tasks with several predictions that contain ``version`` say which may have
        a version twice (:meth:`_maybe_duplicated`); only those are read in full."""
        items = [
            {"filter": "filter:tasks:total_predictions", "operator": "greater", "type": "Number", "value": 1},
            {"filter": "filter:tasks:predictions_model_versions", "operator": "contains", "type": "List",
             "value": [version]},
        ]  # fmt: skip
        query = {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}
        candidates = self._maybe_duplicated(project_id, query)
        if candidates is None:  # the light listing cannot tell: every such task in full
            tasks = [t for page in self._pages(project_id, query) for t in page]
        else:
            tasks = list(self.tasks_by_id(project_id, candidates).values())
        out: dict[int, list[int]] = {}
        for t in tasks:
            ids = sorted(int(p["id"]) for p in t.get("predictions") or []
                         if isinstance(p, Mapping) and p.get("model_version") == version)  # fmt: skip
            if len(ids) > 1:
                out[int(t["id"])] = ids
        return out

    def _maybe_duplicated(self, project_id: int, query: dict[str, Any]) -> list[int] | None:
        """Ids of the tasks ``query`` selects that may carry some model version twice: more predictions
        (``total_predictions``) than distinct versions in Label Studio's ``predictions_model_versions`` (the
        versions it lists, deduplicated and cut at 500 characters, for tasks filtered on them). None when
        that cannot be told apart: a version of the project contains a comma (the list's separator), or the
        project's versions could not be read."""
        try:
            if any("," in v for v in self.model_versions(project_id)):
                return None
        except LabelStudioAPIError:
            return None
        out = []
        for page in self._pages(project_id, query, page_size=500, full=False):
            for t in page:
                listed, total = t.get("predictions_model_versions"), t.get("total_predictions")
                if not isinstance(listed, str) or not isinstance(total, int) or len(listed) >= 400:
                    out.append(int(t["id"]))
                elif total > len({v.strip() for v in listed.split(",") if v.strip()}):
                    out.append(int(t["id"]))
        return out

    def _pages(
        self, project_id: int, query: dict[str, Any], page_size: int = 100, full: bool = True
    ) -> Iterator[list[dict[str, Any]]]:
        """Pages of the tasks ``query`` selects, by page number, with every field (``full``) or none inline."""
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size, "fields": "all" if full else
                      "task_only", "query": json.dumps(query)}  # fmt: skip
            tasks = self._tasks_page(params)
            if not tasks:
                return
            yield tasks
            if len(tasks) < page_size:
                return
            page += 1

    def _tasks_page(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """One page of ``GET /api/tasks`` with ``params``: its tasks, [] past the last page (some versions
        answer page 1 of an empty result set with 404)."""
        try:
            body = self.request("GET", "/api/tasks", params=params)
        except LabelStudioAPIError as e:
            if e.status == 404:
                return []
            raise
        return body.get("tasks", []) if isinstance(body, dict) else body

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
