"""``labelstudio-maskclip``: the command line. Each subcommand reads Settings once and calls the package.

CLI flags override the environment (``MASKCLIP_*``, ``LABEL_STUDIO_*``, ``MODEL_DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .engine.modes import DENSE_MODES
from .engine.names import parse_label_spec
from .engine.presets import PRESETS
from .errors import BadInput, MaskCLIPError
from .logs import configure as configure_logging
from .settings import ENV, Settings

__all__ = ["main", "build_parser", "report", "ERROR_STATUS"]

log = logging.getLogger("labelstudio_maskclip")


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (override MASKCLIP_* environment variables)")
    g.add_argument("--model", help="open_clip architecture or config JSON (MASKCLIP_MODEL, default ViT-B-16)")
    g.add_argument("--pretrained", help="open_clip tag, local checkpoint file or hf-hub:id (MASKCLIP_PRETRAINED)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N (MASKCLIP_DEVICE)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="MASKCLIP_PRECISION")
    g.add_argument("--allow-random", action="store_true", default=None, help="allow random weights (tests)")
    g.add_argument("--preset", choices=list(PRESETS), help="a method's published inference (MASKCLIP_PRESET)")
    g.add_argument("--dense-mode", choices=DENSE_MODES, help="MASKCLIP_DENSE_MODE")
    g.add_argument("--templates", help="maskclip85, imagenet80, simple, or a file (MASKCLIP_TEMPLATES)")
    g.add_argument("--short-side", type=int, help="resize short side to this (MASKCLIP_SHORT_SIDE)")
    g.add_argument("--window", type=int, help="sliding-window size, 0 = whole image (MASKCLIP_WINDOW)")
    g.add_argument("--stride", type=int, help="sliding-window stride (MASKCLIP_STRIDE)")
    g.add_argument("--key-smoothing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--prompt-denoising", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--min-confidence", type=float, help="below this a pixel gets no label")
    g.add_argument("--batch-size", type=int, help="images per forward pass (MASKCLIP_BATCH_SIZE)")


_OVERRIDES = (
    "model", "pretrained", "device", "precision", "allow_random", "preset", "dense_mode", "templates", "short_side",
    "window", "stride", "key_smoothing", "prompt_denoising", "min_confidence", "batch_size",
)  # fmt: skip


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(**{k: getattr(args, k, None) for k in _OVERRIDES})


def _cmd_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .fetching.images import ImageError, decode_image
    from .models import segment_options, shared_maskclip

    s = _settings(args)
    classes = parse_label_spec(args.labels)  # "car|automobile,dog": synonyms with |
    background = parse_label_spec(args.background)
    if not classes:
        raise BadInput("--labels needs at least one name, e.g. --labels 'cat,dog,grass'")
    names = [c[0] for c in classes]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seg = shared_maskclip(s)
    opts = segment_options(s)
    failed = 0
    bar = tqdm(total=len(args.images), desc="segment", unit="img", disable=len(args.images) < 2 or None)
    step = max(1, s.batch_size)
    for first in range(0, len(args.images), step):  # decode a batch, segment it in one call, write it
        batch = []
        for path in args.images[first : first + step]:
            try:
                batch.append((Path(path), decode_image(Path(path).read_bytes(), max_pixels=s.max_image_pixels)))
            except (OSError, ImageError) as e:
                log.error("%s: %s", path, e)
                failed += 1
        results = seg.segment([image for _, image in batch], classes, background, opts) if batch else []
        for (path, image), result in zip(batch, results):
            _write_segment_outputs(out, path, image, result, names, seg.version)
        bar.update(len(args.images[first : first + step]))
    bar.close()
    return 1 if failed else 0


def _write_segment_outputs(out: Path, path: Path, image, result, names: list[str], model: str) -> None:
    """NAME.labels.png (class index, 255 = no label), NAME.overlay.png and NAME.json for one image."""
    from .masks.overlay import overlay, save_label_png

    stem = path.stem
    save_label_png(result.labels, out / f"{stem}.labels.png")
    overlay(image, result.labels, names).save(out / f"{stem}.overlay.png")
    summary = {
        "image": str(path),
        "width": image.shape[1],
        "height": image.shape[0],
        "model": model,
        "score": round(result.score, 4),
        "labels": {
            names[k]: {"area": int(result.class_areas[k]), "score": round(float(result.class_scores[k]), 4)}
            for k in result.present
        },
        "label_png": f"{stem}.labels.png",
        "label_values": {names[k]: k for k in range(len(names))} | {"(no label)": 255},
    }
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))


def _cmd_serve(args: argparse.Namespace) -> int:
    s = _settings(args)  # validates the environment before gunicorn starts
    workers = args.workers or s.workers
    cmd = [
        sys.executable, "-m", "gunicorn", "labelstudio_maskclip.serving.asgi:asgi()",
        "--bind", f"{args.host}:{args.port}", "--workers", str(workers),
        # gunicorn's asyncio worker reads each request whole before one of the THREADS threads answers it:
        # slow clients cannot hold the threads (see serving/asgi.py).
        "--worker-class", "asgi", "--keep-alive", "5",
        # /predict may take up to Label Studio's 100 s limit; the time budget stops earlier.
        "--timeout", str(int(s.predict_time_budget) + 60), "--graceful-timeout", "30",
        "--log-level", s.log_level.lower(), "--access-logfile", "-",
    ]  # fmt: skip
    env = dict(os.environ)
    env.update({k: str(v) for k, v in _env_overrides(args).items()})
    # torch's OpenMP threads sleep at a barrier instead of spinning: on a CPU shared with other work a
    # spinning thread takes the core its partner needs (a click's image tower measured about 2x slower on a
    # loaded 2-core machine; BENCHMARKS.md, "Interactive speed on a CPU"). OMP_WAIT_POLICY overrides it.
    env["OMP_WAIT_POLICY"] = s.omp_wait_policy or "PASSIVE"
    log.info("serving on http://%s:%d with %d worker(s): %s", args.host, args.port, workers, " ".join(cmd[2:]))
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import run_eval

    metrics = run_eval(
        _settings(args), args.dataset, Path(args.root), Path(args.out), protocol=args.protocol,
        limit=args.limit, overlays=args.overlays, progress=not args.no_progress,
        bg_threshold=args.bg_threshold, refinements=args.refinements, preset=args.preset,
    )  # fmt: skip
    print(json.dumps({k: metrics[k] for k in ("dataset", "protocol", "n_images", "mIoU", "aAcc") if k in metrics}))
    return 0


def _cmd_preannotate(args: argparse.Namespace) -> int:
    """One process, or one rank of ``torchrun -m labelstudio_maskclip preannotate``: each rank predicts its
    shard (task id modulo the world size) on its own device; rank 0 prints the totals."""
    from .commands.preannotate import RankTotals, preannotate, shard_from_env, sweep_duplicates

    s = _settings(args)
    shard = shard_from_env()
    totals = RankTotals(shard) if shard.world > 1 else None
    if totals is not None and s.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            s = s.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', shard.rank)) % torch.cuda.device_count()}")
    r = preannotate(s, args.project, batch_size=args.batch, upload_batch=args.upload_batch, refresh=args.refresh,
                    shard=shard, progress=shard.rank == 0)  # fmt: skip
    mine = r.summary()
    summary = totals.combine(mine) if totals is not None else mine  # None on ranks other than 0
    if totals is not None and summary is not None and summary["predicted"]:
        sweep_duplicates(s, args.project, r.model_version)  # rank 0, once every rank has written
    if summary is not None:
        print(json.dumps(summary))
    for f in r.failed[:20]:
        log.warning("task %s: %s", f.get("task"), f.get("error"))
    return 1 if (summary or mine)["failed"] else 0


def _cmd_next(args: argparse.Namespace) -> int:
    """The unlabeled tasks to label next: lowest score of the served model first."""
    from .labelstudio.api import LabelStudioAPI
    from .serving.backend import MaskCLIPBackend

    s = _settings(args)
    api = LabelStudioAPI.from_settings(s)
    config = api.project(args.project)["label_config"]
    backend = MaskCLIPBackend(s, str(args.project), config)
    version, _ = backend.rt.model_for(backend.classes(backend.spec())[1], load=False)
    tasks = api.next_tasks(args.project, args.n, version=None if args.any_version else version)
    if args.json:
        print(json.dumps([{"id": t["id"], "score": t.get("predictions_score"), "data": t.get("data")} for t in tasks]))
        return 0
    if not tasks:
        print(f"no unlabeled task has a prediction of {version}: run `labelstudio-maskclip preannotate "
              f"--project {args.project}`")  # fmt: skip
        return 0
    key = backend.spec().image_keys[0]
    base = s.label_studio_url.rstrip("/")
    for t in tasks:
        score = t.get("predictions_score")
        shown = f"{score:.4f}" if isinstance(score, (int, float)) else "n/a"
        image = (t.get("data") or {}).get(key, "")
        print(f"{t['id']}\t{shown}\t{base}/projects/{args.project}/data?task={t['id']}\t{image}")
    return 0


def _categories(args: argparse.Namespace, s: Settings, store) -> list[str]:
    """Export categories: the labeling config's labels in order (file or project), else the store's."""
    from .labelstudio.labeling import parse_label_config

    if getattr(args, "label_config", None):
        return list(parse_label_config(Path(args.label_config).read_text()).vocabulary)
    if getattr(args, "project", None) and s.label_studio_url:
        from .labelstudio.api import LabelStudioAPI

        return list(
            parse_label_config(LabelStudioAPI.from_settings(s).project(args.project)["label_config"]).vocabulary
        )
    labels = store.labels()
    log.warning("no --label-config or --project: categories are the labels found in the store, sorted: %s", labels)
    return labels


def _source_store(args: argparse.Namespace, s: Settings, tmp: str):
    """The store to read: MODEL_DIR's, or a temporary one filled from an export file or the API."""
    from .labelstudio.webhooks import backfill_from_api, backfill_from_export
    from .learning.store import Store

    if args.from_export:
        store = Store(Path(tmp))
        config = Path(args.label_config).read_text() if args.label_config else None
        backfill_from_export(args.from_export, store, label_config=config, project_id=args.project)
        return store
    if args.from_api:
        from .labelstudio.api import LabelStudioAPI

        if not args.project:
            raise BadInput("--from-api needs --project ID")
        store = Store(Path(tmp))
        backfill_from_api(LabelStudioAPI.from_settings(s), args.project, store)
        return store
    return Store.from_settings(s)


def _cmd_export(args: argparse.Namespace) -> int:
    from .learning.export import run_export

    s = _settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        store = _source_store(args, s, tmp)
        categories = _categories(args, s, store)
        summary = run_export(
            store, categories, args.out, mode=args.mode, polygons=args.polygons,
            project=None if (args.from_export or args.from_api) else args.project, png_dir=args.png_dir,
        )  # fmt: skip
    print(json.dumps(summary))
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    from .labelstudio.webhooks import backfill_from_api, backfill_from_export
    from .learning.store import Store

    s = _settings(args)
    store = Store.from_settings(s)
    if args.export:
        config = Path(args.label_config).read_text() if args.label_config else None
        result = backfill_from_export(args.export, store, label_config=config, project_id=args.project)
    else:
        from .labelstudio.api import LabelStudioAPI

        result = backfill_from_api(LabelStudioAPI.from_settings(s), args.project, store)
    print(json.dumps({"counts": result.counts, "rejected": len(result.rejected)}))
    for reason in result.rejected[:20]:
        log.warning("rejected: %s", reason)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .learning.store import Store

    store = Store.from_settings(_settings(args))
    print(json.dumps({
        "acceptance": store.acceptance_stats(args.project),
        "annotations_since_training": store.count_since_last_training(args.project),
        "training_runs": store.training_runs(args.project),
    }, indent=2))  # fmt: skip
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.job import TrainJob

    flags = {k: getattr(args, k, None) for k in (*_OVERRIDES, "promote", "student", "student_pretrained")}
    s = Settings.from_env(**flags, train_steps=args.steps)
    job = TrainJob(
        classes=parse_label_spec(args.labels) or None,
        background=parse_label_spec(args.background),
        project=args.project,
        resume=args.resume,
    )
    if args.detach:  # a separate process: it gets these settings through its environment
        from .training.trigger import request_training

        started = request_training(s, "cli", classes=job.classes, background=job.background, project=job.project)
        print("training started in the background" if started else "a training is already running")
        return 0 if started else 3
    from .training.train import run_job

    return run_job(s, job, reason="cli")


def _cmd_history(args: argparse.Namespace) -> int:
    from .training.checkpoints import history

    rows = history(_settings(args))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no student trained yet: MaskCLIP is served")
    for r in rows:
        metrics = r.get("metrics", {})
        print(f"{'*' if r.get('current') else ' '} {r.get('version')}  {r.get('created', '')}  "
              f"mIoU={metrics.get('miou', 'n/a')}  labels={r.get('labels', '')}")  # fmt: skip
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from .training.checkpoints import rollback

    s = _settings(args)
    version = rollback(s, args.version)
    print(f"now serving {version}")
    from .training.rescoring import start_rescore

    start_rescore(s, reason=f"rollback to {version}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .commands.doctor import blocks_preannotation, diagnose, render, to_json

    findings = diagnose(_settings(args), args.project, backend_url=args.backend_url, load_weights=not args.no_weights)
    print(to_json(findings) if args.json else render(findings))
    return 1 if blocks_preannotation(findings) else 0


def _env_overrides(args: argparse.Namespace) -> dict[str, object]:
    """CLI model flags as environment variables, for child processes (gunicorn workers, the trainer)."""
    out: dict[str, object] = {}
    for k in _OVERRIDES:
        v = getattr(args, k, None)
        if v is not None:
            out[ENV[k]] = ("true" if v else "false") if isinstance(v, bool) else v
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelstudio-maskclip", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)
    _predicting_commands(sub)
    _learning_commands(sub)
    _service_commands(sub)
    return parser


def _predicting_commands(sub: Any) -> None:
    """segment, eval, preannotate, next."""
    p = sub.add_parser("segment", help="segment image files into the given labels")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", required=True, help="comma-separated label names; 'car|automobile' for synonyms")
    p.add_argument("--background", help="comma-separated background names (their pixels get no label)")
    p.add_argument("--out", required=True, help="output folder: NAME.labels.png, NAME.overlay.png, NAME.json")
    _model_flags(p)
    p.set_defaults(func=_cmd_segment)

    from .evaluation.evaluate import DATASETS, PROTOCOLS

    p = sub.add_parser("eval", help="evaluate mIoU on a segmentation dataset like the paper")
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--root", required=True, help="dataset folder (mmsegmentation layout; see README)")
    p.add_argument("--out", required=True, help="output folder: metrics.json, predictions/, overlays/")
    p.add_argument("--protocol", default="whole512", choices=list(PROTOCOLS),
                   help="whole512: short side 512 (Context 520), whole image; slide448: sliding window 448/224. "
                        "Overrides --short-side/--window/--stride/--min-confidence; "
                        "ignored with --preset, which runs that method's own protocol")  # fmt: skip
    p.add_argument("--bg-threshold", type=float, help="voc21/context60: below this probability -> background")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--overlays", type=int, default=8, help="overlay pictures to write (default 8)")
    p.add_argument("--refinements", action="store_true", help="allow key smoothing / prompt denoising (off by default)")
    p.add_argument("--no-progress", action="store_true")
    _model_flags(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("preannotate", help="predict every task of a project through the API (resumable; torchrun)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--batch", type=int, help="images per forward pass (default MASKCLIP_BATCH_SIZE)")
    p.add_argument("--upload-batch", type=int, default=250, help="predictions per bulk write (default 250)")
    p.add_argument("--refresh", action="store_true",
                   help="only unlabeled tasks: re-score them with the model served now (after a promotion)")  # fmt: skip
    _model_flags(p)
    p.set_defaults(func=_cmd_preannotate)

    p = sub.add_parser("next", help="the unlabeled tasks to label next (least sure first)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("-n", type=int, default=20, help="how many (default 20)")
    p.add_argument("--any-version", action="store_true", help="also tasks predicted by other model versions")
    p.add_argument("--json", action="store_true")
    _model_flags(p)
    p.set_defaults(func=_cmd_next)


def _learning_commands(sub: Any) -> None:
    """backfill, export-coco, stats, train, history, rollback."""
    p = sub.add_parser("backfill", help="store a project's existing annotations (API or JSON export file)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--project", type=int, help="Label Studio project id (through LABEL_STUDIO_URL)")
    g.add_argument("--export", help="a Label Studio JSON export file")
    p.add_argument("--label-config", help="labeling config XML file, to check labels of an export file")
    p.set_defaults(func=_cmd_backfill)

    p = sub.add_parser("export-coco", help="accepted masks as a COCO dataset (lossless RLE)")
    p.add_argument("--out", required=True, help="COCO JSON file to write")
    p.add_argument("--mode", choices=["instance", "semantic"], default="instance",
                   help="instance: one annotation per connected region; semantic: one per label mask")  # fmt: skip
    p.add_argument("--polygons", action="store_true", help="polygons instead of RLE (lossy)")
    p.add_argument("--png-dir", help="also write semantic PNGs (category index per pixel, 255 unlabelled)")
    p.add_argument("--project", type=int, help="only this project; with LABEL_STUDIO_URL also its categories")
    p.add_argument("--label-config", help="labeling config XML file: categories in its order")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from-export", help="read a Label Studio JSON export file instead of the store")
    src.add_argument("--from-api", action="store_true", help="read the project through the API instead")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("stats", help="acceptance of pre-annotations per label, and training runs")
    p.add_argument("--project", type=int)
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("train", help="MaskCLIP+: train a student on pseudo labels and accepted masks")
    p.add_argument("--labels", help="classes, comma-separated, synonyms with | (default: labels in the store)")
    p.add_argument("--background", help="background classes, comma-separated")
    p.add_argument("--project", type=int, help="only this Label Studio project's tasks")
    p.add_argument("--steps", type=int, help="MASKCLIP_TRAIN_STEPS")
    p.add_argument("--resume", metavar="RUN_ID", help="continue MODEL_DIR/runs/RUN_ID")
    p.add_argument("--promote", choices=["better", "always"], help="MASKCLIP_PROMOTE")
    p.add_argument("--student", help="deeplabv3_resnet50, deeplabv3_resnet101, lraspp_mobilenet_v3_large, tiny")
    p.add_argument(
        "--student-pretrained", help="imagenet, none, or a local backbone file (MASKCLIP_STUDENT_PRETRAINED)"
    )
    p.add_argument("--detach", action="store_true", help="start in the background (like a webhook trigger)")
    _model_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("history", help="promoted students, newest last; * marks the one served")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser("rollback", help="serve an earlier student again, or 'maskclip' for the teacher")
    p.add_argument("version", help="e.g. maskclip+-2, or maskclip")
    p.set_defaults(func=_cmd_rollback)


def _service_commands(sub: Any) -> None:
    """doctor, serve."""
    p = sub.add_parser("doctor", help="check weights, MODEL_DIR, Label Studio, a project's connection; explain fixes")
    p.add_argument("--project", type=int, help="also check this Label Studio project: config, ML backend, webhook")
    p.add_argument("--backend-url", help="the URL Label Studio should use for this backend, checked against its "
                   "address block when the project has no ML backend yet (default http://127.0.0.1:9090)")  # fmt: skip
    p.add_argument("--no-weights", action="store_true", help="skip loading the CLIP weights")
    p.add_argument("--json", action="store_true", help="findings as JSON")
    _model_flags(p)
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("serve", help="run the Label Studio ML backend (gunicorn)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    p.add_argument("--workers", type=int, help="gunicorn worker processes (WORKERS, default 1)")
    _model_flags(p)
    p.set_defaults(func=_cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. This is the one place the package's errors (:mod:`.errors`) stop a
    command: one line saying what to change (:func:`report`); any other exception keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        configure_logging(args.log_level or Settings.from_env().log_level)
        return func(args)
    except MaskCLIPError as e:
        return report(e)


#: The exit status of a command stopped by one of the package's errors, either branch: the input cannot be used
#: (an option, a file, a setting, a labeling config) or something it needs is not there (the weights, Label
#: Studio, the store, a student). 1 is a command that ran and found failures (tasks it could not predict, a
#: doctor's FAIL), 3 a training already running; an unexpected exception exits 1 with its traceback.
ERROR_STATUS = 2


def report(error: MaskCLIPError) -> int:
    """Log ``error`` as one line (its subject and message; the traceback too at ``--log-level DEBUG``);
    :data:`ERROR_STATUS`."""
    log.error("%s", error.describe(), exc_info=log.isEnabledFor(logging.DEBUG))
    return ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
