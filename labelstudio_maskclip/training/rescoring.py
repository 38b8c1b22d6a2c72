"""Starting the re-scoring after the served model changes (a student promoted, or a rollback), and its status.

The job itself is :mod:`labelstudio_maskclip.commands.rescore` (``python -m labelstudio_maskclip.commands.rescore``),
which re-predicts the unlabeled tasks through the bulk path of pre-annotation; the trainer's promote step and
``rollback`` start it here without importing it. Status: ``MODEL_DIR/rescore.json``, or with a PostgreSQL store
the store's ``shared_state`` row :data:`STATUS_KEY`, which every instance reads (the job writes it, ``/metrics``
reads it): ``{"state": "running" | "done" | "failed", "version", "projects": {id: {"done", "total", "predicted",
"failed", "seconds"}}, "started", "finished", "error"}``.

Jobs run one at a time across processes and, on a PostgreSQL store, instances: each holds the run lock
``rescore`` (:func:`acquire_rescore_lock`, :mod:`labelstudio_maskclip.learning.locks`) for its whole life; one
started while another runs waits for it, and a job that dies releases it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..jobs import start_detached
from ..learning.locks import HeldLock, run_lock
from ..learning.store import Store, StoreError, shared_store
from ..settings import Settings

__all__ = [
    "STATUS_FILE",
    "STATUS_KEY",
    "LOCK_NAME",
    "read_status",
    "write_status",
    "start_rescore",
    "acquire_rescore_lock",
]

log = logging.getLogger(__name__)

STATUS_FILE = "rescore.json"
STATUS_KEY = "rescore_status"


def _model_dir(where: Settings | str | Path) -> Path:
    return Path(where.model_dir if isinstance(where, Settings) else where)


LOCK_NAME = "rescore"  # MODEL_DIR/rescore.lock with the SQLite store


def acquire_rescore_lock(settings: Settings, *, wait: bool = True) -> HeldLock | None:
    """The re-scoring lock, held until released or this process ends: waits for a running job to finish
    (``wait=False``: None while one runs)."""
    return run_lock(settings, LOCK_NAME).acquire(wait=wait)


def _shared_store(where: Settings | str | Path) -> Store | None:
    return shared_store(where) if isinstance(where, Settings) else None


def read_status(where: Settings | str | Path) -> dict[str, Any] | None:
    """The last re-scoring's status (see the module docstring), None if none ran. ``where``: the settings
    (their store when it is PostgreSQL, else the file in MODEL_DIR) or a MODEL_DIR."""
    store = _shared_store(where)
    try:
        if store is not None:
            value = store.get_state(STATUS_KEY)
            return None if value is None else json.loads(value)
        return json.loads((_model_dir(where) / STATUS_FILE).read_text())
    except (OSError, ValueError, StoreError):
        return None


def write_status(where: Settings | str | Path, status: dict[str, Any]) -> None:
    """Replace the status atomically (readers never see half of it)."""
    store = _shared_store(where)
    if store is not None:
        store.put_state(STATUS_KEY, json.dumps(status))
        return
    path = _model_dir(where) / STATUS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def start_rescore(settings: Settings, project: int | None = None, reason: str = "new model") -> int | None:
    """Start the re-scoring job in the background (a detached process); returns its pid, or None when
    re-scoring is off or Label Studio is not configured. Takes milliseconds."""
    if not settings.rescore:
        log.info("re-scoring after %s is off (MASKCLIP_RESCORE=false)", reason)
        return None
    if not settings.label_studio_url:
        log.info("no re-scoring after %s: LABEL_STUDIO_URL is not set", reason)
        return None
    args = ["--reason", reason] + (["--project", str(project)] if project is not None else [])
    started = start_detached(settings, "rescore", "labelstudio_maskclip.commands.rescore", args)
    log.info("re-scoring unlabeled tasks after %s: pid %d, log %s", reason, started.process.pid, started.log_path)
    return started.process.pid
