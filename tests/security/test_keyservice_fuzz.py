"""Property-based fuzzing of the KeyService HTTP layer, in-process (Starlette TestClient).

Property: no request to any POST route, however malformed, makes the
KeyService answer 5xx. Three generators: raw noise (bodies, headers, paths);
correctly signed calls with schema-shaped but hostile bodies (so the service
logic behind authentication is reached); and release requests against real
challenges with hostile evidence and keys.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sealedml._internal.encoding import b64d, b64e
from sealedml.attestation.simulated import SimulatedAttester
from sealedml.client.identity import Identity
from sealedml.crypto import HpkePrivateKey, HpkePublicKey, hpke_seal, random_bytes
from sealedml.keyservice import build_keyservice
from sealedml.keyservice.app import create_app
from sealedml.keyservice.service import KeyService
from sealedml.protocol import keyservice as p

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns about its httpx backend
    from starlette.testclient import TestClient

FUZZ = settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MODEL_ROUTES = ["keys", "runtimes", "grants", "consent", "info"]


@dataclass
class Target:
    svc: KeyService
    client: TestClient
    owner: Identity
    user: Identity
    owned: str  # a model the owner owns, the user is granted and consented to
    foreign: str  # a model someone else owns
    runtime: str
    service_key: HpkePublicKey
    attesters: dict[bool, SimulatedAttester]  # by debug flag


_SERVICE = {"id": ""}  # set by the target fixture: signed calls are bound to one KeyService


def _sign(identity: Identity, path: str, body: bytes) -> dict[str, str]:
    ts, nonce = int(time.time()), secrets.token_hex(16)
    return {
        p.HDR_PRINCIPAL: identity.principal_id,
        p.HDR_TIMESTAMP: str(ts),
        p.HDR_NONCE: nonce,
        p.HDR_SIGNATURE: b64e(
            identity.signing_key.sign(p.signed_call_message("POST", path, ts, nonce, body, _SERVICE["id"]))
        ),
        "content-type": "application/json",
    }


def _call(client: TestClient, identity: Identity, path: str, model: p._Msg | None) -> None:
    body = model.model_dump_json().encode() if model is not None else b""
    response = client.post(path, content=body, headers=_sign(identity, path, body))
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    svc = build_keyservice(Path(tmp_path_factory.mktemp("ks-fuzz")), lease_ttl=60)
    _SERVICE["id"] = svc.service_id
    client = TestClient(create_app(svc))
    client.__enter__()  # one event loop for all requests (much faster than one per request)
    attesters = {debug: SimulatedAttester(role="runtime", debug=debug) for debug in (False, True)}
    runtime = attesters[False].measurement
    owner, user, other = Identity.generate(), Identity.generate(), Identity.generate()
    for who in (owner, user, other):
        pk = who.signing_key.public_bytes
        _call(
            client,
            who,
            "/v1/principals",
            p.RegisterRequest(
                public_key=b64e(pk), proof=b64e(who.signing_key.sign(p.registration_message(svc.service_id, pk)))
            ),
        )
    sk = HpkePublicKey.from_bytes(b64d(svc.attestation(random_bytes(32)).hpke_public_key))
    state = Target(svc, client, owner, user, "owned", "foreign", runtime, sk, attesters)
    for model_id, who in (("owned", owner), ("foreign", other)):
        sealed = hpke_seal(sk, random_bytes(32), p.model_key_info(sk.to_bytes(), model_id, 1, who.principal_id))
        _call(
            client,
            who,
            f"/v1/models/{model_id}/keys",
            p.ModelKeyRequest(model_version=1, sealed_key=b64e(sealed), service_key=b64e(sk.to_bytes())),
        )
    _call(client, owner, "/v1/models/owned/runtimes", p.AllowRuntimeRequest(measurement=runtime))
    _call(client, owner, "/v1/models/owned/grants", p.GrantRequest(user_id=user.principal_id))
    sealed = hpke_seal(sk, user.request_key("owned"), p.consent_info(sk.to_bytes(), "owned", user.principal_id))
    _call(
        client,
        user,
        "/v1/models/owned/consent",
        p.ConsentRequest(
            sealed_request_key=b64e(sealed),
            service_key=b64e(sk.to_bytes()),
            runtimes=[p.RuntimeRef(measurement=runtime)],
        ),
    )
    try:
        yield state
    finally:
        client.__exit__(None, None, None)
        svc.store.close()


def assert_no_server_error(response: Any) -> None:
    event(f"HTTP {response.status_code}")  # the spread is shown by --hypothesis-show-statistics
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400 and response.status_code not in (404, 405):  # routing errors are plain text
        assert isinstance(response.json().get("error"), str)


# ---------------------------------------------------------------------------- strategies

_ascii = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
header_text = st.text(_ascii, max_size=80)
_id_chars = "abcXYZ019._-"
valid_ids = st.builds(lambda head, tail: head + tail, st.sampled_from("aZ0"), st.text(_id_chars, max_size=20))
ids = st.one_of(
    st.sampled_from(["owned", "foreign", "missing", "m", "a" * 128, "a" * 129, ".x", "-x", ""]),
    valid_ids,
    st.text(_ascii, max_size=40),
)
hexes = st.one_of(
    st.sampled_from(["ab" * 48, "AB" * 32, "ab" * 64, "ab" * 65, "zz" * 48, ""]),
    st.text("0123456789abcdefABCDEF", max_size=140),
)
b64s = st.one_of(
    st.binary(max_size=200).map(b64e), st.text(_ascii, max_size=60), st.just(""), st.just("===="), st.just("AAAA" * 300)
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.integers(min_value=2**63, max_value=2**80),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=10,
)


def mess(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values of a field, sometimes anything JSON can hold."""
    return st.one_of(good, good, good, json_values)


def field_dicts(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts with ``fields`` (each plausible or hostile): usually all of them, sometimes a subset
    and an unknown one."""
    complete = st.fixed_dictionaries({k: mess(v) for k, v in fields.items()})
    partial = st.fixed_dictionaries({}, optional={**{k: mess(v) for k, v in fields.items()}, "unexpected": json_values})
    return st.one_of(complete, complete, partial)


BODY_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "principals": {"public_key": b64s, "proof": b64s},
    "keys": {"model_version": st.integers(min_value=-5, max_value=2**54), "sealed_key": b64s, "service_key": b64s},
    "runtimes": {
        "tee": st.sampled_from([None, "simulated", "sgx", "tdx", "sev-snp", "nitro"]),
        "measurement": hexes,
        "allow": st.booleans(),
    },
    "grants": {"user_id": ids, "grant": st.booleans()},
    "consent": {
        "sealed_request_key": b64s,
        "service_key": b64s,
        "runtimes": st.lists(st.fixed_dictionaries({"measurement": hexes}), max_size=70),
    },
    "info": {},
    "challenge": {},
    "release": {
        "challenge_id": st.text(_ascii, max_size=70),
        "evidence": st.fixed_dictionaries(
            {}, optional={"tee": st.sampled_from(["simulated", "sgx", "x"]), "data": b64s, "aux": b64s}
        ),
        "runtime_key": b64s,
        "pairs": st.lists(st.fixed_dictionaries({"model_id": ids, "user_id": ids}), max_size=70),
    },
}


def route_paths(route: str, model_id: str) -> str:
    if route == "principals":
        return "/v1/principals"
    if route == "challenge":
        return "/v1/release/challenge"
    if route == "release":
        return "/v1/release"
    return f"/v1/models/{quote(model_id, safe='')}/{route}"


def bodies_for(route: str) -> st.SearchStrategy[bytes]:
    structured = field_dicts(BODY_FIELDS[route]).map(lambda d: json.dumps(d).encode())
    return st.one_of(structured, structured, st.binary(max_size=512), json_values.map(lambda v: json.dumps(v).encode()))


noise_headers = st.fixed_dictionaries(
    {},
    optional={
        p.HDR_PRINCIPAL: header_text,
        p.HDR_TIMESTAMP: st.one_of(st.integers().map(str), st.integers(min_value=2**62).map(str), header_text),
        p.HDR_NONCE: st.one_of(st.text("abcdef0123456789", min_size=14, max_size=66), header_text),
        p.HDR_SIGNATURE: st.one_of(st.binary(min_size=60, max_size=68).map(b64e), header_text),
        "content-type": st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]),
    },
)


# ---------------------------------------------------------------------------- properties


def test_fuzz_target_serves_a_genuine_release(target: Target) -> None:
    """Control: the fuzzed service is fully set up, so a genuine release gets through."""
    ch = p.ChallengeResponse.model_validate_json(target.client.post("/v1/release/challenge", content=b"{}").content)
    key = HpkePrivateKey()
    evidence = target.attesters[False].attest(b64d(ch.nonce), key.public_key.to_bytes())
    request = p.ReleaseRequest(
        challenge_id=ch.challenge_id,
        evidence=p.EvidenceMessage(tee="simulated", data=b64e(evidence.data)),
        runtime_key=b64e(key.public_key.to_bytes()),
        pairs=[p.ReleasePair(model_id="owned", user_id=target.user.principal_id)],
    )
    response = target.client.post("/v1/release", content=request.model_dump_json().encode())
    assert response.status_code == 200, response.text


@FUZZ
@given(data=st.data())
def test_random_requests_never_cause_a_server_error(target: Target, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(sorted(BODY_FIELDS)), label="route")
    path = route_paths(route, data.draw(ids, label="model_id"))
    body = data.draw(bodies_for(route), label="body")
    headers = data.draw(noise_headers, label="headers")
    if data.draw(st.booleans(), label="known principal") and p.HDR_PRINCIPAL in headers:
        headers[p.HDR_PRINCIPAL] = data.draw(st.sampled_from([target.owner, target.user])).principal_id
    assert_no_server_error(target.client.post(path, content=body, headers=headers))


@FUZZ
@given(data=st.data())
def test_signed_requests_with_hostile_bodies_never_cause_a_server_error(target: Target, data: st.DataObject) -> None:
    """Correctly signed, so authentication passes and the service logic sees the hostile values."""
    route = data.draw(st.sampled_from([*MODEL_ROUTES, "principals"]), label="route")
    model_id = data.draw(st.one_of(st.sampled_from(["owned", "foreign", "missing"]), valid_ids), label="model_id")
    path = route_paths(route, model_id)
    fields = dict(BODY_FIELDS[route])
    if route in ("keys", "consent"):
        sk = b64e(target.service_key.to_bytes())  # reach hpke_open with hostile ciphertexts
        fields["service_key"] = st.one_of(st.just(sk), st.just(sk), b64s)
    body = data.draw(
        st.one_of(field_dicts(fields).map(lambda d: json.dumps(d).encode()), st.just(b""), st.binary(max_size=64)),
        label="body",
    )
    who = data.draw(st.sampled_from([target.owner, target.user]), label="signer")
    assert_no_server_error(target.client.post(path, content=body, headers=_sign(who, path, body)))


@functools.cache
def _evidence_data(runtime: str) -> st.SearchStrategy[bytes]:
    sim_body = st.fixed_dictionaries(
        {},
        optional={
            "v": mess(st.just(1)),
            "tee": mess(st.just("simulated")),
            "measurement": mess(st.just(runtime)),
            "debug": mess(st.booleans()),
            "report_data": mess(hexes),
            "issued_at": mess(st.integers()),
            "platform": mess(hexes),
        },
    )
    doc = st.fixed_dictionaries({}, optional={"body": mess(sim_body), "signature": mess(hexes)})
    return st.one_of(
        doc.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
    )


@FUZZ
@given(data=st.data())
def test_release_with_hostile_evidence_never_causes_a_server_error(target: Target, data: st.DataObject) -> None:
    ch = target.svc.challenge()  # issued directly: the request under test is the release itself
    key = HpkePrivateKey().public_key.to_bytes()
    genuine = data.draw(st.booleans(), label="genuine evidence")
    if genuine:
        attester = target.attesters[data.draw(st.booleans(), label="debug")]
        evidence = attester.attest(b64d(ch.nonce), key).data
        if data.draw(st.booleans(), label="flip"):
            i = data.draw(st.integers(0, len(evidence) - 1), label="flip at")
            evidence = evidence[:i] + bytes([evidence[i] ^ 0x01]) + evidence[i + 1 :]
    else:
        evidence = data.draw(_evidence_data(target.runtime), label="evidence")
    runtime_key = data.draw(st.one_of(st.just(key), st.binary(max_size=40)), label="runtime key")
    pairs = data.draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "model_id": st.one_of(st.just("owned"), st.just("owned"), st.just("foreign"), valid_ids, ids),
                    "user_id": st.one_of(
                        st.just(target.user.principal_id), st.just(target.user.principal_id), valid_ids, ids
                    ),
                }
            ),
            min_size=1,
            max_size=4,
        ),
        label="pairs",
    )
    request = {
        "challenge_id": data.draw(st.one_of(st.just(ch.challenge_id), st.text(_ascii, max_size=64)), label="cid"),
        "evidence": {
            "tee": data.draw(st.sampled_from(["simulated", "simulated", "sgx", "tdx", "sev-snp"])),
            "data": b64e(evidence),
            "aux": data.draw(st.one_of(st.just(""), b64s), label="aux"),
        },
        "runtime_key": b64e(runtime_key),
        "pairs": pairs,
    }
    response = target.client.post(
        "/v1/release", content=json.dumps(request).encode(), headers={"content-type": "application/json"}
    )
    assert_no_server_error(response)
