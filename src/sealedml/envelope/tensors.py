"""Tensors on the wire: safetensors bytes.

safetensors is a simple, safe format (a JSON header plus raw little-endian
buffers, no code execution). Tensors sent without names (``--input X.npy``) are
marked *positional* in the safetensors metadata and named ``"0"``, ``"1"``, …;
the runtime maps them to the model's inputs in order.

An untrusted payload is checked header first (:func:`check_header`): the
header's size and its number of tensors are capped *before* anything is
decoded, so one request cannot make the runtime build hundreds of thousands of
arrays (a 38.6 MiB body of 600,000 one-byte tensors once took 7 s and 965 MiB
of a shared instance's memory).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from sealedml._internal.encoding import loads_json
from sealedml.errors import EnvelopeError

__all__ = [
    "MAX_HEADER",
    "POSITIONAL_KEY",
    "EncodedTensors",
    "check_header",
    "decode_tensors",
    "encode_tensor_parts",
    "encode_tensors",
    "positional",
]

POSITIONAL_KEY = "sealedml.positional"
#: Largest safetensors header accepted at all (bytes), whatever the tensor count.
MAX_HEADER = 1 << 20
#: Header bytes allowed per expected tensor (names, dtype, shape, offsets), plus a fixed allowance.
_HEADER_PER_TENSOR = 1024
_HEADER_BASE = 4096


def positional(arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Name unnamed tensors ``"0"``, ``"1"``, … (see :func:`encode_tensors`)."""
    return {str(i): a for i, a in enumerate(arrays)}


def encode_tensors(tensors: Mapping[str, np.ndarray], *, is_positional: bool = False) -> bytes:
    """Serialize named numpy arrays to safetensors bytes.

    Raises:
        EnvelopeError: an array of a dtype safetensors cannot carry (strings, objects).
    """
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value, order="C")  # keeps 0-d scalars 0-d (ascontiguousarray would not)
        if array.dtype.kind not in "biuf":
            raise EnvelopeError(f"tensor {name!r}: dtype {array.dtype} is not supported")
        arrays[name] = array
    metadata = {POSITIONAL_KEY: "1"} if is_positional else None
    try:
        return safetensors.numpy.save(arrays, metadata=metadata)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise EnvelopeError(f"cannot encode tensors: {exc}") from exc


#: safetensors' dtype names for the NumPy dtypes carried, in safetensors' own order of the
#: tensors in a file (its ``Dtype`` enum, largest first; then by name), so that the parts
#: below make byte for byte the file ``safetensors.numpy.save`` makes.
_DTYPES = {
    np.dtype("uint64"): ("U64", 0),
    np.dtype("int64"): ("I64", 1),
    np.dtype("float64"): ("F64", 2),
    np.dtype("float32"): ("F32", 3),
    np.dtype("uint32"): ("U32", 4),
    np.dtype("int32"): ("I32", 5),
    np.dtype("float16"): ("F16", 6),
    np.dtype("uint16"): ("U16", 7),
    np.dtype("int16"): ("I16", 8),
    np.dtype("int8"): ("I8", 9),
    np.dtype("uint8"): ("U8", 10),
    np.dtype("bool"): ("BOOL", 11),
}


@dataclass(frozen=True)
class EncodedTensors:
    """A safetensors file in pieces: the framed header, then each tensor's own memory (no copy)."""

    header: bytes
    buffers: list[memoryview]

    @property
    def size(self) -> int:
        return len(self.header) + sum(b.nbytes for b in self.buffers)


def _memory_of(array: np.ndarray) -> memoryview:
    """A C-contiguous array's own bytes (``reshape(-1)`` is a view; memoryview cannot cast empty shapes)."""
    return array.reshape(-1).data.cast("B") if array.nbytes else memoryview(b"")


def encode_tensor_parts(tensors: Mapping[str, np.ndarray], *, is_positional: bool = False) -> EncodedTensors:
    """:func:`encode_tensors` without assembling the file: for a writer that streams the pieces
    (one-pass sealing, :func:`~sealedml.envelope.request.seal_request_binary`). The
    concatenation equals ``encode_tensors(tensors)`` byte for byte.

    Raises:
        EnvelopeError: an array of a dtype safetensors cannot carry (strings, objects).
    """
    arrays = []
    for name, value in tensors.items():
        array = np.asarray(value, order="C")
        if array.dtype.kind in "biuf" and not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        dtype = _DTYPES.get(array.dtype)
        if dtype is None:
            raise EnvelopeError(f"tensor {name!r}: dtype {array.dtype} is not supported")
        arrays.append((dtype[1], name, dtype[0], array))
    arrays.sort(key=lambda entry: (entry[0], entry[1]))
    header: dict[str, object] = {}
    if is_positional:
        header["__metadata__"] = {POSITIONAL_KEY: "1"}
    offset = 0
    buffers = []
    for _, name, dtype_name, array in arrays:
        header[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        buffers.append(_memory_of(array))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return EncodedTensors(len(text).to_bytes(8, "little") + text, buffers)


def check_header(data: bytes, max_tensors: int | None = None) -> dict[str, object]:
    """Parse and bound a safetensors header without decoding any tensor.

    Args:
        data: the safetensors bytes.
        max_tensors: most tensors accepted (a model's number of inputs); the
            header may then be at most ~1 KiB per tensor. ``None``: only
            :data:`MAX_HEADER` applies.

    Returns:
        The header document.

    Raises:
        EnvelopeError: truncated, oversized or malformed header, or too many tensors.
    """
    if len(data) < 8:
        raise EnvelopeError("malformed tensor payload")
    header_len = int.from_bytes(data[:8], "little")
    limit = MAX_HEADER if max_tensors is None else min(MAX_HEADER, _HEADER_BASE + _HEADER_PER_TENSOR * max_tensors)
    if header_len > limit:
        raise EnvelopeError(f"tensor payload header too large ({header_len} bytes, at most {limit})")
    if header_len > len(data) - 8:
        raise EnvelopeError("malformed tensor payload")
    try:
        header = loads_json(data[8 : 8 + header_len])
    except ValueError as exc:
        raise EnvelopeError("malformed tensor payload") from exc
    if not isinstance(header, dict):
        raise EnvelopeError("malformed tensor payload")
    count = len(header) - ("__metadata__" in header)
    if max_tensors is not None and count > max_tensors:
        raise EnvelopeError(f"too many tensors: {count} (the model takes {max_tensors})")
    return header


def decode_tensors(data: bytes, *, max_tensors: int | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """Parse safetensors bytes into ``(tensors, is_positional)``.

    The header is checked first (:func:`check_header`). Positional tensors are
    returned in their index order.

    Raises:
        EnvelopeError: malformed bytes, an oversized header or too many tensors.
    """
    header = check_header(data, max_tensors)
    try:
        tensors = safetensors.numpy.load(data)
    except (SafetensorError, ValueError, TypeError, KeyError) as exc:  # KeyError: dtypes numpy lacks (BF16, F8)
        raise EnvelopeError("malformed tensor payload") from exc
    for name, array in tensors.items():
        if array.dtype.kind not in "biuf":
            raise EnvelopeError(f"tensor {name!r}: dtype {array.dtype} is not supported")
    metadata = header.get("__metadata__") or {}
    is_positional = isinstance(metadata, dict) and metadata.get(POSITIONAL_KEY) == "1"
    if is_positional:
        try:
            order = sorted(tensors, key=int)
        except ValueError as exc:
            raise EnvelopeError("positional tensors must be named 0, 1, …") from exc
        if order != [str(i) for i in range(len(order))]:
            raise EnvelopeError("positional tensors must be named 0, 1, …")
        tensors = {k: tensors[k] for k in order}
    return dict(tensors), is_positional
