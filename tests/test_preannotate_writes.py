"""Pre-annotation writes each prediction once against the real Label Studio 1.23.2 (issue #22, item 5):
behind a loopback proxy that answers 504 to a bulk write Label Studio completes, and with two runs at once
(sharing the writer lock, and not sharing it). The same rules against a fake: tests/test_preannotate.py.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from labelstudio_maskclip.commands.preannotate import preannotate
from labelstudio_maskclip.settings import Settings
from tests.test_preannotate import CONFIG, _png
from tests.tiny import TINY_VIT, save_random_state

pytestmark = pytest.mark.e2e

HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "host"}


class Answer504Proxy:
    """Forwards every request to Label Studio; a bulk prediction import is forwarded, completed by Label
    Studio, and then answered ``504`` (a gateway that gave up while the upstream went on writing)."""

    def __init__(self, upstream: str):
        self.upstream, self.imports = upstream.rstrip("/"), 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                reply = requests.request(self.command, proxy.upstream + self.path, headers=headers, data=body,
                                         timeout=300, allow_redirects=False)  # fmt: skip
                if self.command == "POST" and self.path.rstrip("/").endswith("/import/predictions"):
                    proxy.imports += 1
                    self.send_response(504)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(reply.status_code)
                for k, v in reply.headers.items():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_random_state(TINY_VIT, tmp_path_factory.mktemp("w") / "tiny.pt")


def _project(label_studio, title: str, n: int) -> tuple[int, list[int]]:
    api = label_studio.api()
    project = api.create_project(title, CONFIG, evaluate_predictions_automatically=False)["id"]
    api.import_tasks(project, [{"image": _png(seed)} for seed in range(n)])
    return project, sorted(t["id"] for t in api.list_tasks(project, fields_all=False))


def _per_task(label_studio, tasks: list[int], version: str) -> dict[int, int]:
    api = label_studio.api()
    return {t: sum(p["model_version"] == version for p in api.list_predictions(t)) for t in tasks}


def _settings(url: str, token: str, weights: Path, model_dir: Path) -> Settings:
    return Settings(
        model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=32, templates="simple", min_area=0.0,
        model_dir=str(model_dir), label_studio_url=url, label_studio_api_key=token, batch_size=4, fetch_threads=2,
    )  # fmt: skip


def test_a_write_answered_504_while_label_studio_completes_it_is_kept_once(label_studio, weights, tmp_path):
    project, tasks = _project(label_studio, "504 proxy", 7)
    proxy = Answer504Proxy(label_studio.url)
    try:
        s = _settings(proxy.url, label_studio.token, weights, tmp_path / "model_dir")
        result = preannotate(s, project, upload_batch=3, progress=False, settle=10.0)
    finally:
        proxy.stop()
    assert proxy.imports == 3  # three bulk writes, each answered 504 after Label Studio applied it
    assert result.predicted == 7 and not result.failed  # counted from what Label Studio kept
    assert _per_task(label_studio, tasks, result.model_version) == {t: 1 for t in tasks}


def _cli_env(label_studio, weights: Path, model_dir: Path) -> dict[str, str]:
    return {
        **os.environ, "MASKCLIP_MODEL": TINY_VIT,
        "MASKCLIP_PRETRAINED": str(weights), "MASKCLIP_DEVICE": "cpu", "MASKCLIP_SHORT_SIDE": "32",
        "MASKCLIP_TEMPLATES": "simple", "MASKCLIP_MIN_AREA": "0", "MASKCLIP_BATCH_SIZE": "4",
        "MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token, "OMP_NUM_THREADS": "1",
    }  # fmt: skip


@pytest.mark.parametrize("shared", [True, False], ids=["one-model-dir", "two-model-dirs"])
def test_two_runs_at_once_leave_one_prediction_per_task(label_studio, weights, tmp_path, shared):
    """Two ``preannotate`` processes started together on one project: sharing MODEL_DIR, the second waits for
    the first's lock and finds nothing left; on two machines (no shared lock), the end-of-run sweep removes
    what both wrote twice. Either way every task ends with one prediction of the version."""
    project, tasks = _project(label_studio, f"two runs {shared}", 12)
    dirs = [tmp_path / "model_dir"] * 2 if shared else [tmp_path / "a", tmp_path / "b"]
    cmd = [sys.executable, "-m", "labelstudio_maskclip", "preannotate", "--project", str(project),
           "--upload-batch", "2"]  # fmt: skip
    runs = [subprocess.Popen(cmd, env=_cli_env(label_studio, weights, d), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for d in dirs]  # fmt: skip
    outs = [r.communicate(timeout=600) for r in runs]
    assert all(r.returncode == 0 for r in runs), [err[-2000:] for _, err in outs]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    version = summaries[0]["model_version"]
    assert summaries[1]["model_version"] == version
    if shared:
        assert sorted(s["predicted"] for s in summaries) == [0, 12]  # the lock: one writer, then nothing left
    else:
        assert sum(s["predicted"] for s in summaries) >= 12
    assert _per_task(label_studio, tasks, version) == {t: 1 for t in tasks}
