"""The gateway: the untrusted front door that routes ciphertext to instances.

It sees only the request envelope's metadata (model id, user id, sizes) and
forwards the envelope bytes to an instance's native ``/v1/infer`` (an
OpenWhisk deployment would call the same instance's ``/run``).

Routes: ``POST /v1/infer`` (a RequestEnvelope), ``GET /v1/health``,
``GET /v1/stats``, and for benchmarks ``POST /v1/unsafe-plaintext/{model_id}``
(only works if the instances were started with a plaintext directory).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sealedml._internal.fastroutes import FastRoute, FastRoutes
from sealedml._internal.http import PEAK_BYTES_HEADER, SERVER_TIMING_HEADER, guarded, json_response
from sealedml._internal.limits import DEFAULT_MAX_REQUEST
from sealedml._internal.ops import ops_routes
from sealedml.envelope.request import ID_PATTERN, RequestEnvelope
from sealedml.errors import ProtocolError
from sealedml.platform.base import Invocation, Platform, PlatformResult

__all__ = ["create_app"]

_ID = re.compile(ID_PATTERN)
MAX_BODY = DEFAULT_MAX_REQUEST
#: Whose limit a refusal names, and the flag that raises it.
_SETTING = ("this gateway's", "platform serve --max-request")


def create_app(platform: Platform, *, max_body: int = MAX_BODY) -> FastRoutes:
    """The gateway app in front of ``platform`` (``max_body``: the request limit, ``--max-request``)."""

    def _headers(result: PlatformResult) -> dict[str, str]:
        # The instance's phases plus the platform's own wait, so a client can see a cold start's breakdown.
        timing = f"platform-queue;dur={result.queue_s * 1000:.3f}"
        if result.server_timing:
            timing += ", " + result.server_timing
        headers = {
            "x-sealedml-cold-start": "1" if result.cold_start else "0",
            "x-sealedml-instance": result.instance_id,
            SERVER_TIMING_HEADER: timing,
        }
        if result.peak_bytes is not None:
            headers[PEAK_BYTES_HEADER] = str(result.peak_bytes)
        return headers

    async def infer(body: bytes, params: dict[str, str]) -> Response:
        """Route an encrypted request envelope to an instance of its model."""
        # The gateway reads only the envelope's metadata (validated, the ciphertext not
        # copied) and forwards the bytes unchanged to the instance's native endpoint.
        envelope = RequestEnvelope.parse_metadata(body)
        result = await platform.invoke(Invocation(envelope.model_id, "/v1/infer", body))
        return Response(
            result.body, status_code=result.status, media_type=result.content_type, headers=_headers(result)
        )

    async def plain(body: bytes, params: dict[str, str]) -> Response:
        """Benchmarks only: forward plaintext tensors to an instance started with a plaintext directory."""
        model_id = params["model_id"]
        if not _ID.match(model_id):
            raise ProtocolError("invalid model id")
        result = await platform.invoke(Invocation(model_id, f"/v1/unsafe-plaintext/{model_id}", body))
        return Response(
            result.body, status_code=result.status, media_type=result.content_type, headers=_headers(result)
        )

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def stats(request: Request) -> Response:
        return json_response(platform.stats())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await platform.start()
        try:
            yield
        finally:
            await platform.stop()

    fast = [FastRoute("/v1/infer", infer), FastRoute("/v1/unsafe-plaintext/{model_id}", plain)]
    routes = [
        *(r.listed() for r in fast),
        Route("/v1/health", guarded(health), methods=["GET"]),
        Route("/v1/stats", guarded(stats), methods=["GET"]),
    ]
    ops = ops_routes("SealedML platform gateway", routes, metrics=platform.metrics_text)
    app = Starlette(routes=[*routes, *ops], lifespan=lifespan)
    return FastRoutes(app, fast, max_body=max_body, setting=_SETTING)
