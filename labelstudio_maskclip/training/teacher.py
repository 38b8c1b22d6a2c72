"""The teacher the student learns from: what the trainer needs of it, and the frozen MaskCLIP one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

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
    """The frozen MaskCLIP teacher over fixed classes: :meth:`MaskCLIP.grid_probs` on the training crop."""

    def __init__(
        self,
        maskclip: Any,
        classes: Sequence[Any],
        background: Sequence[Any],
        opts: Any,
        embeddings: torch.Tensor | None = None,
    ):
        """``embeddings``: the (C, D) text embeddings of ``classes`` + ``background`` when already made (the
        server's stored ones, :func:`~labelstudio_maskclip.training.train.stored_text_embeddings`); else
        computed here."""
        self.maskclip = maskclip
        self.opts = opts
        if embeddings is None:
            embeddings = maskclip.text_embeddings(list(classes) + list(background))
        self.embeddings = embeddings.float().to(maskclip.device)  # (C, D)

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.maskclip.input_size(images.shape[2], images.shape[3], 0)  # rounded to the encoder stride
        x = images.to(self.maskclip.device, torch.float32)
        if (h, w) != tuple(images.shape[2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return self.maskclip.grid_probs(self.maskclip.normalize(x), self.embeddings, self.opts).float().clone()

    def describe(self) -> dict[str, Any]:
        clip = self.maskclip.clip
        return {"model": clip.name, "pretrained": clip.pretrained, "templates": list(self.maskclip.templates)}
