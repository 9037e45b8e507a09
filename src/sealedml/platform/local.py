"""The embedded platform: runtime processes on this machine, started on demand.

* cold start: no instance can take a request and fewer than ``max_instances``
  run → spawn one (the request that caused it is counted as a cold start);
* warm reuse: otherwise the request goes to a running instance with a free
  slot (one holding the model preferred);
* queueing: all instances busy and at the limit → wait (bounded queue, timeout
  → 429 with Retry-After), never "All Busy";
* keep-alive: instances idle longer than ``keep_alive`` seconds are stopped
  (scale to zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from sealedml.errors import Overloaded, ServiceUnavailable
from sealedml.platform.base import Invocation, Platform, PlatformResult
from sealedml.platform.process import InstanceSpec, WorkerProcess
from sealedml.platform.routing import InstanceView, pick_instance

__all__ = ["LocalPlatform", "PoolConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    """Limits of the instance pool.

    Attributes:
        max_instances: most instances running at once.
        keep_alive: idle seconds before an instance is stopped.
        queue_limit: most invocations waiting for a slot.
        queue_timeout: longest wait for a slot, seconds.
    """

    max_instances: int = 2
    keep_alive: float = 60.0
    queue_limit: int = 1024
    queue_timeout: float = 120.0


class LocalPlatform(Platform):
    """Instances as local processes; see the module docstring."""

    def __init__(self, spec: InstanceSpec, config: PoolConfig | None = None) -> None:
        self.spec = spec
        self.config = config or PoolConfig()
        self._instances: list[WorkerProcess] = []
        self._starting = 0
        self._waiting = 0
        self._cond: asyncio.Condition | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.counters: dict[str, float] = {
            "invocations": 0, "cold_starts": 0, "instances_started": 0, "instances_stopped": 0,
            "instance_failures": 0, "rejected": 0,
        }

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        instances, self._instances = self._instances, []
        await asyncio.gather(*(i.stop() for i in instances), return_exceptions=True)

    # ------------------------------------------------------------------ acquire / release
    def _pick(self, model_id: str) -> WorkerProcess | None:
        views = [InstanceView(i.instance_id, i.free, i.in_flight, model_id in i.models) for i in self._instances]
        chosen = pick_instance(views)
        return next((i for i in self._instances if i.instance_id == chosen), None)

    async def _acquire(self, model_id: str) -> tuple[WorkerProcess, bool]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.queue_timeout
        async with self.cond:
            if self._waiting >= self.config.queue_limit:
                self.counters["rejected"] += 1
                raise Overloaded("queue full", retry_after=1)
            self._waiting += 1
            try:
                while True:
                    instance = self._pick(model_id)
                    if instance is not None:
                        instance.in_flight += 1
                        return instance, False
                    if len(self._instances) + self._starting < self.config.max_instances:
                        self._starting += 1
                        break
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        self.counters["rejected"] += 1
                        raise Overloaded("no instance became free in time", retry_after=1)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.cond.wait(), timeout=remaining)
            finally:
                self._waiting -= 1
        instance = WorkerProcess(self.spec)
        try:
            await instance.start()
        except BaseException:
            async with self.cond:
                self._starting -= 1
                self.cond.notify_all()
            raise
        async with self.cond:
            self._starting -= 1
            self._instances.append(instance)
            instance.in_flight += 1
            self.counters["instances_started"] += 1
            self.cond.notify_all()
        return instance, True

    async def _release(self, instance: WorkerProcess) -> None:
        async with self.cond:
            instance.in_flight -= 1
            instance.last_used = time.time()
            if instance.dead and instance in self._instances:
                self._instances.remove(instance)
            self.cond.notify_all()

    # ------------------------------------------------------------------ invoke
    async def invoke(self, invocation: Invocation) -> PlatformResult:
        t0 = time.perf_counter()
        self.counters["invocations"] += 1
        instance, cold = await self._acquire(invocation.model_id)
        t_acquired = time.perf_counter()
        if cold:
            self.counters["cold_starts"] += 1
        try:
            response = await instance.call(invocation.path, invocation.body)
            if response.status_code < 500:
                instance.models.add(invocation.model_id)
            instance.served += 1
        except ServiceUnavailable:
            self.counters["instance_failures"] += 1
            log.warning("instance %s failed; replacing it", instance.instance_id)
            asyncio.get_running_loop().create_task(instance.stop())
            raise
        finally:
            await self._release(instance)
        return PlatformResult(
            status=response.status_code,
            body=response.content,
            content_type=response.headers.get("content-type", "application/json"),
            cold_start=cold,
            instance_id=instance.instance_id,
            queue_s=(t_acquired - t0) if not cold else 0.0,
            total_s=time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ keep-alive
    async def reap(self, now: float | None = None) -> int:
        """Stop idle instances past the keep-alive window and dead ones; return how many."""
        now = time.time() if now is None else now
        async with self.cond:
            victims = [
                i for i in self._instances
                if (i.in_flight == 0 and now - i.last_used > self.config.keep_alive) or not i.alive()
            ]
            for victim in victims:
                self._instances.remove(victim)
            self.cond.notify_all()
        for victim in victims:
            await victim.stop()
            self.counters["instances_stopped"] += 1
            log.info("instance %s stopped (idle or dead)", victim.instance_id)
        return len(victims)

    async def _reap_forever(self) -> None:
        interval = max(0.2, min(5.0, self.config.keep_alive / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:  # keep the reaper alive whatever happens
                log.exception("reaper failed")

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "instances": [
                {"id": i.instance_id, "pid": i.pid, "in_flight": i.in_flight, "served": i.served,
                 "models": sorted(i.models), "spawn_s": round(i.spawn_s, 4)}
                for i in self._instances
            ],
            "starting": self._starting,
            "waiting": self._waiting,
            "max_instances": self.config.max_instances,
            "keep_alive_s": self.config.keep_alive,
        }
