"""Recovery after total loss, as real processes: a KeyService made 2-of-3 recovery shares; every replica
and its data directory are lost; a new instance on the same PostgreSQL store collects two holders'
shares, rebuilds the master key, and serves the old models' keys again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sealedml._internal.encoding import b64e
from sealedml._internal.procs import ServiceProcess
from sealedml.attestation.measurement import measurement_for
from sealedml.client.identity import Identity
from sealedml.crypto import random_bytes
from sealedml.keyservice.recovery import RecoveryPolicy, SealedShares, combine_shares, open_share, split_master_key
from tests.conftest import publish_key_for_one_user
from tests.integration.test_keyservice_replicas import release

RUNTIME = measurement_for("runtime", {"tee": "simulated"})


def sealedml(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sealedml", *args, "--json"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_any_two_of_three_shares_rebuild_the_key_and_one_does_not() -> None:
    holders = [Identity.generate() for _ in range(3)]
    policy = RecoveryPolicy(
        threshold=2, holders={h.principal_id: b64e(h.recovery_key().public_key.to_bytes()) for h in holders}
    )
    master = random_bytes(32)
    sealed = split_master_key(master, policy, "svc")
    shares = [open_share(sealed, h.principal_id, h.recovery_key()) for h in holders]
    for pair in ([0, 1], [0, 2], [1, 2]):
        assert combine_shares([shares[i] for i in pair]) == master
    assert combine_shares(shares[:1]) != master  # one share says nothing of the key
    assert holders[0].recovery_key().public_key.to_bytes() == holders[0].recovery_key().public_key.to_bytes()
    with pytest.raises(Exception, match="does not open"):
        open_share(sealed, holders[0].principal_id, holders[1].recovery_key())
    assert isinstance(SealedShares.model_validate_json(sealed.model_dump_json()), SealedShares)


def test_recovery_after_losing_every_replica(tmp_path: Path, postgres_url: str) -> None:
    holders = [tmp_path / f"holder{i}.json" for i in range(3)]
    lines = ["threshold: 2", "holders:"]
    for path in holders:
        sealedml("identity", "new", "--out", str(path))
        key = sealedml("identity", "recovery-key", "--identity", str(path))
        lines.append(f"  {key['principal_id']}: {key['recovery_public_key']}")
    (tmp_path / "holders.yaml").write_text("\n".join(lines) + "\n")

    first = ServiceProcess.keyservice(
        tmp_path / "ks", "--store", postgres_url, "--recovery-holders", str(tmp_path / "holders.yaml"),
        log_path=tmp_path / "ks.log",
    )  # fmt: skip
    try:
        _, user = publish_key_for_one_user(first.url)
        assert release(first.url, [("m", user.principal_id)]) == 1
    finally:
        first.stop()
    shutil.rmtree(tmp_path / "ks")  # total loss: the sealed master key is gone

    recovering = ServiceProcess.start(
        ["keyservice", "recover", "--data-dir", str(tmp_path / "new"), "--store", postgres_url, "--port", "0"],
        name="keyservice-recovery", log_path=tmp_path / "recover.log",
    )  # fmt: skip
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "sealedml", "keyservice", "recovery-share", "--keyservice", recovering.url,
             "--identity", str(holders[1]), "--keyservice-measurement", "ab" * 48, "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 1 and json.loads(refused.stdout)["error"] == "policy"  # its measurement, refused
        one = sealedml("keyservice", "recovery-share", "--keyservice", recovering.url, "--identity", str(holders[0]))
        assert one["recovered"] is False and one["received"] == 1
        two = sealedml("keyservice", "recovery-share", "--keyservice", recovering.url, "--identity", str(holders[2]))
        assert two["recovered"] is True
        recovering.proc.wait(30)  # it stops by itself once the key is sealed
    finally:
        recovering.stop()
    assert (tmp_path / "new" / "master.sealed").exists()

    second = ServiceProcess.keyservice(tmp_path / "new", "--store", postgres_url, log_path=tmp_path / "ks2.log")
    try:
        assert release(second.url, [("m", user.principal_id)]) == 1  # the old state, under the old master key
    finally:
        second.stop()


def test_wrong_or_foreign_shares_rebuild_nothing(tmp_path: Path) -> None:
    """In process: a share of another master key (or from a stranger) is refused, and nothing is sealed."""
    from sealedml._internal.encoding import canonical_json
    from sealedml.attestation.sealing import SimulatedSealer
    from sealedml.attestation.simulated import SimulatedAttester, SimulatedPlatform
    from sealedml.crypto import hpke_seal
    from sealedml.errors import AuthenticationError, ProtocolError
    from sealedml.keyservice import build_keyservice
    from sealedml.keyservice.recovering import RecoveringKeyService, ShareMessage, share_post_message
    from sealedml.keyservice.recovery import reshare_info
    from sealedml.keyservice.store import SQLiteKeyStore

    holders = [Identity.generate() for _ in range(3)]
    policy = RecoveryPolicy(
        threshold=2, holders={h.principal_id: b64e(h.recovery_key().public_key.to_bytes()) for h in holders}
    )
    old = build_keyservice(tmp_path / "old", recovery=policy)
    old.store.set_meta_once("probe", "state")  # nothing else is needed: the anchor exists from the start
    old.store.audit({"action": "probe", "decision": "allow", "reason": "test"})
    sealed = SealedShares.model_validate_json(old.store.meta("recovery_shares") or "")
    old.store.close()

    attester = SimulatedAttester(role="keyservice")
    store = SQLiteKeyStore(tmp_path / "old" / "keyservice.sqlite3")
    recovering = RecoveringKeyService(
        tmp_path / "new", store, attester, SimulatedSealer(SimulatedPlatform.load(), attester.measurement)
    )
    service_key = recovering.attestation(random_bytes(32)).hpke_public_key

    def send(holder: Identity, share: dict, signer: Identity | None = None) -> dict:
        key = recovering._hpke.public_key
        ciphertext = hpke_seal(key, canonical_json(share), reshare_info(key.to_bytes(), holder.principal_id))
        signer = signer or holder
        signature = signer.signing_key.sign(share_post_message(key.to_bytes(), holder.principal_id, ciphertext))
        message = ShareMessage(
            holder=holder.principal_id,
            sealed=b64e(ciphertext),
            service_key=service_key,
            public_key=b64e(signer.signing_key.public_bytes),
            signature=b64e(signature),
        )
        return recovering.receive(message)

    genuine = [open_share(sealed, h.principal_id, h.recovery_key()) for h in holders]
    forged = open_share(split_master_key(random_bytes(32), policy, sealed.service_id), holders[1].principal_id,
                        holders[1].recovery_key())  # fmt: skip
    with pytest.raises(AuthenticationError, match="not signed by holder"):  # a post in a holder's name
        send(holders[1], forged, signer=Identity.generate())
    assert recovering.status()["received"] == 0
    assert send(holders[0], genuine[0])["recovered"] is False
    with pytest.raises(ProtocolError, match="do not rebuild"):
        send(holders[1], forged)
    assert not (tmp_path / "new" / "master.sealed").exists()
    with pytest.raises(ProtocolError, match="not a recovery holder"):
        send(Identity.generate(), genuine[2])
    with pytest.raises(ProtocolError, match="another service"):
        send(holders[2], {**genuine[2], "service_id": "someone-else"})
    assert send(holders[0], genuine[0])["recovered"] is False  # the failed round was forgotten: start over
    assert send(holders[2], genuine[2])["recovered"] is True
    assert (tmp_path / "new" / "master.sealed").exists()
    store.close()
