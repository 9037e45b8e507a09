"""FastRoutes: hot POST routes answered before Starlette, everything else through it."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from sealedml._internal.fastroutes import FastRoute, FastRoutes
from sealedml._internal.ops import ops_routes
from sealedml.errors import AccessDenied

LIMIT = 1000


async def echo(body: bytes, params: dict[str, str]) -> Response:
    """Echo the body with the path's parameters."""
    return Response(body, headers={"x-params": ",".join(f"{k}={v}" for k, v in params.items())})


async def denied(body: bytes, params: dict[str, str]) -> Response:
    """Always refuse."""
    raise AccessDenied("no grant for this user")


async def broken(body: bytes, params: dict[str, str]) -> Response:
    """Fail with something that is not a SealedML error."""
    raise RuntimeError("secret detail 1234")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@pytest.fixture
def client() -> TestClient:
    fast = [FastRoute("/echo", echo), FastRoute("/models/{model_id}/run", echo), FastRoute("/denied", denied)]
    fast.append(FastRoute("/broken", broken))
    routes = [*(r.listed() for r in fast), Route("/health", health, methods=["GET"])]
    app = Starlette(routes=[*routes, *ops_routes("test", routes)])
    return TestClient(FastRoutes(app, fast, max_body=LIMIT, setting=("this test's", "test --max-request")))


def test_fast_routes_get_the_whole_body_and_path_parameters(client: TestClient) -> None:
    assert client.post("/echo", content=b"x" * LIMIT).content == b"x" * LIMIT
    answer = client.post("/models/m-1/run", content=b"hi")
    assert answer.content == b"hi" and answer.headers["x-params"] == "model_id=m-1"
    # A chunked body (no Content-Length) arrives whole too.
    assert client.post("/echo", content=iter([b"a" * 300, b"b" * 300])).content == b"a" * 300 + b"b" * 300


def test_other_requests_go_through_starlette(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/echo").status_code == 405  # another method on a fast path: Starlette's answer
    assert client.post("/models/a/b/run", content=b"").status_code == 404  # one segment per parameter
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/echo"]["post"]["summary"] == "Echo the body with the path's parameters."
    assert "/models/{model_id}/run" in paths


def test_bodies_over_the_limit_are_refused_declared_or_streamed(client: TestClient) -> None:
    declared = client.post("/echo", content=b"x" * (LIMIT + 1))
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"
    assert "test --max-request" in declared.json()["message"]
    streamed = client.post("/echo", content=iter([b"a" * 600, b"b" * 600]))
    assert streamed.status_code == 413
    bad_length = client.post("/echo", content=b"x", headers={"content-length": "many"})
    assert bad_length.status_code == 400


def test_errors_map_as_in_guarded(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    refused = client.post("/denied", content=b"")
    assert refused.status_code == 403 and refused.json()["error"] == "denied"
    failed = client.post("/broken", content=b"")
    assert failed.status_code == 500 and failed.json() == {"error": "internal", "message": "internal error"}
    assert "secret detail" not in failed.text and "secret detail" not in caplog.text
