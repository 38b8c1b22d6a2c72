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

With a PostgreSQL store (``MASKCLIP_STORE_URL``, several instances) the served-version pointer also lives in
the store (``shared_state``, key :data:`SERVED_KEY`), which is what every instance reads: the functions here
take the settings (``where``) and then read and write the store's pointer too (a path alone: the file only).
A store whose pointer was never set (a deployment moving from SQLite) falls back to the file's; a store
that cannot be reached when the pointer is read falls back to the file with a warning (predictions go on).
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import Unavailable
from ..files import fsync_dir as _fsync_dir
from ..files import write_atomic
from ..learning.store import Store, shared_store
from ..settings import Settings, redact

__all__ = [
    "FORMAT",
    "VERSION_PREFIX",
    "SERVED_KEY",
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
SERVED_KEY = "served_version"  # the store's pointer: a version, or "maskclip" (the teacher)
_TEACHER = "maskclip"

log = logging.getLogger(__name__)

Where = Settings | str | Path  # the settings (store and MODEL_DIR), or a MODEL_DIR (files only)


class CheckpointError(Unavailable):
    """A checkpoint or version that does not exist or cannot be read; the message names it."""


def models_dir(model_dir: Where) -> Path:
    return Path(model_dir.model_dir if isinstance(model_dir, Settings) else model_dir) / "models"


def _shared_store(where: Where) -> Store | None:
    """The PostgreSQL store of ``where``, None for files only."""
    if not isinstance(where, Settings) or not where.store_url:
        return None
    return shared_store(where)


def _point(where: Where, version: str | None) -> None:
    """Set the store's pointer (with a PostgreSQL store): ``version``, or None for the teacher."""
    store = _shared_store(where)
    if store is not None and isinstance(where, Settings):
        store.put_state(SERVED_KEY, version or _TEACHER)
        _store_down_until.pop(where.store_url, None)  # reachable again: read it again at once


def checkpoint_path(model_dir: Where, version: str) -> Path:
    return models_dir(model_dir) / f"{version}.pt"


#: after the store could not be read, the served version is read from the file for this long (seconds) before
#: the store is tried again: a request never waits for a connection timeout on each call while it is down
STORE_BACKOFF_S = 30.0
_store_down_until: dict[str, float] = {}  # store URL -> time.monotonic() until which it is not tried


def _stored_version(where: Where) -> str | None:
    """The store's pointer (None: no PostgreSQL store, no pointer stored, or the store is down: see
    :data:`STORE_BACKOFF_S`; the warning is logged once per back-off)."""
    if not isinstance(where, Settings) or not where.store_url:
        return None
    if time.monotonic() < _store_down_until.get(where.store_url, 0.0):
        return None
    try:
        store = _shared_store(where)
        return store.get_state(SERVED_KEY) if store is not None else None
    except Unavailable as e:  # the store's StoreError: it cannot be reached now
        _store_down_until[where.store_url] = time.monotonic() + STORE_BACKOFF_S
        log.warning("the served version is read from %s for %.0f s: %s", models_dir(where) / _POINTER,
                    STORE_BACKOFF_S, e)  # fmt: skip
        return None


def current_version(model_dir: Where) -> str | None:
    """The served student's version, or None (serve MaskCLIP). One small file read (one small query with a
    PostgreSQL store)."""
    value = _stored_version(model_dir)
    if value is not None:
        return None if value == _TEACHER else value
    try:
        with open(models_dir(model_dir) / _POINTER, encoding="utf-8") as f:
            version = f.read(256).strip()
    except FileNotFoundError:
        return None
    return version or None


def current_checkpoint(model_dir: Where) -> Path | None:
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
def _registry_lock(model_dir: Where) -> Iterator[None]:
    """Serialises promotions and rollbacks (version numbering, pointer) across processes."""
    path = models_dir(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _versions(model_dir: Where) -> list[int]:
    numbers = []
    for p in models_dir(model_dir).glob(f"{VERSION_PREFIX}*.pt"):
        m = _VERSION_RE.match(p.stem)
        if m:
            numbers.append(int(m.group(1)))
    return sorted(numbers)


def promote(model_dir: Where, payload: dict[str, Any]) -> str:
    """Register ``payload`` (a checkpoint dict without ``version``/``format``/``created``) as the next version
    and point ``current`` (and the store's pointer, with a PostgreSQL store) at it. Returns the version, e.g.
    ``"maskclip+-3"``."""
    with _registry_lock(model_dir):
        numbers = _versions(model_dir)
        version = f"{VERSION_PREFIX}{(numbers[-1] + 1) if numbers else 1}"
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        full = _without_secrets({**payload, "format": FORMAT, "version": version, "created": created})
        save_checkpoint(checkpoint_path(model_dir, version), full)
        meta = json.dumps(_metadata(full), indent=2, default=str).encode()
        write_atomic(models_dir(model_dir) / f"{version}.json", meta)
        try:  # the store's pointer first (instances read it): if it cannot be written, nothing is promoted
            _point(model_dir, version)
        except BaseException:
            for suffix in (".pt", ".json"):
                (models_dir(model_dir) / f"{version}{suffix}").unlink(missing_ok=True)
            raise
        write_atomic(models_dir(model_dir) / _POINTER, f"{version}\n".encode())
    return version


def history(model_dir: Where) -> list[dict[str, Any]]:
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


def rollback(model_dir: Where, version: str) -> str:
    """Serve ``version`` again (any registered one, older or newer), or ``"maskclip"`` to serve the
    MaskCLIP teacher (removes the pointer). Returns it."""
    with _registry_lock(model_dir):
        if version == "maskclip":  # the store's pointer first (instances read it), then the file
            _point(model_dir, None)
            (models_dir(model_dir) / _POINTER).unlink(missing_ok=True)
            _fsync_dir(models_dir(model_dir))
            return version
        path = checkpoint_path(model_dir, version)
        if not _VERSION_RE.match(version) or not path.is_file():
            known = ", ".join(f"{VERSION_PREFIX}{n}" for n in _versions(model_dir)) or "none"
            raise CheckpointError(f"no student version {version!r} in {models_dir(model_dir)} (known: {known})")
        read_checkpoint(path)  # refuse to point at a file that does not load
        _point(model_dir, version)
        write_atomic(models_dir(model_dir) / _POINTER, f"{version}\n".encode())
    return version
