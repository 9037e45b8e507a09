"""Fuzzing the parsers an attacker can reach: sealed model containers, request envelopes, tensors.

Property: whatever the input, only :class:`sealedml.errors.Error` subclasses
escape (no ``KeyError``, ``OverflowError``, ``RecursionError`` … that a server
would turn into a 500 or a crash), and a modified container or envelope never
opens to different content.

Each fuzz target mixes three input families (arbitrary bytes, structured
near-valid documents, byte-level mutations of a genuine object) in one
2000-example run, with cheap strategies, to keep the module fast.

Inputs that trigger the known bugs are pinned by strict-xfail regression tests
instead of being generated here, so these fuzzers keep exploring everything
else (look for "BUG-avoidance" below):

* non-finite or out-of-int64 numbers in a sealed model header, and deeply
  nested JSON: ``tests/security/test_sealed_model_tampering.py``;
* deeply nested binary-envelope headers and lone surrogates in ``str`` input:
  ``tests/security/test_request_envelope_tampering.py``;
* safetensors dtypes numpy cannot represent (BF16, F8_*):
  ``tests/unit/envelope/test_tensors.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from sealedml import zoo
from sealedml._internal.encoding import canonical_json
from sealedml.envelope.model_container import MAGIC, SealedModelHeader, SealedModelReader, open_model, seal_model
from sealedml.envelope.request import (
    RequestEnvelope,
    ResponseEnvelope,
    open_request,
    open_response,
    seal_request,
    seal_response,
)
from sealedml.envelope.tensors import POSITIONAL_KEY, decode_tensors, encode_tensors
from sealedml.errors import EnvelopeError, Error, SealedModelError
from tests.constants import MODEL_KEY, NOW, REQUEST_KEY

FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# BUG-avoidance: every generated number is finite and inside int64.
INTERESTING = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    7,
    1.5,
    -0.0,
    1e18,
    2**31,
    2**63 - 1,
    -(2**63),
    "",
    "1",
    "a",
    "00" * 12,
    "00" * 32,
    "zz",
    "\u00e9",
    [],
    {},
    [1],
    {"a": 1},
    [[[]]],
]
SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4,
)
VALUES = st.sampled_from(INTERESTING) | SMALL_JSON


def only_typed_errors(call: Callable[[], object]) -> object | None:
    """Run ``call``; swallow SealedML's own errors, let anything else fail the test."""
    try:
        return call()
    except Error:
        return None


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` changed by 1 to 3 flips, insertions, deletions, truncations, extensions or moves."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append", "move"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 32))]
        elif op == "truncate":
            del data[pos:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=32))
        elif op == "move" and data:
            length = draw(st.integers(1, 1040))
            block = bytes(data[pos : pos + length])
            del data[pos : pos + length]
            target = draw(st.integers(0, len(data)))
            data[target:target] = block
    return bytes(data)


@st.composite
def edited_docs(draw: st.DrawFn, base: dict[str, Any], extra_keys: list[str]) -> dict[str, Any]:
    """``base`` with 1 to 3 fields replaced by odd values, dropped, or added."""
    doc = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*base, *extra_keys]))
        if draw(st.integers(0, 3)) == 0:
            doc.pop(name, None)
        else:
            doc[name] = draw(VALUES)
    return doc


# -- genuine objects the fuzzers start from (built once; hypothesis forbids function fixtures) --


def _small_model() -> onnx.ModelProto:
    """The toy model plus a 2 KiB weight, so the container has several 1 KiB chunks."""
    model = zoo.toy_multi_io()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(512, dtype=np.float32), "padding"))
    return model


SEALED = seal_model(_small_model(), model_id="toy", model_version=1, model_key=MODEL_KEY, chunk_size=1024)
SEALED_HEADER = SealedModelHeader.parse(SEALED)
SEALED_DOC: dict[str, Any] = json.loads(SEALED_HEADER.raw)
SEALED_BODY = SEALED[SEALED_HEADER.data_offset :]

_TENSORS = {"x": np.arange(8, dtype=np.float32).reshape(2, 4), "idx": np.array([1, 2], dtype=np.int64)}
ENVELOPE, CONTEXT = seal_request(_TENSORS, request_key=REQUEST_KEY, model_id="toy", user_id="alice", now=NOW)
RESPONSE = seal_response(
    open_request(ENVELOPE, request_key=REQUEST_KEY, now=NOW).context, {"y": np.ones((2, 3), np.float32)}
)
REQUEST_DOC: dict[str, Any] = json.loads(ENVELOPE.model_dump_json())
RESPONSE_DOC: dict[str, Any] = json.loads(RESPONSE.model_dump_json())
TENSOR_BYTES = encode_tensors({"0": np.arange(6, dtype=np.int32), "1": np.array([True, False])}, is_positional=True)


def test_fuzz_seeds_are_valid() -> None:
    """Control: the genuine objects the fuzzers mutate do open."""
    assert SEALED_HEADER.n_chunks >= 3
    assert open_model(SEALED, MODEL_KEY).graph.name == "toy_multi_io"
    for wire in (ENVELOPE.to_binary(), ENVELOPE.model_dump_json()):
        opened = open_request(RequestEnvelope.parse(wire), request_key=REQUEST_KEY, now=NOW)
        np.testing.assert_array_equal(opened.tensors["x"], _TENSORS["x"])
    for wire in (RESPONSE.to_binary(), RESPONSE.model_dump_json()):
        assert open_response(CONTEXT, ResponseEnvelope.parse(wire))["y"].shape == (2, 3)
    assert list(decode_tensors(TENSOR_BYTES)[0]) == ["0", "1"]


# -- sealed model container ------------------------------------------------------------------


def _read_all(data: bytes) -> bytes:
    with SealedModelReader(data, MODEL_KEY) as reader:
        return reader.read_all()


@st.composite
def containers_with_edited_header(draw: st.DrawFn) -> bytes:
    """A canonical, edited header over the genuine chunks; often resized so the reader authenticates."""
    doc = draw(edited_docs(SEALED_DOC, ["extra"]))
    raw = canonical_json(doc)
    data = MAGIC + len(raw).to_bytes(4, "big") + raw + SEALED_BODY
    if draw(st.booleans()):
        try:
            header = SealedModelHeader.parse(data)
        except SealedModelError:
            return data
        if 0 <= header.sealed_length < 1 << 20:
            data = (data + bytes(max(0, header.sealed_length - len(data))))[: header.sealed_length]
    return data


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=128),
        st.binary(max_size=128).map(lambda b: MAGIC + b),
        mutated(SEALED),
        containers_with_edited_header(),
    )
)
@example(data=b"")
@example(data=MAGIC + b"\xff\xff\xff\xff")
@example(data=MAGIC + (2).to_bytes(4, "big") + b"{}")
@example(data=SEALED[:-1])
@example(data=SEALED + b"\x00")
def test_fuzz_sealed_container(data: bytes) -> None:
    """Arbitrary, mutated or header-edited containers: typed errors only, and nothing but the original opens."""
    only_typed_errors(lambda: SealedModelHeader.parse(data))
    if data == SEALED:
        return
    payload = only_typed_errors(lambda: _read_all(data))
    assert payload is None, "a modified container opened"
    with pytest.raises(SealedModelError):
        open_model(data, MODEL_KEY)


# -- request and response envelopes ----------------------------------------------------------


def _binary_request(doc: dict[str, Any]) -> bytes:
    header = json.dumps({k: v for k, v in doc.items() if k != "ciphertext"}).encode()
    return b"SMLQ\x01" + len(header).to_bytes(4, "big") + header + ENVELOPE.ciphertext


def _open_request(data: bytes | str) -> object:
    return open_request(RequestEnvelope.parse(data), request_key=REQUEST_KEY, now=NOW)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200),  # hypothesis text() excludes lone surrogates (BUG-avoidance)
        st.binary(max_size=200).map(lambda b: b"SMLQ\x01" + b),
        VALUES.map(json.dumps),
        edited_docs(REQUEST_DOC, ["extra", "response_key"]).map(json.dumps),
        edited_docs(REQUEST_DOC, ["extra", "ciphertext"]).map(_binary_request),
        mutated(ENVELOPE.to_binary()),
        mutated(ENVELOPE.model_dump_json().encode()),
    )
)
@example(data=b"SMLQ\x01")
@example(data=b"SMLQ\x01\x00\x00\x00\x02{}")
@example(data=b"SMLQ\x01\x00\x00\x10\x00")
@example(data=b"SMLQ\x01\x00\x00\x00\x02[]")
def test_fuzz_request_envelope(data: bytes | str) -> None:
    """Parse + open: typed errors only; whatever opens is the genuine request with its tensors."""
    opened = only_typed_errors(lambda: _open_request(data))
    if opened is not None:
        # Some edits are not semantic (JSON whitespace, a dropped default "v", base64
        # alphabet): the envelope must then be the genuine one, with the genuine tensors.
        assert RequestEnvelope.parse(data) == ENVELOPE
        for name, array in _TENSORS.items():
            np.testing.assert_array_equal(opened.tensors[name], array)  # type: ignore[attr-defined]
    only_typed_errors(lambda: ResponseEnvelope.parse(data))


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200).map(lambda b: b"SMLR\x01" + b),
        edited_docs(RESPONSE_DOC, ["extra", "model_id"]).map(json.dumps),
        mutated(RESPONSE.to_binary()),
        mutated(RESPONSE.model_dump_json().encode()),
    )
)
def test_fuzz_response_envelope(data: bytes | str) -> None:
    """Parse + open at the client: typed errors only; whatever opens is the genuine response."""

    def parse_and_open() -> object:
        return open_response(CONTEXT, ResponseEnvelope.parse(data))

    if only_typed_errors(parse_and_open) is not None:
        assert ResponseEnvelope.parse(data) == RESPONSE


# -- tensors ----------------------------------------------------------------------------------

# BUG-avoidance: only dtypes safetensors.numpy can map, plus invalid names.
_DTYPES = ["F64", "F32", "F16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL", "C64", "XX", ""]


@st.composite
def safetensors_payloads(draw: st.DrawFn) -> bytes:
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{POSITIONAL_KEY: "1"}, {POSITIONAL_KEY: "0"}, {}]) | VALUES)
    cursor = 0
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["0", "1", "2", "10", "a", "-1", " 1", "01", "__metadata__"]))
        shape = draw(st.lists(st.integers(-1, 4), max_size=3))
        length = draw(st.integers(0, 24))
        entry: Any = {
            "dtype": draw(st.sampled_from(_DTYPES)),
            "shape": shape,
            "data_offsets": [cursor, cursor + length],
        }
        if draw(st.integers(0, 5)) == 0:
            entry = draw(VALUES)
        header[name] = entry
        cursor += length
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 8))
    prefix = len(raw) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    return max(0, prefix).to_bytes(8, "little") + raw + draw(st.binary(min_size=cursor, max_size=cursor + 4))


@FUZZ
@given(data=st.one_of(st.binary(max_size=128), safetensors_payloads(), mutated(TENSOR_BYTES)))
@example(data=b"")
@example(data=(2**64 - 1).to_bytes(8, "little"))
def test_fuzz_decode_tensors(data: bytes) -> None:
    result = only_typed_errors(lambda: decode_tensors(data))
    if result is not None:
        tensors, is_positional = result  # type: ignore[misc]
        assert all(isinstance(v, np.ndarray) for v in tensors.values())
        if is_positional:
            assert list(tensors) == [str(i) for i in range(len(tensors))]


def test_decode_tensors_single_byte_flips_of_the_header() -> None:
    """Deterministic sweep: every flipped header byte yields EnvelopeError or a consistent decode."""
    header_end = 8 + int.from_bytes(TENSOR_BYTES[:8], "little")
    rejected = 0
    for position in range(header_end):
        data = bytearray(TENSOR_BYTES)
        data[position] ^= 0x20
        try:
            tensors, is_positional = decode_tensors(bytes(data))
        except EnvelopeError:
            rejected += 1
            continue
        assert all(isinstance(v, np.ndarray) for v in tensors.values())
        if is_positional:
            assert list(tensors) == [str(i) for i in range(len(tensors))]
    assert rejected > header_end // 2
