"""Tiny random-weight open_clip models for tests: configs in tests/assets, state files saved once."""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
TINY_VIT = str(ASSETS / "MaskCLIP-Tiny-ViT.json")  # patch 8, native 32 x 32 (grid 4 x 4)
TINY_RN = str(ASSETS / "MaskCLIP-Tiny-RN.json")  # stride 32, native 64 x 64


def save_random_state(config: str, path: Path, seed: int = 0) -> Path:
    """Build the config's model with random weights (seeded) and save its state dict like a checkpoint."""
    import open_clip

    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(Path(config).stem)
    torch.save(model.state_dict(), path)
    return path
