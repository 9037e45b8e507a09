"""httpx clients with TCP_NODELAY.

httpcore writes request headers and body separately; without TCP_NODELAY the
body can wait for a delayed ACK (~40 ms on Linux) on every keep-alive request.

A client for an ``http://`` base URL gets no TLS context: httpx would otherwise
load the whole CA bundle (~40 ms) for each client it creates — on the cold-start
path of every instance — for a context it never uses (every call is relative to
the base URL).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import httpx

__all__ = ["async_client", "sync_client"]

_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _tls(base_url: str, verify: ssl.SSLContext | bool) -> ssl.SSLContext | bool:
    """No TLS context for a plain-HTTP base URL (see the module docstring)."""
    return False if base_url.startswith("http://") and verify is True else verify


def sync_client(base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, **kwargs: Any) -> httpx.Client:
    """A blocking client with TCP_NODELAY (``verify``: an SSL context, e.g. pinned to an attested RA-TLS cert)."""
    limits = kwargs.pop("limits", httpx.Limits(max_connections=64, max_keepalive_connections=64))
    transport = httpx.HTTPTransport(socket_options=_NODELAY, limits=limits, verify=_tls(base_url, verify))
    return httpx.Client(base_url=base_url, timeout=timeout, transport=transport, **kwargs)


def async_client(
    base_url: str, *, timeout: float, verify: ssl.SSLContext | bool = True, **kwargs: Any
) -> httpx.AsyncClient:
    """An asyncio client with TCP_NODELAY (``verify`` as for :func:`sync_client`)."""
    limits = kwargs.pop("limits", httpx.Limits(max_connections=256, max_keepalive_connections=64))
    transport = httpx.AsyncHTTPTransport(socket_options=_NODELAY, limits=limits, verify=_tls(base_url, verify))
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport, **kwargs)
