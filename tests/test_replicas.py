"""Two backend instances behind one address (issue 25: replicas), sharing one store and one MODEL_DIR.

Every test runs twice: with the SQLite store in the shared MODEL_DIR (instances on one machine) and with a
real PostgreSQL server (``MASKCLIP_STORE_URL``, tests/postgres.py; instances anywhere).

Two ``labelstudio-maskclip serve`` processes (gunicorn, 2 workers each, their own ports) and a round-robin
proxy in front (tests/served.py::RoundRobin, as a load balancer). A real Label Studio is connected to the
proxy's address: its webhooks land on both instances and each annotation is stored once; one training run
starts however many instances are asked; both instances serve the promoted student, and follow later
promotions and rollbacks without a restart. Then one instance is killed (SIGKILL, master and workers) while
both take webhooks: every webhook that got a 2xx is in the store, and the other instance keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from labelstudio_maskclip.learning.store import Store
from labelstudio_maskclip.masks.brush import brush_rle_to_mask, mask_to_brush_rle
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import checkpoints as ck
from tests.photos import COCO128_PHOTOS
from tests.served import Backend, RoundRobin, brush_webhook, photo_host, start_backends, wait_for
from tests.test_learning_loop import _embeddings, _promote, constant_student
from tests.tiny import TINY_VIT

pytestmark = pytest.mark.e2e

NAMES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg", "000000000034.jpg"]
LABELS = ["Animal", "Food", "Plant"]
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Animal"/><Label value="Food"/><Label value="Plant"/></BrushLabels>
</View>"""
CLASSES = [(label,) for label in LABELS]
TRAINING = {
    # MaskCLIP+ at toy scale: a tiny random student, 3 steps, promoted whatever its score; no re-scoring; no
    # held-out tasks (they are chosen by task id, and Label Studio numbers the tasks of the whole session)
    "MASKCLIP_TRAIN_VAL_FRACTION": "0", "MASKCLIP_STUDENT": "tiny", "MASKCLIP_STUDENT_PRETRAINED": "none",
    "MASKCLIP_TRAIN_STEPS": "3", "MASKCLIP_TRAIN_CROP": "64", "MASKCLIP_TRAIN_BATCH_SIZE": "2",
    "MASKCLIP_PROMOTE": "always",
    "MASKCLIP_RESCORE": "false", "MASKCLIP_MIN_CONFIDENCE": "0", "LOG_LEVEL": "INFO",
}  # fmt: skip


@contextlib.contextmanager
def _shared_store(request: pytest.FixtureRequest, work: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(the store's location, the instances' extra environment) for the parametrized kind: SQLite under the
    shared MODEL_DIR (the default) or a fresh database on the session's real PostgreSQL server
    (``MASKCLIP_STORE_URL``, tests/postgres.py), dropped afterwards."""
    if request.param == "sqlite":
        yield str(work / "model_dir"), {}
        return
    server = request.getfixturevalue("postgres")
    url = server.create_database()
    try:
        yield url, {"MASKCLIP_STORE_URL": url}
    finally:
        with contextlib.suppress(Exception):
            server.drop_database(url)


def _settings(backend: Backend) -> Settings:
    """The instances' settings (their MODEL_DIR and store): what the registry's functions take, so that a
    promotion or rollback here also moves a PostgreSQL store's served-version pointer, as a trainer's does."""
    return Settings(model_dir=str(backend.model_dir), store_url=backend.env.get("MASKCLIP_STORE_URL", ""))


def _store(location: str) -> Store:
    """The store both instances write."""
    return Store(location)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def replicas(request, label_studio, tmp_path_factory, weights):
    """Two instances over one MODEL_DIR and one store (SQLite in MODEL_DIR, or PostgreSQL), a round-robin proxy
    in front, and a Label Studio project connected to the proxy's address, with its tasks."""
    work = tmp_path_factory.mktemp(f"replicas-{request.param}")
    with _shared_store(request, work) as (store, env):
        extra = {**TRAINING, **env, "LABEL_STUDIO_API_KEY": label_studio.token}
        instances = start_backends(work, 2, TINY_VIT, str(weights), label_studio.url, workers=2, extra_env=extra)
        proxy = RoundRobin([b.url for b in instances])
        try:
            api = label_studio.api()
            project = api.create_project(f"maskclip replicas ({request.param})", CONFIG)
            api.import_files(project["id"], [COCO128_PHOTOS / n for n in NAMES])
            ml = api.connect_ml_backend(project["id"], proxy.url, title="maskclip x2")
            yield {"instances": instances, "proxy": proxy, "project": project, "ml": ml, "store": store,
                   "tasks": api.list_tasks(project["id"]), "model_dir": instances[0].model_dir,
                   "settings": _settings(instances[0])}  # fmt: skip
        finally:
            proxy.stop()
            for backend in instances:
                backend.stop()


def _region(task: dict, label: str, seed: int) -> dict:
    """One brush region of ``label`` over a band of the task's image that depends on ``seed``."""
    width, height = Image.open(COCO128_PHOTOS / task["data"]["image"].rsplit("-", 1)[-1]).size
    mask = np.zeros((height, width), bool)
    mask[10 + seed * 7 : height // 2 + seed * 7, : width // 2] = True
    return {
        "id": f"r{seed}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def annotated(label_studio, replicas):
    """One annotation per task made in Label Studio; its webhooks go through the proxy to both instances."""
    api = label_studio.api()
    made = [api.create_annotation(t["id"], [_region(t, LABELS[k % 3], k)]) for k, t in enumerate(replicas["tasks"])]
    store = _store(replicas["store"])
    ids = {a["id"] for a in made}
    wait_for(lambda: ids <= {s.annotation_id for s in store.accepted_samples()}, 60, "every annotation stored")
    return made


def _webhooks(proxy: RoundRobin) -> set[int]:
    """The instances the proxy passed a ``POST /webhook`` to."""
    return {k for k, method, path in proxy.routed if method == "POST" and path.startswith("/webhook")}


def test_label_studio_webhooks_reach_both_instances_and_each_annotation_is_stored_once(replicas, annotated):
    store = _store(replicas["store"])
    assert _webhooks(replicas["proxy"]) == {0, 1}  # both instances took webhooks
    samples = [s for s in store.accepted_samples() if s.annotation_id in {a["id"] for a in annotated}]
    assert sorted(s.annotation_id for s in samples) == sorted(a["id"] for a in annotated)  # once each
    for ann, sample in zip(sorted(annotated, key=lambda a: a["id"]), sorted(samples, key=lambda s: s.annotation_id)):
        region = ann["result"][0]
        expected = brush_rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
        assert list(sample.masks) == region["value"]["brushlabels"]
        assert np.array_equal(sample.masks[region["value"]["brushlabels"][0]], expected)
    assert store.check() == []


def _elsewhere(body: dict) -> dict:
    """``body`` moved to a project of its own (not the Label Studio project trained on here)."""
    body["project"]["id"] = body["annotation"]["project"] = body["task"]["project"] = 999_999
    return body


def test_the_same_webhook_on_both_instances_at_once_is_stored_once(replicas):
    """Label Studio sends a webhook once, but a retrying load balancer or a second webhook on the project may
    deliver it to both instances at the same moment: one stores it, the other answers duplicate."""
    store = _store(replicas["store"])
    before = store.current_seq()
    bodies = [_elsewhere(brush_webhook(9000 + i, 9000 + i)) for i in range(8)]
    urls = [b.url for b in replicas["instances"]]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: requests.post(job[0] + "/webhook", json=job[1], timeout=60),
                                [(url, body) for body in bodies for url in urls]))  # fmt: skip
    assert [r.status_code for r in replies] == [201] * 16
    statuses = [replies[i].json()["status"] for i in range(16)]
    assert all(sorted(statuses[i : i + 2]) == ["duplicate", "stored"] for i in range(0, 16, 2)), statuses
    assert store.current_seq() == before + 8  # one stored change per annotation
    assert all(store.annotation(9000 + i)["labels"] == ["Food"] for i in range(8))


def _predict(url: str, task: dict) -> tuple[str, list[str], list[np.ndarray]]:
    """(model version, labels, masks) of one /predict answer for ``task``, on a fresh connection."""
    body = {"tasks": [{"id": task["id"], "data": task["data"]}], "label_config": CONFIG, "project": "1.1"}
    with requests.Session() as fresh:
        r = fresh.post(url + "/predict", json=body, timeout=120)
    assert r.status_code == 200, r.text[:500]
    prediction = r.json()["results"][0]
    regions = prediction["result"]
    masks = [brush_rle_to_mask(g["value"]["rle"], g["original_height"], g["original_width"]) for g in regions]
    return prediction["model_version"], [g["value"]["brushlabels"][0] for g in regions], masks


def _serves(backend: Backend, task: dict, version: str) -> None:
    """``backend`` answers /predict with ``version`` and masks, from both its workers (each worker logs the
    student it loads), without a restart."""
    pid = backend.master_pid

    def both_workers() -> bool:
        answered, labels, masks = _predict(backend.url, task)
        assert answered == version and labels and all(m.any() for m in masks), (answered, labels)
        return len(re.findall(rf"serving student {re.escape(version)} ", backend.log_text())) >= 2

    wait_for(both_workers, 120, f"both workers of {backend.url} serving {version}", every=0.2)
    assert backend.master_pid == pid and backend.proc.poll() is None


def _trainers(model_dir: Path) -> list[str]:
    """The trainers' logs (``MODEL_DIR/runs/train-*.log``) of those that took the training lock and trained."""
    logs = (model_dir / "runs").glob("train-*.log")
    return [p.name for p in logs if "training starts" in p.read_text(errors="replace")]


def test_one_training_run_however_many_instances_are_asked_and_both_serve_the_student(
    label_studio, replicas, annotated
):
    instances, model_dir = replicas["instances"], replicas["model_dir"]
    store = _store(replicas["store"])
    runs_before = len(store.training_runs())
    label_studio.api().train(replicas["ml"]["id"])  # START_TRAINING through the proxy to one instance
    wait_for(lambda: _trainers(model_dir), 120, "a trainer holding the training lock")
    body = {"action": "START_TRAINING", "project": {"id": replicas["project"]["id"], "label_config": CONFIG}}
    for backend in instances:  # asked again on each instance while it runs: refused, not run twice
        reply = requests.post(backend.url + "/webhook", json=body, timeout=30)
        assert reply.status_code == 201 and reply.json()["training"] == "already running", reply.text

    try:
        wait_for(lambda: len(store.training_runs()) > runs_before, 300, "the training run to finish")
    except AssertionError as e:
        logs = sorted((model_dir / "runs").glob("*.log")) + [b.log for b in instances]
        raise AssertionError(
            f"{e}\n" + "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
        ) from None
    version = ck.current_version(replicas["settings"])
    assert version is not None
    assert len(store.training_runs()) == runs_before + 1
    assert len(_trainers(model_dir)) == 1  # one trainer ran, started by one instance
    assert [(m["version"], m["current"]) for m in ck.history(replicas["settings"])] == [(version, True)]
    for backend in instances:
        for task in replicas["tasks"][:2]:
            _serves(backend, task, version)

    api = label_studio.api()  # and Label Studio, through the one address, gets the student's predictions
    api.retrieve_predictions(replicas["project"]["id"])
    for t in replicas["tasks"]:
        wait_for(lambda t=t: [p for p in api.list_predictions(t["id"]) if p["model_version"] == version], 120,
                 f"a {version} prediction of task {t['id']}")  # fmt: skip


def _answers(backend: Backend, task: dict, n: int = 4) -> set[tuple[str, frozenset[str]]]:
    """(model version, labels) of ``n`` answers of ``backend`` on fresh connections (either worker)."""
    return {(v, frozenset(labels)) for v, labels, _ in (_predict(backend.url, task) for _ in range(n))}


def test_promotions_and_rollbacks_reach_every_instance_without_a_restart(replicas):
    """Students that answer one label everywhere are promoted into the shared registry (as a trainer on
    either instance does) and rolled back with the CLI: every answer of both instances comes from the model
    its version names, from the next request on."""
    instances, registry, task = replicas["instances"], replicas["settings"], replicas["tasks"][0]
    pids = [b.master_pid for b in instances]
    emb = _embeddings(3)
    food = _promote(registry, constant_student(emb, 1), CLASSES)
    assert [_answers(b, task) for b in instances] == [{(food, frozenset({"Food"}))}] * 2
    plant = _promote(registry, constant_student(emb, 2), CLASSES)
    assert [_answers(b, task) for b in instances] == [{(plant, frozenset({"Plant"}))}] * 2

    def rollback(version: str) -> None:
        cli = [sys.executable, "-m", "labelstudio_maskclip.cli", "rollback", version]
        done = subprocess.run(cli, env=instances[0].env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    rollback(food)
    assert [_answers(b, task) for b in instances] == [{(food, frozenset({"Food"}))}] * 2
    rollback("maskclip")
    teacher = {v for b in instances for v, _ in _answers(b, task)}
    assert len(teacher) == 1 and next(iter(teacher)).startswith("maskclip-")
    assert [b.master_pid for b in instances] == pids and all(b.proc.poll() is None for b in instances)


# --- one instance killed while both write ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request, tmp_path, weights):
    """Two fresh instances over one MODEL_DIR and one store behind a round-robin proxy; Label Studio's file
    host only. Yields (instances, proxy, the store's location)."""
    host = photo_host(tmp_path / "files", NAMES[:1])
    try:
        with _shared_store(request, tmp_path / "work") as (store, env):
            instances = start_backends(tmp_path / "work", 2, TINY_VIT, str(weights), host.url, workers=2,
                                       extra_env=env)  # fmt: skip
            proxy = RoundRobin([b.url for b in instances])
            try:
                yield instances, proxy, store
            finally:
                proxy.stop()
                for backend in instances:
                    backend.stop()
    finally:
        host.stop()


def test_an_instance_killed_mid_write_loses_no_acknowledged_webhook_and_the_other_keeps_serving(pair):
    instances, proxy, location = pair
    victim, survivor = instances
    acked: list[int] = []
    unanswered: list[int] = []
    next_id = iter(range(20_000, 30_000))
    lock, stop = threading.Lock(), threading.Event()

    def writer() -> None:
        while not stop.is_set():
            with lock:
                annotation = next(next_id)
            try:
                r = requests.post(proxy.url + "/webhook", json=brush_webhook(annotation, annotation), timeout=60)
                ok = r.status_code in (200, 201) and r.json()["status"] == "stored"
            except requests.RequestException:
                ok = False
            with lock:
                (acked if ok else unanswered).append(annotation)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 30 and proxy.in_flight[0] >= 2, 120, "writes in flight on the victim", every=0.01)
    os.killpg(victim.master_pid, signal.SIGKILL)  # master and workers, mid-write
    victim.proc.wait(10)
    at_kill = len(acked)
    wait_for(lambda: len(acked) >= at_kill + 30, 120, "writes acknowledged by the survivor")
    stop.set()
    for t in threads:
        t.join(60)

    print(f"\n{len(acked)} webhooks acknowledged, {len(unanswered)} unanswered (in flight on the killed instance)")
    assert unanswered, "no write was in flight on the victim when it was killed"
    assert {k for k, _, _ in proxy.routed[-20:]} == {1}  # the survivor took everything after the kill
    store = _store(location)
    assert store.check() == []
    missing = [a for a in acked if (store.annotation(a) or {}).get("labels") != ["Food"]]
    assert missing == [], f"{len(missing)} acknowledged webhooks lost: {missing[:10]}"
    late = requests.post(survivor.url + "/webhook", json=brush_webhook(31_000, 31_000), timeout=60)
    assert late.status_code == 201 and late.json()["status"] == "stored"
    task = {"id": 1, "data": {"image": "/data/upload/" + NAMES[0]}}
    body = {"tasks": [task], "label_config": CONFIG}
    r = requests.post(proxy.url + "/predict", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["results"][0]["result"] and r.json()["errors"] == []
    assert survivor.proc.poll() is None and len(survivor.workers()) == 2
    assert json.loads(requests.get(survivor.url + "/health", timeout=10).text)["status"] == "UP"
