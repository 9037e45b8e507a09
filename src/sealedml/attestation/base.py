"""Evidence, claims and the two plug-in points: :class:`Attester` and :class:`Verifier`.

An *attester* runs inside a TEE and produces evidence whose report data binds
a fresh nonce and the public key a secret will be sealed to
(:func:`report_data_binding`). A *verifier* turns evidence into normalized
:class:`Claims`, raising :class:`~sealedml.errors.EvidenceError` if the evidence
is malformed or not authentic. A :class:`~sealedml.attestation.policy.Policy`
then decides whether the claims are acceptable.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from sealedml.errors import EvidenceError

__all__ = [
    "REPORT_DATA_LABEL",
    "Attester",
    "Claims",
    "Evidence",
    "TeeType",
    "Verifier",
    "check_binding",
    "report_data_binding",
]

#: Domain label of the report-data binding (DESIGN §attestation, "Freshness and binding").
REPORT_DATA_LABEL = b"sealedml/v1/report-data"


class TeeType(str, enum.Enum):
    """Kinds of trusted execution environment SealedML knows."""

    SIMULATED = "simulated"
    SGX = "sgx"
    TDX = "tdx"
    SEV_SNP = "sev-snp"


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def report_data_binding(nonce: bytes, public_key: bytes) -> bytes:
    """Return the 64 bytes of report data that bind ``nonce`` and ``public_key``.

    ``SHA-512(label ‖ len ‖ nonce ‖ len ‖ public_key)``; the length prefixes make
    the encoding unambiguous.
    """
    return hashlib.sha512(REPORT_DATA_LABEL + _lp(nonce) + _lp(public_key)).digest()


def check_binding(claims: Claims, nonce: bytes, public_key: bytes) -> None:
    """Raise :class:`EvidenceError` unless ``claims.report_data`` binds ``nonce`` and ``public_key``."""
    expected = report_data_binding(nonce, public_key)
    if not hmac.compare_digest(claims.report_data[:64], expected):
        raise EvidenceError("report data does not bind the nonce and public key")


@dataclass(frozen=True)
class Evidence:
    """Raw attestation evidence as produced by an attester.

    Attributes:
        tee: which kind of TEE produced it.
        data: the evidence bytes (a quote, a report, or simulated evidence).
        aux: optional auxiliary bytes (for SEV-SNP: the certificate table).
    """

    tee: TeeType
    data: bytes
    aux: bytes = b""


@dataclass(frozen=True)
class Claims:
    """Normalized, *verified* claims about a TEE instance.

    Attributes:
        tee: the TEE type.
        measurement: the primary code measurement, lowercase hex (simulated
            measurement, MRENCLAVE, MRTD, or SNP launch measurement).
        report_data: the 64 bytes of caller-chosen data bound into the evidence.
        debug: true if the TEE runs in a debug mode that exposes its memory.
        tcb_status: platform TCB status (``"UpToDate"`` for simulated evidence).
        advisory_ids: security advisories that apply to the platform's TCB.
        signer: the signer measurement where the TEE has one (MRSIGNER), hex.
        details: TEE-specific claims (RTMRs, SVNs, attributes, chip id, ...).
        collateral_expires: when the collateral behind this verdict expires, if known.
    """

    tee: TeeType
    measurement: str
    report_data: bytes
    debug: bool
    tcb_status: str = "UpToDate"
    advisory_ids: tuple[str, ...] = ()
    signer: str | None = None
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    collateral_expires: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable view (bytes as hex)."""
        return {
            "tee": self.tee.value,
            "measurement": self.measurement,
            "report_data": self.report_data.hex(),
            "debug": self.debug,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "signer": self.signer,
            "details": dict(self.details),
            "collateral_expires": (self.collateral_expires.isoformat() if self.collateral_expires else None),
        }


class Attester(abc.ABC):
    """Produces evidence from inside a TEE."""

    tee: TeeType

    @abc.abstractmethod
    def evidence(self, report_data: bytes) -> Evidence:
        """Return evidence whose report data is exactly ``report_data`` (64 bytes).

        Raises:
            AttestationError: the TEE interface failed.
        """

    def attest(self, nonce: bytes, public_key: bytes) -> Evidence:
        """Evidence binding ``nonce`` and ``public_key`` (see :func:`report_data_binding`)."""
        return self.evidence(report_data_binding(nonce, public_key))

    @property
    @abc.abstractmethod
    def measurement(self) -> str:
        """This instance's own measurement (hex), for display and policy set-up."""


class Verifier(abc.ABC):
    """Turns evidence into verified claims."""

    tee: TeeType

    @abc.abstractmethod
    def verify(self, evidence: Evidence, *, now: datetime | None = None) -> Claims:
        """Verify ``evidence`` at time ``now`` (default: the current time).

        Raises:
            EvidenceError: malformed or unauthentic evidence.
            CollateralError: collateral missing or outside its validity window.
        """
