"""Negative matrix of the request/response envelope: every attack must end in ``EnvelopeError``.

Threat model (docs/threat-model): the operator may replay, reorder, drop, delay
or tamper with any envelope. It must not be able to make the runtime accept a
modified request, nor make a client accept a response that was not produced
for its request.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from sealedml.envelope.request import (
    MAX_CLOCK_SKEW,
    RequestContext,
    RequestEnvelope,
    ResponseEnvelope,
    open_request,
    open_response,
    seal_request,
    seal_response,
)
from sealedml.errors import EnvelopeError
from tests.constants import MODEL, NOW, REQUEST_KEY, USER
from tests.constants import OTHER_REQUEST_KEY as OTHER_KEY

TENSORS = {"input": np.arange(64, dtype=np.float32).reshape(1, 64)}


def _seal(**kwargs: object) -> tuple[RequestEnvelope, RequestContext]:
    options: dict[str, object] = {"request_key": REQUEST_KEY, "model_id": MODEL, "user_id": USER, "now": NOW}
    options.update(kwargs)
    return seal_request(TENSORS, **options)  # type: ignore[arg-type]


def _open(envelope: RequestEnvelope, **kwargs: object) -> None:
    options: dict[str, object] = {"request_key": REQUEST_KEY, "now": NOW}
    options.update(kwargs)
    open_request(envelope, **options)  # type: ignore[arg-type]


def _request_json(envelope: RequestEnvelope) -> dict[str, object]:
    doc: dict[str, object] = json.loads(envelope.model_dump_json())
    return doc


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _relabel(envelope: RequestEnvelope, **changes: object) -> RequestEnvelope:
    """What an attacker on the wire can do: rewrite fields and re-serialize (the result parses)."""
    doc = _request_json(envelope)
    for key, value in changes.items():
        doc[key] = _b64(value) if isinstance(value, bytes) else value
    return RequestEnvelope.parse(json.dumps(doc))


def _responded() -> tuple[RequestEnvelope, RequestContext, RequestContext, ResponseEnvelope]:
    envelope, client_context = _seal()
    server_context = open_request(envelope, request_key=REQUEST_KEY, now=NOW).context
    response = seal_response(server_context, {"label": np.array([7], np.int64)})
    return envelope, client_context, server_context, response


def test_untampered_request_opens() -> None:
    """Control for the matrix below: the unmodified envelope opens."""
    envelope, _ = _seal()
    opened = open_request(envelope, request_key=REQUEST_KEY, now=NOW)
    np.testing.assert_array_equal(opened.tensors["input"], TENSORS["input"])
    np.testing.assert_array_equal(
        open_request(_relabel(envelope), request_key=REQUEST_KEY, now=NOW).tensors["input"], TENSORS["input"]
    )


# -- ciphertext ----------------------------------------------------------------------


def test_request_rejects_tampered_ciphertext() -> None:
    envelope, _ = _seal()
    for position in (0, 1, len(envelope.ciphertext) // 2, len(envelope.ciphertext) - 17, len(envelope.ciphertext) - 1):
        tampered = bytearray(envelope.ciphertext)
        tampered[position] ^= 0x04
        with pytest.raises(EnvelopeError, match="failed authentication"):
            _open(_relabel(envelope, ciphertext=bytes(tampered)))


def test_request_rejects_truncated_ciphertext() -> None:
    envelope, _ = _seal()
    for keep in (0, 1, 15, 16, len(envelope.ciphertext) - 16, len(envelope.ciphertext) - 1):
        with pytest.raises(EnvelopeError, match="failed authentication"):
            _open(_relabel(envelope, ciphertext=envelope.ciphertext[:keep]))


def test_request_rejects_extended_ciphertext() -> None:
    envelope, _ = _seal()
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(_relabel(envelope, ciphertext=envelope.ciphertext + b"\x00"))


def test_request_rejects_tampered_nonce() -> None:
    envelope, _ = _seal()
    nonce = bytearray(envelope.nonce)
    nonce[-1] ^= 0x01
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(_relabel(envelope, nonce=bytes(nonce)))


def test_request_rejects_ciphertext_of_another_request() -> None:
    first, _ = _seal()
    second, _ = _seal()
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(_relabel(first, ciphertext=second.ciphertext, nonce=second.nonce))


# -- metadata bound in the AAD and key derivation --------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_id", "digits2"),
        ("model_id", "Digits"),
        ("user_id", "mallory"),
        ("user_id", "alice2"),
        ("request_id", "0" * 32),
        ("timestamp", NOW + 1),
        ("timestamp", NOW - MAX_CLOCK_SKEW),
    ],
)
def test_request_rejects_tampered_metadata(field: str, value: object) -> None:
    envelope, _ = _seal()
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(_relabel(envelope, **{field: value}))


def test_request_rejects_request_id_of_another_request() -> None:
    first, _ = _seal()
    second, _ = _seal()
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(_relabel(first, request_id=second.request_id))


def test_request_for_another_model_id_rejected() -> None:
    """A request sealed for model A cannot be redirected to model B, even under the same request key."""
    envelope, _ = _seal(model_id="model-a")
    _open(envelope)  # control: it is valid for model A
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(_relabel(envelope, model_id="model-b"))


def test_request_with_wrong_request_key_rejected() -> None:
    envelope, _ = _seal()
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(envelope, request_key=OTHER_KEY)


@pytest.mark.parametrize("age", [MAX_CLOCK_SKEW + 1, 3600, 10 * 365 * 86400])
def test_request_stale_timestamp_rejected(age: int) -> None:
    envelope, _ = _seal(now=NOW - age)
    with pytest.raises(EnvelopeError, match="timestamp outside the accepted window"):
        _open(envelope)


@pytest.mark.parametrize("ahead", [MAX_CLOCK_SKEW + 1, 86400])
def test_request_future_timestamp_rejected(ahead: int) -> None:
    envelope, _ = _seal(now=NOW + ahead)
    with pytest.raises(EnvelopeError, match="timestamp outside the accepted window"):
        _open(envelope)


def test_request_stale_timestamp_cannot_be_refreshed() -> None:
    """Rewriting an old request's timestamp into the window breaks its authentication."""
    envelope, _ = _seal(now=NOW - 3600)
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(_relabel(envelope, timestamp=NOW))


# -- responses -----------------------------------------------------------------------


def test_untampered_response_opens() -> None:
    _, client_context, _, response = _responded()
    np.testing.assert_array_equal(open_response(client_context, response)["label"], [7])


def test_response_replayed_to_another_request_rejected() -> None:
    _, _, _, response_a = _responded()
    _, context_b, _, _ = _responded()
    with pytest.raises(EnvelopeError, match="another request"):
        open_response(context_b, response_a)
    # Relabelling the response with B's request id does not help: B's key differs.
    relabelled = ResponseEnvelope(
        request_id=context_b.request_id, nonce=response_a.nonce, ciphertext=response_a.ciphertext
    )
    with pytest.raises(EnvelopeError, match="failed authentication"):
        open_response(context_b, relabelled)


def test_response_tampered_rejected() -> None:
    _, client_context, _, response = _responded()
    for position in (0, len(response.ciphertext) // 2, len(response.ciphertext) - 1):
        tampered = bytearray(response.ciphertext)
        tampered[position] ^= 0x10
        forged = ResponseEnvelope(request_id=response.request_id, nonce=response.nonce, ciphertext=bytes(tampered))
        with pytest.raises(EnvelopeError, match="failed authentication"):
            open_response(client_context, forged)
    nonce = bytearray(response.nonce)
    nonce[0] ^= 0x10
    forged = ResponseEnvelope(request_id=response.request_id, nonce=bytes(nonce), ciphertext=response.ciphertext)
    with pytest.raises(EnvelopeError, match="failed authentication"):
        open_response(client_context, forged)


def test_response_truncated_rejected() -> None:
    _, client_context, _, response = _responded()
    for keep in (0, 16, len(response.ciphertext) - 1):
        forged = ResponseEnvelope(
            request_id=response.request_id, nonce=response.nonce, ciphertext=response.ciphertext[:keep]
        )
        with pytest.raises(EnvelopeError, match="failed authentication"):
            open_response(client_context, forged)


def test_response_cannot_be_opened_as_request() -> None:
    """Distinct HKDF labels and AAD labels: the output is never under the input key."""
    request, _, _, response = _responded()
    as_request = _relabel(request, nonce=response.nonce, ciphertext=response.ciphertext)
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(as_request)


def test_request_cannot_be_opened_as_response() -> None:
    request, client_context, _, _ = _responded()
    as_response = ResponseEnvelope(request_id=request.request_id, nonce=request.nonce, ciphertext=request.ciphertext)
    with pytest.raises(EnvelopeError, match="failed authentication"):
        open_response(client_context, as_response)


def test_response_sealed_with_context_of_other_user_rejected() -> None:
    _, client_context, server_context, _ = _responded()
    forged_context = RequestContext(
        MODEL, "mallory", server_context.request_id, server_context.timestamp, server_context.response_key
    )
    response = seal_response(forged_context, {"label": np.array([1], np.int64)})
    with pytest.raises(EnvelopeError, match="failed authentication"):
        open_response(client_context, response)


# -- malformed envelopes --------------------------------------------------------------


def _valid_request_doc() -> dict[str, object]:
    envelope, _ = _seal()
    return _request_json(envelope)


MALFORMED_REQUEST_CHANGES = [
    pytest.param({"nonce": "!!not base64!!"}, id="nonce-bad-base64"),
    pytest.param({"ciphertext": "***"}, id="ciphertext-bad-base64"),
    pytest.param({"nonce": _b64(bytes(11))}, id="nonce-11-bytes"),
    pytest.param({"nonce": _b64(bytes(13))}, id="nonce-13-bytes"),
    pytest.param({"nonce": ""}, id="nonce-empty"),
    pytest.param({"nonce": 12}, id="nonce-number"),
    pytest.param({"extra": "field"}, id="extra-field"),
    pytest.param({"response_key": _b64(bytes(32))}, id="extra-field-response-key"),
    pytest.param({"v": 2}, id="unknown-version"),
    pytest.param({"v": 0}, id="version-zero"),
    pytest.param({"request_id": "0" * 31}, id="request-id-short"),
    pytest.param({"request_id": "0" * 33}, id="request-id-long"),
    pytest.param({"request_id": "A" * 32}, id="request-id-uppercase"),
    pytest.param({"request_id": "g" * 32}, id="request-id-not-hex"),
    pytest.param({"request_id": "0" * 32 + "\n"}, id="request-id-trailing-newline"),
    pytest.param({"model_id": ""}, id="model-id-empty"),
    pytest.param({"model_id": "../etc/passwd"}, id="model-id-path-traversal"),
    pytest.param({"model_id": "a/b"}, id="model-id-slash"),
    pytest.param({"model_id": "-leading-dash"}, id="model-id-leading-dash"),
    pytest.param({"model_id": ".hidden"}, id="model-id-leading-dot"),
    pytest.param({"model_id": "m" * 129}, id="model-id-too-long"),
    pytest.param({"model_id": "model\n"}, id="model-id-trailing-newline"),
    pytest.param({"model_id": "mod el"}, id="model-id-space"),
    pytest.param({"model_id": "modèle"}, id="model-id-non-ascii"),
    pytest.param({"user_id": "alice:admin"}, id="user-id-colon"),
    pytest.param({"user_id": None}, id="user-id-null"),
    pytest.param({"timestamp": "soon"}, id="timestamp-text"),
    pytest.param({"timestamp": 1.5}, id="timestamp-fraction"),
    pytest.param({"timestamp": None}, id="timestamp-null"),
]


@pytest.mark.parametrize("changes", MALFORMED_REQUEST_CHANGES)
def test_malformed_request_envelope_rejected(changes: dict[str, object]) -> None:
    doc = _valid_request_doc()
    doc.update(changes)
    with pytest.raises(EnvelopeError, match="malformed"):
        RequestEnvelope.parse(json.dumps(doc))


@pytest.mark.parametrize("missing", ["model_id", "user_id", "request_id", "timestamp", "nonce", "ciphertext"])
def test_request_envelope_missing_field_rejected(missing: str) -> None:
    doc = _valid_request_doc()
    del doc[missing]
    with pytest.raises(EnvelopeError, match="malformed"):
        RequestEnvelope.parse(json.dumps(doc))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"null", id="null"),
        pytest.param(b"[]", id="array"),
        pytest.param(b"{", id="truncated-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param("{}", id="empty-object"),
    ],
)
def test_request_envelope_not_an_object_rejected(data: bytes | str) -> None:
    with pytest.raises(EnvelopeError):
        RequestEnvelope.parse(data)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"nonce": "%%%"}, id="nonce-bad-base64"),
        pytest.param({"nonce": _b64(bytes(8))}, id="nonce-8-bytes"),
        pytest.param({"request_id": "xyz"}, id="bad-request-id"),
        pytest.param({"model_id": "digits"}, id="extra-field"),
        pytest.param({"v": 2}, id="unknown-version"),
    ],
)
def test_malformed_response_envelope_rejected(changes: dict[str, object]) -> None:
    _, _, _, response = _responded()
    doc = json.loads(response.model_dump_json())
    doc.update(changes)
    with pytest.raises(EnvelopeError, match="malformed"):
        ResponseEnvelope.parse(json.dumps(doc))


@pytest.mark.parametrize("missing", ["request_id", "nonce", "ciphertext"])
def test_response_envelope_missing_field_rejected(missing: str) -> None:
    _, _, _, response = _responded()
    doc = json.loads(response.model_dump_json())
    del doc[missing]
    with pytest.raises(EnvelopeError, match="malformed"):
        ResponseEnvelope.parse(json.dumps(doc))


def test_request_envelope_is_not_a_response_envelope() -> None:
    request, _ = _seal()
    with pytest.raises(EnvelopeError):
        ResponseEnvelope.parse(request.model_dump_json())
    with pytest.raises(EnvelopeError):
        ResponseEnvelope.parse(request.to_binary())


# -- binary framing -------------------------------------------------------------------


def _binary_parts(envelope: RequestEnvelope) -> tuple[bytes, bytes, bytes]:
    raw = envelope.to_binary()
    magic = raw[:5]
    length = int.from_bytes(raw[5:9], "big")
    return magic, raw[9 : 9 + length], raw[9 + length :]


def _frame(magic: bytes, header: bytes, body: bytes) -> bytes:
    return magic + len(header).to_bytes(4, "big") + header + body


def test_binary_request_with_tampered_ciphertext_rejected() -> None:
    envelope, _ = _seal()
    magic, header, body = _binary_parts(envelope)
    tampered = bytearray(body)
    tampered[3] ^= 0x01
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(RequestEnvelope.parse(_frame(magic, header, bytes(tampered))))


def test_binary_request_with_tampered_header_rejected() -> None:
    envelope, _ = _seal()
    magic, header, body = _binary_parts(envelope)
    doc = json.loads(header)
    doc["user_id"] = "mallory"
    with pytest.raises(EnvelopeError, match="failed authentication"):
        _open(RequestEnvelope.parse(_frame(magic, json.dumps(doc).encode(), body)))


@pytest.mark.parametrize(
    "mutation",
    [
        "header-length-beyond-data",
        "header-length-too-large",
        "header-not-json",
        "header-is-list",
        "ciphertext-inside-header",
        "extra-field",
        "magic-only",
        "bad-nonce-length",
    ],
)
def test_malformed_binary_request_rejected(mutation: str) -> None:
    envelope, _ = _seal()
    magic, header, body = _binary_parts(envelope)
    doc = json.loads(header)
    if mutation == "header-length-beyond-data":
        data = magic + (len(header) + len(body) + 1).to_bytes(4, "big") + header + body
    elif mutation == "header-length-too-large":
        data = magic + (1 << 20).to_bytes(4, "big") + header + body + bytes(1 << 20)
    elif mutation == "header-not-json":
        data = _frame(magic, b"{not json", body)
    elif mutation == "header-is-list":
        data = _frame(magic, b"[1, 2]", body)
    elif mutation == "ciphertext-inside-header":
        doc["ciphertext"] = _b64(body)
        data = _frame(magic, json.dumps(doc).encode(), b"")
    elif mutation == "extra-field":
        doc["extra"] = 1
        data = _frame(magic, json.dumps(doc).encode(), body)
    elif mutation == "magic-only":
        data = magic + b"\x00\x00"
    else:
        doc["nonce"] = _b64(bytes(16))
        data = _frame(magic, json.dumps(doc).encode(), body)
    with pytest.raises(EnvelopeError, match="malformed"):
        RequestEnvelope.parse(data)


def test_binary_request_with_deeply_nested_header_rejected() -> None:
    envelope, _ = _seal()
    magic, _, body = _binary_parts(envelope)
    with pytest.raises(EnvelopeError):
        RequestEnvelope.parse(_frame(magic, b"[" * 4000, body))


def test_request_envelope_with_lone_surrogate_rejected() -> None:
    with pytest.raises(EnvelopeError):
        RequestEnvelope.parse('{"model_id": "\ud800"}')
