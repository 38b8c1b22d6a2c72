"""Text side: class embeddings from label names and prompt templates.

A class is a tuple of names (synonyms). Its embedding is the mean, over names and templates, of the
L2-normalised ``encode_text`` outputs, L2-normalised again (docs/method.md, section 1.3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MASKCLIP_TEMPLATES",
    "SCENE_TEMPLATES",
    "resolve_templates",
    "encode_classes",
]

# The 5 scene templates MaskCLIP adds to CLIP's 80 ImageNet templates.
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def _imagenet_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip stores them as callables `lambda c: f"... {c}."`; turn them back into format strings.
    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def maskclip_templates() -> tuple[str, ...]:
    """The authors' 85 templates: CLIP's 80 ImageNet templates plus the 5 scene templates."""
    return _imagenet_templates() + SCENE_TEMPLATES


MASKCLIP_TEMPLATES = "maskclip85"


def resolve_templates(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Templates from a setting: ``"maskclip85"``, ``"imagenet80"``, ``"simple"``, a file with one
    template per line, or an explicit sequence. Every template must contain ``{}``."""
    if spec is None or spec == MASKCLIP_TEMPLATES:
        templates = maskclip_templates()
    elif isinstance(spec, str) and spec == "imagenet80":
        templates = _imagenet_templates()
    elif isinstance(spec, str) and spec == "simple":
        templates = ("a photo of a {}.",)
    elif isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"MASKCLIP_TEMPLATES={spec!r}: not 'maskclip85', 'imagenet80', 'simple' or an existing file"
            )
        templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    else:
        templates = tuple(spec)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"prompt templates must be non-empty and each contain '{{}}'; bad: {bad[:3]}")
    return templates


@torch.no_grad()
def encode_classes(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classes: tuple[tuple[str, ...], ...],
    templates: tuple[str, ...],
    device: torch.device,
    chunk: int = 512,
) -> torch.Tensor:
    """Class embeddings, (K, D) float32 on ``device``, rows L2-normalised.

    For each name: the mean over templates of the normalised text features, renormalised. For each class:
    the mean of its names' embeddings (synonyms), renormalised.
    """
    pairs = [(k, n) for k, names in enumerate(classes) for n in names]  # one entry per (class, name)
    prompts = [t.format(n) for _, n in pairs for t in templates]
    owner = torch.arange(len(pairs), device=device).repeat_interleave(len(templates))  # (P,) name of prompt
    parts: list[torch.Tensor] = []
    for i in range(0, len(prompts), chunk):
        tokens = tokenizer(prompts[i : i + chunk]).to(device)
        f = model.encode_text(tokens).float()  # (p, D); model: an open_clip CLIP
        parts.append(f / f.norm(dim=-1, keepdim=True))
    feats = torch.cat(parts)  # (P, D)
    per_name = torch.zeros(len(pairs), feats.shape[1], device=device).index_add_(0, owner, feats)
    per_name = per_name / per_name.norm(dim=-1, keepdim=True)  # (N, D): mean over templates, renormalised
    cls_of_name = torch.tensor([k for k, _ in pairs], device=device)
    per_class = torch.zeros(len(classes), feats.shape[1], device=device).index_add_(0, cls_of_name, per_name)
    return per_class / per_class.norm(dim=-1, keepdim=True)  # (K, D): mean over synonyms, renormalised
