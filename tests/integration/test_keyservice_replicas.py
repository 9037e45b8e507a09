"""Two KeyService replicas on one PostgreSQL store, as real processes: the second joins by attesting
to the first; releases continue on one when the other is killed with SIGKILL under load, and no
write either acknowledged is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from sealedml._internal.procs import ServiceProcess
from sealedml.attestation.measurement import measurement_for
from sealedml.attestation.simulated import SimulatedAttester
from sealedml.client.identity import Identity
from sealedml.client.keyservice import KeyServiceClient
from sealedml.crypto import random_bytes
from sealedml.errors import AccessDenied, Error
from sealedml.runtime.release import ReleaseClient

RUNTIME = measurement_for("runtime", {"tee": "simulated"})


def release(url: str, pairs: list[tuple[str, str]]) -> int:
    async def go() -> int:
        client = ReleaseClient(url, SimulatedAttester(role="runtime"))
        try:
            return len(await client.release(pairs))
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_a_replica_joins_and_carries_on_when_the_other_is_killed(tmp_path: Path, postgres_url: str) -> None:
    first = ServiceProcess.keyservice(tmp_path / "a", "--store", postgres_url, log_path=tmp_path / "a.log")
    second = None
    try:
        second = ServiceProcess.keyservice(
            tmp_path / "b", "--store", postgres_url, "--join", first.url, log_path=tmp_path / "b.log"
        )
        assert (tmp_path / "b" / "master.sealed").exists()  # the master key, sealed to the joiner itself
        owner, user = Identity.generate(), Identity.generate()
        with KeyServiceClient(first.url, owner) as ks_owner, KeyServiceClient(second.url, user) as ks_user:
            ks_owner.register()
            ks_user.register()  # registered through the other replica: one shared state
            ks_owner.upload_model_key("m", 1, random_bytes(32))
            ks_owner.allow_runtime("m", RUNTIME)
            ks_owner.grant("m", user.principal_id)
            ks_user.enable("m", [RUNTIME])
        pairs = [("m", user.principal_id)]
        assert release(second.url, pairs) == 1 and release(first.url, pairs) == 1

        # Under load: grants acknowledged by the first replica, releases on the second, then SIGKILL.
        acknowledged: list[str] = []
        stop = threading.Event()

        def write() -> None:
            with KeyServiceClient(first.url, owner) as client:
                while not stop.is_set():
                    grantee = Identity.generate()
                    try:
                        with KeyServiceClient(first.url, grantee) as registering:
                            registering.register()  # grants name registered principals only
                        client.grant("m", grantee.principal_id)
                    except Error:
                        return  # the replica is gone
                    acknowledged.append(grantee.principal_id)

        writer = threading.Thread(target=write)
        writer.start()
        released_before = sum(release(second.url, pairs) for _ in range(5))
        os.killpg(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        stop.set()
        writer.join(30)
        deadline = time.monotonic() + 30
        released_after = 0
        while released_after < 5 and time.monotonic() < deadline:
            released_after += release(second.url, pairs)
        assert released_before == 5 and released_after == 5
        assert acknowledged, "no write was acknowledged before the kill"
        with psycopg.connect(postgres_url) as db:
            stored = {row[0] for row in db.execute("SELECT user_id FROM grants WHERE granted = 1")}
        lost = [grantee for grantee in acknowledged if grantee not in stored]
        assert lost == []  # lost_acknowledged_writes: 0
        with KeyServiceClient(second.url, owner) as client:  # the anchored audit head still verifies
            assert client.audit_head().records > len(acknowledged)
    finally:
        for process in (first, second):
            if process is not None:
                process.stop()


def test_a_joiner_of_another_build_gets_nothing(tmp_path: Path, postgres_url: str) -> None:
    """The running KeyService admits only its own measurement (or listed ones) as a replica."""
    from sealedml.attestation.sealing import SimulatedSealer
    from sealedml.attestation.simulated import SimulatedPlatform
    from sealedml.keyservice.replicas import join_master_key

    first = ServiceProcess.keyservice(tmp_path / "a", "--store", postgres_url, log_path=tmp_path / "a.log")
    try:
        stranger = SimulatedAttester(role="keyservice", measurement="ab" * 48)
        with KeyServiceClient(first.url) as existing, pytest.raises(AccessDenied):
            join_master_key(existing, stranger, SimulatedSealer(SimulatedPlatform.load(), "ab" * 48), tmp_path / "x")
        assert not (tmp_path / "x" / "master.sealed").exists()
        with psycopg.connect(postgres_url) as db:
            reasons = [r[0] for r in db.execute("SELECT event::json->>'reason' FROM audit ORDER BY seq")]
        assert any("neither this KeyService's nor allowed" in (r or "") for r in reasons)
    finally:
        first.stop()
