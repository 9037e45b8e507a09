"""Intel SGX and TDX quote verification (ECDSA / DCAP) with ``dcap-qvl``.

The cryptographic work — the PCK certificate chain up to Intel's pinned SGX
root CA, the CRLs, the QE report signature and its binding to the attestation
key, the quote signature, and the TCB level matching against Intel-signed TCB
info and QE identity — is done by the ``dcap-qvl`` package (a Rust port of
Intel's Quote Verification Library). This module adds what SealedML needs
around it:

- a strict pre-parse of the quote header so a quote of the wrong TEE or an
  unknown version is rejected before anything else
  (:class:`~sealedml.errors.EvidenceError`);
- a freshness check of the collateral at ``now``, so expired collateral is a
  :class:`~sealedml.errors.CollateralError` with a precise reason;
- translation of every ``dcap_qvl`` exception into the package error tree;
- normalized :class:`~sealedml.attestation.base.Claims`, parsed from the
  authenticated quote body at the offsets of Intel's quote format.

``dcap_qvl.QuoteVerifier.verify_with_policy`` with ``QuotePolicy.claims_only``
is used rather than ``dcap_qvl.verify``: it runs the same verification (the two
agree on every single-bit flip of the SGX and TDX test quotes) and also returns
the TCB evaluation number and the collateral's issue and expiry dates, while
leaving the TCB-status decision to :class:`~sealedml.attestation.policy.Policy`.

References: "Intel SGX ECDSA Quote Library API" (DCAP), Appendix A "ECDSA
Quote Format" — A.3 Quote Header, A.4 Enclave Report Body — and "Intel TDX
DCAP Quoting Library API", Appendix A — A.3 Quote Header, A.3.2 TD Quote Body
(TDREPORT 1.0 and 1.5), A.4 Quote v5 body descriptor.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import dcap_qvl

from sealedml.attestation.base import Claims, Evidence, TeeType, Verifier
from sealedml.attestation.collateral import (
    IntelCollateralSource,
    LocalCollateral,
    collateral_window,
)
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

__all__ = [
    "MAX_QUOTE_BYTES",
    "DcapVerifier",
    "QuoteLayout",
    "SgxDcapVerifier",
    "TdxDcapVerifier",
    "parse_quote_layout",
    "quote_report_data",
]

#: Largest quote accepted (real quotes with an embedded PCK chain are ~5 KiB).
MAX_QUOTE_BYTES = 64 * 1024

_HEADER_LEN = 48  # A.3: version, att. key type, TEE type, QE/PCE SVN, vendor id, user data
_SGX_BODY_LEN = 384  # A.4: SGX enclave report body
_TD10_BODY_LEN = 584  # TDREPORT 1.0 body (TDX 1.0)
_TD15_BODY_LEN = 648  # TDREPORT 1.5 body (TDX 1.5: + TEE_TCB_SVN2, MRSERVICETD)
_TEE_SGX = 0x00000000
_TEE_TDX = 0x00000081
_ATT_KEY_ECDSA_P256 = 2
_ATT_KEY_ECDSA_P384 = 3


@dataclass(frozen=True)
class QuoteLayout:
    """Where the report body of a DCAP quote is, from its header.

    Attributes:
        version: quote format version (3, 4 or 5).
        tee: ``TeeType.SGX`` or ``TeeType.TDX``.
        body_kind: ``"sgx"``, ``"td10"`` or ``"td15"``.
        body_offset: offset of the report body in the quote.
        body_len: length of the report body.
    """

    version: int
    tee: TeeType
    body_kind: str
    body_offset: int
    body_len: int

    @property
    def signed_len(self) -> int:
        """Length of the signed region (header + body, plus the v5 body descriptor)."""
        return self.body_offset + self.body_len


def parse_quote_layout(quote: bytes) -> QuoteLayout:
    """Parse a DCAP quote header and locate its report body.

    v3 quotes are SGX only; v4 quotes carry the TEE type in the header
    (0x00 SGX, 0x81 TDX); v5 quotes add a body descriptor after the header
    (u16 type: 1 SGX, 2 TDREPORT 1.0, 3 TDREPORT 1.5; u32 size).

    Args:
        quote: the raw quote.

    Returns:
        The layout.

    Raises:
        EvidenceError: truncated quote, unknown version, TEE type or body type.
    """
    if len(quote) > MAX_QUOTE_BYTES:
        raise EvidenceError("quote too large")
    if len(quote) < _HEADER_LEN:
        raise EvidenceError("quote truncated: shorter than its header")
    version, key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    if key_type not in (_ATT_KEY_ECDSA_P256, _ATT_KEY_ECDSA_P384):
        raise EvidenceError(f"unsupported attestation key type {key_type}")
    if version == 3:
        # v3 is SGX only; the 4 bytes after the key type are reserved.
        layout = QuoteLayout(3, TeeType.SGX, "sgx", _HEADER_LEN, _SGX_BODY_LEN)
    elif version == 4:
        if tee_type == _TEE_SGX:
            layout = QuoteLayout(4, TeeType.SGX, "sgx", _HEADER_LEN, _SGX_BODY_LEN)
        elif tee_type == _TEE_TDX:
            layout = QuoteLayout(4, TeeType.TDX, "td10", _HEADER_LEN, _TD10_BODY_LEN)
        else:
            raise EvidenceError(f"unknown TEE type 0x{tee_type:x} in quote header")
    elif version == 5:
        if len(quote) < _HEADER_LEN + 6:
            raise EvidenceError("quote truncated: no v5 body descriptor")
        body_type, body_size = struct.unpack_from("<HI", quote, _HEADER_LEN)
        kinds = {
            1: ("sgx", _SGX_BODY_LEN, _TEE_SGX),
            2: ("td10", _TD10_BODY_LEN, _TEE_TDX),
            3: ("td15", _TD15_BODY_LEN, _TEE_TDX),
        }
        if body_type not in kinds:
            raise EvidenceError(f"unknown quote v5 body type {body_type}")
        kind, expected_len, expected_tee = kinds[body_type]
        if body_size != expected_len:
            raise EvidenceError(f"quote v5 body size {body_size} != {expected_len}")
        if tee_type != expected_tee:
            raise EvidenceError("quote v5 body type does not match the header's TEE type")
        tee = TeeType.SGX if expected_tee == _TEE_SGX else TeeType.TDX
        layout = QuoteLayout(5, tee, kind, _HEADER_LEN + 6, expected_len)
    else:
        raise EvidenceError(f"unsupported quote version {version}")
    # The signature section follows the body: u32 length, then the signature data.
    if len(quote) < layout.signed_len + 4:
        raise EvidenceError("quote truncated: no signature section")
    return layout


def quote_report_data(quote: bytes) -> bytes:
    """The 64 bytes of report data in a DCAP quote (not verified).

    Raises:
        EvidenceError: the quote is malformed.
    """
    layout = parse_quote_layout(quote)
    # REPORTDATA is the last 64 bytes of the SGX body (offset 320) and at
    # offset 520 of both TDREPORT bodies.
    offset = 320 if layout.body_kind == "sgx" else 520
    start = layout.body_offset + offset
    return bytes(quote[start : start + 64])


def _hex(data: bytes) -> str:
    return bytes(data).hex()


def _sgx_body_claims(body: bytes) -> tuple[str, str, bytes, bool, dict[str, Any]]:
    """Claims from an SGX report body (A.4 Enclave Report Body)."""
    attributes = body[48:64]
    flags = int.from_bytes(attributes[:8], "little")
    details: dict[str, Any] = {
        "cpu_svn": _hex(body[0:16]),
        "misc_select": int.from_bytes(body[16:20], "little"),
        "attributes": _hex(attributes),
        "isv_prod_id": int.from_bytes(body[256:258], "little"),
        "isv_svn": int.from_bytes(body[258:260], "little"),
    }
    # ATTRIBUTES.FLAGS bit 1 = DEBUG (Intel SDM Vol. 3D, SECS.ATTRIBUTES).
    debug = bool(flags & 0x2)
    return _hex(body[64:96]), _hex(body[128:160]), bytes(body[320:384]), debug, details


def _td_body_claims(body: bytes, kind: str) -> tuple[str, bytes, bool, dict[str, Any]]:
    """Claims from a TD quote body (TDREPORT 1.0 / 1.5)."""
    td_attributes = body[120:128]
    details: dict[str, Any] = {
        "tee_tcb_svn": _hex(body[0:16]),
        "mrseam": _hex(body[16:64]),
        "mrsigner_seam": _hex(body[64:112]),
        "seam_attributes": _hex(body[112:120]),
        "td_attributes": _hex(td_attributes),
        "xfam": _hex(body[128:136]),
        "mrconfigid": _hex(body[184:232]),
        "mrowner": _hex(body[232:280]),
        "mrownerconfig": _hex(body[280:328]),
        "rtmr0": _hex(body[328:376]),
        "rtmr1": _hex(body[376:424]),
        "rtmr2": _hex(body[424:472]),
        "rtmr3": _hex(body[472:520]),
    }
    if kind == "td15":
        details["tee_tcb_svn2"] = _hex(body[584:600])
        details["mrservicetd"] = _hex(body[600:648])
    # TDATTRIBUTES bit 0 = TUD.DEBUG (Intel TDX Module ABI, TD attributes).
    debug = bool(td_attributes[0] & 0x1)
    return _hex(body[136:184]), bytes(body[520:584]), debug, details


# Messages of dcap-qvl errors that are about the collateral (its dates, its
# signatures, its format) rather than about the quote.
_COLLATERAL_MESSAGE = re.compile(
    r"expired|issue date|in the future|not yet valid|TCB ?Info|QE ?Identity|Enclave ?Identity"
    r"|CRL|revocation list|collateral|nextUpdate|issueDate|Failed to parse JSON",
    re.IGNORECASE,
)


def _translate(exc: BaseException) -> EvidenceError | CollateralError:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if len(message) > 300:
        message = message[:300] + "..."
    if _COLLATERAL_MESSAGE.search(message):
        return CollateralError(f"DCAP collateral rejected: {message}")
    return EvidenceError(f"DCAP quote rejected: {message}")


@functools.lru_cache(maxsize=32)
def _collateral_object(text: str) -> Any:
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pyo3 panics derive from BaseException
        raise CollateralError(f"collateral malformed: {' '.join(str(exc).split())[:200]}") from exc


@functools.lru_cache(maxsize=32)
def _cached_window(text: str) -> tuple[datetime, datetime]:
    window = collateral_window(text)
    return window.issued, window.expires


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def _from_unix(value: Any) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**40:
        return datetime.fromtimestamp(value, UTC)
    return None


class DcapVerifier(Verifier):
    """Verifies Intel DCAP quotes of one TEE type (SGX or TDX).

    Args:
        tee: ``TeeType.SGX`` or ``TeeType.TDX``.
        collateral: where collateral comes from: an
            :class:`~sealedml.attestation.collateral.IntelCollateralSource`, or a
            path / JSON text for :class:`~sealedml.attestation.collateral.LocalCollateral`.
        root_ca_der: a different root CA (DER) to pin instead of Intel's SGX
            root CA built into ``dcap-qvl`` — for test infrastructures only.

    Raises:
        ConfigurationError: unsupported TEE type or unreadable collateral file.
    """

    def __init__(
        self,
        tee: TeeType,
        collateral: IntelCollateralSource | Path | str,
        *,
        root_ca_der: bytes | None = None,
    ) -> None:
        if tee not in (TeeType.SGX, TeeType.TDX):
            raise ConfigurationError(f"DCAP verifies SGX and TDX quotes, not {tee.value}")
        self.tee = tee
        self._source = collateral if isinstance(collateral, IntelCollateralSource) else LocalCollateral(collateral)
        try:
            self._qvl = dcap_qvl.QuoteVerifier(root_ca_der)
        except Exception as exc:
            raise ConfigurationError(f"bad root CA for DCAP verification: {exc}") from exc

    def verify(self, evidence: Evidence, *, now: datetime | None = None) -> Claims:
        """Verify a quote at ``now`` and return its claims.

        Args:
            evidence: ``Evidence`` of this verifier's TEE type; ``data`` is the raw quote.
            now: verification time (default: the current time).

        Returns:
            Claims: measurement (MRENCLAVE / MRTD), signer (MRSIGNER, SGX only),
            report data, debug flag, TCB status, advisories, TEE details,
            collateral expiry.

        Raises:
            EvidenceError: malformed, unauthentic or revoked quote, or a quote of
                another TEE type.
            CollateralError: collateral missing, malformed, or not valid at ``now``.
        """
        at = _utc(now)
        if evidence.tee is not self.tee:
            raise EvidenceError(f"{evidence.tee.value} evidence given to the {self.tee.value} verifier")
        quote = bytes(evidence.data)
        layout = parse_quote_layout(quote)
        if layout.tee is not self.tee:
            raise EvidenceError(f"quote v{layout.version} is a {layout.tee.value} quote, expected {self.tee.value}")
        text = self._source.collateral_for(quote, now=at)
        issued, expires = _cached_window(text)
        if at > expires:
            raise CollateralError(f"collateral expired at {expires.isoformat()} (verification time {at.isoformat()})")
        if at < issued:
            raise CollateralError(
                f"collateral not valid before {issued.isoformat()} (verification time {at.isoformat()})"
            )
        collateral = _collateral_object(text)
        now_secs = int(at.timestamp())
        try:
            # "claims only": dcap-qvl performs every cryptographic and freshness
            # check but leaves the accept/reject decision on TCB status and
            # advisories to the caller — that decision is SealedML's Policy.
            result = self._qvl.verify_with_policy(
                quote, collateral, now_secs, dcap_qvl.QuotePolicy.claims_only(now_secs)
            )
            report = json.loads(result.to_json())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # ValueError, and pyo3 panics (BaseException)
            raise _translate(exc) from exc
        return self._claims(quote, layout, report)

    def _claims(self, quote: bytes, layout: QuoteLayout, report: Any) -> Claims:
        try:
            tcb = report["tcb"]
            status = str(tcb["status"])
            advisories = tuple(str(a) for a in tcb.get("advisory_ids") or ())
            eval_number = tcb.get("eval_data_number")
            platform = report.get("platform") or {}
            qe = report.get("qe") or {}
            pck = platform.get("pck") or {}
            fmspc = bytes(pck.get("fmspc") or b"").hex()
            tcb_date = (platform.get("tcb_level") or {}).get("tcbDate")
            platform_status = (platform.get("tcb_level") or {}).get("tcbStatus")
            qe_status = (qe.get("tcb_level") or {}).get("tcbStatus")
            issued = _from_unix(report.get("latest_issue_date"))
            expires = _from_unix(report.get("earliest_expiration_date"))
            tee_type = int(report.get("tee_type", -1))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvidenceError("unexpected output from the DCAP verifier") from exc
        expected_tee = _TEE_TDX if self.tee is TeeType.TDX else _TEE_SGX
        if tee_type != expected_tee:
            raise EvidenceError("DCAP verifier reports a different TEE type")
        if status == "Revoked":
            raise EvidenceError("platform TCB is revoked")
        body = quote[layout.body_offset : layout.signed_len]
        details: dict[str, Any] = {"quote_version": layout.version}
        signer: str | None = None
        if layout.body_kind == "sgx":
            measurement, signer, report_data, debug, body_details = _sgx_body_claims(body)
        else:
            measurement, report_data, debug, body_details = _td_body_claims(body, layout.body_kind)
        details.update(body_details)
        details.update(
            {
                "fmspc": fmspc,
                "tcb_eval_data_number": eval_number,
                "tcb_date": tcb_date,
                "platform_tcb_status": platform_status,
                "qe_tcb_status": qe_status,
                "collateral_issued": issued.isoformat() if issued else None,
            }
        )
        return Claims(
            tee=self.tee,
            measurement=measurement,
            report_data=report_data,
            debug=debug,
            tcb_status=status,
            advisory_ids=advisories,
            signer=signer,
            details=MappingProxyType(details),
            collateral_expires=expires,
        )


class SgxDcapVerifier(DcapVerifier):
    """Verifies Intel SGX ECDSA quotes (v3, v4, v5 with an SGX body).

    Args:
        collateral: collateral source, path or JSON text (see :class:`DcapVerifier`).
        root_ca_der: optional replacement root CA (tests only).
    """

    def __init__(self, collateral: IntelCollateralSource | Path | str, *, root_ca_der: bytes | None = None) -> None:
        super().__init__(TeeType.SGX, collateral, root_ca_der=root_ca_der)


class TdxDcapVerifier(DcapVerifier):
    """Verifies Intel TDX quotes (v4, v5 with a TDREPORT 1.0 / 1.5 body).

    Args:
        collateral: collateral source, path or JSON text (see :class:`DcapVerifier`).
        root_ca_der: optional replacement root CA (tests only).
    """

    def __init__(self, collateral: IntelCollateralSource | Path | str, *, root_ca_der: bytes | None = None) -> None:
        super().__init__(TeeType.TDX, collateral, root_ca_der=root_ca_der)
