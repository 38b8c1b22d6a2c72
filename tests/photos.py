"""Where the vendored test photos are (``tests/data``, see its README)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["COCO128", "COCO128_PHOTOS", "VOC_SAMPLES"]

DATA = Path(__file__).resolve().parent / "data"
COCO128 = DATA / "coco128-seg"  # images/*.jpg, labels/*.txt (YOLO-seg polygons), classes.txt
COCO128_PHOTOS = COCO128 / "images"
VOC_SAMPLES = DATA / "voc-samples"  # images/*.png, masks/*.png, classes.txt
