"""End to end against a real Label Studio 1.23.2 and the backend running under gunicorn.

Label Studio (session fixture, tests/conftest.py) imports real photos, connects the backend, retrieves
predictions through the Data Manager, and sends webhooks for annotations created, updated and deleted
through its API; the backend's store and COCO export must follow.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from labelstudio_maskclip.learning.store import Store
from labelstudio_maskclip.masks.brush import mask_to_brush_rle
from tests.photos import COCO128_PHOTOS
from tests.served import start_backend, wait_for
from tests.tiny import TINY_VIT, save_random_state

pytestmark = pytest.mark.e2e

PHOTOS = COCO128_PHOTOS
NAMES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg", "000000000034.jpg"]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Animal" predicted_values="zebra,giraffe,animal"/>
    <Label value="Food" predicted_values="food,fruit,broccoli"/>
    <Label value="Plant"/>
  </BrushLabels>
  <PolygonLabels name="outline" toName="image">
    <Label value="Animal"/><Label value="Food"/><Label value="Plant"/>
  </PolygonLabels>
</View>"""
LABELS = {"Animal", "Food", "Plant"}


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    """`labelstudio-maskclip serve` (gunicorn, 2 workers) with a saved random-weight tiny model."""
    work = tmp_path_factory.mktemp("backend")
    weights = save_random_state(TINY_VIT, work / "tiny_vit.pt")
    extra = {
        "LABEL_STUDIO_API_KEY": label_studio.token, "LOG_LEVEL": "INFO",
        # MaskCLIP+ at toy scale: a tiny random student, 3 steps, promoted whatever its score.
        "MASKCLIP_STUDENT": "tiny", "MASKCLIP_STUDENT_PRETRAINED": "none", "MASKCLIP_TRAIN_STEPS": "3",
        "MASKCLIP_TRAIN_CROP": "64", "MASKCLIP_TRAIN_BATCH_SIZE": "2", "MASKCLIP_PROMOTE": "always",
    }  # fmt: skip
    served = start_backend(work, TINY_VIT, str(weights), label_studio.url, workers=2, extra_env=extra)
    yield {"url": served.url, "model_dir": served.model_dir, "log": served.log, "env": served.env}
    served.stop()


@pytest.fixture(scope="module")
def project(label_studio, backend):
    api = label_studio.api()
    proj = api.create_project("maskclip e2e", CONFIG)
    api.import_files(proj["id"], [PHOTOS / n for n in NAMES])
    ml = api.connect_ml_backend(proj["id"], backend["url"], title="maskclip")
    return {"id": proj["id"], "ml": ml, "tasks": api.list_tasks(proj["id"])}


def _label(region) -> str:
    return region["value"][region["type"]][0]


def _check_regions(result: list[dict], width: int, height: int) -> None:
    """Brush regions decode to the image's size; polygons come only for labels that have masks (not for
    specks under the polygon tracer's minimum area)."""
    brushes = {_label(r) for r in result if r["type"] == "brushlabels"}
    polygons = {_label(r) for r in result if r["type"] == "polygonlabels"}
    assert brushes and brushes <= LABELS and polygons and polygons <= brushes
    for region in result:
        assert (region["original_width"], region["original_height"]) == (width, height)
        if region["type"] == "brushlabels":
            assert region["from_name"] == "tag" and _decode(region).shape == (height, width) and _decode(region).any()
        else:
            assert region["from_name"] == "outline" and region["value"]["closed"]
            points = np.array(region["value"]["points"])
            assert points.shape[1] == 2 and len(points) >= 3 and points.min() >= 0 and points.max() <= 100


def _decode(region) -> np.ndarray:
    h, w = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def test_connect_reports_our_model_version(label_studio, project):
    ml = label_studio.api().get_ml_backend(project["ml"]["id"])
    assert ml["state"] in ("CO", "CONNECTED"), ml
    assert ml["model_version"].startswith("maskclip-MaskCLIP-Tiny-ViT.tiny_vit.pt")


def test_retrieve_predictions_gives_every_task_brush_masks_and_polygons_of_its_image_size(label_studio, project):
    api = label_studio.api()
    api.retrieve_predictions(project["id"])
    for task in project["tasks"]:
        preds = wait_for(lambda task=task: api.list_predictions(task["id"]), 120, f"predictions of task {task['id']}")
        assert len(preds) == 1
        pred = preds[0]
        assert pred["model_version"].startswith("maskclip-") and 0 < pred["score"] <= 1
        name = Path(task["data"]["image"]).name.split("-", 1)[-1]
        width, height = Image.open(PHOTOS / name).size
        _check_regions(pred["result"], width, height)


def test_accepting_a_prediction_counts_as_unchanged_per_label(label_studio, project, backend):
    """An annotation made from a pre-annotation names it (``parent_prediction``): regions kept as predicted
    count as unchanged for their label, the region moved counts as edited."""
    api = label_studio.api()
    task = project["tasks"][2]
    pred = wait_for(lambda task=task: api.list_predictions(task["id"]), 120, "a prediction")[0]
    brushes = [r for r in pred["result"] if r["type"] == "brushlabels"]
    result = [dict(r) for r in brushes]
    edited = _label(result[0])
    mask = _decode(result[0])
    result[0] = {**result[0], "value": {**result[0]["value"], "rle": mask_to_brush_rle(np.roll(mask, 25, axis=1))}}
    ann = api.create_annotation(task["id"], result, parent_prediction=pred["id"])
    store = Store(backend["model_dir"])
    # The webhook names the parent prediction; the backend fetches it from Label Studio in the background.
    wait_for(lambda: (store.annotation(ann["id"]) or {}).get("accepted_unchanged") is not None, 30, "the outcome")
    stats = store.acceptance_stats()
    assert stats[edited]["edited"] >= 1
    for region in brushes[1:]:
        assert stats[_label(region)]["unchanged"] >= 1
    assert stats["(annotations)"]["edited"] >= 1
    api.delete_annotation(ann["id"])


def test_annotations_created_updated_deleted_reach_the_store_and_the_export(label_studio, project, backend, tmp_path):
    api = label_studio.api()
    task = project["tasks"][0]
    width, height = Image.open(PHOTOS / NAMES[0]).size
    mask = np.zeros((height, width), bool)
    mask[50:200, 100:400] = True
    region = {
        "id": "a1", "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Food"]},
    }  # fmt: skip
    ann = api.create_annotation(task["id"], [region])
    store = Store(backend["model_dir"])

    def stored_masks():
        return {s.annotation_id: s.masks for s in store.accepted_samples()}.get(ann["id"])

    masks = wait_for(stored_masks, 30, "the ANNOTATION_CREATED webhook to be stored")
    assert set(masks) == {"Food"} and np.array_equal(masks["Food"], mask)

    moved = np.roll(mask, 60, axis=0)
    region2 = {**region, "value": {**region["value"], "rle": mask_to_brush_rle(moved), "brushlabels": ["Plant"]}}
    api.update_annotation(ann["id"], result=[region2])
    masks = wait_for(lambda: (m := stored_masks()) and "Plant" in m and m, 30, "the update")
    assert set(masks) == {"Plant"} and np.array_equal(masks["Plant"], moved)

    out = tmp_path / "coco.json"
    cli = [sys.executable, "-m", "labelstudio_maskclip.cli", "export-coco", "--out", str(out), "--project",
           str(project["id"])]  # fmt: skip
    subprocess.run(cli, env=backend["env"], check=True, timeout=120)
    from pycocotools.coco import COCO

    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["Animal", "Food", "Plant"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[task["id"]]))
    union = np.zeros((height, width), bool)
    for a in anns:
        union |= coco.annToMask(a).astype(bool)
        assert a["category_id"] == 3
    assert np.array_equal(union, moved)

    api.delete_annotation(ann["id"])
    wait_for(lambda: stored_masks() is None, 30, "the ANNOTATIONS_DELETED webhook")


def test_bad_requests_do_not_stop_the_backend(backend):
    url = backend["url"]
    assert requests.post(url + "/predict", data=b"{oops", timeout=10).status_code == 400
    r = requests.post(url + "/predict", json={"tasks": [{"id": 1, "data": {"image": "/nope.png"}}],
                                               "label_config": CONFIG}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.json()["results"] == [[]] and r.json()["errors"]
    assert requests.get(url + "/health", timeout=5).json()["status"] == "UP"


def test_preannotate_pushes_predictions_through_the_api_and_resumes(label_studio, backend):
    api = label_studio.api()
    proj = api.create_project("maskclip bulk", CONFIG)
    api.import_files(proj["id"], [PHOTOS / n for n in NAMES[:3]])
    cli = [
        sys.executable,
        "-m",
        "labelstudio_maskclip.cli",
        "preannotate",
        "--project",
        str(proj["id"]),
        "--batch",
        "2",
    ]
    first = subprocess.run(cli, env=backend["env"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["predicted"] == 3 and summary["skipped"] == 0 and summary["failed"] == 0
    for task in api.list_tasks(proj["id"]):
        preds = api.list_predictions(task["id"])
        assert [p["model_version"] for p in preds] == [summary["model_version"]]
        assert preds[0]["result"] and all(_decode(r).any() for r in preds[0]["result"] if r["type"] == "brushlabels")
    again = subprocess.run(cli, env=backend["env"], capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 3  # resumable: nothing redone


def test_start_training_serves_a_new_model_version_to_label_studio(label_studio, project, backend):
    api = label_studio.api()
    task = project["tasks"][1]
    width, height = Image.open(PHOTOS / NAMES[1]).size
    mask = np.zeros((height, width), bool)
    mask[: height // 2] = True
    region = {
        "id": "t1", "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Animal"]},  # predicted_values
    }  # fmt: skip
    api.create_annotation(task["id"], [region])
    store = Store(backend["model_dir"])
    wait_for(lambda: any(s.task_id == task["id"] for s in store.accepted_samples()), 30, "the annotation")

    api.train(project["ml"]["id"])  # Label Studio sends START_TRAINING to /webhook
    from labelstudio_maskclip.training.checkpoints import current_version

    version = wait_for(lambda: current_version(backend["model_dir"]), 240, "a promoted student")
    assert version == "maskclip+-1"
    setup = requests.post(backend["url"] + "/setup", json={"project": "x", "schema": CONFIG}, timeout=30).json()
    assert setup["model_version"] == version

    api.retrieve_predictions(project["id"])
    for t in project["tasks"]:
        preds = wait_for(
            lambda t=t: [p for p in api.list_predictions(t["id"]) if p["model_version"] == version], 120,
            f"a {version} prediction of task {t['id']}",
        )  # fmt: skip
        width, height = Image.open(PHOTOS / Path(t["data"]["image"]).name.split("-", 1)[-1]).size
        _check_regions(preds[0]["result"], width, height)
    runs = list((backend["model_dir"] / "runs").glob("*/metrics.json"))
    assert runs and "decision" in json.loads(runs[0].read_text())
    data = json.loads(runs[0].read_text())["data"]
    assert data["unknown_label_masks"] == 0 and data["annotated"] + data["validation"] >= 1  # people's masks used


def test_backfill_and_export_straight_from_the_project(label_studio, project, backend, tmp_path):
    """A project annotated before the backend was connected: backfill its annotations through the API into
    a fresh store, and export COCO straight from the project; both equal what the webhooks stored."""
    env = {**backend["env"], "MODEL_DIR": str(tmp_path / "fresh")}
    cli = [sys.executable, "-m", "labelstudio_maskclip.cli"]
    run = subprocess.run([*cli, "backfill", "--project", str(project["id"])], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    live = {s.annotation_id: s.masks for s in Store(backend["model_dir"]).accepted_samples()}
    backfilled = {s.annotation_id: s.masks for s in Store(tmp_path / "fresh").accepted_samples()}
    assert live and backfilled.keys() == live.keys()
    for ann_id, masks in live.items():
        assert masks.keys() == backfilled[ann_id].keys()
        assert all(np.array_equal(masks[k], backfilled[ann_id][k]) for k in masks)

    out = tmp_path / "from_api.json"
    run = subprocess.run([*cli, "export-coco", "--from-api", "--project", str(project["id"]), "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    from pycocotools.coco import COCO

    coco = COCO(str(out))
    assert {img["id"] for img in coco.loadImgs(coco.getImgIds())} == {
        s.task_id for s in Store(tmp_path / "fresh").accepted_samples()
    }


def test_basic_auth_backend_with_label_studio(label_studio, backend, tmp_path):
    """Label Studio sends the connection's basic-auth credentials on /health, /setup and /predict. Its
    webhook to the backend carries no credentials until the webhook gets an Authorization header (the
    README's recipe): before that, annotations are refused with 401; after it, they are stored."""
    from labelstudio_maskclip.serving.server import basic_auth_header

    weights = next(Path(backend["env"]["MODEL_DIR"]).parent.glob("*.pt"))
    secured = start_backend(tmp_path / "secured", TINY_VIT, str(weights), label_studio.url, workers=1,
                            extra_env={"LABEL_STUDIO_API_KEY": label_studio.token, "BASIC_AUTH_USER": "ls",
                                       "BASIC_AUTH_PASS": "s3cret"})  # fmt: skip
    try:
        api = label_studio.api()
        proj = api.create_project("maskclip basic auth", CONFIG)
        api.import_files(proj["id"], [PHOTOS / NAMES[0]])
        with pytest.raises(requests.HTTPError, match="400"):
            api.connect_ml_backend(proj["id"], secured.url, title="no credentials")
        api.connect_ml_backend(proj["id"], secured.url, title="secured", auth_method="BASIC_AUTH",
                               basic_auth_user="ls", basic_auth_pass="s3cret")  # fmt: skip
        api.retrieve_predictions(proj["id"])
        task = api.list_tasks(proj["id"])[0]
        assert wait_for(lambda task=task: api.list_predictions(task["id"]), 60, "a prediction")[0]["result"]

        width, height = Image.open(PHOTOS / NAMES[0]).size
        region = {
            "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(np.ones((height, width), bool)), "brushlabels": ["Plant"]},
        }  # fmt: skip
        store = Store(secured.model_dir)
        first = api.create_annotation(task["id"], [region])
        # The webhook must arrive and be refused: the backend's access log shows it answered 401.
        wait_for(lambda: re.search(r'"POST /webhook[^"]*" 401 ', secured.log_text()), 60, "the refused webhook (401)")
        assert store.annotation(first["id"]) is None
        hooks = [h for h in api.request("GET", "/api/webhooks/", params={"project": proj["id"]})
                 if h["url"].startswith(secured.url)]  # fmt: skip
        assert len(hooks) == 1
        api.request("PATCH", f"/api/webhooks/{hooks[0]['id']}/",
                    json={"headers": {"Authorization": basic_auth_header("ls", "s3cret")}})  # fmt: skip
        second = api.create_annotation(task["id"], [region])
        wait_for(lambda: store.annotation(second["id"]), 60, "the authorised webhook")
        assert re.search(r'"POST /webhook[^"]*" 201 ', secured.log_text())
    finally:
        secured.stop()


def test_local_files_storage_images_are_fetched_with_the_token(label_studio, backend):
    """Tasks whose images live in a Local Storage (``/data/local-files/?d=...``): Label Studio serves them
    only with the API token and only under a registered storage; the backend fetches them and predicts."""
    folder = label_studio.files_root / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NAMES[1]).write_bytes((PHOTOS / NAMES[1]).read_bytes())
    api = label_studio.api()
    proj = api.create_project("maskclip local files", CONFIG)
    api.request("POST", "/api/storages/localfiles", json={"project": proj["id"], "path": str(folder),
                                                         "title": "photos", "use_blob_urls": True})  # fmt: skip
    api.import_tasks(proj["id"], [{"image": f"/data/local-files/?d=photos/{NAMES[1]}"}])
    task = api.list_tasks(proj["id"])[0]
    assert api.get_bytes(task["data"]["image"], authorized=False).status_code in (401, 403)
    reply = requests.post(backend["url"] + "/predict", json={"tasks": [task], "label_config": CONFIG}, timeout=60)
    width, height = Image.open(PHOTOS / NAMES[1]).size
    body = reply.json()
    assert reply.status_code == 200 and body["errors"] == [], body["errors"]
    _check_regions(body["results"][0]["result"], width, height)
