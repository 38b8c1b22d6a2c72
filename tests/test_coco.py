"""COCO export: the RLE codec pair, a real-data round trip through webhooks and the store, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from labelstudio_maskclip.labelstudio.webhooks import handle_event
from labelstudio_maskclip.learning import export as coco
from labelstudio_maskclip.learning.export import (
    CocoError,
    export_coco,
    export_semantic_pngs,
    image_file_name,
    write_coco,
)
from labelstudio_maskclip.learning.store import Sample, Store
from labelstudio_maskclip.masks.brush import mask_to_brush_rle
from tests.photos import COCO128

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2
DATA = COCO128
CLASSES = (DATA / "classes.txt").read_text().split("\n")[:80]


def label_config(labels: list[str]) -> str:
    inner = "".join(f'<Label value="{name}"/>' for name in labels)
    return (
        f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{inner}</BrushLabels></View>'
    )


def coco128_ground_truth(count: int) -> list[tuple[int, str, int, int, dict[str, np.ndarray]]]:
    """(task id, image name, height, width, label -> union of its polygons rasterised by pycocotools)."""
    out = []
    for index, label_file in enumerate(sorted((DATA / "labels").glob("*.txt"))):
        image_file = DATA / "images" / f"{label_file.stem}.jpg"
        if not image_file.exists():
            continue
        with Image.open(image_file) as image:
            width, height = image.size
        masks: dict[str, np.ndarray] = {}
        for line in label_file.read_text().splitlines():
            values = line.split()
            label = CLASSES[int(values[0])]
            xy = np.asarray(values[1:], dtype=float).reshape(-1, 2) * [width, height]  # (N, 2) pixels
            rle = mask_utils.merge(mask_utils.frPyObjects([xy.ravel().tolist()], height, width))
            mask = mask_utils.decode(rle).astype(bool)
            masks[label] = masks[label] | mask if label in masks else mask
        out.append((100 + index, image_file.name, height, width, masks))
        if len(out) == count:
            return out
    raise AssertionError("coco128-seg has fewer images than asked for")


def created_event(task_id: int, image: str, height: int, width: int, masks: dict, labels: list[str]) -> dict:
    """An ANNOTATION_CREATED body as Label Studio 1.23 sends it, one brush region per label."""
    result = [
        {
            "id": f"r{k}",
            "from_name": "tag",
            "to_name": "image",
            "type": "brushlabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
        }
        for k, (label, mask) in enumerate(masks.items())
    ]
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": task_id * 10,
            "result": result,
            "was_cancelled": False,
            "ground_truth": False,
            "lead_time": 12.5,
            "parent_prediction": None,
            "completed_by": 1,
            "task": task_id,
            "project": 1,
            "created_at": "2026-11-02T10:00:00.000000Z",
            "updated_at": "2026-11-02T10:00:00.000000Z",
        },
        "project": {"id": 1, "label_config": label_config(labels)},
        "task": {"id": task_id, "data": {"image": f"/data/upload/1/{image}"}, "project": 1},
    }


@pytest.fixture(scope="module")
def ground_truth() -> list:
    return coco128_ground_truth(12)


# --- real data round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["instance", "semantic"])
def test_coco128_webhooks_to_coco_file_round_trip(tmp_path: Path, ground_truth: list, mode: str) -> None:
    store = Store(tmp_path / "model_dir")
    labels = sorted({label for *_, masks in ground_truth for label in masks}, key=CLASSES.index)
    for task_id, name, height, width, masks in ground_truth:
        result = handle_event(created_event(task_id, name, height, width, masks, labels), store)
        assert (result.status, result.rejected) == ("stored", [])
    path = write_coco(export_coco(store, labels, mode=mode), tmp_path / "export" / "coco.json")
    assert [p.name for p in path.parent.iterdir()] == ["coco.json"]  # no temporary file left behind
    dataset = COCO(str(path))
    assert [c["name"] for c in dataset.loadCats(dataset.getCatIds())] == labels
    assert dataset.getCatIds() == list(range(1, len(labels) + 1))
    for task_id, name, height, width, masks in ground_truth:
        (image,) = dataset.loadImgs([task_id])
        assert (image["file_name"], image["height"], image["width"]) == (name, height, width)
        for label, expected in masks.items():
            (category,) = dataset.getCatIds(catNms=[label])
            anns = dataset.loadAnns(dataset.getAnnIds(imgIds=[task_id], catIds=[category]))
            union = np.zeros((height, width), bool)
            for ann in anns:
                part = dataset.annToMask(ann).astype(bool)
                assert ann["area"] == part.sum() and ann["iscrowd"] == 0
                x, y, w, h = ann["bbox"]
                ys, xs = np.nonzero(part)
                assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                union |= part
            np.testing.assert_array_equal(union, expected, err_msg=f"{name} {label}")
            if mode == "semantic":
                assert len(anns) == 1
        assert len(dataset.getAnnIds(imgIds=[task_id])) >= len(masks)


def test_instance_mode_splits_connected_regions() -> None:
    mask = np.zeros((10, 20), bool)
    mask[1:3, 1:3] = True
    mask[5:9, 10:19] = True
    mask[3, 3] = True  # touches the first square diagonally: same 8-connected region
    sample = Sample(task_id=1, annotation_id=1, project=1, image="a.png", height=10, width=20, masks={"cat": mask})
    instance = export_coco([sample], ["cat"], mode="instance")
    assert sorted(a["area"] for a in instance["annotations"]) == [5, 36]
    assert [a["id"] for a in instance["annotations"]] == [1, 2]
    assert len(export_coco([sample], ["cat"], mode="semantic")["annotations"]) == 1
    assert export_coco([sample], ["dog"])["annotations"] == []  # labels outside the categories are left out
    with pytest.raises(CocoError, match="mode"):
        export_coco([sample], ["cat"], mode="panoptic")  # type: ignore[arg-type]


def test_polygon_export_is_close_to_the_masks(ground_truth: list) -> None:
    labels = sorted({label for *_, masks in ground_truth for label in masks}, key=CLASSES.index)
    samples = [
        Sample(task_id=t, annotation_id=t, project=1, image=n, height=h, width=w, masks=m)
        for t, n, h, w, m in ground_truth[:4]
    ]
    dataset = COCO()
    dataset.dataset = export_coco(samples, labels, mode="instance", polygons=True)
    dataset.createIndex()
    for sample in samples:
        for label, expected in sample.masks.items():
            ids = dataset.getAnnIds(imgIds=[sample.task_id], catIds=[labels.index(label) + 1])
            anns = dataset.loadAnns(ids)
            assert all(isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6 for a in anns)
            union = np.zeros_like(expected)
            for ann in anns:
                union |= dataset.annToMask(ann).astype(bool)
            iou = (union & expected).sum() / (union | expected).sum()
            assert iou > 0.85, (sample.image, label, iou)  # traced polygons are lossy, but close


def test_semantic_pngs(tmp_path: Path) -> None:
    cat = np.zeros((6, 8), bool)
    cat[1:4, 1:4] = True
    dog = np.zeros((6, 8), bool)
    dog[3:5, 3:7] = True
    samples = [
        Sample(
            task_id=1,
            annotation_id=1,
            project=1,
            image="/data/upload/1/a.jpg",
            height=6,
            width=8,
            masks={"dog": dog, "cat": cat, "bird": np.ones((6, 8), bool)},
        ),
        Sample(task_id=2, annotation_id=2, project=1, image="s3://b/a.jpg", height=6, width=8, masks={}),
    ]
    paths = export_semantic_pngs(samples, ["cat", "dog"], tmp_path)
    assert [p.name for p in paths] == ["a.png", "2_a.png"]
    pixels = np.asarray(Image.open(paths[0]))
    expected = np.full((6, 8), 255, np.uint8)
    expected[cat] = 0
    expected[dog] = 1  # later category wins where they overlap
    np.testing.assert_array_equal(pixels, expected)
    assert (np.asarray(Image.open(paths[1])) == 255).all()
    assert (tmp_path / "classes.txt").read_text() == "cat\ndog\n"


def test_run_export_writes_json_and_pngs(tmp_path: Path, ground_truth: list) -> None:
    store = Store(tmp_path / "model_dir")
    labels = sorted({label for *_, masks in ground_truth for label in masks}, key=CLASSES.index)
    for task_id, name, height, width, masks in ground_truth[:3]:
        handle_event(created_event(task_id, name, height, width, masks, labels), store)
    summary = coco.run_export(store, labels, tmp_path / "out" / "coco.json", mode="semantic", png_dir=tmp_path / "png")
    assert summary["images"] == 3 and summary["pngs"] == 3
    assert summary["annotations"] == sum(len(m) for *_, m in ground_truth[:3])
    assert coco.run_export(store, labels, tmp_path / "other.json", project=2)["images"] == 0


def test_write_coco_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "coco.json"
    write_coco({"images": [1]}, target)
    write_coco({"images": [2]}, target)
    assert json.loads(target.read_text()) == {"images": [2]}
    assert [p.name for p in tmp_path.iterdir()] == ["coco.json"]


def test_public_surface() -> None:
    assert all(hasattr(coco, name) for name in coco.__all__)


def test_image_file_names() -> None:
    assert image_file_name("/data/upload/1/e6cf8185-cat.png") == "e6cf8185-cat.png"
    assert image_file_name("/data/local-files/?d=photos/a%20b.jpg") == "a b.jpg"
    assert image_file_name("s3://bucket/k/x.jpg") == "x.jpg"
    assert image_file_name("https://host/img/y.jpeg?token=1") == "y.jpeg"
    assert image_file_name("data:image/png;base64,AAAA", fallback="task-3") == "task-3"


# --- what mutation testing found unchecked (docs/mutation.md) ------------------------------------------------


def _sample(task_id: int, image: str, masks: dict[str, np.ndarray], height: int = 10, width: int = 20) -> Sample:
    return Sample(
        task_id=task_id, annotation_id=task_id, project=1, image=image, height=height, width=width, masks=masks
    )


def _square(top: int, left: int, side: int, shape: tuple[int, int] = (10, 20)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_the_export_carries_the_coco_format_records_that_readers_look_up(capsys) -> None:
    """Top level, image, category and annotation records with COCO's keys (pycocotools' ``COCO.info()`` reads
    ``info``; dataset tools read ``licenses`` and ``supercategory``), and each image's Label Studio reference."""
    samples = [_sample(7, "/data/upload/1/a.png", {"cat": _square(1, 1, 3)})]
    exported = export_coco(samples, ["cat", "dog"])
    assert set(exported) == {"info", "licenses", "images", "annotations", "categories"}
    assert exported["info"] == {"description": "labelstudio-maskclip export", "version": "1.0"}
    assert exported["licenses"] == []
    assert exported["categories"] == [
        {"id": 1, "name": "cat", "supercategory": ""},
        {"id": 2, "name": "dog", "supercategory": ""},
    ]
    assert exported["images"] == [
        {"id": 7, "file_name": "a.png", "width": 20, "height": 10, "label_studio_image": "/data/upload/1/a.png"}
    ]
    (annotation,) = exported["annotations"]
    assert set(annotation) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
    dataset = COCO()
    dataset.dataset = exported
    dataset.createIndex()
    capsys.readouterr()
    dataset.info()
    assert "description: labelstudio-maskclip export" in capsys.readouterr().out


def test_every_label_of_the_categories_is_exported_whatever_comes_before_it() -> None:
    """A label outside the categories, an empty mask, or a speck too small to trace as a polygon is left out
    alone: the labels and objects after it are still exported."""
    masks = {"bird": _square(0, 0, 2), "cat": np.zeros((10, 20), bool), "dog": _square(5, 10, 4)}
    for mode in ("instance", "semantic"):
        exported = export_coco([_sample(1, "a.png", masks)], ["cat", "dog"], mode=mode)  # type: ignore[arg-type]
        assert [(a["category_id"], a["area"]) for a in exported["annotations"]] == [(2, 16)], mode
    speck_first = _square(0, 0, 1) | _square(4, 4, 5)  # a one-pixel object above a 5 x 5 one
    exported = export_coco([_sample(1, "a.png", {"cat": speck_first, "dog": _square(5, 12, 5)})], ["cat", "dog"],
                           polygons=True)  # fmt: skip
    assert [(a["category_id"], a["area"]) for a in exported["annotations"]] == [(1, 25), (2, 25)]


def test_duplicate_categories_are_refused_with_their_names() -> None:
    with pytest.raises(CocoError, match=r"categories contain duplicates: \['cat', 'dog', 'cat'\]"):
        export_coco([], ["cat", "dog", "cat"])


def test_file_names_stay_unique_and_an_image_without_a_name_is_named_by_its_task(tmp_path: Path) -> None:
    mask = {"cat": _square(1, 1, 3)}
    samples = [
        _sample(1, "/data/upload/1/a.png", mask),
        _sample(2, "s3://bucket/a.png", mask),
        _sample(3, "https://host/a.png", mask),
        _sample(4, "data:image/png;base64,AAAA", mask),
    ]
    names = [image["file_name"] for image in export_coco(samples, ["cat"])["images"]]
    assert names == ["a.png", "2_a.png", "3_a.png", "task-4"]
    pngs = export_semantic_pngs(samples, ["cat"], tmp_path)
    assert [p.name for p in pngs] == ["a.png", "2_a.png", "3_a.png", "task-4.png"]


def test_semantic_pngs_follow_the_categories_order_and_take_masks_as_pycocotools_decodes_them(tmp_path: Path) -> None:
    """The later category wins an overlap whatever the names' alphabetical order; uint8 0/1 masks (what
    ``pycocotools.mask.decode`` gives) paint the same pixels as bool ones; the folder is made with its parents."""
    dog, cat = _square(1, 1, 4), _square(3, 3, 4)
    expected = np.full((10, 20), 255, np.uint8)
    expected[dog] = 0
    expected[cat] = 1  # "cat" is after "dog" in the categories
    for dtype in (bool, np.uint8):
        sample = _sample(1, "a.png", {"cat": cat.astype(dtype), "dog": dog.astype(dtype)})
        (path,) = export_semantic_pngs([sample], ["dog", "cat"], tmp_path / str(np.dtype(dtype)) / "pngs")
        np.testing.assert_array_equal(np.asarray(Image.open(path)), expected, err_msg=str(dtype))


def test_semantic_pngs_hold_at_most_255_categories(tmp_path: Path) -> None:
    names = [f"label {k}" for k in range(256)]
    sample = _sample(1, "a.png", {"label 254": _square(1, 1, 3)})
    (path,) = export_semantic_pngs([sample], names[:255], tmp_path)  # values 0..254, 255 = unlabelled
    assert np.asarray(Image.open(path))[2, 2] == 254
    with pytest.raises(CocoError, match="256 categories do not fit 8-bit PNGs with 255 as ignore"):
        export_semantic_pngs([sample], names, tmp_path)


def test_run_export_writes_lossless_rle_unless_polygons_are_asked_for(tmp_path: Path) -> None:
    store = Store(tmp_path / "model_dir")
    mask = _square(2, 2, 6, (20, 30))
    assert handle_event(created_event(5, "a.png", 20, 30, {"cat": mask}, ["cat"]), store).status == "stored"
    out = tmp_path / "out" / "coco.json"
    summary = coco.run_export(store, ["cat"], out)
    assert summary == {"path": str(out), "images": 1, "annotations": 1}
    (annotation,) = json.loads(out.read_text())["annotations"]
    assert isinstance(annotation["segmentation"], dict)  # RLE: the mask exactly
    np.testing.assert_array_equal(mask_utils.decode(annotation["segmentation"]).astype(bool), mask)
    coco.run_export(store, ["cat"], out, polygons=True)
    (annotation,) = json.loads(out.read_text())["annotations"]
    assert isinstance(annotation["segmentation"], list) and len(annotation["segmentation"][0]) >= 6


def test_a_reference_ending_in_a_slash_is_named_by_its_last_part() -> None:
    assert image_file_name("https://host/api/images/42/") == "42"
    assert image_file_name("/data/local-files/?d=scans/INDEX") == "INDEX"  # only slashes are stripped
    assert image_file_name("") == "image"  # the default fallback
