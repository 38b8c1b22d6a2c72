"""Where bulk ``preannotate`` spends its time, stage by stage, against a real Label Studio; and the baseline.

    python benchmarks/bench_preannotate_stages.py --tasks 300 --repeats 2 --out BENCHMARKS.md

Starts Label Studio (``LABEL_STUDIO_VENV``, see tests/labelstudio.py) on loopback and a loopback file host of
coco128 photos (downscaled to ``--image-side``); the tiny random-weight test model (tests/assets, short side 64).
Each repeat, on fresh projects of ``--tasks`` tasks:

- **baseline**: the same number of precomputed predictions (this model's, on these photos) posted one by one
  with ``POST /api/predictions`` over one keep-alive session, and nothing else;
- **bulk**: ``labelstudio-maskclip preannotate --project N`` (this checkout's CLI), from process start to exit,
  model loading included; its summary's busy seconds per stage (threads summed, stages overlapping).

Once, in this process, each stage alone and one after the other (so that the shares add up): Python start and
imports (a bare ``python -c 'import ...'``), model and text embeddings, task listing (light keyset pages and
the counts), image download (one thread), decode, the model on batches, mask encoding (brush RLE), posting in
bulk, the duplicate sweep, the live-version update. The settle wait is zero unless a write is answered
ambiguously (none is here). Every bulk run is checked: exactly one prediction per task, of the model's version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO)]

from benchmarks.bench_preannotate import PHOTOS, export_ref, make_project, one_prediction_each  # noqa: E402
from tests.labelstudio import LabelStudioServer  # noqa: E402
from tests.photos import COCO128_PHOTOS  # noqa: E402
from tests.served import FileHost  # noqa: E402
from tests.tiny import TINY_VIT, save_random_state  # noqa: E402


def environment(ls, weights: Path, model_dir: Path) -> dict[str, str]:
    return {**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "MASKCLIP_MODEL": TINY_VIT,
            "MASKCLIP_PRETRAINED": str(weights), "MASKCLIP_DEVICE": "cpu", "MASKCLIP_SHORT_SIDE": "64",
            "MASKCLIP_TEMPLATES": "simple", "MASKCLIP_MIN_AREA": "0", "MASKCLIP_ALLOW_PRIVATE_URLS": "true",
            "MODEL_DIR": str(model_dir), "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}  # fmt: skip


def run_bulk(env: dict[str, str], project: int, tree: Path = REPO) -> tuple[float, dict]:
    """Seconds of ``labelstudio-maskclip preannotate`` (the package under ``tree``) from start to exit, and
    its summary."""
    cmd = [sys.executable, "-m", "labelstudio_maskclip", "preannotate", "--project", str(project)]
    start = time.monotonic()
    # cwd: python -m puts the working directory first on sys.path, which must be the tree under test
    proc = subprocess.run(cmd, env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True, cwd=tree)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout.strip().splitlines()[-1])


def run_baseline(ls, project: int, preds: list[dict]) -> float:
    """Seconds to post ``preds`` (one per task of ``project``, in id order) one by one."""
    session = requests.Session()
    session.headers["Authorization"] = f"Token {ls.token}"
    ids = sorted(t["id"] for t in ls.api().list_tasks(project, fields_all=False))
    start = time.monotonic()
    for task, pred in zip(ids, preds):
        session.post(f"{ls.url}/api/predictions", json={**pred, "task": task}, timeout=120).raise_for_status()
    return time.monotonic() - start


def stages(
    ls, env: dict[str, str], project: int, batch: int, upload_batch: int, before_images: int
) -> tuple[dict, list[dict]]:
    """Seconds of each stage alone, in order, on ``project`` (fresh), and the predictions made."""
    t: dict[str, float] = {}
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import labelstudio_maskclip.cli, torch, open_clip, requests"], env=env,
                   check=True, cwd=REPO)  # fmt: skip
    t["python start + imports"] = time.monotonic() - start

    import torch

    from labelstudio_maskclip.fetching.decode import decode_image
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI
    from labelstudio_maskclip.labelstudio.regions import prediction
    from labelstudio_maskclip.models import segment_options
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend
    from labelstudio_maskclip.settings import Settings

    settings = Settings.from_env(env)
    start = time.monotonic()
    api = LabelStudioAPI.from_settings(settings)
    config = api.project(project)["label_config"]
    backend = MaskCLIPBackend(settings, str(project), config)
    spec = backend.spec()
    vocab, classes = backend.classes(spec)
    version, model = backend.rt.model_for(classes)
    assert model is not None
    opts = segment_options(settings)
    t["model + text embeddings"] = time.monotonic() - start

    start = time.monotonic()
    api.model_versions(project)
    api.count_tasks(project)
    api.count_tasks(project, without_version=version)
    tasks = [task for page in api.task_pages(project, without_version=version) for task in page]
    t["list tasks"] = time.monotonic() - start

    key = spec.image_keys[0]
    fetcher = backend.rt.fetcher
    start = time.monotonic()
    blobs = [fetcher.fetch(task["data"][key], task["id"]) for task in tasks]
    t["fetch images (1 thread)"] = time.monotonic() - start
    start = time.monotonic()
    images = [decode_image(b, max_pixels=settings.max_image_pixels) for b in blobs]
    t["decode"] = time.monotonic() - start
    start = time.monotonic()
    model.segment(images[:1], classes, opts=opts)  # the labels' text embeddings, computed once
    t["model + text embeddings"] += time.monotonic() - start
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    few = chunks[: max(1, before_images // batch)]  # the old way is slow under load: on a share of the images
    start = time.monotonic()
    for chunk in few:
        model.segment(chunk, classes, opts=opts)
    n_few = sum(len(c) for c in few)
    t[f"model, torch's {torch.get_num_threads()} threads per op (before; {n_few} images, x{len(images) / n_few:g})"] = (
        (time.monotonic() - start) * len(images) / n_few
    )
    workers = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        segs = [s for out in pool.map(lambda c: model.segment(c, classes, opts=opts), chunks) for s in out]
    t[f"model, batches of {batch}, {workers} threads side by side, 1 thread per op"] = time.monotonic() - start
    torch.set_num_threads(workers)
    targets = spec.predicted_targets
    start = time.monotonic()
    preds = [{"task": int(task["id"]), **prediction(seg, targets, vocab, version, min_area=settings.min_area,
                                                    polygons=settings.polygons)} for task, seg in zip(tasks, segs)]  # fmt: skip
    t["encode masks"] = time.monotonic() - start
    start = time.monotonic()
    for i in range(0, len(preds), upload_batch):
        api.import_predictions(project, preds[i : i + upload_batch])
    t["post (bulk)"] = time.monotonic() - start
    start = time.monotonic()
    api.duplicated_predictions(project, version)
    t["duplicate sweep"] = time.monotonic() - start
    start = time.monotonic()
    api.set_live_version(project, version)
    t["live version"] = time.monotonic() - start
    assert one_prediction_each(ls.api(), project, len(tasks), version)
    return t, [{k: p[k] for k in ("result", "score", "model_version")} for p in preds]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2, help="baseline and bulk runs, alternating")
    parser.add_argument("--image-side", type=int, default=160, help="photos downscaled to this long side")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass in the stages run")
    parser.add_argument("--upload-batch", type=int, default=250)
    parser.add_argument("--before-images", type=int, default=48, help="images the old model threading is timed on")
    parser.add_argument("--before-ref", help="also time the CLI of the package as of this git ref")
    parser.add_argument("--out", help="markdown file to append a section to")
    args = parser.parse_args()

    report: dict = {"tasks": args.tasks, "baseline_s": [], "bulk_s": [], "bulk": [], "before_s": [], "before": []}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        before = export_ref(args.before_ref, tmp / "before") if args.before_ref else None
        photos = tmp / "photos"
        photos.mkdir()
        for name in PHOTOS:
            image = Image.open(COCO128_PHOTOS / name).convert("RGB")
            image.thumbnail((args.image_side, args.image_side))
            image.save(photos / name, quality=90)
        host = FileHost(photos)
        weights = save_random_state(TINY_VIT, tmp / "tiny.pt")
        load = os.getloadavg()
        with LabelStudioServer(tmp / "ls", start_timeout=900) as ls:
            api = ls.api()
            env = environment(ls, weights, tmp / "stages_model_dir")
            project = make_project(api, host.url, args.tasks, "stages")
            report["stages"], preds = stages(ls, env, project, args.batch, args.upload_batch, args.before_images)
            print("stages", json.dumps(report["stages"]), flush=True)
            runs = [("bulk", REPO)] + ([("before", before)] if before else [])
            for r in range(args.repeats):
                project = make_project(api, host.url, args.tasks, f"baseline {r}")
                report["baseline_s"].append(run_baseline(ls, project, preds))
                print("baseline", report["baseline_s"][-1], flush=True)
                for name, tree in runs:
                    project = make_project(api, host.url, args.tasks, f"{name} {r}")
                    seconds, summary = run_bulk(environment(ls, weights, tmp / f"{name}-{r}"), project, tree)
                    assert summary["predicted"] == args.tasks and not summary["failed"], summary
                    assert one_prediction_each(api, project, args.tasks, summary["model_version"])
                    report[f"{name}_s"].append(seconds)
                    report[name].append(summary)
                    print(name, seconds, json.dumps(summary), flush=True)
        host.stop()
        report["load"] = (load, os.getloadavg())
    report["ratio"] = statistics.median(report["bulk_s"]) / statistics.median(report["baseline_s"])
    print(json.dumps(report, indent=1))
    if args.out:
        append_markdown(Path(args.out), report, args)
    return 0


def append_markdown(path: Path, report: dict, args) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    st = report["stages"]
    total = sum(v for k, v in st.items() if "(before" not in k)
    base, bulk = statistics.median(report["baseline_s"]), statistics.median(report["bulk_s"])
    lines = [
        "", f"### Run of {now}", "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average "
        f"{report['load'][0][0]:.1f} at the start, {report['load'][1][0]:.1f} at the end",
        f"- command: `python benchmarks/bench_preannotate_stages.py --tasks {args.tasks} --repeats {args.repeats} "
        f"--image-side {args.image_side} --batch {args.batch} --upload-batch {args.upload_batch} "
        f"--before-images {args.before_images}"
        + (f" --before-ref {args.before_ref}" if args.before_ref else "") + "`",
        "", "| run | seconds (each repeat) | median |", "|---|---|---:|",
        f"| baseline: {args.tasks} precomputed predictions, one `POST /api/predictions` each | "
        f"{', '.join(f'{s:.1f}' for s in report['baseline_s'])} | {base:.1f} |",
        f"| bulk: `preannotate` CLI, start to exit | {', '.join(f'{s:.1f}' for s in report['bulk_s'])} | {bulk:.1f} |",
        "", f"Ratio bulk / one by one: **{report['ratio']:.2f}**"
        + (f" (before: {statistics.median(report['before_s']) / base:.2f})" if report["before_s"] else "") + ".", "",
        "Each stage alone, one after the other (the CLI overlaps them; the model as the CLI runs it, and the old "
        "threading for comparison, left out of the total):", "",
        "| stage | seconds | share |", "|---|---:|---:|",
    ]  # fmt: skip
    lines += [f"| {k} | {v:.2f} | {'-' if '(before' in k else f'{100 * v / total:.0f} %'} |" for k, v in st.items()]
    lines += [f"| total | {total:.2f} | 100 % |", "",
              "Busy seconds per stage inside the bulk runs (threads summed, overlapping): "
              + "; ".join(json.dumps(b.get("busy_s")) for b in report["bulk"]), ""]  # fmt: skip
    with path.open("a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
