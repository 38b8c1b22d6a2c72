"""images.py: decoding every Pillow mode safely, and fetching through a real loopback HTTP server."""

from __future__ import annotations

import base64
import io
import json
import queue
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile

from labelstudio_maskclip.labelstudio import images
from labelstudio_maskclip.labelstudio.images import (
    ImageDecodeError,
    ImageError,
    ImageFetcher,
    ImageFetchError,
    ImageTooLargeError,
    decode_image,
    is_public_address,
)
from tests.photos import COCO128_PHOTOS

COCO = COCO128_PHOTOS
PHOTO = COCO / "000000000009.jpg"
LEGACY = "0123456789abcdef0123456789abcdef01234567"
PAT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"  # header.payload.signature
MAX_PIXELS = 10_000_000


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


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


# ---------------------------------------------------------------------------------------------------------
# decode_image
# ---------------------------------------------------------------------------------------------------------


def check_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous


def test_real_photo_matches_pillow():
    data = PHOTO.read_bytes()
    array = decode_image(data, max_pixels=MAX_PIXELS)
    reference = np.asarray(Image.open(PHOTO).convert("RGB"))
    check_rgb(array, *reference.shape[:2])
    np.testing.assert_array_equal(array, reference)


def test_rgb_png_roundtrip_exact():
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    array = decode_image(encode(Image.fromarray(pixels)), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array, pixels)


def test_grayscale_and_one_bit():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    array = decode_image(encode(Image.fromarray(gray, "L")), max_pixels=MAX_PIXELS)
    check_rgb(array, 3, 4)
    np.testing.assert_array_equal(array, np.repeat(gray[:, :, None], 3, axis=2))

    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    assert bits.mode == "1"
    array = decode_image(encode(bits), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array[:, :, 0], [[0, 255], [255, 0]])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_alpha_is_composited_on_white(mode):
    rgba = Image.new("RGBA", (4, 2), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    image = rgba if mode == "RGBA" else rgba.convert(mode)
    data = encode(image, "TIFF" if mode == "PA" else "PNG")
    assert Image.open(io.BytesIO(data)).mode == mode
    array = decode_image(data, max_pixels=MAX_PIXELS)
    check_rgb(array, 2, 4)
    np.testing.assert_array_equal(array[0, 0], [255, 255, 255])
    assert 120 <= int(array[0, 1, 0]) <= 135
    opaque = np.asarray(image.convert("RGBA"))[1, 3, :3]  # an opaque pixel keeps its colour
    np.testing.assert_array_equal(array[1, 3], opaque)


def test_palette_with_and_without_transparency():
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    array = decode_image(encode(image), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array[0], [[255, 0, 0], [0, 0, 255], [0, 255, 0]])

    data = encode(image, transparency=1)  # index 1 (blue) is transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    array = decode_image(data, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array[0], [[255, 0, 0], [255, 255, 255], [0, 255, 0]])


def test_cmyk_jpeg_and_tiff():
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red in CMYK
    for fmt in ("JPEG", "TIFF"):
        data = encode(cmyk, fmt)
        assert Image.open(io.BytesIO(data)).mode == "CMYK"
        array = decode_image(data, max_pixels=MAX_PIXELS)
        check_rgb(array, 4, 6)
        red, green, blue = (int(v) for v in array[2, 3])
        assert red > 200 and green < 60 and blue < 60, (fmt, array[2, 3])


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_sixteen_bit_is_scaled_not_clipped(mode, fmt):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    if mode == "I;16B":
        image = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    else:
        image = Image.fromarray(values.astype(np.int32) if mode == "I" else values)
    assert image.mode == mode
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    array = decode_image(data, max_pixels=MAX_PIXELS)
    check_rgb(array, 1, 4)
    np.testing.assert_array_equal(array[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(array[..., 0], array[..., 2])


def test_thirty_two_bit_outside_sixteen_bit_range_is_stretched():
    values = np.array([[-1000, 0, 1000]], dtype=np.int32)
    array = decode_image(encode(Image.fromarray(values), "TIFF"), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array[0, :, 0], [0, 128, 255])


def test_float_in_unit_range_and_outside():
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    array = decode_image(encode(Image.fromarray(unit, "F"), "TIFF"), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array[0, :, 1], [0, 128, 255])

    wide = np.array([[-10.0, 0.0, 10.0]], dtype=np.float32)
    array = decode_image(encode(Image.fromarray(wide, "F"), "TIFF"), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(array[0, :, 1], [0, 128, 255])  # min-max stretched


def jpeg_with_orientation(orientation: int) -> bytes:
    image = Image.new("RGB", (40, 20), (0, 0, 255))  # stored landscape: 40 wide, 20 high
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)


def test_exif_rotation_applied():
    # Orientation 6: the camera was turned; viewers rotate 90 degrees clockwise: the left half goes on top.
    array = decode_image(jpeg_with_orientation(6), max_pixels=MAX_PIXELS)
    check_rgb(array, 40, 20)
    assert array[5, 10, 0] > 200 and array[5, 10, 2] < 60  # top: red
    assert array[35, 10, 2] > 200 and array[35, 10, 0] < 60  # bottom: blue

    array = decode_image(jpeg_with_orientation(8), max_pixels=MAX_PIXELS)  # 90 counter-clockwise
    check_rgb(array, 40, 20)
    assert array[35, 10, 0] > 200  # left half goes to the bottom

    array = decode_image(jpeg_with_orientation(3), max_pixels=MAX_PIXELS)  # 180 degrees
    check_rgb(array, 20, 40)
    assert array[10, 35, 0] > 200

    array = decode_image(jpeg_with_orientation(1), max_pixels=MAX_PIXELS)
    check_rgb(array, 20, 40)
    assert array[10, 5, 0] > 200


def test_not_an_image_and_empty():
    with pytest.raises(ImageDecodeError, match="not an image: 23 bytes"):
        decode_image(b"<html>not found</html>\n", max_pixels=MAX_PIXELS)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", max_pixels=MAX_PIXELS)


def test_truncated_jpeg_and_png():
    data = PHOTO.read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)
    png = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError):
        decode_image(png[: len(png) // 2], max_pixels=MAX_PIXELS)


def test_too_many_pixels_refused_from_header():
    data = encode(Image.new("L", (3000, 2000)))  # 6 Mpx of zeros compresses to a few kB
    assert len(data) < 50_000
    with pytest.raises(ImageTooLargeError, match="3000 x 2000 = 6000000 pixels, over the limit of 1000000"):
        decode_image(data, max_pixels=1_000_000)
    assert decode_image(data, max_pixels=6_000_000).shape == (2000, 3000, 3)


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with a tiny (bogus) body: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_decompression_bomb_refused_before_decoding(monkeypatch):
    bomb = crafted_png(100_000, 100_000)  # 10 gigapixels in 100 bytes
    assert len(bomb) < 200

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # refused from the header alone
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, max_pixels=MAX_PIXELS)
    # Over Pillow's own global limit too: its DecompressionBombError must surface as ours.
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(bomb, max_pixels=10**12)


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
        if path.startswith("/public/"):
            return self.serve(path.removeprefix("/public/"))
        if path == "/redirect":
            return self.redirect(query["to"][0], int(query.get("code", ["302"])[0]))
        if path.startswith("/loop/"):
            return self.redirect(f"/loop/{int(path.split('/')[2]) + 1}", 302)
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
    fetcher(base, allow_private=True).fetch(f"/redirect?to={other}/public/red.png")
    assert [r[3] for r in state.requests[-2:]] == [f"Token {LEGACY}", None]


def test_loopback_refused_unless_label_studio_host_or_allowed(ls):
    base, other, state = ls
    with pytest.raises(ImageFetchError, match="resolves to 127.0.0.1.*MASKCLIP_ALLOW_PRIVATE_URLS=true"):
        fetcher("").fetch(base + "/public/red.png")
    with pytest.raises(ImageFetchError, match="MASKCLIP_ALLOW_PRIVATE_URLS"):
        fetcher(base).fetch(other + "/public/red.png")  # same machine, other host name: not LS's host
    assert state.requests == []  # refused before connecting
    assert fetcher(base).fetch(base + "/public/red.png") == state.files["red.png"]  # LS's host
    assert fetcher("", allow_private=True).fetch(base + "/public/red.png") == state.files["red.png"]


def test_redirect_hop_to_refused_host(ls):
    base, _, state = ls
    for target in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "http://[::1]:9/x.png"):
        with pytest.raises(ImageFetchError, match="refused.*MASKCLIP_ALLOW_PRIVATE_URLS"):
            fetcher(base).fetch(f"/redirect?to={target}")
    with pytest.raises(ImageFetchError, match="only http"):
        fetcher(base).fetch("/redirect?to=file:///etc/passwd")


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
        fetcher(base).fetch("/loop/0")


def test_redirect_codes_followed(ls):
    base, _, state = ls
    for code in (301, 302, 303, 307, 308):
        assert fetcher(base).fetch(f"/redirect?code={code}&to=/public/red.png") == state.files["red.png"]


def test_size_cap_by_content_length_and_by_stream(ls):
    base, _, state = ls
    with pytest.raises(ImageFetchError, match="larger than 1000000 bytes.*MASKCLIP_MAX_DOWNLOAD_BYTES"):
        fetcher(base, max_bytes=1_000_000).fetch("/huge")  # refused on the header: no body is ever sent
    with pytest.raises(ImageFetchError, match="larger than 1000000 bytes"):
        fetcher(base, max_bytes=1_000_000).fetch("/huge-chunked")
    # The stream was cut: the server could not write its 1000 chunks of 64 KiB (65 MB; the cap is 1 MB).
    assert _stream_end(state, "huge-chunked") < 1000


def test_timeouts(ls):
    base, _, state = ls
    with pytest.raises(ImageFetchError, match="timed out after 0.5 s.*MASKCLIP_DOWNLOAD_TIMEOUT"):
        fetcher(base, timeout=0.5).fetch("/slow?s=2")
    with pytest.raises(ImageFetchError, match="timed out after 0.5 s"):
        fetcher(base, timeout=0.5).fetch("/drip")  # each byte is quick; the whole is not
    assert _stream_end(state, "drip") < 1000  # the fetcher hung up long before the 50 s drip ended


def _stream_end(state: FakeLabelStudio, name: str) -> int:
    """How far the server got with stream ``name`` before the client hung up (waits for it to notice)."""
    got, sent = state.streams.get(timeout=120)
    assert got == name
    return sent


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
