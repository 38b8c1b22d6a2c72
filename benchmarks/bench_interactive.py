"""Interactive prompting latency: the first prompt on an image (decode + image tower + prompt) and the
repeated ones (feature cache hit: grid-sized work only), through the backend object, no HTTP.

    python benchmarks/bench_interactive.py [--device cpu|cuda] [--repeats 20] [--labels 3] [--preset naclip] [--out FILE.md]

Random ViT-B/16 weights (the speed does not depend on them), the preset's encoding, a config of ``--labels`` labels with
BrushLabels, on the vendored COCO photos sent as data: URIs. Prints a markdown table of p50/p95 in ms.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from labelstudio_maskclip.evaluation.class_names import VOC20  # noqa: E402
from labelstudio_maskclip.serving.backend import MaskCLIPBackend  # noqa: E402
from labelstudio_maskclip.settings import Settings  # noqa: E402

PHOTOS = sorted((HERE.parent / "tests" / "data" / "coco128-seg" / "images").glob("*.jpg"))


def config(labels: list[str]) -> str:
    tags = "".join(f'<Label value="{name}"/>' for name in labels)
    return f"""<View><Image name="image" value="$image"/>
<TextArea name="prompt" toName="image"/>
<KeyPointLabels name="click" toName="image">{tags}</KeyPointLabels>
<RectangleLabels name="box" toName="image">{tags}</RectangleLabels>
<BrushLabels name="tag" toName="image">{tags}</BrushLabels>
</View>"""


def click(x: float, y: float) -> dict:
    return {"type": "keypointlabels", "is_positive": True, "value": {"x": x, "y": y, "keypointlabels": ["car"]}}


def box(x: float, y: float) -> dict:
    return {"type": "rectanglelabels", "value": {"x": x, "y": y, "width": 30, "height": 30, "rectanglelabels": ["car"]}}


def percentiles(ms: list[float]) -> tuple[float, float]:
    ordered = sorted(ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--preset", default="naclip", help="MASKCLIP_PRESET (engine/presets.py)")
    parser.add_argument("--labels", type=int, default=3, help="labels in the project (COCO names, 'car' first)")
    args = parser.parse_args()
    model_dir = tempfile.mkdtemp()
    settings = Settings(pretrained="random", allow_random=True, device=args.device, model_dir=model_dir,
                        templates="simple", polygons=False, preset=args.preset)  # fmt: skip
    labels = (["car", "person", "dog"] + [n for n in VOC20 if n not in ("car", "person", "dog")])[: args.labels]
    backend = MaskCLIPBackend(settings, "1", config(labels))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tasks = [{"id": i, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()}}
             for i, p in enumerate(PHOTOS[: args.repeats + 1])]  # fmt: skip
    backend.predict([tasks[-1]], {"result": [click(50, 50)]})  # warm-up: model load, text embeddings

    def timed(task: dict, item: dict) -> float:
        sync()
        start = time.perf_counter()
        backend.predict([task], {"result": [item]})
        sync()
        return 1000 * (time.perf_counter() - start)

    first = [timed(t, click(50, 50)) for t in tasks[:-1]]  # a new image each time: cache miss
    again = [timed(t, click(30 + i % 40, 60)) for i, t in enumerate(tasks[:-1])]  # same images: cache hits
    boxes = [timed(t, box(20, 20)) for t in tasks[:-1]]  # a box runs the tower on its crop
    phrases = [
        timed(t, {"type": "textarea", "value": {"text": [f"thing number {i}"]}}) for i, t in enumerate(tasks[:-1])
    ]
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = ["| prompt | p50 ms | p95 ms | n |", "|---|---|---|---|"]
    for name, ms in (
        ("first click on an image", first),
        ("repeated click (cache hit)", again),
        ("box", boxes),
        ("new phrase (one short text pass, cached image)", phrases),
    ):
        p50, p95 = percentiles(ms)
        rows.append(f"| {name} | {p50:.0f} | {p95:.0f} | {len(ms)} |")
    where = f"preset {settings.preset}, short side {settings.short_side}, window {settings.window}"
    text = f"ViT-B/16 (random weights), {where}, {len(labels)} labels, {device}\n\n" + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
