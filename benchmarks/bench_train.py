"""Student training throughput (images/s): forward + cross-entropy + backward + SGD step, teacher excluded.

Defaults follow MaskCLIP+: deeplabv3_resnet50 (output stride 8), crop 512, batch 4, bf16 autocast and
channels_last on CUDA. On CPU pass a small ``--crop``/``--batch`` (the row says what was measured).
Weights are random (``none``): throughput does not depend on them and nothing is downloaded.

    python benchmarks/bench_train.py                       # CUDA defaults
    python benchmarks/bench_train.py --device cpu --crop 128 --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from labelstudio_maskclip.training.student import build_student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="deeplabv3_resnet50")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--dim", type=int, default=512, help="text embedding width (ViT-B-16: 512)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    emb = F.normalize(torch.randn(args.classes, args.dim), dim=1)
    net = build_student(args.student, emb, "none").to(device).train()
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([q for q in net.parameters() if q.requires_grad], lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch, args.crop, args.crop), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = net(x)
        logits = F.interpolate(logits.float(), size=y.shape[1:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ips = args.steps * args.batch / dt
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    prec = "bf16 + channels_last" if cuda else "fp32"
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else "-"
    print("| student | device | precision | crop | batch | images/s | s/step | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.student} | {name} | {prec} | {args.crop} | {args.batch} | {ips:.2f} | {dt / args.steps:.3f} | {mem} |"
    )


if __name__ == "__main__":
    main()
