"""The embedded platform: runtime instances as processes on this machine.

Functions map to pools (:mod:`sealedml.platform.pool`): with the ``per-model``
policy every model is its own function; with a packing policy (``sesemi``,
``sealedml``) one pool — one endpoint — serves every model (FnPacker). A warm
pool of pre-started spare processes takes process spawn and imports off a
cold start; with or without one, instances fork from a pre-imported template
(:mod:`sealedml.platform.template`), so a cold start skips the imports. A
background task stops idle instances (scale to zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from typing import Any

from sealedml.platform.base import Invocation, Platform, PlatformResult
from sealedml.platform.executor_process import ExecutorSupervisor
from sealedml.platform.metering import FunctionMeter, Metrics
from sealedml.platform.policies import RoutingPolicy, policy_by_name
from sealedml.platform.pool import InstancePool, PoolConfig
from sealedml.platform.process import InstanceSpec, WorkerProcess
from sealedml.platform.template import warm_up

__all__ = ["LocalPlatform", "PoolConfig", "WarmPool"]

log = logging.getLogger(__name__)

DEFAULT_FUNCTION = "default"


class WarmPool:
    """Spare, already-started runtime processes (OpenWhisk "prewarm" containers).

    A spare has started, imported everything and answered ``/init``; it holds
    no model and no key. Taking one replaces it in the background, ``refill_delay``
    seconds later: started at once, the replacement would compete for the cores
    with the very request that took the spare (its model load and first run).
    """

    def __init__(self, spec: InstanceSpec, size: int, *, refill_delay: float = 0.5) -> None:
        self.spec = spec
        self.size = size
        self.refill_delay = refill_delay
        self._ready: deque[WorkerProcess] = deque()
        self._filling = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _refill(self) -> None:
        while not self._closed and len(self._ready) + self._filling < self.size:
            self._filling += 1
            task = asyncio.get_running_loop().create_task(self._fill_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fill_one(self) -> None:
        proc = WorkerProcess(self.spec)
        try:
            await proc.start()
        except Exception as exc:
            log.warning("warm pool: spare failed to start: %s", exc)
            return
        finally:
            self._filling -= 1
        if self._closed:
            await proc.stop()
        else:
            self._ready.append(proc)

    async def start(self) -> None:
        self._refill()

    def take(self) -> WorkerProcess | None:
        """A ready spare (and start its replacement), or None."""
        while self._ready:
            proc = self._ready.popleft()
            if proc.alive():
                asyncio.get_running_loop().call_later(self.refill_delay, self._refill)
                return proc
        self._refill()
        return None

    @property
    def ready(self) -> int:
        return len(self._ready)

    async def stop(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        spares, self._ready = list(self._ready), deque()
        await asyncio.gather(*(p.stop() for p in spares), return_exceptions=True)


def _succeeded(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _log_template_failure(task: asyncio.Task[None]) -> None:
    # Not fatal here: the first instance to fork reports the same failure to its request.
    if not task.cancelled() and task.exception() is not None:
        log.warning("instance template did not start: %s", task.exception())


class LocalPlatform(Platform):
    """Instances as local processes, one pool per function.

    Args:
        spec: how to start an instance.
        config: each function's limits.
        policy: routing policy name (``per-model``, ``sesemi``, ``sealedml``).
        warm_pool: spare processes to keep started (0 = none).
        executor: a supervised local executor for partitioned models' middles (started
            and stopped with the platform), or None.
    """

    def __init__(
        self,
        spec: InstanceSpec,
        config: PoolConfig | None = None,
        *,
        policy: str = "sealedml",
        warm_pool: int = 0,
        executor: ExecutorSupervisor | None = None,
    ) -> None:
        self.config = config or PoolConfig()
        self.policy: RoutingPolicy = policy_by_name(policy)
        if self.policy.per_model_pools and spec.heap_reserve is None:
            # An instance of a one-model function loads once: keeping heap faulted in for a
            # next load would only hold memory (runtime/heap_reserve.py).
            spec = dataclasses.replace(spec, heap_reserve="at-start")
        self.spec = spec
        self.metrics = Metrics()
        self._pools: dict[str, InstancePool] = {}
        self._warm = WarmPool(spec, warm_pool) if warm_pool > 0 else None
        self._reaper: asyncio.Task[None] | None = None
        self._template_ready: asyncio.Task[None] | None = None
        self.executor = executor
        self.started_at = time.time()

    def function_for(self, model_id: str) -> str:
        """The function (pool) serving ``model_id``."""
        return model_id if self.policy.per_model_pools else DEFAULT_FUNCTION

    def pool(self, function: str) -> InstancePool:
        pool = self._pools.get(function)
        if pool is None:
            meter = FunctionMeter(function, self.config.memory_mb / 1024, self.metrics)
            pool = InstancePool(function, self.config, policy_by_name(self.policy.name), meter, self._start_instance)
            self._pools[function] = pool
        return pool

    async def _start_instance(self) -> tuple[WorkerProcess, bool]:
        if self._warm is not None:
            spare = self._warm.take()
            if spare is not None:
                return spare, True
        proc = WorkerProcess(self.spec)
        await proc.start()
        return proc, False

    async def start(self) -> None:
        if self.spec.from_template:
            # The template's imports take a second or two: start them now, not on the first cold start.
            self._template_ready = asyncio.create_task(asyncio.to_thread(warm_up))
            self._template_ready.add_done_callback(_log_template_failure)
        if self.executor is not None:
            await self.executor.start()
        if self._warm is not None:
            await self._warm.start()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())

    async def invoke(self, invocation: Invocation) -> PlatformResult:
        return await self.pool(self.function_for(invocation.model_id)).invoke(invocation)

    async def reap(self, now: float | None = None) -> int:
        """Stop idle instances in every pool; return how many stopped."""
        stopped = 0
        for pool in list(self._pools.values()):
            stopped += await pool.reap(now)
        return stopped

    async def _reap_forever(self) -> None:
        interval = max(0.2, min(5.0, self.config.keep_alive / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:  # keep the reaper alive whatever happens
                log.exception("reaper failed")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await asyncio.gather(*(p.stop() for p in self._pools.values()), return_exceptions=True)
        if self._warm is not None:
            await self._warm.stop()
        if self.executor is not None:
            await self.executor.stop()

    def stats(self) -> dict[str, Any]:
        functions = {name: pool.stats() for name, pool in self._pools.items()}
        totals = {
            key: round(sum(f[key] for f in functions.values()), 3)
            for key in (
                "gb_seconds",
                "busy_gb_seconds",
                "invocations",
                "failures",
                "rejected",
                "cold_starts",
                "model_loads",
            )
        }
        return {
            "policy": self.policy.name,
            "warm_pool_ready": self._warm.ready if self._warm else 0,
            # Instances fork from the template once it has imported everything (None: not used).
            "template_ready": _succeeded(self._template_ready) if self._template_ready is not None else None,
            "totals": totals,
            "functions": functions,
            "uptime_s": round(time.time() - self.started_at, 3),
            "executor": self.executor.describe() if self.executor is not None else None,
        }
