"""The process-wide runtime of the backend: heavy objects built once per process and settings.

Label Studio's convention builds a backend object per request (:mod:`.backend`); what is heavy lives here,
created lazily: the CLIP teacher (loaded in the background, waited for within a request's deadline), its
text embeddings (prepared in the background, kept under ``MODEL_DIR``), the promoted student, the image
fetcher, the annotation store, the webhook follow-up queue and the interactive feature cache; and the
measured time per image that the request deadline plans with.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..deadline import NO_DEADLINE, Deadline
from ..engine.names import ClassNames
from ..fetching.images import ImageFetcher
from ..learning.store import Store, shared_store
from ..models import (
    embedding_identity,
    pipeline_description,
    segment_options,
    shared_maskclip,
    text_embedding_store,
    text_width,
)
from ..settings import Settings
from ..training.checkpoints import checkpoint_path, current_version
from .followups import FollowUps, record_parent_prediction

if TYPE_CHECKING:
    from ..engine.segmenter import MaskCLIP, Segmentation, SegmentOptions
    from ..fetching.images import ImageFetcher
    from ..learning.store import Store
    from ..training.student import StudentModel

__all__ = [
    "Runtime", "runtime", "Segmenter", "resolved_device",
    "WARMUP_LABELS",
]  # fmt: skip

log = logging.getLogger(__name__)

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
    _phrases: Any = None  # EmbeddingStore of typed phrases (interactive), a short template set
    interactive_notes: dict[str, int] = field(default_factory=dict)  # why interactive answers had no mask
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
                self._followups = FollowUps(functools.partial(record_parent_prediction, self))
            return self._followups

    @property
    def fetcher(self) -> ImageFetcher:
        with self._lock:
            if self._fetcher is None:
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
                # a PostgreSQL store: the process's one (the served-version pointer reads it too)
                self._store = shared_store(self.settings) or Store.from_settings(self.settings)
            return self._store

    def store_damage(self) -> str:
        """What is wrong with the store and how to recover; "" when intact or not opened yet (not opened
        here: opening checks the whole file)."""
        store = self._store
        return store.damage_message() if store is not None else ""

    @property
    def teacher(self) -> MaskCLIP:
        """The MaskCLIP teacher, loaded here if needed (blocking; see :meth:`teacher_within`)."""
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

    def teacher_within(self, deadline: Deadline = NO_DEADLINE):
        """The teacher if it is loaded by ``deadline`` (``time.monotonic()`` seconds; inf: wait as long as it
        takes), else None. Raises what loading raised."""
        self.start_teacher()
        if not self._teacher_ready.wait(deadline.remaining()):
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
                self._embeddings = text_embedding_store(self.settings, self._encode_labels)
            return self._embeddings

    def _encode_labels(self, labels) -> Any:
        return self.teacher.name_embeddings(labels)  # one row per name: the preset merges synonyms

    @property
    def phrases(self):
        """The :class:`~labelstudio_maskclip.embeddings.EmbeddingStore` of typed phrases: one short text pass
        per phrase (:data:`~.interactive.PHRASE_TEMPLATES`), kept on disk per phrase and model, computed in a
        thread of its own so that a phrase never queues behind a project's label set."""
        with self._lock:
            if self._phrases is None:
                from ..embeddings import EmbeddingStore
                from .interactive import PHRASE_TEMPLATES

                s = self.settings
                identity = dict(embedding_identity(s), templates="phrases:" + "|".join(PHRASE_TEMPLATES))
                self._phrases = EmbeddingStore(
                    Path(s.model_dir) / "text_embeddings" / "phrases", identity,
                    lambda names: self.teacher.name_embeddings(names, templates=PHRASE_TEMPLATES),
                    persist=s.pretrained.strip().lower() not in ("random", "none", ""), device=resolved_device(s.device),
                    width=text_width(s),
                )  # fmt: skip
            return self._phrases

    def phrase_within(self, phrase: str, deadline: Deadline):
        """(1, D) text embedding of a typed phrase if ready by ``deadline``, else None (still computing)."""
        from ..embeddings import label_set

        return self.phrases.wait(label_set([phrase]), deadline.remaining())

    def note_interactive(self, reason: str) -> None:
        """Count an interactive answer without a mask by its reason (``/metrics``)."""
        with self._lock:
            self.interactive_notes[reason] = self.interactive_notes.get(reason, 0) + 1

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

    def labels_within(self, classes: Sequence[Sequence[str]], deadline: Deadline):
        """(N, D) text embeddings of ``classes``, one row per name, if ready by ``deadline``, else None (still
        computing)."""
        from ..embeddings import label_set

        return self.embeddings.wait(label_set(classes), deadline.remaining())

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

    @property
    def interactive_dtype(self) -> Any:
        """The dtype interactive prompts run the image tower in (None: the model's own), from the settings
        and this machine (:func:`~labelstudio_maskclip.engine.loading.interactive_dtype`)."""
        from ..engine.loading import interactive_dtype, resolve_dtype

        device = resolved_device(self.settings.device)
        return interactive_dtype(self.settings.precision, device, resolve_dtype(self.settings.precision, device))

    def warm_up(self) -> None:
        """Load the teacher and run a batch through it (kernels, allocator, compiled graphs), then an
        interactive click, so that the first annotator does not pay for either; the batch's time is the first
        estimate of the time per image."""
        import torch

        teacher = self.teacher_within()
        opts = segment_options(self.settings)
        side = opts.short_side or 224
        image = np.full((side, side * 4 // 3, 3), 127, np.uint8)  # a 4:3 photo at the served size
        dim = int(teacher.clip.model.visual.output_dim)
        text = torch.nn.functional.normalize(torch.randn(WARMUP_LABELS, dim), dim=-1).to(teacher.device)
        self._warm_up_interactive(teacher, image, text, opts)
        names = [f"label {k}" for k in range(WARMUP_LABELS)]
        # A GPU's first batch pays for lazy initialisation and autotuning, so a second one is timed; a CPU's
        # first batch already runs at its steady speed (measured), and a second would hold /health back
        # (about 9 s on a loaded 2-core machine at the default preset).
        cuda = teacher.device.type == "cuda"
        batches = ([1, 1] + ([opts.batch_size] if opts.batch_size > 1 else [])) if cuda else [1]
        for n in batches:
            start = time.monotonic()
            teacher.segment([image] * n, names, opts=opts, text=text)
            seconds = time.monotonic() - start
        self.observe(self.teacher_version(), 1, seconds / n if n > 1 else seconds)
        log.info("model warmed up: %.3f s per image", self.seconds_per_image(self.teacher_version()))

    def _warm_up_interactive(self, teacher: MaskCLIP, image: np.ndarray, text: Any, opts: SegmentOptions) -> None:
        """One click's work on ``image`` (the image tower in :attr:`interactive_dtype`, class probabilities
        for ``text`` (K, D), the click's mask): its kernels are ready before the first annotator clicks."""
        from ..engine import prompts

        start = time.monotonic()
        dense = prompts.encode_image(teacher, image, opts, self.interactive_dtype)
        probs = prompts.grid_probs(dense, text, opts)
        prompts.click_mask(dense, probs[0], [(image.shape[1] / 2, image.shape[0] / 2)])
        log.info("interactive warmed up: %.3f s for a click on a new image (image tower in %s)",
                 time.monotonic() - start, self.interactive_dtype or teacher.clip.dtype)  # fmt: skip

    def teacher_version(self) -> str:
        s = self.settings
        tag = Path(s.pretrained).name if s.pretrained else "random"
        arch = Path(s.model).stem if s.model.endswith(".json") else s.model

        return f"maskclip-{arch}.{tag}-{pipeline_description(s)}"

    def student_version(self) -> str | None:
        """Version of the promoted student, read from MODEL_DIR on every call (cheap), so every worker
        switches to a newly promoted model without a restart."""
        return current_version(self.settings)

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
                from ..training.student import load_student

                try:  # this version's own file: the pointer may have moved on since it was read
                    model = load_student(checkpoint_path(Path(self.settings.model_dir), version), self.settings.device)
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


def resolved_device(device: str) -> Any:
    """The torch device a ``MASKCLIP_DEVICE`` value names (``auto``: CUDA when present)."""
    from ..engine.loading import resolve_device

    return resolve_device(device)
