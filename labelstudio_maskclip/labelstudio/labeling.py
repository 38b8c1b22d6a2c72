"""A project's labeling config -> what the model predicts.

Label Studio sends its labeling config (XML) with every ``/predict`` request and webhook. This module
reads it once per distinct string (``label-studio-sdk``'s ``LabelInterface`` does the XML work) and
keeps only what segmentation needs: the ``<BrushLabels>`` and ``<PolygonLabels>`` controls that point
at an ``<Image>``, the task data key of that image, and the labels with their model-side names.

A ``<Label>`` may name what the model should look for with ``predicted_values`` (comma-separated
synonyms), as in the label-studio-ml-backend examples::

    <Label value="Car" predicted_values="car,automobile,van"/>

Without it the label's ``value`` is the one name. Other controls (``<Labels>`` rectangles, choices,
...) are ignored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.names import normalize_names

__all__ = ["LabelConfigError", "LabelSpec", "LabelingSpec", "Target", "label_interface", "parse_label_config"]

Kind = Literal["brush", "polygon"]

#: control tag (lower case) -> kind of region it produces
_KINDS: dict[str, Kind] = {"brushlabels": "brush", "polygonlabels": "polygon"}

_EXAMPLE = '<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>'


class LabelConfigError(ValueError):
    """The labeling config cannot drive segmentation; the message says what to add."""


@dataclass(frozen=True)
class LabelSpec:
    """One ``<Label>``: ``value`` is what results carry (its ``alias`` when set, as Label Studio
    does), ``names`` what the model is prompted with (``predicted_values`` or the label text)."""

    value: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One control pointing at one image: regions go out as ``from_name`` -> ``to_name``."""

    from_name: str
    to_name: str
    kind: Kind
    image_key: str  # task["data"][image_key] holds the image URL (from value="$image_key")
    labels: tuple[LabelSpec, ...]

    @property
    def result_type(self) -> str:
        """Region ``type`` in results, e.g. ``"brushlabels"``."""
        return f"{self.kind}labels"

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(label.value for label in self.labels)


@dataclass(frozen=True)
class LabelingSpec:
    """The segmentation targets of a labeling config, in config order."""

    targets: tuple[Target, ...]

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Label values across all targets, first occurrence first, without repeats."""
        return tuple(dict.fromkeys(value for target in self.targets for value in target.values))

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Task data keys of the images that carry targets, without repeats."""
        return tuple(dict.fromkeys(target.image_key for target in self.targets))

    @property
    def predicted_targets(self) -> tuple[Target, ...]:
        """The targets on the first image (one image per task is predicted), in config order."""
        return tuple(t for t in self.targets if t.image_key == self.image_keys[0])

    def names(self, value: str) -> tuple[str, ...]:
        """Model-side names of label ``value``, merged across targets (first occurrence first)."""
        found = [name for t in self.targets for label in t.labels if label.value == value for name in label.names]
        if not found:
            raise KeyError(f"label {value!r} is not in the labeling config; known: {', '.join(self.vocabulary)}")
        return tuple(dict.fromkeys(found))

    def target(self, from_name: str, to_name: str | None = None) -> Target:
        """The target of control ``from_name`` (and image ``to_name`` when the control has several)."""
        for t in self.targets:
            if t.from_name == from_name and (to_name is None or t.to_name == to_name):
                return t
        raise KeyError(f"no segmentation control {from_name!r} -> {to_name!r} in the labeling config")


def parse_label_config(xml: str) -> LabelingSpec:
    """Parse a labeling config (Label Studio XML) into its segmentation targets.

    Cached by the config string: it arrives with every request. Raises ``LabelConfigError`` naming
    what to add when the config has no ``<Image>``, no ``<BrushLabels>``/``<PolygonLabels>`` pointing
    at one, no ``<Label>`` in them, or is not XML.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError(f"the labeling config must be a non-empty XML string, got {xml!r:.80}")
    return _parse(xml)


@functools.lru_cache(maxsize=32)
def _parse(xml: str) -> LabelingSpec:
    interface = label_interface(xml)
    images = {obj.name: key for obj in (interface.objects or ()) if (key := _image_key(obj)) is not None}
    if not images:
        raise LabelConfigError(
            "the labeling config has no <Image> tag reading an image from the task data; "
            'add e.g. <Image name="image" value="$image"/>'
        )
    controls = [c for c in (interface.controls or ()) if c.tag.lower() in _KINDS]
    pointing = [c for c in controls if any(name in images for name in c.to_name)]
    if not pointing:
        raise LabelConfigError(
            "the labeling config has no <BrushLabels> or <PolygonLabels> control pointing at an <Image> "
            f"(images: {', '.join(sorted(images))}); add e.g. {_EXAMPLE}"
        )
    targets = tuple(
        Target(control.name, to_name, _KINDS[control.tag.lower()], images[to_name], labels)
        for control in pointing
        if (labels := _labels(control))
        for to_name in control.to_name
        if to_name in images
    )
    if not targets:
        names = ", ".join(f"<{c.tag} name={c.name!r}>" for c in pointing)
        raise LabelConfigError(f'{names} has no <Label> children; add e.g. <Label value="cat"/> inside it')
    return LabelingSpec(targets)


def label_interface(xml: str) -> Any:
    """``LabelInterface`` of ``xml``; every parse failure becomes ``LabelConfigError``."""
    from label_studio_sdk.label_interface import LabelInterface

    try:
        return LabelInterface(xml)
    except Exception as exc:  # the SDK raises its own exception types, not derived from ValueError
        raise LabelConfigError(f"the labeling config is not valid XML ({exc}); start from <View>...</View>") from exc


def _image_key(obj) -> str | None:
    """Task data key of an ``<Image value="$key">``; None for other tags, literals and image lists."""
    value = (obj.attr or {}).get("value") or ""
    if obj.tag.lower() != "image" or not value.startswith("$") or len(value) < 2:
        return None
    return value[1:]


def _labels(control) -> tuple[LabelSpec, ...]:
    """The ``<Label>`` children of ``control``, in config order."""
    tags = (control.labels_attrs or {}).items()  # value -> LabelTag
    return tuple(LabelSpec(value, _names(tag.attr or {}, value)) for value, tag in tags if tag.tag == "Label")


def _names(attr: dict, value: str) -> tuple[str, ...]:
    """``predicted_values="a, b"`` -> ``("a", "b")``; else the label's own text."""
    synonyms = normalize_names(str(attr.get("predicted_values") or "").split(","))
    return synonyms or (attr.get("value") or value,)
