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
    "encode_prompts",
    "synonym_means",
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


def _trimmable(model: Any) -> bool:
    """Whether ``model``'s text tower is CLIP's: a causal mask and pooling at the EOT token (the highest id),
    so that tokens after a prompt's EOT never reach its embedding."""
    return (
        getattr(model, "text_pool_type", None) == "argmax"
        and isinstance(getattr(model, "attn_mask", None), torch.Tensor)
        and isinstance(getattr(model, "positional_embedding", None), torch.Tensor)
        and all(hasattr(model, a) for a in ("token_embedding", "transformer", "ln_final", "text_projection"))
    )


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed on the context cut after the batch's last EOT token.

    tokens: (B, 77) ids -> (B, D). With a causal mask, position i only attends to positions <= i, and the
    output is read at each prompt's EOT, so the padding after the longest prompt changes nothing: the same
    numbers (up to float rounding) for about (L / 77) of the work, L the longest prompt. Falls back to
    ``encode_text`` for towers that pool elsewhere.
    """
    if not _trimmable(model):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, width) at each EOT
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


@torch.no_grad()
def encode_prompts(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    prompts: list[str],
    device: torch.device,
    chunk: int = 512,
) -> torch.Tensor:
    """(P, D) float32 L2-normalised text features of ``prompts``, batched ``chunk`` at a time; prompts are
    sorted by length so that each batch is cut to its own longest prompt (:func:`encode_text_trimmed`)."""
    tokens = tokenizer(prompts)  # (P, 77)
    order = torch.argsort(tokens.argmax(dim=-1))  # by EOT position
    parts: list[torch.Tensor] = []
    for i in range(0, len(prompts), chunk):
        f = encode_text_trimmed(model, tokens[order[i : i + chunk]].to(device)).float()  # model: open_clip CLIP
        parts.append(f / f.norm(dim=-1, keepdim=True))
    feats = torch.cat(parts)
    out = torch.empty_like(feats)
    out[order.to(feats.device)] = feats
    return out


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
    feats = encode_prompts(model, tokenizer, prompts, device, chunk)  # (P, D)
    per_name = torch.zeros(len(pairs), feats.shape[1], device=device).index_add_(0, owner, feats)
    per_name = per_name / per_name.norm(dim=-1, keepdim=True)  # (N, D): mean over templates, renormalised
    return synonym_means(per_name, torch.tensor([k for k, _ in pairs], device=device))  # (K, D)


def synonym_means(per_name: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(N, D) L2-normalised name embeddings and (N,) class of each name (ascending, every class present)
    -> (K, D): each class's names averaged and renormalised (the ``"mean"`` synonym rule). A class of one
    name keeps its row exactly."""
    k = int(owner.max()) + 1 if len(owner) else 0
    if k == len(owner):
        return per_name
    per_class = torch.zeros(k, per_name.shape[1], device=per_name.device, dtype=per_name.dtype)
    per_class.index_add_(0, owner.to(per_name.device), per_name)
    return per_class / per_class.norm(dim=-1, keepdim=True)
