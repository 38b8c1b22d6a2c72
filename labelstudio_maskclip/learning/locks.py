"""Single flight across processes and instances: one training run at a time, one re-scoring at a time.

A run lock is held by the run itself and released when its process ends, however it ends (``kill -9``
included), so a crashed run never blocks the next one. Where it lives follows the store
(:func:`run_lock`):

- SQLite store (one machine): an exclusive ``fcntl.flock`` on ``MODEL_DIR/<name>.lock``. The lock belongs to
  the open file, so a child process that inherits the descriptor holds it (:attr:`HeldLock.fd`: the trigger
  hands the training lock to the trainer it starts), and the kernel drops it with the last descriptor.
- PostgreSQL store (several instances, one database): a session-level advisory lock
  (``pg_try_advisory_lock`` / ``pg_advisory_lock``) on a connection of the run's own; the server drops it
  when that connection ends, which a dead process's connection does at once. Such a lock cannot be handed
  to a child process (:attr:`HeldLock.fd` is None): the child takes it itself.

:meth:`RunLock.acquire` either tries (``wait=False``: None when another run holds it) or waits for it.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from .backends import advisory_key, hide_password, is_postgres
from .store import StoreError

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["HeldLock", "RunLock", "FileLock", "AdvisoryLock", "run_lock"]


class HeldLock:
    """A lock this process holds; :meth:`release` (or :meth:`close`, or the end of a ``with`` block) lets it
    go. ``fd``: a descriptor a child process may inherit to keep holding it (file locks), else None."""

    def __init__(self, handle: IO[str] | Any, *, fd: int | None) -> None:
        self._handle = handle
        self.fd = fd

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # the file's lock, or the session's advisory lock, ends with it
            self._handle = None

    close = release

    def fileno(self) -> int:
        if self.fd is None:
            raise ValueError("an advisory lock has no descriptor: it cannot be inherited")
        return self.fd

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(Protocol):
    """One named lock (``train``, ``rescore``) shared by every process that uses the same store."""

    name: str

    def acquire(self, *, wait: bool = False) -> HeldLock | None:
        """The lock, held until released or this process ends; None (``wait=False``) when another holds it."""
        ...


class FileLock:
    """``fcntl.flock`` on ``path`` (created with its folder if missing)."""

    def __init__(self, path: str | Path, name: str = "") -> None:
        self.path = Path(path)
        self.name = name or self.path.stem

    def acquire(self, *, wait: bool = False) -> HeldLock | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        return HeldLock(f, fd=f.fileno())


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock, on a connection opened for it (closed on release)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.key = advisory_key(f"run:{name}")

    def acquire(self, *, wait: bool = False) -> HeldLock | None:
        import psycopg

        try:
            conn = psycopg.connect(self.url, autocommit=True, application_name=f"labelstudio-maskclip {self.name}")
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot take the {self.name} lock in {hide_password(self.url)}: {exc}") from None
        try:
            if wait:
                conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
                return HeldLock(conn, fd=None)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            if row is not None and row[0]:
                return HeldLock(conn, fd=None)
        except BaseException:
            conn.close()
            raise
        conn.close()
        return None


def run_lock(settings: Settings, name: str) -> RunLock:
    """The lock ``name`` for the store the settings name (see the module docstring)."""
    if is_postgres(settings.store_url):
        return AdvisoryLock(settings.store_url, name)
    return FileLock(Path(settings.model_dir) / f"{name}.lock", name)
