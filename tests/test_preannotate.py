"""The bulk pre-annotation pipeline against an in-memory Label Studio (the real one: tests/test_e2e.py).

The fake keeps Label Studio's observable rules for the calls the pipeline makes: keyset-paged light
listing with the "no prediction of version V" filter as a substring match, a bulk import that fails as a
whole on an unknown task id, and a write that can be applied and still answer an error.
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
from labelstudio_maskclip.labelstudio.api import AmbiguousWriteError, LabelStudioAPIError
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


class FakeLabelStudio:
    """The subset of :class:`LabelStudioAPI` that preannotate calls, over an in-memory project."""

    def __init__(self, n_tasks: int, *, labeled: set[int] = frozenset(), versions: dict[int, list[str]] | None = None):
        images = [_png(i) for i in range(4)]
        self.tasks = {i: {"id": i, "data": {"image": images[i % 4]}} for i in range(1, n_tasks + 1)}
        self.predictions: list[dict] = []
        self.labeled = set(labeled)
        for task, vs in (versions or {}).items():
            self.predictions += [{"task": task, "model_version": v, "result": [], "id": -len(self.predictions) - k - 1}
                                 for k, v in enumerate(vs)]  # fmt: skip
        self.imports: list[int] = []  # size of each bulk request that was applied
        self.fail_next: list[str] = []  # "ambiguous-applied", "ambiguous-lost", "bad-request"
        self.max_page = 0
        self.lock = threading.RLock()

    def _versions(self, task_id: int) -> list[str]:
        return [p["model_version"] for p in self.predictions if p["task"] == task_id]

    def project(self, project_id):
        return {"id": project_id, "label_config": CONFIG}

    def model_versions(self, project_id):
        return sorted({p["model_version"] for p in self.predictions})

    def _match(self, tid, after_id=0, without_version=None, unlabeled=False):
        if tid <= after_id or (unlabeled and tid in self.labeled):
            return False
        # Label Studio's not_contains is a substring test on the joined versions
        return not (without_version and without_version in ",".join(self._versions(tid)))

    def count_tasks(self, project_id, **filters):
        return sum(1 for t in self.tasks if self._match(t, **filters))

    def task_pages(self, project_id, *, include=("id", "data"), without_version=None, unlabeled=False,
                   page_size=500, after_id=0, full=False):  # fmt: skip
        while True:
            with self.lock:
                ids = sorted(t for t in self.tasks if self._match(t, after_id, without_version, unlabeled))[:page_size]
                page = [dict(self.tasks[t]) for t in ids]
                if full:  # every field: the predictions inline
                    for task in page:
                        task["predictions"] = [{"model_version": v} for v in self._versions(task["id"])]
            if not page:
                return
            self.max_page = max(self.max_page, len(page))
            yield page
            after_id = page[-1]["id"]

    def set_live_version(self, project_id, version):
        changed, self.live = getattr(self, "live", None) != version, version
        return changed

    def versions_of(self, project_id, task_ids):
        with self.lock:
            return {t: self._versions(t) for t in task_ids if t in self.tasks}

    def import_predictions(self, project_id, predictions):
        with self.lock:
            mode = self.fail_next.pop(0) if self.fail_next else None
            if mode == "bad-request" or any(p["task"] not in self.tasks for p in predictions):
                raise LabelStudioAPIError("POST import/predictions -> 400: task not found", 400)
            if mode == "ambiguous-lost":
                raise AmbiguousWriteError("POST import/predictions -> 502", 502)
            if mode == "ambiguous-late":  # a proxy's 504 while Label Studio is still writing (for 3 s)
                self.late = threading.Timer(3.0, self._apply, (predictions,))
                self.late.start()
                raise AmbiguousWriteError("POST import/predictions -> 504", 504)
            self._apply(predictions)
            if mode == "ambiguous-applied":
                raise AmbiguousWriteError("POST import/predictions: ReadTimeout")
            return len(predictions)

    def _apply(self, predictions):
        with self.lock:
            start = len(self.predictions) + 1000
            self.predictions += [{**p, "id": start + k} for k, p in enumerate(predictions)]
            self.imports.append(len(predictions))

    def duplicated_predictions(self, project_id, version):
        with self.lock:
            ids: dict[int, list[int]] = {}
            for p in self.predictions:
                if p["model_version"] == version:
                    ids.setdefault(p["task"], []).append(p["id"])
            return {t: sorted(i) for t, i in ids.items() if len(i) > 1}

    def delete_prediction(self, prediction_id):
        with self.lock:
            self.predictions = [p for p in self.predictions if p.get("id") != prediction_id]

    def per_task(self, version):
        counts = {t: 0 for t in self.tasks}
        for p in self.predictions:
            if p["model_version"] == version:
                counts[p["task"]] += 1
        return counts


@pytest.fixture(scope="module")
def settings(tmp_path_factory, weights):
    return Settings(
        model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=32, templates="simple", min_area=0.0,
        model_dir=str(tmp_path_factory.mktemp("model_dir")), label_studio_url="http://ls.invalid", batch_size=4,
        fetch_threads=2,
    )  # fmt: skip


def test_every_task_gets_one_prediction_in_bulk_and_a_rerun_does_nothing(settings):
    ls = FakeLabelStudio(23)
    first = preannotate(settings, 1, api=ls, upload_batch=5, page_size=7, progress=False)
    assert first.predicted == 23 and not first.failed
    assert set(ls.per_task(first.model_version).values()) == {1}
    assert ls.imports == [5, 5, 5, 5, 3]  # bulk requests of upload_batch, the rest at the end
    assert ls.max_page <= 7
    pred = next(p for p in ls.predictions if p["task"] == 1)
    assert pred["result"] and pred["result"][0]["type"] == "brushlabels" and 0 <= pred["score"] <= 1
    again = preannotate(settings, 1, api=ls, upload_batch=5, progress=False)
    assert again.predicted == 0 and again.skipped == 23 and ls.imports == [5, 5, 5, 5, 3]
    assert ls.live == first.model_version  # the version Label Studio's score column averages


def test_refresh_predicts_only_unlabeled_tasks(settings):
    ls = FakeLabelStudio(10, labeled={2, 5, 9})
    result = preannotate(settings, 1, api=ls, refresh=True, progress=False)
    counts = ls.per_task(result.model_version)
    assert {t for t, n in counts.items() if n} == set(range(1, 11)) - {2, 5, 9}
    assert result.predicted == 7


def test_shards_are_disjoint_and_cover_the_project(settings):
    ls = FakeLabelStudio(17)
    results = [preannotate(settings, 1, api=ls, shard=Shard(r, 3), progress=False) for r in range(3)]
    assert sum(r.predicted for r in results) == 17
    assert set(ls.per_task(results[0].model_version).values()) == {1}
    assert [r.predicted for r in results] == [len([t for t in range(1, 18) if t % 3 == r]) for r in range(3)]
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == Shard(2, 4)
    assert shard_from_env({}) == Shard(0, 1)


def test_a_write_applied_but_answered_with_an_error_is_not_sent_again(settings):
    ls = FakeLabelStudio(12)
    ls.fail_next = ["ambiguous-applied"]
    result = preannotate(settings, 1, api=ls, upload_batch=5, progress=False)
    assert set(ls.per_task(result.model_version).values()) == {1}  # no duplicates
    assert result.predicted == 12 and not result.failed


def test_a_write_lost_on_the_way_is_sent_again_once_checked(settings):
    ls = FakeLabelStudio(12)
    ls.fail_next = ["ambiguous-lost"]
    result = preannotate(settings, 1, api=ls, upload_batch=5, progress=False, settle=0.5)
    assert set(ls.per_task(result.model_version).values()) == {1}
    assert result.predicted == 12 and not result.failed


def test_a_write_answered_504_while_label_studio_still_writes_is_not_sent_again(settings):
    ls = FakeLabelStudio(12)
    ls.fail_next = ["ambiguous-late"]
    result = preannotate(settings, 1, api=ls, upload_batch=5, progress=False, settle=10)
    ls.late.join()  # the late write has landed
    assert set(ls.per_task(result.model_version).values()) == {1}
    assert ls.imports == [5, 5, 2] and result.predicted == 12 and not result.failed


def test_duplicates_left_by_a_writer_without_the_lock_are_removed_oldest_kept(settings):
    ls = FakeLabelStudio(6)
    first = preannotate(settings, 1, api=ls, upload_batch=5, progress=False)
    version = first.model_version
    ls._apply([{"task": t, "model_version": version, "result": []} for t in (2, 5)])  # another machine's run
    oldest = {p["task"]: p["id"] for p in reversed(ls.predictions) if p["model_version"] == version}
    ls.tasks[7] = {"id": 7, "data": dict(ls.tasks[1]["data"])}  # something new to predict: a run that writes
    preannotate(settings, 1, api=ls, upload_batch=5, progress=False)
    assert set(ls.per_task(version).values()) == {1}
    assert {p["task"]: p["id"] for p in ls.predictions if p["task"] <= 6} == oldest


def test_a_second_run_waits_for_the_first_and_finds_nothing_left(settings):
    from labelstudio_maskclip.commands.preannotate import writer_lock

    ls = FakeLabelStudio(8)
    results = []
    with writer_lock(settings.model_dir, 1, Shard()):  # a run (or the re-scoring job) holds the project
        runs = [threading.Thread(target=lambda: results.append(
            preannotate(settings, 1, api=ls, upload_batch=5, progress=False))) for _ in range(2)]  # fmt: skip
        for run in runs:
            run.start()
        runs[0].join(1.0)
        assert not ls.imports and all(run.is_alive() for run in runs)  # both wait; nothing written
    for run in runs:
        run.join(120)
    assert sorted(r.predicted for r in results) == [0, 8]  # one wrote every task, the other found none left
    assert set(ls.per_task(results[0].model_version).values()) == {1}


def test_a_task_deleted_meanwhile_fails_alone(settings):
    ls = FakeLabelStudio(8)
    original = ls.import_predictions

    def delete_then_import(project_id, predictions):  # task 3 disappears between listing and upload
        ls.tasks.pop(3, None)
        return original(project_id, predictions)

    ls.import_predictions = delete_then_import
    result = preannotate(settings, 1, api=ls, upload_batch=8, progress=False)
    assert result.predicted == 7 and [f["task"] for f in result.failed] == [3]
    assert all(n == 1 for t, n in ls.per_task(result.model_version).items())


def test_a_version_that_is_a_substring_of_another_is_matched_exactly(settings):
    """Label Studio's filter would take "v-1" for present in "v-10": the pipeline checks versions itself."""
    probe = preannotate(settings, 1, api=FakeLabelStudio(1), progress=False).model_version
    ls = FakeLabelStudio(6, versions={t: [probe + "0"] for t in range(1, 7)})
    ls.predictions.append({"task": 2, "model_version": probe, "result": [], "id": -100})
    result = preannotate(settings, 1, api=ls, progress=False)
    assert result.predicted == 5 and result.skipped == 1 and set(ls.per_task(probe).values()) == {1}


def test_a_failing_stage_stops_the_pipeline_with_its_error(settings):
    ls = FakeLabelStudio(30)
    ls.fail_next = ["bad-request"] * 10  # every write refused: not a transient failure

    with pytest.raises(LabelStudioAPIError):
        ls_api = ls
        original = ls_api.versions_of
        ls_api.versions_of = lambda p, ids: (_ for _ in ()).throw(LabelStudioAPIError("GET -> 500", 500))
        preannotate(settings, 1, api=ls_api, upload_batch=5, progress=False)
    ls.versions_of = original
    assert threading.active_count() < 20  # the pipeline's threads ended


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


def test_progress_advances_one_task_at_a_time_failures_included(settings):
    ls = FakeLabelStudio(12)
    ls.tasks[4]["data"] = {"image": "data:image/png;base64,AAAA"}  # not an image: fails, and still counts
    seen: list[tuple[int, int]] = []
    result = preannotate(
        settings, 1, api=ls, upload_batch=5, progress=False, on_progress=lambda d, t: seen.append((d, t))
    )
    assert [d for d, _ in seen] == list(range(1, 13))
    assert {t for _, t in seen} == {12}
    assert result.predicted == 11 and [f["task"] for f in result.failed] == [4]


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
