"""HTTP clients: httpx for general calls, lean HTTP/1.1 pools on the hot paths.

``sync_client`` / ``async_client`` are httpx clients with ``TCP_NODELAY``
(httpcore writes request headers and body separately; without it the body can
wait for a delayed ACK, ~40 ms on Linux, on every keep-alive request).

:class:`FastClient` and :class:`FastAsyncClient` serve the paths every request
or key release crosses — user → gateway, gateway → instance, runtime →
KeyService. They keep HTTP/1.1 connections (:mod:`sealedml._internal.h1`,
httptools' parser on a socket or an asyncio protocol) and offer only what those
paths use: a method, a path relative to the base URL, a body, headers, query
parameters and a timeout; the answer is read whole into a :class:`HttpResponse`.
A 600 KB request then costs 0.12 ms of client work per round trip, against
0.47 ms through httpcore and 0.9 ms through httpx (decision 0016).

A client for an ``http://`` base URL gets no TLS context: httpx would load the
whole CA bundle (~40 ms) for each client it creates — on the cold-start path of
every instance — for a context it never uses.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from sealedml._internal.h1 import AsyncConnection, ExchangeError, ResponseReader, SyncConnection, request_head

__all__ = ["FastAsyncClient", "FastClient", "HttpResponse", "TransportError", "async_client", "sync_client"]

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class TransportError(Exception):
    """The request did not complete (connection refused or reset, timeout, TLS failure).

    The underlying exception (``OSError``, ``ssl.SSLError``, ``TimeoutError``, or a
    malformed or missing answer) is the ``__cause__``.

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


class _Target:
    """Where a client's requests go: host, port, TLS context, and the base path."""

    def __init__(self, base_url: str, verify: ssl.SSLContext | bool) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.authority = parts.netloc
        self.base_path = parts.path.rstrip("/")
        self.context = _context(base_url, verify)

    def head(
        self,
        method: str,
        path: str,
        content: bytes | bytearray,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
    ) -> bytes:
        target = self.base_path + path + (f"?{urlencode(params)}" if params else "")
        sent = [(k.lower(), v) for k, v in (headers or {}).items()]
        return request_head(method, target, self.authority, sent, len(content))


def _response(reader: ResponseReader) -> HttpResponse:
    return HttpResponse(reader.status, reader.headers, reader.body)


def _failure(method: str, path: str, exc: BaseException, *, not_sent: bool) -> TransportError:
    return TransportError(f"{method} {path}: {type(exc).__name__}", not_sent=not_sent)


class FastClient:
    """A blocking HTTP/1.1 client keeping connections alive (see the module docstring).

    Safe to share between threads: each exchange takes a connection of its own.

    Args:
        base_url: scheme, host and port (and an optional base path); every call names a path below it.
        timeout: seconds for connecting, for waiting for a free connection, and for each
            exchange (sending the request and reading the whole answer).
        verify: a TLS context (e.g. an attested RA-TLS one) or whether to verify.
        max_connections: connections open at most.
    """

    def __init__(
        self, base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, max_connections: int = 64
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._target = _Target(self.base_url, verify)
        self._idle: list[SyncConnection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | bytearray = b"",
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole answer.

        Raises:
            TransportError: the request did not complete.
        """
        head = self._target.head(method, path, content, headers, params)
        if not self._slots.acquire(timeout=self.timeout):
            raise TransportError(f"{method} {path}: no connection free within {self.timeout:g}s", not_sent=True)
        try:
            connection = self._connection(method, path)
            try:
                reader = connection.exchange(head, content, self.timeout)
            except (OSError, ExchangeError) as exc:
                connection.close()
                raise _failure(method, path, exc, not_sent=False) from exc
            self._release(connection)
        finally:
            self._slots.release()
        return _response(reader)

    def _connection(self, method: str, path: str) -> SyncConnection:
        while True:
            with self._lock:
                if self._closed:
                    raise TransportError(f"{method} {path}: the client is closed", not_sent=True)
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                break
            if connection.idle_and_open():
                return connection
            connection.close()
        t = self._target
        try:
            return SyncConnection(t.host, t.port, t.context, self.timeout)
        except OSError as exc:  # refused, unreachable, timed out, TLS or attestation failure
            raise _failure(method, path, exc, not_sent=True) from exc

    def _release(self, connection: SyncConnection) -> None:
        with self._lock:
            if connection.reusable and not self._closed:
                self._idle.append(connection)
                return
        connection.close()

    def post(self, path: str, *, content: bytes | bytearray, headers: Mapping[str, str] | None = None) -> HttpResponse:
        """``POST path`` with ``content``."""
        return self.request("POST", path, content=content, headers=headers)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def __enter__(self) -> FastClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FastAsyncClient:
    """The asyncio version of :class:`FastClient` (same arguments); use it from one event loop."""

    def __init__(
        self, base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, max_connections: int = 256
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._target = _Target(self.base_url, verify)
        self._idle: list[AsyncConnection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | bytearray = b"",
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole answer.

        Raises:
            TransportError: the request did not complete.
        """
        head = self._target.head(method, path, content, headers, params)
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise TransportError(
                f"{method} {path}: no connection free within {self.timeout:g}s", not_sent=True
            ) from None
        try:
            connection = await self._connection(method, path)
            try:
                reader = await connection.exchange(head, content, self.timeout)
            except (OSError, ExchangeError) as exc:  # TimeoutError is an OSError
                raise _failure(method, path, exc, not_sent=False) from exc
            if connection.reusable and not self._closed:
                self._idle.append(connection)
            else:
                connection.close()
        finally:
            self._slots.release()
        return _response(reader)

    async def _connection(self, method: str, path: str) -> AsyncConnection:
        if self._closed:
            raise TransportError(f"{method} {path}: the client is closed", not_sent=True)
        while self._idle:
            connection = self._idle.pop()
            if connection.idle_and_open():
                return connection
            connection.close()
        t = self._target
        try:
            return await AsyncConnection.open(t.host, t.port, t.context, self.timeout)
        except OSError as exc:  # refused, unreachable, timed out, TLS or attestation failure
            raise _failure(method, path, exc, not_sent=True) from exc

    async def post(
        self, path: str, *, content: bytes | bytearray, headers: Mapping[str, str] | None = None
    ) -> HttpResponse:
        """``POST path`` with ``content``."""
        return await self.request("POST", path, content=content, headers=headers)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


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
