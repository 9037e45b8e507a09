"""RA-TLS certificate rotation: clients connecting long after a server started still see fresh evidence.

Real ``serve_app`` processes on loopback serve a trivial Starlette app over
HTTPS: one with a :class:`RotatingRaTlsCertificate` (re-issued every 0.5 s,
each valid 3 s), one with a certificate made once at start. Clients verify the
certificate during the handshake (``attested_client_context``) with a
simulated verifier that accepts evidence up to 3 s old, and connect 5 s or
more after the servers started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealedml.attestation.base import Claims, TeeType
from sealedml.attestation.policy import Policy
from sealedml.attestation.ratls import attestation_failure, attested_client_context, fetch_peer_certificate
from sealedml.attestation.simulated import SimulatedPlatform, SimulatedVerifier
from sealedml.errors import EvidenceError, PolicyError

pytestmark = pytest.mark.slow

MEASUREMENT = "7a" * 48
POLICY = Policy.for_measurements([MEASUREMENT])
#: Evidence older than this is refused by the clients here (the default is 300 s).
MAX_AGE = 3
#: Clients connect this long after a server listens: past ``MAX_AGE`` and every certificate's validity.
LATE = 5.0

_SERVER = r"""
import signal
import sys
from datetime import timedelta

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sealedml._internal.serve import serve_app
from sealedml.attestation.ratls import RotatingRaTlsCertificate, make_ratls_certificate
from sealedml.attestation.simulated import SimulatedAttester
from sealedml.errors import AttestationError

mode, measurement, requests_log = sys.argv[1:4]


class FlakyAttester(SimulatedAttester):
    # The first certificate is fine, the next two issues fail (a busy TEE), later ones work again.
    calls = 0

    def evidence(self, report_data):
        FlakyAttester.calls += 1
        if FlakyAttester.calls in (2, 3):
            raise AttestationError("quote generation failed: TEE busy")
        return super().evidence(report_data)


async def hello(request):
    with open(requests_log, "a") as fh:
        fh.write(request.url.path + "\n")
    return PlainTextResponse("attested hello")


attester = (FlakyAttester if mode == "flaky" else SimulatedAttester)(measurement=measurement)
if mode in ("rotating", "flaky"):
    tls = RotatingRaTlsCertificate(attester, rotate_every=0.5, validity=timedelta(seconds=3))
else:
    tls = make_ratls_certificate(attester)
# uvicorn shuts down gracefully on SIGTERM, then re-raises it to this handler: exit status 0 says
# the shutdown (cancelling the rotation task) went through.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
serve_app(Starlette(routes=[Route("/{path:path}", hello)]), "127.0.0.1", 0, tls=tls)
"""


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    listening_at: float
    requests_log: Path
    stderr_log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def requests(self) -> list[str]:
        time.sleep(0.3)  # let the server finish handling whatever reached it
        return self.requests_log.read_text().split() if self.requests_log.exists() else []

    def wait_until_late(self) -> None:
        time.sleep(max(0.0, self.listening_at + LATE - time.monotonic()))


@contextmanager
def _start(mode: str, directory: Path, *, rotation_fails: bool = False) -> Iterator[Server]:
    SimulatedPlatform.load()  # the platform root (in the test session's SEALEDML_HOME) exists before both sides
    directory.mkdir()
    stderr_log = directory / "stderr.log"
    with open(stderr_log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, mode, MEASUREMENT, str(directory / "requests.log")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline() if proc.stdout else b""), daemon=True)
    reader.start()
    reader.join(timeout=60)
    try:
        if not line or not line[0]:
            raise RuntimeError(f"{mode} server did not start: {stderr_log.read_text()}")
        event = json.loads(line[0])
        assert event["event"] == "listening"
        server = Server(proc, event["url"], time.monotonic(), directory / "requests.log", stderr_log)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    errors = stderr_log.read_text()
    assert proc.returncode == 0, errors
    assert "Traceback" not in errors
    assert ("rotation failed" in errors) is rotation_fails
    assert "PRIVATE KEY" not in errors


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose RA-TLS certificate is re-issued every 0.5 s (valid 3 s)."""
    with _start("rotating", tmp_path_factory.mktemp("ratls") / "rotating") as server:
        yield server


@pytest.fixture(scope="module")
def static(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose RA-TLS certificate was made once at start (the behaviour before rotation)."""
    with _start("static", tmp_path_factory.mktemp("ratls") / "static") as server:
        yield server


def _context(policy: Policy = POLICY, on_verified: Callable[[Claims], None] | None = None) -> ssl.SSLContext:
    return attested_client_context(
        {TeeType.SIMULATED: SimulatedVerifier(max_age=MAX_AGE)}, policy, on_verified=on_verified
    )


def _get(kind: str, url: str, context: ssl.SSLContext) -> httpx.Response:
    """One GET over a new connection with a sync client, an async client, or an async client under uvloop."""
    if kind == "sync":
        with httpx.Client(verify=context, timeout=10) as client:
            return client.get(url)

    async def fetch() -> httpx.Response:
        async with httpx.AsyncClient(verify=context, timeout=10) as client:
            return await client.get(url)

    if kind == "async":
        return asyncio.run(fetch())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(fetch())


CLIENTS = ["sync", "async", "uvloop"]


def test_rotating_server_presents_new_certificates_for_one_key(rotating: Server) -> None:
    first = fetch_peer_certificate("127.0.0.1", rotating.port)
    time.sleep(1.5)
    second = fetch_peer_certificate("127.0.0.1", rotating.port)
    assert first != second
    keys = [
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for der in (first, second)
    ]
    assert keys[0] == keys[1]


@pytest.mark.parametrize("kind", CLIENTS)
def test_ratls_client_connecting_long_after_start_still_verifies(rotating: Server, kind: str) -> None:
    rotating.wait_until_late()
    verified: list[Claims] = []
    path = f"/late-{kind}-{uuid.uuid4().hex}"
    response = _get(kind, rotating.url + path, _context(on_verified=verified.append))
    assert response.text == "attested hello"
    assert [claims.measurement for claims in verified] == [MEASUREMENT]
    assert path.lstrip("/") in {p.lstrip("/") for p in rotating.requests()}


@pytest.mark.parametrize("kind", CLIENTS)
def test_stale_ratls_certificate_is_refused(static: Server, kind: str) -> None:
    # Without rotation, the certificate made at start carries evidence older than
    # the clients accept: every new connection fails in the handshake.
    static.wait_until_late()
    path = f"/stale-{kind}-{uuid.uuid4().hex}"
    with pytest.raises(httpx.ConnectError) as caught:
        _get(kind, static.url + path, _context())
    reason = attestation_failure(caught.value)
    assert isinstance(reason, EvidenceError)
    assert "stale" in str(reason)
    assert path.lstrip("/") not in {p.lstrip("/") for p in static.requests()}  # no request was sent


@pytest.mark.parametrize("kind", CLIENTS)
def test_server_with_another_measurement_receives_no_request(rotating: Server, kind: str) -> None:
    path = f"/secret-{kind}-{uuid.uuid4().hex}"
    with pytest.raises(httpx.ConnectError) as caught:
        _get(kind, rotating.url + path, _context(Policy.for_measurements(["cd" * 48])))
    assert isinstance(attestation_failure(caught.value), PolicyError)
    assert path.lstrip("/") not in {p.lstrip("/") for p in rotating.requests()}


def test_failed_rotation_is_logged_and_retried_without_stopping_the_server(tmp_path: Path) -> None:
    # The first two rotations fail; the server keeps serving and the third one succeeds.
    with _start("flaky", tmp_path / "flaky", rotation_fails=True) as server:
        server.wait_until_late()
        assert _get("sync", server.url + "/after-failures", _context()).text == "attested hello"
        log = server.stderr_log.read_text()
        assert log.count("RA-TLS certificate rotation failed (AttestationError: quote generation failed") == 2
