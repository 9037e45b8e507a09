"""Negative matrix of the sealed model container: every attack must end in ``SealedModelError``.

DESIGN §crypto: chunks are AES-256-GCM with nonce = base ⊕ index and AAD =
(header digest, index, last flag); the chunk key is HKDF(model key, salt,
model id ‖ version). So truncation, extension, reordering, splicing between
models or versions, header edits and a wrong key all fail authentication.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml._internal.encoding import canonical_json
from sealedml.crypto import TAG_SIZE, aead_encrypt, derive_nonce
from sealedml.envelope import model_container as mc
from sealedml.envelope.model_container import (
    MAGIC,
    SealedModelHeader,
    SealedModelReader,
    open_model,
    seal_model,
)
from sealedml.errors import SealedModelError
from tests.constants import MODEL_KEY
from tests.constants import OTHER_MODEL_KEY as OTHER_KEY

CHUNK = 1024


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """About 30 KiB of weights: ~30 chunks of 1 KiB."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y0"]),
            helper.make_node("Add", ["y0", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((96, 10)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@dataclass(frozen=True)
class Split:
    """A container cut into its parts, as an attacker with the file sees it."""

    header: SealedModelHeader
    chunks: tuple[bytes, ...]

    @property
    def doc(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.header.raw)
        return doc


def split(sealed: bytes) -> Split:
    header = SealedModelHeader.parse(sealed)
    chunks = []
    for i in range(header.n_chunks):
        start = header.data_offset + i * (header.chunk_size + TAG_SIZE)
        size = min(header.chunk_size, header.plaintext_length - i * header.chunk_size) + TAG_SIZE
        chunks.append(sealed[start : start + size])
    assert header.data_offset + sum(map(len, chunks)) == len(sealed)
    return Split(header, tuple(chunks))


def join(raw_header: bytes, chunks: list[bytes] | tuple[bytes, ...]) -> bytes:
    return MAGIC + len(raw_header).to_bytes(4, "big") + raw_header + b"".join(chunks)


def with_header(doc: dict[str, object]) -> bytes:
    return canonical_json(doc)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return mlp_model()


@pytest.fixture(scope="module")
def sealed(model: onnx.ModelProto) -> bytes:
    return seal_model(model, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=CHUNK)


@pytest.fixture(scope="module")
def parts(sealed: bytes) -> Split:
    parts = split(sealed)
    assert parts.header.n_chunks >= 20  # the matrix below needs many chunks
    return parts


def assert_rejected(data: bytes, key: bytes = MODEL_KEY, match: str = "failed authentication") -> None:
    """Opening fails with ``SealedModelError`` whose message matches ``match``, and so does read_all."""
    with pytest.raises(SealedModelError, match=match):
        open_model(data, key)
    with pytest.raises(SealedModelError, match=match):
        with SealedModelReader(data, key) as reader:
            reader.read_all()


def test_untampered_container_opens(sealed: bytes, parts: Split) -> None:
    """Control: the helpers reassemble a valid container, which opens."""
    rebuilt = join(parts.header.raw, parts.chunks)
    assert rebuilt == sealed
    assert open_model(rebuilt, MODEL_KEY).graph.name == "mlp"
    assert join(with_header(parts.doc), parts.chunks) == sealed


# -- chunk tampering --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["first", "second", "middle", "penultimate", "last"])
@pytest.mark.parametrize("where", ["first-byte", "middle-byte", "last-ciphertext-byte", "tag"])
def test_sealed_model_rejects_tampered_chunk(parts: Split, which: str, where: str) -> None:
    n = parts.header.n_chunks
    index = {"first": 0, "second": 1, "middle": n // 2, "penultimate": n - 2, "last": n - 1}[which]
    chunk = bytearray(parts.chunks[index])
    position = {
        "first-byte": 0,
        "middle-byte": len(chunk) // 2,
        "last-ciphertext-byte": len(chunk) - TAG_SIZE - 1,
        "tag": len(chunk) - 1,
    }[where]
    chunk[position] ^= 0x01
    chunks = list(parts.chunks)
    chunks[index] = bytes(chunk)
    data = join(parts.header.raw, chunks)
    with SealedModelReader(data, MODEL_KEY) as reader:
        with pytest.raises(SealedModelError, match=f"chunk {index} failed authentication"):
            reader.chunk(index)
        # Only the tampered chunk is affected: its neighbours still authenticate.
        for neighbour in {max(0, index - 1), min(n - 1, index + 1)} - {index}:
            assert len(reader.chunk(neighbour)) > 0
    assert_rejected(data)


def test_sealed_model_rejects_tampered_chunk_in_random_access(parts: Split) -> None:
    """A layer read (reader.tensor) authenticates the chunks it touches."""
    with SealedModelReader(join(parts.header.raw, parts.chunks), MODEL_KEY) as reader:
        entry = reader.manifest.tensor("w1")
    target = (entry.offset + entry.length // 2) // CHUNK
    chunks = list(parts.chunks)
    chunks[target] = bytes([chunks[target][0] ^ 0xFF]) + chunks[target][1:]
    with SealedModelReader(join(parts.header.raw, chunks), MODEL_KEY) as reader:
        np.testing.assert_array_equal(reader.tensor("b2"), reader.tensor("b2"))  # untouched chunks still fine
        with pytest.raises(SealedModelError, match=f"chunk {target} failed authentication"):
            reader.tensor("w1")


# -- truncation and extension ------------------------------------------------------------------


def test_sealed_model_rejects_truncated_model(sealed: bytes, parts: Split) -> None:
    # Drop the last chunk, the last tag, the last byte, half the chunks.
    for data in (
        join(parts.header.raw, parts.chunks[:-1]),
        sealed[:-TAG_SIZE],
        sealed[:-1],
        join(parts.header.raw, parts.chunks[: len(parts.chunks) // 2]),
    ):
        assert_rejected(data, match="truncated")
    # Cut inside the header, or before the header length is complete.
    for keep in (parts.header.data_offset - 1, len(MAGIC) + 4 + 10, len(MAGIC) + 4):
        assert_rejected(sealed[:keep], match="truncated in header")
    for keep in (0, 1, len(MAGIC), len(MAGIC) + 3):
        assert_rejected(sealed[:keep], match="bad magic")


def test_sealed_model_rejects_truncated_model_with_rewritten_header(parts: Split) -> None:
    """Dropping the last chunk and fixing the header's lengths still fails: the digest is in every AAD."""
    doc = parts.doc
    doc["plaintext_length"] = parts.header.plaintext_length - (len(parts.chunks[-1]) - TAG_SIZE)
    doc["n_chunks"] = parts.header.n_chunks - 1
    data = join(with_header(doc), parts.chunks[:-1])
    assert SealedModelHeader.parse(data).sealed_length == len(data)  # consistent to the parser
    assert_rejected(data)


def test_sealed_model_rejects_extended_model(sealed: bytes, parts: Split) -> None:
    for extra in (b"\x00", bytes(TAG_SIZE), parts.chunks[0], parts.chunks[-1]):
        assert_rejected(sealed + extra, match="trailing data")


def test_sealed_model_rejects_extended_model_with_rewritten_header(parts: Split) -> None:
    """Appending a copy of the last chunk and fixing the header fails authentication."""
    doc = parts.doc
    # Insert a copy of a full-size chunk before the last one, so the layout stays consistent.
    chunks = [*parts.chunks[:-1], parts.chunks[-2], parts.chunks[-1]]
    doc["plaintext_length"] = parts.header.plaintext_length + CHUNK
    doc["n_chunks"] = parts.header.n_chunks + 1
    data = join(with_header(doc), chunks)
    assert SealedModelHeader.parse(data).sealed_length == len(data)
    assert_rejected(data)


# -- reordering and splicing ------------------------------------------------------------------


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 5), (3, -2)])
def test_sealed_model_rejects_reordered_chunks(parts: Split, i: int, j: int) -> None:
    chunks = list(parts.chunks)
    j = j % len(chunks)
    assert len(chunks[i]) == len(chunks[j]) == CHUNK + TAG_SIZE  # equal size: the file layout is unchanged
    chunks[i], chunks[j] = chunks[j], chunks[i]
    data = join(parts.header.raw, chunks)
    with SealedModelReader(data, MODEL_KEY) as reader:
        for index in (i, j):
            with pytest.raises(SealedModelError, match=f"chunk {index} failed authentication"):
                reader.chunk(index)
    assert_rejected(data)


@pytest.mark.parametrize("index", [0, 7, -1])
def test_sealed_model_rejects_chunk_from_another_model(model: onnx.ModelProto, parts: Split, index: int) -> None:
    # Same key, same chunk size, same version, same weights: only the model id differs.
    other = split(seal_model(model, model_id="mlp-copy", model_version=1, model_key=MODEL_KEY, chunk_size=CHUNK))
    assert len(other.chunks) == len(parts.chunks)
    chunks = list(parts.chunks)
    chunks[index] = other.chunks[index]
    assert_rejected(join(parts.header.raw, chunks))


@pytest.mark.parametrize("index", [0, 7, -1])
def test_sealed_model_rejects_chunk_from_another_version(model: onnx.ModelProto, parts: Split, index: int) -> None:
    other = split(seal_model(model, model_id="mlp", model_version=2, model_key=MODEL_KEY, chunk_size=CHUNK))
    assert len(other.chunks) == len(parts.chunks)
    chunks = list(parts.chunks)
    chunks[index] = other.chunks[index]
    assert_rejected(join(parts.header.raw, chunks))


def test_sealed_model_rejects_chunk_from_another_seal_of_same_version(model: onnx.ModelProto, parts: Split) -> None:
    """Even a re-seal of the very same model id, version and weights does not mix: fresh salt and nonce."""
    other = split(seal_model(model, model_id="mlp", model_version=1, model_key=MODEL_KEY, chunk_size=CHUNK))
    chunks = list(parts.chunks)
    chunks[3] = other.chunks[3]
    assert_rejected(join(parts.header.raw, chunks))
    assert_rejected(join(other.header.raw, parts.chunks))


def test_sealed_model_rejects_header_of_another_version(model: onnx.ModelProto, parts: Split) -> None:
    """Rollback/mix: version 2's header over version 1's chunks."""
    other = split(seal_model(model, model_id="mlp", model_version=2, model_key=MODEL_KEY, chunk_size=CHUNK))
    assert_rejected(join(other.header.raw, parts.chunks))


def test_sealed_model_rejects_wrong_model_key(sealed: bytes) -> None:
    with SealedModelReader(sealed, OTHER_KEY) as reader, pytest.raises(SealedModelError, match="chunk 0"):
        reader.chunk(0)
    assert_rejected(sealed, key=OTHER_KEY)
    one_bit_off = bytes([MODEL_KEY[0] ^ 1]) + MODEL_KEY[1:]
    assert_rejected(sealed, key=one_bit_off)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_sealed_model_rejects_model_key_of_wrong_size(sealed: bytes, size: int) -> None:
    assert_rejected(sealed, key=bytes(size), match="32 bytes")


# -- header tampering -----------------------------------------------------------------------


def _same_chunk_count_size(parts: Split) -> int:
    n, length = parts.header.n_chunks, parts.header.plaintext_length
    return next(c for c in range(CHUNK + 1, 2 * CHUNK) if -(-length // c) == n)


@pytest.mark.parametrize(
    "change",
    [
        "model_id-same-length",
        "model_id-longer",
        "model_version",
        "chunk_size",
        "plaintext_sha256",
        "salt",
        "base_nonce",
    ],
)
def test_sealed_model_rejects_tampered_header(parts: Split, change: str) -> None:
    doc = parts.doc
    if change == "model_id-same-length":
        doc["model_id"] = "mlq"
    elif change == "model_id-longer":
        doc["model_id"] = "mlp-premium"
    elif change == "model_version":
        doc["model_version"] = 2
    elif change == "chunk_size":
        doc["chunk_size"] = _same_chunk_count_size(parts)  # keeps n_chunks and the file size consistent
    elif change == "plaintext_sha256":
        doc["plaintext_sha256"] = "00" * 32
    elif change == "salt":
        doc["salt"] = "11" * 32
    else:
        doc["base_nonce"] = "22" * 12
    data = join(with_header(doc), parts.chunks)
    header = SealedModelHeader.parse(data)  # the edit is a well-formed, canonical header...
    assert header.sealed_length == len(data)
    assert_rejected(data)  # ...that no chunk authenticates against


def test_sealed_model_rejects_tampered_header_bytes(parts: Split) -> None:
    raw = bytearray(parts.header.raw)
    position = raw.index(b'"mlp"') + 1
    raw[position : position + 3] = b"MLP"
    assert_rejected(join(bytes(raw), parts.chunks))


def test_sealed_model_expected_model_id_mismatch(sealed: bytes) -> None:
    for expected in ("mlp2", "MLP", "", "ml"):
        with pytest.raises(SealedModelError, match="another model id"):
            open_model(sealed, MODEL_KEY, expected_model_id=expected)


def test_sealed_model_expected_version_mismatch(sealed: bytes) -> None:
    for expected in (0, 2, 10):
        with pytest.raises(SealedModelError, match="another version"):
            open_model(sealed, MODEL_KEY, expected_version=expected)


def test_sealed_model_rejects_rollback_to_older_version(model: onnx.ModelProto) -> None:
    """Serving an old version (same key) in place of the current one is refused."""
    old = seal_model(model, model_id="mlp", model_version=1, model_key=MODEL_KEY)
    with pytest.raises(SealedModelError, match="another version"):
        open_model(old, MODEL_KEY, expected_model_id="mlp", expected_version=2)


@pytest.mark.parametrize(
    "variant", ["spaces", "newline", "key-order", "duplicate-key", "unicode-unescaped", "trailing-space", "leading-bom"]
)
def test_sealed_model_rejects_non_canonical_header(parts: Split, variant: str) -> None:
    doc = parts.doc
    if variant == "spaces":
        raw = json.dumps(doc, sort_keys=True).encode()
    elif variant == "newline":
        raw = json.dumps(doc, sort_keys=True, indent=1).encode()
    elif variant == "key-order":
        raw = json.dumps(dict(reversed(sorted(doc.items()))), separators=(",", ":")).encode()
    elif variant == "duplicate-key":
        # json.loads keeps the last value: an ambiguous header must not parse.
        raw = parts.header.raw[:-1] + b',"model_id":"other"}'
    elif variant == "unicode-unescaped":
        doc["model_id"] = "mlp\u00e9"
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    elif variant == "trailing-space":
        raw = parts.header.raw + b" "
    else:
        raw = b"\xef\xbb\xbf" + parts.header.raw
    assert raw != canonical_json(doc)
    data = join(raw, parts.chunks)
    with pytest.raises(SealedModelError, match="not canonical"):
        SealedModelHeader.parse(data)
    assert_rejected(data, match="not canonical")


@pytest.mark.parametrize(
    "magic",
    [b"SMLMDL\x00\x02", b"SMLMDL\x01\x01", b"PK\x03\x04\x00\x00\x00\x00", b"\x08\x07\x12\x0csealedml", b"\x00" * 8],
)
def test_sealed_model_rejects_bad_magic(sealed: bytes, magic: bytes) -> None:
    assert_rejected(magic + sealed[len(MAGIC) :], match="bad magic")


def test_sealed_model_rejects_plain_onnx_file(model: onnx.ModelProto) -> None:
    assert_rejected(model.SerializeToString(), match="bad magic")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": 4}, "unsupported"),
        ({"format": 0}, "unsupported"),
        ({"format": 2}, "malformed"),  # a part container's format without the part fields
        ({"format": 3}, "malformed"),  # a model file's format without its payload kind
        ({"format": 3, "payload": "keras"}, "unknown payload"),
        ({"payload": "tflite"}, "malformed"),  # an ONNX container's format with a payload kind
        ({"format": "1"}, "unsupported"),
        ({"n_chunks": 1}, "inconsistent"),
        ({"n_chunks": 10**6}, "inconsistent"),
        ({"chunk_size": 0}, "inconsistent"),
        ({"chunk_size": -1024}, "inconsistent"),
        ({"plaintext_length": -1}, "inconsistent"),
        ({"salt": "00" * 16}, "inconsistent"),
        ({"base_nonce": "00" * 8}, "inconsistent"),
        ({"salt": "zz" * 32}, "malformed"),
        ({"base_nonce": None}, "malformed"),
        ({"chunk_size": "big"}, "malformed"),
        ({"model_version": None}, "malformed"),
        ({"n_chunks": [1]}, "malformed"),
    ],
)
def test_sealed_model_rejects_invalid_header_values(parts: Split, change: dict[str, object], match: str) -> None:
    doc = parts.doc
    doc.update(change)
    with pytest.raises(SealedModelError, match=match):
        SealedModelHeader.parse(join(with_header(doc), parts.chunks))


@pytest.mark.parametrize(
    "missing",
    [
        "format",
        "model_id",
        "model_version",
        "plaintext_sha256",
        "plaintext_length",
        "chunk_size",
        "n_chunks",
        "salt",
        "base_nonce",
    ],
)
def test_sealed_model_rejects_header_missing_field(parts: Split, missing: str) -> None:
    doc = parts.doc
    del doc[missing]
    with pytest.raises(SealedModelError):
        SealedModelHeader.parse(join(with_header(doc), parts.chunks))


@pytest.mark.parametrize("raw", [b"", b"null", b"[]", b"1", b'"x"', b"{", b"\xff\xfe"])
def test_sealed_model_rejects_header_that_is_not_an_object(raw: bytes) -> None:
    with pytest.raises(SealedModelError):
        SealedModelHeader.parse(join(raw, []))


def test_sealed_model_rejects_oversized_header_length(sealed: bytes) -> None:
    data = MAGIC + (64 * 1024 + 1).to_bytes(4, "big") + sealed[len(MAGIC) + 4 :]
    assert_rejected(data, match="too large")


# -- known bugs (typed errors only) ------------------------------------------------------------


@pytest.mark.parametrize("field", ["chunk_size", "plaintext_length", "model_version", "n_chunks"])
def test_sealed_model_header_with_infinity_rejected(parts: Split, field: str) -> None:
    doc = parts.doc
    doc[field] = float("inf")
    with pytest.raises(SealedModelError):
        SealedModelHeader.parse(join(with_header(doc), parts.chunks))


def test_sealed_model_header_deeply_nested_rejected() -> None:
    with pytest.raises(SealedModelError):
        SealedModelHeader.parse(join(b"[" * 20000 + b"]" * 20000, []))


@pytest.mark.parametrize("version", [2**63, -(2**63) - 1])
def test_sealed_model_header_with_out_of_range_version_rejected(parts: Split, version: int) -> None:
    doc = parts.doc
    doc["model_version"] = version
    data = join(with_header(doc), parts.chunks)
    with pytest.raises(SealedModelError):
        SealedModelReader(data, MODEL_KEY)


# -- an authenticated but malicious payload (the model owner is the adversary) ---------------


def seal_payload(payload: bytes, *, model_id: str = "evil", version: int = 1) -> bytes:
    """Seal an arbitrary payload with the real format (what a hostile key holder can produce)."""
    doc = {
        "format": 1,
        "model_id": model_id,
        "model_version": version,
        "plaintext_sha256": hashlib.sha256(payload).hexdigest(),
        "plaintext_length": len(payload),
        "chunk_size": CHUNK,
        "n_chunks": max(1, -(-len(payload) // CHUNK)),
        "salt": "ab" * 32,
        "base_nonce": "cd" * 12,
    }
    raw = canonical_json(doc)
    header = SealedModelHeader.parse(join(raw, []))
    key = mc._content_key(MODEL_KEY, header)
    chunks = []
    for i in range(header.n_chunks):
        aad = mc._chunk_aad(header.digest, i, i == header.n_chunks - 1)
        chunks.append(aead_encrypt(key, derive_nonce(header.base_nonce, i), payload[i * CHUNK : (i + 1) * CHUNK], aad))
    return join(raw, chunks)


def _payload(manifest: object, body: bytes = b"") -> bytes:
    mbytes = json.dumps(manifest).encode()
    return len(mbytes).to_bytes(4, "big") + mbytes + body


def test_seal_payload_helper_produces_valid_containers(sealed: bytes) -> None:
    """Control: re-sealing a genuine payload with the helper gives a container that opens."""
    with SealedModelReader(sealed, MODEL_KEY) as reader:
        payload = reader.read_all()
    opened = open_model(seal_payload(payload), MODEL_KEY)
    assert opened.graph.name == "mlp"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x00\x00", id="shorter-than-manifest-length"),
        pytest.param((10**6).to_bytes(4, "big") + b"{}", id="manifest-length-beyond-payload"),
        pytest.param(_payload([1, 2]), id="manifest-not-object"),
        pytest.param(_payload({"graph": {"offset": 0}}), id="manifest-missing-keys"),
        pytest.param(
            _payload({"graph": {"offset": 0, "length": 1}, "tensors": [{"name": "w"}]}), id="tensor-missing-keys"
        ),
        pytest.param(b"\x00\x00\x00\x04\xff\xfe\xfd\xfc", id="manifest-not-utf8"),
    ],
)
def test_malformed_manifest_rejected(payload: bytes) -> None:
    with (
        SealedModelReader(seal_payload(payload), MODEL_KEY) as reader,
        pytest.raises(SealedModelError, match=r"manifest|outside the sealed payload"),
    ):
        _ = reader.manifest
    with pytest.raises(SealedModelError):
        open_model(seal_payload(payload), MODEL_KEY)


def test_manifest_pointing_outside_payload_rejected() -> None:
    manifest = {
        "graph": {"offset": 0, "length": 10},
        "tensors": [{"name": "w", "offset": 10**6, "length": 16, "data_type": 1, "dims": [4]}],
    }
    with SealedModelReader(seal_payload(_payload(manifest)), MODEL_KEY) as reader:
        with pytest.raises(SealedModelError, match="outside"):
            reader.tensor("w")


def test_payload_graph_that_is_not_onnx_rejected() -> None:
    body = b"\xff" * 64
    manifest = {"graph": {"offset": 0, "length": 0}, "tensors": []}
    prefix = _payload(manifest)
    manifest["graph"] = {"offset": len(prefix) + 8, "length": len(body)}
    payload = _payload(manifest) + bytes(8) + body
    with SealedModelReader(seal_payload(payload), MODEL_KEY) as reader:
        with pytest.raises(SealedModelError, match="not an ONNX model"):
            reader.graph()
    with pytest.raises(SealedModelError, match="malformed sealed payload"):
        open_model(seal_payload(payload), MODEL_KEY)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"data_type": 9999, "dims": [4]}, id="unknown-data-type"),
        pytest.param({"data_type": 1, "dims": [5]}, id="dims-do-not-match-length"),
    ],
)
def test_manifest_entry_inconsistent_with_data_rejected(entry: dict[str, object]) -> None:
    manifest: dict[str, object] = {
        "graph": {"offset": 0, "length": 0},
        "tensors": [{"name": "w", "offset": 0, "length": 16, **entry}],
    }
    payload = _payload(manifest) + bytes(64)
    with SealedModelReader(seal_payload(payload), MODEL_KEY) as reader, pytest.raises(SealedModelError):
        reader.tensor("w")


# --- Parts of a partitioned model (format 2: the header names the part and the manifest digest) ---

DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def front(model: onnx.ModelProto) -> bytes:
    return seal_model(
        model,
        model_id="mlp",
        model_version=1,
        model_key=MODEL_KEY,
        chunk_size=CHUNK,
        part="front",
        partition_sha256=DIGEST,
    )


def test_a_part_container_opens_only_as_that_part(sealed: bytes, front: bytes) -> None:
    assert open_model(front, MODEL_KEY, expected_part="front").graph.name == "mlp"
    with pytest.raises(SealedModelError, match="is the front part of a partitioned model, expected a whole model"):
        open_model(front, MODEL_KEY)  # a front part served as if it were the model
    with pytest.raises(SealedModelError, match="expected the back part"):
        open_model(front, MODEL_KEY, expected_part="back")
    with pytest.raises(SealedModelError, match="is a whole model, expected the front part"):
        open_model(sealed, MODEL_KEY, expected_part="front")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"part": "side"}, "invalid partition part"),  # no such part (a blinded partition seals its middle)
        ({"partition_sha256": "AB" * 32}, "invalid partition part"),
        ({"partition_sha256": "ab" * 31}, "invalid partition part"),
        ({"part": None}, "malformed"),
        ({"partition_sha256": 7}, "malformed"),
        ({"format": 1}, "malformed"),  # a whole model's format with part fields
        ({"comment": "x"}, "malformed"),
    ],
)
def test_part_headers_with_invalid_values_are_refused(front: bytes, change: dict[str, object], match: str) -> None:
    parts = split(front)
    doc = parts.doc
    doc.update(change)
    with pytest.raises(SealedModelError, match=match):
        open_model(join(with_header(doc), parts.chunks), MODEL_KEY, expected_part="front")


@pytest.mark.parametrize(
    "change", [{"part": "back"}, {"partition_sha256": "cd" * 32}], ids=["front-relabelled-back", "other-partition"]
)
def test_relabelling_a_part_fails_authentication(front: bytes, change: dict[str, object]) -> None:
    """The header is bound into every chunk's AAD: a front cannot pass as the back, or as a part of another split."""
    parts = split(front)
    doc = parts.doc
    doc.update(change)
    expected = str(doc["part"])
    with pytest.raises(SealedModelError, match="failed authentication"):
        open_model(join(with_header(doc), parts.chunks), MODEL_KEY, expected_part=expected)


@pytest.mark.parametrize("extra", [{"part": "front"}, {"partition_sha256": DIGEST}, {"note": "x"}])
def test_a_whole_model_header_with_extra_fields_is_refused(parts: Split, extra: dict[str, object]) -> None:
    doc = parts.doc
    doc.update(extra)
    with pytest.raises(SealedModelError, match="malformed"):
        SealedModelHeader.parse(join(with_header(doc), parts.chunks))


def test_a_part_needs_both_its_name_and_the_digest(model: onnx.ModelProto) -> None:
    with pytest.raises(SealedModelError, match="needs both"):
        seal_model(model, model_id="mlp", model_version=1, model_key=MODEL_KEY, part="front")
