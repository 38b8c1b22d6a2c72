"""Interactive prompting latency on ViT-B/16 (random weights: the speed does not depend on them).

Three measurements:

- **in process** (default): the first prompt on each of ``--repeats`` images (decode + image tower + prompt),
  then a repeated click, a box and a new phrase on each, through the backend object (no HTTP);

      python benchmarks/bench_interactive.py [--device cpu|cuda] [--repeats 20] [--labels 20] [--preset naclip]

- **the levers** (``--levers``): a click's image tower on ``--repeats`` new photos in fp32 and in bf16, with 1
  and 2 torch threads, interleaved; with bf16's distance from fp32 (run it with ``OMP_WAIT_POLICY=ACTIVE``
  and ``PASSIVE`` to compare the wait policies);

      python benchmarks/bench_interactive.py --levers --repeats 8

- **after a restart** (``--restarts N``): what an annotator meets each time the backend starts. The backend
  is served as in production (``labelstudio-maskclip serve``: gunicorn, one worker, the default preset, 20
  labels whose text was prepared at ``/setup`` and kept in ``MODEL_DIR``); it is stopped and started ``N``
  times, and each time, once ``/health`` says the model is ready, a first click on a new photo, a repeated
  click on it and a new phrase are timed, through Label Studio's ``/api/ml/{id}/interactive-annotating``
  (``--via label-studio``, Label Studio 1.23.2 started here) or straight to the backend's ``/predict`` as
  Label Studio forwards them (``--via backend``, photos from a loopback file host);

      python benchmarks/bench_interactive.py --restarts 5 [--via backend|label-studio] [--out FILE.md]

Prints markdown tables (median and worst in ms); ``--out`` appends them to a file.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The served configuration's OpenMP wait policy (``serve`` sets it for its workers), before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import requests  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from labelstudio_maskclip.evaluation.class_names import VOC20  # noqa: E402
from labelstudio_maskclip.serving.backend import MaskCLIPBackend  # noqa: E402
from labelstudio_maskclip.settings import Settings  # noqa: E402
from tests.photos import COCO128_PHOTOS  # noqa: E402

PHOTOS = sorted(COCO128_PHOTOS.glob("*.jpg"))
LABEL_STUDIO_LIMIT = 100.0  # seconds Label Studio waits for an interactive answer


def config(labels: list[str]) -> str:
    tags = "".join(f'<Label value="{name}"/>' for name in labels)
    return f"""<View><Image name="image" value="$image"/>
<TextArea name="prompt" toName="image"/>
<KeyPointLabels name="click" toName="image">{tags}</KeyPointLabels>
<RectangleLabels name="box" toName="image">{tags}</RectangleLabels>
<BrushLabels name="tag" toName="image">{tags}</BrushLabels>
</View>"""


def project_labels(n: int) -> list[str]:
    return (["car", "person", "dog"] + [name for name in VOC20 if name not in ("car", "person", "dog")])[:n]


def click(x: float, y: float) -> dict:
    return {"type": "keypointlabels", "from_name": "click", "to_name": "image", "is_positive": True,
            "value": {"x": x, "y": y, "keypointlabels": ["car"]}}  # fmt: skip


def box(x: float, y: float) -> dict:
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": x, "y": y, "width": 30, "height": 30, "rectanglelabels": ["car"]}}  # fmt: skip


def phrase(text: str) -> dict:
    return {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}}


def table(rows: list[tuple[str, list[float]]]) -> str:
    lines = ["| prompt | median ms | worst ms | n |", "|---|---|---|---|"]
    lines += [f"| {name} | {statistics.median(ms):.0f} | {max(ms):.0f} | {len(ms)} |" for name, ms in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


# -- in process -------------------------------------------------------------------------------------------


def in_process(args: argparse.Namespace) -> str:
    settings = Settings(pretrained="random", allow_random=True, device=args.device, model_dir=tempfile.mkdtemp(),
                        polygons=False, preset=args.preset)  # fmt: skip
    labels = project_labels(args.labels)
    backend = MaskCLIPBackend(settings, "1", config(labels))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tasks = [{"id": i, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()}}
             for i, p in enumerate(PHOTOS[: args.repeats + 1])]  # fmt: skip
    backend.rt.warm_up()  # what the server does when a worker starts
    backend.predict([tasks[-1]], {"result": [click(50, 50)]})  # labels' text (random weights: not on disk)

    def timed(task: dict, item: dict) -> float:
        sync()
        start = time.perf_counter()
        backend.predict([task], {"result": [item]})
        sync()
        return 1000 * (time.perf_counter() - start)

    first = [timed(t, click(50, 50)) for t in tasks[:-1]]  # a new image each time: cache miss
    again = [timed(t, click(30 + i % 40, 60)) for i, t in enumerate(tasks[:-1])]  # same images: cache hits
    boxes = [timed(t, box(20, 20)) for t in tasks[:-1]]  # a box runs the tower on its crop
    phrases = [timed(t, phrase(f"thing number {i}")) for i, t in enumerate(tasks[:-1])]
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    return (
        f"In process: ViT-B/16 (random weights), preset {settings.preset} (short side {settings.short_side}), "
        f"{len(labels)} labels, {device}, image tower in {backend.rt.interactive_dtype or 'the model dtype'}; "
        f"{machine()}\n\n"
        + table(
            [
                ("first click on an image", first),
                ("repeated click (cache hit)", again),
                ("box", boxes),
                ("new phrase (one short text pass, cached image)", phrases),
            ]
        )  # fmt: skip
    )


# -- the levers, one at a time ----------------------------------------------------------------------------


def levers(args: argparse.Namespace) -> str:
    """A click's image tower on new photos, fp32 vs bf16 (autocast) and 1 vs 2 torch threads, interleaved so
    that the machine's load falls on each alike; with bf16's distance from fp32 (features, click masks)."""
    import numpy as np
    from PIL import Image

    from labelstudio_maskclip.engine import prompts
    from labelstudio_maskclip.models import segment_options, shared_maskclip

    settings = Settings(pretrained="random", allow_random=True, device="cpu", model_dir=tempfile.mkdtemp())
    seg, opts = shared_maskclip(settings), segment_options(settings)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS[: args.repeats]]
    text = torch.nn.functional.normalize(torch.randn(args.labels + 1, seg.clip.model.visual.output_dim), dim=-1)
    prompts.encode_image(seg, images[0], opts, torch.bfloat16)  # first calls: kernels, allocator
    prompts.encode_image(seg, images[0], opts)
    times: dict[tuple[int, str], list[float]] = {}
    worst_diff, worst_iou = 0.0, 1.0
    for image in images:
        dense = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                start = time.perf_counter()
                dense[name] = prompts.encode_image(seg, image, opts, dtype)
                times.setdefault((threads, name), []).append(1000 * (time.perf_counter() - start))
        worst_diff = max(worst_diff, float((dense["fp32"].features - dense["bf16"].features).abs().max()))
        centre = [(image.shape[1] / 2, image.shape[0] / 2)]
        a, b = (prompts.click_mask(d, prompts.grid_probs(d, text, opts)[0], centre)[0] for d in dense.values())
        worst_iou = min(worst_iou, float((a & b).sum() / (a | b).sum()))
    policy = os.environ.get("OMP_WAIT_POLICY", "not set (spinning)")
    return (
        f"A click's image tower (ViT-B/16, random weights, preset {settings.preset}, short side "
        f"{settings.short_side}), {len(images)} photos, OMP_WAIT_POLICY {policy}; {machine()} at the end\n\n"
        + table([(f"{threads} thread{'s' * (threads > 1)}, {name}", ms) for (threads, name), ms in times.items()])
        + f"\nbf16 vs fp32: largest feature difference {worst_diff:.2e} (unit vectors), smallest click-mask IoU "
        f"{worst_iou:.4f}\n"
    )


# -- after a restart, served ------------------------------------------------------------------------------


def _through_label_studio(api, ml_id: int, task_id: int, items: list[dict]) -> dict:
    """The prediction Label Studio hands the editor for this context."""
    return api.request("POST", f"/api/ml/{ml_id}/interactive-annotating",
                       json={"task": task_id, "context": {"result": items}})["data"]  # fmt: skip


def _to_backend(url: str, cfg: str, task: dict, items: list[dict]) -> dict:
    """The backend's prediction for this context, asked as Label Studio forwards it."""
    body = {"tasks": [task], "label_config": cfg, "project": "1", "params": {"context": {"result": items}}}
    reply = requests.post(url + "/predict", json=body, timeout=LABEL_STUDIO_LIMIT)
    reply.raise_for_status()
    return reply.json()["results"][0]


def _timed(ask, items: list[dict]) -> tuple[float, dict]:
    start = time.perf_counter()
    reply = ask(items)
    return 1000 * (time.perf_counter() - start), reply


def after_restarts(args: argparse.Namespace) -> str:
    import open_clip

    from tests.served import FileHost, start_backend, wait_for

    work = Path(tempfile.mkdtemp(prefix="bench-interactive-"))
    weights = work / "vit_b16_random.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-16").state_dict(), weights)
    labels = project_labels(args.labels)
    cfg = config(labels)
    env = {  # the default preset: no override of what it governs
        "LOG_LEVEL": "INFO", "MASKCLIP_SHORT_SIDE": "", "MASKCLIP_TEMPLATES": "", "MASKCLIP_MIN_AREA": "0.0005",
    }  # fmt: skip
    server: object
    if args.via == "label-studio":
        from tests.labelstudio import LabelStudioServer

        server = LabelStudioServer(work / "ls", start_timeout=900)
        server.start()
        url, env["LABEL_STUDIO_API_KEY"] = server.url, server.token
        api = server.api()
        project = api.create_project("bench interactive", cfg)
        api.import_files(project["id"], PHOTOS[: args.restarts])
        tasks = sorted(api.list_tasks(project["id"], fields_all=False), key=lambda t: t["id"])
    else:
        server = FileHost(COCO128_PHOTOS)
        url = server.url
        tasks = [{"id": i + 1, "data": {"image": f"/data/upload/{p.name}"}} for i, p in enumerate(PHOTOS)]
    rows: dict[str, list[float]] = {"ready": [], "first": [], "again": [], "phrase": []}
    try:
        for run in range(args.restarts + 1):
            started = time.monotonic()
            backend = start_backend(work / "backend", "ViT-B-16", str(weights), url, workers=1, extra_env=env,
                                    timeout=900)  # fmt: skip
            ready = time.monotonic() - started
            try:
                task = tasks[max(0, run - 1)]  # a new photo after each restart
                if args.via == "label-studio":
                    ml = api.connect_ml_backend(project["id"], backend.url, title=f"run {run}", is_interactive=True)
                    ask = functools.partial(_through_label_studio, api, ml["id"], task["id"])
                else:
                    requests.post(backend.url + "/setup", json={"project": "1", "schema": cfg}, timeout=30)
                    ask = functools.partial(_to_backend, backend.url, cfg, task)
                if run == 0:  # the labels' text, prepared at /setup and kept in MODEL_DIR for every later start
                    store = backend.model_dir / "text_embeddings"
                    wait_for(lambda: len(list(store.glob("*.pt"))) >= 2, 1800, "the labels prepared at /setup")
                    print(f"labels prepared; backend ready {ready:.1f} s after start", flush=True)
                    continue
                first, reply = _timed(ask, [click(50, 50)])
                assert reply["result"], f"no mask for the first click: {reply}"
                again, reply = _timed(ask, [click(40, 60)])
                assert reply["result"], f"no mask for the repeated click: {reply}"
                said, reply = _timed(ask, [phrase(f"thing {uuid.uuid4().hex[:8]}")])
                assert reply["result"] or "found nowhere" in reply["notes"][0], reply
                for name, ms in (("ready", 1000 * ready), ("first", first), ("again", again), ("phrase", said)):
                    rows[name].append(ms)
                print(f"restart {run}: ready {ready:.1f} s, first click {first:.0f} ms, repeated click {again:.0f} ms, "
                      f"new phrase {said:.0f} ms ({machine()})", flush=True)  # fmt: skip
            finally:
                backend.stop()
    finally:
        server.stop()  # type: ignore[attr-defined]
    where = ("Label Studio 1.23.2's /api/ml/{id}/interactive-annotating" if args.via == "label-studio"
             else "the backend's /predict (as Label Studio forwards it)")  # fmt: skip
    return (
        f"After a restart, through {where}: ViT-B/16 (random weights), default preset, {len(labels)} labels "
        f"prepared at /setup, one gunicorn worker, {args.restarts} restarts; {machine()} at the end\n\n"
        + table(
            [
                ("backend start -> /health ready (model loaded, warmed up)", rows["ready"]),
                ("first click after the restart (new image)", rows["first"]),
                ("repeated click (cached image)", rows["again"]),
                ("new phrase (4 templates, cached image)", rows["phrase"]),
            ]
        )  # fmt: skip
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20, help="in process: images")
    parser.add_argument("--preset", default="naclip", help="in process: MASKCLIP_PRESET (engine/presets.py)")
    parser.add_argument("--labels", type=int, default=20, help="labels in the project (COCO names, 'car' first)")
    parser.add_argument("--restarts", type=int, default=0, help="served: restarts measured (0: in process)")
    parser.add_argument("--via", choices=("backend", "label-studio"), default="backend")
    parser.add_argument("--levers", action="store_true", help="in process: fp32/bf16 x 1/2 threads, interleaved")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = after_restarts(args) if args.restarts else levers(args) if args.levers else in_process(args)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"{stamp}, `{' '.join(['python', 'benchmarks/bench_interactive.py', *sys.argv[1:]])}`\n\n{text}"
    print(text)
    if args.out:
        with args.out.open("a") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
