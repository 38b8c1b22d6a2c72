"""MaskCLIP's test-time refinements (docs/method.md, section 1.4), on grid-level probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["key_smoothing", "prompt_denoising", "DENOISE_THRESHOLD"]

DENOISE_THRESHOLD = 0.5


def key_smoothing(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Similarity-weighted average of class probabilities over patches with similar last-layer keys.

    probs: (B, K, h, w); keys: (B, h*w, C). Returns (B, K, h, w).
    The paper describes cosine similarity between patch keys, so keys are normalised along the channel
    axis here (the authors' code normalises along the token axis instead). Negative similarities are
    clipped to zero and each row of weights sums to one, so the result stays a distribution.
    """
    b, k, h, w = probs.shape
    kn = F.normalize(keys.float(), dim=-1)  # (B, hw, C)
    sim = (kn @ kn.transpose(1, 2)).clamp_min(0)  # (B, hw, hw)
    sim = sim / sim.sum(-1, keepdim=True)
    flat = probs.flatten(2).transpose(1, 2)  # (B, hw, K)
    return (sim @ flat).transpose(1, 2).reshape(b, k, h, w)


def prompt_denoising(probs: torch.Tensor, threshold: float = DENOISE_THRESHOLD) -> torch.Tensor:
    """Remove classes judged absent: those whose highest probability over all patches is below ``threshold``.

    probs: (B, K, h, w), a distribution over K. Absent classes get probability 0 and the rest are
    renormalised (equal to a softmax over the remaining classes' logits). When every class falls below the
    threshold, the one with the highest peak is kept, so no image is left without a class.
    Returns (B, K, h, w).
    """
    peak = probs.flatten(2).amax(-1)  # (B, K)
    keep = peak >= threshold
    keep[torch.arange(len(peak)), peak.argmax(-1)] = True
    probs = probs * keep[:, :, None, None]
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-12)
