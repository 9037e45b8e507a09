"""HTTP/1.1 client connections on httptools: one exchange at a time, kept alive between them.

The hot paths (user → gateway, gateway → instance, runtime → KeyService) send
one request and read one whole answer per exchange; nothing else of HTTP is
needed there. A connection here writes the request head and body with one or
two socket calls and feeds what arrives to httptools' parser (llhttp, the
parser uvicorn serves with), so a 600 KB request costs about what the socket
copies cost: 0.12 ms per round trip on this project's 2-core machine, against
0.47 ms through httpcore's connection and its anyio streams (decision 0016).

:class:`SyncConnection` is a blocking socket; :class:`AsyncConnection` an
asyncio protocol, so TLS is the event loop's own (asyncio's or uvloop's,
``SSLContext.wrap_bio``), which keeps the RA-TLS contexts working: their
handshake verifies the peer's evidence before a byte is sent.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import time
from typing import cast

import httptools

__all__ = ["AsyncConnection", "ExchangeError", "ResponseReader", "SyncConnection", "request_head"]

#: Bodies up to this size go out in one write with the head (one segment, one syscall).
_COALESCE = 64 * 1024
_RECV = 256 * 1024


class ExchangeError(Exception):
    """The exchange did not complete: the connection closed or broke, or the answer is not HTTP."""


def request_head(method: str, target: str, host: str, headers: list[tuple[str, str]], length: int) -> bytes:
    """The request line and headers (``content-length`` always; ``host`` unless given)."""
    lines = [f"{method} {target} HTTP/1.1", f"content-length: {length}"]
    if not any(name == "host" for name, _ in headers):
        lines.append(f"host: {host}")
    lines.extend(f"{name}: {value}" for name, value in headers if name != "content-length")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ResponseReader:
    """The httptools callbacks that collect one answer: status, headers (lower case), body."""

    __slots__ = ("_chunks", "_parser", "complete", "headers", "keep_alive", "status")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: list[bytes] = []
        self.headers: dict[str, str] = {}
        self.status = 0
        self.complete = False
        #: Whether the server keeps the connection open after this answer.
        self.keep_alive = False

    def feed(self, data: bytes) -> None:
        """Parse ``data``.

        Raises:
            ExchangeError: not an HTTP/1.1 answer, or bytes after it (no pipelining here).
        """
        if self.complete:
            raise ExchangeError("unexpected bytes after the answer")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise ExchangeError(f"malformed HTTP answer ({type(exc).__name__})") from exc

    @property
    def body(self) -> bytes:
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # Asked here: llhttp resets its flags once the message is complete.
        self.keep_alive = bool(self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class SyncConnection:
    """A blocking keep-alive connection (TCP, optionally TLS)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, timeout: float) -> None:
        """Connect (and complete the TLS handshake) within ``timeout`` seconds.

        Raises:
            OSError: the connection or the handshake failed (``ssl.SSLError`` is one).
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.reusable = True

    def idle_and_open(self) -> bool:
        """Whether this idle connection can carry another exchange (the peer has not closed it)."""
        if not self.reusable:
            return False
        # An idle connection with something to read was closed (or broken) by the peer.
        readable, _, _ = select.select([self._sock], [], [], 0)
        return not readable

    def exchange(self, head: bytes, body: bytes | bytearray, timeout: float) -> ResponseReader:
        """Send one request and read the whole answer within ``timeout`` seconds.

        Raises:
            ExchangeError: the connection closed or the answer is malformed.
            OSError: a socket error; ``TimeoutError`` past the deadline.
        """
        self.reusable = False  # until the answer is complete and the server keeps the connection
        deadline = time.monotonic() + timeout
        sock = self._sock
        sock.settimeout(timeout)
        if len(body) <= _COALESCE:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            sock.sendall(body)
        reader = ResponseReader()
        while not reader.complete:
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            data = sock.recv(_RECV)
            if not data:
                raise ExchangeError("the server closed the connection before answering")
            reader.feed(data)
        self.reusable = reader.keep_alive
        return reader

    def close(self) -> None:
        self.reusable = False
        self._sock.close()


class AsyncConnection(asyncio.Protocol):
    """An asyncio keep-alive connection (TCP, optionally TLS); make one with :meth:`open`."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._reader: ResponseReader | None = None
        self._answer: asyncio.Future[ResponseReader] | None = None
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int, context: ssl.SSLContext | None, timeout: float) -> AsyncConnection:
        """Connect (and complete the TLS handshake) within ``timeout`` seconds.

        Raises:
            OSError: the connection or the handshake failed (``ssl.SSLError`` is one).
            TimeoutError: not within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            transport, protocol = await loop.create_connection(
                cls,
                host,
                port,
                ssl=context,
                server_hostname=host if context is not None else None,
                ssl_handshake_timeout=timeout if context is not None else None,
            )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return protocol

    def idle_and_open(self) -> bool:
        """Whether this idle connection can carry another exchange."""
        return self.reusable and self._transport is not None and not self._transport.is_closing()

    async def exchange(self, head: bytes, body: bytes | bytearray, timeout: float) -> ResponseReader:
        """Send one request and read the whole answer within ``timeout`` seconds.

        A connection whose exchange failed, timed out or was cancelled is closed:
        an answer arriving later must not be read as the next request's.

        Raises:
            ExchangeError: the connection closed or the answer is malformed.
            TimeoutError: past the deadline.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ExchangeError("the connection is closed")
        self.reusable = False
        self._reader = ResponseReader()
        self._answer = asyncio.get_running_loop().create_future()
        try:
            if len(body) <= _COALESCE:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
            async with asyncio.timeout(timeout):
                reader = await self._answer
        except BaseException:
            self.close()
            raise
        finally:
            self._answer = None
            self._reader = None
        self.reusable = reader.keep_alive
        if not self.reusable:
            self.close()
        return reader

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader, answer = self._reader, self._answer
        if reader is None or answer is None or answer.done():
            self.close()  # bytes nobody asked for: this connection is out of step
            return
        try:
            reader.feed(data)
        except ExchangeError as exc:
            answer.set_exception(exc)
            return
        if reader.complete:
            answer.set_result(reader)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        answer = self._answer
        if answer is not None and not answer.done():
            error = ExchangeError("the server closed the connection before answering")
            error.__cause__ = exc
            answer.set_exception(error)
