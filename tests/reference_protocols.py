"""The four methods' whole inference, transcribed from their authors' code, independent of the package.

Read from the authors' repositories (SCLIP: github.com/wangf3014/SCLIP ``clip_segmentor.py``, ClearCLIP:
github.com/mc-lan/ClearCLIP ``clearclip_segmentor.py``, NACLIP: github.com/sinahmr/NACLIP ``naclip.py`` and
``pamr.py``, MaskCLIP: github.com/chongzhou96/MaskCLIP ``mmseg/models/backbones/vit.py``,
``decode_heads/maskclip_head.py``, ``segmentors/encoder_decoder.py``) and their VOC20 configs, written here in
plain torch / numpy / OpenCV in the authors' layout (sequence first, heads folded into the batch). Nothing
from ``labelstudio_maskclip`` is imported: tests/test_presets.py compares this with the package's presets.

Each method, image (H, W, 3) uint8 RGB in, (H, W) int64 label map out (argmax over classes):
- mmcv keep-ratio resize to (2048, S): factor min(2048 / long, S / short), sides int(x * f + 0.5), cv2
  INTER_LINEAR on the uint8 image; normalised with the method's mean/std (0..255 scale).
- SCLIP: S = 336, windows 224 / stride 112; CSA last block (residual and MLP kept); each window's grid logits
  upsampled to the window (the patch embedding drops a remainder), summed, divided by the count, upsampled
  to (H, W); softmax(40 x logits); a class's probability is its best name's.
- NACLIP: S = 336, whole image; last block reduced, attention softmax(k k^T s + Gaussian(std 5)); logits
  upsampled to the resized image then to (H, W); PAMR (10 steps, dilations 8 and 16) on the logits with the
  normalised resized image upsampled to (H, W); softmax(40 x logits); best name per class.
- ClearCLIP: S = 448, windows 448 / stride 224, each padded to a multiple of the patch (centred) and cut
  back; last block q-q attention, no residual, no MLP; softmax(50 x logits); best name per class.
- MaskCLIP: S = 512, whole image, ImageNet mean/std, every LayerNorm at eps 1e-6, the patch embedding pads
  bottom/right to a multiple of the patch; last block's value path (out_proj, + x, + MLP, ln_post), proj;
  logits upsampled to the resized (unpadded) size, then to (H, W); softmax (no temperature); 85 templates.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN, CLIP_STD = (122.771, 116.746, 104.094), (68.501, 66.632, 70.323)
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
SCENE = ["there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
         "this is the {} in the scene.", "this is one {} in the scene."]  # fmt: skip


def imagenet_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


# --- text ------------------------------------------------------------------------------------------------


@torch.no_grad()
def query_features(model, tokenizer, words: list[str], templates: list[str]) -> torch.Tensor:
    """Per word: encode every template, normalise, mean, normalise -> (N, D)."""
    out = []
    for w in words:
        f = model.encode_text(tokenizer([t.format(w) for t in templates])).float()
        f = f / f.norm(dim=-1, keepdim=True)
        f = f.mean(dim=0)
        out.append((f / f.norm())[None])
    return torch.cat(out)


# --- image side ------------------------------------------------------------------------------------------


def mmcv_rescale(img: np.ndarray, short: int, long: int = 2048) -> np.ndarray:
    h, w = img.shape[:2]
    factor = min(long / max(h, w), short / min(h, w))
    new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def normalise(img: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _ln(x: torch.Tensor, mod, eps: float | None) -> torch.Tensor:
    return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps if eps is None else eps)


def _pos_factor(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """SCLIP/ClearCLIP/NACLIP: bicubic with scale factors (n + 0.1) / g, unless the token count matches."""
    n = pos.shape[0] - 1
    if gh * gw == n:
        return pos
    g = int(math.sqrt(n))
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic",
                         align_corners=False, recompute_scale_factor=False)  # fmt: skip
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])


def _pos_size(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """MaskCLIP (mmseg): bicubic to the target size, unless the token count matches."""
    n = pos.shape[0] - 1
    if gh * gw == n:
        return pos
    g = int(math.sqrt(n))
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])


def _qkv(attn, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, B, W) -> q, k, v as (B * heads, L, hd)."""
    length, b, width = y.shape
    nh = attn.num_heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(t.reshape(length, b * nh, width // nh).transpose(0, 1) for t in (q, k, v))  # type: ignore[return-value]


def _unheads(t: torch.Tensor, length: int, b: int) -> torch.Tensor:
    return t.transpose(0, 1).reshape(length, b, -1)


def _vanilla_block(blk, x: torch.Tensor, eps: float | None) -> torch.Tensor:
    length, b, _ = x.shape
    q, k, v = _qkv(blk.attn, _ln(x, blk.ln_1, eps))
    a = F.softmax(torch.bmm(q * q.shape[-1] ** -0.5, k.transpose(1, 2)), dim=-1)
    x = x + blk.attn.out_proj(_unheads(torch.bmm(a, v), length, b))
    return x + blk.mlp(_ln(x, blk.ln_2, eps))


def _gaussian(gh: int, gw: int, std: float = 5.0) -> torch.Tensor:
    """NACLIP's addition: for patch (i, j) a Gaussian of the distance to every patch; 0 on the class token."""
    ys, xs = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    p = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1)
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    out = torch.zeros(gh * gw + 1, gh * gw + 1)
    out[1:, 1:] = torch.exp(-d2 / (2 * std**2))
    return out


def grid_logits(visual, pixels: torch.Tensor, method: str, text: torch.Tensor) -> torch.Tensor:
    """(1, 3, h, w) normalised -> (1, N, gh, gw) cosine logits, the method's image encoder."""
    eps = 1e-6 if method == "maskclip" else None
    p = visual.conv1.kernel_size[0]
    if method == "maskclip":  # mmseg PatchEmbed padding="corner"
        h, w = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, -w % p, 0, -h % p))
    x = visual.conv1(pixels)  # the stride drops any remainder
    b, width, gh, gw = x.shape
    x = x.reshape(b, width, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(b, 1, width), x], dim=1)
    pos = _pos_size if method == "maskclip" else _pos_factor
    x = _ln(x + pos(visual.positional_embedding, gh, gw), visual.ln_pre, eps).permute(1, 0, 2)  # (L, B, W)
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:-1]:
        x = _vanilla_block(blk, x, eps)
    blk = blocks[-1]
    length = x.shape[0]
    y = _ln(x, blk.ln_1, eps)
    q, k, v = _qkv(blk.attn, y)
    s = q.shape[-1] ** -0.5
    if method == "maskclip":  # v through out_proj, + x, + MLP (mmseg return_qkv path)
        v = blk.attn.out_proj(_unheads(v, length, b)) + x
        x = v + blk.mlp(_ln(v, blk.ln_2, eps))
    elif method == "sclip":
        a = F.softmax(torch.bmm(q, q.transpose(1, 2)) * s, -1) + F.softmax(torch.bmm(k, k.transpose(1, 2)) * s, -1)
        x = x + blk.attn.out_proj(_unheads(torch.bmm(a, v), length, b))
        x = x + blk.mlp(_ln(x, blk.ln_2, eps))
    elif method == "clearclip":
        a = F.softmax(torch.bmm(q, q.transpose(1, 2)) * s, -1)
        x = blk.attn.out_proj(_unheads(torch.bmm(a, v), length, b))
    else:  # naclip
        a = F.softmax(torch.bmm(k, k.transpose(1, 2)) * s + _gaussian(gh, gw), -1)
        x = blk.attn.out_proj(_unheads(torch.bmm(a, v), length, b))
    f = _ln(x.permute(1, 0, 2), visual.ln_post, eps) @ visual.proj  # (B, L, D)
    f = f[:, 1:]
    f = f / f.norm(dim=-1, keepdim=True)
    logits = f @ text.T
    return logits.permute(0, 2, 1).reshape(b, -1, gh, gw)


def forward_feature(visual, crop: torch.Tensor, method: str, text: torch.Tensor) -> torch.Tensor:
    """Logits at the crop's pixels; ClearCLIP pads (centred) and cuts back."""
    h, w = crop.shape[-2:]
    if method == "clearclip":
        p = visual.conv1.kernel_size[0]
        lr = p - w % p if w % p else 0
        tb = p - h % p if h % p else 0
        left, top = lr // 2, tb // 2
        padded = F.pad(crop, (left, lr - left, top, tb - top))
        up = F.interpolate(grid_logits(visual, padded, method, text), size=padded.shape[-2:], mode="bilinear")
        return up[:, :, top : top + h, left : left + w]
    return F.interpolate(grid_logits(visual, crop, method, text), size=(h, w), mode="bilinear")


def slide(visual, img: torch.Tensor, method: str, text: torch.Tensor, stride: int, crop: int) -> torch.Tensor:
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, text.shape[0], h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logit = forward_feature(visual, img[:, :, y1:y2, x1:x2], method, text)
            preds += F.pad(logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


# --- PAMR (visinf/1-stage-wseg, as NACLIP ships it) --------------------------------------------------------


def _kernel(kind: str) -> torch.Tensor:
    cells = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    if kind == "std":
        w = torch.zeros(9, 1, 3, 3)
        for i, (r, c) in enumerate([(r, c) for r in range(3) for c in range(3)]):
            w[i, 0, r, c] = 1
        return w
    w = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate(cells):
        if kind == "abs":
            w[i, 0, 1, 1] = 1
            w[i, 0, r, c] = -1
        else:
            w[i, 0, r, c] = 1
    return w


def _local(x: torch.Tensor, kernel: torch.Tensor, dilations) -> torch.Tensor:
    b, k, h, w = x.shape
    x = x.reshape(b * k, 1, h, w)
    parts = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
    return torch.cat(parts, 1).reshape(b, k, -1, h, w)


def pamr(image: torch.Tensor, mask: torch.Tensor, steps: int = 10, dilations=(8, 16)) -> torch.Tensor:
    mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    std = _local(image, _kernel("std"), dilations).std(2, keepdim=True)
    aff = -_local(image, _kernel("abs"), dilations).abs() / (1e-8 + 0.1 * std)
    aff = F.softmax(aff.mean(1, keepdim=True), 2)
    for _ in range(steps):
        mask = (_local(mask, _kernel("copy"), dilations) * aff).sum(2)
    return mask


# --- whole methods -----------------------------------------------------------------------------------------

SETUP = {  # method -> (short side, window, stride, temperature or None, mean, std, templates)
    "sclip": (336, 224, 112, 40.0, CLIP_MEAN, CLIP_STD, "imagenet"),
    "naclip": (336, 0, 0, 40.0, CLIP_MEAN, CLIP_STD, "imagenet"),
    "clearclip": (448, 448, 224, 50.0, CLIP_MEAN, CLIP_STD, "imagenet"),
    "maskclip": (512, 0, 0, None, IMAGENET_MEAN, IMAGENET_STD, "maskclip"),
}


# VOC with background (the authors' cfg_voc21.py and cls_voc21.txt): class 0 is the background, a list of
# names (SCLIP, NACLIP: 26 stuff words; ClearCLIP: "background"); then prob_thd, area_thd, logit_scale.
STUFF = ["sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed", "building",
         "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor", "hill", "rail",
         "fence"]  # fmt: skip
VOC_NAMES = [["aeroplane"], ["bicycle"], ["bird"], ["ship"], ["bottle"], ["bus"], ["car"], ["cat"], ["chair"], ["cow"],
             ["table"], ["dog"], ["horse"], ["motorbike"],
             ["person", "person in shirt", "person in jeans", "person in dress", "person in sweater",
              "person in skirt", "person in jacket"],
             ["pottedplant"], ["sheep"], ["sofa"], ["train"],
             ["television monitor", "tv monitor", "monitor", "television", "screen"]]  # fmt: skip
CLEARCLIP_VOC_NAMES = [[n] for n in ["aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair",
                                     "cow", "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
                                     "sofa", "train", "tvmonitor"]]  # fmt: skip
VOC21 = {  # method -> (class names with the background first, prob_thd, area_thd, logit_scale)
    "sclip": ([STUFF] + VOC_NAMES, 0.1, 0.1, 65.0),
    "naclip": ([STUFF] + VOC_NAMES, 0.1, None, 40.0),
    "clearclip": ([["background"]] + CLEARCLIP_VOC_NAMES, 0.5, None, 50.0),
}


@torch.no_grad()
def predict(
    model,
    tokenizer,
    image: np.ndarray,
    classes: list[list[str]],
    method: str,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    logit_scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB -> (H, W) int64 index into ``classes`` (each a list of names) and (H, W) float32
    winning probability. With ``prob_thd`` / ``area_thd`` class 0 is the background (the authors'
    postprocessing: a class winning at most ``area_thd`` of the other classes' pixels loses its probability,
    then pixels whose best probability is below ``prob_thd`` become 0); ``logit_scale`` replaces the
    method's temperature."""
    short, window, stride, temperature, mean, std, kind = SETUP[method]
    temperature = logit_scale or temperature
    templates = imagenet_templates() + SCENE if kind == "maskclip" else imagenet_templates()
    if method == "maskclip":  # one embedding per class (the authors' prompt script takes one name each)
        text = query_features(model, tokenizer, [c[0] for c in classes], templates)
        owner = list(range(len(classes)))
    else:
        text = query_features(model, tokenizer, [n for c in classes for n in c], templates)
        owner = [k for k, c in enumerate(classes) for _ in c]
    visual = model.visual
    ori = image.shape[:2]
    img = normalise(mmcv_rescale(image, short), mean, std)
    if window:
        logits = slide(visual, img, method, text, stride, window)
    else:
        logits = forward_feature(visual, img, method, text)  # NACLIP, and mmseg's encode_decode
    logits = F.interpolate(logits, size=ori, mode="bilinear", align_corners=False)
    if method == "naclip":
        guide = F.interpolate(img, size=ori, mode="bilinear", align_corners=False)
        logits = pamr(guide, logits)
    probs = F.softmax(logits[0] * (temperature or 1.0), dim=0)  # (N, H, W)
    idx = torch.tensor(owner)
    if len(set(owner)) != len(owner):
        one_hot = F.one_hot(idx).T.view(len(classes), len(owner), 1, 1)
        probs = (probs[None] * one_hot).max(1)[0]
    if area_thd is not None:  # SCLIP's postprocess_result
        predictions = F.one_hot(probs.argmax(0), len(classes)).to(probs.dtype)
        area = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area = (area > area_thd * area.sum()).to(probs.dtype)
        probs[1:] *= area.transpose(0, -1)
    best, label = probs.max(0)
    label[best < prob_thd] = 0
    return label.numpy(), best.numpy()
