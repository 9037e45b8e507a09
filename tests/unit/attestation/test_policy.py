"""Policy: backward-compatible core plus per-TEE rules, advisories and collateral age."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest

from sealedml.attestation.base import Claims, TeeType
from sealedml.attestation.policy import Policy, TeeRule
from sealedml.errors import PolicyError

SGX_M = "aa" * 32
TDX_M = "bb" * 48


def _claims(tee: TeeType = TeeType.SGX, measurement: str = SGX_M, **kwargs: object) -> Claims:
    base: dict[str, object] = {
        "tee": tee,
        "measurement": measurement,
        "report_data": bytes(64),
        "debug": False,
        "details": MappingProxyType({}),
    }
    base.update(kwargs)
    return Claims(**base)  # type: ignore[arg-type]


def test_empty_policy_denies() -> None:
    with pytest.raises(PolicyError, match="empty policy"):
        Policy().verify(_claims())


def test_for_measurements_defaults_unchanged() -> None:
    policy = Policy.for_measurements([SGX_M.upper()])
    policy.verify(_claims())
    with pytest.raises(PolicyError, match="debug TEE not allowed"):
        policy.verify(_claims(debug=True))
    with pytest.raises(PolicyError, match="TCB status SWHardeningNeeded not accepted"):
        policy.verify(_claims(tcb_status="SWHardeningNeeded"))
    with pytest.raises(PolicyError, match="measurement"):
        policy.verify(_claims(measurement="cc" * 32))
    # Advisories and collateral age are not checked unless asked for.
    policy.verify(_claims(advisory_ids=("INTEL-SA-00615",)))
    assert policy.accepted_advisories is None and policy.max_collateral_age is None
    assert hash(policy) == hash(Policy.for_measurements([SGX_M]))


def test_intersect_unchanged_for_flat_policies() -> None:
    a = Policy.for_measurements([SGX_M, TDX_M], tcb_statuses=frozenset({"UpToDate", "OutOfDate"}))
    b = Policy.for_measurements([SGX_M], allow_debug=True)
    both = a.intersect(b)
    assert both.measurements == frozenset({SGX_M})
    assert both.tcb_statuses == frozenset({"UpToDate"})
    assert both.allow_debug is False
    assert a.intersect(Policy()).measurements == frozenset()


def test_tee_rule_binds_measurements_to_one_tee() -> None:
    policy = Policy.for_measurements(
        [SGX_M, TDX_M],
        tee_rules={
            TeeType.SGX: TeeRule(TeeType.SGX, measurements=frozenset({SGX_M})),
            TeeType.TDX: TeeRule(TeeType.TDX, measurements=frozenset({TDX_M})),
        },
    )
    policy.verify(_claims())
    policy.verify(_claims(TeeType.TDX, TDX_M))
    with pytest.raises(PolicyError, match="tdx: measurement"):
        policy.verify(_claims(TeeType.TDX, SGX_M))


def test_tee_rule_reference_values_and_minimums() -> None:
    rule = TeeRule(
        TeeType.SEV_SNP,
        reference_values={"host_data": frozenset({"AB" * 32}), "vmpl": frozenset({"0"})},
        minimums={"reported_tcb.snp": 5, "guest_svn": 1},
    )
    policy = Policy.for_measurements([TDX_M], tee_rules={TeeType.SEV_SNP: rule})
    details = {"host_data": "ab" * 32, "vmpl": 0, "guest_svn": 1, "reported_tcb": {"snp": 5}}
    good = _claims(TeeType.SEV_SNP, TDX_M, details=MappingProxyType(details))
    policy.verify(good)
    with pytest.raises(PolicyError, match="host_data"):
        policy.verify(replace(good, details={**details, "host_data": "cd" * 32}))
    with pytest.raises(PolicyError, match=r"reported_tcb\.snp 4 below minimum 5"):
        policy.verify(replace(good, details={**details, "reported_tcb": {"snp": 4}}))
    with pytest.raises(PolicyError, match="claim guest_svn missing"):
        policy.verify(replace(good, details={k: v for k, v in details.items() if k != "guest_svn"}))
    with pytest.raises(PolicyError, match="claim vmpl missing"):
        policy.verify(replace(good, details={k: v for k, v in details.items() if k != "vmpl"}))


def test_rule_debug_override() -> None:
    allow_sgx = Policy.for_measurements([SGX_M, TDX_M], tee_rules={TeeType.SGX: TeeRule(TeeType.SGX, allow_debug=True)})
    allow_sgx.verify(_claims(debug=True))
    with pytest.raises(PolicyError, match="debug"):
        allow_sgx.verify(_claims(TeeType.TDX, TDX_M, debug=True))
    deny_sgx = Policy.for_measurements(
        [SGX_M], allow_debug=True, tee_rules={TeeType.SGX: TeeRule(TeeType.SGX, allow_debug=False)}
    )
    with pytest.raises(PolicyError, match="debug"):
        deny_sgx.verify(_claims(debug=True))


def test_intersection_cannot_reenable_debug() -> None:
    owner = Policy.for_measurements([SGX_M], tee_rules={TeeType.SGX: TeeRule(TeeType.SGX, allow_debug=True)})
    user = Policy.for_measurements([SGX_M])  # debug forbidden by default
    with pytest.raises(PolicyError, match="debug"):
        owner.intersect(user).verify(_claims(debug=True))
    both = owner.intersect(
        Policy.for_measurements([SGX_M], tee_rules={TeeType.SGX: TeeRule(TeeType.SGX, allow_debug=True)})
    )
    both.verify(_claims(debug=True))


def test_rule_intersection() -> None:
    a = TeeRule(
        TeeType.TDX,
        measurements=frozenset({TDX_M}),
        reference_values={"rtmr0": frozenset({"01", "02"})},
        minimums={"tcb_eval_data_number": 16},
    )
    b = TeeRule(
        TeeType.TDX,
        reference_values={"rtmr0": frozenset({"02"}), "rtmr1": frozenset({"03"})},
        minimums={"tcb_eval_data_number": 17},
    )
    c = a.intersect(b)
    assert c.measurements == frozenset({TDX_M})
    assert c.reference_values == {"rtmr0": frozenset({"02"}), "rtmr1": frozenset({"03"})}
    assert c.minimums == {"tcb_eval_data_number": 17}
    with pytest.raises(PolicyError):
        a.intersect(TeeRule(TeeType.SGX))
    with pytest.raises(PolicyError, match="filed under"):
        Policy(tee_rules={TeeType.SGX: a})


def test_accepted_advisories() -> None:
    policy = Policy.for_measurements([SGX_M], accepted_advisories=frozenset({"INTEL-SA-00289"}))
    policy.verify(_claims(advisory_ids=("INTEL-SA-00289",)))
    with pytest.raises(PolicyError, match="INTEL-SA-00615"):
        policy.verify(_claims(advisory_ids=("INTEL-SA-00289", "INTEL-SA-00615")))
    strict = Policy.for_measurements([SGX_M], accepted_advisories=frozenset())
    with pytest.raises(PolicyError, match="advisories not accepted"):
        strict.verify(_claims(advisory_ids=("INTEL-SA-00289",)))
    assert policy.intersect(Policy.for_measurements([SGX_M])).accepted_advisories == frozenset({"INTEL-SA-00289"})
    assert policy.intersect(strict).accepted_advisories == frozenset()


def test_max_collateral_age() -> None:
    issued = datetime(2025, 6, 19, tzinfo=UTC)
    claims = _claims(details=MappingProxyType({"collateral_issued": issued.isoformat()}))
    policy = Policy.for_measurements([SGX_M], max_collateral_age=timedelta(days=30))
    policy.verify(claims, now=issued + timedelta(days=29))
    with pytest.raises(PolicyError, match="older than"):
        policy.verify(claims, now=issued + timedelta(days=31))
    with pytest.raises(PolicyError, match="issue date unknown"):
        policy.verify(_claims(), now=issued)
    # Not applicable to TEEs without DCAP collateral.
    snp_policy = Policy.for_measurements([TDX_M], max_collateral_age=timedelta(days=1))
    snp_policy.verify(_claims(TeeType.SEV_SNP, TDX_M))
    shorter = policy.intersect(Policy.for_measurements([SGX_M], max_collateral_age=timedelta(days=7)))
    assert shorter.max_collateral_age == timedelta(days=7)
