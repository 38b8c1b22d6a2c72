"""COCO RLE codec pair: byte-equal to pycocotools, round trips, malformed input refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from labelstudio_maskclip.masks.coco_rle import CocoRLEError, coco_rle_to_mask, mask_to_coco_rle

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2


@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (23, 1), (64, 48), (480, 640)])
def test_rle_codec_matches_pycocotools(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for mask in (rng.random(shape) > 0.5, np.zeros(shape, bool), np.ones(shape, bool)):
        rle = mask_to_coco_rle(mask)
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle == {"size": list(shape), "counts": reference["counts"].decode("ascii")}
        json.dumps(rle)  # JSON-ready
        np.testing.assert_array_equal(coco_rle_to_mask(rle), mask)
        np.testing.assert_array_equal(coco_rle_to_mask({**rle, "counts": rle["counts"].encode()}), mask)


def test_rle_decoder_reads_uncompressed_counts_and_refuses_bad_ones() -> None:
    # Column-major runs, starting with zeros: a 2x3 mask whose middle column is set.
    np.testing.assert_array_equal(
        coco_rle_to_mask({"size": [2, 3], "counts": [2, 2, 2]}), [[False, True, False], [False, True, False]]
    )
    with pytest.raises(CocoRLEError, match="covers 5 pixels"):
        coco_rle_to_mask({"size": [2, 3], "counts": [2, 2, 1]})
    with pytest.raises(CocoRLEError, match="size"):
        coco_rle_to_mask({"counts": "abc"})
    with pytest.raises(CocoRLEError, match=r"\(H, W\)"):
        mask_to_coco_rle(np.zeros((2, 3, 1), bool))
