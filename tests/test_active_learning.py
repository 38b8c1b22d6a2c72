"""The active-learning loop end to end against a real Label Studio 1.23.2 (and torchrun sharding).

Pre-annotate a project in bulk; ask `next` for the least sure tasks and annotate them through the API;
the annotations train a student (every 3 new annotations, random weights, promoted always); the
remaining unlabeled tasks then get predictions of the new version without anyone asking.
"""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import requests
from PIL import Image

from labelstudio_maskclip.masks.brush import mask_to_brush_rle
from tests.labelstudio import started
from tests.photos import COCO128_PHOTOS
from tests.served import BRUSH, start_backend, wait_for
from tests.tiny import TINY_VIT, save_random_state

pytestmark = pytest.mark.e2e

NAMES = sorted(p.name for p in COCO128_PHOTOS.glob("*.jpg"))[:8]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A Label Studio of this module's own, with a generous start timeout: its first start migrates the
    database, which takes minutes on a loaded machine."""
    with started(tmp_path_factory.mktemp("al-label-studio"), start_timeout=900) as server:
        yield server


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    work = tmp_path_factory.mktemp("al-backend")
    weights = save_random_state(TINY_VIT, work / "tiny_vit.pt")
    extra = {
        "LABEL_STUDIO_API_KEY": label_studio.token, "LOG_LEVEL": "INFO", "MASKCLIP_SCORE": "margin",
        "MASKCLIP_STUDENT": "tiny", "MASKCLIP_STUDENT_PRETRAINED": "none", "MASKCLIP_TRAIN_STEPS": "3",
        "MASKCLIP_TRAIN_CROP": "64", "MASKCLIP_TRAIN_BATCH_SIZE": "2", "MASKCLIP_PROMOTE": "always",
        "MASKCLIP_TRAIN_EVERY_N": "3",
    }  # fmt: skip
    served = start_backend(work, TINY_VIT, str(weights), label_studio.url, workers=1, extra_env=extra)
    yield served
    served.stop()


def _project(api, title: str, names: list[str]) -> tuple[int, list[int]]:
    # LS must not predict on its own when tasks are listed: what predicts here is ours to check.
    proj = api.create_project(title, BRUSH, evaluate_predictions_automatically=False)
    api.import_files(proj["id"], [COCO128_PHOTOS / n for n in names])
    return proj["id"], sorted(t["id"] for t in api.list_tasks(proj["id"], fields_all=False))


def _versions(api, task_id: int) -> list[str]:
    return [p["model_version"] for p in api.list_predictions(task_id)]


def _cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "labelstudio_maskclip", *args], env=env, capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_torchrun_ranks_predict_disjoint_shards_once(label_studio, backend):
    api = label_studio.api()
    project, ids = _project(api, "torchrun", NAMES[:5])
    env = {**backend.env, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "labelstudio_maskclip", "preannotate", "--project", str(project)]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["ranks"] == 2 and summary["predicted"] == 5 and summary["failed"] == 0
    for task in ids:
        assert _versions(api, task) == [summary["model_version"]]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["predicted"] == 0
    # A duplicate of the version (a second writer, a write landing late) and a new task: the job that writes
    # the new task's prediction leaves one prediction of the version per task (rank 0 sweeps, once all wrote).
    version = summary["model_version"]
    api.request("POST", "/api/predictions/", json={"task": ids[0], "model_version": version, "score": 0.5,
                                                    "result": []})  # fmt: skip
    api.import_files(project, [COCO128_PHOTOS / NAMES[5]])
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and json.loads(third.stdout.strip().splitlines()[-1])["predicted"] == 1
    for task in sorted(t["id"] for t in api.list_tasks(project, fields_all=False)):
        assert _versions(api, task) == [version], task


def test_next_ranks_by_the_served_versions_scores_after_connect_model(label_studio, backend):
    """The README's Connect flow: Label Studio writes the backend's title into the project's model_version
    (which keeps live predictions on, so it stays), and no prediction carries it; `next` still ranks the
    unlabeled tasks by the scores of the served version's predictions, ignoring other models' ones."""
    api = label_studio.api()
    project, ids = _project(api, "connect then next", NAMES[:4])
    api.connect_ml_backend(project, backend.url, title="MaskCLIP")
    assert api.get_project(project)["model_version"] == "MaskCLIP"
    version = json.loads(_cli(backend.env, "preannotate", "--project", str(project)).stdout.strip().splitlines()[-1])[
        "model_version"
    ]
    assert api.get_project(project)["model_version"] == "MaskCLIP"  # the title stays: live predictions stay on
    scores = {t: next(p["score"] for p in api.list_predictions(t) if p["model_version"] == version) for t in ids}
    most_sure = max(ids, key=lambda t: (scores[t], t))
    api.request("POST", "/api/predictions/", json={"task": most_sure, "model_version": "other-model", "score": 0.0,
                                                    "result": []})  # fmt: skip

    chosen = json.loads(_cli(backend.env, "next", "--project", str(project), "-n", "3", "--json").stdout)
    assert [t["id"] for t in chosen] == sorted(ids, key=lambda t: (scores[t], t))[:3]
    assert [t["score"] for t in chosen] == pytest.approx(sorted(scores.values())[:3], abs=1e-6)
    lines = _cli(backend.env, "next", "--project", str(project), "-n", "10").stdout.strip().splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == sorted(ids, key=lambda t: (scores[t], t))
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx(sorted(scores.values()), abs=1e-4)


def test_the_loop_rescored_unlabeled_tasks_after_a_promotion(label_studio, backend):
    api = label_studio.api()
    project, ids = _project(api, "active learning", NAMES)
    api.connect_ml_backend(project, backend.url, title="maskclip")
    env = backend.env
    first = json.loads(_cli(env, "preannotate", "--project", str(project)).stdout.strip().splitlines()[-1])
    teacher = first["model_version"]
    assert first["predicted"] == len(ids)
    scores = {t: api.list_predictions(t)[0]["score"] for t in ids}

    chosen = json.loads(_cli(env, "next", "--project", str(project), "-n", "3", "--json").stdout)
    assert [t["id"] for t in chosen] == sorted(ids, key=lambda t: (scores[t], t))[:3]  # least sure first
    assert [t["score"] for t in chosen] == pytest.approx(sorted(scores.values())[:3], abs=1e-4)

    for task in chosen:  # annotate them; the third annotation triggers training (MASKCLIP_TRAIN_EVERY_N=3)
        width, height = Image.open(COCO128_PHOTOS / task["data"]["image"].rsplit("-", 1)[-1]).size
        mask = np.zeros((height, width), bool)
        mask[: height // 2] = True
        region = {
            "id": f"r{task['id']}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Food"]},
        }  # fmt: skip
        api.create_annotation(task["id"], [region])

    from labelstudio_maskclip.training.checkpoints import current_version

    student = wait_for(lambda: current_version(backend.model_dir), 300, "a promoted student", every=1)
    assert student != teacher
    labeled = {t["id"] for t in chosen}
    for task in sorted(set(ids) - labeled):  # nobody asked: the rescoring job did it
        wait_for(lambda task=task: student in _versions(api, task), 300, f"a {student} prediction of {task}", every=1)
    status = wait_for(
        lambda: (requests.get(backend.url + "/metrics", timeout=10).json().get("rescore") or {}).get("state")
        in ("done", "failed") and requests.get(backend.url + "/metrics", timeout=10).json()["rescore"],
        120, "the rescore status",
    )  # fmt: skip
    assert status["state"] == "done" and status["version"] == student
    assert status["projects"][str(project)]["predicted"] == len(ids) - len(labeled)
    for task in labeled:  # labeled tasks are left alone
        assert student not in _versions(api, task)
    after = json.loads(_cli(env, "next", "--project", str(project), "-n", "20", "--json").stdout)
    assert {t["id"] for t in after} == set(ids) - labeled


def test_next_any_version_ranks_by_each_tasks_newest_scored_prediction(label_studio, backend):
    """`next --any-version`: whatever model made them, each unlabeled task counts with its newest prediction
    that has a score; tasks without one, and labeled tasks, are left out."""
    api = label_studio.api()
    project, ids = _project(api, "next any version", NAMES[:5])
    superseded, other, unscored_last, bare, labeled = ids

    def predict(task: int, version: str, score: float | None) -> None:
        body = {"task": task, "model_version": version, "result": [], **({"score": score} if score is not None else {})}
        api.request("POST", "/api/predictions/", json=body)

    predict(superseded, "teacher", 0.9)
    predict(superseded, "student", 0.2)  # newer: counts
    predict(other, "someone-else", 0.5)
    predict(unscored_last, "teacher", 0.1)
    predict(unscored_last, "student", None)  # newer but without a score: the older one counts
    predict(labeled, "teacher", 0.05)
    api.create_annotation(labeled, [])

    chosen = json.loads(_cli(backend.env, "next", "--project", str(project), "-n", "10", "--any-version",
                             "--json").stdout)  # fmt: skip
    assert [(t["id"], t["score"]) for t in chosen] == [(unscored_last, 0.1), (superseded, 0.2), (other, 0.5)]
    assert bare not in {t["id"] for t in chosen}
    served = json.loads(_cli(backend.env, "next", "--project", str(project), "-n", "10", "--json").stdout)
    assert served == []  # none of these is the served version's


def test_next_reads_only_the_chosen_tasks_predictions_when_the_live_version_is_ours(label_studio, backend):
    """After `preannotate` made its version the project's live one, Label Studio's predictions_score ranks
    the tasks: `next` reads light pages and the predictions of the n tasks it returns, not every task's,
    and returns what ranking every task's own prediction gives."""
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI
    from labelstudio_maskclip.settings import Settings
    from tests.served import LabelStudioProxy

    api = label_studio.api()
    project, ids = _project(api, "next, light", NAMES[:7])
    version = json.loads(_cli(backend.env, "preannotate", "--project", str(project)).stdout.strip().splitlines()[-1])[
        "model_version"
    ]
    assert api.get_project(project)["model_version"] == version
    scores = {t: next(p["score"] for p in api.list_predictions(t) if p["model_version"] == version) for t in ids}
    api.create_annotation(ids[0], [])  # labeled: not to be chosen
    expected = sorted(ids[1:], key=lambda t: (scores[t], t))[:3]

    proxy = LabelStudioProxy(label_studio.url)
    try:
        client = LabelStudioAPI.from_settings(Settings(label_studio_url=proxy.url,
                                                       label_studio_api_key=label_studio.token))  # fmt: skip
        chosen = client.next_tasks(project, 3, version)
    finally:
        proxy.stop()
    assert [t["id"] for t in chosen] == expected
    assert [t["predictions_score"] for t in chosen] == pytest.approx([scores[t] for t in expected], abs=1e-6)
    full_reads = [path for method, path in proxy.requests if "fields=all" in path]
    assert full_reads, proxy.requests  # the chosen tasks' predictions, checked
    for path in full_reads:
        query = json.loads(parse_qs(urlparse(path).query)["query"][0])
        assert "selectedItems" in query, f"a whole listing read with every field: {path}"
        assert sorted(query["selectedItems"]["included"]) == sorted(expected), path
