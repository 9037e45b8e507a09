"""Sealing in bounded memory: the container's payload as a stream, encrypted chunk by chunk.

A sealed container (``model_container.py``) is a header — which names the payload's length
and SHA-256 — then the payload in AES-256-GCM chunks. Building the payload in memory, as a
copy of the model with its tensors moved out plus the tensors plus the ciphertext, cost
several times the model's size (584 MB for a 125 MB model). Here the payload is a sequence
of pieces produced on demand — the manifest, the graph without its initializers, then each
tensor — read twice: once for the SHA-256 the header needs, once to encrypt and write. At
any time only the model itself, one tensor and one chunk are in memory. The bytes written
are the same as the in-memory builder's, so readers do not change.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sealedml._internal.encoding import canonical_json
from sealedml.envelope.external_data import EXTERNAL_LOCATION
from sealedml.errors import SealedModelError

__all__ = ["OnnxPayload", "PayloadTensor", "Progress", "placeholder_for", "rechunk", "sha256_of", "tensor_length"]

#: Told (bytes done, bytes in all) as chunks are sealed.
Progress = Callable[[int, int], None]
#: Tensors start at multiples of this in the payload (see model_container's layout).
ALIGN = 64


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy every set field of ``source`` into ``target`` but ``skip`` (messages and lists copied, scalars set)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _numeric(init: TensorProto) -> bool:
    return init.data_type not in (TensorProto.STRING, TensorProto.UNDEFINED)


@dataclass(frozen=True)
class PayloadTensor:
    """One initializer's place in the payload: what the manifest says of it, and how to read its bytes."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    length: int
    read: Callable[[], bytes | memoryview]


def placeholder_for(tensor: TensorProto, target: TensorProto) -> None:
    """Make ``target`` the graph's stand-in for ``tensor``: name, type and shape, data external to the graph."""
    target.name, target.data_type = tensor.name, tensor.data_type
    target.dims.extend(tensor.dims)
    target.data_location = TensorProto.EXTERNAL
    entry = target.external_data.add()
    entry.key, entry.value = "location", EXTERNAL_LOCATION


def tensor_length(tensor: TensorProto) -> int:
    """The bytes a numeric tensor of this type and shape holds."""
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return itemsize * int(np.prod(tensor.dims, dtype=np.int64))


def _array_bytes(init: TensorProto) -> memoryview:
    return memoryview(np.ascontiguousarray(numpy_helper.to_array(init)).data).cast("B")


def _strip(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PayloadTensor]]:
    """The model without its numeric initializers' data (placeholders marked external), and those
    initializers as payload tensors read from ``model`` when reached (references, not copies)."""
    stripped = onnx.ModelProto()
    _copy_fields(model, stripped, skip="graph")
    _copy_fields(model.graph, stripped.graph, skip="initializer")
    tensors: list[PayloadTensor] = []
    for init in model.graph.initializer:
        if not _numeric(init):
            stripped.graph.initializer.add().CopyFrom(init)
            continue
        if init.data_location == TensorProto.EXTERNAL:
            raise SealedModelError(f"initializer {init.name!r} has external data: load the model with its data first")
        placeholder_for(init, stripped.graph.initializer.add())
        read = functools.partial(_array_bytes, init)
        tensors.append(PayloadTensor(init.name, init.data_type, tuple(init.dims), tensor_length(init), read))
    return stripped, tensors


class OnnxPayload:
    """The payload of an ONNX model's container, laid out without copying its tensors.

    The graph keeps every initializer's name, type and shape, marked as external data at
    ``EXTERNAL_LOCATION``; the manifest gives each tensor's offset, length, type and shape.
    :meth:`of_model` reads the tensors from a loaded model; ``onnx_file.py:payload_of_file``
    from the ``.onnx`` file itself, one at a time.
    """

    def __init__(self, stripped: onnx.ModelProto, tensors: list[PayloadTensor]) -> None:
        self._tensors = tensors
        rel: list[dict[str, Any]] = [
            {"name": t.name, "length": t.length, "data_type": t.data_type, "dims": list(t.dims)} for t in tensors
        ]
        self.graph = stripped.SerializeToString()
        cursor = len(self.graph)
        for entry in rel:
            cursor = -(-cursor // ALIGN) * ALIGN
            entry["offset"] = cursor
            cursor += entry["length"]
        body_length = cursor
        base = 0
        for _ in range(4):  # converges in ≤ 2 rounds; offsets are aligned after the base
            manifest = {
                "graph": {"offset": base, "length": len(self.graph)},
                "tensors": [{**t, "offset": t["offset"] + base} for t in rel],
            }
            self.manifest = canonical_json(manifest)
            new_base = -(-(4 + len(self.manifest)) // ALIGN) * ALIGN
            if new_base == base:
                break
            base = new_base
        else:  # pragma: no cover - arithmetic guarantees convergence
            raise SealedModelError("manifest layout did not converge")
        self._base, self._rel = base, rel
        #: The payload's length in bytes.
        self.length = base + body_length

    @classmethod
    def of_model(cls, model: onnx.ModelProto) -> OnnxPayload:
        """The payload of a loaded model.

        Raises:
            SealedModelError: an initializer with external data (load the model with its data).
        """
        return cls(*_strip(model))

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The payload, in order, one piece at a time (a tensor is read when reached)."""
        yield len(self.manifest).to_bytes(4, "big") + self.manifest
        at = 4 + len(self.manifest)
        yield bytes(self._base - at)
        yield self.graph
        at = self._base + len(self.graph)
        for tensor, entry in zip(self._tensors, self._rel, strict=True):
            start = self._base + entry["offset"]
            if start > at:
                yield bytes(start - at)
            data = tensor.read()
            if len(data) != tensor.length:
                raise SealedModelError(
                    f"initializer {tensor.name!r} holds {len(data)} bytes, its shape says {tensor.length}"
                )
            yield data
            at = start + tensor.length


def rechunk(pieces: Iterable[bytes | memoryview], size: int) -> Iterator[bytes]:
    """The concatenation of ``pieces`` cut into blocks of ``size`` bytes (the last one shorter)."""
    buffer = bytearray()
    for piece in pieces:
        view = memoryview(piece)
        while len(view):
            take = min(size - len(buffer), len(view))
            buffer += view[:take]
            view = view[take:]
            if len(buffer) == size:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def sha256_of(pieces: Iterable[bytes | memoryview]) -> str:
    """SHA-256 (hex) of the concatenation of ``pieces``."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()
