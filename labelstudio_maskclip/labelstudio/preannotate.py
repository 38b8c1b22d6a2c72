"""Bulk pre-annotation of a whole project through Label Studio's API, outside its 100 s /predict limit.

Pulls the project's tasks, predicts in batches with the served model, and pushes each prediction with
``POST /api/predictions``. Resumable: tasks that already carry a prediction of the current model version
are skipped, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..settings import Settings
from .api import LabelStudioAPI
from .backend import MaskCLIPBackend

__all__ = ["preannotate", "PreannotateResult"]

log = logging.getLogger(__name__)


@dataclass
class PreannotateResult:
    model_version: str
    predicted: int = 0
    skipped: int = 0  # already had a prediction of this model version
    failed: list[dict[str, Any]] = field(default_factory=list)


def _has_version(task: Mapping[str, Any], version: str) -> bool:
    return any(isinstance(p, Mapping) and p.get("model_version") == version for p in task.get("predictions") or [])


def preannotate(
    settings: Settings,
    project_id: int,
    *,
    batch_size: int = 64,
    progress: bool = True,
    api: LabelStudioAPI | None = None,
) -> PreannotateResult:
    from tqdm import tqdm

    api = api or LabelStudioAPI.from_settings(settings)
    config = api.project(project_id)["label_config"]
    backend = MaskCLIPBackend(settings.replace(predict_time_budget=float("inf")), str(project_id), config)
    version, _ = backend.rt.model_for(backend.classes(backend.spec())[1], load=False)
    result = PreannotateResult(model_version=version)
    bar = tqdm(desc=f"preannotate project {project_id}", unit="task", disable=not progress)
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        reply = backend.predict(pending)
        for task, pred in zip(pending, reply["results"]):
            if pred:
                api.create_prediction(task["id"], pred)
                result.predicted += 1
        result.failed.extend(e for e in reply["errors"])
        bar.update(len(pending))
        pending.clear()

    for task in api.tasks(project_id):
        if _has_version(task, version):
            result.skipped += 1
            bar.update(1)
            continue
        pending.append(task)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    log.info(
        "preannotate project %s with %s: %d predicted, %d already had this version, %d failed",
        project_id, version, result.predicted, result.skipped, len(result.failed),
    )  # fmt: skip
    return result
