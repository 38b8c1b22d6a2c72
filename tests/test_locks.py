"""Run locks (single flight of training and re-scoring), on both stores: a file lock beside the SQLite store,
a PostgreSQL advisory lock with a PostgreSQL store. A second acquirer is refused while the first holds it and
granted once the holder lets go or its process is killed (-9)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from labelstudio_maskclip.learning.locks import AdvisoryLock, FileLock, run_lock
from labelstudio_maskclip.learning.store import StoreError
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import rescoring, trigger
from labelstudio_maskclip.training.job import TrainJob
from labelstudio_maskclip.training.train import run_job
from tests.postgres import database_of

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from labelstudio_maskclip.learning.locks import run_lock
    from labelstudio_maskclip.settings import Settings
    held = run_lock(Settings(model_dir={model_dir!r}, store_url={store_url!r}), {name!r}).acquire()
    print("held" if held is not None else "refused", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def settings(store_url: str, tmp_path: Path) -> Settings:
    """Settings whose store is SQLite in MODEL_DIR (file locks) or PostgreSQL (advisory locks)."""
    model_dir = str(tmp_path / "model_dir")
    return Settings(model_dir=model_dir, store_url=store_url if store_url.startswith("postgresql") else "")


def _holder(settings: Settings, name: str, tmp_path: Path) -> subprocess.Popen:
    """A process that holds lock ``name`` until killed: on PostgreSQL, another instance (its own MODEL_DIR,
    the same database); on SQLite, another process on this machine (the same MODEL_DIR)."""
    model_dir = str(tmp_path / "instance-2") if settings.store_url else settings.model_dir
    script = tmp_path / f"hold_{name}.py"
    script.write_text(HOLDER.format(repo=str(REPO), model_dir=model_dir, store_url=settings.store_url, name=name))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a holder that never says "held" fails the test, not hangs it
    watchdog.start()
    line = proc.stdout.readline().strip()
    watchdog.cancel()
    assert line == "held", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _granted_within(lock, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        held = lock.acquire()
        if held is not None:
            held.release()
            return True
        time.sleep(0.05)
    return False


def test_the_lock_follows_the_store(settings: Settings) -> None:
    lock = run_lock(settings, "train")
    assert isinstance(lock, AdvisoryLock if settings.store_url else FileLock) and lock.name == "train"
    if not settings.store_url:  # the file in MODEL_DIR, whatever the working directory
        held = lock.acquire()
        assert held is not None and FileLock(Path(settings.model_dir) / "train.lock").acquire() is None
        held.release()


def test_a_second_acquirer_is_refused_until_the_first_releases(settings: Settings) -> None:
    first = run_lock(settings, "train").acquire()
    assert first is not None
    assert run_lock(settings, "train").acquire() is None  # another acquirer, even in this process
    other = run_lock(settings, "rescore").acquire()  # names are independent
    assert other is not None
    other.release()
    first.release()
    again = run_lock(settings, "train").acquire()
    assert again is not None
    again.release()


@pytest.mark.parametrize("name", ["train", "rescore"])
def test_a_killed_holder_releases_the_lock(settings: Settings, tmp_path: Path, name: str) -> None:
    proc = _holder(settings, name, tmp_path)
    try:
        lock = run_lock(settings, name)
        assert lock.acquire() is None
        time.sleep(0.3)
        assert lock.acquire() is None  # still held while the holder lives
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert _granted_within(lock, 10), "the lock stayed held after its holder was killed"
    finally:
        proc.kill()
        proc.wait()


def test_a_waiting_acquirer_gets_the_lock_when_the_holder_dies(settings: Settings, tmp_path: Path) -> None:
    proc = _holder(settings, "rescore", tmp_path)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(rescoring.acquire_rescore_lock(settings, wait=True)))
    try:
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and got == []  # a second re-scoring waits for the first
        assert rescoring.acquire_rescore_lock(settings, wait=False) is None
        proc.send_signal(signal.SIGKILL)
        waiter.join(20)
        assert not waiter.is_alive() and got and got[0] is not None
    finally:
        proc.kill()
        proc.wait()
        for held in got:
            held.release()  # type: ignore[attr-defined]


def test_training_is_refused_while_another_instance_trains(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    started: list[object] = []
    monkeypatch.setattr(trigger, "start_detached", lambda *a, **k: started.append(a))
    proc = _holder(settings, "train", tmp_path)  # another instance's trainer
    try:
        assert trigger.request_training(settings, "every 5") is False and started == []
        assert run_job(settings, TrainJob(classes=None)) == 3  # a trainer started anyway does not run
    finally:
        proc.kill()
        proc.wait()


WAITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from labelstudio_maskclip.learning.locks import run_lock
    from labelstudio_maskclip.settings import Settings
    print("waiting", flush=True)
    held = run_lock(Settings(model_dir={model_dir!r}, store_url={store_url!r}), "train").acquire(wait=True)
    print("held", flush=True)
    time.sleep(600)
""")


def test_an_advisory_lock_is_handed_over_to_the_process_queued_for_it(postgres_url: str, tmp_path: Path) -> None:
    """The trigger's hand-over: the holder lets go only once the trainer is queued, and nobody slips in."""
    settings = Settings(model_dir=str(tmp_path / "a"), store_url=postgres_url)
    held = run_lock(settings, "train").acquire()
    assert held is not None and held.fd is None
    script = tmp_path / "waiter.py"
    script.write_text(WAITER.format(repo=str(REPO), model_dir=str(tmp_path / "b"), store_url=postgres_url))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        assert held.hand_over(alive=lambda: proc.poll() is None, timeout=60)
        assert proc.stdout.readline().strip() == "held"
        assert run_lock(settings, "train").acquire() is None  # the waiter holds it now
    finally:
        proc.kill()
        proc.wait()
    assert _granted_within(run_lock(settings, "train"), 10)


def test_a_hand_over_with_nobody_queued_releases_when_the_child_is_gone(postgres_url: str, tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path), store_url=postgres_url)
    held = run_lock(settings, "train").acquire()
    assert held is not None and held.hand_over(alive=lambda: False) is False
    assert _granted_within(run_lock(settings, "train"), 10)
    file_held = run_lock(Settings(model_dir=str(tmp_path)), "train").acquire()
    assert file_held is not None and file_held.fd is not None and file_held.hand_over(alive=lambda: True)
    assert _granted_within(run_lock(Settings(model_dir=str(tmp_path)), "train"), 1)  # a file lock goes at once


def _end_lock_sessions(postgres, url: str, name: str) -> None:
    """The server ends the sessions of ``url``'s database that hold run locks ``name`` (a restart, an
    operator's ``pg_terminate_backend``); other databases' (other test sessions on a shared server) live on."""
    postgres.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE application_name = 'labelstudio-maskclip {name}' AND datname = '{database_of(url)}' "
        "AND pid <> pg_backend_pid()"
    )


def test_a_lock_knows_when_it_is_no_longer_held(postgres_url: str, postgres, tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path), store_url=postgres_url)
    held = run_lock(settings, "train").acquire()
    assert held is not None and held.still_held()
    _end_lock_sessions(postgres, postgres_url, "train")
    assert not held.still_held()
    other = run_lock(settings, "train").acquire()  # another run may take it now
    assert other is not None and other.still_held() and not held.still_held()
    other.release()
    assert not other.still_held()
    file_held = run_lock(Settings(model_dir=str(tmp_path)), "train").acquire()
    assert file_held is not None and file_held.still_held()
    file_held.release()
    assert not file_held.still_held()


def test_a_run_whose_training_lock_was_lost_does_not_promote(
    postgres_url: str, postgres, tmp_path: Path, caplog
) -> None:
    from labelstudio_maskclip.learning.store import Store
    from labelstudio_maskclip.training import checkpoints as ck
    from labelstudio_maskclip.training import train as tr
    from tests.test_training import CLASSES, NoisyOracle, _fill, _settings

    s = _settings(tmp_path)
    store = Store(tmp_path)
    images = _fill(store, range(2), annotated={0})
    settings = Settings(model_dir=str(tmp_path), store_url=postgres_url)

    def run(lock):
        return tr.train(s, store, load_image=lambda ref, tid: images[ref], teacher=NoisyOracle(), classes=CLASSES,
                        progress=False, lock=lock)  # fmt: skip

    held = run_lock(settings, "train").acquire()
    assert run(held).promoted and ck.current_version(tmp_path) == "maskclip+-1"  # held: promoted
    _end_lock_sessions(postgres, postgres_url, "train")
    result = run(held)
    assert not result.promoted and result.version is None and "training lock is no longer held" in result.decision
    assert ck.current_version(tmp_path) == "maskclip+-1" and len(ck.history(tmp_path)) == 1
    assert "training lock is no longer held" in caplog.text
    held.release()


# --- what mutation testing found unchecked (docs/mutation.md) ------------------------------------------------


def test_a_file_lock_is_named_for_its_file_and_makes_its_folders(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "a" / "b" / "rescore.lock")
    assert lock.name == "rescore" and FileLock(tmp_path / "x.lock", "train").name == "train"
    held = lock.acquire()
    assert held is not None and (tmp_path / "a" / "b" / "rescore.lock").exists()
    held.release()


def _open_descriptors() -> list[str]:
    """What this process's open lock files and sockets are (others may come and go with other threads)."""
    import gc
    import os

    gc.collect()  # what an earlier test left to the collector is closed now, not during the count
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return sorted(t for t in targets if t.endswith(".lock") or t.startswith("socket:"))


def test_refused_tries_leave_no_descriptor_or_connection_open(settings: Settings) -> None:
    """The trigger tries the training lock at every annotation: a refused try must not keep a file or a
    database connection open (a server would run out of them, and PostgreSQL's connections are budgeted),
    and closes them itself rather than leave them to the garbage collector (which warns)."""
    import warnings

    import psycopg

    held = run_lock(settings, "train").acquire()
    assert held is not None and run_lock(settings, "train").acquire() is None
    before = _open_descriptors()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(20):
            assert run_lock(settings, "train").acquire() is None
    assert _open_descriptors() == before
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    if settings.store_url:
        # A closed session's row goes when its server process has exited: on a busy machine, a moment later.
        deadline, sessions = time.monotonic() + 30, -1
        while sessions != 1 and time.monotonic() < deadline:
            with psycopg.connect(settings.store_url) as conn:
                (sessions,) = conn.execute(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'labelstudio-maskclip train' "
                    "AND datname = current_database()"
                ).fetchone()
            time.sleep(0.1 if sessions != 1 else 0)
        assert sessions == 1  # the holder's
    held.release()


def test_a_hand_over_nobody_takes_ends_at_its_timeout_and_releases(postgres_url: str, tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path), store_url=postgres_url)
    held = run_lock(settings, "train").acquire()
    assert held is not None
    asked: list[float] = []  # the holder asks every 50 ms, not as fast as it can
    start = time.monotonic()
    assert held.hand_over(alive=lambda: asked.append(time.monotonic()) is None, timeout=0.5, every=0.05) is False
    assert time.monotonic() - start >= 0.5 and not held.still_held() and 2 <= len(asked) <= 11
    assert _granted_within(run_lock(settings, "train"), 1)


def test_a_wait_the_database_cuts_short_is_a_store_error_that_names_the_lock(postgres_url: str) -> None:
    """A URL may set a statement timeout: a wait for the lock it ends is the store's error, with the reason."""
    holder = AdvisoryLock(postgres_url, "rescore").acquire()
    assert holder is not None
    try:
        impatient = AdvisoryLock(f"{postgres_url}&options=-c%20statement_timeout%3D200", "rescore")
        with pytest.raises(StoreError, match=r"^cannot take the rescore lock in postgresql://.*statement timeout"):
            impatient.acquire(wait=True)
    finally:
        holder.release()


def test_a_lock_waited_for_knows_when_it_is_no_longer_held(postgres_url: str, postgres) -> None:
    """The trainer waits for the training lock (``--lock-wait``): that lock too must tell when the server
    ended its session, or a run that lost it would still promote."""
    waited = AdvisoryLock(postgres_url, "train").acquire(wait=True)
    assert waited is not None and waited.still_held()
    _end_lock_sessions(postgres, postgres_url, "train")
    assert not waited.still_held()
    waited.release()


def test_a_lock_that_cannot_reach_its_database_says_which_lock_and_where() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://maskclip:secret@127.0.0.1:{port}/db?connect_timeout=3"
    with pytest.raises(
        StoreError, match=rf"^cannot take the rescore lock in postgresql://maskclip:\*\*\*@127\.0\.0\.1:{port}/db"
    ):
        AdvisoryLock(url, "rescore").acquire()
