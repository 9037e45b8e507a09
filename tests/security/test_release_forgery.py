"""An operator between a runtime and the KeyService: forged key releases are refused.

The platform tells a runtime where the KeyService is, so the operator can put an
endpoint of its own there. Here that endpoint is a real HTTP server on loopback
that forwards everything to the real KeyService and, when told to, forges the
answer to ``/v1/release`` — keys sealed (HPKE, which does not authenticate the
sender) to the runtime's genuine, attested ephemeral key. The runtime is a real
``sealedml worker serve`` process pointed at the endpoint.

The forger does not hold the simulated platform root: in this test it stands
for a CPU vendor's key, which an operator does not have.
"""

from __future__ import annotations

import json
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sealedml import zoo
from sealedml._internal.encoding import b64d, b64e
from sealedml._internal.procs import ServiceProcess
from sealedml.client.gateway import InferenceClient
from sealedml.client.identity import Identity
from sealedml.crypto import HpkePublicKey, SigningKey, hpke_seal, random_bytes
from sealedml.envelope.model_container import seal_model
from sealedml.errors import AttestationError, Error, ProtocolError, SealedModelError
from sealedml.protocol import keyservice as p
from sealedml.storage.modelstore import LocalModelStore
from tests.conftest import Served, Stack, serve_in_thread, start_keyservice
from tests.unit.attestation.test_ratls import _key_pem, _self_signed_with

pytestmark = pytest.mark.slow

X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
IDX = np.array([7], np.int64)


@dataclass
class Forger:
    """The operator's endpoint: forwards to the KeyService, forges releases on demand."""

    upstream: str
    mode: str = "forward"
    attacker_model_key: bytes = field(default_factory=lambda: random_bytes(32))
    attacker_request_keys: dict[str, bytes] = field(default_factory=dict)
    attacker_signer: SigningKey = field(default_factory=SigningKey.generate)
    captured: list[bytes] = field(default_factory=list)  # genuine release answers seen
    requests: list[str] = field(default_factory=list)
    forged: int = 0

    def app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            path = request.url.path
            self.requests.append(path)
            body = await request.body()
            if path == "/v1/release" and self.mode != "forward":
                return self._forge(body)
            async with httpx.AsyncClient(base_url=self.upstream, verify=False, timeout=30) as client:
                upstream = await client.request(
                    request.method,
                    path,
                    params=dict(request.query_params),
                    content=body,
                    headers={k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")},
                )
            content = upstream.content
            if path == "/v1/release" and upstream.status_code == 200:
                self.captured.append(content)
            if path == "/v1/attestation" and self.mode == "swap-attestation":
                doc = json.loads(content)
                doc["signing_public_key"] = b64e(self.attacker_signer.public_bytes)
                content = json.dumps(doc).encode()
            return Response(content, status_code=upstream.status_code, media_type="application/json")

        return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])

    def _forge(self, body: bytes) -> Response:
        self.forged += 1
        if self.mode == "replay-genuine":
            return Response(self.captured[-1], media_type="application/json")
        req = p.ReleaseRequest.model_validate_json(body)
        runtime_key = b64d(req.runtime_key)
        expires_at = int(time.time()) + 3600
        payload = {
            "leases": [
                {
                    "model_id": pair.model_id,
                    "user_id": pair.user_id,
                    "model_version": 1,
                    "model_key": b64e(self.attacker_model_key),
                    "request_key": b64e(self.attacker_request_keys.get(pair.user_id, random_bytes(32))),
                }
                for pair in req.pairs
            ],
            "expires_at": expires_at,
        }
        recipient = HpkePublicKey.from_bytes(runtime_key)
        sealed = hpke_seal(recipient, json.dumps(payload).encode(), p.release_info(req.challenge_id, runtime_key))
        message = p.release_answer_message("forged", req.challenge_id, runtime_key, sealed, expires_at, 3600)
        signature = bytes(64) if self.mode == "forge-unsigned" else self.attacker_signer.sign(message)
        answer = p.ReleaseResponse(
            sealed=b64e(sealed), expires_at=expires_at, lease_ttl=3600, signature=b64e(signature)
        )
        return Response(answer.model_dump_json(), media_type="application/json")


def start_worker(workdir: Path, keyservice_url: str, name: str) -> ServiceProcess:
    return ServiceProcess.start(
        ["worker", "serve", "--keyservice", keyservice_url, "--store", str(workdir / "store"), "--port", "0"],
        name=name,
        log_path=workdir / f"{name}.log",
    )


@dataclass
class Scene:
    workdir: Path
    stack: Stack
    forger: Forger
    proxy: Served
    alice: Identity
    mallory: Identity
    genuine: onnx.ModelProto

    def infer(self, worker: ServiceProcess, who: Identity) -> dict[str, np.ndarray]:
        with InferenceClient(worker.url, who, timeout=60) as client:
            return client.infer("victim", {"x": X, "idx": IDX})


def reference(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": X, "idx": IDX})[0])


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    workdir = tmp_path_factory.mktemp("forgery")
    ks = start_keyservice(workdir)
    stack = Stack(workdir, ks, ks)  # no gateway: users talk to the worker's native API
    forger = Forger(ks.url)
    proxy = serve_in_thread(forger.app())
    try:
        owner, owner_ks = stack.principal()
        alice, alice_ks = stack.principal()
        mallory, mallory_ks = stack.principal()  # registered, never granted
        genuine = zoo.toy_multi_io(seed=0)
        stack.publish(owner_ks, genuine, "victim", users=[(alice, alice_ks)])
        forger.attacker_request_keys[mallory.principal_id] = mallory.request_key("victim")
        yield Scene(workdir, stack, forger, proxy, alice, mallory, genuine)
    finally:
        for client in stack.clients:
            client.close()  # type: ignore[attr-defined]
        proxy.stop()
        ks.stop()


@pytest.mark.parametrize("mode", ["forge-unsigned", "forge-signed-by-attacker", "replay-genuine", "swap-attestation"])
def test_runtime_rejects_release_from_unattested_keyservice(scene: Scene, mode: str) -> None:
    """A loaded victim model is never served to an ungranted caller through a forged release."""
    worker = start_worker(scene.workdir, scene.proxy.url, f"worker-{mode}")
    try:
        scene.forger.mode = "forward"
        out = scene.infer(worker, scene.alice)  # the victim model is now loaded in the instance
        np.testing.assert_allclose(out["y"], reference(scene.genuine), rtol=1e-6)

        scene.forger.mode = mode
        forged_before = scene.forger.forged
        with pytest.raises(Error) as refused:
            scene.infer(worker, scene.mallory)
        assert scene.forger.forged > forged_before  # the forgery was offered …
        expected = AttestationError if mode == "swap-attestation" else ProtocolError
        assert isinstance(refused.value, expected), refused.value  # … and refused by the runtime
        stats = httpx.get(f"{worker.url}/v1/stats", timeout=10).json()
        assert stats["models"] == [{"model_id": "victim", "version": 1}]  # still only the genuine load

        scene.forger.mode = "forward"  # the genuine user is still served, correctly
        np.testing.assert_allclose(scene.infer(worker, scene.alice)["y"], reference(scene.genuine), rtol=1e-6)
    finally:
        worker.stop()


def test_planted_container_is_never_served_under_a_genuine_id(scene: Scene) -> None:
    """The operator replaces the stored container of (victim, 1) with its own model, sealed under its own key."""
    stored = LocalModelStore(scene.workdir / "store").path("victim", 1)
    genuine_bytes = stored.read_bytes()
    planted = zoo.toy_multi_io(seed=1)  # same interface, other weights: its outputs give it away
    assert not np.allclose(reference(planted), reference(scene.genuine))
    worker = start_worker(scene.workdir, scene.proxy.url, "worker-planted")
    try:
        scene.forger.mode = "forward"
        np.testing.assert_allclose(scene.infer(worker, scene.alice)["y"], reference(scene.genuine), rtol=1e-6)
        # The operator owns the store: it overwrites the genuine container in place.
        stored.write_bytes(
            seal_model(planted, model_id="victim", model_version=1, model_key=scene.forger.attacker_model_key)
        )
        scene.forger.mode = "forge-signed-by-attacker"  # a lease naming the planted container's key
        with pytest.raises(ProtocolError):
            scene.infer(worker, scene.mallory)
        scene.forger.mode = "forward"  # the victim's own requests: the genuine model, never the planted one
        np.testing.assert_allclose(scene.infer(worker, scene.alice)["y"], reference(scene.genuine), rtol=1e-6)
    finally:
        worker.stop()
    fresh = start_worker(scene.workdir, scene.proxy.url, "worker-planted-fresh")
    try:  # an instance that has not loaded the genuine model: the genuine key does not open the plant
        with pytest.raises(SealedModelError):
            scene.infer(fresh, scene.alice)
    finally:
        fresh.stop()
        stored.write_bytes(genuine_bytes)


def _plain_tls_certificate(directory: Path) -> dict[str, str]:
    """A self-signed certificate with no attestation evidence: what an operator can make."""
    key = ec.generate_private_key(ec.SECP256R1())
    (directory / "plain.pem").write_bytes(_self_signed_with([], key).public_bytes(serialization.Encoding.PEM))
    (directory / "plain.key").write_bytes(_key_pem(key))
    return {"ssl_certfile": str(directory / "plain.pem"), "ssl_keyfile": str(directory / "plain.key")}


def test_runtime_rejects_release_from_unattested_ratls_endpoint(tmp_path: Path, toy_model: onnx.ModelProto) -> None:
    """Over ``--tls ra``: an endpoint with a certificate that carries no evidence gets not a single request."""
    ks = start_keyservice(tmp_path, extra=["--tls", "ra"])
    forger = Forger(ks.url)
    proxy = serve_in_thread(forger.app(), **_plain_tls_certificate(tmp_path))
    stack = Stack(tmp_path, ks, ks)
    try:
        owner, owner_ks = stack.principal()
        alice, alice_ks = stack.principal()
        stack.publish(owner_ks, toy_model, "victim", users=[(alice, alice_ks)])
        genuine = start_worker(tmp_path, ks.url, "worker-genuine")  # control: the real RA-TLS KeyService works
        try:
            with InferenceClient(genuine.url, alice, timeout=60) as client:
                client.infer("victim", {"x": X, "idx": IDX})
        finally:
            genuine.stop()
        worker = start_worker(tmp_path, proxy.url, "worker-unattested")
        try:
            with InferenceClient(worker.url, alice, timeout=60) as client, pytest.raises(AttestationError):
                client.infer("victim", {"x": X, "idx": IDX})
        finally:
            worker.stop()
        assert forger.requests == []  # refused in the TLS handshake, before any request was sent
    finally:
        for client in stack.clients:
            client.close()  # type: ignore[attr-defined]
        proxy.stop()
        ks.stop()


def test_lease_never_outlives_the_ttl_whatever_expiry_the_answer_claims(
    tmp_path: Path, toy_model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyService clock far ahead (or an answer claiming a far expiry) does not extend a lease past its TTL."""
    import asyncio

    from sealedml.attestation.simulated import SimulatedAttester
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.keyservice import service as service_module
    from sealedml.keyservice.app import create_app
    from sealedml.keyservice.server import build_keyservice
    from sealedml.runtime.release import ReleaseClient

    service = build_keyservice(tmp_path / "ks", lease_ttl=30)
    served = serve_in_thread(create_app(service))
    try:
        owner, alice = Identity.generate(), Identity.generate()
        with KeyServiceClient(served.url, owner) as o, KeyServiceClient(served.url, alice) as a:
            o.register()
            a.register()
            o.upload_model_key("m", 1, random_bytes(32))
            o.allow_runtime("m", SimulatedAttester(role="runtime").measurement)
            o.grant("m", alice.principal_id)
            a.enable("m", [SimulatedAttester(role="runtime").measurement])

        real_time = time.time
        skewed = types.SimpleNamespace(time=lambda: real_time() + 100_000, monotonic=time.monotonic)
        monkeypatch.setattr(service_module, "time", skewed)  # the KeyService's clock only

        async def release() -> float:
            client = ReleaseClient(served.url, SimulatedAttester(role="runtime"))
            try:
                (lease,) = await client.release([("m", alice.principal_id)])
                return lease.expires_at
            finally:
                await client.aclose()

        asked = real_time()
        expires_at = asyncio.run(release())
        assert asked < expires_at <= real_time() + 30  # the TTL, counted from when the runtime asked
    finally:
        served.stop()


def test_steady_state_release_is_one_round_trip_and_survives_a_dead_kept_challenge(scene: Scene) -> None:
    """Answers carry the next challenge; a kept challenge the KeyService no longer knows costs one retry."""
    import asyncio

    from sealedml.attestation.simulated import SimulatedAttester
    from sealedml.runtime.release import ReleaseClient

    scene.forger.mode = "forward"
    pair = [("victim", scene.alice.principal_id)]

    async def releases() -> None:
        client = ReleaseClient(scene.proxy.url, SimulatedAttester(role="runtime"))
        try:
            await client.release(pair)
            before = list(scene.forger.requests)
            for _ in range(3):
                await client.release(pair)
            after = scene.forger.requests[len(before) :]
            assert after == ["/v1/release"] * 3  # no challenge round trips in steady state
            # As after a KeyService restart: the kept challenge is unknown to it.
            bogus = p.ChallengeResponse(challenge_id="0" * 32, nonce=b64e(bytes(32)), expires_in=60)
            client._challenges = [(bogus, time.monotonic() + 60)]
            mark = len(scene.forger.requests)
            await client.release(pair)  # denied once, then served with a fresh challenge
            assert scene.forger.requests[mark:] == ["/v1/release", "/v1/release/challenge", "/v1/release"]
        finally:
            await client.aclose()

    asyncio.run(releases())
