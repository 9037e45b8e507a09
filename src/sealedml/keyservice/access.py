"""Access decisions as pure functions over state (no I/O; unit-testable).

A runtime may receive the keys of a (model, user) pair only if all hold:

1. the model exists and has a key for its current version;
2. its owner grants the user (and has not revoked the grant);
3. the user has uploaded a request key and consented to runtimes;
4. the runtime's verified claims satisfy the intersection of the owner's
   allowed measurements and the user's consented measurements (debug TEEs
   and TCB statuses other than ``UpToDate`` are refused by default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sealedml.attestation.base import Claims
from sealedml.attestation.policy import DEFAULT_TCB_STATUSES, Policy
from sealedml.errors import PolicyError
from sealedml.keyservice.store import ConsentRecord, ModelRecord

__all__ = ["PairState", "decide_pair", "release_policy"]


@dataclass(frozen=True)
class PairState:
    """Everything the decision for one (model, user) pair depends on."""

    model_id: str
    user_id: str
    model: ModelRecord | None
    allowed_runtimes: frozenset[str]
    granted: bool
    consent: ConsentRecord | None


def release_policy(state: PairState, base: Policy | None = None) -> Policy:
    """The attestation policy for a pair: owner's allow-list ∩ user's consent, under the operator's ``base``.

    The operator's policy contributes its TCB, debug, SVN and collateral rules;
    its measurement list (if any) further restricts, an empty one does not.
    """
    # Owners and users choose measurements; TCB statuses are the operator's call
    # (default: UpToDate only), so an operator policy can accept e.g. SWHardeningNeeded.
    statuses = base.tcb_statuses if base is not None else DEFAULT_TCB_STATUSES
    owner = Policy.for_measurements(state.allowed_runtimes, tcb_statuses=statuses)
    user = Policy.for_measurements(state.consent.measurements if state.consent else (), tcb_statuses=statuses)
    pair = owner.intersect(user)
    if base is None:
        return pair
    measurements = pair.measurements & base.measurements if base.measurements else pair.measurements
    return replace(base.intersect(pair), measurements=measurements)


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
    try:
        release_policy(state, base).verify(claims)
    except PolicyError as exc:
        return f"policy: {exc.message}"
    return None
