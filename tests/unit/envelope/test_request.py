"""Request and response envelopes (:mod:`sealedml.envelope.request`): the happy paths.

The negative matrix (tampering, replay, wrong keys) is in
``tests/security/test_request_envelope_tampering.py``.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from sealedml.crypto import NONCE_SIZE
from sealedml.envelope.request import (
    ID_PATTERN,
    MAX_CLOCK_SKEW,
    RequestContext,
    RequestEnvelope,
    ResponseEnvelope,
    open_request,
    open_response,
    seal_request,
    seal_response,
)
from sealedml.envelope.tensors import positional
from sealedml.errors import EnvelopeError
from tests.constants import MODEL, NOW, REQUEST_KEY, USER


def _seal(tensors: dict[str, np.ndarray], **kwargs: object) -> tuple[RequestEnvelope, RequestContext]:
    options: dict[str, object] = {"request_key": REQUEST_KEY, "model_id": MODEL, "user_id": USER, "now": NOW}
    options.update(kwargs)
    return seal_request(tensors, **options)  # type: ignore[arg-type]


def _assert_same_tensors(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    # Named tensors are matched by name (safetensors does not keep insertion
    # order); positional order is checked by the positional tests.
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


MIXED = {
    "pixels": np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 7,
    "ids": np.array([[3, -1], [2**40, 0]], dtype=np.int64),
    "mask": np.array([True, False, True]),
    "image": np.arange(12, dtype=np.uint8).reshape(1, 3, 2, 2),
    "empty": np.zeros((0, 4), dtype=np.float32),
}


def test_named_request_roundtrip() -> None:
    envelope, context = _seal(MIXED)
    opened = open_request(envelope, request_key=REQUEST_KEY, now=NOW)
    assert opened.positional is False
    _assert_same_tensors(opened.tensors, MIXED)
    assert (opened.context.model_id, opened.context.user_id) == (MODEL, USER)
    assert opened.context.request_id == envelope.request_id == context.request_id
    assert opened.context.timestamp == envelope.timestamp == int(NOW)
    assert opened.context.response_key == context.response_key


def test_positional_request_roundtrip_keeps_order() -> None:
    arrays = [np.full((1, i + 1), i, dtype=np.float32) for i in range(11)]
    envelope, _ = _seal(positional(arrays), is_positional=True)
    opened = open_request(envelope, request_key=REQUEST_KEY, now=NOW)
    assert opened.positional is True
    assert list(opened.tensors) == [str(i) for i in range(11)]
    for got, expected in zip(opened.tensors.values(), arrays, strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_request_roundtrip_with_dynamic_batch(batch: int) -> None:
    tensors = {"x": np.ones((batch, 4), np.float32), "idx": np.arange(batch, dtype=np.int64)}
    envelope, _ = _seal(tensors)
    _assert_same_tensors(open_request(envelope, request_key=REQUEST_KEY, now=NOW).tensors, tensors)


def test_request_roundtrip_with_zero_size_tensors() -> None:
    tensors = {"a": np.zeros((0,), np.float32), "b": np.zeros((3, 0), np.int64), "c": np.zeros(0, np.bool_)}
    envelope, _ = _seal(tensors)
    _assert_same_tensors(open_request(envelope, request_key=REQUEST_KEY, now=NOW).tensors, tensors)


def test_request_roundtrip_with_scalar_tensors() -> None:
    tensors = {"temperature": np.array(0.5, np.float32), "k": np.array(3, np.int64)}
    envelope, _ = _seal(tensors)
    _assert_same_tensors(open_request(envelope, request_key=REQUEST_KEY, now=NOW).tensors, tensors)


def test_request_roundtrip_with_no_tensors() -> None:
    envelope, _ = _seal({})
    assert open_request(envelope, request_key=REQUEST_KEY, now=NOW).tensors == {}


def test_request_envelope_fields() -> None:
    envelope, _ = _seal(MIXED)
    assert envelope.v == 1
    assert (envelope.model_id, envelope.user_id, envelope.timestamp) == (MODEL, USER, int(NOW))
    assert re.fullmatch(r"[0-9a-f]{32}", envelope.request_id)
    assert len(envelope.nonce) == NONCE_SIZE
    assert MIXED["pixels"].tobytes() not in envelope.ciphertext


def test_every_request_gets_a_fresh_request_id_nonce_and_keys() -> None:
    sealed = [_seal(MIXED) for _ in range(20)]
    assert len({env.request_id for env, _ in sealed}) == 20
    assert len({env.nonce for env, _ in sealed}) == 20
    assert len({env.ciphertext for env, _ in sealed}) == 20
    assert len({ctx.response_key for _, ctx in sealed}) == 20


def test_seal_request_uses_the_clock_when_now_is_omitted() -> None:
    envelope, _ = seal_request(MIXED, request_key=REQUEST_KEY, model_id=MODEL, user_id=USER)
    assert abs(envelope.timestamp - time.time()) < 5
    assert open_request(envelope, request_key=REQUEST_KEY).tensors.keys() == MIXED.keys()


@pytest.mark.parametrize("skew", [-MAX_CLOCK_SKEW, -1, 0, 1, MAX_CLOCK_SKEW])
def test_open_request_accepts_timestamp_within_skew(skew: int) -> None:
    envelope, _ = _seal(MIXED, now=NOW + skew)
    assert open_request(envelope, request_key=REQUEST_KEY, now=NOW).tensors.keys() == MIXED.keys()


def test_open_request_honours_custom_max_skew() -> None:
    envelope, _ = _seal(MIXED, now=NOW - 10)
    open_request(envelope, request_key=REQUEST_KEY, now=NOW, max_skew=10)
    with pytest.raises(EnvelopeError, match="timestamp"):
        open_request(envelope, request_key=REQUEST_KEY, now=NOW, max_skew=9)


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_request_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(EnvelopeError, match="32 bytes"):
        _seal(MIXED, request_key=bytes(size))
    envelope, _ = _seal(MIXED)
    with pytest.raises(EnvelopeError, match="32 bytes"):
        open_request(envelope, request_key=bytes(size), now=NOW)


def test_response_roundtrip() -> None:
    envelope, client_context = _seal(MIXED)
    opened = open_request(envelope, request_key=REQUEST_KEY, now=NOW)
    outputs = {"label": np.array([3, 9], np.int64), "probabilities": np.eye(2, 10, dtype=np.float32)}
    response = seal_response(opened.context, outputs)
    assert response.request_id == envelope.request_id
    assert len(response.nonce) == NONCE_SIZE
    _assert_same_tensors(open_response(client_context, response), outputs)


def test_response_nonces_are_fresh() -> None:
    envelope, _ = _seal(MIXED)
    opened = open_request(envelope, request_key=REQUEST_KEY, now=NOW)
    responses = [seal_response(opened.context, {"y": np.zeros(1)}) for _ in range(10)]
    assert len({r.nonce for r in responses}) == 10


def test_request_context_repr_hides_response_key() -> None:
    _, context = _seal(MIXED)
    text = repr(context)
    assert context.response_key.hex() not in text
    assert repr(context.response_key) not in text
    assert context.request_id in text


# -- wire forms --------------------------------------------------------------------


def test_request_envelope_json_roundtrip() -> None:
    envelope, _ = _seal(MIXED)
    text = envelope.model_dump_json()
    parsed = RequestEnvelope.parse(text)
    assert parsed == envelope
    assert RequestEnvelope.parse(text.encode()) == envelope
    _assert_same_tensors(open_request(parsed, request_key=REQUEST_KEY, now=NOW).tensors, MIXED)


def test_request_envelope_binary_roundtrip() -> None:
    envelope, _ = _seal(MIXED)
    raw = envelope.to_binary()
    assert raw.endswith(envelope.ciphertext)  # carried raw, not base64
    parsed = RequestEnvelope.parse(raw)
    assert parsed == envelope
    _assert_same_tensors(open_request(parsed, request_key=REQUEST_KEY, now=NOW).tensors, MIXED)


def test_response_envelope_json_and_binary_roundtrip() -> None:
    envelope, context = _seal(MIXED)
    opened = open_request(envelope, request_key=REQUEST_KEY, now=NOW)
    response = seal_response(opened.context, {"y": np.arange(5, dtype=np.float64)})
    for wire in (response.model_dump_json(), response.to_binary()):
        parsed = ResponseEnvelope.parse(wire)
        assert parsed == response
        np.testing.assert_array_equal(open_response(context, parsed)["y"], np.arange(5, dtype=np.float64))


def test_envelopes_are_frozen() -> None:
    envelope, _ = _seal(MIXED)
    with pytest.raises(ValueError, match="frozen"):
        envelope.model_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize("identifier", ["a", "A0", "model-1.onnx_v2", "x" * 128])
def test_id_pattern_accepts(identifier: str) -> None:
    assert re.fullmatch(ID_PATTERN.strip("^$"), identifier)
    envelope, _ = _seal({"x": np.zeros(1)}, model_id=identifier, user_id=identifier)
    assert RequestEnvelope.parse(envelope.model_dump_json()).model_id == identifier


def test_parse_metadata_validates_every_field_but_leaves_the_ciphertext() -> None:
    envelope, _ = _seal(MIXED)
    binary = envelope.to_binary()
    metadata = RequestEnvelope.parse_metadata(binary)
    assert metadata.model_copy(update={"ciphertext": envelope.ciphertext}) == envelope
    assert metadata.ciphertext == b""
    # The JSON framing is parsed whole.
    assert RequestEnvelope.parse_metadata(envelope.model_dump_json().encode()) == envelope
    # A header field the schema refuses is refused here too, as by parse().
    bad = binary.replace(MODEL.encode(), b"bad/model", 1)
    with pytest.raises(EnvelopeError):
        RequestEnvelope.parse_metadata(bad)
    with pytest.raises(EnvelopeError):
        RequestEnvelope.parse_metadata(binary[:12])


def test_one_pass_sealing_makes_the_binary_envelope_of_seal_request() -> None:
    from sealedml.envelope.request import seal_request_binary

    for tensors, is_positional in ((MIXED, False), (positional([MIXED["pixels"], MIXED["ids"]]), True)):
        body, context = seal_request_binary(
            tensors, request_key=REQUEST_KEY, model_id=MODEL, user_id=USER, is_positional=is_positional, now=NOW
        )
        envelope = RequestEnvelope.parse(bytes(body))
        assert envelope.to_binary() == bytes(body)
        opened = open_request(envelope, request_key=REQUEST_KEY, now=NOW)
        _assert_same_tensors(opened.tensors, tensors)
        assert opened.positional is is_positional
        assert opened.context == context
        # A flipped ciphertext bit, or another user's key, fails authentication.
        tampered = bytearray(body)
        tampered[-40] ^= 1
        with pytest.raises(EnvelopeError, match="authentication"):
            open_request(RequestEnvelope.parse(bytes(tampered)), request_key=REQUEST_KEY, now=NOW)
        with pytest.raises(EnvelopeError, match="authentication"):
            open_request(envelope, request_key=bytes(32), now=NOW)


def test_one_pass_sealing_refuses_what_the_payload_cannot_carry() -> None:
    from sealedml.envelope.request import seal_request_binary

    with pytest.raises(EnvelopeError, match="not supported"):
        seal_request_binary({"s": np.array(["text"])}, request_key=REQUEST_KEY, model_id=MODEL, user_id=USER, now=NOW)
