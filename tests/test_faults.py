"""Faults in the running system: a gunicorn worker killed mid-request, Label Studio down or hung for a while.

(The trainer killed mid-run is covered by tests/test_trigger.py::
test_killed_trainer_leaves_served_model_intact_and_single_flight_holds.)
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from labelstudio_maskclip.learning.store import Store
from tests.served import BRUSH, brush_webhook, photo_host, start_backend, wait_for
from tests.tiny import TINY_VIT, save_random_state

pytestmark = pytest.mark.e2e

DOWNLOAD_TIMEOUT = 2.0
NAMES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    host = photo_host(tmp_path_factory.mktemp("files"), NAMES)
    work = tmp_path_factory.mktemp("backend")
    weights = save_random_state(TINY_VIT, work / "tiny_vit.pt")
    backend = start_backend(work, TINY_VIT, str(weights), host.url, workers=2,
                            extra_env={"MASKCLIP_DOWNLOAD_TIMEOUT": str(DOWNLOAD_TIMEOUT)})  # fmt: skip
    yield backend, host
    backend.stop()
    host.stop()


def _predict(url: str, names=NAMES, timeout: float = 60) -> requests.Response:
    tasks = [{"id": i + 1, "data": {"image": "/data/upload/" + n}} for i, n in enumerate(names)]
    return requests.post(url + "/predict", json={"tasks": tasks, "label_config": BRUSH}, timeout=timeout)


def _socket_owner(local_port: int, pids: list[int]) -> int:
    """The pid among ``pids`` holding the loopback TCP socket whose local port is ``local_port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == local_port:
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker among {pids} holds a socket on local port {local_port}")


def test_worker_killed_mid_request_is_replaced_and_nothing_acknowledged_is_lost(system):
    backend, host = system
    assert _predict(backend.url).status_code == 200
    acked = []
    for i in range(6):
        r = requests.post(backend.url + "/webhook", json=brush_webhook(100 + i, 10 + i), timeout=30)
        assert r.status_code == 201 and r.json()["status"] == "stored"
        acked.append(100 + i)

    host.delay, host.peers[:] = 5.0, []  # the next image download hangs for 5 s: the request is in flight
    outcome: dict = {}

    def in_flight():
        try:
            outcome["reply"] = _predict(backend.url, NAMES[:1])
        except requests.RequestException as e:
            outcome["error"] = e

    client = threading.Thread(target=in_flight)
    client.start()
    wait_for(lambda: host.peers, 20, "the worker's image download")
    before = backend.workers()
    victim = _socket_owner(host.peers[0], before)
    os.kill(victim, signal.SIGKILL)
    client.join(30)
    host.delay = 0.0
    assert "error" in outcome and "reply" not in outcome, outcome  # the client sees the broken request

    wait_for(lambda: len(w := backend.workers()) == 2 and victim not in w, 60, "gunicorn to replace the worker")
    for _ in range(6):  # both workers answer (several connections, one per request)
        r = _predict(backend.url)
        assert r.status_code == 200 and all(r.json()["results"]) and r.json()["errors"] == []
    store = Store(backend.model_dir)
    assert store.check() == []
    assert all(store.annotation(a) is not None and store.annotation(a)["labels"] == ["Food"] for a in acked)
    assert backend.proc.poll() is None


def test_label_studio_down_or_hung_gives_per_task_errors_then_recovers(system):
    backend, host = system
    port = host.port
    host.stop()  # down: connections refused
    start = time.monotonic()
    r = _predict(backend.url)
    refused_s = time.monotonic() - start
    body = r.json()
    assert r.status_code == 200 and body["results"] == [[], [], []]
    assert sorted(e["task"] for e in body["errors"]) == [1, 2, 3]
    assert all("could not connect" in e["error"] for e in body["errors"]), body["errors"]  # refused, not timed out

    hung = socket.socket()  # hung: connections accepted by the kernel, never answered
    hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hung.bind(("127.0.0.1", port))
    hung.listen(16)
    try:
        start = time.monotonic()
        r = _predict(backend.url)
        hung_s = time.monotonic() - start
    finally:
        hung.close()
    body = r.json()
    assert r.status_code == 200 and body["results"] == [[], [], []]
    assert all("timed out" in e["error"] or "timeout" in e["error"].lower() for e in body["errors"]), body["errors"]
    # The download timeout was waited for (a lower bound, exact), and the request ended (a generous bound).
    assert DOWNLOAD_TIMEOUT * 0.9 < hung_s < 60, hung_s

    host.port = port
    host.start()  # back: the same backend, no restart
    r = _predict(backend.url)
    assert r.status_code == 200 and all(r.json()["results"]) and r.json()["errors"] == []
    print(f"\nLabel Studio refused: /predict answered in {refused_s:.2f} s; hung: {hung_s:.2f} s "
          f"(MASKCLIP_DOWNLOAD_TIMEOUT={DOWNLOAD_TIMEOUT})")  # fmt: skip


# --- slow clients (issue #22, item 2) ---------------------------------------------------------------------

PAD = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(70))  # 70 KiB of headers
#: variant -> (what the client sends first, what it drips after): nobody sends credentials.
SLOW = {
    "a full request, then a partial second one": (
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n"),
    "64 KiB of headers, then a drip": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + PAD, b"X-Slow: 1\r\n"),
    "a 100 MB body, dripped": (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n"
        b"\r\n{", b" "),
    "a chunked body, dripped": (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n1\r\n{\r\n", b"1\r\n \r\n"),
}  # fmt: skip


class _Slow:
    """Connections that drip their request every 0.2 s; each one's close (end of stream or reset) is timed."""

    def __init__(self, port: int, per_variant: int):
        self.start = time.monotonic()
        self.conns = []  # [variant, socket, drip, seconds to close or None, first reply bytes]
        for variant, (first, drip) in SLOW.items():
            for _ in range(per_variant):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(first)
                s.setblocking(False)
                self.conns.append([variant, s, drip, None, b""])
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._drip, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _closed(self, c) -> None:
        if c[3] is None:
            c[3] = time.monotonic() - self.start

    def _drip(self) -> None:
        while not self.stop.wait(0.2):
            for c in self.conns:
                if c[3] is None:
                    try:
                        c[1].send(c[2])
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._closed(c)

    def _watch(self) -> None:
        import selectors

        with selectors.DefaultSelector() as sel:
            for c in self.conns:
                sel.register(c[1], selectors.EVENT_READ, c)
            while not self.stop.is_set() and sel.get_map():
                for key, _ in sel.select(0.2):
                    c = key.data
                    try:
                        data = c[1].recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    c[4] = c[4] or data[:40]
                    if not data:
                        self._closed(c)
                        sel.unregister(c[1])

    def open(self) -> list[str]:
        return [c[0] for c in self.conns if c[3] is None]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for c in self.conns:
            c[1].close()


@pytest.mark.parametrize("auth", [True, False], ids=["basic-auth", "no-auth"])
def test_slow_clients_cannot_hold_the_threads(tmp_path_factory, auth):
    """Four connections of each slow variant at once (issue #22, item 2), dripping without credentials,
    against one worker of 2 threads: /health answers within a few seconds all along, and every slow
    connection is closed by the server (kept-alive idle past --keep-alive, header limits, the 401 or the
    body's minimum rate), not left to hold a thread."""
    from labelstudio_maskclip.serving.asgi import READ_TIMEOUT

    work = tmp_path_factory.mktemp("slow-clients")
    weights = save_random_state(TINY_VIT, work / "tiny_vit.pt")
    env = {"THREADS": "2", **({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret"} if auth else {})}
    backend = start_backend(work, TINY_VIT, str(weights), "http://127.0.0.1:9", workers=1, extra_env=env)
    credentials = ("ls", "secret") if auth else None
    slow = _Slow(int(backend.url.rsplit(":", 1)[1]), per_variant=4)
    try:
        slowest = 0.0
        while time.monotonic() - slow.start < READ_TIMEOUT + 5:  # through the body's grace and past it
            asked = time.monotonic()
            r = requests.get(backend.url + "/health", auth=credentials, timeout=5)
            slowest = max(slowest, time.monotonic() - asked)
            assert r.status_code == 200 and r.json()["status"] == "UP"
            time.sleep(0.5)
        wait_for(lambda: not slow.open(), 60, "the server to close every slow connection", every=0.5)
        assert requests.get(backend.url + "/health", auth=credentials, timeout=5).status_code == 200
    finally:
        slow.close()
        backend.stop()
    closed = {v: sorted(round(c[3], 1) for c in slow.conns if c[0] == v) for v in SLOW}
    replies = {v: sorted({c[4].split(b"\r\n")[0].decode() for c in slow.conns if c[0] == v}) for v in SLOW}
    print(f"\nauth={auth}: slowest /health {slowest:.2f} s; closed after (s) {closed}; replies {replies}")


def _heavy_webhook(annotation_id: int, rles: dict, side: int) -> dict:
    """An annotation at the work bounds for a 64-megapixel image: one brush region per label."""
    regions = [
        {"id": f"r{label}", "from_name": "tag", "to_name": "image", "type": "brushlabels",
         "original_width": side, "original_height": side,
         "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}
        for label, rle in rles.items()
    ]  # fmt: skip
    body = brush_webhook(annotation_id, annotation_id)
    body["annotation"]["result"] = regions
    return body


def _polygon_bomb(annotation_id: int) -> dict:
    import random

    rng = random.Random(annotation_id)
    points = [[rng.uniform(-900, 1000), rng.uniform(-900, 1000)] for _ in range(300_000)]
    body = brush_webhook(annotation_id, annotation_id)
    body["annotation"]["result"] = [
        {"id": "bomb", "from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": 8000,
         "original_height": 8000, "value": {"points": points, "polygonlabels": ["Food"]}}
    ]  # fmt: skip
    body["project"]["label_config"] = BRUSH.replace(
        "</View>", '<PolygonLabels name="poly" toName="image"><Label value="Food"/></PolygonLabels></View>'
    )
    return body


def test_peak_memory_of_8_concurrent_worst_case_webhooks(tmp_path_factory):
    """One worker with 8 threads gets 8 webhooks at once, twice: annotations at the bounds for a 64-megapixel
    image (3 labels: (3 + 2) x 64 MB of masks each), then 300k-point polygons (rejected before rasterising).
    The worker's peak RSS (VmHWM) stays bounded (2 annotations decoded at once per process) and it lives."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from labelstudio_maskclip.masks.brush import mask_to_brush_rle
    from tests.served import vm_hwm_kib

    side = 8000
    rles = {}
    for k, label in enumerate(["Animal", "Food", "Sky"]):
        mask = np.zeros((side, side), bool)
        mask[500 * k : 500 * k + 4000, 1000 : 1000 + 5000] = True
        rles[label] = mask_to_brush_rle(mask)
    work = tmp_path_factory.mktemp("rss")
    weights = save_random_state(TINY_VIT, work / "tiny_vit.pt")
    backend = start_backend(work, TINY_VIT, str(weights), "http://127.0.0.1:9", workers=1,
                            extra_env={"THREADS": "8"})  # fmt: skip
    try:
        (worker,) = backend.workers()
        base = vm_hwm_kib(worker)

        def post(body: bytes) -> requests.Response:
            return requests.post(backend.url + "/webhook", data=body, timeout=600,
                                 headers={"Content-Type": "application/json"})  # fmt: skip

        heavy = [json.dumps(_heavy_webhook(7000 + i, rles, side)).encode() for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(post, heavy))
        assert [r.status_code for r in replies] == [201] * 8 and {r.json()["status"] for r in replies} == {"stored"}
        after_heavy = vm_hwm_kib(worker)
        bombs = [json.dumps(_polygon_bomb(8000 + i)).encode() for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(post, bombs))
        assert [r.json()["status"] for r in replies] == ["rejected"] * 8
        assert all("too much work" in r.json()["rejected"][0] for r in replies)
        after_bombs = vm_hwm_kib(worker)
        assert backend.workers() == [worker]  # the same worker: nothing crashed
        print(f"\npeak RSS of the worker: {base / 1024:.0f} MiB at start, {after_heavy / 1024:.0f} MiB after 8 "
              f"concurrent 64-Mpx 3-label annotations, {after_bombs / 1024:.0f} MiB after 8 concurrent "
              f"300k-point polygons ({sum(map(len, bombs)) / 8e6:.1f} MB JSON each)")  # fmt: skip
        assert after_bombs - base < 3 * 1024 * 1024  # KiB: 3 GiB, a generous bound (about 1 GiB expected)
        store = Store(backend.model_dir)
        assert store.check() == [] and store.annotation(7003)["labels"] == ["Animal", "Food", "Sky"]
    finally:
        backend.stop()
