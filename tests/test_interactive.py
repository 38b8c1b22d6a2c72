"""Interactive prompting: context parsing, geometry (percent <-> pixels, rotation, EXIF), the engine's click,
phrase and box masks, and the backend's answer with its feature cache."""

from __future__ import annotations

import base64
import io
import math
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from labelstudio_maskclip.engine import prompts as engine
from labelstudio_maskclip.engine.prompts import DenseImage
from labelstudio_maskclip.engine.segmenter import MaskCLIP, SegmentOptions
from labelstudio_maskclip.fetching.images import decode_image
from labelstudio_maskclip.labelstudio.labeling import parse_label_config
from labelstudio_maskclip.serving.backend import MaskCLIPBackend, PredictError
from labelstudio_maskclip.serving.interactive import (
    BACKGROUND_WORDS,
    MAX_PHRASES,
    PHRASE_TEMPLATES,
    BoxPrompt,
    ClickPrompt,
    ContextError,
    FeatureCache,
    TextPrompt,
    box_corners,
    parse_context,
    percent_to_pixel,
    phrase_label,
)
from labelstudio_maskclip.settings import Settings
from tests.photos import COCO128_PHOTOS
from tests.tiny import TINY_VIT

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" perRegion="false"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Car"/><Label value="Road"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Car"/><Label value="Road"/></RectangleLabels>
  <BrushLabels name="tag" toName="image">
    <Label value="Car" predicted_values="car,automobile"/><Label value="Road"/>
  </BrushLabels>
  <PolygonLabels name="outline" toName="image"><Label value="Car"/><Label value="Road"/></PolygonLabels>
</View>"""
SPEC = parse_label_config(CONFIG)


def click(x: float, y: float, label: str = "Car", positive: bool = True) -> dict:
    return {"type": "keypointlabels", "from_name": "click", "to_name": "image", "is_positive": positive,
            "original_width": 640, "original_height": 480,
            "value": {"x": x, "y": y, "width": 0.3, "keypointlabels": [label]}}  # fmt: skip


def box(x: float, y: float, w: float, h: float, rotation: float = 0.0, label: str = "Car") -> dict:
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}  # fmt: skip


def text(*texts: str) -> dict:
    return {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": list(texts)}}


# --- context parsing ------------------------------------------------------------------------------------


def test_context_items_become_prompts():
    prompts = parse_context(
        {"result": [text("red car, road ", "car"), click(10, 20), click(30, 40, positive=False), click(5, 5, "Road"),
                    box(1, 2, 3, 4, 15)]}, SPEC,
    )  # fmt: skip
    assert prompts[0] == TextPrompt(("red car", "road", "car"))
    assert prompts[1] == BoxPrompt("Car", 1, 2, 3, 4, 15)
    assert prompts[2] == ClickPrompt("Car", positive=[(10, 20)], negative=[(30, 40)])
    assert prompts[3] == ClickPrompt("Road", positive=[(5, 5)])


@pytest.mark.parametrize(
    ("context", "message"),
    [
        (None, "no 'result' items"),
        ({"result": []}, "no 'result' items"),
        ({"result": ["x"]}, "item 0 has no 'value'"),
        ({"result": [text(" , ")]}, "text prompt is empty"),
        ({"result": [click(10, 20, "Bus")]}, "'Bus' .* not a label"),
        ({"result": [click(float("nan"), 20)]}, "finite number"),
        ({"result": [click(10, 20, positive=False)]}, "all negative"),
        ({"result": [box(1, 2, 0, 4)]}, "no area"),
        ({"result": [{"type": "ellipselabels", "value": {}}]}, "type 'ellipselabels'"),
        ({"result": [{"type": "keypointlabels", "value": {"x": 1, "y": 2}}]}, "names no label"),
    ],
)
def test_unusable_context_is_a_clear_error(context, message):
    with pytest.raises(ContextError, match=message):
        parse_context(context, SPEC)


# --- geometry -------------------------------------------------------------------------------------------


def test_percent_to_pixel_scales_each_axis_by_its_own_side():
    assert percent_to_pixel(50, 25, (480, 640)) == (320.0, 120.0)
    assert percent_to_pixel(0, 100, (480, 640)) == (0.0, 480.0)


def test_box_corners_without_and_with_rotation():
    size = (200, 400)  # H, W
    np.testing.assert_allclose(
        box_corners(BoxPrompt("Car", 10, 20, 50, 25), size), [[40, 40], [240, 40], [240, 90], [40, 90]]
    )
    # 90 degrees clockwise about the top-left corner: the top edge points down, the left edge points left.
    np.testing.assert_allclose(
        box_corners(BoxPrompt("Car", 50, 10, 10, 20, 90), size), [[200, 20], [200, 60], [160, 60], [160, 20]],
        atol=1e-9,
    )  # fmt: skip
    c = box_corners(BoxPrompt("Car", 50, 50, 10, 10, 30), size)
    assert math.isclose(float(np.linalg.norm(c[1] - c[0])), 40) and math.isclose(float(np.linalg.norm(c[3] - c[0])), 20)


def test_click_percent_lands_on_the_displayed_pixel_of_an_exif_rotated_photo():
    """Label Studio's percentages are of the image as displayed (EXIF applied); so is our decoded array."""
    stored = np.zeros((20, 40, 3), np.uint8)  # as stored: 40 wide, 20 tall
    stored[2:6, 30:38] = (255, 0, 0)  # a red block near the top-right corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    shown = decode_image(buf.getvalue(), max_pixels=10_000)
    assert shown.shape == (40, 20, 3)  # displayed: 20 wide, 40 tall
    # Rotated clockwise, the stored top-right corner is the displayed bottom-right corner.
    x, y = percent_to_pixel(80.0, 85.0, shown.shape[:2])
    assert tuple(shown[int(y), int(x)]) == (255, 0, 0)


# --- engine: clicks on hand-made features ---------------------------------------------------------------


def _two_region_dense() -> DenseImage:
    """An 8 x 8 grid over a 64 x 64 image: left half patches all point one way, right half another."""
    feats = torch.zeros(4, 8, 8)
    feats[0, :, :4] = 1.0
    feats[1, :, 4:] = 1.0
    return DenseImage(features=feats, affinity=torch.eye(64), size=(64, 64))


def test_click_selects_the_similar_connected_region_and_contains_the_click():
    dense = _two_region_dense()
    flat = torch.full((8, 8), 0.5)  # the label is equally likely everywhere: the click decides
    mask, score = engine.click_mask(dense, flat, [(10.0, 30.0)])
    assert mask[30, 10] and mask[:, :28].all() and not mask[:, 36:].any()
    assert score == pytest.approx(0.5)


def test_click_on_another_labels_pixel_still_gives_a_region_for_the_chosen_label():
    dense = _two_region_dense()
    probs = torch.zeros(8, 8)
    probs[:, 4:] = 1.0  # the model gives the left half to another label
    mask, _ = engine.click_mask(dense, probs, [(8.0, 8.0)])
    assert mask[8, 8] and mask[:, :28].all()


def test_negative_click_removes_what_it_resembles():
    dense = _two_region_dense()
    dense.features[2, 4:, :4] = 0.5  # the lower-left quarter is like the upper-left one, not the same
    dense.features = torch.nn.functional.normalize(dense.features, dim=0)
    flat = torch.full((8, 8), 0.5)
    plain, _ = engine.click_mask(dense, flat, [(8.0, 8.0)])
    cut, _ = engine.click_mask(dense, flat, [(8.0, 8.0)], [(8.0, 56.0)])
    assert plain[56, 8] and not cut[56, 8] and cut[8, 8]
    assert cut.sum() < plain.sum()


def test_click_needs_a_positive_point():
    with pytest.raises(ValueError, match="positive"):
        engine.click_mask(_two_region_dense(), torch.zeros(8, 8), [])


def test_a_pixel_maps_to_the_grid_cell_under_it_and_points_off_the_image_clamp():
    # a 100 x 200 image (H, W) over a 5 x 10 grid: cells of 20 x 20 pixels
    assert engine._grid_cell((0.0, 0.0), (100, 200), (5, 10)) == (0, 0)
    assert engine._grid_cell((25.0, 45.0), (100, 200), (5, 10)) == (2, 1)  # x 25 -> column 1, y 45 -> row 2
    assert engine._grid_cell((199.9, 99.9), (100, 200), (5, 10)) == (4, 9)
    assert engine._grid_cell((-5.0, -5.0), (100, 200), (5, 10)) == (0, 0)
    assert engine._grid_cell((500.0, 500.0), (100, 200), (5, 10)) == (4, 9)


def test_similarity_to_no_point_is_minus_one_and_to_several_the_best():
    dense = _two_region_dense()
    assert (engine._similarity(dense, []) == -1.0).all()
    both = engine._similarity(dense, [(8.0, 8.0), (56.0, 8.0)])  # one click in each half
    assert both.shape == (8, 8) and (both == 1.0).all()


def test_clicks_on_and_past_the_image_edge_are_clamped_to_it():
    dense = _two_region_dense()
    flat = torch.full((8, 8), 0.5)
    mask, _ = engine.click_mask(dense, flat, [(-3.0, -3.0)])
    assert mask[0, 0] and mask[:, :28].all() and not mask[:, 36:].any()
    mask, _ = engine.click_mask(dense, flat, [(64.0, 64.0)])  # one past the last pixel: the right half
    assert mask[63, 63] and mask[:, 36:].all() and not mask[:, :28].any()
    # a negative click past the corner takes the corner pixel out, and nothing else
    cut, _ = engine.click_mask(dense, flat, [(10.0, 30.0)], [(-3.0, -3.0)])
    assert not cut[0, 0] and cut[0, 1] and cut[1, 0] and cut[30, 10]


def test_a_negative_click_as_similar_as_the_positive_one_does_not_blank_the_region():
    dense = _two_region_dense()  # the whole left half has one feature: both clicks' patches are alike
    flat = torch.full((8, 8), 0.5)
    mask, _ = engine.click_mask(dense, flat, [(8.0, 8.0)], [(8.0, 56.0)])
    assert mask[8, 8] and not mask[56, 8] and mask[:, :28].sum() == 64 * 28 - 1 and not mask[:, 36:].any()


def test_a_neighbouring_region_the_label_covers_joins_a_click_the_label_does_not_cover():
    """Score = half similarity, half label probability: the clicked half (similarity 1, probability 0)
    scores 0.5; the other half (similarity 0, probability 1) scores 0.5 too, above 60 % of the click's."""
    dense = _two_region_dense()
    probs = torch.zeros(8, 8)
    probs[:, 4:] = 1.0
    mask, score = engine.click_mask(dense, probs, [(8.0, 8.0)])
    assert mask.all()
    assert score == pytest.approx(0.5, abs=0.01)  # the label's mean probability over the mask


def test_phrase_masks_give_each_phrase_its_winning_pixels_and_their_mean_probability():
    dense = _two_region_dense()  # left half feature e0, right half e1
    emb = torch.eye(4)[:3]  # phrase 0 = e0, phrase 1 = e1, phrase 2 = e2 (nowhere), no background class
    opts = SegmentOptions(key_smoothing=False, prompt_denoising=False, temperature=1.0)
    (left, s0), (right, s1), (none, s2) = engine.phrase_masks(dense, emb, 3, opts)
    winning = math.e / (math.e + 2)  # softmax of cosines (1, 0, 0) at temperature 1
    assert left[:, :28].all() and not left[:, 36:].any() and right[:, 36:].all() and not right[:, :28].any()
    # the mean winning probability: the full value inside a half, a little less on the blended middle columns
    assert 0.95 * winning < s0 < winning and s1 == pytest.approx(s0, rel=1e-5)
    assert not none.any() and s2 == 0.0
    assert len(engine.phrase_masks(dense, emb, 1, opts)) == 1


def test_a_negative_click_past_the_far_corner_takes_out_the_corner_pixel_only():
    dense = _two_region_dense()
    flat = torch.full((8, 8), 0.5)
    cut, _ = engine.click_mask(dense, flat, [(50.0, 30.0)], [(70.0, 70.0)])
    assert not cut[63, 63] and cut[62, 62] and cut[63, 62] and cut[62, 63] and cut[30, 50]


def test_upsampling_is_bilinear_with_pixel_centres_as_the_model_sees_them():
    grid = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    row = engine._upsample(grid, (2, 4))[0]
    torch.testing.assert_close(row, torch.tensor([0.0, 0.25, 0.75, 1.0]))  # align_corners=False
    stacked = engine._upsample(torch.stack([grid, 1 - grid]), (2, 4))
    assert stacked.shape == (2, 2, 4)


def test_a_dense_image_counts_its_bytes():
    dense = _two_region_dense()  # features (4, 8, 8) and affinity (64, 64), float32
    assert dense.nbytes == 4 * (4 * 8 * 8 + 64 * 64) + engine.REMEMBERED_PLANES * 4 * 8 * 8  # + room for planes


def test_a_clicked_labels_plane_is_remembered_per_label_set_and_at_most_a_few():
    """A repeated click on an image reuses its label's probability plane; another label set (key) gets its
    own, and only the newest REMEMBERED_PLANES stay (what nbytes counts)."""
    dense = _two_region_dense()
    opts = SegmentOptions(key_smoothing=False, prompt_denoising=False)
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    first = engine.label_plane(dense, emb, opts, None, 0, "labels A")
    torch.testing.assert_close(first, engine.grid_probs(dense, emb, opts)[0])
    assert engine.label_plane(dense, emb, opts, None, 0, "labels A") is first  # remembered, not recomputed
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()  # one plane kept, not K
    other = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    second = engine.label_plane(dense, other, opts, None, 0, "labels B")  # another label set: its own plane
    torch.testing.assert_close(second, engine.grid_probs(dense, other, opts)[0])
    for k in (1, 2, 0):
        engine.label_plane(dense, other, opts, None, k, f"labels {k}")
    assert len(dense.planes) == engine.REMEMBERED_PLANES and ("labels A", 0) not in dense.planes


# --- phrases -> labels ----------------------------------------------------------------------------------


def test_phrase_goes_to_the_label_it_names_else_the_nearest():
    never = lambda: pytest.fail("no embedding needed for a named label")  # noqa: E731
    assert phrase_label("CAR", SPEC, ["Car", "Road"], never) == "Car"
    assert phrase_label("automobile", SPEC, ["Car", "Road"], never) == "Car"  # predicted_values
    assert phrase_label("red truck", SPEC, ["Car", "Road"], lambda: np.array([0.9, 0.1])) == "Car"
    assert phrase_label("asphalt", SPEC, ["Car", "Road"], lambda: np.array([0.2, 0.7])) == "Road"


# --- the cache ------------------------------------------------------------------------------------------


def test_feature_cache_is_bounded_by_bytes_and_keeps_the_newest():
    cache = FeatureCache(max_bytes=100)
    made = []

    def make(name: str, size: int):
        return lambda: (made.append(name) or name, size)

    assert cache.get("a", make("a", 60)) == "a"
    assert cache.get("a", make("a", 60)) == "a" and made == ["a"] and cache.hits == 1
    cache.get("b", make("b", 60))  # a + b > 100: a goes
    assert len(cache) == 1
    cache.get("a", make("a", 60))
    assert made == ["a", "b", "a"]
    cache.get("huge", make("huge", 1000))  # larger than the budget: kept alone, as the newest
    assert len(cache) == 1 and cache.get("huge", make("x", 1)) == "huge"


# --- with a tiny real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, weights):
    seg = MaskCLIP.load(TINY_VIT, str(weights), "cpu", "fp32", templates="simple")
    return seg, weights


@pytest.mark.parametrize("mode", ["maskclip", "naclip"])
def test_cached_features_give_the_engines_probabilities(tiny, mode):
    """A prompt's grid probabilities (kept features and key-smoothing weights) equal the engine's own."""
    seg, _ = tiny
    image = np.asarray(Image.open(COCO128_PHOTOS / "000000000009.jpg").convert("RGB"))
    opts = SegmentOptions(mode=mode, short_side=64, size_multiple=0)
    emb = seg.text_embeddings(["car", "road", "background"])
    size = seg.input_size(*image.shape[:2], opts.short_side, opts.size_multiple, opts.max_input_pixels)
    expected = seg.grid_probs(seg.preprocess([image], size), emb, opts)[0]
    torch.testing.assert_close(engine.grid_probs(engine.encode_image(seg, image, opts), emb, opts), expected)


def test_box_mask_lies_inside_the_box_and_is_computed_on_the_crop(tiny):
    seg, _ = tiny
    image = np.asarray(Image.open(COCO128_PHOTOS / "000000000009.jpg").convert("RGB"))
    height, width = image.shape[:2]
    emb = seg.text_embeddings(["car", "road", "background"])
    opts = SegmentOptions(short_side=64)
    for prompt in (BoxPrompt("Car", 10, 20, 30, 40), BoxPrompt("Car", 30, 10, 30, 40, 25)):
        corners = box_corners(prompt, (height, width))
        mask, score = engine.box_mask(seg, image, corners, 0, emb, opts)
        inside = np.zeros((height, width), np.uint8)
        cv2.fillPoly(inside, [np.round(corners).astype(np.int32)], 1)
        assert mask.any() and not (mask & ~inside.astype(bool)).any() and 0 < score <= 1
    # The crop is what the encoder sees: a box the size of the image gives the whole-image mask.
    plain = SegmentOptions(short_side=64, size_multiple=0, prompt_denoising=False)
    dense = engine.encode_image(seg, image, plain)
    winners = engine._upsample(engine.grid_probs(dense, emb, plain), (height, width)).argmax(0).numpy()
    k = int(np.bincount(winners.ravel()).argmax())  # the class that wins most pixels
    expected = winners == k
    full = box_corners(BoxPrompt("Car", 0, 0, 100, 100), (height, width))
    whole = engine.box_mask(seg, image, full, k, emb, plain)[0]
    assert (whole == expected).mean() > 0.99
    # An axis-aligned box inside the image: the mask is the crop's own segmentation, exactly.
    y0, y1, x0, x1 = 40, 200, 60, 300
    corners = np.array([[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1], [x0, y1 - 1]], float)
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    crop_dense = engine.encode_image(seg, crop, plain)
    crop_probs = engine._upsample(engine.grid_probs(crop_dense, emb, plain), crop.shape[:2])
    mask, score = engine.box_mask(seg, image, corners, k, emb, SegmentOptions(short_side=64, size_multiple=128))
    expected_crop = (crop_probs.argmax(0) == k).numpy()
    assert expected_crop.any()
    np.testing.assert_array_equal(mask[y0:y1, x0:x1], expected_crop)
    assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any() and not mask[:, x1:].any()
    assert score == pytest.approx(float(crop_probs[k].numpy()[expected_crop].mean()), rel=1e-5)
    # A box off the image covers nothing; a one-pixel box is a box.
    with pytest.raises(ValueError, match="covers no pixel"):
        engine.box_mask(seg, image, np.array([[-50, -50], [-10, -50], [-10, -10], [-50, -10]], float), k, emb, plain)
    dot, _ = engine.box_mask(seg, image, np.array([[5, 5], [5, 5], [5, 5], [5, 5]], float), k, emb, plain)
    assert dot.sum() <= 1 and not dot[:5].any() and not dot[6:].any()


@pytest.fixture(scope="module")
def backend(tiny, tmp_path_factory):
    """The backend on the tiny model; the task's image travels as a data: URI (no host needed)."""
    _, weights = tiny
    settings = Settings(model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=64, templates="simple",
                        model_dir=str(tmp_path_factory.mktemp("m")))  # fmt: skip
    photo = base64.b64encode((COCO128_PHOTOS / "000000000009.jpg").read_bytes()).decode()
    return MaskCLIPBackend(settings, "1", CONFIG), "data:image/jpeg;base64," + photo


def test_backend_answers_each_kind_of_prompt_with_brush_and_polygons(backend, caplog):
    be, url = backend
    task = {"id": 7, "data": {"image": url}}
    height, width = 480, 640
    caplog.set_level("INFO", logger="labelstudio_maskclip.serving.backend")
    began = time.monotonic()
    reply = be.predict([task], {"result": [text("car, road"), click(20, 30), box(40, 40, 30, 30)]})
    wall_ms = 1000 * (time.monotonic() - began)
    (pred,) = reply["results"]
    assert pred["score"] == round(float(np.mean([r["score"] for r in pred["result"]])), 4) > 0
    (logged,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("interactive: ")]
    assert logged.startswith(f"interactive: task 7, 3 prompts -> {len(pred['result'])} regions in ")
    assert 1 <= float(logged.rsplit(" in ", 1)[1].removesuffix(" ms")) <= wall_ms + 1  # milliseconds of this call
    kinds = {(r["type"], r["from_name"]) for r in pred["result"]}
    assert ("brushlabels", "tag") in kinds and ("polygonlabels", "outline") in kinds
    notes = [r["meta"]["text"][0] for r in pred["result"]]
    assert {"box", "clicks: 1 positive, 0 negative"} <= set(notes)
    for r in pred["result"]:
        assert (r["original_width"], r["original_height"]) == (width, height) and 0 <= r["score"] <= 1
    from label_studio_sdk.converter.brush import decode_rle

    brushes = {r["meta"]["text"][0]: decode_rle(r["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0
               for r in pred["result"] if r["type"] == "brushlabels"}  # fmt: skip
    assert brushes["clicks: 1 positive, 0 negative"][int(0.3 * height), int(0.2 * width)]  # holds the click
    box_mask = brushes["box"]
    ys, xs = np.nonzero(box_mask)
    assert ys.min() >= int(0.4 * height) - 1 and ys.max() <= int(0.7 * height) + 1
    assert xs.min() >= int(0.4 * width) - 1 and xs.max() <= int(0.7 * width) + 1
    assert pred["model_version"] == reply["model_version"]


def test_second_prompt_on_the_same_image_reuses_its_features(backend):
    be, url = backend
    task = {"id": 8, "data": {"image": url}}
    cache = be.rt.features
    be.predict([task], {"result": [click(50, 50)]})
    misses, hits = cache.misses, cache.hits
    be.predict([task], {"result": [click(60, 60, "Road")]})
    assert cache.misses == misses and cache.hits == hits + 1


def test_a_repeated_click_reuses_the_labels_plane_unless_the_labels_names_changed(tiny, tmp_path):
    from labelstudio_maskclip.models import segment_options

    be = _fresh(tiny, tmp_path)
    url = _photo_url()
    task = {"id": 10, "data": {"image": url}}
    first = be.predict([task], {"result": [click(50, 50)]})["results"][0]["result"]
    opts = segment_options(be.settings)
    _, dense = be.rt.features.get((be.project, url, be.rt.teacher_version(), opts), lambda: pytest.fail("missed"))
    (plane,) = dense.planes.values()
    again = be.predict([task], {"result": [click(50, 50)]})["results"][0]["result"]
    assert len(dense.planes) == 1 and next(iter(dense.planes.values())) is plane  # the same plane
    assert [(r["value"], r["score"]) for r in again] == [(r["value"], r["score"]) for r in first]
    renamed = MaskCLIPBackend(be.settings, be.project, CONFIG.replace("car,automobile", "car,sedan"))
    renamed.predict([task], {"result": [click(50, 50)]})
    assert len(dense.planes) == 2  # Car's names changed: its probabilities are computed again


def test_the_interactive_cache_counts_an_images_pixels_and_features(tiny, tmp_path):
    from labelstudio_maskclip.models import segment_options

    _, weights = tiny
    settings = Settings(model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=64, templates="simple",
                        model_dir=str(tmp_path))  # fmt: skip
    be = MaskCLIPBackend(settings, "1", CONFIG)  # a runtime of its own: an empty cache
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 80, np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    be.predict([{"id": 9, "data": {"image": url}}], {"result": [click(50, 50)]})
    cache = be.rt.features
    image, dense = cache.get(
        (be.project, url, be.rt.teacher_version(), segment_options(settings)), lambda: pytest.fail("missed")
    )
    assert image.shape == (30, 40, 3)
    assert len(cache) == 1 and cache.nbytes == image.nbytes + dense.nbytes > image.nbytes


def test_backend_refuses_unusable_interactive_requests(backend):
    be, url = backend
    with pytest.raises(PredictError, match="one task"):
        be.predict([{"id": 1, "data": {"image": url}}] * 2, {"result": [click(1, 1)]})
    with pytest.raises(PredictError, match="not a label"):
        be.predict([{"id": 1, "data": {"image": url}}], {"result": [click(1, 1, "Bus")]})
    for data in ({}, {"image": ""}, {"image": 7}):
        with pytest.raises(PredictError, match=r"^the task has no image under data\.image$"):
            be.predict([{"id": 1, "data": data}], {"result": [click(1, 1)]})
    with pytest.raises(PredictError, match="task 1"):
        be.predict([{"id": 1, "data": {"image": "data:image/png;base64,AAAA"}}], {"result": [click(1, 1)]})


def test_an_interactive_image_that_cannot_start_downloading_in_time_is_a_clear_error(backend, monkeypatch):
    """The request's budget is spent before the download starts (a clock that jumps 100 s a reading)."""
    from labelstudio_maskclip.serving import backend as backend_module

    be, url = backend
    now = iter(range(0, 10**6, 100))
    monkeypatch.setattr(backend_module.time, "monotonic", lambda: float(next(now)))
    with pytest.raises(PredictError, match=r"^task 41: the image did not arrive within the time budget$"):
        be.predict([{"id": 41, "data": {"image": url + "#other"}}], {"result": [click(1, 1)]})


# --- text prepared at /setup, one deadline, notes where annotators look, bounds (issues 21 and 22) -----------


def _fresh(tiny, tmp_path, **kw) -> MaskCLIPBackend:
    _, weights = tiny
    settings = Settings(model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=64, templates="simple",
                        model_dir=str(tmp_path), **kw)  # fmt: skip
    return MaskCLIPBackend(settings, "1", CONFIG)


def _photo_url() -> str:
    return "data:image/jpeg;base64," + base64.b64encode((COCO128_PHOTOS / "000000000009.jpg").read_bytes()).decode()


def test_setup_prepares_and_stores_every_text_an_interactive_click_needs(tiny, tmp_path):
    from labelstudio_maskclip.embeddings import label_set

    be = _fresh(tiny, tmp_path)
    be.setup()
    labels = label_set(be.classes(be.spec())[1])
    background = label_set([(w,) for w in BACKGROUND_WORDS])
    for names in (labels, background):
        assert be.rt.embeddings.wait(names, 60) is not None and be.rt.embeddings.path(names).is_file()
    be.rt.teacher._text_cache.clear()  # whatever a request encodes from here on shows in this cache
    reply = be.predict([{"id": 1, "data": {"image": _photo_url()}}], {"result": [click(50, 50), text("red car")]})
    assert reply["results"][0]["result"]
    encoded = list(be.rt.teacher._text_cache)
    assert encoded == [(label_set(["red car"]), PHRASE_TEMPLATES)]  # one short pass, for the phrase only
    assert be.rt.phrases.path(label_set(["red car"])).is_file()  # kept on disk per phrase and model


def test_interactive_answers_200_with_a_note_while_labels_are_still_preparing(tiny, tmp_path):
    be = _fresh(tiny, tmp_path, predict_time_budget=1e-6)
    reply = be.predict([{"id": 2, "data": {"image": _photo_url()}}], {"result": [click(50, 50)]})
    (pred,) = reply["results"]
    assert pred["result"] == [] and pred["notes"][0].startswith("no mask yet: ")
    assert reply["errors"] == [{"task": 2, "error": pred["notes"][0]}]
    assert sum(be.rt.interactive_notes.values()) == 1


def test_a_phrase_that_finds_nothing_says_so_on_the_prediction_and_in_metrics(tiny, tmp_path):
    be = _fresh(tiny, tmp_path)
    plain = np.full((48, 64, 3), 127, np.uint8)  # one colour: one class wins every pixel
    buf = io.BytesIO()
    Image.fromarray(plain).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    reply = be.predict([{"id": 3, "data": {"image": url}}], {"result": [text("zebra, giraffe, umbrella")]})
    (pred,) = reply["results"]
    nothing = [n for n in pred.get("notes", []) if "found nowhere" in n]
    assert len(nothing) >= 2  # at most one of three phrases takes the whole uniform image
    assert be.rt.interactive_notes["phrase found nothing"] == len(nothing)


@pytest.mark.parametrize(
    "item, message",
    [
        (click(1e308, 50), "within 0-100"),
        (click(50, -0.5), "within 0-100"),
        (box(10, 10, 1e9, 10), "within 0-100"),
        (box(100, 100, 50, 50), "covers no pixel"),  # entirely outside the image
        (text(", ".join(f"w{i}" for i in range(MAX_PHRASES + 1))), f"at most {MAX_PHRASES}"),
        (text("x" * 201), "longer than 200"),
    ],
)
def test_out_of_bounds_prompts_are_refused_with_a_reason(backend, item, message):
    be, url = backend
    with pytest.raises(PredictError, match=message):
        be.predict([{"id": 4, "data": {"image": url}}], {"result": [item]})
    assert be.predict([{"id": 4, "data": {"image": url}}], {"result": [click(50, 50)]})["results"][0]["result"]


def test_the_feature_cache_is_per_project(tiny, tmp_path):
    first = _fresh(tiny, tmp_path)
    other = MaskCLIPBackend(first.settings, "2", CONFIG)
    task = {"id": 5, "data": {"image": _photo_url()}}
    first.predict([task], {"result": [click(50, 50)]})
    misses = first.rt.features.misses
    other.predict([task], {"result": [click(50, 50)]})
    assert first.rt.features.misses == misses + 1


def test_phrase_masks_match_the_argmax_over_all_classes_upsampled_at_once():
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(16, 5, 7), dim=0)
    dense = DenseImage(features=features, affinity=torch.eye(35).reshape(1, 35, 35), size=(37, 51))
    emb = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    opts = SegmentOptions(key_smoothing=False, prompt_denoising=False)
    got = engine.phrase_masks(dense, emb, 3, opts)
    probs = engine._upsample(engine.grid_probs(dense, emb, opts), (37, 51))
    best, winner = probs.max(0)
    for j, (mask, score) in enumerate(got):
        assert np.array_equal(mask, (winner == j).numpy())
        assert score == pytest.approx(float(best[winner == j].mean()) if mask.any() else 0.0, rel=1e-5)


# --- speed on a CPU: the image tower in bf16 where the CPU has it, warmed up at start (issue 21) ---------------


def test_native_bf16_is_what_the_cpu_reports():
    """The probe agrees with the kernel's list of the CPU's instruction sets (Linux)."""
    from labelstudio_maskclip.engine.loading import native_bf16_cpu

    flags = set(open("/proc/cpuinfo").read().split())
    assert native_bf16_cpu() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_interactive_prompts_use_bf16_only_when_the_precision_is_auto_on_a_cpu_that_has_it(monkeypatch):
    from labelstudio_maskclip.engine import loading

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: True)
    assert loading.interactive_dtype("auto", cpu, torch.float32) == torch.bfloat16
    assert loading.interactive_dtype(None, cpu, torch.float32) == torch.bfloat16
    assert loading.interactive_dtype("fp32", cpu, torch.float32) is None  # asked for: kept
    assert loading.interactive_dtype("bf16", cpu, torch.bfloat16) is None  # already bf16
    assert loading.interactive_dtype("auto", cuda, torch.bfloat16) is None  # a GPU's auto is bf16 already
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: False)  # emulated bf16 is slower than fp32
    assert loading.interactive_dtype("auto", cpu, torch.float32) is None


@pytest.mark.parametrize("mode", ["maskclip", "naclip"])
def test_the_bf16_image_tower_gives_the_fp32_features_within_tolerance(tiny, mode):
    """bf16 is a speed lever only: the features move by at most 1e-2 (unit vectors; ViT-B/16 measured 2.3e-3,
    BENCHMARKS.md) and a click's mask keeps at least 99 % of its pixels."""
    seg, _ = tiny
    opts = SegmentOptions(mode=mode, short_side=64, size_multiple=0, temperature=40.0)
    emb = seg.text_embeddings(["car", "road", "person", "background"])
    for name in ("000000000009.jpg", "000000000025.jpg"):
        image = np.asarray(Image.open(COCO128_PHOTOS / name).convert("RGB"))
        fp32, bf16 = engine.encode_image(seg, image, opts), engine.encode_image(seg, image, opts, torch.bfloat16)
        assert fp32.features.dtype == bf16.features.dtype == torch.float32
        difference = float((fp32.features - bf16.features).abs().max())
        assert 0 < difference < 1e-2  # not 0: the tower did run in bf16
        centre = [(image.shape[1] / 2, image.shape[0] / 2)]
        a = engine.click_mask(fp32, engine.grid_probs(fp32, emb, opts)[0], centre)[0]
        b = engine.click_mask(bf16, engine.grid_probs(bf16, emb, opts)[0], centre)[0]
        assert (a & b).sum() / (a | b).sum() > 0.99


def test_an_interactive_click_runs_the_image_tower_in_the_runtimes_dtype(tiny, tmp_path):
    """On a CPU with native bf16 (this one, when it has it) the cached features are the bf16 tower's."""
    from labelstudio_maskclip.engine.loading import native_bf16_cpu
    from labelstudio_maskclip.models import segment_options

    be = _fresh(tiny, tmp_path)
    assert be.rt.interactive_dtype == (torch.bfloat16 if native_bf16_cpu() else None)
    url = _photo_url()
    be.predict([{"id": 6, "data": {"image": url}}], {"result": [click(50, 50)]})
    opts = segment_options(be.settings)
    image, dense = be.rt.features.get((be.project, url, be.rt.teacher_version(), opts), lambda: pytest.fail("missed"))
    expected = engine.encode_image(be.rt.teacher, image, opts, be.rt.interactive_dtype)
    torch.testing.assert_close(dense.features, expected.features, rtol=0, atol=0)


def test_warm_up_runs_an_interactive_click_and_one_timed_batch_on_a_cpu(tiny, tmp_path, caplog):
    be = _fresh(tiny, tmp_path)
    caplog.set_level("INFO", logger="labelstudio_maskclip.serving.runtime")
    segmented = []
    teacher = be.rt.teacher
    original = teacher.segment
    teacher.segment = lambda images, *a, **kw: segmented.append(len(images)) or original(images, *a, **kw)
    try:
        be.rt.warm_up()
    finally:
        del teacher.segment
    logged = [r.getMessage() for r in caplog.records]
    dtype = be.rt.interactive_dtype or torch.float32
    assert any(m.startswith("interactive warmed up: ") and m.endswith(f"(image tower in {dtype})") for m in logged)
    assert segmented == [1] and be.rt.seconds_per_image(be.rt.teacher_version()) > 0


@pytest.mark.parametrize("preset", ["sclip", "naclip"])
def test_an_image_is_encoded_for_prompts_as_the_served_preset_encodes_it(tiny, tmp_path, preset):
    """MASKCLIP_PRESET decides how a prompted image is encoded: the cached features are the preset's own
    (its mmcv resize, windows and pad rule), those /predict computes for the same image."""
    from labelstudio_maskclip.models import segment_options

    _, weights = tiny
    settings = Settings(preset=preset, model=TINY_VIT, pretrained=str(weights), device="cpu", templates="simple",
                        model_dir=str(tmp_path))  # fmt: skip
    be = MaskCLIPBackend(settings, "1", CONFIG)
    url = "data:image/jpeg;base64," + base64.b64encode((COCO128_PHOTOS / "000000000009.jpg").read_bytes()).decode()
    be.predict([{"id": 9, "data": {"image": url}}], {"result": [click(50, 50)]})
    opts = segment_options(settings)
    image, dense = be.rt.features.get((be.project, url, be.rt.teacher_version(), opts), lambda: pytest.fail("missed"))
    dtype = be.rt.interactive_dtype  # bf16 on a CPU that has it natively (the tower's products only)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        served = be.rt.teacher.window_features(image, opts)
    assert dense.windows is not None and len(dense.windows.boxes) == (6 if preset == "sclip" else 1)
    assert dense.windows.boxes == served.boxes and dense.windows.size == served.size == (336, 448)
    torch.testing.assert_close(dense.features, served.features)
