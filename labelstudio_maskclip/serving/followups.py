"""Webhook follow-ups: work done after a webhook was answered, in a bounded queue.

Label Studio gives a webhook 1 s and never sends it again, so a webhook stores what it carries and answers;
what needs Label Studio's API (the parent prediction of an annotation made from a pre-annotation, to record
per-label outcomes) is queued here and done by one background thread per process.

Bounded, so a slow or hung Label Studio cannot grow a worker: at most :data:`MAX_PENDING` follow-ups wait,
each a few hundred bytes (ids and the annotation's fields without its ``result``: the result is fetched
again when the follow-up runs). When the queue is full a new follow-up is dropped with a logged reason; the
annotation itself is stored already, only its outcomes stay unknown until a backfill records them. A
follow-up already waiting for the same key is not queued twice.

Prompt shutdown: the thread is a daemon, so a worker exits without waiting for Label Studio (a follow-up
cut short writes nothing: store writes are single transactions); :meth:`FollowUps.stop` also ends it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..labelstudio.api import LabelStudioAPI
from ..labelstudio.webhooks import handle_event

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "FollowUps", "MAX_PENDING", "ParentPredictionCheck", "kept_config", "kept_fields", "record_parent_prediction",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Follow-ups waiting per process, at most (each a few hundred bytes).
MAX_PENDING = 256


class FollowUps:
    """A bounded queue of ``run(item)`` calls, done one at a time by a daemon thread started on first use.

    ``run`` errors are logged, never raised. ``capacity``: waiting items at most (the one running excluded).
    """

    def __init__(self, run: Callable[[Any], None], *, capacity: int = MAX_PENDING, name: str = "webhook-followup"):
        self._run = run
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._keys: set[Hashable] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = name
        self.capacity = capacity
        self.dropped = 0
        self.done = 0

    def submit(self, key: Hashable, item: Any, what: str = "") -> bool:
        """Queue ``item`` unless the queue is full, stopped, or ``key`` is already waiting. True if queued."""
        with self._lock:
            if self._stop.is_set():
                log.warning("follow-up %s dropped: shutting down", what or key)
                self.dropped += 1
                return False
            if key in self._keys:
                return False
            try:
                self._queue.put_nowait((key, item))
            except queue.Full:
                self.dropped += 1
                log.warning(
                    "follow-up %s dropped: %d follow-ups already wait (is Label Studio slow or down?); "
                    "the annotation is stored, only what the follow-up would add is missing: "
                    "`labelstudio-maskclip backfill --project ID` records it later",
                    what or key, self.capacity,
                )  # fmt: skip
                return False
            self._keys.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        return True

    def pending(self) -> int:
        """Follow-ups waiting (not counting one running)."""
        return self._queue.qsize()

    def stop(self, timeout: float = 5.0) -> bool:
        """Drop what waits and end the thread; wait up to ``timeout`` s for a running follow-up. True if ended."""
        self._stop.set()
        with self._lock:
            while True:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    break
            self._keys.clear()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                key, item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                self._keys.discard(key)
            if self._stop.is_set():
                break
            try:
                self._run(item)
            except Exception:
                log.exception("follow-up %s failed", key)
            self.done += 1


_MAX_KEPT_CONFIG = 65_536  # a longer labeling config is fetched again by the follow-up
_KEPT_FIELDS = ("id", "task", "project", "completed_by", "ground_truth", "was_cancelled", "parent_prediction",
                "created_at", "updated_at")  # fmt: skip


def _small(value: Any, depth: int = 0) -> bool:
    """A scalar, a short string, or a small object of those (the author): kept in a queued follow-up."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 256
    return isinstance(value, Mapping) and depth == 0 and len(value) <= 16 and all(_small(v, 1) for v in value.values())


def kept_config(config: Any) -> str | None:
    """The labeling config a queued follow-up keeps: a string up to ``_MAX_KEPT_CONFIG`` characters, else None."""
    return config if isinstance(config, str) and len(config) <= _MAX_KEPT_CONFIG else None


def kept_fields(annotation: Mapping[str, Any]) -> dict[str, Any]:
    """The webhook annotation's small fields a queued follow-up keeps (author, flags, timestamps; no result)."""
    return {k: v for k, v in annotation.items() if k in _KEPT_FIELDS and _small(v)}


@dataclass(frozen=True)
class ParentPredictionCheck:
    """A queued follow-up (small: no masks): fetch the annotation's current result and its parent
    prediction from Label Studio, and store them together, which records per-label outcomes."""

    annotation_id: int
    prediction_id: int
    task: int | None
    project: int | None
    label_config: str | None
    fields: Mapping[str, Any]  # the webhook's annotation fields but the result (author, flags, timestamps)


def record_parent_prediction(rt: Runtime, check: ParentPredictionCheck) -> None:
    """Follow-up: GET the annotation and its parent prediction, then store them through the webhook rules:
    the same content only gains its outcomes (the change counter does not move, see
    :meth:`~..learning.store.Store.put_annotation`); an update that arrived meanwhile wins (stale)."""
    api = LabelStudioAPI(rt.fetcher, timeout=rt.settings.download_timeout)
    annotation = api.request("GET", f"/api/annotations/{check.annotation_id}")
    prediction = api.request("GET", f"/api/predictions/{check.prediction_id}")
    if not isinstance(annotation, Mapping) or not isinstance(prediction, Mapping):
        log.warning("annotation %s: Label Studio gave no annotation or prediction object", check.annotation_id)
        return
    config = check.label_config
    if config is None and check.project is not None:
        project = api.request("GET", f"/api/projects/{check.project}")
        config = project.get("label_config") if isinstance(project, Mapping) else None
    fields = dict(check.fields)
    fields.update({k: annotation[k] for k in ("result", "updated_at", "was_cancelled") if k in annotation})
    event = {
        "action": "ANNOTATION_UPDATED",
        "annotation": {**fields, "prediction": prediction},
        "task": {"id": check.task if check.task is not None else annotation.get("task")},
        "project": {"id": check.project, "label_config": config},
    }
    result = handle_event(event, rt.store)
    log.info("annotation %s compared with its prediction %s: %s", check.annotation_id, check.prediction_id,
             result.status)  # fmt: skip
