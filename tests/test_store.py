"""The store: schema, ordering rules, training marks, crash safety, concurrent writers. Every test of the
store's behaviour runs twice, on SQLite and on PostgreSQL (the ``store_url`` fixture, tests/postgres.py); the
tests of SQLite's own settings (WAL, fsync, corruption codes) run on SQLite."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from labelstudio_maskclip.learning import migrations
from labelstudio_maskclip.learning import store as store_module
from labelstudio_maskclip.learning.store import (
    SCHEMA_VERSION,
    AnnotationWrite,
    Store,
    StoreError,
    TaskRecord,
)
from tests.postgres import database_of

REPO = Path(__file__).resolve().parents[1]


def disc(height: int, width: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write(
    annotation_id: int, task_id: int, masks: dict, updated_at: str = "2026-11-02T10:00:00Z", **kw
) -> AnnotationWrite:
    h, w = next(iter(masks.values())).shape if masks else (None, None)
    return AnnotationWrite(
        id=annotation_id,
        task=TaskRecord(task_id, 1, f"/data/upload/1/img{task_id}.png"),
        height=h,
        width=w,
        masks=masks,
        updated_at=updated_at,
        **kw,
    )


@pytest.fixture
def store(store_url: str) -> Store:
    return Store(store_url)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "model_dir")


def test_schema_is_created_once_and_versioned(tmp_path: Path) -> None:
    first = Store(tmp_path)
    first.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    second = Store(tmp_path)  # reopening keeps the data
    assert second.path == tmp_path / store_module.DB_FILE_NAME
    assert second.annotation(1)["labels"] == ["cat"]
    conn = sqlite3.connect(second.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this code"):
        Store(tmp_path)


def test_connections_are_durable_and_wait_for_locks(sqlite_store: Store) -> None:
    store = sqlite_store
    conn = store._conn()
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    with pytest.raises(StoreError, match="synchronous"):
        Store(store.path, synchronous="OFF")


def test_masks_round_trip_losslessly(store: Store) -> None:
    rng = np.random.default_rng(0)
    noise = rng.random((37, 53)) > 0.5
    shape = disc(37, 53, 18, 26, 12)
    assert store.put_annotation(write(7, 3, {"cat": noise, "dog": shape})).status == "stored"
    (sample,) = store.accepted_samples()
    assert (sample.task_id, sample.annotation_id, sample.height, sample.width) == (3, 7, 37, 53)
    assert sample.image == "/data/upload/1/img3.png"
    np.testing.assert_array_equal(sample.masks["cat"], noise)
    np.testing.assert_array_equal(sample.masks["dog"], shape)
    assert store.labels() == ["cat", "dog"]


def test_duplicate_stale_and_update(store: Store) -> None:
    old = {"cat": disc(20, 20, 10, 10, 5)}
    new = {"dog": disc(20, 20, 5, 5, 3)}
    assert store.put_annotation(write(1, 1, old, "2026-11-02T10:00:00Z")).status == "stored"
    seq = store.current_seq()
    assert store.put_annotation(write(1, 1, old, "2026-11-02T10:00:00Z")).status == "duplicate"
    assert store.current_seq() == seq  # nothing changed
    assert store.put_annotation(write(1, 1, new, "2026-11-02T10:05:00.5+00:00")).status == "stored"
    assert store.annotation(1)["labels"] == ["dog"]  # update replaced the masks
    assert store.put_annotation(write(1, 1, old, "2026-11-02T10:01:00Z")).status == "stale"
    assert store.annotation(1)["labels"] == ["dog"]
    assert store.check() == []


def test_delete_leaves_a_tombstone(store: Store) -> None:
    store.put_annotation(write(1, 1, {"cat": disc(20, 20, 10, 10, 5)}))
    assert store.delete_annotations([1, 99]) == 1
    assert list(store.accepted_samples()) == [] and store.labels() == []
    assert (
        store.put_annotation(write(1, 1, {"cat": disc(20, 20, 10, 10, 6)}, "2027-01-01T00:00:00Z")).status == "deleted"
    )
    # An id never stored leaves no tombstone (made-up deletions cannot grow the store or drop a real
    # annotation later): when annotation 99 arrives, it is stored.
    assert store.annotation(99) is None
    assert store.put_annotation(write(99, 2, {"cat": disc(20, 20, 10, 10, 6)})).status == "stored"
    assert [t.id for t in store.unlabeled_tasks()] == [1]
    assert store.check() == []


def test_cancelled_annotations_hold_no_masks(store: Store) -> None:
    store.put_annotation(write(1, 1, {"cat": disc(20, 20, 10, 10, 5)}, "2026-11-02T10:00:00Z"))
    assert (
        store.put_annotation(
            write(1, 1, {"cat": disc(20, 20, 10, 10, 5)}, "2026-11-02T11:00:00Z", cancelled=True)
        ).status
        == "stored"
    )
    assert store.annotation(1)["labels"] == [] and store.annotation(1)["cancelled"] == 1
    assert list(store.accepted_samples()) == []
    assert [t.id for t in store.unlabeled_tasks()] == [1]


def test_samples_prefer_ground_truth_then_latest(store: Store) -> None:
    a = {"cat": disc(20, 20, 10, 10, 5)}
    store.put_annotation(write(1, 5, a, "2026-11-02T10:00:00Z", ground_truth=True))
    store.put_annotation(write(2, 5, {"dog": a["cat"]}, "2026-11-02T12:00:00Z"))
    store.put_annotation(write(3, 6, a, "2026-11-02T10:00:00Z"))
    store.put_annotation(write(4, 6, {"dog": a["cat"]}, "2026-11-02T12:00:00Z"))
    assert [(s.task_id, s.annotation_id, sorted(s.masks)) for s in store.accepted_samples()] == [
        (5, 1, ["cat"]),
        (6, 4, ["dog"]),
    ]
    store.put_tasks([TaskRecord(9, 2, "s3://bucket/x.jpg")])
    assert [(t.id, t.project, t.image) for t in store.unlabeled_tasks()] == [(9, 2, "s3://bucket/x.jpg")]
    assert list(store.unlabeled_tasks(project=1)) == []
    assert [s.task_id for s in store.accepted_samples(project=2)] == []


def test_training_marks_count_changes(store: Store) -> None:
    mask = {"cat": disc(20, 20, 10, 10, 5)}
    for i in range(3):
        store.put_annotation(write(i + 1, i + 1, mask))
    assert store.count_since_last_training() == 3
    seq = store.current_seq()
    store.put_annotation(write(10, 10, mask))  # arrives while the trainer runs
    run = store.mark_trained(seq=seq, model_version="maskclip-1", metrics={"miou": 0.5})
    assert store.count_since_last_training() == 1
    assert store.training_runs()[-1] == {**store.training_runs()[-1], "id": run, "seq": seq, "metrics": {"miou": 0.5}}
    store.mark_trained()
    assert store.count_since_last_training() == 0
    store.put_annotation(write(2, 2, {"dog": mask["cat"]}, "2027-01-01T00:00:00Z"))  # an edit counts again
    assert store.count_since_last_training() == 1
    assert store.count_since_last_training(project=1) == 4  # never trained for project 1 specifically


def test_acceptance_stats(store: Store) -> None:
    mask = {"cat": disc(20, 20, 10, 10, 5)}
    store.put_annotation(
        write(
            1,
            1,
            mask,
            accepted_unchanged=True,
            parent_prediction=5,
            outcomes=[("r1", "cat", "unchanged"), ("r2", "dog", "unchanged")],
        )
    )
    store.put_annotation(
        write(
            2,
            2,
            mask,
            accepted_unchanged=False,
            parent_prediction=6,
            outcomes=[("r1", "cat", "edited"), ("r2", "dog", "deleted"), ("x", "cat", "added")],
        )
    )
    store.put_annotation(write(3, 3, mask))
    stats = store.acceptance_stats()
    assert stats["cat"] == {"unchanged": 1, "edited": 1, "deleted": 0, "added": 1}
    assert stats["dog"] == {"unchanged": 1, "edited": 0, "deleted": 1, "added": 0}
    assert stats["(annotations)"] == {"unchanged": 1, "edited": 1, "unknown": 1}


# --- processes -----------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord
    store = Store({path!r})
    start, count = int(sys.argv[1]), int(sys.argv[2])
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        masks = {{f"label{{k}}": rng.random((48, 64)) > 0.7 for k in range(1 + i % 3)}}
        result = store.put_annotation(AnnotationWrite(
            id=i, task=TaskRecord(i, 1, f"img{{i}}.png"), height=48, width=64, masks=masks,
            updated_at="2026-11-02T10:00:00Z"))
        sys.stdout.write(f"{{result.status}} {{i}}\\n")  # acknowledged only after the commit returned
        sys.stdout.flush()
""")


def expected_masks(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {f"label{k}": rng.random((48, 64)) > 0.7 for k in range(1 + i % 3)}


def writer_script(tmp_path: Path, location: str) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO), path=location))
    return script


def assert_acknowledged(store: Store, acknowledged: list[int]) -> None:
    samples = {s.annotation_id: s for s in store.accepted_samples()}
    for i in acknowledged:
        assert i in samples, f"acknowledged annotation {i} is missing"
        expected = expected_masks(i)
        assert sorted(samples[i].masks) == sorted(expected)
        for label, mask in expected.items():
            np.testing.assert_array_equal(samples[i].masks[label], mask)


def test_writer_killed_mid_transaction_leaves_a_consistent_store(tmp_path: Path, store_url: str) -> None:
    db = store_url
    Store(db)
    script = writer_script(tmp_path, db)
    rng = random.Random(1)
    acknowledged: list[int] = []
    start = 1
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(start), "100000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = proc.stdout.readline()
        assert first.startswith("stored "), proc.communicate()[1]  # the writer is past imports and writing
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        complete = out.split("\n")[:-1]  # a line cut short by the kill is no acknowledgement
        done = [start] + [int(line.split()[1]) for line in complete if line.startswith("stored ")]
        acknowledged += done
        start = done[-1] + 1 + 1  # skip the id that may or may not have committed when it died
    store = Store(db)
    assert store.check() == []  # integrity_check ok; every annotation row has exactly its masks
    assert len(acknowledged) > 12
    assert_acknowledged(store, acknowledged)


def test_concurrent_writers_all_succeed(tmp_path: Path, store_url: str) -> None:
    db = store_url  # not created yet (an empty database): the writers race to create the schema too
    script = writer_script(tmp_path, db)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(1 + 100 * k), "25"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    acknowledged: list[int] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        acknowledged += [int(line.split()[1]) for line in out.splitlines() if line.startswith("stored")]
    assert len(acknowledged) == 100
    store = Store(db)
    assert store.check() == []
    assert_acknowledged(store, acknowledged)
    assert store.current_seq() == 100


SAME_WEBHOOK = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord
    store = Store({path!r})
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # every process writes at once
    mask = np.zeros((30, 40), bool); mask[5:20, 10:30] = True
    write = AnnotationWrite(id=7, task=TaskRecord(7, 1, "img7.png"), height=30, width=40, masks={{"cat": mask}},
                            updated_at="2026-11-02T10:00:00Z", accepted_unchanged=True)
    print(store.put_annotation(write).status)
""")


def test_the_same_annotation_from_several_processes_at_once_is_stored_once(tmp_path: Path, store_url: str) -> None:
    """Label Studio's webhook and a retry, or two instances given the same event: one ``stored``, the
    rest ``duplicate``, and the change counter moves once."""
    Store(store_url)
    script = tmp_path / "same.py"
    script.write_text(SAME_WEBHOOK.format(repo=str(REPO), path=store_url))
    procs = [subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]  # fmt: skip
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    statuses = sorted(proc.communicate(timeout=60)[0].strip() for proc in procs)
    assert statuses == ["duplicate", "duplicate", "duplicate", "stored"]
    store = Store(store_url)
    assert store.current_seq() == 1 and store.check() == [] and store.annotation(7)["labels"] == ["cat"]


def test_public_surface() -> None:
    assert all(hasattr(store_module, name) for name in store_module.__all__)


def test_check_reports_mask_rows_that_disagree_with_their_annotation(sqlite_store: Store) -> None:
    store = sqlite_store
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4), "dog": disc(20, 30, 5, 20, 3)}))
    store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)}))
    assert store.check() == []
    with sqlite3.connect(store.path) as conn:  # damage it behind the store's back
        conn.execute("DELETE FROM masks WHERE annotation_id = 1 AND label = 'dog'")
        conn.execute(
            "INSERT INTO masks SELECT 99, label, source, height, width, area, counts FROM masks WHERE annotation_id = 2"
        )
    assert store.check() == ["annotation 1: mask_count 2 but 1 masks rows", "masks of unknown annotation 99"]


def test_put_tasks_and_delete_annotations_report_their_counts(store: Store) -> None:
    assert store.put_tasks([TaskRecord(7, 1, "/a.png"), TaskRecord(8, 1, "/b.png")]) == 2
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)}))
    assert store.delete_annotations([998]) == 0  # never stored: not counted (a tombstone keeps it deleted)
    assert store.delete_annotations([1, 2, 999]) == 2
    assert store.delete_annotations([1]) == 0  # already deleted
    assert store.annotation(1)["deleted"] == 1 and store.annotation(1)["labels"] == []  # a tombstone


def test_an_update_replaces_the_outcomes_of_its_regions(store: Store) -> None:
    mask = {"cat": disc(20, 20, 10, 10, 5)}
    first = [("r1", "cat", "unchanged"), ("r2", "dog", "unchanged")]
    store.put_annotation(write(1, 1, mask, parent_prediction=5, outcomes=first))
    later = "2026-11-02T11:00:00Z"
    store.put_annotation(write(1, 1, mask, parent_prediction=5, outcomes=[("r3", "cat", "edited")], updated_at=later))
    stats = store.acceptance_stats()
    assert stats["cat"] == {"unchanged": 0, "edited": 1, "deleted": 0, "added": 0}
    assert "dog" not in stats


def test_a_sample_needs_both_sides_of_its_image_size(store: Store) -> None:
    # no masks, so the size can only come from the task: height known without width, and the reverse
    store.put_tasks([TaskRecord(21, 1, "/a.png", width=None, height=40), TaskRecord(22, 1, "/b.png", width=30)])
    store.put_tasks([TaskRecord(23, 1, "/c.png", width=30, height=40)])
    for annotation_id, task_id in [(21, 21), (22, 22), (23, 23)]:
        store.put_annotation(AnnotationWrite(id=annotation_id, task=TaskRecord(task_id, 1), masks={},
                                             updated_at="2026-11-02T10:00:00Z"))  # fmt: skip
    assert [(s.task_id, s.height, s.width, dict(s.masks)) for s in store.accepted_samples()] == [(23, 40, 30, {})]


def test_projects_and_training_runs_read_back_what_was_written(store: Store) -> None:
    store.put_tasks([TaskRecord(1, 4), TaskRecord(2, 2), TaskRecord(3, None), TaskRecord(5, 4)])
    assert store.projects() == [2, 4]
    first = store.mark_trained(seq=3, project=4, model_version="student-a", metrics={"miou": 0.5})
    store.mark_trained(seq=5, project=2, model_version="student-b")
    runs = store.training_runs()
    assert [(r["id"], r["project"], r["seq"], r["model_version"], r["metrics"]) for r in runs] == [
        (first, 4, 3, "student-a", {"miou": 0.5}),
        (first + 1, 2, 5, "student-b", {}),
    ]
    assert isinstance(runs[0]["finished_at"], float)
    assert [r["model_version"] for r in store.training_runs(project=2)] == ["student-b"]


def test_a_resent_cancelled_annotation_is_a_duplicate_whatever_its_outcomes_say(store: Store) -> None:
    cancelled = write(40, 40, {}, cancelled=True)
    assert store.put_annotation(cancelled).status == "stored"
    again = write(40, 40, {}, cancelled=True, accepted_unchanged=False, outcomes=[("r1", "cat", "deleted")])
    assert store.put_annotation(again).status == "duplicate"


def test_a_changed_acceptance_flag_alone_is_recorded(store: Store) -> None:
    mask = {"cat": disc(20, 20, 10, 10, 5)}
    assert store.put_annotation(write(41, 41, mask, accepted_unchanged=True)).status == "stored"
    assert store.put_annotation(write(41, 41, mask, accepted_unchanged=True)).status == "duplicate"
    assert store.put_annotation(write(41, 41, mask, accepted_unchanged=False)).status == "outcomes"
    assert store.annotation(41)["accepted_unchanged"] == 0


@pytest.mark.parametrize("code, corrupt", [(11, True), (26, True), (11 | 1 << 8, True), (5, False), (13, False)])
def test_corruption_is_told_by_the_primary_result_code(code: int, corrupt: bool) -> None:
    exc = sqlite3.DatabaseError("x")
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    assert store_module._is_corruption(exc) is corrupt


def test_without_a_result_code_only_a_plain_database_error_means_corruption() -> None:
    assert store_module._is_corruption(sqlite3.DatabaseError("database disk image is malformed"))
    assert not store_module._is_corruption(sqlite3.OperationalError("database is locked"))
    assert not store_module._is_corruption(ValueError("database disk image is malformed"))  # not SQLite's


def test_only_a_held_lock_is_busy_on_sqlite(tmp_path: Path) -> None:
    """A write that met another writer's lock may be tried again (a 503); another operational error,
    e.g. a table that is not there, will not go away by trying again."""
    from labelstudio_maskclip.learning.backends import SQLiteBackend

    backend = SQLiteBackend(tmp_path / "s.sqlite3", busy_timeout_s=0.1)
    conn, other = backend.connect(), backend.connect()
    other.execute("BEGIN IMMEDIATE")
    errors = []
    for statement in ("BEGIN IMMEDIATE", "SELECT * FROM no_such_table"):
        with pytest.raises(sqlite3.OperationalError) as caught:
            conn.execute(statement)
        errors.append(caught.value)
    other.execute("ROLLBACK")
    assert [backend.busy(e) for e in errors] == [True, False], errors
    assert not backend.busy(sqlite3.DatabaseError("database is locked"))  # only an operational error is


def test_the_durability_setting_reaches_every_connection(tmp_path: Path) -> None:
    normal = Store(tmp_path / "normal", synchronous="normal")
    conn = normal._conn()
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_close_closes_this_threads_connection_and_the_next_use_reopens(sqlite_store: Store) -> None:
    store = sqlite_store
    conn = store._conn()
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")
    assert store.put_annotation(write(50, 50, {"cat": disc(8, 8, 4, 4, 2)})).status == "stored"


def test_task_records_are_values(store: Store) -> None:
    assert {TaskRecord(1, 2, "x"), TaskRecord(1, 2, "x")} == {TaskRecord(1, 2, "x")}


def test_a_one_pixel_mask_is_kept_and_an_empty_one_dropped(store: Store) -> None:
    dot = np.zeros((6, 7), bool)
    dot[2, 3] = True
    store.put_annotation(write(60, 60, {"a-none": np.zeros((6, 7), bool), "dot": dot}))  # the empty one first
    (sample,) = store.accepted_samples()
    assert sorted(sample.masks) == ["dot"] and sample.masks["dot"].sum() == 1


def test_samples_carry_their_flags_and_do_not_print_their_masks(store: Store) -> None:
    store.put_annotation(write(61, 61, {"cat": disc(9, 9, 4, 4, 2)}, author="ann@example.com"))
    (sample,) = store.accepted_samples()
    assert sample.ground_truth is False and sample.author == "ann@example.com"
    assert "masks" not in repr(sample) and "array" not in repr(sample)


def test_records_are_immutable(store: Store) -> None:
    import dataclasses

    store.put_annotation(write(62, 62, {"cat": disc(9, 9, 4, 4, 2)}))
    (sample,) = store.accepted_samples()
    result = store.put_annotation(write(63, 63, {"cat": disc(9, 9, 4, 4, 2)}))
    for record, name in [(sample, "image"), (write(1, 1, {}), "author"), (result, "status"), (TaskRecord(1), "id")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, None)


def test_the_store_creates_its_folder_with_parents(tmp_path: Path) -> None:
    store = Store(tmp_path / "a" / "b" / "model_dir")
    assert store.path.parent.is_dir() and store.put_tasks([TaskRecord(1, 1)]) == 1


def test_a_store_found_damaged_refuses_reads_and_writes_and_says_how_to_recover(store: Store) -> None:
    store.put_annotation(write(64, 64, {"cat": disc(9, 9, 4, 4, 2)}))
    assert store.damage_message() == ""
    store.damage = ["line one\nline two", "2", "3", "4", "5", "sixth"]
    message = store.damage_message()
    assert "line one line two" in message and "; 5" in message and "sixth" not in message
    assert "backfill" in message
    with pytest.raises(store_module.StoreDamaged):
        store.put_annotation(write(65, 65, {"cat": disc(9, 9, 4, 4, 2)}))
    with pytest.raises(store_module.StoreDamaged):
        store.labels()
    with pytest.raises(store_module.StoreDamaged):
        list(store.accepted_samples())


# --- schema migrations ---------------------------------------------------------------------------------


def _versions(store: Store) -> list[tuple[int, float]]:
    with store._read() as conn:
        return [tuple(r) for r in conn.execute("SELECT version, applied_at FROM schema_version ORDER BY version")]


def test_migrations_are_recorded_once_in_order(store_url: str) -> None:
    first = Store(store_url)
    recorded = _versions(first)
    assert [v for v, _ in recorded] == list(range(1, SCHEMA_VERSION + 1)) and first.schema_version() == SCHEMA_VERSION
    assert _versions(Store(store_url)) == recorded  # reopening applies nothing again
    with first._read() as conn:  # each with what it did, for whoever inspects the database
        summaries = [r[0] for r in conn.execute("SELECT summary FROM schema_version ORDER BY version")]
    assert summaries == [m.summary for m in migrations.MIGRATIONS]


def test_a_new_migration_is_applied_once_to_an_existing_store(store_url: str, monkeypatch) -> None:
    store = Store(store_url)
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    extra = migrations.Migration(SCHEMA_VERSION + 1, "a test table", "CREATE TABLE IF NOT EXISTS extra (x {int})")
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, extra))
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    newer = Store(store_url)
    assert newer.schema_version() == SCHEMA_VERSION + 1 and newer.annotation(1)["labels"] == ["cat"]
    with newer._write() as conn:
        conn.execute("INSERT INTO extra (x) VALUES (?)", (2**40,))  # {int} is 64 bits on both
    assert [v for v, _ in _versions(Store(store_url))] == list(range(1, SCHEMA_VERSION + 2))


def test_a_store_migrated_by_newer_code_is_refused(store_url: str) -> None:
    store = Store(store_url)
    with store._write() as conn:
        conn.execute("INSERT INTO schema_version(version, summary, applied_at) VALUES (?, 'future', 0)",
                     (SCHEMA_VERSION + 1,))  # fmt: skip
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this code"):
        Store(store_url)


def test_an_sqlite_store_whose_user_version_is_newer_is_refused(tmp_path: Path) -> None:
    """SQLite's ``user_version`` is the schema version too (the one older code reads): a file that says it is
    newer than this code is refused, even without a ``schema_version`` table."""
    db = tmp_path / "model_dir" / store_module.DB_FILE_NAME
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(
        StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this code's {SCHEMA_VERSION}"
    ):
        Store(db.parent)


def test_a_store_of_schema_1_written_before_versioned_migrations_opens_without_loss(tmp_path: Path) -> None:
    """tests/data/store-schema1.sqlite3 was written by the code of schema 1 (tests/data/README.md)."""
    db = tmp_path / "model_dir" / store_module.DB_FILE_NAME
    db.parent.mkdir()
    db.write_bytes((REPO / "tests" / "data" / "store-schema1.sqlite3").read_bytes())
    store = Store(db.parent)
    assert store.schema_version() == SCHEMA_VERSION and store.check() == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    yy, xx = np.mgrid[:24, :32]
    round_ = (yy - 12) ** 2 + (xx - 16) ** 2 <= 49
    square = np.zeros((24, 32), bool)
    square[2:9, 3:12] = True
    samples = {s.task_id: s for s in store.accepted_samples()}
    assert sorted(samples) == [1, 2]  # 3's annotation was deleted, 4's cancelled
    assert (samples[1].annotation_id, samples[1].author, samples[1].image) == (
        11,
        "ann@example.com",
        "/data/upload/7/a.png",
    )
    np.testing.assert_array_equal(samples[1].masks["cat"], round_)
    np.testing.assert_array_equal(samples[1].masks["dog"], square)
    assert samples[2].annotation_id == 12 and samples[2].ground_truth  # ground truth beats the later 15
    np.testing.assert_array_equal(samples[2].masks["cat"], square)
    assert [(t.id, t.project, t.image) for t in store.unlabeled_tasks()] == [(3, 8, "s3://bucket/c.jpg"),
                                                                            (4, 8, "/data/upload/8/d.png")]  # fmt: skip
    assert store.annotation(13)["deleted"] == 1 and store.annotation(14)["cancelled"] == 1
    assert store.put_annotation(write(13, 3, {"bird": round_}, "2027-01-01T00:00:00Z")).status == "deleted"
    stats = store.acceptance_stats()
    assert stats["cat"] == {"unchanged": 1, "edited": 1, "deleted": 0, "added": 0}
    assert stats["dog"]["added"] == 1 and stats["(annotations)"] == {"unchanged": 1, "edited": 1, "unknown": 1}
    (run,) = store.training_runs()
    assert (run["id"], run["project"], run["seq"], run["model_version"], run["metrics"]) == (
        1, 7, 2, "maskclip+-1", {"miou": 0.42})  # fmt: skip
    assert store.current_seq() == 6 and store.count_since_last_training(project=7) == 1  # annotation 15
    assert store.mark_trained(project=7) == 2 and store.count_since_last_training(project=7) == 0
    assert store.put_annotation(write(16, 5, {"cat": square})).seq == 7


# --- PostgreSQL: an unreachable or restarted server ----------------------------------------------------


def test_a_server_that_cannot_be_reached_is_a_store_error_without_the_password(postgres) -> None:
    url = f"postgresql://maskclip:s3cret@/postgres?host={postgres.root}&port={postgres.port + 1}&connect_timeout=2"
    with pytest.raises(StoreError) as caught:
        Store(url)
    assert "s3cret" not in str(caught.value) and "maskclip:***@" in str(caught.value)
    assert caught.value.http_status == 503


def _terminate_sessions(postgres, url: str) -> None:
    """The server ends every session of ``url``'s database (as a restart or a failover does)."""
    postgres.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{database_of(url)}' AND pid <> pg_backend_pid()"
    )


def test_a_write_on_a_connection_the_server_dropped_reconnects_and_is_stored(postgres_url, postgres) -> None:
    store = Store(postgres_url)
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    _terminate_sessions(postgres, postgres_url)
    # the webhook's write is not lost (Label Studio never sends it again): the dropped connection is replaced
    assert store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)})).status == "stored"
    assert [s.annotation_id for s in store.accepted_samples()] == [1, 2]
    _terminate_sessions(postgres, postgres_url)
    assert [s.annotation_id for s in store.accepted_samples()] == [1, 2]  # reads too


def test_a_store_that_cannot_be_reached_after_a_dropped_connection_fails_with_a_store_error(
    postgres_url, postgres
) -> None:
    store = Store(postgres_url)
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    _terminate_sessions(postgres, postgres_url)
    postgres.sql(f"ALTER DATABASE {postgres_url.split('/')[3].split('?')[0]} ALLOW_CONNECTIONS false")
    try:
        with pytest.raises(StoreError, match="cannot open the store"):
            store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)}))
    finally:
        postgres.sql(f"ALTER DATABASE {postgres_url.split('/')[3].split('?')[0]} ALLOW_CONNECTIONS true")
    assert store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)})).status == "stored"


# --- what mutation testing found unchecked (docs/mutation.md) ------------------------------------------------


def test_the_store_is_the_one_the_settings_name(tmp_path: Path) -> None:
    from labelstudio_maskclip.settings import Settings

    in_model_dir = Store.from_settings(Settings(model_dir=str(tmp_path / "md")))
    assert in_model_dir.path == tmp_path / "md" / store_module.DB_FILE_NAME
    elsewhere = Store.from_settings(Settings(model_dir=str(tmp_path / "md"), store_url=str(tmp_path / "s.sqlite3")))
    assert elsewhere.path == tmp_path / "s.sqlite3"


def test_close_may_be_called_again_and_from_a_thread_that_never_used_the_store(sqlite_store: Store) -> None:
    import threading

    sqlite_store.put_annotation(write(1, 1, {"cat": disc(9, 9, 4, 4, 2)}))
    errors: list[BaseException] = []

    def close_here() -> None:
        try:
            sqlite_store.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=close_here)
    thread.start()
    thread.join()
    assert errors == []
    sqlite_store.close()
    sqlite_store.close()
    assert [s.annotation_id for s in sqlite_store.accepted_samples()] == [1]  # the next use reopens


def test_a_damaged_store_says_which_file_to_move_aside_and_how_to_rebuild_it(sqlite_store: Store) -> None:
    sqlite_store.damage = ["page 3: btree error"]
    assert sqlite_store.damage_message() == (
        f"the annotation store {sqlite_store.location} is damaged (page 3: btree error). Nothing is read from or "
        f"written to it. To recover: stop the backend, move {store_module.DB_FILE_NAME} and its -wal/-shm files "
        "aside, start again (an empty store is created), and rebuild it from Label Studio with `labelstudio-maskclip "
        "backfill --project ID` for each project (annotations and their outcomes come back; the list of past "
        "training runs does not)"
    )


def test_an_acceptance_flag_that_changes_back_is_recorded(store: Store) -> None:
    mask = {"cat": disc(20, 20, 10, 10, 5)}
    store.put_annotation(write(42, 42, mask, accepted_unchanged=False))
    assert store.put_annotation(write(42, 42, mask, accepted_unchanged=True)).status == "outcomes"
    assert store.annotation(42)["accepted_unchanged"] == 1
    assert store.acceptance_stats()["(annotations)"] == {"unchanged": 1, "edited": 0, "unknown": 0}


def test_ids_never_stored_do_not_stop_the_deletion_of_the_others(store: Store) -> None:
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)}))
    store.delete_annotations([2])
    assert store.delete_annotations([999, 2, 1]) == 1  # unknown, then already deleted, then live
    assert store.annotation(1)["deleted"] == 1 and list(store.accepted_samples()) == []


def test_acceptance_stats_of_one_project_count_only_its_annotations(store: Store) -> None:
    mask = {"cat": disc(20, 20, 10, 10, 5)}
    store.put_annotation(write(1, 1, mask, accepted_unchanged=True, parent_prediction=5,
                               outcomes=[("r1", "cat", "unchanged")]))  # fmt: skip
    other = AnnotationWrite(
        id=2, task=TaskRecord(2, 2, "/data/upload/2/b.png"), height=20, width=20, masks=mask,
        accepted_unchanged=False, parent_prediction=6, outcomes=[("r1", "cat", "edited"), ("r2", "dog", "deleted")],
    )  # fmt: skip
    store.put_annotation(other)
    assert store.acceptance_stats(project=1) == {
        "cat": {"unchanged": 1, "edited": 0, "deleted": 0, "added": 0},
        "(annotations)": {"unchanged": 1, "edited": 0, "unknown": 0},
    }
    assert store.acceptance_stats(project=2) == {
        "cat": {"unchanged": 0, "edited": 1, "deleted": 0, "added": 0},
        "dog": {"unchanged": 0, "edited": 0, "deleted": 1, "added": 0},
        "(annotations)": {"unchanged": 0, "edited": 1, "unknown": 0},
    }
    assert store.acceptance_stats()["(annotations)"] == {"unchanged": 1, "edited": 1, "unknown": 0}


def test_a_write_refused_half_way_leaves_nothing_behind_and_the_store_keeps_working(store: Store) -> None:
    mask = {"cat": disc(20, 30, 10, 10, 4)}
    store.put_annotation(write(1, 1, mask))
    seq = store.current_seq()
    with pytest.raises(store.backend.errors):  # NOT NULL: refused after the masks were written
        store.put_annotation(write(2, 2, mask, outcomes=[("r1", "cat", None)]))
    assert store.current_seq() == seq and store.annotation(2) is None
    assert store.put_annotation(write(3, 3, mask)).status == "stored"
    assert [s.annotation_id for s in store.accepted_samples()] == [1, 3]


def test_counts_and_labels_of_one_project_leave_the_other_projects_out(store: Store) -> None:
    def in_project(annotation_id: int, project: int, label: str) -> AnnotationWrite:
        task = TaskRecord(annotation_id, project, f"/data/upload/{project}/{annotation_id}.png")
        return AnnotationWrite(id=annotation_id, task=task, height=20, width=20, masks={label: disc(20, 20, 9, 9, 4)})

    store.put_annotation(in_project(1, 1, "cat"))
    store.mark_trained(project=1)
    store.put_annotation(in_project(2, 2, "dog"))
    store.put_annotation(in_project(3, 2, "bird"))
    assert store.count_since_last_training(project=1) == 0  # project 2's new annotations are not project 1's
    assert store.count_since_last_training(project=2) == 2
    assert store.labels(project=1) == ["cat"] and store.labels(project=2) == ["bird", "dog"]
    assert store.labels() == ["bird", "cat", "dog"]


def test_a_run_recorded_without_a_model_version_has_none(store: Store) -> None:
    store.mark_trained(project=3)
    (run,) = store.training_runs(project=3)
    assert (run["model_version"], run["metrics"]) == ("", {})


def test_check_finds_an_index_that_disagrees_with_its_table_which_the_quick_check_does_not(tmp_path: Path) -> None:
    """`check` runs SQLite's full integrity check (indexes against their tables); opening runs only the quick
    one, so an index whose entries no longer match its rows is found by `check` alone."""
    store = Store(tmp_path)
    store.put_annotation(write(1, 5, {"cat": disc(20, 30, 10, 10, 4)}))  # task 5 of project 1
    store.close()
    with sqlite3.connect(store.path) as conn:  # the index's entries hold task_id; its definition now says project
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX annotations_task ON annotations(project)' "
            "WHERE name = 'annotations_task'"
        )
    reopened = Store(tmp_path)
    assert reopened.damage == []  # the quick check at open does not compare indexes with tables
    assert reopened.check() == ["integrity_check: row 1 missing from index annotations_task"]


def test_corruption_a_write_meets_where_the_quick_check_passes_is_recorded_and_refuses_the_rest(tmp_path: Path) -> None:
    """An index whose entries disagree with its table passes the quick check; a write that changes the indexed
    column meets the damage. What it met is the damage reported, and nothing more is read or written."""
    store = Store(tmp_path)
    store.put_annotation(write(1, 5, {"cat": disc(20, 30, 10, 10, 4)}))
    store.close()
    with sqlite3.connect(store.path) as conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "UPDATE sqlite_master SET sql = 'CREATE INDEX annotations_task ON annotations(project)' "
            "WHERE name = 'annotations_task'"
        )
    reopened = Store(tmp_path)
    assert reopened.damage == [] and reopened.integrity() == []
    moved = AnnotationWrite(id=1, task=TaskRecord(5, 2, "x"), height=20, width=30,
                            masks={"dog": disc(20, 30, 10, 10, 4)}, updated_at="2026-11-03T10:00:00Z")  # fmt: skip
    with pytest.raises(store_module.StoreDamaged, match=r"is damaged \(database disk image is malformed\)\."):
        reopened.put_annotation(moved)
    assert reopened.damage == ["database disk image is malformed"]
    with pytest.raises(store_module.StoreDamaged, match="backfill --project ID"):
        reopened.labels()


def test_the_store_settings_given_reach_the_connection_and_bad_locations_are_named(tmp_path: Path) -> None:
    extra = Store(tmp_path / "a", busy_timeout_s=2.5, synchronous="EXTRA")
    conn = extra._conn()
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2500
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 3  # EXTRA
    with pytest.raises(StoreError, match=r"^cannot use the store mysql://host/db: "):
        Store("mysql://host/db")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError, match=r"^cannot create the store's directory .*file"):
        Store(tmp_path / "file" / "model_dir")


def test_results_name_their_annotation_and_samples_their_project(store: Store) -> None:
    mask = {"cat": disc(20, 30, 10, 10, 4)}
    task = TaskRecord(9, 7, None)  # a task whose image reference is unknown
    first = AnnotationWrite(id=31, task=task, height=20, width=30, masks=mask, updated_at="2026-11-02T10:00:00Z")
    assert store.put_annotation(first) == store_module.PutResult("stored", 31, 1)
    assert store.put_annotation(first).annotation_id == 31  # duplicate
    older = AnnotationWrite(id=31, task=task, height=20, width=30, masks={}, updated_at="2026-11-01T10:00:00Z")
    assert store.put_annotation(older) == store_module.PutResult("stale", 31)
    (sample,) = store.accepted_samples()
    assert (sample.task_id, sample.project, sample.image) == (9, 7, "")
    store.delete_annotations([31])
    assert store.put_annotation(first) == store_module.PutResult("deleted", 31)


def test_update_times_are_compared_as_instants_whatever_their_offset(store: Store) -> None:
    mask, other = {"cat": disc(20, 30, 10, 10, 4)}, {"cat": disc(20, 30, 10, 10, 6)}
    store.put_annotation(write(1, 1, mask, "2026-11-02T10:30:00Z"))
    assert store.put_annotation(write(1, 1, other, "2026-11-02T12:00:00+02:00")).status == "stale"  # 10:00 UTC
    assert store.put_annotation(write(1, 1, other, "2026-11-02T11:00:00")).status == "stored"  # no offset: UTC
    store.put_annotation(write(2, 2, mask, updated_at=None))  # the stored version has no time
    assert store.put_annotation(write(2, 2, other, "2026-11-02T10:00:00Z")).status == "stored"


def test_a_change_of_a_flag_alone_is_a_new_version(store: Store) -> None:
    mask = {"cat": disc(20, 30, 10, 10, 4)}
    store.put_annotation(write(1, 1, mask))
    assert store.put_annotation(write(1, 1, mask, ground_truth=True)).status == "stored"
    assert store.annotation(1)["ground_truth"] == 1
    store.put_annotation(write(2, 2, {}))
    assert store.put_annotation(write(2, 2, {}, cancelled=True)).status == "stored"
    assert store.annotation(2)["cancelled"] == 1


def test_a_damaged_store_refuses_with_the_recovery_steps(sqlite_store: Store) -> None:
    sqlite_store.damage = ["page 3: btree error"]
    with pytest.raises(store_module.StoreDamaged, match="is damaged .* backfill --project ID"):
        sqlite_store.labels()


def test_a_new_store_is_created_quietly_and_an_upgrade_is_told(tmp_path: Path, caplog, monkeypatch) -> None:
    """A new store gets every migration without a word at INFO (the CLI's output stays one line); an existing
    store brought up to date says which migrations it got, and where."""
    import logging

    with caplog.at_level(logging.INFO, logger="labelstudio_maskclip"):
        Store(tmp_path)
    assert [r for r in caplog.records if "migrations" in r.getMessage()] == []
    extra = migrations.Migration(SCHEMA_VERSION + 1, "a test table", "CREATE TABLE IF NOT EXISTS extra (x {int})")
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, extra))
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with caplog.at_level(logging.INFO, logger="labelstudio_maskclip"):
        upgraded = Store(tmp_path)
    (record,) = [r for r in caplog.records if "migrations" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert record.getMessage() == f"store {upgraded.location}: migrations [{SCHEMA_VERSION + 1}]"


def test_a_store_file_that_cannot_be_opened_is_named_and_one_that_is_not_a_database_is_damaged(tmp_path: Path) -> None:
    (tmp_path / "a" / store_module.DB_FILE_NAME).mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(StoreError, match=r"^cannot open the store .*annotations\.sqlite3: "):
        Store(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / store_module.DB_FILE_NAME).write_bytes(b"this is not an SQLite database, not at all" * 100)
    damaged = Store(tmp_path / "b")
    assert damaged.damage and "file is not a database" in damaged.damage[0]
    with pytest.raises(store_module.StoreDamaged, match="is damaged .*file is not a database"):
        damaged.labels()


def test_a_thread_that_first_connects_to_a_file_damaged_since_the_store_opened_is_told_how_to_recover(
    tmp_path: Path,
) -> None:
    import threading

    store = Store(tmp_path)
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    store.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{store.path}{suffix}").unlink(missing_ok=True)
    store.path.write_bytes(b"this is not an SQLite database, not at all" * 100)
    raised: list[BaseException] = []

    def read() -> None:
        try:
            store.labels()
        except BaseException as exc:  # noqa: BLE001 - checked below
            raised.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    (error,) = raised
    assert isinstance(error, store_module.StoreDamaged) and "backfill --project ID" in str(error)


# --- the store's password never shows -------------------------------------------------------------------------

PASSWORD = "Pa55@w0rdTail"  # an unencoded "@": libpq splits at the first one, urllib at the last


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "form",
    [
        "POSTGRESQL://maskclip:Pa55w0rdTail@127.0.0.1:{port}/db",  # libpq would quote the whole string
        "postgresql://maskclip@127.0.0.1:{port}/db?password=Pa55w0rdTail",
        "postgresql://maskclip@127.0.0.1:{port}/db?sslmode=disable&PASSWORD=Pa55w0rdTail&connect_timeout=3",
        "postgresql://maskclip:Pa55@w0rdTail@127.0.0.1:{port}/db",
        "postgresql://maskclip:Pa55w0rdTail@127.0.0.1:{port}/db?no_such_option=1",  # libpq cannot parse it
        "postgresql://maskclip:Pa55w0rdTail@[127.0.0.1:{port}/db",
    ],
)
def test_the_store_password_never_shows_in_errors_logs_or_doctor(form: str, tmp_path: Path, caplog) -> None:
    import logging

    from labelstudio_maskclip.commands.doctor import check_model_dir
    from labelstudio_maskclip.learning.locks import AdvisoryLock
    from labelstudio_maskclip.settings import Settings

    url = form.format(port=_closed_port())
    shown: list[str] = []
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StoreError) as opened:
            Store(url)
        shown.append(str(opened.value))
        with pytest.raises(StoreError) as locked:  # the store's error, whatever psycopg raised
            AdvisoryLock(url, "train").acquire()
        shown.append(str(locked.value))
        for finding in check_model_dir(Settings(model_dir=str(tmp_path / "md"), store_url=url)):
            shown += [finding.message, finding.fix]
    shown.append(caplog.text)
    text = "\n".join(shown)
    assert "127.0.0.1" in text or "cannot be parsed" in text  # the errors say something of where
    for piece in ("Pa55", "w0rdTail"):
        assert piece not in text, text


def test_every_postgresql_connection_has_a_connect_timeout_and_keepalives(postgres_url) -> None:
    from labelstudio_maskclip.learning.locks import AdvisoryLock

    store = Store(postgres_url)
    held = AdvisoryLock(postgres_url, "train").acquire()
    assert held is not None
    for conn in (store._conn().raw, held._handle):
        given = conn.info.get_parameters()
        assert given["connect_timeout"] == "10" and given["keepalives"] == "1", given
        assert (given["keepalives_idle"], given["keepalives_interval"], given["keepalives_count"]) == ("30", "10", "3")
    held.release()
    own = Store(f"{postgres_url}&keepalives_idle=7&connect_timeout=4")  # what the URL sets is kept
    given = own._conn().raw.info.get_parameters()
    assert given["keepalives_idle"] == "7" and given["connect_timeout"] == "4"


def test_a_write_that_waits_past_the_busy_timeout_is_a_store_error_and_nothing_is_lost(tmp_path: Path) -> None:
    """Another process holding SQLite's write lock past the busy timeout: the write fails as unavailable (a
    503 for the webhook, with the reason), not as an unexpected error (a 500); the store is intact and the
    same write succeeds once the lock is gone."""
    store = Store(tmp_path / "model_dir", busy_timeout_s=0.2)
    store.put_annotation(write(1, 1, {"cat": disc(20, 20, 10, 10, 5)}))
    conn = store._conn()
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        with pytest.raises(StoreError, match="busy"):
            store.put_annotation(write(2, 2, {"dog": disc(20, 20, 5, 5, 3)}))
        assert store._conn() is conn  # a lock another writer holds is no broken connection: not replaced
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.put_annotation(write(2, 2, {"dog": disc(20, 20, 5, 5, 3)})).status == "stored"
    assert store.check() == [] and store.current_seq() == 2


# --- the dialects (learning/backends.py): locations, passwords, placeholders, lock keys ---------------------


def test_only_a_postgresql_url_is_a_postgresql_store() -> None:
    from labelstudio_maskclip.learning.backends import is_postgres

    for url in ("postgresql://h/db", "postgres://u@h/db", "POSTGRESQL://h/db", "PostgreS://h/db"):
        assert is_postgres(url), url
    for other in ("postgresql", "postgres", "postgresql:/h/db", "/data/postgresql://", "mysql://h/db", "", None,
                  Path("postgresql://h/db")):  # fmt: skip
        assert not is_postgres(other), other


def test_an_sqlite_location_names_its_file(tmp_path: Path) -> None:
    from labelstudio_maskclip.learning.backends import DB_FILE_NAME, open_backend, sqlite_path

    assert sqlite_path("sqlite:///rel/store.db") == Path("rel/store.db")  # three slashes: a relative path
    assert sqlite_path("SQLite:////abs/dir") == Path("/abs/dir") / DB_FILE_NAME  # a fourth: an absolute one
    assert sqlite_path(tmp_path) == tmp_path / DB_FILE_NAME
    for name in ("a.sqlite3", "a.sqlite", "a.db"):
        assert sqlite_path(tmp_path / name) == tmp_path / name
    assert sqlite_path("a.txt") == Path("a.txt") / DB_FILE_NAME
    with pytest.raises(ValueError, match=r"^'mysql://h/db': the store is a path, sqlite:///path or postgresql://"):
        sqlite_path("mysql://h/db")
    backend = open_backend(f"sqlite:///{tmp_path}/s.sqlite3", busy_timeout_s=1.5, synchronous="normal")
    assert (backend.name, backend.describe(), backend.busy_ms, backend.synchronous) == (  # type: ignore[attr-defined]
        "sqlite", str(tmp_path / "s.sqlite3"), 1500, "NORMAL")  # fmt: skip
    default = open_backend(tmp_path)
    assert (default.busy_ms, default.synchronous) == (30000, "FULL")  # type: ignore[attr-defined]


def test_a_url_keeps_everything_but_the_case_of_its_scheme() -> None:
    from labelstudio_maskclip.learning.backends import normalised_url

    assert normalised_url("POSTGRESQL://User:PW@Host/DB?SSLMODE=x") == "postgresql://User:PW@Host/DB?SSLMODE=x"
    assert normalised_url("postgres://u@h/d") == "postgres://u@h/d"
    assert normalised_url("NOT A URL") == "NOT A URL"
    assert normalised_url("POSTGRES://User@h/db?options=a://B") == "postgres://User@h/db?options=a://B"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:p:w@h/db", "postgresql://u:***@h/db"),  # the password is all after the first ":"
        ("postgresql://u:p@w@h/db", "postgresql://u:***@h/db"),  # an unencoded "@": the host is after the last
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("postgresql:///db?host=/run/pg", "postgresql:///db?host=/run/pg"),
        ("postgresql://h/db@x?a=1#f@g", "postgresql://h/db@x?a=1#f@g"),  # an "@" after the host is no user's
        ("postgresql://h/db?a=1&password=pw&b=2", "postgresql://h/db?a=1&password=***&b=2"),
        ("postgresql://h/db?PassWord=pw#frag", "postgresql://h/db?PassWord=***#frag"),
        ("postgresql://u:pw@h/db?x=1\n&password=pw2", "postgresql://u:***@h/db?x=1\n&password=***"),
        ("postgresql://u:pw@h/db?application_name=a://b", "postgresql://u:***@h/db?application_name=a://b"),
    ],
)
def test_a_url_is_shown_whole_without_its_password(url: str, shown: str) -> None:
    from labelstudio_maskclip.learning.backends import hide_password

    assert hide_password(url) == shown


def test_every_form_of_the_password_is_hidden_in_a_message() -> None:
    from labelstudio_maskclip.learning.backends import hide_secrets

    url = "postgresql://u:ab@cdef@h/db?password=xyz"
    message = "password ab@cdef, then ab and cdef apart, xyz; user u at h"
    assert hide_secrets(message, url) == "password ***, then *** and *** apart, ***; user u at h"
    encoded = "postgresql://u:p%40ss@h/db"
    assert hide_secrets("libpq: p@ss, p%40ss", encoded) == "libpq: ***, ***"
    assert hide_secrets("no password here", "postgresql://u:@h/db?password=") == "no password here"
    assert hide_secrets("libpq: p:w:x", "postgresql://u:p:w:x@h/db") == "libpq: ***"  # all after the first ":"


def test_lock_keys_are_fixed_signed_64_bit_numbers() -> None:
    """Every instance computes the same key for a lock, whatever its version: a key that changed between
    releases would let an old and a new instance hold 'the same' lock at once."""
    from labelstudio_maskclip.learning.backends import MIGRATION_KEY, WRITE_KEY, advisory_key

    assert advisory_key("store-write") == WRITE_KEY == 4621462322906981360
    assert advisory_key("store-migrate") == MIGRATION_KEY == -7839185953009601908  # negative: signed
    assert advisory_key("run:train") == 8798891642818076407


def test_sql_with_a_percent_sign_and_many_rows_runs_on_both_backends(store: Store) -> None:
    with store._write() as conn:
        assert conn.execute("SELECT 7 % ?", (4,)).fetchone()[0] == 3
        conn.execute("CREATE TABLE pairs (a TEXT, b INTEGER)")
        conn.executemany("INSERT INTO pairs (a, b) VALUES (?, ?)", iter([["x", 1], ["y%", 2]]))
        conn.executemany("INSERT INTO pairs (a, b) VALUES (?, ?)", [])  # nothing to insert: nothing done
        assert [tuple(r) for r in conn.execute("SELECT a, b FROM pairs ORDER BY b")] == [("x", 1), ("y%", 2)]


def test_sqlite_refuses_a_file_without_wal_mode() -> None:
    from labelstudio_maskclip.learning.backends import SQLiteBackend

    with pytest.raises(sqlite3.OperationalError, match=r"^SQLite refused WAL mode \(journal_mode=memory\); use a"):
        SQLiteBackend(Path(":memory:")).connect()  # an in-memory database cannot be in WAL mode


def test_a_thread_keeps_its_connection_from_call_to_call(store: Store) -> None:
    """One connection per thread, opened once: not one per call (each would stay open)."""
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    conn = store._conn()
    store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)}))
    assert store.accepted_samples() and store._conn() is conn


def test_the_quick_check_of_a_store_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    """A thread that first checks the store after its folder went away gets the reason as the finding
    (the doctor reports it), not an exception."""
    import shutil
    import threading

    store = Store(tmp_path / "model_dir")
    shutil.rmtree(tmp_path / "model_dir")
    found: list[list[str]] = []
    thread = threading.Thread(target=lambda: found.append(store.integrity()))
    thread.start()
    thread.join()
    assert found == [[f"cannot open the store {store.path}: unable to open database file"]]


def test_a_forked_child_opens_its_own_connection_and_the_parent_keeps_its_own(store: Store) -> None:
    """A process forked from one that used the store (a pre-forking server's workers) writes through a
    connection of its own; the parent's connection, inherited by the child, stays the parent's and works."""
    import gc
    import os

    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    conn = store._conn()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            stored = store.put_annotation(write(2, 2, {"cat": disc(20, 30, 10, 10, 4)})).status == "stored"
            own = store._conn() is not conn
            gc.collect()
            code = 0 if stored and own else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120  # a child forked beside threads could hang: it must not hang the run
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish in 120 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert store.current_seq() == 2 and store._conn() is conn  # the parent's connection was not ended
    assert [s.annotation_id for s in store.accepted_samples()] == [1, 2]


def test_an_sqlite_backend_by_default_waits_30_s_for_the_write_lock_and_syncs_fully(tmp_path: Path) -> None:
    from labelstudio_maskclip.learning.backends import SQLiteBackend

    conn = SQLiteBackend(tmp_path / "s.sqlite3").connect()
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn.close()


def test_a_healthy_store_has_nothing_to_report(store: Store) -> None:
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    assert store.check() == [] and store.integrity() == [] and store.damage == [] and store.damage_message() == ""


def test_a_postgresql_store_waits_its_busy_timeout_for_the_write_lock_and_names_itself(postgres_url: str) -> None:
    """Writers queue on the store's write lock for at most the busy timeout (as SQLite's do), and each
    session says whose it is (``pg_stat_activity``; docs/replicas.md counts the connections)."""
    conn = Store(postgres_url, busy_timeout_s=2.5)._conn()
    assert conn.execute("SHOW lock_timeout").fetchone()[0] == "2500ms"
    assert conn.execute("SHOW application_name").fetchone()[0] == "labelstudio-maskclip"
    assert Store(postgres_url)._conn().execute("SHOW lock_timeout").fetchone()[0] == "30s"


def test_a_connection_that_fails_says_why_without_the_password() -> None:
    from labelstudio_maskclip.learning.backends import ConnectFailed, postgres_connect

    port = _closed_port()
    with pytest.raises(ConnectFailed) as refused:
        postgres_connect(f"postgresql://u:Secret9@127.0.0.1:{port}/db", application_name="t")
    assert f'"127.0.0.1", port {port} failed' in str(refused.value) and "Secret9" not in str(refused.value)
    with pytest.raises(ConnectFailed, match=r"^the store URL cannot be parsed: postgresql://u:\*\*\*@h/db\?no_such=1$"):
        postgres_connect("postgresql://u:Secret9@h/db?no_such=1", application_name="t")


def test_no_session_of_ours_sits_in_an_open_transaction(postgres_url: str) -> None:
    """Every connection is in autocommit mode and opens its transactions itself: neither a store that has
    written nor a held run lock keeps a transaction open (which would hold back VACUUM and snapshots)."""
    import psycopg

    from labelstudio_maskclip.learning.locks import AdvisoryLock

    store = Store(postgres_url)
    store.put_annotation(write(1, 1, {"cat": disc(20, 30, 10, 10, 4)}))
    held = AdvisoryLock(postgres_url, "train").acquire()
    assert held is not None
    with psycopg.connect(postgres_url) as conn:
        states = conn.execute(
            "SELECT application_name, state FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'labelstudio-maskclip%' ORDER BY 1"
        ).fetchall()
    held.release()
    assert states == [("labelstudio-maskclip", "idle"), ("labelstudio-maskclip train", "idle")]
