"""Attestation policy as a YAML or JSON document.

A policy document lists, per TEE, the reference values a runtime must match;
:func:`load_policy` validates it (pydantic, ``frozen=True, extra="forbid"``)
and turns it into a :class:`~sealedml.attestation.policy.Policy`::

    version: 1
    tcb_statuses: [UpToDate, SWHardeningNeeded]   # default: [UpToDate]
    accepted_advisories: [INTEL-SA-00615]          # default: not checked
    max_collateral_age: 30d                        # s, m, h, d, w; default: not checked
    sgx:
      mrenclave: [33d8736d...]                     # 64 hex digits each; or leave out and
      mrsigner: [815f42f1...]                      # name the enclave by signer: mrsigner,
      isv_prod_id: [0]                             # isv_prod_id and min_isv_svn all set
      min_isv_svn: 0
      min_tcb_eval_data_number: 17
      allow_debug: false
    tdx:
      mrtd: [91eb2b44...]                          # required, 96 hex digits each
      rtmr: {rtmr0: [...], rtmr1: [...]}           # keys rtmr0-rtmr3 (or 0-3)
      mrseam: [...]
      mrconfigid: [...]
      mrowner: [...]
      mrownerconfig: [...]
    sev-snp:
      measurement: [b07af962...]                   # required, 96 hex digits each
      host_data: [...]                             # 64 hex digits
      id_key_digest: [...]
      author_key_digest: [...]
      family_id: [...]                             # 32 hex digits
      image_id: [...]
      vmpl: [0]
      signing_key: [vcek]                          # vcek and/or vlek
      min_tcb: {bootloader: 2, tee: 0, snp: 5, microcode: 68}
      min_guest_svn: 0

Every list is an allow-list (empty or absent: not checked); every ``min_`` is a
lower bound. A section's presence allows that TEE; a document without sections
is an empty policy and denies everything. Documents compose with
:meth:`Policy.intersect <sealedml.attestation.policy.Policy.intersect>`.

Errors: unreadable input or invalid YAML/JSON syntax raise
:class:`~sealedml.errors.ConfigurationError`; a document that parses but does
not validate raises :class:`~sealedml.errors.PolicyError`. Both carry one line
naming the offending field, e.g. ``policy sgx.mrenclave.0: expected 64 hex digits``.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from sealedml.attestation.base import TeeType
from sealedml.attestation.policy import Policy, TeeRule
from sealedml.errors import ConfigurationError, PolicyError

__all__ = [
    "KNOWN_TCB_STATUSES",
    "MAX_POLICY_BYTES",
    "PolicyDocument",
    "describe_policy",
    "load_policy",
    "load_policy_document",
    "parse_duration",
    "policy_from_document",
]

#: Largest policy document accepted.
MAX_POLICY_BYTES = 64 * 1024

#: TCB statuses a policy may accept (Intel PCS API v4 ``tcbStatus`` values).
#: ``Revoked`` is deliberately absent: a revoked platform is never acceptable.
KNOWN_TCB_STATUSES: frozenset[str] = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "TDRelaunchAdvised",
        "TDRelaunchAdvisedConfigurationNeeded",
    }
)

_HEX = re.compile(r"^[0-9a-fA-F]*$")
_ADVISORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_DURATION_SECONDS = 3650 * 86400


def _hex_of(n_bytes: int) -> Any:
    def check(value: str) -> str:
        if len(value) != 2 * n_bytes or not _HEX.match(value):
            raise ValueError(f"expected {2 * n_bytes} hex digits")
        return value.lower()

    return AfterValidator(check)


def _check_status(value: str) -> str:
    if value == "Revoked":
        raise ValueError("Revoked can never be accepted")
    if value not in KNOWN_TCB_STATUSES:
        raise ValueError(f"unknown TCB status {value!r}")
    return value


def _check_advisory(value: str) -> str:
    if not _ADVISORY.match(value):
        raise ValueError("not an advisory id")
    return value.upper()


def parse_duration(value: str | int) -> timedelta:
    """Parse ``"30d"``, ``"12h"``, ``"90m"``, ``"3600s"``, ``"2w"`` or seconds.

    Raises:
        ValueError: not a positive duration of at most ten years.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30d")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected a duration such as 30d, 12h or 3600s")
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("duration must be positive")
    if seconds > _MAX_DURATION_SECONDS:
        raise ValueError("duration must be at most 3650d")
    return timedelta(seconds=seconds)


Hex16 = Annotated[str, _hex_of(16)]
Hex32 = Annotated[str, _hex_of(32)]
Hex48 = Annotated[str, _hex_of(48)]
U8 = Annotated[int, Field(ge=0, le=255)]
U16 = Annotated[int, Field(ge=0, le=0xFFFF)]
U32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
TcbStatus = Annotated[str, AfterValidator(_check_status)]
AdvisoryId = Annotated[str, AfterValidator(_check_advisory)]


def _duration_before(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str | int):
        return parse_duration(value)
    raise ValueError("expected a duration such as 30d")


Duration = Annotated[timedelta, BeforeValidator(_duration_before)]

_RTMR_KEYS = {"0": "rtmr0", "1": "rtmr1", "2": "rtmr2", "3": "rtmr3"}


def _rtmr_keys(value: Any) -> Any:
    # YAML reads ``{0: [...]}`` with an integer key; accept 0-3 as well as "rtmr0".
    if isinstance(value, dict):
        return {(str(k) if isinstance(k, int) and not isinstance(k, bool) else k): v for k, v in value.items()}
    return value


def _check_rtmrs(value: dict[str, list[str]]) -> dict[str, list[str]]:
    normalized: dict[str, list[str]] = {}
    for key, allowed in value.items():
        name = _RTMR_KEYS.get(key, key.lower())
        if name not in _RTMR_KEYS.values():
            raise ValueError(f"unknown RTMR {key!r}; use rtmr0-rtmr3")
        if name in normalized:
            raise ValueError(f"{name} listed twice")
        normalized[name] = allowed
    return normalized


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=False)


class SgxSection(_Section):
    """Reference values for Intel SGX enclaves.

    Either ``mrenclave`` names the builds accepted, or (signer identity) it is
    left out and ``mrsigner``, ``isv_prod_id`` and ``min_isv_svn`` together
    name every release of one product from one signer. The second form is what
    lets two enclaves trust each other without each one's measurement
    containing the other's.
    """

    mrenclave: list[Hex32] = Field(default_factory=list)
    mrsigner: list[Hex32] = Field(default_factory=list)
    isv_prod_id: list[U16] = Field(default_factory=list)
    min_isv_svn: U16 | None = None
    min_tcb_eval_data_number: U32 | None = None
    allow_debug: bool = False

    @model_validator(mode="after")
    def _named_by_measurement_or_signer(self) -> SgxSection:
        if not self.mrenclave and not (self.mrsigner and self.isv_prod_id and self.min_isv_svn is not None):
            raise ValueError("list mrenclave, or name the enclave by signer with mrsigner, isv_prod_id and min_isv_svn")
        return self


class TdxSection(_Section):
    """Reference values for Intel TDX trust domains."""

    mrtd: list[Hex48] = Field(min_length=1)
    rtmr: Annotated[dict[str, list[Hex48]], BeforeValidator(_rtmr_keys), AfterValidator(_check_rtmrs)] = Field(
        default_factory=dict
    )
    mrseam: list[Hex48] = Field(default_factory=list)
    mrconfigid: list[Hex48] = Field(default_factory=list)
    mrowner: list[Hex48] = Field(default_factory=list)
    mrownerconfig: list[Hex48] = Field(default_factory=list)
    min_tcb_eval_data_number: U32 | None = None
    allow_debug: bool = False


class SnpMinTcb(_Section):
    """Minimum security patch levels of an SEV-SNP platform (REPORTED_TCB)."""

    bootloader: U8 | None = None
    tee: U8 | None = None
    snp: U8 | None = None
    microcode: U8 | None = None
    fmc: U8 | None = None


class SevSnpSection(_Section):
    """Reference values for AMD SEV-SNP guests."""

    measurement: list[Hex48] = Field(min_length=1)
    host_data: list[Hex32] = Field(default_factory=list)
    id_key_digest: list[Hex48] = Field(default_factory=list)
    author_key_digest: list[Hex48] = Field(default_factory=list)
    family_id: list[Hex16] = Field(default_factory=list)
    image_id: list[Hex16] = Field(default_factory=list)
    vmpl: list[Annotated[int, Field(ge=0, le=3)]] = Field(default_factory=list)
    signing_key: list[Literal["vcek", "vlek"]] = Field(default_factory=list)
    min_tcb: SnpMinTcb | None = None
    min_guest_svn: U32 | None = None
    allow_debug: bool = False


class PolicyDocument(_Section):
    """A validated policy document (version 1)."""

    version: Literal[1]
    sgx: SgxSection | None = None
    tdx: TdxSection | None = None
    sev_snp: SevSnpSection | None = Field(default=None, alias="sev-snp")
    tcb_statuses: list[TcbStatus] = Field(default_factory=lambda: ["UpToDate"])
    accepted_advisories: list[AdvisoryId] | None = None
    max_collateral_age: Duration | None = None


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]
    """Safe YAML without aliases (no expansion bombs) and without duplicate keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases are not allowed in policy documents", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError as exc:
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be scalars", key_node.start_mark
                ) from exc
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _looks_like_path(source: str) -> bool:
    if "\n" in source or len(source) > 4096 or source.lstrip().startswith(("{", "version")):
        return False
    if source.strip().endswith((".yaml", ".yml", ".json")):
        return True
    try:
        return Path(source).is_file()
    except (OSError, ValueError):
        return False


def _read_source(source: str | bytes | Path) -> str:
    if isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
        path = Path(source)
        try:
            if path.stat().st_size > MAX_POLICY_BYTES:
                raise ConfigurationError(f"policy file {path} is larger than {MAX_POLICY_BYTES} bytes")
            data = path.read_bytes()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigurationError(f"cannot read policy file {path}: {reason}") from exc
    elif isinstance(source, bytes):
        data = source
    else:
        data = source.encode("utf-8", "surrogatepass")
    if len(data) > MAX_POLICY_BYTES:
        raise ConfigurationError(f"policy document is larger than {MAX_POLICY_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError("policy document is not UTF-8") from exc


def _parse_text(text: str) -> Any:
    stripped = text.lstrip()
    try:
        if stripped.startswith("{"):
            return json.loads(text, object_pairs_hook=_no_duplicate_pairs)
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ConfigurationError(f"policy document is not valid YAML/JSON: {reason}") from exc


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _one_line(error: ValidationError) -> str:
    errors = error.errors(include_url=False)
    if not errors:
        return "policy document invalid"
    first = errors[0]
    location = ".".join(str(part) for part in first.get("loc", ())) or "document"
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return " ".join(f"policy {location}: {message}{more}".split())


def load_policy_document(source: str | bytes | Path) -> PolicyDocument:
    """Read and validate a policy document.

    Args:
        source: a path (``Path``, or a ``str`` ending in .yaml/.yml/.json), or
            the document text (YAML or JSON) as ``str`` / ``bytes``.

    Returns:
        The validated document.

    Raises:
        ConfigurationError: unreadable file or invalid YAML/JSON syntax.
        PolicyError: the document does not match the schema (the message names the field).
    """
    data = _parse_text(_read_source(source))
    if not isinstance(data, dict):
        raise PolicyError("policy document must be a mapping with a version field")
    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_one_line(exc)) from exc
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: odd YAML scalars
        raise PolicyError(f"policy document invalid: {exc}") from exc


def _values(**fields: list[Any]) -> dict[str, frozenset[str]]:
    return {name: frozenset(str(v).lower() for v in values) for name, values in fields.items() if values}


def policy_from_document(document: PolicyDocument) -> Policy:
    """Turn a validated document into a :class:`Policy`.

    Measurements go both into the flat allow-list (so intersections keep
    working) and into a per-TEE :class:`TeeRule` (so an SGX value can never
    admit a TDX guest); signer, RTMR and SNP reference values and minimums are
    rule-only.

    Args:
        document: the validated document.

    Returns:
        The policy.
    """
    rules: dict[TeeType, TeeRule] = {}
    measurements: set[str] = set()
    allow_debug = False
    if document.sgx is not None:
        sgx = document.sgx
        minimums: dict[str, int] = {}
        if sgx.min_isv_svn is not None:
            minimums["isv_svn"] = sgx.min_isv_svn
        if sgx.min_tcb_eval_data_number is not None:
            minimums["tcb_eval_data_number"] = sgx.min_tcb_eval_data_number
        rules[TeeType.SGX] = TeeRule(
            tee=TeeType.SGX,
            measurements=frozenset(sgx.mrenclave),
            signers=frozenset(sgx.mrsigner),
            allow_debug=sgx.allow_debug,
            reference_values=_values(isv_prod_id=sgx.isv_prod_id),
            minimums=minimums,
        )
        measurements.update(sgx.mrenclave)
        allow_debug = allow_debug or sgx.allow_debug
    if document.tdx is not None:
        tdx = document.tdx
        values = _values(
            mrseam=tdx.mrseam,
            mrconfigid=tdx.mrconfigid,
            mrowner=tdx.mrowner,
            mrownerconfig=tdx.mrownerconfig,
            **tdx.rtmr,
        )
        tdx_minimums: dict[str, int] = {}
        if tdx.min_tcb_eval_data_number is not None:
            tdx_minimums["tcb_eval_data_number"] = tdx.min_tcb_eval_data_number
        rules[TeeType.TDX] = TeeRule(
            tee=TeeType.TDX,
            measurements=frozenset(tdx.mrtd),
            allow_debug=tdx.allow_debug,
            reference_values=values,
            minimums=tdx_minimums,
        )
        measurements.update(tdx.mrtd)
        allow_debug = allow_debug or tdx.allow_debug
    if document.sev_snp is not None:
        snp = document.sev_snp
        snp_minimums: dict[str, int] = {}
        if snp.min_tcb is not None:
            for part, minimum in snp.min_tcb.model_dump().items():
                if minimum is not None:
                    snp_minimums[f"reported_tcb.{part}"] = minimum
        if snp.min_guest_svn is not None:
            snp_minimums["guest_svn"] = snp.min_guest_svn
        rules[TeeType.SEV_SNP] = TeeRule(
            tee=TeeType.SEV_SNP,
            measurements=frozenset(snp.measurement),
            allow_debug=snp.allow_debug,
            reference_values=_values(
                host_data=snp.host_data,
                id_key_digest=snp.id_key_digest,
                author_key_digest=snp.author_key_digest,
                family_id=snp.family_id,
                image_id=snp.image_id,
                vmpl=snp.vmpl,
                signing_key=snp.signing_key,
            ),
            minimums=snp_minimums,
        )
        measurements.update(snp.measurement)
        allow_debug = allow_debug or snp.allow_debug
    return Policy(
        measurements=frozenset(m.lower() for m in measurements),
        tee_types=frozenset(rules),
        allow_debug=allow_debug,
        tcb_statuses=frozenset(document.tcb_statuses),
        tee_rules=rules,
        accepted_advisories=(
            frozenset(document.accepted_advisories) if document.accepted_advisories is not None else None
        ),
        max_collateral_age=document.max_collateral_age,
    )


def load_policy(path_or_text: str | bytes | Path) -> Policy:
    """Load a policy document (YAML or JSON) as a :class:`Policy`.

    Args:
        path_or_text: see :func:`load_policy_document`.

    Returns:
        The policy (an empty document gives a policy that denies everything).

    Raises:
        ConfigurationError: unreadable file or invalid YAML/JSON syntax.
        PolicyError: the document does not match the schema.
    """
    return policy_from_document(load_policy_document(path_or_text))


def describe_policy(policy: Policy) -> dict[str, Any]:
    """A JSON-serializable summary of a policy (for ``sealedml attest policy check``).

    Args:
        policy: the policy.

    Returns:
        Its fields, sorted, with sets as lists.
    """
    rules: dict[str, Any] = {}
    for tee, rule in sorted(policy.tee_rules.items(), key=lambda item: item[0].value):
        rules[tee.value] = {
            "measurements": sorted(rule.measurements),
            "signers": sorted(rule.signers),
            "by_signer": rule.identifies_by_signer,
            "allow_debug": rule.allow_debug,
            "reference_values": {k: sorted(v) for k, v in sorted(rule.reference_values.items())},
            "minimums": dict(sorted(rule.minimums.items())),
        }
    return {
        "denies_everything": policy.denies_everything,
        "tee_types": sorted(t.value for t in policy.tee_types),
        "measurements": sorted(policy.measurements),
        "allow_debug": policy.allow_debug,
        "tcb_statuses": sorted(policy.tcb_statuses),
        "accepted_advisories": (sorted(policy.accepted_advisories) if policy.accepted_advisories is not None else None),
        "max_collateral_age_seconds": (
            int(policy.max_collateral_age.total_seconds()) if policy.max_collateral_age is not None else None
        ),
        "tee_rules": rules,
    }
