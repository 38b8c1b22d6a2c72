"""The host side of /predict, per image per core, with the model replaced by a stand-in.

Everything a request does per image that is not the model: download (a loopback file server, in another
process, playing Label Studio), decode + EXIF, resize + normalise, upsample + argmax, masks, brush RLE (polygons optional), JSON.
The stand-in returns precomputed grid probabilities (smooth random fields, 20 labels, sharpened as
``softmax(100 * cosine)`` and prompt-denoised like MaskCLIP's), so the figures do not depend on CLIP.

    python benchmarks/bench_host.py [--images 40] [--repeats 3] [--polygons] [--profile 25] [--out FILE]

Two measurements, both in CPU seconds of this process per image (``time.process_time``, so other load on
the machine inflates them less than wall time; torch and the fetch pool use one thread each):
(1) per stage, run one after the other on one core; (2) the whole ``MaskCLIPBackend.predict`` path with the
stand-in, and its cProfile profile. On a GPU host, resize/normalise and upsample/argmax run on the device:
(1) shows what is left on the host then.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import platform
import pstats
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from labelstudio_maskclip.engine.refine import prompt_denoising  # noqa: E402
from labelstudio_maskclip.engine.segmenter import (  # noqa: E402
    _finalize,
    normalized_batch,
    resized_size,
    segment_in_batches,
)
from labelstudio_maskclip.evaluation.class_names import VOC20  # noqa: E402
from labelstudio_maskclip.fetching.images import ImageFetcher, decode_image  # noqa: E402
from labelstudio_maskclip.labelstudio.labeling import parse_label_config  # noqa: E402
from labelstudio_maskclip.labelstudio.regions import prediction  # noqa: E402
from labelstudio_maskclip.labelstudio.wire import json_bytes  # noqa: E402
from labelstudio_maskclip.serving.backend import MaskCLIPBackend, runtime  # noqa: E402
from labelstudio_maskclip.settings import Settings  # noqa: E402
from tests.photos import COCO128_PHOTOS  # noqa: E402

CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="{n}"/>' for n in VOC20)
    + '</BrushLabels><PolygonLabels name="outline" toName="image">'
    + "".join(f'<Label value="{n}"/>' for n in VOC20)
    + "</PolygonLabels></View>"
)
STRIDE = 16  # ViT-B/16
MEAN = torch.tensor([0.481, 0.458, 0.408]).view(1, 3, 1, 1)
STD = torch.tensor([0.269, 0.261, 0.276]).view(1, 3, 1, 1)


def stand_in_probs(size: tuple[int, int], labels: int, seed: int) -> torch.Tensor:
    """(labels, h, w) grid probabilities for an input of ``size``: smooth random cosine fields, a few labels
    stronger than the rest, ``softmax(100 * cosine)``, prompt denoising (what MaskCLIP's look like)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size[0] // STRIDE, size[1] // STRIDE
    coarse = torch.randn(1, labels, 4, 5, generator=gen) * 0.02
    coarse[:, torch.randperm(labels, generator=gen)[:4]] += 0.02  # the few labels "in" the photo
    cosine = 0.2 + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return prompt_denoising((100 * cosine).softmax(1))[0]


class StandIn:
    """Looks like a served model to the backend; returns precomputed probabilities (cycled per size)."""

    stride = STRIDE

    def __init__(self, short_side: int, labels: int):
        self.short_side, self.labels, self.cache, self.calls = short_side, labels, {}, 0

    def probs(self, size: tuple[int, int]) -> torch.Tensor:
        self.calls += 1
        key = (size, self.calls % 4)
        if key not in self.cache:
            self.cache[key] = stand_in_probs(size, self.labels, hash(key) % 1000)
        return self.cache[key]

    def segment(self, images, classes, opts=None, progress=None, text=None):
        return segment_in_batches(
            images,
            lambda h, w: resized_size(h, w, self.short_side, STRIDE, 64),
            lambda batch, size: torch.stack([self.probs(size) for _ in batch]),
            n_labels=len(classes),
            batch_size=16,
            min_confidence=0.0,
        )


class FileServer:
    """Label Studio's file host played by a static file server in another process, so that this process's
    CPU time is the backend's side of each download only."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("the file server did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def cpu_per_image(fn, n: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) / n


def stages(photos: list[bytes], urls: list[str], fetcher: ImageFetcher, polygons: bool, repeats: int) -> dict:
    """Median CPU ms per image of each host stage, run one after the other."""
    spec = parse_label_config(CONFIG)
    targets = [t for t in spec.targets if polygons or t.kind == "brush"]
    vocab = list(VOC20)
    n = len(photos)
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        t = {}
        t["download (loopback HTTP)"] = cpu_per_image(lambda: [fetcher.fetch(u) for u in urls], n)
        arrays = []
        t["decode + EXIF (CPU)"] = cpu_per_image(
            lambda: arrays.extend(decode_image(b, max_pixels=10**8) for b in photos), n
        )
        sizes = [resized_size(a.shape[0], a.shape[1], 448, STRIDE, 64) for a in arrays]
        t["resize + normalise (CPU)"] = cpu_per_image(
            lambda: [normalized_batch([a], s, MEAN, STD) for a, s in zip(arrays, sizes)], n
        )
        probs = [stand_in_probs(s, 20, i) for i, s in enumerate(sizes)]
        segs = []
        t["upsample + argmax + areas"] = cpu_per_image(
            lambda: segs.extend(_finalize(p, a.shape[:2], 20, 0.0) for p, a in zip(probs, arrays)), n
        )
        preds = []
        name = "masks + brush RLE" + (" + polygons" if polygons else "")
        t[name] = cpu_per_image(
            lambda: preds.extend(prediction(s, targets, vocab, "v", polygons=polygons) for s in segs), n
        )
        t["JSON (orjson, as the server writes it)"] = cpu_per_image(lambda: json_bytes({"results": preds}), n)
        for k, v in t.items():
            out.setdefault(k, []).append(v)
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}


def whole_path(urls: list[str], settings: Settings, polygons: bool, repeats: int, profile_rows: int):
    """CPU ms per image of ``MaskCLIPBackend.predict`` (stand-in model, JSON included), and a profile."""
    rt = runtime(settings)
    model = StandIn(settings.short_side, 20)
    rt.model_for = lambda classes, load=True: ("bench", model)
    tasks = [{"id": i, "data": {"image": u}} for i, u in enumerate(urls)]

    def run():
        body = MaskCLIPBackend(settings, "1", CONFIG).predict(tasks)
        assert not body["errors"], body["errors"][:3]
        json_bytes(body)

    run()  # warm: imports, caches
    times = [cpu_per_image(run, len(tasks)) * 1e3 for _ in range(repeats)]
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        walls.append((time.perf_counter() - start) / len(tasks) * 1e3)
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(profile_rows)
    return statistics.median(times), statistics.median(walls), _short_paths(text.getvalue())


def _short_paths(text: str) -> str:
    """File names in a profile without this machine's directories: repository-relative, site-packages/...,
    or the standard library's module path."""
    text = text.replace(str(HERE.parent) + "/", "")
    text = re.sub(r"\S*/site-packages/", "site-packages/", text)
    return re.sub(r"\S*/lib/python3\.\d+/", "", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--polygons", action="store_true", help="also trace polygons (PolygonLabels)")
    parser.add_argument("--profile", type=int, default=25, help="rows of the profile to print")
    parser.add_argument("--note", default="", help="a line about the machine's state, for the record")
    parser.add_argument("--out", type=Path, help="append a markdown section to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    files = sorted(COCO128_PHOTOS.glob("*.jpg"))
    files = [files[i % len(files)] for i in range(args.images)]
    root = Path(tempfile.mkdtemp(prefix="bench-host-"))
    (root / "data" / "upload").mkdir(parents=True)
    for i, f in enumerate(files):
        (root / "data" / "upload" / f"{i}.jpg").write_bytes(f.read_bytes())
    host = FileServer(root)
    urls = [f"/data/upload/{i}.jpg" for i in range(len(files))]
    settings = Settings(
        label_studio_url=host.url, model_dir=str(root / "model_dir"), polygons=args.polygons, fetch_threads=1,
        min_area=0.0005, short_side=448,
    )  # fmt: skip
    fetcher = ImageFetcher(host.url)
    photos = [f.read_bytes() for f in files]
    try:
        per_stage = stages(photos, urls, fetcher, args.polygons, args.repeats)
        total, wall, profile = whole_path(urls, settings, args.polygons, args.repeats, args.profile)
    finally:
        host.stop()

    kind = "on" if args.polygons else "off"
    lines = [
        f"### Host pipeline per image per core (stand-in model, 20 labels, polygons {kind}): "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {platform.processor() or platform.machine()}, torch threads 1, fetch threads 1; "
        f"Python {platform.python_version()}, torch {torch.__version__}. {args.note}",
        f"- command: `python benchmarks/bench_host.py --images {args.images} --repeats {args.repeats}"
        f"{' --polygons' if args.polygons else ''}`; {len(files)} COCO128 photos (about 640x480), medians of "
        f"{args.repeats} runs, CPU ms per image (`time.process_time`)",
        "",
        "| stage (one after the other, one core) | CPU ms per image |",
        "|---|---:|",
        *[f"| {k} | {v:.2f} |" for k, v in per_stage.items()],
        f"| **sum of the stages** | **{sum(per_stage.values()):.2f}** |",
        f"| sum without resize/normalise and upsample/argmax (done on the GPU there) | "
        f"{sum(v for k, v in per_stage.items() if not k.startswith(('resize', 'upsample'))):.2f} |",
        f"| whole `MaskCLIPBackend.predict` path (CPU ms per image, all threads) | {total:.2f} |",
        f"| whole path, wall ms per image | {wall:.2f} |",
        "",
        "<details><summary>profile of the whole path (cProfile, by own time)</summary>",
        "",
        "```",
        *[line for line in profile.strip().splitlines() if line.strip()][: args.profile + 8],
        "```",
        "</details>",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
