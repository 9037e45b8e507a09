"""HTTP clients: httpx for general calls, thin httpcore pools on the hot paths.

``sync_client`` / ``async_client`` are httpx clients with ``TCP_NODELAY``
(httpcore writes request headers and body separately; without it the body can
wait for a delayed ACK, ~40 ms on Linux, on every keep-alive request).

:class:`FastClient` and :class:`FastAsyncClient` serve the three paths every
request or key release crosses — user → gateway, gateway → instance, runtime →
KeyService. They speak through httpcore's connection pools directly, the
transport httpx itself is built on: a request then costs about half the CPU of
the same request through httpx's client layers (0.46 against 0.87 ms measured
on this project's machine), which on a 2-core host is time taken from the
model. They offer only what those paths use: a method, a path relative to the
base URL, a body, headers, query parameters and a timeout; the answer is read
whole into a :class:`HttpResponse`.

A client for an ``http://`` base URL gets no TLS context: httpx would load the
whole CA bundle (~40 ms) for each client it creates — on the cold-start path of
every instance — for a context it never uses.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpcore
import httpx

__all__ = ["FastAsyncClient", "FastClient", "HttpResponse", "TransportError", "async_client", "sync_client"]

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class TransportError(Exception):
    """The request did not complete (connection refused or reset, timeout, TLS failure).

    The httpcore (or ``ssl``) exception is the ``__cause__``.

    Attributes:
        not_sent: no connection was made, so the peer cannot have seen the request
            (safe to retry even when the request is not idempotent).
    """

    def __init__(self, message: str, *, not_sent: bool = False) -> None:
        super().__init__(message)
        self.not_sent = not_sent


@dataclass(frozen=True)
class HttpResponse:
    """A whole answer: status, headers (keys lower case), body."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            ValueError: not JSON.
        """
        return json.loads(self.content)


def _tls(base_url: str, verify: ssl.SSLContext | bool) -> ssl.SSLContext | bool:
    """No TLS context for a plain-HTTP base URL (see the module docstring)."""
    return False if base_url.startswith("http://") and verify is True else verify


def _context(base_url: str, verify: ssl.SSLContext | bool) -> ssl.SSLContext | None:
    tls = _tls(base_url, verify)
    if isinstance(tls, ssl.SSLContext):
        return tls
    return httpx.create_ssl_context(verify=tls) if base_url.startswith("https://") else None


def _prepare(
    base_url: str,
    path: str,
    content: bytes,
    headers: Mapping[str, str] | None,
    params: Mapping[str, str] | None,
    timeout: float,
) -> tuple[str, dict[str, Any]]:
    url = base_url + path + (f"?{urlencode(params)}" if params else "")
    sent = {"content-length": str(len(content)), **{k.lower(): v for k, v in (headers or {}).items()}}
    options = {
        "headers": list(sent.items()),
        "content": content,
        "extensions": {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
    }
    return url, options


def _response(response: httpcore.Response, content: bytes) -> HttpResponse:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
    return HttpResponse(response.status, headers, content)


#: What httpcore raises when a request does not complete (as opposed to an HTTP error status).
_TRANSPORT_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError)


def _pool_options(base_url: str, verify: ssl.SSLContext | bool, max_connections: int) -> dict[str, Any]:
    return {
        "ssl_context": _context(base_url, verify),
        "max_connections": max_connections,
        "socket_options": _NODELAY,
    }


class FastClient:
    """A blocking HTTP/1.1 client on httpcore's pool (see the module docstring).

    Args:
        base_url: scheme, host and port; every call names a path below it.
        timeout: seconds for connecting, each read and write, and waiting for a connection.
        verify: a TLS context (e.g. an attested RA-TLS one) or whether to verify.
        max_connections: connections kept open at most.
    """

    def __init__(
        self, base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, max_connections: int = 64
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._pool = httpcore.ConnectionPool(**_pool_options(self.base_url, verify, max_connections))

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes = b"",
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole answer.

        Raises:
            TransportError: the request did not complete.
        """
        url, options = _prepare(self.base_url, path, content, headers, params, self.timeout)
        try:
            with self._pool.stream(method, url, **options) as response:
                body = response.read()
        except _TRANSPORT_ERRORS as exc:
            raise TransportError(
                f"{method} {path}: {type(exc).__name__}", not_sent=isinstance(exc, httpcore.ConnectError)
            ) from exc
        return _response(response, body)

    def post(self, path: str, *, content: bytes, headers: Mapping[str, str] | None = None) -> HttpResponse:
        """``POST path`` with ``content``."""
        return self.request("POST", path, content=content, headers=headers)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> FastClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FastAsyncClient:
    """The asyncio version of :class:`FastClient` (same arguments)."""

    def __init__(
        self, base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, max_connections: int = 256
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._pool = httpcore.AsyncConnectionPool(**_pool_options(self.base_url, verify, max_connections))

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes = b"",
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole answer.

        Raises:
            TransportError: the request did not complete.
        """
        url, options = _prepare(self.base_url, path, content, headers, params, self.timeout)
        try:
            async with self._pool.stream(method, url, **options) as response:
                body = await response.aread()
        except _TRANSPORT_ERRORS as exc:
            raise TransportError(
                f"{method} {path}: {type(exc).__name__}", not_sent=isinstance(exc, httpcore.ConnectError)
            ) from exc
        return _response(response, body)

    async def post(self, path: str, *, content: bytes, headers: Mapping[str, str] | None = None) -> HttpResponse:
        """``POST path`` with ``content``."""
        return await self.request("POST", path, content=content, headers=headers)

    async def aclose(self) -> None:
        await self._pool.aclose()


def sync_client(base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, **kwargs: Any) -> httpx.Client:
    """A blocking httpx client with TCP_NODELAY (``verify``: an SSL context, e.g. an attested RA-TLS one)."""
    limits = kwargs.pop("limits", httpx.Limits(max_connections=64, max_keepalive_connections=64))
    transport = httpx.HTTPTransport(socket_options=_NODELAY, limits=limits, verify=_tls(base_url, verify))
    return httpx.Client(base_url=base_url, timeout=timeout, transport=transport, **kwargs)


def async_client(
    base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, **kwargs: Any
) -> httpx.AsyncClient:
    """An asyncio httpx client with TCP_NODELAY (``verify`` as for :func:`sync_client`)."""
    limits = kwargs.pop("limits", httpx.Limits(max_connections=256, max_keepalive_connections=64))
    transport = httpx.AsyncHTTPTransport(socket_options=_NODELAY, limits=limits, verify=_tls(base_url, verify))
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport, **kwargs)
