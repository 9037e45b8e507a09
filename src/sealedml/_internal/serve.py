"""Run an ASGI app on loopback with uvicorn and announce where it listens.

``--port 0`` binds a free port; the process then prints one JSON line
``{"event": "listening", "url": ...}`` on stdout so a parent (the demo, the
platform spawning workers, tests) learns the address without racing for ports.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
from typing import Any

import uvicorn

__all__ = ["bind", "configure_logging", "serve_app"]


def configure_logging(level: str = "INFO") -> None:
    """Structured-ish single-line logs on stderr (never secrets: callers log ids, not data)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
        stream=sys.stderr,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0 = any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only then,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_app(
    app: Any,
    host: str,
    port: int,
    *,
    announce: dict[str, Any] | None = None,
    log_level: str = "warning",
    sock: socket.socket | None = None,
    tls: tuple[bytes, bytes] | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; print the listening line first.

    ``tls`` is a (certificate PEM, key PEM) pair — an RA-TLS certificate for
    ``--tls ra``; the files uvicorn loads them from live in a private temporary
    directory removed at exit.
    """
    sock = sock or bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if tls else "http"
    with tempfile.TemporaryDirectory(prefix="sealedml-tls-") as directory:
        ssl_args: dict[str, Any] = {}
        if tls is not None:
            os.chmod(directory, 0o700)
            for name, data in (("cert.pem", tls[0]), ("key.pem", tls[1])):
                fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            ssl_args = {
                "ssl_certfile": os.path.join(directory, "cert.pem"),
                "ssl_keyfile": os.path.join(directory, "key.pem"),
            }
        print(json.dumps({"event": "listening", "url": f"{scheme}://{shown}:{actual}", **(announce or {})}), flush=True)
        config = uvicorn.Config(
            app, log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30, **ssl_args
        )
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
