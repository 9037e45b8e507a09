"""The hot-path HTTP clients (FastClient, FastAsyncClient) against a real HTTP/1.1 server on loopback.

The server is the standard library's threaded ``http.server`` speaking HTTP/1.1
with keep-alive; each path scripts one behaviour (echo, close, stall, garbage,
a cut answer) so every way an exchange can end is exercised, under asyncio and
uvloop alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import uvloop

from sealedml._internal.httpclient import FastAsyncClient, FastClient, HttpResponse, TransportError

_connection_ids = itertools.count(1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def setup(self) -> None:
        super().setup()
        self.connection_id = next(_connection_ids)
        self.served = 0

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-connection", str(self.connection_id))
        self.send_header("X-Served", str(self.served))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        self.served += 1
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        path = self.path.split("?")[0]
        if path == "/echo":
            self._answer(200, body, {"x-query": self.path.partition("?")[2], "x-type": self.headers["content-type"]})
        elif path == "/close":
            self._answer(200, b"bye", {"connection": "close"})
            self.close_connection = True
        elif path == "/stall":
            time.sleep(1.0)
            with contextlib.suppress(OSError):  # the client has given up and closed
                self._answer(200, b"late")
        elif path == "/garbage":
            self.wfile.write(b"THIS IS NOT HTTP\r\n\r\n")
            self.close_connection = True
        elif path == "/cut":
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
            self.close_connection = True
        else:
            self._answer(404, b"no such path")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -------------------------------------------------------------- blocking client


def test_large_body_round_trips_and_the_connection_is_kept(server: str) -> None:
    body = os.urandom(2 * 1024 * 1024 + 3)  # several socket reads, not coalesced with the head
    with FastClient(server, timeout=10) as client:
        first = client.post("/echo", content=body, headers={"Content-Type": "application/x-test"})
        second = client.request("POST", "/echo", content=b"small", params={"a": "1 2"})
    assert first.status_code == 200 and first.content == body
    assert first.headers["x-type"] == "application/x-test"
    assert first.headers["x-served"] == "1"  # header names come back lower case
    assert second.content == b"small" and second.headers["x-query"] == "a=1+2"
    # The same connection carried both exchanges.
    assert second.headers["x-connection"] == first.headers["x-connection"]
    assert second.headers["x-served"] == "2"


def test_connection_close_is_honoured(server: str) -> None:
    with FastClient(server, timeout=10) as client:
        closing = client.post("/close", content=b"")
        after = client.post("/echo", content=b"x")
    assert closing.content == b"bye"
    assert after.headers["x-connection"] != closing.headers["x-connection"]


def test_a_connection_the_server_closed_while_idle_is_replaced(server: str) -> None:
    with FastClient(server, timeout=10) as client:
        first = client.post("/echo", content=b"1")
        idle = client._idle[0]
        idle._sock.shutdown(socket.SHUT_RDWR)  # as a server's keep-alive timeout would leave it: readable EOF
        second = client.post("/echo", content=b"2")
    assert second.content == b"2"
    assert second.headers["x-connection"] != first.headers["x-connection"]


def test_refused_connection_is_not_sent() -> None:
    with FastClient(f"http://127.0.0.1:{_free_port()}", timeout=2) as client:
        with pytest.raises(TransportError) as info:
            client.post("/echo", content=b"x")
    assert info.value.not_sent is True
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


@pytest.mark.parametrize(("path", "cause"), [("/garbage", "ExchangeError"), ("/cut", "ExchangeError")])
def test_malformed_or_cut_answers_are_transport_errors(server: str, path: str, cause: str) -> None:
    with FastClient(server, timeout=5) as client:
        with pytest.raises(TransportError) as info:
            client.post(path, content=b"x")
        assert info.value.not_sent is False
        assert type(info.value.__cause__).__name__ == cause
        assert client._idle == []  # the broken connection is not kept
        assert client.post("/echo", content=b"ok").content == b"ok"


def test_an_answer_later_than_the_timeout_fails_and_drops_the_connection(server: str) -> None:
    with FastClient(server, timeout=0.3) as client:
        with pytest.raises(TransportError) as info:
            client.post("/stall", content=b"")
        assert isinstance(info.value.__cause__, TimeoutError)
        assert client._idle == []


def test_a_closed_client_refuses_new_requests(server: str) -> None:
    client = FastClient(server, timeout=5)
    client.post("/echo", content=b"x")
    client.close()
    with pytest.raises(TransportError, match="closed"):
        client.post("/echo", content=b"x")


def test_threads_share_one_client(server: str) -> None:
    results: list[HttpResponse] = []
    with FastClient(server, timeout=10, max_connections=3) as client:

        def work(i: int) -> None:
            results.append(client.post("/echo", content=str(i).encode()))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(client._idle) <= 3  # never more connections than allowed
    assert sorted(int(r.content) for r in results) == list(range(12))


def test_a_base_path_and_a_bad_url(server: str) -> None:
    with FastClient(server + "/", timeout=5) as client:
        assert client.post("/echo", content=b"a").content == b"a"
    with pytest.raises(ValueError, match="not an http"):
        FastClient("ftp://example.org", timeout=1)


# ------------------------------------------------------------------ async client

Loop = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Loop:
    """Run a coroutine on the standard event loop and on uvloop (what the servers use)."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


def test_async_large_body_and_keep_alive(server: str, run: Loop) -> None:
    body = os.urandom(1024 * 1024 + 7)

    async def main() -> tuple[HttpResponse, HttpResponse]:
        client = FastAsyncClient(server, timeout=10)
        try:
            first = await client.post("/echo", content=body, headers={"content-type": "application/x-test"})
            second = await client.post("/echo", content=b"again")
            return first, second
        finally:
            await client.aclose()

    first, second = run(main())
    assert first.content == body and first.headers["x-type"] == "application/x-test"
    assert second.content == b"again"
    assert second.headers["x-connection"] == first.headers["x-connection"]


def test_async_failures(server: str, run: Loop) -> None:
    async def main() -> dict[str, TransportError]:
        failures: dict[str, TransportError] = {}
        refused = FastAsyncClient(f"http://127.0.0.1:{_free_port()}", timeout=2)
        try:
            await refused.post("/echo", content=b"x")
        except TransportError as exc:
            failures["refused"] = exc
        client = FastAsyncClient(server, timeout=0.3)
        for path in ("/garbage", "/cut", "/stall"):
            try:
                await client.post(path, content=b"x")
            except TransportError as exc:
                failures[path] = exc
        assert client._idle == []
        client.timeout = 5
        assert (await client.post("/echo", content=b"fine")).content == b"fine"
        await client.aclose()
        return failures

    failures = run(main())
    assert failures["refused"].not_sent is True
    assert isinstance(failures["refused"].__cause__, ConnectionRefusedError)
    assert all(failures[p].not_sent is False for p in ("/garbage", "/cut", "/stall"))
    assert isinstance(failures["/stall"].__cause__, TimeoutError)


def test_async_cancelled_exchange_closes_its_connection(server: str, run: Loop) -> None:
    async def main() -> tuple[bytes, str, str]:
        client = FastAsyncClient(server, timeout=10)
        before = await client.post("/echo", content=b"1")
        task = asyncio.create_task(client.post("/stall", content=b""))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The late answer to /stall must not be read as this request's answer.
        after = await client.post("/echo", content=b"2")
        await client.aclose()
        return after.content, before.headers["x-connection"], after.headers["x-connection"]

    content, before, after = run(main())
    assert content == b"2"
    assert before != after


def test_async_concurrent_requests_respect_the_connection_limit(server: str, run: Loop) -> None:
    async def main() -> tuple[list[bytes], int]:
        client = FastAsyncClient(server, timeout=10, max_connections=2)
        answers = await asyncio.gather(*(client.post("/echo", content=str(i).encode()) for i in range(10)))
        kept = len(client._idle)
        await client.aclose()
        return [a.content for a in answers], kept

    contents, kept = run(main())
    assert contents == [str(i).encode() for i in range(10)]
    assert kept <= 2
