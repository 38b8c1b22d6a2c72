"""Loading a CLIP model with open_clip: architecture by name (or a config file), weights by tag or file.

Weights never come silently random: ``pretrained="random"`` must be asked for with ``allow_random=True``
and logs a warning. A checkpoint that cannot be obtained (no network, wrong path) raises
:class:`WeightsError`, whose message says how to point ``MASKCLIP_PRETRAINED`` at a local file.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Unavailable

__all__ = [
    "LoadedCLIP", "WeightsError", "load_clip", "resolve_device", "resolve_dtype", "RANDOM", "native_bf16_cpu",
    "interactive_dtype",
]  # fmt: skip

log = logging.getLogger(__name__)

RANDOM = ("random", "none", "")


class WeightsError(Unavailable):
    """The CLIP weights named by the settings cannot be loaded."""


@dataclass(frozen=True)
class LoadedCLIP:
    model: torch.nn.Module  # open_clip CLIP, eval mode, on `device` in `dtype`
    tokenizer: Callable[[list[str]], torch.Tensor]  # open_clip tokenizer: list[str] -> LongTensor (N, context_length)
    mean: tuple[float, float, float]  # pixel normalisation of the pretrained weights (RGB, 0..1 scale)
    std: tuple[float, float, float]
    name: str  # architecture name as open_clip knows it
    pretrained: str  # tag, file or hub id the weights came from ("random" for random weights)
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None: bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU."""
    if precision in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or AMX), where they run about
    twice as fast as fp32; CPUs without these emulate bf16, which is slower than fp32."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # newer torch; older ones have the private checks
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def interactive_dtype(precision: str | None, device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype interactive prompts run the image tower in (under autocast), or None for the model's own.

    ``"auto"`` on a CPU with native bf16 (:func:`native_bf16_cpu`) and an fp32 model: bf16, about 2x faster
    on 2 cores; the patch features stay within 2e-3 of fp32's (BENCHMARKS.md, "Interactive speed on a
    CPU"). An explicit precision, a GPU (already bf16/fp16 under ``"auto"``) or a CPU without it: None.
    """
    if precision not in (None, "auto") or device.type != "cpu" or model_dtype != torch.float32:
        return None
    return torch.bfloat16 if native_bf16_cpu() else None


def _register_config_file(model: str) -> str:
    """A model given as a path to an open_clip config JSON is registered under the file's stem."""
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        import open_clip

        open_clip.add_model_config(path)
        return path.stem
    return model


def load_clip(
    model: str = "ViT-B-16",
    pretrained: str = "openai",
    device: str | torch.device | None = None,
    precision: str | None = None,
    *,
    allow_random: bool = False,
    cache_dir: str | None = None,
) -> LoadedCLIP:
    """Build an open_clip model and load its weights.

    ``model``: an open_clip architecture name (``"ViT-B-16"``, ``"RN50"``, ...) or a path to an open_clip
    model-config JSON. ``pretrained``: an open_clip tag (``"openai"``), a local checkpoint file (an open_clip
    state dict saved with ``torch.save``), ``"hf-hub:org/name"``, or ``"random"`` (only with
    ``allow_random``). Tags whose weights were trained with QuickGELU (OpenAI's) get it automatically.
    """
    import open_clip

    name = _register_config_file(model)
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    pretrained = (pretrained or "").strip()
    model_name, weights, quick_gelu = _weights_source(name, pretrained, allow_random)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=weights,
            precision="fp32",
            device="cpu",
            force_quick_gelu=quick_gelu,
            cache_dir=cache_dir or None,
        )
    except Exception as e:  # download failures, corrupt files, shape mismatches
        raise WeightsError(
            f"could not load CLIP weights {pretrained!r} for {name}: {e}. "
            "Without internet, download the checkpoint on another machine and set "
            "MASKCLIP_PRETRAINED=/path/to/open_clip_state_dict.pt (or MASKCLIP_CACHE_DIR to a filled cache)."
        ) from e
    clip = clip.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    norm = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    return LoadedCLIP(
        model=clip,
        tokenizer=open_clip.get_tokenizer(model_name),
        mean=(float(norm.mean[0]), float(norm.mean[1]), float(norm.mean[2])),
        std=(float(norm.std[0]), float(norm.std[1]), float(norm.std[2])),
        name=name,
        pretrained=pretrained if weights is not None or model_name != name else "random",
        device=dev,
        dtype=dtype,
    )


def _weights_source(name: str, pretrained: str, allow_random: bool) -> tuple[str, str | None, bool]:
    """(open_clip model name, its ``pretrained`` argument, force QuickGELU) for the architecture ``name`` and
    the stripped ``pretrained`` setting; raises :class:`WeightsError` for random weights not allowed or
    weights that are neither a tag nor a file."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    model_name: str = name
    weights: str | None = pretrained
    if pretrained.lower() in RANDOM:
        if not allow_random:
            raise WeightsError(
                f"MASKCLIP_PRETRAINED={pretrained!r} means random weights, which would serve meaningless masks. "
                "Point MASKCLIP_PRETRAINED at an open_clip tag or a local checkpoint file; random weights "
                "need MASKCLIP_ALLOW_RANDOM=true (tests and smoke runs only)."
            )
        warnings.warn(f"{name}: RANDOM WEIGHTS (allow_random is set); predictions are meaningless", stacklevel=3)
        log.warning("%s loaded with RANDOM WEIGHTS: predictions are meaningless", name)
        model_name, weights = name, None
    elif pretrained.startswith("hf-hub:"):
        model_name, weights = pretrained, None
    is_tag = weights is not None and get_pretrained_cfg(name, weights) != {}
    if weights is not None and not is_tag and not Path(weights).is_file():
        raise WeightsError(
            f"MASKCLIP_PRETRAINED={pretrained!r} is neither an open_clip tag for {name} nor an existing file. "
            f"Known tags: {open_clip.list_pretrained_tags_by_model(name) or 'none'}. "
            "On a machine without internet, copy the checkpoint file here and set MASKCLIP_PRETRAINED=/path/to/file."
        )
    quick_gelu = bool(is_tag and get_pretrained_cfg(name, weights).get("quick_gelu", False))
    return model_name, weights, quick_gelu
