"""The ML backend's HTTP surface (Flask app, called through WSGI), with real images served on loopback."""

from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from labelstudio_maskclip.masks.polygons import percent_to_points
from labelstudio_maskclip.serving.server import basic_auth_header, create_app
from labelstudio_maskclip.settings import Settings
from tests.photos import COCO128_PHOTOS
from tests.tiny import TINY_VIT

PHOTOS = COCO128_PHOTOS
BRUSH = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image">
  <Label value="Animal" predicted_values="cat,dog,animal"/><Label value="Food"/><Label value="Sky"/>
</BrushLabels></View>"""
BOTH = BRUSH.replace(
    "</View>",
    '<PolygonLabels name="poly" toName="image"><Label value="Food"/><Label value="Sky"/></PolygonLabels></View>',
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A loopback HTTP server playing Label Studio's file host: a photo, a text file, 404s."""
    root = tmp_path_factory.mktemp("files")
    (root / "photo.jpg").write_bytes((PHOTOS / "000000000009.jpg").read_bytes())
    (root / "notes.txt").write_text("not an image")
    (root / "truncated.jpg").write_bytes((PHOTOS / "000000000025.jpg").read_bytes()[:2000])

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def translate_path(self, path):  # Label Studio serves uploads under /data/upload/
            return super().translate_path(path.removeprefix("/data/upload"))

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def settings(tmp_path_factory, files, weights):
    return Settings(
        model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=64, templates="simple",
        model_dir=str(tmp_path_factory.mktemp("model_dir")), label_studio_url=files, min_area=0.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(settings):
    return create_app(settings, warm=False).test_client()


def _data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def test_health_and_setup_report_the_model_version(client):
    assert client.get("/health").get_json()["status"] == "UP"
    reply = client.post("/setup", json={"project": "1.17", "schema": BRUSH})
    assert reply.status_code == 200
    # the default preset, naclip, and the settings that override it
    assert (
        reply.get_json()["model_version"]
        == "maskclip-MaskCLIP-Tiny-ViT.tiny_vit.pt-naclip+short_side=64+templates=simple"
    )


def test_setup_refuses_a_config_without_a_usable_control(client):
    reply = client.post("/setup", json={"schema": '<View><Image name="i" value="$image"/></View>'})
    assert reply.status_code == 400
    assert "BrushLabels" in reply.get_json()["error"]


def test_predict_gives_brush_masks_per_task_and_clear_errors_for_bad_tasks(client, files):
    photo = Image.open(PHOTOS / "000000000009.jpg")
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/photo.jpg"}},  # relative: resolved against LABEL_STUDIO_URL
        {"id": 2, "data": {"text": "no image here"}},
        {"id": 3, "data": {"image": "/data/upload/notes.txt"}},
        {"id": 4, "data": {"image": "/data/upload/missing.jpg"}},
        {"id": 5, "data": {"image": "/data/upload/truncated.jpg"}},
        {"id": 6, "data": {"image": _data_uri(PHOTOS / "000000000025.jpg")}},
        {"id": 7, "data": {"image": "http://10.1.2.3/private.jpg"}},  # SSRF: private address refused
    ]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH, "project": "1.1"})
    assert reply.status_code == 200
    body = reply.get_json()
    results = body["results"]
    assert len(results) == len(tasks)
    for i in (0, 5):
        pred = results[i]
        assert pred["model_version"] == body["model_version"] and 0 <= pred["score"] <= 1
        assert pred["result"], "the photo got no region"
        union = np.zeros((pred["result"][0]["original_height"], pred["result"][0]["original_width"]), bool)
        for region in pred["result"]:
            assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
            assert region["value"]["brushlabels"][0] in {"Animal", "Food", "Sky"}
            h, w = region["original_height"], region["original_width"]
            mask = decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
            assert mask.any() and not (mask & union).any()  # one label per pixel
            union |= mask
            assert 0 < region["score"] <= 1
        if i == 0:
            assert union.shape == (photo.height, photo.width)
    assert all(results[i] == [] for i in (1, 2, 3, 4, 6))
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert "no image under 'image'" in errors[2]
    assert "404" in errors[4]
    assert errors[3] and errors[5]
    assert "MASKCLIP_ALLOW_PRIVATE_URLS" in errors[7]


def test_polygon_controls_get_polygons_traced_from_the_same_masks(client):
    tasks = [{"id": 1, "data": {"image": "/data/upload/photo.jpg"}}]
    result = client.post("/predict", json={"tasks": tasks, "label_config": BOTH}).get_json()["results"][0]["result"]
    polys = [r for r in result if r["type"] == "polygonlabels"]
    brushes = {r["value"]["brushlabels"][0]: r for r in result if r["type"] == "brushlabels"}
    assert brushes, "every pixel has a label, so some brush region must exist"
    for label in ("Food", "Sky"):
        mine = [r for r in polys if r["value"]["polygonlabels"] == [label]]
        assert bool(mine) == (label in brushes)  # polygons exactly for the labels with masks
        if not mine:
            continue
        brush = brushes[label]
        mask = decode_rle(brush["value"]["rle"]).reshape(480, 640, 4)[:, :, 3] > 0
        for r in mine:
            assert r["from_name"] == "poly" and r["value"]["closed"]
            pts = percent_to_points(r["value"]["points"], 480, 640)
            assert pts.min() >= 0 and pts[:, 0].max() <= 640 and pts[:, 1].max() <= 480
            centre = pts.mean(0).astype(int)
            assert mask[
                max(0, min(479, centre[1]) - 40) : centre[1] + 40, max(0, centre[0] - 40) : centre[0] + 40
            ].any()


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"{not json", 400, "JSON object"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"tasks": "x", "label_config": "<View/>"}', 400, "'tasks' must be a list"),
        (b'{"tasks": [{"id": 1, "data": {}}]}', 400, "no labeling config"),
        (b'{"tasks": [], "label_config": "<View><Image"}', 400, "labeling config"),
    ],
)
def test_malformed_predict_requests_get_a_clear_400(client, body, status, message):
    reply = client.post("/predict", data=body, content_type="application/json")
    assert reply.status_code == status and message in reply.get_json()["error"]
    assert client.get("/health").status_code == 200  # still serving


def _annotation_created(mask: np.ndarray) -> dict:
    """An ANNOTATION_CREATED webhook of annotation 11 on task 5: one brush region, label Food."""
    from labelstudio_maskclip.masks.brush import mask_to_brush_rle

    region = {
        "id": "r1", "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": 640, "original_height": 480, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Food"]},
    }  # fmt: skip
    payload = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 11, "result": [region], "was_cancelled": False, "ground_truth": False,
                       "completed_by": 1, "task": 5, "project": 1, "updated_at": "2026-11-28T10:00:00Z"},
        "task": {"id": 5, "data": {"image": "/data/upload/photo.jpg"}, "project": 1},
        "project": {"id": 1, "label_config": BRUSH},
    }  # fmt: skip
    return payload


def test_webhook_stores_annotations_and_ignores_other_actions(client, settings):
    mask = np.zeros((480, 640), bool)
    mask[100:200, 50:300] = True
    reply = client.post("/webhook", json=_annotation_created(mask))
    assert reply.status_code == 201 and reply.get_json()["status"] == "stored"
    from labelstudio_maskclip.learning.store import Store

    samples = list(Store(Path(settings.model_dir)).accepted_samples())
    assert len(samples) == 1 and np.array_equal(samples[0].masks["Food"], mask)
    assert client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {}}).get_json()["status"] == "ignored"
    assert client.post("/webhook", json={"no": "action"}).status_code == 400
    metrics = client.get("/metrics").get_json()
    assert metrics["annotations_since_training"] >= 1 and metrics["students"] == []
    assert metrics["model_version"].startswith("maskclip-")
    assert metrics["pipeline"] == {"preset": "naclip", "overrides": {"short_side": 64, "templates": "simple"}}


def test_webhooks_on_a_postgresql_store_and_a_503_while_it_cannot_be_reached(
    settings, postgres_url, postgres, tmp_path
):
    from labelstudio_maskclip.learning.store import Store

    mask = np.zeros((480, 640), bool)
    mask[10:90, 20:200] = True
    app = create_app(settings.replace(store_url=postgres_url, model_dir=str(tmp_path / "a")), warm=False)
    client = app.test_client()
    assert client.post("/webhook", json=_annotation_created(mask)).get_json()["status"] == "stored"
    assert client.post("/webhook", json=_annotation_created(mask)).get_json()["status"] == "duplicate"
    (sample,) = Store(postgres_url).accepted_samples()
    assert np.array_equal(sample.masks["Food"], mask) and not (tmp_path / "a" / "annotations.sqlite3").exists()
    gone = f"postgresql://maskclip@/postgres?host={postgres.root}&port={postgres.port + 1}&connect_timeout=2"
    down = create_app(settings.replace(store_url=gone, model_dir=str(tmp_path / "b")), warm=False).test_client()
    reply = down.post("/webhook", json=_annotation_created(mask))
    assert reply.status_code == 503 and reply.get_json()["error"].startswith("annotation store unavailable: ")
    assert down.get("/health").status_code == 200  # the server keeps serving


def test_basic_auth_when_configured(settings):
    app = create_app(settings.replace(basic_auth_user="ls", basic_auth_pass="s3cret"), warm=False).test_client()
    assert app.get("/health").status_code == 401
    assert app.get("/health", headers={"Authorization": basic_auth_header("ls", "wrong")}).status_code == 401
    assert app.get("/health", headers={"Authorization": basic_auth_header("ls", "s3cret")}).status_code == 200


def test_missing_weights_make_health_and_predict_say_why(settings, tmp_path):
    app = create_app(settings.replace(pretrained=str(tmp_path / "absent.pt")), warm=True)
    client = app.test_client()
    for _ in range(100):
        reply = client.get("/health")
        if reply.status_code == 503:
            break
        threading.Event().wait(0.05)
    assert reply.status_code == 503 and "MASKCLIP_PRETRAINED" in reply.get_json()["error"]
    reply = client.post("/predict", json={"tasks": [], "label_config": BRUSH})
    assert reply.status_code == 503 and "MASKCLIP_PRETRAINED" in reply.get_json()["error"]


def test_a_spent_time_budget_answers_at_once_with_a_reason_per_task(settings):
    """Label Studio gives /predict 100 s: what the budget cannot hold gets no prediction (asked again later)
    and a reason, instead of the whole request timing out (tests/test_serving.py has the batch arithmetic).
    A budget of a microsecond is spent before anything can be done (0 is refused by the settings)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), 128, np.uint8)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    tasks = [{"id": i, "data": {"image": uri}} for i in range(70)]
    client = create_app(settings.replace(predict_time_budget=1e-6), warm=False).test_client()
    body = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH}).get_json()
    assert body["results"] == [[]] * len(tasks)
    assert [e["task"] for e in body["errors"]] == list(range(70))


def test_a_damaged_student_checkpoint_falls_back_to_maskclip(settings, tmp_path):
    from labelstudio_maskclip.files import write_atomic
    from labelstudio_maskclip.training import checkpoints as ck

    damaged = settings.replace(model_dir=str(tmp_path))
    write_atomic(ck.checkpoint_path(tmp_path, "maskclip+-1"), b"not a checkpoint")
    write_atomic(ck.models_dir(tmp_path) / ck._POINTER, b"maskclip+-1\n")
    assert ck.current_version(tmp_path) == "maskclip+-1"
    client = create_app(damaged, warm=False).test_client()
    assert client.post("/setup", json={"schema": BRUSH}).get_json()["model_version"].startswith("maskclip-")
    tasks = [{"id": 1, "data": {"image": "/data/upload/photo.jpg"}}]
    body = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH}).get_json()
    assert body["results"][0]["result"] and body["model_version"].startswith("maskclip-")


def _promote_tiny_student(model_dir, classes, settings=None) -> str:
    """Register a random tiny student trained (so its checkpoint says) for ``classes``; returns its version."""
    import torch

    from labelstudio_maskclip.training import checkpoints as ck
    from labelstudio_maskclip.training.student import build_student

    emb = torch.nn.functional.normalize(
        torch.randn(len(classes), 16, generator=torch.Generator().manual_seed(0)), dim=1
    )
    net = build_student("tiny", emb, "none")
    payload = {"student": "tiny", "state_dict": net.state_dict(), "embeddings": emb,
               "classes": [list(c) for c in classes], "background": [], "settings": settings or {}}  # fmt: skip
    return ck.promote(model_dir, payload)


#: BRUSH's labels as the model sees them: Animal via predicted_values, Food and Sky by their own text
BRUSH_CLASSES = [("cat", "dog", "animal"), ("Food",), ("Sky",)]


@pytest.mark.parametrize(
    "trained_for",
    [
        [("cat", "dog", "animal"), ("Food",)],  # a label fewer
        [("cat", "dog", "animal"), ("Food",), ("Sky",), ("Tree",)],  # a label more
        [("cat", "dog"), ("Food",), ("Sky",)],  # same values, other model-side names
        [("Animal",), ("Food",), ("Sky",)],  # label values instead of predicted_values
    ],
)
def test_a_student_trained_for_other_labels_is_not_served(settings, tmp_path, trained_for):
    """The promoted student answers only projects whose labels are the ones it was trained for (any order);
    for any other project MaskCLIP is served, and /predict still gives every task a prediction."""
    other = settings.replace(model_dir=str(tmp_path))
    version = _promote_tiny_student(tmp_path, trained_for)
    client = create_app(other, warm=False).test_client()
    assert client.post("/setup", json={"schema": BRUSH}).get_json()["model_version"].startswith("maskclip-")
    tasks = [{"id": 1, "data": {"image": "/data/upload/photo.jpg"}}]
    body = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH}).get_json()
    assert body["model_version"].startswith("maskclip-") and body["model_version"] != version
    assert body["results"][0]["result"] and body["errors"] == []


def test_a_student_trained_for_the_projects_labels_is_served(settings, tmp_path):
    other = settings.replace(model_dir=str(tmp_path))
    version = _promote_tiny_student(tmp_path, list(reversed(BRUSH_CLASSES)))  # order does not matter
    client = create_app(other, warm=False).test_client()
    assert client.post("/setup", json={"schema": BRUSH}).get_json()["model_version"] == version
    tasks = [{"id": 1, "data": {"image": "/data/upload/photo.jpg"}}]
    body = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH}).get_json()
    assert body["model_version"] == version and body["results"][0]["model_version"] == version
    labels = {r["value"]["brushlabels"][0] for r in body["results"][0]["result"]}
    assert labels and labels <= {"Animal", "Food", "Sky"}


def test_metrics_never_serve_secrets(settings, tmp_path):
    """/metrics lists the students with their training settings: never the credentials, neither for a
    checkpoint promoted now nor for one whose metadata was written with them by an older version."""
    import dataclasses
    import json

    from labelstudio_maskclip.training import checkpoints as ck

    secret = settings.replace(model_dir=str(tmp_path), label_studio_api_key="lsk-0123456789-secret",
                              basic_auth_user="ls", basic_auth_pass="pw-9876543210-secret")  # fmt: skip
    everything = dataclasses.asdict(secret)  # what the trainer used to store
    _promote_tiny_student(tmp_path, BRUSH_CLASSES, everything)
    legacy = ck.models_dir(tmp_path) / "maskclip+-2.json"
    ck.write_atomic(ck.checkpoint_path(tmp_path, "maskclip+-2"), b"weights")
    legacy.write_text(json.dumps({"version": "maskclip+-2", "settings": everything}))
    on_disk = b"".join(p.read_bytes() for p in ck.models_dir(tmp_path).glob("maskclip+-1.*"))
    assert b"-secret" not in on_disk and b"train_steps" in on_disk
    client = create_app(secret, warm=False).test_client()
    reply = client.get("/metrics", headers={"Authorization": basic_auth_header("ls", secret.basic_auth_pass)})
    students = reply.get_json()["students"]
    assert [s["version"] for s in students] == ["maskclip+-1", "maskclip+-2"]
    assert all(s["settings"]["basic_auth_user"] == "ls" for s in students)
    assert b"-secret" not in reply.data


INTERACTIVE = BRUSH.replace(
    "</View>",
    '<KeyPointLabels name="click" toName="image" smart="true"><Label value="Animal"/></KeyPointLabels></View>',
)
CLICK = {"type": "keypointlabels", "from_name": "click", "to_name": "image", "is_positive": True,
         "original_width": 640, "original_height": 480,
         "value": {"x": 10, "y": 10, "width": 0.3, "keypointlabels": ["Animal"]}}  # fmt: skip


@pytest.mark.parametrize("data", ["/data/upload/photo.jpg", ["/data/upload/photo.jpg"], 7, None], ids=repr)
def test_task_data_that_is_not_an_object_is_that_tasks_clear_error(client, data):
    """``task.data`` is whatever JSON the client sent: a batch answers with that task's reason, an interactive
    request (one task) with a 400 naming it; never a 500."""
    tasks = [{"id": 1, "data": data}, {"id": 2, "data": {"image": "/data/upload/photo.jpg"}}]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH})
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["results"][0] == [] and body["results"][1]["result"]
    got = {str: " (got a JSON string)", list: " (got a JSON array)", int: " (got a JSON number)"}.get(type(data), "")
    assert body["errors"] == [{"task": 1, "error": f"task has no 'data' object{got}"}]
    context = {"params": {"context": {"result": [CLICK]}}}
    reply = client.post("/predict", json={"tasks": tasks[:1], "label_config": INTERACTIVE, **context})
    assert reply.status_code == 400 and "task has no 'data' object" in reply.get_json()["error"]
    assert client.post("/predict", json={"tasks": tasks[1:], "label_config": INTERACTIVE, **context}).status_code == 200


def test_one_handler_answers_every_error_of_the_package_by_its_branch(tmp_path):
    """Bad input 400 (its subject first), too much 413, unavailable 503 (Retry-After when busy), anything
    else 500; the server keeps answering."""
    from labelstudio_maskclip.errors import BadInput, Unavailable
    from labelstudio_maskclip.labelstudio.labeling import LabelConfigError
    from labelstudio_maskclip.learning.store import StoreError
    from labelstudio_maskclip.serving import server

    raised = {
        "config": LabelConfigError("no <Image>"), "input": BadInput("bad"), "store": StoreError("locked"),
        "busy": server._Busy("retry shortly"), "large": server._TooLarge("too much"),
        "gone": Unavailable("no model"), "bug": KeyError("x"),
    }  # fmt: skip
    app = create_app(Settings(model_dir=str(tmp_path)), warm=False)

    def boom(kind: str):
        raise raised[kind]

    app.add_url_rule("/boom/<kind>", view_func=boom)
    client = app.test_client()
    answers = {kind: client.get(f"/boom/{kind}") for kind in raised}
    assert {k: r.status_code for k, r in answers.items()} == {
        "config": 400, "input": 400, "store": 503, "busy": 503, "large": 413, "gone": 503, "bug": 500,
    }  # fmt: skip
    assert answers["config"].get_json()["error"] == "labeling config: no <Image>"
    assert answers["store"].get_json()["error"] == "annotation store unavailable: locked"
    assert answers["busy"].headers["Retry-After"] == "5" and "Retry-After" not in answers["gone"].headers
    assert answers["bug"].get_json()["error"] == "internal error: KeyError: 'x'"
    assert client.get("/health").status_code in (200, 503)  # still serving
