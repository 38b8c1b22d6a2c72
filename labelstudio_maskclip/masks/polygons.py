"""Masks as polygons, and Label Studio's percent coordinates for them.

Polygons are (N, 2) float arrays of (x, y) in continuous pixel coordinates: pixel (row r, column c) covers
``c <= x < c + 1``, ``r <= y < r + 1``, so a polygon through pixel corners (0, 0), (W, 0), (W, H), (0, H)
covers the whole image. This is COCO's convention, and :func:`polygons_to_mask` rasterises with pycocotools.
Label Studio stores a polygon's ``value.points`` as [x, y] pairs in percent (0..100) of the image width and
height: see :func:`points_to_percent` and :func:`percent_to_points`.

Masks follow the package convention: ``(H, W)`` bool, row = y, column = x.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import BadInput

__all__ = [
    "PolygonError",
    "MAX_EDGE_PIXELS",
    "edge_pixels",
    "mask_to_polygons",
    "polygons_to_mask",
    "points_to_percent",
    "percent_to_points",
]


#: Default bound on :func:`edge_pixels` for one :func:`polygons_to_mask` call. pycocotools walks every
#: edge pixel by pixel at 5x resolution and holds the walk in memory: about 50 bytes and 0.3 us per pixel
#: of edge (measured), so this bound is about 200 MB and 1 s. A hand-drawn polygon's edges are a few
#: thousand pixels; 300k points zigzagging across a large image would be hundreds of millions.
MAX_EDGE_PIXELS = 4_000_000


class PolygonError(BadInput):
    """A polygon or mask given to this module has the wrong shape or values."""


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """Validate an (H, W) bool or integer mask (nonzero = in mask) and return it as (H, W) bool."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise PolygonError(f"mask must be an (H, W) array, got shape {mask.shape}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise PolygonError(f"mask must be bool or integer (nonzero = in mask), got {mask.dtype}; threshold it")
    return mask != 0


def _corner_grid(mask: np.ndarray) -> np.ndarray:
    """Each pixel as its closed square on a half-pixel grid: (2H + 1, 2W + 1) uint8 0/1.

    Grid point (i, j) is the continuous point (x, y) = (j / 2, i / 2): even indices are pixel corners, odd
    ones pixel centres. Outer contours of this grid run along pixel edges, not through pixel centres, and
    pixels that touch only at a corner stay connected (8-connectivity), as in the mask. Built as the pixel
    centres dilated by a 3 x 3 square (one OpenCV call).
    """
    import cv2

    height, width = mask.shape
    grid = np.zeros((2 * height + 1, 2 * width + 1), dtype=np.uint8)
    grid[1::2, 1::2] = mask
    return cv2.dilate(grid, np.ones((3, 3), np.uint8))


def mask_to_polygons(mask: np.ndarray, *, tolerance: float = 1.0, min_area: int = 16) -> list[np.ndarray]:
    """Outer boundaries of a mask's connected components (8-connected) as simplified polygons.

    ``mask``: (H, W) bool or integer (nonzero = in mask). ``tolerance``: Douglas-Peucker distance in pixels
    (0 keeps every corner of the pixel boundary). ``min_area``: components whose outline encloses fewer
    pixels are dropped. Holes are filled (Label Studio polygons have none); a component inside another's
    hole is covered by the outer one. Returns a list of (N, 2) float64 (x, y) arrays, N >= 3, in continuous
    pixel coordinates (see the module docstring), largest component first; [] for an empty mask.
    """
    import cv2

    if tolerance < 0:
        raise PolygonError(f"tolerance must be >= 0 pixels, got {tolerance}")
    mask = _as_mask(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return []
    top, left = rows[0], cols[0]  # trace inside the bounding box only, then shift back
    grid = _corner_grid(mask[top : rows[-1] + 1, left : cols[-1] + 1])  # (2h + 1, 2w + 1)
    contours, _ = cv2.findContours(
        grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(2 * int(left), 2 * int(top))
    )
    outlines = []
    for contour in contours:  # (K, 1, 2) int32 grid (x, y), lossless run compression
        area = cv2.contourArea(contour) / 4  # grid units are half pixels
        if area < min_area:
            continue
        simplified = cv2.approxPolyDP(contour, 2 * tolerance, True)  # (M, 1, 2)
        if len(simplified) < 3:  # a thin sliver collapsed to a segment: keep its exact outline
            simplified = contour
        outlines.append((area, simplified.reshape(-1, 2).astype(np.float64) / 2))  # (N, 2) pixel (x, y)
    outlines.sort(key=lambda item: -item[0])
    return [polygon for _, polygon in outlines]


def _as_polygon(polygon: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    """Validate an (N, 2) array-like of finite (x, y) and return it as (N, 2) float64."""
    points = np.asarray(polygon, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise PolygonError(f"{name} must be an (N, 2) list of [x, y] points, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise PolygonError(f"{name} has non-finite coordinates")
    return points


def edge_pixels(polygons: Sequence[np.ndarray | Sequence[Sequence[float]]]) -> int:
    """The work of rasterising ``polygons`` ((N, 2) pixel (x, y) each): the pixels along every closed
    polygon's edges, outside the image included, as pycocotools walks them (sum over edges of
    ``max(|dx|, |dy|) + 1``). Polygons with fewer than 3 points count 0 (they are skipped)."""
    total = 0.0
    for i, polygon in enumerate(polygons):
        points = _as_polygon(polygon, f"polygons[{i}]")
        if len(points) < 3:
            continue
        steps = np.abs(np.roll(points, -1, axis=0) - points).max(axis=1)  # (N,) per closed edge
        total += float(steps.sum()) + len(points)
    return int(min(total, 2**62))


def polygons_to_mask(
    polygons: Sequence[np.ndarray | Sequence[Sequence[float]]],
    height: int,
    width: int,
    *,
    max_edge_pixels: int | None = MAX_EDGE_PIXELS,
) -> np.ndarray:
    """Rasterise polygons to an (H, W) bool mask, exactly as COCO does (pycocotools ``frPyObjects``).

    ``polygons``: (N, 2) arrays or lists of (x, y) in continuous pixel coordinates. Each polygon is filled
    even-odd (what pycocotools does with a self-intersecting one), the polygons are united, parts outside
    the image are clipped. Polygons with fewer than 3 points enclose nothing and are skipped.
    ``max_edge_pixels``: refuse (:class:`PolygonError`, before anything is allocated) polygons whose
    :func:`edge_pixels` exceed this (None: no bound); see :data:`MAX_EDGE_PIXELS`.
    """
    from pycocotools import mask as coco_mask

    if height <= 0 or width <= 0:
        raise PolygonError(f"image size must be positive, got height={height}, width={width}")
    points = [_as_polygon(polygon, f"polygons[{i}]") for i, polygon in enumerate(polygons)]
    if max_edge_pixels is not None and (work := edge_pixels(points)) > max_edge_pixels:
        raise PolygonError(
            f"polygons have {work} pixels of edges to rasterise, more than the bound of {max_edge_pixels}"
        )
    # pycocotools reads a flat list of 4 numbers as a box, so only real polygons (>= 3 points) go in.
    flat = [polygon.reshape(-1).tolist() for polygon in points if len(polygon) >= 3]  # [x0, y0, x1, ...]
    if not flat:
        return np.zeros((height, width), dtype=bool)
    rles = coco_mask.frPyObjects(flat, height, width)
    mask = coco_mask.decode(coco_mask.merge(rles, intersect=False))  # (H, W) uint8, column-major
    return np.ascontiguousarray(mask, dtype=bool)


def points_to_percent(polygon: np.ndarray | Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Pixel (x, y) points (N, 2) to Label Studio's percent of width and height (N, 2) float64, 0..100."""
    if height <= 0 or width <= 0:
        raise PolygonError(f"image size must be positive, got height={height}, width={width}")
    return _as_polygon(polygon, "polygon") * (100.0 / np.array([width, height], dtype=np.float64))


def percent_to_points(points: np.ndarray | Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Label Studio's ``value.points`` (N, 2) percent of width and height to pixel (x, y) (N, 2) float64."""
    if height <= 0 or width <= 0:
        raise PolygonError(f"image size must be positive, got height={height}, width={width}")
    return _as_polygon(points, "points") * (np.array([width, height], dtype=np.float64) / 100.0)
