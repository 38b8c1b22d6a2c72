"""The annotation store on SQLite and on PostgreSQL: what a webhook's write costs, writers side by side, and
reading the training set back.

Each backend gets a fresh store (SQLite: a file in a temporary folder, ``synchronous=FULL``; PostgreSQL: a
throwaway server started as the tests start it, tests/postgres.py, on a unix socket, default durability).
A write is one :meth:`Store.put_annotation` of a 640x480 annotation with three labels (brush masks: two
discs and a rectangle), what one ``ANNOTATION_CREATED`` webhook stores. Then ``--procs`` processes write
``--writes`` annotations each at once (webhooks spread over workers or instances), and
:meth:`Store.accepted_samples` reads everything back (what a training run starts with).

    python benchmarks/bench_store.py [--writes 200] [--procs 4] [--backends sqlite postgresql]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord  # noqa: E402


def annotation(i: int) -> AnnotationWrite:
    yy, xx = np.mgrid[:480, :640]
    rect = np.zeros((480, 640), bool)
    rect[50 + i % 40 : 300, 100:400] = True
    masks = {
        "cat": (yy - 200) ** 2 + (xx - 300 - i % 50) ** 2 <= 120**2,
        "dog": (yy - 350) ** 2 + (xx - 500) ** 2 <= (60 + i % 30) ** 2,
        "sky": rect,
    }
    return AnnotationWrite(id=i, task=TaskRecord(i, 1, f"/data/upload/1/{i}.jpg"), height=480, width=640,
                           masks=masks, updated_at="2026-12-04T10:00:00Z")  # fmt: skip


WRITER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}, {bench!r}]
    from bench_store import annotation
    from labelstudio_maskclip.learning.store import Store
    store = Store({url!r})
    start, count = int(sys.argv[1]), int(sys.argv[2])
    writes = [annotation(i) for i in range(start, start + count)]
    sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
    for w in writes:
        store.put_annotation(w)
""")


def side_by_side(url: str, procs: int, writes: int, first: int) -> float:
    """Seconds for ``procs`` processes to write ``writes`` annotations each, all started at once."""
    script = Path(tempfile.mkdtemp()) / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO), bench=str(REPO / "benchmarks"), url=url))
    running = [subprocess.Popen([sys.executable, str(script), str(first + k * writes), str(writes)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(procs)]  # fmt: skip
    for p in running:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    for p in running:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in running:
        p.wait(600)
        assert p.returncode == 0
    return time.perf_counter() - start


def measure(name: str, url: str, writes: int, procs: int) -> dict[str, float | str]:
    store = Store(url)
    prepared = [annotation(i) for i in range(1, writes + 1)]
    times = []
    for w in prepared:
        t = time.perf_counter()
        assert store.put_annotation(w).status == "stored"
        times.append(time.perf_counter() - t)
    again = time.perf_counter()
    assert store.put_annotation(prepared[0]).status == "duplicate"
    duplicate = time.perf_counter() - again
    wall = side_by_side(url, procs, writes, writes + 1)
    t = time.perf_counter()
    samples = sum(1 for _ in store.accepted_samples())
    read = time.perf_counter() - t
    assert samples == writes * (procs + 1)
    times.sort()
    return {
        "backend": name,
        "write_ms_median": 1000 * statistics.median(times),
        "write_ms_p95": 1000 * times[int(0.95 * (len(times) - 1))],
        "duplicate_ms": 1000 * duplicate,
        "side_by_side_writes_per_s": procs * writes / wall,
        "read_samples_per_s": samples / read,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = parser.parse_args()
    rows = []
    with ExitStack() as stack:
        for name in args.backends:
            if name == "postgresql":
                from tests.postgres import started

                server = stack.enter_context(started())
                server.sql("CREATE DATABASE bench")
                url = server.url("bench")
            else:
                url = str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "model_dir")
            rows.append(measure(name, url, args.writes, args.procs))
    print(f"| backend | write, median ms | write, p95 ms | duplicate ms | {args.procs} writers, writes/s | "
          "read back, samples/s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['write_ms_median']:.1f} | {r['write_ms_p95']:.1f} | {r['duplicate_ms']:.1f} | "
              f"{r['side_by_side_writes_per_s']:.0f} | {r['read_samples_per_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
