"""Pictures people look at: label maps as colour overlays with a legend, and label PNGs."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["palette", "overlay", "save_label_png"]


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (golden-ratio hues), stable for a given index."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues], np.uint8).reshape(n, 3)


def overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str], alpha: float = 0.5) -> Image.Image:
    """Blend a label map over its image and draw a legend of the labels present.

    image: (H, W, 3) uint8 RGB; labels: (H, W) int, class index or negative for no label.
    """
    colours = palette(len(names))
    out = image.astype(np.float32)
    valid = labels >= 0
    out[valid] = (1 - alpha) * out[valid] + alpha * colours[labels[valid]]
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    present = [int(k) for k in np.unique(labels[valid])]
    for row, k in enumerate(present):
        y = 4 + 14 * row
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(c) for c in colours[k]), outline=(0, 0, 0))
        draw.text((18, y - 1), names[k], fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return picture


def save_label_png(labels: np.ndarray, path: Path) -> None:
    """Write a label map as a PNG: class index per pixel, 255 for no label (uint16 above 255 classes)."""
    n = int(labels.max()) + 1 if labels.size else 0
    if n < 255:
        data = np.where(labels >= 0, labels, 255).astype(np.uint8)
    else:
        data = np.where(labels >= 0, labels, 65535).astype(np.uint16)
    Image.fromarray(data).save(path)
