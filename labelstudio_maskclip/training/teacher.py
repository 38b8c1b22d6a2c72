"""The teacher the student learns from: what the trainer needs of it, and the frozen MaskCLIP one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["Teacher", "CLIPTeacher"]


class Teacher(Protocol):
    """What the trainer needs of a teacher (MaskCLIP, or a stand-in in tests)."""

    embeddings: torch.Tensor  # (C, D) L2-normalised class text embeddings: K labels, then Kb background

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, C, h, w) class probabilities on any grid."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in the checkpoint (text model name, pretrained, templates)."""
        ...


class CLIPTeacher:
    """The frozen MaskCLIP teacher over fixed classes, as served: each training crop goes through
    :meth:`MaskCLIP.class_probs` with the served preset's options (its resize, windows, merging, PAMR,
    temperature and synonym rule), the very probabilities ``/predict`` labels an image of that crop with."""

    def __init__(
        self,
        maskclip: Any,
        classes: Sequence[Any],
        background: Sequence[Any],
        opts: Any,
        embeddings: torch.Tensor | None = None,
    ):
        """``opts``: the served ``SegmentOptions`` (``models.segment_options``). ``embeddings``: the (N, D)
        text embeddings of every name of ``classes`` + ``background`` when already made (the server's
        stored ones, :func:`~labelstudio_maskclip.training.train.stored_text_embeddings`); else computed
        here. :attr:`embeddings` is one row per class (names averaged): the student's classifier."""
        self.maskclip = maskclip
        self.opts = opts
        self.classes = list(classes) + list(background)
        names = maskclip.name_embeddings(self.classes) if embeddings is None else embeddings
        self.names = names.float().to(maskclip.device)  # (N, D)
        self.embeddings = maskclip.class_text(self.names, self.classes, "mean")[0]  # (C, D)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, C, h, w): each image as uint8, through the served pipeline."""
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        probs = [self.maskclip.class_probs(p.numpy(), self.classes, self.opts, self.names) for p in pixels]
        return torch.stack(probs).float()

    def label_map(self, image: np.ndarray, min_confidence: float) -> np.ndarray:
        """(H, W) int64 labels of an (H, W, 3) uint8 image as served (-1 where no label: below
        ``min_confidence`` or a background class)."""
        opts = replace(self.opts, min_confidence=min_confidence)
        seg = self.maskclip.segment([image], self.classes, opts=opts, text=self.names)[0]
        return seg.labels.astype(np.int64)

    def describe(self) -> dict[str, Any]:
        clip = self.maskclip.clip
        return {"model": clip.name, "pretrained": clip.pretrained, "templates": list(self.maskclip.templates)}
