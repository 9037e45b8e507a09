"""How SECO parties put several messages in one HTTP body: a count, then length-prefixed items.

Every item is a link message (sealed, :mod:`sealedml.seco.link`) or a handshake message
(signed); this framing only delimits them and authenticates nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from sealedml.seco.link import LinkError

__all__ = ["MAX_ITEMS", "pack", "unpack", "unvec", "vec"]

_U32 = struct.Struct(">I")
#: More items than any protocol step sends (a step sends a few per ReLU layer).
MAX_ITEMS = 4096


def pack(items: Sequence[bytes]) -> bytes:
    """``items`` in one byte string."""
    return _U32.pack(len(items)) + b"".join(_U32.pack(len(item)) + item for item in items)


def unpack(data: bytes, *, expect: int | None = None) -> list[bytes]:
    """The items of :func:`pack`'s output.

    Raises:
        LinkError: truncated, trailing bytes, too many items, or not ``expect`` items.
    """
    if len(data) < _U32.size:
        raise LinkError("truncated message list")
    (count,) = _U32.unpack_from(data)
    if count > MAX_ITEMS or (expect is not None and count != expect):
        raise LinkError(f"expected {expect if expect is not None else 'a few'} messages, got {count}")
    items, offset = [], _U32.size
    for _ in range(count):
        if offset + _U32.size > len(data):
            raise LinkError("truncated message list")
        (length,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        if offset + length > len(data):
            raise LinkError("truncated message list")
        items.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise LinkError("trailing bytes after a message list")
    return items


def vec(values: np.ndarray) -> bytes:
    """Field elements (or labels) as little-endian 64-bit words."""
    return np.ascontiguousarray(values, dtype="<i8").tobytes()


def unvec(data: bytes, n: int, modulus: int) -> np.ndarray:
    """``n`` field elements mod ``modulus`` back as int64.

    Raises:
        LinkError: not ``n`` words, or a value outside [0, modulus).
    """
    if len(data) != 8 * n:
        raise LinkError(f"expected {n} values, got {len(data) / 8:g}")
    values = np.frombuffer(data, dtype="<i8").astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= modulus):
        raise LinkError("a value outside the field")
    return values
