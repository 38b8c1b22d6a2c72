"""PAMR's cost per image: ``refine.pamr`` on grid probabilities of a 448-pixel input, as ``segment`` runs it.

    python benchmarks/bench_pamr.py [--device cuda] [--repeats 5]

Times ``pamr(image, probs)`` alone (weights from the image, 10 iterations at dilations 8 and 16, the
softmax), for 21 and 171 classes at 448 x 448 and 448 x 640; median of ``--repeats`` runs after a warm-up,
CUDA synchronised before the clock is read. On CPU it also reports the process's CPU time per image,
which a machine shared with other jobs inflates less than the wall clock. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labelstudio_maskclip.engine.refine import pamr  # noqa: E402


def _time(fn, device: str, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn()``."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--sizes", default="448x448,448x640", help="input sizes HxW, comma-separated")
    p.add_argument("--classes", default="21,171", help="class counts, comma-separated")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"device {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| input | classes | batch | wall ms per image | CPU ms per image |\n|---|---|---|---|---|")
    for h, w in (tuple(int(v) for v in hw.split("x")) for hw in a.sizes.split(",")):
        for k in (int(x) for x in a.classes.split(",")):
            for b in (int(x) for x in a.batches.split(",")):
                g = torch.Generator().manual_seed(0)
                image = torch.randn(b, 3, h, w, generator=g).to(a.device)
                probs = (100 * 0.05 * torch.randn(b, k, h // 16, w // 16, generator=g)).softmax(1).to(a.device)
                with torch.inference_mode():
                    wall, cpu = _time(lambda: pamr(image, probs), a.device, a.repeats)
                print(f"| {h}x{w} | {k} | {b} | {1000 * wall / b:.0f} | {1000 * cpu / b:.0f} |", flush=True)


if __name__ == "__main__":
    main()
