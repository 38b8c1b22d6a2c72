"""Training triggers: single flight across processes, detached trainer, crash safety, the N and interval rules."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelstudio_maskclip import jobs
from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training import trigger
from labelstudio_maskclip.training.student import build_student
from tests.tiny import TINY_VIT


def _data_uri(seed: int) -> str:
    img = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _annotate(store: Store, ann_id: int, task_id: int) -> None:
    mask = np.zeros((40, 48), bool)
    mask[5:20, 5:30] = True
    store.put_annotation(
        AnnotationWrite(
            id=ann_id,
            task=TaskRecord(task_id, image=_data_uri(task_id)),
            masks={"cat": mask, "dog": ~mask},
            height=40,
            width=48,
        )
    )


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _training_running(model_dir: Path) -> bool:
    """True while someone (the trainer process) holds the training lock."""
    lock = trigger.acquire_training_lock(model_dir)
    if lock is None:
        return True
    lock.close()
    return False


def _log_text(model_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((model_dir / "runs").glob("train-*.log")))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def setup(tmp_path, weights):
    clip = weights
    model_dir = tmp_path / "model_dir"
    s = Settings(
        model=TINY_VIT,
        pretrained=str(clip),
        device="cpu",
        model_dir=str(model_dir),
        student="tiny",
        student_pretrained="none",
        train_steps=100_000,
        train_batch_size=2,
        train_crop=32,
        short_side=32,
        templates="simple",
        promote="always",
    )
    store = Store(model_dir)
    store.put_tasks([TaskRecord(t, image=_data_uri(t)) for t in range(3)])
    _annotate(store, 100, 0)
    net = build_student("tiny", torch.nn.functional.normalize(torch.randn(2, 32), dim=1), "none")
    served = ck.promote(
        model_dir,
        {
            "student": "tiny",
            "state_dict": net.state_dict(),
            "embeddings": net.classifier.weight[:, :, 0, 0].detach(),
            "classes": [["cat"], ["dog"]],
            "background": [],
        },
    )
    return s, store, model_dir, served


def test_killed_trainer_leaves_served_model_intact_and_single_flight_holds(setup):
    s, store, model_dir, served = setup
    served_file = ck.checkpoint_path(model_dir, served)
    before = (_digest(served_file), ck.current_version(model_dir))

    assert trigger.request_training(s, "test long run")
    assert not trigger.request_training(s, "second request")  # the trainer process holds the lock
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from labelstudio_maskclip.settings import Settings; "
         "from labelstudio_maskclip.training.trigger import request_training; "
         f"print(request_training(Settings(model_dir={str(model_dir)!r}), 'other process'))"],
        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert other.stdout.strip() == "False", other.stderr
    _wait(lambda: "step 1/100000" in _log_text(model_dir), 90, "the trainer's first step")
    pid = int(re.search(r"training starts \(reason: test long run, pid (\d+)\)", _log_text(model_dir)).group(1))
    assert _training_running(model_dir)

    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _training_running(model_dir), 30, "the lock to be released")
    assert (_digest(served_file), ck.current_version(model_dir)) == before
    assert [h["version"] for h in ck.history(model_dir)] == [served]

    assert trigger.request_training(s.replace(train_steps=2), "after the crash")
    _wait(lambda: ck.current_version(model_dir) == "maskclip+-2", 90, "the next run's promotion")
    _wait(lambda: not _training_running(model_dir), 30, "the trainer to exit")
    assert "promoted maskclip+-2" in _log_text(model_dir)
    assert _digest(served_file) == before[0]  # older versions are never rewritten


def test_on_a_postgresql_store_the_trainer_holds_the_lock_for_every_instance_until_killed(setup, postgres_url):
    """With MASKCLIP_STORE_URL=postgresql://..., the lock is the database's: another instance (its own
    MODEL_DIR) is refused while the trainer lives, a kill -9 frees it, and the runs are recorded there."""
    s, _, model_dir, served = setup
    s = s.replace(store_url=postgres_url)
    store = Store(postgres_url)
    store.put_tasks([TaskRecord(t, image=_data_uri(t)) for t in range(3)])
    _annotate(store, 100, 0)

    def running() -> bool:
        held = trigger.acquire_training_lock(s)
        if held is None:
            return True
        held.close()
        return False

    other_instance = s.replace(model_dir=str(model_dir.parent / "other-instance"))
    assert trigger.request_training(s, "test long run")
    assert not trigger.request_training(other_instance, "another instance")  # held, then handed over: no gap
    _wait(lambda: "step 1/100000" in _log_text(model_dir), 90, "the trainer's first step")
    assert running() and not trigger.request_training(other_instance, "another instance")
    pid = int(re.search(r"training starts \(reason: test long run, pid (\d+)\)", _log_text(model_dir)).group(1))
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not running(), 30, "the lock to be released")
    assert ck.current_version(model_dir) == served and store.training_runs() == []

    assert trigger.request_training(s.replace(train_steps=2), "after the crash")
    _wait(lambda: ck.current_version(model_dir) == "maskclip+-2", 90, "the next run's promotion")
    _wait(lambda: not running(), 30, "the trainer to exit")
    assert [r["model_version"] for r in store.training_runs()] == ["maskclip+-2"]


def test_trainer_cli_refuses_to_run_beside_another(setup):
    s, _, model_dir, _ = setup
    held = trigger.acquire_training_lock(model_dir)
    try:
        env = jobs.settings_env(s)
        proc = subprocess.run(
            [sys.executable, "-m", "labelstudio_maskclip.training.train", "--service"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 3 and "another training holds" in proc.stderr
        assert not trigger.request_training(s, "while held")
    finally:
        held.close()
    assert not _training_running(model_dir)


def test_every_n_rule(setup):
    s, store, model_dir, _ = setup
    assert not trigger.should_train(s, store)  # train_every_n = 0: off
    s2 = s.replace(train_every_n=2)
    assert not trigger.should_train(s2, store)  # 1 new annotation
    _annotate(store, 101, 1)
    assert trigger.should_train(s2, store)
    store.mark_trained()
    assert not trigger.should_train(s2, store)
    _annotate(store, 104, 2)
    assert trigger.should_train(s.replace(train_every_n=1), store)  # every single annotation


def test_interval_rule(setup):
    s, store, model_dir, _ = setup
    assert trigger.maybe_interval(s, store) is False  # interval 0: off
    s2 = s.replace(train_interval_minutes=10)
    store.mark_trained()
    assert trigger.maybe_interval(s2, store) is False  # nothing new since the last training
    held = trigger.acquire_training_lock(model_dir)  # stand-in for a running trainer: nothing starts
    try:
        _annotate(store, 102, 2)
        stamp = model_dir / "train.last"
        stamp.touch()
        assert not trigger.maybe_interval(s2, store, now=time.time() + 60)  # 1 min < 10 min
        assert not trigger.maybe_interval(s2, store, now=time.time() + 11 * 60)  # due, but the lock is held
    finally:
        held.close()


def test_settings_travel_to_the_trainer_environment(setup):
    s = setup[0].replace(train_lr=0.02, key_smoothing=False)
    assert Settings.from_env(jobs.settings_env(s)) == s


def test_a_projects_label_values_travel_with_its_classes_to_the_trainer(tmp_path, monkeypatch):
    """START_TRAINING for a project whose labels have predicted_values: the trainer process is told each
    class's model-side names AND its label value (people's masks are keyed by the value)."""
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend
    from labelstudio_maskclip.training import train as tr

    config = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
      <Label value="Car" predicted_values="car, automobile"/><Label value="Sky, clear"/>
      <Label value="Road" predicted_values="road|street"/></BrushLabels></View>"""
    commands = []

    class Started:
        pid = 1

        def __init__(self, cmd, **kwargs):
            commands.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(jobs.subprocess, "Popen", Started)
    s = Settings(model_dir=str(tmp_path))
    reply = MaskCLIPBackend(s).fit(
        "START_TRAINING", {"action": "START_TRAINING", "project": {"id": 7, "label_config": config}}
    )
    assert reply["training"] == "started" and len(commands) == 1
    args = commands[0][commands[0].index("labelstudio_maskclip.training.train") + 1 :]
    at = args.index("--lock-fd")
    args = args[:at] + args[at + 2 :]
    seen = {}
    monkeypatch.setattr(tr, "train", lambda settings, store, **kw: seen.update(kw))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert tr.train_main(args) == 0
    assert seen["classes"] == (("car", "automobile"), ("Sky, clear",), ("road|street",))
    assert seen["values"] == ("Car", "Sky, clear", "Road") and seen["project"] == 7


def test_interval_rule_fires_when_due_and_something_is_new(setup, monkeypatch):
    s, store, model_dir, _ = setup
    started = []
    monkeypatch.setattr(
        trigger, "request_training", lambda settings, reason, **kw: started.append((reason, kw)) or True
    )
    s2 = s.replace(train_interval_minutes=10)
    stamp = model_dir / "train.last"
    assert not stamp.exists()  # no trigger ever started a training: due as soon as something is new
    assert trigger.maybe_interval(s2, store, classes=[("cat",)], project=None)
    assert started == [("interval 10 min", {"classes": [("cat",)], "values": None, "background": (), "project": None})]
    stamp.touch()
    last = stamp.stat().st_mtime
    assert trigger.maybe_interval(s2, store, now=last + 9 * 60) is False  # 9 min < 10 min
    assert trigger.maybe_interval(s2, store, now=last + 10 * 60)  # exactly due
    assert len(started) == 2
    store.mark_trained()
    assert not trigger.maybe_interval(s2, store, now=last + 60 * 60)  # due, but nothing new since
    _annotate(store, 103, 1)
    s3 = s2.replace(train_interval_minutes=0.5)
    assert not trigger.maybe_interval(s3, store, now=last + 31, project=7)  # nothing new in project 7
    assert trigger.maybe_interval(s3, store, now=last + 31, background=["sky"])
    assert started[-1] == (
        "interval 0.5 min",
        {"classes": None, "values": None, "background": ["sky"], "project": None},
    )


def test_the_interval_rule_reads_the_clock_when_not_given_a_time(setup, monkeypatch):
    """As the server's timer calls it (no ``now``): due when the last start is older than the interval."""
    s, store, model_dir, _ = setup
    started = []
    monkeypatch.setattr(trigger, "request_training", lambda settings, reason, **kw: started.append(reason) or True)
    s2 = s.replace(train_interval_minutes=10)
    stamp = model_dir / "train.last"
    stamp.touch()
    assert trigger.maybe_interval(s2, store) is False and started == []  # started a moment ago
    os.utime(stamp, (time.time() - 11 * 60, time.time() - 11 * 60))
    assert trigger.maybe_interval(s2, store) is True and started == ["interval 10 min"]


class _FakeTrainer:
    """Stands in for the trainer process: records how it was started, exits at once."""

    calls: list = []

    def __init__(self, cmd, **kwargs):
        self.pid = 4242
        _FakeTrainer.calls.append((cmd, kwargs))

    def wait(self):
        return 0


def test_request_training_starts_one_detached_trainer_with_the_labels(setup, monkeypatch):
    s, _, model_dir, _ = setup
    _FakeTrainer.calls = []
    monkeypatch.setattr(jobs.subprocess, "Popen", _FakeTrainer)
    assert trigger.request_training(s, "why", classes=[("car", "automobile"), "dog"], background=["sky"], project=3)
    ((cmd, kwargs),) = _FakeTrainer.calls
    assert cmd[1:3] == ["-m", "labelstudio_maskclip.training.train"]
    assert cmd[cmd.index("--reason") + 1] == "why"
    assert json.loads(cmd[cmd.index("--classes-json") + 1]) == [{"names": ["car", "automobile"]}, {"names": ["dog"]}]
    assert cmd[cmd.index("--background") + 1] == "sky"
    assert cmd[cmd.index("--project") + 1] == "3"
    lock_fd = int(cmd[cmd.index("--lock-fd") + 1])
    assert kwargs["pass_fds"] == (lock_fd,) and kwargs["start_new_session"] is True
    assert Settings.from_env(kwargs["env"]) == s  # the trainer reads the same settings
    assert (model_dir / "train.last").exists()  # the interval rule counts from now
    assert list((model_dir / "runs").glob("train-*.log"))  # the trainer's output goes to a run log
    assert not _training_running(model_dir)  # this process kept no copy of the lock (the fake child has none)
    _FakeTrainer.calls = []
    assert trigger.request_training(s, "again")  # no trainer holds the lock: a new one starts
    ((cmd, _),) = _FakeTrainer.calls
    assert "--classes-json" not in cmd and "--background" not in cmd and "--project" not in cmd


def test_a_started_trainer_is_waited_for_by_a_daemon_thread_named_for_it(setup, monkeypatch):
    """The server reaps each trainer it starts (no zombie once it exits) in a thread of its own that never
    keeps the server from exiting, named for the trainer's pid in thread dumps."""
    s = setup[0]
    waited = []

    class Trainer(_FakeTrainer):
        def wait(self):
            me = threading.current_thread()
            waited.append((me.name, me.daemon, me is threading.main_thread()))
            return 0

    monkeypatch.setattr(jobs.subprocess, "Popen", Trainer)
    assert trigger.request_training(s, "reaped")
    _wait(lambda: waited, 10, "the reaper to wait for the trainer")
    assert waited == [("reap-trainer-4242", True, False)]


def test_request_training_refuses_while_the_lock_is_held(setup, monkeypatch):
    s, _, model_dir, _ = setup
    _FakeTrainer.calls = []
    monkeypatch.setattr(jobs.subprocess, "Popen", _FakeTrainer)
    held = trigger.acquire_training_lock(model_dir)
    assert held is not None and trigger.acquire_training_lock(model_dir) is None
    try:
        assert trigger.request_training(s, "while held") is False
        assert _FakeTrainer.calls == [] and not (model_dir / "train.last").exists()
    finally:
        held.close()


def test_the_lock_lives_in_a_model_dir_created_on_demand(tmp_path):
    model_dir = tmp_path / "not" / "yet"
    lock = trigger.acquire_training_lock(model_dir)
    try:
        assert lock is not None and (model_dir / trigger.LOCK_FILE).is_file()
        assert _training_running(model_dir)
    finally:
        lock.close()
    assert not _training_running(model_dir)


def _webhook(annotation_id: int, task_id: int, action: str = "ANNOTATION_CREATED") -> dict:
    from tests.test_collect import brush, disc, event

    return event(annotation_id, task_id, [brush("r1", "cat", disc(20, 30, 10))], action=action)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"train_every_n": 2}, "2 new annotations"), ({"train_interval_minutes": 10}, "interval 10 min"), ({}, None)],
)
def test_a_stored_annotation_starts_training_by_the_rule_that_is_on(setup, monkeypatch, changes, reason):
    """Two annotations of project 1 arrive: the every-2 rule fires on the second, the interval rule on the
    first (never trained, something new), and with both rules off nothing starts."""
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend

    s, _, _, _ = setup
    _FakeTrainer.calls = []
    monkeypatch.setattr(jobs.subprocess, "Popen", _FakeTrainer)
    backend = MaskCLIPBackend(s.replace(**changes))
    first = backend.fit("ANNOTATION_CREATED", _webhook(200, 1))
    if "train_every_n" in changes:
        assert first["status"] == "stored" and "training" not in first and _FakeTrainer.calls == []
        reply = backend.fit("ANNOTATION_CREATED", _webhook(201, 2))
    else:
        reply = first
    assert reply["status"] == "stored"
    if reason is None:
        assert "training" not in reply and _FakeTrainer.calls == []
        return
    assert reply["training"] == "started"
    ((cmd, _),) = _FakeTrainer.calls
    assert cmd[cmd.index("--reason") + 1] == reason
    assert json.loads(cmd[cmd.index("--classes-json") + 1]) == [
        {"names": ["cat"], "value": "cat"},
        {"names": ["dog"], "value": "dog"},
    ]
    assert cmd[cmd.index("--project") + 1] == "1"


@pytest.mark.parametrize("changes", [{"train_every_n": 1}, {"train_interval_minutes": 10}])
def test_a_webhook_that_stores_nothing_starts_no_training(setup, monkeypatch, changes):
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend

    s, _, _, _ = setup
    _FakeTrainer.calls = []
    monkeypatch.setattr(jobs.subprocess, "Popen", _FakeTrainer)
    backend = MaskCLIPBackend(s.replace(**changes))
    for action in ("PROJECT_UPDATED", "ANNOTATIONS_DELETED"):
        reply = backend.fit(action, _webhook(300, 2, action))
        assert reply["status"] != "stored" and "training" not in reply
    assert _FakeTrainer.calls == []


def test_a_rule_that_fires_while_a_trainer_runs_says_so(setup, monkeypatch):
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend

    s, _, model_dir, _ = setup
    _FakeTrainer.calls = []
    monkeypatch.setattr(jobs.subprocess, "Popen", _FakeTrainer)
    held = trigger.acquire_training_lock(model_dir)
    try:
        reply = MaskCLIPBackend(s.replace(train_every_n=1)).fit("ANNOTATION_CREATED", _webhook(201, 1))
    finally:
        held.close()
    assert reply["training"] == "already running" and _FakeTrainer.calls == []


class _QueuingTrainer(_FakeTrainer):
    """Stands in for a trainer started with ``--lock-wait``: alive until ``exited`` is set."""

    started: list = []

    def __init__(self, cmd, **kwargs):
        super().__init__(cmd, **kwargs)
        self.exited = None
        _QueuingTrainer.started.append(self)

    def poll(self):
        return self.exited


def test_on_a_postgresql_store_the_server_keeps_the_lock_until_its_trainer_queues_for_it(setup, monkeypatch,
                                                                                        postgres_url):  # fmt: skip
    """In process, with a stand-in trainer: the advisory lock cannot be inherited, so the trainer is told to
    queue for it (``--lock-wait``, no descriptor passed) and a daemon thread of the server keeps it until then:
    no other instance gets it in between; the trainer that queues gets it; one that dies first frees it."""
    s = setup[0].replace(store_url=postgres_url)
    other = s.replace(model_dir=str(Path(s.model_dir).parent / "other-instance"))
    _FakeTrainer.calls, _QueuingTrainer.started = [], []
    monkeypatch.setattr(jobs.subprocess, "Popen", _QueuingTrainer)
    assert trigger.request_training(s, "handed over")
    ((cmd, kwargs),) = _FakeTrainer.calls
    assert "--lock-wait" in cmd and "--lock-fd" not in cmd and kwargs["pass_fds"] == ()
    (thread,) = [t for t in threading.enumerate() if t.name == "hand-over-4242"]
    assert thread.daemon
    assert trigger.acquire_training_lock(other) is None and not trigger.request_training(other, "another instance")
    queued: list = []
    trainer = threading.Thread(target=lambda: queued.append(trigger.acquire_training_lock(s, wait=True)))
    trainer.start()  # the trainer queues for the lock, as the real one does with --lock-wait
    trainer.join(30)
    thread.join(30)
    assert queued and queued[0] is not None and not thread.is_alive()  # handed over
    assert trigger.acquire_training_lock(other) is None  # the trainer holds it now
    queued[0].close()
    assert trigger.request_training(s, "a trainer that dies before it queues")
    assert trigger.acquire_training_lock(other) is None
    _QueuingTrainer.started[-1].exited = 1
    _wait(lambda: not _training_running(other), 10, "the lock to be let go when its trainer died")


@pytest.mark.parametrize("postgresql", [False, True])
def test_a_trainer_that_cannot_be_started_leaves_the_lock_free(setup, monkeypatch, postgres_url, postgresql):
    s = setup[0].replace(store_url=postgres_url if postgresql else "")

    def cannot_start(cmd, **kwargs):
        raise OSError("no such interpreter")

    monkeypatch.setattr(jobs.subprocess, "Popen", cannot_start)
    with pytest.raises(OSError, match="no such interpreter"):
        trigger.request_training(s, "cannot start")
    held = trigger.acquire_training_lock(s)
    assert held is not None
    held.close()
