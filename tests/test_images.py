"""images.py / fetch.py / urls.py / auth.py: fetching through a real loopback HTTP server, the address policy."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from labelstudio_maskclip.fetching import images
from labelstudio_maskclip.fetching.images import (
    ImageDecodeError,
    ImageError,
    ImageFetcher,
    ImageFetchError,
    ImageTooLargeError,
    decode_image,
    is_public_address,
)
from tests.photos import COCO128_PHOTOS
from tests.test_decode import encode, jpeg_with_orientation

COCO = COCO128_PHOTOS
PHOTO = COCO / "000000000009.jpg"
LEGACY = "0123456789abcdef0123456789abcdef01234567"
PAT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"  # header.payload.signature
MAX_PIXELS = 10_000_000


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Loopback requests must not be sent to a proxy from the environment."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_public_surface():
    assert set(images.__all__) == {
        "ImageError",
        "ImageDecodeError",
        "ImageTooLargeError",
        "ImageFetchError",
        "decode_image",
        "is_public_address",
        "ImageFetcher",
        "CLOUD_SCHEMES",
    }
    for error in (ImageDecodeError, ImageTooLargeError, ImageFetchError):
        assert issubclass(error, ImageError)


def test_is_public_address():
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert is_public_address(ip), ip
    for ip in (
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",
        "2001:db8::1",
    ):
        assert not is_public_address(ip), ip


# ---------------------------------------------------------------------------------------------------------
# A real loopback server playing Label Studio (and a storage bucket)
# ---------------------------------------------------------------------------------------------------------


class FakeLabelStudio:
    """State behind the handler: files, valid access tokens, and what every request carried."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.access_tokens: set[str] = set()
        self.refreshes = 0
        self.requests: list[tuple[str, str, str, str | None]] = []  # (method, Host header, path, Authorization)
        self.streams: queue.Queue[tuple[str, int]] = queue.Queue()  # (path, how much was sent) per ended stream

    def authorized(self, header: str | None) -> bool:
        if header == f"Token {LEGACY}":
            return True
        return bool(header) and header.startswith("Bearer ") and header[7:] in self.access_tokens


class Handler(BaseHTTPRequestHandler):
    state: FakeLabelStudio

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        self.state.requests.append(("POST", self.headers.get("Host"), self.path, self.headers.get("Authorization")))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/api/token/refresh/" and body.get("refresh") == PAT:
            self.state.refreshes += 1
            access = f"access-{self.state.refreshes}"
            self.state.access_tokens.add(access)
            return self.reply(200, json.dumps({"access": access}).encode(), "application/json")
        self.reply(401, b'{"detail": "Token is invalid or expired"}', "application/json")

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        self.state.requests.append(("GET", self.headers.get("Host"), self.path, auth))
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = parts.path
        if path.startswith("/data/upload/_/"):  # test routes below Label Studio's media route, without auth
            path = path.removeprefix("/data/upload/_")
        if path.startswith("/public/"):
            return self.serve(path.removeprefix("/public/"))
        if path == "/redirect":
            return self.redirect(query["to"][0], int(query.get("code", ["302"])[0]))
        if path.startswith("/loop/"):
            return self.redirect(f"/data/upload/_/loop/{int(path.split('/')[2]) + 1}", 302)
        if path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            return
        if path == "/huge-chunked":  # no Content-Length: the cap must stop the stream
            self.send_response(200)
            self.end_headers()
            sent = 0
            try:
                while sent < 1000:
                    self.wfile.write(b"\0" * 65536)
                    sent += 1
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.state.streams.put(("huge-chunked", sent))  # chunks written before the client hung up
            return
        if path == "/slow":
            time.sleep(float(query.get("s", ["2"])[0]))
            return self.serve("red.png")
        if path == "/drip":  # headers at once, then a byte at a time: the total deadline must stop it
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            sent = 0
            try:
                while sent < 1000:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    sent += 1
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.state.streams.put(("drip", sent))  # bytes written before the client hung up
            return
        # Everything below is Label Studio and needs auth.
        if not self.state.authorized(auth):
            return self.reply(401, b'{"detail": "Authentication credentials were not provided."}', "application/json")
        if path.startswith("/data/upload/"):
            return self.serve(path.removeprefix("/data/upload/"))
        if path == "/data/local-files/":
            return self.serve(query["d"][0])
        if path.startswith("/tasks/") and path.endswith("/presign/"):
            fileuri = base64.urlsafe_b64decode(query["fileuri"][0]).decode()
            if not fileuri.startswith("s3://bucket/"):
                return self.reply(404, b"", "text/plain")
            # Label Studio answers 303 to a presigned URL on the storage's host (here: "localhost").
            port = self.server.server_address[1]
            target = f"http://localhost:{port}/public/{fileuri.removeprefix('s3://bucket/')}?X-Amz-Signature=secret123"
            return self.redirect(target, 303)
        self.reply(404, b"", "text/plain")

    def serve(self, name: str) -> None:
        data = self.state.files.get(name)
        if data is None:
            return self.reply(404, b"not found", "text/plain")
        self.reply(200, data, "image/png")

    def redirect(self, location: str, code: int) -> None:
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts, size caps): expected


@pytest.fixture(scope="module")
def server():
    state = FakeLabelStudio()
    state.files["red.png"] = encode(Image.new("RGB", (8, 6), (255, 0, 0)))
    state.files["photo.jpg"] = PHOTO.read_bytes()
    state.files["rotated.jpg"] = jpeg_with_orientation(6)
    state.files["text.html"] = b"<html>login</html>"
    handler = type("BoundHandler", (Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def ls(server):
    """(LABEL_STUDIO_URL, the other host name for the same server, state) with a clean request log."""
    httpd, state = server
    port = httpd.server_address[1]
    state.requests.clear()
    state.access_tokens.clear()
    state.streams = queue.Queue()
    return f"http://127.0.0.1:{port}", f"http://localhost:{port}", state


def fetcher(url: str = "", key: str = LEGACY, **kwargs) -> ImageFetcher:
    options = {"allow_private": False, "max_bytes": 5_000_000, "timeout": 5.0} | kwargs
    return ImageFetcher(url, key, **options)


def test_upload_with_legacy_token(ls):
    base, _, state = ls
    array = fetcher(base).load("/data/upload/photo.jpg", max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array, decode_image(PHOTO.read_bytes(), max_pixels=MAX_PIXELS))
    assert state.requests[-1][3] == f"Token {LEGACY}"


def test_local_files_and_exif_rotation_over_http(ls):
    base, _, _ = ls
    array = fetcher(base).load("/data/local-files/?d=rotated.jpg", max_pixels=MAX_PIXELS)
    assert array.shape == (40, 20, 3)


def test_label_studio_url_with_trailing_slash_and_absolute_ls_url(ls):
    base, _, _ = ls
    assert fetcher(base + "/").fetch(base + "/data/upload/red.png") == ls[2].files["red.png"]


def test_missing_or_wrong_key_says_what_to_set(ls):
    base, _, _ = ls
    with pytest.raises(ImageFetchError, match="HTTP 401.*set LABEL_STUDIO_API_KEY") as caught:
        fetcher(base, key="").fetch("/data/upload/red.png")
    assert caught.value.status == 401
    wrong = "f" * 40
    with pytest.raises(ImageFetchError, match="HTTP 401.*check LABEL_STUDIO_API_KEY") as caught:
        fetcher(base, key=wrong).fetch("/data/upload/red.png")
    assert wrong not in str(caught.value)
    assert base + "/data/upload/red.png" in str(caught.value)


def test_relative_url_without_label_studio_url():
    with pytest.raises(ImageFetchError, match="set LABEL_STUDIO_URL"):
        fetcher("").fetch("/data/upload/red.png")


def test_personal_access_token_refresh_cached_and_renewed_on_401(ls):
    base, _, state = ls
    images_fetcher = fetcher(base, key=PAT)
    refreshes = state.refreshes
    assert images_fetcher.fetch("/data/upload/red.png") == state.files["red.png"]
    assert images_fetcher.fetch("/data/upload/red.png") == state.files["red.png"]
    assert state.refreshes == refreshes + 1  # cached
    post = [r for r in state.requests if r[0] == "POST"]
    assert post == [("POST", base.removeprefix("http://"), "/api/token/refresh/", None)]
    assert state.requests[-1][3] == f"Bearer access-{refreshes + 1}"

    state.access_tokens.clear()  # the access token expires
    assert images_fetcher.fetch("/data/upload/red.png") == state.files["red.png"]
    assert state.refreshes == refreshes + 2
    assert PAT not in repr(images_fetcher)


def test_revoked_personal_access_token(ls):
    base, _, _ = ls
    revoked = "aaa.bbb.ccc"
    message = "did not accept LABEL_STUDIO_API_KEY as a personal access token"
    with pytest.raises(ImageFetchError, match=message) as caught:
        fetcher(base, key=revoked).fetch("/data/upload/red.png")
    assert revoked not in str(caught.value)


def test_cloud_uri_through_presign_endpoint(ls):
    base, other, state = ls
    data = fetcher(base, allow_private=True).fetch("s3://bucket/red.png", task_id=7)  # bucket on loopback
    assert data == state.files["red.png"]
    presign, download = state.requests[-2:]
    assert presign[2].startswith("/tasks/7/presign/?fileuri=")
    fileuri = parse_qs(urlsplit(presign[2]).query)["fileuri"][0]
    assert base64.urlsafe_b64decode(fileuri).decode() == "s3://bucket/red.png"
    assert presign[3] == f"Token {LEGACY}"
    # The presigned URL is on another host: no credentials go there.
    assert download[1] == other.removeprefix("http://") and download[3] is None


def test_cloud_uri_errors(ls):
    base, _, _ = ls
    with pytest.raises(ImageFetchError, match="no task id"):
        fetcher(base).fetch("gs://bucket/red.png")
    with pytest.raises(ImageFetchError, match="HTTP 404.*cloud storage"):
        fetcher(base).fetch("azure-blob://elsewhere/red.png", task_id=1)


def test_presigned_redirect_to_private_storage_refused_unless_allowed(ls):
    base, _, state = ls
    # Here the "bucket" is on localhost (loopback, not LABEL_STUDIO_URL's host): refused by default...
    with pytest.raises(ImageFetchError, match="MASKCLIP_ALLOW_PRIVATE_URLS=true") as caught:
        fetcher(base).fetch("s3://bucket/red.png", task_id=7)
    assert "secret123" not in str(caught.value) and "REDACTED" in str(caught.value)
    # ...and allowed when private URLs are.
    assert fetcher(base, allow_private=True).fetch("s3://bucket/red.png", task_id=7) == state.files["red.png"]


def test_no_auth_header_to_other_hosts(ls):
    base, other, state = ls
    assert fetcher(base, allow_private=True).fetch(other + "/public/red.png") == state.files["red.png"]
    assert state.requests[-1][3] is None
    # Not even when Label Studio redirects there.
    fetcher(base, allow_private=True).fetch(f"/data/upload/_/redirect?to={other}/public/red.png")
    assert [r[3] for r in state.requests[-2:]] == [f"Token {LEGACY}", None]


def test_loopback_refused_unless_label_studio_host_or_allowed(ls):
    base, other, state = ls
    with pytest.raises(ImageFetchError, match="resolves to 127.0.0.1.*MASKCLIP_ALLOW_PRIVATE_URLS=true"):
        fetcher("").fetch(base + "/public/red.png")
    with pytest.raises(ImageFetchError, match="MASKCLIP_ALLOW_PRIVATE_URLS"):
        fetcher(base).fetch(other + "/public/red.png")  # same machine, other host name: not LS's host
    assert state.requests == []  # refused before connecting
    assert fetcher(base).fetch(base + "/data/upload/red.png") == state.files["red.png"]  # LS's host
    assert fetcher("", allow_private=True).fetch(base + "/public/red.png") == state.files["red.png"]


def test_redirect_hop_to_refused_host(ls):
    base, _, state = ls
    for target in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "http://[::1]:9/x.png"):
        with pytest.raises(ImageFetchError, match="refused.*MASKCLIP_ALLOW_PRIVATE_URLS"):
            fetcher(base).fetch(f"/data/upload/_/redirect?to={target}")
    with pytest.raises(ImageFetchError, match="only http"):
        fetcher(base).fetch("/data/upload/_/redirect?to=file:///etc/passwd")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.png",
        "http://192.168.0.1/a.png",
        "http://169.254.169.254/",
        "http://[::1]/a.png",
        "http://[fe80::1]/a.png",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/",
    ],
)
def test_private_ip_literals_refused(url):
    with pytest.raises(ImageFetchError, match="refused"):
        fetcher("https://label-studio.example.com").fetch(url)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)"])
def test_other_schemes_refused(url):
    with pytest.raises(ImageFetchError, match="unsupported URL scheme"):
        fetcher("", allow_private=True).fetch(url)


def test_too_many_redirects(ls):
    base, _, _ = ls
    with pytest.raises(ImageFetchError, match="more than 5 redirects"):
        fetcher(base).fetch("/data/upload/_/loop/0")


def test_redirect_codes_followed(ls):
    base, _, state = ls
    for code in (301, 302, 303, 307, 308):
        assert (
            fetcher(base).fetch(f"/data/upload/_/redirect?code={code}&to=/data/upload/red.png")
            == state.files["red.png"]
        )


def test_size_cap_by_content_length_and_by_stream(ls):
    base, _, state = ls
    with pytest.raises(ImageFetchError, match="larger than 1000000 bytes.*MASKCLIP_MAX_DOWNLOAD_BYTES"):
        fetcher(base, max_bytes=1_000_000).fetch("/data/upload/_/huge")
    with pytest.raises(ImageFetchError, match="larger than 1000000 bytes"):
        fetcher(base, max_bytes=1_000_000).fetch("/data/upload/_/huge-chunked")


def test_timeouts(ls):
    base, _, state = ls
    with pytest.raises(ImageFetchError, match="timed out after 0.5 s.*MASKCLIP_DOWNLOAD_TIMEOUT"):
        fetcher(base, timeout=0.5).fetch("/data/upload/_/slow?s=2")
    with pytest.raises(ImageFetchError, match="timed out after 0.5 s"):
        fetcher(base, timeout=0.5).fetch("/data/upload/_/drip")  # each byte is quick; the whole is not


def test_not_found_and_unreachable(ls):
    base, _, _ = ls
    with pytest.raises(ImageFetchError, match="HTTP 404, not found") as caught:
        fetcher(base).fetch("/data/upload/missing.png")
    assert caught.value.status == 404
    with pytest.raises(ImageFetchError, match="Local Storage"):
        fetcher(base).fetch("/data/local-files/?d=missing.png")
    with pytest.raises(ImageFetchError, match="could not connect"):
        fetcher("", allow_private=True).fetch("http://127.0.0.1:9/a.png")  # discard port: nothing listens


def test_unresolvable_host():
    with pytest.raises(ImageFetchError, match="cannot resolve host"):
        fetcher("").fetch("http://no-such-host.invalid/a.png")


def test_load_names_the_url_when_bytes_are_not_an_image(ls):
    base, _, _ = ls
    with pytest.raises(ImageDecodeError, match=r"/data/upload/text.html: not an image"):
        fetcher(base).load("/data/upload/text.html", max_pixels=MAX_PIXELS)
    with pytest.raises(ImageTooLargeError, match="over the limit of 10"):
        fetcher(base).load("/data/upload/red.png", max_pixels=10)


def test_data_uri():
    red = encode(Image.new("RGB", (3, 2), (255, 0, 0)))
    uri = "data:image/png;base64," + base64.b64encode(red).decode()
    assert fetcher("").fetch(uri) == red
    assert fetcher("").load(uri, max_pixels=MAX_PIXELS).shape == (2, 3, 3)
    with pytest.raises(ImageFetchError, match="invalid base64"):
        fetcher("").fetch("data:image/png;base64,@@@@")
    with pytest.raises(ImageFetchError, match="larger than 10 bytes"):
        fetcher("", max_bytes=10).fetch(uri)


def test_from_settings():
    from labelstudio_maskclip.settings import Settings

    settings = Settings(
        label_studio_url="http://ls:8080/",
        label_studio_api_key=LEGACY,
        allow_private_urls=True,
        max_download_bytes=123,
        download_timeout=4.5,
    )
    built = ImageFetcher.from_settings(settings)
    assert (built.label_studio_url, built.allow_private, built.max_bytes, built.timeout) == (
        "http://ls:8080",
        True,
        123,
        4.5,
    )
    assert LEGACY not in repr(built)


# ---------------------------------------------------------------------------------------------------------
# An absolute deadline (the request's time budget) over the whole fetch
# ---------------------------------------------------------------------------------------------------------


def test_deadline_cuts_a_slow_drip_long_before_the_timeout(ls):
    base, _, _ = ls
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="deadline reached before the download finished"):
        fetcher(base, timeout=30.0).fetch("/data/upload/_/drip", deadline=started + 0.5)  # 1000 bytes over 50 s
    assert time.monotonic() - started < 10  # generous: the timeout alone would allow 30 s
    with pytest.raises(ImageFetchError, match="deadline reached"):  # headers that never come
        fetcher(base, timeout=30.0).fetch("/data/upload/_/slow?s=5", deadline=time.monotonic() + 0.5)
    with pytest.raises(ImageFetchError, match="deadline reached"):  # through a redirect
        fetcher(base, timeout=30.0).load(
            "/data/upload/_/redirect?to=/data/upload/_/slow%3Fs%3D5", deadline=time.monotonic() + 0.5, max_pixels=100
        )


def test_timeout_still_applies_and_is_named_when_it_comes_first(ls):
    base, _, _ = ls
    with pytest.raises(ImageFetchError, match="timed out after 0.5 s.*MASKCLIP_DOWNLOAD_TIMEOUT"):
        fetcher(base, timeout=0.5).fetch("/data/upload/_/drip", deadline=time.monotonic() + 60)


def test_a_fetch_starting_after_the_deadline_sends_nothing(ls):
    base, _, state = ls
    with pytest.raises(ImageFetchError, match="deadline reached before the download started"):
        fetcher(base).fetch("/data/upload/red.png", deadline=time.monotonic() - 1)
    assert state.requests == []
    assert fetcher(base).fetch("/data/upload/red.png", deadline=time.monotonic() + 60) == state.files["red.png"]


def test_queued_downloads_past_the_deadline_are_dropped_without_a_request(ls):
    """Eight slow downloads queued behind one thread with a shared deadline: those that start after it fail at
    once and never reach the server."""
    from concurrent.futures import ThreadPoolExecutor

    base, _, state = ls
    images_fetcher = fetcher(base, timeout=30.0)
    deadline = time.monotonic() + 1.0
    with ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(images_fetcher.fetch, "/data/upload/_/slow?s=0.7", deadline=deadline) for _ in range(8)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(len(future.result()))
            except ImageFetchError as exc:
                outcomes.append(str(exc))
    assert sum(isinstance(o, str) and "deadline reached before the download started" in o for o in outcomes) >= 5
    assert len(state.requests) <= 3 and all(isinstance(o, int) or "deadline reached" in o for o in outcomes)


def test_fetcher_with_a_pixel_budget_holds_decoded_pixels_until_freed(ls):
    import gc

    from labelstudio_maskclip.fetching.decode import PixelBudget

    base, _, _ = ls
    budget = PixelBudget(50)  # red.png is 8 x 6 = 48 pixels
    images_fetcher = fetcher(base, pixel_budget=budget)
    assert images_fetcher.load("/data/upload/red.png", max_pixels=MAX_PIXELS).shape == (6, 8, 3)
    assert budget.in_flight == 0  # by default the room is held while decoding only
    first = images_fetcher.load("/data/upload/red.png", max_pixels=MAX_PIXELS, hold_pixels=True)
    assert budget.in_flight == 48
    with pytest.raises(ImageError, match="MASKCLIP_MAX_PIXELS_IN_FLIGHT"):
        images_fetcher.load("/data/upload/red.png", max_pixels=MAX_PIXELS, deadline=time.monotonic() + 0.3)
    del first
    gc.collect()
    second = images_fetcher.load(
        "/data/upload/red.png", max_pixels=MAX_PIXELS, deadline=time.monotonic() + 5, hold_pixels=True
    )
    assert second.shape == (6, 8, 3) and budget.in_flight == 48
    with pytest.raises(ImageDecodeError):  # a failed decode releases its room
        images_fetcher.load("/data/upload/text.html", max_pixels=MAX_PIXELS)
    assert budget.in_flight == 48
