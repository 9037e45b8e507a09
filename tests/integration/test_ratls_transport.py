"""``--tls ra``: the KeyService and instances serve HTTPS with RA-TLS certificates, end to end."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml.attestation.trust import default_trust
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.errors import AttestationError
from tests.conftest import Stack, start_keyservice, start_platform

pytestmark = pytest.mark.slow


def test_encrypted_inference_over_ratls_keyservice_and_instances(tmp_path, toy_model, monkeypatch):
    # The services' temporary directory, to check that stopping them leaves nothing behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    ks = start_keyservice(tmp_path, extra=["--tls", "ra"])
    gw = start_platform(tmp_path, ks.url, extra=["--tls", "ra"])
    try:
        assert ks.url.startswith("https://")
        stack = Stack(tmp_path, ks, gw)
        owner, owner_ks = stack.principal()  # the client attests the certificate before registering
        user, user_ks = stack.principal()
        stack.publish(owner_ks, toy_model, "ratls", users=[(user, user_ks)])
        out = stack.infer_client(user).infer(
            "ratls", {"x": np.ones((2, 4), np.float32), "idx": np.array([1, 2], np.int64)}
        )
        np.testing.assert_array_equal(out["idx_plus_one"], [2, 3])
        import httpx

        instances = httpx.get(f"{gw.url}/v1/stats").json()["functions"]["default"]["instances"]
        assert instances  # served by an instance behind RA-TLS

        # A client expecting another KeyService measurement refuses at the TLS certificate.
        with KeyServiceClient(ks.url, Identity.generate(), trust=default_trust("ab" * 48)) as wrong:
            with pytest.raises(AttestationError):
                wrong.register()
        for client in stack.clients:
            client.close()  # type: ignore[attr-defined]
        # Key files live in private directories while the services run (the instance's too),
        # and every instance works in its own private directory.
        names = sorted(p.name for p in scratch.iterdir())
        assert sum(n.startswith("sealedml-tls-") for n in names) >= 2, names  # KeyService, instance
        assert any(n.startswith("sealedml-worker-") for n in names), names
    finally:
        gw.stop()
        ks.stop()
    # SIGTERM is a graceful stop: the services and the instances remove their directories.
    assert sorted(p.name for p in scratch.iterdir()) == [], "left behind"
    assert (ks.proc.returncode, gw.proc.returncode) == (0, 0)
