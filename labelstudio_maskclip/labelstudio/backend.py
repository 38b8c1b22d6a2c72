"""The ML backend: ``setup``, ``predict`` and ``fit`` with label-studio-ml's names, pure of HTTP.

Label Studio's convention builds a backend object per request; everything heavy (the CLIP teacher, the
promoted student, the image fetcher, the store) lives in a process-level :class:`Runtime`, built once per
process and settings. Training never runs here: ``fit`` stores the webhook's masks and, when a trigger
fires, starts the trainer as a separate process.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..engine.names import ClassNames
from ..settings import Settings
from .labeling import LabelingSpec, parse_label_config

if TYPE_CHECKING:
    from ..engine.segmenter import Segmentation, SegmentOptions
    from ..learning.store import Store
    from ..training.student import StudentModel
    from .images import ImageFetcher

__all__ = ["MaskCLIPBackend", "Runtime", "runtime", "PredictError", "Segmenter"]

log = logging.getLogger(__name__)

PREDICT_CHUNK = 64  # tasks fetched and segmented together; bounds memory for project-sized requests


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
    _background: ThreadPoolExecutor | None = None  # one thread for webhook follow-ups (Label Studio API calls)

    def background(self, fn, *args) -> None:
        """Run ``fn(*args)`` after the webhook has been answered (one worker thread, errors logged)."""
        with self._lock:
            if self._background is None:
                self._background = ThreadPoolExecutor(1, thread_name_prefix="webhook-followup")

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("webhook follow-up %s failed", getattr(fn, "__name__", fn))

        self._background.submit(run)

    @property
    def fetcher(self) -> ImageFetcher:
        with self._lock:
            if self._fetcher is None:
                from .images import ImageFetcher

                self._fetcher = ImageFetcher.from_settings(self.settings)
            return self._fetcher

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                from ..learning.store import Store

                self._store = Store(Path(self.settings.model_dir))
            return self._store

    @property
    def teacher(self) -> Segmenter:
        from ..models import shared_maskclip

        return shared_maskclip(self.settings)

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
        if student is not None:
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
                    model = load_student(current_checkpoint(Path(self.settings.model_dir)), self.settings.device)
                    log.info("serving student %s for labels %s", version, model.labels)
                except Exception as e:  # a damaged file must not take serving down
                    log.error("student %s cannot be loaded (%s): serving MaskCLIP; `labelstudio-maskclip "
                              "rollback` picks another version", version, e)  # fmt: skip
                    model = None
                self._student = (version, model)
            return self._student[1]


@functools.lru_cache(maxsize=4)
def runtime(settings: Settings) -> Runtime:
    return Runtime(settings)


@dataclass
class TaskFailure:
    task_id: Any
    reason: str


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
        """Validate the project's labeling config and report the model version served for it."""
        if not self.label_config:
            return {"model_version": self.rt.student_version() or self.rt.teacher_version()}
        version, _ = self.rt.model_for(self.classes(self.spec())[1], load=False)  # LabelConfigError: what to add
        return {"model_version": version}

    # -- predict -------------------------------------------------------------------------------------
    def predict(self, tasks: Sequence[Mapping[str, Any]], context: Any = None) -> dict[str, Any]:
        """One entry per task, in order: a prediction dict, or ``[]`` (no prediction: Label Studio asks
        again later) for a task that failed, with the reasons under ``errors``."""
        from ..models import segment_options
        from .regions import prediction

        spec = self.spec()
        targets = self._targets(spec)
        vocab, classes = self.classes(spec)
        version, model = self.rt.model_for(classes)
        assert model is not None  # load=True: the student or the teacher
        opts = segment_options(self.settings)
        results: list[Any] = [[] for _ in tasks]
        failures: list[TaskFailure] = []
        start = time.monotonic()
        chunks = [range(i, min(i + PREDICT_CHUNK, len(tasks))) for i in range(0, len(tasks), PREDICT_CHUNK)]
        with ThreadPoolExecutor(max(1, self.settings.fetch_threads)) as pool:
            pending = self._fetch_chunk(pool, tasks, chunks[0], spec) if chunks else None
            for n, chunk in enumerate(chunks):
                loaded = [(i, f.result()) for i, f in pending]
                if n + 1 < len(chunks):  # overlap the next chunk's downloads with this chunk's inference
                    pending = self._fetch_chunk(pool, tasks, chunks[n + 1], spec)
                images = []
                for i, got in loaded:
                    if isinstance(got, TaskFailure):
                        failures.append(got)
                    else:
                        images.append((i, got))
                if images:
                    segs = model.segment([img for _, img in images], classes, opts=opts)
                    encode = functools.partial(
                        prediction, targets=targets, vocabulary=vocab, model_version=version,
                        min_area=self.settings.min_area, polygons=self.settings.polygons,
                    )  # fmt: skip
                    # RLE and polygon encoding run in the pool, beside the next chunk's downloads.
                    for (i, _), pred in zip(images, pool.map(encode, segs)):
                        results[i] = pred
                elapsed = time.monotonic() - start
                if len(chunks) > 1:  # progress of a project-sized request, for whoever watches the log
                    log.info("predict: %d/%d tasks in %.1f s", chunk.stop, len(tasks), elapsed)
                if n + 1 < len(chunks) and elapsed > self.settings.predict_time_budget:
                    left = sum(len(c) for c in chunks[n + 1 :])
                    log.warning(
                        "predict: time budget of %.0f s used after %d tasks; %d tasks left without a prediction "
                        "(Label Studio will ask again; for large projects run `labelstudio-maskclip preannotate`)",
                        self.settings.predict_time_budget, chunk.stop, left,
                    )  # fmt: skip
                    failures.append(TaskFailure(None, f"{left} tasks skipped: time budget reached"))
                    break
        done = sum(1 for r in results if r)
        log.info(
            "predict: %d/%d tasks predicted with %s in %.2f s", done, len(tasks), version, time.monotonic() - start
        )
        for f in failures:
            log.warning("predict: task %s: %s", f.task_id, f.reason)
        return {
            "results": results,
            "model_version": version,
            "errors": [{"task": f.task_id, "error": f.reason} for f in failures],
        }

    @staticmethod
    def _targets(spec: LabelingSpec):
        """Controls on the first image of the config (one image per task is predicted)."""
        return [t for t in spec.targets if t.image_key == spec.image_keys[0]]

    def _fetch_chunk(self, pool, tasks, chunk, spec):
        return [(i, pool.submit(self._load_image, tasks[i], spec)) for i in chunk]

    def _load_image(self, task: Mapping[str, Any], spec: LabelingSpec) -> np.ndarray | TaskFailure:
        from .images import ImageError

        task_id = task.get("id") if isinstance(task, Mapping) else None
        if not isinstance(task, Mapping) or not isinstance(task.get("data"), Mapping):
            return TaskFailure(task_id, "task has no 'data' object")
        key = spec.image_keys[0]
        url = task["data"].get(key)
        if not isinstance(url, str) or not url:
            return TaskFailure(task_id, f"task data has no image under '{key}' (keys: {sorted(task['data'])[:10]})")
        try:
            return self.rt.fetcher.load(url, task_id, max_pixels=self.settings.max_image_pixels)
        except ImageError as e:
            return TaskFailure(task_id, str(e))

    # -- fit (webhooks) ------------------------------------------------------------------------------
    def _parent_prediction_unseen(self, data: Mapping[str, Any]) -> bool:
        """The annotation started from a prediction that the payload does not carry (Label Studio's
        webhooks usually don't): its outcome per label needs the prediction from the API."""
        ann = data.get("annotation")
        if not isinstance(ann, Mapping) or not isinstance(ann.get("parent_prediction"), int):
            return False
        seen = ann.get("prediction")
        return not (isinstance(seen, Mapping) and isinstance(seen.get("result"), list)) and bool(
            self.settings.label_studio_url
        )

    def _with_parent_prediction(self, data: Mapping[str, Any]) -> None:
        """Background: fetch the parent prediction and store the annotation again with it, which records
        per-label outcomes (unchanged / edited / deleted). An update that arrived meanwhile wins (stale)."""
        from ..learning.webhooks import handle_event
        from .api import LabelStudioAPI

        ann = data["annotation"]
        prediction = LabelStudioAPI(self.rt.fetcher).request("GET", f"/api/predictions/{ann['parent_prediction']}")
        result = handle_event({**data, "annotation": {**ann, "prediction": prediction}}, self.rt.store)
        log.info("annotation %s compared with its prediction %s: %s", ann.get("id"), ann["parent_prediction"],
                 result.status)  # fmt: skip

    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Store what a webhook carries; start training (in another process) when a trigger fires:
        ``START_TRAINING``, every ``MASKCLIP_TRAIN_EVERY_N`` new annotations, or the interval rule."""
        from ..learning.trigger import maybe_interval, request_training, should_train
        from ..learning.webhooks import handle_event

        result = handle_event(data, self.rt.store)
        reply: dict[str, Any] = {"action": event, "status": result.status}
        if result.status == "stored" and self._parent_prediction_unseen(data):
            self.rt.background(self._with_parent_prediction, data)
        if result.rejected:
            reply["rejected"] = result.rejected
        project = data.get("project") if isinstance(data.get("project"), Mapping) else {}
        kwargs: dict[str, Any] = {"project": project.get("id")}
        config = project.get("label_config")
        if config:
            try:
                kwargs["classes"] = self.classes(parse_label_config(config))[1]
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
