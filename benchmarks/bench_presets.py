"""Cost per image of each preset (engine/presets.py) at the real architecture's size, on the CPU or a GPU.

ViT-B/16 with random weights (the cost does not depend on the weights), fp32 on the CPU by default, a 500 x 375 VOC
photo crop, 20 classes whose text embeddings are given (random unit vectors: a server computes them once
per label set and keeps them, and on the CPU the 1,600 prompts of 80 templates would take minutes),
one warm-up run, then the median of ``--repeats`` runs of ``MaskCLIP.segment`` on one image.

    python benchmarks/bench_presets.py --repeats 3
    python benchmarks/bench_presets.py --device cuda --precision bf16 --repeats 20 --agree   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from labelstudio_maskclip.engine.loading import load_clip
from labelstudio_maskclip.engine.presets import PRESETS
from labelstudio_maskclip.engine.segmenter import MaskCLIP
from labelstudio_maskclip.models import segment_options
from labelstudio_maskclip.settings import Settings

VOC20 = ["aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog",
         "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "television monitor"]  # fmt: skip
PHOTO = Path(__file__).parent.parent / "tests" / "data" / "voc-samples" / "images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--agree", action="store_true", help="also the pixels labelled as fp32 on the CPU labels them")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    device = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("ViT-B-16", "random", str(device), args.precision, allow_random=True)
        ref = load_clip("ViT-B-16", "random", "cpu", "fp32", allow_random=True) if args.agree else None
    if ref is not None:  # the same weights on both sides
        clip.model.load_state_dict(ref.model.state_dict())
        clip.model.to(clip.dtype)
    name = sorted(p.name for p in PHOTO.iterdir())[0]
    image = np.ascontiguousarray(np.asarray(Image.open(PHOTO / name).convert("RGB"))[:375, :500])
    classes = [(c,) for c in VOC20]
    text = torch.nn.functional.normalize(
        torch.randn(len(classes), 512, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"device {device} ({args.precision}), torch threads {torch.get_num_threads()}, "
        f"image {image.shape[1]} x {image.shape[0]}, {len(classes)} classes"
    )
    print("| preset | short side | windows | PAMR | ms / image (median) |" + (" pixels as CPU fp32 |" if ref else ""))
    print("|---|---:|---|---|---:|" + ("---:|" if ref else ""))
    for preset_name, preset in PRESETS.items():
        s = Settings(preset=preset_name)
        opts = segment_options(s)
        seg = MaskCLIP(clip, s.templates, normalize=preset.normalize, layer_norm_eps=preset.layer_norm_eps)
        labels = seg.segment([image], classes, opts=opts, text=text)[0].labels  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            seg.segment([image], classes, opts=opts, text=text)
            sync()
            times.append(time.perf_counter() - t)
        windows = f"{opts.window} / {opts.stride}" if opts.window else "whole"
        row = (
            f"| {preset_name} | {opts.short_side} | {windows} | {opts.refine} | {statistics.median(times) * 1e3:.1f} |"
        )
        if ref is not None:
            cpu = MaskCLIP(ref, s.templates, normalize=preset.normalize, layer_norm_eps=preset.layer_norm_eps)
            same = float(np.mean(cpu.segment([image], classes, opts=opts, text=text)[0].labels == labels))
            row += f" {same:.4f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
