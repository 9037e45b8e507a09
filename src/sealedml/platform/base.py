"""The platform plug-in point: where runtime instances live.

A :class:`Platform` turns "invoke function F with this body" into a call on a
runtime instance, starting instances on demand. The gateway (HTTP) knows only
this interface; the embedded :class:`~sealedml.platform.local.LocalPlatform`
implements it, with per-function pools, FnPacker-style routing policies, a warm
pool and metering. (The Ray Serve engine, ``platform/ray_engine.py``, is a
separate gateway of its own, not a ``Platform``.)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

__all__ = ["Invocation", "Platform", "PlatformResult"]


@dataclass(frozen=True)
class Invocation:
    """One call routed by the platform.

    Attributes:
        model_id: which model the (encrypted) request is for — visible metadata.
        path: the instance path to call (``/run`` or a benchmark path).
        body: the bytes to send.
    """

    model_id: str
    path: str
    body: bytes


@dataclass(frozen=True)
class PlatformResult:
    """An instance's answer plus what the platform measured.

    ``server_timing`` and ``peak_bytes`` are what the instance reported (hints,
    passed on to the client as they are); ``peak_bytes`` is None for
    whole-model runs.
    """

    status: int
    body: bytes
    content_type: str
    cold_start: bool
    instance_id: str
    queue_s: float
    total_s: float
    server_timing: str = ""
    peak_bytes: int | None = None


class Platform(abc.ABC):
    """Runs invocations on runtime instances."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start background tasks (keep-alive reaper, warm pool)."""

    @abc.abstractmethod
    async def invoke(self, invocation: Invocation) -> PlatformResult:
        """Run one invocation, starting an instance if none can take it.

        Raises:
            Overloaded: the queue is full or the wait timed out (HTTP 429).
            ServiceUnavailable: an instance failed while serving the invocation.
        """

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters and instance list (ids and numbers only)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every instance."""

    def metrics_text(self) -> bytes:
        """Prometheus exposition text (empty if the platform has no metrics)."""
        registry = getattr(self, "metrics", None)
        if registry is None:
            return b""
        from prometheus_client import generate_latest

        self.stats()  # refresh gauges computed on demand (GB-seconds)
        return bytes(generate_latest(registry.registry))
