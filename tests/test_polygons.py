"""Polygons: mask -> polygons -> mask round trips (COCO's rasteriser), Label Studio percent coordinates."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from labelstudio_maskclip.masks import polygons as polygons_module
from labelstudio_maskclip.masks.polygons import (
    PolygonError,
    mask_to_polygons,
    percent_to_points,
    points_to_percent,
    polygons_to_mask,
)
from tests.photos import COCO128


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def disc(height: int, width: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region not 4-connected to the border filled."""
    padded = np.ascontiguousarray(np.pad(mask, 1).astype(np.uint8))
    cv2.floodFill(padded, np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8), (0, 0), 2)
    return (padded != 2)[1:-1, 1:-1]


@pytest.fixture(scope="module")
def coco_instances() -> list[np.ndarray]:
    """Real COCO instance masks (first 30 label files of COCO128) at image size."""
    masks = []
    for label in sorted((COCO128 / "labels").glob("*.txt"))[:30]:
        image = COCO128 / "images" / (label.stem + ".jpg")
        if not image.exists():
            continue
        width, height = Image.open(image).size
        for line in label.read_text().splitlines():
            points = np.array(line.split()[1:], dtype=float).reshape(-1, 2) * [width, height]
            masks.append(polygons_to_mask([points], height, width))
    assert len(masks) > 150, f"COCO128 not found under {COCO128}"
    return masks


def test_public_api() -> None:
    assert sorted(polygons_module.__all__) == sorted(
        [
            "PolygonError",
            "mask_to_polygons",
            "polygons_to_mask",
            "points_to_percent",
            "percent_to_points",
            "MAX_EDGE_PIXELS",
            "edge_pixels",
        ]
    )


def test_rectangles_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = rng.integers(5, 80, size=2)
        top, left = rng.integers(0, height - 1), rng.integers(0, width - 1)
        bottom, right = rng.integers(top + 1, height + 1), rng.integers(left + 1, width + 1)
        mask = np.zeros((height, width), bool)
        mask[top:bottom, left:right] = True
        polygons = mask_to_polygons(mask, min_area=1)
        assert len(polygons) == 1 and len(polygons[0]) == 4
        assert sorted(map(tuple, polygons[0])) == sorted([(left, top), (right, top), (left, bottom), (right, bottom)])
        np.testing.assert_array_equal(polygons_to_mask(polygons, height, width), mask)


def test_discs_round_trip_closely() -> None:
    for radius in (6, 20, 150):
        mask = disc(400, 380, 200, 190, radius)
        polygons = mask_to_polygons(mask)
        assert len(polygons) == 1
        assert len(polygons[0]) < 4 * radius  # simplified, not one vertex per boundary pixel
        assert iou(polygons_to_mask(polygons, 400, 380), mask) > (0.95 if radius > 6 else 0.9)


def test_coco128_masks_round_trip_exactly_without_simplification(coco_instances: list[np.ndarray]) -> None:
    for mask in coco_instances:
        polygons = mask_to_polygons(mask, tolerance=0, min_area=0)
        np.testing.assert_array_equal(polygons_to_mask(polygons, *mask.shape), fill_holes(mask))


def test_coco128_masks_round_trip_with_default_simplification(coco_instances: list[np.ndarray]) -> None:
    ious = {}
    for k, mask in enumerate(coco_instances):
        if mask.sum() >= 100:
            ious[k] = iou(polygons_to_mask(mask_to_polygons(mask), *mask.shape), mask)
    large = [v for k, v in ious.items() if coco_instances[k].sum() >= 4000]
    assert len(large) > 50 and min(large) > 0.95
    assert np.mean(list(ious.values())) > 0.95


def test_components_are_separate_largest_first_and_holes_filled() -> None:
    mask = disc(100, 200, 50, 140, 40)
    mask[10:30, 10:40] = True  # a second, smaller component
    ring = mask.copy()
    ring[45:55, 135:145] = False  # a hole in the disc
    polygons = mask_to_polygons(ring)
    assert len(polygons) == 2
    assert polygons[0][:, 0].min() > 90 and polygons[1][:, 0].max() <= 40
    assert iou(polygons_to_mask(polygons, 100, 200), mask) > 0.97


def test_empty_mask_and_tiny_components() -> None:
    assert mask_to_polygons(np.zeros((30, 40), bool)) == []
    mask = np.zeros((30, 40), np.uint8)
    mask[2:5, 2:5] = 1  # 9 pixels
    mask[20:25, 20:25] = 7  # 25 pixels, nonzero = in mask
    kept = mask_to_polygons(mask)  # min_area 16
    assert len(kept) == 1 and kept[0][:, 0].min() == 20
    assert len(mask_to_polygons(mask, min_area=1)) == 2
    assert len(mask_to_polygons(mask, min_area=26)) == 0
    square = np.zeros((30, 40), bool)
    square[2:6, 2:6] = True  # exactly 16 pixels: the default min_area keeps it
    assert len(mask_to_polygons(square)) == 1


def test_one_pixel_wide_lines_and_diagonals_keep_a_polygon() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5, 2:38] = True  # 36 x 1: Douglas-Peucker at 1 px would collapse it to a segment
    np.fill_diagonal(mask[10:, :], True)  # 30 pixels touching at corners: one 8-connected component
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2 and all(len(p) >= 3 for p in polygons)
    np.testing.assert_array_equal(polygons_to_mask(polygons, 40, 40) | mask, polygons_to_mask(polygons, 40, 40))


def test_polygons_to_mask_unites_clips_and_skips_degenerate_polygons() -> None:
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    shifted = np.array(square) + 5
    outside = [[15, -5], [30, -5], [30, 3], [15, 3]]  # partly outside a 20 x 20 image
    mask = polygons_to_mask([square, shifted, outside, [[1, 1], [2, 2]]], 20, 20)
    expected = np.zeros((20, 20), bool)
    expected[0:10, 0:10] = expected[5:15, 5:15] = expected[0:3, 15:20] = True
    np.testing.assert_array_equal(mask, expected)
    assert not polygons_to_mask([], 5, 6).any() and polygons_to_mask([], 5, 6).shape == (5, 6)
    assert not polygons_to_mask([[[0, 0], [4, 4]]], 5, 6).any()  # 2 points: not read as a box


def test_percent_round_trip_and_values() -> None:
    polygon = np.array([[0.0, 0.0], [640.0, 0.0], [320.0, 480.0]])
    percent = points_to_percent(polygon, height=480, width=640)
    np.testing.assert_allclose(percent, [[0, 0], [100, 0], [50, 100]])
    np.testing.assert_allclose(percent_to_points(percent, 480, 640), polygon)
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 100, size=(50, 2))
    np.testing.assert_allclose(points_to_percent(percent_to_points(points.tolist(), 333, 517), 333, 517), points)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: points_to_percent([[1, 2, 3]], 10, 10), r"\(N, 2\)"),
        (lambda: percent_to_points([[1, float("nan")]], 10, 10), "non-finite"),
        (lambda: points_to_percent([[1, 2]], 0, 10), "positive"),
        (lambda: points_to_percent([[1, 2]], 10, 0), "positive"),
        (lambda: percent_to_points([[1, 2]], 0, 10), "positive"),
        (lambda: percent_to_points([[1, 2]], 10, 0), "positive"),
        (lambda: polygons_to_mask([[[0, 0], [1, 0], [1, 1]]], 10, -1), "positive"),
        (lambda: polygons_to_mask([[[0, 0], [1, 0], [1, 1]]], 0, 10), "positive"),
        (lambda: polygons_to_mask([[[0, 0], [1, 0], [1, 1]]], 10, 0), "positive"),
        (lambda: polygons_to_mask([[0, 0, 1, 0, 1, 1]], 10, 10), r"polygons\[0\]"),
        (lambda: mask_to_polygons(np.zeros((3, 3, 3), bool)), "shape"),
        (lambda: mask_to_polygons(np.zeros((3, 3), float)), "bool or integer"),
        (lambda: mask_to_polygons(np.zeros((3, 3), bool), tolerance=-1), "tolerance"),
    ],
)
def test_bad_inputs_raise(call, message: str) -> None:
    with pytest.raises(PolygonError, match=message):
        call()


def test_one_pixel_images_are_valid() -> None:
    np.testing.assert_allclose(points_to_percent([[1, 1]], 1, 1), [[100, 100]])
    np.testing.assert_allclose(percent_to_points([[100, 100]], 1, 1), [[1, 1]])
    assert polygons_to_mask([[[0, 0], [1, 0], [1, 1], [0, 1]]], 1, 1).tolist() == [[True]]


def test_a_triangle_is_a_polygon_not_a_degenerate_one() -> None:
    mask = polygons_to_mask([[[0, 0], [10, 0], [0, 10]]], 12, 12)  # 3 points: the fewest a polygon has
    assert 40 <= mask.sum() <= 60 and mask[1, 1] and not mask[9, 9]


@pytest.mark.parametrize("flip", [False, True])
def test_components_come_largest_first_wherever_they_are(flip: bool) -> None:
    mask = np.zeros((60, 60), bool)
    mask[2:6, 2:6] = True  # 16 px
    mask[20:40, 20:40] = True  # 400 px
    mask[50:58, 45:58] = True  # 104 px
    mask = mask[::-1, ::-1] if flip else mask  # the same shapes found in the opposite scan order
    areas = [polygons_to_mask([p], 60, 60).sum() for p in mask_to_polygons(mask, min_area=1)]
    assert areas == [400, 104, 16]


def test_edge_pixels_count_each_closed_edge_as_pycocotools_walks_it() -> None:
    quad = [[0, 0], [8, 0], [8, 3], [0, 5]]  # edges 8, 3, 8 (dx), 5 (closing): 24 + one per point
    assert polygons_module.edge_pixels([quad]) == 28
    assert polygons_module.edge_pixels([[[0, 0], [3.5, 0], [0, 2]]]) == 12  # 3.5 + 3.5 + 2 + 3
    assert polygons_module.edge_pixels([[[0, 0], [5, 5]], quad, [[1, 1]], quad]) == 56  # short ones count 0
    assert polygons_module.edge_pixels([]) == 0
    assert polygons_module.edge_pixels([[[0, 0], [1e300, 0], [0, 1e300]]]) == 2**62  # capped, still an int


def test_polygons_past_the_edge_bound_are_refused_before_rasterising() -> None:
    quad = [[0, 0], [8, 0], [8, 3], [0, 5]]  # 28 pixels of edges
    assert polygons_to_mask([quad], 6, 9, max_edge_pixels=28).sum() > 0  # exactly the bound: accepted
    with pytest.raises(PolygonError, match="28 pixels of edges to rasterise, more than the bound of 27"):
        polygons_to_mask([quad], 6, 9, max_edge_pixels=27)
    assert polygons_to_mask([quad], 6, 9, max_edge_pixels=None).sum() > 0
    # The default bound, 4,000,000: a triangle of 1,333,333 + 1,333,333 + 1,333,332 + 3 = 4,000,001 is refused.
    with pytest.raises(PolygonError, match="4000001 pixels of edges to rasterise, more than the bound of 4000000"):
        polygons_to_mask([[[0, 0], [1_333_333, 0], [0, 1_333_332]]], 10, 10)


def _distance_to_outline(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(N,) distance of each (x, y) point to the closed polygon's nearest edge."""
    a, b = polygon, np.roll(polygon, -1, axis=0)  # (M, 2) edge ends
    ab = b - a
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)  # (N, M)
    nearest = a + t[..., None] * ab
    return np.linalg.norm(points[:, None] - nearest, axis=-1).min(1)


def test_simplification_stays_within_its_tolerance_of_the_pixel_outline() -> None:
    mask = disc(170, 170, 84.5, 84.5, 80)
    (exact,) = mask_to_polygons(mask, tolerance=0)
    (simple,) = mask_to_polygons(mask, tolerance=1.0)
    off = _distance_to_outline(exact, simple)
    assert len(simple) < len(exact) / 3
    assert 0.5 < off.max() <= 1.0  # the tolerance is in pixels (1.5 would put corners 1.47 px off here)


def test_an_outline_that_simplifies_to_three_corners_is_a_triangle() -> None:
    mask = polygons_to_mask([[[0, 0], [60, 0], [0, 60]]], 61, 61)  # a staircase hypotenuse
    (outline,) = mask_to_polygons(mask, tolerance=2.0)
    assert len(outline) == 3
    assert iou(polygons_to_mask([outline], 61, 61), mask) > 0.95
