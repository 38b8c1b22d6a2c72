"""Label Studio webhook events -> store operations (pure of HTTP).

:func:`handle_event` takes a webhook body (docs/label-studio.md, "Webhooks") and a :class:`~.store.Store`:

- ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: every ``brushlabels`` region (``value.rle``, Label
  Studio's brush RLE at ``original_height`` x ``original_width``) is decoded and every ``polygonlabels``
  region (``value.points`` in percent of the image) rasterised; masks are merged per label and stored with
  the task, its image reference, author, ``ground_truth`` and ``parent_prediction``. When the parent
  prediction's result is in the payload (``task.predictions`` or ``annotation.prediction``), each predicted
  region is classed ``unchanged`` / ``edited`` / ``deleted`` (matched by region id, compared as decoded
  masks and labels) and the person's new regions ``added``. ``was_cancelled`` annotations are stored
  without masks.
- ``ANNOTATIONS_DELETED``: the annotations are deleted. ``TASKS_CREATED``: tasks join the unlabeled pool.
- ``START_TRAINING``: nothing is stored; the result says training was requested.
- any other action: ignored (logged at debug).

Rejections, never exceptions, for bad content: a region whose label is not in the project's labeling
config is dropped (the rest of the annotation is stored); a region that cannot be decoded (malformed,
RLE of the wrong length, no size) rejects its whole annotation, because storing the rest would teach the
student that the missing region is background: the previously stored version, if any, stays. Only a body
that is unusable as a whole (not a mapping, no action) raises :class:`CollectError`. Storage failures
(``sqlite3.Error``) propagate, so the web route can answer 5xx.

Idempotent and ordered (see :meth:`~.store.Store.put_annotation`): a repeated event changes nothing (also
when it carries a ``parent_prediction`` whose outcomes were learnt since), an update replaces the masks in
one transaction, an older version arriving late does not overwrite a newer one.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BadInput
from ..fetching.uris import IMAGE_URI_PREFIXES
from ..learning.store import AnnotationWrite, Store, TaskRecord
from ..masks import polygons as _polygons
from ..masks.brush import brush_rle_to_mask
from ..masks.polygons import edge_pixels, percent_to_points, polygons_to_mask
from .labeling import LabelConfigError, parse_label_config

__all__ = [
    "CollectError",
    "EventResult",
    "BackfillResult",
    "handle_event",
    "image_reference",
    "backfill_from_export",
    "backfill_from_api",
    "ProjectReader",
    "MASK_TYPES",
    "MAX_PIXELS",
    "MAX_REGIONS",
    "MAX_POINTS",
    "MAX_EDGE_PIXELS",
    "MAX_DECODED_PIXELS",
    "MAX_MASK_BYTES",
    "MAX_ID",
    "label_studio_id",
]

log = logging.getLogger(__name__)

#: result type -> (labels key in ``value``, source name stored with the mask)
MASK_TYPES = {"brushlabels": ("brushlabels", "brush"), "polygonlabels": ("polygonlabels", "polygon")}
#: Largest id accepted: SQLite's INTEGER is a signed 64-bit number.
MAX_ID = 2**63 - 1
#: Largest image (pixels) a region may claim; bigger sizes are rejected before anything is allocated.
MAX_PIXELS = 256_000_000
#: Bounds on the work one annotation may ask for, checked before anything is decoded or rasterised (a
#: region's size and points are read first; the whole annotation is rejected with the reason). They count
#: the annotation's mask regions plus the parent prediction's regions it is compared with.
MAX_REGIONS = 1000  # mask regions
MAX_POINTS = 100_000  # polygon points, all regions together
MAX_EDGE_PIXELS = _polygons.MAX_EDGE_PIXELS  # pixels of polygon edges to walk, all regions together
MAX_DECODED_PIXELS = 2_000_000_000  # sum over decoded regions of height x width
MAX_MASK_BYTES = 1_000_000_000  # masks held at once: (labels + 2) x height x width bytes
#: Annotations decoded at once per process (each holds at most MAX_MASK_BYTES): bounds a worker's memory
#: whatever the number of threads or concurrent webhooks; others wait their turn.
DECODE_SLOTS = 2
_decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
_MAX_PERCENT_OFFSET = 1000.0  # polygon points further than this from the image centre (in %) are refused
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class CollectError(BadInput):
    """A webhook body is unusable as a whole (not a JSON object, no ``action``)."""


class _Rejected(BadInput):
    """A region or annotation that cannot be stored; the message is the reason reported."""


@dataclass
class EventResult:
    """What :func:`handle_event` did, for the log and the HTTP reply.

    ``status``: ``stored``, ``duplicate``, ``outcomes`` (already stored; its outcomes vs the parent
    prediction were recorded), ``stale``, ``deleted`` (annotation deleted earlier, or by this
    event), ``cancelled``, ``tasks``, ``train``, ``ignored`` or ``rejected``. ``rejected`` holds one reason
    per rejected region or annotation.
    """

    action: str
    status: str
    annotation_ids: list[int] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    train_requested: bool = False

    def summary(self) -> str:
        """One log line."""
        parts = [f"{self.action}: {self.status}"]
        if self.annotation_ids:
            parts.append(f"annotations={self.annotation_ids}")
        if self.task_ids:
            parts.append(f"tasks={self.task_ids[:10]}{'...' if len(self.task_ids) > 10 else ''}")
        if self.labels:
            parts.append(f"labels={self.labels}")
        if self.rejected:
            parts.append(f"rejected={self.rejected}")
        return " ".join(parts)


# --- labeling config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    labels: frozenset[str] | None  # None: no config given, every label is accepted
    image_key: str | None
    by_control: Mapping[str, frozenset[str]] = field(default_factory=dict)  # control name -> its labels

    def allowed(self, from_name: Any) -> frozenset[str] | None:
        """Labels a region of control ``from_name`` may carry (all labels if the control is unknown)."""
        if isinstance(from_name, str) and from_name in self.by_control:
            return self.by_control[from_name]
        return self.labels


def _parse_config(label_config: str | None) -> _Config:
    """Label names (all, and per segmentation control), and the image key of a labeling config."""
    if not label_config:
        return _Config(None, None)
    try:
        spec = parse_label_config(label_config)
    except LabelConfigError as exc:
        raise _Rejected(f"project.label_config: {exc}") from None
    by_control = {t.from_name: frozenset(t.values) for t in spec.targets}
    return _Config(frozenset(spec.vocabulary), spec.image_keys[0], by_control)


def label_studio_id(value: Any) -> int | None:
    """A Label Studio id (task, annotation, prediction, project), strictly: a JSON integer from 1 to
    :data:`MAX_ID`, or its plain decimal text (``"17"``); an object's ``id`` field the same way. None for
    anything else: floats (``1.5`` is not annotation 1, nor is ``1.0``), booleans, signs, exponents, blanks,
    numbers SQLite cannot hold."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= len(str(MAX_ID)):
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_ID:  # type(): bool is an int subclass
        return None
    return value


_int_or_none = label_studio_id


def _author(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("email") or value.get("id")
    return None if value is None else str(value)


def _looks_like_image(value: str) -> bool:
    lowered = value.lower().split("?", 1)[0]
    return value.startswith(IMAGE_URI_PREFIXES) or lowered.endswith(_IMAGE_SUFFIXES) or "/data/local-files/" in value


def image_reference(data: Mapping[str, Any], key: str | None = None) -> str | None:
    """The image reference in ``task.data``: ``data[key]`` if given, else the first string value that
    looks like an image (URL, ``/data/...`` path, or a name with an image suffix). None if there is none."""
    if not isinstance(data, Mapping):
        return None
    if key is not None:
        value = data.get(key)
        return value if isinstance(value, str) else None
    for value in data.values():
        if isinstance(value, str) and _looks_like_image(value):
            return value
    return None


def _task_record(task: Mapping[str, Any], project: int | None, config: _Config, image_key: str | None) -> TaskRecord:
    task_id = _int_or_none(task.get("id"))
    if task_id is None:
        raise _Rejected(f"task has no integer id (got {task.get('id')!r})")
    key = image_key or config.image_key
    data = task.get("data") or {}
    image = image_reference(data, key) or (image_reference(data) if key else None)
    return TaskRecord(
        id=task_id, project=project if project is not None else _int_or_none(task.get("project")), image=image
    )


# --- regions -> masks ----------------------------------------------------------------------------------


@dataclass
class _Budget:
    """What one annotation has asked for so far; :meth:`charge` rejects it past a bound (before decoding)."""

    regions: int = 0
    points: int = 0
    edge_pixels: int = 0
    decoded_pixels: int = 0

    def charge(self, region: Mapping[str, Any], height: int, width: int, points: int = 0, edges: int = 0) -> None:
        self.regions += 1
        self.points += points
        self.edge_pixels += edges
        self.decoded_pixels += height * width
        for name, used, bound in (
            ("mask regions", self.regions, MAX_REGIONS),
            ("polygon points", self.points, MAX_POINTS),
            ("pixels of polygon edges", self.edge_pixels, MAX_EDGE_PIXELS),
            ("decoded pixels (regions x height x width)", self.decoded_pixels, MAX_DECODED_PIXELS),
        ):
            if used > bound:
                raise _Rejected(
                    f"too much work: at region {str(region.get('id'))[:40]!r} the annotation needs more than "
                    f"{bound} {name} (with its prediction's regions); refused before decoding it"
                )


def _region_size(region: Mapping[str, Any]) -> tuple[int, int]:
    try:
        height, width = int(region["original_height"]), int(region["original_width"])
    except (KeyError, TypeError, ValueError):
        raise _Rejected(f"region {region.get('id')!r} has no original_height/original_width") from None
    if height <= 0 or width <= 0 or height * width > MAX_PIXELS:
        raise _Rejected(f"region {region.get('id')!r} has size {height}x{width} (at most {MAX_PIXELS} pixels)")
    return height, width


def _region_labels(region: Mapping[str, Any]) -> list[str]:
    labels_key = MASK_TYPES[region["type"]][0]
    value = region.get("value")
    labels = value.get(labels_key) if isinstance(value, Mapping) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise _Rejected(f"region {region.get('id')!r}: value.{labels_key} must be a non-empty list of label names")
    return labels


def _region_mask(region: Mapping[str, Any], budget: _Budget) -> np.ndarray:
    """A ``brushlabels`` / ``polygonlabels`` region -> ``(H, W)`` bool at the region's original size.
    Its cost is charged to ``budget`` before anything is decoded."""
    height, width = _region_size(region)
    value = region.get("value")
    if not isinstance(value, Mapping):
        raise _Rejected(f"region {region.get('id')!r} has no value object")
    try:
        if region["type"] == "brushlabels":
            rle = value.get("rle")
            if value.get("format", "rle") != "rle" or not isinstance(rle, list):
                raise _Rejected(f"brush region {region.get('id')!r}: expected value.format 'rle' with value.rle a list")
            budget.charge(region, height, width)
            return np.asarray(brush_rle_to_mask(rle, height, width), dtype=bool)

        points = value.get("points")
        if not isinstance(points, list) or len(points) < 3:
            raise _Rejected(f"polygon region {region.get('id')!r}: value.points needs at least 3 [x%, y%] points")
        if len(points) > MAX_POINTS:  # refused before converting the list
            budget.charge(region, height, width, points=len(points))
        percent = np.asarray(points, dtype=np.float64)  # (N, 2) x%, y%
        if (
            percent.ndim != 2
            or percent.shape[1] != 2
            or not np.isfinite(percent).all()
            or np.abs(percent - 50).max() > _MAX_PERCENT_OFFSET
        ):
            # pycocotools walks every edge pixel by pixel: far-away points would exhaust memory.
            raise _Rejected(
                f"polygon region {region.get('id')!r}: value.points must be [x%, y%] pairs near "
                "0..100 (percent of the image)"
            )
        pixels = percent_to_points(percent, height, width)  # (N, 2) pixel x, y
        edges = edge_pixels([pixels])
        budget.charge(region, height, width, points=len(pixels), edges=edges)
        return np.asarray(polygons_to_mask([pixels], height, width, max_edge_pixels=None), dtype=bool)
    except _Rejected:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:  # codec errors are ValueErrors
        raise _Rejected(f"{region['type']} region {region.get('id')!r} cannot be decoded: {exc}") from None


def _mask_regions(result: Any) -> list[Mapping[str, Any]]:
    if not isinstance(result, list):
        raise _Rejected(f"annotation result must be a list, got {type(result).__name__}")
    return [r for r in result if isinstance(r, Mapping) and isinstance(r.get("type"), str) and r["type"] in MASK_TYPES]


@dataclass
class _Decoded:
    masks: dict[str, np.ndarray]  # label -> (H, W) bool, merged over regions
    sources: dict[str, str]
    size: tuple[int, int] | None  # (H, W)
    dropped: list[str]  # reasons for regions left out (labels not in the config)


def _decode_result(result: Any, config: _Config, budget: _Budget) -> _Decoded:
    """Merge an annotation's mask regions per label. Raises :class:`_Rejected` for undecodable regions and
    for work past the bounds (:class:`_Budget`, :data:`MAX_MASK_BYTES`)."""
    masks: dict[str, np.ndarray] = {}
    sources: dict[str, set[str]] = {}
    dropped: list[str] = []
    size: tuple[int, int] | None = None
    regions = _mask_regions(result)
    if len(regions) > MAX_REGIONS:
        raise _Rejected(f"too much work: {len(regions)} mask regions, more than the bound of {MAX_REGIONS}")
    for region in regions:
        labels = _region_labels(region)
        allowed = config.allowed(region.get("from_name"))
        unknown = [label for label in labels if allowed is not None and label not in allowed]
        if unknown:
            dropped.append(
                f"region {region.get('id')!r}: label(s) {unknown} not in the project's labeling config "
                f"(control {region.get('from_name')!r})"
            )
            labels = [label for label in labels if label not in unknown]
            if not labels:
                continue
        new_labels = len(set(labels) - set(masks))
        if new_labels:
            height, width = _region_size(region)
            if (len(masks) + new_labels + 2) * height * width > MAX_MASK_BYTES:
                raise _Rejected(
                    f"too much work: {len(masks) + new_labels} labels at {height}x{width} need more than "
                    f"{MAX_MASK_BYTES} bytes of masks at once"
                )
        mask = _region_mask(region, budget)
        if size is not None and mask.shape != size:
            raise _Rejected(
                f"region {region.get('id')!r} is {mask.shape[0]}x{mask.shape[1]}, other regions "
                f"{size[0]}x{size[1]}: one annotation must have one image size"
            )
        size = mask.shape
        for label in labels:
            masks[label] = masks[label] | mask if label in masks else mask.copy()
            sources.setdefault(label, set()).add(MASK_TYPES[region["type"]][1])
    return _Decoded(masks, {label: "+".join(sorted(kinds)) for label, kinds in sources.items()}, size, dropped)


# --- acceptance vs the prediction ------------------------------------------------------------------------


def _prediction_result(annotation: Mapping[str, Any], task: Mapping[str, Any]) -> list | None:
    """The parent prediction's ``result`` if the payload carries it, else None (unknown)."""
    parent = _int_or_none(annotation.get("parent_prediction"))
    if parent is None:
        return None
    embedded = annotation.get("prediction")
    if isinstance(embedded, Mapping) and isinstance(embedded.get("result"), list):
        if _int_or_none(embedded.get("id")) in (None, parent):
            return list(embedded["result"])
    predictions = task.get("predictions")
    for prediction in predictions if isinstance(predictions, list) else []:
        if isinstance(prediction, Mapping) and _int_or_none(prediction.get("id")) == parent:
            result = prediction.get("result")
            return list(result) if isinstance(result, list) else None
    return None


def _same_region(predicted: Mapping[str, Any], annotated: Mapping[str, Any], budget: _Budget) -> bool:
    if predicted.get("type") != annotated.get("type"):
        return False
    try:
        if sorted(_region_labels(predicted)) != sorted(_region_labels(annotated)):
            return False
        if predicted.get("value") == annotated.get("value"):
            return True
        return bool(np.array_equal(_region_mask(predicted, budget), _region_mask(annotated, budget)))
    except _Rejected as exc:
        if str(exc).startswith("too much work"):
            raise
        return False


def _outcomes(predicted: list, annotated: list, budget: _Budget) -> list[tuple[str, str, str]]:
    """(region id, label, outcome) for every predicted region and every region the person added."""
    predicted_regions = {str(r.get("id")): r for r in _mask_regions(predicted)}
    annotated_regions = {str(r.get("id")): r for r in _mask_regions(annotated)}
    if len(predicted_regions) > MAX_REGIONS:
        raise _Rejected(
            f"too much work: the parent prediction has {len(predicted_regions)} mask regions, more than {MAX_REGIONS}"
        )
    outcomes: set[tuple[str, str, str]] = set()
    for region_id, region in predicted_regions.items():
        other = annotated_regions.get(region_id)
        outcome = "deleted" if other is None else ("unchanged" if _same_region(region, other, budget) else "edited")
        for label in _safe_labels(region):
            outcomes.add((region_id, label, outcome))
    for region_id, region in annotated_regions.items():
        if region_id not in predicted_regions:
            for label in _safe_labels(region):
                outcomes.add((region_id, label, "added"))
    return sorted(outcomes)


def _safe_labels(region: Mapping[str, Any]) -> list[str]:
    try:
        return _region_labels(region)
    except _Rejected:
        return ["(unlabelled)"]


# --- event handlers ----------------------------------------------------------------------------------------


def _project_id(payload: Mapping[str, Any], fallback: Any = None) -> int | None:
    project = payload.get("project")
    return _int_or_none(project) if project is not None else _int_or_none(fallback)


def _label_config(payload: Mapping[str, Any]) -> str | None:
    project = payload.get("project")
    config = project.get("label_config") if isinstance(project, Mapping) else None
    return config if isinstance(config, str) else None


def _annotation_event(payload: Mapping[str, Any], store: Store, action: str, image_key: str | None) -> EventResult:
    annotation, task = payload.get("annotation"), payload.get("task")
    if not isinstance(annotation, Mapping):
        raise _Rejected("payload has no 'annotation' object")
    annotation_id = _int_or_none(annotation.get("id"))
    if annotation_id is None:
        raise _Rejected(f"annotation has no integer id (got {annotation.get('id')!r})")
    if not isinstance(task, Mapping):  # some senders give only the id
        task = {"id": annotation.get("task")}
    result = EventResult(action, "rejected", annotation_ids=[annotation_id])
    try:
        config = _parse_config(_label_config(payload))
        record = _task_record(task, _project_id(payload, annotation.get("project")), config, image_key)
        cancelled = bool(annotation.get("was_cancelled"))
        budget = _Budget()
        decoded = _Decoded({}, {}, None, []) if cancelled else _decode_result(annotation.get("result"), config, budget)
        predicted = None if cancelled else _prediction_result(annotation, task)
        outcomes = [] if predicted is None else _outcomes(predicted, list(annotation.get("result") or []), budget)
    except _Rejected as exc:
        result.rejected.append(f"annotation {annotation_id}: {exc}")
        return result
    height, width = decoded.size or (None, None)
    write = AnnotationWrite(
        id=annotation_id,
        task=TaskRecord(record.id, record.project, record.image, width, height),
        author=_author(annotation.get("completed_by")),
        ground_truth=bool(annotation.get("ground_truth")),
        parent_prediction=_int_or_none(annotation.get("parent_prediction")),
        accepted_unchanged=None if predicted is None else all(o[2] == "unchanged" for o in outcomes),
        cancelled=cancelled,
        updated_at=annotation.get("updated_at") if isinstance(annotation.get("updated_at"), str) else None,
        height=height,
        width=width,
        masks=decoded.masks,
        sources=decoded.sources,
        outcomes=outcomes,
    )
    put = store.put_annotation(write)
    result.status = "cancelled" if cancelled and put.status == "stored" else put.status
    result.task_ids, result.labels = [record.id], sorted(decoded.masks)
    result.rejected += [f"annotation {annotation_id}: {reason}" for reason in decoded.dropped]
    return result


def _deleted_event(payload: Mapping[str, Any], store: Store, action: str) -> EventResult:
    entries = payload.get("annotations")
    if not isinstance(entries, list):
        raise _Rejected("payload has no 'annotations' list")
    ids = [_int_or_none(entry) for entry in entries]
    bad = [entry for entry, i in zip(entries, ids) if i is None]
    valid = list(dict.fromkeys(i for i in ids if i is not None))
    if valid:
        live = store.delete_annotations(valid)
        if live < len(valid):
            log.info("%s: %d of %d annotation ids were not stored here (nothing to delete)", action,
                     len(valid) - live, len(valid))  # fmt: skip
    return EventResult(
        action,
        "deleted" if valid else "rejected",
        annotation_ids=valid,
        rejected=[f"annotation entry without a valid id (an integer 1..2**63-1): {entry!r:.80}" for entry in bad],
    )


def _tasks_event(payload: Mapping[str, Any], store: Store, action: str, image_key: str | None) -> EventResult:
    tasks = payload.get("tasks")
    if not isinstance(tasks, list):
        raise _Rejected("payload has no 'tasks' list")
    try:
        config = _parse_config(_label_config(payload))
    except _Rejected:
        config = _Config(None, None)  # the image key is only a hint here
    records, rejected = [], []
    for task in tasks:
        try:
            if not isinstance(task, Mapping):
                raise _Rejected(f"task must be an object, got {type(task).__name__}")
            records.append(_task_record(task, _project_id(payload, task.get("project")), config, image_key))
        except _Rejected as exc:
            rejected.append(str(exc))
    if records:
        store.put_tasks(records)
    return EventResult(action, "tasks" if records else "rejected", task_ids=[r.id for r in records], rejected=rejected)


def handle_event(payload: Any, store: Store, *, image_key: str | None = None) -> EventResult:
    """Apply one webhook body to the store; see the module docstring.

    ``image_key``: the ``task.data`` key holding the image (default: the labeling config's
    ``<Image value="$key">``, else the first value that looks like an image reference).
    Raises :class:`CollectError` only when ``payload`` is not a mapping or has no string ``action``.
    """
    if not isinstance(payload, Mapping):
        raise CollectError(f"webhook body must be a JSON object, got {type(payload).__name__}")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise CollectError(f"webhook body has no 'action' (keys: {sorted(payload)[:10]})")
    try:
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            with _decode_slots:  # bounds the masks decoded and held at once in this process
                result = _annotation_event(payload, store, action, image_key)
        elif action == "ANNOTATIONS_DELETED":
            result = _deleted_event(payload, store, action)
        elif action == "TASKS_CREATED":
            result = _tasks_event(payload, store, action, image_key)
        elif action == "START_TRAINING":
            result = EventResult(action, "train", train_requested=True)
        else:
            log.debug("webhook %s ignored", action)
            return EventResult(action, "ignored")
    except _Rejected as exc:
        result = EventResult(action, "rejected", rejected=[str(exc)])
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:  # a shape we did not foresee
        log.exception("webhook %s: unexpected payload shape", action)
        result = EventResult(action, "rejected", rejected=[f"unexpected payload shape: {type(exc).__name__}: {exc}"])
    if result.rejected:
        log.warning("webhook %s", result.summary())
    else:
        log.info("webhook %s", result.summary())
    return result


# --- backfill ----------------------------------------------------------------------------------------------


@dataclass
class BackfillResult:
    """Counts by :class:`EventResult` status, and every rejection reason."""

    counts: dict[str, int] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)

    def add(self, result: EventResult) -> None:
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        self.rejected += result.rejected


def _task_events(task: Mapping[str, Any], project: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """The webhook bodies Label Studio would have sent for one exported task."""
    yield {"action": "TASKS_CREATED", "tasks": [task], "project": project}
    annotations = task.get("annotations")
    for annotation in annotations if isinstance(annotations, list) else []:
        if isinstance(annotation, Mapping):
            yield {
                "action": "ANNOTATION_CREATED",
                "annotation": {"task": task.get("id"), **annotation},
                "task": task,
                "project": project,
            }


def _backfill_tasks(
    tasks: Iterable[Any],
    store: Store,
    label_config: str | None,
    project_id: int | None,
    image_key: str | None,
) -> BackfillResult:
    outcome = BackfillResult()
    for task in tasks:
        if not isinstance(task, Mapping):
            outcome.add(EventResult("BACKFILL", "rejected", rejected=[f"task entry is a {type(task).__name__}"]))
            continue
        project = {"id": project_id if project_id is not None else task.get("project"), "label_config": label_config}
        for event in _task_events(task, project):
            outcome.add(handle_event(event, store, image_key=image_key))
    return outcome


def backfill_from_export(
    export: str | Path | Sequence[Mapping[str, Any]],
    store: Store,
    *,
    label_config: str | None = None,
    project_id: int | None = None,
    image_key: str | None = None,
) -> BackfillResult:
    """Load a Label Studio JSON export (a file path, or its parsed list of tasks with ``annotations``).

    Every task and annotation goes through :func:`handle_event` as the webhook would have delivered it, so
    rules, idempotency and ordering are the same (re-running a backfill changes nothing). Give
    ``label_config`` to check labels against the project's config (the export file does not hold it).
    """
    if isinstance(export, (str, Path)):
        try:
            tasks = json.loads(Path(export).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CollectError(f"cannot read the Label Studio export {export}: {exc}") from None
    else:
        tasks = export
    if not isinstance(tasks, list):
        raise CollectError("a Label Studio JSON export is a list of tasks; export with exportType=JSON")
    return _backfill_tasks(tasks, store, label_config, project_id, image_key)


class ProjectReader(Protocol):
    """The two Label Studio reads a backfill needs (:class:`~labelstudio_maskclip.labelstudio.api.LabelStudioAPI`
    is one): ``GET /api/projects/{id}`` and every task of the project with its annotations and predictions."""

    def project(self, project_id: int) -> Mapping[str, Any]: ...

    def tasks(self, project_id: int) -> Iterable[Mapping[str, Any]]: ...


def backfill_from_api(
    client: ProjectReader, project_id: int, store: Store, *, image_key: str | None = None
) -> BackfillResult:
    """Backfill from a running Label Studio: the project's labeling config, then every task with its
    annotations and predictions, each through :func:`handle_event` (see :func:`backfill_from_export`).

    ``client``: :class:`~labelstudio_maskclip.labelstudio.api.LabelStudioAPI` (``project(id)``, paged ``tasks(id)``,
    either kind of token); its errors name the call and the status.
    """
    project_id = int(project_id)
    project, tasks = client.project(project_id), client.tasks(project_id)
    config = project.get("label_config") if isinstance(project, Mapping) else None
    return _backfill_tasks(tasks, store, config if isinstance(config, str) else None, project_id, image_key)
