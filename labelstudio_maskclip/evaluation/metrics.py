"""The one segmentation metric of the package: mIoU as mmsegmentation computes it, and the ignore value.

Used by ``eval`` (benchmarks), by the trainer's validation (promotion compares these numbers) and by the
COCO export's semantic PNGs (:data:`IGNORE` marks unlabelled pixels).

Definition: one confusion matrix over every labelled pixel (ground truth in 0..K-1; :data:`IGNORE` and any
other value are not counted). IoU of class k = TP / (TP + FP + FN) where TP + FP + FN = ground-truth pixels
of k + pixels predicted k - TP, undefined (NaN) where that union is 0, i.e. k is in neither the ground
truth nor the prediction. mIoU = mean over the classes where it is defined. So a model that paints a
label absent from the ground truth gets IoU 0 for it, and the mean drops. A pixel with no prediction
(a value outside 0..K-1) is a miss of its ground-truth class.
"""

from __future__ import annotations

import math
from typing import TypedDict

import numpy as np

__all__ = ["IGNORE", "Scores", "confusion_matrix", "iou", "mean_iou", "scores"]

IGNORE = 255  # ground-truth value of a pixel nobody labelled (also 8-bit label PNGs' "no label")


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """(K, K + 1) int64 counts: row = ground-truth class, column = predicted class; the last column counts
    labelled pixels with no prediction (a prediction outside 0..K-1). Pixels whose ground truth is
    ``ignore_index`` or outside 0..K-1 are not counted. gt, pred: (H, W) integer arrays of one shape."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    k = num_classes
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    valid = (gt != ignore_index) & (gt >= 0) & (gt < k)
    pred = np.where((pred >= 0) & (pred < k), pred, k)
    return np.bincount(gt[valid] * (k + 1) + pred[valid], minlength=k * (k + 1)).reshape(k, k + 1)


def _areas(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TP, ground-truth area, predicted area), each (K,) float64, of a (K, K + 1) confusion matrix."""
    k = conf.shape[0]
    tp = np.diag(conf[:, :k]).astype(np.float64)
    return tp, conf.sum(1).astype(np.float64), conf[:, :k].sum(0).astype(np.float64)


def iou(conf: np.ndarray) -> np.ndarray:
    """(K,) IoU per class of a (K, K + 1) confusion matrix; NaN where the class is in neither ground truth
    nor prediction."""
    tp, gt_area, pred_area = _areas(conf)
    union = gt_area + pred_area - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float | None:
    """mIoU of a (K, K + 1) confusion matrix; None when no class is defined (no labelled pixel)."""
    values = iou(conf)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


class Scores(TypedDict):
    """Fractions: ``IoU`` and ``Acc`` (K,) with NaN where undefined, their nanmeans, overall accuracy."""

    IoU: np.ndarray
    Acc: np.ndarray
    mIoU: float
    mAcc: float
    aAcc: float


def scores(conf: np.ndarray) -> Scores:
    """Fractions from a (K, K + 1) confusion matrix: ``IoU`` and ``Acc`` (K,) with NaN where undefined,
    ``mIoU``, ``mAcc`` (nanmean, NaN when nothing is defined), ``aAcc``."""
    tp, gt_area, _ = _areas(conf)
    per_class = iou(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(gt_area > 0, tp / gt_area, np.nan)
    total = gt_area.sum()
    return {
        "IoU": per_class,
        "Acc": acc,
        "mIoU": _nanmean(per_class),
        "mAcc": _nanmean(acc),
        "aAcc": float(tp.sum() / total) if total else math.nan,
    }


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan
