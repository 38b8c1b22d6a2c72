"""Interactive prompting: Label Studio's editor context (a typed phrase, clicks, a box) -> mask regions.

With *Interactive preannotations* on, the editor posts to Label Studio's
``/api/ml/{id}/interactive-annotating``, and Label Studio forwards the task to ``/predict`` with the editor's
regions under ``params.context.result`` (docs/label-studio.md, "Interactive prompting"). Items use Label
Studio's region format, coordinates in percent of the image:

- a phrase: ``{"type": "textarea", "value": {"text": ["red car, road"]}}`` (comma-separated phrases);
- a click: ``{"type": "keypointlabels", "is_positive": true, "value": {"x", "y", "keypointlabels": ["Car"]}}``;
- a box: ``{"type": "rectanglelabels", "value": {"x", "y", "width", "height", "rotation", "rectanglelabels": [...]}}``.

Each prompt becomes regions of the project's ``BrushLabels`` control (and ``PolygonLabels``, when the
config has one) for the label it names. The image's dense features are cached per (image URL, model), so
a second click on the same task costs only the grid-sized part (:mod:`..engine.prompts`).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..engine import prompts as engine
from ..engine.text import synonym_means
from ..errors import BadInput
from ..labelstudio.labeling import LabelingSpec, Target
from ..labelstudio.regions import brush_region, polygon_regions

__all__ = [
    "ContextError",
    "TextPrompt",
    "ClickPrompt",
    "BoxPrompt",
    "parse_context",
    "percent_to_pixel",
    "box_corners",
    "FeatureCache",
    "BACKGROUND_WORDS",
    "PHRASE_TEMPLATES",
    "MAX_PHRASES",
    "PromptText",
]

#: Extra classes a phrase competes with, beside the project's labels: pixels that are none of them.
BACKGROUND_WORDS = ("background",)

#: The short template set of a typed phrase: one text pass of a few prompts (the project's labels use the
#: full set, prepared at ``/setup``).
PHRASE_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "there is a {} in the scene.",
    "this is a {} in the scene.",
)

#: Phrases per request: each costs a text pass (when new) and a full-size pass over the image.
MAX_PHRASES = 16
#: Longest phrase, in characters (CLIP reads 77 tokens at most).
MAX_PHRASE_CHARS = 200


class ContextError(BadInput):
    """The editor's context cannot be used; the message says which item and why."""


@dataclass(frozen=True)
class TextPrompt:
    phrases: tuple[str, ...]


@dataclass
class ClickPrompt:
    label: str
    positive: list[tuple[float, float]] = field(default_factory=list)  # percent (x, y)
    negative: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class BoxPrompt:
    label: str
    x: float  # percent: top-left corner, size, rotation in degrees clockwise about the top-left corner
    y: float
    width: float
    height: float
    rotation: float = 0.0


Prompt = TextPrompt | ClickPrompt | BoxPrompt


def percent_to_pixel(x: float, y: float, size: tuple[int, int]) -> tuple[float, float]:
    """Label Studio percent coordinates -> pixel (x, y) of an image of ``size`` (H, W)."""
    height, width = size
    return x * width / 100.0, y * height / 100.0


def box_corners(box: BoxPrompt, size: tuple[int, int]) -> np.ndarray:
    """(4, 2) pixel (x, y) corners of a rectangle region: top-left, top-right, bottom-right, bottom-left.

    Label Studio stores a rectangle as its top-left corner, width and height in percent of the image, and
    a rotation in degrees, clockwise on screen, about that corner.
    """
    height, width = size
    x0, y0 = percent_to_pixel(box.x, box.y, size)
    w, h = box.width * width / 100.0, box.height * height / 100.0
    t = math.radians(box.rotation)
    u = np.array([math.cos(t), math.sin(t)]) * w  # along the top edge (y grows downwards)
    v = np.array([-math.sin(t), math.cos(t)]) * h  # along the left edge
    p = np.array([x0, y0])
    return np.stack([p, p + u, p + u + v, p + v])


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ContextError(f"{what} must be a finite number, got {value!r:.40}")
    return float(value)


def _percent(value: Any, what: str) -> float:
    """A coordinate or size in percent of the image: a number in [0, 100]."""
    number = _number(value, what)
    if not 0.0 <= number <= 100.0:
        raise ContextError(f"{what} must be within 0-100 (percent of the image), got {number:.6g}")
    return number


def _label_of(item: Mapping[str, Any], key: str, spec: LabelingSpec) -> str:
    labels = item["value"].get(key)
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise ContextError(f"a {key} item names no label (value.{key} is {labels!r:.60})")
    if labels[0] not in spec.vocabulary:
        raise ContextError(
            f"label {labels[0]!r} of the {key} item is not a label of the project's BrushLabels/PolygonLabels "
            f"({', '.join(spec.vocabulary)}); give the {key} control the same <Label> values"
        )
    return labels[0]


def parse_context(context: Any, spec: LabelingSpec) -> list[Prompt]:
    """The prompts in an editor context (``{"result": [items]}``); clicks are grouped per label.

    Raises :class:`ContextError` for a context without usable items or with a malformed one.
    """
    items = context.get("result") if isinstance(context, Mapping) else None
    if not isinstance(items, list) or not items:
        raise ContextError("the interactive context has no 'result' items (a phrase, a click or a box)")
    prompts: list[Prompt] = []
    clicks: dict[str, ClickPrompt] = {}
    for n, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("value"), Mapping):
            raise ContextError(f"context item {n} has no 'value' object")
        kind = str(item.get("type", "")).lower()
        value = item["value"]
        if kind == "textarea":
            texts = value.get("text")
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ContextError(f"context item {n}: value.text must be a list of strings")
            phrases = tuple(dict.fromkeys(p.strip() for t in texts for p in t.split(",") if p.strip()))
            if not phrases:
                raise ContextError(f"context item {n}: the text prompt is empty")
            long = [p for p in phrases if len(p) > MAX_PHRASE_CHARS]
            if long:
                raise ContextError(f"context item {n}: a phrase is longer than {MAX_PHRASE_CHARS} characters")
            prompts.append(TextPrompt(phrases))
        elif kind == "keypointlabels":
            label = _label_of(item, "keypointlabels", spec)
            point = (_percent(value.get("x"), "a click's x"), _percent(value.get("y"), "a click's y"))
            click = clicks.setdefault(label, ClickPrompt(label))
            (click.positive if item.get("is_positive", True) is not False else click.negative).append(point)
        elif kind == "rectanglelabels":
            label = _label_of(item, "rectanglelabels", spec)
            nums = [_percent(value.get(k), f"a box's {k}") for k in ("x", "y", "width", "height")]
            nums.append(_number(value.get("rotation", 0.0), "a box's rotation") % 360.0)
            if nums[2] <= 0 or nums[3] <= 0:
                raise ContextError(f"context item {n}: the box has no area ({nums[2]} x {nums[3]} %)")
            prompts.append(BoxPrompt(label, *nums))
        else:
            raise ContextError(
                f"context item {n} has type {kind!r}; interactive prompts are textarea (phrases), "
                "keypointlabels (clicks) and rectanglelabels (boxes)"
            )
    n_phrases = sum(len(p.phrases) for p in prompts if isinstance(p, TextPrompt))
    if n_phrases > MAX_PHRASES:
        raise ContextError(f"{n_phrases} phrases in one request; at most {MAX_PHRASES} (each is a pass over the image)")
    for click in clicks.values():
        if not click.positive:
            raise ContextError(f"the clicks on {click.label!r} are all negative: add a positive click")
        prompts.append(click)
    return prompts


def targets_for(spec: LabelingSpec, label: str, image_key: str) -> list[Target]:
    """The segmentation controls on the image that offer ``label``."""
    return [t for t in spec.targets if t.image_key == image_key and label in t.values]


def regions_for(
    targets: Sequence[Target], label: str, mask: np.ndarray, score: float, *, polygons: bool, note: str
) -> list[dict[str, Any]]:
    """Brush (and polygon) regions of one prompt's mask, each saying which prompt made it (``meta.text``)."""
    out: list[dict[str, Any]] = []
    for target in targets:
        if target.kind == "brush":
            out.append(brush_region(target, label, mask, score))
        elif polygons:
            out.extend(polygon_regions(target, label, mask, score))
    for region in out:
        region["meta"] = {"text": [note]}
    return out


class FeatureCache:
    """A bounded LRU of per-image state (decoded image and its dense features), keyed by whatever
    identifies the image and the model; ``max_bytes`` bounds the total, the newest entry always stays."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, make: Callable[[], tuple[Any, int]]) -> Any:
        """The cached value for ``key``, or ``make()`` -> (value, nbytes) stored and returned."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
        value, nbytes = make()  # outside the lock: other images go on meanwhile
        with self._lock:
            self.misses += 1
            self._items[key] = (value, nbytes)
            self._items.move_to_end(key)
            while len(self._items) > 1 and sum(n for _, n in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """The bytes the cached entries hold, as their makers counted them."""
        with self._lock:
            return sum(n for _, n in self._items.values())


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def phrase_label(phrase: str, spec: LabelingSpec, labels: Sequence[str], similarity: Callable[[], np.ndarray]) -> str:
    """The label a phrase goes to: the one whose value or ``predicted_values`` it names, else the label
    whose text embedding is nearest (``similarity()`` -> (len(labels),) cosine of the phrase to each label)."""
    wanted = _normalise(phrase)
    for label in labels:
        if wanted == _normalise(label) or wanted in {_normalise(n) for n in spec.names(label)}:
            return label
    return labels[int(np.argmax(similarity()))]


@dataclass(frozen=True)
class PromptText:
    """The text embeddings one interactive request uses, all ready before it starts.

    vocabulary: the labels of the image's segmentation controls; labels: (N, D) the embeddings of their
    names, one row per name as stored (prepared at ``/setup``); owners: (N,) the vocabulary index of each
    row; background: (Kb, D) of :data:`BACKGROUND_WORDS` (prepared at ``/setup`` too); phrases: (D,) per
    typed phrase (short template set, :data:`PHRASE_TEMPLATES`); a phrase missing here was not ready in time
    and gets a note.
    """

    vocabulary: Sequence[str]
    labels: Any
    owners: Sequence[int]
    background: Any
    phrases: Mapping[str, Any] = field(default_factory=dict)

    def rows(self, first: Any, keep: Sequence[int], synonyms: str) -> tuple[Any, Any]:
        """(E, D) rows to score and the class of each (None: one row per class): ``first`` (P, D), one
        class each, then the vocabulary labels ``keep`` in that order with their names merged by the
        preset's rule ``synonyms`` (``"max"``: every name, a class taking its best; ``"mean"``: averaged),
        then the background words."""
        owners = torch.tensor(list(self.owners))
        if synonyms != "max":
            means = synonym_means(self.labels, owners.to(self.labels.device))[list(keep)]
            return torch.cat([first, means, self.background]), None
        names = [i for k in keep for i in range(len(self.owners)) if self.owners[i] == k]
        classes = [len(first) + j for j, k in enumerate(keep) for o in self.owners if o == k]
        after = len(first) + len(keep)
        owner = list(range(len(first))) + classes + list(range(after, after + len(self.background)))
        return torch.cat([first, self.labels[names], self.background]), torch.tensor(owner)

    def means(self, keep: Sequence[int]) -> Any:
        """(len(keep), D) the labels ``keep``'s names averaged (for naming a phrase's label)."""
        return synonym_means(self.labels, torch.tensor(list(self.owners), device=self.labels.device))[list(keep)]


def predict_interactive(
    seg: Any,
    image: np.ndarray,
    dense: Any,
    prompts: Sequence[Prompt],
    spec: LabelingSpec,
    image_key: str,
    opts: Any,
    text: PromptText,
    *,
    polygons: bool,
    compute_dtype: Any = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(regions, notes) for the prompts on one image; no text is encoded here.

    seg: the MaskCLIP teacher; image: (H, W, 3) uint8 RGB; dense: its cached ``DenseImage``; opts: the
    engine's ``SegmentOptions``; compute_dtype: the image tower's dtype for a box's crop (as ``dense`` was
    made). Notes say which prompts found nothing and why. Raises :class:`ContextError`
    for a box that covers no pixel of the image.
    """
    request = _Request(seg, image, dense, spec, image_key, opts, text, polygons, compute_dtype)
    for prompt in prompts:
        if isinstance(prompt, TextPrompt):
            request.phrases(prompt)
        elif isinstance(prompt, ClickPrompt):
            request.clicks(prompt)
        else:
            request.box(prompt)
    return request.regions, request.notes


class _Request:
    """One interactive request's shared state: the image's labels and their embeddings, and the regions and
    notes found so far (a method per kind of prompt adds to them)."""

    def __init__(
        self,
        seg: Any,
        image: np.ndarray,
        dense: Any,
        spec: LabelingSpec,
        image_key: str,
        opts: Any,
        text: PromptText,
        polygons: bool,
        compute_dtype: Any,
    ):
        self.seg, self.image, self.dense, self.spec, self.image_key = seg, image, dense, spec, image_key
        self.opts, self.text, self.polygons, self.compute_dtype = opts, text, polygons, compute_dtype
        self.rows = {v: i for i, v in enumerate(text.vocabulary)}
        self.labels = [v for v in text.vocabulary if targets_for(spec, v, image_key)]
        self.label_rows = text.means([self.rows[v] for v in self.labels])  # (L, D)
        # (E, D): the labels, then the background
        self.label_emb, self.label_owner = text.rows(self.label_rows[:0], [self.rows[v] for v in self.labels],
                                                     opts.synonyms)  # fmt: skip
        self.regions: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def _add(self, label: str, mask: np.ndarray, score: float, note: str) -> None:
        targets = targets_for(self.spec, label, self.image_key)
        self.regions += regions_for(targets, label, mask, score, polygons=self.polygons, note=note)

    def phrases(self, prompt: TextPrompt) -> None:
        """Each ready phrase competes with the labels it does not name and the background words."""
        text = self.text
        ready = [p for p in prompt.phrases if p in text.phrases]
        self.notes += [f"phrase {p!r}: its text is still being encoded; try again in a moment"
                       for p in prompt.phrases if p not in text.phrases]  # fmt: skip
        if not ready:
            return
        phrase_rows = torch.stack([text.phrases[p] for p in ready])  # (P, D)
        cosines = (phrase_rows @ self.label_rows.T).cpu().numpy()  # (P, L)
        named = {p: phrase_label(p, self.spec, self.labels, functools.partial(cosines.__getitem__, j))
                 for j, p in enumerate(ready)}  # fmt: skip
        others = [self.rows[v] for v in self.labels if v not in named.values()]
        emb, owner = text.rows(phrase_rows.to(self.label_rows), others, self.opts.synonyms)
        for phrase, (mask, score) in zip(ready, engine.phrase_masks(self.dense, emb, len(ready), self.opts, owner)):
            if not mask.any():
                self.notes.append(f"phrase {phrase!r}: found nowhere in the image (every pixel is nearer to "
                                  "another label or to the background)")  # fmt: skip
                continue
            self._add(named[phrase], mask, score, f"prompt: {phrase}")

    def clicks(self, prompt: ClickPrompt) -> None:
        """The clicked label's probability plane (without prompt denoising), grown from the clicks."""
        k = self.labels.index(prompt.label)
        # The same labels (by their names: the model is in the image's cache key) give the same plane.
        plane = ("click", tuple((v, tuple(self.spec.names(v))) for v in self.labels))
        opts = replace(self.opts, prompt_denoising=False)
        probs = engine.label_plane(self.dense, self.label_emb, opts, self.label_owner, k, plane)
        size = self.image.shape[:2]
        pos = [percent_to_pixel(x, y, size) for x, y in prompt.positive]
        neg = [percent_to_pixel(x, y, size) for x, y in prompt.negative]
        mask, score = engine.click_mask(self.dense, probs, pos, neg)
        self._add(prompt.label, mask, score, f"clicks: {len(pos)} positive, {len(neg)} negative")

    def box(self, prompt: BoxPrompt) -> None:
        """The box's crop segmented afresh; a box outside the image is the request's error."""
        k = self.labels.index(prompt.label)
        try:
            corners = box_corners(prompt, self.image.shape[:2])
            mask, score = engine.box_mask(self.seg, self.image, corners, k, self.label_emb, self.opts,
                                          self.label_owner, self.compute_dtype)  # fmt: skip
        except ValueError as e:  # the box lies outside the image
            raise ContextError(f"box on {prompt.label!r}: {e}") from e
        if not mask.any():
            self.notes.append(f"box on {prompt.label!r}: no pixel of the label inside")
            return
        self._add(prompt.label, mask, score, "box")
