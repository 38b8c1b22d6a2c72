"""A real PostgreSQL server for the tests, started the way the tests start Label Studio.

:func:`started` runs ``initdb`` into a fresh temporary folder and ``pg_ctl start`` with the server listening
on a unix socket in that folder and on a free loopback port; trust authentication for the one role
``maskclip`` (a superuser), nothing reachable from outside this machine. PostgreSQL refuses to run as root,
so when the tests run as root its programs run as an unprivileged user (``postgres`` if the system has one,
else ``nobody``) through ``runuser``, and the folder is handed to that user.

The programs are found on ``PATH`` or under ``/usr/lib/postgresql/<version>/bin`` (Debian's layout; the
setup step ``make install-postgres`` / ``scripts/install-postgres.sh`` installs them). Nothing skips: when
PostgreSQL cannot be found or started, every test that needs it fails with the reason.

Fixtures (imported by ``tests/conftest.py``): ``postgres`` (the session's server), ``postgres_url`` (a fresh
database per test, dropped after it) and ``store_url`` (parametrized: each store test runs on SQLite and on
PostgreSQL).

One server for many sessions: ``python -m tests.postgres`` starts one, prints ``MASKCLIP_TEST_POSTGRES=DIR:PORT``
and keeps it until interrupted; a test session run with that variable in its environment uses that server
instead of starting its own (each test still gets a fresh database, dropped after it). Mutation testing runs
a new session per mutant (docs/mutation.md): a server per session would cost seconds each.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROLE = "maskclip"
#: ``DIR:PORT`` of a server already running (started by ``python -m tests.postgres``) for the session to use
SHARED_SERVER_VARIABLE = "MASKCLIP_TEST_POSTGRES"
_databases = itertools.count(1)


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started; the message says what to do."""


def bin_dir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else the newest ``/usr/lib/postgresql/*/bin``."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin): "
            "run `make install-postgres` (bash scripts/install-postgres.sh)"
        )
    return candidates[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runner() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs PostgreSQL's programs, and the user it runs them as (None: ourselves)."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["runuser", "-u", name, "--"], user
    raise PostgresUnavailable("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


@dataclass
class PostgresServer:
    """A running server: connect through :meth:`url` (unix socket) or :meth:`tcp_url` (loopback port)."""

    root: Path
    port: int
    bin: Path
    prefix: list[str]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@/{database}?host={self.root}&port={self.port}"

    def tcp_url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement as the superuser (autocommit: CREATE / DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]  # a test's own literal SQL

    def create_database(self) -> str:
        """A new empty database; returns its socket URL."""
        name = f"test_{os.getpid()}_{next(_databases)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {database_of(url)} WITH (FORCE)")

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"


def _run(cmd: list[str], what: str, timeout: float) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise PostgresUnavailable(f"{what} failed ({result.returncode}): {result.stderr.strip() or result.stdout}")


@contextlib.contextmanager
def started(timeout: float = 120.0) -> Iterator[PostgresServer]:
    """A fresh server for the block; stopped (immediately) and removed after it."""
    binaries = bin_dir()
    prefix, user = _runner()
    root = Path(tempfile.mkdtemp(prefix="maskclip-pg-"))  # short: a socket path has at most 107 bytes
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    server = PostgresServer(root, _free_port(), binaries, prefix)
    data = root / "data"
    try:
        _run(prefix + [str(binaries / "initdb"), "-D", str(data), "-U", ROLE, "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-sync"], "initdb", timeout)  # fmt: skip
        options = (f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={root} "
                   "-c max_connections=300")  # fmt: skip
        _run(prefix + [str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                       "-w", "-t", str(int(timeout)), "start"], "pg_ctl start", timeout + 10)  # fmt: skip
    except (PostgresUnavailable, OSError, subprocess.TimeoutExpired) as e:
        log = server.log()
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailable(f"PostgreSQL did not start: {e}\n{log}") from None
    try:
        yield server
    finally:
        subprocess.run(prefix + [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def database_of(url: str) -> str:
    """The database a URL of :meth:`PostgresServer.url` names."""
    return url.split("/")[3].split("?")[0]


def shared(address: str) -> PostgresServer:
    """The running server at ``address`` (``DIR:PORT``, as :func:`main` prints it), checked to answer."""
    import psycopg

    root, _, port = address.rpartition(":")
    if not root or not port.isdigit():
        raise PostgresUnavailable(f"{SHARED_SERVER_VARIABLE}={address!r}: expected DIR:PORT (python -m tests.postgres)")
    server = PostgresServer(Path(root), int(port), bin_dir(), _runner()[0])
    try:
        server.sql("SELECT 1")
    except psycopg.Error as e:
        raise PostgresUnavailable(f"{SHARED_SERVER_VARIABLE}={address!r}: no server answers there: {e}") from None
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started on first use, a few seconds), or the running one that
    :data:`SHARED_SERVER_VARIABLE` names (left running)."""
    address = os.environ.get(SHARED_SERVER_VARIABLE)
    try:
        if address:
            yield shared(address)
            return
        with started() as server:
            yield server
    except PostgresUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server (socket URL), dropped after the test."""
    url = postgres.create_database()
    yield url
    with contextlib.suppress(Exception):  # a test may still hold connections: FORCE ends them
        postgres.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's store lives: a fresh SQLite ``MODEL_DIR`` (a plain path, the default) or a fresh
    PostgreSQL database: the same test runs against both."""
    if request.param == "sqlite":
        return str(tmp_path / "model_dir")
    return request.getfixturevalue("postgres_url")


def main() -> None:
    """Start a server, print the variable that points test sessions at it, keep it until interrupted. It
    does not flush to disk (``fsync``, ``full_page_writes`` off): no test stops the server itself, and a test's
    database is made and dropped in a fraction of the time (a second or more under load, per test)."""
    with started() as server:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            server.sql(f"ALTER SYSTEM SET {setting} = off")
        server.sql("SELECT pg_reload_conf()")
        print(f"{SHARED_SERVER_VARIABLE}={server.root}:{server.port}", flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
