"""Versioned schema migrations of the store, the same numbered list for SQLite and PostgreSQL.

Each :class:`Migration` is one SQL text with column-type placeholders (``{int}``, ``{real}``, ``{serial}``)
that the backend fills in (:meth:`~labelstudio_maskclip.learning.backends.Backend.types`). The table
``schema_version(version, summary, applied_at)`` holds one row per migration applied. :func:`migrate` runs
at every open, in one transaction that keeps every other opener out (SQLite: the write lock; PostgreSQL: an
advisory lock), so two instances starting at once migrate one after the other and the second finds nothing
left to do. Every statement is idempotent (``IF NOT EXISTS``, ``ON CONFLICT DO NOTHING``) as a second guard.

Stores made before this table existed (SQLite only, schema 1 in ``PRAGMA user_version``) already hold
migration 1's tables: it runs again as a no-op and is recorded. SQLite's ``user_version`` follows the
newest migration, so older code, which reads only that, refuses a newer store rather than misreading it.

Add a migration by appending to :data:`MIGRATIONS` (never edit one that has shipped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import Unavailable
from .backends import Backend, Connection

__all__ = ["Migration", "MIGRATIONS", "SCHEMA_VERSION", "migrate", "applied", "NewerSchema"]


class NewerSchema(Unavailable):
    """The store was migrated by newer code than this; the message names both versions (the store reports it
    as a :class:`~labelstudio_maskclip.learning.store.StoreError`)."""


@dataclass(frozen=True)
class Migration:
    number: int
    summary: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tasks, annotations (tombstones), masks, outcomes, training runs, the change counter",
        """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value {int} NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id {int} PRIMARY KEY, project {int}, image TEXT, width {int}, height {int},
    first_seen {real} NOT NULL);
CREATE TABLE IF NOT EXISTS annotations (
    id {int} PRIMARY KEY, task_id {int}, project {int}, author TEXT,
    ground_truth INTEGER NOT NULL DEFAULT 0, parent_prediction {int}, accepted_unchanged INTEGER,
    cancelled INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT, updated_ts {real}, content_hash TEXT, seq {int} NOT NULL,
    height INTEGER, width INTEGER, mask_count INTEGER NOT NULL DEFAULT 0, stored_at {real} NOT NULL);
CREATE INDEX IF NOT EXISTS annotations_task ON annotations(task_id);
CREATE TABLE IF NOT EXISTS masks (
    annotation_id {int} NOT NULL REFERENCES annotations(id) ON DELETE CASCADE, label TEXT NOT NULL,
    source TEXT NOT NULL, height INTEGER NOT NULL, width INTEGER NOT NULL, area INTEGER NOT NULL,
    counts TEXT NOT NULL, PRIMARY KEY (annotation_id, label));
CREATE TABLE IF NOT EXISTS outcomes (
    annotation_id {int} NOT NULL REFERENCES annotations(id) ON DELETE CASCADE, region_id TEXT NOT NULL,
    label TEXT NOT NULL, outcome TEXT NOT NULL, PRIMARY KEY (annotation_id, region_id, label));
CREATE TABLE IF NOT EXISTS training_runs (
    id {serial}, project {int}, seq {int} NOT NULL, model_version TEXT,
    metrics TEXT, finished_at {real} NOT NULL);
INSERT INTO meta(key, value) VALUES ('seq', 0) ON CONFLICT (key) DO NOTHING;
""",
    ),
    Migration(
        2,
        "shared state: the served-version pointer and the re-scoring status, for every instance",
        "CREATE TABLE IF NOT EXISTS shared_state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at {real} NOT NULL)",
    ),
)

#: the newest migration's number: the schema this code reads and writes
SCHEMA_VERSION = MIGRATIONS[-1].number

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, summary TEXT, applied_at {real} NOT NULL)"
)


def applied(conn: Connection) -> int:
    """The newest migration recorded in ``schema_version`` (0 for none)."""
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def _statements(sql: str, backend: Backend) -> list[str]:
    return [s.strip() for s in sql.format(**backend.types()).split(";") if s.strip()]


def migrate(backend: Backend, conn: Connection) -> list[int]:
    """Bring the schema up to :data:`SCHEMA_VERSION` inside the caller's migration transaction
    (:meth:`~labelstudio_maskclip.learning.backends.Backend.begin_migration`). Returns the numbers applied
    now ([] when up to date); :class:`NewerSchema` when the store is ahead of this code."""
    for statement in _statements(_VERSION_TABLE, backend):
        conn.execute(statement)
    current = applied(conn)
    if backend.name == "sqlite":
        current = max(current, _legacy_sqlite_version(conn))
    if current > SCHEMA_VERSION:
        raise NewerSchema(f"schema version {current}, newer than this code's {SCHEMA_VERSION}")
    done = []
    for migration in MIGRATIONS:
        if migration.number <= applied(conn):
            continue
        for statement in _statements(migration.sql, backend):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version(version, summary, applied_at) VALUES (?, ?, ?)",
            (migration.number, migration.summary, time.time()),
        )
        done.append(migration.number)
    if backend.name == "sqlite":
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return done


def _legacy_sqlite_version(conn: Connection) -> int:
    """SQLite's ``user_version``: the schema version before ``schema_version`` existed (and the one older
    code checks)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])
