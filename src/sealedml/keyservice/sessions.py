"""The KeyService's session component (secureTF's CAS): store sessions, hold their secrets,
release each service's bundle to attested programs, and track volume root tags.

* **Revisions.** A revision is stored only if :func:`~sealedml.sessions.document.check_update`
  accepts it (k-of-n signatures under the current revision's policy, digest chain) *and* the
  call comes from a registered principal whose key is one of those signers; two racing updates
  cannot both land (the store compares and swaps the revision number).
* **Secrets.** Generated secrets are made here, once, when a revision first names them, and
  never leave except inside a release. Uploaded ones arrive HPKE-sealed to the attested
  KeyService key from a signer. Both are wrapped under the master key, bound to the session
  and the secret's name. Each session also gets its own CA (:mod:`sealedml.sessions.ca`),
  whose key is kept the same way.
* **Release.** The model release's order holds: challenge → evidence → claims → binding →
  decision. The bundle — arguments, environment, files, volume keys, a TLS certificate of the
  session CA valid for the lease, and a *lease key* — is sealed to the program's evidence-bound
  HPKE key and the answer is signed. Every decision is audited with its exact reason; the
  caller only ever learns "denied".
* **Revocation.** A lease lasts ``lease_ttl``; programs renew it by releasing again, so a
  revision that no longer admits a runtime reaches a running program within one TTL. Volume
  root calls re-check the *current* revision each time, so they stop at once.
* **Volume roots.** Programs read and advance root tags with calls MACed under the lease key;
  answers are MACed over the caller's fresh nonce, so neither a forged nor a replayed answer
  can make an older volume state look current.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import string
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sealedml._internal.encoding import b64d, b64e
from sealedml.attestation.base import Claims, TeeType
from sealedml.attestation.policy import DEFAULT_TCB_STATUSES, Policy
from sealedml.attestation.policy_document import policy_from_document
from sealedml.crypto import HpkePublicKey, hpke_seal, random_bytes
from sealedml.errors import (
    AccessDenied,
    AuthenticationError,
    Conflict,
    CryptoError,
    Overloaded,
    PolicyError,
    ProtocolError,
    StoreError,
)
from sealedml.keyservice.access import Denial, runtime_policy, under_operator
from sealedml.keyservice.rows import RowTamperedError
from sealedml.keyservice.session_store import SessionRecord
from sealedml.keyservice.store import RuntimeId
from sealedml.protocol import keyservice as p
from sealedml.protocol import sessions as ps
from sealedml.sessions.ca import SessionCA
from sealedml.sessions.document import (
    SecretSpec,
    SessionDocument,
    SessionError,
    SessionSignature,
    SessionUpdateError,
    check_update,
)

if TYPE_CHECKING:
    from sealedml.keyservice.service import KeyService

__all__ = ["SessionService", "decide_service"]

log = logging.getLogger(__name__)

#: Reserved names (``@`` is not allowed in a document's secret names) of the session CA's parts.
_CA_KEY, _CA_CERT = "@ca-key", "@ca-cert"
#: Leases kept in memory before the expired ones are dropped.
_MAX_LEASES = 10_000
_ASCII_ALPHABET = string.ascii_letters + string.digits


def decide_service(document: SessionDocument, service: str, claims: Claims, base: Policy | None) -> str | None:
    """``None`` if ``claims`` may run ``service`` of ``document``, else the exact reason.

    A service lists measurements per TEE type, an attestation policy document, or both (then
    both must accept). The operator's policy adds its TCB, debug and SVN rules, as for models.
    """
    spec = document.services.get(service)
    if spec is None:
        return f"session has no service {service!r}"
    statuses = base.tcb_statuses if base is not None else DEFAULT_TCB_STATUSES
    policies: list[Policy] = []
    if spec.measurements:
        runtimes = [RuntimeId(TeeType(tee), m) for tee, ms in spec.measurements.items() for m in ms]
        if RuntimeId(claims.tee, claims.measurement) not in runtimes:
            return f"service {service!r} does not allow runtime {claims.tee.value}:{claims.measurement}"
        policies.append(runtime_policy(runtimes, tcb_statuses=statuses))
    if spec.policy is not None:
        policies.append(policy_from_document(spec.policy))
    policies = [under_operator(policy, base) for policy in policies]
    try:
        for policy in policies:
            policy.verify(claims)
    except PolicyError as exc:
        return f"policy: {exc.message}"
    return None


def _generate(spec: SecretSpec) -> bytes:
    if spec.kind == "binary":
        return random_bytes(spec.size)
    return "".join(secrets.choice(_ASCII_ALPHABET) for _ in range(spec.size)).encode()


@dataclass
class _Lease:
    session: str
    service: str
    claims: Claims
    key: bytes
    expires: float
    volumes: frozenset[str]


class SessionService:
    """Session operations over the KeyService's store, keys and verifiers (see the module docstring)."""

    def __init__(self, keyservice: KeyService) -> None:
        self._ks = keyservice
        self._store = keyservice.store
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._parsed: dict[str, SessionDocument] = {}  # digest → document (revisions never change)

    # ------------------------------------------------------------------ reading state
    def _current(self, name: str) -> tuple[SessionDocument, SessionRecord] | None:
        record = self._store.session(name)
        if record is None:
            return None
        document = self._parsed.get(record.digest)
        if document is None:
            try:
                document = SessionDocument.model_validate_json(record.document)
            except ValidationError as exc:
                raise StoreError("stored session document is malformed (tampered)") from exc
            if document.digest() != record.digest:
                raise StoreError("stored session document does not match its digest (tampered)")
            self._parsed[record.digest] = document
        return document, record

    def _require_signer(self, principal: str, name: str, action: str) -> tuple[SessionDocument, SessionRecord]:
        current = self._current(name)
        key = self._store.principal_key(principal)
        if current is None or key is None or key.hex() not in current[0].access_policy.signers:
            reason = "no such session" if current is None else "caller is not a signer of the session"
            self._store.audit(
                {"action": action, "principal": principal, "session": name, "decision": "deny", "reason": reason}
            )
            raise AccessDenied()
        return current

    def _unwrap(self, session: str, name: str, wrapped: bytes) -> bytes:
        return self._ks.master.unwrap(wrapped, "session-secret", session, name)

    def _wrap(self, session: str, name: str, value: bytes) -> bytes:
        return self._ks.master.wrap(value, "session-secret", session, name)

    # ------------------------------------------------------------------ signers' calls
    def put(self, principal: str, req: ps.SessionPutRequest) -> dict[str, Any]:
        """Store a new session (revision 1) or the next revision of one.

        Raises:
            ProtocolError: the document or a signature is malformed (the message names the field).
            AccessDenied: the caller is not a signer (of the current revision, or of the new session).
            Conflict: :func:`check_update` refuses the revision, or another update landed first.
        """
        try:
            new = SessionDocument.model_validate(req.document)
            signatures = [SessionSignature.model_validate(s) for s in req.signatures]
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "document"
            raise ProtocolError(f"session document: {where}: {first['msg']}") from None
        digest = new.digest()
        event = {"action": "session_put", "principal": principal, "session": new.name, "revision": new.revision}
        current = self._current(new.name)
        signers = (current[0] if current else new).access_policy.signers
        key = self._store.principal_key(principal)
        if key is None or key.hex() not in signers:
            self._store.audit({**event, "decision": "deny", "reason": "caller is not a signer of the session"})
            raise AccessDenied()
        try:
            check_update(current[0] if current else None, new, signatures)
        except SessionUpdateError as exc:
            self._store.audit({**event, "decision": "deny", "reason": exc.message})
            raise Conflict(exc.message) from None
        existing = self._store.session_secrets(new.name)
        generated = {
            name: self._wrap(new.name, name, _generate(spec))
            for name, spec in new.secrets.items()
            if name not in existing and not spec.uploaded
        }
        if current is None:
            ca = SessionCA.create(new.name)
            generated[_CA_KEY] = self._wrap(new.name, _CA_KEY, ca.key_pem)
            generated[_CA_CERT] = self._wrap(new.name, _CA_CERT, ca.cert_pem)
        record = SessionRecord(
            new.name,
            new.revision,
            digest,
            new.canonical().decode(),
            json.dumps([s.model_dump() for s in signatures]),
        )
        allow = {**event, "digest": digest, "decision": "allow", "reason": "signed by the session's access policy"}
        self._store.put_session(record, generated, {**allow, "generated": sorted(n for n in generated if n[0] != "@")})
        log.info("session %s at revision %d", new.name, new.revision)
        return {
            "session": new.name,
            "revision": new.revision,
            "digest": digest,
            "generated": sorted(n for n in generated if not n.startswith("@")),
        }

    def upload_secret(self, principal: str, req: ps.SessionSecretRequest) -> None:
        """Set an ``uploaded`` secret's value, sealed to this KeyService by a signer.

        Raises:
            AccessDenied: no such session, or the caller is not one of its signers.
            ProtocolError: the secret is not an uploaded secret of the session, or its value is unusable.
        """
        document, _ = self._require_signer(principal, req.session, "session_secret")
        spec = document.secrets.get(req.secret)
        if spec is None or not spec.uploaded:
            raise ProtocolError(f"session {req.session} has no uploaded secret {req.secret!r}")
        try:
            service_key = b64d(req.service_key)
        except ValueError as exc:
            raise ProtocolError("malformed service key") from exc
        info = ps.session_secret_info(service_key, req.session, req.secret, principal)
        value = self._ks.open_to_service(req.sealed, req.service_key, info)
        if not 1 <= len(value) <= 4096 or (spec.kind == "ascii" and not value.isascii()):
            raise ProtocolError(f"secret {req.secret!r} must be 1 to 4096 bytes ({spec.kind})")
        self._store.set_session_secret(
            req.session,
            req.secret,
            self._wrap(req.session, req.secret, value),
            {
                "action": "session_secret",
                "principal": principal,
                "session": req.session,
                "secret": req.secret,
                "decision": "allow",
                "reason": "signer",
            },
        )

    def show(self, principal: str, req: ps.SessionShowRequest) -> ps.SessionShowResponse:
        """The latest revision as stored, for one of its signers (no secret values)."""
        document, record = self._require_signer(principal, req.session, "session_show")
        have = {n for n in self._store.session_secrets(req.session) if not n.startswith("@")}
        volumes: dict[str, dict[str, int | str]] = {
            volume: {"version": root[0], "root": root[1]}
            for volume in sorted({v for s in document.services.values() for v in s.volumes})
            if (root := self._store.volume_root(req.session, volume)) is not None
        }
        return ps.SessionShowResponse(
            session=record.name,
            revision=record.revision,
            digest=record.digest,
            document=json.loads(record.document),
            signatures=json.loads(record.signatures),
            secrets_set=sorted(have & set(document.secrets)),
            secrets_missing=sorted(set(document.secrets) - have),
            volumes=volumes,
        )

    # ------------------------------------------------------------------ programs' calls
    def release(self, req: ps.SessionReleaseRequest) -> p.ReleaseResponse:
        """Verify the program's evidence and the session's rules; return its bundle sealed to it.

        Raises:
            AccessDenied: always opaque; the audit log has the reason.
        """
        event: dict[str, Any] = {
            "action": "session_release",
            "session": req.session,
            "service": req.service,
            "challenge_id": req.challenge_id,
        }
        try:
            claims, runtime_key = self._ks.verified_claims(req.challenge_id, req.evidence, req.runtime_key, event)
            payload, expires_at = self._bundle(req, claims, event)
            sealed = hpke_seal(
                HpkePublicKey.from_bytes(runtime_key),
                json.dumps(payload).encode(),
                ps.session_release_info(req.challenge_id, runtime_key),
            )
        except (Denial, RowTamperedError) as exc:  # tampered: a row changed behind the KeyService's back
            reason = exc.reason if isinstance(exc, Denial) else f"stored state tampered: {exc.message}"
            self._store.audit({**event, "decision": "deny", "reason": reason})
            log.info("session release denied (see audit log)")
            raise AccessDenied() from None
        except CryptoError:  # e.g. a low-order X25519 point that the evidence binds
            self._store.audit({**event, "decision": "deny", "reason": "unusable runtime key"})
            raise AccessDenied() from None
        self._store.audit({**event, "decision": "allow", "reason": "evidence and session verified"})
        message = ps.session_answer_message(
            self._ks.service_id, req.challenge_id, runtime_key, sealed, expires_at, self._ks.lease_ttl
        )
        try:
            next_challenge: p.ChallengeResponse | None = self._ks.challenge()
        except Overloaded:
            next_challenge = None
        return p.ReleaseResponse(
            sealed=b64e(sealed),
            expires_at=expires_at,
            lease_ttl=self._ks.lease_ttl,
            signature=b64e(self._ks.sign(message)),
            next_challenge=next_challenge,
        )

    def _bundle(
        self, req: ps.SessionReleaseRequest, claims: Claims, event: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        current = self._current(req.session)
        if current is None:
            raise Denial("no such session")
        document, record = current
        event["revision"] = document.revision
        reason = decide_service(document, req.service, claims, self._ks.policy)
        if reason is not None:
            raise Denial(reason)
        try:
            values = {
                name: self._unwrap(req.session, name, wrapped)
                for name, wrapped in self._store.session_secrets(req.session).items()
            }
            bundle = document.bundle(req.service, {n: v for n, v in values.items() if not n.startswith("@")})
            ca = SessionCA.from_pem(req.session, values[_CA_CERT], values[_CA_KEY])
        except (StoreError, SessionError, KeyError) as exc:
            detail = exc.message if isinstance(exc, (StoreError, SessionError)) else "session CA missing"
            raise Denial(f"cannot make the bundle: {detail}") from None
        expires_at = int(time.time()) + self._ks.lease_ttl
        # Valid a little past the lease, so a renewal in time never leaves a gap.
        certificate = ca.issue(req.service, not_after=datetime.fromtimestamp(expires_at + 60, tz=UTC))
        lease_id, lease_key = secrets.token_hex(32), random_bytes(32)
        spec = document.services[req.service]
        self._add_lease(
            lease_id,
            _Lease(req.session, req.service, claims, lease_key, float(expires_at), frozenset(spec.volumes)),
        )
        payload = {
            "session": req.session,
            "service": req.service,
            "revision": document.revision,
            "digest": record.digest,
            "argv": bundle.argv,
            "env": bundle.env,
            "files": {path: b64e(data) for path, data in bundle.files.items()},
            "volume_keys": {name: b64e(key) for name, key in bundle.volume_keys.items()},
            "tls": {
                "ca": ca.cert_pem.decode(),
                "cert": certificate.cert_pem.decode(),
                "key": certificate.key_pem.decode(),
                "peers": sorted(spec.peers),
            },
            "lease": {"id": lease_id, "key": b64e(lease_key)},
            "expires_at": expires_at,
        }
        return payload, expires_at

    def _add_lease(self, lease_id: str, lease: _Lease) -> None:
        now = time.time()
        with self._lock:
            if len(self._leases) >= _MAX_LEASES:
                for stale in [k for k, v in self._leases.items() if v.expires < now]:
                    del self._leases[stale]
            if len(self._leases) >= _MAX_LEASES:
                raise Denial("too many live leases")
            self._leases[lease_id] = lease

    def volume_root(self, req: ps.VolumeRootRequest) -> ps.VolumeRootResponse:
        """Read or advance a volume's root tag for a program holding a live lease.

        Raises:
            AuthenticationError: the MAC does not verify under the lease key.
            AccessDenied: unknown or expired lease, a volume the service does not use, or a
                revision that no longer admits the program.
            Conflict: another writer advanced the tag first.
        """
        with self._lock:
            lease = self._leases.get(req.lease)
        if lease is None or lease.expires < time.time():
            raise AccessDenied()
        if not hmac.compare_digest(ps.volume_request_mac(lease.key, req), req.mac):
            raise AuthenticationError("volume root call is not authenticated by the lease")
        event = {"action": "volume_root", "session": lease.session, "service": lease.service, "volume": req.volume}
        current = self._current(lease.session)
        reason = "no such session" if current is None else None
        if current is not None:
            reason = decide_service(current[0], lease.service, lease.claims, self._ks.policy)
        if reason is None and req.volume not in lease.volumes:
            reason = "the service does not use this volume"
        if reason is not None:
            self._store.audit({**event, "decision": "deny", "reason": reason})
            raise AccessDenied()
        if req.op == "advance":
            if req.root is None or req.version < 1:
                raise ProtocolError("advancing a volume needs its next version and root tag")
            self._store.advance_volume_root(
                lease.session,
                req.volume,
                req.version,
                req.root,
                req.previous,
                {**event, "version": req.version, "root": req.root, "decision": "allow", "reason": "lease"},
            )
        now = self._store.volume_root(lease.session, req.volume)
        version, root = (now[0], now[1]) if now is not None else (None, None)
        mac = ps.volume_response_mac(lease.key, req.lease, req.volume, req.nonce, version, root)
        return ps.VolumeRootResponse(version=version, root=root, mac=mac)
