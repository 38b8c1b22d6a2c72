"""Brush RLE codec speed: ours vs label-studio-sdk's ``mask2rle`` / ``decode_rle``, measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_codecs.py [--repeats 7]``. Prints a markdown table of median times.
Our encoder gets the (H, W) bool mask; the SDK's gets its 0/255 uint8 version, made outside the timing.
Both decoders return the (H, W) mask (the SDK's: ``decode_rle(rle).reshape(h, w, 4)[:, :, 3]``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from labelstudio_maskclip.masks.brush import brush_rle_to_mask, mask_to_brush_rle
from labelstudio_maskclip.masks.polygons import polygons_to_mask

COCO128 = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco128-seg"


def disc_mask(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]  # (H, W)
    return (yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.3) ** 2


def noise_mask(size: int) -> np.ndarray:
    return np.random.default_rng(0).random((size, size)) < 0.5


def coco_mask(width: int = 640, height: int = 480) -> tuple[str, np.ndarray]:
    """The union of all instances of the first COCO128 image of the given size with the most polygon points."""
    best: tuple[int, str, list[np.ndarray]] = (-1, "", [])
    for label in sorted((COCO128 / "labels").glob("*.txt")):
        image = COCO128 / "images" / (label.stem + ".jpg")
        if not image.exists() or Image.open(image).size != (width, height):
            continue
        polygons = [
            np.array(line.split()[1:], dtype=float).reshape(-1, 2) * [width, height]
            for line in label.read_text().splitlines()
        ]
        points = sum(len(p) for p in polygons)
        if points > best[0]:
            best = (points, label.stem, polygons)
    if best[0] < 0:
        raise SystemExit(f"no {width}x{height} image with labels under {COCO128}")
    return best[1], polygons_to_mask(best[2], height, width)


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, mask: np.ndarray, repeats: int) -> list[str]:
    height, width = mask.shape
    mask_255 = mask.astype(np.uint8) * 255
    code = mask2rle(mask_255)
    assert mask_to_brush_rle(mask) == code, f"{name}: encoder output differs from mask2rle"
    assert (brush_rle_to_mask(code, height, width) == mask).all(), f"{name}: decoder output differs"
    sdk_decode = lambda: decode_rle(code).reshape(height, width, 4)[:, :, 3]  # noqa: E731
    times = {
        "enc ours": median_seconds(lambda: mask_to_brush_rle(mask), repeats),
        "enc sdk": median_seconds(lambda: mask2rle(mask_255), repeats),
        "dec ours": median_seconds(lambda: brush_rle_to_mask(code, height, width), repeats),
        "dec sdk": median_seconds(sdk_decode, max(3, repeats // 2)),
    }
    ms = {key: f"{value * 1e3:.2f}" for key, value in times.items()}
    return [
        f"| {name} | {len(code)} | {ms['enc ours']} | {ms['enc sdk']} | {times['enc sdk'] / times['enc ours']:.0f}x "
        f"| {ms['dec ours']} | {ms['dec sdk']} | {times['dec sdk'] / times['dec ours']:.0f}x |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    args = parser.parse_args()
    stem, real = coco_mask()
    cases = [
        ("disc 1024x1024", disc_mask(1024)),
        ("noise 512x512 (p=0.5)", noise_mask(512)),
        (f"COCO128 {stem} union 640x480", real),
    ]
    print(f"Python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    print(f"median of {args.repeats} runs (SDK decoder: of {max(3, args.repeats // 2)}), milliseconds\n")
    print("| mask | RLE bytes | encode ours | encode SDK | speed-up | decode ours | decode SDK | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, mask in cases:
        print("\n".join(bench(name, mask, args.repeats)))


if __name__ == "__main__":
    main()
