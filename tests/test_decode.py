"""decode.py: every Pillow mode decoded safely, EXIF orientation, pixel limits from the header."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from labelstudio_maskclip.fetching.decode import decode_image
from labelstudio_maskclip.fetching.errors import ImageDecodeError, ImageTooLargeError
from tests.photos import COCO128_PHOTOS

PHOTO = COCO128_PHOTOS / "000000000009.jpg"
MAX_PIXELS = 10_000_000


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


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


def pillow_reference(data: bytes) -> np.ndarray:
    """What Pillow alone makes of a file: EXIF orientation applied, RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpegs_decode_to_pillows_pixels_in_every_orientation(orientation: int):
    data = jpeg_with_orientation(orientation)
    np.testing.assert_array_equal(decode_image(data, max_pixels=MAX_PIXELS), pillow_reference(data))


def test_photos_and_grayscale_jpegs_decode_to_pillows_exact_pixels():
    photos = sorted(COCO128_PHOTOS.glob("*.jpg"))[:12]
    gray = encode(Image.open(photos[0]).convert("L"), "JPEG", quality=90)
    progressive = encode(Image.open(photos[1]), "JPEG", quality=80, progressive=True)
    for data in [p.read_bytes() for p in photos] + [gray, progressive]:
        array = decode_image(data, max_pixels=MAX_PIXELS)
        assert array.dtype == np.uint8 and array.flags.c_contiguous
        np.testing.assert_array_equal(array, pillow_reference(data))


def test_a_cmyk_jpeg_still_decodes():
    data = encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG")
    np.testing.assert_array_equal(decode_image(data, max_pixels=MAX_PIXELS), pillow_reference(data))


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


def test_decompression_bomb_refused_before_decoding():
    bomb = crafted_png(100_000, 100_000)  # 10 gigapixels in 100 bytes
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError):  # from the header: 10 gigapixels are never decoded
        decode_image(bomb, max_pixels=MAX_PIXELS)
    # Over Pillow's own global limit too: its DecompressionBombError must surface as ours.
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(bomb, max_pixels=10**12)


# ---------------------------------------------------------------------------------------------------------
# PixelBudget: decoded pixels in flight per worker
# ---------------------------------------------------------------------------------------------------------


def test_pixel_budget_waits_for_a_decoded_array_to_be_freed():
    import gc
    import threading

    from labelstudio_maskclip.fetching.decode import PixelBudget

    budget = PixelBudget(100)
    with budget.reserve(60, time.monotonic() + 5) as lease:
        held = lease.attach(np.zeros((6, 10, 3), np.uint8))
    assert budget.in_flight == 60
    got = []

    def second() -> None:
        with budget.reserve(60, time.monotonic() + 60) as lease:
            got.append(lease.attach(np.zeros((6, 10, 3), np.uint8)))

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and got == []  # 60 + 60 > 100: waits
    view = held[1:]  # a view keeps the pixels alive too
    del held
    gc.collect()
    thread.join(0.5)
    assert thread.is_alive()
    del view
    gc.collect()
    thread.join(30)
    assert not thread.is_alive() and len(got) == 1 and budget.in_flight == 60
    got.clear()
    gc.collect()
    assert budget.in_flight == 0


def test_pixel_budget_alone_over_the_limit_passes_and_waiting_ends_at_the_deadline():
    from labelstudio_maskclip.fetching.decode import PixelBudget
    from labelstudio_maskclip.fetching.errors import ImageError

    budget = PixelBudget(10)
    with budget.reserve(50, time.monotonic() + 1):  # nothing else in flight: one large image passes
        assert budget.in_flight == 50
        with pytest.raises(ImageError, match="MASKCLIP_MAX_PIXELS_IN_FLIGHT"):
            with budget.reserve(1, time.monotonic() + 0.2):
                pass
    assert budget.in_flight == 0  # not attached: released when the block ends
    with pytest.raises(ValueError):
        with budget.reserve(5, time.monotonic() + 1):
            raise ValueError("decoding failed")
    assert budget.in_flight == 0
