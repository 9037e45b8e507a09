"""Each rule of each routing policy, on hand-built pool snapshots (no servers)."""

from __future__ import annotations

import pytest

from sealedml.platform.policies import (
    InstanceState,
    ModelStats,
    PerModelPolicy,
    PoolState,
    Route,
    SealedMLPolicy,
    SeSeMIPolicy,
    StartInstance,
    Wait,
    policy_by_name,
)


def inst(
    iid: str, *, in_flight: int = 0, models=(), claimant=None, idle_since=None, capacity: int = 2, started: bool = True
) -> InstanceState:
    return InstanceState(iid, capacity, in_flight, frozenset(models), claimant, idle_since, started)


def state(
    *instances: InstanceState, max_instances: int = 4, starting: int = 0, now: float = 100.0, **models: ModelStats
) -> PoolState:
    return PoolState(now=now, instances=instances, max_instances=max_instances, starting=starting, models=models)


# ---------------------------------------------------------------- per-model
def test_per_model_uses_any_free_instance_least_loaded_first():
    s = state(inst("a", in_flight=1), inst("b"))
    assert PerModelPolicy().decide("m", s) == Route("b")


def test_per_model_starts_when_all_busy_and_below_limit():
    assert PerModelPolicy().decide("m", state(inst("a", in_flight=2), max_instances=2)) == StartInstance()


def test_per_model_queues_at_the_limit():
    s = state(inst("a", in_flight=2), inst("b", in_flight=2), max_instances=2)
    assert PerModelPolicy().decide("m", s) == Wait()


def test_per_model_counts_starting_instances_against_the_limit():
    assert PerModelPolicy().decide("m", state(inst("a", in_flight=2), max_instances=2, starting=1)) == Wait()


def test_per_model_never_routes_to_an_instance_still_starting():
    assert PerModelPolicy().decide("m", state(inst("a", started=False), max_instances=1)) == Wait()


# ---------------------------------------------------------------- sesemi
def test_sesemi_claim_first_idle_unclaimed_instance():
    s = state(inst("a", in_flight=1, claimant="x"), inst("b"), inst("c"))
    assert SeSeMIPolicy().decide("m", s) == Route("b", claim=True)


def test_sesemi_sticky_to_claimed_instance_with_free_slot():
    s = state(inst("a"), inst("b", in_flight=1, claimant="m"), m=ModelStats(in_flight=1))
    assert SeSeMIPolicy().decide("m", s) == Route("b")


def test_sesemi_does_not_take_instance_of_recently_active_claimant():
    # claimant x idle for 0.05 s, exec time 0.1 s → 0.05 < 2 × 0.1: still x's
    s = state(inst("a", claimant="x", idle_since=99.95), max_instances=1, x=ModelStats(exec_s=0.1))
    assert SeSeMIPolicy().decide("m", s) == Wait()


def test_sesemi_claim_expires_after_twice_exec_time():
    s = state(inst("a", claimant="x", idle_since=99.7), max_instances=1, x=ModelStats(exec_s=0.1))
    assert SeSeMIPolicy().decide("m", s) == Route("a", claim=True)


def test_sesemi_starts_new_instance_when_nothing_idle():
    s = state(inst("a", in_flight=1, claimant="x"), max_instances=2, x=ModelStats(in_flight=1))
    assert SeSeMIPolicy().decide("m", s) == StartInstance()


def test_sesemi_ignores_whether_instance_holds_the_model():
    # the published policy picks the first idle instance, even if another holds the model
    s = state(inst("a"), inst("b", models={"m"}))
    assert SeSeMIPolicy().decide("m", s) == Route("a", claim=True)


# ---------------------------------------------------------------- sealedml
def test_sealedml_prefers_instance_holding_the_model():
    s = state(inst("a"), inst("b", in_flight=1, models={"m"}))
    assert SealedMLPolicy().decide("m", s) == Route("b")


def test_sealedml_prefers_its_claimed_holder_then_least_loaded():
    s = state(inst("a", models={"m"}), inst("b", in_flight=1, models={"m"}, claimant="m"))
    assert SealedMLPolicy().decide("m", s) == Route("b")


def test_sealedml_queues_for_busy_holder_when_wait_is_cheaper_than_loading():
    s = state(inst("a", in_flight=2, models={"m"}), inst("b"), m=ModelStats(exec_s=0.01, load_s=0.5))
    assert SealedMLPolicy().decide("m", s) == Wait()


def test_sealedml_switches_when_loading_is_cheaper_than_waiting():
    s = state(inst("a", in_flight=2, models={"m"}), inst("b"), m=ModelStats(exec_s=2.0, load_s=0.1))
    assert SealedMLPolicy().decide("m", s) == Route("b", claim=True)


def test_sealedml_keeps_bursty_models_sticky():
    # b runs a burst of x: m takes c although c holds more models
    s = state(
        inst("b", in_flight=1, claimant="x"), inst("c", models={"y", "z"}), x=ModelStats(bursty=True, in_flight=1)
    )
    assert SealedMLPolicy().decide("m", s) == Route("c", claim=True)


def test_sealedml_uses_idle_capacity_rather_than_wait_for_nothing():
    # the only instance is idle but claimed by a bursty model between bursts: use it now
    s = state(inst("b", claimant="x", idle_since=99.9), max_instances=1, x=ModelStats(bursty=True))
    assert SealedMLPolicy().decide("m", s) == Route("b", claim=True)


def test_sealedml_never_takes_a_slot_its_claimants_queue_is_waiting_for():
    s = state(inst("b", in_flight=1, claimant="x"), max_instances=1, x=ModelStats(in_flight=1, queued=3))
    assert SealedMLPolicy().decide("m", s) == Wait()


def test_sealedml_shares_a_busy_claimants_free_slot_when_cheaper_than_starting():
    s = state(
        inst("b", in_flight=1, claimant="x"),
        max_instances=2,
        x=ModelStats(in_flight=1, load_s=0.2),
        m=ModelStats(load_s=0.2),
    )
    assert SealedMLPolicy().decide("m", s) == Route("b", claim=False)


def test_sealedml_waits_for_a_slot_rather_than_start_when_the_queue_is_short():
    s = state(inst("a", in_flight=2, models={"x"}), max_instances=4, m=ModelStats(exec_s=0.05, load_s=0.3))
    assert SealedMLPolicy().decide("m", s) == Wait()


def test_sealedml_starts_an_instance_under_queue_pressure():
    s = state(
        inst("a", in_flight=2, models={"x"}),
        max_instances=4,
        x=ModelStats(exec_s=0.05, queued=200),
        m=ModelStats(exec_s=0.05, load_s=0.3),
    )
    assert SealedMLPolicy().decide("m", s) == StartInstance()


def test_sealedml_starts_the_first_instance():
    assert SealedMLPolicy().decide("m", state(max_instances=2)) == StartInstance()


def test_sealedml_queues_at_the_limit_when_nothing_is_free():
    s = state(inst("a", in_flight=2, models={"x"}), max_instances=1)
    assert SealedMLPolicy().decide("m", s) == Wait()


def test_sealedml_prefers_idle_instance_with_fewest_models():
    s = state(inst("a", models={"x", "y"}), inst("b", models={"z"}))
    assert SealedMLPolicy().decide("m", s) == Route("b", claim=True)


def test_policy_by_name():
    assert policy_by_name("sesemi").name == "sesemi"
    assert policy_by_name("per-model").per_model_pools
    with pytest.raises(ValueError, match="per-model"):
        policy_by_name("random")
