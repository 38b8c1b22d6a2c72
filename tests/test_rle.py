"""Brush RLE codec: byte-for-byte equal to label-studio-sdk's encoder, decodes what the SDK decodes."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from labelstudio_maskclip.masks import brush as rle
from labelstudio_maskclip.masks.brush import (
    BrushRLEError,
    brush_rle_to_mask,
    label_map_to_brush_rles,
    mask_to_brush_rle,
)
from labelstudio_maskclip.masks.polygons import polygons_to_mask
from tests.photos import COCO128


def sdk_encode(mask: np.ndarray) -> list[int]:
    """The reference: the SDK's encoder on the 0/255 uint8 version of the mask."""
    return mask2rle((np.asarray(mask) != 0).astype(np.uint8) * 255)


def sdk_decode(code: list[int], height: int, width: int) -> np.ndarray:
    return decode_rle(code).reshape(height, width, 4)[:, :, 3] != 0


def disc(height: int, width: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2


def stripes(lengths: list[int], width: int) -> np.ndarray:
    """Alternating off/on runs of the given pixel lengths, row-major, padded with off pixels."""
    flat = np.concatenate([np.full(n, i % 2 == 1) for i, n in enumerate(lengths)])
    flat = np.concatenate((flat, np.zeros(-flat.size % width, dtype=bool)))
    return flat.reshape(-1, width)


def synthetic_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.zeros((7, 13), bool),
        np.ones((13, 7), bool),
        np.ones((300, 300), bool),  # 360000 values: a run cut into 65536-value blocks
        disc(101, 77, 50, 38, 30),
        disc(256, 256, 0, 0, 200),  # touches the borders
        # runs at every size-class boundary (values = 4 x pixels: 4, 8 | 12, 16 | 20, 256 | 260, 65536 | 65540)
        stripes([1, 2, 3, 4, 5, 64, 65, 16384, 16385, 32768, 1, 16384, 3], 97),
    ]
    for shape in [(1, 2), (2, 1), (3, 5), (31, 17), (64, 64), (128, 129)]:
        for p in (0.02, 0.5, 0.98):
            masks.append(rng.random(shape) < p)
    return masks


def coco128_masks(limit: int) -> list[np.ndarray]:
    """Real instance masks and per-image unions rasterised from COCO128 polygons, at image size."""
    masks = []
    for label in sorted((COCO128 / "labels").glob("*.txt")):
        image = COCO128 / "images" / (label.stem + ".jpg")
        if not image.exists():
            continue
        width, height = Image.open(image).size
        polygons = [
            np.array(line.split()[1:], dtype=float).reshape(-1, 2) * [width, height]
            for line in label.read_text().splitlines()
            if line.strip()
        ]
        masks.append(polygons_to_mask(polygons[:1], height, width))
        masks.append(polygons_to_mask(polygons, height, width))
        if len(masks) >= limit:
            return masks
    return masks


@pytest.fixture(scope="module")
def real_masks() -> list[np.ndarray]:
    masks = coco128_masks(24)
    assert len(masks) == 24, f"COCO128 not found under {COCO128}"
    return masks


def test_public_api() -> None:
    assert sorted(rle.__all__) == ["BrushRLEError", "brush_rle_to_mask", "label_map_to_brush_rles", "mask_to_brush_rle"]
    assert issubclass(BrushRLEError, ValueError)


@pytest.mark.parametrize("index", range(len(synthetic_masks())))
def test_encoder_equals_sdk_on_synthetic_masks(index: int) -> None:
    mask = synthetic_masks()[index]
    assert mask_to_brush_rle(mask) == sdk_encode(mask)


def test_encoder_equals_sdk_on_coco128_masks(real_masks: list[np.ndarray]) -> None:
    for mask in real_masks:
        assert mask_to_brush_rle(mask) == sdk_encode(mask)


def test_encoder_reads_nonzero_uint8_and_integers_as_in_mask() -> None:
    rng = np.random.default_rng(1)
    values = rng.integers(0, 4, size=(23, 19)).astype(np.uint8)  # 0..3, nonzero = in mask
    expected = sdk_encode(values != 0)
    assert mask_to_brush_rle(values) == expected
    assert mask_to_brush_rle((values != 0).astype(np.uint8) * 255) == expected
    assert mask_to_brush_rle(values.astype(np.int64)) == expected
    assert mask_to_brush_rle(np.asfortranarray(values != 0)) == expected  # memory layout does not matter
    assert mask_to_brush_rle((values != 0).T) == sdk_encode((values != 0).T)


def test_encoder_output_is_a_list_of_python_ints() -> None:
    code = mask_to_brush_rle(disc(20, 20, 10, 10, 5))
    assert isinstance(code, list) and all(type(b) is int and 0 <= b <= 255 for b in code)


@pytest.mark.parametrize("index", range(len(synthetic_masks())))
def test_decoder_inverts_encoder_and_agrees_with_sdk(index: int) -> None:
    mask = synthetic_masks()[index]
    code = sdk_encode(mask)
    decoded = brush_rle_to_mask(code, *mask.shape)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    if mask.size <= 128 * 129:  # the SDK's decoder is slow (bit strings)
        np.testing.assert_array_equal(decoded, sdk_decode(code, *mask.shape))


def test_decoder_round_trips_coco128_masks(real_masks: list[np.ndarray]) -> None:
    for mask in real_masks:
        np.testing.assert_array_equal(brush_rle_to_mask(mask_to_brush_rle(mask), *mask.shape), mask)
    for mask in real_masks[:3]:
        code = sdk_encode(mask)
        np.testing.assert_array_equal(brush_rle_to_mask(code, *mask.shape), sdk_decode(code, *mask.shape))


# --- streams the SDK encoder never writes: literal blocks, other word and rle sizes (rle-pack's format) ---


def pack(values: list[int], word_size: int = 8, sizes: tuple[int, ...] = (3, 4, 8, 16)) -> list[int]:
    """A plain bit-string rle-pack encoder: runs of 1 go into literal blocks, longer runs into repeats."""
    bits = [f"{len(values):032b}", f"{word_size - 1:05b}"] + [f"{s - 1:04b}" for s in sizes]

    def block(kind: str, count: int, words: list[int]) -> None:
        index = next(i for i, s in enumerate(sizes) if count <= 1 << s)
        bits.append(kind + f"{index:02b}" + f"{count - 1:0{sizes[index]}b}")
        bits.extend(f"{w:0{word_size}b}" for w in words)

    limit = 1 << max(sizes)
    literal: list[int] = []
    i = 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i] and j - i < limit:
            j += 1
        if j - i == 1:
            literal.append(values[i])
        if literal and (j - i > 1 or len(literal) == limit or j == len(values)):
            block("0", len(literal), literal)
            literal = []
        if j - i > 1:
            block("1", j - i, [values[i]])
        i = j
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[k : k + 8], 2) for k in range(0, len(stream), 8)]


def rgba(mask: np.ndarray, color: tuple[int, int, int, int]) -> list[int]:
    """What Label Studio's brush canvas holds: RGBA = color inside the mask, 0 outside."""
    return (mask[:, :, None] * np.array(color)).reshape(-1).tolist()


@pytest.mark.parametrize(
    "word_size, sizes, color",
    [
        (8, (3, 4, 8, 16), (255, 0, 0, 255)),
        (8, (3, 4, 8, 16), (12, 200, 7, 128)),
        (8, (3, 4, 8, 16), (3, 3, 0, 255)),  # literal blocks [0, 255]: one alpha each, not their first word
        (8, (1, 2, 5, 7), (255, 255, 255, 1)),
        (12, (2, 6, 9, 16), (4095, 3, 3, 4000)),
    ],
)
def test_decoder_reads_literal_blocks_and_other_sizes(word_size: int, sizes: tuple, color: tuple) -> None:
    rng = np.random.default_rng(2)
    mask = disc(37, 41, 18, 20, 12) ^ (rng.random((37, 41)) < 0.05)
    code = pack(rgba(mask, color), word_size, sizes)
    np.testing.assert_array_equal(brush_rle_to_mask(code, 37, 41), mask)
    if word_size == 8:  # the SDK's decoder keeps only 8 bits of a word
        np.testing.assert_array_equal(brush_rle_to_mask(code, 37, 41), sdk_decode(code, 37, 41))


def test_decoder_accepts_arrays_tuples_and_bytes() -> None:
    mask = disc(30, 20, 15, 10, 8)
    code = mask_to_brush_rle(mask)
    for form in (np.array(code), np.array(code, dtype=np.uint8), tuple(code), bytes(code)):
        np.testing.assert_array_equal(brush_rle_to_mask(form, 30, 20), mask)
    with pytest.raises(BrushRLEError, match="0..255"):
        brush_rle_to_mask(np.array(code) * 2, 30, 20)
    with pytest.raises(BrushRLEError, match="list of ints"):
        brush_rle_to_mask(12, 30, 20)  # type: ignore[arg-type]


def test_decoder_treats_any_nonzero_alpha_as_in_mask() -> None:
    alpha = np.array([[0, 1, 128], [255, 0, 7]])
    values = np.zeros((2, 3, 4), dtype=int)
    values[:, :, 3] = alpha
    code = pack(values.reshape(-1).tolist())
    np.testing.assert_array_equal(brush_rle_to_mask(code, 2, 3), alpha != 0)


def test_decoder_reads_each_pixels_own_alpha_in_literal_blocks() -> None:
    """Colour and alpha vary independently pixel by pixel (every value in literal blocks): only the alpha
    (value 3 of each pixel) decides."""
    rng = np.random.default_rng(5)
    values = rng.integers(1, 256, (23, 29, 4))
    values[:, :, 3] = np.where(rng.random((23, 29)) < 0.5, 0, rng.integers(1, 256, (23, 29)))
    code = pack(values.reshape(-1).tolist())
    expected = values[:, :, 3] != 0
    np.testing.assert_array_equal(brush_rle_to_mask(code, 23, 29), expected)
    np.testing.assert_array_equal(sdk_decode(code, 23, 29), expected)


# --- errors ---


def test_decoder_rejects_a_size_that_does_not_match_the_header() -> None:
    code = mask_to_brush_rle(disc(10, 12, 5, 6, 3))
    with pytest.raises(BrushRLEError, match=r"^brush RLE holds 480 values, but the image needs 528 \(height \* width \* 4\); "
                       "pass the result's original_height and original_width"):  # fmt: skip
        brush_rle_to_mask(code, 12, 10 + 1)
    with pytest.raises(BrushRLEError, match="positive"):
        brush_rle_to_mask(code, 0, 12)


@pytest.mark.parametrize(
    "code, message",
    [
        ([], "non-empty"),
        ([[1, 2], [3, 4]], "flat list"),
        ([0.5, 1.0], "ints"),
        ([0, 0, 300, 0, 0, 0, 0, 0], "bytes, 0..255"),
        ([-1] * 10, "bytes, 0..255"),
        ([0, 0, 0, 4, 3], "^brush RLE of 5 bytes is shorter than its 7-byte header$"),
    ],
)
def test_decoder_rejects_malformed_input(code: list, message: str) -> None:
    with pytest.raises(BrushRLEError, match=message):
        brush_rle_to_mask(code, 1, 1)


def test_decoder_rejects_a_truncated_rle() -> None:
    mask = disc(40, 40, 20, 20, 10) ^ (np.random.default_rng(3).random((40, 40)) < 0.1)
    code = mask_to_brush_rle(mask)
    for keep in (7, 8, len(code) // 2, len(code) - 3):
        with pytest.raises(BrushRLEError, match="ends after|overruns"):
            brush_rle_to_mask(code[:keep], 40, 40)


def test_decoder_rejects_a_last_block_longer_than_the_image() -> None:
    code = mask_to_brush_rle(np.ones((1, 5), bool))  # one repeat block of 20 values
    header = list(f"{16:032b}")  # claim 16 values: a 1x4 image
    bits = "".join(header) + "".join(f"{b:08b}" for b in code)[32:]
    forged = [int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)]
    with pytest.raises(BrushRLEError, match="overruns"):
        brush_rle_to_mask(forged, 1, 4)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.zeros((2, 3, 4), bool), "shape"),
        (np.zeros((0, 5), bool), "non-empty"),
        (np.zeros((4, 4), np.float32), "bool or integer"),
    ],
)
def test_encoder_rejects_bad_masks(mask: np.ndarray, message: str) -> None:
    with pytest.raises(BrushRLEError, match=message):
        mask_to_brush_rle(mask)


def label_maps() -> list[np.ndarray]:
    """Label maps with NO_LABEL (-1), absent classes, runs across rows and runs past 65536 values."""
    rng = np.random.default_rng(1)
    maps = [rng.integers(-1, 4, size=shape).astype(np.int16) for shape in [(1, 1), (1, 7), (9, 1), (31, 17), (64, 65)]]
    rows = np.zeros((300, 300), np.int16)
    rows[40:200] = 2  # 48000 pixels = 192000 values: blocks of 65536 in the middle of the stream
    rows[250:, 100:] = -1
    maps.append(rows)
    blobs = np.full((101, 77), -1, np.int16)
    blobs[disc(101, 77, 50, 38, 30)] = 0
    blobs[disc(101, 77, 10, 10, 25)] = 3
    maps.append(blobs)
    return maps


@pytest.mark.parametrize("index", range(len(label_maps())))
def test_label_map_encoder_equals_the_sdk_on_each_class_mask(index: int) -> None:
    labels = label_maps()[index]
    classes = [3, -1, 0, 2, 7]  # 7 is absent: an empty mask; order is the caller's
    assert label_map_to_brush_rles(labels, classes) == [sdk_encode(labels == k) for k in classes]


def test_label_map_encoder_on_real_masks_painted_into_one_map(real_masks: list[np.ndarray]) -> None:
    same_size = [m for m in real_masks if m.shape == real_masks[0].shape][:6]
    labels = np.full(same_size[0].shape, -1, np.int32)
    for k, mask in enumerate(same_size):
        labels[mask] = k  # later ones cover earlier ones
    classes = list(range(len(same_size)))
    assert label_map_to_brush_rles(labels, classes) == [sdk_encode(labels == k) for k in classes]


def test_label_map_encoder_edge_cases() -> None:
    assert label_map_to_brush_rles(np.zeros((2, 2), np.int16), []) == []
    (one,) = label_map_to_brush_rles(np.zeros((2, 2), np.uint8), [0])
    assert one == sdk_encode(np.ones((2, 2), bool)) and all(type(v) is int for v in one)
    with pytest.raises(BrushRLEError, match="integer"):
        label_map_to_brush_rles(np.zeros((2, 2), np.float32), [0])
    with pytest.raises(BrushRLEError, match="shape"):
        label_map_to_brush_rles(np.zeros((2, 2, 2), np.int16), [0])


def test_the_header_holds_fewer_than_2_to_the_32_values() -> None:
    assert rle._check_size((65536, 16383), 65536 * 16383) == 4 * 65536 * 16383  # the largest that fits
    with pytest.raises(BrushRLEError, match=r"too large for brush RLE \(H \* W \* 4 >= 2\*\*32\)"):
        rle._check_size((65536, 16384), 65536 * 16384)
