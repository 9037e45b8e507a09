"""The runtime's HTTP face: the OpenWhisk action protocol and a native API.

OpenWhisk (https://github.com/apache/openwhisk/blob/master/docs/actions-new.md):

* ``POST /init`` — once per container; body ``{"value": {...}}``. A second call
  is refused with 403, as OpenWhisk's own action proxies do.
* ``POST /run`` — body ``{"value": <RequestEnvelope>, "activation_id": ...}``;
  answers the ``ResponseEnvelope`` or ``{"error": code, "message": ...}``.

Native: ``POST /v1/infer`` (a ``RequestEnvelope``), ``GET /v1/health``,
``GET /v1/stats``.

Benchmarks only: with ``unsafe_plaintext_dir`` set, ``POST
/v1/unsafe-plaintext/{model_id}`` serves *unencrypted* safetensors through the
same stack, to measure what encryption and attestation cost. It logs a warning
and is off by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sealedml._internal.encoding import loads_json
from sealedml._internal.fastroutes import FastRoute, FastRoutes, Handler
from sealedml._internal.http import (
    MODELS_HEADER,
    PEAK_BYTES_HEADER,
    SERVER_TIMING_HEADER,
    error_body,
    format_server_timing,
    guarded,
    json_response,
    read_body,
)
from sealedml._internal.limits import DEFAULT_MAX_REQUEST
from sealedml._internal.ops import ops_routes
from sealedml.envelope.request import BINARY_CONTENT_TYPE, ID_PATTERN, RequestEnvelope, is_binary
from sealedml.envelope.tensors import decode_tensors, encode_tensors
from sealedml.errors import Error, NotFound, ProtocolError
from sealedml.runtime.engine import LoadedModel
from sealedml.runtime.worker import Prediction, Worker

__all__ = ["DEFAULT_MAX_BODY", "create_app"]

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = DEFAULT_MAX_REQUEST
#: Whose limit a refusal names, and the flag that raises it.
_SETTING = ("this instance's", "worker serve --max-request")

_ID = re.compile(ID_PATTERN)


def create_app(
    worker: Worker, *, max_body: int = DEFAULT_MAX_BODY, unsafe_plaintext_dir: Path | None = None
) -> FastRoutes:
    """Build the runtime's ASGI app around ``worker``."""
    state = {"initialized": False}

    def _with_headers(response: Response, prediction: Prediction) -> Response:
        # Phase timings (standard Server-Timing, ms), the tracked peak of a memory-bounded
        # run and the models this instance holds: metadata the platform sees anyway, used
        # for metering and routing.
        if prediction.peak_bytes is not None:
            response.headers[PEAK_BYTES_HEADER] = str(prediction.peak_bytes)
        response.headers[SERVER_TIMING_HEADER] = format_server_timing(prediction.timings)
        response.headers[MODELS_HEADER] = ",".join(sorted({m["model_id"] for m in worker.loaded_models}))
        return response

    plain_models: dict[str, LoadedModel] = {}

    async def init(request: Request) -> Response:
        body = await read_body(request, max_body, _SETTING)
        try:
            doc = loads_json(body or b"{}")
        except ValueError as exc:
            raise ProtocolError("malformed JSON") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("value", {}), dict):
            raise ProtocolError('init body must be {"value": {...}}')
        if state["initialized"]:
            return json_response({"error": "Cannot initialize the action more than once."}, status=403)
        state["initialized"] = True
        worker.keep_ready()
        return json_response({"ok": True})

    async def run(request: Request) -> Response:
        # OpenWhisk semantics: a body that is not {"value": {...}} is a protocol error
        # (4xx); everything the action itself refuses — a denied user, a tampered or
        # malformed envelope, a model failing authentication — is an *application
        # error*: HTTP 200 with {"error": ...}. Any non-200 answer makes OpenWhisk's
        # invoker destroy the container (ContainerProxy), dropping its decrypted
        # models and leases and failing its other in-flight activations.
        body = await read_body(request, max_body, _SETTING)
        if not state["initialized"]:
            return json_response({"error": "not_initialized", "message": "POST /init first"}, status=403)
        try:
            doc = loads_json(body)
        except ValueError as exc:
            raise ProtocolError("malformed JSON") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("value", {}), dict):
            raise ProtocolError('run body must be {"value": <request envelope>}')
        try:
            # OpenWhisk merges parameters bound with `wsk action create -p` into every
            # activation's value: keep only the envelope's own fields.
            value = {k: v for k, v in doc.get("value", {}).items() if k in RequestEnvelope.model_fields}
            envelope = RequestEnvelope.parse(json.dumps(value))
            prediction = await worker.predict_timed(envelope)
        except Error as exc:
            log.info("activation failed: %s", exc.code)
            return Response(error_body(exc), status_code=200, media_type="application/json")
        return _with_headers(json_response(prediction.response), prediction)

    async def infer(body: bytes, params: dict[str, str]) -> Response:
        """Answer an encrypted request envelope (binary or JSON framing) in the same framing."""
        envelope = RequestEnvelope.parse(body)
        prediction = await worker.predict_timed(envelope)
        if is_binary(body):  # answer in the framing the caller used
            return _with_headers(Response(prediction.response.to_binary(), media_type=BINARY_CONTENT_TYPE), prediction)
        return _with_headers(json_response(prediction.response), prediction)

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "measurement": worker.measurement})

    async def stats(request: Request) -> Response:
        return json_response(worker.describe())

    def plaintext_handler(plain_dir: Path) -> Handler:
        async def unsafe_plain(body: bytes, params: dict[str, str]) -> Response:
            """Benchmarks only: run a plaintext model on plaintext tensors (off without a plaintext directory)."""
            model_id = params["model_id"]
            if not _ID.match(model_id):
                raise ProtocolError("invalid model id")
            model = plain_models.get(model_id)
            if model is None:
                path = plain_dir / f"{model_id}.onnx"
                if not path.is_file():
                    raise NotFound("no such plaintext model")
                model = await worker._run_blocking(
                    lambda: LoadedModel(path.read_bytes(), model_id=model_id, version=0, threads=worker._threads)
                )
                plain_models[model_id] = model

            def serve() -> bytes:
                tensors, positional = decode_tensors(body)
                return encode_tensors(model.run(model.bind_inputs(tensors, positional)).outputs)

            async with worker._gate:
                out = await worker._run_blocking(serve)
            return Response(out, media_type="application/octet-stream")

        return unsafe_plain

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if unsafe_plaintext_dir is not None:
            log.warning("UNSAFE: serving plaintext models from %s (benchmark mode)", unsafe_plaintext_dir)
        yield
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.aclose(), timeout=5)

    async def not_enabled(request: Request) -> Response:
        """Benchmarks only: run a plaintext model on plaintext tensors (off without a plaintext directory)."""
        raise NotFound("not found")  # before reading any body

    # The routes every inference takes skip Starlette's routing and middleware (decision 0016).
    plain_path = "/v1/unsafe-plaintext/{model_id}"
    fast = [FastRoute("/v1/infer", infer)]
    disabled: list[Route] = []
    if unsafe_plaintext_dir is not None:
        fast.append(FastRoute(plain_path, plaintext_handler(unsafe_plaintext_dir)))
    else:
        disabled.append(Route(plain_path, guarded(not_enabled), methods=["POST"]))
    routes = [
        Route("/init", guarded(init), methods=["POST"]),
        Route("/run", guarded(run), methods=["POST"]),
        *(r.listed() for r in fast),
        *disabled,
        Route("/v1/health", guarded(health), methods=["GET"]),
        Route("/v1/stats", guarded(stats), methods=["GET"]),
    ]
    app = Starlette(routes=[*routes, *ops_routes("SealedML runtime instance", routes)], lifespan=lifespan)
    return FastRoutes(app, fast, max_body=max_body, setting=_SETTING)
