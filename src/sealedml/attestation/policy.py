"""Attestation policy: which verified claims are acceptable.

A policy is an object with one method, :meth:`Policy.verify`, that raises
:class:`~sealedml.errors.PolicyError` with the exact reason. An empty policy
(no reference measurements) denies everything. Policies compose with
:meth:`Policy.intersect`, which is how the KeyService combines an owner's
allowed runtimes with a user's consent.

Beyond the flat reference values (measurements, signers, TCB statuses) a policy
may carry per-TEE rules (:class:`TeeRule`: measurements bound to one TEE type,
exact reference values for TEE-specific claims such as RTMRs or SNP host data,
and minimum security version numbers), a list of accepted security advisories
and a maximum collateral age. All of them default to "not checked", so
``Policy.for_measurements(...)`` behaves exactly as before they existed. The
document format that builds these objects is in
:mod:`sealedml.attestation.policy_document`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from sealedml.attestation.base import Claims, TeeType
from sealedml.errors import PolicyError

__all__ = ["DEFAULT_TCB_STATUSES", "Policy", "TeeRule"]

DEFAULT_TCB_STATUSES: frozenset[str] = frozenset({"UpToDate"})

#: TEEs whose claims come from Intel collateral with an issue date (DCAP).
_COLLATERAL_TEES = frozenset({TeeType.SGX, TeeType.TDX})


def _norm(measurements: Iterable[str]) -> frozenset[str]:
    return frozenset(m.strip().lower() for m in measurements)


def _empty_values() -> Mapping[str, frozenset[str]]:
    return MappingProxyType({})


def _empty_minimums() -> Mapping[str, int]:
    return MappingProxyType({})


def _both(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    """Intersection where an empty set means "no constraint"."""
    if a and b:
        return a & b
    return a or b


def _detail(details: Mapping[str, Any], path: str) -> Any:
    """Look up a dotted path (``reported_tcb.snp``) in nested claim details."""
    value: Any = details
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _as_reference(value: Any) -> str:
    """The canonical string form a detail is compared in (lowercase; ints in decimal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.hex()
    return str(value).strip().lower()


@dataclass(frozen=True)
class TeeRule:
    """Reference values that apply only to claims of one TEE type.

    Attributes:
        tee: the TEE type the rule applies to.
        measurements: if non-empty, the claims' measurement must be one of these
            (so an SGX MRENCLAVE can never satisfy a TDX entry, and vice versa).
            Empty with ``signers`` set: the rule identifies enclaves by signer
            (:attr:`identifies_by_signer`).
        signers: if non-empty, the claims' signer (MRSIGNER) must be one of these.
        contradictory: the rule is the intersection of two rules that no claims
            satisfy together (disjoint signer lists); it rejects everything.
        allow_debug: overrides :attr:`Policy.allow_debug` for this TEE when not ``None``.
        reference_values: claim-detail path → allowed values, compared as
            lowercase strings (e.g. ``{"rtmr0": {...}, "host_data": {...}}``). A
            detail that is missing from the claims fails the check.
        minimums: claim-detail path → minimum integer (e.g. ``{"isv_svn": 2,
            "reported_tcb.snp": 8}``). A missing or non-integer detail fails.
    """

    tee: TeeType
    measurements: frozenset[str] = field(default_factory=frozenset)
    signers: frozenset[str] = field(default_factory=frozenset)
    allow_debug: bool | None = None
    reference_values: Mapping[str, frozenset[str]] = field(default_factory=_empty_values, hash=False)
    minimums: Mapping[str, int] = field(default_factory=_empty_minimums, hash=False)
    contradictory: bool = False

    def __post_init__(self) -> None:
        # Normalize once so comparisons are case-insensitive and the rule is immutable.
        object.__setattr__(self, "measurements", _norm(self.measurements))
        object.__setattr__(self, "signers", _norm(self.signers))
        object.__setattr__(
            self,
            "reference_values",
            MappingProxyType({k: _norm(v) for k, v in self.reference_values.items()}),
        )
        object.__setattr__(self, "minimums", MappingProxyType({k: int(v) for k, v in self.minimums.items()}))

    @property
    def identifies_by_signer(self) -> bool:
        """Whether the rule accepts any measurement from its signers (SGX MRSIGNER identity).

        That is how SGX names "every release of this product": MRSIGNER plus
        ISV product id plus a minimum ISV SVN, instead of one MRENCLAVE per
        build. Policy documents only produce such rules with the product id
        and the minimum SVN set (:class:`~sealedml.attestation.policy_document.SgxSection`).
        """
        return not self.measurements and bool(self.signers) and not self.contradictory

    def verify(self, claims: Claims, *, policy_allows_debug: bool) -> None:
        """Raise :class:`PolicyError` unless ``claims`` satisfy this rule.

        Args:
            claims: verified claims of this rule's TEE type.
            policy_allows_debug: the enclosing policy's ``allow_debug``.

        Raises:
            PolicyError: with the exact reason.
        """
        tee = self.tee.value
        if self.contradictory:
            raise PolicyError(f"{tee}: the combined policies have no measurement or signer in common")
        allow_debug = policy_allows_debug if self.allow_debug is None else self.allow_debug
        if claims.debug and not allow_debug:
            raise PolicyError(f"{tee}: debug TEE not allowed")
        if self.measurements and claims.measurement.lower() not in self.measurements:
            raise PolicyError(f"{tee}: measurement {claims.measurement} not allowed")
        if self.signers and (claims.signer or "").lower() not in self.signers:
            raise PolicyError(f"{tee}: signer {claims.signer} not allowed")
        for path, allowed in sorted(self.reference_values.items()):
            value = _detail(claims.details, path)
            if value is None:
                raise PolicyError(f"{tee}: claim {path} missing")
            if _as_reference(value) not in allowed:
                raise PolicyError(f"{tee}: {path} {_as_reference(value)} not allowed")
        for path, minimum in sorted(self.minimums.items()):
            value = _detail(claims.details, path)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PolicyError(f"{tee}: claim {path} missing")
            if value < minimum:
                raise PolicyError(f"{tee}: {path} {value} below minimum {minimum}")

    def intersect(self, other: TeeRule) -> TeeRule:
        """The rule that accepts only what both rules accept (same TEE type).

        Raises:
            PolicyError: the rules are for different TEE types.
        """
        if other.tee is not self.tee:
            raise PolicyError("cannot intersect rules for different TEE types")
        # False wins; True only if both say True; otherwise defer to the policy.
        if self.allow_debug is False or other.allow_debug is False:
            allow_debug: bool | None = False
        elif self.allow_debug is True and other.allow_debug is True:
            allow_debug = True
        else:
            allow_debug = None
        values: dict[str, frozenset[str]] = dict(self.reference_values)
        for key, allowed in other.reference_values.items():
            values[key] = values[key] & allowed if key in values else allowed
        minimums: dict[str, int] = dict(self.minimums)
        for key, minimum in other.minimums.items():
            minimums[key] = max(minimums.get(key, minimum), minimum)
        measurements = (
            self.measurements & other.measurements
            if self.measurements and other.measurements
            else self.measurements | other.measurements
        )
        # Two signer (or measurement) lists with nothing in common accept nobody; an
        # empty result would read as "not checked", so the rule is marked instead.
        disjoint = any(
            mine and theirs and not mine & theirs
            for mine, theirs in ((self.signers, other.signers), (self.measurements, other.measurements))
        )
        return TeeRule(
            tee=self.tee,
            measurements=measurements,
            signers=_both(self.signers, other.signers),
            allow_debug=allow_debug,
            reference_values=values,
            minimums=minimums,
            contradictory=self.contradictory or other.contradictory or disjoint,
        )


def _signer_identity_meets(
    merged: TeeRule,
    mine: tuple[Policy, TeeRule | None],
    theirs: tuple[Policy, TeeRule | None],
) -> tuple[TeeRule, frozenset[str]]:
    """Resolve a merged rule where one side names its enclaves by signer and the other by measurement.

    A signer-identified side accepts whatever measurement the other side lists
    for the TEE (the merged rule still checks the signer); it must not widen the
    other side to *any* measurement. Returns the rule and the measurements the
    intersected policy gains.
    """
    (mine_policy, mine_rule), (their_policy, their_rule) = mine, theirs
    mine_by_signer = mine_rule is not None and mine_rule.identifies_by_signer
    theirs_by_signer = their_rule is not None and their_rule.identifies_by_signer
    if mine_by_signer == theirs_by_signer:
        return merged, frozenset()  # both by signer (merged keeps that), or neither
    listed_by = (their_policy, their_rule) if mine_by_signer else (mine_policy, mine_rule)
    policy, rule = listed_by
    listed = rule.measurements if rule is not None and rule.measurements else policy.measurements
    if not listed:
        return replace(merged, contradictory=True), frozenset()
    return replace(merged, measurements=listed), listed


def _empty_rules() -> Mapping[TeeType, TeeRule]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Policy:
    """Reference values a TEE's claims must match.

    Attributes:
        measurements: allowed primary measurements (hex). Empty denies all.
        tee_types: allowed TEE types; empty allows any type whose measurement is listed.
        allow_debug: accept debug-mode TEEs (never by default).
        tcb_statuses: accepted TCB statuses.
        signers: if non-empty, the signer measurement (MRSIGNER) must be one of these.
        tee_rules: per-TEE rules (:class:`TeeRule`), applied to claims of that TEE.
        accepted_advisories: if not ``None``, every advisory id in the claims must
            be listed here (``frozenset()`` rejects any advisory). ``None`` does not
            check advisories (the TCB status decides).
        max_collateral_age: if set, SGX/TDX claims must carry a collateral issue
            date (``details["collateral_issued"]``) no older than this at
            verification time.
    """

    measurements: frozenset[str] = field(default_factory=frozenset)
    tee_types: frozenset[TeeType] = field(default_factory=frozenset)
    allow_debug: bool = False
    tcb_statuses: frozenset[str] = DEFAULT_TCB_STATUSES
    signers: frozenset[str] = field(default_factory=frozenset)
    tee_rules: Mapping[TeeType, TeeRule] = field(default_factory=_empty_rules, hash=False)
    accepted_advisories: frozenset[str] | None = None
    max_collateral_age: timedelta | None = None

    def __post_init__(self) -> None:
        for tee, rule in self.tee_rules.items():
            if rule.tee is not tee:
                raise PolicyError(f"rule for {rule.tee.value} filed under {tee.value}")
        object.__setattr__(self, "tee_rules", MappingProxyType(dict(self.tee_rules)))

    @classmethod
    def for_measurements(cls, measurements: Iterable[str], **kwargs: object) -> Policy:
        """A policy allowing exactly ``measurements`` (other fields as keyword arguments)."""
        return cls(measurements=_norm(measurements), **kwargs)  # type: ignore[arg-type]

    def verify(self, claims: Claims, *, now: datetime | None = None) -> None:
        """Return if ``claims`` satisfy this policy.

        Args:
            claims: verified claims.
            now: the time the collateral age is measured at (default: now).

        Raises:
            PolicyError: with the exact reason (for the audit log, not for callers).
        """
        if self.denies_everything:
            raise PolicyError("empty policy: no measurement is allowed")
        if self.tee_types and claims.tee not in self.tee_types:
            raise PolicyError(f"TEE type {claims.tee.value} not allowed")
        rule = self.tee_rules.get(claims.tee)
        rule_allows_debug = rule is not None and rule.allow_debug is True
        if claims.debug and not (self.allow_debug or rule_allows_debug):
            raise PolicyError("debug TEE not allowed")
        by_signer = rule is not None and rule.identifies_by_signer
        if claims.measurement.lower() not in self.measurements and not by_signer:
            raise PolicyError(f"measurement {claims.measurement} not allowed")
        if self.signers and (claims.signer or "").lower() not in self.signers:
            raise PolicyError(f"signer {claims.signer} not allowed")
        if claims.tcb_status not in self.tcb_statuses:
            raise PolicyError(f"TCB status {claims.tcb_status} not accepted")
        if rule is not None:
            rule.verify(claims, policy_allows_debug=self.allow_debug)
        if self.accepted_advisories is not None:
            rejected = sorted(set(claims.advisory_ids) - self.accepted_advisories)
            if rejected:
                raise PolicyError(f"advisories not accepted: {', '.join(rejected)}")
        if self.max_collateral_age is not None and claims.tee in _COLLATERAL_TEES:
            self._check_collateral_age(claims, now)

    @property
    def denies_everything(self) -> bool:
        """No claims can satisfy the policy: no measurement listed and no rule naming a signer."""
        return not self.measurements and not any(rule.identifies_by_signer for rule in self.tee_rules.values())

    def _check_collateral_age(self, claims: Claims, now: datetime | None) -> None:
        issued_text = claims.details.get("collateral_issued")
        if not isinstance(issued_text, str):
            raise PolicyError("collateral issue date unknown; maximum age cannot be checked")
        try:
            issued = datetime.fromisoformat(issued_text)
        except ValueError as exc:
            raise PolicyError("collateral issue date malformed") from exc
        if issued.tzinfo is None:
            issued = issued.replace(tzinfo=UTC)
        at = now or datetime.now(UTC)
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        age = at - issued
        if self.max_collateral_age is not None and age > self.max_collateral_age:
            raise PolicyError(f"collateral issued {issued.isoformat()} is older than {self.max_collateral_age}")

    def _debug_for(self, tee: TeeType) -> bool:
        rule = self.tee_rules.get(tee)
        if rule is not None and rule.allow_debug is not None:
            return rule.allow_debug
        return self.allow_debug

    def intersect(self, other: Policy) -> Policy:
        """The policy that accepts only what both accept."""
        tee_types = (
            self.tee_types & other.tee_types
            if self.tee_types and other.tee_types
            else self.tee_types or other.tee_types
        )
        signers = self.signers & other.signers if self.signers and other.signers else self.signers or other.signers
        rules: dict[TeeType, TeeRule] = {}
        for tee in {*self.tee_rules, *other.tee_rules}:
            mine, theirs = self.tee_rules.get(tee), other.tee_rules.get(tee)
            merged = mine if mine is not None else theirs
            if merged is None:  # pragma: no cover - tee comes from one of the two maps
                continue
            if mine is not None and theirs is not None:
                merged = mine.intersect(theirs)
            # A rule's ``None`` defers to its own policy's flag: resolve it on each
            # side before combining, so one side's rule cannot re-enable debug
            # that the other side's policy forbids.
            debug_mine = self._debug_for(tee)
            debug_theirs = other._debug_for(tee)
            rules[tee] = replace(merged, allow_debug=debug_mine and debug_theirs)
        if self.accepted_advisories is None:
            advisories = other.accepted_advisories
        elif other.accepted_advisories is None:
            advisories = self.accepted_advisories
        else:
            advisories = self.accepted_advisories & other.accepted_advisories
        ages = [a for a in (self.max_collateral_age, other.max_collateral_age) if a is not None]
        measurements = self.measurements & other.measurements
        for tee, merged_rule in list(rules.items()):
            rules[tee], extra = _signer_identity_meets(
                merged_rule, (self, self.tee_rules.get(tee)), (other, other.tee_rules.get(tee))
            )
            measurements |= extra
        if self.tee_types and other.tee_types and not tee_types:
            # Both restrict TEE types and no type is in both: nothing is acceptable. An
            # empty ``tee_types`` would read as "any type", so empty the measurements
            # and the rules, which makes the result deny everything.
            measurements = frozenset()
            rules = {}
        if self.signers and other.signers and not signers:
            # Flat signer lists with nothing in common: likewise nothing is acceptable.
            measurements = frozenset()
            rules = {tee: replace(rule, contradictory=True) for tee, rule in rules.items()}
        return Policy(
            measurements=measurements,
            tee_types=tee_types,
            allow_debug=self.allow_debug and other.allow_debug,
            tcb_statuses=self.tcb_statuses & other.tcb_statuses,
            signers=signers,
            tee_rules=rules,
            accepted_advisories=advisories,
            max_collateral_age=min(ages) if ages else None,
        )
