"""The ML backend: ``setup``, ``predict`` and ``fit`` with label-studio-ml's names, pure of HTTP.

Label Studio's convention builds a backend object per request; everything heavy (the CLIP teacher, the
promoted student, the image fetcher, the store) lives in the process-level :class:`~.runtime.Runtime`, built
once per process and settings. Training never runs here: ``fit`` stores the webhook's masks and, when a trigger
fires, starts the trainer as a separate process.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin only from Python 3.11
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..deadline import Deadline
from ..engine.names import name_owners, normalize_classes
from ..errors import BadInput
from ..fetching.images import ImageError, decode_image
from ..labelstudio.labeling import LabelingSpec, parse_label_config
from ..labelstudio.webhooks import handle_event, label_studio_id
from ..models import segment_options
from ..settings import Settings
from ..training.trigger import maybe_interval, request_training, should_train
from .followups import ParentPredictionCheck, kept_config, kept_fields
from .runtime import Runtime, Segmenter, resolved_device, runtime

if TYPE_CHECKING:
    from ..engine.segmenter import Segmentation, SegmentOptions

__all__ = ["MaskCLIPBackend", "Runtime", "runtime", "PredictError", "Segmenter"]  # the runtime re-exported

log = logging.getLogger(__name__)

PREDICT_CHUNK = 64  # tasks fetched ahead of inference; bounds memory for project-sized requests


class PredictError(BadInput):
    """The whole /predict request is unusable (e.g. a labeling config without a usable control)."""


@dataclass
class TaskFailure:
    task_id: Any
    reason: str


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, Mapping) else None


_JSON_TYPES = {str: "string", list: "array", int: "number", float: "number", bool: "boolean"}


def _image_url(task: Any, key: str) -> str | TaskFailure:
    """The task's image reference under ``data[key]``, or a TaskFailure saying what is missing: ``task`` and its
    ``data`` come from the request body and may be any JSON value."""
    task_id = _task_id(task)
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        got = "" if data is None else f" (got a JSON {_JSON_TYPES.get(type(data), type(data).__name__)})"
        return TaskFailure(task_id, f"task has no 'data' object{got}")
    url = data.get(key)
    if not isinstance(url, str) or not url:
        keys = sorted(str(k) for k in data)[:10]
        return TaskFailure(task_id, f"task data has no image under '{key}' (keys: {keys})")
    return url


def _short(task: Any) -> str:
    """The task's first image reference, shortened, for messages."""
    data = task.get("data") if isinstance(task, Mapping) else None
    url = next((v for v in data.values() if isinstance(v, str)), "") if isinstance(data, Mapping) else ""
    return url if len(url) <= 80 else url[:77] + "..."


def _images_that_fit(deadline: Deadline, per_image: float, wanted: int) -> int:
    """How many of ``wanted`` images the time left until ``deadline`` holds at ``per_image`` seconds each
    (all of them before the first measurement, or without a deadline)."""
    left = deadline.remaining()
    if per_image <= 0 or left is None:
        return wanted
    return max(0, min(wanted, int(left / per_image)))


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

    stride = int(getattr(model, "stride", None) or getattr(getattr(model, "net", None), "stride", None) or 32)
    return lambda h, w: resized_size(h, w, opts.short_side, stride, opts.size_multiple, opts.max_input_pixels)


def _batches(images: list[tuple[int, np.ndarray]], size_of: Callable, batch_size: int) -> list[list]:
    """(task index, image) pairs in batches of at most ``batch_size`` images that resize to the same size,
    groups in order of their first image."""
    groups: dict[tuple[int, int], list] = {}
    for item in images:
        groups.setdefault(size_of(*item[1].shape[:2]), []).append(item)
    size = max(1, batch_size)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _note_kind(note: str, kind: str) -> str:
    """The ``/metrics`` counter of an interactive note."""
    if "still being encoded" in note:
        return "phrase still encoding"
    if note.startswith("phrase"):
        return "phrase found nothing"
    if note.startswith("box"):
        return "box found nothing"
    return kind


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
        vocab = list(dict.fromkeys(v for t in spec.predicted_targets for v in t.values))
        return vocab, [spec.names(v) for v in vocab]

    def setup(self) -> dict[str, Any]:
        """Validate the project's labeling config and report the model version served for it. The teacher's
        text embeddings of these labels (and of the background words interactive phrases compete with) start
        being prepared in the background (Label Studio calls /setup when the backend is connected and before
        it asks for predictions), so that /predict and interactive prompts find them ready."""
        from .interactive import BACKGROUND_WORDS

        if not self.label_config:
            return {"model_version": self.rt.student_version() or self.rt.teacher_version()}
        classes = self.classes(self.spec())[1]  # LabelConfigError: what to add
        version = self.rt.model_for(classes, load=False)[0]
        # Interactive prompts always use the teacher: its text for these labels is prepared even when a
        # student serves /predict, with the background words phrases compete with.
        self.rt.prepare_labels([(w,) for w in BACKGROUND_WORDS])
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
        from ..labelstudio.regions import prediction

        if isinstance(context, Mapping) and context.get("result"):
            return self.predict_interactive(tasks, context)
        start = time.monotonic()
        deadline = Deadline(start + self.settings.predict_time_budget)
        spec = self.spec()
        vocab, classes = self.classes(spec)
        version, model, extra, why = self._ready_model(classes, deadline)
        if why is not None:
            return self._answer(version, [[] for _ in tasks], [
                TaskFailure(_task_id(t), f"{why}; Label Studio will ask again") for t in tasks
            ], start)  # fmt: skip
        opts = segment_options(self.settings)
        encode = functools.partial(
            prediction, targets=spec.predicted_targets, vocabulary=vocab, model_version=version,
            min_area=self.settings.min_area, polygons=self.settings.polygons,
        )  # fmt: skip
        results: list[Any] = [[] for _ in tasks]
        failures: dict[int, TaskFailure] = {}
        encoded: list[tuple[int, Any]] = []
        order = _unpredicted_first(tasks, version)
        chunks = [order[i : i + PREDICT_CHUNK] for i in range(0, len(order), PREDICT_CHUNK)]
        pool = ThreadPoolExecutor(self.settings.fetch_threads, thread_name_prefix="predict")
        try:
            pending = self._fetch_chunk(pool, tasks, chunks[0], spec, deadline) if chunks else []
            for n in range(len(chunks)):
                images = self._decoded(self._gather(pending, failures, deadline), failures, model, tasks)
                if n + 1 < len(chunks):  # the next chunk downloads while this one is segmented
                    pending = self._fetch_chunk(pool, tasks, chunks[n + 1], spec, deadline)
                # RLE and polygon encoding run in the pool, beside the next batch's inference.
                out_of_time = self._segment_in_time(model, images, classes, opts, extra, tasks, failures, version,
                                                    deadline, lambda i, seg: encoded.append((i, pool.submit(encode, seg))))  # fmt: skip
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
        self._mark_late(tasks, results, failures)
        return self._answer(version, results, [failures[i] for i in sorted(failures)], start)

    def _ready_model(
        self, classes: list[tuple[str, ...]], deadline: Deadline
    ) -> tuple[str, Any, dict[str, Any], str | None]:
        """(version, model, extra arguments, None) for the served model, or (version, None, {}, why) when
        MaskCLIP or these labels' text embeddings are not ready by ``deadline``."""
        version, model = self.rt.model_for(classes, load=False)
        if model is not None:  # the student: ready when loaded
            return version, model, {}, None
        model = self.rt.teacher_within(deadline)
        text = self.rt.labels_within(classes, deadline) if model is not None else None
        if text is None:
            why = (
                "the model is still loading" if model is None else
                f"still preparing the labels: the text embeddings of these {len(classes)} labels are being "
                "computed in the background (once per label set, kept under MODEL_DIR)"
            )  # fmt: skip
            return version, None, {}, why
        return version, model, {"text": text}, None

    def _segment_in_time(
        self,
        model: Any,
        images: list[tuple[int, Any]],
        classes: list[tuple[str, ...]],
        opts: SegmentOptions,
        extra: dict[str, Any],
        tasks: Sequence[Any],
        failures: dict[int, TaskFailure],
        version: str,
        deadline: Deadline,
        done: Callable[[int, Segmentation], None],
    ) -> bool:
        """Segment ``images`` (task index, image) in batches of similar sizes, each started only when the time
        left holds it; ``done(task index, segmentation)`` after each batch. True when the time ran out first."""
        for batch in _batches(images, _size_key(model, opts), opts.batch_size):
            fit = _images_that_fit(deadline, self.rt.seconds_per_image(version), len(batch))
            if fit:
                began = time.monotonic()
                ok, segs = self._segment(model, batch[:fit], classes, opts, extra, tasks, failures)
                self.rt.observe(version, len(ok), time.monotonic() - began)
                for (i, _), seg in zip(ok, segs):
                    done(i, seg)
            if fit < len(batch):  # the time left held only part of this batch (or none of it)
                return True
        return False

    def _mark_late(self, tasks: Sequence[Any], results: list[Any], failures: dict[int, TaskFailure]) -> None:
        """Tasks neither predicted nor failed were not reached in time: a failure each, saying so."""
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
        shows the editor its status, the reason is in the body and the log).

        One deadline, ``MASKCLIP_PREDICT_TIME_BUDGET`` seconds from now, bounds the waits for the model, the
        labels' text embeddings (prepared at ``/setup``), a new phrase's text pass and the image download;
        past it the answer is a 200 without masks whose note says why (:meth:`_interactive_answer`).
        """
        from .interactive import ContextError, PromptText, TextPrompt, predict_interactive

        start = time.monotonic()
        deadline = Deadline(start + self.settings.predict_time_budget)
        spec = self.spec()
        prompts, key, url = self._interactive_request(tasks, context, spec)
        version = self.rt.teacher_version()
        vocab, classes = self.classes(spec)
        seg, labels, background, kind = self._interactive_text(classes, deadline)
        if seg is None or labels is None or background is None:
            why = ("the model is still loading" if seg is None else
                   f"still preparing the text of the project's {len(classes)} labels (started when the model "
                   "was connected; once per label set, kept under MODEL_DIR)")  # fmt: skip
            return self._interactive_answer(tasks[0], version, [], [f"no mask yet: {why}; try again in a moment"],
                                            start, kind, len(prompts))  # fmt: skip
        phrases = [p for prompt in prompts if isinstance(prompt, TextPrompt) for p in prompt.phrases]
        embedded = {p: emb[0] for p in phrases if (emb := self.rt.phrase_within(p, deadline)) is not None}
        opts = segment_options(self.settings)
        image, dense = self._interactive_features(seg, tasks[0], spec, url, version, opts, deadline)
        text = PromptText(vocab, labels, name_owners(normalize_classes(classes)), background, embedded)
        try:
            regions, notes = predict_interactive(
                seg, image, dense, prompts, spec, key, opts, text, polygons=self.settings.polygons,
                compute_dtype=self.rt.interactive_dtype,
            )  # fmt: skip
        except ContextError as e:
            raise PredictError(str(e)) from e
        return self._interactive_answer(tasks[0], version, regions, notes, start, "nothing found", len(prompts))

    def _interactive_request(
        self, tasks: Sequence[Mapping[str, Any]], context: Mapping[str, Any], spec: LabelingSpec
    ) -> tuple[list[Any], str, str]:
        """(prompts, image key, image URL) of an interactive request; PredictError (400) when unusable."""
        from .interactive import ContextError, parse_context

        if len(tasks) != 1:
            raise PredictError(f"an interactive request carries one task, got {len(tasks)}")
        try:
            prompts = parse_context(context, spec)
        except ContextError as e:
            raise PredictError(str(e)) from e
        key = spec.image_keys[0]
        url = _image_url(tasks[0], key)
        if isinstance(url, TaskFailure):
            has_data = isinstance(_mapping(tasks[0]).get("data"), Mapping)
            raise PredictError(f"the task has no image under data.{key}" if has_data else url.reason)
        return prompts, key, url

    def _interactive_text(self, classes: list[tuple[str, ...]], deadline: Deadline) -> tuple[Any, Any, Any, str]:
        """(teacher, label embeddings, background embeddings, what is missing) within ``deadline``; a None
        for what is not ready in time ("model loading" or "labels preparing")."""
        from .interactive import BACKGROUND_WORDS

        seg = self.rt.teacher_within(deadline)
        labels = self.rt.labels_within(classes, deadline) if seg is not None else None
        background = self.rt.labels_within([(w,) for w in BACKGROUND_WORDS], deadline) if labels is not None else None
        return seg, labels, background, "model loading" if seg is None else "labels preparing"

    def _interactive_features(
        self,
        seg: Any,
        task: Mapping[str, Any],
        spec: LabelingSpec,
        url: str,
        version: str,
        opts: Any,
        deadline: Deadline,
    ) -> tuple[np.ndarray, Any]:
        """(image, dense features) of the task's image, from this worker's feature cache or loaded now."""
        from ..engine.prompts import encode_image

        def load() -> tuple[Any, int]:
            got = self._load_image(task, spec, deadline)
            if isinstance(got, TaskFailure):
                raise PredictError(f"task {got.task_id}: {got.reason}")
            if not isinstance(got, np.ndarray):
                raise PredictError(f"task {_task_id(task)}: the image did not arrive within the time budget")
            dense = encode_image(seg, got, opts, self.rt.interactive_dtype)
            return (got, dense), got.nbytes + dense.nbytes

        # Per project: another project's task with the same URI passes Label Studio's own access check first.
        return self.rt.features.get((self.project, url, version, opts), load)

    def _interactive_answer(
        self,
        task: Mapping[str, Any],
        version: str,
        regions: list,
        notes: list[str],
        start: float,
        kind: str,
        prompts: int,
    ) -> dict[str, Any]:
        """The reply to an interactive request. Notes (why a prompt has no mask) go where people look: on the
        prediction the editor receives (``notes``), in ``errors``, in the log, and counted in ``/metrics``."""
        log.info("interactive: task %s, %d prompts -> %d regions in %.0f ms", task.get("id"), prompts, len(regions),
                 1000 * (time.monotonic() - start))  # fmt: skip
        for note in notes:
            log.warning("interactive note: task %s: %s", task.get("id"), note)
            self.rt.note_interactive(_note_kind(note, kind))
        score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
        result: dict[str, Any] = {"result": regions, "score": round(score, 4), "model_version": version}
        if notes:
            result["notes"] = notes
        return {
            "results": [result],
            "model_version": version,
            "errors": [{"task": task.get("id"), "error": n} for n in notes],
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

    def _fetch_chunk(self, pool, tasks, chunk, spec, deadline: Deadline):
        raw = self._device_decode
        return [(i, pool.submit(self._load_image, tasks[i], spec, deadline, raw)) for i in chunk]

    @functools.cached_property
    def _device_decode(self) -> bool:
        """JPEGs are decoded on the GPU when the model runs on one (fetching.jpeg)."""
        return resolved_device(self.settings.device).type == "cuda"

    def _decoded(self, images: list, failures: dict[int, TaskFailure], model: Any, tasks) -> list:
        """Decode the JPEG bytes among ``images`` on the model's device in one batch; what that path does not
        take is decoded on the CPU (a failure goes to ``failures``)."""
        from ..fetching.jpeg import decode_jpegs

        raw = [k for k, (_, got) in enumerate(images) if isinstance(got, bytes)]
        if not raw:
            return images
        device = getattr(model, "device", None) or resolved_device(self.settings.device)
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
    def _gather(pending, failures: dict[int, TaskFailure], deadline: Deadline) -> list[tuple[int, np.ndarray]]:
        """The chunk's images that arrived by ``deadline``; failed tasks go to ``failures`` (tasks whose
        download was not started or not finished in time are left out: the deadline's reason covers them)."""
        images = []
        for i, future in pending:
            try:
                got = future.result(timeout=deadline.remaining())
            except FutureTimeout:
                continue
            if isinstance(got, TaskFailure):
                failures[i] = got
            elif got is not None:
                images.append((i, got))
        return images

    def _load_image(
        self, task: Mapping[str, Any], spec: LabelingSpec, deadline: Deadline, raw: bool = False
    ) -> np.ndarray | bytes | TaskFailure | None:
        """The task's image; a TaskFailure saying why not; None when the deadline passed before the download
        started (the task is left for Label Studio's next request). ``raw``: JPEG files come back as their
        bytes, for decoding on the GPU."""
        task_id = _task_id(task)
        url = _image_url(task, spec.image_keys[0])
        if isinstance(url, TaskFailure):
            return url
        if deadline.expired():
            return None
        try:
            return self._fetch(url, task_id, deadline, raw)
        except ImageError as e:
            return TaskFailure(task_id, str(e))

    def _fetch(self, url: str, task_id: Any, deadline: Deadline, raw: bool) -> np.ndarray | bytes:
        """Download and decode (``raw``: a JPEG's bytes, undecoded); the request's deadline goes down to the
        fetcher, so that a slow download ends with the request."""
        from ..fetching.jpeg import is_jpeg

        fetcher = self.rt.fetcher
        if not raw:
            return fetcher.load(url, task_id, max_pixels=self.settings.max_image_pixels, deadline=deadline)
        data = fetcher.fetch(url, task_id, deadline=deadline)
        if is_jpeg(data):
            return data

        return decode_image(data, max_pixels=self.settings.max_image_pixels)

    # -- fit (webhooks) ------------------------------------------------------------------------------
    def _parent_prediction_check(self, data: Mapping[str, Any]) -> ParentPredictionCheck | None:
        """The follow-up for an annotation started from a prediction that the payload does not carry
        (Label Studio's webhooks usually don't): its outcome per label needs the prediction from the API.
        None when there is nothing to fetch (or no Label Studio to fetch it from)."""
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
            label_config=kept_config(config),
            fields=kept_fields(ann),
        )

    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Store what a webhook carries; start training (in another process) when a trigger fires:
        ``START_TRAINING``, every ``MASKCLIP_TRAIN_EVERY_N`` new annotations, or the interval rule."""
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
