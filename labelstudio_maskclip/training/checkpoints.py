"""The model registry: promoted student checkpoints under ``MODEL_DIR/models/`` and the ``current`` pointer.

Layout::

    MODEL_DIR/models/maskclip+-1.pt      self-describing checkpoint (torch.save of a dict, see below)
    MODEL_DIR/models/maskclip+-1.json    the same metadata without weights (cheap to list)
    MODEL_DIR/models/current             one line: the served version, e.g. "maskclip+-3"

A checkpoint dict holds: ``format``, ``version``, ``student`` (architecture), ``state_dict``,
``embeddings`` (C, D), ``classes`` and ``background`` (lists of name lists), ``clip`` (text model name,
pretrained tag, templates), ``settings`` (the training settings without the secrets:
:func:`labelstudio_maskclip.settings.redact`), ``metrics``, ``data`` (counts), ``created``
(ISO 8601 UTC). Every file is written atomically (temporary file in the same directory, fsync,
``os.replace``, fsync of the directory), so a reader sees the old file or the new one, never a torn one, and a
trainer killed at any moment leaves the served model as it was. No pointer means: serve MaskCLIP.

:func:`current_version` is one small file read; servers call it per request to follow promotions.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import Unavailable
from ..files import fsync_dir as _fsync_dir
from ..files import write_atomic
from ..settings import redact

__all__ = [
    "FORMAT",
    "VERSION_PREFIX",
    "CheckpointError",
    "models_dir",
    "current_version",
    "current_checkpoint",
    "checkpoint_path",
    "write_atomic",
    "save_checkpoint",
    "read_checkpoint",
    "promote",
    "history",
    "rollback",
]

FORMAT = "labelstudio-maskclip-student/1"
VERSION_PREFIX = "maskclip+-"
_POINTER = "current"
_VERSION_RE = re.compile(r"^maskclip\+-(\d+)$")


class CheckpointError(Unavailable):
    """A checkpoint or version that does not exist or cannot be read; the message names it."""


def models_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / "models"


def checkpoint_path(model_dir: str | Path, version: str) -> Path:
    return models_dir(model_dir) / f"{version}.pt"


def current_version(model_dir: str | Path) -> str | None:
    """The served student's version, or None (serve MaskCLIP). One small file read."""
    try:
        with open(models_dir(model_dir) / _POINTER, encoding="utf-8") as f:
            version = f.read(256).strip()
    except FileNotFoundError:
        return None
    return version or None


def current_checkpoint(model_dir: str | Path) -> Path | None:
    """Path of the served checkpoint, or None."""
    version = current_version(model_dir)
    return None if version is None else checkpoint_path(model_dir, version)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save(payload)`` to ``path`` atomically."""
    import torch

    return write_atomic(path, lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load a student checkpoint dict; :class:`CheckpointError` if missing or not one of ours."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"student checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read student checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a labelstudio-maskclip student checkpoint (format {FORMAT})")
    return _without_secrets(ckpt)


def _metadata(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in ("state_dict", "embeddings")}


def _without_secrets(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with secret settings removed (a checkpoint never stores them; older ones might have)."""
    if isinstance(meta.get("settings"), dict):
        return {**meta, "settings": redact(meta["settings"])}
    return meta


@contextmanager
def _registry_lock(model_dir: str | Path) -> Iterator[None]:
    """Serialises promotions and rollbacks (version numbering, pointer) across processes."""
    path = models_dir(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _versions(model_dir: str | Path) -> list[int]:
    numbers = []
    for p in models_dir(model_dir).glob(f"{VERSION_PREFIX}*.pt"):
        m = _VERSION_RE.match(p.stem)
        if m:
            numbers.append(int(m.group(1)))
    return sorted(numbers)


def promote(model_dir: str | Path, payload: dict[str, Any]) -> str:
    """Register ``payload`` (a checkpoint dict without ``version``/``format``/``created``) as the next version
    and point ``current`` at it. Returns the version, e.g. ``"maskclip+-3"``."""
    with _registry_lock(model_dir):
        numbers = _versions(model_dir)
        version = f"{VERSION_PREFIX}{(numbers[-1] + 1) if numbers else 1}"
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        full = _without_secrets({**payload, "format": FORMAT, "version": version, "created": created})
        save_checkpoint(checkpoint_path(model_dir, version), full)
        meta = json.dumps(_metadata(full), indent=2, default=str).encode()
        write_atomic(models_dir(model_dir) / f"{version}.json", meta)
        write_atomic(models_dir(model_dir) / _POINTER, f"{version}\n".encode())
    return version


def history(model_dir: str | Path) -> list[dict[str, Any]]:
    """Every registered version, oldest first: its metadata (no weights) plus ``current`` (bool)."""
    served = current_version(model_dir)
    out = []
    for n in _versions(model_dir):
        version = f"{VERSION_PREFIX}{n}"
        side = models_dir(model_dir) / f"{version}.json"
        try:
            meta = _without_secrets(json.loads(side.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            meta = {"version": version, "note": "metadata file missing; the checkpoint itself describes it"}
        meta["current"] = version == served
        out.append(meta)
    return out


def rollback(model_dir: str | Path, version: str) -> str:
    """Serve ``version`` again (any registered one, older or newer), or ``"maskclip"`` to serve the
    MaskCLIP teacher (removes the pointer). Returns it."""
    with _registry_lock(model_dir):
        if version == "maskclip":
            (models_dir(model_dir) / _POINTER).unlink(missing_ok=True)
            _fsync_dir(models_dir(model_dir))
            return version
        path = checkpoint_path(model_dir, version)
        if not _VERSION_RE.match(version) or not path.is_file():
            known = ", ".join(f"{VERSION_PREFIX}{n}" for n in _versions(model_dir)) or "none"
            raise CheckpointError(f"no student version {version!r} in {models_dir(model_dir)} (known: {known})")
        read_checkpoint(path)  # refuse to point at a file that does not load
        write_atomic(models_dir(model_dir) / _POINTER, f"{version}\n".encode())
    return version
