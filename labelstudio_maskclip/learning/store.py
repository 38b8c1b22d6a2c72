"""The durable store of people's accepted masks: one SQLite file under ``MODEL_DIR`` (the default), or a
PostgreSQL database shared by several backend instances (``MASKCLIP_STORE_URL=postgresql://...``).

Durability: an annotation the webhook acknowledged must survive a crash, because Label Studio does not
send a webhook twice. SQLite runs in WAL mode with ``synchronous=FULL``: every commit fsyncs the
write-ahead log before returning, so a committed write survives a killed process *and* a power cut or OS
crash. (``NORMAL`` in WAL mode survives a killed process but may lose the last commits on power loss.)
The cost is one fsync per webhook (milliseconds), far below Label Studio's 1 s webhook timeout. PostgreSQL
commits durably with its defaults (``synchronous_commit=on``; the server's own settings rule).

Concurrency: several gunicorn workers (processes), threads and, on PostgreSQL, instances write at once.
Every write is one short transaction that takes the store's write lock at once (SQLite: ``BEGIN
IMMEDIATE``; PostgreSQL: an advisory lock; masks are RLE-encoded before it starts), so the read-check-write
of an annotation runs alone and a writer waits for the lock (``busy_timeout`` / ``lock_timeout``) instead of
failing; readers run beside the writer on a snapshot. Each thread of each process opens its own connection
(a connection is never shared across ``fork``). The dialects differ only inside
:mod:`~labelstudio_maskclip.learning.backends`.

Schema (version :data:`SCHEMA_VERSION`; versioned migrations in :mod:`~labelstudio_maskclip.learning.migrations`,
applied at open):

- ``tasks(id, project, image, width, height, first_seen)``: every task seen (``TASKS_CREATED`` or an
  annotation); tasks without a live annotation are the unlabeled pool.
- ``annotations(id, task_id, project, author, ground_truth, parent_prediction, accepted_unchanged,
  cancelled, deleted, updated_at, updated_ts, content_hash, seq, height, width, mask_count, stored_at)``:
  one row per Label Studio annotation. ``accepted_unchanged`` is 1/0, or NULL when unknown (the prediction
  was not in the payload). ``deleted`` rows are tombstones: they keep a late ``ANNOTATION_UPDATED`` from
  bringing back a deleted annotation (only annotations that were stored get one). ``seq`` is a store-wide
  counter bumped by every stored change; ``mask_count`` = number of its ``masks`` rows (a consistency check).
- ``masks(annotation_id, label, source, height, width, area, counts)``: one mask per (annotation, label),
  merged over the annotation's regions; ``counts`` is compressed COCO RLE (pycocotools, ascii: lossless);
  ``source`` is ``brush``, ``polygon`` or ``brush+polygon``.
- ``outcomes(annotation_id, region_id, label, outcome)``: per predicted region: ``unchanged``, ``edited``,
  ``deleted``; per region the person added: ``added`` (only when the prediction was known).
- ``training_runs(id, project, seq, model_version, metrics, finished_at)``: what the trainer has seen.
- ``meta(key, value)``: the ``seq`` counter.
- ``shared_state(key, value, updated_at)``: small values every instance reads (:meth:`Store.get_state`): the
  served-version pointer and the re-scoring status when the store is PostgreSQL.
- ``schema_version(version, summary, applied_at)``: the migrations applied.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Unavailable
from ..masks.coco_rle import coco_rle_to_mask, mask_to_coco_rle
from .backends import DB_FILE_NAME, Backend, Connection, SQLiteBackend, is_postgres, open_backend, sqlite_corruption
from .migrations import SCHEMA_VERSION, NewerSchema, applied, migrate

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "Store",
    "shared_store",
    "StoreError",
    "StoreDamaged",
    "Sample",
    "TaskRecord",
    "AnnotationWrite",
    "PutResult",
    "SCHEMA_VERSION",
    "DB_FILE_NAME",
    "OUTCOMES",
]

log = logging.getLogger(__name__)

OUTCOMES = ("unchanged", "edited", "deleted", "added")


class StoreError(Unavailable):
    """The store cannot be opened or used (newer schema, unwritable directory); the message says why."""

    subject = "annotation store unavailable"


class StoreDamaged(StoreError):
    """The store's file is corrupted (SQLite ``quick_check`` fails, or a read or write met a malformed page).
    The store refuses every read and write from then on; the message says what was found and how to
    recover (rebuild it from Label Studio with ``backfill``)."""


_is_corruption = sqlite_corruption  # SQLite: the file is damaged (not merely locked or unreachable)


@dataclass(frozen=True)
class TaskRecord:
    """A Label Studio task: ``image`` is the reference from ``task.data`` (URL or path), size if known."""

    id: int
    project: int | None = None
    image: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Sample:
    """One accepted annotation, ready for training: ``masks`` label -> ``(height, width)`` bool."""

    task_id: int
    annotation_id: int
    project: int | None
    image: str
    height: int
    width: int
    masks: dict[str, np.ndarray] = field(repr=False)
    ground_truth: bool = False
    author: str | None = None


@dataclass(frozen=True)
class AnnotationWrite:
    """An annotation to store. ``masks``: label -> ``(height, width)`` bool, merged over regions;
    ``sources``: label -> ``brush`` / ``polygon`` / ``brush+polygon``; ``outcomes``: (region id, label,
    outcome) with outcome in :data:`OUTCOMES`; ``updated_at``: Label Studio's ISO 8601 timestamp."""

    id: int
    task: TaskRecord
    author: str | None = None
    ground_truth: bool = False
    parent_prediction: int | None = None
    accepted_unchanged: bool | None = None
    cancelled: bool = False
    updated_at: str | None = None
    height: int | None = None
    width: int | None = None
    masks: Mapping[str, np.ndarray] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    outcomes: Sequence[tuple[str, str, str]] = ()


@dataclass(frozen=True)
class PutResult:
    """What :meth:`Store.put_annotation` did: ``stored``, ``duplicate`` (same content already stored),
    ``outcomes`` (same content already stored; its outcomes vs the parent prediction, unknown or different
    before, were recorded: not a new annotation), ``stale`` (a newer version is stored) or ``deleted`` (the
    annotation was deleted earlier)."""

    status: str
    annotation_id: int
    seq: int | None = None


def _quietly(conn: Connection, statement: str) -> None:
    """End a transaction on a connection that may be broken (corruption, no transaction open, server gone)."""
    try:
        conn.execute(statement)
    except Exception:  # noqa: BLE001 - whatever the database raises here, the first error is the one to tell
        pass


def _project_filter(project: int | None, column: str = "project") -> tuple[str, tuple[Any, ...]]:
    """`` AND <column> = ?`` and its parameter for one project; nothing for all projects (``None``)."""
    return ("", ()) if project is None else (f" AND {column} = ?", (project,))


_ANNOTATION_COLUMNS = (
    "id", "task_id", "project", "author", "ground_truth", "parent_prediction", "accepted_unchanged", "cancelled",
    "deleted", "updated_at", "updated_ts", "content_hash", "seq", "height", "width", "mask_count", "stored_at",
)  # fmt: skip
_UPSERT_ANNOTATION = (
    f"INSERT INTO annotations({', '.join(_ANNOTATION_COLUMNS)}) VALUES ({', '.join('?' * len(_ANNOTATION_COLUMNS))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _ANNOTATION_COLUMNS[1:])}"
)


def _quietly_close(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
        pass


#: connections inherited across ``fork``: kept referenced so that the child never closes the parent's session
_INHERITED: list[Connection] = []


def _timestamp(value: str | None) -> float | None:
    """ISO 8601 (``2026-11-02T10:00:00.123456Z``) -> POSIX seconds; None if absent or unreadable."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _encoded(write: AnnotationWrite) -> list[tuple[str, str, int, int, int, str]]:
    """(label, source, height, width, area, counts) for each non-empty mask, sorted by label."""
    rows = []
    for label in sorted(write.masks):
        mask = np.asarray(write.masks[label], dtype=bool)
        area = int(mask.sum())
        if area == 0:
            continue
        rle = mask_to_coco_rle(mask)
        rows.append((label, write.sources.get(label, "brush"), mask.shape[0], mask.shape[1], area, rle["counts"]))
    return rows


def _content_hash(write: AnnotationWrite, rows: Sequence[tuple]) -> str:
    """What the person made (task, author, flags, masks): not the outcomes, which are derived from the
    parent prediction and may be learnt later (a repeat of the same event without the prediction is the
    same annotation)."""
    content = {
        "task": write.task.id,
        "author": write.author,
        "ground_truth": bool(write.ground_truth),
        "parent_prediction": write.parent_prediction,
        "cancelled": bool(write.cancelled),
        "masks": [list(r) for r in rows],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class Store:
    """The store of tasks, accepted masks and training marks (see the module docstring), in an SQLite file or
    a PostgreSQL database: one API, the dialects in :mod:`~labelstudio_maskclip.learning.backends`.

    ``location``: a directory (the file is ``location / DB_FILE_NAME``; created if missing), a ``.sqlite3`` /
    ``.sqlite`` / ``.db`` file, ``sqlite:///path``, or ``postgresql://user:password@host/database``. The
    schema is migrated on open (:mod:`~labelstudio_maskclip.learning.migrations`). Safe to use from several
    threads and processes (and, on PostgreSQL, hosts) at once.
    """

    def __init__(self, location: str | Path, *, busy_timeout_s: float = 30.0, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise StoreError(f"synchronous={synchronous!r}: choose FULL (default), EXTRA or NORMAL")
        try:
            self.backend: Backend = open_backend(location, busy_timeout_s=busy_timeout_s, synchronous=synchronous)
        except (ValueError, ImportError) as exc:
            raise StoreError(f"cannot use the store {location}: {exc}") from None
        #: the SQLite file (None on PostgreSQL)
        self.path: Path | None = self.backend.path if isinstance(self.backend, SQLiteBackend) else None
        #: where the store is, for messages (a PostgreSQL URL without its password)
        self.location = self.backend.describe()
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the store's directory {self.path.parent}: {exc}") from None
        self._local = threading.local()
        #: What SQLite found wrong with the file ([] = intact): checked when the store opens (``PRAGMA
        #: quick_check``) and again whenever a read or write meets corruption. Always [] on PostgreSQL.
        self.damage: list[str] = []
        try:
            self._migrate()
        except StoreDamaged:
            return
        self.damage = self.integrity()
        if self.damage:
            log.error("%s", self.damage_message())

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        """The store the settings name: ``MASKCLIP_STORE_URL``, else the SQLite file in ``MODEL_DIR``."""
        return cls(settings.store_url or settings.model_dir)

    # --- connections and transactions ---------------------------------------------------------------

    def _connect(self) -> Connection:
        try:
            return self.backend.connect()
        except self.backend.errors as exc:
            if self.backend.is_corruption(exc):
                self.damage = [f"cannot open it: {exc}"]
                raise StoreDamaged(self.damage_message()) from None
            raise StoreError(f"cannot open the store {self.location}: {exc}") from None

    def _conn(self) -> Connection:
        """This thread's connection in this process (reopened after ``fork``, or when the server dropped it)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or not self.backend.usable(local.conn):
            if getattr(local, "pid", None) not in (None, os.getpid()):
                _INHERITED.append(local.conn)  # the parent's: never closed here (that would end its session)
            local.conn, local.pid = self._connect(), os.getpid()
        return local.conn

    @contextmanager
    def _transaction(self, begin: Callable[[Connection], None], end: str) -> Iterator[Connection]:
        """``begin(conn)``, the block, then ``end`` (``ROLLBACK`` if the block raised); database failures
        mapped: corruption -> :class:`StoreDamaged`, an unreachable server -> :class:`StoreError`."""
        self.require_intact()
        conn: Connection | None = None
        try:
            conn = self._begun(begin)
            try:
                yield conn
            except BaseException:
                _quietly(conn, "ROLLBACK")
                raise
            conn.execute(end)
        except self.backend.errors as exc:
            if conn is not None:
                _quietly(conn, "ROLLBACK")
            if self.backend.is_corruption(exc):
                raise self._damaged(exc) from None
            if self.backend.unreachable(exc):
                self.close()
                raise StoreError(f"the store {self.location} cannot be used now: {exc}") from None
            if self.backend.busy(exc):  # another process kept the write lock past the busy timeout
                raise StoreError(f"the store {self.location} is busy ({exc}): try again") from None
            raise

    def _begun(self, begin: Callable[[Connection], None]) -> Connection:
        """This thread's connection with ``begin(conn)`` done. A connection kept from an earlier call that
        the server dropped meanwhile (a restart, ``pg_terminate_backend``) fails as it begins, before anything
        ran: it is replaced by a new one and the transaction begun again, once (a webhook is not lost)."""
        local = self._local
        reused = getattr(local, "pid", None) == os.getpid() and getattr(local, "conn", None) is not None
        conn = self._conn()
        try:
            begin(conn)
            return conn
        except self.backend.errors as exc:
            _quietly(conn, "ROLLBACK")  # BEGIN may have run (the write lock timed out): end it
            if not (reused and self.backend.unreachable(exc) and not self.backend.usable(conn)):
                raise
            log.info("store %s: the server dropped this connection (%s); reconnecting", self.location, exc)
            self.close()
        conn = self._conn()
        begin(conn)
        return conn

    def _write(self) -> AbstractContextManager[Connection]:
        """One short write transaction; takes the store's write lock at once (writers queue, none deadlock)."""
        return self._transaction(self.backend.begin_write, "COMMIT")

    def _read(self) -> AbstractContextManager[Connection]:
        """A consistent snapshot for the reads inside the block."""
        return self._transaction(self.backend.begin_read, "COMMIT")

    # --- integrity ---------------------------------------------------------------------------------

    def integrity(self) -> list[str]:
        """The database's quick check of its own pages (SQLite's ``PRAGMA quick_check``, O(size), no index
        cross-check): [] when intact, else what it reports (at most 20 lines). Never raises for a corrupted
        file."""
        try:
            return self.backend.integrity(self._conn())
        except StoreError as exc:
            return [str(exc)]
        except self.backend.errors as exc:
            return [f"quick_check: {exc}"]

    def damage_message(self) -> str:
        """What is wrong with the store and how to recover ("" when intact)."""
        if not self.damage:
            return ""
        found = "; ".join(line.replace("\n", " ") for line in self.damage[:5])
        name = self.path.name if self.path is not None else "the database"
        return (
            f"the annotation store {self.location} is damaged ({found}). Nothing is read from or written to it. "
            f"To recover: stop the backend, move {name} and its -wal/-shm files aside, start again (an "
            "empty store is created), and rebuild it from Label Studio with `labelstudio-maskclip backfill "
            "--project ID` for each project (annotations and their outcomes come back; the list of past "
            "training runs does not)"
        )

    def require_intact(self) -> None:
        """Raise :class:`StoreDamaged` (with :meth:`damage_message`) if the store was found damaged."""
        if self.damage:
            raise StoreDamaged(self.damage_message())

    def _damaged(self, exc: BaseException) -> StoreDamaged:
        self.damage = self.integrity() or [str(exc)]
        message = self.damage_message()
        log.error("%s", message)
        return StoreDamaged(message)

    def _migrate(self) -> None:
        """Apply the schema migrations this store lacks, one opener at a time."""
        try:
            with self._transaction(self.backend.begin_migration, "COMMIT") as conn:
                done = migrate(self.backend, conn)
        except NewerSchema as exc:
            raise StoreError(
                f"{self.location} has {exc}: upgrade labelstudio-maskclip or point the store elsewhere"
            ) from None
        if done:  # a new store gets them all (quietly); an existing one is upgraded (told)
            log.log(logging.DEBUG if done[0] == 1 else logging.INFO, "store %s: migrations %s", self.location, done)

    def schema_version(self) -> int:
        """The newest schema migration applied to this store."""
        with self._read() as conn:
            return applied(conn)

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            _quietly_close(conn)
        self._local = threading.local()

    # --- writes ------------------------------------------------------------------------------------

    @staticmethod
    def _next_seq(conn: Connection) -> int:
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'seq'")
        return int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    @staticmethod
    def _upsert_task(conn: Connection, task: TaskRecord) -> None:
        conn.execute(
            "INSERT INTO tasks(id, project, image, width, height, first_seen) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET project = COALESCE(excluded.project, tasks.project), "
            "image = COALESCE(excluded.image, tasks.image), width = COALESCE(excluded.width, tasks.width), "
            "height = COALESCE(excluded.height, tasks.height)",
            (task.id, task.project, task.image, task.width, task.height, time.time()),
        )

    def put_tasks(self, tasks: Sequence[TaskRecord]) -> int:
        """Record tasks (the unlabeled pool); known fields are kept where the new record lacks them."""
        with self._write() as conn:
            for task in tasks:
                self._upsert_task(conn, task)
        return len(tasks)

    def put_annotation(self, write: AnnotationWrite) -> PutResult:
        """Store an annotation and replace its masks, atomically (one transaction).

        Idempotent (the same content again is a ``duplicate``: nothing changes, the change counter
        included), and ordered: a version whose ``updated_at`` is older than the stored one is ``stale`` and
        dropped; an annotation deleted earlier stays deleted. A ``cancelled`` annotation is stored without
        masks. Outcomes are not content: the same content without them (prediction unknown) keeps the stored
        outcomes; with other outcomes than stored, only the outcomes are replaced (``outcomes``: the change
        counter does not move, so it does not count toward training again).
        """
        rows = [] if write.cancelled else _encoded(write)  # encode before taking the lock
        digest = _content_hash(write, rows)
        new_ts = _timestamp(write.updated_at)
        with self._write() as conn:
            settled = self._against_stored(conn, write, digest, new_ts)
            if settled is not None:
                return settled
            self._upsert_task(conn, write.task)
            seq = self._next_seq(conn)
            self._replace_annotation(conn, write, rows, digest, new_ts, seq)
        return PutResult("stored", write.id, seq)

    def _against_stored(
        self, conn: Connection, write: AnnotationWrite, digest: str, new_ts: float | None
    ) -> PutResult | None:
        """What becomes of ``write`` given the stored version: ``deleted``, ``stale``, ``duplicate`` or
        ``outcomes`` (settled: nothing more to write), or None (store it)."""
        old = conn.execute(
            "SELECT deleted, updated_ts, content_hash FROM annotations WHERE id = ?", (write.id,)
        ).fetchone()
        if old is None:
            return None
        if old[0]:
            return PutResult("deleted", write.id)
        if old[1] is not None and new_ts is not None and new_ts < old[1]:
            return PutResult("stale", write.id)
        if old[2] == digest:
            return PutResult(self._record_outcomes(conn, write), write.id)
        return None

    @staticmethod
    def _replace_annotation(
        conn: Connection, write: AnnotationWrite, rows: Sequence[tuple], digest: str, new_ts: float | None, seq: int
    ) -> None:
        """Write the annotation's row (inserted or replaced), its masks and its outcomes."""
        conn.execute("DELETE FROM masks WHERE annotation_id = ?", (write.id,))
        conn.execute("DELETE FROM outcomes WHERE annotation_id = ?", (write.id,))
        values = (
            write.id, write.task.id, write.task.project, write.author, int(bool(write.ground_truth)),
            write.parent_prediction, None if write.accepted_unchanged is None else int(write.accepted_unchanged),
            int(bool(write.cancelled)), 0, write.updated_at, new_ts, digest, seq, write.height, write.width,
            len(rows), time.time(),
        )  # fmt: skip
        conn.execute(_UPSERT_ANNOTATION, values)
        conn.executemany(
            "INSERT INTO masks(annotation_id, label, source, height, width, area, counts) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(write.id, *row) for row in rows],
        )
        if not write.cancelled:
            conn.executemany(
                "INSERT INTO outcomes(annotation_id, region_id, label, outcome) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (annotation_id, region_id, label) DO UPDATE SET outcome = excluded.outcome",
                [(write.id, *outcome) for outcome in write.outcomes],
            )

    @staticmethod
    def _record_outcomes(conn: Connection, write: AnnotationWrite) -> str:
        """For a write whose content is already stored: ``duplicate``, or ``outcomes`` after replacing the
        stored outcomes with the write's when it knows them and they differ."""
        if write.cancelled or (write.accepted_unchanged is None and not write.outcomes):
            return "duplicate"  # prediction unknown here: whatever was learnt about it stays
        stored = conn.execute("SELECT accepted_unchanged FROM annotations WHERE id = ?", (write.id,)).fetchone()[0]
        known = conn.execute(
            "SELECT region_id, label, outcome FROM outcomes WHERE annotation_id = ?", (write.id,)
        ).fetchall()
        new = sorted({tuple(o) for o in write.outcomes})
        same_flag = write.accepted_unchanged is None or (
            stored is not None and bool(stored) == bool(write.accepted_unchanged)
        )
        if same_flag and sorted(known) == new:
            return "duplicate"
        if write.accepted_unchanged is not None:
            conn.execute(
                "UPDATE annotations SET accepted_unchanged = ? WHERE id = ?",
                (int(bool(write.accepted_unchanged)), write.id),
            )
        conn.execute("DELETE FROM outcomes WHERE annotation_id = ?", (write.id,))
        conn.executemany(
            "INSERT INTO outcomes(annotation_id, region_id, label, outcome) VALUES (?, ?, ?, ?)",
            [(write.id, *o) for o in new],
        )
        return "outcomes"

    def delete_annotations(self, ids: Sequence[int]) -> int:
        """Delete annotations (masks and outcomes go; a tombstone row stays). Returns how many were live.

        Only annotations stored here get a tombstone: ids never seen are skipped, so made-up ids cannot
        grow the store or later drop a real annotation that happens to get that id. The tombstones are
        thus bounded by the annotations ever stored (one row each, no masks).
        """
        live = 0
        with self._write() as conn:
            for annotation_id in ids:
                row = conn.execute("SELECT deleted FROM annotations WHERE id = ?", (annotation_id,)).fetchone()
                if row is None or row[0]:
                    continue
                live += 1
                seq = self._next_seq(conn)
                conn.execute("DELETE FROM masks WHERE annotation_id = ?", (annotation_id,))
                conn.execute("DELETE FROM outcomes WHERE annotation_id = ?", (annotation_id,))
                conn.execute(
                    "UPDATE annotations SET deleted = 1, seq = ?, mask_count = 0, content_hash = NULL WHERE id = ?",
                    (seq, annotation_id),
                )
        return live

    def put_state(self, key: str, value: str) -> None:
        """Set the shared value ``key`` (one row, replaced; committed when this returns)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO shared_state(key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, value, time.time()),
            )

    def get_state(self, key: str) -> str | None:
        """The shared value ``key``, or None if it was never set."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM shared_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def current_seq(self) -> int:
        """The change counter now: pass it to :meth:`mark_trained` after training on what was there."""
        with self._read() as conn:
            return int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def mark_trained(
        self,
        *,
        seq: int | None = None,
        project: int | None = None,
        model_version: str = "",
        metrics: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a training run that saw every change up to ``seq`` (default: now). Returns the run id."""
        with self._write() as conn:
            if seq is None:
                seq = int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
            row = conn.execute(
                "INSERT INTO training_runs(project, seq, model_version, metrics, finished_at) VALUES (?, ?, ?, ?, ?) "
                "RETURNING id",
                (project, seq, model_version, json.dumps(dict(metrics or {})), time.time()),
            ).fetchone()
            return int(row[0])

    # --- reads -------------------------------------------------------------------------------------

    def count_since_last_training(self, project: int | None = None) -> int:
        """Live, not cancelled annotations (of ``project``, or all) stored or changed since the last
        :meth:`mark_trained` for the same ``project`` value."""
        with self._read() as conn:
            same = "project IS NULL" if project is None else "project = ?"
            last = conn.execute(
                f"SELECT COALESCE(MAX(seq), 0) FROM training_runs WHERE {same}", () if project is None else (project,)
            ).fetchone()[0]
            where, params = _project_filter(project)
            return int(
                conn.execute(
                    f"SELECT COUNT(*) FROM annotations WHERE deleted = 0 AND cancelled = 0 AND seq > ?{where}",
                    (last, *params),
                ).fetchone()[0]
            )

    def training_runs(self, project: int | None = None) -> list[dict[str, Any]]:
        """Recorded training runs, oldest first."""
        where, params = _project_filter(project)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT id, project, seq, model_version, metrics, finished_at FROM training_runs WHERE 1 = 1{where} "
                "ORDER BY id",
                params,
            ).fetchall()
        return [
            {
                "id": r[0],
                "project": r[1],
                "seq": r[2],
                "model_version": r[3],
                "metrics": json.loads(r[4]),
                "finished_at": r[5],
            }
            for r in rows
        ]

    def _chosen_annotations(self, conn: Connection, project: int | None) -> list[tuple]:
        """Per task, the annotation to learn from: ground truth first, then the latest, then highest id."""
        where, params = _project_filter(project)
        return conn.execute(
            "SELECT a.id, a.task_id FROM ("
            "  SELECT id, task_id, ROW_NUMBER() OVER (PARTITION BY task_id ORDER BY ground_truth DESC, "
            "    COALESCE(updated_ts, 0) DESC, id DESC) AS rank"
            f"  FROM annotations WHERE deleted = 0 AND cancelled = 0 AND task_id IS NOT NULL{where}"
            ") a WHERE a.rank = 1 ORDER BY a.task_id",
            params,
        ).fetchall()

    def accepted_samples(self, project: int | None = None) -> Iterator[Sample]:
        """One :class:`Sample` per task with a live, not cancelled annotation, ordered by task id.

        With several annotations on a task, the ground-truth one wins, then the latest. Masks are merged per
        label across regions. Tasks whose image size was never seen (an empty annotation, no regions) are
        left out. Reads in small snapshots: safe while writers run.
        """
        with self._read() as conn:
            chosen = self._chosen_annotations(conn, project)
        for annotation_id, _ in chosen:
            sample = self._sample(annotation_id)
            if sample is not None:
                yield sample

    def _sample(self, annotation_id: int) -> Sample | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT a.task_id, a.project, t.image, COALESCE(a.height, t.height), COALESCE(a.width, t.width), "
                "a.ground_truth, a.author FROM annotations a JOIN tasks t ON t.id = a.task_id "
                "WHERE a.id = ? AND a.deleted = 0 AND a.cancelled = 0",
                (annotation_id,),
            ).fetchone()
            masks = conn.execute(
                "SELECT label, height, width, counts FROM masks WHERE annotation_id = ?", (annotation_id,)
            ).fetchall()
        if row is None or row[3] is None or row[4] is None:
            return None
        decoded = {label: coco_rle_to_mask({"size": [h, w], "counts": counts}) for label, h, w, counts in masks}
        return Sample(
            task_id=row[0],
            annotation_id=annotation_id,
            project=row[1],
            image=row[2] or "",
            height=int(row[3]),
            width=int(row[4]),
            masks=decoded,
            ground_truth=bool(row[5]),
            author=row[6],
        )

    def unlabeled_tasks(self, project: int | None = None) -> Iterator[TaskRecord]:
        """Tasks with no live, not cancelled annotation (skipped tasks included), ordered by id."""
        where, params = _project_filter(project)
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, project, image, width, height FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM annotations a "
                f"WHERE a.task_id = t.id AND a.deleted = 0 AND a.cancelled = 0){where} ORDER BY id",
                params,
            ).fetchall()
        for row in rows:
            yield TaskRecord(*row)

    def projects(self) -> list[int]:
        """Ids of the Label Studio projects whose tasks the store has seen, ascending."""
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT project FROM tasks WHERE project IS NOT NULL ORDER BY project")
            return [int(row[0]) for row in rows.fetchall()]

    def labels(self, project: int | None = None) -> list[str]:
        """Labels of the live accepted masks, sorted (read from the index, no mask is decoded)."""
        where, params = _project_filter(project, "a.project")
        with self._read() as conn:
            rows = conn.execute(
                "SELECT DISTINCT m.label FROM masks m JOIN annotations a ON a.id = m.annotation_id "
                f"WHERE a.deleted = 0 AND a.cancelled = 0{where}",
                params,
            ).fetchall()
        return sorted(row[0] for row in rows)  # by code point on both databases (whatever their collation)

    def acceptance_stats(self, project: int | None = None) -> dict[str, dict[str, int]]:
        """Per label, how predicted regions fared: ``{label: {"unchanged", "edited", "deleted", "added"}}``.

        Counted over live annotations whose prediction was known. Also ``"(annotations)"``: whole
        annotations ``unchanged`` / ``edited`` vs their prediction, and ``unknown`` (no prediction seen).
        """
        stats: dict[str, dict[str, int]] = {}
        where, params = _project_filter(project, "a.project")
        with self._read() as conn:
            rows = conn.execute(
                "SELECT o.label, o.outcome, COUNT(*) FROM outcomes o JOIN annotations a ON a.id = o.annotation_id "
                f"WHERE a.deleted = 0{where} GROUP BY o.label, o.outcome",
                params,
            ).fetchall()
            where, params = _project_filter(project)
            whole = conn.execute(
                "SELECT accepted_unchanged, COUNT(*) FROM annotations WHERE deleted = 0 AND cancelled = 0 "
                f"AND task_id IS NOT NULL{where} GROUP BY accepted_unchanged",
                params,
            ).fetchall()
        for label, outcome, count in rows:
            stats.setdefault(label, dict.fromkeys(OUTCOMES, 0))[outcome] = int(count)
        summary = {"unchanged": 0, "edited": 0, "unknown": 0}
        for flag, count in whole:
            summary["unknown" if flag is None else ("unchanged" if flag else "edited")] += int(count)
        stats["(annotations)"] = summary
        return stats

    def annotation(self, annotation_id: int) -> dict[str, Any] | None:
        """The stored row of one annotation (``None`` if never seen), with its masks' labels: for logs/tests."""
        with self._read() as conn:
            cursor = conn.execute("SELECT * FROM annotations WHERE id = ?", (annotation_id,))
            row = cursor.fetchone()
            if row is None:
                return None
            names = [d[0] for d in cursor.description]
            labels = sorted(
                r[0] for r in conn.execute("SELECT label FROM masks WHERE annotation_id = ?", (annotation_id,))
            )
        return {**dict(zip(names, row)), "labels": labels}

    def check(self) -> list[str]:
        """Consistency problems (empty list = healthy): SQLite's integrity check and mask counts."""
        problems: list[str] = []
        with self._read() as conn:
            problems += [f"integrity_check: {r}" for r in self.backend.integrity(conn, quick=False)]
            for annotation_id, expected, actual in conn.execute(
                "SELECT a.id, a.mask_count, (SELECT COUNT(*) FROM masks m WHERE m.annotation_id = a.id) "
                "FROM annotations a ORDER BY a.id"
            ).fetchall():
                if expected != actual:
                    problems.append(f"annotation {annotation_id}: mask_count {expected} but {actual} masks rows")
            for (orphan,) in conn.execute(
                "SELECT DISTINCT annotation_id FROM masks WHERE annotation_id NOT IN (SELECT id FROM annotations) "
                "ORDER BY annotation_id"
            ):
                problems.append(f"masks of unknown annotation {orphan}")
        return problems


@functools.lru_cache(maxsize=8)
def _shared(location: str) -> Store:
    return Store(location)


def shared_store(settings: Settings) -> Store | None:
    """The process's one :class:`Store` for the settings' PostgreSQL store (opened once per URL), or None
    when the store is SQLite (one machine: what every instance must see then lives in files)."""
    return _shared(settings.store_url) if is_postgres(settings.store_url) else None
