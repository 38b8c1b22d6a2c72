"""Interactive prompting end to end: the editor's calls through a real Label Studio 1.23.2.

The project has a TextArea, KeyPointLabels, RectangleLabels and BrushLabels on one image; the backend is
connected with *Interactive preannotations* on; each kind of context goes through Label Studio's
``POST /api/ml/{id}/interactive-annotating``, exactly as the editor sends it.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from tests.photos import COCO128_PHOTOS
from tests.served import start_backend
from tests.tiny import TINY_VIT

pytestmark = pytest.mark.e2e

PHOTO = COCO128_PHOTOS / "000000000030.jpg"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" perRegion="false" placeholder="what to segment"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Plant"/><Label value="Vase"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Plant"/><Label value="Vase"/></RectangleLabels>
  <BrushLabels name="tag" toName="image">
    <Label value="Plant" predicted_values="plant,flowers"/><Label value="Vase"/>
  </BrushLabels>
</View>"""


@pytest.fixture(scope="module")
def setup(label_studio, tmp_path_factory, weights):
    work = tmp_path_factory.mktemp("interactive")
    served = start_backend(work, TINY_VIT, str(weights), label_studio.url, workers=1,
                           extra_env={"LABEL_STUDIO_API_KEY": label_studio.token})  # fmt: skip
    api = label_studio.api()
    project = api.create_project("maskclip interactive", CONFIG)
    api.import_files(project["id"], [PHOTO])
    ml = api.connect_ml_backend(project["id"], served.url, title="maskclip", is_interactive=True)
    (task,) = api.list_tasks(project["id"], fields_all=False)
    yield api, ml, task
    served.stop()


def _ask(api, ml: dict, task: dict, items: list[dict]) -> dict:
    """What the editor gets back from Label Studio for this context."""
    return api.request("POST", f"/api/ml/{ml['id']}/interactive-annotating",
                       json={"task": task["id"], "context": {"result": items}})  # fmt: skip


def _mask(region: dict) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def test_label_studio_records_the_backend_as_interactive(setup):
    api, ml, _ = setup
    assert api.get_ml_backend(ml["id"])["is_interactive"] is True


def test_a_typed_phrase_gives_a_mask_of_the_label_it_names(setup):
    api, ml, task = setup
    reply = _ask(api, ml, task, [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                  "value": {"text": ["flowers, vase"]}}])  # fmt: skip
    assert "errors" not in reply or not reply["errors"], reply
    result = reply["data"]["result"]
    width, height = Image.open(PHOTO).size
    assert result and all(r["from_name"] == "tag" and r["type"] == "brushlabels" for r in result)
    by_phrase = {r["meta"]["text"][0]: r for r in result}
    if "prompt: flowers" in by_phrase:  # a random model may find a phrase nowhere; the other then exists
        assert by_phrase["prompt: flowers"]["value"]["brushlabels"] == ["Plant"]  # predicted_values
    if "prompt: vase" in by_phrase:
        assert by_phrase["prompt: vase"]["value"]["brushlabels"] == ["Vase"]
    for r in result:
        assert _mask(r).shape == (height, width) and _mask(r).any()


def test_a_click_gives_the_region_that_contains_it(setup):
    api, ml, task = setup
    width, height = Image.open(PHOTO).size
    item = {"type": "keypointlabels", "from_name": "click", "to_name": "image", "is_positive": True,
            "original_width": width, "original_height": height,
            "value": {"x": 40.0, "y": 55.0, "width": 0.5, "keypointlabels": ["Vase"]}}  # fmt: skip
    (region,) = _ask(api, ml, task, [item])["data"]["result"]
    assert region["value"]["brushlabels"] == ["Vase"] and 0 <= region["score"] <= 1
    assert _mask(region)[int(0.55 * height), int(0.40 * width)]


def test_a_box_gives_a_mask_inside_the_box(setup):
    api, ml, task = setup
    width, height = Image.open(PHOTO).size
    item = {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "original_width": width, "original_height": height,
            "value": {"x": 20.0, "y": 10.0, "width": 50.0, "height": 60.0, "rotation": 0,
                      "rectanglelabels": ["Plant"]}}  # fmt: skip
    (region,) = _ask(api, ml, task, [item])["data"]["result"]
    mask = _mask(region)
    ys, xs = np.nonzero(mask)
    assert region["value"]["brushlabels"] == ["Plant"] and mask.any()
    assert xs.min() >= int(0.2 * width) - 1 and xs.max() <= int(0.7 * width) + 1
    assert ys.min() >= int(0.1 * height) - 1 and ys.max() <= int(0.7 * height) + 1


def test_an_unusable_context_is_refused_with_its_reason(setup, label_studio):
    """Label Studio 1.23 passes on only the status of a refused interactive call ("400 Client Error"); the
    reason is in the backend's reply body (and its log), which a direct call shows."""
    api, ml, task = setup
    item = {"type": "keypointlabels", "from_name": "click", "to_name": "image",
            "value": {"x": 10, "y": 10, "keypointlabels": ["Bus"]}}  # fmt: skip
    reply = _ask(api, ml, task, [item])
    assert "data" not in reply and any("400" in e for e in reply["errors"]), reply
    direct = requests.post(f"{ml['url']}/predict", timeout=60, json={
        "tasks": [api.request("GET", f"/api/tasks/{task['id']}")], "label_config": CONFIG,
        "params": {"context": {"result": [item]}},
    })  # fmt: skip
    assert direct.status_code == 400 and "'Bus'" in direct.json()["error"], direct.text
