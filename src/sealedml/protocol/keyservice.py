"""KeyService wire protocol: messages, signed-call headers, HPKE info strings.

Shared by the service and its clients so both sides build the same bytes.
See docs/protocol.md for the message-by-message specification.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sealedml._internal.encoding import fields
from sealedml.envelope.request import ID_PATTERN

__all__ = [
    "HDR_NONCE",
    "HDR_PRINCIPAL",
    "HDR_SIGNATURE",
    "HDR_TIMESTAMP",
    "MAX_LEASE_TTL",
    "MAX_PAIRS",
    "SIGNED_CALL_WINDOW",
    "AllowRuntimeRequest",
    "AttestationResponse",
    "AuditHeadRequest",
    "AuditHeadResponse",
    "ChallengeResponse",
    "ConsentRequest",
    "ConsentSummary",
    "EvidenceMessage",
    "GrantRequest",
    "ModelAuditRecord",
    "ModelAuditRequest",
    "ModelAuditResponse",
    "ModelInfoResponse",
    "ModelKeyRequest",
    "ModelListResponse",
    "ModelSignature",
    "ModelSummary",
    "RegisterRequest",
    "ReleasePair",
    "ReleaseRequest",
    "ReleaseResponse",
    "RuntimeRef",
    "TensorInfo",
    "audit_head_message",
    "consent_info",
    "model_key_info",
    "principal_id_for",
    "registration_message",
    "release_answer_message",
    "release_info",
    "service_key_binding",
    "signed_call_message",
]

HDR_PRINCIPAL = "x-sealedml-principal"
HDR_TIMESTAMP = "x-sealedml-timestamp"
HDR_NONCE = "x-sealedml-nonce"
HDR_SIGNATURE = "x-sealedml-signature"
#: A signed call is accepted only if its timestamp is within this many seconds of the server's clock.
SIGNED_CALL_WINDOW = 300
#: Most (model, user) pairs one release may name.
MAX_PAIRS = 64
#: Longest lease a runtime accepts, whatever a KeyService says (seconds).
MAX_LEASE_TTL = 3600

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
Hex = Annotated[str, Field(pattern=r"^[0-9a-fA-F]*$", max_length=256)]
B64 = Annotated[str, Field(max_length=1 << 20)]
Measurement = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64,128}$")]
#: A SHA-256 digest in lowercase hex (e.g. of a partition manifest).
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
#: The TEE types a runtime measurement can belong to (``sealedml.attestation.base.TeeType`` values).
TeeName = Literal["simulated", "sgx", "tdx", "sev-snp"]


def principal_id_for(public_key: bytes) -> str:
    """A principal's id: the first 128 bits of SHA-256 of its Ed25519 public key, hex."""
    return hashlib.sha256(b"sealedml/v1/principal" + public_key).hexdigest()[:32]


def signed_call_message(method: str, path: str, timestamp: int, nonce: str, body: bytes, service_id: str) -> bytes:
    """The bytes an Ed25519 signature of a KeyService call covers.

    ``service_id`` binds the call to one KeyService, so a call signed for one
    cannot be replayed to another where the same principal is registered.
    """
    return fields(
        b"sealedml/v1/signed-call", service_id, method.upper(), path, timestamp, nonce, hashlib.sha256(body).digest()
    )


def registration_message(service_id: str, public_key: bytes) -> bytes:
    """What a registrant signs to prove possession of its key, bound to one KeyService."""
    return fields(b"sealedml/v1/register", service_id, public_key)


def model_key_info(service_key: bytes, model_id: str, version: int, owner: str) -> bytes:
    """HPKE info for a model key sealed to the KeyService."""
    return fields(b"sealedml/v1/model-key", service_key, model_id, version, owner)


def consent_info(service_key: bytes, model_id: str, user_id: str) -> bytes:
    """HPKE info for a user's request key sealed to the KeyService."""
    return fields(b"sealedml/v1/request-key", service_key, model_id, user_id)


def release_info(challenge_id: str, runtime_key: bytes) -> bytes:
    """HPKE info for released keys sealed to a runtime."""
    return fields(b"sealedml/v1/release", challenge_id, runtime_key)


def service_key_binding(hpke_public_key: bytes, signing_public_key: bytes) -> bytes:
    """The public-key bytes a KeyService's evidence binds (with the verifier's nonce).

    Both of its per-process keys: the HPKE key clients seal secrets to, and the
    Ed25519 key it signs release answers and audit heads with.
    """
    return fields(b"sealedml/v1/keyservice-keys", hpke_public_key, signing_public_key)


def release_answer_message(
    service_id: str,
    challenge_id: str,
    runtime_key: bytes,
    sealed: bytes,
    expires_at: int,
    lease_ttl: int,
    *,
    label: bytes = b"sealedml/v1/release-answer",
) -> bytes:
    """What a KeyService signs in a release answer.

    HPKE base mode does not authenticate the sender: anyone can seal keys to a
    runtime's public key. The signature by the attested KeyService key, over the
    challenge, the runtime key the answer is sealed to and the sealed bytes, is
    what tells the runtime the leases come from the KeyService it attested.
    """
    return fields(
        label,
        service_id,
        challenge_id,
        runtime_key,
        hashlib.sha256(sealed).digest(),
        expires_at,
        lease_ttl,
    )


def audit_head_message(
    service_id: str, records: int, head: str, at: int | None, at_hash: str | None, issued_at: int
) -> bytes:
    """What a KeyService signs when it exports the head of its audit chain (``at = 0`` when not asked)."""
    return fields(b"sealedml/v1/audit-head", service_id, records, head, at or 0, at_hash or "", issued_at)


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AttestationResponse(_Msg):
    """``GET /v1/attestation?nonce=HEX``: the KeyService proves what it runs.

    The evidence binds the nonce and :func:`service_key_binding` of both keys.
    ``kem`` names the HPKE KEM of ``hpke_public_key``; ``accepts`` the runtime TEE
    types this KeyService verifies; ``unsafe_allow_simulated`` says it accepts
    simulated evidence beside hardware TEEs (for development only).
    """

    service_id: str
    tee: str
    evidence: B64
    aux: B64 = ""
    hpke_public_key: B64
    signing_public_key: B64
    kem: str
    measurement: Hex
    accepts: list[TeeName]
    unsafe_allow_simulated: bool = False


class RegisterRequest(_Msg):
    """``POST /v1/principals`` (signed with the key being registered)."""

    public_key: B64
    proof: B64


class TensorInfo(_Msg):
    """One model input or output: name, numpy dtype name, shape (None: a symbolic dimension)."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    dtype: Annotated[str, Field(min_length=1, max_length=32)]
    shape: Annotated[list[int | None], Field(max_length=16)]


class ModelSignature(_Msg):
    """A model version's inputs and outputs, as the owner's ONNX Runtime (or LiteRT) loaded them."""

    inputs: Annotated[list[TensorInfo], Field(max_length=256)]
    outputs: Annotated[list[TensorInfo], Field(min_length=1, max_length=256)]


class ModelKeyRequest(_Msg):
    """``POST /v1/models/{id}/keys``: the owner uploads the key of one model version."""

    model_version: Annotated[int, Field(ge=1, le=2**53)]
    sealed_key: B64
    service_key: B64
    #: The version is partitioned (front and back sealed, the middle run outside the TEE):
    #: the SHA-256 of its partition manifest. Users must accept that before a release.
    partition_sha256: Sha256Hex | None = None
    #: The version's inputs and outputs (``model info`` shows them to the owner and granted users).
    signature: ModelSignature | None = None


class RuntimeRef(_Msg):
    """A runtime measurement of one TEE type.

    Without ``tee`` the KeyService's only accepted TEE type is meant; a KeyService
    that accepts several refuses it (a measurement must never be satisfiable by
    evidence of another TEE type).
    """

    tee: TeeName | None = None
    measurement: Measurement


class AllowRuntimeRequest(_Msg):
    """``POST /v1/models/{id}/runtimes``: allow (or disallow) a runtime measurement of one TEE type."""

    tee: TeeName | None = None
    measurement: Measurement
    allow: bool = True


class GrantRequest(_Msg):
    """``POST /v1/models/{id}/grants``: grant (or revoke) a user."""

    user_id: Identifier
    grant: bool = True


class ConsentRequest(_Msg):
    """``POST /v1/models/{id}/consent``: a user's request key and the runtimes it may reach."""

    sealed_request_key: B64
    service_key: B64
    runtimes: Annotated[list[RuntimeRef], Field(min_length=1, max_length=64)]
    #: Whether the user accepts partitioned execution: representations of their inputs
    #: computed on, outside the TEE, by the middle of a partitioned model.
    accept_partitioned: bool = False


class ConsentSummary(_Msg):
    """One user's consent, as the model's owner sees it (never the request key)."""

    user_id: str
    runtimes: list[str]
    accept_partitioned: bool


#: Why a granted user's requests would be denied now (their own pair only), or ``ok``.
ACCESS_CATEGORIES = ("ok", "not_enabled", "no_runtime_allowed", "no_common_runtime", "partition_not_accepted")


class ModelInfoResponse(_Msg):
    """``POST /v1/models/{id}/info``: what the caller may know about a model.

    Strangers (neither owner nor granted) get ``denied`` and nothing else. A granted user
    also sees the runtimes the owner allows and ``access``: whether their own requests can
    be served, or the category of the reason they cannot. The owner also sees every grant
    and every consent (runtimes and partition acceptance, never keys).
    """

    model_id: str
    current_version: int
    is_owner: bool
    granted: bool
    consented: bool
    #: The current version is partitioned: its middle layers (weights visible to the cloud)
    #: run outside the TEE on intermediate representations of the users' inputs.
    partitioned: bool = False
    partition_sha256: Sha256Hex | None = None
    #: The caller's consent accepts partitioned execution.
    accepts_partitioned: bool = False
    #: Runtimes the owner allows, as ``TEE:measurement`` (owner and granted users).
    allowed_runtimes: list[str] = Field(default_factory=list)
    #: For a user: one of :data:`ACCESS_CATEGORIES`, with what to do about it.
    access: str | None = None
    access_hint: str | None = None
    #: The current version's inputs and outputs, as its owner sealed it (None: not recorded).
    inputs: list[TensorInfo] | None = None
    outputs: list[TensorInfo] | None = None
    #: Owner only: the granted users and every user's consent.
    grants: list[str] | None = None
    consents: list[ConsentSummary] | None = None


class ModelSummary(_Msg):
    """One of the caller's models (``POST /v1/models/list``)."""

    model_id: str
    current_version: int
    partitioned: bool


class ModelListResponse(_Msg):
    """``POST /v1/models/list`` (signed): the models the caller owns."""

    models: list[ModelSummary]


class ModelAuditRequest(_Msg):
    """``POST /v1/models/{id}/audit`` (owner only): audit records about the model after ``since``."""

    since: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=1000)


class ModelAuditRecord(_Msg):
    """One audit record about the model: its sequence number, time and event (other models' pairs removed)."""

    seq: int
    ts: float
    event: dict[str, Any]


class ModelAuditResponse(_Msg):
    """A page of the model's audit records; ``next_since`` continues it (None: the end of the log)."""

    model_id: str
    records: list[ModelAuditRecord]
    next_since: int | None


class ChallengeResponse(_Msg):
    """``POST /v1/release/challenge``: a single-use nonce for one release."""

    challenge_id: str
    nonce: B64
    expires_in: int


class EvidenceMessage(_Msg):
    """Attestation evidence on the wire."""

    tee: Literal["simulated", "sgx", "tdx", "sev-snp"]
    data: B64
    aux: B64 = ""


class ReleasePair(_Msg):
    """One (model, user) pair whose keys a runtime asks for."""

    model_id: Identifier
    user_id: Identifier


class ReleaseRequest(_Msg):
    """``POST /v1/release``: evidence bound to the challenge nonce and the runtime's HPKE key."""

    challenge_id: Annotated[str, Field(max_length=64)]
    evidence: EvidenceMessage
    runtime_key: B64
    pairs: Annotated[list[ReleasePair], Field(min_length=1, max_length=MAX_PAIRS)]


class ReleaseResponse(_Msg):
    """Released keys, HPKE-sealed to the runtime key, valid until ``expires_at``.

    ``signature``: Ed25519 by the KeyService's attested signing key over
    :func:`release_answer_message`. ``next_challenge``: a fresh challenge for
    the runtime's next release, so that a release in steady state is one round
    trip (a challenge is single-use and unpredictable, not secret: receiving it
    here rather than from ``/v1/release/challenge`` changes nothing it proves).
    """

    sealed: B64
    expires_at: int
    lease_ttl: int
    signature: B64
    next_challenge: ChallengeResponse | None = None


class AuditHeadRequest(_Msg):
    """``POST /v1/audit/head``: ask for the head of the audit chain, and the hash of record ``at``."""

    at: Annotated[int, Field(ge=1, le=2**62)] | None = None


class AuditHeadResponse(_Msg):
    """The head of the audit chain, signed by the attested KeyService key.

    Whoever keeps a head ``(records=n, head=h)`` can later check that the log was
    neither truncated nor rolled back nor rewritten: ask again with ``at=n``; the
    answer must count at least ``n`` records and give ``h`` as the hash of record ``n``.
    """

    service_id: str
    records: int
    head: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    at: int | None = None
    at_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    issued_at: int
    signature: B64
