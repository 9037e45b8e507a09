"""HTTP plumbing shared by the KeyService, the runtime and the gateway.

Bodies are read with a hard size limit, parsed with pydantic, and every
SealedML error maps to one status code and a JSON body ``{"error": code,
"message": text}``. Messages are the package's own (which never carry secrets);
unexpected exceptions become an opaque 500 and are logged by type only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from sealedml.errors import (
    AccessDenied,
    AuthenticationError,
    ConfigurationError,
    Conflict,
    EnvelopeError,
    Error,
    InputError,
    NotFound,
    Overloaded,
    ProtocolError,
    SealedModelError,
    ServiceUnavailable,
    VerificationError,
    error_from_code,
)

__all__ = [
    "MODELS_HEADER",
    "PEAK_BYTES_HEADER",
    "SERVER_TIMING_HEADER",
    "BodyTooLarge",
    "check_url",
    "error_body",
    "error_response",
    "format_server_timing",
    "guarded",
    "json_response",
    "parse_server_timing",
    "raise_for_error",
    "read_body",
    "read_model",
    "receive_body",
    "status_for",
]

#: Per-phase durations of a request, standard ``Server-Timing`` (``name;dur=<ms>``).
SERVER_TIMING_HEADER = "server-timing"
#: The tracked peak bytes of a memory-bounded run (an instance's answer, passed on by the gateway).
PEAK_BYTES_HEADER = "x-sealedml-peak-bytes"
#: The comma-separated ids of the models an instance holds decrypted (a routing hint).
MODELS_HEADER = "x-sealedml-models"

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class BodyTooLarge(ProtocolError):
    code = "too_large"


def status_for(exc: Error) -> int:
    """The HTTP status of a SealedML error."""
    for cls, status in (
        (BodyTooLarge, 413),
        (SealedModelError, 502),
        (VerificationError, 502),
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


def error_body(exc: Error) -> bytes:
    """The JSON body of an error answer: ``{"error": code, "message": text}``."""
    return json.dumps({"error": exc.code, "message": exc.message}).encode()


def error_response(exc: BaseException) -> Response:
    """A JSON error response for ``exc`` (opaque for anything that is not a SealedML error)."""
    if isinstance(exc, Error):
        headers = {}
        if isinstance(exc, Overloaded) and exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return Response(error_body(exc), status_code=status_for(exc), headers=headers, media_type="application/json")
    log.error("internal error: %s", type(exc).__name__)
    return Response(
        b'{"error": "internal", "message": "internal error"}', status_code=500, media_type="application/json"
    )


class _Answer(Protocol):
    """What :func:`raise_for_error` reads of an HTTP answer (httpx's or ours)."""

    @property
    def status_code(self) -> int: ...

    @property
    def content(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def check_url(url: str, what: str) -> str:
    """``url`` without a trailing slash, if it is an ``http(s)://`` URL with a host.

    Raises:
        ConfigurationError: another scheme, none (``localhost:8000``), or no host.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(f"{what} must be an http:// or https:// URL with a host, not {url!r}")
    return url.strip().rstrip("/")


def raise_for_error(response: _Answer, where: str | None = None) -> None:
    """Client side of :func:`error_response`: raise the typed SealedML error an answer names.

    Nothing happens below HTTP 400. ``Retry-After`` of a 429 is copied into
    :class:`Overloaded`. ``where`` (e.g. "the KeyService at URL") names the server in the
    message of an answer that is not a SealedML error (a wrong URL, a proxy's page).

    Raises:
        Error: the error of the answer's ``code`` (unknown codes → ``ServiceError``);
            a 404 that is not a SealedML error → ``NotFound`` naming ``where``.
    """
    if response.status_code < 400:
        return
    try:
        doc = json.loads(response.content)
        code, message = str(doc["error"]), str(doc.get("message", ""))
    except (ValueError, KeyError, TypeError):
        server = where or "the server"
        if response.status_code == 404:
            code, message = "not_found", f"{server} has no such endpoint (HTTP 404): is that URL the right service?"
        else:
            code, message = "service", f"{server} answered HTTP {response.status_code}, not a SealedML error"
    exc = error_from_code(code, message)
    if response.status_code == 429 and isinstance(exc, Overloaded):
        try:
            exc.retry_after = float(response.headers.get("retry-after", "1"))
        except ValueError:
            exc.retry_after = 1.0
    raise exc


def format_server_timing(timings: Mapping[str, float]) -> str:
    """``Server-Timing`` of phases in seconds: ``name;dur=<ms>, ...``."""
    return ", ".join(f"{name};dur={seconds * 1000:.3f}" for name, seconds in timings.items())


def parse_server_timing(header: str | None) -> dict[str, float]:
    """Parse ``Server-Timing: name;dur=ms, ...`` into seconds per name (malformed parts ignored)."""
    phases: dict[str, float] = {}
    if not header:
        return phases
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        for param in rest.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    phases[name.strip()] = float(value) / 1000.0
                except ValueError:
                    pass
    return phases


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


async def read_body(request: Request, max_bytes: int, setting: tuple[str, str] | None = None) -> bytes:
    """Read the request body, refusing more than ``max_bytes`` without buffering it all.

    ``setting`` — (whose limit, the flag that raises it), e.g. ``("this gateway's",
    "platform serve --max-request")`` — makes the refusal say how to raise the limit.

    Raises:
        BodyTooLarge: the body (or its declared length) exceeds the limit.
        ProtocolError: a malformed Content-Length, or the client went away mid-body.
    """
    return await receive_body(request.receive, request.headers.get("content-length"), max_bytes, setting)


async def receive_body(
    receive: Receive, declared: str | None, max_bytes: int, setting: tuple[str, str] | None = None
) -> bytes:
    """:func:`read_body` on a bare ASGI ``receive`` (``declared``: the Content-Length header, if any).

    The chunks are joined once at the end (a body that came in one piece is not copied at all).
    """

    def refuse(size: int | None) -> BodyTooLarge:
        if setting is None:
            return BodyTooLarge(f"body larger than {max_bytes} bytes")
        from sealedml._internal.limits import too_large

        return BodyTooLarge(too_large(size, max_bytes, *setting))

    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise ProtocolError("bad Content-Length") from exc
        if length > max_bytes:
            raise refuse(length)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise refuse(None)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
