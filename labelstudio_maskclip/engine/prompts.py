"""Interactive prompts on one image: a typed phrase, clicks, a box -> one (H, W) bool mask.

The expensive part of MaskCLIP, the image tower, runs once per image and is kept as a :class:`DenseImage`;
every further prompt on that image costs a few small tensor operations plus one upsampling. Boxes are the
exception: they run the tower again on the box's own crop, at the model's input size, which is what makes
their masks finer than the whole-image mask.

The image is encoded as the served preset does it (docs/method.md, "What the interactive path shares with
serving"): with the authors' pipeline, the mmcv resize, the preset's windows and pad rule, logits merged per
pixel of the resized image, its temperature and synonym rule (:class:`~.segmenter.WindowFeatures`); with
the ``grid`` pipeline, the patch features and key smoothing's weights on the encoder grid. What a prompt
does not repeat is the work at the original size: probabilities are made at the resized image's pixels
(or the grid) and upsampled, and PAMR is not run.

Coordinates are pixels of the image as decoded (after EXIF orientation): ``x`` = column, ``y`` = row.
Masks are (H, W) bool at the image's size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .dense import dense_features
from .refine import key_affinity, prompt_denoising, smooth
from .segmenter import MaskCLIP, SegmentOptions, WindowFeatures, merge_synonyms

__all__ = [
    "DenseImage", "encode_image", "grid_probs", "label_plane", "phrase_masks", "click_mask", "box_mask", "CLICK_WEIGHT",
    "REMEMBERED_PLANES",
]  # fmt: skip

#: Share of the click score that comes from the feature similarity to the clicked patches; the rest is the
#: clicked label's probability. Similarity alone follows texture, probability alone ignores the click.
CLICK_WEIGHT = 0.5
#: A pixel joins a click's region when its score is at least this share of the score at the click.
CLICK_RELATIVE_THRESHOLD = 0.6


#: Probability planes an image remembers for repeated clicks (:func:`label_plane`), the oldest dropped first.
REMEMBERED_PLANES = 4


@dataclass
class DenseImage:
    """One image's dense state: what every prompt on it reuses.

    features: the ``grid`` pipeline's (D, h, w) float32, L2-normalised along D, on the model's device; with
    ``windows``, the windows' (n, D, gh, gw).
    affinity: (h*w, h*w) key smoothing's weights (:func:`..refine.key_affinity` of the last-layer keys);
    empty with ``windows``.
    size: the image's (H, W) in pixels.
    windows: the authors' pipeline's features of the preset's windows (None: the ``grid`` pipeline).
    """

    features: torch.Tensor
    affinity: torch.Tensor
    size: tuple[int, int]
    windows: WindowFeatures | None = None
    planes: OrderedDict = field(default_factory=OrderedDict, repr=False)  # :func:`label_plane`'s, newest last

    @property
    def nbytes(self) -> int:
        """Its tensors' bytes, with room for :data:`REMEMBERED_PLANES` float32 probability planes."""
        own = sum(t.element_size() * t.nelement() for t in (self.features, self.affinity))
        height, width = self.windows.size if self.windows is not None else self.features.shape[-2:]
        return own + REMEMBERED_PLANES * 4 * height * width


@torch.inference_mode()
def encode_image(
    seg: MaskCLIP, image: np.ndarray, opts: SegmentOptions, compute_dtype: torch.dtype | None = None
) -> DenseImage:
    """Run the image tower once: (H, W, 3) uint8 RGB -> :class:`DenseImage`. The authors' pipeline: as
    :meth:`MaskCLIP.window_features` (the preset's resize and windows); ``grid``: the whole image resized
    to ``opts.short_side``, no window.

    compute_dtype: run the tower's matrix products in this dtype under autocast (bf16 on a CPU that has it
    natively: about twice as fast as fp32); None: the model's own dtype. The features come out float32.
    """
    height, width = image.shape[:2]
    enabled = compute_dtype is not None and compute_dtype != seg.clip.dtype
    tower = torch.autocast(seg.device.type, dtype=compute_dtype, enabled=enabled)  # the tower only
    if opts.pipeline == "authors":
        with tower:
            windows = replace(seg.window_features(image, opts), pixels=torch.empty(0))  # no PAMR here: no guide
        return DenseImage(features=windows.features, affinity=torch.empty(0), size=(height, width), windows=windows)
    size = seg.input_size(height, width, opts.short_side, opts.size_multiple, opts.max_input_pixels)
    pixels = seg.preprocess([image], size)  # (1, 3, H', W')
    with tower:
        out = dense_features(seg.clip.model.visual, pixels.to(seg.device, seg.clip.dtype), opts.mode)
    return DenseImage(features=out.features[0], affinity=key_affinity(out.keys)[0], size=(height, width))


def _logits(dense: DenseImage, emb: torch.Tensor) -> torch.Tensor:
    """(E, D) rows -> (E, h, w) cosine logits: on the encoder grid, or with ``windows`` at the resized
    image's pixels, the windows merged as serving merges them."""
    if dense.windows is not None:
        return dense.windows.logits(emb)[0]
    return torch.einsum("dhw,kd->khw", dense.features, emb.to(dense.features.device, torch.float32))


@torch.inference_mode()
def grid_probs(
    dense: DenseImage, emb: torch.Tensor, opts: SegmentOptions, owner: torch.Tensor | None = None
) -> torch.Tensor:
    """(K, h, w) class probabilities for the rows ``emb`` (E, D): ``softmax(temperature * logits)`` on the
    grid with the refinements ``opts`` asks for (the same steps as :meth:`MaskCLIP.grid_probs`), or with
    ``windows`` at the resized image's pixels (the authors' pipeline uses no refinement but PAMR). ``owner``
    (E,): the class of each row when a class has several names, each class taking its best name's
    probability (the ``"max"`` synonym rule); None: one row per class."""
    logits = _logits(dense, emb)
    probs = (opts.temperature * logits).softmax(0)[None]  # (1, E, h, w)
    if owner is not None:
        probs = merge_synonyms(probs[0], owner.to(probs.device))[None]  # (1, K, h, w)
    if dense.windows is not None:
        return probs[0]
    if opts.key_smoothing:
        probs = smooth(probs, dense.affinity[None])
    if opts.prompt_denoising:
        probs = prompt_denoising(probs)
    return probs[0]


def label_plane(
    dense: DenseImage, emb: torch.Tensor, opts: SegmentOptions, owner: torch.Tensor | None, k: int, key: Hashable
) -> torch.Tensor:
    """Class ``k``'s plane of :func:`grid_probs` ``(dense, emb, opts, owner)``, remembered on ``dense`` under
    ``(key, k)``: ``key`` names what ``emb``, ``owner`` and ``opts`` hold (the caller's label set), so that a
    repeated click on the image skips the logits and the softmax over every class (with the preset's windows,
    at every pixel of the resized image: most of a repeated click's time). At most
    :data:`REMEMBERED_PLANES` are kept, as :attr:`DenseImage.nbytes` counts."""
    remembered = dense.planes.get((key, k))
    if remembered is None:
        remembered = grid_probs(dense, emb, opts, owner)[k].clone()  # its own storage: not all K planes kept
        dense.planes[(key, k)] = remembered
        while len(dense.planes) > REMEMBERED_PLANES:
            dense.planes.popitem(last=False)
    return remembered


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) or (K, h, w) -> the same at ``size`` (H, W), bilinear."""
    squeeze = grid.dim() == 2
    up = F.interpolate(grid.reshape(1, -1, *grid.shape[-2:]).float(), size=size, mode="bilinear", align_corners=False)
    return up[0, 0] if squeeze else up[0]


@torch.inference_mode()
def phrase_masks(
    dense: DenseImage, emb: torch.Tensor, n_phrases: int, opts: SegmentOptions, owner: torch.Tensor | None = None
) -> list[tuple[np.ndarray, float]]:
    """(mask, score) of the first ``n_phrases`` classes of ``emb`` (phrases first, then background classes:
    the project's other labels and background words; ``owner`` as in :func:`grid_probs`), each pixel to its
    most probable class; the score is the mean winning probability over the mask (0 for an empty mask)."""
    grid = grid_probs(dense, emb, opts, owner)  # (K, h, w)
    best = _upsample(grid[0], dense.size)  # (H, W): one class at a time, so memory does not grow with K
    winner = torch.zeros(dense.size, dtype=torch.int16, device=best.device)
    for k in range(1, grid.shape[0]):
        up = _upsample(grid[k], dense.size)
        better = up > best  # ties stay with the first class, as max(0) keeps them
        best = torch.where(better, up, best)
        winner[better] = k
    out = []
    for j in range(n_phrases):
        mine = winner == j
        out.append((mine.cpu().numpy(), float(best[mine].mean()) if bool(mine.any()) else 0.0))
    return out


def _grid_cell(point: tuple[float, float], size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """Pixel (x, y) of an image of ``size`` (H, W) -> (row, col) of the encoder grid ``grid`` (h, w)."""
    (x, y), (height, width), (h, w) = point, size, grid
    return min(h - 1, max(0, int(y * h / height))), min(w - 1, max(0, int(x * w / width)))


def _window_anchor(windows: WindowFeatures, point: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """(D,) the feature under pixel (x, y) of an image of ``size``: in the window holding it whose centre is
    nearest, at its grid cell."""
    x, y = point[0] * windows.size[1] / size[1], point[1] * windows.size[0] / size[0]  # in the resized image

    def distance(box: tuple[int, int, int, int]) -> float:
        y0, y1, x0, x1 = box
        return (y - (y0 + y1) / 2) ** 2 + (x - (x0 + x1) / 2) ** 2

    i = min(range(len(windows.boxes)), key=lambda j: distance(windows.boxes[j]))
    y0, y1, x0, x1 = windows.boxes[i]
    _, _, gh, gw = windows.features.shape
    r, c = _grid_cell((x - x0, y - y0), (y1 - y0, x1 - x0), (gh, gw))
    return windows.features[i, :, r, c]


def _similarity(dense: DenseImage, points: Sequence[tuple[float, float]]) -> torch.Tensor:
    """(h, w) highest cosine similarity of each patch to the patches under ``points`` (-1 when none); with
    ``windows``, of each pixel of the resized image, the windows merged as logits are."""
    if dense.windows is not None:
        if not points:
            return torch.full(dense.windows.size, -1.0, device=dense.features.device)
        anchors = torch.stack([_window_anchor(dense.windows, p, dense.size) for p in points])  # (P, D)
        return _logits(dense, anchors).amax(0)
    _, h, w = dense.features.shape
    if not points:
        return torch.full((h, w), -1.0, device=dense.features.device)
    cells = [_grid_cell(p, dense.size, (h, w)) for p in points]
    anchors = torch.stack([dense.features[:, r, c] for r, c in cells])  # (P, D)
    return torch.einsum("pd,dhw->phw", anchors, dense.features).amax(0)


@torch.inference_mode()
def click_mask(
    dense: DenseImage,
    label_probs: torch.Tensor,
    positive: Sequence[tuple[float, float]],
    negative: Sequence[tuple[float, float]] = (),
) -> tuple[np.ndarray, float]:
    """The region of the clicked label that contains the positive clicks and none of the negative ones.

    label_probs: (h, w) the clicked label's probability on the grid. Score of a patch:
    ``CLICK_WEIGHT * similarity to the positive clicks' patches + (1 - CLICK_WEIGHT) * label probability``;
    patches more similar to a negative click than to every positive one score 0. The score is upsampled to
    the image, kept where it reaches ``CLICK_RELATIVE_THRESHOLD`` of its value at the click (so the clicked
    pixel is always in), and only the connected parts that hold a positive click remain. A click on a pixel
    the model gives to another label still yields a region: the similarity term carries it.
    Returns the (H, W) bool mask and the label's mean probability over it.
    """
    if not positive:
        raise ValueError("at least one positive click is needed")
    pos, neg = _similarity(dense, positive), _similarity(dense, negative)
    score = CLICK_WEIGHT * pos.clamp_min(0) + (1 - CLICK_WEIGHT) * label_probs.to(pos.device)
    score = torch.where(neg > pos, torch.zeros_like(score), score)
    up = _upsample(score, dense.size).cpu().numpy()  # (H, W)
    height, width = dense.size
    clicks = [(min(height - 1, max(0, int(y))), min(width - 1, max(0, int(x)))) for x, y in positive]
    keep = np.zeros(dense.size, bool)
    for r, c in clicks:
        keep |= up >= CLICK_RELATIVE_THRESHOLD * up[r, c]
    for x, y in negative:
        keep[min(height - 1, max(0, int(y))), min(width - 1, max(0, int(x)))] = False
    _, components = cv2.connectedComponents(keep.astype(np.uint8), connectivity=8)
    chosen = {components[r, c] for r, c in clicks} - {0}
    mask = np.isin(components, list(chosen))
    for r, c in clicks:
        mask[r, c] = True
    label_up = _upsample(label_probs, dense.size).cpu().numpy()
    return mask, float(label_up[mask].mean())


def box_mask(
    seg: MaskCLIP,
    image: np.ndarray,
    corners: np.ndarray,
    label: int,
    emb: torch.Tensor,
    opts: SegmentOptions,
    owner: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, float]:
    """Label ``label``'s mask inside a (possibly rotated) box, segmented on the box's own crop.

    corners: (4, 2) float pixel (x, y) corners of the box. The crop is the box's axis-aligned bounding
    box, resized to the model's input size, so small boxes get finer masks than the whole image gives.
    emb: (E, D) embeddings of the project's labels (and background classes after them; ``owner`` as in
    :func:`grid_probs`); each crop pixel
    goes to its most probable class. When the label wins nowhere in the crop, its pixels of at least half
    its peak probability are taken instead: the box says the label is there. The mask is clipped to the box.
    Prompt denoising is off here for the same reason. compute_dtype: as :func:`encode_image`'s. Returns the
    (H, W) bool mask and the label's mean probability over it.
    """
    height, width = image.shape[:2]
    inside = np.zeros((height, width), np.uint8)
    cv2.fillPoly(inside, [np.round(corners).astype(np.int32)], 1)
    ys, xs = np.nonzero(inside)
    if len(ys) == 0:
        raise ValueError("the box covers no pixel of the image")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    crop_opts = replace(opts, size_multiple=0, window=0, prompt_denoising=False)
    dense = encode_image(seg, crop, crop_opts, compute_dtype)
    probs = _upsample(grid_probs(dense, emb, crop_opts, owner), dense.size)  # (K, h_crop, w_crop)
    mine = probs.argmax(0) == label
    if not bool(mine.any()):
        mine = probs[label] >= 0.5 * probs[label].max()
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = mine.cpu().numpy()
    mask &= inside.astype(bool)
    label_probs = np.zeros((height, width), np.float32)
    label_probs[y0:y1, x0:x1] = probs[label].cpu().numpy()
    return mask, float(label_probs[mask].mean()) if mask.any() else 0.0
