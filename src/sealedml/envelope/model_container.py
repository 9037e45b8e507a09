"""The sealed model container (DESIGN §crypto "Sealed model container").

Layout::

    MAGIC (8) ‖ header_len (u32 BE) ‖ header (canonical JSON) ‖ chunk_0 ‖ … ‖ chunk_{n-1}

The header is plaintext but authenticated: every chunk's AAD carries the
header digest ``SHA-256(MAGIC ‖ header)``, the chunk index and a last-chunk
flag, and its nonce is ``base_nonce XOR index``. So truncation, reordering,
swapping chunks between models or versions, and header edits all fail
authentication. The chunk key is derived from the model key with HKDF over a
random per-container salt and the model id and version, so reusing a model key
for two versions still gives independent keys.

The *plaintext payload* that the chunks carry is::

    manifest_len (u32 BE) ‖ manifest (canonical JSON) ‖ graph (ONNX, weights external) ‖ weights

The manifest lists every weight tensor with its offset and length inside the
payload (ONNX external-data layout, 64-byte aligned), so a runtime can decrypt
one layer at a time. Unlike the design's first sketch, the tensor index lives
in the *encrypted* manifest rather than the plaintext header: tensor names and
shapes describe the architecture, which an owner may consider confidential
(docs/decisions/0002-encrypted-tensor-index.md).

The graph is the owner's, and the runtime does not trust owners either: a
tensor that keeps an ONNX external-data reference would make ONNX Runtime read
that file from the runtime's disk (relative to its working directory) into the
model — a way to read, for example, a platform's key files through a model's
outputs. Only the top-level initializers the manifest lists may refer to
external data, and only to :data:`EXTERNAL_LOCATION` (this container); any
other reference — in an initializer, a sparse initializer, a ``Constant`` or
other tensor attribute, a subgraph or a function — is refused
(:func:`check_external_data`), in both the whole-model and the memory-bounded paths.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto

from sealedml._internal.encoding import canonical_json, fields, loads_json
from sealedml.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    aead_decrypt,
    aead_encrypt,
    derive_nonce,
    hkdf_sha256,
    random_bytes,
)
from sealedml.crypto.aead import aead_decrypt_into
from sealedml.envelope.external_data import EXTERNAL_LOCATION, check_external_data
from sealedml.envelope.request import ID_PATTERN
from sealedml.envelope.sealing import OnnxPayload, Progress, rechunk, sha256_of
from sealedml.errors import CryptoError, SealedModelError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "EXTERNAL_LOCATION",
    "FILE_FORMAT_VERSION",
    "FILE_PAYLOADS",
    "MAGIC",
    "PART_FORMAT_VERSION",
    "SEALED_PARTS",
    "TFLITE_MAGIC",
    "BytesPayload",
    "Manifest",
    "OpenedModel",
    "SealedModelHeader",
    "SealedModelReader",
    "TensorEntry",
    "check_external_data",
    "check_part",
    "is_tflite",
    "open_model",
    "open_model_weights",
    "open_tflite",
    "read_header",
    "seal_model",
    "seal_tflite",
    "write_sealed",
]

MAGIC = b"SMLMDL\x00\x01"
FORMAT_VERSION = 1
#: Containers of one part of a partitioned model (``sealedml partition``): the header also names
#: the part and the SHA-256 of the partition manifest. A runtime that predates partitioning
#: refuses them (an unknown format) instead of serving a front part as if it were the model.
PART_FORMAT_VERSION = 2
#: Containers whose payload is a whole model file of another kind than ONNX, named by the
#: header's ``payload`` field (today ``"tflite"``: a TensorFlow Lite FlatBuffer, unmodified).
#: Runtimes that predate it refuse it as an unknown format instead of misreading it.
FILE_FORMAT_VERSION = 3
#: Payload kinds of :data:`FILE_FORMAT_VERSION` containers.
FILE_PAYLOADS = ("tflite",)
_HEADER_FIELDS = frozenset(
    {
        "format",
        "model_id",
        "model_version",
        "plaintext_sha256",
        "plaintext_length",
        "chunk_size",
        "n_chunks",
        "salt",
        "base_nonce",
    }
)
_PART_FIELDS = frozenset({"part", "partition_sha256"})
_FILE_FIELDS = frozenset({"payload"})
#: The parts of a partitioned model that are sealed (the middle runs outside the TEE, in the clear).
SEALED_PARTS = ("front", "middle", "back")  # "middle": sealed only in a blinded partition
DEFAULT_CHUNK_SIZE = 256 * 1024
_MAX_HEADER = 64 * 1024
_MAX_MANIFEST = 64 * 1024 * 1024
_KEY_LABEL = b"sealedml/v1/model-chunk-key"
_AAD_LABEL = b"sealedml/v1/model-chunk"
_ID = re.compile(ID_PATTERN)


@dataclass(frozen=True)
class SealedModelHeader:
    """The parsed plaintext header of a sealed model."""

    model_id: str
    model_version: int
    plaintext_sha256: str
    plaintext_length: int
    chunk_size: int
    n_chunks: int
    salt: bytes
    base_nonce: bytes
    raw: bytes
    part: str | None = None
    partition_sha256: str | None = None
    payload: str = "onnx"  # what the plaintext is: "onnx" (manifest, graph, weights) or a file kind

    @property
    def digest(self) -> bytes:
        """SHA-256 over magic and header bytes; bound into every chunk's AAD."""
        return hashlib.sha256(MAGIC + self.raw).digest()

    @property
    def data_offset(self) -> int:
        """Where the first chunk starts in the file."""
        return len(MAGIC) + 4 + len(self.raw)

    @property
    def sealed_length(self) -> int:
        """Exact size of the whole container."""
        return self.data_offset + self.plaintext_length + self.n_chunks * TAG_SIZE

    @classmethod
    def parse(cls, prefix: bytes) -> SealedModelHeader:
        """Parse the header from the first bytes of a container.

        Raises:
            SealedModelError: bad magic, truncated or malformed header.
        """
        if len(prefix) < len(MAGIC) + 4 or prefix[: len(MAGIC)] != MAGIC:
            raise SealedModelError("not a sealed model (bad magic)")
        length = int.from_bytes(prefix[len(MAGIC) : len(MAGIC) + 4], "big")
        if length > _MAX_HEADER:
            raise SealedModelError("sealed model header too large")
        raw = prefix[len(MAGIC) + 4 : len(MAGIC) + 4 + length]
        if len(raw) != length:
            raise SealedModelError("sealed model truncated in header")
        try:
            doc = loads_json(raw)
            if (
                not isinstance(doc, dict)
                or doc.get("format") not in (FORMAT_VERSION, PART_FORMAT_VERSION, FILE_FORMAT_VERSION)
                or type(doc["format"]) is not int
            ):
                raise SealedModelError("unsupported sealed model format")
            is_part = doc["format"] == PART_FORMAT_VERSION
            is_file = doc["format"] == FILE_FORMAT_VERSION
            extra = _PART_FIELDS if is_part else _FILE_FIELDS if is_file else frozenset()
            if set(doc) != _HEADER_FIELDS | extra:
                # No field a reader would ignore: a whole model's header cannot carry part fields.
                raise ValueError("unexpected or missing header fields")
            header = cls(
                model_id=_typed(doc["model_id"], str),
                model_version=_typed(doc["model_version"], int),
                plaintext_sha256=_typed(doc["plaintext_sha256"], str),
                plaintext_length=_typed(doc["plaintext_length"], int),
                chunk_size=_typed(doc["chunk_size"], int),
                n_chunks=_typed(doc["n_chunks"], int),
                salt=bytes.fromhex(_typed(doc["salt"], str)),
                base_nonce=bytes.fromhex(_typed(doc["base_nonce"], str)),
                raw=raw,
                part=_typed(doc["part"], str) if is_part else None,
                partition_sha256=_typed(doc["partition_sha256"], str) if is_part else None,
                payload=_typed(doc["payload"], str) if is_file else "onnx",
            )
        except SealedModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SealedModelError("malformed sealed model header") from exc
        if canonical_json(doc) != raw:
            raise SealedModelError("sealed model header is not canonical")
        expected_chunks = max(1, -(-header.plaintext_length // header.chunk_size)) if header.chunk_size > 0 else -1
        if not _ID.match(header.model_id):
            raise SealedModelError("invalid model id in sealed model header")
        if header.part is not None and (
            header.part not in SEALED_PARTS or not re.fullmatch(r"[0-9a-f]{64}", header.partition_sha256 or "")
        ):
            raise SealedModelError("invalid partition part in sealed model header")
        if header.payload != "onnx" and header.payload not in FILE_PAYLOADS:
            raise SealedModelError("unknown payload kind in sealed model header")
        if (
            header.chunk_size <= 0
            or not 1 <= header.model_version < 2**63
            or not 0 <= header.plaintext_length < 2**62
            or header.n_chunks != expected_chunks
            or len(header.salt) != 32
            or len(header.base_nonce) != NONCE_SIZE
        ):
            raise SealedModelError("inconsistent sealed model header")
        return header


@dataclass(frozen=True)
class TensorEntry:
    """Where one weight tensor lives in the plaintext payload."""

    name: str
    offset: int
    length: int
    data_type: int
    dims: tuple[int, ...]

    def to_array(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """View ``data`` (this tensor's bytes) as a numpy array."""
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.data_type)
        return np.frombuffer(data, dtype=dtype).reshape(self.dims)


@dataclass(frozen=True)
class Manifest:
    """The encrypted table of contents of a sealed model."""

    graph_offset: int
    graph_length: int
    tensors: tuple[TensorEntry, ...]

    def tensor(self, name: str) -> TensorEntry:
        """The entry named ``name``.

        Raises:
            SealedModelError: no such tensor.
        """
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise SealedModelError(f"no weight tensor named {name!r}")


def _typed(value: Any, kind: type) -> Any:
    # Exact types: bool is an int in Python, and "1" or 1.5 are not versions.
    if type(value) is not kind:
        raise TypeError(f"expected {kind.__name__}")
    return value


def _parse_manifest(doc: Any, payload_length: int) -> Manifest:
    """Validate a decoded manifest: types, dtypes, ranges inside the payload, sizes matching shapes."""
    graph = doc["graph"]
    manifest = Manifest(
        graph_offset=_typed(graph["offset"], int),
        graph_length=_typed(graph["length"], int),
        tensors=tuple(
            TensorEntry(
                name=_typed(t["name"], str),
                offset=_typed(t["offset"], int),
                length=_typed(t["length"], int),
                data_type=_typed(t["data_type"], int),
                dims=tuple(_typed(d, int) for d in t["dims"]),
            )
            for t in doc["tensors"]
        ),
    )
    spans = [(manifest.graph_offset, manifest.graph_length)] + [(t.offset, t.length) for t in manifest.tensors]
    for offset, length in spans:
        if offset < 0 or length < 0 or offset + length > payload_length:
            raise ValueError("manifest range outside the payload")
    for t in manifest.tensors:
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError) as exc:
            raise ValueError(f"unsupported tensor data type {t.data_type}") from exc
        if any(d < 0 for d in t.dims) or int(np.prod(t.dims, dtype=np.int64)) * itemsize != t.length:
            raise ValueError(f"tensor {t.name!r}: shape does not match its length")
    return manifest


def _content_key(model_key: bytes, header: SealedModelHeader) -> bytes:
    if len(model_key) != KEY_SIZE:
        raise SealedModelError("model key must be 32 bytes")
    info = fields(_KEY_LABEL, header.model_id, header.model_version)
    return hkdf_sha256(model_key, salt=header.salt, info=info)


def _chunk_aad(header_digest: bytes, index: int, last: bool) -> bytes:
    return fields(_AAD_LABEL, header_digest, index, int(last))


def seal_model(
    model: onnx.ModelProto | bytes,
    *,
    model_id: str,
    model_version: int,
    model_key: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    part: str | None = None,
    partition_sha256: str | None = None,
    progress: Progress | None = None,
) -> bytes:
    """Seal an ONNX model into a container (in memory; :func:`write_sealed` streams one to a file).

    Args:
        model: the model (a ``ModelProto`` or its serialized bytes), weights inline.
        model_id: the owner's identifier for the model.
        model_version: a positive version number.
        model_key: the 32-byte model key (one per model version is recommended).
        chunk_size: plaintext bytes per AES-GCM chunk.
        part: for one part of a partitioned model, ``"front"`` or ``"back"``.
        partition_sha256: with ``part``, the SHA-256 (hex) of the partition manifest.
        progress: told (plaintext bytes sealed, in all) as chunks are sealed.

    Returns:
        The sealed container bytes.

    Raises:
        SealedModelError: the model cannot be parsed or the arguments are invalid.
    """
    if isinstance(model, bytes | bytearray):
        try:
            model = onnx.ModelProto.FromString(bytes(model))
        except Exception as exc:  # protobuf DecodeError and friends
            raise SealedModelError("input is not an ONNX model") from exc
    if not isinstance(model, onnx.ModelProto):  # for type checkers: bytes were parsed above
        raise SealedModelError("input is not an ONNX model")
    if not 1024 <= chunk_size <= 64 * 1024 * 1024:
        raise SealedModelError("chunk size must be between 1 KiB and 64 MiB")
    if model_version < 1:
        raise SealedModelError("model version must be ≥ 1")
    try:
        check_external_data(model, ())
    except SealedModelError as exc:
        raise SealedModelError(f"{exc.message}: load the model with its data first (onnx.load)") from None
    if (part is None) != (partition_sha256 is None):
        raise SealedModelError("a partition part needs both its name and the partition digest")
    extra: dict[str, Any] = {} if part is None else {"part": part, "partition_sha256": partition_sha256}
    out = io.BytesIO()
    write_sealed(
        out,
        OnnxPayload.of_model(model),
        FORMAT_VERSION if part is None else PART_FORMAT_VERSION,
        extra,
        model_id=model_id,
        model_version=model_version,
        model_key=model_key,
        chunk_size=chunk_size,
        progress=progress,
    )
    return out.getvalue()


def seal_tflite(
    data: bytes,
    *,
    model_id: str,
    model_version: int,
    model_key: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """Seal an unmodified TensorFlow Lite model (its ``.tflite`` bytes) into a container.

    The payload is the file itself; the header records ``"payload": "tflite"`` so a runtime
    hands it to LiteRT, and refuses to read it as ONNX.

    Raises:
        SealedModelError: not a TFLite FlatBuffer, or invalid arguments.
    """
    if not is_tflite(data):
        raise SealedModelError("input is not a TFLite model (no TFL3 identifier)")
    if not 1024 <= chunk_size <= 64 * 1024 * 1024:
        raise SealedModelError("chunk size must be between 1 KiB and 64 MiB")
    if model_version < 1:
        raise SealedModelError("model version must be ≥ 1")
    out = io.BytesIO()
    write_sealed(
        out,
        BytesPayload(bytes(data)),
        FILE_FORMAT_VERSION,
        {"payload": "tflite"},
        model_id=model_id,
        model_version=model_version,
        model_key=model_key,
        chunk_size=chunk_size,
    )
    return out.getvalue()


class BytesPayload:
    """A payload already in memory (a TFLite file): one piece."""

    def __init__(self, data: bytes) -> None:
        self.data, self.length = data, len(data)

    def pieces(self) -> Iterator[bytes]:
        yield self.data


def write_sealed(
    out: BinaryIO,
    payload: OnnxPayload | BytesPayload,
    format_version: int,
    extra: dict[str, Any],
    *,
    model_id: str,
    model_version: int,
    model_key: bytes,
    chunk_size: int,
    progress: Progress | None = None,
) -> None:
    """Write the header, then the payload in authenticated chunks (the module docstring's layout), to ``out``.

    The payload is read twice, piece by piece: for the SHA-256 the header names, then to
    encrypt; memory holds one tensor and one chunk at a time, never the whole container.
    """
    n_chunks = max(1, -(-payload.length // chunk_size))
    doc: dict[str, Any] = {
        "format": format_version,
        "model_id": model_id,
        "model_version": model_version,
        "plaintext_sha256": sha256_of(payload.pieces()),
        "plaintext_length": payload.length,
        "chunk_size": chunk_size,
        "n_chunks": n_chunks,
        "salt": random_bytes(32).hex(),
        "base_nonce": random_bytes(NONCE_SIZE).hex(),
        **extra,
    }
    raw = canonical_json(doc)
    header = SealedModelHeader.parse(MAGIC + len(raw).to_bytes(4, "big") + raw)
    key = _content_key(model_key, header)
    out.write(MAGIC + len(raw).to_bytes(4, "big") + raw)
    digest, done = header.digest, 0
    chunks = rechunk(payload.pieces(), chunk_size) if payload.length else iter([b""])
    for index, chunk in enumerate(chunks):
        nonce = derive_nonce(header.base_nonce, index)
        out.write(aead_encrypt(key, nonce, chunk, _chunk_aad(digest, index, index == n_chunks - 1)))
        done += len(chunk)
        if progress is not None:
            progress(done, payload.length)


class SealedModelReader:
    """Random-access, authenticated reads from a sealed model.

    Decrypts only the chunks that cover a requested range, so one tensor (one
    layer) can be decrypted at a time. Every chunk is authenticated before any
    of its bytes are returned.
    """

    def __init__(self, source: bytes | Path | str, model_key: bytes) -> None:
        """Open ``source`` (container bytes or a file path) with ``model_key``.

        Raises:
            SealedModelError: malformed header, truncated or extended container.
        """
        self._file: BinaryIO | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self._data: bytes | None = bytes(source)
            size = len(self._data)
            prefix = self._data[: len(MAGIC) + 4 + _MAX_HEADER]
        else:
            self._data = None
            self._file = open(source, "rb")
            size = os.fstat(self._file.fileno()).st_size
            prefix = self._file.read(len(MAGIC) + 4 + _MAX_HEADER)
        try:
            self.header = SealedModelHeader.parse(prefix)
            if size != self.header.sealed_length:
                raise SealedModelError(
                    "sealed model truncated" if size < self.header.sealed_length else "sealed model has trailing data"
                )
            self._key = _content_key(model_key, self.header)
        except BaseException:
            self.close()
            raise
        self._digest = self.header.digest
        self._manifest: Manifest | None = None

    def close(self) -> None:
        """Release the file handle (if any)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SealedModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ciphertext(self, index: int) -> bytes:
        h = self.header
        start = h.data_offset + index * (h.chunk_size + TAG_SIZE)
        plain_len = min(h.chunk_size, h.plaintext_length - index * h.chunk_size)
        length = plain_len + TAG_SIZE
        if self._data is not None:
            return self._data[start : start + length]
        if self._file is None:
            raise SealedModelError("reader is closed")
        return os.pread(self._file.fileno(), length, start)

    def _sealed_chunk(self, index: int) -> tuple[bytes, bytes, bytes]:
        """Nonce, AAD and ciphertext ‖ tag of chunk ``index``."""
        h = self.header
        if not 0 <= index < h.n_chunks:
            raise SealedModelError("chunk index out of range")
        nonce = derive_nonce(h.base_nonce, index)
        return nonce, _chunk_aad(self._digest, index, index == h.n_chunks - 1), self._ciphertext(index)

    def chunk(self, index: int) -> bytes:
        """Decrypt and authenticate chunk ``index``.

        Raises:
            SealedModelError: the chunk fails authentication (tampered, moved,
                from another model or version, or the wrong key).
        """
        nonce, aad, ciphertext = self._sealed_chunk(index)
        try:
            return aead_decrypt(self._key, nonce, ciphertext, aad)
        except CryptoError as exc:
            raise SealedModelError(f"sealed model chunk {index} failed authentication") from exc

    def chunk_into(self, index: int, out: memoryview) -> int:
        """Decrypt and authenticate chunk ``index`` into the front of ``out``.

        For callers that must be able to wipe the plaintext afterwards (an immutable
        ``bytes`` from :meth:`chunk` lingers in freed memory until reused).

        Args:
            index: the chunk.
            out: a writable byte buffer of at least the header's chunk size.

        Returns:
            The chunk's plaintext length (the last chunk may be short).

        Raises:
            SealedModelError: the index is out of range, or the chunk fails
                authentication (``out`` then holds no unauthenticated plaintext).
        """
        nonce, aad, ciphertext = self._sealed_chunk(index)
        try:
            return aead_decrypt_into(self._key, nonce, ciphertext, aad, out[: len(ciphertext) - TAG_SIZE])
        except CryptoError as exc:
            raise SealedModelError(f"sealed model chunk {index} failed authentication") from exc

    def read(self, offset: int, length: int) -> bytes:
        """Decrypt plaintext bytes ``[offset, offset + length)`` of the payload."""
        h = self.header
        if offset < 0 or length < 0 or offset + length > h.plaintext_length:
            raise SealedModelError("range outside the sealed payload")
        if length == 0:
            return b""
        first, last = offset // h.chunk_size, (offset + length - 1) // h.chunk_size
        buf = b"".join(self.chunk(i) for i in range(first, last + 1))
        start = offset - first * h.chunk_size
        return buf[start : start + length]

    def iter_chunks(self) -> Iterator[bytes]:
        """Every chunk in order, authenticated."""
        for index in range(self.header.n_chunks):
            yield self.chunk(index)

    @property
    def manifest(self) -> Manifest:
        """The decrypted manifest (tensor index)."""
        if self._manifest is None:
            length = int.from_bytes(self.read(0, 4), "big")
            if length > min(_MAX_MANIFEST, self.header.plaintext_length - 4):
                raise SealedModelError("malformed manifest")
            try:
                doc = loads_json(self.read(4, length))
                manifest = _parse_manifest(doc, self.header.plaintext_length)
            except ValueError as exc:
                raise SealedModelError(f"malformed manifest: {exc}") from exc
            except (KeyError, TypeError, AttributeError) as exc:
                raise SealedModelError("malformed manifest") from exc
            self._manifest = manifest
        return self._manifest

    def graph(self) -> onnx.ModelProto:
        """The ONNX graph with weights still external (pointing into this container).

        Raises:
            SealedModelError: not an ONNX model, or a tensor refers to external data
                outside this container (:func:`check_external_data`).
        """
        m = self.manifest
        try:
            graph: onnx.ModelProto = onnx.ModelProto.FromString(self.read(m.graph_offset, m.graph_length))
        except Exception as exc:  # protobuf errors: authenticated but not ONNX
            raise SealedModelError("sealed payload is not an ONNX model") from exc
        check_external_data(graph, {t.name for t in m.tensors})
        return graph

    def tensor(self, name: str) -> np.ndarray:
        """Decrypt one weight tensor."""
        entry = self.manifest.tensor(name)
        return entry.to_array(self.read(entry.offset, entry.length))

    def read_all(self) -> bytearray:
        """Decrypt and authenticate the whole payload, each chunk in place in one buffer. The header's
        ``plaintext_sha256`` is not recomputed: the chunk tags bind it (decision 0015)."""
        h = self.header
        payload = bytearray(h.plaintext_length)
        view = memoryview(payload)
        for index in range(h.n_chunks):
            self.chunk_into(index, view[index * h.chunk_size :])
        view.release()
        return payload


def check_part(header: SealedModelHeader, expected: str | None) -> None:
    """Refuse a container that is not the expected part (``None``: a whole model).

    Raises:
        SealedModelError: a part where a whole model was expected, or another part.
    """
    if header.part != expected:
        found = f"the {header.part} part of a partitioned model" if header.part else "a whole model"
        wanted = f"the {expected} part" if expected else "a whole model"
        raise SealedModelError(f"sealed model is {found}, expected {wanted}")


_KIND_NAMES = {"tflite": "TFLite", "onnx": "ONNX"}
#: The FlatBuffers file identifier of a TFLite model, at bytes 4–8.
TFLITE_MAGIC = b"TFL3"


def is_tflite(data: bytes) -> bool:
    """Whether ``data`` starts like a TFLite FlatBuffer."""
    return len(data) >= 8 and data[4:8] == TFLITE_MAGIC


def _check_identity(header: SealedModelHeader, model_id: str | None, version: int | None) -> None:
    if model_id is not None and header.model_id != model_id:
        raise SealedModelError("sealed model is for another model id")
    if version is not None and header.model_version != version:
        raise SealedModelError("sealed model is another version")


def open_tflite(
    source: bytes | Path | str,
    model_key: bytes,
    *,
    expected_model_id: str | None = None,
    expected_version: int | None = None,
) -> bytes:
    """Decrypt and verify a sealed TFLite model; return its ``.tflite`` bytes (in memory only).

    Raises:
        SealedModelError: any authentication, integrity or identity failure, or another payload.
    """
    with SealedModelReader(source, model_key) as reader:
        _check_identity(reader.header, expected_model_id, expected_version)
        if reader.header.payload != "tflite":
            raise SealedModelError(f"sealed model is an {_KIND_NAMES[reader.header.payload]} model, not TFLite")
        return bytes(reader.read_all())


def read_header(path: Path | str) -> SealedModelHeader:
    """The plaintext header of the container at ``path`` (not authenticated until a chunk is read).

    Raises:
        SealedModelError: not a sealed model.
    """
    with open(path, "rb") as fh:
        return SealedModelHeader.parse(fh.read(len(MAGIC) + 4 + _MAX_HEADER))


@dataclass(frozen=True, repr=False)
class OpenedModel:
    """A decrypted, verified whole model: its graph (large weights still external) and each large weight
    as a read-only view of ``payload`` for ``SessionOptions.add_external_initializers`` (no copy)."""

    graph: onnx.ModelProto
    weights: dict[str, np.ndarray]
    payload: bytearray


def open_model_weights(
    source: bytes | Path | str,
    model_key: bytes,
    *,
    expected_model_id: str | None = None,
    expected_version: int | None = None,
    expected_part: str | None = None,
) -> OpenedModel:
    """Decrypt and verify a whole sealed model; return its graph and weights apart.

    Args:
        source: container bytes or path.
        model_key: the model key.
        expected_model_id: refuse a container for another model.
        expected_version: refuse a container of another version.
        expected_part: the partition part expected (``None``: a whole model; a
            part container is then refused, and vice versa).

    Raises:
        SealedModelError: any authentication, integrity or identity failure.
    """
    with SealedModelReader(source, model_key) as reader:
        h = reader.header
        _check_identity(h, expected_model_id, expected_version)
        if h.payload != "onnx":
            raise SealedModelError(f"sealed model is a {_KIND_NAMES.get(h.payload, h.payload)} model, not ONNX")
        check_part(h, expected_part)
        payload = reader.read_all()
        # The payload is authenticated; parse it from memory.
        length = int.from_bytes(payload[:4], "big")
        try:
            manifest = _parse_manifest(loads_json(bytes(payload[4 : 4 + length])), len(payload))
            model: onnx.ModelProto = onnx.ModelProto.FromString(
                bytes(payload[manifest.graph_offset : manifest.graph_offset + manifest.graph_length])
            )
        except Exception as exc:  # malformed JSON, manifest or protobuf: authenticated but unusable
            raise SealedModelError("malformed sealed payload") from exc
    entries = {t.name: t for t in manifest.tensors}
    # Only top-level initializers held by this container may be external (refused otherwise),
    # so once each of them is given its array nothing is left to read from anywhere.
    check_external_data(model, entries)
    weights: dict[str, np.ndarray] = {}
    for init in model.graph.initializer:
        if init.name in entries and init.data_location == TensorProto.EXTERNAL:
            entry = entries[init.name]
            array = entry.to_array(memoryview(payload)[entry.offset : entry.offset + entry.length])
            if array.dtype.kind in "iub" or array.size <= 64:  # shapes, axes, scalars: ONNX's shape
                _inline(init, array)  # inference reads them, and only from inside the graph
            else:
                array.flags.writeable = False  # ONNX Runtime reads it in place; nothing else may write it
                weights[init.name] = array
    return OpenedModel(model, weights, payload)


def _inline(init: TensorProto, array: np.ndarray) -> None:
    del init.external_data[:]
    init.data_location = TensorProto.DEFAULT
    init.raw_data = array.tobytes()


def open_model(
    source: bytes | Path | str,
    model_key: bytes,
    *,
    expected_model_id: str | None = None,
    expected_version: int | None = None,
    expected_part: str | None = None,
) -> onnx.ModelProto:
    """Decrypt and verify a whole sealed model; return it with weights inline (arguments as
    :func:`open_model_weights`).

    Raises:
        SealedModelError: any authentication, integrity or identity failure.
    """
    opened = open_model_weights(
        source,
        model_key,
        expected_model_id=expected_model_id,
        expected_version=expected_version,
        expected_part=expected_part,
    )
    model = opened.graph
    for init in model.graph.initializer:
        if init.name in opened.weights:
            _inline(init, opened.weights[init.name])
    check_external_data(model, ())  # inlined: nothing may refer to external data any more
    return model
