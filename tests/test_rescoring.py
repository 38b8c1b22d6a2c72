"""Re-scoring after the served model changes: when the job starts, what it is told, and its status file
(training/rescoring.py). The job itself is tested end to end in tests/test_active_learning.py."""

from __future__ import annotations

import json

from labelstudio_maskclip import jobs
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training.rescoring import STATUS_FILE, read_status, start_rescore, write_status


class _FakeJob:
    """Stands in for the job's process: records how it was started."""

    calls: list = []

    def __init__(self, cmd, **kwargs):
        self.pid = 4343
        _FakeJob.calls.append((cmd, kwargs))


def test_the_status_is_none_until_a_job_wrote_one_and_then_what_it_wrote(tmp_path):
    assert read_status(tmp_path) is None
    (tmp_path / STATUS_FILE).write_text('{"state": "runn')  # a torn file (an older writer) reads as none
    assert read_status(tmp_path) is None
    running = {"state": "running", "version": "maskclip+-2", "projects": {"1": {"done": 3, "total": 9}}}
    write_status(tmp_path, running)
    assert read_status(tmp_path) == running
    done = {**running, "state": "done"}
    write_status(tmp_path, done)
    assert read_status(tmp_path) == done
    assert json.loads((tmp_path / "rescore.json").read_text()) == done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rescore.json"]  # no temporary file left


def test_rescoring_starts_a_detached_job_for_the_project_with_the_reason(tmp_path, monkeypatch):
    _FakeJob.calls = []
    monkeypatch.setattr(jobs.subprocess, "Popen", _FakeJob)
    s = Settings(model_dir=str(tmp_path), label_studio_url="http://ls.example:8080")
    assert start_rescore(s, project=7, reason="maskclip+-3 promoted") == 4343
    ((cmd, kwargs),) = _FakeJob.calls
    assert cmd[1:] == [
        "-m",
        "labelstudio_maskclip.commands.rescore",
        "--reason",
        "maskclip+-3 promoted",
        "--project",
        "7",
    ]
    assert kwargs["start_new_session"] is True and Settings.from_env(kwargs["env"]) == s
    assert len(list((tmp_path / "runs").glob("rescore-*.log"))) == 1
    _FakeJob.calls = []
    assert start_rescore(s) == 4343  # every project, the default reason
    ((cmd, _),) = _FakeJob.calls
    assert cmd[1:] == ["-m", "labelstudio_maskclip.commands.rescore", "--reason", "new model"]


def test_no_job_when_rescoring_is_off_or_label_studio_is_unknown(tmp_path, monkeypatch):
    _FakeJob.calls = []
    monkeypatch.setattr(jobs.subprocess, "Popen", _FakeJob)
    url = "http://ls.example:8080"
    assert start_rescore(Settings(model_dir=str(tmp_path), label_studio_url=url, rescore=False), project=1) is None
    assert start_rescore(Settings(model_dir=str(tmp_path)), project=1) is None
    assert _FakeJob.calls == [] and not (tmp_path / "runs").exists()


def test_a_second_job_waits_for_the_running_one_by_default(tmp_path):
    """The job takes the lock without saying ``wait``: one started while another runs queues behind it."""
    import threading

    from labelstudio_maskclip.training.rescoring import acquire_rescore_lock

    s = Settings(model_dir=str(tmp_path))
    running = acquire_rescore_lock(s, wait=False)
    assert running is not None and acquire_rescore_lock(s, wait=False) is None
    got: list = []
    second = threading.Thread(target=lambda: got.append(acquire_rescore_lock(s)), daemon=True)
    second.start()
    try:
        second.join(1.0)
        assert second.is_alive() and got == []  # queued behind the running job
    finally:
        running.release()
    second.join(20)
    assert not second.is_alive() and got and got[0] is not None
    got[0].release()
