"""Text embeddings on the CPU: open_clip's ``encode_text`` on the full 77-token context (before) against
the context cut after each batch's longest prompt (``engine.text.encode_prompts``, after), one run.

    python benchmarks/bench_text.py [--labels 20] [--threads 2]

Random ViT-B/16 weights (the speed does not depend on them), the 85 MaskCLIP templates, label names from
COCO. Prints a markdown table and the largest difference of the normalised embeddings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from labelstudio_maskclip.engine.text import encode_prompts, maskclip_templates  # noqa: E402

NAMES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
         "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
         "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import open_clip

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval()
    tok = open_clip.get_tokenizer("ViT-B-16")
    prompts = [t.format(n) for n in NAMES[: args.labels] for t in maskclip_templates()]
    rows = []
    with torch.no_grad():
        start = time.perf_counter()
        before = torch.cat([F.normalize(model.encode_text(tok(prompts[i : i + 512])).float(), dim=-1)
                            for i in range(0, len(prompts), 512)])  # fmt: skip
        rows.append(("open_clip encode_text, 77 tokens", time.perf_counter() - start))
        start = time.perf_counter()
        after = encode_prompts(model, tok, prompts, torch.device("cpu"))
        rows.append(("cut after the longest prompt", time.perf_counter() - start))
        start = time.perf_counter()
        encode_prompts(model, tok, [t.format("red car") for t in ("a photo of a {}.", "a {} in the scene.")],
                       torch.device("cpu"))  # fmt: skip
        phrase = time.perf_counter() - start
    print(f"{len(prompts)} prompts ({args.labels} labels x 85 templates), {args.threads} threads\n")
    print("| text encoding | seconds | speed-up |\n|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.1f} | {rows[0][1] / sec:.1f}x |")
    print(f"\none phrase, short template set: {phrase:.2f} s")
    print(f"largest |difference| of normalised embeddings: {(before - after).abs().max():.2e}")


if __name__ == "__main__":
    main()
