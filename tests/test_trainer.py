"""The trainer (training/train.py) in this process: its command line, the process's entry point and the
training lock it holds, what a run leaves behind (metrics, curves, the promoted checkpoint, the store's
record), and a run that crashed after a checkpoint and is resumed. Tiny student and tiny CLIP, 64 x 64
images, 2 or 3 steps."""

from __future__ import annotations

import fcntl
import json
import os
import re

import pytest
import torch

from labelstudio_maskclip.jobs import settings_env
from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord
from labelstudio_maskclip.training import checkpoints as ck
from labelstudio_maskclip.training import train as tr
from labelstudio_maskclip.training.data import is_validation
from labelstudio_maskclip.training.job import TrainJob, classes_json
from labelstudio_maskclip.training.student import load_student
from labelstudio_maskclip.training.trigger import acquire_training_lock
from tests.test_training import CLASSES, NoisyOracle, _png_data_uri, _settings, synthetic
from tests.tiny import TINY_VIT

VALUES = ("Disc", "Box", "Ground")
NO_LABELS = r"^no labels to train: no accepted masks in the store and no labels given \(--labels\)$"
NAMES = (("disc", "round thing"), ("box",), ("ground",))


def _flat(text: str) -> str:
    return " ".join(text.split())


# --- the command line ----------------------------------------------------------------------------------------


def test_the_trainers_command_line_reads_every_option_and_documents_the_public_ones():
    p = tr.build_parser()
    args = p.parse_args(["--labels", "car|van, dog", "--classes-json", "[]", "--background", "sky", "--project", "3",
                         "--steps", "5", "--resume", "r-1", "--service", "--reason", "every 5", "--lock-fd", "7",
                         "--lock-wait"])  # fmt: skip
    assert vars(args) == {"labels": "car|van, dog", "classes_json": "[]", "background": "sky", "project": 3, "steps": 5,
                          "resume": "r-1", "service": True, "reason": "every 5", "lock_fd": 7, "lock_wait": True}  # fmt: skip
    assert vars(p.parse_args([])) == {"labels": None, "classes_json": None, "background": None, "project": None,
                                      "steps": None, "resume": None, "service": False, "reason": "manual",
                                      "lock_fd": None, "lock_wait": False}  # fmt: skip
    with pytest.raises(SystemExit):
        p.parse_args(["--project", "three"])
    helptext = _flat(p.format_help())
    assert helptext.startswith("usage: python -m labelstudio_maskclip.training.train [-h]")
    first, _, third = (tr.__doc__ or "").split("\n")[:3]
    assert first in helptext and third not in helptext and "--resume RUN_ID" in helptext  # the first line only
    for option, text in [
        ("--labels LABELS", "classes, comma-separated, synonyms with | (default: labels in the store)"),
        ("--classes-json CLASSES_JSON", 'instead of --labels: [{"value": "Car", "names": ["car", "van"]}, ...]'),
        ("--background BACKGROUND", "background classes, comma-separated (pixels become no label)"),
        ("--project PROJECT", "train on one Label Studio project's tasks only"),
        ("--steps STEPS", "override MASKCLIP_TRAIN_STEPS"),
        ("--resume RUN_ID", "continue the run MODEL_DIR/runs/RUN_ID from its last.pt"),
        ("--service", "log lines instead of a progress bar (trigger)"),
        ("--reason REASON", "why this run started (logged)"),
    ]:
        assert f"{option} {text}" in helptext, option
    assert "--lock-fd" not in helptext and "--lock-wait" not in helptext  # the trigger's, not a user's


def test_a_bad_classes_json_is_refused_with_its_reason(capsys):
    with pytest.raises(SystemExit) as exit_:
        tr.train_main(["--classes-json", '[{"value": "Car"}]'])
    assert exit_.value.code == 2
    assert "--classes-json: expected a non-empty list" in capsys.readouterr().err


# --- the trainer process's entry point -----------------------------------------------------------------------


def _environment(monkeypatch, tmp_path, weights, **kw):
    s = _settings(tmp_path / "md", model=TINY_VIT, pretrained=str(weights), templates="simple", rescore=False,
                  **{"train_val_fraction": 0.5, **kw})  # fmt: skip
    for name, value in settings_env(s).items():
        monkeypatch.setenv(name, value)
    return s


def _store(s) -> Store:
    """Tasks 0-5 of project 4 with data-URI images (fetched as Label Studio's would be); people's masks, keyed
    by label value, on tasks 0-2; task 9 in another project."""
    store = Store(s.model_dir)
    for tid in range(6):
        img, gt = synthetic(tid)
        task = TaskRecord(tid, project=4, image=_png_data_uri(img))
        store.put_tasks([task])
        if tid < 3:
            masks = {VALUES[k]: gt == k for k in range(3) if (gt == k).any()}
            store.put_annotation(AnnotationWrite(id=100 + tid, task=task, masks=masks, height=64, width=64))
    store.put_tasks([TaskRecord(9, project=5, image=_png_data_uri(synthetic(9)[0]))])
    return store


def test_the_trainer_process_trains_promotes_records_and_prints_one_json_line(
    tmp_path, weights, monkeypatch, capsys, caplog
):
    """``python -m ...training.train`` as the trigger starts it: the classes and values of the project's
    labelling config, the training lock inherited as a descriptor (closed at the end), the steps overridden.
    The run reads one project, promotes its student with everything a server needs to load it, records
    itself in the store, writes its metrics and curves, and prints the outcome."""
    s = _environment(monkeypatch, tmp_path, weights, min_confidence=1.0)  # nothing is that sure: no label
    store = _store(s)
    lock_path = tmp_path / "md" / "train.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the trigger's lock, handed over
    caplog.set_level("INFO")
    argv = ["--service", "--classes-json", classes_json(NAMES, VALUES), "--background", "sky", "--project", "4",
            "--steps", "3", "--reason", "every 2", "--lock-fd", str(fd)]  # fmt: skip
    assert tr.train_main(argv) == 0
    free = acquire_training_lock(s)  # the trainer closed the descriptor: the lock is free
    assert free is not None
    free.close()

    captured = capsys.readouterr()
    assert "train:" not in captured.err  # --service: log lines, no progress bar
    assert any((tmp_path / "md" / "cache").iterdir())  # the fetched images are cached for the next run
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert set(out) == {"run_id", "promoted", "version", "decision", "miou"}
    assert out["promoted"] and out["version"] == "maskclip+-1" == ck.current_version(s.model_dir)
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-{os.getpid()}", out["run_id"])
    assert set(out["miou"]) == {"teacher", "current", "current_version", "candidate"}
    assert out["miou"]["teacher"] == out["miou"]["candidate"] == 0.0  # validated with the served options
    assert "training starts (reason: every 2" in caplog.text
    assert "re-scoring after promotion of maskclip+-1 is off" in caplog.text

    ckpt = ck.read_checkpoint(ck.checkpoint_path(s.model_dir, "maskclip+-1"))
    served = load_student(ck.checkpoint_path(s.model_dir, "maskclip+-1"), "cpu")  # what a server loads
    assert served.segment([synthetic(0)[0]], NAMES)[0].labels.shape == (64, 64)
    assert ckpt["student"] == "tiny" and ckpt["run_id"] == out["run_id"]
    assert ckpt["classes"] == [list(c) for c in NAMES] and ckpt["values"] == list(VALUES)
    assert ckpt["background"] == [["sky"]] and ckpt["clip"]["model"] == "MaskCLIP-Tiny-ViT"
    assert ckpt["settings"]["train_steps"] == 3 and ckpt["settings"]["model_dir"] == s.model_dir
    assert ckpt["metrics"] == {"miou": out["miou"], "decision": out["decision"], "steps": 3}
    assert ckpt["embeddings"].shape[0] == 4 and ckpt["embeddings"].dtype == torch.float32
    counts = {"annotated": 3, "unlabeled": 3, "validation": 0, "failed_images": 0, "unknown_label_masks": 0}
    held_out = sum(1 for tid in range(3) if is_validation(tid, 0.5))
    counts.update(annotated=3 - held_out, validation=held_out)
    assert ckpt["data"] == counts

    run_dir = tmp_path / "md" / "runs" / out["run_id"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run_id"] == out["run_id"] and metrics["steps"] == 3 and len(metrics["loss"]) == 3
    assert metrics["val_miou"] == [{"step": 3, "miou": out["miou"]["candidate"]}]
    assert metrics["miou"] == out["miou"] and metrics["data"] == counts and metrics["few_masks"]
    assert metrics["promoted"] and metrics["decision"] == out["decision"] and metrics["version"] == "maskclip+-1"
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in run_dir.iterdir()) == ["curves.png", "metrics.json"]  # no resume state, no maps

    (record,) = store.training_runs(4)
    assert record["model_version"] == "maskclip+-1" and record["seq"] == store.current_seq()
    assert record["metrics"] == {"miou": out["miou"], "decision": out["decision"], "data": counts}
    assert store.count_since_last_training(4) == 0 and store.training_runs(5) == []


def test_labels_typed_on_the_command_line_name_their_own_masks(tmp_path, weights, monkeypatch, capsys, caplog):
    """``--labels`` without values: each name is a mask key, the checkpoint records no values; a second run
    gets a new version and a run folder of its own."""
    caplog.set_level("INFO")
    s = _environment(monkeypatch, tmp_path, weights, train_val_fraction=0.0)
    store = Store(s.model_dir)
    for tid in range(3):
        img, gt = synthetic(tid)
        task = TaskRecord(tid, image=_png_data_uri(img))
        store.put_tasks([task])
    masks = {CLASSES[k]: gt == k for k in range(3) if (gt == k).any()}  # keyed by the names
    store.put_annotation(AnnotationWrite(id=7, task=task, masks=masks, height=64, width=64))
    assert tr.train_main(["--service", "--labels", "disc | round thing, box, ground"]) == 0
    first = json.loads(capsys.readouterr().out)
    ckpt = ck.read_checkpoint(ck.checkpoint_path(s.model_dir, first["version"]))
    assert ckpt["classes"] == [["disc", "round thing"], ["box"], ["ground"]] and ckpt["values"] is None
    assert ckpt["background"] == [] and ckpt["settings"]["train_steps"] == 2
    assert ckpt["data"]["annotated"] == 1 and ckpt["data"]["unknown_label_masks"] == 0
    # no labels given: the labels of the accepted masks, sorted, each its own value; a progress bar by hand
    assert tr.train_main([]) == 0
    captured = capsys.readouterr()
    second = json.loads(captured.out)
    assert "train: 100%" in captured.err and "2/2" in captured.err
    ckpt = ck.read_checkpoint(ck.checkpoint_path(s.model_dir, second["version"]))
    assert second["version"] == "maskclip+-2" and ckpt["classes"] == [["box"], ["disc"], ["ground"]]
    assert ckpt["values"] == ["box", "disc", "ground"] and ckpt["data"]["annotated"] == 1
    # a run that does not promote ("better" with no held-out mask to compare on) starts no re-scoring
    monkeypatch.setenv("MASKCLIP_PROMOTE", "better")
    caplog.clear()
    assert tr.train_main(["--service", "--steps", "1"]) == 0
    third = json.loads(capsys.readouterr().out)
    assert not third["promoted"] and third["version"] is None and "training starts" in caplog.text
    assert "re-scoring" not in caplog.text and ck.current_version(s.model_dir) == "maskclip+-2"


def test_only_rank_zero_takes_the_lock_and_a_failed_run_lets_it_go(tmp_path, monkeypatch, caplog):
    """Under torchrun only rank 0 holds the training lock (the others train beside it); a run that fails
    releases it."""
    caplog.set_level("INFO")
    s = _settings(tmp_path)
    empty = TrainJob(classes=None)
    held = acquire_training_lock(s)
    assert held is not None
    monkeypatch.delenv("RANK", raising=False)
    assert tr.run_job(s, empty) == 3  # alone: rank 0, and the lock is taken
    monkeypatch.setenv("RANK", "0")
    assert tr.run_job(s, empty) == 3
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(tr.TrainError, match=NO_LABELS):
        tr.run_job(s, empty)  # rank 1 does not ask for the lock: it fails on the empty store instead
    assert f"training starts (reason: manual, pid {os.getpid()})" in caplog.text  # the default reason
    held.close()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(tr.TrainError, match=NO_LABELS):
        tr.run_job(s, empty)
    again = acquire_training_lock(s)  # the failed run released it
    assert again is not None
    again.close()


def test_the_trainer_process_logs_time_level_and_logger_at_the_configured_level(tmp_path, monkeypatch):
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a fresh process's root logger
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LOG_LEVEL", "debug")
    with pytest.raises(SystemExit):
        tr.train_main(["--classes-json", "[]"])
    (handler,) = root.handlers
    assert root.level == logging.DEBUG
    assert handler.formatter is not None and handler.formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s"


def test_label_values_without_classes_are_refused(tmp_path):
    with pytest.raises(tr.TrainError, match="1 label values for 0 classes: give one value per class"):
        tr.train(_settings(tmp_path), Store(tmp_path), values=["Car"])


def test_images_over_the_pixel_limit_are_not_fetched(tmp_path, weights, monkeypatch):
    """``MASKCLIP_MAX_IMAGE_PIXELS`` below the tasks' 64 x 64: no image is fetched, the run says so."""
    s = _environment(monkeypatch, tmp_path, weights, max_image_pixels=4000)
    _store(s)
    with pytest.raises(tr.TrainError, match=r"no training images: .*'failed_images': 6"):
        tr.train_main(["--service", "--project", "4"])


def test_a_trainer_told_to_wait_for_the_lock_waits_and_an_unknown_run_cannot_be_resumed(tmp_path, weights,
                                                                                       monkeypatch):  # fmt: skip
    """``--lock-wait`` (the trigger hands its lock over): the trainer waits for the lock instead of refusing
    to start. It fetches the tasks' cloud-storage images through Label Studio's presign route for each task,
    then ``--resume`` of a run that left no state names the file it looked for."""
    import base64
    import threading

    from tests.fake_label_studio import fake_label_studio

    def answer(request):
        tid = int(request.route.split("/")[2])
        assert base64.urlsafe_b64decode(request.query["fileuri"]).decode() == f"s3://bucket/{tid}.png"
        request.reply(200, base64.b64decode(_png_data_uri(synthetic(tid)[0]).split(",")[1]), "image/png")

    with fake_label_studio(answer) as ls:
        s = _environment(monkeypatch, tmp_path, weights, label_studio_url=ls.url, label_studio_api_key="key")
        store = Store(s.model_dir)
        store.put_tasks([TaskRecord(tid, image=f"s3://bucket/{tid}.png") for tid in range(3)])
        held = acquire_training_lock(s)
        assert held is not None
        threading.Timer(0.5, held.close).start()  # without --lock-wait the run would end at once (exit 3)
        with pytest.raises(tr.TrainError, match=r"cannot resume: .*runs/no-such-run/last\.pt does not exist"):
            tr.train_main(["--service", "--lock-wait", "--labels", "disc,box", "--resume", "no-such-run"])
        assert sorted(r.route for r in ls.requests) == [f"/tasks/{tid}/presign/" for tid in range(3)]


# --- a crash after a checkpoint, and the resumed run ----------------------------------------------------------


class CrashingOracle(NoisyOracle):
    """The noisy oracle, until its ``crash_at``-th call: then the process "dies" (an error)."""

    def __init__(self, crash_at: int):
        super().__init__(seed=1)
        self.calls, self.crash_at = 0, crash_at

    def probs(self, images):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("killed")
        return super().probs(images)


class AnnotatingOracle(NoisyOracle):
    """The noisy oracle; at its first call someone accepts a mask of task 5 in the store."""

    def __init__(self, store: Store):
        super().__init__(seed=1)
        self.store = store

    def probs(self, images):
        if self.store is not None:
            task = TaskRecord(5, image="img-5")
            self.store.put_annotation(AnnotationWrite(id=99, task=task, masks={"disc": synthetic(5)[1] == 0},
                                                      height=64, width=64))  # fmt: skip
            self.store = None
        return super().probs(images)


def test_a_run_killed_after_a_checkpoint_resumes_from_it(tmp_path):
    """Checkpoints every step: the candidate's validation mIoU and ``last.pt``. Killed in its third step, the
    run left ``last.pt`` at step 2; resumed, it keeps those two losses and evaluations and ends at step 3."""
    s = _settings(tmp_path, train_steps=3, train_val_fraction=1.0, train_self_training_start=1.0)
    sure = s.replace(min_confidence=1.0, model_dir=str(tmp_path / "sure"))  # no pixel is that sure: no label
    store = Store(tmp_path)
    images = {}
    for tid in range(6):
        img, gt = synthetic(tid)
        images[ref := f"img-{tid}"] = img
        masks = {CLASSES[k]: gt == k for k in range(3) if (gt == k).any()} if tid < 2 else None
        task = TaskRecord(tid, image=ref)
        store.put_tasks([task])
        if masks:
            store.put_annotation(AnnotationWrite(id=tid + 1, task=task, masks=masks, height=64, width=64))
    load = lambda ref, tid: images[ref]  # noqa: E731
    with pytest.raises(RuntimeError, match="killed"):
        tr.train(s, store, load_image=load, teacher=CrashingOracle(3), classes=CLASSES, progress=False,
                 checkpoint_every=1)  # fmt: skip
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["step"] == 2 and len(saved["losses"]) == 2 and [e["step"] for e in saved["evals"]] == [1, 2]
    assert all(0.0 < e["miou"] <= 1.0 for e in saved["evals"])
    with pytest.raises(RuntimeError, match="killed"):  # validation segments with the served options
        tr.train(sure, store, load_image=load, teacher=CrashingOracle(3), classes=CLASSES, progress=False,
                 checkpoint_every=1)  # fmt: skip
    (unsure,) = (tmp_path / "sure" / "runs").iterdir()
    assert [e["miou"] for e in torch.load(unsure / "last.pt", weights_only=True)["evals"]] == [0.0, 0.0]
    during = AnnotatingOracle(store)  # someone accepts a mask while the resumed run trains
    result = tr.train(s, store, load_image=load, teacher=during, classes=CLASSES, progress=False,
                      resume=run_dir.name, checkpoint_every=1)  # fmt: skip
    m = result.metrics
    assert result.run_id == run_dir.name and m["steps"] == 3 and m["loss"][:2] == saved["losses"]
    assert m["val_miou"] == [*saved["evals"], {"step": 3, "miou": m["miou"]["candidate"]}]
    assert m["data"]["validation"] == 2 and not (run_dir / "last.pt").exists()
    assert result.version == "maskclip+-1" and result.promoted
    assert store.count_since_last_training() == 1  # the run saw the store as it was when it started


def test_the_seed_draws_the_crops_so_a_run_can_be_repeated(tmp_path):
    """With the student's starting weights fixed (``torch.manual_seed``), the same seed, data and teacher train
    the same student step for step: the crops and flips come from ``seed``, rank and step, not from the clock.
    Another seed draws other crops."""
    losses = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        store = Store(tmp_path / name)
        images = {}
        for tid in range(4):
            images[ref := f"img-{tid}"] = synthetic(tid)[0]
            store.put_tasks([TaskRecord(tid, image=ref)])
        torch.manual_seed(0)
        result = tr.train(_settings(tmp_path / name), store, load_image=lambda ref, tid, images=images: images[ref],
                          teacher=NoisyOracle(), classes=CLASSES, progress=False, seed=seed)  # fmt: skip
        losses[name] = result.metrics["loss"]
    assert len(losses["first"]) == 2 and losses["again"] == losses["first"]
    assert losses["other"] != losses["first"]
