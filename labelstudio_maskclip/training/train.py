"""MaskCLIP+ training: distil the MaskCLIP teacher (plus people's masks) into a student, validate, promote.

One run (docs/method.md, section 3), each stage in its module:

1. Data (:mod:`.data`): accepted samples (image + per-label masks) and the unlabeled pool from the store,
   images fetched once and cached under ``MODEL_DIR/cache/``, a fixed share of the people's masks held out
   for validation by task id.
2. Steps (:mod:`.loop`): random resized crops, the teacher's pseudo labels (the student's own after
   ``train_self_training_start``), people's labels where they painted; SGD with poly decay; DDP under
   torchrun. Pixels outside every accepted mask count as unlabeled (people rarely paint everything).
3. Validation and the promotion rule (:mod:`.validation`): teacher, served student and candidate on the
   held-out masks.
4. Output in ``MODEL_DIR/runs/<run-id>/``: ``metrics.json``, ``curves.png``, ``last.pt`` (resume state,
   removed when the run ends); a promotion goes through :func:`labelstudio_maskclip.training.checkpoints.promote`
   (atomic).

This module is the entry point: :func:`train` (one run, in this process) and :func:`train_main`
(``python -m labelstudio_maskclip.training.train``, the process the server's trigger starts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..embeddings import label_set
from ..engine.loading import resolve_device
from ..engine.names import parse_label_spec
from ..fetching.images import ImageFetcher
from ..learning.locks import HeldLock
from ..learning.store import Store
from ..models import segment_options, shared_maskclip, text_embedding_store
from ..settings import Settings
from .checkpoints import promote as promote_checkpoint
from .curves import plot_curves
from .data import ImageLoader, Prepared, TrainingStore, default_classes, label_index, mark_trained, prepare, read_store
from .job import TrainJob, classes_from_json
from .loop import Dist, Loop, RunState, TrainError, save_resume
from .rescoring import start_rescore
from .student import StudentModel, StudentNet, class_key
from .teacher import CLIPTeacher, Teacher
from .trigger import acquire_training_lock
from .validation import MIN_VAL_MASKS, Scores, decide, evaluate, student_predictor, validate

__all__ = ["TrainError", "TrainResult", "train", "run_job", "train_main", "build_parser"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    promoted: bool
    version: str | None  # the promoted version, None when not promoted
    decision: str  # one sentence: why promoted or not
    metrics: dict[str, Any] = field(repr=False)


@dataclass
class Run:
    """What one run works on, fixed before the first step."""

    settings: Settings
    store: TrainingStore
    project: int | None
    seq: int | None  # the store's change counter when the data was read
    run_id: str
    run_dir: Path
    teacher: Teacher
    classes: tuple[tuple[str, ...], ...]
    values: tuple[str, ...] | None  # label value per class, when known
    background: tuple[tuple[str, ...], ...]
    data: Prepared
    device: torch.device
    eval_opts: Any  # SegmentOptions for validation

    def candidate(self, net: StudentNet) -> StudentModel:
        return StudentModel(net, self.classes, self.background)


def train(
    settings: Settings,
    store: TrainingStore,
    *,
    load_image: ImageLoader | None = None,
    teacher: Teacher | None = None,
    classes: Sequence[Any] | None = None,
    values: Sequence[str] | None = None,
    background: Sequence[Any] = (),
    project: int | None = None,
    progress: bool = True,
    resume: str | None = None,
    checkpoint_every: int = 500,
    seed: int = 0,
    lock: HeldLock | None = None,
) -> TrainResult:
    """Run one MaskCLIP+ training (see the module docstring) and return what happened.

    ``load_image(ref, task_id) -> (H, W, 3) uint8``: default, the Label Studio image fetcher of ``settings``.
    ``teacher``: default MaskCLIP (``shared_maskclip``) over ``classes`` + ``background``.
    ``classes``: label names or synonym tuples; default, every label found in the accepted masks, sorted.
    ``values``: each class's label value, as people's masks carry it (see :class:`TrainJob`).
    ``resume``: a run id whose ``last.pt`` to continue from. ``lock``: the training lock this run holds; it
    promotes only while the lock is still held (an advisory lock ends with its connection: another run may
    have started since). Under torchrun every rank calls this; rank 0 fetches data, evaluates, writes and
    promotes (the other ranks return None).
    """
    if values is not None and (not classes or len(values) != len(classes)):
        raise TrainError(f"{len(values)} label values for {len(classes or ())} classes: give one value per class")
    job = TrainJob(
        classes=class_key(classes) if classes else None,
        values=tuple(values) if values is not None else None,
        background=class_key(background),
        project=project,
        resume=resume,
        progress=progress,
    )
    dist = Dist.init()
    s, device = _placed(settings, dist)
    run = _start(s, store, job, dist, device, load_image=load_image, teacher=teacher)
    loop = Loop.build(s, run.teacher, device, dist, run.run_dir if resume else None)
    rng = np.random.default_rng([seed, dist.rank, loop.state.step])
    shard = run.data.train[dist.rank :: dist.world] or run.data.train
    on_checkpoint = (lambda: _checkpoint(run, loop)) if dist.main else None
    loop.run(
        shard, rng, progress=progress and dist.main, checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint
    )
    result = _finish(run, loop, lock) if dist.main else None
    dist.barrier()
    return result  # type: ignore[return-value]


def _placed(s: Settings, dist: Dist) -> tuple[Settings, torch.device]:
    """The device to train on: the settings' one, or this rank's GPU under torchrun."""
    device = resolve_device(s.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
        s = s.replace(device=str(device))
    return s, device


def _start(
    s: Settings,
    store: TrainingStore,
    job: TrainJob,
    dist: Dist,
    device: torch.device,
    *,
    load_image: ImageLoader | None,
    teacher: Teacher | None,
) -> Run:
    """Read the store, fix the classes and the run folder, prepare the data and the teacher."""
    samples, unlabeled, seq = read_store(store, job.project)
    classes = job.classes or class_key(default_classes(samples))
    if not classes:
        raise TrainError("no labels to train: no accepted masks in the store and no labels given (--labels)")
    run_id = dist.broadcast(job.resume or _new_run_id())
    run_dir = Path(s.model_dir) / "runs" / run_id
    index = label_index(classes, job.values if job.classes else None)
    data = _prepare(s, dist, samples, unlabeled, index, run_dir, load_image or _fetcher(s))
    if teacher is None:
        maskclip = shared_maskclip(s)
        text = stored_text_embeddings(s, maskclip, list(classes) + list(job.background))
        teacher = CLIPTeacher(maskclip, classes, job.background, segment_options(s), text)
    log.info("run %s: %d labels, data %s, %d steps x %d images (world %d)",
             run_id, len(classes), data.counts, s.train_steps, s.train_batch_size, dist.world)  # fmt: skip
    values = job.values if job.classes else tuple(c[0] for c in classes)
    return Run(s, store, job.project, seq, run_id, run_dir, teacher, classes, values, job.background, data,
               device, segment_options(s))  # fmt: skip


def _prepare(
    s: Settings,
    dist: Dist,
    samples: Sequence[Any],
    unlabeled: Sequence[Any],
    index: dict[str, int],
    run_dir: Path,
    load_image: ImageLoader,
) -> Prepared:
    """:func:`~.data.prepare` on rank 0 first (it fetches), then on the others (from the cache)."""

    def prep() -> Prepared:
        return prepare(
            samples, unlabeled, index, cache_dir=Path(s.model_dir) / "cache", run_dir=run_dir,
            load_image=load_image, crop=s.train_crop, val_fraction=s.train_val_fraction,
        )  # fmt: skip

    data = prep() if dist.main else None
    dist.barrier()
    data = data or prep()
    if not data.train:
        raise TrainError(f"no training images: {data.counts}; add tasks to the project or fix image access")
    return data


def stored_text_embeddings(s: Settings, maskclip: Any, classes: Sequence[Any]) -> torch.Tensor:
    """(N, D) text embeddings of ``classes``' names (one row per name, as the server stores them) from the
    store under ``MODEL_DIR/text_embeddings``: read when stored, waited for when a server process is computing
    them (the store's file lock), computed and stored otherwise, so a run never repeats the server's
    85-template text passes."""
    store = text_embedding_store(s, maskclip.name_embeddings)
    return store.wait(label_set(classes), None)


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def _fetcher(s: Settings) -> Callable[[str, int], np.ndarray]:
    fetcher = ImageFetcher.from_settings(s)
    return lambda ref, task_id: fetcher.load(ref, task_id, max_pixels=s.max_image_pixels)


def _checkpoint(run: Run, loop: Loop) -> None:
    """Every ``checkpoint_every`` steps (rank 0): the candidate's validation mIoU, and ``last.pt``."""
    predict = student_predictor(run.candidate(loop.net), run.eval_opts, run.classes, run.background)
    loop.state.evals.append({"step": loop.state.step, "miou": evaluate(predict, run.data.val, len(run.classes))})
    loop.net.train()
    save_resume(run.run_dir, loop.net, loop.opt, loop.state)


# --- the end of a run --------------------------------------------------------------------------------------


_LOCK_LOST = (
    "not promoted: the training lock is no longer held (the store's server ended its session; another run may "
    "hold it now)"
)


def _finish(run: Run, loop: Loop, lock: HeldLock | None = None) -> TrainResult:
    """Validate teacher, served student and candidate; decide; promote (while ``lock`` is held); write metrics
    and plot."""
    s = run.settings
    scores = validate(s, run.candidate(loop.net), run.teacher, run.data.val, run.device, run.eval_opts)
    loop.state.evals.append({"step": loop.state.step, "miou": scores.candidate})
    promoted, decision = decide(s.promote, scores.candidate, scores.teacher, scores.current, len(run.data.val))
    if promoted and lock is not None and not lock.still_held():
        promoted, decision = False, f"{decision}; {_LOCK_LOST}"
        log.error("run %s: %s", run.run_id, _LOCK_LOST)
    metrics = _metrics(run, loop.state, scores, promoted, decision)
    log.info("run %s: %s", run.run_id, decision)
    version = _promote(run, loop.net, metrics) if promoted else None
    metrics["version"] = version
    _write_run(run.run_dir, metrics)
    mark_trained(run.store, run.seq, run.project, version or "", {k: metrics[k] for k in ("miou", "decision", "data")})
    return TrainResult(run.run_id, run.run_dir, promoted, version, decision, metrics)


def _metrics(run: Run, state: RunState, scores: Scores, promoted: bool, decision: str) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "steps": state.step,
        "loss": state.losses,
        "val_miou": state.evals,
        "miou": scores.as_dict(),
        "data": run.data.counts,
        "few_masks": len(run.data.val) < MIN_VAL_MASKS,
        "promoted": promoted,
        "decision": decision,
    }


def _promote(run: Run, net: torch.nn.Module, metrics: dict[str, Any]) -> str:
    """Register the candidate as the served student (atomic); returns its version."""
    payload = {
        "student": run.settings.student,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "embeddings": run.teacher.embeddings.detach().float().cpu(),
        "classes": [list(c) for c in run.classes],
        "values": None if run.values is None else list(run.values),
        "background": [list(c) for c in run.background],
        "clip": run.teacher.describe(),
        "settings": run.settings.public(),  # never the secrets
        "metrics": {k: metrics[k] for k in ("miou", "decision", "steps")},
        "data": run.data.counts,
        "run_id": run.run_id,
    }
    version = promote_checkpoint(run.settings, payload)
    log.info("promoted %s", version)
    return version


def _write_run(run_dir: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` and ``curves.png``; the resume state and label maps go (the next run rebuilds them)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    plot_curves(metrics, run_dir / "curves.png")
    (run_dir / "last.pt").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "labels", ignore_errors=True)


# --- the trainer process -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m labelstudio_maskclip.training.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--labels", help="classes, comma-separated, synonyms with | (default: labels in the store)")
    p.add_argument("--classes-json", help='instead of --labels: [{"value": "Car", "names": ["car", "van"]}, ...]')
    p.add_argument("--background", help="background classes, comma-separated (pixels become no label)")
    p.add_argument("--project", type=int, help="train on one Label Studio project's tasks only")
    p.add_argument("--steps", type=int, help="override MASKCLIP_TRAIN_STEPS")
    p.add_argument("--resume", metavar="RUN_ID", help="continue the run MODEL_DIR/runs/RUN_ID from its last.pt")
    p.add_argument("--service", action="store_true", help="log lines instead of a progress bar (trigger)")
    p.add_argument("--reason", default="manual", help="why this run started (logged)")
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # inherited locked train.lock (trigger)
    p.add_argument("--lock-wait", action="store_true", help=argparse.SUPPRESS)  # advisory lock handed over (trigger)
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m labelstudio_maskclip.training.train`` (the process the trigger starts, or
    torchrun's ranks): settings from the environment, the job from the arguments. See :func:`run_job`."""
    args = build_parser().parse_args(argv)
    s = Settings.from_env(train_steps=args.steps or None)
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    classes, values = parse_label_spec(args.labels) or None, None
    if args.classes_json:
        try:
            classes, values = classes_from_json(args.classes_json)
        except ValueError as e:
            build_parser().error(str(e))
    job = TrainJob(
        classes=classes,
        values=values,
        background=parse_label_spec(args.background),
        project=args.project,
        resume=args.resume,
        progress=not args.service,
    )
    return run_job(s, job, reason=args.reason, lock_fd=args.lock_fd, lock_wait=args.lock_wait)


def run_job(
    settings: Settings, job: TrainJob, *, reason: str = "manual", lock_fd: int | None = None, lock_wait: bool = False
) -> int:
    """One training in this process, holding the training lock (rank 0; ``lock_fd``: a descriptor of
    ``MODEL_DIR/train.lock`` already locked by the trigger; else taken here, :mod:`..learning.locks`:
    ``lock_wait``, waiting for the trigger to hand it over, else only if free). Prints the outcome as one JSON
    line. Returns the exit status: 0 done, 3 another training holds the lock."""
    s = settings
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank: only rank 0 holds the lock
        lock = os.fdopen(lock_fd, "a") if lock_fd is not None else acquire_training_lock(s, wait=lock_wait)
        if lock is None:
            log.error("another training holds the training lock; not starting")
            return 3
    try:
        log.info("training starts (reason: %s, pid %d)", reason, os.getpid())
        result = train(s, Store.from_settings(s), classes=job.classes, values=job.values, background=job.background,
                       project=job.project, progress=job.progress, resume=job.resume,
                       lock=lock if isinstance(lock, HeldLock) else None)  # fmt: skip
    finally:
        if lock is not None:
            lock.close()
    if result is not None and result.promoted:  # the Data Manager's scores follow the new model
        start_rescore(s, job.project, reason=f"promotion of {result.version}")
    if result is not None:
        summary = {k: getattr(result, k) for k in ("run_id", "promoted", "version", "decision")}
        print(json.dumps({**summary, "miou": result.metrics["miou"]}))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
