"""Finishing a batch of grid probabilities into label maps: image by image, or the batch at once.

``segment`` finishes images one by one on a CPU and a batch's same-size images together elsewhere
(``engine.segmenter._finalize_all``). Together, the batch upsamples the union of its images' candidate classes
(more arithmetic), and its kernel launches and host syncs come per batch and band of rows, not per image. This
measures both ways on synthetic grids shaped like a real model's after prompt denoising: ``--likely`` classes
per image hold most of the probability, different ones per image, 28 x 37 grid cells, 375 x 500 outputs.

    python benchmarks/bench_finalize.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from labelstudio_maskclip.engine.refine import prompt_denoising  # noqa: E402
from labelstudio_maskclip.engine.segmenter import _candidates, _finalize_all  # noqa: E402

CASES = [(4, 21, 3), (16, 21, 3), (64, 21, 3), (16, 171, 5), (64, 171, 5)]  # (images, classes, likely per image)


def grid(n_images: int, n_classes: int, likely: int, device: torch.device) -> torch.Tensor:
    """(B, K, 28, 37) probabilities, ``likely`` random classes per image boosted, then prompt-denoised."""
    gen = torch.Generator().manual_seed(n_images * 1000 + n_classes)
    logits = torch.randn(n_images, n_classes, 28, 37, generator=gen)
    for b in range(n_images):
        logits[b, torch.randperm(n_classes, generator=gen)[:likely]] += 8
    return prompt_denoising(logits.softmax(1), 0.3).to(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    title = f"images x classes (likely per image), {device.type}"
    print(f"| {title} | candidates of the batch | one by one, ms | together, ms |")
    print("|---|---:|---:|---:|")
    for n_images, n_classes, likely in CASES:
        probs = grid(n_images, n_classes, likely, device)
        sizes = [(375, 500)] * n_images
        ms = [
            timed(lambda t=t: _finalize_all(probs, sizes, n_classes, 0.0, together=t), device, args.repeats) * 1e3
            for t in (False, True)
        ]
        print(
            f"| {n_images} x {n_classes} ({likely}) | {len(_candidates(probs))} | {ms[0]:.0f} | {ms[1]:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
