"""Routing invariants of the FnPacker policies (:mod:`sealedml.platform.policies`) on random pools.

``tests/unit/platform/test_policies.py`` checks each rule on hand-built
snapshots; this module checks the properties every decision must have, over
many generated pool states: a route always targets a started instance with a
free slot, an instance is only started below the limit, the SealedML policy
prefers an instance that already holds the model and then the least loaded one,
and when nothing is free a request is queued or an instance started — never an
error ("All Busy" was a published SeSeMI weakness).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealedml.platform.policies import (
    POLICIES,
    Decision,
    InstanceState,
    ModelStats,
    PerModelPolicy,
    PoolState,
    Route,
    RoutingPolicy,
    SealedMLPolicy,
    StartInstance,
    Wait,
)

MODEL = "m0"
MODELS = ["m0", "m1", "m2"]


@st.composite
def instances(draw: st.DrawFn, busy: bool = False) -> InstanceState:
    capacity = draw(st.integers(1, 4))
    return InstanceState(
        instance_id=f"i{draw(st.integers(0, 99)):02d}",
        capacity=capacity,
        in_flight=capacity if busy else draw(st.integers(0, capacity)),
        models=frozenset(draw(st.sets(st.sampled_from(MODELS), max_size=3))),
        claimant=draw(st.none() | st.sampled_from(MODELS)),
        claimant_idle_since=draw(st.none() | st.floats(0, 100)),
        started=draw(st.booleans()) or draw(st.booleans()),  # mostly started
    )


@st.composite
def pools(draw: st.DrawFn, busy: bool = False) -> PoolState:
    members = draw(st.lists(instances(busy), max_size=6, unique_by=lambda i: i.instance_id))
    max_instances = draw(st.integers(max(1, len(members)), len(members) + 2))
    starting = draw(st.integers(0, max_instances - len(members)))
    stats = {
        m: ModelStats(
            exec_s=draw(st.floats(0.001, 1.0)),
            load_s=draw(st.floats(0.001, 2.0)),
            in_flight=draw(st.integers(0, 4)),
            queued=draw(st.integers(0, 8)),
            bursty=draw(st.booleans()),
        )
        for m in MODELS
        if draw(st.booleans())
    }
    return PoolState(
        now=draw(st.floats(100, 200)),
        instances=tuple(members),
        max_instances=max_instances,
        starting=starting,
        models=stats,
    )


def _by_id(state: PoolState, decision: Route) -> InstanceState:
    matches = [i for i in state.instances if i.instance_id == decision.instance_id]
    assert len(matches) == 1
    return matches[0]


def _check_common(decision: Decision, state: PoolState) -> None:
    assert isinstance(decision, Route | StartInstance | Wait)
    if isinstance(decision, Route):
        chosen = _by_id(state, decision)
        assert chosen.started, "routed to an instance that is still starting"
        assert chosen.free > 0, "routed to an instance without a free slot"
    if isinstance(decision, StartInstance):
        assert state.can_start, "started an instance beyond max_instances"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_routes_only_to_free_started_instances_and_respects_the_limit(name: str) -> None:
    policy: RoutingPolicy = POLICIES[name]()

    @settings(max_examples=100, deadline=None)
    @given(state=pools(), model=st.sampled_from(MODELS))
    def check(state: PoolState, model: str) -> None:
        _check_common(policy.decide(model, state), state)

    check()


@settings(max_examples=150, deadline=None)
@given(state=pools())
def test_sealedml_prefers_a_free_holder_then_the_least_loaded_one(state: PoolState) -> None:
    decision = SealedMLPolicy().decide(MODEL, state)
    free_holders = [i for i in state.instances if MODEL in i.models and i.free > 0]
    if free_holders:
        assert isinstance(decision, Route)
        chosen = _by_id(state, decision)
        assert MODEL in chosen.models
        # Among holders of the same claim status, the least in-flight one wins.
        peers = [i for i in free_holders if (i.claimant == MODEL) == (chosen.claimant == MODEL)]
        assert chosen.in_flight == min(i.in_flight for i in peers)
        if any(i.claimant == MODEL for i in free_holders):
            assert chosen.claimant == MODEL


@settings(max_examples=100, deadline=None)
@given(state=pools(busy=True))
def test_sealedml_queues_or_starts_when_nothing_is_free(state: PoolState) -> None:
    assert not any(i.free > 0 for i in state.instances)
    decision = SealedMLPolicy().decide(MODEL, state)
    if not state.can_start:
        assert decision == Wait()
    elif not any(i.started for i in state.instances):
        assert decision == StartInstance()  # nothing can ever free up: start
    else:
        # waiting for a busy slot and starting are both priced; either may win
        assert decision in (Wait(), StartInstance())


@settings(max_examples=100, deadline=None)
@given(state=pools())
def test_per_model_routes_to_least_loaded_free_instance_whenever_one_exists(state: PoolState) -> None:
    decision = PerModelPolicy().decide(MODEL, state)
    free = [i for i in state.instances if i.free > 0]
    if free:
        assert isinstance(decision, Route)
        assert _by_id(state, decision).in_flight == min(i.in_flight for i in free)
    else:
        assert decision == (StartInstance() if state.can_start else Wait())


def _pool(*members: InstanceState, max_instances: int = 4) -> PoolState:
    return PoolState(now=100.0, instances=members, max_instances=max_instances)


def test_sealedml_prefers_holder_even_if_busier() -> None:
    pool = _pool(InstanceState("cold", 4, 0), InstanceState("warm", 4, 3, frozenset({MODEL})))
    assert SealedMLPolicy().decide(MODEL, pool) == Route("warm")


def test_sealedml_picks_least_in_flight_among_holders() -> None:
    holders = [InstanceState(f"w{n}", 4, load, frozenset({MODEL})) for n, load in enumerate((3, 1, 2))]
    for order in itertools.permutations(holders):
        assert SealedMLPolicy().decide(MODEL, _pool(*order)) == Route("w1")


def test_ties_are_broken_deterministically_by_instance_id() -> None:
    holders = [InstanceState(name, 2, 0, frozenset({MODEL})) for name in ("i-3", "i-1", "i-2")]
    for order in itertools.permutations(holders):
        assert SealedMLPolicy().decide(MODEL, _pool(*order)) == Route("i-1")
        assert PerModelPolicy().decide(MODEL, _pool(*order)) == Route("i-1")


def test_nothing_free_at_the_limit_waits_instead_of_failing() -> None:
    pool = _pool(InstanceState("a", 1, 1, frozenset({MODEL})), InstanceState("b", 2, 2), max_instances=2)
    for name in POLICIES:
        assert POLICIES[name]().decide(MODEL, pool) == Wait()


def test_empty_pool_starts_an_instance() -> None:
    for name in POLICIES:
        assert POLICIES[name]().decide(MODEL, _pool()) == StartInstance()
