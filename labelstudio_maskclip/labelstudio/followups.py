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
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["FollowUps", "MAX_PENDING"]

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
