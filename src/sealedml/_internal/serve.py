"""Run an ASGI app on loopback with uvicorn and announce where it listens.

``--port 0`` binds a free port; the process then prints one JSON line
``{"event": "listening", "url": ...}`` on stdout so a parent (the demo, the
platform spawning workers, tests) learns the address without racing for ports.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
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


def serve_app(app: Any, host: str, port: int, *, announce: dict[str, Any] | None = None,
              log_level: str = "warning", sock: socket.socket | None = None) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; print the listening line first."""
    sock = sock or bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(json.dumps({"event": "listening", "url": f"http://{shown}:{actual}", **(announce or {})}), flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
