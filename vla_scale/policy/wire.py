"""The policy server's wire format: msgpack with numpy arrays, openpi's convention.

An array travels as a msgpack map `{b"__ndarray__": True, b"data": raw bytes,
b"dtype": dtype.str, b"shape": [...]}` and a numpy scalar as
`{b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}`: the layout of
`openpi_client.msgpack_numpy`, so an openpi-style client can talk to our
server with its own packer (the request fields are ours, see
`vla_scale.policy.server`).

Unpacking is defensive, because it runs on bytes from the network: only plain
numeric dtypes are rebuilt (never object or void arrays), the byte count must
match the shape exactly, and every malformed piece is a `WireError` naming what
was wrong, never a bare exception from msgpack or numpy. Unpacking never
executes anything the message describes.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import msgpack
import numpy as np

PROTOCOL = 1
#: dtype kinds an array on the wire may have: bool, signed/unsigned integers, floats
_KINDS = frozenset("biuf")


class WireError(ValueError):
    """A message that is not valid msgpack, or whose arrays are malformed."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _KINDS:
            raise TypeError(f"cannot send a numpy scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """msgpack bytes of `obj` (dicts, lists, str, numbers, numpy arrays and scalars)."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def _dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        raise WireError(f"array dtype must be a string, got {type(raw).__name__}")
    try:
        dtype = np.dtype(raw)
    except TypeError:
        raise WireError(f"unknown array dtype {raw!r}") from None
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"array dtype {raw!r} is not a plain numeric type")
    return dtype


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise WireError(f"array shape must be a list of non-negative integers, got {shape!r}")
        if not isinstance(data, bytes):
            raise WireError("array data must be bytes")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise WireError(f"array of shape {list(shape)} and dtype {dtype.str} needs {expected} bytes, "
                            f"got {len(data)} (truncated?)")
        # A read-only view of the message's bytes: no copy; the server copies what it keeps.
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError):
            raise WireError(f"bad numpy scalar of dtype {dtype.str}") from None
    return obj


def unpackb(data: bytes) -> Any:
    """The object in `data`; `WireError` for truncated or malformed messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("expected a binary message (msgpack), got a text frame")
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.OutOfData, ValueError) as err:
        # OutOfData / "incomplete input": the message was cut short.
        raise WireError(f"not a complete msgpack message ({type(err).__name__}: {err})") from None
    except Exception as err:  # msgpack raises assorted types on garbage (e.g. FormatError, StackError)
        raise WireError(f"not a msgpack message ({type(err).__name__}: {err})") from None


# The numpy-aware msgpack callables in openpi's spelling, for clients written against it.
Packer = functools.partial(msgpack.Packer, default=_pack_default, use_bin_type=True)
