"""The KeyService's logic, apart from HTTP: registration, ownership, grants,
consent, and the attestation-gated release protocol.

Order is enforced on the way in (python-tuf's TrustedMetadataSet idea):
challenge → evidence → claims → binding → access decision → release. Every
decision is appended to the hash-chained audit log with its exact reason;
callers only ever see :class:`~sealedml.errors.AccessDenied` ("denied").

The KeyService holds two keys per process, both bound into its attestation
evidence: an HPKE key (hybrid ML-KEM-768 + X25519 by default) that owners,
users and runtimes seal secrets to, and an Ed25519 key that signs every release
answer — HPKE base mode does not authenticate the sender, so without the
signature anyone between a runtime and the KeyService could answer a release
with keys of its own choosing.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sealedml._internal.encoding import b64d, b64e, fields
from sealedml._internal.paths import write_private_file_once
from sealedml.attestation.base import Attester, Claims, Evidence, TeeType, Verifier, check_binding
from sealedml.attestation.policy import Policy
from sealedml.attestation.sealing import Sealer
from sealedml.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    HpkeKem,
    HpkePrivateKey,
    HpkePublicKey,
    SigningKey,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
    hpke_open,
    hpke_seal,
    random_bytes,
    verify_signature,
)
from sealedml.errors import (
    AccessDenied,
    AttestationError,
    AuthenticationError,
    ConfigurationError,
    Conflict,
    CryptoError,
    NotFound,
    Overloaded,
    ProtocolError,
    SignatureError,
    StoreError,
)
from sealedml.keyservice import views
from sealedml.keyservice.access import Denial, PairState, decide_pair
from sealedml.keyservice.challenges import ChallengeTable, MemoryChallenges, StoreChallenges
from sealedml.keyservice.rows import RowKey, RowTamperedError
from sealedml.keyservice.sessions import SessionService
from sealedml.keyservice.store import AuditAnchor, KeyStore, RuntimeId
from sealedml.protocol import keyservice as p

__all__ = ["KeyService", "MasterKey", "attestation_response", "check_tee_mix", "load_master_key"]

log = logging.getLogger(__name__)

MASTER_FILE = "master.sealed"


class MasterKey:
    """The KeyService master key: wraps every secret at rest. ``repr`` hides it."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise StoreError("master key must be 32 bytes")
        self._key = key

    def wrap(self, secret: bytes, *context: str | int) -> bytes:
        """Encrypt ``secret`` bound to ``context`` (table, ids)."""
        nonce = random_bytes(NONCE_SIZE)
        return nonce + aead_encrypt(self._key, nonce, secret, fields(b"sealedml/v1/at-rest", *context))

    def unwrap(self, wrapped: bytes, *context: str | int) -> bytes:
        """Decrypt a wrapped secret; raises :class:`StoreError` if it was tampered or moved."""
        try:
            return aead_decrypt(
                self._key, wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], fields(b"sealedml/v1/at-rest", *context)
            )
        except CryptoError as exc:
            raise StoreError("wrapped secret failed authentication") from exc

    def derive(self, label: str) -> bytes:
        """A 32-byte key for one purpose (e.g. ``"audit-anchor"``), independent of the wrapping key."""
        return hkdf_sha256(self._key, info=fields(b"sealedml/v1/master-derived", label))

    def audit_anchor(self) -> AuditAnchor:
        """The anchor that authenticates the audit chain's head."""
        return AuditAnchor(self.derive("audit-anchor"))

    def export_for_replica(self) -> bytes:
        """The raw key, only to be HPKE-sealed to an attested replica (``keyservice/replicas.py``)."""
        return self._key

    def row_key(self) -> RowKey:
        """The key that tags access-control rows in the store (``keyservice/rows.py``)."""
        return RowKey(self.derive("row-tags"))

    def __repr__(self) -> str:
        return "MasterKey(…)"


def check_tee_mix(accepted: Iterable[TeeType], *, unsafe_allow_simulated: bool = False) -> None:
    """Refuse a KeyService that would accept simulated evidence beside a hardware TEE.

    Whoever holds a host's simulated platform root (anyone with that host's
    files) can forge simulated evidence for any measurement. Beside hardware
    TEEs that is a way around them, so it needs an explicit, logged opt-in.

    Raises:
        ConfigurationError: the mix without ``unsafe_allow_simulated``.
    """
    kinds = set(accepted)
    hardware = sorted(t.value for t in kinds - {TeeType.SIMULATED})
    if TeeType.SIMULATED in kinds and hardware:
        if not unsafe_allow_simulated:
            raise ConfigurationError(
                f"refusing to accept simulated evidence beside {', '.join(hardware)}: anyone with this host's "
                "simulated platform root could forge it; pass --unsafe-allow-simulated for development only"
            )
        log.warning(
            "UNSAFE: this KeyService accepts SIMULATED evidence beside %s (--unsafe-allow-simulated); "
            "simulated evidence has no hardware protection",
            ", ".join(hardware),
        )


def load_master_key(data_dir: Path, sealer: Sealer) -> MasterKey:
    """Unseal the master key from ``data_dir``, creating and sealing one on first start.

    Raises:
        StoreError: the sealed master key belongs to another build or platform.
    """
    path = data_dir / MASTER_FILE
    if not path.exists():
        fresh = random_bytes(KEY_SIZE)
        write_private_file_once(path, sealer.seal(fresh, label="keyservice-master"))
    return MasterKey(sealer.unseal(path.read_bytes(), label="keyservice-master"))


def attestation_response(
    attester: Attester,
    nonce: bytes,
    *,
    service_id: str,
    hpke_public: bytes,
    signing_public: bytes,
    kem: HpkeKem,
    accepts: list[p.TeeName],
    unsafe_allow_simulated: bool,
) -> p.AttestationResponse:
    """Evidence binding a client's ``nonce`` to a KeyService's HPKE and signing keys (a running one,
    or one recovering its master key: clients verify both the same way).

    Raises:
        ProtocolError: a nonce shorter than 16 or longer than 64 bytes.
    """
    if not 16 <= len(nonce) <= 64:
        raise ProtocolError("nonce must be 16 to 64 bytes")
    evidence = attester.attest(nonce, p.service_key_binding(hpke_public, signing_public))
    return p.AttestationResponse(
        service_id=service_id,
        tee=evidence.tee.value,
        evidence=b64e(evidence.data),
        aux=b64e(evidence.aux),
        hpke_public_key=b64e(hpke_public),
        signing_public_key=b64e(signing_public),
        kem=kem.name,
        measurement=attester.measurement,
        accepts=accepts,
        unsafe_allow_simulated=unsafe_allow_simulated,
    )


class KeyService:
    """KeyService operations over a :class:`KeyStore`.

    Args:
        store: persistent state.
        master: the unsealed master key.
        attester: this KeyService's own attester (clients verify it).
        verifiers: verifiers for the runtime TEE types this deployment accepts.
        lease_ttl: seconds released keys stay valid in a runtime (at most
            :data:`~sealedml.protocol.keyservice.MAX_LEASE_TTL`).
        challenge_ttl: seconds a release challenge stays usable.
        max_challenges: outstanding challenges before new ones are refused (429).
        policy: the operator's policy (TCB, debug, SVNs) on top of owners' and users' lists.
        kem: the KEM of this KeyService's HPKE key (hybrid post-quantum by default:
            model and request keys are long-lived secrets worth recording now and
            decrypting later).
        unsafe_allow_simulated: accept simulated evidence beside hardware TEEs
            (development only; see :func:`check_tee_mix`).

    Raises:
        ConfigurationError: simulated beside hardware TEEs without the opt-in, or a bad lease TTL.
        StoreError: the store's audit log does not match its anchor (truncated or rolled back).
    """

    def __init__(
        self,
        store: KeyStore,
        master: MasterKey,
        attester: Attester,
        verifiers: Mapping[TeeType, Verifier],
        *,
        lease_ttl: int = 60,
        challenge_ttl: int = 60,
        max_challenges: int = 10_000,
        policy: Policy | None = None,
        kem: HpkeKem = HpkeKem.MLKEM768_X25519,
        unsafe_allow_simulated: bool = False,
    ) -> None:
        if not 1 <= lease_ttl <= p.MAX_LEASE_TTL:
            raise ConfigurationError(f"lease TTL must be 1 to {p.MAX_LEASE_TTL} seconds")
        check_tee_mix(verifiers, unsafe_allow_simulated=unsafe_allow_simulated)
        self.store = store
        self._master = master
        self.attester = attester
        self.verifiers = dict(verifiers)
        self.unsafe_allow_simulated = unsafe_allow_simulated
        self.lease_ttl = lease_ttl
        self.policy = policy
        self.challenge_ttl = challenge_ttl
        # A truncated or rolled-back audit log is refused before the service does anything.
        store.check_audit_anchor()
        self.service_id = store.set_meta_once("service_id", secrets.token_hex(16))
        self._hpke = HpkePrivateKey(kem)
        self._hpke_public = self._hpke.public_key.to_bytes()
        self._signer = SigningKey.generate()
        self._key_binding = p.service_key_binding(self._hpke_public, self._signer.public_bytes)
        # Replicas sharing a store share their challenges: a runtime may ask one and answer another.
        self._challenges: ChallengeTable = (
            StoreChallenges(store, master.derive("challenge-nonces"))
            if store.shares_challenges
            else MemoryChallenges(max_challenges)
        )
        #: Sessions (secureTF's CAS): documents, secrets, bundles for attested programs, volume roots.
        self.sessions = SessionService(self)

    @property
    def kem(self) -> HpkeKem:
        """The KEM of this KeyService's HPKE key."""
        return self._hpke.kem

    @property
    def accepted_tees(self) -> list[TeeType]:
        """The runtime TEE types this KeyService verifies, in a stable order."""
        return sorted(self.verifiers, key=lambda t: t.value)

    # ------------------------------------------------------------------ attestation of the service itself
    def attestation(self, nonce: bytes) -> p.AttestationResponse:
        """Evidence binding a client's ``nonce`` to this KeyService's HPKE and signing keys."""
        return attestation_response(
            self.attester,
            nonce,
            service_id=self.service_id,
            hpke_public=self._hpke_public,
            signing_public=self._signer.public_bytes,
            kem=self.kem,
            accepts=[t.value for t in self.accepted_tees],
            unsafe_allow_simulated=self.unsafe_allow_simulated,
        )

    def audit_head(self, principal: str, req: p.AuditHeadRequest) -> p.AuditHeadResponse:
        """The anchored head of the audit chain (and the hash of record ``req.at``), signed.

        Raises:
            StoreError: the log does not match its anchor.
            NotFound: ``req.at`` is beyond the last record.
        """
        head = self.store.check_audit_anchor()
        at_hash = None
        if req.at is not None:
            if req.at > head.records:
                raise NotFound(f"the audit log has {head.records} record(s)")
            record = next(iter(self.store.audit_records(since=req.at - 1)), None)
            if record is None or record.seq != req.at:
                raise StoreError("audit log has a gap (tampered)")
            at_hash = record.hash
        issued_at = int(time.time())
        message = p.audit_head_message(self.service_id, head.records, head.head, req.at, at_hash, issued_at)
        return p.AuditHeadResponse(
            service_id=self.service_id,
            records=head.records,
            head=head.head,
            at=req.at,
            at_hash=at_hash,
            issued_at=issued_at,
            signature=b64e(self._signer.sign(message)),
        )

    def _runtime_id(self, tee: str | None, measurement: str) -> RuntimeId:
        """A measurement bound to a TEE type; no type means this KeyService's only accepted one.

        Raises:
            ProtocolError: no type given and this KeyService accepts several (or none),
                or a type it does not accept.
        """
        accepted = self.accepted_tees
        if tee is None:
            if len(accepted) != 1:
                names = ", ".join(t.value for t in accepted) or "none"
                raise ProtocolError(f"this KeyService accepts several TEE types ({names}): name one (--tee)")
            return RuntimeId(accepted[0], measurement)
        kind = TeeType(tee)
        if kind not in self.verifiers:
            names = ", ".join(t.value for t in accepted) or "none"
            raise ProtocolError(f"this KeyService does not accept {kind.value} runtimes (it accepts {names})")
        return RuntimeId(kind, measurement)

    # ------------------------------------------------------------------ signed calls
    def authenticate(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, *, public_key: bytes | None = None
    ) -> str:
        """Verify a signed call; return the caller's principal id.

        ``public_key`` is given for registration (the key being registered signs).

        Raises:
            AuthenticationError: missing headers, unknown principal, bad signature,
                stale timestamp or a replayed nonce.
        """
        principal = headers.get(p.HDR_PRINCIPAL, "")
        try:
            timestamp = int(headers.get(p.HDR_TIMESTAMP, ""))
            nonce = headers.get(p.HDR_NONCE, "")
            signature = b64d(headers.get(p.HDR_SIGNATURE, ""))
        except ValueError as exc:
            raise AuthenticationError("missing or malformed signature headers") from exc
        if not principal or not 16 <= len(nonce) <= 64 or not nonce.isalnum() or not -(2**62) < timestamp < 2**62:
            raise AuthenticationError("missing or malformed signature headers")
        key = public_key if public_key is not None else self.store.principal_key(principal)
        if key is None:
            self._audit_auth_failure(principal, path, "unknown principal")
            raise AuthenticationError(
                f"unknown principal {principal[:16]}…: register it first "
                "(`sealedml register --identity FILE --keyservice URL`)"
            )
        if public_key is not None and p.principal_id_for(public_key) != principal:
            raise AuthenticationError("principal id does not match the public key")
        try:
            verify_signature(
                key, signature, p.signed_call_message(method, path, timestamp, nonce, body, self.service_id)
            )
        except SignatureError as exc:
            self._audit_auth_failure(principal, path, "bad signature")
            raise AuthenticationError("bad signature") from exc
        if abs(time.time() - timestamp) > p.SIGNED_CALL_WINDOW:
            self._audit_auth_failure(principal, path, "stale timestamp")
            raise AuthenticationError("timestamp outside the accepted window")
        if not self.store.use_nonce(principal, nonce, timestamp, horizon=2 * p.SIGNED_CALL_WINDOW):
            self._audit_auth_failure(principal, path, "replayed nonce")
            raise AuthenticationError("replayed call")
        return principal

    def _audit_auth_failure(self, principal: str, path: str, reason: str) -> None:
        self.store.audit(
            {
                "action": "authenticate",
                "principal": principal[:64],
                "path": path[:200],
                "decision": "deny",
                "reason": reason,
            }
        )

    # ------------------------------------------------------------------ principals
    def register(self, headers: Mapping[str, str], path: str, body: bytes, req: p.RegisterRequest) -> str:
        """Register the key in ``req``; the call must be signed by it and carry a proof of possession."""
        try:
            public_key, proof = b64d(req.public_key), b64d(req.proof)
        except ValueError as exc:
            raise ProtocolError("malformed key or proof") from exc
        if len(public_key) != 32:
            raise ProtocolError("public key must be 32 bytes (Ed25519)")
        principal = self.authenticate("POST", path, headers, body, public_key=public_key)
        try:
            verify_signature(public_key, proof, p.registration_message(self.service_id, public_key))
        except SignatureError as exc:
            self.store.audit(
                {"action": "register", "principal": principal, "decision": "deny", "reason": "bad proof of possession"}
            )
            raise AuthenticationError("proof of possession does not verify") from exc
        created = self.store.add_principal(
            principal,
            public_key,
            {
                "action": "register",
                "principal": principal,
                "decision": "allow",
                "reason": "proof of possession verified",
            },
        )
        log.info("principal %s %s", principal, "registered" if created else "already registered")
        return principal

    # ------------------------------------------------------------------ owner operations
    def open_to_service(self, sealed_b64: str, service_key_b64: str, info: bytes) -> bytes:
        """Open a secret an owner or user sealed to this KeyService's HPKE key."""
        if service_key_b64 != b64e(self._hpke_public):
            # The client attested an earlier incarnation of this service: ask it to re-attest.
            raise Conflict("KeyService key changed: re-attest and retry")
        try:
            return hpke_open(self._hpke, b64d(sealed_b64), info)
        except (ValueError, CryptoError) as exc:
            raise ProtocolError("sealed secret does not open") from exc

    def upload_model_key(self, principal: str, model_id: str, req: p.ModelKeyRequest) -> None:
        """Store the key of a model version; the first uploader becomes the owner."""
        key = self.open_to_service(
            req.sealed_key, req.service_key, p.model_key_info(self._hpke_public, model_id, req.model_version, principal)
        )
        if len(key) != KEY_SIZE:
            raise ProtocolError("model key must be 32 bytes")
        wrapped = self._master.wrap(key, "model", model_id, req.model_version)
        event = {
            "action": "upload_model_key",
            "principal": principal,
            "model_id": model_id,
            "version": req.model_version,
            "partition_sha256": req.partition_sha256,
        }
        try:
            self.store.put_model_key(
                model_id,
                principal,
                req.model_version,
                wrapped,
                {**event, "decision": "allow", "reason": "owner"},
                partition_sha256=req.partition_sha256,
                signature=req.signature.model_dump_json() if req.signature is not None else None,
            )
        except Conflict as exc:
            record = self.store.model(model_id)
            if record is not None and record.owner_id != principal:
                self.store.audit({**event, "decision": "deny", "reason": "not the owner"})
                raise AccessDenied() from exc
            self.store.audit({**event, "decision": "deny", "reason": str(exc)})
            raise

    def _require_owner(self, principal: str, model_id: str, action: str, extra: Mapping[str, Any]) -> None:
        record = self.store.model(model_id)
        if record is None or record.owner_id != principal:
            reason = "no such model" if record is None else "not the owner"
            self.store.audit(
                {
                    "action": action,
                    "principal": principal,
                    "model_id": model_id,
                    **extra,
                    "decision": "deny",
                    "reason": reason,
                }
            )
            raise AccessDenied()

    def allow_runtime(self, principal: str, model_id: str, req: p.AllowRuntimeRequest) -> None:
        """Allow or disallow a runtime (TEE type + measurement) for the caller's model."""
        extra = {"tee": req.tee, "measurement": req.measurement.lower(), "allow": req.allow}
        self._require_owner(principal, model_id, "allow_runtime", extra)
        runtime = self._runtime_id(req.tee, req.measurement)
        extra["tee"] = runtime.tee.value
        self.store.set_runtime_allowed(
            model_id,
            runtime,
            req.allow,
            {
                "action": "allow_runtime",
                "principal": principal,
                "model_id": model_id,
                **extra,
                "decision": "allow",
                "reason": "owner",
            },
        )

    def grant(self, principal: str, model_id: str, req: p.GrantRequest) -> None:
        """Grant or revoke a user's access to the caller's model.

        Raises:
            NotFound: a grant to a principal that is not registered (a typo would otherwise
                grant nobody, silently).
        """
        action = "grant" if req.grant else "revoke"
        self._require_owner(principal, model_id, action, {"user_id": req.user_id})
        if req.grant and self.store.principal_key(req.user_id) is None:
            self.store.audit(
                {
                    "action": action,
                    "principal": principal,
                    "model_id": model_id,
                    "user_id": req.user_id,
                    "decision": "deny",
                    "reason": "no such principal",
                }
            )
            raise NotFound(
                f"no principal {req.user_id} is registered: the user must first run `sealedml register` "
                "(check the id you were given)"
            )
        self.store.set_grant(
            model_id,
            req.user_id,
            req.grant,
            {
                "action": action,
                "principal": principal,
                "model_id": model_id,
                "user_id": req.user_id,
                "decision": "allow",
                "reason": "owner",
            },
        )

    # ------------------------------------------------------------------ user operations
    def consent(self, principal: str, model_id: str, req: p.ConsentRequest) -> None:
        """Store the caller's request key for a model and the runtimes it may reach."""
        if self.store.model(model_id) is None:
            self.store.audit(
                {
                    "action": "consent",
                    "principal": principal,
                    "model_id": model_id,
                    "decision": "deny",
                    "reason": "no such model",
                }
            )
            raise AccessDenied()  # opaque: existence of model ids is not revealed
        runtimes = sorted({self._runtime_id(r.tee, r.measurement) for r in req.runtimes})
        key = self.open_to_service(
            req.sealed_request_key, req.service_key, p.consent_info(self._hpke_public, model_id, principal)
        )
        if len(key) != KEY_SIZE:
            raise ProtocolError("request key must be 32 bytes")
        wrapped = self._master.wrap(key, "request", model_id, principal)
        self.store.set_consent(
            model_id,
            principal,
            wrapped,
            runtimes,
            {
                "action": "consent",
                "principal": principal,
                "model_id": model_id,
                "runtimes": [f"{r.tee.value}:{r.measurement}" for r in runtimes],
                "accept_partitioned": req.accept_partitioned,
                "decision": "allow",
                "reason": "user",
            },
            accept_partitioned=req.accept_partitioned,
        )

    def model_info(self, principal: str, model_id: str) -> p.ModelInfoResponse:
        """What the caller may know of a model (owner, or a granted user): see ``keyservice/views.py``."""
        return views.model_info(self.store, principal, model_id, self._pair_state)

    def model_audit(self, principal: str, model_id: str, req: p.ModelAuditRequest) -> p.ModelAuditResponse:
        """The audit records about the caller's model (owner only), a page at a time."""
        return views.model_audit(self.store, principal, model_id, req)

    def list_models(self, principal: str) -> p.ModelListResponse:
        """The models the caller owns."""
        return views.list_models(self.store, principal)

    def delete_model(self, principal: str, model_id: str) -> None:
        """Delete the caller's model: its keys, allowed runtimes, grants and consents (owner only)."""
        views.delete_model(self.store, principal, model_id)

    # ------------------------------------------------------------------ release protocol
    def challenge(self) -> p.ChallengeResponse:
        """Issue a single-use nonce for one release."""
        cid, nonce = self._challenges.issue(self.challenge_ttl)
        return p.ChallengeResponse(challenge_id=cid, nonce=b64e(nonce), expires_in=self.challenge_ttl)

    def _consume_challenge(self, challenge_id: str) -> bytes | None:
        return self._challenges.consume(challenge_id)

    def release(self, req: p.ReleaseRequest) -> p.ReleaseResponse:
        """Verify evidence and access rights; return keys sealed to the runtime.

        Raises:
            AccessDenied: always opaque; the audit log has the reason.
        """
        pairs = [(x.model_id, x.user_id) for x in req.pairs]
        event: dict[str, Any] = {
            "action": "release",
            "pairs": [list(x) for x in pairs],
            "challenge_id": req.challenge_id,
        }
        try:
            payload = self._decide_release(req, event)
        except Denial as deny:
            self.store.audit({**event, "decision": "deny", "reason": deny.reason})
            log.info("release denied (see audit log)")
            raise AccessDenied() from None
        expires_at = int(time.time()) + self.lease_ttl
        payload["expires_at"] = expires_at
        raw_key = b64d(req.runtime_key)
        runtime_key = HpkePublicKey.from_bytes(raw_key)
        try:
            sealed = hpke_seal(runtime_key, json.dumps(payload).encode(), p.release_info(req.challenge_id, raw_key))
        except CryptoError:  # e.g. a low-order X25519 point: evidence may bind it, HPKE cannot use it
            self.store.audit({**event, "decision": "deny", "reason": "unusable runtime key"})
            raise AccessDenied() from None
        self.store.audit(
            {**event, "decision": "allow", "reason": "evidence, grant and consent verified", "expires_at": expires_at}
        )
        message = p.release_answer_message(
            self.service_id, req.challenge_id, raw_key, sealed, expires_at, self.lease_ttl
        )
        return p.ReleaseResponse(
            sealed=b64e(sealed),
            expires_at=expires_at,
            lease_ttl=self.lease_ttl,
            signature=b64e(self._signer.sign(message)),
            next_challenge=self._next_challenge(),
        )

    def _next_challenge(self) -> p.ChallengeResponse | None:
        """A challenge for the runtime's next release, or None when the table is full."""
        try:
            return self.challenge()
        except Overloaded:
            return None

    def verified_claims(
        self, challenge_id: str, evidence_message: p.EvidenceMessage, runtime_key_b64: str, event: dict[str, Any]
    ) -> tuple[Claims, bytes]:
        """Challenge → evidence → claims → binding: the verified claims and the runtime's HPKE key.

        Shared by model and session releases. ``event`` receives what the audit record names.

        Raises:
            Denial: with the exact reason, for the audit log only.
        """
        nonce = self._consume_challenge(challenge_id)
        if nonce is None:
            raise Denial("unknown, reused or expired challenge")
        try:
            runtime_key = b64d(runtime_key_b64)
            # Recorded with every decision: a runtime may still offer an X25519-only key.
            event["kem"] = HpkePublicKey.from_bytes(runtime_key).kem.name
            evidence = Evidence(TeeType(evidence_message.tee), b64d(evidence_message.data), b64d(evidence_message.aux))
        except (ValueError, CryptoError) as exc:
            raise Denial(f"malformed release request: {type(exc).__name__}") from None
        verifier = self.verifiers.get(evidence.tee)
        if verifier is None:
            raise Denial(f"TEE type {evidence.tee.value} not accepted by this KeyService")
        try:
            claims = verifier.verify(evidence)
        except AttestationError as exc:
            raise Denial(f"evidence rejected: {exc.message}") from None
        event["measurement"] = claims.measurement  # verified claims, recorded even if what follows denies
        event["tee"] = claims.tee.value
        try:
            check_binding(claims, nonce, runtime_key)
        except AttestationError as exc:
            raise Denial(f"evidence rejected: {exc.message}") from None
        return claims, runtime_key

    def sign(self, message: bytes) -> bytes:
        """Sign with this KeyService's attested Ed25519 key (answers only the KeyService gives)."""
        return self._signer.sign(message)

    @property
    def master(self) -> MasterKey:
        """The master key (for the KeyService's own components; never leaves the TEE)."""
        return self._master

    def _decide_release(self, req: p.ReleaseRequest, event: dict[str, Any]) -> dict[str, Any]:
        claims, _ = self.verified_claims(req.challenge_id, req.evidence, req.runtime_key, event)
        leases = []
        for model_id, user_id in dict.fromkeys((x.model_id, x.user_id) for x in req.pairs):
            try:
                state = self._pair_state(model_id, user_id)
            except RowTamperedError as exc:  # the database changed a row behind the KeyService's back
                raise Denial(f"{model_id}/{user_id}: stored state tampered: {exc.message}") from None
            reason = decide_pair(state, claims, self.policy)
            if reason is not None:
                raise Denial(f"{model_id}/{user_id}: {reason}")
            if state.model is None or state.consent is None:  # decide_pair allowed: cannot happen
                raise Denial(f"{model_id}/{user_id}: inconsistent state")
            try:
                wrapped = self.store.wrapped_model_key(model_id, state.model.current_version)
            except RowTamperedError as exc:
                raise Denial(f"{model_id}/{user_id}: stored key unusable: {exc.message}") from None
            if wrapped is None:
                raise Denial(f"{model_id}: no key for the current version")
            try:
                model_key = self._master.unwrap(wrapped, "model", model_id, state.model.current_version)
                request_key = self._master.unwrap(state.consent.wrapped_request_key, "request", model_id, user_id)
            except StoreError as exc:
                raise Denial(f"{model_id}/{user_id}: stored key unusable: {exc.message}") from None
            leases.append(
                {
                    "model_id": model_id,
                    "user_id": user_id,
                    "model_version": state.model.current_version,
                    "model_key": b64e(model_key),
                    "request_key": b64e(request_key),
                    # The runtime refuses a container whose partition does not match: an owner
                    # cannot run a partitioned version under a user's whole-model consent.
                    "partition_sha256": state.model.partition_sha256,
                }
            )
        return {"leases": leases}

    def _pair_state(self, model_id: str, user_id: str) -> PairState:
        return PairState(
            model_id=model_id,
            user_id=user_id,
            model=self.store.model(model_id),
            allowed_runtimes=self.store.allowed_runtimes(model_id),
            granted=self.store.is_granted(model_id, user_id),
            consent=self.store.consent(model_id, user_id),
        )
