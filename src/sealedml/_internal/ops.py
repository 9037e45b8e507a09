"""Routes every SealedML service offers its operators: liveness, readiness, metrics and an OpenAPI document.

* ``GET /livez`` — 200 while the process serves HTTP (a restart is the cure otherwise);
* ``GET /readyz`` — 200 when the service can do its job, 503 with the reason otherwise
  (a load balancer stops sending it requests; nothing is restarted);
* ``GET /metrics`` — Prometheus text: the service's own registry where it has one, else
  the process's (CPU, memory, file descriptors, garbage collection);
* ``GET /openapi.json`` — an OpenAPI 3.1 document of the service's routes (method, path,
  summary from the handler's docstring) and, where given, the JSON schemas of its messages.

Nothing here reveals a secret: readiness reasons and metrics are counts and states.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

__all__ = ["openapi_document", "ops_routes"]

#: A readiness check: None when ready, else why not (one line).
Readiness = Callable[[], str | None]


def _summary(route: Route) -> str:
    endpoint = route.endpoint
    doc = inspect.getdoc(getattr(endpoint, "__wrapped__", endpoint)) or ""
    return doc.splitlines()[0] if doc else route.name.replace("_", " ")


def openapi_document(
    title: str, version: str, routes: Iterable[BaseRoute], schemas: Sequence[type[BaseModel]] = ()
) -> dict[str, Any]:
    """An OpenAPI 3.1 document of ``routes`` (and the JSON schemas of ``schemas`` under ``components``)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation: dict[str, Any] = {
                "summary": _summary(route),
                "responses": {"default": {"description": "see docs/protocol.md"}},
            }
            parameters = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in route.param_convertors
            ]
            if parameters:
                operation["parameters"] = parameters
            paths.setdefault(route.path, {})[method.lower()] = operation
    document: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths}
    if schemas:
        document["components"] = {
            "schemas": {
                model.__name__: model.model_json_schema(ref_template="#/components/schemas/{model}")
                for model in schemas
            }
        }
    return document


def ops_routes(
    title: str,
    routes: Sequence[BaseRoute],
    *,
    ready: Readiness | None = None,
    metrics: Callable[[], bytes | str] | None = None,
    schemas: Sequence[type[BaseModel]] = (),
) -> list[Route]:
    """``/livez``, ``/readyz``, ``/openapi.json`` and (unless the service has its own) ``/metrics``.

    Args:
        title: the service's name in the OpenAPI document.
        routes: the service's own routes (documented with these).
        ready: the readiness check (default: ready whenever live).
        metrics: the service's Prometheus text (default: the process registry's).
        schemas: message models whose JSON schemas the OpenAPI document carries.
    """
    from sealedml import __version__

    async def livez(request: Request) -> Response:
        """Liveness: 200 while the process serves HTTP."""
        return JSONResponse({"status": "live"})

    async def readyz(request: Request) -> Response:
        """Readiness: 200 when the service can do its job, 503 with the reason otherwise."""
        reason = ready() if ready is not None else None
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def prometheus(request: Request) -> Response:
        """Prometheus metrics of this process."""
        if metrics is not None:
            body = metrics()
        else:
            from prometheus_client import REGISTRY, generate_latest

            body = generate_latest(REGISTRY)
        return Response(body, media_type="text/plain; version=0.0.4")

    extra = [
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    document: dict[str, Any] = {}

    async def openapi(request: Request) -> Response:
        """This OpenAPI document."""
        if not document:
            document.update(openapi_document(title, __version__, [*routes, *extra], schemas))
        return JSONResponse(document)

    extra.append(Route("/openapi.json", openapi, methods=["GET"]))
    return extra
