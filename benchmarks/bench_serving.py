"""What serving through gunicorn's asyncio worker and a2wsgi costs against the plain ``gthread`` worker.

    PYTHONPATH=. python benchmarks/bench_serving.py [--requests 200] [--clients 4]

The same backend (tiny ViT, random weights, short side 64, one worker process, 4 threads) is started twice,
once as ``labelstudio-maskclip serve`` runs it (``--worker-class asgi``, ``serving.asgi:asgi()``) and once
on gunicorn's ``gthread`` worker (``serving.server:wsgi()``, what it ran before), and asked the same
requests: ``/health`` one at a time, ``/predict`` of one task from a loopback file host with several clients
at once, and a 20 MB ``/predict`` body (tasks without images: reading and parsing the body dominate).
Figures: medians (ms) and requests per second, ratios only within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]  # tests.served / tests.tiny

from tests.served import BRUSH, FileHost, free_port, wait_for  # noqa: E402
from tests.tiny import TINY_VIT, save_random_state  # noqa: E402

PHOTOS = HERE.parent / "tests" / "data" / "coco128-seg" / "images"
SERVERS = {
    "asgi + a2wsgi (serve)": ["labelstudio_maskclip.serving.asgi:asgi()", "--worker-class", "asgi"],
    "gthread": ["labelstudio_maskclip.serving.server:wsgi()", "--worker-class", "gthread", "--threads", "4"],
}


def start(argv: list[str], work: Path, weights: Path, files_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MASKCLIP_MODEL": TINY_VIT, "MASKCLIP_PRETRAINED": str(weights), "MASKCLIP_DEVICE": "cpu",
           "MASKCLIP_SHORT_SIDE": "64", "MASKCLIP_TEMPLATES": "simple", "MODEL_DIR": str(work / "model_dir"),
           "LABEL_STUDIO_URL": "http://127.0.0.1:9", "MASKCLIP_ALLOW_PRIVATE_URLS": "true", "WORKERS": "1", "THREADS": "4",
           "LOG_LEVEL": "WARNING"}  # fmt: skip
    cmd = [sys.executable, "-m", "gunicorn", *argv, "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(url + "/health", timeout=2).json().get("model") == "ready"
        except (requests.RequestException, ValueError):
            return False

    wait_for(ready, 120, "the server", every=0.3)
    return proc, url


def measure(url: str, files_url: str, names: list[str], n: int, clients: int) -> dict[str, float]:
    health = []
    for _ in range(n):
        t = time.perf_counter()
        assert requests.get(url + "/health", timeout=30).status_code == 200
        health.append(time.perf_counter() - t)

    def predict(k: int) -> float:
        body = {
            "tasks": [{"id": k + 1, "data": {"image": f"{files_url}/{names[k % len(names)]}"}}],
            "label_config": BRUSH,
        }
        t = time.perf_counter()
        r = requests.post(url + "/predict", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["results"][0], r.text[:300]
        return time.perf_counter() - t

    for k in range(clients * 2):  # warm-up: fetch threads, caches
        predict(k)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(predict, range(n)))
    rate = n / (time.perf_counter() - start)
    big = {"tasks": [{"id": i + 1, "data": {"text": "x" * 2000}} for i in range(10_000)], "label_config": BRUSH}
    big_s = []
    for _ in range(3):
        t = time.perf_counter()
        assert requests.post(url + "/predict", json=big, timeout=120).status_code == 200
        big_s.append(time.perf_counter() - t)
    return {"health_ms": 1000 * statistics.median(health), "predict_ms": 1000 * statistics.median(latencies),
            "predict_per_s": rate, "body20mb_ms": 1000 * statistics.median(big_s)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    weights = save_random_state(TINY_VIT, work / "tiny.pt")
    names = sorted(p.name for p in PHOTOS.glob("*.jpg"))
    host = FileHost(PHOTOS)
    files_url = host.url
    print("| server | /health p50 ms | /predict 1 task p50 ms | /predict per s "
          f"({args.clients} clients) | 20 MB body p50 ms |\n|---|---:|---:|---:|---:|")  # fmt: skip
    try:
        for title, server in SERVERS.items():
            proc, url = start(server, work / title.split()[0], weights, files_url)
            try:
                m = measure(url, files_url, names, args.requests, args.clients)
            finally:
                proc.terminate()
                proc.wait(30)
            print(
                f"| {title} | {m['health_ms']:.1f} | {m['predict_ms']:.1f} | {m['predict_per_s']:.1f} | "
                f"{m['body20mb_ms']:.0f} |",
                flush=True,
            )
    finally:
        host.stop()


if __name__ == "__main__":
    main()
