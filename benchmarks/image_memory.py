"""Peak memory per image through the whole /predict path (fetch a data: URI, decode, segment, brush RLE).

Each case runs in a fresh process, so its peak RSS (``ru_maxrss``) is that image's alone; the figure
reported is the peak minus the RSS once the (tiny, random-weight) model is loaded and the request built:
what the image itself costs. The model's size hardly matters here: the encoder input is bounded by
``MASKCLIP_SHORT_SIDE``/``MASKCLIP_MAX_INPUT_PIXELS``; what grows with the image is decoding, resizing and
the label map at the original size.

Run: ``.venv/bin/python benchmarks/image_memory.py [--cases 64mpx-png,1x100000-png,...]``. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BRUSH = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="Food"/><Label value="Sky"/><Label value="Animal"/><Label value="Table"/></BrushLabels></View>"""
CASES = {  # name: (height, width, format)
    "64mpx-png": (8000, 8000, "PNG"),
    "64mpx-jpeg": (8000, 8000, "JPEG"),
    "16mpx-jpeg": (3000, 5333, "JPEG"),
    "12mpx-png": (3000, 4000, "PNG"),
    "photo-640x480-jpeg": (480, 640, "JPEG"),
    "1x100000-png": (1, 100000, "PNG"),
}


def make_image(height: int, width: int, fmt: str, path: Path) -> None:
    """A compressible picture (coloured bands and a disc), like the issue's 200 KB 64-megapixel PNG."""
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (70, 130, 180))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, height * 2 // 3, width, height], fill=(200, 170, 120))
    draw.ellipse([width // 4, height // 4, width // 2, height // 2], fill=(230, 40, 40))
    if fmt == "JPEG":
        noise = np.random.default_rng(0).integers(0, 12, (min(height, 256), min(width, 256), 3), dtype=np.uint8)
        image.paste(Image.fromarray(noise), (0, 0))
    image.save(path, fmt, quality=90) if fmt == "JPEG" else image.save(path, fmt)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_case(path: Path, model: str) -> dict:
    """In this (fresh) process: one /predict with the image as a data: URI, default limits."""
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend
    from labelstudio_maskclip.settings import Settings
    from tests.tiny import TINY_VIT, save_random_state

    work = Path(tempfile.mkdtemp())
    if model == "tiny":
        model, weights = TINY_VIT, str(save_random_state(TINY_VIT, work / "tiny.pt"))
    else:  # the default architecture with random weights (no download)
        weights = "random"
    settings = Settings(model=model, pretrained=weights, allow_random=True, device="cpu", templates="simple",
                        model_dir=str(work / "model_dir"), min_area=0.0)  # fmt: skip
    backend = MaskCLIPBackend(settings, label_config=BRUSH)
    rng_image = "data:image/png;base64," + base64.b64encode(make_tiny_png()).decode()
    backend.predict([{"id": 0, "data": {"image": rng_image}}])  # model, text embeddings, kernels warmed
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    tasks = [{"id": 1, "data": {"image": uri}}]
    base = rss_mib()
    started = time.perf_counter()
    reply = backend.predict(tasks)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"base_mib": base, "peak_mib": peak, "seconds": seconds, "errors": reply["errors"],
            "regions": len(reply["results"][0]["result"]) if reply["results"][0] else 0}  # fmt: skip


def make_tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights) or 'tiny'")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_case(Path(args.run), args.model)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            height, width, fmt = CASES[name]
            path = Path(tmp) / f"{name}.{fmt.lower()}"
            make_image(height, width, fmt, path)
            command = [sys.executable, __file__, "--run", str(path), "--model", args.model]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append(f"| {name} | {path.stat().st_size // 1024} | failed: {out.stderr.strip()[-200:]} | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(f"| {name} | {path.stat().st_size // 1024} | {r['peak_mib'] - r['base_mib']:.0f} | "
                        f"{r['peak_mib']:.0f} | {r['seconds']:.1f} | {r['regions']} | {r['errors'] or ''} |")  # fmt: skip
            print(rows[-1], flush=True)
    print("| image | file KiB | peak over baseline MiB | peak RSS MiB | seconds | regions | errors |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
