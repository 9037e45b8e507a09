"""A release whose evidence is a real SGX quote from a (fake) Gramine tree, end to end.

The KeyService runs in-process behind a real HTTP server on loopback with the
SGX DCAP verifier (its clock pinned inside the collateral's validity window);
the runtime side is the real :class:`ReleaseClient` with the real
:class:`GramineAttester` reading a fake ``/dev/attestation``. The quote is
genuine and verifies — but it cannot bind the KeyService's fresh nonce and the
runtime's key, so the release is refused, and the audit log says why.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sealedml.attestation.base import Claims, Evidence, TeeType, Verifier
from sealedml.attestation.dcap import DcapVerifier
from sealedml.attestation.gramine import GramineAttester
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.errors import AccessDenied
from sealedml.keyservice.app import create_app
from sealedml.keyservice.server import build_keyservice
from sealedml.runtime.release import ReleaseClient
from tests.conftest import VECTORS, serve_in_thread

MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
PINNED = datetime(2025, 7, 1, tzinfo=UTC)


class PinnedClock(Verifier):
    """The real verifier, evaluated at a fixed time inside the collateral window."""

    def __init__(self, inner: Verifier) -> None:
        self.inner, self.tee = inner, inner.tee

    def verify(self, evidence: Evidence, *, now: datetime | None = None) -> Claims:
        return self.inner.verify(evidence, now=PINNED)


@pytest.fixture
def keyservice(tmp_path: Path):
    service = build_keyservice(tmp_path / "ks")
    service.verifiers[TeeType.SGX] = PinnedClock(DcapVerifier(TeeType.SGX, VECTORS / "sgx-dcap" / "collateral.json"))
    served = serve_in_thread(create_app(service))
    yield service, served.url
    served.stop()


def test_real_sgx_quote_reaches_verifier_and_is_refused_for_its_binding(keyservice, tmp_path, toy_model):
    service, url = keyservice
    owner, user = Identity.generate(), Identity.generate()
    with KeyServiceClient(url, owner) as o, KeyServiceClient(url, user) as u:
        o.register()
        u.register()
        o.upload_model_key("sgx-model", 1, b"k" * 32)
        o.allow_runtime("sgx-model", MRENCLAVE, tee="sgx")  # the owner allows exactly this enclave
        o.grant("sgx-model", user.principal_id)
        u.enable("sgx-model", [f"sgx:{MRENCLAVE}"])

    tree = tmp_path / "gramine"
    (tree / "dev" / "attestation").mkdir(parents=True)
    (tree / "dev" / "attestation" / "quote").write_bytes((VECTORS / "sgx-dcap" / "quote.bin").read_bytes())
    (tree / "dev" / "attestation" / "user_report_data").write_bytes(b"")
    attester = GramineAttester(tree)

    async def release():
        client = ReleaseClient(url, attester)
        try:
            await client.release([("sgx-model", user.principal_id)])
        finally:
            await client.aclose()

    with pytest.raises(AccessDenied):
        asyncio.run(release())
    # The attester wrote exactly the binding of the KeyService's nonce and its key …
    written = (tree / "dev" / "attestation" / "user_report_data").read_bytes()
    assert len(written) == 64 and written != bytes(64)
    # … and the KeyService verified the real quote, then refused it for its report data.
    event = list(service.store.audit_records())[-1].event
    assert event["action"] == "release" and event["decision"] == "deny"
    assert event["tee"] == "sgx" and event["measurement"] == MRENCLAVE
    assert "report data does not bind" in event["reason"]
