"""Test helpers for whole-system runs: the backend under gunicorn, a loopback file host, worker processes,
several backend instances behind one address.

Used by tests/test_load.py, tests/test_faults.py, tests/test_replicas.py and benchmarks/run.py. Everything listens on loopback
ports chosen by the OS (or by :func:`tests.labelstudio.free_port`).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.labelstudio import free_port
from tests.photos import COCO128_PHOTOS

__all__ = [
    "PHOTOS", "BRUSH", "FileHost", "photo_host", "Backend", "start_backend", "worker_pids", "vm_hwm_kib", "wait_for",
    "brush_webhook", "free_port", "start_backends", "RoundRobin",
]  # fmt: skip

PHOTOS = COCO128_PHOTOS
BRUSH = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image">
  <Label value="Animal" predicted_values="cat,dog,animal"/><Label value="Food"/><Label value="Sky"/>
</BrushLabels></View>"""


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.1):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client gone mid-reply (a killed worker) is expected
        pass


class FileHost:
    """A loopback static file server playing Label Studio's file host, which can be stopped and started
    again on the same port. ``delay`` (seconds) holds every response back, to keep requests in flight;
    ``peers`` records the client ports of requests being answered."""

    def __init__(self, root: Path, port: int = 0, delay: float = 0.0):
        self.root, self.delay, self.peers = Path(root), delay, []
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        host = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(host.root), **kw)

            def translate_path(self, path):  # Label Studio serves uploads under /data/upload/
                return super().translate_path(path.removeprefix("/data/upload"))

            def do_GET(self):
                host.peers.append(self.client_address[1])
                if host.delay:
                    time.sleep(host.delay)
                super().do_GET()

            def log_message(self, *a):
                pass

        server = _QuietServer(("127.0.0.1", self.port), Handler)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def photo_host(root: Path, names: list[str], delay: float = 0.0) -> FileHost:
    """A :class:`FileHost` serving copies of the named coco128 photos from ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes((PHOTOS / name).read_bytes())
    return FileHost(root, delay=delay)


@dataclass
class Backend:
    url: str
    proc: subprocess.Popen
    model_dir: Path
    log: Path
    env: Mapping[str, str]

    @property
    def master_pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[int]:
        return worker_pids(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_backend(
    work: Path,
    model: str,
    pretrained: str,
    label_studio_url: str,
    *,
    workers: int = 2,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 90.0,
) -> Backend:
    """``labelstudio-maskclip serve`` (gunicorn, asgi worker) on a free loopback port; returns once /health is UP
    and every worker has loaded the model (a /setup per worker would not prove that: /health is checked)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "MASKCLIP_MODEL": model, "MASKCLIP_PRETRAINED": pretrained, "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_SHORT_SIDE": "64", "MASKCLIP_TEMPLATES": "simple", "MASKCLIP_MIN_AREA": "0",
        "MODEL_DIR": str(work / "model_dir"), "LABEL_STUDIO_URL": label_studio_url, "WORKERS": str(workers),
        "LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }  # fmt: skip
    log_path = work / "backend.log"
    cmd = [sys.executable, "-m", "labelstudio_maskclip.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    backend = Backend(f"http://127.0.0.1:{port}", proc, Path(env["MODEL_DIR"]), log_path, env)

    auth = (env["BASIC_AUTH_USER"], env.get("BASIC_AUTH_PASS", "")) if env.get("BASIC_AUTH_USER") else None

    streak = [0]  # consecutive /health answers saying the model is warmed up

    def ready():
        """Every worker up with its model loaded and warmed up: /health answers from whichever worker takes
        the connection, so several "ready" answers in a row are asked for. A worker still warming up competes
        with Label Studio's 3 s /setup on a 2-core machine."""
        if proc.poll() is not None:
            raise AssertionError(f"the backend exited with {proc.returncode}:\n{backend.log_text()[-3000:]}")
        try:
            r = requests.get(backend.url + "/health", timeout=2, auth=auth)
            warm = r.status_code == 200 and r.json().get("model") == "ready"
        except (requests.RequestException, ValueError):
            warm = False
        streak[0] = streak[0] + 1 if warm else 0
        return streak[0] >= 4 * workers and len(backend.workers()) == workers

    try:
        wait_for(ready, timeout, "the backend's /health and its workers", every=0.2)
    except BaseException:
        backend.stop()
        raise
    return backend


def start_backends(
    work: Path, count: int, model: str, pretrained: str, label_studio_url: str, **options: Any
) -> list[Backend]:
    """``count`` instances (:func:`start_backend`, started side by side) sharing ONE ``MODEL_DIR``
    (``work/model_dir``: one store, one model registry), as replicas on one machine or on a shared volume
    would; each has its own port, log and gunicorn workers."""
    extra = {"MODEL_DIR": str(work / "model_dir"), **(options.pop("extra_env", None) or {})}
    with ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(
                start_backend, work / f"instance-{k}", model, pretrained, label_studio_url, extra_env=extra, **options
            )  # fmt: skip
            for k in range(count)
        ]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < count:
        for backend in started:
            backend.stop()
        raise next(f.exception() for f in futures if f.exception() is not None)  # type: ignore[misc]
    return started


class RoundRobin:
    """One loopback address in front of several backends, as a load balancer stands there: each request goes
    to the next backend in turn, on a connection of its own. A backend that refuses the connection (stopped,
    killed) is skipped for that request, as nginx's ``proxy_next_upstream error`` does; a request that reached a
    backend whose connection then broke is answered 502 and not tried elsewhere (a POST may have been applied).
    ``routed``: (backend index, method, path) of every request passed on; ``in_flight``: requests being
    answered, per backend."""

    def __init__(self, targets: Sequence[str], timeout: float = 300.0):
        self.targets = [t.rstrip("/") for t in targets]
        self.routed: list[tuple[int, str, str]] = []
        self.in_flight = [0] * len(self.targets)
        self._next, self._lock = 0, threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _pass(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection", "keep-alive")}  # fmt: skip
                status, reply, kind = proxy._forward(self.command, self.path, body, headers)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = do_PATCH = do_DELETE = _pass

            def log_message(self, *a):
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._timeout = timeout
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
        """(status, body, content type) from the next backend that takes the connection."""
        with self._lock:
            first, self._next = self._next, (self._next + 1) % len(self.targets)
        for k in [(first + i) % len(self.targets) for i in range(len(self.targets))]:
            host, port = self.targets[k].removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=self._timeout)
            try:
                conn.connect()
            except OSError:  # refused: this backend is down, the request never reached it
                conn.close()
                continue
            with self._lock:
                self.routed.append((k, method, path))
                self.in_flight[k] += 1
            try:
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                return r.status, r.read(), r.getheader("Content-Type", "application/json")
            except (OSError, http.client.HTTPException):  # broke after the request went out
                return 502, b"bad gateway: the backend's connection broke", "text/plain"
            finally:
                conn.close()
                with self._lock:
                    self.in_flight[k] -= 1
        return 502, b"bad gateway: no backend took the connection", "text/plain"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def worker_pids(master: int) -> list[int]:
    """Pids of the processes whose parent is ``master`` (gunicorn's workers), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        if int(fields[1]) == master and fields[0] != "Z":
            pids.append(int(entry))
    return sorted(pids)


def vm_hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def brush_webhook(annotation_id: int, task_id: int, height: int = 480, width: int = 640) -> dict:
    """An ANNOTATION_CREATED body with one real brush RLE region (a rectangle that depends on the id)."""
    import numpy as np

    from labelstudio_maskclip.masks.brush import mask_to_brush_rle

    mask = np.zeros((height, width), bool)
    top = 10 + annotation_id % 50
    mask[top : top + 100, 20 : 20 + 50 + annotation_id % 200] = True
    region = {
        "id": f"r{annotation_id}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": ["Food"]},
    }  # fmt: skip
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": annotation_id, "result": [region], "was_cancelled": False, "ground_truth": False,
                       "completed_by": 1, "task": task_id, "project": 1, "updated_at": "2026-11-28T10:00:00Z"},
        "task": {"id": task_id, "data": {"image": "/data/upload/000000000009.jpg"}, "project": 1},
        "project": {"id": 1, "label_config": BRUSH},
    }  # fmt: skip


class LabelStudioProxy:
    """A loopback proxy in front of Label Studio, as a load balancer would stand there: passes every request
    through and records it in ``requests`` (method, path with query), except that the next ``fail`` bulk
    writes (``POST .../import/predictions``) are answered 504 after Label Studio applied them ("applied"),
    502 without reaching it ("lost"), or 504 at once while Label Studio gets the request ``late`` seconds
    later ("late": it is still writing when the client hears; ``join()`` waits for it). ``seen``: what became
    of each bulk write; ``bulk_sizes``: the predictions in each. ``intercept(method, path)`` (the test's) may
    act first, e.g. delete a task, and answer instead with the status it returns (None: pass on)."""

    def __init__(self, target: str, late: float = 3.0):
        self.target, self.fail, self.seen, self.late = target.rstrip("/"), [], [], late
        self.requests: list[tuple[str, str]] = []
        self.bulk_sizes: list[int] = []
        self.intercept: Callable[[str, str], int | None] = lambda method, path: None
        self._late: list[threading.Thread] = []
        session = requests.Session()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _pass(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path))
                status = proxy.intercept(self.command, self.path)
                if status is not None:
                    return self._answer(status, b'{"detail": "answered by the proxy"}', "application/json")
                bulk = self.command == "POST" and self.path.split("?")[0].endswith("/import/predictions")
                mode = proxy.fail.pop(0) if bulk and proxy.fail else None
                if bulk:
                    proxy.seen.append(mode or "passed")
                    proxy.bulk_sizes.append(len(json.loads(body)))
                if mode == "lost":
                    return self._answer(502, b"bad gateway")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}

                def forward() -> requests.Response:
                    return session.request(self.command, proxy.target + self.path, data=body, headers=headers,
                                           timeout=300)  # fmt: skip

                if mode == "late":
                    later = threading.Timer(proxy.late, forward)
                    proxy._late.append(later)
                    later.start()
                    return self._answer(504, b"gateway timeout")
                r = forward()
                if mode == "applied":
                    return self._answer(504, b"gateway timeout")
                self._answer(r.status_code, r.content, r.headers.get("Content-Type", "application/json"))

            def _answer(self, status: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _pass

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def join(self) -> None:
        """Wait until the ``late`` writes have reached Label Studio and it has answered them."""
        for later in self._late:
            later.join()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
