"""The whole backend under a bounded load: gunicorn with 2 workers, concurrent /predict clients and webhooks.

8 clients x 10 /predict requests of 4 real photos each (served by a loopback file host playing Label
Studio), with ANNOTATION_CREATED webhooks (real brush RLE) posted meanwhile. Asserted: every request
answered 200/201, one result per task, every acknowledged webhook in the store, the store consistent,
peak RSS per worker bounded. Printed (figures, not assertions): throughput and latency percentiles.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from labelstudio_maskclip.learning.store import Store
from tests.served import BRUSH, brush_webhook, photo_host, start_backend, vm_hwm_kib
from tests.tiny import TINY_VIT

pytestmark = pytest.mark.e2e

NAMES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg", "000000000034.jpg", "000000000036.jpg",
         "000000000042.jpg"]  # fmt: skip
CLIENTS, REQUESTS, TASKS, WEBHOOKS = 8, 10, 4, 40
TIME_CAP = 300.0  # seconds for the whole load: a generous bound, so the test fails rather than hangs
RSS_BOUND_KIB = int(1.5 * 2**20)  # 1.5 GiB per worker


@pytest.fixture(scope="module")
def system(tmp_path_factory, weights):
    host = photo_host(tmp_path_factory.mktemp("files"), NAMES)
    work = tmp_path_factory.mktemp("backend")
    backend = start_backend(work, TINY_VIT, str(weights), host.url, workers=2)
    yield backend
    backend.stop()
    host.stop()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _predict(url: str, client: int, n: int) -> tuple[float, int, dict]:
    tasks = [{"id": 1000 * client + 10 * n + t, "data": {"image": "/data/upload/" + NAMES[(client + n + t) % len(NAMES)]}}
             for t in range(TASKS)]  # fmt: skip
    start = time.perf_counter()
    r = requests.post(url + "/predict", json={"tasks": tasks, "label_config": BRUSH, "project": "1.1"}, timeout=60)
    return time.perf_counter() - start, r.status_code, r.json()


def test_concurrent_predicts_and_webhooks(system):
    url = system.url
    for _ in range(4):  # warm-up: model and text embeddings loaded in both workers (probably)
        assert _predict(url, 99, 0)[1] == 200
    deadline = time.monotonic() + TIME_CAP
    acked: list[int] = []
    webhook_status: list[int] = []

    def post_webhooks() -> None:
        for i in range(WEBHOOKS):
            if time.monotonic() > deadline:
                return
            r = requests.post(url + "/webhook", json=brush_webhook(5000 + i, 700 + i), timeout=30)
            webhook_status.append(r.status_code)
            if r.status_code == 201 and r.json().get("status") == "stored":
                acked.append(5000 + i)
            time.sleep(0.05)

    def client(c: int) -> list[tuple[float, int, dict]]:
        return [_predict(url, c, n) for n in range(REQUESTS) if time.monotonic() < deadline]

    hooks = threading.Thread(target=post_webhooks)
    start = time.perf_counter()
    hooks.start()
    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
    elapsed = time.perf_counter() - start
    hooks.join(TIME_CAP)

    assert len(replies) == CLIENTS * REQUESTS, f"only {len(replies)} requests done in {TIME_CAP:.0f} s"
    assert [s for _, s, _ in replies if s != 200] == []
    for _, _, body in replies:
        assert len(body["results"]) == TASKS and body["errors"] == []
        assert all(isinstance(r, dict) and r["result"] for r in body["results"])
    assert webhook_status == [201] * WEBHOOKS and len(acked) == WEBHOOKS

    store = Store(system.model_dir)
    assert store.check() == []
    assert [a for a in acked if store.annotation(a) is None or store.annotation(a)["labels"] != ["Food"]] == []

    workers = system.workers()
    peaks = {pid: vm_hwm_kib(pid) for pid in workers}
    latencies = [t for t, _, _ in replies]
    print(
        f"\nload: {CLIENTS} clients x {REQUESTS} /predict x {TASKS} tasks (+{WEBHOOKS} webhooks), 2 gunicorn "
        f"workers, tiny ViT, short side 64: {len(replies)} requests in {elapsed:.1f} s = "
        f"{len(replies) / elapsed:.1f} req/s, {len(replies) * TASKS / elapsed:.1f} tasks/s; latency s: "
        f"p50 {percentile(latencies, 50):.3f} p95 {percentile(latencies, 95):.3f} "
        f"p99 {percentile(latencies, 99):.3f} mean {statistics.mean(latencies):.3f}; peak RSS per worker MiB: "
        + ", ".join(f"{pid}: {kib / 1024:.0f}" for pid, kib in peaks.items())
    )
    assert len(workers) == 2 and all(kib < RSS_BOUND_KIB for kib in peaks.values()), peaks
