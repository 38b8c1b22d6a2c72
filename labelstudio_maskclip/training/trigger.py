"""Starting MaskCLIP+ training from the server: single-flight, detached, never inside a request.

Single flight across threads, processes, gunicorn workers and, on a PostgreSQL store, instances: the run lock
``train`` (:mod:`labelstudio_maskclip.learning.locks`). With the SQLite store it is an exclusive ``fcntl.flock``
on ``MODEL_DIR/train.lock``: :func:`request_training` takes the lock without blocking, starts
``python -m labelstudio_maskclip.training.train`` in its own session with the locked file descriptor inherited
(the lock belongs to the open file, so the TRAINER PROCESS holds it for its whole life), closes its own copy
and returns at once. With a PostgreSQL store it is an advisory lock held by a connection: the request takes
it, starts the trainer, which queues for it (``--lock-wait``), and a thread hands it over once the trainer is
queued (:meth:`~labelstudio_maskclip.learning.locks.HeldLock.hand_over`): the TRAINER PROCESS then holds it for
its whole life, and no other request gets it in between. A second request while the trainer lives finds the
lock taken and returns False. A
trainer that dies (even by SIGKILL) releases the lock (its last descriptor, or its connection, ends), and
since only the atomic promotion in :mod:`labelstudio_maskclip.training.checkpoints` touches the served model,
nothing else needs cleaning.

Rules that call it: :func:`should_train` (every ``train_every_n`` new annotations, for the webhook) and
:func:`maybe_interval` (every ``train_interval_minutes``, when something new arrived).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..engine.names import ClassNames, format_label_spec
from ..jobs import start_detached
from ..learning.locks import FileLock, HeldLock, run_lock
from ..settings import Settings
from .job import classes_json

__all__ = [
    "AnnotationCounter",
    "LOCK_FILE",
    "acquire_training_lock",
    "request_training",
    "should_train",
    "maybe_interval",
]

log = logging.getLogger(__name__)


class AnnotationCounter(Protocol):
    """What the training rules read from the store (:class:`~labelstudio_maskclip.learning.store.Store`)."""

    def count_since_last_training(self, project: int | None = None) -> int:
        """Annotations stored or changed since the last finished training (of ``project``, or any)."""
        ...


LOCK_FILE = "train.lock"
_STAMP = "train.last"  # mtime = when the last training was started by a trigger


def _lock_path(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path / LOCK_FILE


def acquire_training_lock(where: Settings | str | Path, *, wait: bool = False) -> HeldLock | None:
    """The training lock (keep it to hold it; ``close()`` lets it go), or None if someone holds it (``wait``:
    wait for it instead). ``where``: the settings (the lock follows their store), or a ``MODEL_DIR`` (its
    ``train.lock`` file)."""
    lock = run_lock(where, "train") if isinstance(where, Settings) else FileLock(_lock_path(where), "train")
    return lock.acquire(wait=wait)


def request_training(
    settings: Settings,
    reason: str,
    *,
    classes: Sequence[ClassNames] | None = None,
    values: Sequence[str] | None = None,
    background: Sequence[ClassNames] = (),
    project: int | None = None,
) -> bool:
    """Start a detached trainer unless one is running. Returns True if started. Takes milliseconds.

    The trainer's output goes to ``MODEL_DIR/runs/train-<timestamp>.log``. ``classes``/``background``: the
    project's labels as the model names them (default: the labels found in the store); ``values``: each
    class's label value, which people's masks carry (they differ where a label has ``predicted_values``).
    """
    lock = acquire_training_lock(settings)
    if lock is None:
        log.info("training requested (%s) but one is running", reason)
        return False
    try:
        args = ["--service", "--reason", reason] + (
            ["--lock-fd", str(lock.fd)] if lock.fd is not None else ["--lock-wait"]
        )
        if classes:
            args += ["--classes-json", classes_json(classes, values)]
        if background:
            args += ["--background", format_label_spec(background)]
        if project is not None:
            args += ["--project", str(project)]
        started = start_detached(
            settings,
            "train",
            "labelstudio_maskclip.training.train",
            args,
            pass_fds=() if lock.fd is None else (lock.fd,),
        )
        proc = started.process
        (Path(settings.model_dir) / _STAMP).touch()
    except BaseException:
        lock.release()
        raise
    if lock.fd is not None:
        lock.release()  # the child's inherited descriptor keeps a file lock
    else:  # an advisory lock: kept until the trainer queues for it

        def alive() -> bool:
            return proc.poll() is None

        threading.Thread(target=lock.hand_over, args=(alive,), name=f"hand-over-{proc.pid}", daemon=True).start()
    threading.Thread(target=proc.wait, name=f"reap-trainer-{proc.pid}", daemon=True).start()  # no zombie
    log.info("training started (%s): pid %d, log %s", reason, proc.pid, started.log_path)
    return True


def should_train(settings: Settings, store: AnnotationCounter, project: int | None = None) -> bool:
    """The every-N rule: ``train_every_n`` > 0 and at least that many annotations since the last training."""
    n = settings.train_every_n
    return n > 0 and store.count_since_last_training(project) >= n


def maybe_interval(
    settings: Settings,
    store: AnnotationCounter,
    *,
    now: float | None = None,
    classes: Sequence[ClassNames] | None = None,
    values: Sequence[str] | None = None,
    background: Sequence[ClassNames] = (),
    project: int | None = None,
) -> bool:
    """The interval rule: ``train_interval_minutes`` > 0, that long since a trigger last started training
    (or never), and at least one annotation since the last training. Returns True if started."""
    minutes = settings.train_interval_minutes
    if minutes <= 0:
        return False
    stamp = Path(settings.model_dir) / _STAMP
    last = stamp.stat().st_mtime if stamp.exists() else None
    now = time.time() if now is None else now
    if last is not None and now - last < minutes * 60:
        return False
    if store.count_since_last_training(project) == 0:
        return False
    reason = f"interval {minutes:g} min"
    return request_training(settings, reason, classes=classes, values=values, background=background, project=project)
