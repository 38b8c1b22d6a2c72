"""The real Label Studio harness works, and what LS sends a backend is what we think it is."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from tests.labelstudio import LabelStudioAPI, LabelStudioServer, LabelStudioUnavailable
from tests.photos import COCO128_PHOTOS

pytestmark = pytest.mark.e2e

PHOTOS = COCO128_PHOTOS
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="person"/>
    <Label value="dog"/>
  </BrushLabels>
</View>"""


class RecordingBackend:
    """A tiny Flask app on a loopback port: answers /health, /setup, /predict, records every body."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        app = Flask("recording-backend")
        health = lambda: jsonify(status="UP", model_class="Recorder")  # noqa: E731
        app.add_url_rule("/health", "health", health)
        app.add_url_rule("/", "index", health)
        app.add_url_rule("/setup", view_func=self._setup, methods=["POST"])
        app.add_url_rule("/webhook", view_func=self._webhook, methods=["POST"])
        app.add_url_rule("/predict", view_func=self._predict, methods=["POST"])
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _record(self, route: str) -> dict:
        body = request.get_json(force=True, silent=True) or {}
        with self.lock:
            self.calls.append((route, body))
        return body

    def _setup(self):
        self._record("/setup")
        return jsonify(model_version="recorder-1")

    def _webhook(self):
        self._record("/webhook")
        return jsonify(status="ok")

    def _predict(self):
        body = self._record("/predict")
        results = [
            {"model_version": "recorder-1", "score": 0.5, "result": [_brush_region(task["id"], "person", 0.5)]}
            for task in body.get("tasks", [])
        ]
        return jsonify(results=results)

    def bodies(self, route: str) -> list[dict]:
        with self.lock:
            return [body for r, body in self.calls if r == route]

    def webhooks(self, action: str) -> list[dict]:
        return [b for b in self.bodies("/webhook") if b.get("action") == action]

    def wait_for(self, what, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = what()
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"nothing arrived in {timeout} s; calls so far: {[r for r, _ in self.calls]}")

    def __enter__(self) -> RecordingBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()


def _brush_region(seed: int, label: str, score: float | None = None) -> dict:
    """A small brush region (a square) in LS's RLE, for a 32 x 32 image."""
    from label_studio_sdk.converter.brush import mask2rle

    mask = np.zeros((32, 32), np.uint8)
    mask[4 : 12 + seed % 5, 6:20] = 255
    region = {
        "id": f"r{seed}",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": 32,
        "original_height": 32,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask)], "brushlabels": [label]},
    }
    if score is not None:
        region["score"] = score
    return region


def _trim(value, depth: int = 0):
    """A body shortened for printing: long strings and lists cut."""
    if isinstance(value, dict):
        return {k: _trim(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v, depth + 1) for v in value[:3]] + (["..."] if len(value) > 3 else [])
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value


def _show(title: str, body: dict) -> None:
    print(f"\n--- {title} ---\n{json.dumps(_trim(body), indent=1, sort_keys=True)}")


@pytest.fixture(scope="module")
def api(label_studio: LabelStudioServer) -> LabelStudioAPI:
    print(f"\nLabel Studio started in {label_studio.startup_seconds:.1f} s at {label_studio.url}")
    return label_studio.api()


@pytest.fixture(scope="module")
def project(api: LabelStudioAPI) -> dict:
    project = api.create_project("harness", CONFIG)
    photos = sorted(PHOTOS.glob("*.jpg"))[:3]
    imported = api.import_files(project["id"], photos)
    assert imported["task_count"] == 3, imported
    return project


def test_missing_venv_fails_with_install_hint(tmp_path):
    with pytest.raises(LabelStudioUnavailable, match="install-label-studio.sh"):
        LabelStudioServer(tmp_path, venv=tmp_path / "nowhere").start()


def test_imported_photos_are_tasks_served_with_the_token(api, project, label_studio):
    tasks = api.list_tasks(project["id"])
    assert len(tasks) == 3
    urls = [task["data"]["image"] for task in tasks]
    assert all(url.startswith("/data/upload/") and url.endswith(".jpg") for url in urls), urls
    photo = api.get_bytes(urls[0])
    assert photo.status_code == 200 and photo.content[:3] == b"\xff\xd8\xff"  # a JPEG
    assert api.get_bytes(urls[0], authorized=False).status_code == 401
    assert [t["id"] for t in api.list_tasks(project["id"], page_size=2)] == [t["id"] for t in tasks]


def test_what_label_studio_sends_a_backend(api, project, label_studio):
    with RecordingBackend() as backend:
        ml = api.connect_ml_backend(project["id"], backend.url, title="recorder")
        setup = backend.wait_for(lambda: backend.bodies("/setup"))[0]
        _show("POST /setup", setup)
        assert setup["schema"] == CONFIG and str(setup["project"]).startswith(f"{project['id']}.")
        assert {"project", "schema", "hostname", "access_token", "extra_params"} <= setup.keys()
        assert setup["access_token"] == label_studio.token  # the project creator's legacy token
        backend_object = api.get_ml_backend(ml["id"])
        assert backend_object["state"] == "CO" and backend_object["model_version"] == "recorder-1"  # from /setup
        assert api.get_project(project["id"])["model_version"] == "recorder"  # LS sets the backend's title

        tasks = api.list_tasks(project["id"])
        answer = api.retrieve_predictions(project["id"])
        predict = backend.wait_for(lambda: backend.bodies("/predict"))
        _show("POST /predict", predict[0])
        print(f"retrieve_tasks_predictions answered {answer}; /predict calls: {len(predict)}")
        assert sorted(t["id"] for t in predict[0]["tasks"]) == sorted(t["id"] for t in tasks)
        assert predict[0]["label_config"] == CONFIG
        predictions = api.list_predictions(tasks[0]["id"])
        _show("GET /api/predictions?task=", predictions[0])
        assert predictions[0]["model_version"] == "recorder-1"
        assert predictions[0]["result"][0]["value"]["brushlabels"] == ["person"]

        task = tasks[0]
        annotation = api.create_annotation(task["id"], [_brush_region(1, "dog")])
        created = backend.wait_for(lambda: backend.webhooks("ANNOTATION_CREATED"))[0]
        _show("webhook ANNOTATION_CREATED", created)
        assert created["annotation"]["id"] == annotation["id"]
        assert created["annotation"]["task"] == task["id"]
        assert created["task"]["id"] == task["id"] and created["task"]["data"]["image"] == task["data"]["image"]
        assert created["project"]["id"] == project["id"] and created["project"]["label_config"] == CONFIG
        region = created["annotation"]["result"][0]
        assert (
            region["value"]["brushlabels"] == ["dog"]
            and region["value"]["rle"] == _brush_region(1, "dog")["value"]["rle"]
        )

        api.update_annotation(annotation["id"], result=[_brush_region(2, "person")])
        updated = backend.wait_for(lambda: backend.webhooks("ANNOTATION_UPDATED"))[0]
        _show("webhook ANNOTATION_UPDATED", updated)
        assert updated["annotation"]["result"][0]["value"]["brushlabels"] == ["person"]

        api.delete_annotation(annotation["id"])
        deleted = backend.wait_for(lambda: backend.webhooks("ANNOTATIONS_DELETED"))[0]
        _show("webhook ANNOTATIONS_DELETED", deleted)
        assert [a["id"] for a in deleted["annotations"]] == [annotation["id"]]

        api.train(ml["id"])
        training = backend.wait_for(lambda: backend.webhooks("START_TRAINING"))[0]
        _show("webhook START_TRAINING", training)
        assert training["project"]["id"] == project["id"]

        print("\nall routes called, in order:", [(r, b.get("action")) for r, b in backend.calls])
