"""urls.py and the fetcher's use of it: one parse for the guard, the credentials decision and the request.

Every case is sent through a real fetcher to real loopback servers (Label Studio's stand-in and an
"attacker" server), and the servers' logs say what reached them and with which Authorization header.
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest

from labelstudio_maskclip.fetching.errors import ImageFetchError
from labelstudio_maskclip.fetching.urls import display, is_media_route, parse_target
from tests.test_images import LEGACY, PAT, FakeLabelStudio, Handler, fetcher, ls, no_proxy, server  # noqa: F401


@pytest.fixture(scope="module")
def attacker_server():
    state = FakeLabelStudio()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("AttackerHandler", (Handler,), {"state": state}))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd, state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def two(ls, attacker_server):  # noqa: F811
    """(Label Studio's port, the attacker's port, LS state, attacker state), request logs cleared."""
    base, _, state = ls
    httpd, evil = attacker_server
    evil.requests.clear()
    return int(base.rsplit(":", 1)[1]), httpd.server_address[1], state, evil


# --- parser confusions -----------------------------------------------------------------------------------

CONFUSIONS = [
    # backslash: urllib.parse reads the host after '@', the HTTP client connects before the backslash
    ("http://127.0.0.1:{evil}\\@127.0.0.1:{ls}/data/upload/red.png", "backslash"),
    ("http://127.0.0.1:{ls}\\@8.8.8.8/a.jpg", "backslash"),
    ("http://127.0.0.1:{evil}/\\@127.0.0.1:{ls}/data/upload/red.png", "backslash"),
    # userinfo
    ("http://127.0.0.1:{ls}@127.0.0.1:{evil}/data/upload/red.png", "credentials in the URL"),
    ("http://user:pw@127.0.0.1:{ls}/data/upload/red.png", "credentials in the URL"),
    ("http://127.0.0.1:{evil}%40127.0.0.1:{ls}/data/upload/red.png", "percent-encoded"),
    # whitespace and control characters
    ("http://127.0.0.1:{evil}\t@127.0.0.1:{ls}/data/upload/red.png", "control character"),
    ("http://127.0.0.1:{evil}\n@127.0.0.1:{ls}/data/upload/red.png", "control character"),
    ("http://127.0.0.1:{ls}/data/upload/red.png\r\nX-Injected: 1", "control character"),
    ("http://127.0.0.1:{evil} @127.0.0.1:{ls}/data/upload/red.png", "credentials in the URL"),
    ("http://127.0.0.1 :{ls}/data/upload/red.png", "space"),
    # percent-encoded hosts and IPv6 zone ids
    ("http://%31%32%37.0.0.1:{ls}/data/upload/red.png", "percent-encoded"),
    ("http://127.0.0.%31:{ls}/data/upload/red.png", "percent-encoded"),
    ("http://[::1%25lo]:{ls}/data/upload/red.png", "zone id"),
    ("http://[fe80::1%25eth0]/a.jpg", "zone id"),
    # numeric hosts other than a plain dotted quad (inet_aton reads them all as 127.0.0.1)
    ("http://2130706433:{ls}/data/upload/red.png", "not a plain dotted-quad"),
    ("http://0177.0.0.1:{ls}/data/upload/red.png", "not a plain dotted-quad"),
    ("http://0x7f.0.0.1:{ls}/data/upload/red.png", "not a plain dotted-quad"),
    ("http://127.1:{ls}/data/upload/red.png", "not a plain dotted-quad"),
    ("http://127.0.0.1.:{ls}/data/upload/red.png", "not a plain dotted-quad"),
    ("http://0x7f000001:{evil}/a.jpg", "not a plain dotted-quad"),
]


@pytest.mark.parametrize("template,reason", CONFUSIONS)
def test_parser_confusions_are_refused_before_any_request(two, template, reason):
    ls_port, evil_port, state, evil = two
    url = template.format(ls=ls_port, evil=evil_port)
    for allow_private in (False, True):  # not an address-policy matter: refused whatever the policy
        with pytest.raises(ImageFetchError, match=reason) as caught:
            fetcher(f"http://127.0.0.1:{ls_port}", allow_private=allow_private).fetch(url)
        assert LEGACY not in str(caught.value) and "pw" not in str(caught.value)
    assert state.requests == [] and evil.requests == []


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{evil}/a@127.0.0.1:{ls}/data/upload/red.png",  # '@' in the path
        "http://127.0.0.1:{evil}/data/upload/red.png?x=@127.0.0.1:{ls}/",  # '@' in the query
        "http://127.0.0.1:{evil}#@127.0.0.1:{ls}/data/upload/red.png",  # '@' in the fragment
        "http://127.0.0.1:{evil}/data/upload/red.png",  # Label Studio's host, another port
        "http://localhost:{ls}/data/upload/red.png",  # Label Studio's port, another host name
        "http://localhost.:{ls}/data/upload/red.png",  # a trailing dot is another name, not Label Studio's
    ],
)
def test_credentials_go_only_to_label_studio_exact_origin(two, template):
    """URLs every parser reads alike: fetched (private addresses allowed here) but without the token."""
    ls_port, evil_port, state, evil = two
    url = template.format(ls=ls_port, evil=evil_port)
    for base in (f"http://127.0.0.1:{ls_port}", f"http://localhost:{ls_port}"):
        if url.startswith(base + "/"):
            continue  # that one is Label Studio's origin for this base
        for key in (LEGACY, PAT):
            try:
                fetcher(base, key=key, allow_private=True).fetch(url)
            except ImageFetchError as exc:  # without credentials the stand-in refuses;
                assert exc.status == 401 or "localhost." in url  # "localhost." may not resolve here
        sent = [r[3] for r in state.requests + evil.requests if r[0] == "GET"]
        assert sent or "localhost." in url
        assert all(header is None for header in sent), (base, url, sent)
        state.requests.clear()
        evil.requests.clear()


def test_the_reported_bypass_sends_nothing_anywhere(two):
    """The reported bypass: with LABEL_STUDIO_URL on one port, a URL whose urllib.parse host is
    Label Studio but whose connection goes to another port."""
    ls_port, evil_port, state, evil = two
    base = f"http://127.0.0.1:{ls_port}"
    for key in (LEGACY, PAT):
        with pytest.raises(ImageFetchError, match="refused"):
            fetcher(base, key=key).fetch(f"http://127.0.0.1:{evil_port}\\@127.0.0.1:{ls_port}/x.jpg")
    with pytest.raises(ImageFetchError, match="refused"):
        fetcher("").fetch(f"http://127.0.0.1:{ls_port}\\@8.8.8.8/a.jpg")
    assert evil.requests == [] and state.requests == []


def test_the_target_is_what_the_client_connects_to():
    """The one parse is the HTTP client's: host and port as urllib3 reads the prepared URL."""
    from urllib3.util import parse_url

    for url in ("http://Example.COM/a/../b/./c?q=1#f", "https://example.com:8443", "http://[2606:4700::1]:81/x"):
        target = parse_target(url)
        wire = parse_url(target.url)
        assert (target.host, target.port) == (
            wire.host.strip("[]").lower(),
            wire.port or {"http": 80, "https": 443}[wire.scheme],
        )
    target = parse_target("http://Example.COM/a/../b/./c?q=1#f")
    assert (target.scheme, target.host, target.port, target.path) == ("http", "example.com", 80, "/b/c")
    assert parse_target("http://bücher.example/ä").host == "xn--bcher-kva.example"


# --- Label Studio's media routes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/api/predictions/5",
        "/api/projects/1/",
        "/api/token/refresh/",
        "/user/login/",
        "/",
        "/data/uploadx/red.png",
        "/data/upload/",
        "/data/local-files-x/?d=red.png",
        "/tasks/1/",
        "/tasks/x/presign/",
        "/data/upload/../../api/predictions/5",  # dot segments are removed before the check
        "/data/upload/%2e%2e/%2e%2e/api/predictions/5",  # and encoded ones refused
        "/data/upload/..%2f..%2fapi/predictions/5",
    ],
)
def test_relative_urls_other_than_media_routes_are_refused(ls, url):  # noqa: F811
    base, _, state = ls
    reason = "refused, the URL does not have one stable form" if "%2e" in url else "only its media routes are fetched"
    with pytest.raises(ImageFetchError, match=reason):
        fetcher(base).fetch(url)
    with pytest.raises(ImageFetchError, match=reason):
        fetcher(base).fetch(base + url)  # the same, written absolute
    assert state.requests == []


def test_redirect_from_a_media_route_to_the_api_is_refused(ls):  # noqa: F811
    base, _, state = ls
    with pytest.raises(ImageFetchError, match="only its media routes are fetched"):
        fetcher(base).fetch("/data/upload/_/redirect?to=/api/predictions/5")
    assert [r[2] for r in state.requests] == ["/data/upload/_/redirect?to=/api/predictions/5"]


def test_media_routes_under_a_path_prefix():
    assert is_media_route(parse_target("http://h/ls/data/upload/1/a.png"), "/ls")
    assert is_media_route(parse_target("http://h/ls/tasks/3/presign/?fileuri=eA=="), "/ls")
    assert not is_media_route(parse_target("http://h/data/upload/1/a.png"), "/ls")
    assert not is_media_route(parse_target("http://h/ls/api/tasks"), "/ls")
    assert is_media_route(parse_target("http://h/data/local-files/?d=a/b.png"))


# --- what errors and logs say ----------------------------------------------------------------------------------


def test_display_redacts_credentials_and_signatures():
    shown = display("https://user:hunter2@bucket.example/a.png?X-Amz-Signature=abc123&token=t0k&x=1")
    assert "hunter2" not in shown and "user" not in shown and "abc123" not in shown and "t0k" not in shown
    assert shown == "https://REDACTED@bucket.example/a.png?X-Amz-Signature=REDACTED&token=REDACTED&x=1"
    assert "hunter2" not in display("//user:hunter2@h/x") and "p4ss" not in display("http://a:p4ss@b\\@c/")


def test_errors_never_quote_what_the_server_sent(ls):  # noqa: F811
    base, _, _ = ls
    with pytest.raises(ImageFetchError) as caught:
        fetcher(base, key="").fetch("/data/upload/red.png")  # the stand-in answers 401 with a JSON detail
    assert "credentials were not provided" not in str(caught.value).lower()
    from labelstudio_maskclip.fetching.errors import ImageDecodeError

    with pytest.raises(ImageDecodeError) as caught:
        fetcher(base).load("/data/upload/text.html", max_pixels=100)
    assert "html" not in str(caught.value).replace("text.html", "")
