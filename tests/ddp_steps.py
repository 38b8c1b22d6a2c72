"""Run under torchrun by tests/test_learning_loop.py: each rank takes 2 training steps of the trainer's loop
(:class:`~labelstudio_maskclip.training.loop.Loop`) on its own images and saves its student's parameters as
``OUT/rank<r>.pt`` (rank 0 also saves the starting ones as ``OUT/start.pt``).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.ddp_steps OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from labelstudio_maskclip.training.data import Item
from labelstudio_maskclip.training.loop import Dist, Loop
from tests.test_training import NoisyOracle, _settings, synthetic


def _params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters (not BatchNorm's running statistics, which each rank updates from its batch)."""
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def main(out: Path) -> None:
    dist = Dist.init()
    s = _settings(out / "md", train_steps=2, train_batch_size=2, train_crop=32, train_lr=0.5)
    torch.manual_seed(0)  # the same starting student on both ranks
    loop = Loop.build(s, NoisyOracle(seed=1), torch.device("cpu"), dist, None)
    if dist.main:
        torch.save(_params(loop.net), out / "start.pt")
    items = []
    for k in range(2):  # different images on each rank
        img = synthetic(100 * dist.rank + k)[0]
        path = out / f"r{dist.rank}-{k}.npy"
        np.save(path, img)
        items.append(Item(k, path))
    loop.run(items, np.random.default_rng(dist.rank), progress=False)
    torch.save(_params(loop.net), out / f"rank{dist.rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
