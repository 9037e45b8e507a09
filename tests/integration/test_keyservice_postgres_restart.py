"""PostgreSQL restarted under a KeyService that is answering releases: calls fail cleanly while it is
down (a typed error, nothing half-written) and succeed again, without restarting the KeyService,
once it is back."""

from __future__ import annotations

import asyncio
import time
import warnings
from pathlib import Path

import psycopg

from sealedml._internal.procs import ServiceProcess
from sealedml.attestation.measurement import measurement_for
from sealedml.attestation.simulated import SimulatedAttester
from sealedml.errors import Error
from sealedml.runtime.release import ReleaseClient
from tests.conftest import publish_key_for_one_user

RUNTIME = measurement_for("runtime", {"tee": "simulated"})


def start_postgres(directory: Path):  # -> pgserver.PostgresServer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, on import: no XDG_RUNTIME_DIR (the /tmp fallback is fine)
        import pgserver

        return pgserver.get_server(directory, cleanup_mode="stop")


def releases(url: str, pairs: list[tuple[str, str]], count: int) -> tuple[int, list[str]]:
    """``count`` releases in a row: how many succeeded, and the error codes of the others."""

    async def go() -> tuple[int, list[str]]:
        client = ReleaseClient(url, SimulatedAttester(role="runtime"), timeout=10)
        ok, failed = 0, []
        try:
            for _ in range(count):
                try:
                    await client.release(pairs)
                    ok += 1
                except Error as exc:
                    failed.append(exc.code)
        finally:
            await client.aclose()
        return ok, failed

    return asyncio.run(go())


def test_requests_fail_cleanly_while_postgresql_is_down_and_recover(tmp_path: Path) -> None:
    server = start_postgres(tmp_path / "pg")
    url = str(server.get_uri())
    ks = ServiceProcess.keyservice(tmp_path / "ks", "--store", url, log_path=tmp_path / "ks.log")
    try:
        owner, user = publish_key_for_one_user(ks.url)
        pairs = [("m", user.principal_id)]
        assert releases(ks.url, pairs, 3) == (3, [])

        server.cleanup()  # PostgreSQL stops under the running KeyService
        ok, failed = releases(ks.url, pairs, 3)
        assert ok == 0 and failed and set(failed) <= {"store", "denied"}
        assert ks.alive()

        server = start_postgres(tmp_path / "pg")  # the same data directory and socket
        assert str(server.get_uri()) == url
        deadline, ok = time.monotonic() + 30, 0
        while ok == 0 and time.monotonic() < deadline:
            ok, _ = releases(ks.url, pairs, 1)
        assert releases(ks.url, pairs, 3) == (3, [])
        with psycopg.connect(url) as db:  # every acknowledged decision is in the log, in order
            (records,) = db.execute("SELECT COUNT(*) FROM audit").fetchone()
            (last,) = db.execute("SELECT MAX(seq) FROM audit").fetchone()
        assert records == last
    finally:
        ks.stop()
        server.cleanup()
