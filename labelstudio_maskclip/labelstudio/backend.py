"""The ML backend: ``setup``, ``predict`` and ``fit`` with label-studio-ml's names, pure of HTTP.

Label Studio's convention builds a backend object per request; everything heavy (the CLIP teacher, the
promoted student, the image fetcher, the store) lives in a process-level :class:`Runtime`, built once per
process and settings. Training never runs here: ``fit`` stores the webhook's masks and, when a trigger
fires, starts the trainer as a separate process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..engine.names import ClassNames
from ..settings import Settings
from .labeling import LabelingSpec, parse_label_config

if TYPE_CHECKING:
    from ..engine.segmenter import MaskCLIP, Segmentation, SegmentOptions
    from ..learning.store import Store
    from ..training.student import StudentModel
    from .images import ImageFetcher

__all__ = ["MaskCLIPBackend", "Runtime", "runtime", "PredictError", "Segmenter"]

log = logging.getLogger(__name__)

PREDICT_CHUNK = 64  # tasks fetched ahead of inference; bounds memory for project-sized requests
WARMUP_LABELS = 21  # labels of the warm-up batch (embeddings made up: the text tower is not needed)


class Segmenter(Protocol):
    """A model that answers /predict: the MaskCLIP teacher (:class:`~labelstudio_maskclip.engine.segmenter.MaskCLIP`)
    or a promoted student (:class:`~labelstudio_maskclip.training.student.StudentModel`)."""

    def segment(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[ClassNames],
        background: Sequence[ClassNames] = (),
        opts: SegmentOptions = ...,
        progress: Any = None,
    ) -> list[Segmentation]: ...


class PredictError(ValueError):
    """The whole /predict request is unusable (e.g. a labeling config without a usable control)."""


@dataclass
class Runtime:
    """Process-wide heavy objects, created lazily on first use."""

    settings: Settings
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _fetcher: ImageFetcher | None = None
    _store: Store | None = None
    _student: tuple[str, StudentModel | None] | None = None  # (version, model or None if it cannot load)
    _followups: Any = None  # webhook follow-ups (Label Studio API calls): a bounded queue, one thread
    _features: Any = None  # interactive prompting: per-image pixels and dense features (FeatureCache)
    _embeddings: Any = None  # EmbeddingStore of the teacher
    _preparer: Any = None  # one thread that hands label sets to the store (off the /setup thread)
    _teacher_ready: threading.Event = field(default_factory=threading.Event)
    _teacher_loader: threading.Thread | None = None
    _teacher_error: BaseException | None = None
    _per_image: dict[str, float] = field(default_factory=dict)  # seconds per image by model version

    @property
    def followups(self):
        """The process's :class:`~.followups.FollowUps` (bounded; drops with a logged reason when full)."""
        with self._lock:
            if self._followups is None:
                from .followups import FollowUps

                self._followups = FollowUps(functools.partial(record_parent_prediction, self))
            return self._followups

    @property
    def fetcher(self) -> ImageFetcher:
        with self._lock:
            if self._fetcher is None:
                from .images import ImageFetcher

                self._fetcher = ImageFetcher.from_settings(self.settings)
            return self._fetcher

    @property
    def features(self):
        with self._lock:
            if self._features is None:
                from .interactive import FeatureCache

                self._features = FeatureCache(self.settings.interactive_cache_mb * 2**20)
            return self._features

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                from ..learning.store import Store

                self._store = Store(Path(self.settings.model_dir))
            return self._store

    def store_damage(self) -> str:
        """What is wrong with the store and how to recover; "" when intact or not opened yet (not opened
        here: opening checks the whole file)."""
        store = self._store
        return store.damage_message() if store is not None else ""

    @property
    def teacher(self) -> MaskCLIP:
        """The MaskCLIP teacher, loaded here if needed (blocking; see :meth:`teacher_within`)."""
        from ..models import shared_maskclip

        return shared_maskclip(self.settings)

    # -- the teacher within a deadline ---------------------------------------------------------------
    def start_teacher(self) -> None:
        """Start loading the teacher in a background thread (once per process)."""
        with self._lock:
            if self._teacher_loader is None:
                self._teacher_loader = threading.Thread(target=self._load_teacher, name="model-load", daemon=True)
                self._teacher_loader.start()

    def _load_teacher(self) -> None:
        try:
            _ = self.teacher
        except BaseException as e:  # kept for /predict and /health
            self._teacher_error = e
        finally:
            self._teacher_ready.set()

    def teacher_within(self, deadline: float):
        """The teacher if it is loaded by ``deadline`` (``time.monotonic()`` seconds; inf: wait as long as it
        takes), else None. Raises what loading raised."""
        self.start_teacher()
        if not self._teacher_ready.wait(remaining(deadline)):
            return None
        if self._teacher_error is not None:
            raise self._teacher_error
        return self.teacher

    # -- text embeddings, prepared in the background -------------------------------------------------
    @property
    def embeddings(self):
        """The teacher's :class:`~labelstudio_maskclip.embeddings.EmbeddingStore` (under MODEL_DIR)."""
        with self._lock:
            if self._embeddings is None:
                from ..embeddings import EmbeddingStore

                s = self.settings
                self._embeddings = EmbeddingStore(
                    Path(s.model_dir) / "text_embeddings", embedding_identity(s), self._encode_labels,
                    persist=s.pretrained.strip().lower() not in ("random", "none", ""), device=_device(s.device),
                )  # fmt: skip
            return self._embeddings

    def _encode_labels(self, labels) -> Any:
        return self.teacher.text_embeddings(labels)

    def prepare_labels(self, classes: Sequence[Sequence[str]]) -> None:
        """Start making the text embeddings of ``classes`` (names per label) ready, without waiting for anything:
        even building the store (it imports open_clip, which may be busy loading the model) happens in the
        background, since Label Studio gives /setup only 3 s."""
        with self._lock:
            if self._preparer is None:
                self._preparer = ThreadPoolExecutor(1, thread_name_prefix="prepare-labels")
        self._preparer.submit(self._prepare, [tuple(names) for names in classes])

    def _prepare(self, classes: list[tuple[str, ...]]) -> None:
        from ..embeddings import label_set

        try:
            self.embeddings.prepare(label_set(classes))
        except Exception:
            log.exception("preparing the text embeddings of %d labels failed", len(classes))

    def labels_within(self, classes: Sequence[Sequence[str]], deadline: float):
        """(K, D) text embeddings of ``classes`` if ready by ``deadline``, else None (still computing)."""
        from ..embeddings import label_set

        return self.embeddings.wait(label_set(classes), remaining(deadline))

    # -- time per image ------------------------------------------------------------------------------
    def seconds_per_image(self, version: str) -> float:
        """Recent seconds per image of ``version`` (0 before the first measurement)."""
        with self._lock:
            return self._per_image.get(version, 0.0)

    def observe(self, version: str, images: int, seconds: float) -> None:
        """Record a batch of ``images`` that took ``seconds`` (smoothed over recent batches)."""
        per = seconds / max(1, images)
        with self._lock:
            old = self._per_image.get(version)
            self._per_image[version] = per if old is None else 0.5 * old + 0.5 * per

    def warm_up(self) -> None:
        """Load the teacher and run a batch through it (kernels, allocator, compiled graphs), so that the first
        annotator does not pay for it; the time it takes is the first estimate of the time per image."""
        import torch

        from ..models import segment_options

        teacher = self.teacher_within(math.inf)
        opts = segment_options(self.settings)
        side = opts.short_side or 224
        image = np.full((side, side * 4 // 3, 3), 127, np.uint8)  # a 4:3 photo at the served size
        dim = int(teacher.clip.model.visual.output_dim)
        text = torch.nn.functional.normalize(torch.randn(WARMUP_LABELS, dim), dim=-1).to(teacher.device)
        names = [f"label {k}" for k in range(WARMUP_LABELS)]
        batches = [1, 1] + ([opts.batch_size] if teacher.device.type == "cuda" and opts.batch_size > 1 else [])
        for n in batches:
            start = time.monotonic()
            teacher.segment([image] * n, names, opts=opts, text=text)
            seconds = time.monotonic() - start
        self.observe(self.teacher_version(), 1, seconds / n if n > 1 else seconds)
        log.info("model warmed up: %.3f s per image", self.seconds_per_image(self.teacher_version()))

    def teacher_version(self) -> str:
        s = self.settings
        tag = Path(s.pretrained).name if s.pretrained else "random"
        arch = Path(s.model).stem if s.model.endswith(".json") else s.model
        return f"maskclip-{arch}.{tag}-{s.dense_mode}"

    def student_version(self) -> str | None:
        """Version of the promoted student, read from MODEL_DIR on every call (cheap), so every worker
        switches to a newly promoted model without a restart."""
        from ..training.checkpoints import current_version

        return current_version(Path(self.settings.model_dir))

    def model_for(self, classes: Sequence[Sequence[str]], *, load: bool = True) -> tuple[str, Segmenter | None]:
        """(model_version, model) to serve for these classes (names per label, in order): the promoted
        student when one exists and was trained for exactly these labels, else the MaskCLIP teacher
        (``load=False``: the teacher is not loaded and None is returned in its place, for /setup)."""
        version = self.student_version()
        student = self._load_student(version) if version is not None else None
        if version is not None and student is not None:
            if student.serves(classes):
                return version, student
            log.info("student %s was trained for other labels (%s): serving MaskCLIP", version, student.labels)
        return self.teacher_version(), (self.teacher if load else None)

    def _load_student(self, version: str) -> StudentModel | None:
        """The promoted student, loaded once per version; None (MaskCLIP is served) if it cannot load."""
        with self._lock:
            if self._student is None or self._student[0] != version:
                from ..training.checkpoints import current_checkpoint
                from ..training.student import load_student

                try:
                    path = current_checkpoint(Path(self.settings.model_dir))
                    if path is None:
                        raise FileNotFoundError("the promoted checkpoint is gone")
                    model = load_student(path, self.settings.device)
                    log.info("serving student %s for labels %s", version, model.labels)
                except Exception as e:  # a damaged file must not take serving down
                    log.error("student %s cannot be loaded (%s): serving MaskCLIP; `labelstudio-maskclip "
                              "rollback` picks another version", version, e)  # fmt: skip
                    model = None
                self._student = (version, model)
            return self._student[1]


_MAX_KEPT_CONFIG = 65_536  # a longer labeling config is fetched again by the follow-up
_KEPT_FIELDS = ("id", "task", "project", "completed_by", "ground_truth", "was_cancelled", "parent_prediction",
                "created_at", "updated_at")  # fmt: skip


def _small(value: Any, depth: int = 0) -> bool:
    """A scalar, a short string, or a small object of those (the author): kept in a queued follow-up."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 256
    return isinstance(value, Mapping) and depth == 0 and len(value) <= 16 and all(_small(v, 1) for v in value.values())


@dataclass(frozen=True)
class ParentPredictionCheck:
    """A queued follow-up (small: no masks): fetch the annotation's current result and its parent
    prediction from Label Studio, and store them together, which records per-label outcomes."""

    annotation_id: int
    prediction_id: int
    task: int | None
    project: int | None
    label_config: str | None
    fields: Mapping[str, Any]  # the webhook's annotation fields but the result (author, flags, timestamps)


def record_parent_prediction(rt: Runtime, check: ParentPredictionCheck) -> None:
    """Follow-up: GET the annotation and its parent prediction, then store them through the webhook rules:
    the same content only gains its outcomes (the change counter does not move, see
    :meth:`~..learning.store.Store.put_annotation`); an update that arrived meanwhile wins (stale)."""
    from ..learning.webhooks import handle_event
    from .api import LabelStudioAPI

    api = LabelStudioAPI(rt.fetcher, timeout=rt.settings.download_timeout)
    annotation = api.request("GET", f"/api/annotations/{check.annotation_id}")
    prediction = api.request("GET", f"/api/predictions/{check.prediction_id}")
    if not isinstance(annotation, Mapping) or not isinstance(prediction, Mapping):
        log.warning("annotation %s: Label Studio gave no annotation or prediction object", check.annotation_id)
        return
    config = check.label_config
    if config is None and check.project is not None:
        project = api.request("GET", f"/api/projects/{check.project}")
        config = project.get("label_config") if isinstance(project, Mapping) else None
    fields = dict(check.fields)
    fields.update({k: annotation[k] for k in ("result", "updated_at", "was_cancelled") if k in annotation})
    event = {
        "action": "ANNOTATION_UPDATED",
        "annotation": {**fields, "prediction": prediction},
        "task": {"id": check.task if check.task is not None else annotation.get("task")},
        "project": {"id": check.project, "label_config": config},
    }
    result = handle_event(event, rt.store)
    log.info("annotation %s compared with its prediction %s: %s", check.annotation_id, check.prediction_id,
             result.status)  # fmt: skip


@functools.lru_cache(maxsize=4)
def runtime(settings: Settings) -> Runtime:
    return Runtime(settings)


def remaining(deadline: float) -> float | None:
    """Seconds left until ``deadline`` (``time.monotonic()`` time), at least 0; None for no deadline."""
    return None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())


def _device(device: str):
    from ..engine.loading import resolve_device

    return resolve_device(device)


def embedding_identity(s: Settings) -> dict[str, str]:
    """What the teacher's text embeddings depend on besides the label names: architecture (a config file
    by its content), weights, precision, prompt templates, open_clip's version (its tokenizer)."""
    import open_clip

    from ..embeddings import weights_identity
    from ..engine.loading import resolve_dtype
    from ..engine.text import resolve_templates

    arch = s.model
    if s.model.endswith(".json") and Path(s.model).is_file():
        arch = f"{Path(s.model).stem}:{hashlib.sha256(Path(s.model).read_bytes()).hexdigest()[:16]}"
    templates = "\n".join(resolve_templates(s.templates))
    return {
        "architecture": arch,
        "weights": weights_identity(s.pretrained),
        "precision": str(resolve_dtype(s.precision, _device(s.device))),
        "templates": hashlib.sha256(templates.encode()).hexdigest()[:16],
        "open_clip": open_clip.__version__,
    }


@dataclass
class TaskFailure:
    task_id: Any
    reason: str


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, Mapping) else None


def _short(task: Any) -> str:
    """The task's first image reference, shortened, for messages."""
    data = task.get("data") if isinstance(task, Mapping) else None
    url = next((v for v in data.values() if isinstance(v, str)), "") if isinstance(data, Mapping) else ""
    return url if len(url) <= 80 else url[:77] + "..."


def _images_that_fit(deadline: float, per_image: float, wanted: int) -> int:
    """How many of ``wanted`` images the time left until ``deadline`` holds at ``per_image`` seconds each
    (all of them before the first measurement, or without a deadline)."""
    if per_image <= 0 or math.isinf(deadline):
        return wanted
    return max(0, min(wanted, int((deadline - time.monotonic()) / per_image)))


def _unpredicted_first(tasks: Sequence[Any], version: str) -> list[int]:
    """Task indices, those without a prediction of ``version`` (as the request shows them) first: when the
    budget cannot hold every task, the time goes to tasks that have nothing yet."""

    def has_one(task: Any) -> bool:
        preds = task.get("predictions") if isinstance(task, Mapping) else None
        return isinstance(preds, list) and any(isinstance(p, Mapping) and p.get("model_version") == version
                                               for p in preds)  # fmt: skip

    return sorted(range(len(tasks)), key=lambda i: has_one(tasks[i]))


def _size_key(model: Any, opts: Any) -> Callable[[int, int], tuple[int, int]]:
    """(H, W) -> the size the model resizes an image to, which groups images into batches."""
    from ..engine.segmenter import resized_size

    stride = getattr(model, "stride", None) or getattr(getattr(model, "net", None), "stride", 32)
    return lambda h, w: resized_size(
        h, w, opts.short_side, int(stride or 32), opts.size_multiple, opts.max_input_pixels
    )


def _batches(images: list[tuple[int, np.ndarray]], size_of: Callable, batch_size: int) -> list[list]:
    """(task index, image) pairs in batches of at most ``batch_size`` images that resize to the same size,
    groups in order of their first image."""
    groups: dict[tuple[int, int], list] = {}
    for item in images:
        groups.setdefault(size_of(*item[1].shape[:2]), []).append(item)
    size = max(1, batch_size)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


class MaskCLIPBackend:
    """One request's view of the backend (label-studio-ml's ``LabelStudioMLBase`` surface)."""

    def __init__(self, settings: Settings, project: str | None = None, label_config: str | None = None):
        self.settings = settings
        self.project = project
        self.label_config = label_config
        self.rt = runtime(settings)

    # -- setup ---------------------------------------------------------------------------------------
    def spec(self) -> LabelingSpec:
        if not self.label_config:
            raise PredictError("no labeling config in the request ('label_config' or 'schema')")
        return parse_label_config(self.label_config)

    def classes(self, spec: LabelingSpec) -> tuple[list[str], list[tuple[str, ...]]]:
        """(label values, model-side names per label) of the controls on the task's image."""
        vocab = list(dict.fromkeys(v for t in self._targets(spec) for v in t.values))
        return vocab, [spec.names(v) for v in vocab]

    def setup(self) -> dict[str, Any]:
        """Validate the project's labeling config and report the model version served for it. When MaskCLIP
        serves these labels, their text embeddings start being prepared in the background (Label Studio calls
        /setup when the backend is connected and before it asks for predictions), so that /predict finds
        them ready."""
        if not self.label_config:
            return {"model_version": self.rt.student_version() or self.rt.teacher_version()}
        classes = self.classes(self.spec())[1]  # LabelConfigError: what to add
        version, student = self.rt.model_for(classes, load=False)
        if student is None:
            self.rt.prepare_labels(classes)
        return {"model_version": version}

    # -- predict -------------------------------------------------------------------------------------
    def predict(self, tasks: Sequence[Mapping[str, Any]], context: Any = None) -> dict[str, Any]:
        """One entry per task, in order: a prediction dict, or ``[]`` (no prediction: Label Studio asks
        again later) for a task that failed or was not reached, with the reasons under ``errors``. A
        ``context`` with editor regions (interactive prompting) is answered by :meth:`predict_interactive`.

        One deadline, ``MASKCLIP_PREDICT_TIME_BUDGET`` seconds from now, covers everything: waiting for the
        model and the labels' text embeddings, downloads and inference. Images are segmented in batches of
        similar sizes; a batch starts only when the time left can hold it (from the measured time per image),
        so the answer comes within the budget plus at most one batch.
        """
        from ..models import segment_options
        from .regions import prediction

        if isinstance(context, Mapping) and context.get("result"):
            return self.predict_interactive(tasks, context)
        start = time.monotonic()
        deadline = start + self.settings.predict_time_budget
        spec = self.spec()
        targets = self._targets(spec)
        vocab, classes = self.classes(spec)
        version, model = self.rt.model_for(classes, load=False)
        extra: dict[str, Any] = {}
        if model is None:  # MaskCLIP: the model and these labels' text embeddings must be ready in time
            model = self.rt.teacher_within(deadline)
            text = self.rt.labels_within(classes, deadline) if model is not None else None
            if text is None:
                why = (
                    "the model is still loading" if model is None else
                    f"still preparing the labels: the text embeddings of these {len(classes)} labels are being "
                    "computed in the background (once per label set, kept under MODEL_DIR)"
                )  # fmt: skip
                return self._answer(version, [[] for _ in tasks], [
                    TaskFailure(_task_id(t), f"{why}; Label Studio will ask again") for t in tasks
                ], start)  # fmt: skip
            extra["text"] = text
        opts = segment_options(self.settings)
        encode = functools.partial(
            prediction, targets=targets, vocabulary=vocab, model_version=version,
            min_area=self.settings.min_area, polygons=self.settings.polygons,
        )  # fmt: skip
        size_of = _size_key(model, opts)
        results: list[Any] = [[] for _ in tasks]
        failures: dict[int, TaskFailure] = {}
        encoded: list[tuple[int, Any]] = []
        order = _unpredicted_first(tasks, version)
        chunks = [order[i : i + PREDICT_CHUNK] for i in range(0, len(order), PREDICT_CHUNK)]
        pool = ThreadPoolExecutor(max(1, self.settings.fetch_threads), thread_name_prefix="predict")
        try:
            pending = self._fetch_chunk(pool, tasks, chunks[0], spec, deadline) if chunks else []
            for n in range(len(chunks)):
                images = self._decoded(self._gather(pending, failures, deadline), failures, model, tasks)
                if n + 1 < len(chunks):  # the next chunk downloads while this one is segmented
                    pending = self._fetch_chunk(pool, tasks, chunks[n + 1], spec, deadline)
                out_of_time = False
                for batch in _batches(images, size_of, opts.batch_size):
                    fit = _images_that_fit(deadline, self.rt.seconds_per_image(version), len(batch))
                    if fit < len(batch):  # the time left holds only part of the batch (or none of it)
                        out_of_time, batch = True, batch[:fit]
                    if not batch:
                        break
                    began = time.monotonic()
                    batch, segs = self._segment(model, batch, classes, opts, extra, tasks, failures)
                    self.rt.observe(version, len(batch), time.monotonic() - began)
                    # RLE and polygon encoding run in the pool, beside the next batch's inference.
                    encoded += [(i, pool.submit(encode, seg)) for (i, _), seg in zip(batch, segs)]
                    if out_of_time:
                        break
                if len(chunks) > 1:  # progress of a project-sized request, for whoever watches the log
                    done = (n + 1) * PREDICT_CHUNK
                    log.info(
                        "predict: %d/%d tasks in %.1f s", min(done, len(tasks)), len(tasks), time.monotonic() - start
                    )
                if out_of_time:
                    break
            for i, future in encoded:
                results[i] = future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        budget = self.settings.predict_time_budget
        late = [i for i, r in enumerate(results) if not r and i not in failures]
        if late:
            log.warning(
                "predict: time budget of %.0f s reached; %d of %d tasks left without a prediction (Label Studio "
                "will ask again; for large projects run `labelstudio-maskclip preannotate`)", budget, len(late),
                len(tasks),
            )  # fmt: skip
        for i in late:
            failures[i] = TaskFailure(
                _task_id(tasks[i]), f"not reached within the time budget of {budget:g} s "
                "(MASKCLIP_PREDICT_TIME_BUDGET); Label Studio will ask again",
            )  # fmt: skip
        return self._answer(version, results, [failures[i] for i in sorted(failures)], start)

    def _answer(self, version: str, results: list[Any], failures: list[TaskFailure], start: float) -> dict[str, Any]:
        done = sum(1 for r in results if r)
        log.info("predict: %d/%d tasks predicted with %s in %.2f s", done, len(results), version,
                 time.monotonic() - start)  # fmt: skip
        for f in failures[:20]:
            log.warning("predict: task %s: %s", f.task_id, f.reason)
        if len(failures) > 20:
            log.warning("predict: ... and %d more tasks without a prediction", len(failures) - 20)
        return {
            "results": results,
            "model_version": version,
            "errors": [{"task": f.task_id, "error": f.reason} for f in failures],
        }

    def predict_interactive(self, tasks: Sequence[Mapping[str, Any]], context: Mapping[str, Any]) -> dict[str, Any]:
        """One prediction for the one task of an interactive request: the masks of the editor's phrases,
        clicks and boxes (:mod:`.interactive`). Always the MaskCLIP teacher: prompts need its dense
        features and text side. An unusable context or image raises :class:`PredictError` (a 400; Label Studio
        shows the editor its status, the reason is in the body and the log)."""
        from ..engine.prompts import encode_image
        from ..models import segment_options
        from .interactive import ContextError, parse_context, predict_interactive

        if len(tasks) != 1:
            raise PredictError(f"an interactive request carries one task, got {len(tasks)}")
        spec = self.spec()
        try:
            prompts = parse_context(context, spec)
        except ContextError as e:
            raise PredictError(str(e)) from e
        key = spec.image_keys[0]
        url = tasks[0].get("data", {}).get(key) if isinstance(tasks[0], Mapping) else None
        if not isinstance(url, str) or not url:
            raise PredictError(f"the task has no image under data.{key}")
        seg, opts, version = self.rt.teacher, segment_options(self.settings), self.rt.teacher_version()

        def load() -> tuple[Any, int]:
            got = self._load_image(tasks[0], spec, time.monotonic() + self.settings.predict_time_budget)
            if isinstance(got, TaskFailure):
                raise PredictError(f"task {got.task_id}: {got.reason}")
            if not isinstance(got, np.ndarray):
                raise PredictError(f"task {tasks[0].get('id')}: the image did not arrive within the time budget")
            dense = encode_image(seg, got, opts)
            return (got, dense), got.nbytes + dense.nbytes

        start = time.monotonic()
        image, dense = self.rt.features.get((url, version, opts), load)
        regions, notes = predict_interactive(
            seg, image, dense, prompts, spec, key, opts, polygons=self.settings.polygons
        )
        log.info("interactive: task %s, %d prompts -> %d regions in %.0f ms", tasks[0].get("id"), len(prompts),
                 len(regions), 1000 * (time.monotonic() - start))  # fmt: skip
        score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
        result = {"result": regions, "score": round(score, 4), "model_version": version}
        return {
            "results": [result],
            "model_version": version,
            "errors": [{"task": tasks[0].get("id"), "error": n} for n in notes],
        }

    @staticmethod
    def _segment(model, images, classes, opts, extra, tasks, failures: dict[int, TaskFailure]) -> tuple[list, list]:
        """Segment ``images`` ((task index, array) pairs) in one call; when that fails, image by image, so
        one image's failure (out of memory, say) is that task's error. Returns the pairs that succeeded
        and their segmentations; failures go into ``failures`` by task index."""
        try:
            return images, model.segment([img for _, img in images], classes, opts=opts, **extra)
        except Exception as e:
            if len(images) == 1:
                i, img = images[0]
                task_id = _task_id(tasks[i])
                log.exception("predict: task %s (%d x %d image) failed in the model", task_id, *img.shape[:2])
                failures[i] = TaskFailure(task_id, f"the model failed on this image ({type(e).__name__})")
                return [], []
        done: list = []
        segs: list = []
        for pair in images:
            ok, seg = MaskCLIPBackend._segment(model, [pair], classes, opts, extra, tasks, failures)
            done += ok
            segs += seg
        return done, segs

    @staticmethod
    def _targets(spec: LabelingSpec):
        """Controls on the first image of the config (one image per task is predicted)."""
        return [t for t in spec.targets if t.image_key == spec.image_keys[0]]

    def _fetch_chunk(self, pool, tasks, chunk, spec, deadline: float):
        raw = self._device_decode
        return [(i, pool.submit(self._load_image, tasks[i], spec, deadline, raw)) for i in chunk]

    @functools.cached_property
    def _device_decode(self) -> bool:
        """JPEGs are decoded on the GPU when the model runs on one (labelstudio.jpeg)."""
        return _device(self.settings.device).type == "cuda"

    def _decoded(self, images: list, failures: dict[int, TaskFailure], model: Any, tasks) -> list:
        """Decode the JPEG bytes among ``images`` on the model's device in one batch; what that path does not
        take is decoded on the CPU (a failure goes to ``failures``)."""
        from .images import ImageError, decode_image
        from .jpeg import decode_jpegs

        raw = [k for k, (_, got) in enumerate(images) if isinstance(got, bytes)]
        if not raw:
            return images
        device = getattr(model, "device", None) or _device(self.settings.device)
        limit = self.settings.max_image_pixels
        on_device = decode_jpegs([images[k][1] for k in raw], device, max_pixels=limit)
        out = list(images)
        for k, tensor in zip(raw, on_device):
            i, data = images[k]
            try:
                out[k] = (i, tensor if tensor is not None else decode_image(data, max_pixels=limit))
            except ImageError as e:
                failures[i] = TaskFailure(_task_id(tasks[i]), f"{_short(tasks[i])}: {e}")
                out[k] = None
        return [item for item in out if item is not None]

    @staticmethod
    def _gather(pending, failures: dict[int, TaskFailure], deadline: float) -> list[tuple[int, np.ndarray]]:
        """The chunk's images that arrived by ``deadline``; failed tasks go to ``failures`` (tasks whose
        download was not started or not finished in time are left out: the deadline's reason covers them)."""
        images = []
        for i, future in pending:
            try:
                got = future.result(timeout=remaining(deadline))
            except TimeoutError:
                continue
            if isinstance(got, TaskFailure):
                failures[i] = got
            elif got is not None:
                images.append((i, got))
        return images

    def _load_image(
        self, task: Mapping[str, Any], spec: LabelingSpec, deadline: float, raw: bool = False
    ) -> np.ndarray | bytes | TaskFailure | None:
        """The task's image; a TaskFailure saying why not; None when the deadline passed before the download
        started (the task is left for Label Studio's next request). ``raw``: JPEG files come back as their
        bytes, for decoding on the GPU."""
        from .images import ImageError

        task_id = _task_id(task)
        if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
            return TaskFailure(task_id, "task has no 'data' object")
        key = spec.image_keys[0]
        url = task["data"].get(key)
        if not isinstance(url, str) or not url:
            return TaskFailure(task_id, f"task data has no image under '{key}' (keys: {sorted(task['data'])[:10]})")
        if time.monotonic() >= deadline:
            return None
        try:
            return self._fetch(url, task_id, deadline, raw)
        except ImageError as e:
            return TaskFailure(task_id, str(e))

    def _fetch(self, url: str, task_id: Any, deadline: float, raw: bool = False) -> np.ndarray | bytes:
        """Download and decode (``raw``: a JPEG's bytes, undecoded); the request's deadline goes down to a
        fetcher that takes one (``deadline=``, ``time.monotonic()`` seconds), so that a slow download ends with
        the request."""
        from .jpeg import is_jpeg

        fetcher = self.rt.fetcher
        limit = None if math.isinf(deadline) else deadline
        if not raw:
            return fetcher.load(url, task_id, max_pixels=self.settings.max_image_pixels, deadline=limit)
        data = fetcher.fetch(url, task_id, deadline=limit)
        if is_jpeg(data):
            return data
        from .images import decode_image

        return decode_image(data, max_pixels=self.settings.max_image_pixels)

    # -- fit (webhooks) ------------------------------------------------------------------------------
    def _parent_prediction_check(self, data: Mapping[str, Any]) -> ParentPredictionCheck | None:
        """The follow-up for an annotation started from a prediction that the payload does not carry
        (Label Studio's webhooks usually don't): its outcome per label needs the prediction from the API.
        None when there is nothing to fetch (or no Label Studio to fetch it from)."""
        from ..learning.webhooks import label_studio_id

        ann = data.get("annotation")
        if not isinstance(ann, Mapping) or not self.settings.label_studio_url:
            return None
        annotation_id, prediction_id = label_studio_id(ann.get("id")), label_studio_id(ann.get("parent_prediction"))
        seen = ann.get("prediction")
        if (
            annotation_id is None
            or prediction_id is None
            or (isinstance(seen, Mapping) and isinstance(seen.get("result"), list))
        ):
            return None
        project = _mapping(data.get("project"))
        config = project.get("label_config")
        return ParentPredictionCheck(
            annotation_id=annotation_id,
            prediction_id=prediction_id,
            task=label_studio_id(data.get("task")) or label_studio_id(ann.get("task")),
            project=label_studio_id(project.get("id")),
            label_config=config if isinstance(config, str) and len(config) <= _MAX_KEPT_CONFIG else None,
            fields={k: v for k, v in ann.items() if k in _KEPT_FIELDS and _small(v)},
        )

    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Store what a webhook carries; start training (in another process) when a trigger fires:
        ``START_TRAINING``, every ``MASKCLIP_TRAIN_EVERY_N`` new annotations, or the interval rule."""
        from ..learning.trigger import maybe_interval, request_training, should_train
        from ..learning.webhooks import handle_event

        result = handle_event(data, self.rt.store)
        reply: dict[str, Any] = {"action": event, "status": result.status}
        check = self._parent_prediction_check(data) if result.status == "stored" else None
        if check is not None:
            self.rt.followups.submit(check.annotation_id, check, f"annotation {check.annotation_id} vs its prediction")
        if result.rejected:
            reply["rejected"] = result.rejected
        project = _mapping(data.get("project"))
        kwargs: dict[str, Any] = {"project": project.get("id")}
        config = project.get("label_config")
        if config:
            try:
                kwargs["values"], kwargs["classes"] = self.classes(parse_label_config(config))
            except ValueError as e:
                log.warning("webhook: labeling config unusable for training (%s)", e)
        started = None
        if result.train_requested:
            started = request_training(self.settings, "START_TRAINING", **kwargs)
        elif result.status == "stored" and should_train(self.settings, self.rt.store, kwargs["project"]):
            started = request_training(self.settings, f"{self.settings.train_every_n} new annotations", **kwargs)
        elif result.status == "stored":
            started = maybe_interval(self.settings, self.rt.store, **kwargs) or None
        if started is not None:
            reply["training"] = "started" if started else "already running"
        return reply
