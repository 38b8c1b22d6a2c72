"""JSON on the wire: the bodies that carry predictions (a ``/predict`` answer, a bulk import).

A prediction is mostly brush RLE integers (about 16,000 per COCO photo with 20 labels), which :mod:`json`
writes about ten times slower than orjson (BENCHMARKS.md, host side): at a GPU's rate that difference is a
core. Everything that sends predictions goes through :func:`json_bytes`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

__all__ = ["json_bytes"]

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj``. Numpy arrays and scalars are written as lists and numbers, tuples and
    sets as lists, keys that are not strings as strings, NaN and infinity as ``null`` (valid JSON, unlike
    :mod:`json`'s ``NaN``). Anything else that is not JSON raises :class:`TypeError`.

    orjson stops at 64-bit integers; a payload with a larger one (a task id of a malformed request, echoed
    in an error) is written by :mod:`json` instead, which has no such limit (and writes NaN as ``NaN``).
    """
    try:
        return orjson.dumps(obj, default=_plain, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise
    return json.dumps(obj, default=_plain, separators=(",", ":")).encode()


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
