"""One benchmark entry point: the segment path, the HTTP path, the brush RLE codec, a training step.

    python benchmarks/run.py --quick --out BENCHMARKS.md              # CPU, a few minutes
    python benchmarks/run.py --device cuda --out BENCHMARKS-gpu.md    # the GPU targets

(a) ``MaskCLIP.segment`` on ViT-B/16 (random weights: speed does not depend on them): 512x512 photos
resized to 448, 21 and 171 labels, upsampling to 512x512 and the argmax included; images/s and
single-image latency. (b) ``/predict`` through gunicorn with the tiny test model and with ViT-B/16:
single-task latency p50 and throughput with concurrent clients. (c) the brush RLE codec against the SDK's
(benchmarks/bench_codecs.py). (d) one student training step (benchmarks/bench_train.py).

Method: warm-up first, CUDA synchronised before the clock is read,
medians of repeated runs, and ratios only between figures of the same run. Text embeddings are computed
in the warm-up (cached per label set), so (a) times the image side only. ``--out`` appends one section
(machine, date, exact command, a table per benchmark) to a markdown file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench_codecs / bench_train, and tests.served / tests.tiny

from bench_codecs import bench as bench_codec  # noqa: E402
from bench_codecs import coco_mask, disc_mask, noise_mask

from labelstudio_maskclip.engine.segmenter import MaskCLIP, SegmentOptions, _finalize_all  # noqa: E402
from labelstudio_maskclip.evaluation.class_names import COCO_STUFF171, VOC20  # noqa: E402

PHOTOS = HERE.parent / "tests" / "data" / "coco128-seg" / "images"
LABELS = {21: ("background",) + VOC20, 171: COCO_STUFF171}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (``repeats`` timed calls after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def photos(n: int, size: int = 512) -> list[np.ndarray]:
    """n real COCO128 photos resized to size x size, (H, W, 3) uint8 RGB (cycled if n > 128)."""
    from PIL import Image

    files = sorted(PHOTOS.glob("*.jpg"))
    return [np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((size, size))) for i in range(n)]


# --- (a) the segment path ------------------------------------------------------------------------------


def bench_segment(
    device: torch.device,
    quick: bool,
    compiled: bool = False,
    compile_batches: tuple[int, ...] = (1, 16, 64),
    eager: bool = True,
) -> list[str]:
    """Images/s of the segment path; ``compiled`` adds rows with the image tower through ``torch.compile``
    (``MASKCLIP_COMPILE``), compiled in the warm-up of each of ``compile_batches``."""
    cuda = device.type == "cuda"
    precisions = ["bf16", "fp32"] if cuda else ["fp32"]
    batches = [1, 16, 64] if cuda else [1, 16]
    repeats = {1: 3 if quick else 10, 16: 1 if quick else 3, 64: 5} if not cuda else {1: 50, 16: 20, 64: 10}
    rows = [
        "| model | precision | compiled | labels | batch | images/s | ms per batch (median) | runs |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    variants = ([(p, False) for p in precisions] if eager else []) + ([(precisions[0], True)] if compiled else [])
    for precision, compile_ in variants:
        seg = MaskCLIP.load(
            "ViT-B-16", "random", str(device), precision, allow_random=True, templates="simple", compile=compile_
        )
        sizes = compile_batches if compile_ else (batches if precision == "bf16" or not cuda else [1, 16])
        for batch in sizes:
            images = photos(batch)
            opts = SegmentOptions(short_side=448, batch_size=batch)
            for n_labels, names in LABELS.items():
                run = lambda: seg.segment(images, names, opts=opts)  # noqa: E731
                warm = 1 if (batch == 1 or cuda or not quick) else 0  # CPU --quick: batch 1 warmed the model up
                warm = max(warm, 2 if compile_ else 0)  # compiling happens in the first calls
                t = statistics.median(timed(run, device, repeats[batch], warmup=warm))
                rows.append(f"| ViT-B/16 (random) | {precision} | {'yes' if compile_ else 'no'} | {n_labels} | "
                            f"{batch} | {batch / t:.2f} | {t * 1e3:.1f} | {repeats[batch]} |")  # fmt: skip
                print(rows[-1], flush=True)
        del seg
        if cuda:
            torch.cuda.empty_cache()
    return rows


def check_bf16(device: torch.device) -> list[str]:
    """bf16 engine vs fp32 on the same weights and inputs: relative error of the dense logits and grid
    probabilities, and the fraction of pixels given the same label (fresh random photos each call)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(1)
    fp32 = MaskCLIP.load("ViT-B-16", "random", str(device), "fp32", allow_random=True, templates="simple")
    bf16 = MaskCLIP.load("ViT-B-16", "random", str(device), "bf16", allow_random=True, templates="simple")
    bf16.clip.model.load_state_dict(fp32.clip.model.state_dict())  # the same weights (cast to bf16)
    bf16.clip.model.to(bf16.clip.dtype)
    rows = [
        "| labels | rel. error dense logits | rel. error grid probs | pixels same label | NaN |",
        "|---:|---:|---:|---:|---|",
    ]
    images = photos(8)
    rng = np.random.default_rng(int(time.time()))
    images = [images[i] for i in rng.permutation(len(images))]
    for n_labels, names in LABELS.items():
        emb = fp32.text_embeddings(names)
        pixels = fp32.preprocess(images, (448, 448))
        ref, out = fp32.dense_logits(pixels, emb), bf16.dense_logits(pixels, emb)
        opts = SegmentOptions(short_side=448, batch_size=8)
        p_ref, p_out = fp32.grid_probs(pixels, emb, opts), bf16.grid_probs(pixels, emb, opts)
        labels_ref = [s.labels for s in fp32.segment(images, names, opts=opts)]
        labels_out = [s.labels for s in bf16.segment(images, names, opts=opts)]
        same = np.mean([np.mean(a == b) for a, b in zip(labels_ref, labels_out)])
        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        nan = bool(torch.isnan(out).any() or torch.isnan(p_out).any())
        rows.append(f"| {n_labels} | {rel(out, ref):.2e} | {rel(p_out, p_ref):.2e} | {same:.4f} | {nan} |")
        print(rows[-1], flush=True)
        assert not nan and rel(out, ref) < 2e-2, f"bf16 dense logits off by {rel(out, ref):.2e} (> 2e-2) or NaN"
    return rows


def bench_stages(device: torch.device) -> list[str]:
    """Where a batch of 64 goes on the segment path (bf16 on CUDA, 21 labels, 512x512 photos at 448):
    preprocessing, the model (dense logits), grid probabilities, and the whole ``segment`` (the difference
    is the finalize: upsampling, argmax, areas and the copy to the CPU), and the finalize of those grid
    probabilities alone, image by image and the batch at once (``_finalize_all``)."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    seg = MaskCLIP.load("ViT-B-16", "random", str(device), precision, allow_random=True, templates="simple")
    batch = 64 if device.type == "cuda" else 4
    images, names = photos(batch), LABELS[21]
    emb = seg.text_embeddings(names)
    pixels = seg.preprocess(images, (448, 448))
    opts = SegmentOptions(short_side=448, batch_size=batch)
    grid = seg.grid_probs(pixels, emb, opts)
    sizes = [(int(img.shape[0]), int(img.shape[1])) for img in images]
    stages = [
        ("preprocess (uint8 photos -> normalised 448 x 448 on the device)", lambda: seg.preprocess(images, (448, 448))),
        ("dense logits (the model)", lambda: seg.dense_logits(pixels, emb)),
        ("grid probabilities", lambda: seg.grid_probs(pixels, emb, opts)),
        ("finalize one by one (the CPU's way)", lambda: _finalize_all(grid, sizes, 21, 0.0, together=False)),
        ("finalize together (the GPU's way)", lambda: _finalize_all(grid, sizes, 21, 0.0, together=True)),
        ("segment (all of it, label maps on the CPU)", lambda: seg.segment(images, names, opts=opts)),
    ]
    rows = [f"| stage ({precision}, batch {batch}, 21 labels) | ms per batch (median of 5) |", "|---|---:|"]
    for title, fn in stages:
        rows.append(f"| {title} | {statistics.median(timed(fn, device, 5)) * 1e3:.1f} |")
        print(rows[-1], flush=True)
    return rows


# --- (b) the HTTP path ---------------------------------------------------------------------------------


def bench_http(device: torch.device, quick: bool, http_workers: int = 0) -> list[str]:
    import requests

    from tests.served import BRUSH, FileHost, start_backend
    from tests.tiny import TINY_VIT, save_random_state

    cuda = device.type == "cuda"
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    files = work / "files"
    files.mkdir()
    names = [p.name for p in sorted(PHOTOS.glob("*.jpg"))[:16]]
    for name in names:
        (files / name).write_bytes((PHOTOS / name).read_bytes())
    host = FileHost(files)
    tiny = save_random_state(TINY_VIT, work / "tiny.pt")
    vit_b16 = work / "vit_b16_random.pt"  # random weights in a file: text embeddings are stored and shared
    import open_clip

    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-16").state_dict(), vit_b16)
    dev = {"MASKCLIP_DEVICE": str(device)}
    setups = [
        ("tiny ViT (random), short side 64", TINY_VIT, str(tiny), {**dev}, (20, 4, 5, 4) if quick else (50, 8, 5, 8)),
        (
            "ViT-B/16 (random), short side 448",
            "ViT-B-16",
            str(vit_b16),
            {**dev, "MASKCLIP_SHORT_SIDE": "448"},
            (3, 2, 1, 2) if quick and not cuda else ((6, 2, 2, 4) if not cuda else (50, 16, 4, 64)),
        ),
    ]  # (single-task requests, clients, requests per client, tasks per request)
    workers = http_workers or (4 if cuda else 2)
    rows = ["| model | workers | single-task p50 ms | p95 ms | clients x requests x tasks | tasks/s | request p50 ms | p99 ms |",
            "|---|---:|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for title, model, pretrained, env, (singles, clients, per_client, tasks) in setups:
        backend = start_backend(work / model.replace("/", "_")[-20:], model, pretrained, host.url, workers=workers,
                                extra_env={**env, "LOG_LEVEL": "WARNING", "MASKCLIP_BATCH_SIZE": "64"})  # fmt: skip
        try:

            def predict(k: int, n: int) -> float:
                body = {"tasks": [{"id": k * 1000 + i, "data": {"image": "/" + names[(k + i) % len(names)]}}
                                  for i in range(n)], "label_config": BRUSH}  # fmt: skip
                start = time.perf_counter()
                r = requests.post(backend.url + "/predict", json=body, timeout=300)
                elapsed = time.perf_counter() - start
                assert r.status_code == 200 and all(r.json()["results"]), r.text[:500]
                return elapsed

            # Label Studio calls /setup on connect: the labels' text embeddings are prepared in the background
            # (one worker computes, the others read its file); /predict answers "still preparing" until then.
            requests.post(backend.url + "/setup", json={"schema": BRUSH}, timeout=30).raise_for_status()

            def ready() -> bool:
                body = {"tasks": [{"id": 0, "data": {"image": "/" + names[0]}}], "label_config": BRUSH}
                return all(requests.post(backend.url + "/predict", json=body, timeout=300).json()["results"])

            deadline = time.monotonic() + 600
            while not ready() and time.monotonic() < deadline:
                time.sleep(1)
            with ThreadPoolExecutor(2 * workers) as pool:  # warm-up: every worker has its model and labels
                for _ in range(3):
                    list(pool.map(lambda k: ready(), range(4 * workers)))
            single = [predict(i, 1) for i in range(singles)]  # one at a time: the latency of one task
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = [t for ts in pool.map(lambda c: [predict(c, tasks) for _ in range(per_client)], range(clients))
                       for t in ts]  # fmt: skip
            wall = time.perf_counter() - start
        finally:
            backend.stop()
        rows.append(
            f"| {title} | {workers} | {statistics.median(single) * 1e3:.0f} | {percentile(single, 95) * 1e3:.0f} | "
            f"{clients} x {per_client} x {tasks} | {clients * per_client * tasks / wall:.1f} | "
            f"{statistics.median(lat) * 1e3:.0f} | {percentile(lat, 99) * 1e3:.0f} |"
        )
        print(rows[-1], flush=True)
    host.stop()
    return rows


# --- (c) codecs and (d) training ---------------------------------------------------------------------


def bench_codecs(quick: bool) -> list[str]:
    stem, real = coco_mask()
    rows = ["| mask | RLE bytes | encode ours ms | encode SDK ms | speed-up | decode ours ms | decode SDK ms | speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    cases = [("disc 1024x1024", disc_mask(1024)), ("noise 512x512 (p=0.5)", noise_mask(512)),
             (f"COCO128 {stem} union 640x480", real)]  # fmt: skip
    for name, mask in cases:
        rows += bench_codec(name, mask, 3 if quick else 7)
        print(rows[-1], flush=True)
    return rows


def bench_training(device: torch.device, quick: bool) -> list[str]:
    args = ["--device", str(device)]
    if device.type != "cuda":
        args += ["--crop", "128", "--batch", "2", "--steps", "3" if quick else "10", "--warmup", "1"]
    out = subprocess.run([sys.executable, str(HERE / "bench_train.py"), *args], capture_output=True, text=True,
                         timeout=600, check=True)  # fmt: skip
    rows = [line for line in out.stdout.splitlines() if line.startswith("|")]
    print("\n".join(rows[2:]), flush=True)
    return rows + ["", f"(`python benchmarks/bench_train.py {' '.join(args)}`)"]


# --- report ------------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}; device {device}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small counts (CPU: the whole run in a few minutes)")
    p.add_argument(
        "--only",
        default="segment,bf16,http,codecs,train",
        help="comma-separated subset of: segment, stages, bf16 (CUDA only), http, codecs, train",
    )
    p.add_argument("--compile", action="store_true", help="segment path: also with torch.compile")
    p.add_argument("--compile-batches", default="1,16,64", help="segment path: batch sizes compiled (comma-separated)")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="segment path: eager rows")
    p.add_argument("--workers", type=int, default=0, help="HTTP path: gunicorn workers (default: 4 on CUDA, 2 on CPU)")
    p.add_argument("--out", help="append the results as a markdown section to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    only = set(args.only.split(","))
    compile_batches = tuple(int(b) for b in args.compile_batches.split(","))
    sections = []
    runs = [
        ("segment", "(a) Segment path: `MaskCLIP.segment`, 512x512 photos -> 448 -> upsampled to 512x512 + argmax "
         "(templates `simple`, text embeddings cached)", lambda: bench_segment(device, args.quick, args.compile, compile_batches, args.eager)),
        ("stages", "Segment path by stage", lambda: bench_stages(device)),
        ("bf16", "Engine bf16 vs fp32 (same weights, 8 photos at 448x448, TF32 off)", lambda: check_bf16(device)),
        ("http", "(b) HTTP path: `/predict` through gunicorn (asgi worker, 4 threads per worker), 640x480 photos "
         "from a loopback file host, 3 labels", lambda: bench_http(device, args.quick, args.workers)),
        ("codecs", "(c) Brush RLE codec vs label-studio-sdk (medians)", lambda: bench_codecs(args.quick)),
        ("train", "(d) Student training step (forward + loss + backward + SGD)", lambda: bench_training(device, args.quick)),
    ]  # fmt: skip
    started = time.perf_counter()
    for key, title, run in runs:
        if key not in only or (key == "bf16" and device.type != "cuda"):
            continue
        print(f"\n### {title}", flush=True)
        t0 = time.perf_counter()
        rows = run()
        sections.append(f"### {title}\n\n" + "\n".join(rows) + f"\n\n({time.perf_counter() - t0:.0f} s)\n")
    header = (
        f"## {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: {device.type}{' (quick)' if args.quick else ''}\n\n"
        f"- machine: {machine(device)}\n- command: `{' '.join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])}`\n"
        f"- total: {time.perf_counter() - started:.0f} s\n"
    )  # fmt: skip
    report = header + "\n" + "\n".join(sections)
    print("\n" + report)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
