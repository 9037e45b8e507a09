"""The release protocol (challenge → evidence → sealed keys) against a real KeyService.

Release requests are built by hand with ``SimulatedAttester``, hand-signed
simulated evidence and ``HpkePrivateKey``, so each rejection test changes one
thing in a request that otherwise succeeds. Every rejection is an opaque 403;
the audit log (read-only from the KeyService's SQLite file) has the reason.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from sealedml._internal.encoding import b64d, b64e, canonical_json
from sealedml.attestation.base import Evidence, TeeType, report_data_binding
from sealedml.attestation.measurement import measurement_for
from sealedml.attestation.simulated import _EVIDENCE_LABEL, SimulatedAttester, SimulatedPlatform
from sealedml.client.identity import Identity
from sealedml.crypto import HpkePrivateKey, random_bytes
from sealedml.envelope.model_container import open_model
from sealedml.errors import AccessDenied, CryptoError
from sealedml.protocol import keyservice as p
from sealedml.runtime.release import ReleaseClient
from sealedml.storage.modelstore import LocalModelStore

pytestmark = pytest.mark.slow

DENIED = {"error": "denied", "message": "denied"}
OTHER_MEASUREMENT = "cd" * 48


def runtime_measurement() -> str:
    return measurement_for("runtime", {"tee": "simulated"})


@dataclass
class World:
    """A published model and principals in every relation to it."""

    stack: Any
    http: httpx.Client
    model_id: str
    version: int
    user: Identity  # granted + consented to this build's runtime
    ungranted: Identity  # consented, never granted
    unconsented: Identity  # granted, never enabled
    other_consent: Identity  # granted, consented only to the owner's other allowed measurement

    def pair(self, who: Identity | None = None) -> list[tuple[str, str]]:
        return [(self.model_id, (who or self.user).principal_id)]

    def audit_for(self, challenge_id: str) -> dict[str, Any]:
        path = self.stack.workdir / "keyservice" / "keyservice.sqlite3"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT event FROM audit ORDER BY seq").fetchall()
        finally:
            db.close()
        events = [json.loads(r[0]) for r in rows]
        matching = [e for e in events if e.get("action") == "release" and e.get("challenge_id") == challenge_id]
        assert matching, f"no audit record for challenge {challenge_id}"
        return matching[-1]


@pytest.fixture(scope="module")
def world(stack: Any, toy_model: Any) -> Iterator[World]:
    _, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    model_id = f"rel-{secrets.token_hex(4)}"
    published = stack.publish(owner_ks, toy_model, model_id, users=[(user, user_ks)])
    ungranted, ungranted_ks = stack.principal()
    ungranted_ks.enable(model_id, [runtime_measurement()])
    unconsented, _ = stack.principal()
    owner_ks.grant(model_id, unconsented.principal_id)
    owner_ks.allow_runtime(model_id, OTHER_MEASUREMENT)  # the owner allows two runtimes
    other, other_ks = stack.principal()
    owner_ks.grant(model_id, other.principal_id)
    other_ks.enable(model_id, [OTHER_MEASUREMENT])
    with httpx.Client(base_url=stack.keyservice.url, timeout=30) as http:
        yield World(stack, http, model_id, published.version, user, ungranted, unconsented, other)


# ---------------------------------------------------------------------------- request building

EvidenceMaker = Callable[[bytes, bytes], Evidence]  # (nonce, runtime key) -> evidence


@dataclass
class Attempt:
    challenge_id: str
    nonce: bytes
    key: HpkePrivateKey
    body: bytes


def new_challenge(http: httpx.Client) -> p.ChallengeResponse:
    response = http.post("/v1/release/challenge", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    return p.ChallengeResponse.model_validate_json(response.content)


def prepare(
    http: httpx.Client,
    pairs: list[tuple[str, str]],
    *,
    evidence: EvidenceMaker | None = None,
    challenge_id: str | None = None,
    runtime_key: bytes | None = None,
    tee: str | None = None,
) -> Attempt:
    """A release request as an honest runtime builds it, unless one part is overridden."""
    challenge = new_challenge(http)
    nonce = b64d(challenge.nonce)
    key = HpkePrivateKey()
    own_key = key.public_key.to_bytes()
    made = (evidence or SimulatedAttester(role="runtime").attest)(nonce, own_key)
    request = p.ReleaseRequest(
        challenge_id=challenge_id or challenge.challenge_id,
        evidence=p.EvidenceMessage(tee=tee or made.tee.value, data=b64e(made.data), aux=b64e(made.aux)),
        runtime_key=b64e(own_key if runtime_key is None else runtime_key),
        pairs=[p.ReleasePair(model_id=m, user_id=u) for m, u in pairs],
    )
    return Attempt(challenge_id or challenge.challenge_id, nonce, key, request.model_dump_json().encode())


def post(http: httpx.Client, attempt: Attempt) -> httpx.Response:
    return http.post("/v1/release", content=attempt.body, headers={"content-type": "application/json"})


def open_leases(attempt: Attempt, response: httpx.Response) -> dict[str, Any]:
    answer = p.ReleaseResponse.model_validate_json(response.content)
    runtime_key = attempt.key.public_key.to_bytes()
    payload: dict[str, Any] = json.loads(
        attempt.key.open(b64d(answer.sealed), p.release_info(attempt.challenge_id, runtime_key))
    )
    return payload


def assert_denied(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == DENIED


def signed_simulated_evidence(
    platform: SimulatedPlatform,
    report_data: bytes,
    *,
    issued_at: int,
    measurement: str | None = None,
    debug: bool = False,
    claimed_platform: bytes | None = None,
) -> Evidence:
    """Simulated evidence signed by ``platform``'s root, with any ``issued_at`` (for freshness tests)."""
    body = {
        "v": 1,
        "tee": "simulated",
        "measurement": measurement or runtime_measurement(),
        "debug": debug,
        "report_data": report_data.hex(),
        "issued_at": issued_at,
        "platform": (claimed_platform or platform.public_key).hex(),
    }
    assert platform._signing_key is not None
    signature = platform._signing_key.sign(_EVIDENCE_LABEL + canonical_json(body))
    return Evidence(TeeType.SIMULATED, canonical_json({"body": body, "signature": signature.hex()}))


# ---------------------------------------------------------------------------- success


def test_release_returns_keys_sealed_to_the_runtime_key(world: World) -> None:
    attempt = prepare(world.http, world.pair())
    response = post(world.http, attempt)
    assert response.status_code == 200, response.text
    answer = p.ReleaseResponse.model_validate_json(response.content)
    payload = open_leases(attempt, response)
    (lease,) = payload["leases"]
    assert (lease["model_id"], lease["user_id"]) == (world.model_id, world.user.principal_id)
    assert lease["model_version"] == world.version
    assert b64d(lease["request_key"]) == world.user.request_key(world.model_id)
    assert payload["expires_at"] == answer.expires_at and answer.lease_ttl == 60
    assert time.time() + 50 < answer.expires_at <= time.time() + 61
    # the model key opens exactly the stored container of that model and version
    path = LocalModelStore(world.stack.store).path(world.model_id, lease["model_version"])
    model = open_model(path, b64d(lease["model_key"]), expected_model_id=world.model_id, expected_version=world.version)
    assert [i.name for i in model.graph.input] == ["x", "idx"]
    event = world.audit_for(attempt.challenge_id)
    assert (event["decision"], event["measurement"]) == ("allow", runtime_measurement())


def test_released_keys_open_only_with_the_runtime_key_and_challenge(world: World) -> None:
    attempt = prepare(world.http, world.pair())
    response = post(world.http, attempt)
    assert response.status_code == 200
    sealed = b64d(p.ReleaseResponse.model_validate_json(response.content).sealed)
    runtime_key = attempt.key.public_key.to_bytes()
    with pytest.raises(CryptoError):
        HpkePrivateKey().open(sealed, p.release_info(attempt.challenge_id, runtime_key))
    with pytest.raises(CryptoError):
        attempt.key.open(sealed, p.release_info(secrets.token_hex(16), runtime_key))


def test_release_client_obtains_a_lease(world: World) -> None:
    async def run() -> list[Any]:
        client = ReleaseClient(world.stack.keyservice.url, SimulatedAttester(role="runtime"))
        try:
            return await client.release(world.pair())
        finally:
            await client.aclose()

    (lease,) = asyncio.run(run())
    assert (lease.model_id, lease.user_id, lease.model_version) == (
        world.model_id,
        world.user.principal_id,
        world.version,
    )
    assert lease.request_key == world.user.request_key(world.model_id) and len(lease.model_key) == 32


def test_release_client_surfaces_denial_as_access_denied(world: World) -> None:
    async def run() -> None:
        client = ReleaseClient(world.stack.keyservice.url, SimulatedAttester(role="runtime", debug=True))
        try:
            await client.release(world.pair())
        finally:
            await client.aclose()

    with pytest.raises(AccessDenied):
        asyncio.run(run())


# ---------------------------------------------------------------------------- attestation rejections


def test_release_rejects_wrong_measurement(world: World) -> None:
    wrong = SimulatedAttester(role="runtime", measurement="ab" * 48)
    attempt = prepare(world.http, world.pair(), evidence=wrong.attest)
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        f"{world.model_id}/{world.user.principal_id}: owner does not allow runtime simulated:{'ab' * 48}"
    )


def test_release_rejects_keyservice_measurement(world: World) -> None:
    """A genuine TEE running other (here: the KeyService's) code is not a runtime the owner allowed."""
    attempt = prepare(world.http, world.pair(), evidence=SimulatedAttester(role="keyservice").attest)
    assert_denied(post(world.http, attempt))


def test_release_rejects_debug_claim(world: World) -> None:
    attempt = prepare(world.http, world.pair(), evidence=SimulatedAttester(role="runtime", debug=True).attest)
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"].endswith("policy: debug TEE not allowed")


def test_release_rejects_reused_nonce(world: World) -> None:
    attempt = prepare(world.http, world.pair())
    assert post(world.http, attempt).status_code == 200
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == "unknown, reused or expired challenge"


def test_release_rejects_reused_nonce_with_fresh_runtime_key(world: World) -> None:
    """Replaying a challenge with new evidence for a new key is refused too: the challenge is single-use."""
    first = prepare(world.http, world.pair())
    assert post(world.http, first).status_code == 200
    key = HpkePrivateKey()
    evidence = SimulatedAttester(role="runtime").attest(first.nonce, key.public_key.to_bytes())
    request = p.ReleaseRequest(
        challenge_id=first.challenge_id,
        evidence=p.EvidenceMessage(tee="simulated", data=b64e(evidence.data)),
        runtime_key=b64e(key.public_key.to_bytes()),
        pairs=[p.ReleasePair(model_id=world.model_id, user_id=world.user.principal_id)],
    )
    assert_denied(post(world.http, Attempt(first.challenge_id, first.nonce, key, request.model_dump_json().encode())))


def test_release_rejects_unknown_challenge(world: World) -> None:
    made_up = secrets.token_hex(16)
    attempt = prepare(world.http, world.pair(), challenge_id=made_up)
    assert_denied(post(world.http, attempt))
    assert world.audit_for(made_up)["reason"] == "unknown, reused or expired challenge"


def test_release_rejects_expired_challenge(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The running service's clock cannot be moved, so a second KeyService instance is opened in-process
    over the same data directory (same sealed master key, same store) and its clock is advanced."""
    import warnings

    from sealedml.keyservice import build_keyservice
    from sealedml.keyservice import challenges as challenges_module
    from sealedml.keyservice.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's TestClient warns about its httpx backend
        from starlette.testclient import TestClient

    svc = build_keyservice(world.stack.workdir / "keyservice")
    try:
        client = TestClient(create_app(svc))
        control = prepare(client, world.pair())  # type: ignore[arg-type]
        assert post(client, control).status_code == 200  # type: ignore[arg-type]
        attempt = prepare(client, world.pair())  # type: ignore[arg-type]
        skew = svc.challenge_ttl + 1  # the challenge table's clock, moved past the expiry
        later = types.SimpleNamespace(time=lambda: time.time() + skew, monotonic=lambda: time.monotonic() + skew)
        monkeypatch.setattr(challenges_module, "time", later)
        assert_denied(post(client, attempt))  # type: ignore[arg-type]
        assert world.audit_for(attempt.challenge_id)["reason"] == "unknown, reused or expired challenge"
    finally:
        svc.store.close()


def test_release_rejects_evidence_bound_to_another_key(world: World) -> None:
    key_b = HpkePrivateKey().public_key.to_bytes()
    attempt = prepare(world.http, world.pair(), runtime_key=key_b)  # evidence binds the attempt's own key A
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        "evidence rejected: report data does not bind the nonce and public key"
    )


def test_release_rejects_evidence_bound_to_another_nonce(world: World) -> None:
    attester = SimulatedAttester(role="runtime")
    attempt = prepare(world.http, world.pair(), evidence=lambda nonce, key: attester.attest(random_bytes(32), key))
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        "evidence rejected: report data does not bind the nonce and public key"
    )


def test_release_rejects_evidence_for_an_earlier_challenge(world: World) -> None:
    """Evidence bound to a used challenge's nonce is not accepted for a new challenge."""
    first = prepare(world.http, world.pair())
    assert post(world.http, first).status_code == 200
    attester = SimulatedAttester(role="runtime")
    attempt = prepare(world.http, world.pair(), evidence=lambda nonce, key: attester.attest(first.nonce, key))
    assert_denied(post(world.http, attempt))


def test_release_rejects_forged_platform_signature(world: World, tmp_path: Path) -> None:
    rogue = SimulatedPlatform.load(tmp_path)
    attempt = prepare(world.http, world.pair(), evidence=SimulatedAttester(rogue, role="runtime").attest)
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        "evidence rejected: evidence signed by an untrusted platform root"
    )


def test_release_rejects_rogue_signature_claiming_the_trusted_root(world: World, tmp_path: Path) -> None:
    rogue = SimulatedPlatform.load(tmp_path)
    trusted = SimulatedPlatform.load()
    attempt = prepare(
        world.http,
        world.pair(),
        evidence=lambda nonce, key: signed_simulated_evidence(
            rogue, report_data_binding(nonce, key), issued_at=int(time.time()), claimed_platform=trusted.public_key
        ),
    )
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        "evidence rejected: simulated evidence signature does not verify"
    )


@pytest.mark.parametrize("where", ["signature", "body"])
def test_release_rejects_byte_flipped_evidence(world: World, where: str) -> None:
    attester = SimulatedAttester(role="runtime")

    def flipped(nonce: bytes, key: bytes) -> Evidence:
        doc = json.loads(attester.attest(nonce, key).data)
        if where == "signature":
            sig = bytearray.fromhex(doc["signature"])
            sig[10] ^= 0x01
            doc["signature"] = sig.hex()
        else:
            doc["body"]["issued_at"] -= 1
        return Evidence(TeeType.SIMULATED, canonical_json(doc))

    attempt = prepare(world.http, world.pair(), evidence=flipped)
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        "evidence rejected: simulated evidence signature does not verify"
    )


@pytest.mark.parametrize("age", [400, -120], ids=["stale", "future"])
def test_release_rejects_stale_evidence(world: World, age: int) -> None:
    platform = SimulatedPlatform.load()
    attempt = prepare(
        world.http,
        world.pair(),
        evidence=lambda nonce, key: signed_simulated_evidence(
            platform, report_data_binding(nonce, key), issued_at=int(time.time()) - age
        ),
    )
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == "evidence rejected: simulated evidence is stale"


def test_hand_signed_fresh_evidence_is_accepted(world: World) -> None:
    """Control for the forged-evidence tests: the hand-signing above is otherwise correct."""
    platform = SimulatedPlatform.load()
    attempt = prepare(
        world.http,
        world.pair(),
        evidence=lambda nonce, key: signed_simulated_evidence(
            platform, report_data_binding(nonce, key), issued_at=int(time.time()) - 5
        ),
    )
    assert post(world.http, attempt).status_code == 200


def test_release_rejects_unaccepted_tee_type(world: World) -> None:
    attempt = prepare(world.http, world.pair(), tee="sgx")
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == "TEE type sgx not accepted by this KeyService"


@pytest.mark.parametrize(
    "runtime_key", [b"", b"\x00\x20" + b"k" * 31, b"\x99\x99" + b"k" * 32], ids=["empty", "short", "unknown-kem"]
)
def test_release_rejects_malformed_runtime_key(world: World, runtime_key: bytes) -> None:
    attempt = prepare(world.http, world.pair(), runtime_key=runtime_key)
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"].startswith("malformed release request")


@pytest.mark.parametrize("point", [b"\x00" * 32, b"\x01" + b"\x00" * 31], ids=["zero", "one"])
def test_release_rejects_low_order_runtime_key(world: World, point: bytes) -> None:
    """Evidence genuinely bound to an unusable X25519 key (an attested runtime can bind any key)."""
    low_order = b"\x00\x20" + point  # kem id 0x0020 (DHKEM X25519) ‖ point
    attester = SimulatedAttester(role="runtime")
    attempt = prepare(
        world.http, world.pair(), runtime_key=low_order, evidence=lambda nonce, key: attester.attest(nonce, low_order)
    )
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["decision"] == "deny"


def test_release_rejects_deeply_nested_evidence(world: World) -> None:
    """Regression: SimulatedVerifier let json.loads' RecursionError escape, a 500 instead of an opaque 403."""
    attempt = prepare(world.http, world.pair(), evidence=lambda nonce, key: Evidence(TeeType.SIMULATED, b"[" * 100_000))
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"].startswith("evidence rejected:")


# ---------------------------------------------------------------------------- access rejections


def test_release_rejects_user_without_grant(world: World) -> None:
    attempt = prepare(world.http, world.pair(world.ungranted))
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        f"{world.model_id}/{world.ungranted.principal_id}: user not granted (or revoked) by the owner"
    )


def test_release_rejects_user_without_consent(world: World) -> None:
    attempt = prepare(world.http, world.pair(world.unconsented))
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"].endswith(
        "user has not enabled the model (no request key / consent)"
    )


def test_release_rejects_model_allowed_but_user_consented_other_measurement(world: World) -> None:
    attempt = prepare(world.http, world.pair(world.other_consent))
    assert_denied(post(world.http, attempt))
    # owner {this runtime, OTHER} ∩ user {OTHER} = {OTHER}: this runtime may not see the user's data
    assert world.audit_for(attempt.challenge_id)["reason"] == (
        f"{world.model_id}/{world.other_consent.principal_id}: user did not consent to runtime "
        f"simulated:{runtime_measurement()}"
    )
    # control: a runtime with the measurement both agreed on is served
    agreed = prepare(
        world.http,
        world.pair(world.other_consent),
        evidence=SimulatedAttester(role="runtime", measurement=OTHER_MEASUREMENT).attest,
    )
    assert post(world.http, agreed).status_code == 200


def test_release_rejects_unknown_model(world: World) -> None:
    attempt = prepare(world.http, [(f"nope-{secrets.token_hex(4)}", world.user.principal_id)])
    assert_denied(post(world.http, attempt))
    assert world.audit_for(attempt.challenge_id)["reason"].endswith("no such model")


def test_release_rejects_a_request_mixing_allowed_and_denied_pairs(world: World) -> None:
    pairs = [*world.pair(), *world.pair(world.ungranted)]
    attempt = prepare(world.http, pairs)
    assert_denied(post(world.http, attempt))


def test_release_rejects_after_revocation(short_ttl_stack: Any, toy_model: Any) -> None:
    stack = short_ttl_stack
    _, owner_ks = stack.principal()
    user, user_ks = stack.principal()
    model_id = f"revoke-{secrets.token_hex(4)}"
    stack.publish(owner_ks, toy_model, model_id, users=[(user, user_ks)])
    client = stack.infer_client(user)
    inputs = {"x": np.zeros((1, 4), np.float32), "idx": np.zeros(1, np.int64)}
    np.testing.assert_array_equal(client.infer(model_id, inputs)["idx_plus_one"], [1])
    owner_ks.grant(model_id, user.principal_id, grant=False)
    time.sleep(1 + 1)  # lease TTL (1 s) + 1 s: any lease the warm worker holds has expired
    with pytest.raises(AccessDenied):
        client.infer(model_id, inputs)
    # and directly: the KeyService refuses the pair
    with httpx.Client(base_url=stack.keyservice.url, timeout=30) as http:
        attempt = prepare(http, [(model_id, user.principal_id)])
        assert_denied(post(http, attempt))
