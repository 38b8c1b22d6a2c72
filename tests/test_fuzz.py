"""A bounded, seeded fuzz of the HTTP surface (/predict, /setup, /webhook) through Flask's test client.

Bad input must never give a 500: a 4xx with a JSON ``error``, or a 200 with per-task errors. Afterwards the
app still answers /health and the store is consistent with nothing lost that was stored before the fuzz.
Odd image bytes are served by a loopback file host playing Label Studio.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelstudio_maskclip.learning.store import Store
from labelstudio_maskclip.serving.server import create_app
from labelstudio_maskclip.settings import Settings
from tests.served import BRUSH, PHOTOS, FileHost, brush_webhook
from tests.tiny import TINY_VIT, save_random_state

SEED, CASES = 20261128, 300
KEPT = [10**9 + k for k in range(5)]  # annotations stored before the fuzz; the fuzzer never draws these ids


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 30000) -> bytes:
    """A valid 1-bit grayscale PNG of side x side black pixels: ~100 KB of file, side**2 pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


ODD_FILES = {
    "zero.jpg": lambda: b"",
    "header.png": lambda: b"\x89PNG\r\n\x1a\n",
    "anim.gif": lambda: _encoded(Image.new("P", (40, 30), 3), "GIF"),
    "one.png": lambda: _encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "bomb.png": png_bomb,  # 900 Mpx: over Pillow's own decompression-bomb limit (2 x 89.5 Mpx)
    "bomb100m.png": lambda: png_bomb(10000),  # 100 Mpx: over MASKCLIP_MAX_IMAGE_PIXELS (64 Mpx), under Pillow's
    "text.jpg": lambda: "ceci n'est pas une image \u00e9".encode(),
    "photo.jpg": lambda: (PHOTOS / "000000000009.jpg").read_bytes(),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    for name, make in ODD_FILES.items():
        (root / name).write_bytes(make())
    host = FileHost(root)
    weights = save_random_state(TINY_VIT, tmp_path_factory.mktemp("w") / "tiny.pt")
    settings = Settings(
        model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=64, templates="simple",
        model_dir=str(tmp_path_factory.mktemp("model_dir")), label_studio_url=host.url, min_area=0.0,
        download_timeout=5.0,
    )  # fmt: skip
    app = create_app(settings, warm=False)
    yield app, settings
    host.stop()


# --- generators of garbage ----------------------------------------------------------------------------


def scalar(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 1, 2**63, -(2**70), 1.5, 1e308, -0.0, "", "x", "0", "null", "\x00", "\u202e\ud7ff",
        "é" * 50, "🦓" * 10, "a" * rng.choice([10, 10_000, 200_000]), "<View/>", "../../etc/passwd", "[]", "{}",
    ])  # fmt: skip


def garbage(rng: random.Random, depth: int = 0):
    kind = rng.randrange(6 if depth < 3 else 1)
    if kind == 0 or depth >= 3:
        return scalar(rng)
    if kind == 1:
        return [garbage(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 2:
        keys = ["id", "data", "image", "result", "value", "rle", "type", "action", "project", "", "\x00", "🦓"]
        return {rng.choice(keys): garbage(rng, depth + 1) for _ in range(rng.randrange(4))}
    if kind == 3:
        return rng.choice(list(ODD_FILES))
    if kind == 4:
        return [rng.randrange(256) for _ in range(rng.randrange(40))]  # an RLE-ish byte list
    return {"a": [garbage(rng, depth + 1)]}


def image_ref(rng: random.Random):
    return rng.choice([
        "/data/upload/" + rng.choice(list(ODD_FILES)), "/data/upload/missing.png", "data:image/png;base64,!!!", "data:,", "data:image/gif;base64,",
        "ftp://example.com/x.png", "file:///etc/passwd", "http://10.0.0.1/x.jpg", "http://[::1]:1/x.png", "s3://b/k.png",
        "//evil/x.png", "/\x00.png", "/" + "é" * 300 + ".jpg", "http://", "gs://", 123, None, ["/one.png"], {"u": 1},
    ])  # fmt: skip


def label_config(rng: random.Random):
    label = rng.choice(["", "\x00", "é" * 100, "a" * 5000, "<", "&amp;", "Food", "🦓", " "])
    return rng.choice([
        BRUSH, BRUSH, garbage(rng), "<View><Image", "<View/>", "\x00" * 10, "<" * 5000,
        f'<View><Image name="i" value="$image"/><BrushLabels name="t" toName="i"><Label value="{label}"/>'
        "</BrushLabels></View>",
        '<View><Image name="i" value="image"/><BrushLabels name="t" toName="i"><Label value="x"/></BrushLabels></View>',
        '<View><Image name="i" value="$image"/><BrushLabels name="t" toName="nowhere"><Label value="x"/></BrushLabels></View>',
        '<!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><View>&b;</View>',
        '<View><Image name="i" value="$image"/><PolygonLabels name="p" toName="i"><Label value="x" '
        'predicted_values=",,,"/></PolygonLabels></View>',
    ])  # fmt: skip


def task(rng: random.Random):
    return rng.choice(
        [
            {"id": rng.choice([1, "1", None, -5, 2**64, 1.5]), "data": {"image": image_ref(rng)}},
            {"id": 2, "data": garbage(rng)},
            {"data": {"image": image_ref(rng), "other": garbage(rng)}},
            garbage(rng),
        ]
    )


def predict_body(rng: random.Random):
    body = {"tasks": rng.choice([[task(rng) for _ in range(rng.randrange(1, 5))], garbage(rng), [], {"0": task(rng)}]),
            rng.choice(["label_config", "schema"]): label_config(rng)}  # fmt: skip
    for key in ("project", "params", "model_version"):
        if rng.random() < 0.5:
            body[key] = rng.choice([garbage(rng), {"context": garbage(rng)}])
    return body


def region(rng: random.Random):
    base = json.loads(json.dumps(brush_webhook(1, 1)["annotation"]["result"][0]))
    field = rng.choice(["original_width", "original_height", "value", "type", "from_name", "rle", "brushlabels",
                        "points", "id"])  # fmt: skip
    if field in ("rle", "brushlabels"):
        base["value"][field] = garbage(rng)
    elif field == "points":
        base["type"] = "polygonlabels"
        base["value"] = {"points": rng.choice([garbage(rng), [[1e300, 5], [0, 0], [5, 5]], [[0, 0]] * 3]),
                         "polygonlabels": ["Food"]}  # fmt: skip
    else:
        base[field] = rng.choice([garbage(rng), 0, -480, 10**9, 2**31])
    return base


def webhook_body(rng: random.Random):
    action = rng.choice(["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "TASKS_CREATED",
                         "PROJECT_UPDATED", "", None, 5, "\x00", "annotation_created"])  # fmt: skip
    aid = rng.randrange(1, 50)
    body = brush_webhook(aid, rng.randrange(1, 20))
    body["action"] = action
    pick = rng.randrange(8)
    if pick == 0:
        body["annotation"]["result"] = [region(rng) for _ in range(rng.randrange(1, 3))]
    elif pick == 1:
        body["annotation"] = garbage(rng)
    elif pick == 2:
        body["task"] = garbage(rng)
    elif pick == 3:
        body["project"] = rng.choice([garbage(rng), {"id": garbage(rng), "label_config": label_config(rng)}])
    elif pick == 4:
        body["annotations"] = rng.choice([garbage(rng), [{"id": aid}], [{"id": garbage(rng)}]])
    elif pick == 5:
        body["tasks"] = rng.choice([garbage(rng), [{"id": rng.randrange(50), "data": {"image": image_ref(rng)}}]])
    elif pick == 6:
        body["annotation"][rng.choice(["id", "updated_at", "completed_by", "was_cancelled", "parent_prediction",
                                       "ground_truth", "prediction"])] = garbage(rng)  # fmt: skip
    return body


def raw_body(rng: random.Random) -> bytes:
    return rng.choice([
        b"", b"{", b"null", b"[]", b'"x"', b"1e999999", b"\xff\xfe\x00", b'{"tasks": [' * 20, b"[" * 500 + b"]" * 500,
        b'{"a": NaN}', b'{"tasks": Infinity}', json.dumps(garbage(rng)).encode(), "{\"é\": 1}".encode("utf-16"),
    ])  # fmt: skip


def cases(rng: random.Random, n: int):
    """(path, kwargs for the test client) per case."""
    for _ in range(n):
        path = rng.choice(["/predict", "/predict", "/setup", "/webhook", "/webhook"])
        if rng.random() < 0.2:
            yield path, {"data": raw_body(rng), "content_type": rng.choice(["application/json", "text/plain", ""])}
            continue
        if path == "/predict":
            body = predict_body(rng)
        elif path == "/setup":
            body = {"project": garbage(rng), rng.choice(["schema", "label_config"]): label_config(rng)}
        else:
            body = webhook_body(rng)
        yield path, {"data": json.dumps(body), "content_type": "application/json"}


# --- tests --------------------------------------------------------------------------------------------


def _keep(client) -> dict[int, dict]:
    for k in KEPT:
        assert client.post("/webhook", json=brush_webhook(k, 900 + k % 100)).status_code == 201
    return {k: Store(Path(client.application.config["model_dir"])).annotation(k) for k in KEPT}


def test_fuzzed_requests_never_give_a_500(env):
    app, settings = env
    app.config["model_dir"] = settings.model_dir
    client = app.test_client()
    kept = _keep(client)
    rng = random.Random(SEED)
    bad = []
    statuses: dict[int, int] = {}
    for n, (path, kwargs) in enumerate(cases(rng, CASES)):
        reply = client.post(path, **kwargs)
        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
        body = reply.get_json(silent=True)
        if reply.status_code >= 500 or not isinstance(body, dict):
            bad.append((n, path, kwargs["data"][:300], reply.status_code, reply.get_data()[:300]))
        elif reply.status_code >= 400:
            assert isinstance(body.get("error"), str) and body["error"], (path, body)
        elif path == "/predict":
            tasks = json.loads(kwargs["data"])["tasks"]
            assert len(body["results"]) == len(tasks)
            failed = {str(e["task"]) for e in body["errors"]}
            for t, r in zip(tasks, body["results"]):
                assert r or (str(t.get("id") if isinstance(t, dict) else None) in failed), (t, body["errors"])
    print(f"\nfuzz: {CASES} cases, statuses {dict(sorted(statuses.items()))}")
    assert bad == [], "\n".join(map(repr, bad))
    assert client.get("/health").status_code == 200
    store = Store(Path(settings.model_dir))
    assert store.check() == []
    assert {k: store.annotation(k) for k in KEPT} == kept


def test_odd_image_bytes_give_per_task_errors(env):
    app, _ = env
    client = app.test_client()
    names = ["zero.jpg", "header.png", "text.jpg", "bomb.png", "bomb100m.png", "anim.gif", "one.png", "photo.jpg"]
    tasks = [{"id": i, "data": {"image": "/data/upload/" + n}} for i, n in enumerate(names)]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH})
    assert reply.status_code == 200
    body = reply.get_json()
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert sorted(errors) == [0, 1, 2, 3, 4]
    assert "empty" in errors[0] and "decompression bomb" in errors[3]
    assert "over the limit" in errors[4] and "MASKCLIP_MAX_IMAGE_PIXELS" in errors[4]
    for i in (5, 6, 7):  # a GIF, a 1x1 PNG and a photo are images: masks at their own size
        region = body["results"][i]["result"][0]
        h, w = np.asarray(Image.open(io.BytesIO(ODD_FILES[names[i]]()))).shape[:2]
        assert (region["original_height"], region["original_width"]) == (h, w)


DEEP = [b"[" * 100_000, b'{"tasks": [' * 2000]  # nesting deeper than Python's recursion limit


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
@pytest.mark.parametrize("body", DEEP, ids=["arrays", "objects"])
def test_deeply_nested_json_gets_a_400(env, path, body):
    reply = env[0].test_client().post(path, data=body, content_type="application/json")
    assert reply.status_code == 400 and "JSON" in reply.get_json()["error"]


def test_bodies_over_the_limit_get_413(env):
    app, settings = env
    client = app.test_client()
    claimed = app.config["MAX_CONTENT_LENGTH"] + 1  # a Content-Length over the limit: refused before reading
    for path in ("/predict", "/setup", "/webhook"):
        reply = client.post(path, input_stream=io.BytesIO(b"{}"), content_type="application/json",
                            environ_overrides={"CONTENT_LENGTH": str(claimed)})  # fmt: skip
        assert reply.status_code == 413 and "larger than" in reply.get_json()["error"]
    small = create_app(settings, warm=False)
    small.config["MAX_CONTENT_LENGTH"] = 1 << 20
    body = json.dumps({"tasks": [{"id": 1, "data": {"image": "a" * (1 << 20)}}], "label_config": BRUSH})
    reply = small.test_client().post("/predict", data=body, content_type="application/json")
    assert reply.status_code == 413
    assert client.get("/health").status_code == 200


# --- hardening classes: ids, work per annotation, repeats with a parent prediction, credentials -----------

NASTY_IDS = [1.5, 1.0, "1.5", "1e3", True, False, 0, -1, 10**29, str(10**29), 2**63, 2**63 - 1, "٣", " 1", None,
             {"id": 1.5}, {"id": 10**29}, [1], "17", 17]  # fmt: skip
LIVE = 1  # an annotation with a small id, stored first: no nasty id may delete or overwrite it


def _polygon(rng: random.Random, n_points: int, spread: float) -> dict:
    points = [[rng.uniform(-spread, 100 + spread), rng.uniform(-spread, 100 + spread)] for _ in range(n_points)]
    return {"id": f"p{rng.randrange(10**6)}", "from_name": "poly", "to_name": "image", "type": "polygonlabels",
            "original_width": rng.choice([64, 4000]), "original_height": rng.choice([48, 4000]),
            "value": {"points": points, "polygonlabels": ["Food"]}}  # fmt: skip


def hardening_body(rng: random.Random) -> dict:
    kind = rng.randrange(5)
    if kind == 0:  # deletions by odd ids
        return {
            "action": "ANNOTATIONS_DELETED",
            "annotations": [rng.choice(NASTY_IDS) for _ in range(rng.randrange(1, 6))],
        }
    body = brush_webhook(rng.randrange(100, 120), rng.randrange(1, 20))
    body["project"]["label_config"] = BRUSH.replace(
        "</View>", '<PolygonLabels name="poly" toName="image"><Label value="Food"/></PolygonLabels></View>'
    )
    if kind == 1:  # odd ids anywhere an id goes
        target = rng.choice([body["annotation"], body["task"], body["project"]])
        target["id"] = rng.choice(NASTY_IDS)
        body["annotation"]["parent_prediction"] = rng.choice(NASTY_IDS)
    elif kind == 2:  # heavy polygons: many points, far away, or many regions
        n, spread = rng.choice([(3, 0.0), (2_000, 900.0), (120_000, 900.0), (120_000, 0.0)])
        body["annotation"]["result"] = [_polygon(rng, n, spread) for _ in range(rng.choice([1, 2]))]
    elif kind == 3:  # many small regions, in the annotation or in its prediction
        regions = [_polygon(rng, 4, 0.0) for _ in range(rng.choice([10, 1001]))]
        if rng.random() < 0.5:
            body["annotation"]["result"] = regions
        else:
            body["annotation"]["parent_prediction"] = 77
            body["task"]["predictions"] = [{"id": 77, "result": regions}]
    else:  # a repeat with a parent prediction, with or without the prediction in the payload
        body["annotation"]["parent_prediction"] = 77
        if rng.random() < 0.5:
            body["annotation"]["prediction"] = {"id": 77, "result": body["annotation"]["result"]}
    return body


def test_fuzzed_ids_heavy_annotations_and_repeats_never_give_a_500(env):
    app, settings = env
    client = app.test_client()
    assert client.post("/webhook", json=brush_webhook(LIVE, 900)).status_code == 201
    store = Store(Path(settings.model_dir))
    live = store.annotation(LIVE)
    rng = random.Random(SEED + 1)
    statuses: dict[str, int] = {}
    bad = []
    for n in range(60):
        body = hardening_body(rng)
        data = json.dumps(body)
        reply = client.post("/webhook", data=data, content_type="application/json")
        payload = reply.get_json(silent=True) or {}
        statuses[str(payload.get("status", reply.status_code))] = (
            statuses.get(str(payload.get("status", reply.status_code)), 0) + 1
        )
        if reply.status_code >= 500:
            bad.append((n, data[:200], reply.status_code, reply.get_data()[:300]))
        if body.get("annotation", {}).get("parent_prediction") == 77 and payload.get("status") == "stored":
            again = client.post("/webhook", data=data, content_type="application/json").get_json()
            assert again["status"] == "duplicate", (n, again)  # a repeat changes nothing
    print(f"\nhardening fuzz: 60 cases, statuses {dict(sorted(statuses.items()))}")
    assert bad == [], "\n".join(map(repr, bad))
    assert store.annotation(LIVE) == live  # no float, boolean or huge id touched it
    assert store.check() == []
    assert client.get("/health").status_code == 200


def _encode(text: str, encoding: str) -> bytes:
    try:
        return text.encode(encoding, "surrogatepass")
    except (UnicodeError, LookupError):
        return text.encode(encoding, "replace")


def test_fuzzed_credentials_get_200_or_401_only(tmp_path):
    import base64

    from labelstudio_maskclip.serving.server import basic_auth_header

    user, password = "ann\u00e9e", "p\u00e4ss \u5bc6\u7801:\U0001f511"
    client = create_app(Settings(model_dir=str(tmp_path), basic_auth_user=user, basic_auth_pass=password),
                        warm=False).test_client()  # fmt: skip
    rng = random.Random(SEED + 2)
    texts = [user, password, "", ":", "\x00", "é" * 300, "\udcff", "a" * 10_000, "pass", "密码", "\U0001f511"]
    encodings = ["utf-8", "latin-1", "utf-16", "cp1252", "utf-8-sig"]
    seen = {200: 0, 401: 0}
    for _ in range(300):
        u, p = rng.choice(texts), rng.choice(texts)
        raw = b":".join(_encode(t, rng.choice(encodings)) for t in (u, p))
        if rng.random() < 0.2:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        scheme = rng.choice(["Basic", "basic", "BASIC", "Bearer", "Basic  ", ""])
        token = base64.b64encode(raw).decode() if rng.random() < 0.9 else rng.choice(["!!", "=", "Zg", "a" * 5001])
        header = f"{scheme} {token}".encode("latin-1", "replace").decode("latin-1")
        reply = client.get("/health", headers={"Authorization": header})
        assert reply.status_code in (200, 401), (header[:80], reply.status_code)
        seen[reply.status_code] += 1
        if reply.status_code == 200:
            assert (u, p) == (user, password) and scheme.strip().lower() == "basic"
    assert client.get("/health", headers={"Authorization": basic_auth_header(user, password)}).status_code == 200
    assert seen[401] > 250
