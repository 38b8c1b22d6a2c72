"""Evaluation: the mIoU arithmetic by hand, dataset readers on fake trees, end-to-end runs with a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from labelstudio_maskclip.evaluation import class_names as cn
from labelstudio_maskclip.evaluation import evaluate as ev
from labelstudio_maskclip.settings import Settings
from tests.photos import COCO128, VOC_SAMPLES
from tests.tiny import TINY_VIT


def _png(path: Path, array: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array.astype(np.uint8))
    if palette:  # like VOC's SegmentationClass files: mode P, the index is the label
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def _jpg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


# --- metrics by hand ----------------------------------------------------------------------------------


def test_confusion_matrix_and_scores_by_hand():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 255]])  # ignored pixel predicted 0: not counted; 255 = no prediction
    conf = ev.confusion_matrix(gt, pred, 4)
    expected = np.array([[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(conf, expected)
    s = ev.scores(conf)
    np.testing.assert_allclose(s["IoU"][:3], [1 / 2, 2 / 3, 0.0])  # class 2: union 1 (its unpredicted pixel)
    assert math.isnan(s["IoU"][3])  # in neither ground truth nor prediction: excluded
    assert s["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    np.testing.assert_allclose(s["Acc"][:3], [1 / 2, 1.0, 0.0])
    assert math.isnan(s["Acc"][3]) and s["mAcc"] == pytest.approx(0.5)
    assert s["aAcc"] == pytest.approx(3 / 5)


def test_class_only_in_prediction_counts_as_zero_and_bad_gt_is_ignored():
    conf = ev.confusion_matrix(np.array([0, 0, 7, 255]), np.array([0, 3, 3, 3]), 4)  # gt 7 >= K: ignored
    s = ev.scores(conf)
    assert s["IoU"][3] == 0.0 and math.isnan(s["Acc"][3])  # false positives only: union 1, IoU 0
    assert s["IoU"][0] == pytest.approx(1 / 2)
    assert s["mIoU"] == pytest.approx(1 / 4)  # classes 1, 2: NaN
    with pytest.raises(ValueError, match="shape"):
        ev.confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)


def test_reduce_zero_label_like_mmseg():
    raw = np.array([0, 1, 2, 20, 21, 255])
    np.testing.assert_array_equal(ev.gt_labels(raw, 20, True), [255, 0, 1, 19, 255, 255])
    np.testing.assert_array_equal(ev.gt_labels(raw, 21, False), [0, 1, 2, 20, 255, 255])


def test_rescale_follows_mmcv_keep_ratio():
    assert ev.rescaled_short_side(375, 500, (2048, 512)) == 512
    assert ev.rescaled_short_side(375, 500, (520, 520)) == 390  # a (520, 520) scale caps the long side
    assert ev.rescaled_short_side(375, 500, (2048, 520)) == 520  # Context: short side 520
    assert ev.rescaled_short_side(1024, 2048, (2048, 512)) == 512
    assert ev.rescaled_short_side(100, 3000, (2048, 448)) == 68  # long side capped at 2048


# --- a synthetic folder with a known predictor: exact numbers -----------------------------------------


def _synthetic_folder(root: Path) -> None:
    """Two 4 x 4 images; the red channel encodes the prediction (60 * label, 250 = no prediction)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\ncar, automobile\nroad\nboat\n\n")
    gt_a = np.zeros((4, 4))
    pred_a = np.array([[0, 0, 1, 1]] * 4)
    gt_b = np.array([[1] * 4, [1] * 4, [255] * 4, [2] * 4])
    pred_b = np.ones((4, 4))
    for name, gt, pred in (("a", gt_a, pred_a), ("b", gt_b, pred_b)):
        img = np.zeros((4, 4, 3), np.uint8)
        img[..., 0] = pred * 60
        _png(root / "images" / f"{name}.png", img)
        _png(root / "masks" / f"{name}.png", gt)


def _red_channel_predictor(image: np.ndarray) -> np.ndarray:
    return np.where(image[..., 0] == 250, 255, image[..., 0] // 60)


def test_known_predictor_gives_exact_miou(tmp_path):
    _synthetic_folder(tmp_path / "ds")
    ds = ev.load_dataset("folder", tmp_path / "ds")
    assert ds.classes == (("sky",), ("car", "automobile"), ("road",), ("boat",)) and ds.background is None
    m = ev.evaluate(ds, _red_channel_predictor, tmp_path / "out", overlays=1, progress=False, meta={"protocol": "x"})
    # gt sky 16 px: 8 right; car 8 px: 8 right; road 4 px: predicted car. Predicted car: 20 px.
    # IoU sky 8/16, car 8/(8 + 20 - 8), road 0/4, boat absent -> mIoU (0.5 + 0.4 + 0) / 3
    assert m["IoU"] == {"sky": 50.0, "car": 40.0, "road": 0.0, "boat": None}
    assert m["mIoU"] == pytest.approx(30.0) and m["aAcc"] == pytest.approx(100 * 16 / 28, abs=1e-4)
    assert m["Acc"] == {"sky": 50.0, "car": 100.0, "road": 0.0, "boat": None} and m["mAcc"] == 50.0
    assert m["n_images"] == 2 and m["protocol"] == "x" and m["dataset"] == "folder"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == m
    saved = np.array(Image.open(tmp_path / "out" / "predictions" / "b.png"))
    np.testing.assert_array_equal(saved, np.ones((4, 4)))
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["a.png"]


def test_no_prediction_pixels_are_false_negatives_and_saved_as_255(tmp_path):
    _synthetic_folder(tmp_path / "ds")
    ds = ev.load_dataset("folder", tmp_path / "ds")
    m = ev.evaluate(ds, lambda img: np.full(img.shape[:2], 255), tmp_path / "out", overlays=0, progress=False)
    assert m["IoU"] == {"sky": 0.0, "car": 0.0, "road": 0.0, "boat": None} and m["aAcc"] == 0.0
    assert (np.array(Image.open(tmp_path / "out" / "predictions" / "a.png")) == 255).all()
    assert not (tmp_path / "out" / "overlays").exists()


# --- readers on fake trees ----------------------------------------------------------------------------


def _fake_voc(root: Path, year: str, seg_dir: str, split: str, values: list[int]) -> Path:
    base = root / "VOCdevkit" / year
    ids = ["2007_000001", "2007_000002"]
    (base / split).parent.mkdir(parents=True, exist_ok=True)
    (base / split).write_text("\n".join(ids) + "\n")
    for n, i in enumerate(ids):
        _jpg(base / "JPEGImages" / f"{i}.jpg", 6, 8, n)
        _png(base / seg_dir / f"{i}.png", np.array(values * 12).reshape(6, 8), palette=True)
    return base


def test_voc_readers(tmp_path):
    base = _fake_voc(tmp_path, "VOC2012", "SegmentationClass", "ImageSets/Segmentation/val.txt", [0, 1, 20, 255])
    for root in (tmp_path, tmp_path / "VOCdevkit", base):  # any of the three levels works
        v20 = ev.load_dataset("voc20", root)
        assert [s.name for s in v20.samples] == ["2007_000001", "2007_000002"]
    assert v20.names == cn.VOC20 and v20.names[0] == "airplane" and v20.names[-1] == "tv monitor"
    assert v20.reduce_zero_label and v20.background is None
    np.testing.assert_array_equal(v20.read_mask(v20.samples[0])[0, :4], [255, 0, 19, 255])
    v21 = ev.load_dataset("voc21", tmp_path)
    assert v21.names[0] == "background" and len(v21.names) == 21 and v21.background == 0
    assert v21.background_queries == cn.VOC21_BACKGROUND
    np.testing.assert_array_equal(v21.read_mask(v21.samples[0])[0, :4], [0, 1, 20, 255])
    queries, to_gt = v21.queries()
    assert len(queries) == 20 and to_gt.tolist() == list(range(1, 21))


def test_context_readers(tmp_path):
    split = "ImageSets/SegmentationContext/val.txt"
    _fake_voc(tmp_path, "VOC2010", "SegmentationClassContext", split, [0, 1, 59, 255])
    c59 = ev.load_dataset("context59", tmp_path)
    assert len(c59.names) == 59 and c59.whole_scale == (2048, 520) and c59.reduce_zero_label
    np.testing.assert_array_equal(c59.read_mask(c59.samples[1])[0, :4], [255, 0, 58, 255])
    c60 = ev.load_dataset("context60", tmp_path / "VOCdevkit")
    assert c60.names[0] == "background" and c60.background_queries == ("background",) and c60.background == 0
    np.testing.assert_array_equal(c60.read_mask(c60.samples[1])[0, :4], [0, 1, 59, 255])


def test_coco_stuff_ade_and_cityscapes_readers(tmp_path):
    coco = tmp_path / "coco_stuff164k"
    _jpg(coco / "images/val2017/000000000139.jpg", 4, 6)
    _png(coco / "annotations/val2017/000000000139_labelTrainIds.png", np.full((4, 6), 170))
    cs = ev.load_dataset("cocostuff171", tmp_path)
    assert len(cs.names) == 171 and [s.name for s in cs.samples] == ["000000000139"]
    assert (cs.read_mask(cs.samples[0]) == 170).all()

    ade = tmp_path / "ADEChallengeData2016"
    _jpg(ade / "images/validation/ADE_val_00000001.jpg", 4, 6)
    _png(ade / "annotations/validation/ADE_val_00000001.png", np.array([[0, 1, 150, 3, 4, 5]] * 4))
    a = ev.load_dataset("ade150", tmp_path)
    assert len(a.names) == 150 and a.names[0] == "wall"
    np.testing.assert_array_equal(a.read_mask(a.samples[0])[0], [255, 0, 149, 2, 3, 4])

    city = tmp_path / "cityscapes"
    _jpg(city / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png", 4, 8)
    _png(city / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png", np.full((4, 8), 18))
    c = ev.load_dataset("cityscapes", tmp_path)
    assert len(c.names) == 19 and [s.name for s in c.samples] == ["lindau_000000_000019"]


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(ev.DatasetError, match="VOCdevkit/VOC2012/.*SegmentationClass"):
        ev.load_dataset("voc20", tmp_path)
    base = _fake_voc(tmp_path, "VOC2012", "SegmentationClass", "ImageSets/Segmentation/val.txt", [0, 1, 2, 255])
    (base / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(ev.DatasetError, match="missing .*2007_000002.jpg.*Expected layout"):
        ev.load_dataset("voc21", tmp_path)
    with pytest.raises(ev.DatasetError, match="classes.txt"):
        ev.load_dataset("folder", tmp_path)
    with pytest.raises(ev.DatasetError, match="choose one of voc20"):
        ev.load_dataset("pascal", tmp_path)


def test_classes_file_synonyms_background_and_errors(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("cat\nBackground, sky, wall\ncar, automobile \n")
    assert ev.read_classes_file(f) == ((("cat",), ("Background", "sky", "wall"), ("car", "automobile")), 1)
    f.write_text("cat\n\ndog\n")
    with pytest.raises(ev.DatasetError, match="line 2 is empty"):
        ev.read_classes_file(f)
    f.write_text("cat\ndog\ncat\n")
    with pytest.raises(ev.DatasetError, match="repeated: cat"):
        ev.read_classes_file(f)


def test_folder_image_without_mask_is_an_error(tmp_path):
    _synthetic_folder(tmp_path)
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(ev.DatasetError, match="missing .*b.png"):
        ev.load_dataset("folder", tmp_path)


# --- end to end with a tiny random CLIP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory, weights):
    return Settings(model=TINY_VIT, pretrained=str(weights), device="cpu")


def _check_outputs(out: Path, m: dict, n: int, names: tuple[str, ...]) -> None:
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["n_images"] == n and list(m["IoU"]) == list(names) and list(m["Acc"]) == list(names)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert 0.0 <= m[key] <= 100.0, key
    assert all(v is None or 0.0 <= v <= 100.0 for v in m["IoU"].values())
    assert len(list((out / "predictions").glob("*.png"))) == n
    for p in (out / "predictions").glob("*.png"):
        values = np.unique(np.array(Image.open(p)))
        assert ((values < len(names)) | (values == 255)).all()


def test_voc_samples_end_to_end(tiny_settings, tmp_path):
    ds = ev.load_dataset("folder", VOC_SAMPLES)
    assert len(ds.samples) == 5 and ds.names[0] == "background" and ds.background == 0
    assert ds.background_queries == ("background",) and len(ds.names) == 21
    out = tmp_path / "whole"
    m = ev.run_eval(tiny_settings, "folder", VOC_SAMPLES, out, protocol="whole512", limit=3, overlays=2, progress=False)
    _check_outputs(out, m, 3, ds.names)
    assert m["protocol"] == "whole512" and m["scale"] == [2048, 512] and m["window"] == 0
    assert m["model"] == "MaskCLIP-Tiny-ViT.tiny_vit.pt" and m["bg_threshold"] == 0.1
    assert m["key_smoothing"] is False and m["prompt_denoising"] is False  # the paper's plain config
    assert len(list((out / "overlays").glob("*.png"))) == 2
    with Image.open(next((out / "overlays").glob("*.png"))) as pic:
        assert pic.size == (513 * 2 + 8, 513)  # prediction | ground truth

    slide = ev.run_eval(
        tiny_settings, "folder", VOC_SAMPLES, tmp_path / "slide", protocol="slide448", limit=1, overlays=0,
        progress=False, refinements=True,
    )  # fmt: skip
    assert slide["window"] == 448 and slide["stride"] == 224 and slide["scale"] == [2048, 448]
    assert slide["key_smoothing"] is True and slide["prompt_denoising"] is True
    _check_outputs(tmp_path / "slide", slide, 1, ds.names)


def test_background_threshold_above_one_makes_every_pixel_background(tiny_settings, tmp_path):
    m = ev.run_eval(
        tiny_settings, "folder", VOC_SAMPLES, tmp_path, protocol="whole512", limit=2, overlays=0, progress=False,
        bg_threshold=1.01,
    )  # fmt: skip
    ds = ev.load_dataset("folder", VOC_SAMPLES)
    gts = [ds.read_mask(s) for s in ds.samples[:2]]
    labelled = sum(int((g != 255).sum()) for g in gts)
    background = sum(int((g == 0).sum()) for g in gts)
    assert m["IoU"]["background"] == pytest.approx(100 * background / labelled, abs=1e-4)
    assert m["aAcc"] == pytest.approx(100 * background / labelled, abs=1e-4)
    present = {ds.names[k] for g in gts for k in np.unique(g) if 0 < k < 255}
    assert present and all(m["IoU"][n] == 0.0 for n in present)
    assert all(m["IoU"][n] is None for n in ds.names if n not in present | {"background"})


def _rasterise_coco128(dst: Path, n: int) -> list[str]:
    """The first n labelled coco128-seg images as a folder dataset: polygons filled with their class in file
    order (later instances on top), 255 outside every polygon."""
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    (dst / "classes.txt").write_text((COCO128 / "classes.txt").read_text())
    names = []
    for label in sorted((COCO128 / "labels").glob("*.txt")):
        image = COCO128 / "images" / f"{label.stem}.jpg"
        if not image.exists():
            continue
        with Image.open(image) as im:
            w, h = im.size
            im.convert("RGB").save(dst / "images" / f"{label.stem}.png")
        mask = Image.new("L", (w, h), 255)
        draw = ImageDraw.Draw(mask)
        for line in label.read_text().splitlines():
            values = line.split()
            if len(values) >= 7:
                xy = np.array(values[1:], dtype=float).reshape(-1, 2) * (w, h)
                draw.polygon([tuple(p) for p in xy], fill=int(values[0]))
        mask.save(dst / "masks" / f"{label.stem}.png")
        names.append(label.stem)
        if len(names) == n:
            return names
    return names


def test_coco128_rasterised_end_to_end(tiny_settings, tmp_path):
    names = _rasterise_coco128(tmp_path / "ds", 3)
    ds = ev.load_dataset("folder", tmp_path / "ds")
    assert [s.name for s in ds.samples] == names and len(ds.names) == 80 and ds.background is None
    gt = ds.read_mask(ds.samples[0])
    assert (gt == 255).any() and (gt < 80).any()  # ignore outside the polygons, classes inside
    fast = tiny_settings.replace(templates="simple")  # 80 classes x 85 templates is most of the time
    m = ev.run_eval(fast, "folder", tmp_path / "ds", tmp_path / "out", protocol="slide448", progress=False)
    _check_outputs(tmp_path / "out", m, 3, ds.names)
    assert m["bg_threshold"] is None and len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 3


def test_unknown_protocol_and_public_surface(tiny_settings, tmp_path):
    with pytest.raises(ValueError, match="choose one of whole512, slide448"):
        ev.run_eval(tiny_settings, "folder", VOC_SAMPLES, tmp_path, protocol="whole999")
    assert set(ev.__all__) <= set(dir(ev)) and "run_eval" in ev.__all__
    assert set(cn.__all__) <= set(dir(cn))
    assert [len(getattr(cn, n)) for n in ("VOC20", "CONTEXT59", "COCO_STUFF171", "ADE150", "CITYSCAPES19")] == [
        20, 59, 171, 150, 19,
    ]  # fmt: skip


# --- from query names to ground-truth labels -----------------------------------------------------------


class _ScriptedSegmenter:
    """Answers every image with a fixed label map (query indices, -1 = no label); records what it was asked."""

    def __init__(self, labels: np.ndarray):
        self.labels, self.asked = labels, []

    def segment(self, images, classes, background, opts):
        self.asked.append((list(classes), tuple(background), opts.short_side))
        return [type("R", (), {"labels": self.labels.astype(np.int16)})() for _ in images]


def test_queries_map_to_ground_truth_labels_around_a_background_in_the_middle():
    """Classes (cat, background, dog|puppy, tree): the segmenter is asked for cat, dog|puppy, tree (queries
    0, 1, 2) with the background's names as background queries; query k answers ground-truth label
    to_gt[k], and a pixel with no label (a background query won or low confidence) the background label."""
    classes = (("cat",), ("background", "sky", "wall"), ("dog", "puppy"), ("tree",))
    ds = ev.EvalSet("t", classes, (), background=1, background_queries=("sky", "wall"))
    queries, to_gt = ds.queries()
    assert queries == [("cat",), ("dog", "puppy"), ("tree",)] and to_gt.tolist() == [0, 2, 3]
    seg = _ScriptedSegmenter(np.array([[0, 1, 2, -1]]))
    from labelstudio_maskclip.engine.segmenter import SegmentOptions

    opts = SegmentOptions(short_side=0)
    predict = ev.maskclip_predictor(seg, ds, opts, (2048, 512))
    pred = predict(np.zeros((1, 4, 3), dtype=np.uint8))
    np.testing.assert_array_equal(pred, [[0, 2, 3, 1]])
    assert seg.asked == [([("cat",), ("dog", "puppy"), ("tree",)], ("sky", "wall"), 512)]
    # without a background class, no label is the ignore index and every class is a query
    plain = ev.EvalSet("t", (("cat",), ("dog",)), ())
    assert plain.queries()[1].tolist() == [0, 1]
    seg = _ScriptedSegmenter(np.array([[1, -1, 0]]))
    pred = ev.maskclip_predictor(seg, plain, opts, (2048, 512))(np.zeros((1, 3, 3), dtype=np.uint8))
    np.testing.assert_array_equal(pred, [[1, ev.IGNORE, 0]])
