"""MaskCLIP as a segmenter: images and label names in, label maps, masks and confidence scores out.

Pipeline per batch: resize (short side ``short_side``, sides rounded to the encoder's stride) -> dense
features (whole image or sliding window) -> cosine logits against the class text embeddings ->
``softmax(temperature * logits)`` -> key smoothing (per window) -> prompt denoising -> probabilities
upsampled to the original size in chunks of classes -> label map, confidence, per-class scores.

Rules for the output (also in the README):
- A pixel belongs to the label with the highest probability. It belongs to **no label** (``NO_LABEL``)
  when that probability is below ``min_confidence`` or when the winner is a background class.
- A label is **absent** when prompt denoising removed it (its peak probability over the image's patches is
  below 0.5) or no pixel ended up with it; absent labels have area 0 and score 0.
- Score of a label: mean winning probability over its pixels. Score of an image: mean winning probability
  over all its labelled pixels (0 when none): low scores sort first for active learning.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .dense import dense_features, output_stride
from .loading import LoadedCLIP, load_clip
from .modes import DENSE_MODES
from .names import ClassNames, normalize_classes
from .refine import key_smoothing, prompt_denoising
from .text import encode_classes, resolve_templates

__all__ = [
    "MaskCLIP", "SegmentOptions", "Segmentation", "NO_LABEL", "resized_size", "normalized_batch", "segment_in_batches",
]  # fmt: skip

NO_LABEL = -1
_UPSAMPLE_BUDGET = 2**28  # elements per interpolate call, far below INT_MAX


@dataclass(frozen=True)
class SegmentOptions:
    mode: str = "maskclip"  # one of DENSE_MODES
    short_side: int = 448  # the image is resized so its short side has this many pixels (0: keep size)
    size_multiple: int = 0  # sides rounded to about this many pixels (0: the encoder stride); see resized_size
    window: int = 0  # sliding-window size in pixels of the resized image; 0 = whole image
    stride: int = 224  # sliding-window stride
    key_smoothing: bool = True
    prompt_denoising: bool = True
    temperature: float = 100.0  # softmax(temperature * cosine logits)
    min_confidence: float = 0.0  # winning probability below this -> NO_LABEL
    batch_size: int = 16


@dataclass
class Segmentation:
    """One image's result. Masks are (H, W) bool at the original image size."""

    labels: np.ndarray  # (H, W) int16: index into the label classes, NO_LABEL where no label
    confidence: np.ndarray  # (H, W) float32: the winning class's probability
    grid_probs: np.ndarray  # (K + Kb, h, w) float32 on the encoder grid: label classes, then background
    class_scores: np.ndarray  # (K,) float32: mean confidence over the label's pixels, 0 if absent
    class_areas: np.ndarray  # (K,) int64: pixels per label
    score: float  # mean confidence over labelled pixels

    @property
    def present(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(self.class_areas)]

    def mask(self, k: int) -> np.ndarray:
        return self.labels == k

    def masks(self) -> dict[int, np.ndarray]:
        return {k: self.mask(k) for k in self.present}

    def probabilities(self) -> np.ndarray:
        """(K + Kb, H, W) float32 class probabilities at the original size (computed on demand)."""
        h, w = self.labels.shape
        probs = torch.from_numpy(self.grid_probs)[None]
        return F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()


class MaskCLIP:
    """A frozen CLIP turned into a dense classifier. Build with :meth:`load` (or ``models.shared_maskclip``)."""

    def __init__(self, clip: LoadedCLIP, templates: Sequence[str] | str | None = None):
        self.clip = clip
        self.stride = output_stride(clip.model.visual)
        self.templates = resolve_templates(templates)
        self._mean = torch.tensor(clip.mean, device=clip.device).view(1, 3, 1, 1)
        self._std = torch.tensor(clip.std, device=clip.device).view(1, 3, 1, 1)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str = "ViT-B-16",
        pretrained: str = "openai",
        device: str | None = None,
        precision: str | None = None,
        *,
        allow_random: bool = False,
        cache_dir: str | None = None,
        templates: Sequence[str] | str | None = None,
    ) -> MaskCLIP:
        """Load an open_clip model (see :func:`labelstudio_maskclip.engine.loading.load_clip`)."""
        clip = load_clip(model, pretrained, device, precision, allow_random=allow_random, cache_dir=cache_dir)
        return cls(clip, templates)

    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def version(self) -> str:
        """Short model description for ``model_version`` strings, e.g. ``"ViT-B-16.openai"``."""
        tag = self.clip.pretrained.rsplit("/", 1)[-1]
        return f"{self.clip.name}.{tag}"

    # -- text ---------------------------------------------------------------------------------------
    def text_embeddings(
        self, classes: Sequence[ClassNames], templates: Sequence[str] | str | None = None
    ) -> torch.Tensor:
        """(K, D) float32 L2-normalised class embeddings, cached per (names, templates).

        A class is a name or a sequence of synonyms. With one name per class, row k is the mean over
        templates of the L2-normalised ``encode_text`` outputs, renormalised; synonyms are averaged the
        same way as templates.
        """
        names = normalize_classes(classes)
        temps = self.templates if templates is None else resolve_templates(templates)
        key = (names, temps)
        with self._lock:
            if key in self._text_cache:
                self._text_cache.move_to_end(key)
                return self._text_cache[key]
            emb = encode_classes(self.clip.model, self.clip.tokenizer, names, temps, self.device)
            self._text_cache[key] = emb
            if len(self._text_cache) > 64:
                self._text_cache.popitem(last=False)
            return emb

    # -- dense --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def dense_logits(self, pixels: torch.Tensor, emb: torch.Tensor, mode: str = "maskclip") -> torch.Tensor:
        """Cosine similarities of dense features and class embeddings.

        pixels: (B, 3, H, W) normalised with the model's mean/std, H and W multiples of ``self.stride``.
        emb: (K, D). Returns (B, K, h, w) float32, (h, w) = (H, W) / stride. No refinement, no scaling.
        """
        out = dense_features(self.clip.model.visual, pixels.to(self.device, self.clip.dtype), mode)
        return torch.einsum("bdhw,kd->bkhw", out.features, emb.to(self.device, torch.float32))

    @torch.inference_mode()
    def grid_probs(self, pixels: torch.Tensor, emb: torch.Tensor, opts: SegmentOptions) -> torch.Tensor:
        """(B, K, h, w) float32 class probabilities on the encoder grid, refinements applied.

        pixels: (B, 3, H, W) normalised; with ``opts.window`` the image is covered by windows of that
        size (``opts.stride`` apart, the last flush with the border) whose probabilities are averaged
        where they overlap. A window covering the whole image gives exactly the whole-image result.
        """
        s = self.stride
        _, _, height, width = pixels.shape
        win = opts.window
        if not win or (win >= height and win >= width):
            probs = self._window_probs(pixels, emb, opts)
        else:
            if win % s or opts.stride % s:
                raise ValueError(f"window {win} and stride {opts.stride} must be multiples of {s}")
            boxes = _windows(height, width, win, opts.stride)
            crops = torch.cat([pixels[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])  # (n*B, 3, wh, ww)
            crop_probs = self._window_probs(crops, emb, opts).split(pixels.shape[0])  # n x (B, K, wh/s, ww/s)
            probs = torch.zeros(pixels.shape[0], emb.shape[0], height // s, width // s, device=self.device)
            count = torch.zeros(1, 1, height // s, width // s, device=self.device)
            for (y0, y1, x0, x1), p in zip(boxes, crop_probs):
                probs[:, :, y0 // s : y1 // s, x0 // s : x1 // s] += p
                count[:, :, y0 // s : y1 // s, x0 // s : x1 // s] += 1
            probs = probs / count
        if opts.prompt_denoising:
            probs = prompt_denoising(probs)
        return probs

    def _window_probs(self, pixels: torch.Tensor, emb: torch.Tensor, opts: SegmentOptions) -> torch.Tensor:
        out = dense_features(self.clip.model.visual, pixels.to(self.device, self.clip.dtype), opts.mode)
        logits = torch.einsum("bdhw,kd->bkhw", out.features, emb.to(self.device, torch.float32))
        probs = (opts.temperature * logits).softmax(1)  # (B, K, h, w)
        if opts.key_smoothing:
            probs = key_smoothing(probs, out.keys)
        return probs

    # -- images -------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] on the model's device -> normalised with the model's mean/std."""
        return (images - self._mean) / self._std

    def preprocess(self, images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """Same-size batch: list of (H, W, 3) uint8 RGB -> (B, 3, size) normalised on the model's device."""
        return normalized_batch(images, size, self._mean, self._std)

    def input_size(self, height: int, width: int, short_side: int, multiple: int = 0) -> tuple[int, int]:
        """Resized (H', W'): short side ``short_side`` (0 keeps the size), sides rounded as
        :func:`resized_size` says."""
        return resized_size(height, width, short_side, self.stride, multiple)

    @torch.inference_mode()
    def segment(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[ClassNames],
        background: Sequence[ClassNames] = (),
        opts: SegmentOptions = SegmentOptions(),
        progress=None,
    ) -> list[Segmentation]:
        """Segment (H, W, 3) uint8 RGB images of any sizes into ``classes`` (+ ``background`` classes,
        whose pixels become NO_LABEL). Images are grouped by resized shape and batched; ``progress`` is
        called with the number of images finished after each batch."""
        if opts.mode not in DENSE_MODES:
            raise ValueError(f"unknown dense mode {opts.mode!r}")
        emb = self.text_embeddings(list(classes) + list(background))  # (K + Kb, D)
        return segment_in_batches(
            images,
            lambda h, w: self.input_size(h, w, opts.short_side, opts.size_multiple),
            lambda batch, size: self.grid_probs(self.preprocess(batch, size), emb, opts),
            n_labels=len(classes),
            batch_size=opts.batch_size,
            min_confidence=opts.min_confidence,
            progress=progress,
        )


def resized_size(height: int, width: int, short_side: int, stride: int, multiple: int = 0) -> tuple[int, int]:
    """(H', W') with short side ``short_side`` (0 keeps the size), rounded to a multiple of ``stride``; the
    long side is rounded to a multiple of ``stride * max(1, round(multiple / stride))`` (``multiple`` 0: of
    the stride). Coarser rounding of the long side puts images of similar shapes into the same batch at the
    cost of a small change of aspect ratio (64 px on a 448 px short side: at most 7 %); the masks are
    upsampled back to the original size either way."""
    step = stride * max(1, round(multiple / stride)) if multiple > 0 else stride
    scale = short_side / min(height, width) if short_side else 1.0

    def side(n: int, unit: int) -> int:
        return max(unit, round(n * scale / unit) * unit)

    if height <= width:
        return side(height, stride), side(width, step)
    return side(height, step), side(width, stride)


def normalized_batch(
    images: Sequence[np.ndarray], size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB images -> (B, 3, *size) float32 on ``mean``'s device, resized (bilinear,
    antialiased) and normalised; ``mean``/``std``: (1, 3, 1, 1) on the 0..1 scale."""
    out = []
    for img in images:
        t = torch.from_numpy(np.require(img, requirements=["C", "W"])).to(mean.device).permute(2, 0, 1)[None]
        out.append(F.interpolate(t.float() / 255.0, size=size, mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(out) - mean) / std  # (B, 3, h, w)


def segment_in_batches(
    images: Sequence[np.ndarray],
    size_of: Callable[[int, int], tuple[int, int]],
    probs_of: Callable[[list[np.ndarray], tuple[int, int]], torch.Tensor],
    *,
    n_labels: int,
    batch_size: int,
    min_confidence: float,
    progress: Callable[[int], None] | None = None,
) -> list[Segmentation]:
    """The batching shared by every segmenter: images grouped by resized shape ``size_of(H, W)``, run in
    batches through ``probs_of(images, size) -> (B, K + Kb, h, w)`` probabilities, finalised one by one at
    their original sizes. ``progress(n)`` is called after each batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
        groups.setdefault(size_of(img.shape[0], img.shape[1]), []).append(i)
    results: list[Segmentation | None] = [None] * len(images)
    for size, idx in groups.items():
        for b in range(0, len(idx), max(1, batch_size)):
            batch = idx[b : b + max(1, batch_size)]
            probs = probs_of([images[i] for i in batch], size)
            for i, p in zip(batch, probs):
                results[i] = _finalize(p, images[i].shape[:2], n_labels, min_confidence)
            if progress is not None:
                progress(len(batch))
    return results  # type: ignore[return-value]


def _windows(height: int, width: int, win: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Window boxes (y0, y1, x0, x1) covering the image, the last in each direction flush with the border."""

    def starts(n: int) -> list[int]:
        if n <= win:
            return [0]
        last = n - win
        return sorted(set(list(range(0, last, stride)) + [last]))

    return [(y0, min(y0 + win, height), x0, min(x0 + win, width)) for y0 in starts(height) for x0 in starts(width)]


def _finalize(probs: torch.Tensor, size: tuple[int, int], n_labels: int, min_conf: float) -> Segmentation:
    """Grid probabilities (K + Kb, h, w) -> Segmentation at ``size`` (H, W).

    Upsamples a chunk of classes at a time and keeps the running maximum, so the full (K, H, W) tensor is
    never materialised and no interpolate call exceeds INT_MAX elements.
    """
    height, width = size
    k_all = probs.shape[0]
    chunk = max(1, _UPSAMPLE_BUDGET // (height * width))
    best = torch.full((height, width), -1.0, device=probs.device)
    label = torch.zeros((height, width), dtype=torch.long, device=probs.device)
    for c0 in range(0, k_all, chunk):
        up = F.interpolate(probs[None, c0 : c0 + chunk], size=size, mode="bilinear", align_corners=False)[0]
        value, index = up.max(0)  # (H, W) each
        better = value > best
        best = torch.where(better, value, best)
        label = torch.where(better, index + c0, label)
    no_label = (label >= n_labels) | (best < min_conf)
    label = label.masked_fill(no_label, NO_LABEL)
    valid = label >= 0
    areas = torch.bincount(label[valid], minlength=n_labels)[:n_labels]
    conf_sums = torch.bincount(label[valid], weights=best[valid].double(), minlength=n_labels)[:n_labels]
    scores = torch.where(areas > 0, conf_sums / areas.clamp_min(1), torch.zeros_like(conf_sums))
    image_score = float(best[valid].mean()) if bool(valid.any()) else 0.0
    return Segmentation(
        labels=label.to(torch.int16).cpu().numpy(),
        confidence=best.float().cpu().numpy(),
        grid_probs=probs.float().cpu().numpy(),
        class_scores=scores.float().cpu().numpy(),
        class_areas=areas.cpu().numpy().astype(np.int64),
        score=image_score,
    )
