"""Request and response envelopes (DESIGN §crypto "Request/response envelope").

A user seals input tensors under a key derived for *this request only* from
their per-model request key; the runtime answers under a *different* derived
key (separate HKDF labels), so a response cannot be replayed as a request, nor
a response to one request be accepted for another (the request id salts both
keys and is bound in the AAD together with model id, user id and timestamp).

Wire form (JSON, pydantic, frozen, extra fields forbidden)::

    RequestEnvelope  {v, model_id, user_id, request_id, timestamp, nonce, ciphertext}
    ResponseEnvelope {v, request_id, nonce, ciphertext}

with ``request_id`` 32 hex chars (128 random bits), ``nonce`` and
``ciphertext`` base64.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sealedml._internal.encoding import b64d, b64e, fields
from sealedml.crypto import (
    NONCE_SIZE,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
    random_bytes,
)
from sealedml.envelope.tensors import decode_tensors, encode_tensors
from sealedml.errors import CryptoError, EnvelopeError

__all__ = [
    "ID_PATTERN",
    "MAX_CLOCK_SKEW",
    "OpenedRequest",
    "RequestContext",
    "RequestEnvelope",
    "ResponseEnvelope",
    "open_request",
    "open_response",
    "seal_request",
    "seal_response",
]

#: Model and principal identifiers: short, printable, no separators that could confuse paths.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: Requests older or newer than this many seconds are refused by the runtime.
MAX_CLOCK_SKEW = 300

_REQ_LABEL = b"sealedml/v1/request-key"
_RESP_LABEL = b"sealedml/v1/response-key"
_REQ_AAD = b"sealedml/v1/request"
_RESP_AAD = b"sealedml/v1/response"

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
HexId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class RequestEnvelope(BaseModel):
    """An encrypted inference request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    model_id: Identifier
    user_id: Identifier
    request_id: HexId
    timestamp: int
    nonce: str
    ciphertext: str

    @classmethod
    def parse(cls, data: bytes | str | Mapping[str, object]) -> RequestEnvelope:
        """Parse and validate; raise :class:`EnvelopeError` on anything malformed."""
        try:
            if isinstance(data, Mapping):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise EnvelopeError("malformed request envelope") from exc


class ResponseEnvelope(BaseModel):
    """An encrypted inference response."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    request_id: HexId
    nonce: str
    ciphertext: str

    @classmethod
    def parse(cls, data: bytes | str | Mapping[str, object]) -> ResponseEnvelope:
        """Parse and validate; raise :class:`EnvelopeError` on anything malformed."""
        try:
            if isinstance(data, Mapping):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise EnvelopeError("malformed response envelope") from exc


@dataclass(frozen=True)
class RequestContext:
    """What one side keeps to seal or open the response of one request."""

    model_id: str
    user_id: str
    request_id: str
    timestamp: int
    response_key: bytes

    def __repr__(self) -> str:  # never print the key
        return f"RequestContext(model_id={self.model_id!r}, request_id={self.request_id!r})"


@dataclass(frozen=True)
class OpenedRequest:
    """A decrypted request: tensors plus the context for the response."""

    tensors: dict[str, np.ndarray]
    positional: bool
    context: RequestContext


def _keys(request_key: bytes, model_id: str, user_id: str, request_id: bytes) -> tuple[bytes, bytes]:
    if len(request_key) != 32:
        raise EnvelopeError("request key must be 32 bytes")
    context = fields(b"", model_id, user_id)
    req = hkdf_sha256(request_key, salt=request_id, info=_REQ_LABEL + context)
    resp = hkdf_sha256(request_key, salt=request_id, info=_RESP_LABEL + context)
    return req, resp


def _aad(label: bytes, model_id: str, user_id: str, request_id: str, timestamp: int) -> bytes:
    return fields(label, model_id, user_id, request_id, timestamp)


def seal_request(
    tensors: Mapping[str, np.ndarray],
    *,
    request_key: bytes,
    model_id: str,
    user_id: str,
    is_positional: bool = False,
    now: float | None = None,
) -> tuple[RequestEnvelope, RequestContext]:
    """Encrypt ``tensors`` for ``model_id`` as ``user_id``.

    Returns:
        The envelope to send and the context needed to open the response.
    """
    request_id = random_bytes(16)
    rid = request_id.hex()
    timestamp = int(time.time() if now is None else now)
    req_key, resp_key = _keys(request_key, model_id, user_id, request_id)
    nonce = random_bytes(NONCE_SIZE)
    plaintext = encode_tensors(tensors, is_positional=is_positional)
    ciphertext = aead_encrypt(req_key, nonce, plaintext, _aad(_REQ_AAD, model_id, user_id, rid, timestamp))
    envelope = RequestEnvelope(
        model_id=model_id,
        user_id=user_id,
        request_id=rid,
        timestamp=timestamp,
        nonce=b64e(nonce),
        ciphertext=b64e(ciphertext),
    )
    return envelope, RequestContext(model_id, user_id, rid, timestamp, resp_key)


def _b64(text: str, what: str) -> bytes:
    try:
        return b64d(text)
    except ValueError as exc:
        raise EnvelopeError(f"malformed {what}") from exc


def open_request(
    envelope: RequestEnvelope,
    *,
    request_key: bytes,
    now: float | None = None,
    max_skew: int = MAX_CLOCK_SKEW,
) -> OpenedRequest:
    """Authenticate and decrypt a request (runtime side).

    Raises:
        EnvelopeError: stale or future timestamp, tampered, truncated, or sealed
            for another model, user or key.
    """
    current = time.time() if now is None else now
    if abs(current - envelope.timestamp) > max_skew:
        raise EnvelopeError("request timestamp outside the accepted window")
    request_id = bytes.fromhex(envelope.request_id)
    req_key, resp_key = _keys(request_key, envelope.model_id, envelope.user_id, request_id)
    nonce = _b64(envelope.nonce, "nonce")
    if len(nonce) != NONCE_SIZE:
        raise EnvelopeError("malformed nonce")
    aad = _aad(_REQ_AAD, envelope.model_id, envelope.user_id, envelope.request_id, envelope.timestamp)
    try:
        plaintext = aead_decrypt(req_key, nonce, _b64(envelope.ciphertext, "ciphertext"), aad)
    except CryptoError as exc:
        raise EnvelopeError("request failed authentication") from exc
    tensors, is_positional = decode_tensors(plaintext)
    context = RequestContext(
        envelope.model_id, envelope.user_id, envelope.request_id, envelope.timestamp, resp_key
    )
    return OpenedRequest(tensors, is_positional, context)


def seal_response(context: RequestContext, tensors: Mapping[str, np.ndarray]) -> ResponseEnvelope:
    """Encrypt output tensors under the request's response key (runtime side)."""
    nonce = random_bytes(NONCE_SIZE)
    aad = _aad(_RESP_AAD, context.model_id, context.user_id, context.request_id, context.timestamp)
    ciphertext = aead_encrypt(context.response_key, nonce, encode_tensors(tensors), aad)
    return ResponseEnvelope(request_id=context.request_id, nonce=b64e(nonce), ciphertext=b64e(ciphertext))


def open_response(context: RequestContext, envelope: ResponseEnvelope) -> dict[str, np.ndarray]:
    """Authenticate and decrypt the response to the request described by ``context``.

    Raises:
        EnvelopeError: the response belongs to another request or was tampered with.
    """
    if envelope.request_id != context.request_id:
        raise EnvelopeError("response is for another request")
    nonce = _b64(envelope.nonce, "nonce")
    if len(nonce) != NONCE_SIZE:
        raise EnvelopeError("malformed nonce")
    aad = _aad(_RESP_AAD, context.model_id, context.user_id, context.request_id, context.timestamp)
    try:
        plaintext = aead_decrypt(context.response_key, nonce, _b64(envelope.ciphertext, "ciphertext"), aad)
    except CryptoError as exc:
        raise EnvelopeError("response failed authentication") from exc
    tensors, _ = decode_tensors(plaintext)
    return tensors
