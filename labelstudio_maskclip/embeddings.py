"""Class text embeddings of a label set, computed once in the background and kept on disk.

Text embeddings cost about 85 forward passes of CLIP's text tower per label name (90 s for 20 labels on two
CPU cores): far too much for a ``/predict`` that Label Studio abandons after 100 s. An
:class:`EmbeddingStore` computes them in background threads as soon as the labels are known (``/setup``),
writes them to ``<MODEL_DIR>/text_embeddings/<key>.pt`` and serves them from memory afterwards. The key is a
digest of everything the numbers depend on (architecture, weights, precision, templates, the names of each
label in order), so every worker process and every restart reuses the same file, and a change of any of them
gives a new file. Concurrent writers are serialised by a lock file (one process computes, the others then
read its file); files are written atomically, and an unreadable or foreign file is recomputed.

A file holds one row per *name*, not per label (format 2): ``embeddings`` (N, D) for the N names of the
labels in order and ``owners`` (N,), the label of each row. How a label's names combine is the preset's
rule (``synonyms``: the highest probability over the names, or their averaged embedding), applied where the
probabilities are made (``MaskCLIP.segment``), so the server, the trainer and ``eval`` all merge alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin only from Python 3.11
from pathlib import Path

import torch

from .engine.names import name_owners, normalize_classes
from .files import write_atomic

__all__ = ["EmbeddingStore", "LabelSet", "label_set", "weights_identity"]

log = logging.getLogger(__name__)

#: names per label, in label order: ``(("cat",), ("car", "automobile"))``
LabelSet = tuple[tuple[str, ...], ...]
_FORMAT = 2  # 2: one row per name with the name -> label map (1: one averaged row per label)
#: Labels computed in one turn: a big label set is computed in turns of this many labels, and label sets
#: waiting at the same time take turns with it, so one project with thousands of labels delays another
#: project's new labels (and a typed phrase: the model's text side is one at a time) by one turn, seconds
#: on a CPU, not by hours.
TURN_LABELS = 4
#: Label sets computed at the same time (taking turns).
JOBS = 8


class _Turns:
    """A first-come, first-served lock: threads get it in the order they asked for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


def weights_identity(pretrained: str) -> str:
    """What identifies the weights: a local file by its size and a digest of its first and last MiB (stable
    across copies, cheap for a 600 MB checkpoint), anything else (an open_clip tag, an hf-hub id) by name."""
    path = Path(pretrained)
    if not pretrained or not path.is_file():
        return pretrained
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            digest.update(f.read())
    return f"file:{size}:{digest.hexdigest()[:32]}"


class EmbeddingStore:
    """Text embeddings per label set for one model, in memory, on disk under ``root``, computed in the
    background by ``compute(label_set) -> (N, D) tensor``, one row per name of the labels in order
    (:func:`~labelstudio_maskclip.engine.names.name_owners` says whose), a row from its name alone: up to
    :data:`JOBS` label sets at once, taking turns of :data:`TURN_LABELS` labels on the one computing thread
    at a time.

    ``identity``: what, besides the label names, the embeddings depend on (architecture, weights, templates,
    precision; see :func:`weights_identity`). ``persist=False`` keeps them in memory only (random weights,
    which differ per process). ``width``: the model's embedding width D, when known; a stored file of
    another width, or with rows that are not unit vectors (all zeros, say), is computed again. Thread-safe.
    """

    def __init__(
        self,
        root: Path,
        identity: Mapping[str, str],
        compute: Callable[[LabelSet], torch.Tensor],
        *,
        persist: bool = True,
        device: torch.device | str = "cpu",
        width: int | None = None,
    ):
        self.root = Path(root)
        self.identity = dict(identity)
        self.persist = persist
        self.device = torch.device(device)
        self.width = width
        self._compute = compute
        self._memory: dict[str, torch.Tensor] = {}
        self._jobs: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(JOBS, thread_name_prefix="text-embeddings")
        self._turns = _Turns()

    def key(self, labels: LabelSet) -> str:
        """Hex digest naming the file of ``labels``' embeddings."""
        blob = json.dumps({"identity": self.identity, "labels": labels, "format": _FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def path(self, labels: LabelSet) -> Path:
        return self.root / f"{self.key(labels)}.pt"

    def get(self, labels: LabelSet) -> torch.Tensor | None:
        """(N, D) float32, one row per name, on ``device`` if ready in memory; never computes."""
        with self._lock:
            return self._memory.get(self.key(labels))

    def prepare(self, labels: LabelSet) -> Future:
        """Start making ``labels``' embeddings ready (no-op when they are, or are being made): read from disk
        when stored (here, it takes milliseconds), else computed in the background thread. Returns a future
        of the (N, D) tensor; a failed computation is forgotten so that the next call tries again."""
        key = self.key(labels)
        with self._lock:
            if key in self._memory:
                return _done(self._memory[key])
            if key in self._jobs:
                return self._jobs[key]
        stored = self._read(labels) if self.persist else None
        started = None
        with self._lock:
            if stored is not None:
                self._memory[key] = stored
                return _done(stored)
            if key not in self._jobs:
                started = self._jobs[key] = self._worker.submit(self._make, labels, key)
            job = self._jobs[key]
        if started is not None:  # outside the lock: a job already done runs its callback in this thread
            started.add_done_callback(functools.partial(self._finished, key))
        return job

    def wait(self, labels: LabelSet, timeout: float | None) -> torch.Tensor | None:
        """The embeddings, waiting at most ``timeout`` seconds (None: as long as it takes) for them to be
        ready; None when they are not ready by then. Raises what the computation raised."""
        future = self.prepare(labels)
        try:
            return future.result(timeout=None if timeout is None else max(0.0, timeout))
        except FutureTimeout:
            return None

    # --- internals ----------------------------------------------------------------------------------

    def _finished(self, key: str, future: Future) -> None:
        with self._lock:
            self._jobs.pop(key, None)
            if future.exception() is None:
                self._memory[key] = future.result()

    def _make(self, labels: LabelSet, key: str) -> torch.Tensor:
        if not self.persist:
            return self._computed(labels)
        with self._exclusive(key):  # one process computes; the others find its file afterwards
            stored = self._read(labels)
            if stored is not None:
                return stored
            emb = self._computed(labels)
            payload = {"format": _FORMAT, "identity": self.identity, "labels": [list(n) for n in labels],
                       "owners": list(_owners(labels)), "embeddings": emb.detach().float().cpu().contiguous()}  # fmt: skip
            write_atomic(self.path(labels), lambda f: torch.save(payload, f))
            log.info("text embeddings of %d labels stored in %s", len(labels), self.path(labels))
            return emb

    def _computed(self, labels: LabelSet) -> torch.Tensor:
        start = time.monotonic()
        parts = []
        for i in range(0, len(labels), TURN_LABELS):  # rows are independent: a name's row is its own
            turn = labels[i : i + TURN_LABELS]
            with self._turns.turn():
                part = self._compute(turn).detach().float().to(self.device)
            if part.ndim != 2 or part.shape[0] != sum(len(n) for n in turn):
                raise ValueError(f"text embeddings of {turn}: one row per name expected, got {tuple(part.shape)}")
            parts.append(part)
        emb = torch.cat(parts)
        log.info("computed text embeddings of %d labels in %.1f s", len(labels), time.monotonic() - start)
        return emb

    def _read(self, labels: LabelSet) -> torch.Tensor | None:
        """The stored embeddings of ``labels``, or None when there is no usable file (missing, unreadable,
        or written for another model or label set, which the key makes unlikely but not impossible)."""
        path = self.path(labels)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            emb = payload["embeddings"]
            ok = (
                payload.get("format") == _FORMAT
                and payload.get("identity") == self.identity
                and [tuple(n) for n in payload.get("labels", ())] == list(labels)
                and list(payload.get("owners", ())) == list(_owners(labels))
                and emb.ndim == 2
                and emb.shape[0] == len(_owners(labels))
                and (self.width is None or emb.shape[1] == self.width)
                and bool(torch.isfinite(emb).all())
                and bool(((emb.double().norm(dim=1) - 1).abs() < 1e-3).all())  # rows are L2-normalised
            )
        except Exception as e:  # a damaged file is recomputed, never served
            log.warning("text embeddings file %s is unreadable (%s): computing them again", path, e)
            return None
        if not ok:
            log.warning("text embeddings file %s does not match this model and label set: computing again", path)
            return None
        log.info("text embeddings of %d labels read from %s", len(labels), path)
        return emb.float().to(self.device)

    @contextlib.contextmanager
    def _exclusive(self, key: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _owners(labels: LabelSet) -> tuple[int, ...]:
    return name_owners(labels)


def _done(value: torch.Tensor) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def label_set(classes: Sequence[Sequence[str] | str]) -> LabelSet:
    """Names per label as the store keys them (strings become one-name labels, names stripped)."""
    return normalize_classes(classes)
