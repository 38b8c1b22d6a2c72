"""Extreme aspect ratios: the encoder input stays bounded, and one image's failure is that task's error."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from labelstudio_maskclip.engine.segmenter import MaskCLIP, SegmentOptions, resized_size
from labelstudio_maskclip.serving import backend as backend_module
from labelstudio_maskclip.serving.server import create_app
from labelstudio_maskclip.settings import Settings
from tests.photos import COCO128_PHOTOS
from tests.tiny import TINY_VIT, save_random_state

STRIPS = [(1, 2000), (1, 20000), (1, 100000), (20000, 1), (3, 100000)]
BRUSH = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Food"/><Label value="Sky"/></BrushLabels></View>"""


@pytest.mark.parametrize("height,width", STRIPS)
@pytest.mark.parametrize("stride,multiple", [(16, 64), (16, 0), (14, 64), (32, 0)])
def test_input_pixels_bounded_for_extreme_aspect_ratios(height, width, stride, multiple):
    h, w = resized_size(height, width, 448, stride, multiple)
    assert h * w <= 4 * 448 * 448, (h, w)  # today's code asked for 448 x 44_800_000 for 1 x 100000
    assert h >= stride and w >= stride and h % stride == 0 and w % stride == 0
    assert (h <= w) == (height <= width)  # the long side stays the long side
    assert (
        resized_size(height, width, 448, stride, multiple, max_pixels=200_000)[0]
        * resized_size(height, width, 448, stride, multiple, max_pixels=200_000)[1]
        <= 200_000
    )


@pytest.mark.parametrize("height,width", [(480, 640), (640, 480), (448, 448), (100, 400), (4000, 1000), (7, 9)])
def test_ordinary_shapes_are_untouched_by_the_bound(height, width):
    """Up to 4:1 the default bound changes nothing: sizes equal those without a bound."""
    for stride, multiple in [(16, 64), (16, 0), (14, 64)]:
        assert resized_size(height, width, 448, stride, multiple) == resized_size(
            height, width, 448, stride, multiple, max_pixels=10**12
        )
    assert resized_size(480, 640, 448, 16, 64) == (448, 576)
    assert resized_size(4000, 500, 0, 16) == (4000, 496)  # short_side 0 keeps the size: no default bound


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_state(TINY_VIT, tmp_path_factory.mktemp("w") / "tiny.pt")


def test_strips_segment_at_their_own_size(weights):
    model = MaskCLIP.load(model=TINY_VIT, pretrained=str(weights), device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in STRIPS[:3]]
    out = model.segment(images, ["sky", "food"], opts=SegmentOptions(short_side=64))
    for img, seg in zip(images, out):
        assert seg.labels.shape == img.shape[:2] and seg.confidence.shape == img.shape[:2]
        assert seg.grid_probs.shape[1] * seg.grid_probs.shape[2] * 64 <= 4 * 64 * 64  # grid of a bounded input


def _png_uri(height: int, width: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(weights, tmp_path_factory):
    settings = Settings(
        model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=64, templates="simple",
        model_dir=str(tmp_path_factory.mktemp("model_dir")), min_area=0.0, polygons=False,
    )  # fmt: skip
    return create_app(settings, warm=False).test_client()


def test_predict_with_strips_answers_every_task(client):
    photo = "data:image/jpeg;base64," + base64.b64encode((COCO128_PHOTOS / "000000000009.jpg").read_bytes()).decode()
    sizes = [(1, 2000), (1, 20000), (1, 100000)]
    tasks = [{"id": i, "data": {"image": _png_uri(h, w)}} for i, (h, w) in enumerate(sizes)]
    tasks.append({"id": 9, "data": {"image": photo}})
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH})
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["errors"] == []
    for (h, w), result in zip(sizes, body["results"]):
        region = result["result"][0]
        assert (region["original_height"], region["original_width"]) == (h, w)
    assert body["results"][3]["result"]


def test_one_image_failing_in_the_model_is_that_task_error(client, monkeypatch):
    """A model failure on one image (here an injected out-of-memory on images wider than 5000 pixels)
    leaves the other tasks of the batch predicted."""
    real_segment = MaskCLIP.segment

    def segment(self, images, *args, **kwargs):
        if any(img.shape[1] > 5000 for img in images):
            raise MemoryError("injected")
        return real_segment(self, images, *args, **kwargs)

    monkeypatch.setattr(MaskCLIP, "segment", segment)
    tasks = [{"id": 1, "data": {"image": _png_uri(40, 60)}}, {"id": 2, "data": {"image": _png_uri(1, 20000)}},
             {"id": 3, "data": {"image": _png_uri(50, 30)}}]  # fmt: skip
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH})
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["results"][0]["result"] and body["results"][2]["result"] and body["results"][1] == []
    assert body["errors"] == [{"task": 2, "error": "the model failed on this image (MemoryError)"}]
    assert backend_module.MaskCLIPBackend._segment  # the per-image path is the backend's
