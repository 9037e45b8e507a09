"""Run an ASGI app on loopback with uvicorn and announce where it listens.

``--port 0`` binds a free port; the process then prints one JSON line
``{"event": "listening", "url": ...}`` on stdout so a parent (the demo, the
platform spawning workers, tests) learns the address without racing for ports.

With a :class:`~sealedml.attestation.ratls.RotatingRaTlsCertificate` the
server re-issues its RA-TLS certificate every ``rotate_every`` seconds and
installs it into the live ``SSLContext``, so the evidence new clients see stays
fresh however long the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from typing import Any

import uvicorn

from sealedml._internal.malloc import tune_for_large_buffers
from sealedml.attestation.ratls import RotatingRaTlsCertificate

__all__ = ["JsonLogFormatter", "bind", "configure_logging", "serve_app"]

log = logging.getLogger(__name__)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``pid``, ``msg`` and, for an exception, ``exc``.

    Messages are escaped by ``json.dumps``, so a quote or a newline in one (an ONNX Runtime
    error, a path) cannot break the line for a log shipper.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,  # instances log into their platform's stream
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr (never secrets: callers log ids, not data); uvicorn's loggers go through it too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


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


def _write_private(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _install_pair(context: ssl.SSLContext, directory: str, cert_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate and key into a live server context.

    ``load_cert_chain`` only reads files: they are written into ``directory``
    (private, 0700) as new 0600 files and removed right after. Connections
    accepted from now on present the new certificate (OpenSSL copies the
    certificate into each connection when it is created); established ones
    keep theirs. The key is the same one, so cert and key never mismatch.
    """
    tag = secrets.token_hex(8)
    cert_path = key_path = ""
    try:
        cert_path = _write_private(directory, f"cert-{tag}.pem", cert_pem)
        key_path = _write_private(directory, f"key-{tag}.pem", key_pem)
        context.load_cert_chain(cert_path, key_path)
    finally:
        _remove(*(path for path in (cert_path, key_path) if path))


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM or SIGINT ends ``run()`` by returning.

    After a graceful shutdown uvicorn raises the captured signal again with its
    default handler, which kills the process on the spot: no ``finally``, no
    ``atexit``. A runtime's private working directory and the RA-TLS key
    directory were left behind by every stopped instance that way. Returning
    instead lets them be removed; the exit status is 0 (a requested stop).
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


class _RotatingServer(_Server):
    """A uvicorn server that re-issues its RA-TLS certificate every ``rotate_every`` seconds."""

    def __init__(self, config: uvicorn.Config, identity: RotatingRaTlsCertificate, directory: str) -> None:
        super().__init__(config)
        self._identity = identity
        self._directory = directory
        self._rotation: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Rotate from before the app's lifespan startup (loading models may take long):
        # the first connection accepted must not get a certificate that went stale meanwhile.
        self._rotation = asyncio.create_task(self._rotate(), name="sealedml-ratls-rotation")
        try:
            await super().startup(sockets=sockets)
        except BaseException:
            await self._stop_rotation()
            raise

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._stop_rotation()
        await super().shutdown(sockets=sockets)

    async def _stop_rotation(self) -> None:
        rotation, self._rotation = self._rotation, None
        if rotation is not None:
            rotation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rotation

    async def _rotate(self) -> None:
        identity = self._identity
        age = (datetime.now(UTC) - identity.issued_at).total_seconds()
        delay = min(max(identity.rotate_every - age, 0.0), identity.rotate_every)
        while True:
            await asyncio.sleep(delay)
            delay = identity.rotate_every  # after a failure too: retry at the next period
            try:
                # Evidence may take long on real hardware: issue in a thread ...
                cert_pem, key_pem = await asyncio.to_thread(identity.issue)
                context = self.config.ssl
                if context is None:
                    raise RuntimeError("the server has no TLS context")
                # ... but install on the event-loop thread, where uvicorn creates every
                # TLS connection: no handshake starts while the context is changing.
                _install_pair(context, self._directory, cert_pem, key_pem)
            except Exception as exc:
                # Never log the key: the type and message of the failure only.
                log.error(
                    "RA-TLS certificate rotation failed (%s: %s); retrying in %g s",
                    type(exc).__name__,
                    exc,
                    delay,
                )


def serve_app(
    app: Any,
    host: str,
    port: int,
    *,
    announce: dict[str, Any] | None = None,
    log_level: str = "warning",
    sock: socket.socket | None = None,
    tls: tuple[bytes, bytes] | RotatingRaTlsCertificate | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; print the listening line first.

    Args:
        app: the ASGI app.
        host: address to bind (ignored with ``sock``).
        port: port to bind, 0 for any free port (ignored with ``sock``).
        announce: extra fields for the listening line.
        log_level: uvicorn's log level.
        sock: an already bound listening socket.
        tls: HTTPS with a fixed ``(certificate PEM, key PEM)`` pair, or with a
            :class:`~sealedml.attestation.ratls.RotatingRaTlsCertificate`
            whose certificate is re-issued (in a worker thread) and installed
            into the live ``SSLContext`` (on the event-loop thread) every
            ``rotate_every`` seconds; a failed rotation is logged and retried
            at the next period. Key files exist only while OpenSSL reads them,
            in a private temporary directory removed at exit.
    """
    tune_for_large_buffers()  # every request moves large buffers: keep them off fresh mmap pages
    sock = sock or bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if tls is not None else "http"
    rotating: RotatingRaTlsCertificate | None = None
    pair: tuple[bytes, bytes] | None = None
    if isinstance(tls, RotatingRaTlsCertificate):
        rotating, pair = tls, tls.current
    else:
        pair = tls
    print(json.dumps({"event": "listening", "url": f"{scheme}://{shown}:{actual}", **(announce or {})}), flush=True)
    if pair is None:  # plain HTTP: no key files, no temporary directory
        _Server(_config(app, log_level, {})).run(sockets=[sock])
        return
    with tempfile.TemporaryDirectory(prefix="sealedml-tls-") as directory:
        os.chmod(directory, 0o700)
        paths = (_write_private(directory, "cert.pem", pair[0]), _write_private(directory, "key.pem", pair[1]))

        def context_factory(_config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            # uvicorn's own context (it sets ALPN for its protocol), then no key file left on disk.
            try:
                context = default()
            finally:
                _remove(*paths)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            return context

        ssl_args = {"ssl_certfile": paths[0], "ssl_keyfile": paths[1], "ssl_context_factory": context_factory}
        config = _config(app, log_level, ssl_args)
        server = _Server(config) if rotating is None else _RotatingServer(config, rotating, directory)
        server.run(sockets=[sock])


def _config(app: Any, log_level: str, ssl_args: dict[str, Any]) -> uvicorn.Config:
    # log_config=None: uvicorn installs no plain-text handlers of its own; its records reach ours (JSON).
    return uvicorn.Config(
        app, log_level=log_level, log_config=None, access_log=False, lifespan="on", timeout_keep_alive=30, **ssl_args
    )
