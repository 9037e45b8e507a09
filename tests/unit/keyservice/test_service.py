"""Unit tests of the KeyService logic in-process (no HTTP): signed calls, ownership,
consent, the release protocol and its audit trail."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealedml._internal.encoding import b64d, b64e
from sealedml.attestation.simulated import SimulatedAttester
from sealedml.client.identity import Identity
from sealedml.crypto import HpkeKem, HpkePrivateKey, HpkePublicKey, hpke_seal, random_bytes
from sealedml.errors import (
    AccessDenied,
    AttestationError,
    AuthenticationError,
    Conflict,
    NotFound,
    Overloaded,
    ProtocolError,
)
from sealedml.keyservice import build_keyservice
from sealedml.keyservice import challenges as challenges_module
from sealedml.keyservice.service import KeyService
from sealedml.protocol import keyservice as p

ROUTES = {
    "upload_model_key": "keys",
    "allow_runtime": "runtimes",
    "grant": "grants",
    "consent": "consent",
    "model_info": "info",
    "model_audit": "audit",
}


def signed_headers(
    identity: Identity,
    path: str,
    body: bytes,
    *,
    service_id: str,
    ts: int | None = None,
    nonce: str | None = None,
    method: str = "POST",
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    nonce = nonce or secrets.token_hex(16)
    signature = identity.signing_key.sign(p.signed_call_message(method, path, ts, nonce, body, service_id))
    return {
        p.HDR_PRINCIPAL: identity.principal_id,
        p.HDR_TIMESTAMP: str(ts),
        p.HDR_NONCE: nonce,
        p.HDR_SIGNATURE: b64e(signature),
    }


@dataclass
class Released:
    response: p.ReleaseResponse
    payload: dict[str, Any]
    challenge_id: str = ""
    runtime_key: bytes = b""


class Harness:
    """Drives a :class:`KeyService` the way its HTTP layer does."""

    def __init__(self, svc: KeyService) -> None:
        self.svc = svc
        self.attester = SimulatedAttester(role="runtime")
        self.runtime = self.attester.measurement
        self.database = ""  # the store's file (SQLite) or URL (PostgreSQL), for tests that play its attacker

    def raw(self, sql: str) -> list[tuple[Any, ...]]:
        """Run ``sql`` on the store's database behind the KeyService's back (the storage attacker)."""
        if self.database.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(self.database, autocommit=True) as conn:
                cursor = conn.execute(sql)
                return list(cursor.fetchall()) if cursor.description else []
        db = sqlite3.connect(self.database)
        try:
            rows = db.execute(sql).fetchall()
            db.commit()
            return rows
        finally:
            db.close()

    @property
    def service_key(self) -> HpkePublicKey:
        doc = self.svc.attestation(random_bytes(32))
        return HpkePublicKey.from_bytes(b64d(doc.hpke_public_key))

    def register(self, identity: Identity | None = None) -> Identity:
        identity = identity or Identity.generate()
        pk = identity.signing_key.public_bytes
        req = p.RegisterRequest(
            public_key=b64e(pk), proof=b64e(identity.signing_key.sign(p.registration_message(self.svc.service_id, pk)))
        )
        body = req.model_dump_json().encode()
        assert self.svc.register(
            signed_headers(identity, "/v1/principals", body, service_id=self.svc.service_id),
            "/v1/principals",
            body,
            req,
        ) == (identity.principal_id)
        return identity

    def call(self, identity: Identity, action: str, model_id: str, req: p._Msg | None = None) -> Any:
        path = f"/v1/models/{model_id}/{ROUTES[action]}"
        body = req.model_dump_json().encode() if req is not None else b""
        principal = self.svc.authenticate(
            "POST", path, signed_headers(identity, path, body, service_id=self.svc.service_id), body
        )
        args = (principal, model_id) if req is None else (principal, model_id, req)
        return getattr(self.svc, action)(*args)

    def model_key_request(
        self, model_id: str, version: int, key: bytes, owner: str, service_key: HpkePublicKey | None = None
    ) -> p.ModelKeyRequest:
        sk = service_key or self.service_key
        sealed = hpke_seal(sk, key, p.model_key_info(sk.to_bytes(), model_id, version, owner))
        return p.ModelKeyRequest(model_version=version, sealed_key=b64e(sealed), service_key=b64e(sk.to_bytes()))

    def upload(self, owner: Identity, model_id: str, version: int = 1, key: bytes | None = None) -> bytes:
        key = key or random_bytes(32)
        req = self.model_key_request(model_id, version, key, owner.principal_id)
        self.call(owner, "upload_model_key", model_id, req)
        return key

    def enable(self, user: Identity, model_id: str, measurements: list[str] | None = None) -> None:
        sk = self.service_key
        sealed = hpke_seal(sk, user.request_key(model_id), p.consent_info(sk.to_bytes(), model_id, user.principal_id))
        self.call(
            user,
            "consent",
            model_id,
            p.ConsentRequest(
                sealed_request_key=b64e(sealed),
                service_key=b64e(sk.to_bytes()),
                runtimes=[p.RuntimeRef(measurement=m) for m in (measurements or [self.runtime])],
            ),
        )

    def publish(self, model_id: str, users: Sequence[Identity] = ()) -> tuple[Identity, bytes]:
        owner = self.register()
        key = self.upload(owner, model_id)
        self.call(owner, "allow_runtime", model_id, p.AllowRuntimeRequest(measurement=self.runtime))
        for user in users:
            self.call(owner, "grant", model_id, p.GrantRequest(user_id=user.principal_id))
            self.enable(user, model_id)
        return owner, key

    def release(self, pairs: list[tuple[str, str]], attester: Any = None, kem: str = "X25519") -> Released:
        challenge = self.svc.challenge()
        key = HpkePrivateKey(HpkeKem[kem])
        runtime_key = key.public_key.to_bytes()
        evidence = (attester or self.attester).attest(b64d(challenge.nonce), runtime_key)
        response = self.svc.release(
            p.ReleaseRequest(
                challenge_id=challenge.challenge_id,
                evidence=p.EvidenceMessage(tee=evidence.tee.value, data=b64e(evidence.data), aux=b64e(evidence.aux)),
                runtime_key=b64e(runtime_key),
                pairs=[p.ReleasePair(model_id=m, user_id=u) for m, u in pairs],
            )
        )
        payload = json.loads(key.open(b64d(response.sealed), p.release_info(challenge.challenge_id, runtime_key)))
        return Released(response, payload, challenge.challenge_id, runtime_key)

    def last_audit(self, **match: Any) -> dict[str, Any]:
        for record in reversed(list(self.svc.store.audit_records())):
            if all(record.event.get(k) == v for k, v in match.items()):
                return dict(record.event)
        raise AssertionError(f"no audit record matching {match}")


@pytest.fixture(params=["sqlite", "postgresql"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """The KeyService on each store: SQLite in its data directory, or a real PostgreSQL database."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    svc = build_keyservice(tmp_path / "ks", lease_ttl=30, store=url)
    harness = Harness(svc)
    harness.database = url or str(tmp_path / "ks" / "keyservice.sqlite3")
    yield harness
    svc.store.close()


# ---------------------------------------------------------------------------- registration and signed calls


def test_register_is_idempotent_and_audited(h: Harness) -> None:
    who = h.register()
    h.register(who)
    assert h.svc.store.principal_key(who.principal_id) == who.signing_key.public_bytes
    assert h.last_audit(action="register")["decision"] == "allow"
    assert len([r for r in h.svc.store.audit_records() if r.event.get("action") == "register"]) == 1


def test_register_rejects_proof_for_another_keyservice(h: Harness) -> None:
    who = Identity.generate()
    pk = who.signing_key.public_bytes
    req = p.RegisterRequest(public_key=b64e(pk), proof=b64e(who.signing_key.sign(p.registration_message("f" * 32, pk))))
    body = req.model_dump_json().encode()
    with pytest.raises(AuthenticationError):
        h.svc.register(
            signed_headers(who, "/v1/principals", body, service_id=h.svc.service_id), "/v1/principals", body, req
        )
    assert h.svc.store.principal_key(who.principal_id) is None
    assert h.last_audit(action="register")["reason"] == "bad proof of possession"


def test_register_rejects_a_key_that_is_not_ed25519_sized(h: Harness) -> None:
    who = Identity.generate()
    req = p.RegisterRequest(public_key=b64e(b"k" * 31), proof=b64e(b"p" * 64))
    body = req.model_dump_json().encode()
    with pytest.raises(ProtocolError):
        h.svc.register(
            signed_headers(who, "/v1/principals", body, service_id=h.svc.service_id), "/v1/principals", body, req
        )


@pytest.mark.parametrize("nonce", ["a" * 15, "a" * 65, "-" * 16, "abc def ghi jklmn", ""])
def test_authenticate_rejects_malformed_nonce(h: Harness, nonce: str) -> None:
    who = h.register()
    headers = signed_headers(who, "/v1/models/m/info", b"", service_id=h.svc.service_id)
    headers[p.HDR_NONCE] = nonce
    # re-sign with the malformed nonce so only its format is wrong
    ts = int(headers[p.HDR_TIMESTAMP])
    headers[p.HDR_SIGNATURE] = b64e(
        who.signing_key.sign(p.signed_call_message("POST", "/v1/models/m/info", ts, nonce, b"", h.svc.service_id))
    )
    with pytest.raises(AuthenticationError, match="malformed"):
        h.svc.authenticate("POST", "/v1/models/m/info", headers, b"")


@pytest.mark.parametrize("nonce", ["a" * 16, "Z9" * 32])
def test_authenticate_accepts_nonce_of_16_to_64_alphanumerics(h: Harness, nonce: str) -> None:
    who = h.register()
    headers = signed_headers(who, "/p", b"", service_id=h.svc.service_id, nonce=nonce)
    assert h.svc.authenticate("POST", "/p", headers, b"") == who.principal_id


@pytest.mark.parametrize("offset", [-290, 290])
def test_authenticate_accepts_timestamps_inside_the_window(h: Harness, offset: int) -> None:
    who = h.register()
    headers = signed_headers(who, "/p", b"", service_id=h.svc.service_id, ts=int(time.time()) + offset)
    assert h.svc.authenticate("POST", "/p", headers, b"") == who.principal_id


@pytest.mark.parametrize("offset", [-310, 310])
def test_authenticate_rejects_timestamps_outside_the_window(h: Harness, offset: int) -> None:
    who = h.register()
    headers = signed_headers(who, "/p", b"", service_id=h.svc.service_id, ts=int(time.time()) + offset)
    with pytest.raises(AuthenticationError, match="window"):
        h.svc.authenticate("POST", "/p", headers, b"")
    assert h.last_audit(action="authenticate")["reason"] == "stale timestamp"


def test_authenticate_binds_the_method(h: Harness) -> None:
    who = h.register()
    headers = signed_headers(who, "/p", b"", service_id=h.svc.service_id, method="GET")
    with pytest.raises(AuthenticationError, match="bad signature"):
        h.svc.authenticate("POST", "/p", headers, b"")


def test_signed_call_cannot_be_replayed_to_another_keyservice(tmp_path: Path) -> None:
    a, b = Harness(build_keyservice(tmp_path / "a")), Harness(build_keyservice(tmp_path / "b"))
    owner = a.register()
    b.register(owner)
    a.upload(owner, "m")
    b.upload(owner, "m")
    mallory = Identity.generate()
    path = "/v1/models/m/grants"
    body = p.GrantRequest(user_id=mallory.principal_id).model_dump_json().encode()
    headers = signed_headers(owner, path, body, service_id=a.svc.service_id)  # the owner grants mallory on A ...
    assert a.svc.authenticate("POST", path, headers, body) == owner.principal_id
    with pytest.raises(AuthenticationError):  # ... the operator replays it to B
        b.svc.authenticate("POST", path, headers, body)


# ---------------------------------------------------------------------------- ownership


def test_first_uploader_becomes_owner_and_versions_must_increase(h: Harness) -> None:
    owner = h.register()
    h.upload(owner, "m", 1)
    h.upload(owner, "m", 3)
    record = h.svc.store.model("m")
    assert record is not None and record.owner_id == owner.principal_id and record.current_version == 3
    for version in (3, 2):
        with pytest.raises(Conflict, match="newer"):
            h.upload(owner, "m", version)
    event = h.last_audit(action="upload_model_key", decision="deny")
    assert event["reason"] == "model version must be newer than 3"


def test_upload_by_non_owner_is_denied_opaquely_and_audited(h: Harness) -> None:
    user = h.register()
    _, key = h.publish("m", [user])
    mallory = h.register()
    with pytest.raises(AccessDenied) as info:
        h.upload(mallory, "m", 2)
    assert info.value.message == "denied"
    event = h.last_audit(action="upload_model_key", decision="deny")
    assert event["reason"] == "not the owner" and event["principal"] == mallory.principal_id
    (lease,) = h.release([("m", user.principal_id)]).payload["leases"]
    assert b64d(lease["model_key"]) == key and lease["model_version"] == 1


def test_sealed_model_key_cannot_be_replayed_under_another_principal_or_model(h: Harness) -> None:
    """The HPKE info binds model id, version and owner: a captured upload is useless to anyone else."""
    owner, mallory = h.register(), h.register()
    captured = h.model_key_request("m", 1, random_bytes(32), owner.principal_id)
    with pytest.raises(ProtocolError, match="does not open"):
        h.call(mallory, "upload_model_key", "m", captured)
    with pytest.raises(ProtocolError, match="does not open"):
        h.call(owner, "upload_model_key", "other", captured)
    wrong_version = captured.model_copy(update={"model_version": 2})
    with pytest.raises(ProtocolError, match="does not open"):
        h.call(owner, "upload_model_key", "m", wrong_version)
    assert h.svc.store.model("m") is None and h.svc.store.model("other") is None


def test_upload_sealed_to_an_earlier_service_key_asks_to_reattest(h: Harness) -> None:
    owner = h.register()
    stale = HpkePrivateKey().public_key
    req = h.model_key_request("m", 1, random_bytes(32), owner.principal_id, service_key=stale)
    with pytest.raises(Conflict, match="re-attest"):
        h.call(owner, "upload_model_key", "m", req)
    assert h.svc.store.model("m") is None


@pytest.mark.parametrize("size", [16, 31, 33, 64])
def test_upload_rejects_a_model_key_that_is_not_32_bytes(h: Harness, size: int) -> None:
    owner = h.register()
    with pytest.raises(ProtocolError, match="32 bytes"):
        h.upload(owner, "m", 1, key=b"k" * size)


def test_model_key_is_stored_wrapped_never_in_plaintext(h: Harness, tmp_path: Path) -> None:
    owner, user = h.register(), h.register()
    key = h.upload(owner, "m")
    h.call(owner, "grant", "m", p.GrantRequest(user_id=user.principal_id))
    h.enable(user, "m")
    ((wrapped,),) = h.raw("SELECT wrapped FROM model_keys")
    ((wrapped_rk,),) = h.raw("SELECT wrapped FROM consents")
    tables = ["meta", "principals", "models", "model_keys", "runtimes", "grants", "consents", "audit"]
    dump = repr([h.raw(f"SELECT * FROM {table}") for table in tables]).encode()
    wrapped, wrapped_rk = bytes(wrapped), bytes(wrapped_rk)
    assert key not in wrapped and user.request_key("m") not in wrapped_rk
    assert key.hex().encode() not in dump and b64e(key).encode() not in dump
    assert user.request_key("m").hex().encode() not in dump


@pytest.mark.parametrize("action", ["allow_runtime", "grant", "revoke"])
def test_owner_operations_by_non_owner_are_denied_and_audited(h: Harness, action: str) -> None:
    owner, mallory = h.register(), h.register()
    h.upload(owner, "m")
    req: p._Msg
    if action == "allow_runtime":
        req = p.AllowRuntimeRequest(measurement="ab" * 48)
    else:
        req = p.GrantRequest(user_id=mallory.principal_id, grant=action == "grant")
    with pytest.raises(AccessDenied):
        h.call(mallory, "allow_runtime" if action == "allow_runtime" else "grant", "m", req)
    assert h.last_audit(action=action, decision="deny")["reason"] == "not the owner"
    assert h.svc.store.allowed_runtimes("m") == frozenset()
    assert not h.svc.store.is_granted("m", mallory.principal_id)


@pytest.mark.parametrize("action", ["allow_runtime", "grant"])
def test_owner_operations_on_unknown_model_are_denied_like_non_owner(h: Harness, action: str) -> None:
    """Same opaque answer for "no such model" and "not yours" (existence is not revealed)."""
    who = h.register()
    req = p.AllowRuntimeRequest(measurement="ab" * 48) if action == "allow_runtime" else p.GrantRequest(user_id="u")
    with pytest.raises(AccessDenied) as info:
        h.call(who, action, "missing", req)
    assert info.value.message == "denied"
    assert h.last_audit(action=action, decision="deny")["reason"] == "no such model"


def test_consent_to_unknown_model_is_denied_opaquely(h: Harness) -> None:
    user = h.register()
    with pytest.raises(AccessDenied):
        h.enable(user, "missing")
    assert h.last_audit(action="consent")["reason"] == "no such model"


def test_consent_key_sealed_for_another_user_does_not_open(h: Harness) -> None:
    owner, user, mallory = h.register(), h.register(), h.register()
    h.upload(owner, "m")
    sk = h.service_key
    sealed = hpke_seal(sk, user.request_key("m"), p.consent_info(sk.to_bytes(), "m", user.principal_id))
    captured = p.ConsentRequest(
        sealed_request_key=b64e(sealed),
        service_key=b64e(sk.to_bytes()),
        runtimes=[p.RuntimeRef(measurement=h.runtime)],
    )
    with pytest.raises(ProtocolError):
        h.call(mallory, "consent", "m", captured)
    assert h.svc.store.consent("m", mallory.principal_id) is None


def test_model_info_for_owner_granted_user_and_stranger(h: Harness) -> None:
    user, stranger = h.register(), h.register()
    owner, _ = h.publish("m", [user])
    info = h.call(owner, "model_info", "m")
    assert (info.is_owner, info.current_version) == (True, 1)
    info = h.call(user, "model_info", "m")
    assert (info.is_owner, info.granted, info.consented) == (False, True, True)
    with pytest.raises(AccessDenied):
        h.call(stranger, "model_info", "m")
    with pytest.raises(AccessDenied):
        h.call(stranger, "model_info", "missing")
    h.call(owner, "grant", "m", p.GrantRequest(user_id=user.principal_id, grant=False))
    with pytest.raises(AccessDenied):
        h.call(user, "model_info", "m")


# ---------------------------------------------------------------------------- release


def test_release_returns_the_keys_of_the_current_version(h: Harness) -> None:
    user = h.register()
    owner, _ = h.publish("m", [user])
    key2 = h.upload(owner, "m", 2)
    before = int(time.time())
    released = h.release([("m", user.principal_id)])
    (lease,) = released.payload["leases"]
    assert lease["model_id"] == "m" and lease["user_id"] == user.principal_id
    assert lease["model_version"] == 2 and b64d(lease["model_key"]) == key2
    assert b64d(lease["request_key"]) == user.request_key("m")
    assert released.response.lease_ttl == 30
    assert before + 30 <= released.response.expires_at == released.payload["expires_at"] <= int(time.time()) + 30
    event = h.last_audit(action="release")
    assert event["decision"] == "allow" and event["measurement"] == h.runtime


def test_release_is_all_or_nothing(h: Harness) -> None:
    user, stranger = h.register(), h.register()
    h.publish("m", [user])
    h.enable(stranger, "m")  # consented, never granted
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id), ("m", stranger.principal_id)])
    assert h.last_audit(action="release")["reason"] == (
        f"m/{stranger.principal_id}: user not granted (or revoked) by the owner"
    )


def test_release_after_revocation_is_denied(h: Harness) -> None:
    user = h.register()
    owner, _ = h.publish("m", [user])
    h.release([("m", user.principal_id)])
    h.call(owner, "grant", "m", p.GrantRequest(user_id=user.principal_id, grant=False))
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id)])
    assert h.last_audit(action="release")["reason"].endswith("user not granted (or revoked) by the owner")


def test_release_after_owner_disallows_the_runtime_is_denied(h: Harness) -> None:
    user = h.register()
    owner, _ = h.publish("m", [user])
    h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(measurement=h.runtime.upper(), allow=False))
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id)])
    assert h.last_audit(action="release")["reason"].endswith("owner allows no runtime measurement")


def test_release_challenge_is_single_use(h: Harness) -> None:
    user = h.register()
    h.publish("m", [user])
    challenge = h.svc.challenge()
    key = HpkePrivateKey().public_key.to_bytes()
    evidence = h.attester.attest(b64d(challenge.nonce), key)
    req = p.ReleaseRequest(
        challenge_id=challenge.challenge_id,
        evidence=p.EvidenceMessage(tee="simulated", data=b64e(evidence.data)),
        runtime_key=b64e(key),
        pairs=[p.ReleasePair(model_id="m", user_id=user.principal_id)],
    )
    h.svc.release(req)
    with pytest.raises(AccessDenied):
        h.svc.release(req)
    assert h.last_audit(action="release")["reason"] == "unknown, reused or expired challenge"


def test_release_rejects_expired_challenge(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    user = h.register()
    h.publish("m", [user])
    challenge = h.svc.challenge()
    key = HpkePrivateKey().public_key.to_bytes()
    evidence = h.attester.attest(b64d(challenge.nonce), key)
    req = p.ReleaseRequest(
        challenge_id=challenge.challenge_id,
        evidence=p.EvidenceMessage(tee="simulated", data=b64e(evidence.data)),
        runtime_key=b64e(key),
        pairs=[p.ReleasePair(model_id="m", user_id=user.principal_id)],
    )
    skew = h.svc.challenge_ttl + 1  # the challenge table's clock, moved past the expiry
    later = types.SimpleNamespace(time=lambda: time.time() + skew, monotonic=lambda: time.monotonic() + skew)
    monkeypatch.setattr(challenges_module, "time", later)
    with pytest.raises(AccessDenied):
        h.svc.release(req)
    assert h.last_audit(action="release")["reason"] == "unknown, reused or expired challenge"


def test_outstanding_challenges_are_bounded(h: Harness) -> None:
    svc = KeyService(h.svc.store, h.svc._master, h.svc.attester, h.svc.verifiers, max_challenges=3)
    if h.svc.store.shares_challenges:  # PostgreSQL: in the shared table, forgotten when they expire
        assert all(svc.challenge() for _ in range(4))
        return
    for _ in range(3):
        svc.challenge()
    with pytest.raises(Overloaded) as info:
        svc.challenge()
    assert info.value.retry_after is not None


def test_replicas_on_one_postgresql_store_share_challenges(tmp_path: Path, postgres_url: str) -> None:
    first = Harness(build_keyservice(tmp_path / "ks", store=postgres_url))
    second = Harness(build_keyservice(tmp_path / "ks", store=postgres_url))  # same data dir: same master key
    user = first.register()
    first.publish("m", [user])
    challenge = first.svc.challenge()
    key = HpkePrivateKey(HpkeKem.X25519)
    evidence = first.attester.attest(b64d(challenge.nonce), key.public_key.to_bytes())
    request = p.ReleaseRequest(
        challenge_id=challenge.challenge_id,
        evidence=p.EvidenceMessage(tee="simulated", data=b64e(evidence.data)),
        runtime_key=b64e(key.public_key.to_bytes()),
        pairs=[p.ReleasePair(model_id="m", user_id=user.principal_id)],
    )
    assert second.svc.release(request).sealed  # asked of one replica, answered by the other
    with pytest.raises(AccessDenied):  # and used once only, across replicas
        first.svc.release(request)
    assert first.svc.store.verify_audit_chain() == second.svc.store.verify_audit_chain()


def test_release_rejects_a_stored_key_moved_to_another_model(h: Harness, tmp_path: Path) -> None:
    """A key copied to another model's row is refused: the row's integrity tag binds its key columns
    (and the wrapped key's AAD binds its model id, a second line of defence)."""
    user = h.register()
    h.publish("a", [user])
    h.publish("b", [user])
    h.raw("UPDATE model_keys SET wrapped = (SELECT wrapped FROM model_keys WHERE model_id = 'a') WHERE model_id = 'b'")
    h.release([("a", user.principal_id)])
    with pytest.raises(AccessDenied):
        h.release([("b", user.principal_id)])
    reason = h.last_audit(action="release")["reason"]
    assert "stored state tampered" in reason and "model_keys" in reason


def test_state_and_master_key_survive_a_restart(tmp_path: Path) -> None:
    first = Harness(build_keyservice(tmp_path / "ks"))
    user = first.register()
    _, key = first.publish("m", [user])
    service_id = first.svc.service_id
    first.svc.store.close()
    second = Harness(build_keyservice(tmp_path / "ks"))
    assert second.svc.service_id == service_id
    (lease,) = second.release([("m", user.principal_id)]).payload["leases"]
    assert b64d(lease["model_key"]) == key
    assert second.svc.store.verify_audit_chain() > 0


def test_audit_chain_verifies_after_a_full_workflow(h: Harness) -> None:
    user, stranger = h.register(), h.register()
    h.publish("m", [user])
    h.release([("m", user.principal_id)])
    with pytest.raises(AccessDenied):
        h.release([("m", stranger.principal_id)])
    n = h.svc.store.verify_audit_chain()
    actions = [r.event["action"] for r in h.svc.store.audit_records()]
    assert n == len(actions) and {
        "register",
        "upload_model_key",
        "allow_runtime",
        "grant",
        "consent",
        "release",
    } <= set(actions)


# ---------------------------------------------------------------------------- signed answers, KEMs, TEE types


def test_release_answer_is_signed_by_the_attested_keyservice_key(h: Harness) -> None:
    from sealedml.attestation.trust import default_trust, verify_attestation
    from sealedml.crypto import verify_signature

    user = h.register()
    h.publish("m", [user])
    nonce = random_bytes(32)
    service = verify_attestation(h.svc.attestation(nonce), nonce, default_trust())
    released = h.release([("m", user.principal_id)])
    answer, runtime_key = released.response, released.runtime_key
    message = p.release_answer_message(
        service.service_id, released.challenge_id, runtime_key, b64d(answer.sealed), answer.expires_at, 30
    )
    verify_signature(service.signing_key, b64d(answer.signature), message)
    with pytest.raises(Exception, match="does not verify"):  # bound to the challenge and the runtime key
        other = p.release_answer_message(
            service.service_id, "other-challenge", runtime_key, b64d(answer.sealed), answer.expires_at, 30
        )
        verify_signature(service.signing_key, b64d(answer.signature), other)


def test_attestation_names_the_hybrid_kem_and_binds_both_keys(h: Harness) -> None:
    from sealedml.attestation.trust import default_trust, verify_attestation

    nonce = random_bytes(32)
    doc = h.svc.attestation(nonce)
    assert doc.kem == "MLKEM768_X25519"
    assert HpkePublicKey.from_bytes(b64d(doc.hpke_public_key)).kem.name == "MLKEM768_X25519"
    assert doc.accepts == ["simulated"] and doc.unsafe_allow_simulated is False
    service = verify_attestation(doc, nonce, default_trust())
    assert service.kem == "MLKEM768_X25519"
    swapped = doc.model_copy(update={"signing_public_key": b64e(b"\x07" * 32)})
    with pytest.raises(AttestationError, match="does not bind"):  # another signing key is not attested
        verify_attestation(swapped, nonce, default_trust())


@pytest.mark.parametrize("kem", ["X25519", "MLKEM768_X25519"])
def test_release_to_a_runtime_key_of_either_kem_is_audited_with_its_kem(h: Harness, kem: str) -> None:
    user = h.register()
    h.publish("m", [user])
    released = h.release([("m", user.principal_id)], kem=kem)
    assert released.payload["leases"] and HpkePublicKey.from_bytes(released.runtime_key).kem.name == kem
    event = h.last_audit(action="release", challenge_id=released.challenge_id)
    assert event["decision"] == "allow" and event["kem"] == kem


def test_keyservice_mixing_simulated_with_hardware_needs_the_unsafe_opt_in(tmp_path: Path) -> None:
    from sealedml.attestation.base import TeeType
    from sealedml.attestation.simulated import SimulatedVerifier
    from sealedml.errors import ConfigurationError
    from sealedml.keyservice.service import MasterKey
    from sealedml.keyservice.store import SQLiteKeyStore

    store = SQLiteKeyStore(tmp_path / "ks.sqlite3")
    verifiers = {TeeType.SIMULATED: SimulatedVerifier(), TeeType.TDX: SimulatedVerifier()}
    attester = SimulatedAttester(role="keyservice")
    for hardware in (TeeType.SGX, TeeType.TDX, TeeType.SEV_SNP):
        mixed = {TeeType.SIMULATED: SimulatedVerifier(), hardware: SimulatedVerifier()}
        with pytest.raises(ConfigurationError, match="unsafe-allow-simulated"):
            KeyService(store, MasterKey(b"m" * 32), attester, mixed)
    svc = KeyService(store, MasterKey(b"m" * 32), attester, verifiers, unsafe_allow_simulated=True)
    doc = svc.attestation(random_bytes(32))
    assert doc.unsafe_allow_simulated is True and doc.accepts == ["simulated", "tdx"]


def test_allow_runtime_without_a_tee_type_is_refused_where_several_are_accepted(h: Harness) -> None:
    from sealedml.attestation.base import TeeType
    from sealedml.attestation.simulated import SimulatedVerifier

    owner = h.register()
    h.upload(owner, "m")
    h.svc.verifiers[TeeType.TDX] = SimulatedVerifier()  # as if started with --accept simulated,tdx
    with pytest.raises(ProtocolError, match="several TEE types"):
        h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(measurement="ab" * 48))
    h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(tee="tdx", measurement="ab" * 48))
    assert h.last_audit(action="allow_runtime")["tee"] == "tdx"
    with pytest.raises(ProtocolError, match="does not accept sgx"):
        h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(tee="sgx", measurement="ab" * 48))


def test_audit_head_is_signed_and_names_the_hash_of_any_record(h: Harness) -> None:
    from sealedml.attestation.trust import default_trust, verify_attestation
    from sealedml.crypto import verify_signature

    who = h.register()
    h.publish("m", [who])
    nonce = random_bytes(32)
    service = verify_attestation(h.svc.attestation(nonce), nonce, default_trust())
    records = list(h.svc.store.audit_records())
    head = h.svc.audit_head(who.principal_id, p.AuditHeadRequest(at=2))
    assert (head.records, head.head, head.at_hash) == (len(records), records[-1].hash, records[1].hash)
    message = p.audit_head_message(head.service_id, head.records, head.head, head.at, head.at_hash, head.issued_at)
    verify_signature(service.signing_key, b64d(head.signature), message)
    with pytest.raises(NotFound):
        h.svc.audit_head(who.principal_id, p.AuditHeadRequest(at=len(records) + 1))


def test_keyservice_refuses_to_start_on_a_truncated_audit_log(tmp_path: Path) -> None:
    from sealedml.errors import StoreError

    first = Harness(build_keyservice(tmp_path / "ks"))
    user = first.register()
    first.publish("m", [user])
    first.svc.store.close()
    db = sqlite3.connect(str(tmp_path / "ks" / "keyservice.sqlite3"))
    db.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="does not match its anchor"):
        build_keyservice(tmp_path / "ks")


def test_keyservice_on_postgresql_refuses_to_start_on_a_truncated_audit_log(tmp_path: Path, postgres_url: str) -> None:
    from sealedml.errors import StoreError

    first = Harness(build_keyservice(tmp_path / "ks", store=postgres_url))
    first.database = postgres_url
    user = first.register()
    first.publish("m", [user])
    first.svc.store.close()
    first.raw("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    with pytest.raises(StoreError, match="does not match its anchor"):
        build_keyservice(tmp_path / "ks", store=postgres_url)


def test_keyservice_on_postgresql_keeps_its_state_across_a_restart(tmp_path: Path, postgres_url: str) -> None:
    first = Harness(build_keyservice(tmp_path / "ks", store=postgres_url))
    user = first.register()
    first.publish("m", [user])
    service_id = first.svc.service_id
    first.svc.store.close()
    second = Harness(build_keyservice(tmp_path / "ks", store=postgres_url))
    assert second.svc.service_id == service_id
    assert second.release([("m", user.principal_id)])
    assert second.svc.store.verify_audit_chain() > 3


def test_a_store_url_that_is_not_postgresql_is_refused(tmp_path: Path) -> None:
    from sealedml.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="postgresql://"):
        build_keyservice(tmp_path / "ks", store="mysql://user:secret@db/ks")


# ---------------------------------------------------------------------------- rows the database cannot forge


def _granted_and_enabled(h: Harness) -> tuple[Identity, Identity]:
    user = h.register()
    owner, _ = h.publish("m", [user])
    h.release([("m", user.principal_id)])
    return owner, user


def test_a_grant_row_edited_by_hand_is_refused_with_an_audited_reason(h: Harness) -> None:
    (_, user), stranger = _granted_and_enabled(h), h.register()
    h.raw(f"UPDATE grants SET user_id = '{stranger.principal_id}' WHERE user_id = '{user.principal_id}'")
    with pytest.raises(AccessDenied):
        h.release([("m", stranger.principal_id)])
    reason = h.last_audit(action="release")["reason"]
    assert "stored state tampered" in reason and "does not match its integrity tag" in reason


def test_a_revoked_grant_restored_from_an_old_copy_is_refused(h: Harness) -> None:
    owner, user = _granted_and_enabled(h)
    old = h.raw(f"SELECT granted, changed, seq, mac FROM grants WHERE user_id = '{user.principal_id}'")[0]
    h.call(owner, "grant", "m", p.GrantRequest(user_id=user.principal_id, grant=False))
    granted, changed, seq, mac = old
    h.raw(
        f"UPDATE grants SET granted = {granted}, changed = {changed!r}, seq = {seq}, mac = '{mac}' "
        f"WHERE user_id = '{user.principal_id}'"
    )
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id)])
    assert "(replayed)" in h.last_audit(action="release")["reason"]


def test_a_disallowed_runtime_restored_by_hand_is_refused(h: Harness) -> None:
    owner, user = _granted_and_enabled(h)
    row = h.raw("SELECT model_id, tee, measurement, seq, mac FROM runtimes")[0]
    h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(measurement=h.runtime, allow=False))
    h.raw("INSERT INTO runtimes VALUES ('{}', '{}', '{}', {}, '{}')".format(*row))
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id)])
    assert "deleted" in h.last_audit(action="release")["reason"]


def test_a_row_inserted_by_hand_is_refused(h: Harness) -> None:
    _, user = _granted_and_enabled(h)
    h.raw("INSERT INTO runtimes (model_id, tee, measurement) VALUES ('m', 'simulated', '" + "ab" * 48 + "')")
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id)])
    assert "no integrity tag" in h.last_audit(action="release")["reason"]
