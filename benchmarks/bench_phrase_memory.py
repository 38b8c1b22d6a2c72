"""Peak memory of phrase masks: all classes upsampled at once (before) against one class at a time (after).

    python benchmarks/bench_phrase_memory.py [--phrases 20] [--labels 5] [--size 3000x4000]

Each variant runs in a fresh process; prints the growth of its peak resident memory over the setup.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(variant: str, phrases: int, labels: int, size: tuple[int, int]) -> None:
    sys.path[:0] = [str(ROOT)]
    import torch

    from labelstudio_maskclip.engine import prompts as engine
    from labelstudio_maskclip.engine.prompts import DenseImage
    from labelstudio_maskclip.engine.segmenter import SegmentOptions

    torch.manual_seed(0)
    k = phrases + labels + 1
    dense = DenseImage(features=torch.nn.functional.normalize(torch.randn(512, 28, 37), dim=0),
                       affinity=torch.zeros(1), size=size)  # fmt: skip
    emb = torch.nn.functional.normalize(torch.randn(k, 512), dim=1)
    opts = SegmentOptions(key_smoothing=False, prompt_denoising=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "before":
        with torch.inference_mode():
            probs = engine._upsample(engine.grid_probs(dense, emb, opts), size)
            best, winner = probs.max(0)
            masks = [(winner == j).numpy() for j in range(phrases)]
    else:
        masks = [m for m, _ in engine.phrase_masks(dense, emb, phrases, opts)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"| {variant} | {k} | {size[1]}x{size[0]} | {(peak - base) / 2**20:.2f} |", len(masks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phrases", type=int, default=20)
    ap.add_argument("--labels", type=int, default=5)
    ap.add_argument("--size", default="3000x4000")
    ap.add_argument("--variant")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    if args.variant:
        return run(args.variant, args.phrases, args.labels, (h, w))
    print("| phrase masks | classes | image | peak memory growth (GiB) |\n|---|---|---|---|")
    for variant in ("before", "after"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--phrases", str(args.phrases),
                              "--labels", str(args.labels), "--size", args.size], capture_output=True, text=True)  # fmt: skip
        print(out.stdout.strip().rsplit(" ", 1)[0] or out.stderr[-500:])


if __name__ == "__main__":
    main()
