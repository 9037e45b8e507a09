"""Sealing a model straight into a file, in bounded memory (``model seal`` and ``publish_model``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx

from sealedml.envelope.external_data import check_external_data
from sealedml.envelope.model_container import (
    DEFAULT_CHUNK_SIZE,
    FILE_FORMAT_VERSION,
    FORMAT_VERSION,
    BytesPayload,
    is_tflite,
    write_sealed,
)
from sealedml.envelope.sealing import OnnxPayload, Progress
from sealedml.errors import SealedModelError

__all__ = ["seal_model_file"]


class _Closer:
    def __init__(self, close: Callable[[], None]) -> None:
        self.close = close


class _HashingWriter:
    """Passes writes on to a file, counting them and hashing them (the container's SHA-256)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.size, self.hash = out, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.out.write(data)


def seal_model_file(
    path: Path,
    model: onnx.ModelProto | bytes | Path,
    *,
    model_id: str,
    model_version: int,
    model_key: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> tuple[int, str]:
    """Seal an ONNX model (or TFLite bytes) into the file ``path``, in bounded memory; its size and SHA-256.

    ``model`` may be the path of an ``.onnx`` file: its tensors are then read from the file one
    at a time (``onnx_file.py``) and the model is never loaded. Otherwise memory holds the model,
    one tensor and one chunk, never the container (``sealing.py``).

    Raises:
        SealedModelError: as :func:`seal_model` and :func:`seal_tflite`.
    """
    if not 1024 <= chunk_size <= 64 * 1024 * 1024:
        raise SealedModelError("chunk size must be between 1 KiB and 64 MiB")
    if model_version < 1:
        raise SealedModelError("model version must be ≥ 1")
    close: Callable[[], None] = lambda: None  # noqa: E731
    payload: OnnxPayload | BytesPayload
    if isinstance(model, Path):
        from sealedml.envelope.onnx_file import payload_of_file

        payload, close = payload_of_file(model)
        version, extra = FORMAT_VERSION, {}
    elif isinstance(model, bytes | bytearray):
        if not is_tflite(bytes(model)):
            raise SealedModelError("input is not a TFLite model (no TFL3 identifier)")
        payload = BytesPayload(bytes(model))
        version, extra = FILE_FORMAT_VERSION, {"payload": "tflite"}
    else:
        try:
            check_external_data(model, ())
        except SealedModelError as exc:
            raise SealedModelError(f"{exc.message}: load the model with its data first (onnx.load)") from None
        payload, version, extra = OnnxPayload.of_model(model), FORMAT_VERSION, {}
    with contextlib.closing(_Closer(close)), open(path, "wb") as fh:
        out = _HashingWriter(fh)
        write_sealed(
            out,  # type: ignore[arg-type]
            payload,
            version,
            extra,
            model_id=model_id,
            model_version=model_version,
            model_key=model_key,
            chunk_size=chunk_size,
            progress=progress,
        )
        fh.flush()
        os.fsync(fh.fileno())
    return out.size, out.hash.hexdigest()
