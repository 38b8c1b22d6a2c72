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
