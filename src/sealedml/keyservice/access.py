"""Access decisions as pure functions over state (no I/O; unit-testable).

A runtime may receive the keys of a (model, user) pair only if all hold:

1. the model exists and has a key for its current version;
2. its owner grants the user (and has not revoked the grant);
3. the user has uploaded a request key and consented to runtimes;
4. the runtime's verified claims name a runtime — a TEE type *and* a
   measurement — that both the owner allows and the user consented to (a
   measurement allowed for one TEE type is never satisfied by evidence of
   another: simulated evidence can never stand in for a TDX measurement);
5. the claims satisfy the operator's policy (debug TEEs and TCB statuses other
   than ``UpToDate`` are refused by default).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from sealedml.attestation.base import Claims, TeeType
from sealedml.attestation.policy import DEFAULT_TCB_STATUSES, Policy, TeeRule
from sealedml.errors import Error, PolicyError
from sealedml.keyservice.store import ConsentRecord, ModelRecord, RuntimeId

__all__ = ["Denial", "PairState", "decide_pair", "release_policy", "runtime_policy", "under_operator"]


@dataclass(frozen=True)
class PairState:
    """Everything the decision for one (model, user) pair depends on."""

    model_id: str
    user_id: str
    model: ModelRecord | None
    allowed_runtimes: frozenset[RuntimeId]
    granted: bool
    consent: ConsentRecord | None

    @property
    def runtimes(self) -> frozenset[RuntimeId]:
        """The runtimes both the owner allows and the user consented to."""
        consented = self.consent.runtimes if self.consent is not None else frozenset()
        return self.allowed_runtimes & consented


def runtime_policy(runtimes: Iterable[RuntimeId], *, tcb_statuses: frozenset[str] = DEFAULT_TCB_STATUSES) -> Policy:
    """A policy accepting exactly ``runtimes``: each measurement only for its own TEE type.

    An empty set gives an empty policy, which denies everything.
    """
    by_tee: dict[TeeType, set[str]] = {}
    for runtime in runtimes:
        by_tee.setdefault(runtime.tee, set()).add(runtime.measurement)
    return Policy(
        measurements=frozenset(m for ms in by_tee.values() for m in ms),
        tee_types=frozenset(by_tee),
        tcb_statuses=tcb_statuses,
        tee_rules={tee: TeeRule(tee, measurements=frozenset(ms)) for tee, ms in by_tee.items()},
    )


def release_policy(state: PairState, base: Policy | None = None) -> Policy:
    """The attestation policy for a pair: owner's allow-list ∩ user's consent, under the operator's ``base``.

    The owner's and the user's runtimes are intersected as (TEE type,
    measurement) pairs *before* they become a policy. The operator's policy
    contributes its TCB, debug, SVN and collateral rules; its measurement list
    (if any) further restricts, an empty one does not.
    """
    # Owners and users choose runtimes; TCB statuses are the operator's call
    # (default: UpToDate only), so an operator policy can accept e.g. SWHardeningNeeded.
    statuses = base.tcb_statuses if base is not None else DEFAULT_TCB_STATUSES
    return under_operator(runtime_policy(state.runtimes, tcb_statuses=statuses), base)


def under_operator(policy: Policy, base: Policy | None) -> Policy:
    """``policy`` (owners' choice of runtimes) with the operator's ``base`` rules on top.

    ``base`` contributes its TCB, debug, SVN and collateral rules; its measurement list (if
    any) further restricts, an empty one does not.
    """
    if base is None:
        return policy
    measurements = policy.measurements & base.measurements if base.measurements else policy.measurements
    if base.tee_types and not base.tee_types & policy.tee_types:
        measurements = frozenset()  # the operator accepts none of the policy's TEE types: deny all
    return replace(base.intersect(policy), measurements=measurements)


def decide_pair(state: PairState, claims: Claims, base: Policy | None = None) -> str | None:
    """Return ``None`` to allow, or the exact reason for denial."""
    if state.model is None:
        return "no such model"
    if not state.granted:
        return "user not granted (or revoked) by the owner"
    if state.consent is None:
        return "user has not enabled the model (no request key / consent)"
    if not state.allowed_runtimes:
        return "owner allows no runtime measurement"
    if state.model.partition_sha256 is not None and not state.consent.accept_partitioned:
        # The middle layers run outside the TEE on representations of the user's inputs.
        return "user did not accept partitioned execution of this model version"
    runtime = RuntimeId(claims.tee, claims.measurement)
    if runtime not in state.runtimes:
        # Named apart from the policy check so the audit log says which list is missing it.
        if runtime not in state.allowed_runtimes:
            return f"owner does not allow runtime {runtime.tee.value}:{runtime.measurement}"
        return f"user did not consent to runtime {runtime.tee.value}:{runtime.measurement}"
    try:
        release_policy(state, base).verify(claims)
    except PolicyError as exc:
        return f"policy: {exc.message}"
    return None


class Denial(Error):
    """A release denied, with its exact reason (for the audit log only: callers see ``AccessDenied``)."""

    code = "denial"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
