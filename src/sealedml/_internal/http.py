"""HTTP plumbing shared by the KeyService, the runtime and the gateway.

Bodies are read with a hard size limit, parsed with pydantic, and every
SealedML error maps to one status code and a JSON body ``{"error": code,
"message": text}``. Messages are the package's own (which never carry secrets);
unexpected exceptions become an opaque 500 and are logged by type only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sealedml.errors import (
    AccessDenied,
    AuthenticationError,
    Conflict,
    EnvelopeError,
    Error,
    InputError,
    NotFound,
    Overloaded,
    ProtocolError,
    SealedModelError,
    ServiceUnavailable,
)

__all__ = ["BodyTooLarge", "error_response", "guarded", "json_response", "read_body", "read_model", "status_for"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class BodyTooLarge(ProtocolError):
    code = "too_large"


def status_for(exc: Error) -> int:
    """The HTTP status of a SealedML error."""
    for cls, status in (
        (BodyTooLarge, 413),
        (SealedModelError, 502),
        (EnvelopeError, 400),
        (InputError, 400),
        (ProtocolError, 400),
        (AuthenticationError, 401),
        (AccessDenied, 403),
        (NotFound, 404),
        (Conflict, 409),
        (Overloaded, 429),
        (ServiceUnavailable, 503),
    ):
        if isinstance(exc, cls):
            return status
    return 500


def error_response(exc: BaseException) -> JSONResponse:
    """A JSON error response for ``exc`` (opaque for anything that is not a SealedML error)."""
    if isinstance(exc, Error):
        headers = {}
        if isinstance(exc, Overloaded) and exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=status_for(exc), headers=headers)
    log.error("internal error: %s", type(exc).__name__)
    return JSONResponse({"error": "internal", "message": "internal error"}, status_code=500)


def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a route handler: SealedML errors become their JSON error response (their code
    logged at INFO), anything else an opaque 500 logged by type only."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # the last line of defence of every server
            if isinstance(exc, Error):
                log.info("%s %s failed: %s", request.method, request.url.path, exc.code)
            return error_response(exc)

    return wrapped


def json_response(model: BaseModel | dict[str, Any], status: int = 200) -> Response:
    """Serialize a pydantic model (or dict) as a JSON response."""
    if isinstance(model, BaseModel):
        return Response(model.model_dump_json(), status_code=status, media_type="application/json")
    return JSONResponse(model, status_code=status)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """Read the request body, refusing more than ``max_bytes`` without buffering it all.

    Raises:
        BodyTooLarge: the body (or its declared length) exceeds the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise BodyTooLarge(f"body larger than {max_bytes} bytes")
        except ValueError as exc:
            raise ProtocolError("bad Content-Length") from exc
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > max_bytes:
            raise BodyTooLarge(f"body larger than {max_bytes} bytes")
    return bytes(chunks)


def read_model(body: bytes, model: type[M]) -> M:
    """Parse ``body`` as JSON into ``model``.

    Raises:
        ProtocolError: not JSON, or not a valid ``model`` (names the first bad field).
    """
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        first: dict[str, Any] = dict(errors[0]) if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        if first.get("type") == "json_invalid":
            raise ProtocolError("malformed JSON") from exc
        raise ProtocolError(f"invalid request: {where}: {first.get('msg', 'invalid')}") from exc
    except (ValueError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed JSON") from exc
