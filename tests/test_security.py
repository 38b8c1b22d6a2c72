"""Hardening of the HTTP surface: basic auth on bytes, the health check under auth, ids, bounded work."""

from __future__ import annotations

import base64

import pytest

from labelstudio_maskclip.labelstudio.server import basic_auth_header, create_app, credentials_match
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
    from labelstudio_maskclip.learning.webhooks import label_studio_id

    assert label_studio_id(value) == expected


def test_float_and_huge_ids_never_touch_other_annotations(tmp_path):
    from labelstudio_maskclip.learning.store import Store
    from labelstudio_maskclip.learning.webhooks import handle_event

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
    from labelstudio_maskclip.learning.store import Store
    from labelstudio_maskclip.learning.webhooks import handle_event

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
from labelstudio_maskclip.learning.webhooks import handle_event
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

    from labelstudio_maskclip.learning import webhooks
    from labelstudio_maskclip.learning.store import Store
    from labelstudio_maskclip.learning.webhooks import handle_event

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
