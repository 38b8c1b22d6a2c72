"""Bulk pre-annotation against a real Label Studio: tasks/s of ``preannotate`` before and after the pipeline.

    python benchmarks/bench_preannotate.py --before-ref 680ffb7 --sizes 100 500 2000 --out BENCHMARKS.md

Starts Label Studio (``LABEL_STUDIO_VENV``, see tests/labelstudio.py) on loopback and a loopback file host
serving coco128 photos (downscaled, `--image-side`); for each size a fresh project of that many tasks (the photos
repeated) is pre-annotated with the tiny random-weight test model (short side 64) by

- **before**: the package as of ``--before-ref`` (``git archive`` into a temporary folder), its CLI;
- **after**: this checkout's CLI (pipeline, light listing, bulk writes).

Each command is timed from start to exit (model loading included), and the result is checked: every task
has exactly one prediction of the model version. Also measured once: the write routes (``POST
/api/predictions`` one by one vs ``POST /api/projects/{id}/import/predictions``), and label-studio-sdk's
calls vs plain HTTP for listing and bulk import. Appends a section to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO)]

from tests.labelstudio import LabelStudioServer  # noqa: E402
from tests.photos import COCO128_PHOTOS  # noqa: E402
from tests.served import BRUSH, FileHost  # noqa: E402
from tests.tiny import TINY_VIT, save_random_state  # noqa: E402

PHOTOS = sorted(p.name for p in COCO128_PHOTOS.glob("*.jpg"))[:16]


def export_ref(ref: str, dest: Path) -> Path:
    """The package as of git ``ref`` under ``dest`` (for PYTHONPATH)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "labelstudio_maskclip"], check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def make_project(api, host_url: str, n: int, title: str) -> int:
    project = api.create_project(title, BRUSH)
    tasks = [{"image": f"{host_url}/{PHOTOS[i % len(PHOTOS)]}?t={i}"} for i in range(n)]
    for i in range(0, n, 1000):
        api.import_tasks(project["id"], tasks[i : i + 1000])
    return project["id"]


def run_cli(pythonpath: Path, env: dict, project: int, extra: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "labelstudio_maskclip.cli", "preannotate", "--project", str(project), *extra]
    start = time.monotonic()
    # cwd: python -m puts the working directory first on sys.path, which must be the tree under test
    proc = subprocess.run(
        cmd, env={**env, "PYTHONPATH": str(pythonpath)}, capture_output=True, text=True, cwd=pythonpath
    )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout.strip().splitlines()[-1]


def _count(api, project: int, items: list[dict]) -> int:
    query = {"filters": {"conjunction": "and", "items": items}}
    body = api.request("GET", "/api/tasks", params={"project": project, "page": 1, "page_size": 1,
                                                    "fields": "task_only", "include": "id", "query": json.dumps(query)})  # fmt: skip
    return int(body["total"])


def one_prediction_each(api, project: int, n: int, version: str) -> bool:
    """Every one of the ``n`` tasks has exactly one prediction, and it is of ``version``."""
    one = [{"filter": "filter:tasks:total_predictions", "operator": "equal", "type": "Number", "value": 1}]
    lacking = [{"filter": "filter:tasks:predictions_model_versions", "operator": "not_contains", "type": "List",
                "value": [version]}]  # fmt: skip
    return _count(api, project, one) == n and _count(api, project, lacking) == 0


def light_ids(ls, project: int) -> list[int]:
    """Every task id with light keyset pages (the new listing)."""
    from labelstudio_maskclip.fetching.images import ImageFetcher
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI

    client = LabelStudioAPI(ImageFetcher(ls.url, ls.token))
    return [t["id"] for page in client.task_pages(project, page_size=1000) for t in page]


def write_routes(ls, api, host_url: str, sample_pred: dict, n: int = 200) -> dict:
    """Seconds to write ``n`` predictions one by one vs in one bulk request, and with the SDK."""
    from label_studio_sdk.client import LabelStudio

    out = {}
    project = make_project(api, host_url, n, "routes")
    ids = sorted(light_ids(ls, project))
    session = requests.Session()
    session.headers["Authorization"] = f"Token {ls.token}"
    start = time.monotonic()
    for t in ids:
        session.post(f"{ls.url}/api/predictions", json={"task": t, **sample_pred}, timeout=60).raise_for_status()
    out["one_by_one_s"] = time.monotonic() - start
    body = json.dumps([{"task": t, **sample_pred, "model_version": "bulk"} for t in ids])
    start = time.monotonic()
    r = session.post(f"{ls.url}/api/projects/{project}/import/predictions", data=body,
                     headers={"Content-Type": "application/json"}, timeout=120)  # fmt: skip
    r.raise_for_status()
    out["bulk_s"] = time.monotonic() - start
    out["bulk_created"] = r.json().get("created")
    client = LabelStudio(base_url=ls.url, api_key=ls.token, timeout=120)
    start = time.monotonic()
    client.projects.import_predictions(id=project, request=[{"task": t, **sample_pred, "model_version": "sdk"}
                                                            for t in ids])  # fmt: skip
    out["sdk_bulk_s"] = time.monotonic() - start
    out["n"] = n
    out["rle_bytes"] = len(json.dumps(sample_pred))
    return out


def listing(ls, project: int) -> dict:
    """Seconds to list every task of ``project``: fields=all pages (before), light keyset pages (after),
    and label-studio-sdk's pager (fields=task_only, include=id,data)."""
    from label_studio_sdk.client import LabelStudio

    session = requests.Session()
    session.headers["Authorization"] = f"Token {ls.token}"
    out = {}
    start = time.monotonic()
    page, total, size = 1, 0, 0
    while True:
        r = session.get(f"{ls.url}/api/tasks", params={"project": project, "page": page, "page_size": 100,
                                                       "fields": "all"}, timeout=120)  # fmt: skip
        if r.status_code == 404:
            break
        body = r.json()
        size += len(r.content)
        total += len(body["tasks"])
        if not body["tasks"] or total >= body["total"]:
            break
        page += 1
    out["fields_all_s"], out["fields_all_mb"] = time.monotonic() - start, size / 1e6
    start = time.monotonic()
    n = len(light_ids(ls, project))
    out["light_s"], out["tasks"] = time.monotonic() - start, n
    client = LabelStudio(base_url=ls.url, api_key=ls.token, timeout=120)
    start = time.monotonic()
    m = sum(1 for _ in client.tasks.list(project=project, fields="task_only", include="id,data", page_size=1000))
    out["sdk_s"], out["sdk_tasks"] = time.monotonic() - start, m
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before-ref", default="680ffb7")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--skip-before", type=int, default=10**9, help="no 'before' run at sizes above this")
    parser.add_argument("--image-side", type=int, default=160, help="photos downscaled to this long side")
    parser.add_argument("--out", help="markdown file to append a section to")
    args = parser.parse_args()

    rows, extra = [], {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        before = export_ref(args.before_ref, tmp / "before")
        photos = tmp / "photos"
        photos.mkdir()
        for name in PHOTOS:  # downscaled: the I/O path is measured, not the model on large images
            image = Image.open(COCO128_PHOTOS / name).convert("RGB")
            image.thumbnail((args.image_side, args.image_side))
            image.save(photos / name, quality=90)
        host = FileHost(photos)
        weights = save_random_state(TINY_VIT, tmp / "tiny.pt")
        with LabelStudioServer(tmp / "ls", start_timeout=900) as ls:
            api = ls.api()
            env = {**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
                   "MASKCLIP_MODEL": TINY_VIT, "MASKCLIP_PRETRAINED": str(weights), "MASKCLIP_DEVICE": "cpu",
                   "MASKCLIP_SHORT_SIDE": "64", "MASKCLIP_TEMPLATES": "simple", "MASKCLIP_MIN_AREA": "0",
                   "MASKCLIP_ALLOW_PRIVATE_URLS": "true", "MODEL_DIR": str(tmp / "model_dir"),
                   "LOG_LEVEL": "WARNING"}  # fmt: skip
            for n in args.sizes:
                row = {"tasks": n}
                for label, path, flags in (("before", before, ["--batch", "64"]), ("after", REPO, [])):
                    if label == "before" and n > args.skip_before:
                        continue
                    project = make_project(api, host.url, n, f"{label} {n}")
                    seconds, summary = run_cli(path, env, project, flags)
                    version = json.loads(summary)["model_version"]
                    ok = one_prediction_each(api, project, n, version)
                    row[label] = {"seconds": round(seconds, 1), "tasks_per_s": round(n / seconds, 2),
                                  "one_prediction_per_task": ok, "summary": json.loads(summary)}  # fmt: skip
                    print(label, n, row[label], flush=True)
                    if label == "after" and n == max(args.sizes):
                        extra["listing"] = listing(ls, project)
                        pred = api.list_predictions(min(light_ids(ls, project)))[0]
                        sample = {k: pred[k] for k in ("result", "score", "model_version")}
                        print("listing", extra["listing"], flush=True)
                rows.append(row)
            extra["routes"] = write_routes(ls, api, host.url, sample)
            print("routes", extra["routes"], flush=True)
        host.stop()
    if args.out:
        append_markdown(Path(args.out), rows, extra, args)
    print(json.dumps({"rows": rows, **extra}, indent=1, default=str))
    return 0


def append_markdown(path: Path, rows: list[dict], extra: dict, args) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "", f"## Bulk pre-annotation against Label Studio 1.23.2 ({now})", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other work while measured (figures "
        "are noisy; ratios are from the same run). Tiny random-weight model (tests/assets, short side 64), "
        f"coco128 photos downscaled to a long side of {args.image_side} px from a loopback file host, Label Studio on loopback with SQLite. Command: "
        f"`python benchmarks/bench_preannotate.py --before-ref {args.before_ref} --sizes "
        f"{' '.join(map(str, args.sizes))} --skip-before {args.skip_before} --image-side {args.image_side}`. Wall time of the CLI from start to exit, model loading included; "
        "every run checked: exactly one prediction per task.", "",
        "| tasks | before (s) | before tasks/s | after (s) | after tasks/s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        b, a = r.get("before"), r["after"]
        speed = f"{a['tasks_per_s'] / b['tasks_per_s']:.1f}x" if b else "n/a"
        bs = (f"{b['seconds']}", f"{b['tasks_per_s']}") if b else ("-", "-")
        lines.append(f"| {r['tasks']} | {bs[0]} | {bs[1]} | {a['seconds']} | {a['tasks_per_s']} | {speed} |")
    last = rows[-1]["after"]["summary"]
    lines += ["", f"Where the time goes at {rows[-1]['tasks']} tasks (after; busy seconds per stage, threads "
              f"summed, overlapping): {json.dumps(last.get('busy_s'))}, pipeline {last.get('seconds')} s.", ""]  # fmt: skip
    if "listing" in extra:
        li = extra["listing"]
        lines.append(f"Listing {li['tasks']} predicted tasks: `fields=all` pages of 100 (before) "
                     f"{li['fields_all_s']:.1f} s, {li['fields_all_mb']:.0f} MB; light keyset pages (after) "
                     f"{li['light_s']:.2f} s; label-studio-sdk `tasks.list(fields='task_only', include='id,data')` "
                     f"{li['sdk_s']:.2f} s.")  # fmt: skip
    if "routes" in extra:
        ro = extra["routes"]
        lines.append(f"Writing {ro['n']} brush predictions ({ro['rle_bytes'] / 1e3:.0f} kB each): one by one "
                     f"`POST /api/predictions` {ro['one_by_one_s']:.1f} s; one `POST /api/projects/{{id}}/import/"
                     f"predictions` {ro['bulk_s']:.1f} s (created {ro['bulk_created']}); the same through "
                     f"label-studio-sdk `projects.import_predictions` {ro['sdk_bulk_s']:.1f} s.")  # fmt: skip
    lines.append("")
    with path.open("a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
