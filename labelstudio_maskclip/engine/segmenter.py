"""MaskCLIP as a segmenter: images and label names in, label maps, masks and confidence scores out.

Pipeline per batch: resize (short side ``short_side``, sides rounded to the encoder's stride) -> dense
features (whole image or sliding window) -> cosine logits against the class text embeddings ->
``softmax(temperature * logits)`` -> key smoothing (per window) -> prompt denoising -> optionally PAMR
(``refine="pamr"``) at the resized image's resolution -> probabilities upsampled to the original size in
chunks of classes -> label map, confidence, per-class scores.

Rules for the output (also in the README):
- A pixel belongs to the label with the highest probability. It belongs to **no label** (``NO_LABEL``)
  when that probability is below ``min_confidence`` or when the winner is a background class.
- A label is **absent** when prompt denoising removed it (its peak probability over the image's patches is
  below 0.5) or no pixel ended up with it; absent labels have area 0 and score 0.
- Score of a label: mean winning probability over its pixels. Score of an image (``SegmentOptions.score``,
  one of :data:`SCORES`), averaged over its labelled pixels (0 when none); every kind is in [0, 1] and
  lower means less sure, so low scores sort first for active learning:
  ``confidence``: the winning probability; ``margin``: the winning probability minus the second best;
  ``entropy``: 1 - the entropy of the pixel's class distribution / log(number of classes).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .dense import dense_features, output_stride
from .loading import LoadedCLIP, load_clip
from .modes import DENSE_MODES
from .names import ClassNames, name_owners, normalize_classes
from .protocol import merge_windows, mmcv_resize, mmcv_size, slide_boxes, window_input, window_output
from .refine import REFINEMENTS, key_smoothing, pamr, pamr_average, pamr_weights, prompt_denoising
from .text import encode_classes, resolve_templates, synonym_means

__all__ = [
    "MaskCLIP", "SegmentOptions", "Segmentation", "NO_LABEL", "SCORES", "resized_size", "normalized_batch", "segment_in_batches",
    "merge_synonyms", "drop_small_labels", "WindowFeatures",
]  # fmt: skip

NO_LABEL = -1
SCORES = ("confidence", "margin", "entropy")  # image score kinds; see the module docstring
_UPSAMPLE_BUDGET = 2**22  # probabilities upsampled at once in _finalize (16 MiB of float32)
# _finalize_all on a GPU: at most this many probabilities upsampled at once (width-upsampled grids, bands of
# rows), and this many output pixels held on the device, per batch of images finished together
_BATCH_UPSAMPLE_BUDGET = 2**26
_BATCH_OUTPUT_PIXELS = 2**25
REFINE_MAX_SIDE = 896  # PAMR runs at the resized image's resolution, its long side capped at this


@dataclass(frozen=True)
class SegmentOptions:
    mode: str = "maskclip"  # one of DENSE_MODES
    short_side: int = 448  # the image is resized so its short side has this many pixels (0: keep size)
    size_multiple: int = 0  # sides rounded to about this many pixels (0: the encoder stride); see resized_size
    # At most this many pixels enter the encoder per image (0: 4 x short_side^2, no bound when short_side is
    # 0): an extreme aspect ratio (a 1 x 100000 strip) is squeezed instead of asking for gigabytes.
    max_input_pixels: int = 0
    window: int = 0  # sliding-window size in pixels of the resized image; 0 = whole image
    stride: int = 224  # sliding-window stride
    key_smoothing: bool = True
    prompt_denoising: bool = True
    refine: str = "none"  # "pamr": pixel-adaptive mask refinement at the resized image's resolution
    temperature: float = 100.0  # softmax(temperature * cosine logits)
    min_confidence: float = 0.0  # winning probability below this -> NO_LABEL
    batch_size: int = 16
    score: str = "confidence"  # image score, one of SCORES
    # "grid": the pipeline above; "authors": the methods' own inference (engine/protocol.py): mmcv resize,
    # logits merged per pixel, softmax (and PAMR) at the original size; key smoothing and denoising unused.
    pipeline: str = "grid"
    pad: str = "truncate"  # "authors": sides not a multiple of the patch (engine.protocol.window_logits)
    synonyms: str = "mean"  # "max": a class's probability is the max over its names' (authors' pipeline)
    max_long_side: int = 2048  # "authors": mmcv's scale (max_long_side, short_side)
    # "authors": a label winning at most this share of the pixels that labels win is dropped (its
    # probability set to 0 before the label map is made): SCLIP's area_thd on VOC21; 0 keeps every label
    area_threshold: float = 0.0


@dataclass
class Segmentation:
    """One image's result. Masks are (H, W) bool at the original image size."""

    labels: np.ndarray  # (H, W) int16: index into the label classes, NO_LABEL where no label
    confidence: np.ndarray  # (H, W) float32: the winning class's probability
    grid_probs: np.ndarray  # (K + Kb, h, w) float32 on the encoder grid (with PAMR: the refined resolution)
    class_scores: np.ndarray  # (K,) float32: mean confidence over the label's pixels, 0 if absent
    class_areas: np.ndarray  # (K,) int64: pixels per label
    score: float  # image score (SegmentOptions.score) averaged over labelled pixels; lower = less sure

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

    def __init__(
        self,
        clip: LoadedCLIP,
        templates: Sequence[str] | str | None = None,
        *,
        compile: bool = False,
        normalize: str = "model",
        layer_norm_eps: float | None = None,
    ):
        """``normalize``: pixel mean/std, ``"model"`` (the weights') or ``"imagenet"`` (MaskCLIP's configs);
        ``layer_norm_eps``: the image tower's LayerNorm epsilon while this segmenter runs it (None: as built)."""
        self.clip = clip
        self.stride = output_stride(clip.model.visual)
        self.templates = resolve_templates(templates)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
        mean, std = (clip.mean, clip.std) if normalize == "model" else NORMALIZATIONS[normalize]
        self.normalization, self.layer_norm_eps = normalize, layer_norm_eps
        self._mean = torch.tensor(mean, device=clip.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=clip.device).view(1, 3, 1, 1)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        # The image tower, optionally compiled (one graph per input shape: size buckets keep them few).
        self.compiled = compile
        self._dense = torch.compile(dense_features, dynamic=False) if compile else dense_features

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
        compile: bool = False,
        normalize: str = "model",
        layer_norm_eps: float | None = None,
    ) -> MaskCLIP:
        """Load an open_clip model (see :func:`labelstudio_maskclip.engine.loading.load_clip`); ``compile``
        runs the image tower through ``torch.compile``."""
        clip = load_clip(model, pretrained, device, precision, allow_random=allow_random, cache_dir=cache_dir)
        return cls(clip, templates, compile=compile, normalize=normalize, layer_norm_eps=layer_norm_eps)

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

    def name_embeddings(
        self, classes: Sequence[ClassNames], templates: Sequence[str] | str | None = None
    ) -> torch.Tensor:
        """(N, D) float32 L2-normalised embeddings, one row per name of ``classes`` in order
        (:func:`~.names.name_owners` maps rows to classes): what the stored text embeddings hold and what
        :meth:`segment` takes as ``text``; a preset's synonym rule merges them (:meth:`class_text`)."""
        return self.text_embeddings([(n,) for names in normalize_classes(classes) for n in names], templates)

    @staticmethod
    def class_text(
        names: torch.Tensor, classes: Sequence[ClassNames], synonyms: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The preset's synonym rule applied to (N, D) name embeddings of ``classes``: (E, D) embeddings to
        score and (E,) class of each row. ``"max"``: the names as they are (a class then takes its best
        name's probability, :func:`merge_synonyms`); ``"mean"``: one row per class, its names averaged."""
        owner = torch.tensor(name_owners(normalize_classes(classes)), device=names.device)
        if names.ndim != 2 or names.shape[0] != len(owner):
            raise ValueError(f"text: expected one row per name ({len(owner)}), got shape {tuple(names.shape)}")
        if synonyms == "max":
            return names, owner
        if synonyms == "mean":
            return synonym_means(names, owner), torch.arange(int(owner.max()) + 1, device=names.device)
        raise ValueError(f"unknown synonym rule {synonyms!r}: choose max or mean")

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

    @torch.inference_mode()
    def refined_probs(self, pixels: torch.Tensor, emb: torch.Tensor, opts: SegmentOptions) -> torch.Tensor:
        """:meth:`grid_probs`, then ``opts.refine``: (B, K, h, w), or with ``"pamr"`` (B, K, H', W') at the
        resolution of ``pixels`` (B, 3, H, W), its long side at most ``REFINE_MAX_SIDE``."""
        probs = self.grid_probs(pixels, emb, opts)
        if opts.refine == "pamr":
            image = pixels.to(self.device, torch.float32)
            if max(image.shape[-2:]) > REFINE_MAX_SIDE:
                f = REFINE_MAX_SIDE / max(image.shape[-2:])
                size = (max(1, round(image.shape[-2] * f)), max(1, round(image.shape[-1] * f)))
                image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
            probs = pamr(image, probs)
        return probs

    def _window_probs(self, pixels: torch.Tensor, emb: torch.Tensor, opts: SegmentOptions) -> torch.Tensor:
        out = self._dense(self.clip.model.visual, pixels.to(self.device, self.clip.dtype), opts.mode)
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

    def input_size(
        self, height: int, width: int, short_side: int, multiple: int = 0, max_pixels: int = 0
    ) -> tuple[int, int]:
        """Resized (H', W'): short side ``short_side`` (0 keeps the size), sides rounded and the pixel
        count bounded as :func:`resized_size` says."""
        return resized_size(height, width, short_side, self.stride, multiple, max_pixels)

    @torch.inference_mode()
    def segment(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[ClassNames],
        background: Sequence[ClassNames] = (),
        opts: SegmentOptions = SegmentOptions(),
        progress: Callable[[int], None] | None = None,
        text: torch.Tensor | None = None,
    ) -> list[Segmentation]:
        """Segment (H, W, 3) uint8 RGB images of any sizes into ``classes`` (+ ``background`` classes,
        whose pixels become NO_LABEL). Images are grouped by resized shape and batched; ``progress`` is
        called with the number of images finished after each batch. ``text``: the (N, D) embeddings of
        every name of ``classes`` + ``background`` in order (:meth:`name_embeddings`, the stored ones) when
        the caller has them (else computed, or taken from the cache); ``opts.synonyms`` merges them."""
        size_of, probs_of = self.probability_stage(list(classes) + list(background), opts, text, len(classes))
        return segment_in_batches(
            images,
            size_of,
            probs_of,
            n_labels=len(classes),
            batch_size=opts.batch_size,
            min_confidence=opts.min_confidence,
            progress=progress,
            score=opts.score,
        )

    @torch.inference_mode()
    def class_probs(
        self, image: np.ndarray, classes: Sequence[ClassNames], opts: SegmentOptions, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(C, h, w) class probabilities of one (H, W, 3) uint8 RGB image, exactly those :meth:`segment`
        turns into its label map (the preset's pipeline and synonym rule): at (H, W) with the authors'
        pipeline (smaller for a very large image), on the encoder grid (or PAMR's size) with ``"grid"``.
        The trainer's teacher takes its pseudo labels from here."""
        size_of, probs_of = self.probability_stage(classes, opts, text)
        return probs_of([image], size_of(image.shape[0], image.shape[1]))[0]

    def probability_stage(
        self, classes: Sequence[ClassNames], opts: SegmentOptions, text: torch.Tensor | None, n_labels: int = 0
    ) -> tuple[Callable[[int, int], tuple[int, int]], Callable[[list[np.ndarray], tuple[int, int]], torch.Tensor]]:
        """The preset's image -> probabilities step as ``segment_in_batches`` takes it: ``size_of(H, W)``
        (images of one size share a batch) and ``probs_of(images, size) -> (B, C, h, w)``. ``classes``: the
        ``n_labels`` labels (0: all) then the background classes; ``text``: their (N, D) name embeddings
        (else computed)."""
        if opts.mode not in DENSE_MODES:
            raise ValueError(f"unknown dense mode {opts.mode!r}")
        if opts.refine not in REFINEMENTS:
            raise ValueError(f"unknown refinement {opts.refine!r}; choose one of {', '.join(REFINEMENTS)}")
        everything = normalize_classes(classes)
        names = text if text is not None else self.name_embeddings(everything)  # (N, D)
        if opts.pipeline == "authors":  # engine/protocol.py
            emb, owner = self.class_text(names, everything, opts.synonyms)
            owner = owner.to(self.device)

            def authors(batch: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
                probs = [self.authors_probs(img, emb, owner, opts, size) for img in batch]
                if opts.area_threshold > 0:
                    probs = [drop_small_labels(p, n_labels or len(p), opts.area_threshold) for p in probs]
                return torch.stack(probs)

            return working_size, authors
        if opts.pipeline != "grid":
            raise ValueError(f"unknown pipeline {opts.pipeline!r}: choose grid or authors")
        if opts.synonyms != "mean":  # key smoothing and prompt denoising work on classes, not names
            raise ValueError(f"the grid pipeline averages synonyms; synonyms={opts.synonyms!r} needs 'authors'")
        mean, _ = self.class_text(names, everything, "mean")  # (C, D)

        def grid(batch: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
            return self.refined_probs(self.preprocess(batch, size), mean, opts)

        return lambda h, w: self.input_size(h, w, opts.short_side, opts.size_multiple, opts.max_input_pixels), grid

    @torch.inference_mode()
    def window_features(self, image: np.ndarray, opts: SegmentOptions) -> WindowFeatures:
        """(H, W, 3) uint8 RGB -> the image tower's part of the authors' pipeline (engine/protocol.py, steps
        1 and 2 up to the text): mmcv resize, normalisation, the windows (or the whole image) through the
        encoder by the preset's pad rule. What every text query on this image reuses."""
        size = mmcv_size(image.shape[0], image.shape[1], opts.short_side, opts.max_long_side, self.stride)
        resized = torch.from_numpy(np.ascontiguousarray(mmcv_resize(np.asarray(image), size)))
        pixels = self.normalize(resized.to(self.device).permute(2, 0, 1)[None].float() / 255.0)
        boxes = slide_boxes(*size, opts.window, opts.stride) if opts.window else [(0, size[0], 0, size[1])]
        crops = torch.cat([pixels[..., y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])  # all the same size
        with layer_norm_eps(cast(torch.nn.Module, self.clip.model.visual), self.layer_norm_eps):
            x = window_input(crops, self.stride, opts.pad).to(self.clip.dtype)
            out = self._dense(self.clip.model.visual, x, opts.mode)
        return WindowFeatures(out.features, tuple(boxes), size, opts.pad, self.stride, pixels)

    @torch.inference_mode()
    def authors_logits(
        self, image: np.ndarray, emb: torch.Tensor, opts: SegmentOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 RGB -> (1, N, H', W') cosine logits at the resized image's pixels and the
        normalised resized image (1, 3, H', W') (engine/protocol.py, steps 1 and 2); emb: (N, D)."""
        features = self.window_features(image, opts)
        return features.logits(emb), features.pixels

    @torch.inference_mode()
    def authors_probs(
        self, image: np.ndarray, emb: torch.Tensor, owner: torch.Tensor, opts: SegmentOptions, size: tuple[int, int]
    ) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (K, *size) class probabilities at ``size`` (the original size, or smaller
        for a very large image: :func:`working_size`): logits upsampled there, PAMR with
        ``opts.refine == "pamr"``, ``softmax(opts.temperature * logits)`` over the N names, and each class
        (``owner``: (N,) class of each name) its names' highest probability."""
        logits, pixels = self.authors_logits(image, emb, opts)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (1, N, H, W)
        if opts.refine == "pamr":
            guide = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
            logits = pamr_average(logits, pamr_weights(guide))
        return merge_synonyms((opts.temperature * logits[0]).softmax(0), owner)  # (K, H, W)


@dataclass
class WindowFeatures:
    """One image's dense features as the authors' pipeline computes them (:meth:`MaskCLIP.window_features`):
    ``features`` (n, D, gh, gw) L2-normalised per window (n = 1: the whole image), ``boxes`` the n windows
    (y0, y1, x0, x1) in the resized image of ``size`` (H', W'), ``pad`` the preset's rule for sides that are
    not a multiple of ``stride``; ``pixels`` (1, 3, H', W') the normalised resized image (PAMR's guide)."""

    features: torch.Tensor
    boxes: tuple[tuple[int, int, int, int], ...]
    size: tuple[int, int]
    pad: str
    stride: int
    pixels: torch.Tensor

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """(E, D) text (or feature) rows -> (1, E, H', W') cosine logits at the resized image's pixels:
        each window's grid logits brought to its pixels, summed where windows overlap, divided by the count."""
        grid = torch.einsum("bdhw,kd->bkhw", self.features, emb.to(self.features.device, torch.float32))
        y0, y1, x0, x1 = self.boxes[0]
        return merge_windows(
            window_output(grid, (y1 - y0, x1 - x0), self.stride, self.pad), list(self.boxes), self.size
        )


def drop_small_labels(probs: torch.Tensor, n_labels: int, threshold: float) -> torch.Tensor:
    """(K, H, W) probabilities, the first ``n_labels`` classes labels (the rest background) -> the same with
    every label that wins at most ``threshold`` of the pixels won by labels set to 0 (SCLIP's area rule)."""
    won = torch.bincount(probs.argmax(0).flatten(), minlength=probs.shape[0])[:n_labels]
    keep = (won > threshold * won.sum()).to(probs.dtype)
    out = probs.clone()
    out[:n_labels] *= keep[:, None, None]
    return out


def merge_synonyms(probs: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(E, ...) probabilities of E names and (E,) class of each -> (K, ...): each class its names' highest
    probability (the ``"max"`` synonym rule; with one name per class, ``probs`` unchanged)."""
    k = int(owner.max()) + 1
    if len(owner) == k:
        return probs
    return torch.stack([probs[owner == c].amax(0) for c in range(k)])


#: pixel statistics (mean, std on the 0..1 scale) by name; "model": the loaded weights' own
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "model": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # placeholder: replaced by the weights' statistics
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
#: the authors' pipeline works at the original size up to this many pixels, beyond it at a smaller size
AUTHORS_MAX_PIXELS = 2048 * 2048
_eps_lock = threading.Lock()


def working_size(height: int, width: int, max_pixels: int = AUTHORS_MAX_PIXELS) -> tuple[int, int]:
    """Where the authors' pipeline computes probabilities: the original (H, W), or scaled down to about
    ``max_pixels`` (aspect kept); the label map is then upsampled to (H, W) as usual."""
    if height * width <= max_pixels:
        return height, width
    f = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * f)), max(1, int(width * f))


@contextmanager
def layer_norm_eps(visual: torch.nn.Module, eps: float | None) -> Iterator[None]:
    """Run the tower's LayerNorms with epsilon ``eps`` inside the block (nothing changes for None); one
    thread at a time, since the tower may be shared."""
    if eps is None:
        yield
        return
    norms = [m for m in visual.modules() if isinstance(m, torch.nn.LayerNorm)]
    with _eps_lock:
        saved = [m.eps for m in norms]
        for m in norms:
            m.eps = eps
        try:
            yield
        finally:
            for m, e in zip(norms, saved):
                m.eps = e


def resized_size(
    height: int, width: int, short_side: int, stride: int, multiple: int = 0, max_pixels: int = 0
) -> tuple[int, int]:
    """(H', W') with short side ``short_side`` (0 keeps the size), rounded to a multiple of ``stride``; the
    long side is rounded to a multiple of ``stride * max(1, round(multiple / stride))`` (``multiple`` 0: of
    the stride). Coarser rounding of the long side puts images of similar shapes into the same batch at the
    cost of a small change of aspect ratio (64 px on a 448 px short side: at most 7 %); the masks are
    upsampled back to the original size either way.

    H' x W' is at most about ``max_pixels`` (within the rounding of the sides; 0: ``4 * short_side**2``,
    which leaves aspect ratios up to 4:1 untouched; no bound when ``short_side`` is 0 too): beyond it the image is scaled down as a whole, the
    short side never below one ``stride``, and the long side then cut to fit, so a 1 x 100000 strip becomes a
    ``stride``-high band of bounded length (aspect squeezed) instead of a tensor of gigabytes.
    """
    step = stride * max(1, round(multiple / stride)) if multiple > 0 else stride
    scale = short_side / min(height, width) if short_side else 1.0
    budget = max_pixels or 4 * short_side * short_side
    capped = bool(budget) and height * width * scale * scale > budget * (1 + 1e-9)  # exactly 4:1 stays uncapped
    if capped:
        scale = math.sqrt(budget / (height * width))

    def side(n: int, unit: int) -> int:
        exact = n * scale / unit
        return max(unit, (math.floor(exact) if capped else round(exact)) * unit)

    short, long = (height, width) if height <= width else (width, height)
    short_out = side(short, stride)
    long_out = side(long, step)
    if capped:  # the short side was raised to one stride: cut the long side so the product fits
        long_out = max(step, min(long_out, budget // short_out // step * step))
    return (short_out, long_out) if height <= width else (long_out, short_out)


def normalized_batch(
    images: Sequence[np.ndarray], size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB images (numpy arrays, or tensors) -> (B, 3, *size) float32 on ``mean``'s device,
    resized (bilinear, antialiased) and normalised; ``mean``/``std``: (1, 3, 1, 1) on the 0..1 scale. On a GPU
    the uint8 pixels are copied from pinned memory without blocking and resized there."""
    cuda = mean.device.type == "cuda"
    out = []
    for img in images:
        if isinstance(img, torch.Tensor):  # decoded on the device already (fetching.jpeg)
            t = img.to(mean.device).permute(2, 0, 1)[None]
        else:
            img = _box_shrink(img, size)
            t = torch.from_numpy(np.require(img, requirements=["C", "W"]))
            if cuda:
                t = t.pin_memory()
            t = t.to(mean.device, non_blocking=cuda).permute(2, 0, 1)[None]
        out.append(F.interpolate(t.float() / 255.0, size=size, mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(out) - mean) / std  # (B, 3, h, w)


def _box_shrink(img: np.ndarray, size: tuple[int, int], band: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 -> box-averaged by whole factors to at least twice ``size`` (H', W'), in uint8.

    A large photo is first averaged over fy x fx blocks (fy = H // 2H', fx = W // 2W'; the last H mod fy rows
    and W mod fx columns, under half a pixel of the model input, are dropped) a band of rows at a time, so
    the float copy that the antialiased resize needs is of a small image, not of 64 megapixels. Images less
    than four times the size in each direction are returned unchanged.
    """
    fy, fx = img.shape[0] // (2 * size[0]), img.shape[1] // (2 * size[1])
    if fy <= 1 and fx <= 1:
        return img
    fy, fx = max(1, fy), max(1, fx)

    height, width = img.shape[0] // fy, img.shape[1] // fx
    out = np.empty((height, width, 3), np.uint8)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        rows = np.ascontiguousarray(img[y0 * fy : y1 * fy, : width * fx])
        out[y0:y1] = np.asarray(Image.fromarray(rows).reduce((fx, fy)))
    return out


def segment_in_batches(
    images: Sequence[np.ndarray],
    size_of: Callable[[int, int], tuple[int, int]],
    probs_of: Callable[[list[np.ndarray], tuple[int, int]], torch.Tensor],
    *,
    n_labels: int,
    batch_size: int,
    min_confidence: float,
    progress: Callable[[int], None] | None = None,
    score: str = "confidence",
) -> list[Segmentation]:
    """The batching shared by every segmenter: images grouped by resized shape ``size_of(H, W)``, run in
    batches through ``probs_of(images, size) -> (B, K + Kb, h, w)`` probabilities, finalised at their original
    sizes with the image score ``score`` (one of :data:`SCORES`): one by one on the CPU, those of one original
    size together elsewhere (:func:`_finalize_all`). ``progress(n)`` is called after each batch."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        uint8 = img.dtype == (torch.uint8 if isinstance(img, torch.Tensor) else np.uint8)
        if img.ndim != 3 or img.shape[2] != 3 or not uint8:
            raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
        groups.setdefault(size_of(img.shape[0], img.shape[1]), []).append(i)
    results: list[Segmentation | None] = [None] * len(images)
    for size, idx in groups.items():
        for b in range(0, len(idx), max(1, batch_size)):
            batch = idx[b : b + max(1, batch_size)]
            probs = probs_of([images[i] for i in batch], size)
            sizes = [(int(images[i].shape[0]), int(images[i].shape[1])) for i in batch]
            together = probs.device.type != "cpu"
            for i, seg in zip(batch, _finalize_all(probs, sizes, n_labels, min_confidence, score, together)):
                results[i] = seg
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


def _candidates(probs: torch.Tensor) -> torch.Tensor:
    """Indices of the classes that can win some pixel of some image once (B, K, h, w) grid probabilities are
    upsampled bilinearly, ascending.

    An upsampled pixel is a convex combination of the 4 cells of one 2x2 block of the grid (or of fewer at
    the border, which the blocks also cover). Within a block, a class whose highest corner is below the best
    lowest corner of some class loses everywhere in it. So only classes that survive this test in some block
    are upsampled: usually a handful of the K (prompt denoising alone zeroes the absent ones), which makes
    finishing an image at full resolution several times cheaper without changing the result.
    """
    _, k, h, w = probs.shape
    if k <= 2:
        return torch.arange(k, device=probs.device)
    padded = probs
    if h == 1 or w == 1:  # a one-cell-wide grid: blocks are 1x2 or 2x1 (or a single cell)
        padded = F.pad(padded, (0, int(w == 1), 0, int(h == 1)), mode="replicate")
    hi = F.max_pool2d(padded, 2, stride=1)  # (B, K, h', w') per block: best corner of each class
    lo = -F.max_pool2d(-padded, 2, stride=1)  # worst corner of each class
    floor = lo.amax(1, keepdim=True)  # (B, 1, h', w'): a value some class reaches everywhere in the block
    return torch.nonzero((hi >= floor).transpose(0, 1).flatten(1).any(1)).flatten()


def _finalize_all(
    probs: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    n_labels: int,
    min_conf: float,
    score: str = "confidence",
    together: bool = False,
) -> list[Segmentation]:
    """(B, K + Kb, h, w) grid probabilities of B images and their original sizes (H, W) -> their Segmentations.

    ``together``: the images of one size are finalised as one batch (:func:`_finalize_batch`), as many at a
    time as keep the width-upsampled grids under ``_BATCH_UPSAMPLE_BUDGET`` probabilities and the outputs under
    ``_BATCH_OUTPUT_PIXELS`` pixels, in bands of rows of that budget too. On a GPU the launches and host
    syncs of the finish are then per batch, not per image (the per-image finish took most of a batch's time
    there). On a CPU the cost is the arithmetic, and the union of a batch's candidate classes is more of it
    than each image's own, so images go one by one, in bands of ``_UPSAMPLE_BUDGET``. The results are the same.
    """
    out: list[Segmentation | None] = [None] * len(sizes)
    groups: dict[object, list[int]] = {}
    budget = _BATCH_UPSAMPLE_BUDGET if together else _UPSAMPLE_BUDGET
    for i, size in enumerate(sizes):
        groups.setdefault(size if together else i, []).append(i)
    for idx in groups.values():
        height, width = sizes[idx[0]]
        per = min(
            _BATCH_UPSAMPLE_BUDGET // (probs.shape[1] * probs.shape[2] * width),
            _BATCH_OUTPUT_PIXELS // (height * width),
        )
        for b in range(0, len(idx), max(1, per)):
            chunk = idx[b : b + max(1, per)]
            part = probs if len(chunk) == len(probs) else probs[chunk]
            segs = _finalize_batch(part, (height, width), n_labels, min_conf, score, budget)
            for i, seg in zip(chunk, segs):
                out[i] = seg
    return out  # type: ignore[return-value]


def _finalize(
    probs: torch.Tensor, size: tuple[int, int], n_labels: int, min_conf: float, score: str = "confidence"
) -> Segmentation:
    """Grid probabilities (K + Kb, h, w) of one image -> its Segmentation at ``size`` (H, W), with the image
    score ``score`` (:func:`_finalize_batch`)."""
    return _finalize_batch(probs[None], size, n_labels, min_conf, score)[0]


def _finalize_batch(
    probs: torch.Tensor,
    size: tuple[int, int],
    n_labels: int,
    min_conf: float,
    score: str = "confidence",
    budget: int = 0,
) -> list[Segmentation]:
    """Grid probabilities (B, K + Kb, h, w) of B images of one size -> their Segmentations at ``size``
    (H, W), with the image score ``score``.

    With the ``confidence`` score only the k' classes that can win a pixel are upsampled (:func:`_candidates`:
    usually a handful of the K); ``margin`` (needs the runner-up) and ``entropy`` (needs every class) upsample
    all K.
    Bilinear upsampling (``align_corners=False``, as ``F.interpolate``) is done separably: along the width for
    the whole grid ((B, k', h, W): small), then along the height one band of output rows at a time, keeping
    each band's winning class and its probability. Beyond the outputs ((B, H, W) int16 labels and float32
    confidence, on the probabilities' device until the end) at most about ``budget`` (0:
    ``_UPSAMPLE_BUDGET``) probabilities exist at once, whatever the image size, so a 64-megapixel image costs
    its label map, not gigabytes of (K, H, W) floats. With B > 1 the k' classes are those that can win in some
    image of the B.
    """
    height, width = size
    n_images, k_all, grid_h, _ = probs.shape
    keep = _candidates(probs) if score == "confidence" else torch.arange(k_all, device=probs.device)
    kept = probs.index_select(1, keep).float()  # (B, k', h, w)
    k_kept = kept.shape[1]
    rows = F.interpolate(kept, size=(grid_h, width), mode="bilinear", align_corners=False)  # (B, k', h, W)
    top, bottom, upper, lower = _height_weights(grid_h, height, probs.device)
    upper, lower = upper[None, None, :, None], lower[None, None, :, None]
    tally = _Tally(n_images, height, width, n_labels, probs.device)
    band = max(1, (budget or _UPSAMPLE_BUDGET) // (n_images * k_kept * width))
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        up = rows[:, :, top[y0:y1]] * upper[:, :, y0:y1] + rows[:, :, bottom[y0:y1]] * lower[:, :, y0:y1]
        value, index = up.max(1)  # (B, n, W) each; ties go to the first class
        certainty = _certainty(up, value, score, k_all)
        del up
        tally.add(y0, y1, keep[index], value, certainty, min_conf)
    return tally.segmentations(probs)


def _height_weights(
    grid_h: int, height: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear weights (``align_corners=False``) from ``grid_h`` rows to ``height``: (top, bottom) (H,) source
    rows and (upper, lower) (H,) their weights, all on ``device``."""
    scale = torch.tensor(grid_h / height, dtype=torch.float32)
    src = ((torch.arange(height, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)  # (H,) source rows
    top = src.long().clamp_max(grid_h - 1)
    bottom = (top + 1).clamp_max(grid_h - 1)
    lower = (src - top.float()).to(device)  # weight of the bottom row
    return top.to(device), bottom.to(device), 1.0 - lower, lower


def _certainty(up: torch.Tensor, value: torch.Tensor, score: str, k_all: int) -> torch.Tensor:
    """(B, n, W) each pixel's certainty under ``score``, from a band's upsampled probabilities ``up``
    (B, k', n, W) and their maximum ``value``; ``k_all`` classes in all (the entropy's normalisation)."""
    if score == "margin":  # the winning probability minus the runner-up's
        return value - up.topk(2, dim=1).values[:, 1] if up.shape[1] > 1 else value
    if score == "entropy":  # 1 - normalised entropy of the pixel's distribution
        if k_all <= 1:
            return torch.ones_like(value)
        return 1.0 - (-torch.special.xlogy(up, up).sum(1)).clamp_min(0) / math.log(k_all)
    return value


class _Tally:
    """B images' label maps, confidences and per-label sums, filled one band of rows at a time.

    Everything stays on the probabilities' device until :meth:`segmentations` copies it to the CPU, and
    nothing in :meth:`add` reads a value back to the host (on a GPU: no sync per band)."""

    def __init__(self, n_images: int, height: int, width: int, n_labels: int, device: torch.device):
        self.n_labels = n_labels
        self.labels = torch.empty((n_images, height, width), dtype=torch.int16, device=device)
        self.confidence = torch.empty((n_images, height, width), dtype=torch.float32, device=device)
        self.areas = torch.zeros((n_images, n_labels + 1), dtype=torch.float64, device=device)
        self.sums = torch.zeros((n_images, n_labels + 1), dtype=torch.float64, device=device)
        self.total = torch.zeros(n_images, dtype=torch.float64, device=device)  # the image score's sums
        self.count = torch.zeros(n_images, dtype=torch.int64, device=device)  # the labelled pixels

    def add(
        self, y0: int, y1: int, klass: torch.Tensor, value: torch.Tensor, certainty: torch.Tensor, min_conf: float
    ) -> None:
        """Rows y0:y1: (B, n, W) the winning class indices among all K, their probability and certainty."""
        n_images, n_bins = self.areas.shape
        no_label = (klass >= self.n_labels) | (value < min_conf)
        # Counted by index_add_ (boolean indexing, and bincount's range check, read values back to the host):
        # unlabelled pixels go to the last bin, image b's bins are b * n_bins onwards.
        offsets = torch.arange(n_images, device=klass.device)[:, None, None] * n_bins
        binned = (klass.masked_fill(no_label, self.n_labels) + offsets).flatten()
        weights = value.flatten().double()
        self.areas.view(-1).index_add_(0, binned, torch.ones_like(weights))
        self.sums.view(-1).index_add_(0, binned, weights)
        self.total += certainty.double().masked_fill(no_label, 0.0).sum((1, 2))
        self.count += (~no_label).sum((1, 2))
        self.labels[:, y0:y1] = klass.masked_fill(no_label, NO_LABEL).to(torch.int16)
        self.confidence[:, y0:y1] = value

    def segmentations(self, probs: torch.Tensor) -> list[Segmentation]:
        """The finished Segmentations, ``probs`` (B, K + Kb, h, w) kept as their grid probabilities."""
        areas, sums = self.areas[:, : self.n_labels].cpu(), self.sums[:, : self.n_labels].cpu()
        scores = torch.where(areas > 0, sums / areas.clamp_min(1), torch.zeros_like(sums))
        total, count = self.total.cpu().tolist(), self.count.cpu().tolist()
        labels, confidence = self.labels.cpu().numpy(), self.confidence.cpu().numpy()
        grid = probs.float().cpu().numpy()
        return [
            Segmentation(
                labels=labels[b],
                confidence=confidence[b],
                grid_probs=grid[b],
                class_scores=scores[b].float().numpy(),
                class_areas=areas[b].numpy().astype(np.int64),
                score=total[b] / count[b] if count[b] else 0.0,
            )
            for b in range(len(total))
        ]
