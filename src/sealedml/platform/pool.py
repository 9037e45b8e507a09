"""One function's pool of runtime instances: queueing, routing, scaling, keep-alive.

Every request joins a bounded FIFO queue; a dispatcher asks the pool's
:mod:`routing policy <sealedml.platform.policies>` what to do with each
waiting request whenever something changes (arrival, completion, an instance
ready or gone). So a burst never gets "All Busy": it queues, scales out up to
``max_instances`` (queue pressure), and a request that cannot get a slot within
``queue_timeout`` — or finds the queue full — gets 429 with ``Retry-After``.
An instance that crashes fails only its in-flight requests (503, naming the
instance); it is removed and queued requests start a replacement. Instances
idle for ``keep_alive`` seconds are stopped (scale to zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sealedml._internal.http import MODELS_HEADER, PEAK_BYTES_HEADER, SERVER_TIMING_HEADER, parse_server_timing
from sealedml.errors import Overloaded, ServiceUnavailable
from sealedml.platform.base import Invocation, PlatformResult
from sealedml.platform.metering import FunctionMeter
from sealedml.platform.policies import (
    InstanceState,
    ModelStats,
    PoolState,
    Route,
    RoutingPolicy,
    StartInstance,
)
from sealedml.platform.process import InstanceNotRunning, WorkerProcess

__all__ = ["InstancePool", "PoolConfig"]

log = logging.getLogger(__name__)

_LOAD_PHASES = ("release", "fetch", "decrypt", "session")


@dataclass(frozen=True)
class PoolConfig:
    """Limits of one function's pool (OpenWhisk-style action limits).

    Attributes:
        memory_mb: memory limit per instance (billing unit; sizes the model cache).
        concurrency: requests one instance serves at once.
        max_instances: most instances at once.
        keep_alive: idle seconds before an instance is stopped.
        queue_limit: most requests waiting.
        queue_timeout: longest wait for a slot, seconds.
    """

    memory_mb: int = 1024
    concurrency: int = 2
    max_instances: int = 2
    keep_alive: float = 60.0
    queue_limit: int = 512
    queue_timeout: float = 60.0


@dataclass
class _Waiter:
    model_id: str
    future: asyncio.Future[tuple[_Instance, bool]]
    enqueued: float
    start_requested: bool = False


@dataclass
class _Instance:
    process: WorkerProcess
    models: set[str] = field(default_factory=set)
    claimant: str | None = None
    claimant_idle_since: float | None = None
    by_model: dict[str, int] = field(default_factory=dict)
    last_used: float = field(default_factory=time.time)
    fresh: bool = True  # no request served yet: its first request is the cold one

    @property
    def instance_id(self) -> str:
        return self.process.instance_id

    @property
    def in_flight(self) -> int:
        return sum(self.by_model.values())


@dataclass
class _ModelClock:
    exec_s: float = 0.05
    load_s: float = 0.5
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=16))


def _ewma(old: float, new: float, alpha: float = 0.3) -> float:
    return (1 - alpha) * old + alpha * new


class InstancePool:
    """The instances, queue and policy of one function.

    Args:
        name: the function name (metrics label).
        config: limits.
        policy: routing policy.
        meter: billing/latency bookkeeping.
        start_instance: coroutine returning a started instance (warm pool or spawn).
    """

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        policy: RoutingPolicy,
        meter: FunctionMeter,
        start_instance: Callable[[], Awaitable[tuple[WorkerProcess, bool]]],
    ) -> None:
        self.name = name
        self.config = config
        self.policy = policy
        self.meter = meter
        self._start_instance = start_instance
        self._instances: list[_Instance] = []
        self._starting = 0
        self._queue: deque[_Waiter] = deque()
        self._models: dict[str, _ModelClock] = {}
        self._start_s = 1.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ------------------------------------------------------------------ state for policies
    def _model(self, model_id: str) -> _ModelClock:
        return self._models.setdefault(model_id, _ModelClock())

    def _snapshot(self, now: float) -> PoolState:
        queued: dict[str, int] = {}
        for w in self._queue:
            queued[w.model_id] = queued.get(w.model_id, 0) + 1
        in_flight: dict[str, int] = {}
        for inst in self._instances:
            for m, n in inst.by_model.items():
                in_flight[m] = in_flight.get(m, 0) + n
        models = {}
        for model_id, clock in self._models.items():
            recent = [t for t in clock.arrivals if now - t <= 2.0]
            models[model_id] = ModelStats(
                exec_s=clock.exec_s,
                load_s=clock.load_s,
                in_flight=in_flight.get(model_id, 0),
                queued=queued.get(model_id, 0),
                bursty=len(recent) >= 3,
            )
        instances = tuple(
            InstanceState(
                instance_id=i.instance_id,
                capacity=self.config.concurrency,
                in_flight=i.in_flight,
                models=frozenset(i.models),
                claimant=i.claimant,
                claimant_idle_since=i.claimant_idle_since,
                started=not i.process.dead,
            )
            for i in self._instances
        )
        return PoolState(
            now=now,
            instances=instances,
            max_instances=self.config.max_instances,
            starting=self._starting,
            models=models,
            start_s=self._start_s,
        )

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        """Decide for every queued request, in arrival order (runs on the event loop, no awaits).

        The snapshot is rebuilt only after a decision that changes state (a
        route or a start); until then every other waiter of a model that was
        told to wait would get the same answer, so it is skipped. A pass is
        therefore O(queue + changes × instances), not O(queue²).
        """
        if self._closed or not self._queue:
            return  # nothing to decide: no snapshot to build (the path of every completed request)
        now = time.time()
        snapshot = self._snapshot(now)
        waiting_models: set[str] = set()
        for waiter in list(self._queue):
            if waiter.future.done():
                self._queue.remove(waiter)
                continue
            if waiter.model_id in waiting_models:
                continue
            decision = self.policy.decide(waiter.model_id, snapshot)
            if isinstance(decision, Route):
                inst = next((i for i in self._instances if i.instance_id == decision.instance_id), None)
                if inst is None or inst.process.dead or inst.in_flight >= self.config.concurrency:
                    waiting_models.add(waiter.model_id)  # stale slot; decide again on the next change
                    continue
                self._queue.remove(waiter)
                self._assign(inst, waiter.model_id, decision.claim, now)
                cold = inst.fresh
                inst.fresh = False
                waiter.future.set_result((inst, cold or waiter.start_requested))
                snapshot = self._snapshot(now)
                waiting_models.clear()
            elif isinstance(decision, StartInstance) and not waiter.start_requested:
                waiter.start_requested = True
                self._starting += 1
                self._spawn()
                snapshot = self._snapshot(now)
                waiting_models.clear()
            else:
                waiting_models.add(waiter.model_id)

    def _assign(self, inst: _Instance, model_id: str, claim: bool, now: float) -> None:
        if inst.in_flight == 0:
            self.meter.busy_changed(inst.instance_id, True, now)
        inst.by_model[model_id] = inst.by_model.get(model_id, 0) + 1
        if claim:
            inst.claimant = model_id
        if inst.claimant == model_id:
            inst.claimant_idle_since = None
        inst.models.add(model_id)  # it will hold the model once this request loads it

    def _unassign(self, inst: _Instance, model_id: str, now: float) -> None:
        left = inst.by_model.get(model_id, 0) - 1
        if left > 0:
            inst.by_model[model_id] = left
        else:
            inst.by_model.pop(model_id, None)
            if inst.claimant == model_id:
                inst.claimant_idle_since = now
        inst.last_used = now
        if inst.in_flight == 0:
            self.meter.busy_changed(inst.instance_id, False, now)

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._start_one())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_one(self) -> None:
        t0 = time.perf_counter()
        try:
            process, from_warm_pool = await self._start_instance()
        except Exception as exc:
            self._starting -= 1
            log.warning("pool %s: instance start failed: %s", self.name, exc)
            # Fail the oldest request that asked for this start rather than loop on a broken spawn.
            for waiter in self._queue:
                if waiter.start_requested and not waiter.future.done():
                    waiter.future.set_exception(ServiceUnavailable(f"instance start failed: {exc}"))
                    break
            self._dispatch()
            return
        self._starting -= 1
        if self._closed:
            await process.stop()
            return
        self._start_s = _ewma(self._start_s, time.perf_counter() - t0)
        inst = _Instance(process)
        self._instances.append(inst)
        self.meter.instance_started(inst.instance_id)
        self.meter.starts.append(
            {
                "instance": inst.instance_id,
                "spawn_s": round(process.spawn_s, 4),
                "warm_pool": from_warm_pool,
                "ready_s": round(time.perf_counter() - t0, 4),
            }
        )
        self._dispatch()

    # ------------------------------------------------------------------ invoke
    async def invoke(self, invocation: Invocation) -> PlatformResult:
        """Queue, route, call, account (see the module docstring).

        A request routed to an instance that died before the request was sent
        goes back to the queue (at most twice): only requests actually in
        flight on a crashed instance fail.
        """
        for attempt in range(3):
            try:
                return await self._invoke_once(invocation)
            except InstanceNotRunning:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _invoke_once(self, invocation: Invocation) -> PlatformResult:
        if len(self._queue) >= self.config.queue_limit:
            self.meter.request_rejected()
            raise Overloaded(f"function {self.name}: queue full", retry_after=max(1.0, self._start_s))
        t0 = time.perf_counter()
        now = time.time()
        self._model(invocation.model_id).arrivals.append(now)
        waiter = _Waiter(invocation.model_id, asyncio.get_running_loop().create_future(), now)
        self._queue.append(waiter)
        self._dispatch()
        try:
            if waiter.future.done():  # routed at once (a free slot): no timer, no loop iteration
                inst, cold = waiter.future.result()
            else:
                inst, cold = await asyncio.wait_for(asyncio.shield(waiter.future), timeout=self.config.queue_timeout)
        except TimeoutError:
            if waiter in self._queue:
                self._queue.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                inst, cold = waiter.future.result()  # routed at the last moment: give the slot back
                self._unassign(inst, invocation.model_id, time.time())
                self._dispatch()
            self.meter.request_rejected()
            raise Overloaded(
                f"function {self.name}: no instance free within {self.config.queue_timeout:.0f}s",
                retry_after=max(1.0, self._model(invocation.model_id).exec_s * len(self._queue)),
            ) from None
        except BaseException:
            if waiter in self._queue:
                self._queue.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                inst, _ = waiter.future.result()
                self._unassign(inst, invocation.model_id, time.time())
                self._dispatch()
            raise
        t_routed = time.perf_counter()
        ok = False
        phases: dict[str, float] = {}
        try:
            response = await inst.process.call(invocation.path, invocation.body)
            ok = response.status_code < 500
            phases = parse_server_timing(response.headers.get(SERVER_TIMING_HEADER))
            held = response.headers.get(MODELS_HEADER)
            if held is not None:
                inst.models = {m for m in held.split(",") if m}
        except ServiceUnavailable:
            await self._instance_failed(inst)
            raise
        finally:
            self._unassign(inst, invocation.model_id, time.time())
            total = time.perf_counter() - t0
            loaded = any(p in phases for p in ("decrypt", "session"))
            self._learn(invocation.model_id, phases, time.perf_counter() - t_routed)
            self.meter.request_done(
                queue_s=t_routed - t0, total_s=total, cold=cold, phases=phases, ok=ok, loaded_model=loaded
            )
            self._dispatch()
        return PlatformResult(
            status=response.status_code,
            body=response.content,
            content_type=response.headers.get("content-type", "application/json"),
            cold_start=cold,
            instance_id=inst.instance_id,
            queue_s=t_routed - t0,
            total_s=total,
            server_timing=response.headers.get(SERVER_TIMING_HEADER, ""),
            peak_bytes=_peak_bytes(response.headers.get(PEAK_BYTES_HEADER)),
        )

    def _learn(self, model_id: str, phases: dict[str, float], call_s: float) -> None:
        # Service time as the pool sees it (transfer + decrypt + compute), without loads.
        clock = self._model(model_id)
        load = sum(phases.get(p, 0.0) for p in _LOAD_PHASES)
        if "decrypt" in phases or "session" in phases:
            clock.load_s = _ewma(clock.load_s, load)
        if "compute" in phases:
            clock.exec_s = _ewma(clock.exec_s, max(phases["compute"], call_s - load))

    async def _instance_failed(self, inst: _Instance) -> None:
        if inst in self._instances:
            self._instances.remove(inst)
            self.meter.instance_stopped(inst.instance_id)
            log.warning("pool %s: instance %s failed; it will be replaced on demand", self.name, inst.instance_id)
            task = asyncio.get_running_loop().create_task(inst.process.stop(grace=1.0))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ keep-alive, shutdown
    async def reap(self, now: float | None = None) -> int:
        """Stop instances idle past the keep-alive window, and dead ones; return how many."""
        now = time.time() if now is None else now
        victims = [
            i
            for i in self._instances
            if (i.in_flight == 0 and now - i.last_used > self.config.keep_alive) or not i.process.alive()
        ]
        for inst in victims:
            self._instances.remove(inst)
            self.meter.instance_stopped(inst.instance_id, now)
        await asyncio.gather(*(i.process.stop() for i in victims), return_exceptions=True)
        if victims:
            self._dispatch()
        return len(victims)

    async def stop(self) -> None:
        """Stop all instances; fail whatever is still queued."""
        self._closed = True
        for waiter in self._queue:
            if not waiter.future.done():
                waiter.future.set_exception(ServiceUnavailable("platform shutting down"))
        self._queue.clear()
        instances, self._instances = self._instances, []
        for inst in instances:
            self.meter.instance_stopped(inst.instance_id)
        await asyncio.gather(*(i.process.stop() for i in instances), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def stats(self) -> dict[str, Any]:
        return {
            **self.meter.summary(),
            "policy": self.policy.name,
            "max_instances": self.config.max_instances,
            "concurrency": self.config.concurrency,
            "memory_mb": self.config.memory_mb,
            "keep_alive_s": self.config.keep_alive,
            "queued": len(self._queue),
            "starting": self._starting,
            "instances": [
                {
                    "id": i.instance_id,
                    "pid": i.process.pid,
                    "url": i.process.url,  # its /livez, /readyz and /metrics, for the operator
                    "in_flight": i.in_flight,
                    "models": sorted(i.models),
                    "claimant": i.claimant,
                    "spawn_s": round(i.process.spawn_s, 4),
                }
                for i in self._instances
            ],
        }


def _peak_bytes(header: str | None) -> int | None:
    """An instance's tracked peak (a hint it reports, passed on as is), or None."""
    return int(header) if header is not None and header.isdigit() else None
