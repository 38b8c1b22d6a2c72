"""Bulk pre-annotation of a whole project through Label Studio's API, outside its 100 s /predict limit.

A pipeline of four stages joined by bounded queues, so memory stays flat whatever the project's size:

1. **list** (one thread): light pages of the tasks that still need a prediction of the served model
   version (``fields=task_only``, ids and data only, keyset-paged; see :meth:`LabelStudioAPI.task_pages`);
2. **fetch** (``MASKCLIP_FETCH_THREADS`` threads): image downloads;
3. **infer**: the served model (promoted student or MaskCLIP) on batches; on a CPU, one thread per core
   torch would use, each running its images with one thread per op (see :func:`_model_threads`); on a GPU,
   one thread;
4. **encode + upload** (a thread pool for brush RLE / polygons, one upload thread): predictions written
   in bulk with ``POST /api/projects/{id}/import/predictions``, ``upload_batch`` per request.

Resumable: tasks that already carry a prediction of the current model version are not listed, so an
interrupted run picks up where it stopped. One writer per project: a run (and the re-scoring job, which runs
this) holds ``MODEL_DIR/preannotate-<project>.lock`` from listing to the last upload, so a second run waits and
then finds nothing left. Uploads are never resent blindly: when a bulk write fails in a way that does not say
whether it was applied (a proxy's 504 while Label Studio is still writing), the tasks are watched for up to
``settle`` seconds and only those still without this version are sent again. Whatever still slipped through
(writers on machines that share no MODEL_DIR, a write landing later than that) is undone at the end: every
task left with more than one prediction of this version keeps its oldest (only tasks that may carry a version
twice are read in full, see :meth:`LabelStudioAPI.duplicated_predictions`; under torchrun, rank 0 does this
once every rank has written: :func:`sweep_duplicates`). Under torchrun (``RANK``/``WORLD_SIZE``) each rank takes the tasks whose
``id % WORLD_SIZE == RANK``: disjoint shards, each predicted once. The ranks meet only at the end, through
torchrun's key-value store, where each leaves its summary for rank 0 to add up (no process group: there is
nothing to exchange but the totals, and nothing collective to tear down).

``refresh=True`` restricts the run to unlabeled tasks (no annotation): re-scoring after a new model was
promoted, so Label Studio's Data Manager sorts by the current model's scores.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..fetching.images import ImageError, ImageFetchError
from ..labelstudio.api import AmbiguousWriteError, LabelStudioAPI, LabelStudioAPIError, model_versions_of
from ..models import segment_options
from ..serving.backend import MaskCLIPBackend
from ..settings import Settings

__all__ = [
    "preannotate",
    "MAX_MODEL_THREADS",
    "PreannotateResult",
    "Shard",
    "shard_from_env",
    "RankTotals",
    "combine_summaries",
    "sweep_duplicates",
]

log = logging.getLogger(__name__)

_END = object()  # end of a queue's stream
_threads_lock = threading.Lock()
_threads_users: list[int] = []  # runs of this process inside _model_threads
_threads_before = [1]  # torch's thread count when the first of them started
#: Model threads side by side on a CPU at most: each holds a batch (its images, window features and PAMR's
#: planes), so memory grows with them; past this, more cores gain little for the memory they cost.
MAX_MODEL_THREADS = 8


@dataclass(frozen=True)
class Shard:
    """This process's share of the tasks: those with ``id % world == rank``."""

    rank: int = 0
    world: int = 1

    def owns(self, task_id: int) -> bool:
        return self.world <= 1 or int(task_id) % self.world == self.rank


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard:
    """torchrun's ``RANK`` and ``WORLD_SIZE`` (1 process when unset)."""
    env = os.environ if environ is None else environ
    return Shard(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")))


class RankTotals:
    """Where the ranks of one torchrun job leave their summaries: its rendezvous store (``MASTER_ADDR``/
    ``MASTER_PORT``; torchrun's agent hosts it, else rank 0 does), under a prefix of this job and restart.
    Connected when the job starts, so that a wrong address fails before any work is done."""

    def __init__(self, shard: Shard, timeout: timedelta = timedelta(hours=24)):
        import torch.distributed as dist

        store, _, _ = next(dist.rendezvous("env://", rank=shard.rank, world_size=shard.world, timeout=timeout))
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.PrefixStore(f"labelstudio-maskclip/preannotate/{run}/", store)
        self.shard, self.timeout = shard, timeout

    def combine(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """Leave this rank's ``summary``; rank 0 waits for every rank's and returns their totals (the other
        ranks: None, at once)."""
        self.store.set(f"summary/{self.shard.rank}", json.dumps(summary))
        if self.shard.rank != 0:
            return None
        keys = [f"summary/{r}" for r in range(self.shard.world)]
        self.store.wait(keys, self.timeout)
        return combine_summaries([json.loads(self.store.get(k)) for k in keys])


def combine_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of the ranks' (rank 0's first): counts summed, the time the slowest rank's, ``skipped``
    rank 0's (every rank sees the same listing), ``ranks`` added."""
    total = dict(parts[0])
    for key in ("predicted", "failed"):
        total[key] = sum(p[key] for p in parts)
    total["seconds"] = max(p["seconds"] for p in parts)
    total["tasks_per_s"] = round(total["predicted"] / total["seconds"], 2) if total["seconds"] else None
    total["ranks"] = len(parts)
    return total


@dataclass
class PreannotateResult:
    model_version: str
    predicted: int = 0
    skipped: int = 0  # tasks that already had a prediction of this version (refresh: or were labeled)
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"task", "error"}
    listed: int = 0  # tasks this shard found to predict
    seconds: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)  # seconds each stage worked (threads summed)

    def summary(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version, "predicted": self.predicted, "skipped": self.skipped,
            "failed": len(self.failed), "seconds": round(self.seconds, 2),
            "tasks_per_s": round(self.predicted / self.seconds, 2) if self.seconds else None,
            "busy_s": {k: round(v, 2) for k, v in self.busy.items()},
        }  # fmt: skip


class _Busy:
    """Seconds spent per stage, summed over threads (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the pipeline is stopping (then False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    """The next item, or the end of the stream once the pipeline is stopping."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue
    return _END


def preannotate(
    settings: Settings,
    project_id: int,
    *,
    batch_size: int | None = None,
    upload_batch: int = 250,
    refresh: bool = False,
    progress: bool = True,
    api: LabelStudioAPI | None = None,
    shard: Shard | None = None,
    page_size: int = 500,
    on_progress: Callable[[int, int], None] | None = None,
    settle: float = 60.0,
) -> PreannotateResult:
    """Predict every task of ``project_id`` (of this shard) that lacks a prediction of the served model's
    version and write the predictions to Label Studio; see the module docstring. ``batch_size``: images
    per forward pass (default ``MASKCLIP_BATCH_SIZE``); ``upload_batch``: predictions per bulk request;
    ``on_progress(done, total)`` after each task's prediction is made or has failed (``done`` counts them,
    uploaded or waiting for their bulk request; ``total``: an estimate for the shard); ``settle``:
    seconds a write answered ambiguously is watched for before what it lacks is sent again."""
    shard = shard or Shard()
    with writer_lock(settings.model_dir, project_id, shard):
        return _preannotate(settings, project_id, batch_size, upload_batch, refresh, progress, api, shard,
                            page_size, on_progress, settle)  # fmt: skip


@contextmanager
def writer_lock(model_dir: str, project_id: int, shard: Shard) -> Iterator[None]:
    """Hold ``MODEL_DIR/preannotate-<project>.lock`` (one per rank under torchrun: ranks are disjoint),
    waiting for another holder to finish."""
    suffix = f".{shard.rank}-of-{shard.world}" if shard.world > 1 else ""
    path = Path(model_dir) / f"preannotate-{int(project_id)}{suffix}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("project %s: another preannotate or re-scoring run is writing; waiting for it", project_id)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _preannotate(
    settings: Settings, project_id: int, batch_size: int | None, upload_batch: int, refresh: bool, progress: bool,
    api: LabelStudioAPI | None, shard: Shard, page_size: int, on_progress: Callable[[int, int], None] | None,
    settle: float,
) -> PreannotateResult:  # fmt: skip
    """The run, in stages: the model and what to predict, the pipeline (:class:`_Run`), the end (:func:`_finish`)."""
    started = time.monotonic()
    api = api or LabelStudioAPI.from_settings(settings)
    config = api.project(project_id)["label_config"]
    backend = MaskCLIPBackend(settings.replace(predict_time_budget=float("inf")), str(project_id), config)
    spec = backend.spec()
    vocab, classes = backend.classes(spec)
    version, model = backend.rt.model_for(classes)
    exact = _server_filter_is_exact(api, project_id, version)
    total_all = api.count_tasks(project_id, unlabeled=refresh)
    todo_all = api.count_tasks(project_id, without_version=version, unlabeled=refresh) if exact else total_all
    estimate = todo_all // shard.world + (1 if shard.rank < todo_all % shard.world else 0)
    bar = tqdm(total=estimate, desc=f"preannotate project {project_id}", unit="task", disable=not progress)
    run = _Run(
        settings, api, project_id, backend, version, vocab, spec.image_keys[0], shard, exact, refresh, page_size,
        max(1, batch_size or settings.batch_size), upload_batch, settle, estimate, bar, on_progress,
        PreannotateResult(model_version=version),
    )  # fmt: skip
    run.pipeline(model, classes)
    return _finish(run, total_all, todo_all, started)


@dataclass
class _Run:
    """One run's pipeline and what its stages share: ``lister`` pages the tasks to predict into ``tasks_q``,
    ``loader`` downloads and decodes them in ``fetch_pool`` into ``loaded_q``, the calling thread segments
    batches of them (:func:`_infer`) and ``encode`` turns each into a prediction in ``encode_pool``, and
    ``uploader`` writes them in bulk. A stage's failure stops the others (``stop``) and is re-raised."""

    settings: Settings
    api: LabelStudioAPI
    project_id: int
    backend: Any  # the MaskCLIPBackend of the project (its runtime's fetcher and model)
    version: str
    vocab: list[str]
    image_key: str
    shard: Shard
    exact: bool  # whether Label Studio's "without this version" filter can be trusted (see _server_filter_is_exact)
    refresh: bool
    page_size: int
    batch: int
    upload_batch: int
    settle: float
    estimate: int
    bar: Any  # tqdm
    on_progress: Callable[[int, int], None] | None
    result: PreannotateResult
    busy: _Busy = field(default_factory=lambda: _Busy())
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    done: int = 0  # tasks whose prediction was made or failed: the bar and on_progress advance per task

    def __post_init__(self) -> None:
        self.tasks_q: queue.Queue = queue.Queue(maxsize=max(2 * self.batch, self.page_size))
        self.loaded_q: queue.Queue = queue.Queue(maxsize=2 * self.batch)  # decoded images waiting for the model
        self.encoded_q: queue.Queue = queue.Queue(maxsize=2 * self.upload_batch)  # predictions waiting for upload
        self.targets = self.backend.spec().predicted_targets

    def pipeline(self, model: Any, classes: list[tuple[str, ...]]) -> None:
        """Run the stages until every task is uploaded or one failed (re-raised here)."""
        s = self.settings
        self.fetch_pool = ThreadPoolExecutor(max(1, s.fetch_threads), thread_name_prefix="preannotate-fetch")
        encode_pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="preannotate-encode")

        def infer() -> None:
            _infer(model, classes, s, self.batch, self.loaded_q, self.encoded_q, encode_pool, self.encode, self.busy,
                   self.stop)  # fmt: skip

        try:
            with _model_threads(s) as workers:
                infers = [threading.Thread(target=self._guarded(infer), name=f"preannotate-infer-{i}", daemon=True)
                          for i in range(workers)]  # fmt: skip
                threads = [threading.Thread(target=self._guarded(f), name=f"preannotate-{f.__name__}", daemon=True)
                           for f in (self.lister, self.loader, self.uploader)]  # fmt: skip
                queues = (self.tasks_q, self.loaded_q, self.encoded_q)
                _run_stages(infers, threads, self.encoded_q, queues, self.errors, self.stop)
        finally:
            self.fetch_pool.shutdown(wait=True, cancel_futures=True)
            encode_pool.shutdown(wait=True, cancel_futures=True)
            self.bar.close()
        if self.errors:
            raise self.errors[0]

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # stop the pipeline; the caller re-raises
                self.errors.append(e)
                self.stop.set()

        return run

    def lister(self) -> None:
        """Stage 1: the tasks of this shard that lack the version, page by page."""
        exact, t0 = self.exact, time.monotonic()
        # not exact: every task with its predictions inline (heavy; only when another version contains ours)
        for page in self.api.task_pages(self.project_id, without_version=self.version if exact else None,
                                        unlabeled=self.refresh, page_size=self.page_size if exact else 100,
                                        full=not exact):  # fmt: skip
            self.busy.add("list", time.monotonic() - t0)
            for task in page:
                if not self.shard.owns(task["id"]):
                    continue
                if not exact and self.version in model_versions_of(task):
                    continue
                self.result.listed += 1
                if not exact:
                    task = {"id": task["id"], "data": task.get("data")}
                if not _put(self.tasks_q, task, self.stop):
                    return
            t0 = time.monotonic()
        _put(self.tasks_q, _END, self.stop)

    def load(self, task: dict[str, Any]) -> Any:
        t0 = time.monotonic()
        try:
            return _load_image(self.backend, task, self.image_key, self.settings.max_image_pixels)
        finally:
            self.busy.add("fetch", time.monotonic() - t0)

    def loader(self) -> None:
        """Stage 2: each listed task's image, downloading in the fetch pool, in the tasks' order."""
        while not self.stop.is_set():
            task = _get(self.tasks_q, self.stop)
            if task is _END:
                _put(self.loaded_q, _END, self.stop)
                return
            if not _put(self.loaded_q, (task, self.fetch_pool.submit(self.load, task)), self.stop):
                return

    def encode(self, task: dict[str, Any], seg: Any) -> dict[str, Any]:
        """Stage 4 (in the encode pool): a segmentation -> the task's prediction."""
        from ..labelstudio.regions import prediction

        s, t0 = self.settings, time.monotonic()
        pred = prediction(seg, self.targets, self.vocab, self.version, min_area=s.min_area, polygons=s.polygons)
        self.busy.add("encode", time.monotonic() - t0)
        return {"task": int(task["id"]), **pred}

    def uploader(self) -> None:
        """Stage 5: predictions (or their tasks' failures) in order, written ``upload_batch`` at a time."""
        pending: list[dict[str, Any]] = []
        while True:
            item = _get(self.encoded_q, self.stop)
            if item is not _END:
                self._count(item, pending)
            if pending and (item is _END or len(pending) >= self.upload_batch):
                t0 = time.monotonic()
                created = _upload(self.api, self.project_id, self.version, pending, self.result, self.settle)
                self.busy.add("upload", time.monotonic() - t0)
                self.result.predicted += created
                self.bar.set_postfix(uploaded=self.result.predicted, refresh=False)
                pending = []
            if item is _END:
                return

    def _count(self, item: tuple[dict[str, Any], Any], pending: list[dict[str, Any]]) -> None:
        """One task done: its prediction joins ``pending``, or its failure the result; progress advances."""
        task, fut = item
        if isinstance(fut, str):  # no image (see _infer)
            self.result.failed.append({"task": task["id"], "error": fut})
        else:
            try:
                pending.append(fut.result())
            except Exception as e:  # an encoding failure is that task's
                self.result.failed.append({"task": task["id"], "error": f"encoding: {e}"})
        self.done += 1
        self.bar.update(1)
        if self.on_progress is not None:
            self.on_progress(self.done, self.estimate)


def _finish(run: _Run, total_all: int, todo_all: int, started: float) -> PreannotateResult:
    """After the pipeline: duplicates of the version removed, the skipped tasks counted, the version made live
    (rank 0), the summary logged."""
    api, project_id, version, shard, result = run.api, run.project_id, run.version, run.shard, run.result
    if result.predicted and shard.world == 1:  # torchrun: rank 0 sweeps once all ranks wrote (sweep_duplicates)
        _remove_duplicates(api, project_id, version)
    result.skipped = max(0, total_all - todo_all) if shard.world == 1 else 0
    if not run.exact and shard.world == 1:
        result.skipped = max(0, total_all - result.listed)
    if shard.rank == 0 and (result.predicted or result.skipped):
        try:  # the Data Manager's "Prediction score" column averages the project's live version
            if api.set_live_version(project_id, version):
                log.info("project %s: live model version set to %s", project_id, version)
        except LabelStudioAPIError as e:
            log.warning("project %s: could not make %s its live model version (%s)", project_id, version, e)
    result.seconds = time.monotonic() - started
    result.busy = dict(run.busy.seconds)
    log.info(
        "preannotate project %s (shard %d/%d) with %s: %d predicted, %d already had it, %d failed in %.1f s; "
        "busy seconds %s", project_id, shard.rank, shard.world, version, result.predicted, result.skipped,
        len(result.failed), result.seconds, {k: round(v, 1) for k, v in result.busy.items()},
    )  # fmt: skip
    return result


@contextmanager
def _model_threads(settings: Settings) -> Iterator[int]:
    """How many threads run the model side by side. On a CPU, as many as the cores torch would use, each
    op on one core: the pipeline's small ops split over the cores wait for each other at every op, many
    times over when other processes share the cores (measured in BENCHMARKS.md), while whole images side by
    side do not; at most :data:`MAX_MODEL_THREADS`. Elsewhere one thread. torch's thread count is restored
    afterwards."""
    import torch

    from ..engine.loading import resolve_device

    if resolve_device(settings.device).type != "cpu":
        yield 1
        return
    with _threads_lock:  # runs in one process (tests, a job): the first sets, the last restores
        if not _threads_users:
            _threads_before[0] = torch.get_num_threads()
            torch.set_num_threads(1)  # this thread's and every thread's started from now on
        _threads_users.append(1)
        workers = min(_threads_before[0], MAX_MODEL_THREADS)
    try:
        yield workers
    finally:
        with _threads_lock:
            _threads_users.pop()
            if not _threads_users:
                torch.set_num_threads(_threads_before[0])


def _run_stages(
    infers: list[threading.Thread], others: list[threading.Thread], encoded_q: queue.Queue,
    queues: tuple[queue.Queue, ...], errors: list[BaseException], stop: threading.Event,
) -> None:  # fmt: skip
    """Start the stages' threads, wait for the model threads, end the encoded stream, wait for the rest;
    once ``stop`` is set, the queues are drained so that no thread stays blocked."""
    for t in [*infers, *others]:
        t.start()
    try:
        for t in infers:
            while t.is_alive():
                t.join(0.5)
    except BaseException as e:  # an interrupt in the calling thread
        errors.append(e)
        stop.set()
    finally:
        if not stop.is_set():
            _put(encoded_q, _END, stop)
        for t in [*infers, *others]:
            while t.is_alive():
                t.join(0.5)
                if stop.is_set():
                    _drain(*queues)


def _drain(*queues: queue.Queue) -> None:
    for q in queues:
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass


def _infer(model, classes, settings, batch, loaded_q, encoded_q, encode_pool, encode, busy, stop) -> None:
    """The model stage, in one of its threads: batches of decoded images -> segmentations -> encode jobs
    (an image that did not load goes on as its reason, a string). The end of the stream is put back for
    the other model threads."""
    opts = segment_options(settings)
    done = False
    while not done and not stop.is_set():
        items: list[tuple[dict[str, Any], Any]] = []
        while len(items) < batch:
            got = _get(loaded_q, stop)
            if got is _END:
                _put(loaded_q, _END, stop)
                done = True
                break
            task, fut = got
            image = fut.result()
            if isinstance(image, str):  # the image's failure: the uploader records it, in the task's turn
                if not _put(encoded_q, (task, image), stop):
                    return
            else:
                items.append((task, image))
        if not items:
            continue
        t0 = time.monotonic()
        segs = model.segment([img for _, img in items], classes, opts=opts)
        busy.add("infer", time.monotonic() - t0)
        for (task, _), seg in zip(items, segs):
            if not _put(encoded_q, (task, encode_pool.submit(encode, task, seg)), stop):
                return


def _load_image(backend: Any, task: Mapping[str, Any], key: str, max_pixels: int, tries: int = 3) -> Any:
    """(H, W, 3) uint8, or a string saying why not. Download failures are retried with backoff."""
    data = task.get("data")
    url = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(url, str) or not url:
        keys = sorted(data)[:10] if isinstance(data, Mapping) else []
        return f"task data has no image under '{key}' (keys: {keys})"
    for attempt in range(tries):
        try:
            return backend.rt.fetcher.load(url, task.get("id"), max_pixels=max_pixels)
        except ImageFetchError as e:
            if attempt + 1 == tries:
                return str(e)
            time.sleep(0.5 * 2**attempt)
        except ImageError as e:
            return str(e)
    return "unreachable"


def _upload(
    api: LabelStudioAPI, project: int, version: str, preds: list[dict[str, Any]], result, settle: float = 60.0
) -> int:
    """Write ``preds`` in one bulk request; returns how many Label Studio created. Never resends a request
    that may have been applied: on an ambiguous failure the tasks are watched (:func:`_settled`) and only
    those still without ``version`` are sent again (once). A 400 (nothing written: e.g. a task deleted
    meanwhile) is retried without the tasks that no longer exist."""
    try:
        created = api.import_predictions(project, preds)
    except AmbiguousWriteError as e:
        log.warning("bulk write of %d predictions failed (%s): checking what Label Studio kept", len(preds), e)
        versions = _settled(api, project, version, [p["task"] for p in preds], settle)
        missing = [p for p in preds if p["task"] in versions and version not in versions[p["task"]]]
        kept = sum(1 for p in preds if version in versions.get(p["task"], []))
        gone = [p["task"] for p in preds if p["task"] not in versions]
        result.failed.extend({"task": t, "error": "task no longer exists"} for t in gone)
        if not missing:
            return kept
        try:
            return kept + _checked_created(api.import_predictions(project, missing), missing, result)
        except LabelStudioAPIError as e2:
            result.failed.extend({"task": p["task"], "error": f"upload: {e2}"} for p in missing)
            return kept
    except LabelStudioAPIError as e:
        if e.status != 400:
            raise
        versions = api.versions_of(project, [p["task"] for p in preds])
        alive = [p for p in preds if p["task"] in versions]
        result.failed.extend({"task": p["task"], "error": "task no longer exists"} for p in preds
                             if p["task"] not in versions)  # fmt: skip
        if len(alive) == len(preds) or not alive:
            result.failed.extend({"task": p["task"], "error": f"upload: {e}"} for p in alive)
            return 0
        return _checked_created(api.import_predictions(project, alive), alive, result)
    return _checked_created(created, preds, result)


def _settled(api: LabelStudioAPI, project: int, version: str, tasks: list[int], settle: float) -> dict[int, list[str]]:
    """The tasks' model versions once a bulk write answered ambiguously has shown up, or ``settle`` seconds
    after the answer: Label Studio writes a bulk import in one transaction, so its tasks show ``version``
    all at once (a proxy may have answered 504 while Label Studio was still writing)."""
    deadline = time.monotonic() + settle
    while True:
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        versions = api.versions_of(project, tasks)
        if all(version in versions.get(t, [version]) for t in tasks) or time.monotonic() >= deadline:
            return versions


def sweep_duplicates(settings: Settings, project_id: int, version: str) -> None:
    """Rank 0 of a torchrun job, once every rank has left its summary (:meth:`RankTotals.combine`): the
    duplicate sweep that a single process runs at the end of :func:`preannotate`, once for the whole job."""
    _remove_duplicates(LabelStudioAPI.from_settings(settings), project_id, version)


def _remove_duplicates(api: LabelStudioAPI, project: int, version: str) -> None:
    """Every task of ``project`` with several predictions of ``version`` keeps its oldest (a second writer
    without the lock, or an ambiguous write that landed after it was sent again)."""
    try:
        duplicated = api.duplicated_predictions(project, version)
        for ids in duplicated.values():
            for prediction in ids[1:]:
                api.delete_prediction(prediction)
    except LabelStudioAPIError as e:
        log.warning("project %s: could not check for duplicate predictions of %s (%s)", project, version, e)
        return
    if duplicated:
        log.warning("project %s: removed %d duplicate predictions of %s on %d tasks", project,
                    sum(len(i) - 1 for i in duplicated.values()), version, len(duplicated))  # fmt: skip


def _checked_created(created: int, sent: list[dict[str, Any]], result) -> int:
    """Label Studio drops invalid predictions silently: say so when it created fewer than were sent."""
    if created < len(sent):
        log.warning("Label Studio created %d of %d predictions (it drops invalid ones without saying which)",
                    created, len(sent))  # fmt: skip
        result.failed.append({"task": None, "error": f"{len(sent) - created} predictions dropped by Label Studio"})
    return created


def _server_filter_is_exact(api: LabelStudioAPI, project: int, version: str) -> bool:
    """Label Studio's "has no prediction of version V" filter matches substrings: it is exact unless
    another version of the project contains V (``maskclip+-1`` in ``maskclip+-10``)."""
    try:
        versions = api.model_versions(project)
    except LabelStudioAPIError:
        return False
    return not any(version in v and v != version for v in versions)
