"""Attestation policy: which verified claims are acceptable.

A policy is an object with one method, :meth:`Policy.verify`, that raises
:class:`~sealedml.errors.PolicyError` with the exact reason. An empty policy
(no reference measurements) denies everything. Policies compose with
:meth:`Policy.intersect`, which is how the KeyService combines an owner's
allowed runtimes with a user's consent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sealedml.attestation.base import Claims, TeeType
from sealedml.errors import PolicyError

__all__ = ["DEFAULT_TCB_STATUSES", "Policy"]

DEFAULT_TCB_STATUSES: frozenset[str] = frozenset({"UpToDate"})


def _norm(measurements: Iterable[str]) -> frozenset[str]:
    return frozenset(m.strip().lower() for m in measurements)


@dataclass(frozen=True)
class Policy:
    """Reference values a TEE's claims must match.

    Attributes:
        measurements: allowed primary measurements (hex). Empty denies all.
        tee_types: allowed TEE types; empty allows any type whose measurement is listed.
        allow_debug: accept debug-mode TEEs (never by default).
        tcb_statuses: accepted TCB statuses.
        signers: if non-empty, the signer measurement (MRSIGNER) must be one of these.
    """

    measurements: frozenset[str] = field(default_factory=frozenset)
    tee_types: frozenset[TeeType] = field(default_factory=frozenset)
    allow_debug: bool = False
    tcb_statuses: frozenset[str] = DEFAULT_TCB_STATUSES
    signers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def for_measurements(cls, measurements: Iterable[str], **kwargs: object) -> Policy:
        """A policy allowing exactly ``measurements`` (other fields as keyword arguments)."""
        return cls(measurements=_norm(measurements), **kwargs)  # type: ignore[arg-type]

    def verify(self, claims: Claims) -> None:
        """Return if ``claims`` satisfy this policy.

        Raises:
            PolicyError: with the exact reason (for the audit log, not for callers).
        """
        if not self.measurements:
            raise PolicyError("empty policy: no measurement is allowed")
        if self.tee_types and claims.tee not in self.tee_types:
            raise PolicyError(f"TEE type {claims.tee.value} not allowed")
        if claims.debug and not self.allow_debug:
            raise PolicyError("debug TEE not allowed")
        if claims.measurement.lower() not in self.measurements:
            raise PolicyError(f"measurement {claims.measurement} not allowed")
        if self.signers and (claims.signer or "").lower() not in self.signers:
            raise PolicyError(f"signer {claims.signer} not allowed")
        if claims.tcb_status not in self.tcb_statuses:
            raise PolicyError(f"TCB status {claims.tcb_status} not accepted")

    def intersect(self, other: Policy) -> Policy:
        """The policy that accepts only what both accept."""
        tee_types = (
            self.tee_types & other.tee_types
            if self.tee_types and other.tee_types
            else self.tee_types or other.tee_types
        )
        signers = (
            self.signers & other.signers
            if self.signers and other.signers
            else self.signers or other.signers
        )
        return Policy(
            measurements=self.measurements & other.measurements,
            tee_types=tee_types,
            allow_debug=self.allow_debug and other.allow_debug,
            tcb_statuses=self.tcb_statuses & other.tcb_statuses,
            signers=signers,
        )
