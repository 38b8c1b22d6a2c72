"""Re-scoring after the served model changes (a student promoted, or a rollback).

Label Studio sorts the Data Manager by the predictions' scores; after a promotion those are the old
model's until each task is predicted again. :func:`~labelstudio_maskclip.training.rescoring.start_rescore` (one
call from the trainer's promote step and from ``rollback``) starts this module as a detached job that
re-predicts the unlabeled tasks of every project the backend has seen (the store's projects, plus the one
trained for) with the model now served, through the bulk path of :mod:`.preannotate`. Never in a web
worker. Off with ``MASKCLIP_RESCORE=false``; needs ``LABEL_STUDIO_URL``.

Progress and outcome: the job's log (``MODEL_DIR/runs/rescore-*.log``) and ``MODEL_DIR/rescore.json``
(served at ``/metrics`` under ``rescore``): ``{"state": "running" | "done" | "failed", "version",
"projects": {id: {"done", "total", "predicted", "failed", "seconds"}}, "started", "finished", "error"}``.
Jobs run one at a time, across instances too (the ``rescore`` run lock:
:func:`~labelstudio_maskclip.training.rescoring.acquire_rescore_lock`); one started while another runs waits
for it, and the waiting one then only predicts what the newest model still lacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..learning.store import Store
from ..logs import configure as configure_logging
from ..settings import Settings
from ..training.rescoring import acquire_rescore_lock, write_status
from .preannotate import preannotate

__all__ = ["rescore", "projects_to_rescore", "main"]

log = logging.getLogger(__name__)


def projects_to_rescore(settings: Settings, project: int | None = None) -> list[int]:
    """The project trained for, then every project the store has seen tasks of."""
    seen = Store.from_settings(settings).projects()
    return list(dict.fromkeys(([project] if project is not None else []) + seen))


def rescore(settings: Settings, projects: Sequence[int], reason: str = "") -> dict[str, Any]:
    """Re-predict the unlabeled tasks of ``projects`` that lack the served version, in this process;
    writes the status file as it goes and returns the final status."""
    status: dict[str, Any] = {"state": "running", "reason": reason, "version": None, "started": time.time(),
                              "finished": None, "projects": {}, "error": None}  # fmt: skip
    write_status(settings, status)
    try:
        for project in projects:
            entry: dict[str, Any] = {"done": 0, "total": None, "predicted": 0, "failed": 0, "seconds": None}
            status["projects"][str(project)] = entry

            def progress(done: int, total: int, entry: dict[str, Any] = entry) -> None:
                entry["done"], entry["total"] = done, total
                write_status(settings, status)

            result = preannotate(settings, project, refresh=True, progress=False, on_progress=progress)
            status["version"] = result.model_version
            entry.update(predicted=result.predicted, failed=len(result.failed), seconds=round(result.seconds, 1),
                         done=result.predicted + len(result.failed))  # fmt: skip
            entry["total"] = entry["total"] if entry["total"] is not None else entry["done"]
            log.info("re-scored project %s with %s: %d unlabeled tasks predicted, %d failed, %.1f s", project,
                     result.model_version, result.predicted, len(result.failed), result.seconds)  # fmt: skip
        status["state"] = "done"
    except Exception as e:
        status["state"], status["error"] = "failed", f"{type(e).__name__}: {e}"
        log.exception("re-scoring failed")
    status["finished"] = time.time()
    write_status(settings, status)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelstudio_maskclip.commands.rescore")
    parser.add_argument("--project", type=int, help="re-score this project first (then the store's projects)")
    parser.add_argument("--reason", default="by hand")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    Path(settings.model_dir).mkdir(parents=True, exist_ok=True)
    lock = acquire_rescore_lock(settings, wait=True)  # one job at a time; a later one waits, then does the rest
    assert lock is not None  # waiting returns the lock
    with lock:
        projects = projects_to_rescore(settings, args.project)
        log.info("re-scoring after %s: projects %s", args.reason, projects)
        status = rescore(settings, projects, args.reason)
    return 0 if status["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
