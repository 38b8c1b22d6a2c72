"""The command line: files written by `segment`, errors people see, and the store commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from labelstudio_maskclip.cli import main
from tests.photos import COCO128_PHOTOS
from tests.tiny import TINY_VIT

PHOTOS = COCO128_PHOTOS


def _model(weights) -> list[str]:
    return ["--model", TINY_VIT, "--pretrained", str(weights), "--device", "cpu", "--short-side", "64"]


def test_segment_writes_label_png_overlay_and_summary_per_image(tmp_path, weights):
    images = [PHOTOS / "000000000009.jpg", PHOTOS / "000000000030.jpg"]
    out = tmp_path / "out"
    code = main(["segment", *map(str, images), "--labels", "food,bowl|dish,table", "--background", "wall",
                 "--out", str(out), *_model(weights)])  # fmt: skip
    assert code == 0
    for path in images:
        stem = path.stem
        labels = np.array(Image.open(out / f"{stem}.labels.png"))
        photo = Image.open(path)
        assert labels.shape == (photo.height, photo.width) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1, 2, 255}
        overlay = Image.open(out / f"{stem}.overlay.png")
        assert overlay.size == photo.size and overlay.mode == "RGB"
        assert not np.array_equal(np.array(overlay), np.array(photo.convert("RGB")))
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["width"] == photo.width and summary["height"] == photo.height
        for name, info in summary["labels"].items():
            k = summary["label_values"][name]
            assert info["area"] == int((labels == k).sum()) > 0 and 0 < info["score"] <= 1
        assert sum(i["area"] for i in summary["labels"].values()) == int((labels != 255).sum())


def test_segment_reports_unreadable_images_and_goes_on(tmp_path, weights, caplog):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    code = main(["segment", str(bad), str(PHOTOS / "000000000009.jpg"), "--labels", "a,b", "--out",
                 str(tmp_path / "o"), *_model(weights)])  # fmt: skip
    assert code == 1
    assert (tmp_path / "o" / "000000000009.json").exists() and not (tmp_path / "o" / "broken.json").exists()
    assert any("broken.jpg" in r.getMessage() for r in caplog.records)


def test_random_weights_and_missing_files_are_refused_with_the_setting_named(tmp_path, caplog):
    assert main(["segment", str(PHOTOS / "000000000009.jpg"), "--labels", "a", "--out", str(tmp_path),
                 "--model", TINY_VIT, "--pretrained", "random", "--device", "cpu"]) == 2  # fmt: skip
    assert "MASKCLIP_ALLOW_RANDOM" in caplog.text
    assert main(["segment", str(PHOTOS / "000000000009.jpg"), "--labels", "a", "--out", str(tmp_path),
                 "--model", TINY_VIT, "--pretrained", str(tmp_path / "none.pt")]) == 2  # fmt: skip
    assert "MASKCLIP_PRETRAINED" in caplog.text


def test_a_label_studio_command_without_its_address_is_a_one_line_error(caplog):
    """README's `preannotate` run in a new shell (no LABEL_STUDIO_URL): the settings to set, exit 2, no trace."""
    assert main(["preannotate", "--project", "1"]) == 2
    assert "set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY)" in caplog.text


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The command as a person runs it: its own process, stderr as printed."""
    command = [sys.executable, "-m", "labelstudio_maskclip", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_a_bad_input_to_any_command_is_one_line_and_exit_2_an_unexpected_error_its_traceback(tmp_path):
    """The CLI's one handler: an error of the package's tree (a bad setting before any command runs, a
    labeling config without a mask control, an export file that is not JSON, an option missing its
    partner) prints one line naming what to change and exits 2; an error outside the tree keeps its
    traceback (exit 1)."""
    config = tmp_path / "config.xml"
    config.write_text('<View><Image name="image" value="$image"/></View>')
    export = tmp_path / "export.json"
    export.write_text("not json")
    store = {"MODEL_DIR": str(tmp_path / "model")}
    cases = [
        (["stats"], {**store, "MASKCLIP_SHORT_SIDE": "abc"}, "MASKCLIP_SHORT_SIDE='abc' is not a valid int"),
        (["export-coco", "--out", str(tmp_path / "c.json"), "--label-config", str(config)], store, "<BrushLabels>"),
        (["backfill", "--export", str(export)], store, "cannot read the Label Studio export"),
        (["export-coco", "--out", str(tmp_path / "c.json"), "--from-api"], store, "--from-api needs --project"),
    ]
    for args, env, message in cases:
        run = _run_cli(*args, **env)
        assert (run.returncode, run.stdout) == (2, ""), (args, run.stderr[-2000:])
        assert len(run.stderr.splitlines()) == 1 and message in run.stderr, (args, run.stderr[-2000:])
    a_file = tmp_path / "a_file"
    a_file.write_text("")  # --out names a file, not a folder: the OS refuses, outside the package's errors
    run = _run_cli("segment", str(PHOTOS / "000000000009.jpg"), "--labels", "a", "--out", str(a_file), **store)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and "Traceback" in run.stderr and last.startswith("FileExistsError"), run.stderr


def test_history_and_rollback_without_students(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert main(["history"]) == 0
    assert "MaskCLIP is served" in capsys.readouterr().out
    assert main(["rollback", "maskclip+-7"]) == 2
