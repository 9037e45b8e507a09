"""Unit tests of the pure release decision (``keyservice.access.decide_pair``).

Each denial test starts from a state that is allowed and breaks exactly one
rule, so it fails if that rule's check were removed.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from sealedml.attestation.base import Claims, TeeType
from sealedml.keyservice.access import PairState, decide_pair, release_policy
from sealedml.keyservice.store import ConsentRecord, ModelRecord, RuntimeId

RUNTIME = "ab" * 48
OTHER = "cd" * 48
THIRD = "ef" * 48


def rts(*measurements: str, tee: TeeType = TeeType.SIMULATED) -> frozenset[RuntimeId]:
    return frozenset(RuntimeId(tee, m) for m in measurements)


def _claims(**overrides: object) -> Claims:
    base = {"tee": TeeType.SIMULATED, "measurement": RUNTIME, "report_data": b"\x00" * 64, "debug": False}
    return Claims(**{**base, **overrides})  # type: ignore[arg-type]


def _state(**overrides: object) -> PairState:
    """A pair that is allowed: model exists, user granted and consented, runtime allowed by both."""
    base = PairState(
        model_id="m",
        user_id="u",
        model=ModelRecord("m", "owner", 1),
        allowed_runtimes=rts(RUNTIME),
        granted=True,
        consent=ConsentRecord("m", "u", b"wrapped", rts(RUNTIME)),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def test_allowed_pair_is_released() -> None:
    assert decide_pair(_state(), _claims()) is None


def test_release_rejects_unknown_model() -> None:
    assert decide_pair(_state(model=None), _claims()) == "no such model"


def test_release_rejects_user_not_granted() -> None:
    assert decide_pair(_state(granted=False), _claims()) == "user not granted (or revoked) by the owner"


def test_release_rejects_revoked_user() -> None:
    """A revoked grant is stored as ``granted=False``: same rule, same reason."""
    from sealedml.keyservice.store import SQLiteKeyStore

    store = SQLiteKeyStore(":memory:")
    store.put_model_key("m", "owner", 1, b"k", {"a": 1})
    store.set_grant("m", "u", True, {"a": 2})
    assert store.is_granted("m", "u")
    store.set_grant("m", "u", False, {"a": 3})
    state = _state(granted=store.is_granted("m", "u"))
    assert decide_pair(state, _claims()) == "user not granted (or revoked) by the owner"


def test_release_rejects_user_without_consent() -> None:
    assert decide_pair(_state(consent=None), _claims()) == ("user has not enabled the model (no request key / consent)")


def test_release_rejects_when_owner_allows_no_runtime() -> None:
    assert decide_pair(_state(allowed_runtimes=frozenset()), _claims()) == "owner allows no runtime measurement"


def test_release_rejects_measurement_not_in_owner_list() -> None:
    state = _state(allowed_runtimes=rts(OTHER), consent=ConsentRecord("m", "u", b"w", rts(RUNTIME, OTHER)))
    assert decide_pair(state, _claims()) == f"owner does not allow runtime simulated:{RUNTIME}"


def test_release_rejects_measurement_not_in_user_consent() -> None:
    state = _state(allowed_runtimes=rts(RUNTIME, OTHER), consent=ConsentRecord("m", "u", b"w", rts(OTHER)))
    assert decide_pair(state, _claims()) == f"user did not consent to runtime simulated:{RUNTIME}"


def test_release_requires_the_intersection_of_owner_and_user_lists() -> None:
    """Owner {A, B} and user {B, C}: only B may receive keys."""
    state = _state(
        allowed_runtimes=rts(RUNTIME, OTHER),
        consent=ConsentRecord("m", "u", b"w", rts(OTHER, THIRD)),
    )
    assert decide_pair(state, _claims(measurement=OTHER)) is None
    assert decide_pair(state, _claims(measurement=RUNTIME)) == f"user did not consent to runtime simulated:{RUNTIME}"
    assert decide_pair(state, _claims(measurement=THIRD)) == f"owner does not allow runtime simulated:{THIRD}"


def test_release_rejects_disjoint_owner_and_user_lists() -> None:
    """Owner allows only A, user consents only to B: nothing may receive the keys, not even A or B."""
    state = _state(consent=ConsentRecord("m", "u", b"w", rts(OTHER)))
    assert decide_pair(state, _claims(measurement=RUNTIME)) == f"user did not consent to runtime simulated:{RUNTIME}"
    assert decide_pair(state, _claims(measurement=OTHER)) == f"owner does not allow runtime simulated:{OTHER}"
    assert release_policy(state).measurements == frozenset()  # the policy itself denies everything


def test_release_rejects_user_consent_with_no_measurement() -> None:
    state = _state(consent=ConsentRecord("m", "u", b"w", frozenset()))
    assert decide_pair(state, _claims()) == f"user did not consent to runtime simulated:{RUNTIME}"


def test_release_rejects_debug_tee() -> None:
    assert decide_pair(_state(), _claims(debug=True)) == "policy: debug TEE not allowed"


@pytest.mark.parametrize("status", ["OutOfDate", "ConfigurationNeeded", "Revoked", "SWHardeningNeeded", ""])
def test_release_rejects_tcb_status_other_than_up_to_date(status: str) -> None:
    assert decide_pair(_state(), _claims(tcb_status=status)) == f"policy: TCB status {status} not accepted"


def test_measurements_compare_case_insensitively() -> None:
    state = _state(
        allowed_runtimes=rts(RUNTIME.upper()),
        consent=ConsentRecord("m", "u", b"w", rts(RUNTIME.upper())),
    )
    assert decide_pair(state, _claims(measurement=RUNTIME)) is None
    assert decide_pair(_state(), _claims(measurement=RUNTIME.upper())) is None


TEES = list(TeeType)


@pytest.mark.parametrize(
    ("allowed", "evidence"), [(a, e) for a, e in itertools.product(TEES, TEES) if a is not e], ids=str
)
def test_evidence_of_another_tee_type_never_satisfies_a_measurement(allowed: TeeType, evidence: TeeType) -> None:
    """Owner and user both name (``allowed``, M); verified claims of ``evidence`` type with the same M are refused.

    Simulated evidence can be forged by whoever holds a host's platform root: it
    must never stand in for a hardware measurement, and no hardware type for another.
    """
    state = _state(
        allowed_runtimes=rts(RUNTIME, tee=allowed), consent=ConsentRecord("m", "u", b"w", rts(RUNTIME, tee=allowed))
    )
    assert decide_pair(state, _claims(tee=allowed)) is None
    reason = decide_pair(state, _claims(tee=evidence))
    assert reason == f"owner does not allow runtime {evidence.value}:{RUNTIME}"
    with pytest.raises(Exception, match="not allowed"):
        release_policy(state).verify(_claims(tee=evidence))  # the policy alone refuses it too


def test_owner_and_user_naming_one_measurement_for_different_tees_allow_nothing() -> None:
    """Owner allows (tdx, M), user consents to (sgx, M): the lists share no runtime, whatever the evidence."""
    state = _state(
        allowed_runtimes=rts(RUNTIME, tee=TeeType.TDX),
        consent=ConsentRecord("m", "u", b"w", rts(RUNTIME, tee=TeeType.SGX)),
    )
    for tee in TEES:
        assert decide_pair(state, _claims(tee=tee)) is not None
    assert release_policy(state).measurements == frozenset()


def test_operator_policy_for_other_tee_types_denies_everything() -> None:
    from sealedml.attestation.policy import Policy

    operator = Policy(tee_types=frozenset({TeeType.SGX}))
    assert decide_pair(_state(), _claims(), operator) == "policy: empty policy: no measurement is allowed"


def test_rules_are_checked_in_order_model_grant_consent_runtimes() -> None:
    """The audit reason names the first rule that fails, most basic first."""
    everything_wrong = _state(model=None, granted=False, consent=None, allowed_runtimes=frozenset())
    assert decide_pair(everything_wrong, _claims(debug=True)) == "no such model"
    assert decide_pair(dataclasses.replace(everything_wrong, model=ModelRecord("m", "o", 1)), _claims()) == (
        "user not granted (or revoked) by the owner"
    )


def test_release_policy_is_the_intersection_and_forbids_debug() -> None:
    policy = release_policy(
        _state(
            allowed_runtimes=rts(RUNTIME, OTHER),
            consent=ConsentRecord("m", "u", b"w", rts(OTHER)),
        )
    )
    assert policy.measurements == frozenset({OTHER})
    assert policy.tee_types == frozenset({TeeType.SIMULATED})
    assert policy.allow_debug is False
    assert release_policy(_state(consent=None)).measurements == frozenset()


def test_operator_policy_can_accept_more_tcb_statuses_than_the_default() -> None:
    from sealedml.attestation.policy import Policy

    state = _state()
    claims = _claims(tcb_status="SWHardeningNeeded")
    assert decide_pair(state, claims) is not None  # default: UpToDate only
    operator = Policy(tcb_statuses=frozenset({"UpToDate", "SWHardeningNeeded"}))
    assert decide_pair(state, claims, operator) is None


def test_partitioned_version_needs_the_users_acceptance() -> None:
    """The middle of a partitioned model runs outside the TEE on the user's inputs' representations."""
    partitioned = ModelRecord("m", "owner", 1, partition_sha256="ab" * 32)
    assert decide_pair(_state(model=partitioned), _claims()) == (
        "user did not accept partitioned execution of this model version"
    )
    accepting = ConsentRecord("m", "u", b"wrapped", rts(RUNTIME), accept_partitioned=True)
    assert decide_pair(_state(model=partitioned, consent=accepting), _claims()) is None
    assert decide_pair(_state(consent=accepting), _claims()) is None  # acceptance does not require partitioning
