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

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sealedml._internal.encoding import canonical_json
from sealedml.envelope.external_data import EXTERNAL_LOCATION
from sealedml.errors import SealedModelError

__all__ = ["OnnxPayload", "Progress", "rechunk", "sha256_of"]

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


def _strip(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[TensorProto, int]]]:
    """The model without its numeric initializers' data (placeholders marked external), and those
    initializers (references into ``model``, not copies) with their lengths in bytes."""
    stripped = onnx.ModelProto()
    _copy_fields(model, stripped, skip="graph")
    _copy_fields(model.graph, stripped.graph, skip="initializer")
    tensors: list[tuple[TensorProto, int]] = []
    for init in model.graph.initializer:
        if not _numeric(init):
            stripped.graph.initializer.add().CopyFrom(init)
            continue
        if init.data_location == TensorProto.EXTERNAL:
            raise SealedModelError(f"initializer {init.name!r} has external data: load the model with its data first")
        placeholder = stripped.graph.initializer.add()
        placeholder.name, placeholder.data_type = init.name, init.data_type
        placeholder.dims.extend(init.dims)
        placeholder.data_location = TensorProto.EXTERNAL
        entry = placeholder.external_data.add()
        entry.key, entry.value = "location", EXTERNAL_LOCATION
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        tensors.append((init, itemsize * int(np.prod(init.dims, dtype=np.int64))))
    return stripped, tensors


class OnnxPayload:
    """The payload of an ONNX model's container, laid out without copying its tensors.

    The graph keeps every initializer's name, type and shape, marked as external data at
    ``EXTERNAL_LOCATION``; the manifest gives each tensor's offset, length, type and shape.

    Raises:
        SealedModelError: an initializer with external data (load the model with its data).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        stripped, self._tensors = _strip(model)
        rel: list[dict[str, Any]] = [
            {"name": init.name, "length": length, "data_type": init.data_type, "dims": list(init.dims)}
            for init, length in self._tensors
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

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The payload, in order, one piece at a time (a tensor is read from the model when reached)."""
        yield len(self.manifest).to_bytes(4, "big") + self.manifest
        at = 4 + len(self.manifest)
        yield bytes(self._base - at)
        yield self.graph
        at = self._base + len(self.graph)
        for (init, length), entry in zip(self._tensors, self._rel, strict=True):
            start = self._base + entry["offset"]
            if start > at:
                yield bytes(start - at)
            array = np.ascontiguousarray(numpy_helper.to_array(init))
            if array.nbytes != length:
                raise SealedModelError(f"initializer {init.name!r} holds {array.nbytes} bytes, its shape says {length}")
            yield memoryview(array.data).cast("B")
            at = start + length


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
