"""The KeyService as an ASGI application (Starlette).

Routes (all JSON; see docs/protocol.md):

=======  ================================  ======================  =========
method   path                              caller                  signed
=======  ================================  ======================  =========
GET      /v1/health                        anyone                  no
GET      /v1/attestation?nonce=HEX         anyone (clients)        no
POST     /v1/principals                    new principal           by the key being registered
POST     /v1/models/{id}/keys              owner (first = owner)   yes
POST     /v1/models/{id}/runtimes          owner                   yes
POST     /v1/models/{id}/grants            owner                   yes
POST     /v1/models/{id}/consent           user                    yes
POST     /v1/models/{id}/info              owner or granted user   yes
POST     /v1/audit/head                    any principal           yes
POST     /v1/release/challenge             runtime                 no (attested next)
POST     /v1/release                       runtime                 evidence
POST     /v1/sessions/put                  a session signer        yes (and k-of-n in the body)
POST     /v1/sessions/secret               a session signer        yes
POST     /v1/sessions/show                 a session signer        yes
POST     /v1/sessions/release              attested program        evidence
POST     /v1/sessions/volume-root          attested program        lease MAC
POST     /v1/replicas/join                 a KeyService replica    evidence
=======  ================================  ======================  =========

Release answers and audit heads are signed with the KeyService's attested
Ed25519 key (``signing_public_key`` in ``/v1/attestation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sealedml._internal.fastroutes import FastRoute, FastRoutes
from sealedml._internal.http import guarded, json_response, read_body, read_model
from sealedml._internal.ops import ops_routes
from sealedml.envelope.request import ID_PATTERN
from sealedml.errors import ProtocolError
from sealedml.keyservice.replicas import JoinRequest, handle_join
from sealedml.keyservice.service import KeyService
from sealedml.protocol import keyservice as p
from sealedml.protocol import sessions as ps

__all__ = ["MAX_BODY", "attestation_endpoint", "create_app"]

log = logging.getLogger(__name__)
MAX_BODY = 256 * 1024
_ID = re.compile(ID_PATTERN)
#: Threads for releases: each blocks on SQLite and on its audit record's group commit, so
#: as many as anyio's default (the limit ``run_in_threadpool`` applied before).
_RELEASE_THREADS = 40


def _model_id(request: Request) -> str:
    model_id = str(request.path_params["model_id"])
    if not _ID.match(model_id):
        raise ProtocolError("invalid model id")
    return model_id


def attestation_endpoint(attest: Callable[[bytes], BaseModel]) -> Callable[[Request], Awaitable[Response]]:
    """``GET /v1/attestation?nonce=HEX``: evidence over the client's nonce (``attest`` runs in a thread)."""

    async def attestation(request: Request) -> Response:
        try:
            nonce = bytes.fromhex(request.query_params.get("nonce", ""))
        except ValueError as exc:
            raise ProtocolError("nonce must be hex") from exc
        return json_response(await run_in_threadpool(attest, nonce))

    return attestation


def create_app(service: KeyService, *, replica_measurements: frozenset[str] = frozenset()) -> FastRoutes:
    """Build the ASGI app serving ``service`` (``replica_measurements``: other builds that may join as replicas)."""

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "service_id": service.service_id, "tee": service.attester.tee.value})

    attestation = attestation_endpoint(service.attestation)

    async def register(request: Request) -> Response:
        body = await read_body(request, MAX_BODY)
        req = read_model(body, p.RegisterRequest)
        principal = await run_in_threadpool(service.register, request.headers, request.url.path, body, req)
        return json_response({"principal_id": principal})

    def signed(model: type[p._Msg] | None, action: Callable[..., object]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            body = await read_body(request, MAX_BODY)
            model_id = _model_id(request)
            req = read_model(body, model) if model is not None else None
            principal = await run_in_threadpool(
                service.authenticate, request.method, request.url.path, request.headers, body
            )
            args = (principal, model_id) if req is None else (principal, model_id, req)
            result = await run_in_threadpool(action, *args)
            return json_response(result if result is not None else {"ok": True})  # type: ignore[arg-type]

        return handler

    async def audit_head(request: Request) -> Response:
        body = await read_body(request, MAX_BODY)
        req = read_model(body or b"{}", p.AuditHeadRequest)
        principal = await run_in_threadpool(
            service.authenticate, request.method, request.url.path, request.headers, body
        )
        return json_response(await run_in_threadpool(service.audit_head, principal, req))

    async def list_models(request: Request) -> Response:
        """The models the signed caller owns."""
        body = await read_body(request, MAX_BODY)
        principal = await run_in_threadpool(
            service.authenticate, request.method, request.url.path, request.headers, body
        )
        return json_response(await run_in_threadpool(service.list_models, principal))

    async def challenge(body: bytes, params: dict[str, str]) -> Response:
        """A fresh release challenge (the runtime attests over it next)."""
        return json_response(service.challenge())

    # The hottest route runs on a plain executor: anyio's thread hand-off (capacity
    # limiter, run variables, cancel scopes) costs 25-50 us more CPU per call.
    releases = ThreadPoolExecutor(max_workers=_RELEASE_THREADS, thread_name_prefix="sealedml-release")

    async def release(body: bytes, params: dict[str, str]) -> Response:
        """Release a model's keys to an attested runtime, wrapped to its HPKE key."""
        req = read_model(body, p.ReleaseRequest)
        return json_response(await asyncio.get_running_loop().run_in_executor(releases, service.release, req))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            releases.shutdown(wait=False, cancel_futures=True)

    def session_signed(
        model: type[BaseModel], action: Callable[[str, Any], object]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            body = await read_body(request, MAX_BODY)
            req = read_model(body, model)
            principal = await run_in_threadpool(
                service.authenticate, request.method, request.url.path, request.headers, body
            )
            result = await run_in_threadpool(action, principal, req)
            return json_response(result if result is not None else {"ok": True})  # type: ignore[arg-type]

        return handler

    async def session_release(request: Request) -> Response:
        body = await read_body(request, MAX_BODY)
        req = read_model(body, ps.SessionReleaseRequest)
        return json_response(await run_in_threadpool(service.sessions.release, req))

    async def volume_root(request: Request) -> Response:
        body = await read_body(request, MAX_BODY)
        req = read_model(body, ps.VolumeRootRequest)
        return json_response(await run_in_threadpool(service.sessions.volume_root, req))

    async def replica_join(request: Request) -> Response:
        body = await read_body(request, MAX_BODY)
        req = read_model(body, JoinRequest)
        return json_response(await run_in_threadpool(handle_join, service, req, replica_measurements))

    sessions = service.sessions
    # Every key release takes these two: answered in front of Starlette (decision 0016).
    fast = [FastRoute("/v1/release/challenge", challenge), FastRoute("/v1/release", release)]
    routes = [
        Route("/v1/replicas/join", guarded(replica_join), methods=["POST"]),
        Route("/v1/sessions/put", guarded(session_signed(ps.SessionPutRequest, sessions.put)), methods=["POST"]),
        Route(
            "/v1/sessions/secret",
            guarded(session_signed(ps.SessionSecretRequest, sessions.upload_secret)),
            methods=["POST"],
        ),
        Route("/v1/sessions/show", guarded(session_signed(ps.SessionShowRequest, sessions.show)), methods=["POST"]),
        Route("/v1/sessions/release", guarded(session_release), methods=["POST"]),
        Route("/v1/sessions/volume-root", guarded(volume_root), methods=["POST"]),
        Route("/v1/health", guarded(health), methods=["GET"]),
        Route("/v1/attestation", guarded(attestation), methods=["GET"]),
        Route("/v1/principals", guarded(register), methods=["POST"]),
        Route(
            "/v1/models/{model_id}/keys", guarded(signed(p.ModelKeyRequest, service.upload_model_key)), methods=["POST"]
        ),
        Route(
            "/v1/models/{model_id}/runtimes",
            guarded(signed(p.AllowRuntimeRequest, service.allow_runtime)),
            methods=["POST"],
        ),
        Route("/v1/models/{model_id}/grants", guarded(signed(p.GrantRequest, service.grant)), methods=["POST"]),
        Route("/v1/models/{model_id}/consent", guarded(signed(p.ConsentRequest, service.consent)), methods=["POST"]),
        Route("/v1/models/{model_id}/info", guarded(signed(None, service.model_info)), methods=["POST"]),
        Route(
            "/v1/models/{model_id}/audit",
            guarded(signed(p.ModelAuditRequest, service.model_audit)),
            methods=["POST"],
        ),
        Route("/v1/models/{model_id}/delete", guarded(signed(None, service.delete_model)), methods=["POST"]),
        Route("/v1/models/list", guarded(list_models), methods=["POST"]),
        Route("/v1/audit/head", guarded(audit_head), methods=["POST"]),
        *(r.listed() for r in fast),
    ]
    messages = [getattr(p, name) for name in p.__all__ if isinstance(getattr(p, name), type)]
    schemas = [m for m in messages if issubclass(m, BaseModel)]
    app = Starlette(routes=[*routes, *ops_routes("SealedML KeyService", routes, schemas=schemas)], lifespan=lifespan)
    return FastRoutes(app, fast, max_body=MAX_BODY)
