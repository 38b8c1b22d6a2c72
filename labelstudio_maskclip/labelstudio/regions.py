"""Segmentations -> Label Studio prediction regions (brush RLE and polygons).

A prediction for one task is ``{"result": [...regions], "score": float, "model_version": str}``; each region
has the shape Label Studio stores (docs/label-studio.md, "Payloads"): ``from_name``, ``to_name``, ``type``,
``original_width/height``, ``image_rotation``, ``value``, ``score``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..engine.segmenter import Segmentation
from ..masks.brush import label_map_to_brush_rles, mask_to_brush_rle
from ..masks.polygons import mask_to_polygons, points_to_percent
from .labeling import Target

__all__ = ["prediction", "brush_region", "polygon_regions"]


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _base(target: Target, height: int, width: int, kind: str, score: float) -> dict[str, Any]:
    return {
        "id": _region_id(),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": round(float(score), 4),
        "readonly": False,
    }


def brush_region(target: Target, label: str, mask: np.ndarray, score: float) -> dict[str, Any]:
    """One ``brushlabels`` region for a (H, W) bool mask."""
    return _brush(target, label, mask_to_brush_rle(mask), mask.shape[0], mask.shape[1], score)


def _brush(target: Target, label: str, rle: list[int], height: int, width: int, score: float) -> dict[str, Any]:
    region = _base(target, height, width, target.result_type, score)
    region["value"] = {"format": "rle", "rle": rle, target.result_type: [label]}
    return region


def polygon_regions(target: Target, label: str, mask: np.ndarray, score: float) -> list[dict[str, Any]]:
    """One ``polygonlabels`` region per connected component of a (H, W) bool mask (outer contours)."""
    height, width = mask.shape
    regions = []
    for poly in mask_to_polygons(mask):
        region = _base(target, height, width, target.result_type, score)
        points = points_to_percent(poly, height, width)
        region["value"] = {"points": np.round(points, 3).tolist(), "closed": True, target.result_type: [label]}
        regions.append(region)
    return regions


def prediction(
    seg: Segmentation,
    targets: Sequence[Target],
    vocabulary: Sequence[str],
    model_version: str,
    *,
    min_area: float = 0.0,
    polygons: bool = True,
) -> dict[str, Any]:
    """A task's prediction from its segmentation.

    ``vocabulary[k]`` is the label value of the segmentation's class k. Each target (a BrushLabels or
    PolygonLabels control) gets regions for its own labels that are present and cover at least
    ``min_area`` of the image (a fraction). ``polygons=False`` skips PolygonLabels controls.
    """
    height, width = seg.labels.shape
    index = {label: k for k, label in enumerate(vocabulary)}
    min_pixels = min_area * height * width
    wanted = [
        (target, spec.value, k)
        for target in targets
        if target.kind == "brush" or polygons
        for spec in target.labels
        if 0 < seg.class_areas[k := index[spec.value]] >= min_pixels
    ]
    # Every brush mask from one pass over the label map (see label_map_to_brush_rles).
    brush_classes = sorted({k for target, _, k in wanted if target.kind == "brush"})
    rles = dict(zip(brush_classes, label_map_to_brush_rles(seg.labels, brush_classes)))
    result: list[dict[str, Any]] = []
    for target, value, k in wanted:
        score = float(seg.class_scores[k])
        if target.kind == "brush":
            result.append(_brush(target, value, rles[k], height, width, score))
        else:
            result.extend(polygon_regions(target, value, seg.mask(k), score))
    return {"result": result, "score": round(float(seg.score), 4), "model_version": model_version}
