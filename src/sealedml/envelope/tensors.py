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

from collections.abc import Mapping, Sequence

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from sealedml._internal.encoding import loads_json
from sealedml.errors import EnvelopeError

__all__ = ["MAX_HEADER", "POSITIONAL_KEY", "check_header", "decode_tensors", "encode_tensors", "positional"]

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
