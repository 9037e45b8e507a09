"""KeyService replicas: a new instance joins by attesting to a running one and receives the master key.

Replicas share one store (PostgreSQL) and one master key; each keeps the master key sealed to
its own TEE in its own data directory. The join is the release protocol turned on the KeyService
itself, attested both ways:

1. the joiner attests the running instance (its evidence, its measurement against the joiner's
   trust — by default this build's KeyService measurement);
2. it takes a challenge and sends evidence binding the challenge nonce and a fresh HPKE key
   (``POST /v1/replicas/join``);
3. the running instance verifies that evidence, and accepts a joiner whose TEE type and
   measurement are its own, or listed in ``replica_measurements`` (an upgrade to a new build);
4. it answers with the master key HPKE-sealed to the joiner's key, signed by its attested
   signing key; the joiner checks the signature and seals the key to itself.

Every join is audited (``replica_join``) with its decision and reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from sealedml._internal.encoding import b64d, b64e, fields
from sealedml._internal.paths import write_private_file_once
from sealedml.attestation.base import Attester
from sealedml.attestation.sealing import Sealer
from sealedml.crypto import HpkeKem, HpkePrivateKey, HpkePublicKey, hpke_seal, verify_signature
from sealedml.errors import AccessDenied, ConfigurationError, CryptoError, ProtocolError, SignatureError
from sealedml.keyservice.access import Denial
from sealedml.protocol import keyservice as p

if TYPE_CHECKING:
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.keyservice.service import KeyService

__all__ = ["JoinRequest", "handle_join", "join_master_key"]

_LABEL = b"sealedml/v1/replica-join"


class JoinRequest(BaseModel):
    """``POST /v1/replicas/join``: the joiner's evidence over the challenge nonce and its HPKE key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    challenge_id: str
    evidence: p.EvidenceMessage
    joiner_key: p.B64


def _answer_message(service_id: str, challenge_id: str, joiner_key: bytes, sealed: bytes) -> bytes:
    return fields(_LABEL + b"-answer", service_id, challenge_id, joiner_key, sealed)


def handle_join(service: KeyService, req: JoinRequest, replica_measurements: frozenset[str]) -> dict[str, Any]:
    """Verify a joiner and return the master key sealed to it (see the module docstring).

    Raises:
        AccessDenied: opaque; the audit log has the reason.
    """
    event: dict[str, Any] = {"action": "replica_join", "challenge_id": req.challenge_id}
    try:
        claims, joiner_key = service.verified_claims(req.challenge_id, req.evidence, req.joiner_key, event)
        own = service.attester
        if claims.tee is not own.tee:
            raise Denial(f"joiner runs in {claims.tee.value}, this KeyService in {own.tee.value}")
        if claims.measurement != own.measurement and claims.measurement not in replica_measurements:
            raise Denial(f"joiner measurement {claims.measurement} is neither this KeyService's nor allowed")
        info = fields(_LABEL, req.challenge_id, joiner_key)
        sealed = hpke_seal(HpkePublicKey.from_bytes(joiner_key), service.master.export_for_replica(), info)
    except Denial as deny:
        service.store.audit({**event, "decision": "deny", "reason": deny.reason})
        raise AccessDenied() from None
    except CryptoError:
        service.store.audit({**event, "decision": "deny", "reason": "unusable joiner key"})
        raise AccessDenied() from None
    service.store.audit({**event, "decision": "allow", "reason": "joiner attested with an allowed measurement"})
    signature = service.sign(_answer_message(service.service_id, req.challenge_id, joiner_key, sealed))
    return {"sealed": b64e(sealed), "signature": b64e(signature), "service_id": service.service_id}


def join_master_key(existing: KeyServiceClient, attester: Attester, sealer: Sealer, data_dir: Path) -> None:
    """Receive the master key from the running KeyService ``existing`` and seal it into ``data_dir``.

    Raises:
        ConfigurationError: ``data_dir`` already holds a master key.
        AttestationError: ``existing`` is not a KeyService this build trusts.
        AccessDenied: ``existing`` refused this instance (its audit log says why).
        ProtocolError: the answer is not signed by the attested KeyService, or does not open.
    """
    from sealedml.keyservice.service import MASTER_FILE

    path = data_dir / MASTER_FILE
    if path.exists():
        raise ConfigurationError(f"{path} exists: this data directory already has a master key (no join needed)")
    attested = existing.attest()
    challenge = p.ChallengeResponse.model_validate(existing.post("/v1/release/challenge"))
    key = HpkePrivateKey(HpkeKem.MLKEM768_X25519)
    joiner_key = key.public_key.to_bytes()
    evidence = attester.attest(b64d(challenge.nonce), joiner_key)
    request = JoinRequest(
        challenge_id=challenge.challenge_id,
        evidence=p.EvidenceMessage(tee=evidence.tee.value, data=b64e(evidence.data), aux=b64e(evidence.aux)),
        joiner_key=b64e(joiner_key),
    )
    answer = existing.post("/v1/replicas/join", request)
    try:
        sealed = b64d(str(answer["sealed"]))
        message = _answer_message(attested.service_id, challenge.challenge_id, joiner_key, sealed)
        verify_signature(attested.signing_key, b64d(str(answer["signature"])), message)
        master = key.open(sealed, fields(_LABEL, challenge.challenge_id, joiner_key))
    except (SignatureError, CryptoError, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError("join answer is not signed by the attested KeyService, or does not open") from exc
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file_once(path, sealer.seal(master, label="keyservice-master"))
