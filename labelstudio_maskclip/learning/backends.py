"""Where the store's tables live: an SQLite file (embedded, the default) or a PostgreSQL server.

:class:`~labelstudio_maskclip.learning.store.Store` writes one SQL text for both; what differs between the
two dialects lives here and nowhere else:

- connecting (SQLite: WAL mode, ``synchronous``, ``busy_timeout``, foreign keys; PostgreSQL: psycopg 3 in
  autocommit mode, transactions opened by hand like SQLite's);
- placeholders (``?`` here, ``%s`` for psycopg: :class:`Connection` translates);
- column types in the schema (:meth:`Backend.types`: ``{int}``, ``{real}``, ``{serial}``);
- how a write transaction serialises with the others: SQLite's ``BEGIN IMMEDIATE`` takes the one write
  lock at once; PostgreSQL takes a transaction-level advisory lock of the store (:data:`WRITE_KEY`), so
  writers queue the same way (each read-check-write of an annotation runs alone) and no retry loop is needed;
- a read snapshot (SQLite: ``BEGIN``; PostgreSQL: ``REPEATABLE READ READ ONLY``);
- what a failure means: a corrupted file (SQLite) or a server that cannot be reached (PostgreSQL);
- the integrity check (SQLite's ``quick_check`` / ``integrity_check``; PostgreSQL checks its own pages).

A location is a path (a directory, the file is ``annotations.sqlite3`` in it; or a ``.sqlite3`` / ``.sqlite``
/ ``.db`` file), ``sqlite:///path`` (as SQLAlchemy writes it: three slashes, then a relative path, or a fourth
for an absolute one), or ``postgresql://user:password@host:port/database`` (``postgres://`` too; libpq's
query parameters such as ``?host=/socket/dir`` pass through).
"""

from __future__ import annotations

import functools
import hashlib
import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..errors import Unavailable

__all__ = [
    "Backend",
    "Connection",
    "SQLiteBackend",
    "PostgresBackend",
    "open_backend",
    "is_postgres",
    "advisory_key",
    "sqlite_path",
    "sqlite_corruption",
    "hide_password",
    "hide_secrets",
    "normalised_url",
    "postgres_connect",
    "ConnectFailed",
    "CONNECTION_DEFAULTS",
    "DB_FILE_NAME",
    "WRITE_KEY",
    "MIGRATION_KEY",
]

DB_FILE_NAME = "annotations.sqlite3"
_SQLITE_SUFFIXES = (".sqlite3", ".sqlite", ".db")
_POSTGRES_SCHEMES = ("postgresql", "postgres")


#: seconds a new PostgreSQL connection may take (unless the URL sets ``connect_timeout``)
CONNECT_TIMEOUT_S = 10
#: libpq settings of every PostgreSQL connection unless the URL sets them: TCP keepalives, so that a server
#: or network that went away is noticed within about a minute instead of the system's two hours
CONNECTION_DEFAULTS: dict[str, int] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def advisory_key(name: str) -> int:
    """A PostgreSQL advisory lock key (signed 64 bits) for ``name``, the same in every process."""
    digest = hashlib.sha256(f"labelstudio-maskclip:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: the store's write lock (every write transaction takes it, see the module docstring)
WRITE_KEY = advisory_key("store-write")
#: held while the schema is migrated, so that two instances starting at once migrate one after the other
MIGRATION_KEY = advisory_key("store-migrate")


def is_postgres(location: str | Path | None) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) URL."""
    return isinstance(location, str) and location.split("://", 1)[0].lower() in _POSTGRES_SCHEMES and "://" in location


def normalised_url(url: str) -> str:
    """``url`` with its scheme in lower case (libpq reads ``POSTGRESQL://`` as a ``key=value`` string and
    quotes all of it, password included, in its error)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.lower()}{sep}{rest}" if sep else url


def _url_parts(url: str) -> tuple[str, str, str, str]:
    """``url`` as (``scheme://``, user info, ``host:port``, the rest), by hand: a URL urllib refuses (an
    unclosed ``[``) still has a password to hide. The user info ends at the authority's last ``@``."""
    scheme, sep, rest = url.partition("://")
    authority, tail = re.match(r"([^/?#]*)(.*)", rest, re.DOTALL).groups()  # type: ignore[union-attr]
    userinfo, _, hostport = authority.rpartition("@")
    return f"{scheme}{sep}", userinfo, hostport, tail


_PASSWORD_PARAM = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def hide_password(url: str) -> str:
    """``url`` with its password (``user:password@`` and ``password=`` query parameters) replaced by ``***``
    (for messages and logs)."""
    scheme, userinfo, hostport, tail = _url_parts(url)
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    at = "@" if userinfo else ""
    return f"{scheme}{userinfo}{at}{hostport}" + _PASSWORD_PARAM.sub(r"\1***", tail)


def hide_secrets(text: str, url: str) -> str:
    """``text`` (a message that may quote ``url``, e.g. libpq's) with every piece of ``url``'s password
    replaced by ``***``: the password as written and decoded, and each part of one with an unencoded ``@``
    (libpq splits it at the first ``@``, urllib at the last)."""
    _, userinfo, _, tail = _url_parts(url)
    secrets = [m.group(2) for m in _PASSWORD_PARAM.finditer(tail)]
    if ":" in userinfo:
        raw = userinfo.split(":", 1)[1]
        secrets += [raw, unquote(raw), *raw.split("@")]
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class ConnectFailed(Unavailable):
    """A PostgreSQL connection could not be opened; the message never holds the password."""

    subject = "annotation store unavailable"


def postgres_connect(url: str, *, application_name: str, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> Any:
    """A psycopg connection to ``url`` in autocommit mode with :data:`CONNECTION_DEFAULTS` (a connect timeout,
    TCP keepalives: a dead server or network is noticed) unless the URL sets them. Raises
    :class:`ConnectFailed` (the password hidden from libpq's message)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    url = normalised_url(url)
    try:
        given = set(conninfo_to_dict(url))
    except psycopg.Error:  # libpq's parse error quotes the URL: never shown
        raise ConnectFailed(f"the store URL cannot be parsed: {hide_password(url)}") from None
    defaults = {**CONNECTION_DEFAULTS, "connect_timeout": connect_timeout_s}
    options: dict[str, Any] = {k: v for k, v in defaults.items() if k not in given}
    try:
        return psycopg.connect(url, autocommit=True, application_name=application_name, **options)
    except psycopg.Error as exc:
        raise ConnectFailed(hide_secrets(str(exc), url)) from None


class Connection:
    """One database connection with the DB-API calls the store uses, ``?`` placeholders on both backends."""

    def __init__(self, raw: Any, *, pyformat: bool) -> None:
        self.raw = raw
        self._pyformat = pyformat

    def _sql(self, statement: str) -> str:
        return _to_pyformat(statement) if self._pyformat else statement

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns the cursor (``fetchone``, ``fetchall``, ``description``, iteration)."""
        if self._pyformat:
            return self.raw.cursor().execute(self._sql(statement), tuple(params))
        return self.raw.execute(statement, tuple(params))

    def executemany(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            cursor = self.raw.cursor()
            cursor.executemany(self._sql(statement), rows)

    def close(self) -> None:
        self.raw.close()


@functools.lru_cache(maxsize=256)
def _to_pyformat(statement: str) -> str:
    """``?`` -> ``%s`` (the store's SQL has no ``?`` or ``%`` inside string literals)."""
    return statement.replace("%", "%%").replace("?", "%s")


class Backend:
    """What differs between the two databases (see the module docstring)."""

    name = ""
    #: the database's own error classes: anything else a call raises is not the database's
    errors: tuple[type[BaseException], ...] = ()

    def describe(self) -> str:
        """Where the store is, for messages (no password)."""
        raise NotImplementedError

    def connect(self) -> Connection:
        raise NotImplementedError

    def usable(self, conn: Connection) -> bool:
        """False when ``conn`` was broken (the server went away): the store opens a new one."""
        return True

    def types(self) -> dict[str, str]:
        """Column types by the schema's placeholder names."""
        raise NotImplementedError

    def begin_write(self, conn: Connection) -> None:
        raise NotImplementedError

    def begin_read(self, conn: Connection) -> None:
        raise NotImplementedError

    def begin_migration(self, conn: Connection) -> None:
        """A write transaction that also keeps every other opener out until it ends."""
        self.begin_write(conn)

    def is_corruption(self, exc: BaseException) -> bool:
        """True when ``exc`` says the stored data are damaged (not merely unreachable)."""
        return False

    def unreachable(self, exc: BaseException) -> bool:
        """True when ``exc`` says the database cannot be reached now (a 503, try again later)."""
        return False

    def busy(self, exc: BaseException) -> bool:
        """True when ``exc`` says another writer held the database past the busy timeout (a 503, try again)."""
        return False

    def integrity(self, conn: Connection, quick: bool = True) -> list[str]:
        """What the database finds wrong with its own pages ([] = intact)."""
        return []


_CORRUPTION_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


def sqlite_corruption(exc: BaseException) -> bool:
    """True when an SQLite error says the file is corrupted (by its primary result code when present)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPTION_CODES
    return type(exc) is sqlite3.DatabaseError  # "database disk image is malformed", "file is not a database"


class SQLiteBackend(Backend):
    """One SQLite file in WAL mode (see :mod:`~labelstudio_maskclip.learning.store` on durability)."""

    name = "sqlite"
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0, synchronous: str = "FULL") -> None:
        self.path = path
        self.busy_ms = int(busy_timeout_s * 1000)
        self.synchronous = synchronous.upper()

    def describe(self) -> str:
        return str(self.path)

    def connect(self) -> Connection:
        raw = sqlite3.connect(self.path, timeout=self.busy_ms / 1000, isolation_level=None)
        raw.execute(f"PRAGMA busy_timeout = {self.busy_ms}")
        mode = raw.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raw.close()
            raise sqlite3.OperationalError(f"SQLite refused WAL mode (journal_mode={mode}); use a local disk")
        raw.execute(f"PRAGMA synchronous = {self.synchronous}")
        raw.execute("PRAGMA foreign_keys = ON")
        return Connection(raw, pyformat=False)

    def types(self) -> dict[str, str]:
        return {"int": "INTEGER", "real": "REAL", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT"}

    def begin_write(self, conn: Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def begin_read(self, conn: Connection) -> None:
        conn.execute("BEGIN")

    def is_corruption(self, exc: BaseException) -> bool:
        return sqlite_corruption(exc)

    def busy(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    def integrity(self, conn: Connection, quick: bool = True) -> list[str]:
        statement = "PRAGMA quick_check(20)" if quick else "PRAGMA integrity_check"
        rows = [str(r[0]) for r in conn.execute(statement)]
        return [] if rows == ["ok"] else rows


class PostgresBackend(Backend):
    """A PostgreSQL database reached with psycopg 3 (imported on first use: SQLite needs none of it)."""

    name = "postgresql"

    def __init__(self, url: str, *, lock_timeout_s: float = 30.0, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> None:
        import psycopg

        self.url = normalised_url(url)
        self.lock_ms = int(lock_timeout_s * 1000)
        self.connect_timeout_s = connect_timeout_s
        self._psycopg = psycopg
        self.errors = (psycopg.Error, ConnectFailed)

    def describe(self) -> str:
        return hide_password(self.url)

    def connect(self) -> Connection:
        raw = postgres_connect(
            self.url, application_name="labelstudio-maskclip", connect_timeout_s=self.connect_timeout_s
        )
        raw.execute(f"SET lock_timeout = {self.lock_ms}")  # a writer waits this long for the write lock, as SQLite's
        return Connection(raw, pyformat=True)

    def usable(self, conn: Connection) -> bool:
        return not (conn.raw.closed or conn.raw.broken)

    def types(self) -> dict[str, str]:
        return {
            "int": "BIGINT",
            "real": "DOUBLE PRECISION",
            "serial": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        }

    def begin_write(self, conn: Connection) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_KEY,))

    def begin_read(self, conn: Connection) -> None:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def begin_migration(self, conn: Connection) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_KEY,))
        conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_KEY,))

    def unreachable(self, exc: BaseException) -> bool:
        return isinstance(exc, (self._psycopg.OperationalError, ConnectFailed))


def sqlite_path(location: str | Path) -> Path:
    """The SQLite file of a location that is not a PostgreSQL URL (see the module docstring)."""
    text = str(location)
    if text.lower().startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif "://" in text:
        raise ValueError(f"{text!r}: the store is a path, sqlite:///path or postgresql://...")
    path = Path(text)
    return path if path.suffix in _SQLITE_SUFFIXES else path / DB_FILE_NAME


def open_backend(location: str | Path, *, busy_timeout_s: float = 30.0, synchronous: str = "FULL") -> Backend:
    """The backend of ``location`` (nothing is connected yet)."""
    if is_postgres(location):
        return PostgresBackend(str(location), lock_timeout_s=busy_timeout_s)
    return SQLiteBackend(sqlite_path(location), busy_timeout_s=busy_timeout_s, synchronous=synchronous)
