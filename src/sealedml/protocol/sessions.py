"""Session wire protocol (KeyService ``/v1/sessions/…``): messages, HPKE info strings, MACs.

Session releases reuse the model release's challenge (``/v1/release/challenge``) and answer
shape (:class:`~sealedml.protocol.keyservice.ReleaseResponse`), with their own labels: an
answer to a session release can never be taken for an answer to a model release, nor the
reverse. See docs/protocol.md §"Sessions".
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sealedml._internal.encoding import fields
from sealedml.protocol.keyservice import B64, EvidenceMessage, release_answer_message

__all__ = [
    "SessionName",
    "SessionPutRequest",
    "SessionReleaseRequest",
    "SessionSecretRequest",
    "SessionShowRequest",
    "SessionShowResponse",
    "VolumeRootRequest",
    "VolumeRootResponse",
    "session_answer_message",
    "session_release_info",
    "session_secret_info",
    "volume_request_mac",
    "volume_response_mac",
]

SessionName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}(/[a-z0-9][a-z0-9_.-]{0,62})?$")]
ServiceName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
SecretName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SessionPutRequest(_Msg):
    """``POST /v1/sessions/put``: a revision and its signers' signatures (checked in the KeyService)."""

    document: dict[str, Any]
    signatures: Annotated[list[dict[str, str]], Field(max_length=64)]


class SessionShowRequest(_Msg):
    """``POST /v1/sessions/show``: the latest revision, for one of its signers."""

    session: SessionName


class SessionShowResponse(_Msg):
    """The latest revision, its digest, signatures, which secrets hold a value, and volume roots."""

    session: str
    revision: int
    digest: str
    document: dict[str, Any]
    signatures: list[dict[str, str]]
    secrets_set: list[str]
    secrets_missing: list[str]
    volumes: dict[str, dict[str, int | str]]


class SessionSecretRequest(_Msg):
    """``POST /v1/sessions/secret``: an uploaded secret, HPKE-sealed to the attested KeyService."""

    session: SessionName
    secret: SecretName
    sealed: B64
    service_key: B64


class SessionReleaseRequest(_Msg):
    """``POST /v1/sessions/release``: evidence bound to the challenge nonce and the program's HPKE key."""

    challenge_id: Annotated[str, Field(max_length=64)]
    evidence: EvidenceMessage
    runtime_key: B64
    session: SessionName
    service: ServiceName


class VolumeRootRequest(_Msg):
    """``POST /v1/sessions/volume-root``: read (``op="get"``) or advance a volume's root tag.

    Authenticated by ``mac``, an HMAC under the lease key released to the program
    (:func:`volume_request_mac`); ``nonce`` makes the answer's MAC fresh.
    """

    lease: Hex64
    volume: ServiceName
    op: Literal["get", "advance"]
    version: Annotated[int, Field(ge=0, le=2**62)] = 0
    root: Hex64 | None = None
    previous: Hex64 | None = None
    nonce: Hex64
    mac: Hex64


class VolumeRootResponse(_Msg):
    """The volume's (version, root) now — after the advance, for ``advance`` — MACed with the lease key."""

    version: int | None
    root: str | None
    mac: Hex64


def session_secret_info(service_key: bytes, session: str, secret: str, principal: str) -> bytes:
    """HPKE info for a session secret sealed to the KeyService by ``principal``."""
    return fields(b"sealedml/v1/session-secret", service_key, session, secret, principal)


def session_release_info(challenge_id: str, runtime_key: bytes) -> bytes:
    """HPKE info for a session bundle sealed to a program."""
    return fields(b"sealedml/v1/session-release", challenge_id, runtime_key)


def session_answer_message(
    service_id: str, challenge_id: str, runtime_key: bytes, sealed: bytes, expires_at: int, lease_ttl: int
) -> bytes:
    """What the KeyService signs in a session release answer (as for models, with its own label)."""
    return release_answer_message(
        service_id, challenge_id, runtime_key, sealed, expires_at, lease_ttl, label=b"sealedml/v1/session-answer"
    )


def _mac(key: bytes, label: bytes, *parts: str | int | bytes) -> str:
    return hmac.new(key, fields(label, *parts), hashlib.sha256).hexdigest()


def volume_request_mac(key: bytes, req: VolumeRootRequest) -> str:
    """The lease key's MAC over a volume-root request (every field but ``mac``)."""
    return _mac(
        key,
        b"sealedml/v1/volume-root-request",
        req.lease,
        req.volume,
        req.op,
        req.version,
        req.root or "",
        req.previous or "",
        req.nonce,
    )


def volume_response_mac(key: bytes, lease: str, volume: str, nonce: str, version: int | None, root: str | None) -> str:
    """The lease key's MAC over an answer, bound to the request's nonce (so an old answer cannot be replayed)."""
    return _mac(
        key, b"sealedml/v1/volume-root-answer", lease, volume, nonce, -1 if version is None else version, root or ""
    )
