"""End to end at the served size: ViT-B/16 (random weights saved to a file) at short side 448, 20 labels with
the 85 prompt templates, 20 photos, a real Label Studio 1.23.2, default time budget, CPU only.

What a new user on a small CPU machine meets: connecting the backend starts the text embeddings in the
background; every *Retrieve predictions* answers within Label Studio's 100 s and adds predictions, and a few
of them cover the project; a restart of the backend reads the text embeddings instead of computing them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import requests
import torch

from labelstudio_maskclip.evaluation.class_names import VOC20
from tests.photos import COCO128_PHOTOS
from tests.served import start_backend, wait_for

pytestmark = pytest.mark.e2e

PHOTOS = sorted(COCO128_PHOTOS.glob("*.jpg"))[:20]
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="{name}"/>' for name in VOC20)
    + "</BrushLabels></View>"
)
LABEL_STUDIO_LIMIT = 100.0  # seconds Label Studio waits for /predict before it gives up
MAX_RETRIEVES = 6


def _random_vit_b16(path: Path) -> Path:
    """ViT-B/16 with random weights (seeded), saved as an open_clip state dict: the real size, no download."""
    import open_clip

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-16").state_dict(), path)
    return path


def _served(work: Path, label_studio, weights: Path):
    env = {
        "LABEL_STUDIO_API_KEY": label_studio.token, "LOG_LEVEL": "INFO",
        "MASKCLIP_SHORT_SIDE": "448", "MASKCLIP_TEMPLATES": "maskclip85", "MASKCLIP_MIN_AREA": "0.0005",
    }  # fmt: skip
    return start_backend(work, "ViT-B-16", str(weights), label_studio.url, workers=1, extra_env=env, timeout=300)


def _predicted(api, project_id: int) -> dict[int, list]:
    return {t["id"]: t["predictions"] for t in api.list_tasks(project_id) if t.get("predictions")}


def test_full_size_model_predicts_every_task_within_label_studios_limit_and_a_restart_reuses_the_labels(
    label_studio, tmp_path
):
    weights = _random_vit_b16(tmp_path / "vit_b16_random.pt")
    backend = _served(tmp_path / "backend", label_studio, weights)
    try:
        # The model loads and runs a warm-up batch at start; /health says when it is done.
        wait_for(lambda: requests.get(backend.url + "/health", timeout=5).json().get("model") == "ready", 600,
                 "the model loaded and warmed up")  # fmt: skip
        api = label_studio.api()
        project = api.create_project("maskclip full size", CONFIG)
        api.import_files(project["id"], PHOTOS)
        connected = time.monotonic()
        api.connect_ml_backend(project["id"], backend.url, title="maskclip ViT-B/16")  # /setup: labels known
        store = backend.model_dir / "text_embeddings"
        # The labels' own file (the background words' small file is stored first, before the 20 labels).
        wait_for(lambda: "text embeddings of 20 labels stored in" in backend.log_text(), 900,
                 "the text embeddings of the 20 labels prepared after connecting")  # fmt: skip
        print(f"text embeddings of 20 labels x 85 templates ready {time.monotonic() - connected:.0f} s after connect")

        counts = [0]
        for attempt in range(MAX_RETRIEVES):
            started = time.monotonic()
            api.retrieve_predictions(project["id"])
            took = time.monotonic() - started
            counts.append(len(_predicted(api, project["id"])))
            print(f"retrieve {attempt + 1}: {took:.1f} s, tasks with a prediction: {counts[-1]}/{len(PHOTOS)}")
            assert took < LABEL_STUDIO_LIMIT, f"retrieve {attempt + 1} took {took:.0f} s:\n{backend.log_text()[-3000:]}"
            assert counts[-1] > counts[-2], f"retrieve {attempt + 1} added nothing:\n{backend.log_text()[-3000:]}"
            if counts[-1] == len(PHOTOS):
                break
        predicted = _predicted(api, project["id"])
        assert len(predicted) == len(PHOTOS), counts
        for preds in predicted.values():
            assert len(preds) == 1 and preds[0]["model_version"].startswith("maskclip-ViT-B-16.vit_b16_random.pt")
            assert all(r["type"] == "brushlabels" and r["value"]["brushlabels"][0] in VOC20 for r in preds[0]["result"])
        log = backend.log_text()
        assert len(re.findall("computed text embeddings of 20 labels", log)) == 1, log[-3000:]
    finally:
        backend.stop()

    stored = {p: p.stat().st_mtime_ns for p in store.glob("*.pt")}
    restarted = _served(tmp_path / "backend", label_studio, weights)  # same MODEL_DIR, a new process
    try:
        reply = requests.post(restarted.url + "/setup", json={"project": str(project["id"]), "schema": CONFIG},
                              timeout=10)  # fmt: skip
        assert reply.status_code == 200
        task = api.list_tasks(project["id"])[0]
        started = time.monotonic()
        body = requests.post(
            restarted.url + "/predict", json={"tasks": [{"id": task["id"], "data": task["data"]}],
                                              "label_config": CONFIG}, timeout=LABEL_STUDIO_LIMIT,
        ).json()  # fmt: skip
        print(f"one task after the restart: {time.monotonic() - started:.1f} s")
        assert body["errors"] == [] and body["results"][0]["model_version"].startswith("maskclip-ViT-B-16")
        log = restarted.log_text()
        assert "text embeddings of 20 labels read from" in log and "computed text embeddings" not in log, log[-3000:]
        assert {p: p.stat().st_mtime_ns for p in store.glob("*.pt")} == stored
    finally:
        restarted.stop()
