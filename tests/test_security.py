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
