"""Metering the way serverless platforms bill, plus Prometheus metrics.

* **GB-seconds (allocated)**: memory limit × instance lifetime, from process
  start to stop — what OpenWhisk/Lambda-style platforms bill for a warm instance.
* **GB-seconds (busy)**: memory limit × time with at least one request running.
* cold starts, queue wait, and per-phase latency (``Server-Timing`` reported
  by instances: attest, release, fetch, decrypt, session, compute).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["FunctionMeter", "Metrics"]

#: Instance starts kept for ``summary`` (``/v1/stats``).
_RECENT_STARTS = 20
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The platform's Prometheus registry (one per platform, not the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "sealedml_invocations",
            "Invocations by function and outcome",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "sealedml_cold_starts", "Invocations that waited for a new instance", ["function"], registry=self.registry
        )
        self.instances = Gauge("sealedml_instances", "Running instances", ["function"], registry=self.registry)
        self.queue_wait = Histogram(
            "sealedml_queue_wait_seconds",
            "Time waiting for an instance slot",
            ["function"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "sealedml_request_seconds",
            "End-to-end time in the platform",
            ["function"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.phase = Histogram(
            "sealedml_phase_seconds",
            "Per-phase time reported by instances",
            ["function", "phase"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.gb_seconds = Gauge(
            "sealedml_gb_seconds", "Billed GB-seconds (allocated or busy)", ["function", "kind"], registry=self.registry
        )
        self.model_loads = Counter(
            "sealedml_model_loads", "Models loaded into instances", ["function"], registry=self.registry
        )


@dataclass
class _InstanceClock:
    started: float
    busy_since: float | None = None
    busy_s: float = 0.0


@dataclass
class FunctionMeter:
    """Billing and latency bookkeeping of one function (pool)."""

    function: str
    memory_gb: float
    metrics: Metrics
    allocated_gb_s_closed: float = 0.0
    busy_gb_s_closed: float = 0.0
    cold_starts: int = 0
    model_loads: int = 0
    invocations: int = 0
    failures: int = 0
    rejected: int = 0
    #: The latest instance starts (``summary`` shows them); distributions live in the histograms only,
    #: so a long-running gateway keeps no per-request state.
    starts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_RECENT_STARTS))
    _clocks: dict[str, _InstanceClock] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Prometheus children by label, looked up once: ``labels()`` takes a lock and a dict per call.
    _children: dict[tuple[object, ...], Any] = field(default_factory=dict)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.function, *labels)
        return child

    # instance lifecycle -------------------------------------------------------------
    def instance_started(self, instance_id: str, now: float | None = None) -> None:
        with self._lock:
            self._clocks[instance_id] = _InstanceClock(started=now if now is not None else time.time())
            self.metrics.instances.labels(self.function).set(len(self._clocks))

    def instance_stopped(self, instance_id: str, now: float | None = None) -> None:
        now = now if now is not None else time.time()
        with self._lock:
            clock = self._clocks.pop(instance_id, None)
            if clock is None:
                return
            if clock.busy_since is not None:
                clock.busy_s += now - clock.busy_since
            self.allocated_gb_s_closed += (now - clock.started) * self.memory_gb
            self.busy_gb_s_closed += clock.busy_s * self.memory_gb
            self.metrics.instances.labels(self.function).set(len(self._clocks))

    def busy_changed(self, instance_id: str, busy: bool, now: float | None = None) -> None:
        now = now if now is not None else time.time()
        with self._lock:
            clock = self._clocks.get(instance_id)
            if clock is None:
                return
            if busy and clock.busy_since is None:
                clock.busy_since = now
            elif not busy and clock.busy_since is not None:
                clock.busy_s += now - clock.busy_since
                clock.busy_since = None

    # requests ----------------------------------------------------------------------
    def request_done(
        self, *, queue_s: float, total_s: float, cold: bool, phases: dict[str, float], ok: bool, loaded_model: bool
    ) -> None:
        with self._lock:
            self.invocations += 1
            if cold:
                self.cold_starts += 1
            if loaded_model:
                self.model_loads += 1
            if not ok:
                self.failures += 1
        if cold:
            self._child(self.metrics.cold_starts).inc()
        if loaded_model:
            self._child(self.metrics.model_loads).inc()
        for name, seconds in phases.items():
            self._child(self.metrics.phase, name).observe(seconds)
        self._child(self.metrics.invocations, "ok" if ok else "error").inc()
        self._child(self.metrics.queue_wait).observe(queue_s)
        self._child(self.metrics.latency).observe(total_s)

    def request_rejected(self) -> None:
        with self._lock:
            self.rejected += 1
        self.metrics.invocations.labels(self.function, "rejected").inc()

    # billing -----------------------------------------------------------------------
    def gb_seconds(self, now: float | None = None) -> tuple[float, float]:
        """(allocated, busy) GB-seconds so far, live instances included up to ``now``."""
        now = now if now is not None else time.time()
        with self._lock:
            allocated, busy = self.allocated_gb_s_closed, self.busy_gb_s_closed
            for clock in self._clocks.values():
                allocated += (now - clock.started) * self.memory_gb
                running = clock.busy_s + ((now - clock.busy_since) if clock.busy_since is not None else 0.0)
                busy += running * self.memory_gb
        self.metrics.gb_seconds.labels(self.function, "allocated").set(allocated)
        self.metrics.gb_seconds.labels(self.function, "busy").set(busy)
        return allocated, busy

    def summary(self) -> dict[str, Any]:
        allocated, busy = self.gb_seconds()
        with self._lock:
            return {
                "function": self.function,
                "memory_gb": self.memory_gb,
                "gb_seconds": round(allocated, 3),
                "busy_gb_seconds": round(busy, 3),
                "invocations": self.invocations,
                "failures": self.failures,
                "rejected": self.rejected,
                "cold_starts": self.cold_starts,
                "model_loads": self.model_loads,
                "starts": list(self.starts),
            }
