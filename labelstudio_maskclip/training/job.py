"""A training job as the CLI, the trigger and the trainer process pass it: labels, values, project, resume.

Light on purpose (no torch): the server's trigger writes a job's classes into the trainer's command line
with :func:`classes_json`, and the trainer reads them back with :func:`classes_from_json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.names import normalize_classes

__all__ = ["TrainJob", "class_key", "classes_json", "classes_from_json"]


@dataclass(frozen=True)
class TrainJob:
    """What to train: which labels, on which project's tasks, from where. ``classes``: model-side names per
    class (synonyms), None for every label found in the accepted masks; ``values``: the label value of each
    class (what people's masks are keyed by; differs from the names where the labeling config gives
    ``predicted_values``), None to match masks by the names; ``resume``: a run id to continue."""

    classes: tuple[tuple[str, ...], ...] | None = None
    values: tuple[str, ...] | None = None
    background: tuple[tuple[str, ...], ...] = ()
    project: int | None = None
    resume: str | None = None
    progress: bool = True


def class_key(classes: Sequence[Any]) -> tuple[tuple[str, ...], ...]:
    """Classes (names or synonym tuples) -> a comparable tuple of name tuples, names normalised the one way
    the engine normalises them (:func:`~labelstudio_maskclip.engine.names.normalize_classes`); ``()`` stays
    ``()``."""
    return normalize_classes(classes) if len(classes) else ()


def classes_json(classes: Sequence[Any], values: Sequence[str] | None = None) -> str:
    """The ``--classes-json`` argument: each class's names and, when known, its label value."""
    entries: list[dict[str, Any]] = [{"names": list(names)} for names in class_key(classes)]
    for entry, value in zip(entries, values or ()):
        entry["value"] = value
    return json.dumps(entries)


def classes_from_json(text: str) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...] | None]:
    """(classes, values or None) from :func:`classes_json`'s text; ValueError if it is not that."""
    entries = json.loads(text)
    ok = isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)
    if not ok or not all(e.get("names") and all(isinstance(n, str) for n in e["names"]) for e in entries):
        raise ValueError(f"--classes-json: expected a non-empty list of {{'names': [...], 'value': ...}}: {text:.200}")
    classes = tuple(tuple(e["names"]) for e in entries)
    values = [e.get("value") for e in entries]
    return classes, (tuple(values) if all(isinstance(v, str) for v in values) else None)
