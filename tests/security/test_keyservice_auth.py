"""Signed calls, registration and ownership of a real KeyService process, over HTTP.

Requests are crafted by hand (httpx + ``protocol.signed_call_message``) so each
test changes exactly one thing a correct client would do. Denials must be
opaque to the caller (``{"error": "denied", "message": "denied"}``) while the
audit log, read directly from the KeyService's SQLite file, keeps the reason.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sealedml._internal.encoding import b64e
from sealedml._internal.procs import ServiceProcess
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.crypto import hpke_seal, random_bytes
from sealedml.keyservice.store import GENESIS, chain_hash
from sealedml.protocol import keyservice as p
from tests.conftest import start_keyservice

pytestmark = pytest.mark.slow

DENIED = {"error": "denied", "message": "denied"}
RUNTIME = "ab" * 48


@dataclass
class KS:
    proc: ServiceProcess
    workdir: Path
    http: httpx.Client
    service_id: str
    clients: list[KeyServiceClient]

    def principal(self, register: bool = True) -> tuple[Identity, KeyServiceClient]:
        identity = Identity.generate()
        client = KeyServiceClient(self.proc.url, identity)
        self.clients.append(client)
        if register:
            client.register()
        return identity, client

    def owned_model(self) -> tuple[Identity, KeyServiceClient, str]:
        owner, client = self.principal()
        model_id = f"m-{secrets.token_hex(6)}"
        client.upload_model_key(model_id, 1, random_bytes(32))
        return owner, client, model_id

    def audit(self) -> list[dict[str, Any]]:
        """The audit log, read-only, straight from the database file."""
        path = self.workdir / "keyservice" / "keyservice.sqlite3"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT event FROM audit ORDER BY seq").fetchall()
        finally:
            db.close()
        return [json.loads(row[0]) for row in rows]

    def last_audit(self, **match: Any) -> dict[str, Any]:
        for event in reversed(self.audit()):
            if all(event.get(k) == v for k, v in match.items()):
                return event
        raise AssertionError(f"no audit record matching {match}")


@pytest.fixture(scope="module")
def ks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KS]:
    workdir = tmp_path_factory.mktemp("ks-auth")
    proc = start_keyservice(workdir)
    http = httpx.Client(base_url=proc.url, timeout=30)
    state = KS(proc, workdir, http, "", [])
    try:
        state.service_id = http.get("/v1/health").json()["service_id"]
        _SERVICE["id"] = state.service_id
        someone, _ = state.principal()
        _SERVICE["someone"] = someone.principal_id
        yield state
    finally:
        for client in state.clients:
            client.close()
        http.close()
        proc.stop()


#: The module's KeyService id (signed calls are bound to it) and a principal registered there (set by ``ks``).
_SERVICE = {"id": "", "someone": ""}


def sign(
    identity: Identity,
    path: str,
    body: bytes,
    *,
    ts: int | None = None,
    nonce: str | None = None,
    principal: str | None = None,
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    nonce = nonce or secrets.token_hex(16)
    signature = identity.signing_key.sign(p.signed_call_message("POST", path, ts, nonce, body, _SERVICE["id"]))
    return {
        "content-type": "application/json",
        p.HDR_PRINCIPAL: principal or identity.principal_id,
        p.HDR_TIMESTAMP: str(ts),
        p.HDR_NONCE: nonce,
        p.HDR_SIGNATURE: b64e(signature),
    }


def grant_body(user_id: str | None = None, grant: bool = True) -> bytes:
    """A signed owner call's body; by default a grant to a principal the fixture registered (a grant must
    name a registered one)."""
    return p.GrantRequest(user_id=user_id or _SERVICE["someone"], grant=grant).model_dump_json().encode()


def assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthenticated"


def assert_denied(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == DENIED


# ---------------------------------------------------------------------------- control


def test_correctly_signed_raw_call_is_accepted(ks: KS) -> None:
    """The hand-made signing in this module is right: the negative tests differ in one thing only."""
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    body = grant_body()
    response = ks.http.post(path, content=body, headers=sign(owner, path, body))
    assert response.status_code == 200, response.text
    assert ks.last_audit(action="grant", model_id=model_id)["decision"] == "allow"


# ---------------------------------------------------------------------------- signed calls


def _valid_bodies() -> dict[str, bytes]:
    return {
        "keys": p.ModelKeyRequest(model_version=1, sealed_key="AAAA", service_key="AAAA").model_dump_json().encode(),
        "runtimes": p.AllowRuntimeRequest(measurement=RUNTIME).model_dump_json().encode(),
        "grants": grant_body(),
        "consent": p.ConsentRequest(
            sealed_request_key="AAAA", service_key="AAAA", runtimes=[p.RuntimeRef(measurement=RUNTIME)]
        )
        .model_dump_json()
        .encode(),
        "info": b"",
    }


@pytest.mark.parametrize("route", ["keys", "runtimes", "grants", "consent", "info"])
def test_unsigned_call_is_rejected(ks: KS, route: str) -> None:
    _, _, model_id = ks.owned_model()
    response = ks.http.post(
        f"/v1/models/{model_id}/{route}", content=_valid_bodies()[route], headers={"content-type": "application/json"}
    )
    assert_unauthenticated(response)


@pytest.mark.parametrize("missing", [p.HDR_PRINCIPAL, p.HDR_TIMESTAMP, p.HDR_NONCE, p.HDR_SIGNATURE])
def test_call_missing_one_signature_header_is_rejected(ks: KS, missing: str) -> None:
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    body = grant_body()
    headers = sign(owner, path, body)
    del headers[missing]
    assert_unauthenticated(ks.http.post(path, content=body, headers=headers))


def test_call_signed_by_another_key_is_rejected(ks: KS) -> None:
    owner, _, model_id = ks.owned_model()
    mallory = Identity.generate()
    path = f"/v1/models/{model_id}/grants"
    body = grant_body(mallory.principal_id)
    response = ks.http.post(path, content=body, headers=sign(mallory, path, body, principal=owner.principal_id))
    assert_unauthenticated(response)
    event = ks.last_audit(action="authenticate", path=path)
    assert (event["principal"], event["reason"], event["decision"]) == (owner.principal_id, "bad signature", "deny")


def test_body_modified_after_signing_is_rejected(ks: KS) -> None:
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    headers = sign(owner, path, grant_body("alice"))
    response = ks.http.post(path, content=grant_body("mallory"), headers=headers)
    assert_unauthenticated(response)
    assert ks.last_audit(action="authenticate", path=path)["reason"] == "bad signature"


def test_path_modified_after_signing_is_rejected(ks: KS) -> None:
    owner, client, model_a = ks.owned_model()
    model_b = f"m-{secrets.token_hex(6)}"
    client.upload_model_key(model_b, 1, random_bytes(32))  # the same owner: only the path differs
    body = grant_body("mallory")
    headers = sign(owner, f"/v1/models/{model_a}/grants", body)
    assert_unauthenticated(ks.http.post(f"/v1/models/{model_b}/grants", content=body, headers=headers))
    assert client.model_info(model_b).current_version == 1


@pytest.mark.parametrize("header", [p.HDR_TIMESTAMP, p.HDR_NONCE])
def test_signed_header_modified_after_signing_is_rejected(ks: KS, header: str) -> None:
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    body = grant_body()
    headers = sign(owner, path, body)
    headers[header] = str(int(headers[header]) - 1) if header == p.HDR_TIMESTAMP else secrets.token_hex(16)
    assert_unauthenticated(ks.http.post(path, content=body, headers=headers))


@pytest.mark.parametrize("offset", [-400, 400], ids=["stale", "future"])
def test_timestamp_outside_the_window_is_rejected(ks: KS, offset: int) -> None:
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    body = grant_body()
    response = ks.http.post(path, content=body, headers=sign(owner, path, body, ts=int(time.time()) + offset))
    assert_unauthenticated(response)
    assert ks.last_audit(action="authenticate", path=path)["reason"] == "stale timestamp"


def test_replayed_call_is_rejected(ks: KS) -> None:
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    body = grant_body()
    headers = sign(owner, path, body)
    assert ks.http.post(path, content=body, headers=headers).status_code == 200
    assert_unauthenticated(ks.http.post(path, content=body, headers=headers))
    assert ks.last_audit(action="authenticate", path=path)["reason"] == "replayed nonce"


def test_replayed_nonce_with_a_new_signature_is_rejected(ks: KS) -> None:
    """The nonce itself is single-use, not just the exact request."""
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    nonce = secrets.token_hex(16)
    assert (
        ks.http.post(path, content=grant_body(), headers=sign(owner, path, grant_body(), nonce=nonce)).status_code
        == 200
    )
    response = ks.http.post(path, content=grant_body("b"), headers=sign(owner, path, grant_body("b"), nonce=nonce))
    assert_unauthenticated(response)


def test_unknown_principal_is_rejected(ks: KS) -> None:
    _, _, model_id = ks.owned_model()
    stranger = Identity.generate()  # never registered
    path = f"/v1/models/{model_id}/grants"
    body = grant_body()
    assert_unauthenticated(ks.http.post(path, content=body, headers=sign(stranger, path, body)))
    event = ks.last_audit(action="authenticate", principal=stranger.principal_id)
    assert event["reason"] == "unknown principal"


@pytest.mark.parametrize("ts", [2**63, -(2**63) - 1, 10**30])
def test_out_of_range_timestamp_is_rejected_not_a_server_error(ks: KS, ts: int) -> None:
    """Regression: a timestamp outside the signed 64-bit range used to raise OverflowError while
    building the signed message (encoding.fields), an opaque 500."""
    owner, _, model_id = ks.owned_model()
    path = f"/v1/models/{model_id}/grants"
    body = grant_body()
    headers = sign(owner, path, body)
    headers[p.HDR_TIMESTAMP] = str(ts)
    assert_unauthenticated(ks.http.post(path, content=body, headers=headers))


def test_out_of_range_timestamp_on_registration_is_rejected_not_a_server_error(ks: KS) -> None:
    """Registration needs no prior account, so this path is open to anyone."""
    who = Identity.generate()
    body = _registration(who, ks.service_id)
    headers = sign(who, "/v1/principals", body)
    headers[p.HDR_TIMESTAMP] = str(2**64)
    assert_unauthenticated(ks.http.post("/v1/principals", content=body, headers=headers))


# ---------------------------------------------------------------------------- registration


def _registration(
    identity: Identity, service_id: str, *, proof_key: Identity | None = None, proof_service: str | None = None
) -> bytes:
    pk = identity.signing_key.public_bytes
    prover = proof_key or identity
    proof = prover.signing_key.sign(p.registration_message(proof_service or service_id, pk))
    return json.dumps({"public_key": b64e(pk), "proof": b64e(proof)}).encode()


def _is_registered(ks: KS, identity: Identity) -> bool:
    path = "/v1/models/nothing-here/info"
    response = ks.http.post(path, content=b"", headers=sign(identity, path, b""))
    return response.status_code != 401  # a registered principal gets past authentication (then 403)


def test_registration_with_proof_is_accepted_and_idempotent(ks: KS) -> None:
    who = Identity.generate()
    for _ in range(2):
        body = _registration(who, ks.service_id)
        response = ks.http.post("/v1/principals", content=body, headers=sign(who, "/v1/principals", body))
        assert response.status_code == 200, response.text
        assert response.json() == {"principal_id": who.principal_id}
    assert _is_registered(ks, who)


def test_registration_without_proof_is_rejected(ks: KS) -> None:
    who = Identity.generate()
    body = json.dumps({"public_key": b64e(who.signing_key.public_bytes)}).encode()
    response = ks.http.post("/v1/principals", content=body, headers=sign(who, "/v1/principals", body))
    assert response.status_code == 400 and response.json()["error"] == "protocol"
    assert not _is_registered(ks, who)


def test_registration_with_proof_by_another_key_is_rejected(ks: KS) -> None:
    who, other = Identity.generate(), Identity.generate()
    body = _registration(who, ks.service_id, proof_key=other)
    assert_unauthenticated(ks.http.post("/v1/principals", content=body, headers=sign(who, "/v1/principals", body)))
    assert ks.last_audit(action="register", principal=who.principal_id)["reason"] == "bad proof of possession"
    assert not _is_registered(ks, who)


def test_registration_with_proof_for_another_keyservice_is_rejected(ks: KS) -> None:
    who = Identity.generate()
    body = _registration(who, ks.service_id, proof_service=secrets.token_hex(16))
    assert_unauthenticated(ks.http.post("/v1/principals", content=body, headers=sign(who, "/v1/principals", body)))
    assert not _is_registered(ks, who)


def test_registration_signed_by_another_key_is_rejected(ks: KS) -> None:
    """The body names key A with a valid proof, but the call is signed by B (claiming to be A)."""
    who, other = Identity.generate(), Identity.generate()
    body = _registration(who, ks.service_id)
    headers = sign(other, "/v1/principals", body, principal=who.principal_id)
    assert_unauthenticated(ks.http.post("/v1/principals", content=body, headers=headers))
    assert not _is_registered(ks, who)


def test_registration_under_another_principal_id_is_rejected(ks: KS) -> None:
    """B registers A's public key (with A's proof, replayed) under B's own principal header."""
    who, other = Identity.generate(), Identity.generate()
    body = _registration(who, ks.service_id)
    assert_unauthenticated(ks.http.post("/v1/principals", content=body, headers=sign(other, "/v1/principals", body)))
    assert not _is_registered(ks, who) and not _is_registered(ks, other)


def test_registration_cannot_squat_another_principal_id(ks: KS) -> None:
    """Mallory registers her own key (validly signed, valid proof) under the victim's principal id."""
    victim, mallory = Identity.generate(), Identity.generate()
    body = _registration(mallory, ks.service_id)
    headers = sign(mallory, "/v1/principals", body, principal=victim.principal_id)
    assert_unauthenticated(ks.http.post("/v1/principals", content=body, headers=headers))
    # the victim's id is still free for the victim's own key
    body = _registration(victim, ks.service_id)
    response = ks.http.post("/v1/principals", content=body, headers=sign(victim, "/v1/principals", body))
    assert response.status_code == 200 and response.json() == {"principal_id": victim.principal_id}
    path = "/v1/models/nothing-here/info"
    assert_unauthenticated(
        ks.http.post(path, content=b"", headers=sign(mallory, path, b"", principal=victim.principal_id))
    )


def test_unsigned_registration_is_rejected(ks: KS) -> None:
    who = Identity.generate()
    body = _registration(who, ks.service_id)
    response = ks.http.post("/v1/principals", content=body, headers={"content-type": "application/json"})
    assert_unauthenticated(response)
    assert not _is_registered(ks, who)


# ---------------------------------------------------------------------------- ownership: opaque denials


def _sealed_upload(ks: KS, client: KeyServiceClient, identity: Identity, model_id: str, version: int) -> bytes:
    service = client.attest()
    raw = service.hpke_key.to_bytes()
    sealed = hpke_seal(
        service.hpke_key, random_bytes(32), p.model_key_info(raw, model_id, version, identity.principal_id)
    )
    return (
        p.ModelKeyRequest(model_version=version, sealed_key=b64e(sealed), service_key=b64e(raw))
        .model_dump_json()
        .encode()
    )


@pytest.mark.parametrize("version", [1, 2])
def test_key_upload_by_non_owner_is_denied_opaquely(ks: KS, version: int) -> None:
    _, owner_client, model_id = ks.owned_model()
    mallory, mallory_client = ks.principal()
    path = f"/v1/models/{model_id}/keys"
    body = _sealed_upload(ks, mallory_client, mallory, model_id, version)
    assert_denied(ks.http.post(path, content=body, headers=sign(mallory, path, body)))
    event = ks.last_audit(action="upload_model_key", principal=mallory.principal_id)
    assert (event["decision"], event["reason"]) == ("deny", "not the owner")
    info = owner_client.model_info(model_id)
    assert info.is_owner and info.current_version == 1


def _owner_op(action: str, user: str) -> tuple[str, bytes]:
    if action == "allow_runtime":
        return "runtimes", p.AllowRuntimeRequest(measurement=RUNTIME).model_dump_json().encode()
    return "grants", grant_body(user, grant=action == "grant")


@pytest.mark.parametrize("action", ["allow_runtime", "grant", "revoke"])
def test_owner_operation_by_non_owner_is_denied_opaquely(ks: KS, action: str) -> None:
    _, _, model_id = ks.owned_model()
    mallory, _ = ks.principal()
    route, body = _owner_op(action, mallory.principal_id)
    path = f"/v1/models/{model_id}/{route}"
    assert_denied(ks.http.post(path, content=body, headers=sign(mallory, path, body)))
    event = ks.last_audit(action=action, principal=mallory.principal_id)
    assert (event["decision"], event["reason"], event["model_id"]) == ("deny", "not the owner", model_id)


@pytest.mark.parametrize("action", ["allow_runtime", "grant", "revoke"])
def test_denials_do_not_reveal_whether_the_model_exists(ks: KS, action: str) -> None:
    _, _, existing = ks.owned_model()
    missing = f"m-{secrets.token_hex(6)}"
    mallory, _ = ks.principal()
    bodies = []
    for model_id in (existing, missing):
        route, body = _owner_op(action, mallory.principal_id)
        path = f"/v1/models/{model_id}/{route}"
        response = ks.http.post(path, content=body, headers=sign(mallory, path, body))
        assert_denied(response)
        bodies.append(response.content)
    assert bodies[0] == bodies[1]
    assert ks.last_audit(action=action, model_id=existing)["reason"] == "not the owner"
    assert ks.last_audit(action=action, model_id=missing)["reason"] == "no such model"


def test_model_info_denial_is_opaque(ks: KS) -> None:
    _, _, model_id = ks.owned_model()
    mallory, _ = ks.principal()
    for target in (model_id, f"m-{secrets.token_hex(6)}"):
        path = f"/v1/models/{target}/info"
        assert_denied(ks.http.post(path, content=b"", headers=sign(mallory, path, b"")))


def test_model_info_denial_is_audited(ks: KS) -> None:
    """Regression: model_info used to deny without an audit record (DESIGN: every decision is logged)."""
    _, _, model_id = ks.owned_model()
    mallory, _ = ks.principal()
    path = f"/v1/models/{model_id}/info"
    assert_denied(ks.http.post(path, content=b"", headers=sign(mallory, path, b"")))
    event = ks.last_audit(principal=mallory.principal_id, model_id=model_id)
    assert event["decision"] == "deny"


def test_audit_chain_of_the_running_service_verifies(ks: KS) -> None:
    """Denials and decisions above were chained: recompute the chain from a read-only snapshot."""
    ks.owned_model()
    path = ks.workdir / "keyservice" / "keyservice.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT seq, ts, event, prev_hash, hash FROM audit ORDER BY seq").fetchall()
    finally:
        db.close()
    prev = GENESIS
    for seq, ts, event, prev_hash, digest in rows:
        assert prev_hash == prev
        assert digest == chain_hash(prev, seq, ts, json.loads(event))
        prev = digest
    assert len(rows) > 10
    reasons = {json.loads(row[2]).get("reason") for row in rows}
    assert {"bad signature", "stale timestamp", "replayed nonce", "unknown principal", "not the owner"} <= reasons
