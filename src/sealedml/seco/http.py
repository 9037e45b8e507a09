"""SECO's parties over HTTP: the remote servers' and the gateway's apps, and their client handles.

Bodies are message lists (:func:`sealedml.seco.wire.pack`) of link messages, each sealed
end to end between the two parties it names — HTTP only carries them (loopback here; put
TLS in front for a network, though the links need none for confidentiality or integrity).

Remote server (B or C)::

    POST /v1/seco/hello           a link handshake hello → the signed answer
    POST /v1/seco/step/{name}     x-sealedml-seco-query: the user session; messages → messages
    GET  /healthz

Gateway (A)::

    POST /v1/seco/session         U's three hellos (for A, B, C) → the three answers
    POST /v1/seco/offline         x-sealedml-seco-query; U's three mask shares → nothing
    POST /v1/seco/online          x-sealedml-seco-query; U's masked input → three output shares,
                                  and x-sealedml-seco-traffic: this query's bytes per link (JSON)
    GET  /v1/seco/model           the model's public architecture (shapes, number format)
    GET  /healthz

Errors are the usual JSON error bodies (:mod:`sealedml._internal.http`); a remote server's
typed error reaches the user typed, and a server that does not answer is
:class:`~sealedml.errors.ServiceUnavailable` naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sealedml._internal.http import guarded, raise_for_error, read_body
from sealedml._internal.httpclient import FastClient, HttpResponse, TransportError
from sealedml.errors import ProtocolError, ServiceUnavailable
from sealedml.seco.gateway import Gateway
from sealedml.seco.remote import RemoteServer
from sealedml.seco.wire import pack, unpack

__all__ = ["HttpGateway", "HttpRemote", "gateway_app", "remote_app"]

QUERY_HEADER = "x-sealedml-seco-query"
TRAFFIC_HEADER = "x-sealedml-seco-traffic"
#: The largest body a party accepts (a query's ciphertexts for the small CNN are ~10 MB).
MAX_BODY = 256 * 1024 * 1024
_QUERY = re.compile(r"[0-9a-f]{1,64}")
_BINARY = "application/octet-stream"


def _query(request: Request) -> str:
    value = request.headers.get(QUERY_HEADER, "")
    if not _QUERY.fullmatch(value):
        raise ProtocolError(f"{QUERY_HEADER} must be a session id (lower-case hex)")
    return value


def _binary(items: Sequence[bytes], headers: dict[str, str] | None = None) -> Response:
    return Response(pack(items), media_type=_BINARY, headers=headers)


def remote_app(server: RemoteServer) -> Starlette:
    """The ASGI app of remote server B or C."""

    @guarded
    async def hello(request: Request) -> Response:
        body = await read_body(request, 64 * 1024)
        return Response(await run_in_threadpool(server.accept, body), media_type=_BINARY)

    @guarded
    async def step(request: Request) -> Response:
        name = str(request.path_params["name"])
        query = request.headers.get(QUERY_HEADER, "") or ""
        if query:
            query = _query(request)
        messages = unpack(await read_body(request, MAX_BODY))
        return _binary(await run_in_threadpool(server.step, name, query, messages))

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "role": "remote", "name": server.name})

    return Starlette(
        routes=[
            Route("/v1/seco/hello", hello, methods=["POST"]),
            Route("/v1/seco/step/{name}", step, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )


def gateway_app(gateway: Gateway) -> Starlette:
    """The ASGI app of the gateway A."""
    before: dict[str, dict[str, int]] = {}  # per user session: the traffic counters at its offline phase

    @guarded
    async def session(request: Request) -> Response:
        hellos = unpack(await read_body(request, 256 * 1024), expect=3)
        return _binary(await run_in_threadpool(gateway.open_session, hellos))

    @guarded
    async def offline(request: Request) -> Response:
        query = _query(request)
        messages = unpack(await read_body(request, MAX_BODY))
        before[query] = dict(gateway.traffic)
        while len(before) > 64:
            del before[next(iter(before))]
        return _binary(await run_in_threadpool(gateway.offline, query, messages))

    @guarded
    async def online(request: Request) -> Response:
        query = _query(request)
        messages = unpack(await read_body(request, MAX_BODY))
        shares = await run_in_threadpool(gateway.online, query, messages)
        start = before.pop(query, {})
        traffic = {name: count - start.get(name, 0) for name, count in gateway.traffic.items()}
        return _binary(shares, {TRAFFIC_HEADER: json.dumps(traffic, separators=(",", ":"))})

    async def model(_: Request) -> Response:
        return JSONResponse(gateway.architecture.to_json())

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "role": "gateway"})

    return Starlette(
        routes=[
            Route("/v1/seco/session", session, methods=["POST"]),
            Route("/v1/seco/offline", offline, methods=["POST"]),
            Route("/v1/seco/online", online, methods=["POST"]),
            Route("/v1/seco/model", model, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
        ]
    )


class _Client:
    """POSTs of message lists to one party; transport failures name the party."""

    def __init__(self, who: str, url: str, timeout: float) -> None:
        self.who, self.url = who, url.rstrip("/")
        # The hot-path client (decision 0016): a step is a few ms of work, the client's
        # own overhead counted (TCP_NODELAY, kept connections, no per-request set-up).
        self._http = FastClient(self.url, timeout=timeout)

    def post(self, path: str, body: bytes, query: str = "") -> HttpResponse:
        headers = {"content-type": _BINARY, **({QUERY_HEADER: query} if query else {})}
        try:
            response = self._http.post(path, content=body, headers=headers)
        except TransportError as exc:
            raise ServiceUnavailable(f"{self.who} at {self.url} does not answer ({exc})") from None
        raise_for_error(response)
        return response

    def close(self) -> None:
        self._http.close()


class HttpRemote:
    """The gateway's handle of remote server B or C at ``url``."""

    def __init__(self, name: str, url: str, *, timeout: float = 300.0) -> None:
        self._client = _Client(f"SECO server {name}", url, timeout)

    def hello(self, message: bytes) -> bytes:
        return self._client.post("/v1/seco/hello", message).content

    def step(self, name: str, query: str, messages: Sequence[bytes]) -> list[bytes]:
        return unpack(self._client.post(f"/v1/seco/step/{name}", pack(messages), query).content)

    def close(self) -> None:
        self._client.close()


class HttpGateway:
    """The user's handle of the gateway A at ``url``."""

    def __init__(self, url: str, *, timeout: float = 300.0) -> None:
        self._client = _Client("the SECO gateway", url, timeout)

    def open_session(self, hellos: Sequence[bytes]) -> list[bytes]:
        return unpack(self._client.post("/v1/seco/session", pack(hellos)).content, expect=3)

    def offline(self, query: str, messages: Sequence[bytes]) -> list[bytes]:
        return unpack(self._client.post("/v1/seco/offline", pack(messages), query).content)

    def online(self, query: str, messages: Sequence[bytes]) -> tuple[list[bytes], dict[str, int]]:
        response = self._client.post("/v1/seco/online", pack(messages), query)
        traffic = _traffic(response.headers.get(TRAFFIC_HEADER, "{}"))
        return unpack(response.content, expect=3), traffic

    def close(self) -> None:
        self._client.close()


def _traffic(header: str) -> dict[str, int]:
    """The gateway's per-link byte counts (untrusted, informational); malformed → empty."""
    try:
        doc: Any = json.loads(header)
        return {str(k): int(v) for k, v in doc.items()} if isinstance(doc, dict) else {}
    except (ValueError, TypeError):
        return {}
