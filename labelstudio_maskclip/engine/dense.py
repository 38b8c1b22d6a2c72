"""Dense CLIP features: MaskCLIP and its training-free successors (docs/method.md, sections 1.1, 1.2 and 2).

This is the one place that reaches into open_clip's image towers. It relies only on parameter names that
open_clip keeps across versions (tests/test_engine.py passed with open_clip 2.24.0, 2.26.1, 2.32.0, 3.0.0 and
3.3.0; before 2.26 the blocks take sequence-first tensors):
ViT ``conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks[i].{ln_1, attn.in_proj_weight,
attn.in_proj_bias, attn.out_proj, attn.num_heads, ls_1, ln_2, mlp, ls_2}, ln_post, proj``;
ResNet ``stem, layer1..4, attnpool.{k_proj, v_proj, c_proj}``.
The towers are typed ``Tower`` (``Any``) inside this module: torch types a submodule's attributes as
``Tensor | Module``, which says nothing about open_clip's; the names above are the contract, pinned by tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .modes import DENSE_MODES

__all__ = ["DenseOutput", "dense_features", "resize_pos_embed", "output_stride", "DENSE_MODES", "POS_RESIZE"]

NACLIP_SIGMA = 5.0  # std of NACLIP's Gaussian neighbourhood, in patches
# How each mode's authors resize the positional embedding to another grid (see resize_pos_embed):
# MaskCLIP (mmsegmentation) to the target size; SCLIP, ClearCLIP and NACLIP by the factor (n + 0.1) / g.
POS_RESIZE = {"maskclip": "size", "sclip": "factor", "clearclip": "factor", "naclip": "factor"}
Tower = Any  # an open_clip image tower or one of its blocks (see the module docstring)


@dataclass
class DenseOutput:
    features: torch.Tensor  # (B, D, h, w) float32, L2-normalised along D
    keys: torch.Tensor  # (B, h*w, C) float32, last-layer keys of the patches (for key smoothing)


def output_stride(visual: Tower) -> int:
    """Pixels per output cell: the ViT patch size, or 32 for open_clip's ModifiedResNet."""
    if hasattr(visual, "conv1") and hasattr(visual, "class_embedding"):
        p = visual.conv1.kernel_size
        return int(p[0] if isinstance(p, tuple) else p)
    if hasattr(visual, "attnpool"):
        return 32
    raise TypeError(f"unsupported image tower {type(visual).__name__}: MaskCLIP needs a ViT or ModifiedResNet")


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], by: str = "size") -> torch.Tensor:
    """(1 + g*g, W) positional embedding -> (1 + h*w, W) for grid (h, w).

    The class token's row is kept; the patch rows are resized as a (g, g) image, bicubic, align_corners=False.
    ``by="size"`` samples with the exact ratio h / g (MaskCLIP's mmsegmentation code); ``by="factor"`` with
    the ratio (h + 0.1) / g, as the DINO-derived code of SCLIP, ClearCLIP and NACLIP does (same output
    size, slightly different sampling positions).
    """
    n = pos.shape[0] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"positional embedding of {n} patches is not a square grid")
    if (g, g) == tuple(grid):
        return pos
    patches = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
    if by == "size":
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    elif by == "factor":
        factor = ((grid[0] + 0.1) / g, (grid[1] + 0.1) / g)
        patches = F.interpolate(
            patches, scale_factor=factor, mode="bicubic", align_corners=False, recompute_scale_factor=False
        )
    else:
        raise ValueError(f"unknown resize {by!r}: 'size' or 'factor'")
    patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # (h*w, W)
    return torch.cat([pos[:1], patches.to(pos.dtype)])


def dense_features(visual: Tower, pixels: torch.Tensor, mode: str = "maskclip") -> DenseOutput:
    """Dense image features of CLIP's image tower.

    ``pixels``: (B, 3, H, W), normalised, H and W multiples of :func:`output_stride`. ``mode``: one of
    :data:`DENSE_MODES` (ResNet supports only ``"maskclip"``).
    """
    if mode not in DENSE_MODES:
        raise ValueError(f"unknown dense mode {mode!r}; choose one of {', '.join(DENSE_MODES)}")
    stride = output_stride(visual)
    if pixels.shape[-2] % stride or pixels.shape[-1] % stride:
        raise ValueError(f"input size {tuple(pixels.shape[-2:])} is not a multiple of the stride {stride}")
    if hasattr(visual, "attnpool"):
        if mode != "maskclip":
            raise ValueError(f"dense mode {mode!r} needs a ViT; ResNet encoders support only 'maskclip' (set it)")
        return _resnet_dense(visual, pixels)
    return _vit_dense(visual, pixels, mode)


def _vit_dense(visual: Tower, pixels: torch.Tensor, mode: str) -> DenseOutput:
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))  # (B, W, h, w)
    b, width, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, width)
    x = torch.cat([cls, x], dim=1)  # (B, 1+h*w, W)
    x = x + resize_pos_embed(visual.positional_embedding, (h, w), POS_RESIZE[mode]).to(x.dtype)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", False)  # open_clip < 2.26: sequence first
    if not batch_first:
        x = x.transpose(0, 1)  # (N, B, W)
    for blk in blocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)  # (B, N, W)
    x, keys = _last_block(blocks[-1], x, mode, (h, w))
    x = visual.ln_post(x[:, 1:])  # (B, h*w, W)
    if visual.proj is not None:
        x = x @ visual.proj  # (B, h*w, D)
    feats = F.normalize(x.float(), dim=-1)
    feats = feats.transpose(1, 2).reshape(b, -1, h, w)  # (B, D, h, w)
    return DenseOutput(features=feats, keys=keys[:, 1:].float())


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    b, length, width = t.shape
    return t.reshape(b, length, n, width // n).transpose(1, 2)  # (B, nh, N, hd)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, n, length, hd = t.shape
    return t.transpose(1, 2).reshape(b, length, n * hd)  # (B, N, W)


def _last_block(blk: Tower, x: torch.Tensor, mode: str, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last residual block, rewritten per dense mode. x: (B, N, W) -> ((B, N, W), keys (B, N, W))."""
    attn = blk.attn
    y = blk.ln_1(x)
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, N, W)
    if mode == "maskclip":
        # Each token attends only to itself: the attention output is its own value.
        out = v
    else:
        nh = attn.num_heads
        qh, kh, vh = _heads(q, nh), _heads(k, nh), _heads(v, nh)  # (B, nh, N, hd)
        scale = qh.shape[-1] ** -0.5
        if mode == "sclip":
            weights = (qh @ qh.transpose(-1, -2) * scale).softmax(-1) + (kh @ kh.transpose(-1, -2) * scale).softmax(-1)
        elif mode == "clearclip":
            weights = (qh @ qh.transpose(-1, -2) * scale).softmax(-1)
        else:  # naclip
            bias = _gaussian_neighbourhood(grid, NACLIP_SIGMA, x.device, x.dtype)  # (N, N)
            weights = (kh @ kh.transpose(-1, -2) * scale + bias).softmax(-1)
        out = _merge(weights @ vh)  # (B, N, W)
    out = attn.out_proj(out)
    if hasattr(blk, "ln_attn"):
        out = blk.ln_attn(out)
    if mode in ("maskclip", "sclip"):
        x = x + blk.ls_1(out)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    else:  # ClearCLIP and NACLIP drop the residual and the MLP
        x = out
    return x, k


def _gaussian_neighbourhood(
    grid: tuple[int, int], sigma: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(1+h*w, 1+h*w) additive attention bias exp(-d^2 / 2 sigma^2) between patches; 0 for the class token."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()  # (h*w, 2)
    d2 = torch.cdist(pos, pos).square()  # (h*w, h*w)
    bias = torch.zeros(h * w + 1, h * w + 1, device=device)
    bias[1:, 1:] = torch.exp(-d2 / (2 * sigma**2))
    return bias.to(dtype)


def _resnet_dense(visual: Tower, pixels: torch.Tensor) -> DenseOutput:
    x = visual.stem(pixels.to(visual.conv1.weight.dtype))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # (B, C, h, w)
    b, _, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
    pool = visual.attnpool
    feats = pool.c_proj(pool.v_proj(x))  # value and output projections as 1x1 convs: (B, h*w, D)
    keys = pool.k_proj(x)  # (B, h*w, C)
    feats = F.normalize(feats.float(), dim=-1).transpose(1, 2).reshape(b, -1, h, w)  # (B, D, h, w)
    return DenseOutput(features=feats, keys=keys.float())
