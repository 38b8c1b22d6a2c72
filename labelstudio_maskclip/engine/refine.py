"""Test-time refinements: MaskCLIP's key smoothing and prompt denoising (docs/method.md, section 1.4), on
grid-level probabilities; and PAMR, the pixel-adaptive mask refinement NACLIP and SCLIP apply last."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "key_smoothing", "key_affinity", "smooth", "prompt_denoising", "pamr", "pamr_weights", "pamr_average", "DENOISE_THRESHOLD", "REFINEMENTS",
    "PAMR_ITERATIONS", "PAMR_DILATIONS",
]  # fmt: skip

DENOISE_THRESHOLD = 0.5
REFINEMENTS = ("none", "pamr")  # what may follow the grid probabilities (SegmentOptions.refine)
PAMR_ITERATIONS = 10  # NACLIP's default (pamr_steps)
PAMR_DILATIONS = (8, 16)  # NACLIP's and SCLIP's default (pamr_stride), in pixels of the refined map


def key_smoothing(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Similarity-weighted average of class probabilities over patches with similar last-layer keys.

    probs: (B, K, h, w); keys: (B, h*w, C). Returns (B, K, h, w).
    The paper describes cosine similarity between patch keys, so keys are normalised along the channel
    axis here (the authors' code normalises along the token axis instead). Negative similarities are
    clipped to zero and each row of weights sums to one, so the result stays a distribution.
    """
    return smooth(probs, key_affinity(keys))


def key_affinity(keys: torch.Tensor) -> torch.Tensor:
    """(B, h*w, C) last-layer keys -> (B, h*w, h*w) key smoothing's weights: cosine similarities clipped at
    zero, each row summing to one. Depends on the image only, so it can be kept for further prompts."""
    kn = F.normalize(keys.float(), dim=-1)  # (B, hw, C)
    sim = (kn @ kn.transpose(1, 2)).clamp_min(0)  # (B, hw, hw)
    return sim / sim.sum(-1, keepdim=True)


def smooth(probs: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) probabilities averaged with (B, h*w, h*w) row-stochastic weights -> (B, K, h, w)."""
    b, k, h, w = probs.shape
    flat = probs.flatten(2).transpose(1, 2)  # (B, hw, K)
    return (affinity @ flat).transpose(1, 2).reshape(b, k, h, w)


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


# --- PAMR ------------------------------------------------------------------------------------------------


def _shifted(x: torch.Tensor, d: int) -> list[torch.Tensor]:
    """The 8 neighbours at distance ``d`` (rows and columns -d, 0, +d, the centre excluded) of every pixel of
    (B, C, H, W), borders replicated: 8 x (B, C, H, W)."""
    h, w = x.shape[-2:]
    pad = F.pad(x, [d, d, d, d], mode="replicate")
    return [
        pad[..., d + dy : d + dy + h, d + dx : d + dx + w]
        for dy in (-d, 0, d)
        for dx in (-d, 0, d)
        if dy or dx
    ]  # fmt: skip


def pamr_weights(image: torch.Tensor, dilations: tuple[int, ...] = PAMR_DILATIONS) -> torch.Tensor:
    """Image affinities to the 8 neighbours at each dilation: (B, 3, H, W) -> (B, 8 * len(dilations), H, W),
    summing to 1 over the neighbours.

    For pixel p, neighbour n and channel c: ``-|x_c(p) - x_c(n)| / (1e-8 + 0.1 * s_c(p))``, where s_c(p) is
    the (unbiased) standard deviation of x_c over the 3 x 3 neighbourhoods of every dilation taken together
    (the centre counted once per dilation); averaged over channels, then a softmax over the neighbours.
    A per-channel affine change of the image (its mean/std normalisation) leaves the weights unchanged.
    """
    x = image.float()
    neighbours = [n for d in dilations for n in _shifted(x, d)]  # P x (B, 3, H, W), views
    count = len(neighbours) + len(dilations)  # the centre once per dilation
    mean = (sum(neighbours) + len(dilations) * x) / count
    var = (sum((n - mean).square() for n in neighbours) + len(dilations) * (x - mean).square()) / (count - 1)
    inv = 1.0 / (1e-8 + 0.1 * var.sqrt())  # (B, 3, H, W)
    return torch.stack([-((x - n).abs() * inv).mean(1) for n in neighbours], dim=1).softmax(1)  # (B, P, H, W)


def pamr_average(
    mask: torch.Tensor,
    weights: torch.Tensor,
    dilations: tuple[int, ...] = PAMR_DILATIONS,
    iterations: int = PAMR_ITERATIONS,
) -> torch.Tensor:
    """``iterations`` times, replace each value of (B, K, H, W) ``mask`` by the ``weights``-weighted
    (B, P, H, W, from :func:`pamr_weights`) average of its neighbours' values. Returns (B, K, H, W)."""
    for _ in range(iterations):
        out = torch.zeros_like(mask)
        p = 0
        for d in dilations:
            for n in _shifted(mask, d):
                out.addcmul_(weights[:, p : p + 1], n)
                p += 1
        mask = out
    return mask


def pamr(
    image: torch.Tensor,
    probs: torch.Tensor,
    iterations: int = PAMR_ITERATIONS,
    dilations: tuple[int, ...] = PAMR_DILATIONS,
) -> torch.Tensor:
    """Pixel-adaptive mask refinement of class probabilities at the image's resolution.

    image: (B, 3, H, W), normalised or not; probs: (B, K, h, w) distributions over K on any grid.
    Returns (B, K, H, W) distributions.

    The authors (NACLIP, SCLIP) refine the cosine logits upsampled bilinearly to the image, then take
    ``softmax(T * logits)``. Here the log-probabilities are refined instead: ``log softmax(T * l)`` is
    ``T * l`` minus a per-pixel constant, and upsampling and PAMR are linear maps whose weights do not
    depend on the class, so ``softmax(PAMR(up(log p)))`` equals ``softmax(T * PAMR(up(l)))`` exactly: the
    authors' result, for any temperature. Classes at probability 0 everywhere (removed by prompt denoising)
    stay at 0.
    """
    logp = probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    logp = F.interpolate(logp, size=image.shape[-2:], mode="bilinear", align_corners=False)
    logp = pamr_average(logp, pamr_weights(image, dilations), dilations, iterations)
    out = logp.softmax(1) * (probs.flatten(2).amax(-1) > 0)[:, :, None, None]
    return out / out.sum(1, keepdim=True)
