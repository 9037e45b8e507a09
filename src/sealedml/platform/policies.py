"""Routing policies of the FnPacker: pure functions over a snapshot of pool state.

A policy answers one question for each request waiting for model ``m``: send
it to a running instance (:class:`Route`), start an instance
(:class:`StartInstance`), or keep it queued (:class:`Wait`). The pool applies
the decision; policies do no I/O and keep no state, so every rule is
unit-testable without servers.

Policies:

* ``per-model`` — the baseline: one function per model; any free instance of
  the model's own pool, else start one, else wait.
* ``sesemi`` — the published SeSeMI FnPacker policy (ICDE 2025): a model with
  concurrent requests claims an instance and stays sticky to it; otherwise the
  request takes the first idle instance that is unclaimed or whose claimant has
  been idle for longer than twice its execution time (and claims it).
* ``sealedml`` — ours: prefer an instance that already holds the model;
  otherwise price each option in expected seconds — wait for a slot, load the
  model on a free slot elsewhere (more if that evicts a bursty model), or start
  an instance — and take the cheapest; queue rather than fail.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "POLICIES",
    "Decision",
    "InstanceState",
    "ModelStats",
    "PerModelPolicy",
    "PoolState",
    "Route",
    "RoutingPolicy",
    "SeSeMIPolicy",
    "SealedMLPolicy",
    "StartInstance",
    "Wait",
    "policy_by_name",
]


@dataclass(frozen=True)
class InstanceState:
    """What a policy may know about one instance.

    Attributes:
        instance_id: stable id.
        capacity: concurrent requests it serves (its concurrency).
        in_flight: requests running on it now.
        models: models it holds decrypted (as last reported).
        claimant: the model that claimed it (SeSeMI stickiness), if any.
        claimant_idle_since: when its claimant last had no request running on it (None: busy now).
        started: False while the process is starting.
    """

    instance_id: str
    capacity: int
    in_flight: int = 0
    models: frozenset[str] = frozenset()
    claimant: str | None = None
    claimant_idle_since: float | None = None
    started: bool = True

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.in_flight) if self.started else 0

    @property
    def idle(self) -> bool:
        return self.started and self.in_flight == 0


@dataclass(frozen=True)
class ModelStats:
    """Recent behaviour of one model (EWMAs kept by the pool).

    Attributes:
        exec_s: typical execution time of one request.
        load_s: typical time to load (release keys + decrypt + session) on an instance.
        in_flight: requests of this model running anywhere.
        queued: requests of this model waiting.
        bursty: arrivals are clustered (recent inter-arrival much below the mean).
    """

    exec_s: float = 0.05
    load_s: float = 0.5
    in_flight: int = 0
    queued: int = 0
    bursty: bool = False


@dataclass(frozen=True)
class PoolState:
    """A snapshot of one pool when a decision is needed."""

    now: float
    instances: tuple[InstanceState, ...]
    max_instances: int
    starting: int = 0
    models: Mapping[str, ModelStats] = field(default_factory=dict)
    start_s: float = 1.0  # typical instance start (spawn, or take from the warm pool)

    def stats(self, model_id: str) -> ModelStats:
        return self.models.get(model_id, ModelStats())

    @property
    def can_start(self) -> bool:
        return len(self.instances) + self.starting < self.max_instances


@dataclass(frozen=True)
class Route:
    """Send the request to ``instance_id``; ``claim`` makes the model its claimant."""

    instance_id: str
    claim: bool = False


@dataclass(frozen=True)
class StartInstance:
    """Start a new instance (the request waits for it)."""


@dataclass(frozen=True)
class Wait:
    """Keep the request queued; decide again when something changes."""


Decision = Route | StartInstance | Wait


class RoutingPolicy(abc.ABC):
    """Decides where one request goes."""

    name: str
    #: One pool per model (True) or one pool for all models (False).
    per_model_pools: bool = False

    @abc.abstractmethod
    def decide(self, model_id: str, state: PoolState) -> Decision:
        """The decision for one request of ``model_id``."""


def _least_loaded(instances: list[InstanceState]) -> InstanceState:
    return min(instances, key=lambda i: (i.in_flight, i.instance_id))


def _start_or_wait(state: PoolState) -> Decision:
    return StartInstance() if state.can_start else Wait()


class PerModelPolicy(RoutingPolicy):
    """One function (pool) per model: the serverless baseline."""

    name = "per-model"
    per_model_pools = True

    def decide(self, model_id: str, state: PoolState) -> Decision:
        free = [i for i in state.instances if i.free > 0]
        if free:
            return Route(_least_loaded(free).instance_id)
        return _start_or_wait(state)


class SeSeMIPolicy(RoutingPolicy):
    """The SeSeMI FnPacker policy, as published."""

    name = "sesemi"

    def decide(self, model_id: str, state: PoolState) -> Decision:
        # Sticky: an instance this model claimed, with a free slot.
        claimed = [i for i in state.instances if i.claimant == model_id and i.free > 0]
        if claimed:
            return Route(_least_loaded(claimed).instance_id)
        # Otherwise the first idle instance that is unclaimed, or whose claimant
        # has been idle for longer than twice its execution time.
        for inst in state.instances:
            if not inst.idle:
                continue
            if inst.claimant is None or inst.claimant == model_id:
                return Route(inst.instance_id, claim=True)
            idle_since = inst.claimant_idle_since
            if idle_since is not None and state.now - idle_since > 2 * state.stats(inst.claimant).exec_s:
                return Route(inst.instance_id, claim=True)
        return _start_or_wait(state)


class SealedMLPolicy(RoutingPolicy):
    """Our packing policy: every option priced in expected seconds, cheapest wins.

    * a free slot on an instance holding the model: take it (cost 0);
    * wait for a slot: the queue ahead divided by the capacity that can serve
      it, times the execution time (plus a model load if no instance holds it;
      only when every slot is busy — idle capacity never frees "sooner");
    * a free slot elsewhere: one model load — plus, if a burst of the model
      that claimed the instance is running there, that model's load time;
      never a slot whose claimant has requests queued for it;
    * a new instance: start time plus a model load (queue pressure makes this
      win only when waiting would take longer).
    Ties prefer routing, then waiting, then starting.
    """

    name = "sealedml"

    def decide(self, model_id: str, state: PoolState) -> Decision:
        stats = state.stats(model_id)
        started = [i for i in state.instances if i.started]
        holders = [i for i in started if model_id in i.models]
        free_holders = [i for i in holders if i.free > 0]
        if free_holders:
            # Prefer the instance the model claimed, then the least loaded holder.
            return Route(
                min(free_holders, key=lambda i: (i.claimant != model_id, i.in_flight, i.instance_id)).instance_id
            )
        exec_s = max(stats.exec_s, 1e-3)
        options: list[tuple[tuple[float, int, int, int, int, str], Decision]] = []
        free = [i for i in started if i.free > 0]
        if holders:
            capacity = sum(i.capacity for i in holders)
            options.append(((exec_s * (stats.queued + 1) / capacity, 1, 0, 0, 0, ""), Wait()))
        elif started and not free:
            # Waiting only helps if a slot will free up: every slot is busy now.
            capacity = sum(i.capacity for i in started)
            ahead = sum(m.queued for m in state.models.values())
            options.append(((exec_s * (ahead + 1) / capacity + stats.load_s, 1, 0, 0, 0, ""), Wait()))
        for inst in free:
            penalty = 0.0
            if inst.claimant is not None and inst.claimant != model_id:
                other = state.stats(inst.claimant)
                if other.queued > 0:
                    continue  # its own queued requests are about to take this slot
                if other.bursty and other.in_flight > 0:
                    penalty = other.load_s  # a burst is running there: keep it sticky, sharing slows it
            key = (stats.load_s + penalty, 0, int(not inst.idle), len(inst.models), inst.in_flight, inst.instance_id)
            options.append((key, Route(inst.instance_id, claim=inst.claimant is None or inst.idle)))
        if state.can_start:
            options.append(((state.start_s + stats.load_s, 2, 0, 0, 0, ""), StartInstance()))
        if not options:
            return Wait()
        return min(options, key=lambda option: option[0])[1]


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (PerModelPolicy, SeSeMIPolicy, SealedMLPolicy)}


def policy_by_name(name: str) -> RoutingPolicy:
    """The policy called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
