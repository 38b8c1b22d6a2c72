"""The model registry (training/checkpoints.py): version numbers, the ``current`` pointer, history, rollback,
what a checkpoint may hold. tests/test_student.py has the round trip through the served student."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from labelstudio_maskclip.training import checkpoints as ck

SECRETS = {"label_studio_api_key": "lsk-secret", "BASIC_AUTH_PASS": "pw-secret"}


def _payload(classes=("a", "b"), **extra) -> dict:
    return {
        "student": "tiny",
        "state_dict": {"w": torch.arange(4.0)},
        "embeddings": torch.eye(len(classes)),
        "classes": [[c] for c in classes],
        "background": [],
        "settings": {"train_steps": 2, "model_dir": "/models", **SECRETS},
        "metrics": {"miou": {"candidate": 0.5}},
        **extra,
    }


def test_the_next_version_follows_the_highest_registered_not_the_served_one(tmp_path):
    versions = [ck.promote(tmp_path, _payload()) for _ in range(11)]
    assert versions == [f"maskclip+-{n}" for n in range(1, 12)]
    assert [h["version"] for h in ck.history(tmp_path)] == versions  # by number: 2 before 10
    assert ck.rollback(tmp_path, "maskclip+-2") == "maskclip+-2"
    assert ck.promote(tmp_path, _payload()) == "maskclip+-12" == ck.current_version(tmp_path)
    (ck.models_dir(tmp_path) / "maskclip+-99.backup.pt").write_bytes(b"x")  # not a version: ignored
    (ck.models_dir(tmp_path) / "maskclip+-x.pt").write_bytes(b"x")
    assert ck.promote(tmp_path, _payload()) == "maskclip+-13"


def test_the_pointer_names_the_served_checkpoint(tmp_path):
    assert ck.current_version(tmp_path) is None and ck.current_checkpoint(tmp_path) is None
    version = ck.promote(tmp_path, _payload())
    assert (ck.models_dir(tmp_path) / "current").read_text() == "maskclip+-1\n"
    assert (
        ck.current_checkpoint(tmp_path)
        == tmp_path / "models" / "maskclip+-1.pt"
        == ck.checkpoint_path(tmp_path, version)
    )
    (ck.models_dir(tmp_path) / "current").write_text("  \n")  # an empty pointer: MaskCLIP
    assert ck.current_version(tmp_path) is None and ck.current_checkpoint(tmp_path) is None


def test_a_checkpoint_describes_itself_without_secrets(tmp_path):
    version = ck.promote(tmp_path, _payload(["cat", "dog"], data={"last_loss": torch.tensor(0.25)}))
    full = ck.read_checkpoint(ck.checkpoint_path(tmp_path, version))
    assert full["format"] == ck.FORMAT and full["version"] == version and full["created"].endswith("+00:00")
    assert full["classes"] == [["cat"], ["dog"]] and torch.equal(full["state_dict"]["w"], torch.arange(4.0))
    assert full["settings"] == {"train_steps": 2, "model_dir": "/models"}
    meta = json.loads((ck.models_dir(tmp_path) / f"{version}.json").read_text())
    assert "state_dict" not in meta and "embeddings" not in meta
    assert meta["settings"] == {"train_steps": 2, "model_dir": "/models"} and meta["version"] == version
    assert meta["created"] == full["created"]
    assert meta["data"] == {"last_loss": "tensor(0.2500)"}  # what JSON cannot hold is written as text
    for path in tmp_path.rglob("*"):
        assert b"secret" not in path.read_bytes() if path.is_file() else True


def test_secrets_in_an_older_checkpoint_are_never_handed_out(tmp_path):
    """A checkpoint written before secrets were left out: reading it, or its history entry, drops them."""
    older = {**_payload(), "format": ck.FORMAT, "version": "maskclip+-1", "created": "2025-01-01T00:00:00+00:00"}
    ck.save_checkpoint(ck.checkpoint_path(tmp_path, "maskclip+-1"), older)
    side = {k: v for k, v in older.items() if k not in ("state_dict", "embeddings")}
    (ck.models_dir(tmp_path) / "maskclip+-1.json").write_text(json.dumps(side, default=str))
    assert "label_studio_api_key" not in ck.read_checkpoint(ck.checkpoint_path(tmp_path, "maskclip+-1"))["settings"]
    (entry,) = ck.history(tmp_path)
    assert entry["settings"] == {"train_steps": 2, "model_dir": "/models"} and entry["current"] is False
    no_settings = {**older, "settings": None}
    ck.save_checkpoint(ck.checkpoint_path(tmp_path, "maskclip+-2"), no_settings)
    assert ck.read_checkpoint(ck.checkpoint_path(tmp_path, "maskclip+-2"))["settings"] is None


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_only_plain_checkpoints_of_ours_are_read(tmp_path, capsys):
    path = tmp_path / "m.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": ck.FORMAT, "x": _Payload()}, f, protocol=2)
    with pytest.raises(ck.CheckpointError, match=f"^cannot read student checkpoint {path}: "):
        ck.read_checkpoint(path)
    assert "a pickle ran code" not in capsys.readouterr().out  # weights only: nothing of the file runs
    torch.save({"format": "someone-else/1"}, path)
    with pytest.raises(ck.CheckpointError, match=r"is not a labelstudio-maskclip student checkpoint \(format "):
        ck.read_checkpoint(path)
    torch.save([ck.FORMAT], path)
    with pytest.raises(ck.CheckpointError, match="is not a labelstudio-maskclip"):
        ck.read_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match=f"^student checkpoint {tmp_path / 'gone.pt'} does not exist$"):
        ck.read_checkpoint(tmp_path / "gone.pt")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.read_checkpoint(tmp_path / "dir.pt")


def test_history_lists_a_version_whose_description_is_lost(tmp_path):
    v1, v2 = ck.promote(tmp_path, _payload()), ck.promote(tmp_path, _payload())
    (ck.models_dir(tmp_path) / f"{v1}.json").unlink()
    (ck.models_dir(tmp_path) / f"{v2}.json").write_text("{torn")
    note = "metadata file missing; the checkpoint itself describes it"
    assert ck.history(tmp_path) == [
        {"version": v1, "note": note, "current": False},
        {"version": v2, "note": note, "current": True},
    ]


def test_rollback_refuses_what_it_cannot_serve_and_keeps_the_pointer(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"^no student version 'maskclip\+-1' in .*models \(known: none\)$"):
        ck.rollback(tmp_path, "maskclip+-1")
    v1, v2 = ck.promote(tmp_path, _payload()), ck.promote(tmp_path, _payload())
    ck.checkpoint_path(tmp_path, v1).write_bytes(b"torn")
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        ck.rollback(tmp_path, v1)
    (ck.models_dir(tmp_path) / "other.pt").write_bytes(ck.checkpoint_path(tmp_path, v2).read_bytes())
    with pytest.raises(ck.CheckpointError, match=r"no student version 'other' .*known: maskclip\+-1, maskclip\+-2\)"):
        ck.rollback(tmp_path, "other")  # a loadable file that is not a version
    assert ck.current_version(tmp_path) == v2
    assert ck.rollback(tmp_path, "maskclip") == "maskclip" and ck.current_version(tmp_path) is None
    assert ck.rollback(tmp_path, "maskclip") == "maskclip"  # already the teacher: nothing to undo
    assert ck.rollback(tmp_path, v2) == v2 and ck.current_version(tmp_path) == v2


def test_the_registry_folder_is_made_on_first_promotion(tmp_path):
    model_dir = tmp_path / "not" / "yet"
    assert ck.promote(model_dir, _payload()) == "maskclip+-1"
    assert ck.rollback(tmp_path / "empty", "maskclip") == "maskclip"


def test_a_checkpoint_is_read_onto_the_device_asked_for(tmp_path):
    version = ck.promote(tmp_path, _payload())
    assert ck.read_checkpoint(ck.checkpoint_path(tmp_path, version))["state_dict"]["w"].device.type == "cpu"
    on_meta = ck.read_checkpoint(ck.checkpoint_path(tmp_path, version), map_location="meta")
    assert on_meta["state_dict"]["w"].device.type == "meta" and on_meta["embeddings"].device.type == "meta"


# --- a PostgreSQL store that cannot be reached -----------------------------------------------------------------


class _CountingServer:
    """A loopback TCP port that accepts connections, counts them and closes them at once (no PostgreSQL
    there: every connection attempt fails, and each one is counted)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def url(self) -> str:
        return f"postgresql://maskclip@127.0.0.1:{self.port}/nowhere?sslmode=disable"


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://maskclip@127.0.0.1:{port}/nowhere?sslmode=disable"


def test_promotion_and_rollback_move_no_pointer_when_the_store_cannot_be_written(tmp_path):
    from labelstudio_maskclip.errors import Unavailable
    from labelstudio_maskclip.settings import Settings

    assert ck.promote(tmp_path, _payload()) == "maskclip+-1"  # served from the file
    down = Settings(model_dir=str(tmp_path), store_url=_closed_port_url())
    with pytest.raises(Unavailable, match="cannot open the store"):
        ck.promote(down, _payload())
    assert (ck.models_dir(tmp_path) / "current").read_text() == "maskclip+-1\n"
    assert sorted(p.name for p in ck.models_dir(tmp_path).glob("maskclip+-*")) == ["maskclip+-1.json", "maskclip+-1.pt"]
    for target in ("maskclip", "maskclip+-1"):
        with pytest.raises(Unavailable, match="cannot open the store"):
            ck.rollback(down, target)
        assert (ck.models_dir(tmp_path) / "current").read_text() == "maskclip+-1\n"
    assert ck.promote(tmp_path, _payload()) == "maskclip+-2"  # the failed one took no number


def test_the_served_version_falls_back_to_the_file_for_a_while_when_the_store_cannot_be_reached(
    tmp_path, monkeypatch, caplog
):
    import logging

    from labelstudio_maskclip.settings import Settings

    monkeypatch.setattr(ck, "_store_down_until", {})
    server = _CountingServer()
    ck.promote(tmp_path, _payload())
    down = Settings(model_dir=str(tmp_path), store_url=server.url())
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        assert ck.current_version(down) == "maskclip+-1"
        tried = server.accepted
        assert tried >= 1
        for _ in range(5):  # within the back-off: the file, no connection attempt, no new warning
            assert ck.current_version(down) == "maskclip+-1"
        assert server.accepted == tried
        assert len([r for r in caplog.records if "served version is read from" in r.getMessage()]) == 1
        ck._store_down_until[down.store_url] = 0.0  # the back-off is over: the store is tried again
        assert ck.current_version(down) == "maskclip+-1"
        assert server.accepted > tried
    server.sock.close()


def test_with_an_sqlite_store_the_settings_follow_the_pointer_file(tmp_path):
    """Settings whose store is SQLite (one machine) serve, promote and roll back through the ``current`` file
    alone, as the MODEL_DIR does."""
    from labelstudio_maskclip.settings import Settings

    s = Settings(model_dir=str(tmp_path), store_url=f"sqlite:///{tmp_path / 'store.db'}")
    assert ck.current_version(s) is None
    version = ck.promote(s, _payload())
    assert ck.current_version(s) == version == ck.current_version(tmp_path)
    assert ck.current_checkpoint(s) == ck.checkpoint_path(tmp_path, version)
    assert ck.rollback(s, "maskclip") == "maskclip" and ck.current_version(s) is None
    assert ck.rollback(s, version) == version and ck.current_version(tmp_path) == version
