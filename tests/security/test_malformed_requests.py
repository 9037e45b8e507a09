"""Malformed, mistyped and oversized requests to every endpoint of the KeyService,
a runtime worker and the gateway (real processes on loopback).

The contract: a 4xx (never a 5xx, never a hang) with a JSON ``{"error": ...}``
body, and the service still answers ``/v1/health`` afterwards.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from sealedml._internal.procs import ServiceProcess
from sealedml.client.identity import Identity
from sealedml.envelope.request import seal_request
from sealedml.keyservice.app import MAX_BODY as KEYSERVICE_MAX_BODY
from sealedml.platform.app import MAX_BODY as GATEWAY_MAX_BODY
from sealedml.runtime.app import DEFAULT_MAX_BODY as WORKER_MAX_BODY

pytestmark = pytest.mark.slow

TIMEOUT = 30.0


@dataclass(frozen=True)
class Endpoint:
    service: str  # "keyservice" | "worker" | "gateway"
    path: str
    limit: int
    parses_json: bool = True
    malformed_status: int = 400  # what a body that is not the expected JSON gets
    oversized_status: int = 413

    def __str__(self) -> str:
        return f"{self.service}:{self.path}"


ENDPOINTS = [
    Endpoint("keyservice", "/v1/principals", KEYSERVICE_MAX_BODY),
    Endpoint("keyservice", "/v1/models/m-1/keys", KEYSERVICE_MAX_BODY),
    Endpoint("keyservice", "/v1/models/m-1/runtimes", KEYSERVICE_MAX_BODY),
    Endpoint("keyservice", "/v1/models/m-1/grants", KEYSERVICE_MAX_BODY),
    Endpoint("keyservice", "/v1/models/m-1/consent", KEYSERVICE_MAX_BODY),
    # the info call has no body to parse (it is only signed): an unsigned call is refused
    Endpoint("keyservice", "/v1/models/m-1/info", KEYSERVICE_MAX_BODY, malformed_status=401),
    # the challenge call takes no input: its body is read (bounded) and ignored
    Endpoint("keyservice", "/v1/release/challenge", KEYSERVICE_MAX_BODY, parses_json=False),
    Endpoint("keyservice", "/v1/release", KEYSERVICE_MAX_BODY),
    Endpoint("worker", "/init", WORKER_MAX_BODY),
    Endpoint("worker", "/run", WORKER_MAX_BODY),
    Endpoint("worker", "/v1/infer", WORKER_MAX_BODY),
    # off unless the worker serves a plaintext directory: refused before the body is read
    Endpoint("worker", "/v1/unsafe-plaintext/m-1", WORKER_MAX_BODY, parses_json=False, oversized_status=404),
    Endpoint("gateway", "/v1/infer", GATEWAY_MAX_BODY),
    Endpoint("gateway", "/v1/unsafe-plaintext/m-1", GATEWAY_MAX_BODY, parses_json=False),
]
JSON_ENDPOINTS = [e for e in ENDPOINTS if e.parses_json]
GET_ENDPOINTS = [
    ("keyservice", "/v1/health"),
    ("keyservice", "/v1/attestation?nonce=" + "00" * 32),
    ("worker", "/v1/health"),
    ("worker", "/v1/stats"),
    ("gateway", "/v1/health"),
    ("gateway", "/v1/stats"),
    ("gateway", "/metrics"),
]

MALFORMED_JSON = {
    "truncated": b'{"public_key": "AAAA", ',
    "open-brace": b"{",
    "trailing-garbage": b"{}}",
    "not-utf8": b"\xff\xfe\x00{",
    "bare-word": b"nul",
    "single-quotes": b"{'value': {}}",
    "nan": b'{"value": NaN}',
    "binary": bytes(range(256)),
}
WRONG_TYPES: dict[str, Any] = {
    "array": [],
    "number": 5,
    "string": "x",
    "null": None,
    "bool": True,
    "unknown-field": {"unexpected": 1},
    "nested-wrong": {"value": [1, 2], "model_id": 5, "public_key": 5, "pairs": {}},
}
SPECIFIC_WRONG: dict[str, list[Any]] = {
    "/v1/principals": [
        {"public_key": 5, "proof": "AAAA"},
        {"public_key": "AAAA", "proof": ["x"]},
        {"public_key": "AAAA", "proof": "AAAA", "extra": 1},
    ],
    "/v1/models/m-1/keys": [
        {"model_version": "one", "sealed_key": "A", "service_key": "A"},
        {"model_version": 0, "sealed_key": "A", "service_key": "A"},
        {"model_version": 2**60, "sealed_key": "A", "service_key": "A"},
        {"model_version": 1.5, "sealed_key": "A", "service_key": "A"},
        {"model_version": 1, "sealed_key": 7, "service_key": "A"},
    ],
    "/v1/models/m-1/runtimes": [
        {"measurement": 5},
        {"measurement": "zz" * 48},
        {"measurement": "ab"},
        {"measurement": "ab" * 48, "allow": "sometimes"},
        {"tee": "nitro", "measurement": "ab" * 48},
        {"tee": 5, "measurement": "ab" * 48},
    ],
    "/v1/models/m-1/grants": [
        {"user_id": 5},
        {"user_id": "../etc"},
        {"user_id": "u" * 200},
        {"user_id": "u", "grant": [True]},
    ],
    "/v1/models/m-1/consent": [
        {"sealed_request_key": "A", "service_key": "A", "runtimes": "ab" * 48},
        {"sealed_request_key": "A", "service_key": "A", "runtimes": []},
        {"sealed_request_key": "A", "service_key": "A", "runtimes": [{"measurement": "ab" * 48}] * 65},
        {"sealed_request_key": "A", "service_key": "A", "runtimes": [{"measurement": 5}]},
        {"sealed_request_key": "A", "service_key": "A", "runtimes": [{"tee": "nitro", "measurement": "ab" * 48}]},
        {"sealed_request_key": "A", "service_key": "A", "runtimes": ["ab" * 48]},
    ],
    "/v1/release": [
        {
            "challenge_id": 5,
            "evidence": {"tee": "simulated", "data": ""},
            "runtime_key": "",
            "pairs": [{"model_id": "m", "user_id": "u"}],
        },
        {
            "challenge_id": "c",
            "evidence": {"tee": "pentium", "data": ""},
            "runtime_key": "",
            "pairs": [{"model_id": "m", "user_id": "u"}],
        },
        {"challenge_id": "c", "evidence": {"tee": "simulated", "data": ""}, "runtime_key": "", "pairs": []},
        {
            "challenge_id": "c",
            "evidence": {"tee": "simulated", "data": ""},
            "runtime_key": "",
            "pairs": [{"model_id": "m", "user_id": "u"}] * 65,
        },
        {
            "challenge_id": "c" * 65,
            "evidence": {"tee": "simulated", "data": ""},
            "runtime_key": "",
            "pairs": [{"model_id": "m", "user_id": "u"}],
        },
        {"challenge_id": "c", "evidence": "AAAA", "runtime_key": "", "pairs": [{"model_id": "m", "user_id": "u"}]},
    ],
    "/init": [{"value": 5}, {"value": []}, {"value": "x"}],
    "/run": [{"value": 5}, {"value": []}, {"value": "x"}],
    "/v1/infer": [
        {
            "v": 2,
            "model_id": "m",
            "user_id": "u",
            "request_id": "0" * 32,
            "timestamp": 0,
            "nonce": "",
            "ciphertext": "",
        },
        {"v": 1, "model_id": "m", "user_id": "u", "request_id": "xyz", "timestamp": 0, "nonce": "", "ciphertext": ""},
        {
            "v": 1,
            "model_id": "../m",
            "user_id": "u",
            "request_id": "0" * 32,
            "timestamp": "now",
            "nonce": "",
            "ciphertext": "",
        },
    ],
}


# ---------------------------------------------------------------------------- services


def _start_worker(keyservice_url: str, store: Path, log: Path) -> ServiceProcess:
    return ServiceProcess.start(
        ["worker", "serve", "--keyservice", keyservice_url, "--store", str(store), "--port", "0"],
        name="worker",
        log_path=log,
    )


@pytest.fixture(scope="module")
def urls(stack: Any) -> Iterator[dict[str, str]]:
    """KeyService and gateway from the shared stack, plus one worker (initialised, as OpenWhisk would)."""
    worker = _start_worker(stack.keyservice.url, stack.store, stack.workdir / "worker.log")
    try:
        with httpx.Client(base_url=worker.url, timeout=TIMEOUT) as c:
            assert c.post("/init", json={"value": {}}).status_code == 200
        yield {"keyservice": stack.keyservice.url, "gateway": stack.gateway.url, "worker": worker.url}
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def clients(urls: dict[str, str]) -> Iterator[dict[str, httpx.Client]]:
    made = {name: httpx.Client(base_url=url, timeout=TIMEOUT) for name, url in urls.items()}
    try:
        yield made
    finally:
        for client in made.values():
            client.close()


def assert_json_4xx(response: httpx.Response | tuple[int, bytes], expected: int | None = None) -> dict[str, Any]:
    status, content = (response.status_code, response.content) if isinstance(response, httpx.Response) else response
    assert 400 <= status < 500, (status, content[:300])
    if expected is not None:
        assert status == expected, (status, content[:300])
    doc = json.loads(content)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
    return doc


def assert_alive(client: httpx.Client) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def post(client: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def declared_length_request(url: str, path: str, length: int) -> tuple[int, bytes]:
    """Send only headers claiming a ``length``-byte body; return the status and body of the answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


# ---------------------------------------------------------------------------- malformed and mistyped bodies


def test_body_limits_are_the_documented_ones() -> None:
    assert KEYSERVICE_MAX_BODY == 256 * 1024
    assert WORKER_MAX_BODY == GATEWAY_MAX_BODY == 64 * 1024 * 1024


@pytest.mark.parametrize("endpoint", JSON_ENDPOINTS, ids=str)
@pytest.mark.parametrize("kind", sorted(MALFORMED_JSON))
def test_malformed_json_is_a_4xx(clients: dict[str, httpx.Client], endpoint: Endpoint, kind: str) -> None:
    client = clients[endpoint.service]
    assert_json_4xx(post(client, endpoint.path, MALFORMED_JSON[kind]), endpoint.malformed_status)
    assert_alive(client)


@pytest.mark.parametrize("endpoint", JSON_ENDPOINTS, ids=str)
@pytest.mark.parametrize("kind", sorted(WRONG_TYPES))
def test_wrong_json_types_are_a_4xx(clients: dict[str, httpx.Client], endpoint: Endpoint, kind: str) -> None:
    client = clients[endpoint.service]
    expected = endpoint.malformed_status
    if endpoint.path == "/init" and kind == "unknown-field":
        expected = 403  # OpenWhisk init bodies may carry other keys: valid, but this worker is initialised
    response = post(client, endpoint.path, json.dumps(WRONG_TYPES[kind]).encode())
    if endpoint.path == "/run" and kind == "unknown-field":
        # OpenWhisk: a missing "value" is {} — the action runs and refuses it as an application error
        assert response.status_code == 200 and response.json()["error"] == "bad_envelope"
    else:
        assert_json_4xx(response, expected)
    assert_alive(client)


@pytest.mark.parametrize("value", [{"model_id": 5}, {"v": 2}, {}], ids=["model-id-type", "version", "empty"])
def test_run_refuses_malformed_envelopes_as_openwhisk_application_errors(
    clients: dict[str, httpx.Client], value: dict[str, Any]
) -> None:
    response = post(clients["worker"], "/run", json.dumps({"value": value, "activation_id": "a"}).encode())
    assert response.status_code == 200 and response.json()["error"] == "bad_envelope"
    assert_alive(clients["worker"])


@pytest.mark.parametrize(
    ("service", "path", "body"),
    [
        pytest.param(service, path, body, id=f"{service}:{path}:{i}")
        for path, bodies in SPECIFIC_WRONG.items()
        for service in (
            ["keyservice"]
            if path.startswith(("/v1/principals", "/v1/models", "/v1/release"))
            else ["worker", "gateway"]
            if path == "/v1/infer"
            else ["worker"]
        )
        for i, body in enumerate(bodies)
    ],
)
def test_fields_of_the_wrong_type_or_out_of_range_are_a_400(
    clients: dict[str, httpx.Client], service: str, path: str, body: Any
) -> None:
    client = clients[service]
    doc = assert_json_4xx(post(client, path, json.dumps(body).encode()), 400)
    assert doc["error"] in {"protocol", "bad_envelope"}
    assert_alive(client)


_DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("endpoint", JSON_ENDPOINTS, ids=str)
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "inside-value"])
def test_deeply_nested_json_is_a_4xx(clients: dict[str, httpx.Client], endpoint: Endpoint, wrapped: bool) -> None:
    """Regression (worker /init and /run): json.loads' RecursionError used to escape as a 500."""
    client = clients[endpoint.service]
    body = b'{"value": ' + _DEEP + b"}" if wrapped else _DEEP
    assert_json_4xx(post(client, endpoint.path, body), endpoint.malformed_status)
    assert_alive(client)


_BINARY_MAGIC = b"SMLQ\x01"  # the binary request-envelope framing: MAGIC ‖ u32 header length ‖ header JSON ‖ ciphertext
MALFORMED_BINARY = {
    "magic-only": _BINARY_MAGIC,
    "short-length": _BINARY_MAGIC + b"\x00\x00",
    "length-beyond-body": _BINARY_MAGIC + (1000).to_bytes(4, "big") + b"{}",
    "huge-length": _BINARY_MAGIC + (2**32 - 1).to_bytes(4, "big") + b"{}",
    "header-not-json": _BINARY_MAGIC + (3).to_bytes(4, "big") + b"{{{ct",
    "header-array": _BINARY_MAGIC + (2).to_bytes(4, "big") + b"[]ct",
    "header-with-ciphertext": _BINARY_MAGIC + (18).to_bytes(4, "big") + b'{"ciphertext": ""}ct',
    "header-wrong-types": _BINARY_MAGIC + (15).to_bytes(4, "big") + b'{"model_id": 5}ct',
}


@pytest.mark.parametrize("service", ["worker", "gateway"])
@pytest.mark.parametrize("kind", sorted(MALFORMED_BINARY))
def test_malformed_binary_envelope_is_a_400(clients: dict[str, httpx.Client], service: str, kind: str) -> None:
    client = clients[service]
    response = client.post(
        "/v1/infer", content=MALFORMED_BINARY[kind], headers={"content-type": "application/vnd.sealedml.envelope"}
    )
    assert assert_json_4xx(response, 400)["error"] == "bad_envelope"
    assert_alive(client)


@pytest.mark.parametrize("service", ["worker", "gateway"])
def test_deeply_nested_binary_envelope_header_is_a_400(clients: dict[str, httpx.Client], service: str) -> None:
    """Regression: a nested header within the 4096-byte header limit made json.loads raise RecursionError
    in _Envelope.from_binary, a 500 from both the gateway and the worker."""
    header = b"[" * 4000
    body = _BINARY_MAGIC + len(header).to_bytes(4, "big") + header + b"ciphertext"
    client = clients[service]
    response = client.post("/v1/infer", content=body, headers={"content-type": "application/vnd.sealedml.envelope"})
    assert_json_4xx(response, 400)


@pytest.mark.parametrize("route", ["keys", "runtimes", "grants", "consent", "info"])
@pytest.mark.parametrize("model_id", [".hidden", "-dash", "a" * 129, "sp ace", "semi;colon", "ünï"])
def test_invalid_model_id_in_path_is_a_400(clients: dict[str, httpx.Client], route: str, model_id: str) -> None:
    client = clients["keyservice"]
    doc = assert_json_4xx(post(client, f"/v1/models/{model_id}/{route}", b"{}"), 400)
    assert doc["error"] == "protocol"
    assert_alive(client)


@pytest.mark.parametrize("model_id", [".hidden", "a" * 129, "sp ace"])
def test_invalid_model_id_in_gateway_path_is_a_400(clients: dict[str, httpx.Client], model_id: str) -> None:
    client = clients["gateway"]
    assert_json_4xx(client.post(f"/v1/unsafe-plaintext/{model_id}", content=b"x"), 400)
    assert_alive(client)


@pytest.mark.parametrize("nonce", ["zz", "00", "00" * 65, "0", ""])
def test_attestation_with_a_bad_nonce_is_a_400(clients: dict[str, httpx.Client], nonce: str) -> None:
    client = clients["keyservice"]
    doc = assert_json_4xx(client.get("/v1/attestation", params={"nonce": nonce}), 400)
    assert doc["error"] == "protocol"
    assert_alive(client)


def test_release_challenge_ignores_its_body(clients: dict[str, httpx.Client]) -> None:
    """The challenge takes no input: garbage is read (within the limit) and ignored, never a 5xx."""
    client = clients["keyservice"]
    for body in (*MALFORMED_JSON.values(), _DEEP):
        response = post(client, "/v1/release/challenge", body)
        assert response.status_code == 200 and set(response.json()) == {"challenge_id", "nonce", "expires_in"}


@pytest.mark.parametrize(("service", "path"), GET_ENDPOINTS)
def test_get_endpoints_answer_with_json(clients: dict[str, httpx.Client], service: str, path: str) -> None:
    response = clients[service].get(path)
    assert response.status_code == 200
    if path != "/metrics":  # Prometheus text format
        assert isinstance(response.json(), dict)


# ---------------------------------------------------------------------------- oversized bodies


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.service == "keyservice"], ids=str)
def test_oversized_keyservice_body_is_a_413(clients: dict[str, httpx.Client], endpoint: Endpoint) -> None:
    client = clients["keyservice"]
    body = b'{"pad": "' + b"a" * endpoint.limit + b'"}'
    doc = assert_json_4xx(post(client, endpoint.path, body), endpoint.oversized_status)
    assert doc["error"] == "too_large"
    assert_alive(client)


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.service == "keyservice"], ids=str)
def test_body_at_the_keyservice_limit_is_not_refused_as_too_large(
    clients: dict[str, httpx.Client], endpoint: Endpoint
) -> None:
    client = clients["keyservice"]
    body = b"a" * endpoint.limit
    response = post(client, endpoint.path, body)
    assert response.status_code < 500 and response.status_code != 413


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_declared_oversized_body_is_refused_before_it_is_sent(
    urls: dict[str, str], clients: dict[str, httpx.Client], endpoint: Endpoint
) -> None:
    """Headers alone claiming more than the limit: refused at once, without waiting for a body."""
    result = declared_length_request(urls[endpoint.service], endpoint.path, endpoint.limit + 1)
    doc = assert_json_4xx(result, endpoint.oversized_status)
    if endpoint.oversized_status == 413:
        assert doc["error"] == "too_large"
    assert_alive(clients[endpoint.service])


def _stream(total: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = b"a" * chunk
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield block[:n]
        sent += n


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.service != "keyservice"], ids=str)
def test_streamed_oversized_body_is_a_413(clients: dict[str, httpx.Client], endpoint: Endpoint) -> None:
    """A chunked body (no Content-Length) is cut off once it passes the limit."""
    client = clients[endpoint.service]
    response = client.post(
        endpoint.path, content=_stream(endpoint.limit + (1 << 20)), headers={"content-type": "application/json"}
    )
    doc = assert_json_4xx(response, endpoint.oversized_status)
    if endpoint.oversized_status == 413:
        assert doc["error"] == "too_large"
    assert_alive(client)


# ---------------------------------------------------------------------------- OpenWhisk action protocol


def _envelope_for_unknown_model() -> bytes:
    user = Identity.generate()
    envelope, _ = seal_request(
        {"x": np.zeros((1, 4), np.float32)},
        request_key=user.request_key("nope"),
        model_id=f"nope-{secrets.token_hex(4)}",
        user_id=user.principal_id,
        is_positional=False,
    )
    return json.dumps({"value": json.loads(envelope.model_dump_json()), "activation_id": "a1"}).encode()


def test_worker_follows_the_openwhisk_init_protocol(stack: Any, tmp_path: Path) -> None:
    worker = _start_worker(stack.keyservice.url, stack.store, tmp_path / "worker.log")
    try:
        with httpx.Client(base_url=worker.url, timeout=TIMEOUT) as client:
            run_body = _envelope_for_unknown_model()
            # /run before /init: refused
            doc = assert_json_4xx(post(client, "/run", run_body), 403)
            assert doc["error"] == "not_initialized"
            # first /init accepted, second refused (as OpenWhisk's own action proxies do)
            assert post(client, "/init", b'{"value": {"name": "sealedml"}}').status_code == 200
            second = post(client, "/init", b'{"value": {"name": "again"}}')
            assert_json_4xx(second, 403)
            assert "more than once" in second.json()["error"]
            # now /run serves: a well-formed request for a model nobody published is an opaque
            # denial, reported as an OpenWhisk application error (200 + error: container kept)
            denied = post(client, "/run", run_body)
            assert denied.status_code == 200 and denied.json() == {"error": "denied", "message": "denied"}
            assert_alive(client)
    finally:
        worker.stop()
