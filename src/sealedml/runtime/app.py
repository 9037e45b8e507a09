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
from sealedml._internal.http import guarded, json_response, read_body
from sealedml.envelope.request import BINARY_CONTENT_TYPE, ID_PATTERN, RequestEnvelope
from sealedml.envelope.tensors import decode_tensors, encode_tensors
from sealedml.errors import Error, NotFound, ProtocolError
from sealedml.runtime.engine import LoadedModel
from sealedml.runtime.worker import Worker

__all__ = ["DEFAULT_MAX_BODY", "create_app"]

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 64 * 1024 * 1024

_ID = re.compile(ID_PATTERN)


def create_app(
    worker: Worker, *, max_body: int = DEFAULT_MAX_BODY, unsafe_plaintext_dir: Path | None = None
) -> Starlette:
    """Build the runtime's ASGI app around ``worker``."""
    state = {"initialized": False}

    def _with_headers(response: Response, timings: dict[str, float]) -> Response:
        # Phase timings (standard Server-Timing, ms) and the models this instance holds:
        # metadata the platform sees anyway, used for metering and routing.
        peak = timings.pop("_peak_bytes", None)
        if peak is not None:
            response.headers["x-sealedml-peak-bytes"] = str(int(peak))
        response.headers["server-timing"] = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timings.items())
        response.headers["x-sealedml-models"] = ",".join(sorted({m["model_id"] for m in worker.loaded_models}))
        return response

    plain_models: dict[str, LoadedModel] = {}

    async def init(request: Request) -> Response:
        body = await read_body(request, max_body)
        try:
            doc = loads_json(body or b"{}")
        except ValueError as exc:
            raise ProtocolError("malformed JSON") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("value", {}), dict):
            raise ProtocolError('init body must be {"value": {...}}')
        if state["initialized"]:
            return json_response({"error": "Cannot initialize the action more than once."}, status=403)
        state["initialized"] = True
        return json_response({"ok": True})

    async def run(request: Request) -> Response:
        # OpenWhisk semantics: a body that is not {"value": {...}} is a protocol error
        # (4xx); everything the action itself refuses — a denied user, a tampered or
        # malformed envelope, a model failing authentication — is an *application
        # error*: HTTP 200 with {"error": ...}. Any non-200 answer makes OpenWhisk's
        # invoker destroy the container (ContainerProxy), dropping its decrypted
        # models and leases and failing its other in-flight activations.
        body = await read_body(request, max_body)
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
            response, timings = await worker.predict_timed(envelope)
        except Error as exc:
            log.info("activation failed: %s", exc.code)
            return json_response({"error": exc.code, "message": exc.message}, status=200)
        return _with_headers(json_response(response), timings)

    async def infer(request: Request) -> Response:
        body = await read_body(request, max_body)
        envelope = RequestEnvelope.parse(body)
        response, timings = await worker.predict_timed(envelope)
        if body.startswith(b"SMLQ"):  # answer in the framing the caller used
            return _with_headers(Response(response.to_binary(), media_type=BINARY_CONTENT_TYPE), timings)
        return _with_headers(json_response(response), timings)

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "measurement": worker.measurement})

    async def stats(request: Request) -> Response:
        return json_response(worker.describe())

    async def unsafe_plain(request: Request) -> Response:
        if unsafe_plaintext_dir is None:
            raise NotFound("not found")
        model_id = request.path_params["model_id"]
        if not _ID.match(model_id):
            raise ProtocolError("invalid model id")
        body = await read_body(request, max_body)
        model = plain_models.get(model_id)
        if model is None:
            path = unsafe_plaintext_dir / f"{model_id}.onnx"
            if not path.is_file():
                raise NotFound("no such plaintext model")
            model = await worker._run_blocking(
                lambda: LoadedModel(path.read_bytes(), model_id=model_id, version=0, threads=worker._threads)
            )
            plain_models[model_id] = model

        def serve() -> bytes:
            tensors, positional = decode_tensors(body)
            return encode_tensors(model.run(model.bind_inputs(tensors, positional)))

        async with worker._gate:
            out = await worker._run_blocking(serve)
        return Response(out, media_type="application/octet-stream")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if unsafe_plaintext_dir is not None:
            log.warning("UNSAFE: serving plaintext models from %s (benchmark mode)", unsafe_plaintext_dir)
        yield
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.aclose(), timeout=5)

    routes = [
        Route("/init", guarded(init), methods=["POST"]),
        Route("/run", guarded(run), methods=["POST"]),
        Route("/v1/infer", guarded(infer), methods=["POST"]),
        Route("/v1/health", guarded(health), methods=["GET"]),
        Route("/v1/stats", guarded(stats), methods=["GET"]),
        Route("/v1/unsafe-plaintext/{model_id}", guarded(unsafe_plain), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
