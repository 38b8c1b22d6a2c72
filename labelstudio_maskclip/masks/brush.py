"""Label Studio brush RLE (the ``value.rle`` of a ``brushlabels`` result), encoded and decoded with numpy.

This is *not* COCO RLE. It is the bit-packed format of thi.ng's ``rle-pack``, applied to the RGBA pixels of
the brush layer, and it is what ``label_studio_sdk.converter.brush`` reads and writes:

- header: 32 bits ``num`` (number of values = H * W * 4), 5 bits ``word_size - 1``, then four 4-bit fields
  ``rle_size - 1`` (the SDK writes word size 8 and rle sizes 3, 4, 8, 16);
- blocks, most significant bit first: 1 bit kind (1 = repeat, 0 = literal), 2 bits index into the rle sizes,
  ``rle_sizes[index]`` bits ``count - 1``, then one word (repeat: ``count`` copies of it) or ``count`` words
  (literal);
- zero bits up to the next whole byte. The SDK always adds 1..8 of them, so a stream whose length is already
  a multiple of 8 bits gets one more zero byte.

Masks follow the package convention: ``(H, W)`` bool, row = y, column = x. A mask is encoded as the SDK's
``mask2rle`` encodes its 0/255 uint8 version: every pixel repeated into the 4 RGBA channels. A decoded RLE
is a mask where its alpha channel (the 4th value of each pixel) is nonzero.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ..errors import BadInput

__all__ = ["BrushRLEError", "mask_to_brush_rle", "label_map_to_brush_rles", "brush_rle_to_mask"]

_CHANNELS = 4  # RGBA
_WORD_BITS = 8  # the SDK's word size
_RLE_SIZES = (3, 4, 8, 16)  # the SDK's bits for ``count - 1``, one per 2-bit size index
_HEADER_BITS = 32 + 5 + 4 * 4
_MAX_REPEAT = 1 << _RLE_SIZES[-1]  # longest repeat block (65536 values)


class BrushRLEError(BadInput):
    """A brush RLE is malformed, or does not hold an image of the given size."""


# ----------------------------------------------------------------------------------------------- encoding


def _pixel_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal pixels of an (H, W) bool mask, row-major: (lengths (R,) int64, values (R,) 0/1 uint8)."""
    flat = mask.reshape(-1).view(np.uint8)  # (H * W,) 0/1, compared faster than bool
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], starts))
    lengths = np.diff(np.append(starts, flat.size))
    return lengths, flat[starts]


def _split_long_runs(lengths: np.ndarray, *per_run: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cut runs of over 65536 values into 65536-value pieces plus the remainder, as the SDK does:
    (lengths (B,), *per_run repeated to (B,)), B >= R."""
    pieces = (lengths - 1) // _MAX_REPEAT + 1  # (R,)
    nth = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # (B,) piece within run
    lengths, last = np.repeat(lengths, pieces), np.repeat(pieces - 1, pieces)  # (B,)
    pieces_lengths = np.where(nth < last, _MAX_REPEAT, lengths - _MAX_REPEAT * last)
    return (pieces_lengths, *(np.repeat(array, pieces) for array in per_run))


def _streams(
    num: int, lengths: np.ndarray, values: np.ndarray, stream: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole encoded streams of ``count`` masks of ``num`` values each, as codes to pack.

    Input: pixel runs (R,) each: ``lengths`` in pixels, 0/1 ``values``, and the ``stream`` (mask) each run
    belongs to, nondecreasing in 0..count-1. Each stream is its header, its runs as the SDK's repeat blocks,
    then the SDK's 1..8 zero bits up to a whole byte. Returns (codes (B,) int64, widths (B,) int64) in stream
    order, and each stream's length in bytes (count,).

    A run of ``n`` values (``n`` = 4 x pixels, RGBA) takes the smallest size class that holds it: up to 8,
    16, 256 values, else the 16-bit class, cut into pieces of at most 65536 values (all pieces, the remainder
    too, stay in the 16-bit class). Each block's code is ``1 | index (2) | n - 1 | word (8)``, right-aligned
    in ``width`` bits.
    """
    lengths = lengths * _CHANNELS
    index = np.searchsorted(np.array([1 << s for s in _RLE_SIZES[:3]]), lengths)  # (R,) size class 0..3
    if lengths.max() > _MAX_REPEAT:
        lengths, values, index, stream = _split_long_runs(lengths, values, index, stream)  # (B,) each
    size_bits = np.array(_RLE_SIZES, dtype=np.int64)[index]  # (B,)
    word = values.astype(np.int64) * 255  # (B,) the 0/255 mask value
    codes = (((4 | index) << size_bits | (lengths - 1)) << _WORD_BITS) | word
    widths = 3 + size_bits + _WORD_BITS
    bits = _HEADER_BITS + np.bincount(stream, weights=widths, minlength=count).astype(np.int64)  # (count,)
    padding = 8 - bits % 8
    header_codes, header_widths = _header_codes(num)
    streams = np.arange(count)
    order = np.argsort(  # stable: (header, blocks, padding) of stream 0, then of stream 1, ...
        np.concatenate((np.repeat(3 * streams, len(header_codes)), 3 * stream + 1, 3 * streams + 2)), kind="stable"
    )
    return (
        np.concatenate((np.tile(header_codes, count), codes, np.zeros(count, np.int64)))[order],
        np.concatenate((np.tile(header_widths, count), widths, padding))[order],
        (bits + padding) // 8,
    )


def _header_codes(num: int) -> tuple[np.ndarray, np.ndarray]:
    """The header as codes: ``num`` (32 bits), word size - 1 (5), rle sizes - 1 (4 x 4): (6,) and (6,) int64."""
    codes = np.array([num, _WORD_BITS - 1] + [s - 1 for s in _RLE_SIZES], dtype=np.int64)
    return codes, np.array([32, 5, 4, 4, 4, 4], dtype=np.int64)


def _pack(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate the codes' low ``width`` bits (1..32 each), most significant first; the widths add up to
    a whole number of bytes: (L,) uint8.

    Works per code, not per bit: each code is shifted into the big-endian 64-bit word where it starts, and
    the part that spills past that word's end into the next word; codes never overlap, so each word is the
    OR of its parts.
    """
    offsets = np.cumsum(widths) - widths  # (B,) first bit of each code
    word = offsets >> 6  # (B,) 64-bit word holding the code's first bit
    shift = 64 - (offsets & 63) - widths  # (B,) left shift inside that word; < 0 where the code spills over
    spills = shift < 0
    value = codes.astype(np.uint64)
    head = np.where(spills, value >> (-shift).clip(0).astype(np.uint64), value << shift.clip(0).astype(np.uint64))
    tail = np.where(spills, value << (64 + shift).clip(0, 63).astype(np.uint64), np.uint64(0))  # next word
    index = np.stack((word, word + spills), axis=1).reshape(-1)  # (2B,) (head, tail) per code: nondecreasing
    parts = np.stack((head, tail), axis=1).reshape(-1)  # (2B,) uint64
    first = np.flatnonzero(np.diff(index, prepend=-1))  # first part of each distinct word
    nbytes = int(offsets[-1] + widths[-1]) // 8
    words = np.zeros((nbytes + 7) // 8, dtype=">u8")  # big-endian: bit 63 is the stream's first
    words[index[first]] = np.bitwise_or.reduceat(parts, first)
    return words.view(np.uint8)[:nbytes]


def _check_size(shape: tuple[int, ...], size: int) -> int:
    """H * W * 4 of a (H, W) array, checked to fit the header's 32 bits."""
    if len(shape) != 2 or size == 0:
        raise BrushRLEError(f"mask must be a non-empty (H, W) array, got shape {shape}")
    num = size * _CHANNELS
    if num >= 1 << 32:
        raise BrushRLEError(f"mask of shape {shape} is too large for brush RLE (H * W * 4 >= 2**32)")
    return num


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """Encode a mask as Label Studio brush RLE: a list of byte values (ints 0..255).

    ``mask``: (H, W) bool, or (H, W) integer (uint8 ...) where nonzero means "in the mask". The result equals
    ``label_studio_sdk.converter.brush.mask2rle(mask.astype(bool).astype(np.uint8) * 255)`` for every mask.
    """
    mask = np.asarray(mask)
    num = _check_size(mask.shape, mask.size)
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise BrushRLEError(f"mask must be bool or integer (nonzero = in mask), got {mask.dtype}; threshold it")
    lengths, values = _pixel_runs(mask if mask.dtype == bool else mask != 0)
    codes, widths, _ = _streams(num, lengths, values, np.zeros(len(lengths), np.int64), 1)
    return _pack(codes, widths).tolist()


def label_map_to_brush_rles(labels: np.ndarray, classes: Sequence[int]) -> list[list[int]]:
    """The brush RLE of ``labels == k`` for each ``k`` in ``classes``, equal to
    ``[mask_to_brush_rle(labels == k) for k in classes]``, from one pass over the label map.

    ``labels``: (H, W) integer. Faster than one mask at a time: the pixels are read once (into runs of
    equal labels), each class's runs are merged from those, and all streams are packed together (each
    stream ends on a whole byte, so they are cut apart afterwards).
    """
    labels = np.asarray(labels)
    num = _check_size(labels.shape, labels.size)
    if not np.issubdtype(labels.dtype, np.integer):
        raise BrushRLEError(f"a label map must be integer, got {labels.dtype}")
    if not len(classes):
        return []
    flat = labels.reshape(-1)
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))  # (R,) runs of one label
    inside = flat[starts][None, :] == np.asarray(classes)[:, None]  # (C, R): run r is in mask c
    # A mask's runs start where "inside" changes along its row, and at the image's first pixel.
    change = np.concatenate((np.ones((len(classes), 1), bool), inside[:, 1:] != inside[:, :-1]), axis=1)
    stream, run = np.nonzero(change)  # (M,) each, in stream order
    run_starts = starts[run]
    last = np.append(stream[1:] != stream[:-1], True)  # (M,) the last run of its mask
    lengths = np.where(last, flat.size, np.roll(run_starts, -1)) - run_starts
    codes, widths, nbytes = _streams(num, lengths, inside[stream, run].view(np.uint8), stream, len(classes))
    data = _pack(codes, widths)
    return [chunk.tolist() for chunk in np.split(data, np.cumsum(nbytes)[:-1])]


# ----------------------------------------------------------------------------------------------- decoding


def _to_bytes(rle: Sequence[int]) -> np.ndarray:
    """Validate the RLE's values as bytes: (L,) uint8."""
    if isinstance(rle, np.ndarray):
        if rle.ndim != 1 or not np.issubdtype(rle.dtype, np.integer):
            raise BrushRLEError(f"brush RLE must be a flat integer array, got {rle.dtype} of shape {rle.shape}")
        if rle.size and (rle.min() < 0 or rle.max() > 255):
            raise BrushRLEError("brush RLE values must be bytes, 0..255; is this COCO RLE instead of a brush RLE?")
        data = rle.astype(np.uint8)
    elif isinstance(rle, (list, tuple, bytes, bytearray)):
        try:
            data = np.frombuffer(bytes(rle), dtype=np.uint8)  # C-speed conversion and range check
        except ValueError as error:
            raise BrushRLEError(
                "brush RLE values must be bytes, 0..255; is this COCO RLE instead of a brush RLE?"
            ) from error
        except TypeError as error:
            raise BrushRLEError(f"brush RLE must be a flat list of ints 0..255: {error}") from error
    else:
        raise BrushRLEError(f"brush RLE must be a list of ints 0..255 (result['value']['rle']), got {type(rle)}")
    if data.size == 0:
        raise BrushRLEError("brush RLE is empty; expected result['value']['rle'], a non-empty list of bytes")
    return data


def _byte_windows(data: np.ndarray) -> np.ndarray:
    """The 64 bits starting at each byte, big-endian: (L,) uint64 for ``data`` (L,) uint8 (zeros past the end)."""
    padded = np.concatenate((data, np.zeros(8, dtype=np.uint8))).astype(np.uint64)
    windows = np.zeros(data.size, dtype=np.uint64)
    for k in range(8):
        windows = (windows << np.uint64(8)) | padded[k : k + data.size]
    return windows


def _fields_at(windows: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """Read the ``width``-bit (1..32) unsigned field starting at each bit position: (P,) int64.

    ``windows`` from :func:`_byte_windows`; fields starting in its last byte may read zeros past the end.
    """
    aligned = windows[positions >> 3] << (positions & 7).astype(np.uint64)  # field starts at bit 63
    return (aligned >> np.uint64(64 - width)).astype(np.int64)


def _parse_header(windows: np.ndarray, nbits: int) -> tuple[int, int, np.ndarray]:
    """(num values, word size, rle sizes (4,) int64) from the first 53 bits."""
    if nbits < _HEADER_BITS:
        raise BrushRLEError(f"brush RLE of {nbits // 8} bytes is shorter than its 7-byte header")
    head = _fields_at(windows, np.array([0, 32] + [37 + 4 * i for i in range(4)]), 32)
    widths = np.array([32, 5, 4, 4, 4, 4])
    num, word_size, *sizes = (head >> (32 - widths)) + np.array([0, 1, 1, 1, 1, 1])
    return int(num), int(word_size), np.array(sizes, dtype=np.int64)


def _read_block_heads(head: np.ndarray, word_size: int, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Interpret 19-bit block heads ``kind (1) | index (2) | count - 1 (sizes[index] <= 16 bits) | ...``.

    ``head`` (P,) int64. Returns (kind, count, head bits, block bits) as (P,) int64: kind 1 = repeat,
    0 = literal; ``count`` values written; bits before the first word; bits of the whole block.
    """
    kind, size = head >> 18, sizes[(head >> 16) & 3]
    count = ((head & 0xFFFF) >> (16 - size)) + 1
    head_bits = 3 + size
    return kind, count, head_bits, head_bits + np.where(kind == 1, 1, count) * word_size


@functools.lru_cache(maxsize=8)
def _block_bits_table(word_size: int, sizes: tuple[int, ...]) -> np.ndarray:
    """Bits of a whole block for each of the 2**19 possible 19-bit block heads: (2**19,) int64, read-only."""
    table = _read_block_heads(np.arange(1 << 19, dtype=np.int64), word_size, np.array(sizes))[3]
    table.flags.writeable = False
    return table


def _next_starts(windows: np.ndarray, word_size: int, sizes: np.ndarray) -> np.ndarray:
    """Where the next block would start if one started at bit p, for EVERY p: (N,) int64, N = 8 * L bytes.

    A block's length depends only on its first 19 bits, so a table over all 2**19 heads gives it; one pass
    per bit offset within the byte keeps the shifts scalar.
    """
    table = _block_bits_table(word_size, tuple(sizes.tolist()))  # (2**19,)
    nxt = np.empty((windows.size, 8), dtype=np.int64)  # (L, 8): byte, bit offset
    byte_starts = 8 * np.arange(windows.size, dtype=np.int64)
    for offset in range(8):
        head = ((windows << np.uint64(offset)) >> np.uint64(64 - 19)).astype(np.int64)  # (L,)
        nxt[:, offset] = byte_starts + offset + table[head]
    return nxt.reshape(-1)


def _chain(nxt: np.ndarray, start: int, end: int) -> np.ndarray:
    """Block starts ``start, nxt[start], nxt[nxt[start]], ...`` below ``end``: (B,) int64.

    The only step that is not vectorised: each start depends on the previous block, so this walks the blocks
    (one cheap step per run, never per pixel or per bit). Pointer doubling would be vectorised, but costs
    log2(B) gathers over all N bits and measured 6x slower than this walk on a 512x512 noise mask.
    """
    step = memoryview(nxt.data)
    starts = []
    position = start
    while position < end:
        starts.append(position)
        position = step[position]
    return np.array(starts, dtype=np.int64)


def _decode_alpha(rle: Sequence[int], pixels: int) -> np.ndarray:
    """Decode a brush RLE of ``pixels`` RGBA pixels to "alpha != 0" per pixel: (pixels,) bool.

    Only the alpha values (every 4th value, from index 3) are read: a block covering values [first, end)
    holds the alpha of pixels [first // 4, end // 4).
    """
    data = _to_bytes(rle)
    nbits = data.size * 8
    windows = _byte_windows(data)
    num, word_size, sizes = _parse_header(windows, nbits)
    if num != pixels * _CHANNELS:  # checked first: the header alone must not make us allocate
        raise BrushRLEError(
            f"brush RLE holds {num} values, but the image needs {pixels * _CHANNELS} (height * width * 4); "
            "pass the result's original_height and original_width"
        )
    nxt = _next_starts(windows, word_size, sizes)  # (N,)
    starts = _chain(nxt, _HEADER_BITS, nbits)  # (B,)
    kind, count, head_bits, _ = _read_block_heads(_fields_at(windows, starts, 19), word_size, sizes)  # (B,)
    end = np.cumsum(count)  # (B,) values written after each block
    used = int(np.searchsorted(end, num)) + 1  # blocks up to the one that reaches num values
    if used > end.size:
        raise BrushRLEError(f"brush RLE ends after {int(end[-1]) if end.size else 0} of its {num} values")
    if end[used - 1] != num or nxt[starts[used - 1]] > nbits:
        raise BrushRLEError(f"brush RLE's last block overruns its {num} values or its {data.size} bytes")
    kind, count, payload, end = kind[:used], count[:used], starts[:used] + head_bits[:used], end[:used]
    first = end - count  # (B,) index of each block's first value
    alphas = end // _CHANNELS - first // _CHANNELS  # (B,) pixels whose alpha lies in the block
    alpha = np.repeat(_fields_at(windows, payload, word_size) != 0, alphas)  # (pixels,) repeats: their word
    literal = np.flatnonzero((kind == 0) & (alphas > 0))
    if literal.size:  # literal blocks: read the word of each alpha value
        owner = np.repeat(literal, alphas[literal])  # (V,) block of each such pixel
        pixel = np.arange(owner.size) - np.repeat(np.cumsum(alphas[literal]) - alphas[literal], alphas[literal])
        pixel += first[owner] // _CHANNELS  # (V,) pixel index
        value = _CHANNELS * pixel + 3  # (V,) index of its alpha value
        alpha[pixel] = _fields_at(windows, payload[owner] + (value - first[owner]) * word_size, word_size) != 0
    return alpha


def brush_rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Decode a Label Studio brush RLE to an (H, W) bool mask: pixels whose alpha value is nonzero.

    ``rle``: the list of byte values in ``result["value"]["rle"]``; ``height``, ``width``: the image size
    (``original_height``, ``original_width``). Accepts any rle-pack stream (repeat and literal blocks, any
    word and rle sizes), as written by the SDK's ``mask2rle`` or by Label Studio's brush tool.
    Raises :class:`BrushRLEError` if the RLE is malformed or does not hold ``height * width * 4`` values.
    """
    if height <= 0 or width <= 0:
        raise BrushRLEError(f"image size must be positive, got height={height}, width={width}")
    return _decode_alpha(rle, height * width).reshape(height, width)  # (H, W)
