"""Training triggers: single flight across processes, detached trainer, crash safety, the N and interval rules."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelstudio_maskclip.learning import trigger
from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord
from labelstudio_maskclip.settings import Settings
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training.student import build_student
from tests.tiny import TINY_VIT, save_random_state


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
def setup(tmp_path):
    clip = save_random_state(TINY_VIT, tmp_path / "tiny_vit.pt")
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
         "from labelstudio_maskclip.learning.trigger import request_training; "
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


def test_trainer_cli_refuses_to_run_beside_another(setup):
    s, _, model_dir, _ = setup
    held = trigger.acquire_training_lock(model_dir)
    try:
        env = trigger._settings_env(s)
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


def test_interval_rule(setup):
    s, store, model_dir, _ = setup
    assert not trigger.maybe_interval(s, store)  # interval 0: off
    s2 = s.replace(train_interval_minutes=10)
    store.mark_trained()
    assert not trigger.maybe_interval(s2, store)  # nothing new since the last training
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
    assert Settings.from_env(trigger._settings_env(s)) == s
