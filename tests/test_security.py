"""Hardening of the HTTP surface: basic auth on bytes, the health check under auth, ids, bounded work."""

from __future__ import annotations

import base64

import pytest

from labelstudio_maskclip.serving.server import basic_auth_header, create_app, credentials_match
from labelstudio_maskclip.settings import Settings


def _raw_basic(raw: bytes) -> str:
    """An Authorization header carrying ``raw`` bytes, as WSGI hands it over (latin-1 text)."""
    return "Basic " + base64.b64encode(raw).decode()


@pytest.fixture
def auth_app(tmp_path):
    def make(user: str, password: str):
        settings = Settings(model_dir=str(tmp_path), basic_auth_user=user, basic_auth_pass=password)
        return create_app(settings, warm=False).test_client()

    return make


@pytest.mark.parametrize(
    "password", ["pässwörd", "密码🔑", "s3cret", "with:colon", "é"], ids=["latin", "cjk", "ascii", "colon", "one"]
)
def test_basic_auth_compares_bytes_for_any_password(auth_app, password):
    client = auth_app("lab\u00e9l", password)
    good = {"Authorization": basic_auth_header("lab\u00e9l", password)}
    assert client.get("/health", headers=good).status_code == 200
    attempts = [
        basic_auth_header("lab\u00e9l", password + "x"),
        basic_auth_header("lab\u00e9l", "pässwörd" if password != "pässwörd" else "passwort"),
        basic_auth_header("label", password),
        _raw_basic("lab\u00e9l:".encode() + password.encode("utf-16")),  # same text, other bytes
        _raw_basic("lab\u00e9l".encode()),  # no colon
        "Basic !!!not-base64",
        "Bearer " + base64.b64encode(f"lab\u00e9l:{password}".encode()).decode(),
        "",
    ]
    for header in attempts:
        reply = client.get("/health", headers={"Authorization": header})
        assert reply.status_code == 401, (header, reply.status_code)
        assert reply.headers["WWW-Authenticate"].startswith("Basic")


def test_non_ascii_attempts_against_an_ascii_password_get_401(auth_app):
    client = auth_app("ls", "s3cret")
    for password in ("s3crét", "密码", "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")):
        header = _raw_basic(b"ls:" + password.encode("utf-8", "surrogatepass"))
        assert client.get("/health", headers={"Authorization": header}).status_code == 401
    latin1 = _raw_basic("ls:s3crét".encode("latin-1"))  # not UTF-8 at all
    assert client.post("/webhook", json={}, headers={"Authorization": latin1}).status_code == 401
    assert client.get("/health", headers={"Authorization": basic_auth_header("ls", "s3cret")}).status_code == 200


def test_credentials_match_never_raises():
    for header in (None, "", "Basic", "Basic ====", "basic " + base64.b64encode(b"\xff\xfe:\x00").decode(), "x" * 9000):
        assert credentials_match(header, "u", "p\u00e9") is False
    assert credentials_match(basic_auth_header("u", "p\u00e9"), "u", "p\u00e9") is True


# --- ids (item 13) -------------------------------------------------------------------------------------


def _brush_event(annotation_id, task_id=7, action="ANNOTATION_CREATED"):
    from tests.served import brush_webhook

    body = brush_webhook(1, 1)
    body["action"] = action
    body["annotation"]["id"] = annotation_id
    body["annotation"]["task"] = task_id
    body["task"]["id"] = task_id
    return body


@pytest.mark.parametrize(
    "value, expected",
    [
        (1, 1), ("17", 17), (2**63 - 1, 2**63 - 1), ({"id": 5}, 5),
        (1.5, None), (1.0, None), ("1.5", None), ("1e3", None), (True, None), (False, None), (0, None), (-3, None),
        ("-3", None), (" 4", None), ("٣", None), (2**63, None), (10**29, None), (str(10**29), None), (None, None),
        ([1], None), ({"id": 1.5}, None), (float("nan"), None),
    ],
)  # fmt: skip
def test_ids_are_strict_integers_within_sqlite_int64(value, expected):
    from labelstudio_maskclip.labelstudio.webhooks import label_studio_id

    assert label_studio_id(value) == expected


def test_float_and_huge_ids_never_touch_other_annotations(tmp_path):
    from labelstudio_maskclip.labelstudio.webhooks import handle_event
    from labelstudio_maskclip.learning.store import Store

    store = Store(tmp_path)
    assert handle_event(_brush_event(1), store).status == "stored"
    for entry in (1.5, {"id": 1.5}, "1.5", 1.0, True, 10**29, {"id": str(10**29)}):
        result = handle_event({"action": "ANNOTATIONS_DELETED", "annotations": [entry]}, store)
        assert result.status == "rejected" and result.rejected, entry
        assert store.annotation(1)["deleted"] == 0, entry
    for bad in (10**29, 2**63, 1.5, -1):
        assert handle_event(_brush_event(bad), store).status == "rejected"
        assert handle_event(_brush_event(2, task_id=bad), store).status == "rejected"
    assert store.check() == []


def test_huge_ids_over_http_give_4xx_or_a_rejection_never_500(tmp_path):
    client = create_app(Settings(model_dir=str(tmp_path)), warm=False).test_client()
    for body in (
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 10**29}]},
        _brush_event(10**29),
        _brush_event(3, task_id=10**29),
        {**_brush_event(4), "project": {"id": 10**29}},
        {"action": "TASKS_CREATED", "tasks": [{"id": 10**29, "data": {"image": "/x.png"}}]},
    ):
        reply = client.post("/webhook", json=body)
        assert reply.status_code < 500, (body["action"], reply.get_data()[:200])


def test_deleting_unknown_ids_leaves_no_tombstones_and_later_creations_are_stored(tmp_path):
    from labelstudio_maskclip.labelstudio.webhooks import handle_event
    from labelstudio_maskclip.learning.store import Store

    store = Store(tmp_path)
    size = store.path.stat().st_size
    unknown = list(range(1000, 6000))
    result = handle_event({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in unknown]}, store)
    assert result.status == "deleted"
    assert all(store.annotation(i) is None for i in (1000, 3000, 5999))
    assert handle_event(_brush_event(3000), store).status == "stored"
    assert store.annotation(3000)["labels"] == ["Food"]
    # a known id still gets its tombstone: a late update does not bring it back
    assert handle_event({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 3000}]}, store).status == "deleted"
    late = _brush_event(3000, action="ANNOTATION_UPDATED")
    late["annotation"]["updated_at"] = "2099-01-01T00:00:00Z"
    assert handle_event(late, store).status == "deleted"
    store.close()
    wal = store.path.with_name(store.path.name + "-wal")
    assert store.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0) < size + 2_000_000
    with __import__("sqlite3").connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 1


# --- bounded work per annotation (item 3) -------------------------------------------------------------


def _polygon_region(region_id, points, height=4000, width=4000, label="Food"):
    return {
        "id": region_id, "from_name": "poly", "to_name": "image", "type": "polygonlabels",
        "original_width": width, "original_height": height,
        "value": {"points": points, "polygonlabels": [label]},
    }  # fmt: skip


POLY_CONFIG = (
    '<View><Image name="image" value="$image"/><PolygonLabels name="poly" toName="image">'
    + "".join(f'<Label value="L{i}"/>' for i in range(40))
    + '<Label value="Food"/></PolygonLabels></View>'
)


def _annotation_body(annotation_id, regions, predictions=None):
    body = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": annotation_id, "task": 5, "result": regions, "updated_at": "2026-11-28T10:00:00Z"},
        "task": {"id": 5, "data": {"image": "/x.jpg"}},
        "project": {"id": 1, "label_config": POLY_CONFIG},
    }
    if predictions is not None:
        body["annotation"]["parent_prediction"] = 77
        body["task"]["predictions"] = [{"id": 77, "result": predictions}]
    return body


def _zigzag(n, seed=0, spread=900.0):
    import random

    rng = random.Random(seed)
    return [[rng.uniform(-spread, 100 + spread), rng.uniform(-spread, 100 + spread)] for _ in range(n)]


SQUARE = [[10, 10], [60, 10], [60, 60], [10, 60]]


def test_a_300k_point_polygon_is_rejected_before_rasterising_in_bounded_memory(tmp_path):
    """In a child process limited to 3 GB of address space: the old code crashed the process (pycocotools
    allocating tens of GB for the edges); now the annotation is rejected with a reason and the next stored."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    payload = tmp_path / "body.json"
    payload.write_text(json.dumps(_annotation_body(1, [_polygon_region("big", _zigzag(300_000))])))
    script = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from labelstudio_maskclip.learning.store import Store
from labelstudio_maskclip.labelstudio.webhooks import handle_event
sys.setrecursionlimit(10000)
store = Store({str(tmp_path / "store")!r})
big = handle_event(json.load(open({str(payload)!r})), store)
small = handle_event({json.dumps(_annotation_body(2, [_polygon_region("ok", SQUARE)]))!r} and
                     json.loads({json.dumps(json.dumps(_annotation_body(2, [_polygon_region("ok", SQUARE)])))}), store)
print(json.dumps([big.status, big.rejected, small.status]))
"""
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=repo,
                          env={**__import__("os").environ, "PYTHONPATH": repo})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    status, reasons, small = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == "rejected" and small == "stored"
    assert "too much work" in reasons[0] and "polygon points" in reasons[0], reasons


# pixel bounds scaled down so the tests stay small
SCALED_PIXELS = {"MAX_DECODED_PIXELS": 5_000_000}
SCALED_BYTES = {"MAX_MASK_BYTES": 100_000}


@pytest.mark.parametrize(
    "regions, predictions, what, bounds",
    [
        ([_polygon_region(f"r{i}", _zigzag(2500, i, spread=0), 20, 20) for i in range(50)], None, "polygon points", {}),
        ([_polygon_region("z", _zigzag(5000, 1))], None, "pixels of polygon edges", {}),
        ([_polygon_region(f"r{i}", SQUARE, 20, 20) for i in range(1001)], None, "mask regions", {}),
        ([_polygon_region(f"r{i}", SQUARE, 1000, 1000) for i in range(6)], None, "decoded pixels", SCALED_PIXELS),
        (
            [_polygon_region(f"r{i}", SQUARE, 100, 100, f"L{i}") for i in range(40)],
            None,
            "bytes of masks",
            SCALED_BYTES,
        ),
        ([_polygon_region("a", SQUARE)], [_polygon_region("a", _zigzag(20000, 2))], "polygon edges", {}),
        ([_polygon_region("a", SQUARE)], [_polygon_region(f"p{i}", SQUARE) for i in range(1001)], "mask regions", {}),
    ],
    ids=[
        "points-over-regions",
        "edges",
        "regions",
        "pixels",
        "labels-x-size",
        "prediction-edges",
        "prediction-regions",
    ],
)
def test_work_per_annotation_is_bounded_before_decoding(tmp_path, monkeypatch, regions, predictions, what, bounds):
    from pycocotools import mask as coco_mask

    from labelstudio_maskclip.labelstudio import webhooks
    from labelstudio_maskclip.labelstudio.webhooks import handle_event
    from labelstudio_maskclip.learning.store import Store

    store = Store(tmp_path)
    assert handle_event(_annotation_body(9, [_polygon_region("ok", SQUARE)]), store).status == "stored"
    for name, value in bounds.items():
        monkeypatch.setattr(webhooks, name, value)
    walked = []
    real = coco_mask.frPyObjects
    monkeypatch.setattr(coco_mask, "frPyObjects", lambda polys, h, w: walked.append(h * w) or real(polys, h, w))
    result = handle_event(_annotation_body(9, regions, predictions), store)
    assert result.status == "rejected" and what in result.rejected[0] and "too much work" in result.rejected[0]
    assert sum(walked) <= webhooks.MAX_DECODED_PIXELS  # what was rasterised before the bound was hit
    assert store.annotation(9)["labels"] == ["Food"]  # the stored version stays
    assert store.check() == []


def test_edge_pixels_count_what_pycocotools_walks():
    import numpy as np

    from labelstudio_maskclip.masks.polygons import PolygonError, edge_pixels, polygons_to_mask

    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    assert edge_pixels([square]) == 44 and edge_pixels([square[:2]]) == 0
    assert edge_pixels([square * 1e300]) > 10**18  # no overflow, no exception
    with pytest.raises(PolygonError, match="edges"):
        polygons_to_mask([square * 1000], 100, 100, max_edge_pixels=1000)
    assert polygons_to_mask([square], 20, 20, max_edge_pixels=44).sum() == 100


# --- webhook follow-ups: idempotent repeats (item 10), bounded queue and prompt shutdown (item 7) ---------


class FakeLabelStudio:
    """Loopback Label Studio API: GET /api/annotations/N, /api/predictions/N from dicts; counts hits; every
    answer waits for ``gate`` (set = answer at once)."""

    def __init__(self):
        import http.server
        import json
        import threading

        self.annotations: dict[int, dict] = {}
        self.predictions: dict[int, dict] = {}
        self.hits: dict[str, int] = {}
        self.gate = threading.Event()
        self.gate.set()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                fake.hits[self.path] = fake.hits.get(self.path, 0) + 1
                fake.gate.wait(120)
                kind, _, key = self.path.rpartition("/")
                table = {"/api/annotations": fake.annotations, "/api/predictions": fake.predictions}.get(kind, {})
                body = table.get(int(key)) if key.isdigit() else None
                data = json.dumps(body if body is not None else {"detail": "not found"}).encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.gate.set()
        self.server.shutdown()


@pytest.fixture
def fake_ls():
    fake = FakeLabelStudio()
    yield fake
    fake.stop()


def _brush(region_id, label, top):
    import numpy as np

    from labelstudio_maskclip.masks.brush import mask_to_brush_rle

    mask = np.zeros((48, 64), bool)
    mask[top : top + 10, 5:30] = True
    return {
        "id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": 64, "original_height": 48,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
    }  # fmt: skip


def _accepted_event(annotation_id, prediction_id=77):
    from tests.served import BRUSH

    annotation = {
        "id": annotation_id, "task": 5, "project": 1, "completed_by": {"id": 3, "email": "a@example.com"},
        "result": [_brush("r1", "Food", 5)], "parent_prediction": prediction_id, "was_cancelled": False,
        "ground_truth": False, "updated_at": "2026-11-28T10:00:00.000000Z",
    }  # fmt: skip
    return {
        "action": "ANNOTATION_CREATED", "annotation": annotation,
        "task": {"id": 5, "data": {"image": "/data/upload/1/x.jpg"}, "project": 1},
        "project": {"id": 1, "label_config": BRUSH},
    }  # fmt: skip


def test_repeated_webhooks_with_a_parent_prediction_change_nothing(tmp_path, fake_ls):
    from labelstudio_maskclip.learning.store import Store
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend, runtime
    from tests.served import wait_for

    settings = Settings(model_dir=str(tmp_path), label_studio_url=fake_ls.url, label_studio_api_key="tok")
    event = _accepted_event(1)
    fake_ls.annotations[1] = {**event["annotation"], "completed_by": 3}
    fake_ls.predictions[77] = {"id": 77, "result": [_brush("r1", "Food", 5), _brush("r2", "Sky", 30)]}
    backend = MaskCLIPBackend(settings)
    first = [backend.fit(event["action"], event)["status"] for _ in range(3)]
    store = Store(tmp_path)
    wait_for(lambda: (store.annotation(1) or {}).get("accepted_unchanged") is not None, 60, "the follow-up")
    wait_for(lambda: runtime(settings).followups.done >= 1, 60, "the follow-up to finish")
    seq = store.current_seq()
    later = [backend.fit(event["action"], event)["status"] for _ in range(3)]
    assert first == ["stored", "duplicate", "duplicate"] and later == ["duplicate"] * 3
    assert store.current_seq() == seq == 1  # outcomes are not a new annotation: nothing counts twice
    assert store.count_since_last_training() == 1
    stats = store.acceptance_stats()
    assert stats["Food"]["unchanged"] == 1 and stats["Sky"]["deleted"] == 1  # kept through the repeats
    assert store.annotation(1)["accepted_unchanged"] == 0
    assert fake_ls.hits.get("/api/predictions/77") == 1  # fetched once
    runtime(settings).followups.stop()


def test_outcomes_in_the_payload_then_repeats_without_them_keep_them(tmp_path):
    from labelstudio_maskclip.labelstudio.webhooks import handle_event
    from labelstudio_maskclip.learning.store import Store

    store = Store(tmp_path)
    event = _accepted_event(2)
    assert handle_event(event, store).status == "stored"
    with_prediction = _accepted_event(2)
    with_prediction["annotation"]["prediction"] = {"id": 77, "result": [_brush("r1", "Food", 5)]}
    assert handle_event(with_prediction, store).status == "outcomes"
    assert handle_event(with_prediction, store).status == "duplicate"
    for _ in range(3):
        assert handle_event(event, store).status == "duplicate"
    assert store.annotation(2)["accepted_unchanged"] == 1 and store.acceptance_stats()["Food"]["unchanged"] == 1
    assert store.current_seq() == 1
    edited = _accepted_event(2)
    edited["annotation"]["prediction"] = {"id": 77, "result": [_brush("r1", "Food", 20)]}
    assert handle_event(edited, store).status == "outcomes"  # another prediction result: outcomes replaced
    assert store.acceptance_stats()["Food"] == {"unchanged": 0, "edited": 1, "deleted": 0, "added": 0}
    assert store.current_seq() == 1


def test_follow_up_queue_is_bounded_and_small_when_label_studio_hangs(tmp_path, fake_ls, caplog):
    import pickle

    from labelstudio_maskclip.serving.backend import MaskCLIPBackend, runtime
    from labelstudio_maskclip.serving.followups import MAX_PENDING
    from tests.served import wait_for

    fake_ls.gate.clear()  # Label Studio hangs
    settings = Settings(model_dir=str(tmp_path), label_studio_url=fake_ls.url, download_timeout=120.0)
    backend = MaskCLIPBackend(settings)
    n = MAX_PENDING + 40
    for i in range(1, n + 1):
        event = _accepted_event(1000 + i, prediction_id=5000 + i)
        assert backend.fit(event["action"], event)["status"] == "stored"
    followups = runtime(settings).followups
    wait_for(lambda: sum(fake_ls.hits.values()) >= 1, 30, "the first follow-up to reach Label Studio")
    assert followups.pending() <= MAX_PENDING
    assert followups.dropped == n - MAX_PENDING - 1  # one is running, the rest wait or were dropped
    assert "dropped" in caplog.text and "backfill" in caplog.text
    assert all(len(pickle.dumps(item)) < 4096 for _, item in list(followups._queue.queue))  # no masks kept
    assert followups.stop(timeout=0.1) in (True, False)  # returns although Label Studio still hangs
    assert followups.pending() == 0


def test_a_worker_exits_promptly_with_follow_ups_stuck_on_label_studio(tmp_path):
    """A child process answers a webhook whose follow-up hangs on Label Studio, then exits: it must not wait
    for the follow-up (the old executor thread was joined at exit: shutdown hung as long as Label Studio, 60 s
    here; the bound of 40 s is for a loaded machine, the child needs a few seconds)."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    hung = socket.socket()  # accepts connections (kernel backlog), never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    url = f"http://127.0.0.1:{hung.getsockname()[1]}"
    script = f"""
import json, sys, time
from labelstudio_maskclip.serving.backend import MaskCLIPBackend
from labelstudio_maskclip.settings import Settings
s = Settings(model_dir={str(tmp_path)!r}, label_studio_url={url!r}, download_timeout=600.0)
event = json.loads({json.dumps(json.dumps(_accepted_event(3)))})
print(MaskCLIPBackend(s).fit(event["action"], event)["status"], flush=True)
time.sleep(1.0)  # the follow-up is now waiting on Label Studio
"""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**__import__("os").environ, "PYTHONPATH": repo}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=40, cwd=repo, env=env
        )
    finally:
        hung.close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["stored"]


# --- a damaged store (item 12) --------------------------------------------------------------------------


def _filled_store(directory, n=120):
    import numpy as np

    from labelstudio_maskclip.learning.store import AnnotationWrite, Store, TaskRecord

    store = Store(directory)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        store.put_annotation(
            AnnotationWrite(id=i, task=TaskRecord(i, 1, f"/x{i}.jpg"), height=64, width=80,
                            masks={"cat": rng.random((64, 80)) > 0.5}, outcomes=[("r", "cat", "unchanged")],
                            accepted_unchanged=True)
        )  # fmt: skip
    store.close()
    return store.path


def _corrupt(path, page):
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[page * 4096 : (page + 1) * 4096] = bytes((i * 7 + 13) % 256 for i in range(4096))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("page", [0, 2, 5, 40, 100], ids=lambda p: f"page{p}")
def test_a_damaged_store_is_found_at_open_and_refuses_every_use(tmp_path, page):
    from labelstudio_maskclip.learning.store import AnnotationWrite, Store, StoreDamaged, TaskRecord

    _corrupt(_filled_store(tmp_path), page)
    store = Store(tmp_path)  # opening never raises for a damaged file: it says so
    assert store.damage, "quick_check found nothing"
    message = store.damage_message()
    assert "damaged" in message and "backfill" in message and "annotations.sqlite3" in message
    calls = [
        lambda: list(store.accepted_samples()), store.acceptance_stats, store.count_since_last_training,
        store.labels, store.training_runs, lambda: store.annotation(1), lambda: list(store.unlabeled_tasks()),
        lambda: store.put_annotation(AnnotationWrite(id=999, task=TaskRecord(9))), lambda: store.delete_annotations([1]),
        lambda: store.put_tasks([TaskRecord(5)]), lambda: store.mark_trained(),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(StoreDamaged, match="backfill"):
            call()


def test_corruption_met_while_running_is_detected_and_reported(tmp_path):
    import threading

    from labelstudio_maskclip.learning.store import Store, StoreDamaged

    path = _filled_store(tmp_path)
    store = Store(tmp_path)
    assert store.damage == [] and store.count_since_last_training() == 120
    store.close()
    _corrupt(path, 5)
    errors = []

    def use():  # a new thread: a new connection, which reads the pages from disk
        try:
            list(store.accepted_samples())
        except StoreDamaged as e:
            errors.append(str(e))

    thread = threading.Thread(target=use)
    thread.start()
    thread.join(60)
    assert errors and "backfill" in errors[0]
    assert store.damage
    with pytest.raises(StoreDamaged):
        store.labels()


def test_health_webhook_and_cli_say_the_store_is_damaged(tmp_path, monkeypatch, capsys, caplog):
    from labelstudio_maskclip.cli import main
    from tests.served import brush_webhook, wait_for

    _corrupt(_filled_store(tmp_path), 5)
    app = create_app(Settings(model_dir=str(tmp_path), pretrained="absent-on-purpose"), warm=False)
    client = app.test_client()
    reply = client.post("/webhook", json=brush_webhook(500, 50))
    assert reply.status_code == 503 and "backfill" in reply.get_json()["error"]
    health = wait_for(lambda: (r := client.get("/health")).status_code == 503 and r, 30, "/health to report it")
    assert health.get_json()["store"] == "damaged" and "backfill" in health.get_json()["error"]
    assert client.get("/metrics").status_code == 503

    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    out = tmp_path / "coco.json"
    assert main(["export-coco", "--out", str(out)]) == 2
    assert not out.exists()  # nothing exported from a damaged store
    assert main(["stats"]) == 2  # a message, not a traceback
    assert "backfill" in caplog.text


# --- health check under basic auth (item 9) -------------------------------------------------------------


@pytest.fixture
def served_app(tmp_path):
    """create_app under a real WSGI server on loopback; yields start(settings) -> URL of /health."""
    import threading

    from werkzeug.serving import make_server

    servers = []

    def start(**auth):
        app = create_app(Settings(model_dir=str(tmp_path), **auth), warm=False)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/health"

    yield start
    for server in servers:
        server.shutdown()


def _healthcheck(url, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH_")}
    args = [sys.executable, "-m", "labelstudio_maskclip.serving.healthcheck", "--url", url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=repo,
                          env={**clean, "PYTHONPATH": repo, **env})  # fmt: skip


@pytest.mark.parametrize("password", ["s3cret", "pässwörd 密码"], ids=["ascii", "non-ascii"])
def test_container_health_check_works_with_and_without_basic_auth(served_app, password):
    secured = served_app(basic_auth_user="ls", basic_auth_pass=password)
    done = _healthcheck(secured, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS=password)
    assert done.returncode == 0, done.stdout + done.stderr
    assert password not in done.stdout + done.stderr
    wrong = _healthcheck(secured, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS=password + "x")
    assert wrong.returncode == 1 and "401" in wrong.stdout
    assert _healthcheck(secured).returncode == 1  # no credentials: /health needs them too
    open_ = served_app()
    assert _healthcheck(open_).returncode == 0
    assert _healthcheck(open_, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="whatever").returncode == 0


def test_label_studio_style_probe_with_latin1_credentials_is_accepted(served_app):
    """Label Studio 1.23 probes /health with requests' HTTPBasicAuth, which encodes text as latin-1."""
    import requests
    from requests.auth import HTTPBasicAuth

    url = served_app(basic_auth_user="ls", basic_auth_pass="pässwörd")
    assert requests.get(url, auth=HTTPBasicAuth("ls", "pässwörd"), timeout=30).status_code == 200
    assert requests.get(url, auth=HTTPBasicAuth("ls", "passwörd"), timeout=30).status_code == 401
    assert requests.get(url, timeout=30).status_code == 401


def test_docker_health_checks_authenticate_from_the_environment():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    command = ["python", "-m", "labelstudio_maskclip.serving.healthcheck", "--url", "http://127.0.0.1:9090/health"]
    assert "CMD " + __import__("json").dumps(command) in dockerfile and "curl" not in dockerfile.split("HEALTHCHECK")[1]
    compose = yaml.safe_load((root / "docker" / "docker-compose.yml").read_text())
    assert compose["services"]["maskclip"]["healthcheck"]["test"] == ["CMD", *command]


# --- requests read whole in the event loop (issue #22, item 2; the whole-system test is in tests/test_faults.py)


def _through(messages: list[dict], *, headers: list, admit: bool = True, budget: int = 1 << 20, gaps=None):
    """Runs one request through WholeRequests: ``messages`` are what the client's body arrives as, ``gaps``
    the seconds of the (injected) clock between them. Returns (what the app saw or None, the reply sent)."""
    import asyncio

    from labelstudio_maskclip.serving.asgi import WholeRequests

    now = [0.0]
    seen, sent = [], []
    pending = list(messages)

    async def receive():
        now[0] += (gaps or {}).get(len(messages) - len(pending), 0.0)
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        first = await receive()
        seen.append((dict(scope["headers"]), first.get("body", b""), first.get("more_body", False)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = WholeRequests(app, lambda scope: admit, max_body=1000, budget=budget, clock=lambda: now[0])
    asyncio.run(gate({"type": "http", "headers": headers}, receive, send))
    assert gate.buffered == 0  # every byte held is given back
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return (seen[0] if seen else None), status


def test_the_app_gets_a_whole_body_with_its_length():
    chunks = [{"type": "http.request", "body": b'{"a"', "more_body": True},
              {"type": "http.request", "body": b": 1}", "more_body": False}]  # fmt: skip
    seen, status = _through(chunks, headers=[(b"transfer-encoding", b"chunked")])
    assert status == 200 and seen == ({b"content-length": b"8"}, b'{"a": 1}', False)


def test_a_body_slower_than_the_minimum_rate_is_answered_408():
    from labelstudio_maskclip.serving.asgi import MIN_RATE, READ_TIMEOUT

    drip = [{"type": "http.request", "body": b" ", "more_body": True}] * 3
    seen, status = _through(drip, headers=[(b"content-length", b"900")], gaps={2: READ_TIMEOUT + 1})
    assert (seen, status) == (None, 408)
    fast = [{"type": "http.request", "body": b" " * 10, "more_body": True}] * 2 + [{"type": "http.request"}]
    seen, status = _through(fast, headers=[], gaps={1: READ_TIMEOUT + 10 / MIN_RATE})  # within 15 s + size/rate
    assert status == 200 and seen[1] == b" " * 20


def test_unadmitted_and_oversized_requests_reach_the_app_unread():
    body = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]
    seen, status = _through(body, headers=[(b"content-length", b"500")], admit=False)
    assert status == 200 and seen[1:] == (b"x" * 10, True)  # the app reads (or refuses) it itself
    seen, status = _through(body, headers=[(b"content-length", b"5000")])  # over max_body: the app's 413
    assert seen[1:] == (b"x" * 10, True)


def test_bodies_past_the_buffer_budget_or_the_size_limit_are_refused():
    body = [{"type": "http.request", "body": b"x" * 400, "more_body": True}] * 3
    assert _through(body, headers=[], budget=500)[1] == 503  # chunked: counted as it arrives
    assert _through(body, headers=[(b"content-length", b"900")], budget=800)[1] == 503  # declared: at once
    assert _through(body, headers=[])[1] == 413  # a chunked body past max_body (1000)


# --- log lines cannot be forged (issue #22, item 10) ----------------------------------------------------


def test_a_newline_in_a_task_cannot_forge_a_log_line(tmp_path):
    """The served backend logs each task's failure with its URL and id: newlines (and other line breaks) sent
    in them come out escaped, inside the one record, never as a line of their own."""
    import requests

    from tests.served import BRUSH, start_backend
    from tests.tiny import TINY_VIT, save_random_state

    weights = save_random_state(TINY_VIT, tmp_path / "tiny.pt")
    backend = start_backend(tmp_path / "b", TINY_VIT, str(weights), "http://127.0.0.1:1", workers=1)
    forged = "2026-01-01 00:00:00,000 WARNING labelstudio_maskclip: FORGED"
    try:
        tasks = [
            {"id": 1, "data": {"image": f"http://127.0.0.1:1/a.jpg\n{forged} by url"}},
            {"id": f"2\r\n{forged} by id", "data": {"text": "no image"}},
            {"id": f"3\u2028{forged} by separator", "data": {"image": ["not a URL"]}},
        ]
        reply = requests.post(backend.url + "/predict", json={"tasks": tasks, "label_config": BRUSH}, timeout=60)
        assert reply.status_code == 200 and len(reply.json()["errors"]) == 3
    finally:
        backend.stop()
    text = backend.log_text()
    lines = text.replace("\u2028", "\n").splitlines()
    assert not [line for line in lines if "FORGED" in line and not line.startswith("20") or line.startswith(forged)]
    for how in ("by url", "by id", "by separator"):
        assert sum(f"FORGED {how}" in line for line in lines) >= 1, text[-3000:]
    assert f"\\n{forged} by url" in text and f"\\r\\n{forged} by id" in text and f"\\u2028{forged}" in text


def test_one_line_escapes_every_line_break():
    from labelstudio_maskclip.logs import one_line

    assert one_line("a\nb\rc\x0bd\x0ce\x1cf\x85g\u2028h\u2029i\x00j\tk") == (
        "a\\nb\\rc\\x0bd\\x0ce\\x1cf\\x85g\\u2028h\\u2029i\\x00j\\tk"
    )
    assert len(one_line("".join(map(chr, range(0x110000))).encode("utf-16", "surrogatepass").decode("utf-16",
               "surrogatepass")).splitlines()) == 1  # fmt: skip


# --- memory a request body can take (issue #22, item 6) ------------------------------------------------

_N = 20_000
JSON_FORMS = {
    "objects": "[" + ",".join(["{}"] * _N) + "]",
    "arrays": "[" + ",".join(["[]"] * _N) + "]",
    "one-key objects": "[" + ",".join(['{"a":0}'] * _N) + "]",
    "keys": "{" + ",".join(f'"{i}":{i}' for i in range(_N)) + "}",
    "empty strings": "[" + ",".join(['""'] * _N) + "]",
    "astral strings": "[" + ",".join([f'"\\ud83d\\ude00{i}"' for i in range(_N)]) + "]",
    "short strings": "[" + ",".join(f'"{i}"' for i in range(_N)) + "]",
    "floats": "[" + ",".join(["1.5"] * _N) + "]",
    "big numbers": "[" + ",".join(str(10**12 + i) for i in range(_N)) + "]",
    "rle": "[" + ",".join(str(i % 256) for i in range(_N)) + "]",
    "literals": "[" + ",".join(["true", "null"] * (_N // 2)) + "]",
}


@pytest.mark.parametrize("form", JSON_FORMS, ids=str)
def test_the_parsed_size_bound_holds_for_every_kind_of_json(form):
    import json
    import tracemalloc

    from labelstudio_maskclip.serving.server import parsed_size_bound

    body = JSON_FORMS[form].encode()
    tracemalloc.start()
    try:
        parsed = json.loads(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed and peak <= parsed_size_bound(body)


def test_bodies_that_would_parse_past_the_memory_budget_get_413_and_the_server_keeps_serving(tmp_path):
    import json

    from labelstudio_maskclip.serving import server

    app = create_app(Settings(model_dir=str(tmp_path)), warm=False)
    client = app.test_client()
    # 26 MB of empty objects: 13 M Python dicts (about 650 MB parsed), under the 256 MB body limit.
    bomb = b'{"tasks": [' + b",".join([b"{}"] * (13 * 1024 * 1024)) + b'], "label_config": "<View/>"}'
    assert len(bomb) < app.config["MAX_CONTENT_LENGTH"] and server.parsed_size_bound(bomb) > server.JSON_MEMORY_BUDGET
    for path in ("/predict", "/webhook", "/setup"):
        reply = client.post(path, data=bomb, content_type="application/json")
        assert reply.status_code == 413 and "MiB of memory parsed" in reply.get_json()["error"], path
    reply = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"label_config": BRUSH_CONFIG}})
    assert reply.status_code == 201 and json.loads(reply.data)["status"]
    assert client.get("/health").status_code == 200


def test_a_small_webhook_is_admitted_whatever_the_memory_budget_holds(tmp_path, monkeypatch):
    """Label Studio does not retry webhooks: a small annotation must not meet a 413 or 503 for memory."""
    import json

    from labelstudio_maskclip.serving import server

    monkeypatch.setattr(server, "JSON_MEMORY_BUDGET", 16)  # less than any body's parsed size
    client = create_app(Settings(model_dir=str(tmp_path)), warm=False).test_client()
    reply = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"label_config": BRUSH_CONFIG}})
    assert reply.status_code == 201 and json.loads(reply.data)["status"]
    large = b'{"action": "PROJECT_UPDATED", "pad": "' + b"x" * (server.SMALL_BODY + 1) + b'"}'
    assert client.post("/webhook", data=large, content_type="application/json").status_code == 413


def test_requests_in_flight_share_one_memory_budget(tmp_path):
    from labelstudio_maskclip.serving import server

    app = create_app(Settings(model_dir=str(tmp_path)), warm=False)
    budget = server._MemoryBudget(1000)
    with app.test_request_context("/predict"):
        budget.reserve(600)
        with app.test_request_context("/webhook"):
            with pytest.raises(server._Busy):
                budget.reserve(600)  # another request while the first holds its share: 503, retry later
            budget.reserve(400)
            budget.release()
        assert budget.used == 600
        budget.release()
    assert budget.used == 0


BRUSH_CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="Cat"/>'
    "</BrushLabels></View>"
)
