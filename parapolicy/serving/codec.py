"""msgpack with numpy arrays: the wire format of the policy server.

Every message is one msgpack map. A numpy array (any bool / int / uint / float dtype, C order) travels
as the map

    {"__ndarray__": true, "dtype": "<f4", "shape": [2, 23], "data": <bin: the raw bytes>}

``dtype`` is numpy's ``dtype.str`` (byte order + kind + item size), so any language can rebuild the
array from ``shape`` and ``data``. numpy scalars become plain numbers, torch tensors become arrays.
Object, string, complex and structured dtypes are refused on both sides (nothing is ever unpickled).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

ARRAY_KEY = "__ndarray__"
_ARRAY_FIELDS = {ARRAY_KEY, "dtype", "shape", "data"}
_ALLOWED_KINDS = "biuf"  # bool, signed int, unsigned int, float
MAX_NDIM = 8


class CodecError(ValueError):
    """A message that is not valid msgpack, or holds a malformed array."""


def _encode_default(obj: Any) -> Any:
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch tensor, without importing torch here
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot encode an array of dtype {obj.dtype} (only bool/int/uint/float)")
        arr = np.ascontiguousarray(obj)
        return {ARRAY_KEY: True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_hook(obj: dict) -> Any:
    if ARRAY_KEY not in obj:
        return obj
    if set(obj) != _ARRAY_FIELDS or obj[ARRAY_KEY] is not True:
        raise CodecError(f"array map must have exactly the keys {sorted(_ARRAY_FIELDS)}, got {sorted(map(str, obj))}")
    try:
        dtype = np.dtype(obj["dtype"])
    except TypeError as err:
        raise CodecError(f"array dtype {obj['dtype']!r} is not a numpy dtype") from err
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None:
        raise CodecError(f"array dtype {dtype} is not allowed (only bool/int/uint/float)")
    shape = obj["shape"]
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise CodecError(f"array shape must be a list of at most {MAX_NDIM} non-negative integers, got {shape!r}")
    data = obj["data"]
    if not isinstance(data, bytes):
        raise CodecError(f"array data must be binary, got {type(data).__name__}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise CodecError(f"array data has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # own, writable memory


def packb(message: Any) -> bytes:
    """Encode a message (maps, lists, numbers, strings, numpy arrays) to msgpack bytes."""
    return msgpack.packb(message, default=_encode_default, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode msgpack bytes; arrays come back as numpy arrays. Raises ``CodecError`` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected a binary msgpack frame, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False, strict_map_key=True)
    except CodecError:
        raise
    except Exception as err:  # msgpack's ExtraData / FormatError / StackError / UnicodeDecodeError ...
        raise CodecError(f"malformed msgpack: {type(err).__name__}: {err}") from None
