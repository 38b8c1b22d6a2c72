"""The MaskCLIP+ student: a segmentation network whose classifier is CLIP's class text embeddings.

Inference side only (never imports the trainer). Architecture (docs/method.md, section 3):

    pixels (B, 3, H, W), ImageNet-normalised
      -> trunk + head (DeepLabv3 ASPP on a dilated ResNet, output stride 8; LR-ASPP on MobileNetV3; or a
         tiny conv net for tests) projecting to D channels            (B, D, h, w)
      -> L2-normalise along D
      -> frozen 1x1 conv = the (C, D) class text embeddings           (B, C, h, w) cosines in [-1, 1]
      -> times a learned scale ``exp(log_scale)``                     logits

so the student keeps CLIP's label space. C = K label classes followed by Kb background classes, as in
:meth:`labelstudio_maskclip.engine.segmenter.MaskCLIP.segment`. A student checkpoint (see
:mod:`labelstudio_maskclip.training.checkpoints`) lists its classes; :meth:`StudentModel.serves` tells whether it can
answer a request for given labels, and :meth:`StudentModel.segment` returns the engine's
:class:`~labelstudio_maskclip.engine.segmenter.Segmentation` so the server treats both models alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.loading import resolve_device
from ..engine.names import ClassNames
from ..errors import BadInput
from .checkpoints import read_checkpoint
from .job import class_key

if TYPE_CHECKING:
    from ..engine.segmenter import Segmentation, SegmentOptions

__all__ = [
    "STUDENTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "StudentError",
    "StudentWeightsError",
    "LabelMismatchError",
    "StudentNet",
    "StudentModel",
    "build_student",
    "load_student",
    "class_key",
]

STUDENTS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "lraspp_mobilenet_v3_large", "tiny")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INITIAL_SCALE = 10.0  # initial logit scale: softmax(10 * cos) starts soft, the scale is learned


class StudentError(BadInput):
    """A student name, checkpoint or request that cannot be used; the message says what to change."""


class StudentWeightsError(StudentError):
    """The student's backbone weights (``MASKCLIP_STUDENT_PRETRAINED``) cannot be obtained."""


class LabelMismatchError(StudentError):
    """The request's labels are not the classes the student checkpoint was trained for."""


# --- trunks and heads ------------------------------------------------------------------------------------


class _TinyTrunk(nn.Module):
    """A few conv layers, output stride 4 (tests and very small CPU projects)."""

    def __init__(self, dim: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: int, dilation: int = 1) -> list[nn.Module]:
            pad = dilation
            return [nn.Conv2d(cin, cout, 3, stride, pad, dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.body = nn.Sequential(
            *block(3, width // 2, 2),
            *block(width // 2, width, 2),
            *block(width, width, 1, 2),
            *block(width, width, 1, 4),
        )
        self.proj = nn.Conv2d(width, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))  # (B, D, H/4, W/4)


class _TorchvisionTrunk(nn.Module):
    """torchvision segmentation model's backbone + head with ``num_classes = D`` (a projection to D)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.backbone = cast(nn.Module, model.backbone)  # torchvision's segmentation models
        self.classifier = cast(nn.Module, model.classifier)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        if self.kind == "deeplab":
            return self.classifier(feats["out"])  # (B, D, H/8, W/8)
        return self.classifier(feats)  # LR-ASPP takes {"low", "high"}: (B, D, H/8, W/8)


def _imagenet_weights(name: str):
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights

    return {
        "deeplabv3_resnet50": ResNet50_Weights.IMAGENET1K_V1,
        "deeplabv3_resnet101": ResNet101_Weights.IMAGENET1K_V1,
        "lraspp_mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    }[name]


def _torchvision_trunk(name: str, dim: int, pretrained: str) -> nn.Module:
    from torchvision.models import segmentation

    weights_backbone = None
    if pretrained == "imagenet":
        weights_backbone = _imagenet_weights(name)
    builder = getattr(segmentation, name)
    try:
        # deeplabv3_* build their ResNet with replace_stride_with_dilation=[False, True, True]: output stride 8.
        model = builder(weights=None, weights_backbone=weights_backbone, num_classes=dim, aux_loss=False)
    except Exception as e:  # download failure, corrupt torch hub cache
        raise StudentWeightsError(
            f"could not get ImageNet weights for the {name} student: {e}. Without internet, download the "
            "torchvision backbone weights on another machine and set MASKCLIP_STUDENT_PRETRAINED=/path/to/file.pth "
            "(or MASKCLIP_STUDENT_PRETRAINED=none to start from random weights)."
        ) from e
    trunk = _TorchvisionTrunk(model, "deeplab" if name.startswith("deeplab") else "lraspp")
    if pretrained not in ("imagenet", "none"):
        _load_backbone_file(trunk.backbone, pretrained, name)
    return trunk


def _load_backbone_file(backbone: nn.Module, path: str, name: str) -> None:
    """Load a torchvision classification state dict (ResNet / MobileNetV3) into the trunk's backbone."""
    if not Path(path).is_file():
        raise StudentWeightsError(
            f"MASKCLIP_STUDENT_PRETRAINED={path!r} is not 'imagenet', 'none' or an existing file "
            f"with torchvision backbone weights for {name}."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StudentWeightsError(f"MASKCLIP_STUDENT_PRETRAINED={path!r}: cannot read it as a state dict: {e}") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise StudentWeightsError(
            f"MASKCLIP_STUDENT_PRETRAINED={path!r} holds a {type(state).__name__}, not a state dict of {name} "
            "backbone weights"
        )
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone.", "features."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    missing, _ = backbone.load_state_dict(cleaned, strict=False)
    if missing:
        raise StudentWeightsError(
            f"MASKCLIP_STUDENT_PRETRAINED={path!r} does not fit the {name} backbone: {len(missing)} weights "
            f"missing (e.g. {missing[:3]}). Use torchvision's ImageNet classification weights for it."
        )


# --- the network -----------------------------------------------------------------------------------------


class StudentNet(nn.Module):
    """Trunk -> D-dim features -> cosine against the frozen (C, D) text embeddings, times a learned scale.

    ``forward(pixels (B, 3, H, W) ImageNet-normalised) -> logits (B, C, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, name: str, embeddings: torch.Tensor, pretrained: str = "none"):
        super().__init__()
        if name not in STUDENTS:
            raise StudentError(f"MASKCLIP_STUDENT={name!r}: choose one of {', '.join(STUDENTS)}")
        pretrained = (pretrained or "none").strip()
        if name == "tiny" and pretrained != "none":
            raise StudentWeightsError(
                f"the tiny student has no pretrained weights (MASKCLIP_STUDENT_PRETRAINED={pretrained!r}): "
                "set MASKCLIP_STUDENT_PRETRAINED=none"
            )
        self.name = name
        dim = embeddings.shape[1]
        self.trunk = _TinyTrunk(dim) if name == "tiny" else _torchvision_trunk(name, dim, pretrained)
        self.stride = 4 if name == "tiny" else 8
        emb = F.normalize(embeddings.detach().float(), dim=1)
        self.classifier = nn.Conv2d(dim, emb.shape[0], 1, bias=False)  # frozen: CLIP's label space
        self.classifier.weight.data.copy_(emb[:, :, None, None])
        self.classifier.weight.requires_grad_(False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(INITIAL_SCALE)))

    @property
    def num_classes(self) -> int:
        return self.classifier.weight.shape[0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(self.trunk(pixels).float(), dim=1)  # (B, D, h, w)
        cos = F.conv2d(feats, self.classifier.weight.float())  # (B, C, h, w) in [-1, 1]
        return self.log_scale.float().clamp(max=math.log(100.0)).exp() * cos


def build_student(name: str, embeddings: torch.Tensor, pretrained: str = "none") -> StudentNet:
    """A new student for ``embeddings`` (C, D). ``pretrained``: ``"imagenet"`` (torchvision backbone weights,
    downloaded on first use), a local backbone state-dict file, or ``"none"`` (random weights)."""
    return StudentNet(name, embeddings, pretrained)


# --- serving ---------------------------------------------------------------------------------------------


class StudentModel:
    """A trained student ready to segment. Build with :func:`load_student` (or from a trained net)."""

    def __init__(
        self,
        net: StudentNet,
        classes: Sequence[ClassNames],
        background: Sequence[ClassNames] = (),
        *,
        version: str = "",
        meta: dict[str, Any] | None = None,
    ):
        self.net = net.eval()
        self.classes = class_key(classes)
        self.background = class_key(background)
        self.version = version
        self.meta = dict(meta or {})
        if len(self.classes) + len(self.background) != net.num_classes:
            raise StudentError(
                f"student has {net.num_classes} classes but {len(self.classes)} labels + "
                f"{len(self.background)} background were given"
            )
        self.device = next(net.parameters()).device
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def labels(self) -> list[str]:
        """The label names (first name of each class), in class order."""
        return [c[0] for c in self.classes]

    def serves(self, classes: Sequence[ClassNames], background: Sequence[ClassNames] = ()) -> bool:
        """True when a request for ``classes`` (+ ``background``) can be answered by this student: the same
        classes and background classes, in any order."""
        return sorted(class_key(classes)) == sorted(self.classes) and sorted(class_key(background)) == sorted(
            self.background
        )

    def _order(self, classes: Sequence[ClassNames], background: Sequence[ClassNames]) -> list[int]:
        """Channel indices putting the student's outputs in the request's class order."""
        mine = self.classes + self.background
        return [mine.index(c) for c in class_key(classes) + class_key(background)]

    @torch.inference_mode()
    def grid_probs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, C, h, w) float32 class probabilities on the student's grid."""
        use_bf16 = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = self.net(pixels)
        return logits.float().softmax(1)

    @torch.inference_mode()
    def segment(
        self,
        images: Sequence[np.ndarray],
        classes: Sequence[ClassNames] | None = None,
        background: Sequence[ClassNames] | None = None,
        opts: SegmentOptions | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Segmentation]:
        """Segment (H, W, 3) uint8 RGB images like :meth:`MaskCLIP.segment` does.

        ``classes``/``background``: the request's labels, in its order; they must be the checkpoint's up to
        order (else :class:`LabelMismatchError`); None means the checkpoint's. ``opts``: the
        :class:`~labelstudio_maskclip.engine.segmenter.SegmentOptions` whose ``short_side``, ``size_multiple``,
        ``min_confidence`` and ``batch_size`` apply; dense mode, windows, refinements and temperature are CLIP
        options and do not apply. Returns ``list[Segmentation]``.
        """
        from ..engine.segmenter import SegmentOptions, normalized_batch, resized_size, segment_in_batches

        opts = opts if opts is not None else SegmentOptions()
        classes = self.classes if classes is None else classes
        background = self.background if background is None else background
        if not self.serves(classes, background):
            raise LabelMismatchError(
                f"student {self.version or '(unsaved)'} was trained for labels {self.labels} "
                f"(background {[c[0] for c in self.background]}), not {[class_key([c])[0][0] for c in classes]}: "
                "use MaskCLIP for these labels or train a student for them"
            )
        order = torch.tensor(self._order(classes, background), device=self.device)
        return segment_in_batches(
            images,
            lambda h, w: resized_size(
                h, w, opts.short_side, self.net.stride, opts.size_multiple, opts.max_input_pixels
            ),
            lambda batch, size: self.grid_probs(normalized_batch(batch, size, self._mean, self._std))[:, order],
            n_labels=len(self.classes),
            batch_size=opts.batch_size,
            min_confidence=opts.min_confidence,
            progress=progress,
            score=getattr(opts, "score", "confidence"),
        )


def load_student(checkpoint_path: str | Path, device: str | torch.device | None = None) -> StudentModel:
    """Load a student checkpoint written by the trainer (see :mod:`labelstudio_maskclip.training.checkpoints`)."""
    ckpt = read_checkpoint(checkpoint_path)
    dev = resolve_device(device)
    emb = ckpt["embeddings"].float()
    net = StudentNet(ckpt["student"], emb, "none")
    net.load_state_dict(ckpt["state_dict"])
    net = net.to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "embeddings")}
    return StudentModel(net, ckpt["classes"], ckpt.get("background", ()), version=ckpt.get("version", ""), meta=meta)
