"""Single flight across processes and instances: one training run at a time, one re-scoring at a time.

A run lock is held by the run itself and released when its process ends, however it ends (``kill -9``
included), so a crashed run never blocks the next one. Where it lives follows the store
(:func:`run_lock`):

- SQLite store (one machine): an exclusive ``fcntl.flock`` on ``MODEL_DIR/<name>.lock``. The lock belongs to
  the open file, so a child process that inherits the descriptor holds it (:attr:`HeldLock.fd`: the trigger
  hands the training lock to the trainer it starts), and the kernel drops it with the last descriptor.
- PostgreSQL store (several instances, one database): a session-level advisory lock
  (``pg_try_advisory_lock`` / ``pg_advisory_lock``) on a connection of the run's own; the server drops it
  when that connection ends, which a dead process's connection does at once. Such a lock cannot be inherited
  (:attr:`HeldLock.fd` is None); it is handed over instead (:meth:`HeldLock.hand_over`): the holder keeps it
  until the child queues for it (``pg_advisory_lock``, waiting), then lets go, and PostgreSQL grants it to
  the queued child at once. Another acquirer cannot slip in between: a try that meets a queued waiter fails.

:meth:`RunLock.acquire` either tries (``wait=False``: None when another run holds it) or waits for it.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .backends import ConnectFailed, advisory_key, hide_password, hide_secrets, is_postgres, postgres_connect
from .store import StoreError

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["HeldLock", "RunLock", "FileLock", "AdvisoryLock", "run_lock"]


class HeldLock:
    """A lock this process holds; :meth:`release` (or :meth:`close`, or the end of a ``with`` block) lets it
    go. ``fd``: a descriptor a child process may inherit to keep holding it (file locks), else None."""

    def __init__(self, handle: Any, *, fd: int | None, key: int | None = None) -> None:
        self._handle = handle  # an open file (a file lock) or a psycopg connection (an advisory lock)
        self.fd = fd
        self._key = key  # an advisory lock's key (None for a file lock)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # the file's lock, or the session's advisory lock, ends with it
            self._handle = None

    close = release

    def hand_over(self, alive: Callable[[], bool], timeout: float = 120.0, every: float = 0.05) -> bool:
        """Release once another session queues for this advisory lock (the child it was started for), or
        when ``alive()`` turns False or ``timeout`` passes; True if a waiter took it over. A file lock is
        released at once (its child inherited the descriptor)."""
        if self._key is None or self._handle is None:
            self.release()
            return True
        end = time.monotonic() + timeout
        handed = False
        try:
            while not handed and alive() and time.monotonic() < end:
                handed = bool(self._handle.execute(_WAITING, _key_parts(self._key)).fetchone()[0])
                if not handed:
                    time.sleep(every)
        finally:
            self.release()
        return handed

    def still_held(self) -> bool:
        """True while this process holds the lock. A file lock is held while open; an advisory lock ends with
        its connection, which the server may end (a restart, ``pg_terminate_backend``): asked of the server."""
        if self._handle is None:
            return False
        if self._key is None:
            return True
        try:
            row = self._handle.execute(_HELD, _key_parts(self._key)).fetchone()
        except Exception:  # noqa: BLE001 - the connection is gone (whatever psycopg says): so is the lock
            return False
        return bool(row is not None and row[0])

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
            conn = postgres_connect(self.url, application_name=f"labelstudio-maskclip {self.name}")
        except ConnectFailed as exc:
            raise StoreError(f"cannot take the {self.name} lock in {hide_password(self.url)}: {exc}") from None
        try:
            if wait:
                conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
                return HeldLock(conn, fd=None, key=self.key)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            if row is not None and row[0]:
                return HeldLock(conn, fd=None, key=self.key)
        except psycopg.Error as exc:
            conn.close()
            message = hide_secrets(str(exc), self.url)
            raise StoreError(f"cannot take the {self.name} lock in {hide_password(self.url)}: {message}") from None
        except BaseException:
            conn.close()
            raise
        conn.close()
        return None


#: is another session of this database queued for the advisory lock (classid, objid) = the key's two halves?
_WAITING = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
    "WHERE l.locktype = 'advisory' AND NOT l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1 "
    "AND d.datname = current_database())"
)


#: does this session hold the advisory lock (classid, objid)?
_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
    "AND classid = %s AND objid = %s AND objsubid = 1)"
)


def _key_parts(key: int) -> tuple[int, int]:
    """A signed 64-bit advisory key as ``pg_locks`` shows it: (high 32 bits, low 32 bits), unsigned."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


def run_lock(settings: Settings, name: str) -> RunLock:
    """The lock ``name`` for the store the settings name (see the module docstring)."""
    if is_postgres(settings.store_url):
        return AdvisoryLock(settings.store_url, name)
    return FileLock(Path(settings.model_dir) / f"{name}.lock", name)
