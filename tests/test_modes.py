"""SCLIP, ClearCLIP and NACLIP exactly as their authors compute them.

Each reference below is written from the paper's equations and the choices of the authors' public code
(SCLIP: github.com/wangf3014/SCLIP, ClearCLIP: github.com/mc-lan/ClearCLIP, NACLIP: github.com/sinahmr/NACLIP),
in the layout those codes use (sequence first, heads folded into the batch), and compared with
``engine/dense.py`` on a random-weight CLIP ViT-B/16 image tower at two input sizes: one at the native grid
(224 x 224, 14 x 14 patches) and one that needs the positional embedding resized (160 x 288, 10 x 18).

What the authors' code does, mode by mode (all three leave blocks 1..11 untouched and change nothing else
but the input's positional embedding resize, noted below):
- SCLIP: last block ``x + A(ln_1 x)`` then ``+ mlp(ln_2 x)`` (residual and MLP kept), with correlative
  self-attention ``softmax(q q^T s) + softmax(k k^T s)``, s = head_dim ** -0.5, per head.
- ClearCLIP: last block ``A(ln_1 x)`` alone (no residual, no MLP), attention ``softmax(q q^T s)``. Its
  released base config selects the vanilla q-k attention, but the paper and its demo use q-q: we follow
  the paper.
- NACLIP: last block ``A(ln_1 x)`` alone (the "reduced" architecture), attention
  ``softmax(k k^T s + G)``, G a Gaussian of the distance between patches, std 5 patches, built as a window
  of (2h - 1) x (2w - 1) slid over the grid; 0 for the class token's row and column.
- All three: for a grid other than the pretraining one, the positional embedding's patch rows are resized
  bicubically with the scale factor (n + 0.1) / g (align_corners False), the class row kept.
- All three: ``ln_post`` then ``proj`` on the patch tokens, L2-normalised, cosine with the class texts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labelstudio_maskclip.engine.dense import dense_features

SIZES = [(224, 224, 1), (160, 288, 1)]  # (H, W, batch)
TOL = 1e-4  # relative error of the dense logits


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    """CLIP ViT-B/16's image tower (OpenAI's architecture: QuickGELU), random weights, fixed seed."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config("ViT-B-16")
    torch.manual_seed(0)
    visual = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), quick_gelu=True)
    with torch.no_grad():  # random LayerNorm affines, so no parameter sits at a neutral value
        for name, p in visual.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return visual.eval()


@pytest.fixture(scope="module")
def texts() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return F.normalize(torch.randn(7, 512, generator=g), dim=-1)  # (K, D) class embeddings


@pytest.fixture(scope="module")
def trunks(tower) -> dict:
    """Per input size: the pixels and the tokens entering the last block, computed the authors' way."""
    out = {}
    for h, w, b in SIZES:
        pixels = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        with torch.inference_mode():
            out[(h, w)] = (pixels, _their_trunk(tower, pixels))
    return out


# --- the reference, written like the authors' code ---------------------------------------------------


def _their_pos(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    g = math.isqrt(pos.shape[0] - 1)
    if (gh, gw) == (g, g):
        return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic", recompute_scale_factor=False
    )
    assert grid.shape[-2:] == (gh, gw)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])


def _their_trunk(visual, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (L, B, W) tokens before the last block (sequence first, as in their code)."""
    x = visual.conv1(pixels)
    b, width, gh, gw = x.shape
    x = x.reshape(b, width, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(b, 1, width), x], dim=1)
    x = visual.ln_pre(x + _their_pos(visual.positional_embedding, gh, gw))
    if not getattr(visual.transformer, "batch_first", False):  # open_clip < 2.26 blocks are sequence first
        x = x.permute(1, 0, 2)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    return x.permute(1, 0, 2) if getattr(visual.transformer, "batch_first", False) else x


def _their_window(gh: int, gw: int, std: float) -> torch.Tensor:
    """NACLIP's (gh*gw + 1)^2 attention addition: a (2gh-1, 2gw-1) Gaussian window centred on each patch."""
    dy = torch.arange(2 * gh - 1, dtype=torch.float) - (gh - 1)
    dx = torch.arange(2 * gw - 1, dtype=torch.float) - (gw - 1)
    window = torch.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2 * std**2))
    rows = []
    for i in range(gh):
        for j in range(gw):  # the window's centre (gh-1, gw-1) placed on patch (i, j)
            rows.append(window[gh - 1 - i : 2 * gh - 1 - i, gw - 1 - j : 2 * gw - 1 - j].reshape(-1))
    add = torch.zeros(gh * gw + 1, gh * gw + 1)
    add[1:, 1:] = torch.stack(rows)
    return add


def _their_attention(attn, x: torch.Tensor, kind: str, grid: tuple[int, int]) -> torch.Tensor:
    """(L, B, W) -> (L, B, W): the rewritten attention of the last block, output projection included."""
    length, b, width = x.shape
    nh = attn.num_heads
    hd = width // nh
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(length, b * nh, hd).transpose(0, 1) for t in (q, k, v))  # (B*nh, L, hd)
    s = hd**-0.5
    if kind == "sclip":
        a = F.softmax(torch.bmm(q, q.transpose(1, 2)) * s, -1) + F.softmax(torch.bmm(k, k.transpose(1, 2)) * s, -1)
    elif kind == "clearclip":
        a = F.softmax(torch.bmm(q, q.transpose(1, 2)) * s, -1)
    elif kind == "naclip":
        a = F.softmax(torch.bmm(k, k.transpose(1, 2)) * s + _their_window(*grid, std=5.0), -1)
    else:
        raise AssertionError(kind)
    out = torch.bmm(a, v).transpose(0, 1).reshape(length, b, width)
    return attn.out_proj(out)


def _their_logits(visual, x: torch.Tensor, kind: str, grid: tuple[int, int], texts: torch.Tensor) -> torch.Tensor:
    """Tokens before the last block (L, B, W) -> (B, K, gh, gw) cosine logits."""
    blk = visual.transformer.resblocks[-1]
    if kind == "sclip":
        x = x + _their_attention(blk.attn, blk.ln_1(x), kind, grid)
        x = x + blk.mlp(blk.ln_2(x))
    else:  # ClearCLIP (ignore_residual) and NACLIP (arch "reduced"): the attention output alone
        x = _their_attention(blk.attn, blk.ln_1(x), kind, grid)
    f = visual.ln_post(x.permute(1, 0, 2)) @ visual.proj  # (B, L, D)
    f = f[:, 1:]
    f = f / f.norm(dim=-1, keepdim=True)
    logits = f @ texts.T  # (B, gh*gw, K)
    return logits.permute(0, 2, 1).reshape(logits.shape[0], -1, *grid)


def _ours(visual, pixels: torch.Tensor, mode: str, texts: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        feats = dense_features(visual, pixels, mode).features  # (B, D, h, w)
    return torch.einsum("bdhw,kd->bkhw", feats, texts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip"])
def test_dense_logits_equal_the_authors_computation(tower, trunks, texts, mode):
    for (h, w), (pixels, x) in trunks.items():
        grid = (h // 16, w // 16)
        with torch.inference_mode():
            theirs = _their_logits(tower, x, mode, grid, texts)
        ours = _ours(tower, pixels, mode, texts)
        assert ours.shape == theirs.shape == (pixels.shape[0], 7, *grid)
        assert _rel(ours, theirs) < TOL, (mode, h, w, _rel(ours, theirs))
        # the comparison tells the modes apart: the other modes' references are far from ours
        for other in {"sclip", "clearclip", "naclip"} - {mode}:
            with torch.inference_mode():
                assert _rel(ours, _their_logits(tower, x, other, grid, texts)) > 100 * TOL, (mode, other, h, w)


def test_the_authors_positional_resize_differs_from_resizing_to_the_size(tower):
    """The (n + 0.1) / g factor moves the sampling positions: a real difference at 10 x 18, none at 14 x 14."""
    from labelstudio_maskclip.engine.dense import resize_pos_embed

    pos = tower.positional_embedding.detach()
    theirs = _their_pos(pos, 10, 18)
    torch.testing.assert_close(resize_pos_embed(pos, (10, 18), "factor"), theirs, rtol=1e-6, atol=1e-6)
    assert _rel(resize_pos_embed(pos, (10, 18), "size"), theirs) > 1e-3
    assert resize_pos_embed(pos, (14, 14), "factor") is pos


def test_naclip_window_is_the_authors_gaussian(tower):
    """Our (N+1, N+1) neighbourhood bias equals NACLIP's slid window on a non-square grid, std 5."""
    from labelstudio_maskclip.engine import dense

    ours = dense._gaussian_neighbourhood((3, 5), dense.NACLIP_SIGMA, "cpu", torch.float32)
    torch.testing.assert_close(ours, _their_window(3, 5, 5.0), rtol=1e-6, atol=1e-7)
    assert float(ours[1, 2]) == pytest.approx(math.exp(-1 / 50))  # neighbours one patch apart
    assert float(ours[1, 15]) == pytest.approx(math.exp(-(2**2 + 4**2) / 50))  # opposite corners of 3 x 5


# --- PAMR, as NACLIP and SCLIP apply it ----------------------------------------------------------------


def _their_pamr(image: torch.Tensor, mask: torch.Tensor, iterations: int, dilations: tuple[int, ...]) -> torch.Tensor:
    """PAMR the authors' way (their pamr.py, from 1-stage-wseg): 3 x 3 kernels applied as dilated convolutions
    with replicated borders; the mask first resized to the image, bilinear with align_corners=True."""
    mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    ring = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    copy = torch.zeros(8, 1, 3, 3)  # picks each of the 8 neighbours
    for i, (a, b) in enumerate(ring):
        copy[i, 0, a, b] = 1
    diff = copy.clone().neg()  # centre minus neighbour
    diff[:, 0, 1, 1] = 1
    all9 = torch.zeros(9, 1, 3, 3)  # the 3 x 3 neighbourhood, centre included
    for i in range(9):
        all9[i, 0, i // 3, i % 3] = 1

    def local(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, P, H, W)
        b, c, h, w = x.shape
        x = x.reshape(b * c, 1, h, w)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).reshape(b, c, -1, h, w)

    std = local(image, all9).std(2, keepdim=True)
    aff = (-local(image, diff).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True).softmax(2)  # (B, 1, P, H, W)
    for _ in range(iterations):
        mask = (local(mask, copy) * aff).sum(2)
    return mask


def test_pamr_equals_the_authors_module_on_a_small_case():
    from labelstudio_maskclip.engine.refine import PAMR_DILATIONS, PAMR_ITERATIONS, pamr_average, pamr_weights

    assert (PAMR_ITERATIONS, PAMR_DILATIONS) == (10, (8, 16))  # NACLIP's defaults
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 40, 48, generator=g)
    mask = torch.randn(2, 4, 40, 48, generator=g)
    weights = pamr_weights(image)
    assert weights.shape == (2, 16, 40, 48)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 40, 48))
    ours = pamr_average(mask, weights)
    torch.testing.assert_close(ours, _their_pamr(image, mask, 10, (8, 16)), rtol=1e-5, atol=1e-5)
    # other dilations and iteration counts follow the same rule
    ours = pamr_average(mask, pamr_weights(image, (1, 3)), (1, 3), 2)
    torch.testing.assert_close(ours, _their_pamr(image, mask, 2, (1, 3)), rtol=1e-5, atol=1e-5)
    # the image's mean/std normalisation does not change the weights
    torch.testing.assert_close(pamr_weights(image * 3.0 + 1.0), weights, rtol=1e-4, atol=1e-6)


def test_pamr_of_probabilities_is_the_authors_pamr_of_logits_then_softmax():
    """NACLIP: cosine logits on the grid -> bilinear to the image -> PAMR -> softmax(40 * .). Ours refines
    the probabilities softmax(40 * logits) on the grid and gives the same distribution."""
    from labelstudio_maskclip.engine.refine import pamr

    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 48, 64, generator=g)
    logits = 0.2 * torch.randn(1, 5, 3, 4, generator=g)
    up = F.interpolate(logits, size=(48, 64), mode="bilinear", align_corners=False)
    theirs = (40 * _their_pamr(image, up, 10, (8, 16))).softmax(1)
    ours = pamr(image, (40 * logits).softmax(1))
    assert ours.shape == (1, 5, 48, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert _rel((40 * up).softmax(1), theirs) > 1e-2  # and the refinement did change the map
    # a class removed by prompt denoising stays removed; the rest is still a distribution
    probs = (40 * logits).softmax(1)
    probs[:, 2] = 0
    probs = probs / probs.sum(1, keepdim=True)
    out = pamr(image, probs)
    assert float(out[:, 2].abs().max()) == 0.0
    torch.testing.assert_close(out.sum(1), torch.ones(1, 48, 64))


def test_pamr_moves_a_blurred_boundary_onto_the_image_edge():
    """A dark left half and a bright right half; the grid says 'left class' up to the middle but the
    upsampled map blurs it over a band; PAMR puts the boundary on the edge."""
    from labelstudio_maskclip.engine.refine import pamr

    image = torch.zeros(1, 3, 64, 64)
    image[..., 36:] = 1.0  # the edge sits between columns 35 and 36
    image += 0.01 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    grid = torch.zeros(1, 2, 4, 4)
    grid[:, 0, :, :2] = 1.0  # grid columns 0-1 (pixels 0-31) say class 0, columns 2-3 class 1
    grid[:, 1, :, 2:] = 1.0
    probs = (10 * grid).softmax(1)
    blurred = F.interpolate(probs, size=(64, 64), mode="bilinear", align_corners=False).argmax(1)
    refined = pamr(image, probs).argmax(1)
    truth = torch.zeros(1, 64, 64, dtype=torch.long)
    truth[..., 36:] = 1
    assert (blurred != truth).sum() > 0
    assert (refined == truth).float().mean() > (blurred == truth).float().mean()
    assert (refined == truth).all()
