"""JSON on the wire: what the server and the bulk import send is standard JSON of the payload."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from labelstudio_maskclip.labelstudio.wire import json_bytes


def test_a_prediction_round_trips_through_the_standard_parser():
    payload = {"results": [{"result": [{"value": {"rle": [0, 255, 17], "brushlabels": ["cat"]}, "score": 0.25}],
                            "score": 0.5, "model_version": "maskclip-1"}]}  # fmt: skip
    data = json_bytes(payload)
    assert isinstance(data, bytes) and b" " not in data  # compact
    assert json.loads(data) == payload


def test_numpy_values_keys_and_non_finite_numbers_become_plain_json():
    data = json_bytes({
        "rle": np.array([1, 2, 3], np.uint8), "score": np.float32(0.5), "count": np.int64(7), 3: "three",
        "tuple": (1, 2), "set": {2, 1}, "nan": math.nan, "inf": math.inf,
    })  # fmt: skip
    assert json.loads(data) == {
        "rle": [1, 2, 3], "score": 0.5, "count": 7, "3": "three", "tuple": [1, 2], "set": [1, 2],
        "nan": None, "inf": None,
    }  # fmt: skip


def test_what_is_not_json_is_an_error_not_a_silent_string():
    with pytest.raises(TypeError, match="object"):
        json_bytes({"x": object()})


def test_integers_past_64_bits_are_written_exactly():
    big = 2**64
    assert json.loads(json_bytes({"id": big, "rle": np.array([1, 2], np.uint8), "scores": [np.float32(0.5)]})) == {
        "id": big, "rle": [1, 2], "scores": [0.5]
    }  # fmt: skip
