"""A real Label Studio for tests: a server on a loopback port, and the package's API client with the calls
that set Label Studio up.

The server is ``label-studio start`` from its own virtualenv (``LABEL_STUDIO_VENV``, default
``.ls-venv`` in the repository root; ``scripts/install-label-studio.sh`` creates it), with a temporary
data dir, SQLite, a generated legacy API token and, unless told otherwise, the settings the README documents
for a backend on the same machine (``LABEL_STUDIO_SETTINGS["same machine"]`` in
``labelstudio_maskclip/commands/network.py``, the list ``docker/docker-compose.yml`` is checked against):
Label Studio's address checks stay on, and it may call loopback addresses. ``address_settings={}`` starts it
with its defaults (loopback and private networks blocked).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from labelstudio_maskclip.commands.network import LABEL_STUDIO_SETTINGS, SWITCHES
from labelstudio_maskclip.fetching.images import ImageFetcher
from labelstudio_maskclip.labelstudio import api
from labelstudio_maskclip.settings import Settings

__all__ = ["LabelStudioAPI", "LabelStudioServer", "LabelStudioUnavailable", "free_port", "started"]

REPO_ROOT = Path(__file__).resolve().parents[1]
VERSION = "1.23.2"
INSTALL_HINT = f"run scripts/install-label-studio.sh (creates the venv and installs label-studio=={VERSION})"


class LabelStudioUnavailable(RuntimeError):
    """Label Studio is not installed, or did not start; the message says why and what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def label_studio_venv() -> Path:
    """``$LABEL_STUDIO_VENV`` (relative paths from the repository root), default ``.ls-venv``."""
    return REPO_ROOT / os.environ.get("LABEL_STUDIO_VENV", ".ls-venv")


@contextlib.contextmanager
def started(workdir: Path, kind: type[LabelStudioServer] | None = None, **options: Any) -> Iterator[LabelStudioServer]:
    """A running Label Studio for a fixture, stopped afterwards: a :class:`LabelStudioServer`, or ``kind`` (a
    subclass with settings of its own, e.g. the browser test's newcomer); ``options``: its constructor's.
    A start that fails fails the test with Label Studio's log tail: never a skip."""
    server = (kind or LabelStudioServer)(workdir, **options)
    try:
        server.start()
    except LabelStudioUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


class LabelStudioServer:
    """``label-studio start`` on a free loopback port, its state under ``workdir``.

    ``files_root`` is the root Label Studio may serve local files from (``/data/local-files/?d=``).
    Use as a context manager, or call ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        workdir: Path,
        venv: Path | None = None,
        start_timeout: float = 600.0,
        address_settings: Mapping[str, str] | None = None,
    ):
        self.workdir = Path(workdir)
        same_machine = LABEL_STUDIO_SETTINGS["same machine"]
        self.address_settings = dict(same_machine if address_settings is None else address_settings)
        self.venv = label_studio_venv() if venv is None else Path(venv)
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(20)  # 40 hex chars, the legacy token format
        self.username = "admin@example.com"
        self.password = secrets.token_hex(8)  # the browser test logs in with it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.files_root = self.workdir / "files"
        self.log_path = self.workdir / "label-studio.log"
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        data_dir = self.workdir / "data"
        # The caller's own address settings never leak in: Label Studio gets exactly ``address_settings``.
        inherited = {k: v for k, v in os.environ.items() if k not in (*SWITCHES, "USER_ADDITIONAL_BANNED_SUBNETS")}
        return {
            **inherited,
            **self.address_settings,
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "DJANGO_DB": "sqlite",
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.files_root),
            "LATEST_VERSION_CHECK": "false",  # no PyPI lookup at start
            "COLLECT_ANALYTICS": "false",
            "HOME": str(self.workdir),  # nothing lands in the real ~/.local/share/label-studio
        }

    def start(self) -> LabelStudioServer:
        executable = self.venv / "bin" / "label-studio"
        if not executable.exists():
            raise LabelStudioUnavailable(f"Label Studio is not installed at {self.venv}: {INSTALL_HINT}")
        self.files_root.mkdir(parents=True, exist_ok=True)
        command = [str(executable), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)]
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                command,
                env=self.environment(),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, stopped as one
            )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        while time.monotonic() - started < self.start_timeout:
            if self._process.poll() is not None:
                raise LabelStudioUnavailable(
                    f"Label Studio exited with code {self._process.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise LabelStudioUnavailable(
            f"Label Studio did not answer GET /health with 200 within {self.start_timeout:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the whole process group; kill it if it lingers."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def api(self) -> LabelStudioAPI:
        return LabelStudioAPI(self.url, self.token)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LabelStudioAPI(api.LabelStudioAPI):
    """The package's client (its requests, retries, auth and errors: a failed call raises
    :class:`~labelstudio_maskclip.labelstudio.api.LabelStudioAPIError` with Label Studio's answer) and the
    few calls more that the tests need to set Label Studio up. Each returns parsed JSON."""

    def __init__(self, url: str, token: str, timeout: float = 120.0):
        settings = Settings(label_studio_url=url, label_studio_api_key=token)
        super().__init__(ImageFetcher.from_settings(settings), timeout=timeout)

    def get_bytes(self, path_or_url: str, authorized: bool = True) -> requests.Response:
        """GET a (relative) URL as Label Studio serves it, e.g. ``/data/upload/1/x.jpg``."""
        url = path_or_url if path_or_url.startswith("http") else f"{self.url}{path_or_url}"
        headers = self.fetcher.auth_headers(url) if authorized else {}
        return requests.get(url, headers=headers, timeout=self.timeout)

    # projects and tasks
    def create_project(self, title: str, label_config: str, **fields: Any) -> dict:
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config, **fields})

    def get_project(self, project_id: int) -> dict:
        return self.request("GET", f"/api/projects/{project_id}")

    def import_files(self, project_id: int, paths: Iterable[Path]) -> dict:
        """Upload image files (multipart); each becomes one task ``{"image": "/data/upload/..."}``."""
        handles = [open(p, "rb") for p in paths]
        try:
            files = [(f"file{i}", (Path(h.name).name, h)) for i, h in enumerate(handles)]
            return self.request("POST", f"/api/projects/{project_id}/import?return_task_ids=true", files=files)
        finally:
            for handle in handles:
                handle.close()

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        """Import task dicts (``{"data": {...}}`` or plain data dicts) as JSON."""
        return self.request("POST", f"/api/projects/{project_id}/import?return_task_ids=true", json=tasks)

    def list_tasks(self, project_id: int, page_size: int = 100, fields_all: bool = True) -> list[dict]:
        """Every task of the project (``GET /api/tasks`` is paged: ``{"tasks": [...], "total": n}``).

        ``fields_all`` asks for annotations and predictions inline. Caution: when the project has
        ``evaluate_predictions_automatically``, listing tasks makes LS call ``/predict`` for tasks
        without predictions.
        """
        tasks: list[dict] = []
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": page_size}
            if fields_all:
                params["fields"] = "all"
            body = self.request("GET", "/api/tasks", params=params)
            tasks += body["tasks"]
            if not body["tasks"] or len(tasks) >= body["total"]:
                return tasks
            page += 1

    def get_task(self, task_id: int) -> dict:
        return self.request("GET", f"/api/tasks/{task_id}")

    # ML backend
    def connect_ml_backend(self, project_id: int, url: str, title: str = "backend", **fields: Any) -> dict:
        """``POST /api/ml``: LS calls the backend's ``/health`` and ``/setup`` before answering."""
        return self.request("POST", "/api/ml", json={"project": project_id, "url": url, "title": title, **fields})

    def get_ml_backend(self, backend_id: int) -> dict:
        return self.request("GET", f"/api/ml/{backend_id}")

    def list_ml_backends(self, project_id: int) -> list[dict]:
        return self.request("GET", "/api/ml", params={"project": project_id})

    def train(self, backend_id: int) -> Any:
        """``POST /api/ml/{id}/train``: LS sends ``START_TRAINING`` to the backend's ``/webhook``."""
        return self.request("POST", f"/api/ml/{backend_id}/train", json={})

    def retrieve_predictions(self, project_id: int, task_ids: list[int] | None = None) -> dict:
        """The Data Manager action "Retrieve predictions": one ``/predict`` call with the tasks."""
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": selected},
        )

    def list_predictions(self, task_id: int) -> list[dict]:
        return self.request("GET", "/api/predictions", params={"task": task_id})

    # annotations
    def create_annotation(self, task_id: int, result: list[dict], **fields: Any) -> dict:
        return self.request("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, **fields})

    def update_annotation(self, annotation_id: int, **fields: Any) -> dict:
        return self.request("PATCH", f"/api/annotations/{annotation_id}", json=fields)

    def delete_annotation(self, annotation_id: int) -> None:
        self.request("DELETE", f"/api/annotations/{annotation_id}")

    def list_annotations(self, task_id: int) -> list[dict]:
        return self.request("GET", f"/api/tasks/{task_id}/annotations")
