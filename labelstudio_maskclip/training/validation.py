"""Validation on people's held-out masks, and the promotion decision.

The teacher, the served student (when it was trained for these labels, in any order) and the candidate
are scored with the package's one mIoU (:mod:`labelstudio_maskclip.evaluation.metrics`) on the pixels
people labelled in the held-out tasks: a label painted where people put another one counts against it.

Promotion rule (:func:`decide`): ``promote="always"`` promotes every finished run. ``promote="better"``
promotes when the candidate's mIoU beats both the teacher's and the served student's on at least
:data:`MIN_VAL_MASKS` held-out annotated tasks. With fewer held-out masks there is nothing trustworthy to
compare on: the run is kept in ``runs/`` but NOT promoted, and metrics and log say so; set
``MASKCLIP_PROMOTE=always`` to serve an unvalidated student (e.g. annotation-free MaskCLIP+).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation.metrics import confusion_matrix, mean_iou
from ..settings import Settings
from .checkpoints import current_checkpoint
from .data import Item
from .student import StudentModel, load_student
from .teacher import Teacher

__all__ = [
    "MIN_VAL_MASKS",
    "Scores",
    "teacher_labels",
    "evaluate",
    "student_predictor",
    "current_student",
    "validate",
    "decide",
]

log = logging.getLogger(__name__)

MIN_VAL_MASKS = 4  # fewer held-out annotated tasks than this: no "better" comparison, no promotion

#: image (H, W, 3) uint8 RGB -> (H, W) int label indices (outside 0..K-1: no label)
Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Scores:
    """Validation mIoU of the three contenders (None: nothing to score, or no served student to compare)."""

    candidate: float | None
    teacher: float | None
    current: float | None
    current_version: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "teacher": self.teacher,
            "current": self.current,
            "current_version": self.current_version,
        }


def teacher_labels(teacher: Teacher, image: np.ndarray, short_side: int, min_conf: float) -> np.ndarray:
    """(H, W) int64 teacher labels of an (H, W, 3) uint8 image: argmax class, -1 below ``min_conf``. A
    teacher with a ``label_map`` (the MaskCLIP one) labels the image itself, as served (its preset's own
    resize); others get the image resized to ``short_side``."""
    label_map = getattr(teacher, "label_map", None)
    if label_map is not None:
        return label_map(image, min_conf)
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    if short_side:
        s = short_side / min(h, w)
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = teacher.probs(x).float()
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0]  # (C, H, W)
    conf, lab = probs.max(0)
    lab = lab.masked_fill(conf < min_conf, -1)
    return lab.cpu().numpy()


def evaluate(predict: Predictor, items: Sequence[Item], n_labels: int) -> float | None:
    """mIoU of ``predict`` against people's masks of ``items``; None without items or labelled pixels."""
    if not items:
        return None
    total = np.zeros((n_labels, n_labels + 1), np.int64)
    for it in items:
        assert it.labels is not None, "validation items carry people's labels"
        total += confusion_matrix(np.load(it.labels), predict(np.load(it.image)), n_labels)
    return mean_iou(total)


def student_predictor(model: StudentModel, opts: Any, classes: Sequence, background: Sequence) -> Predictor:
    """image -> (H, W) label indices in the order of ``classes`` (whatever the checkpoint's order)."""
    return lambda image: model.segment([image], classes, background, opts)[0].labels.astype(np.int64)


def current_student(s: Settings, classes: Sequence, background: Sequence, device: torch.device) -> StudentModel | None:
    """The served student if it exists, loads and has these labels (in any order); else None."""
    path = current_checkpoint(s)
    if path is None:
        return None
    try:
        model = load_student(path, device)
    except Exception as e:
        log.warning("served student %s cannot be loaded for comparison: %s", path, e)
        return None
    if not model.serves(classes, background):
        log.info("served student %s has other labels %s: not compared", model.version, model.labels)
        return None
    return model


def validate(
    s: Settings,
    candidate: StudentModel,
    teacher: Teacher,
    items: Sequence[Item],
    device: torch.device,
    opts: Any,
) -> Scores:
    """Score the candidate, the teacher and the served student on the held-out ``items``."""
    classes, background = candidate.classes, candidate.background
    n = len(classes)
    cand = evaluate(student_predictor(candidate, opts, classes, background), items, n)
    teach = evaluate(lambda img: teacher_labels(teacher, img, s.short_side or 0, s.min_confidence), items, n)
    current = current_student(s, classes, background, device)
    served = None if current is None else evaluate(student_predictor(current, opts, classes, background), items, n)
    return Scores(cand, teach, served, None if current is None else current.version)


def decide(
    promote: str, candidate: float | None, teacher: float | None, current: float | None, n_val: int
) -> tuple[bool, str]:
    """The promotion rule (see the module docstring). Returns (promote?, reason)."""
    if promote == "always":
        return True, "promoted: MASKCLIP_PROMOTE=always"
    if n_val < MIN_VAL_MASKS or candidate is None:
        return False, (
            f"not promoted: only {n_val} held-out annotated task(s) (< {MIN_VAL_MASKS}) to validate on; "
            "set MASKCLIP_PROMOTE=always to serve an unvalidated student"
        )
    rivals = {"teacher": teacher, "current student": current}
    best_name, best = max(
        ((k, v) for k, v in rivals.items() if v is not None), key=lambda kv: kv[1], default=("", None)
    )
    if best is None or candidate > best:
        return True, f"promoted: candidate mIoU {candidate:.4f} beats {best_name or 'nothing'} ({best})"
    return False, f"not promoted: candidate mIoU {candidate:.4f} <= {best_name} {best:.4f}"
