"""COCO export of people's accepted masks: lossless RLE by default, polygons on request.

Masks are ``(H, W)`` bool arrays, row = y, column = x, at the image's original size. A COCO RLE here is
the compressed form pycocotools writes, as JSON: ``{"size": [H, W], "counts": "<ascii>"}``.

Two granularities (``mode``):

- ``"instance"``: every 8-connected region of a label's mask becomes one annotation (what people mean by
  "objects"). Two touching objects of one label painted with one brush are one region: a brush mask does not
  record where one object ends and the next begins.
- ``"semantic"``: one annotation per (image, label), holding the label's whole mask, even if it is in pieces.

``annToMask`` over all annotations of a label on an image gives back exactly the stored mask in either mode
(with ``polygons=False``). Polygons (``polygons=True``) are traced from the masks and are lossy.

Category ids are 1-based, in the order of ``categories`` (the labeling config's order), so they stay stable
from one export to the next as long as the config keeps its labels in order.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image

from ..errors import BadInput
from ..evaluation.metrics import IGNORE
from ..files import write_atomic
from ..masks.coco_rle import mask_to_coco_rle
from ..masks.polygons import mask_to_polygons

if TYPE_CHECKING:  # pragma: no cover
    from .store import Sample, Store

__all__ = [
    "CocoError",
    "image_file_name",
    "export_coco",
    "SampleSource",
    "write_coco",
    "export_semantic_pngs",
    "run_export",
    "IGNORE_INDEX",
]

Mode = Literal["instance", "semantic"]
#: Pixel value of unlabelled pixels in :func:`export_semantic_pngs`: the ignore value of ``eval`` and training.
IGNORE_INDEX = IGNORE


class CocoError(BadInput):
    """An input cannot be exported to COCO; the message says which and why."""


# --- export ----------------------------------------------------------------------------------------------


def image_file_name(image_ref: str, fallback: str = "image") -> str:
    """A file name for an image reference: the URL path's last part, or ``d=`` of LS local-files URLs.

    ``/data/upload/1/e6cf8185-cat.png`` -> ``e6cf8185-cat.png``;
    ``/data/local-files/?d=photos/a.jpg`` -> ``a.jpg``; ``s3://b/k/x.jpg`` -> ``x.jpg``.
    """
    if not image_ref or image_ref.startswith("data:"):
        return fallback
    parsed = urlparse(image_ref)
    path = parsed.path
    if "d" in parse_qs(parsed.query):
        path = parse_qs(parsed.query)["d"][0]
    name = unquote(path.rstrip("/").rsplit("/", 1)[-1])
    return name or fallback


def _regions(mask: np.ndarray, mode: Mode) -> Iterator[np.ndarray]:
    """The masks one label's mask becomes: itself (semantic) or its 8-connected components (instance)."""
    if mode == "semantic":
        yield mask
        return
    import cv2

    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)  # (H, W) int32
    for index in range(1, count):
        yield labels == index


def _segmentation(mask: np.ndarray, polygons: bool) -> Any:
    if not polygons:
        return mask_to_coco_rle(mask)

    # COCO polygons: a list of flat [x1, y1, x2, y2, ...] lists in pixel coordinates.
    return [[float(c) for point in polygon for c in point] for polygon in mask_to_polygons(mask)]


def _coco_annotations(
    image_id: int,
    masks: Mapping[str, np.ndarray],
    category_ids: Mapping[str, int],
    mode: Mode,
    polygons: bool,
    first_id: int,
) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    out: list[dict[str, Any]] = []
    for label, mask in masks.items():
        if label not in category_ids:
            continue
        for region in _regions(np.asarray(mask, dtype=bool), mode):
            rle = mask_to_coco_rle(region)
            compressed = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            area = int(mask_utils.area(compressed))
            if area == 0:
                continue
            segmentation = _segmentation(region, polygons)
            if polygons and not segmentation:
                continue  # region too small to trace
            out.append(
                {
                    "id": first_id + len(out),
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "segmentation": segmentation,
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(compressed)],
                    "iscrowd": 0,
                }
            )
    return out


@runtime_checkable
class SampleSource(Protocol):
    """Where accepted masks come from: the :class:`~labelstudio_maskclip.learning.store.Store`."""

    def accepted_samples(self, project: int | None = None) -> Iterator[Sample]: ...


def _samples(source: SampleSource | Iterable[Sample]) -> Iterable[Sample]:
    return source.accepted_samples() if isinstance(source, SampleSource) else source


def export_coco(
    source: SampleSource | Iterable[Sample],
    categories: Sequence[str],
    *,
    mode: Mode = "instance",
    polygons: bool = False,
    description: str = "labelstudio-maskclip export",
) -> dict[str, Any]:
    """Accepted masks -> a COCO instances dict (``images``, ``annotations``, ``categories``).

    ``source``: a :class:`~labelstudio_maskclip.learning.store.Store` (its ``accepted_samples()``) or samples.
    ``categories``: label names in the labeling config's order; category id = position + 1. Masks of labels
    not in ``categories`` are left out. Image id = the Label Studio task id; ``file_name`` from the image
    reference (see :func:`image_file_name`; made unique by prefixing the task id where two collide).
    Segmentation is compressed RLE with ``counts`` as str (lossless) or, with ``polygons=True``, traced
    polygons (lossy). ``area`` is the mask's pixel count, ``bbox`` ``[x, y, w, h]`` from pycocotools.
    """
    if mode not in ("instance", "semantic"):
        raise CocoError(f"mode={mode!r}: choose 'instance' or 'semantic'")
    if len(set(categories)) != len(categories):
        raise CocoError(f"categories contain duplicates: {list(categories)}")
    category_ids = {name: index + 1 for index, name in enumerate(categories)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    used_names: set[str] = set()
    for sample in _samples(source):
        name = image_file_name(sample.image, fallback=f"task-{sample.task_id}")
        if name in used_names:
            name = f"{sample.task_id}_{name}"
        used_names.add(name)
        images.append(
            {
                "id": int(sample.task_id),
                "file_name": name,
                "width": int(sample.width),
                "height": int(sample.height),
                "label_studio_image": sample.image,
            }
        )
        annotations += _coco_annotations(
            int(sample.task_id), sample.masks, category_ids, mode, polygons, first_id=len(annotations) + 1
        )
    return {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in category_ids.items()],
    }


def write_coco(coco: Mapping[str, Any], path: str | Path) -> Path:
    """Write a COCO dict as JSON, atomically (readers see the old file or the whole new one)."""
    path = Path(path)
    write_atomic(path, json.dumps(coco, separators=(",", ":")).encode("utf-8"))
    return path


def export_semantic_pngs(
    source: SampleSource | Iterable[Sample],
    categories: Sequence[str],
    out_dir: str | Path,
) -> list[Path]:
    """One single-channel PNG per image: pixel = 0-based index of the label in ``categories``.

    ``255`` (:data:`IGNORE_INDEX`) = unlabelled (no accepted mask covers the pixel: background or a label
    not in ``categories``). Where masks of two labels overlap, the label later in ``categories`` wins.
    File name: the image's file name stem + ``.png`` (task id prefixed where two collide). Also writes
    ``classes.txt`` (one label a line, line i = pixel value i). At most 255 categories.
    """
    if len(categories) > IGNORE_INDEX:
        raise CocoError(f"{len(categories)} categories do not fit 8-bit PNGs with {IGNORE_INDEX} as ignore")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(categories)}
    written: list[Path] = []
    used: set[str] = set()
    for sample in _samples(source):
        canvas = np.full((sample.height, sample.width), IGNORE_INDEX, dtype=np.uint8)  # (H, W)
        for label in sorted((name for name in sample.masks if name in index), key=index.__getitem__):
            canvas[np.asarray(sample.masks[label], dtype=bool)] = index[label]
        stem = Path(image_file_name(sample.image, fallback=f"task-{sample.task_id}")).stem
        if stem in used:
            stem = f"{sample.task_id}_{stem}"
        used.add(stem)
        buffer = io.BytesIO()
        Image.fromarray(canvas, mode="L").save(buffer, format="PNG")
        target = out_dir / f"{stem}.png"
        write_atomic(target, buffer.getvalue())
        written.append(target)
    write_atomic(out_dir / "classes.txt", "".join(f"{name}\n" for name in categories).encode("utf-8"))
    return written


def run_export(
    store: Store,
    categories: Sequence[str],
    out: str | Path,
    *,
    mode: Mode = "instance",
    polygons: bool = False,
    project: int | None = None,
    png_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The ``export`` command: the store's accepted masks (of ``project``, or all) -> COCO JSON at ``out``
    (atomic), and optionally semantic PNGs in ``png_dir``. Returns counts for the command to print.
    A damaged store is refused (:class:`~.store.StoreDamaged`, saying how to recover): nothing is written."""
    store.require_intact()
    coco = export_coco(store.accepted_samples(project), categories, mode=mode, polygons=polygons)
    write_coco(coco, out)
    summary: dict[str, Any] = {"path": str(out), "images": len(coco["images"]), "annotations": len(coco["annotations"])}
    if png_dir is not None:
        summary["pngs"] = len(export_semantic_pngs(store.accepted_samples(project), categories, png_dir))
    return summary
