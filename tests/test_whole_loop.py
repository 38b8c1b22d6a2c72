"""The learning loop as a whole, on a synthetic project whose answer is known (issue: the loop proven).

Red discs, blue boxes and grey ground (tests/test_training.py's `synthetic`), served as PNG files by a
loopback host playing Label Studio's file host. The teacher is a tiny random CLIP, which gets them wrong.
People's masks (the truth) arrive at the real backend's /webhook (gunicorn, 2 workers) in Label Studio's
ANNOTATION_CREATED shape; the last one triggers training (MASKCLIP_TRAIN_EVERY_N) of the tiny student, which
is validated on held-out tasks and promoted (MASKCLIP_PROMOTE=better); then both workers serve it, and its
masks agree with people's on images nobody annotated better than the teacher's did, by MARGIN in mIoU.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import requests
from PIL import Image

from labelstudio_maskclip.evaluation import metrics
from labelstudio_maskclip.masks.brush import brush_rle_to_mask, mask_to_brush_rle
from labelstudio_maskclip.training.checkpoints import current_version
from tests.served import FileHost, start_backend, wait_for
from tests.test_training import synthetic
from tests.tiny import TINY_VIT

pytestmark = pytest.mark.e2e

LABELS = ["Disc", "Box", "Ground"]  # synthetic()'s classes 0, 1, 2
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Disc"/><Label value="Box"/><Label value="Ground"/></BrushLabels>
</View>"""
ANNOTATED = range(1, 25)  # task ids = image seeds; MASKCLIP_TRAIN_VAL_FRACTION holds some out
HELD_OUT = range(500, 508)  # never annotated: where teacher and student are compared
MARGIN = 0.5  # the student's mIoU against people's masks exceeds the teacher's by at least this


def _url(seed: int) -> str:
    return f"/data/upload/shape-{seed}.png"


@pytest.fixture(scope="module")
def loop(tmp_path_factory, weights):
    work = tmp_path_factory.mktemp("whole-loop")
    files = work / "files"
    files.mkdir()
    for seed in [*ANNOTATED, *HELD_OUT]:
        Image.fromarray(synthetic(seed)[0]).save(files / f"shape-{seed}.png")
    host = FileHost(files)
    extra = {
        "LOG_LEVEL": "INFO", "MASKCLIP_MIN_CONFIDENCE": "0", "MASKCLIP_STUDENT": "tiny",
        "MASKCLIP_STUDENT_PRETRAINED": "none", "MASKCLIP_TRAIN_STEPS": "80", "MASKCLIP_TRAIN_CROP": "48",
        "MASKCLIP_TRAIN_BATCH_SIZE": "8", "MASKCLIP_TRAIN_LR": "0.05", "MASKCLIP_PROMOTE": "better",
        "MASKCLIP_TRAIN_VAL_FRACTION": "0.4", "MASKCLIP_TRAIN_EVERY_N": str(len(ANNOTATED)),
    }  # fmt: skip
    served = start_backend(work / "backend", TINY_VIT, str(weights), host.url, workers=2, extra_env=extra)
    yield served
    served.stop()
    host.stop()


def _peoples_annotation(seed: int) -> dict:
    """An ANNOTATION_CREATED body as Label Studio sends it: one brush region per class present (the truth)."""
    img, gt = synthetic(seed)
    height, width = gt.shape
    regions = [
        {"id": f"r{seed}-{k}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
         "original_width": width, "original_height": height, "image_rotation": 0,
         "value": {"format": "rle", "rle": mask_to_brush_rle(gt == k), "brushlabels": [LABELS[k]]}}
        for k in range(len(LABELS)) if (gt == k).any()
    ]  # fmt: skip
    task = {"id": seed, "data": {"image": _url(seed)}, "project": 1}
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1000 + seed, "result": regions, "was_cancelled": False, "ground_truth": False,
                       "completed_by": 1, "task": seed, "project": 1, "updated_at": "2026-12-04T10:00:00Z"},
        "task": task, "project": {"id": 1, "label_config": CONFIG},
    }  # fmt: skip


def _predict(url: str, seed: int) -> tuple[str, np.ndarray]:
    """(model version, (H, W) label map: index into LABELS, -1 where no mask) of one /predict answer."""
    body = {"tasks": [{"id": seed, "data": {"image": _url(seed)}}], "label_config": CONFIG, "project": "1.1"}
    with requests.Session() as fresh:  # a new connection each time, so either worker may take it
        r = fresh.post(url + "/predict", json=body, timeout=120)
    assert r.status_code == 200, r.text[:500]
    prediction = r.json()["results"][0]
    labels = np.full((64, 64), -1, np.int64)
    for region in prediction["result"]:
        value = region["value"]
        mask = brush_rle_to_mask(value["rle"], region["original_height"], region["original_width"])
        labels[mask] = LABELS.index(value["brushlabels"][0])
    return prediction["model_version"], labels


def _miou(url: str) -> tuple[set[str], float]:
    """(versions that answered, mIoU of the answers against the truth) over the held-out images."""
    total = np.zeros((3, 4), np.int64)
    versions = set()
    for seed in HELD_OUT:
        version, labels = _predict(url, seed)
        versions.add(version)
        total += metrics.confusion_matrix(synthetic(seed)[1], labels, 3)
    return versions, float(metrics.mean_iou(total))


def test_peoples_masks_by_webhook_train_a_student_that_every_worker_serves_and_that_agrees_better(loop):
    assert current_version(loop.model_dir) is None
    teacher_versions, teacher_miou = _miou(loop.url)
    assert len(teacher_versions) == 1

    for seed in ANNOTATED:
        r = requests.post(loop.url + "/webhook", json=_peoples_annotation(seed), timeout=60)
        assert r.status_code in (200, 201), r.text[:500]

    runs = wait_for(lambda: sorted(loop.model_dir.glob("runs/*/metrics.json")), 600, "a finished training run", every=1)
    run = json.loads(runs[0].read_text())
    assert run["promoted"], run["decision"]
    student = current_version(loop.model_dir)
    assert student == run["version"]
    assert student not in teacher_versions

    def both_workers_serve_it() -> bool:  # each worker logs this once, when it loads the version
        assert _predict(loop.url, HELD_OUT[0])[0] == student
        return len(re.findall(rf"serving student {re.escape(student)} ", loop.log_text())) >= 2

    wait_for(both_workers_serve_it, 120, f"both workers serving {student}", every=0.2)
    student_versions, student_miou = _miou(loop.url)
    print(f"\nheld-out mIoU: teacher {teacher_miou:.3f}, student {student_miou:.3f} ({student})")
    assert student_versions == {student}
    assert student_miou > teacher_miou + MARGIN
