"""Tensors on the wire: safetensors bytes.

safetensors is a simple, safe format (a JSON header plus raw little-endian
buffers, no code execution). Tensors sent without names (``--input X.npy``) are
marked *positional* in the safetensors metadata and named ``"0"``, ``"1"``, …;
the runtime maps them to the model's inputs in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from sealedml._internal.encoding import loads_json
from sealedml.errors import EnvelopeError

__all__ = ["POSITIONAL_KEY", "decode_tensors", "encode_tensors", "positional"]

POSITIONAL_KEY = "sealedml.positional"


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


def decode_tensors(data: bytes) -> tuple[dict[str, np.ndarray], bool]:
    """Parse safetensors bytes into ``(tensors, is_positional)``.

    Positional tensors are returned in their index order.

    Raises:
        EnvelopeError: malformed bytes.
    """
    try:
        tensors = safetensors.numpy.load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = loads_json(data[8 : 8 + header_len])
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
