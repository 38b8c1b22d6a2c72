"""What every instance reads from the store: the served-version pointer and the re-scoring status.

With a PostgreSQL store both live in the database (``shared_state``), so an instance with another MODEL_DIR
sees a promotion, a rollback and the last re-scoring of the others; with the SQLite store (one machine)
they stay files under MODEL_DIR, as before.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from labelstudio_maskclip.learning.store import Store, shared_store
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training import rescoring
from labelstudio_maskclip.training.student import build_student
from tests.test_student import _emb, _payload


@pytest.mark.parametrize("key, value", [("served_version", "maskclip+-3"), ("rescore_status", '{"state": "done"}')])
def test_shared_values_are_set_replaced_and_read_back(store_url: str, key: str, value: str) -> None:
    store = Store(store_url)
    assert store.get_state(key) is None
    store.put_state(key, "first")
    store.put_state(key, value)
    assert store.get_state(key) == value and Store(store_url).get_state(key) == value


def _instances(postgres_url: str, tmp_path: Path) -> tuple[Settings, Settings]:
    """Two instances: one database, a MODEL_DIR each."""
    return (Settings(model_dir=str(tmp_path / "a"), store_url=postgres_url),
            Settings(model_dir=str(tmp_path / "b"), store_url=postgres_url))  # fmt: skip


def test_a_promotion_and_a_rollback_are_seen_by_an_instance_with_another_model_dir(postgres_url, tmp_path) -> None:
    a, b = _instances(postgres_url, tmp_path)
    net = build_student("tiny", _emb(2, 8), "none")
    assert ck.current_version(b) is None
    v1 = ck.promote(a, _payload(net, ["a", "b"]))
    v2 = ck.promote(a, _payload(net, ["a", "b"]))
    assert ck.current_version(b) == v2 and not ck.models_dir(b).exists()  # read from the store, not b's files
    assert [h["current"] for h in ck.history(a)] == [False, True]
    assert ck.rollback(a, v1) == v1 and ck.current_version(b) == v1
    assert ck.rollback(a, "maskclip") == "maskclip" and ck.current_version(b) is None
    assert ck.current_version(a.model_dir) is None  # the file pointer follows too (one machine's tools)
    assert shared_store(b).get_state(ck.SERVED_KEY) == "maskclip"  # type: ignore[union-attr]


def test_a_promotion_written_to_the_store_ends_the_back_off_at_once(postgres_url, tmp_path, monkeypatch) -> None:
    """After the store could not be read, this process reads the pointer file for a while; once a promotion
    has written the store's pointer, the store is read again at once (another instance's file is stale)."""
    import time

    a, b = _instances(postgres_url, tmp_path)
    monkeypatch.setattr(ck, "_store_down_until", {postgres_url: time.monotonic() + 1000})  # as after a failure
    assert ck.current_version(b) is None  # b's files: nothing promoted there
    v1 = ck.promote(a, _payload(build_student("tiny", _emb(2, 8), "none"), ["a", "b"]))
    assert ck.current_version(b) == v1 and not ck.models_dir(b).exists()  # the store's pointer again


def test_a_store_without_a_pointer_serves_what_the_files_say(postgres_url, tmp_path) -> None:
    """A deployment moving from SQLite to PostgreSQL keeps serving the promoted student."""
    a, _ = _instances(postgres_url, tmp_path)
    v1 = ck.promote(a.model_dir, _payload(build_student("tiny", _emb(2, 8), "none"), ["a", "b"]))  # files only
    assert shared_store(a).get_state(ck.SERVED_KEY) is None and ck.current_version(a) == v1  # type: ignore[union-attr]


def test_a_store_that_cannot_be_reached_falls_back_to_the_file_pointer(postgres, tmp_path, caplog) -> None:
    gone = f"postgresql://maskclip@/postgres?host={postgres.root}&port={postgres.port + 1}&connect_timeout=2"
    v1 = ck.promote(tmp_path, _payload(build_student("tiny", _emb(2, 8), "none"), ["a", "b"]))
    with caplog.at_level(logging.WARNING):
        assert ck.current_version(Settings(model_dir=str(tmp_path), store_url=gone)) == v1  # predictions go on
    assert "the served version is read from" in caplog.text and "cannot open the store" in caplog.text


def test_the_rescoring_status_is_shared_through_a_postgresql_store(postgres_url, tmp_path) -> None:
    a, b = _instances(postgres_url, tmp_path)
    assert rescoring.read_status(b) is None
    status = {"state": "running", "version": "maskclip+-2", "projects": {"1": {"done": 3, "total": 9}}}
    rescoring.write_status(a, status)
    assert rescoring.read_status(b) == status and not (Path(a.model_dir) / rescoring.STATUS_FILE).exists()


def test_with_the_sqlite_store_the_rescoring_status_stays_a_file(tmp_path) -> None:
    s = Settings(model_dir=str(tmp_path))
    tmp_path.mkdir(exist_ok=True)
    rescoring.write_status(s, {"state": "done"})
    assert rescoring.read_status(tmp_path) == {"state": "done"} == rescoring.read_status(s)
