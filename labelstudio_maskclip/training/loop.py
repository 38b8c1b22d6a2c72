"""The training loop: optimiser and schedule, one step, resume state, and the helpers for torchrun.

Each step: a batch of augmented crops (:func:`~labelstudio_maskclip.training.data.batch`); the frozen
teacher runs on the same crops; targets = argmax of its upsampled probabilities, pixels below
``train_pseudo_threshold`` ignored, pixels people labelled take their label
(:func:`~labelstudio_maskclip.training.data.build_targets`). After ``train_self_training_start`` of the
schedule the student's own predictions replace the teacher's. Cross-entropy (ignore 255); SGD (lr
``train_lr``, momentum and weight decay from Settings, none on the logit scale), poly decay power 0.9 to
1e-4; bf16 autocast and channels_last on CUDA; DistributedDataParallel (SyncBatchNorm on CUDA) under
torchrun, each rank on its shard of the items.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import Unavailable
from ..settings import Settings
from .checkpoints import save_checkpoint
from .data import IGNORE, Item, batch, build_targets
from .student import IMAGENET_MEAN, IMAGENET_STD, StudentNet, build_student
from .teacher import Teacher

__all__ = ["TrainError", "Dist", "RunState", "Loop", "poly_lr", "optimizer", "save_resume", "load_resume"]

log = logging.getLogger(__name__)

MIN_LR = 1e-4  # poly decay floor
POLY_POWER = 0.9


class TrainError(Unavailable):
    """Training cannot start or continue; the message says what to provide."""


# --- distributed -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; ``world == 1`` when run alone (every helper is then a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def init(cls) -> Dist:
        """Read torchrun's variables; initialise the process group when WORLD_SIZE > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Rank 0: fetches data, evaluates, writes and promotes."""
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world <= 1:
            return value

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# --- schedule, optimiser, resume ---------------------------------------------------------------------------


@dataclass
class RunState:
    """Where a run stands: steps done, loss per step, candidate mIoU at checkpoints (``{"step", "miou"}``)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def poly_lr(step: int, steps: int, base: float, min_lr: float = MIN_LR, power: float = POLY_POWER) -> float:
    """Poly decay from ``base`` at step 0 to ``min_lr`` at ``steps``."""
    return (base - min_lr) * (1 - min(step, steps) / max(1, steps)) ** power + min_lr


def optimizer(net: StudentNet, s: Settings) -> torch.optim.SGD:
    """SGD with momentum; weight decay on every trainable parameter but the logit scale."""
    scale = [p for n, p in net.named_parameters() if p.requires_grad and n == "log_scale"]
    rest = [p for n, p in net.named_parameters() if p.requires_grad and n != "log_scale"]
    groups = [{"params": rest, "weight_decay": s.train_weight_decay}, {"params": scale, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=s.train_lr, momentum=s.train_momentum)


def save_resume(run_dir: Path, net: StudentNet, opt: torch.optim.Optimizer, state: RunState) -> None:
    """``run_dir/last.pt``: weights, optimiser and :class:`RunState`, to continue the run after a crash."""
    payload = {"state_dict": net.state_dict(), "optimizer": opt.state_dict(), **asdict(state)}
    save_checkpoint(run_dir / "last.pt", payload)


def load_resume(run_dir: Path, net: StudentNet, opt: torch.optim.Optimizer) -> RunState:
    """Restore what :func:`save_resume` wrote into ``net`` and ``opt``; :class:`TrainError` if there is none."""
    path = run_dir / "last.pt"
    if not path.is_file():
        raise TrainError(f"cannot resume: {path} does not exist (is the run id right?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    log.info("resumed %s at step %d", run_dir.name, ckpt["step"])
    return RunState(ckpt["step"], list(ckpt["losses"]), list(ckpt["evals"]))


# --- the loop ----------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """The student being trained and everything a step needs. ``model`` is ``net`` or its DDP wrapper."""

    settings: Settings
    net: StudentNet
    model: nn.Module
    opt: torch.optim.Optimizer
    teacher: Teacher
    device: torch.device
    state: RunState

    @classmethod
    def build(cls, s: Settings, teacher: Teacher, device: torch.device, dist: Dist, resume: Path | None) -> Loop:
        """A fresh student on ``device`` (or the one saved in ``resume/last.pt``), wrapped for DDP."""
        net = build_student(s.student, teacher.embeddings.cpu(), s.student_pretrained).to(device)
        cuda = device.type == "cuda"
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        opt = optimizer(net, s)
        state = load_resume(resume, net, opt) if resume is not None else RunState()
        model: nn.Module = net
        if dist.world > 1:
            if cuda:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        return cls(s, net, model, opt, teacher, device, state)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def step(self, images: torch.Tensor, human: torch.Tensor) -> tuple[float, float, bool]:
        """One SGD step at ``state.step`` on (B, 3, H, W) [0, 1] images and (B, H, W) people's labels.
        Returns (loss, learning rate, whether targets came from the student itself)."""
        s = self.settings
        step = self.state.step
        lr = poly_lr(step, s.train_steps, s.train_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        images, human = images.to(self.device), human.to(self.device)
        self_training = step >= int(s.train_self_training_start * s.train_steps)
        if not self_training:
            with torch.no_grad():
                probs = self.teacher.probs(images).float().to(self.device)
                pseudo = F.interpolate(probs, size=images.shape[2:], mode="bilinear")
        logits = self._logits(images)
        if self_training:
            pseudo = logits.detach().softmax(1)
        targets = build_targets(pseudo, human, s.train_pseudo_threshold)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE) if (targets != IGNORE).any() else logits.sum() * 0
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.state.losses.append(float(loss.detach()))
        self.state.step = step + 1
        return self.state.losses[-1], lr, self_training

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 student logits at the images' size (train mode, autocast on CUDA)."""
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = (images - mean) / std
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            logits = self.model(x)
        return F.interpolate(logits.float(), size=images.shape[2:], mode="bilinear", align_corners=False)

    def run(
        self,
        items: Sequence[Item],
        rng: np.random.Generator,
        *,
        progress: bool,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> None:
        """Steps from ``state.step`` to ``train_steps``; ``on_checkpoint()`` every ``checkpoint_every`` steps
        (not after the last one)."""
        s = self.settings
        bar = _bar(progress, s.train_steps, self.state.step)
        while self.state.step < s.train_steps:
            images, human = batch(items, s.train_batch_size, s.train_crop, rng)
            loss, lr, self_training = self.step(images, human)
            done = self.state.step
            _report(bar, done, s.train_steps, loss, lr, self_training)
            if on_checkpoint and checkpoint_every and done % checkpoint_every == 0 and done < s.train_steps:
                on_checkpoint()
        if bar is not None:
            bar.close()


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None

    return tqdm(total=total, initial=initial, desc="train", unit="step")


def _report(bar, step: int, steps: int, loss: float, lr: float, self_training: bool) -> None:
    """Progress: the bar when there is one, else a log line at the first, every 50th and the last step."""
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", src="self" if self_training else "teacher")
    elif step == 1 or step % 50 == 0 or step == steps:
        source = "student" if self_training else "teacher"
        log.info("step %d/%d loss %.4f lr %.2e targets from %s", step, steps, loss, lr, source)
