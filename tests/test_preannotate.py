"""The bulk pre-annotation pipeline, against the session's real Label Studio (the ``label_studio`` fixture).

Failures Label Studio will not make on cue (a bulk write answered 504 after it was applied, 502 without
reaching it, 504 while it is still writing, a refused read) come from a :class:`~tests.served.LabelStudioProxy`
in front of it, as a load balancer would stand there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

from labelstudio_maskclip.commands.preannotate import Shard, combine_summaries, preannotate, shard_from_env
from labelstudio_maskclip.fetching.images import ImageFetcher
from labelstudio_maskclip.labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from labelstudio_maskclip.settings import Settings
from tests.labelstudio import free_port
from tests.served import LabelStudioProxy
from tests.tiny import TINY_VIT

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels></View>"""


def _png(seed: int) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def settings(tmp_path_factory, weights):
    return Settings(
        model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=32, templates="simple", min_area=0.0,
        model_dir=str(tmp_path_factory.mktemp("model_dir")), label_studio_url="http://ls.invalid", batch_size=4,
        fetch_threads=2,
    )  # fmt: skip


@pytest.fixture
def proxy(label_studio):
    """The session's Label Studio behind a :class:`LabelStudioProxy`: what reached it, and failures on cue."""
    proxy = LabelStudioProxy(label_studio.url)
    yield proxy
    proxy.stop()


def _png_project(label_studio, n: int, title: str, labeled: tuple[int, ...] = ()) -> tuple[int, list[int]]:
    """A project of ``n`` tasks, each a small PNG as a data URI (four different images): (id, its task ids in
    order). ``labeled``: positions of the tasks that get an annotation."""
    api = label_studio.api()
    project = api.create_project(title, CONFIG, evaluate_predictions_automatically=False)["id"]
    ids = sorted(api.import_tasks(project, [{"image": _png(i % 4)} for i in range(n)])["task_ids"])
    for i in labeled:
        api.create_annotation(ids[i], [])
    return project, ids


def _run(settings, label_studio, project: int, via=None, *, retries: int = 5, **options):
    """``preannotate`` over HTTP to Label Studio, or through ``via`` (a proxy)."""
    s = settings.replace(label_studio_url=(via or label_studio).url, label_studio_api_key=label_studio.token)
    api = LabelStudioAPI(ImageFetcher.from_settings(s), retries=retries, backoff=0.1)
    return preannotate(s, project, api=api, progress=False, **options)


def _per_task(label_studio, task_ids, version: str) -> dict[int, int]:
    """Task id -> its predictions of ``version``."""
    api = label_studio.api()
    return {t: [p["model_version"] for p in api.list_predictions(t)].count(version) for t in task_ids}


def _is_bulk_write(method: str, path: str) -> bool:
    return method == "POST" and path.split("?")[0].endswith("/import/predictions")


@pytest.mark.e2e
def test_every_task_gets_one_prediction_in_bulk_and_a_rerun_does_nothing(settings, label_studio, proxy):
    project, ids = _png_project(label_studio, 23, "bulk of 5")
    first = _run(settings, label_studio, project, proxy, upload_batch=5, page_size=7)
    assert first.predicted == 23 and not first.failed
    assert set(_per_task(label_studio, ids, first.model_version).values()) == {1}
    assert proxy.bulk_sizes == [5, 5, 5, 5, 3]  # bulk requests of upload_batch, the rest at the end
    queries = [parse_qs(urlparse(path).query) for method, path in proxy.requests if method == "GET"]
    listed = [int(q["page_size"][0]) for q in queries if "data" in q.get("include", [""])[0].split(",")]
    assert set(listed) == {7} and len(listed) >= 4  # the tasks to predict listed in pages of page_size
    pred = label_studio.api().list_predictions(ids[0])[0]
    assert pred["result"] and pred["result"][0]["type"] == "brushlabels" and 0 <= pred["score"] <= 1
    again = _run(settings, label_studio, project, proxy, upload_batch=5)
    assert again.predicted == 0 and again.skipped == 23 and proxy.bulk_sizes == [5, 5, 5, 5, 3]
    # the version Label Studio's score column averages
    assert label_studio.api().get_project(project)["model_version"] == first.model_version


@pytest.mark.e2e
def test_refresh_predicts_only_unlabeled_tasks(settings, label_studio):
    project, ids = _png_project(label_studio, 10, "refresh", labeled=(1, 4, 8))
    result = _run(settings, label_studio, project, refresh=True)
    counts = _per_task(label_studio, ids, result.model_version)
    assert {t for t, n in counts.items() if n} == set(ids) - {ids[1], ids[4], ids[8]}
    assert result.predicted == 7


@pytest.mark.e2e
def test_shards_are_disjoint_and_cover_the_project(settings, label_studio):
    project, ids = _png_project(label_studio, 17, "three shards")
    results = [_run(settings, label_studio, project, shard=Shard(r, 3)) for r in range(3)]
    assert [r.predicted for r in results] == [len([t for t in ids if t % 3 == r]) for r in range(3)]
    assert set(_per_task(label_studio, ids, results[0].model_version).values()) == {1}
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == Shard(2, 4)
    assert shard_from_env({}) == Shard(0, 1)


@pytest.mark.e2e
def test_a_write_answered_504_while_label_studio_still_writes_is_not_sent_again(settings, label_studio, proxy):
    project, ids = _png_project(label_studio, 12, "late write")
    proxy.fail = ["late"]  # Label Studio gets the first bulk write 3 s after the client heard 504
    result = _run(settings, label_studio, project, proxy, upload_batch=5, settle=10)
    proxy.join()  # the late write has landed
    assert set(_per_task(label_studio, ids, result.model_version).values()) == {1}
    assert proxy.bulk_sizes == [5, 5, 2] and result.predicted == 12 and not result.failed


@pytest.mark.e2e
def test_a_second_run_waits_for_the_first_and_finds_nothing_left(settings, label_studio, proxy):
    from labelstudio_maskclip.commands.preannotate import writer_lock

    project, ids = _png_project(label_studio, 4, "two runs, one lock")
    results = []
    with writer_lock(settings.model_dir, project, Shard()):  # a run (or the re-scoring job) holds the project
        runs = [threading.Thread(target=lambda: results.append(
            _run(settings, label_studio, project, proxy, upload_batch=5))) for _ in range(2)]  # fmt: skip
        for run in runs:
            run.start()
        runs[0].join(1.0)
        assert not proxy.bulk_sizes and all(run.is_alive() for run in runs)  # both wait; nothing written
    for run in runs:
        run.join(120)
    assert sorted(r.predicted for r in results) == [0, 4]  # one wrote every task, the other found none left
    assert set(_per_task(label_studio, ids, results[0].model_version).values()) == {1}


@pytest.mark.e2e
def test_a_task_deleted_meanwhile_fails_alone(settings, label_studio, proxy):
    project, ids = _png_project(label_studio, 8, "a task deleted")
    gone = ids[2]
    deleted: list[int] = []

    def delete_before_the_write(method: str, path: str) -> None:  # between listing and upload
        if _is_bulk_write(method, path) and not deleted:
            label_studio.api().request("DELETE", f"/api/tasks/{gone}/")
            deleted.append(gone)

    proxy.intercept = delete_before_the_write
    result = _run(settings, label_studio, project, proxy, upload_batch=8)
    assert deleted and result.predicted == 7 and [f["task"] for f in result.failed] == [gone]
    assert set(_per_task(label_studio, set(ids) - {gone}, result.model_version).values()) == {1}


@pytest.mark.e2e
def test_a_version_that_is_a_substring_of_another_is_matched_exactly(settings, label_studio):
    """Label Studio's filter takes "v-1" for present in "v-10": the pipeline checks versions itself."""
    probe = _run(settings, label_studio, _png_project(label_studio, 1, "probe")[0]).model_version
    project, ids = _png_project(label_studio, 6, "substring versions")
    api = label_studio.api()
    for task in ids:
        api.request("POST", "/api/predictions/", json={"task": task, "model_version": probe + "0", "result": []})
    api.request("POST", "/api/predictions/", json={"task": ids[1], "model_version": probe, "result": []})
    result = _run(settings, label_studio, project)
    assert result.predicted == 5 and result.skipped == 1
    assert set(_per_task(label_studio, ids, probe).values()) == {1}


@pytest.mark.e2e
def test_a_failing_stage_stops_the_pipeline_with_its_error(settings, label_studio, proxy):
    """Every bulk write refused (400), and the read that would tell which tasks are gone fails (500): the
    uploader's error stops the run, raised to the caller, and the pipeline's threads end."""
    project, _ = _png_project(label_studio, 10, "a failing stage")

    def refuse(method: str, path: str) -> int | None:
        if _is_bulk_write(method, path):
            return 400
        return 500 if method == "GET" and "fields=all" in path else None

    proxy.intercept = refuse
    with pytest.raises(LabelStudioAPIError, match="500"):
        _run(settings, label_studio, project, proxy, upload_batch=5, retries=1)
    assert threading.active_count() < 20  # the pipeline's threads ended


@pytest.mark.e2e
def test_progress_advances_one_task_at_a_time_failures_included(settings, label_studio):
    api = label_studio.api()
    project = api.create_project("progress", CONFIG, evaluate_predictions_automatically=False)["id"]
    images = [_png(i % 4) for i in range(12)]
    images[3] = "data:image/png;base64,AAAA"  # not an image: fails, and still counts
    ids = sorted(api.import_tasks(project, [{"image": image} for image in images])["task_ids"])
    seen: list[tuple[int, int]] = []
    result = _run(settings, label_studio, project, upload_batch=5, on_progress=lambda d, t: seen.append((d, t)))
    assert [d for d, _ in seen] == list(range(1, 13))
    assert {t for _, t in seen} == {12}
    assert result.predicted == 11 and [f["task"] for f in result.failed] == [ids[3]]


def test_the_ranks_summaries_add_up_to_the_jobs():
    parts = [
        {"model_version": "v", "predicted": 4, "skipped": 3, "failed": 1, "seconds": 2.0, "tasks_per_s": 2.0},
        {"model_version": "v", "predicted": 6, "skipped": 0, "failed": 0, "seconds": 4.0, "tasks_per_s": 1.5},
    ]
    total = combine_summaries(parts)
    assert total == {"model_version": "v", "predicted": 10, "skipped": 3, "failed": 1, "seconds": 4.0,
                     "tasks_per_s": 2.5, "ranks": 2}  # fmt: skip
    assert parts[0]["predicted"] == 4  # the parts are left as they were
    assert combine_summaries([{**parts[0], "predicted": 0, "seconds": 0.0}])["tasks_per_s"] is None


_RANK = """
import json, sys
from labelstudio_maskclip.commands.preannotate import RankTotals, shard_from_env
shard = shard_from_env()
total = RankTotals(shard).combine({"model_version": "v", "predicted": shard.rank + 1, "skipped": 0,
                                   "failed": 0, "seconds": 1.0 + shard.rank, "tasks_per_s": 1.0})
print(json.dumps(total))
"""


def test_ranks_meet_through_the_store_that_rank_0_hosts_without_torchrun():
    """Launched by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; no torchrun agent): rank 0 hosts the store,
    waits for every rank's summary and prints the totals; the others print nothing but None, and all exit 0."""
    port = str(free_port())
    env = {**os.environ, "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    procs = [subprocess.Popen([sys.executable, "-c", _RANK], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (2, 1, 0)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert [json.loads(out) for out, _ in outs[:2]] == [None, None]
    assert json.loads(outs[2][0]) == {"model_version": "v", "predicted": 6, "skipped": 0, "failed": 0,
                                      "seconds": 3.0, "tasks_per_s": 2.0, "ranks": 3}  # fmt: skip


# --- against a real Label Studio ------------------------------------------------------------------------


def _real_settings(settings, label_studio, model_dir) -> Settings:
    return settings.replace(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
                            model_dir=str(model_dir), short_side=64)  # fmt: skip


def _real_project(label_studio, n: int, title: str) -> tuple[int, dict[int, str]]:
    """A project of ``n`` uploaded coco128 photos: (id, task id -> photo name)."""
    from tests.photos import COCO128_PHOTOS

    api = label_studio.api()
    project = api.create_project(title, CONFIG, evaluate_predictions_automatically=False)["id"]
    names = sorted(p.name for p in COCO128_PHOTOS.glob("*.jpg"))[:n]
    api.import_files(project, [COCO128_PHOTOS / name for name in names])
    tasks = api.list_tasks(project, fields_all=False)
    return project, {t["id"]: next(n for n in names if t["data"]["image"].endswith("-" + n)) for t in tasks}


def _predictions(label_studio, task_ids) -> dict[int, list[dict]]:
    api = label_studio.api()
    return {t: sorted(api.list_predictions(t), key=lambda p: p["id"]) for t in task_ids}


@pytest.mark.e2e
def test_against_label_studio_each_task_gets_its_own_images_prediction_once(settings, label_studio, tmp_path):
    """Several model threads (a CPU: one per core), images in batches: each task ends with exactly one
    prediction, of the served version, whose score is the one the model gives that task's own photo."""
    from labelstudio_maskclip.fetching.decode import decode_image
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI
    from labelstudio_maskclip.models import segment_options
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend
    from tests.photos import COCO128_PHOTOS

    real = _real_settings(settings, label_studio, tmp_path)
    project, photos = _real_project(label_studio, 10, "bulk, one each")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two model threads side by side, whatever this machine has
    try:
        result = preannotate(real, project, api=LabelStudioAPI.from_settings(real), batch_size=3, upload_batch=4,
                             progress=False)  # fmt: skip
        assert torch.get_num_threads() == 2  # the run's one-thread model workers left the count as it found it
    finally:
        torch.set_num_threads(threads)
    assert result.predicted == 10 and not result.failed

    backend = MaskCLIPBackend(real, str(project), CONFIG)
    vocab, classes = backend.classes(backend.spec())
    version, model = backend.rt.model_for(classes)
    assert version == result.model_version
    expected = {}
    for task, name in photos.items():
        image = decode_image((COCO128_PHOTOS / name).read_bytes(), max_pixels=real.max_image_pixels)
        expected[task] = round(model.segment([image], classes, opts=segment_options(real))[0].score, 4)
    assert len(set(expected.values())) == len(expected)  # the photos' scores tell them apart
    predictions = _predictions(label_studio, photos)
    for task, preds in predictions.items():
        assert [p["model_version"] for p in preds] == [version], task
        assert preds[0]["score"] == pytest.approx(expected[task], abs=2e-4), task
        assert {r["type"] for r in preds[0]["result"]} == {"brushlabels"}
    assert label_studio.api().get_project(project)["model_version"] == version


@pytest.mark.e2e
def test_against_label_studio_concurrent_runs_leave_one_prediction_per_task(settings, label_studio, tmp_path):
    """Three runs at once on one project: two share a MODEL_DIR (the second waits for the first's lock, then
    finds nothing left), the third has its own (another machine: no lock in common) and predicts every task
    too. Every task ends with one prediction of the version: the oldest."""
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI

    project, photos = _real_project(label_studio, 6, "three writers")
    runs = [_real_settings(settings, label_studio, tmp_path / d) for d in ("a", "a", "b")]
    results: list = []
    errors: list = []

    def run(s: Settings) -> None:
        try:
            results.append(preannotate(s, project, api=LabelStudioAPI.from_settings(s), batch_size=2,
                                       upload_batch=2, progress=False))  # fmt: skip
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and len(results) == 3
    version = results[0].model_version
    assert sum(r.predicted for r in results) >= 6 and not any(r.failed for r in results)
    for task, preds in _predictions(label_studio, photos).items():
        assert [p["model_version"] for p in preds] == [version], task


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["applied", "lost"])
def test_against_label_studio_a_bulk_write_answered_with_an_error_is_not_duplicated(
    settings, label_studio, tmp_path, mode
):
    """A proxy answers the first bulk write 504 after Label Studio applied it ("applied"), or 502 without
    passing it on ("lost"): either way each task ends with exactly one prediction, none failed."""
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI

    project, photos = _real_project(label_studio, 5, f"ambiguous write, {mode}")
    proxy = LabelStudioProxy(label_studio.url)
    proxy.fail = [mode]
    try:
        real = _real_settings(settings, label_studio, tmp_path).replace(label_studio_url=proxy.url)
        result = preannotate(real, project, api=LabelStudioAPI.from_settings(real), upload_batch=3, progress=False,
                             settle=5)  # fmt: skip
    finally:
        proxy.stop()
    # applied: never sent again (the next batch only); lost: sent again once, then the next batch
    assert proxy.seen == {"applied": ["applied", "passed"], "lost": ["lost", "passed", "passed"]}[mode]
    assert result.predicted == 5 and not result.failed
    for task, preds in _predictions(label_studio, photos).items():
        assert [p["model_version"] for p in preds] == [result.model_version], task


@pytest.mark.e2e
@pytest.mark.parametrize("old", ["old", "old,2"])
def test_against_label_studio_the_duplicate_sweep_reads_only_tasks_that_may_carry_a_version_twice(
    settings, label_studio, tmp_path, old
):
    """Re-scoring's case: every task also has an older model's prediction, so each has several. The sweep
    reads in full only the tasks whose prediction count exceeds their distinct versions, removes the
    duplicate of this version another writer left (oldest kept) and leaves another model's pair alone.
    A version with a comma (Label Studio's separator of the versions it lists) cannot be counted: then
    every task with several predictions is read in full, and the duplicate still goes."""
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI
    from tests.photos import COCO128_PHOTOS

    api = label_studio.api()
    project, photos = _real_project(label_studio, 4, f"sweep after {old}")
    first, other_twice, dup, _ = sorted(photos)
    for task in photos:
        api.request("POST", "/api/predictions/", json={"task": task, "model_version": old, "result": [], "score": 0.5})
    api.request("POST", "/api/predictions/", json={"task": other_twice, "model_version": old, "result": []})
    real = _real_settings(settings, label_studio, tmp_path)
    version = preannotate(real, project, api=LabelStudioAPI.from_settings(real), progress=False).model_version
    extra = api.request("POST", "/api/predictions/", json={"task": dup, "model_version": version, "result": []})
    new = api.import_files(project, [COCO128_PHOTOS / "000000000009.jpg"])["task_ids"]  # something to predict

    proxy = LabelStudioProxy(label_studio.url)
    try:
        via = real.replace(label_studio_url=proxy.url)
        result = preannotate(via, project, api=LabelStudioAPI.from_settings(via), progress=False)
    finally:
        proxy.stop()
    assert result.predicted == 1
    predictions = _predictions(label_studio, [*photos, *new])
    assert all([p["model_version"] for p in preds].count(version) == 1 for preds in predictions.values())
    assert extra["id"] not in {p["id"] for p in predictions[dup]}  # the newer one went
    assert [p["model_version"] for p in predictions[other_twice]].count(old) == 2
    if "," in old:
        return
    read_in_full = set()
    for method, path in proxy.requests:
        if method == "GET" and "fields=all" in path:
            query = json.loads(parse_qs(urlparse(path).query)["query"][0])
            assert "selectedItems" in query, f"a whole listing read with every field: {path}"
            read_in_full |= set(query["selectedItems"]["included"])
    assert read_in_full == {other_twice, dup}


def test_model_threads_on_a_cpu_one_per_core_at_most_a_few_and_the_count_restored(settings):
    """On a CPU a run takes one model thread per core torch would use, at most MAX_MODEL_THREADS (each holds a
    batch), sets torch to one thread per op while any run of the process is inside, and restores the count
    when the last one leaves."""
    import torch

    from labelstudio_maskclip.commands import preannotate as module

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(12)
        with module._model_threads(settings) as workers:
            assert workers == module.MAX_MODEL_THREADS == 8 and torch.get_num_threads() == 1
            with module._model_threads(settings) as inner:  # a second run of the same process
                assert inner == 8 and torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1  # the outer run is still inside
        assert torch.get_num_threads() == 12
        torch.set_num_threads(2)
        with module._model_threads(settings) as workers:
            assert workers == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
