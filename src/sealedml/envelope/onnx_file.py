"""An ``.onnx`` file's payload without loading the model: its tensors are read from the file when reached.

``onnx.load`` reads the whole file and parses it (twice the model in memory), and reading a
tensor's bytes from the parsed model copies them again. For sealing, only the graph and each
tensor's place in the file are needed: this module walks the protobuf wire format
(``ModelProto.graph`` = field 7, ``GraphProto.initializer`` = field 5, ``TensorProto.raw_data`` =
field 9) over a read-only memory map, parses every message except the initializers' raw data
with the ``protobuf`` library itself, and reads each tensor's bytes with ``os.pread`` when the
sealer reaches it. Memory then holds the graph and one tensor, whatever the model's size.

Tensors stored in typed fields (``float_data``, ...) instead of ``raw_data`` are parsed whole
when reached (still one at a time); a big-endian host does the same for every tensor.
"""

from __future__ import annotations

import functools
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from sealedml.envelope.external_data import check_external_data
from sealedml.envelope.sealing import OnnxPayload, PayloadTensor, placeholder_for, tensor_length
from sealedml.errors import SealedModelError

__all__ = ["payload_of_file"]

_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise SealedModelError("not an ONNX model (a truncated or malformed protobuf varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, value_end = _varint(buf, pos, end)
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        elif wire == _I64:
            value_end = pos + 8
        elif wire == _I32:
            value_end = pos + 4
        else:
            raise SealedModelError(f"not an ONNX model (protobuf wire type {wire})")
        if value_end > end:
            raise SealedModelError("not an ONNX model (a protobuf field runs past its message)")
        yield number, wire, field_start, pos, value_end
        pos = value_end


def _read_span(fd: int, start: int, end: int) -> bytes:
    data = os.pread(fd, end - start, start)
    if len(data) != end - start:
        raise SealedModelError("the model file changed while it was sealed")
    return data


def _parse_tensor(buf: mmap.mmap, start: int, end: int) -> memoryview:
    array = numpy_helper.to_array(TensorProto.FromString(buf[start:end]))
    return memoryview(np.ascontiguousarray(array).data).cast("B")


def payload_of_file(path: Path) -> tuple[OnnxPayload, Callable[[], None]]:
    """The container payload of the ONNX model in ``path``, and what closes the file its tensors are read from.

    The caller calls the second once the payload has been written.

    Raises:
        SealedModelError: not an ONNX model, an initializer with external data, or an
            external-data reference anywhere else in the graph.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise SealedModelError(f"{path} is empty")
        buf = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        model_rest, graph = bytearray(), None
        for number, wire, field_start, value_start, value_end in _fields(buf, 0, size):
            if number == _GRAPH and wire == _LEN:
                graph = (value_start, value_end)
            else:
                model_rest += buf[field_start:value_end]
        if graph is None:
            raise SealedModelError(f"{path}: not an ONNX model (no graph)")
        graph_rest, initializers = bytearray(), []
        for number, wire, field_start, value_start, value_end in _fields(buf, *graph):
            if number == _INITIALIZER and wire == _LEN:
                initializers.append((value_start, value_end))
            else:
                graph_rest += buf[field_start:value_end]
        try:
            stripped = onnx.ModelProto.FromString(bytes(model_rest))
            stripped.graph.ParseFromString(bytes(graph_rest))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise SealedModelError(f"{path}: not an ONNX model") from exc
        tensors: list[PayloadTensor] = []
        for start, end in initializers:
            meta_bytes, raw = bytearray(), None
            for number, wire, field_start, value_start, value_end in _fields(buf, start, end):
                if number == _RAW_DATA and wire == _LEN:
                    raw = (value_start, value_end)
                else:
                    meta_bytes += buf[field_start:value_end]
            meta = TensorProto.FromString(bytes(meta_bytes))
            if meta.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
                stripped.graph.initializer.add().ParseFromString(buf[start:end])
                continue
            if meta.data_location == TensorProto.EXTERNAL:
                raise SealedModelError(
                    f"initializer {meta.name!r} has external data: load the model with its data first"
                )
            placeholder_for(meta, stripped.graph.initializer.add())
            little = sys.byteorder == "little"
            read = (
                functools.partial(_read_span, fd, *raw)
                if raw is not None and little
                else functools.partial(_parse_tensor, buf, start, end)
            )
            tensors.append(PayloadTensor(meta.name, meta.data_type, tuple(meta.dims), tensor_length(meta), read))
        check_external_data(stripped, {t.name for t in tensors})

        def close() -> None:
            buf.close()
            os.close(fd)

        return OnnxPayload(stripped, tensors), close
    except BaseException:
        os.close(fd)
        raise
