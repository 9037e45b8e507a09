"""Where verifiers get their collateral from, and how untrusted certificates are parsed.

*Collateral* is everything a verifier needs besides the evidence itself:

- **Intel SGX / TDX (DCAP)**: the TCB info and QE identity documents signed by
  Intel, the PCK and root CA CRLs, and their issuer chains — bundled as one JSON
  object in the ``QuoteCollateralV3`` format of the ``dcap-qvl`` package (the
  same field names Intel's PCCS API returns, binary fields hex-encoded).
  Sources: a local file (:class:`LocalCollateral`, here) or a PCCS / Intel PCS
  URL with an on-disk cache (:class:`~sealedml.attestation.pccs.PccsCollateral`).
- **AMD SEV-SNP**: the VCEK (or VLEK) certificate of the chip that signed the
  report. Sources (:mod:`sealedml.attestation.sev_snp_collateral`): the SNP
  certificate table that comes with the report, a file, or a cache directory
  keyed by chip id and TCB. The AMD roots (ARK, ASK, ASVK) are pinned in the
  package (:mod:`sealedml.attestation.sev_snp_roots`), never taken from collateral.

Collateral is *not* trusted: verifiers check its signatures against pinned
roots. A source only decides what to hand to the verifier, and freshness is
checked at verification time (``now``).
"""

from __future__ import annotations

import abc
import json
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning

from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

__all__ = [
    "CERTIFICATE_PARSE_ERRORS",
    "MAX_DOCUMENT_BYTES",
    "CollateralWindow",
    "IntelCollateralSource",
    "LocalCollateral",
    "check_certificate_fields",
    "collateral_window",
    "load_certificate",
    "load_pem_chain",
    "quote_collateral_key",
]

#: Largest collateral / certificate document accepted from a file or a server.
MAX_DOCUMENT_BYTES = 1 << 20

# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


def load_certificate(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    """Parse one X.509 certificate in DER or PEM form.

    AMD's VCEK certificates carry a zero serial number, which ``cryptography``
    still parses but warns about; the warning is silenced here because the
    certificate is authenticated by its signature chain, not by its serial.

    Args:
        data: DER or PEM bytes.
        what: name used in the error message.

    Returns:
        The certificate.

    Raises:
        CollateralError: ``data`` is not a certificate.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            check_certificate_fields(cert)
        except CERTIFICATE_PARSE_ERRORS as exc:
            raise CollateralError(f"{what} is not a valid X.509 certificate") from exc
    return cert


#: What ``cryptography`` raises on a certificate field that does not parse.
CERTIFICATE_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.InvalidVersion,
    x509.UnsupportedGeneralNameType,
)


def check_certificate_fields(cert: x509.Certificate) -> None:
    """Parse every lazily-decoded field verifiers use, so errors surface at load time.

    ``cryptography`` decodes names, extensions and keys on first access; a
    malformed field would otherwise raise ``ValueError`` deep inside a check.

    Raises:
        Exception: one of :data:`CERTIFICATE_PARSE_ERRORS` (callers translate it).
    """
    cert.version  # noqa: B018 - forces decoding
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    for _extension in cert.extensions:
        pass
    cert.public_key()
    cert.signature_hash_algorithm  # noqa: B018 - forces decoding
    cert.not_valid_before_utc  # noqa: B018
    cert.not_valid_after_utc  # noqa: B018


def load_pem_chain(text: str, what: str) -> list[x509.Certificate]:
    """Parse a PEM certificate chain (an issuer chain of DCAP collateral).

    Args:
        text: the concatenated PEM certificates.
        what: name used in the error message.

    Returns:
        The certificates, in order.

    Raises:
        CollateralError: ``text`` is not a PEM certificate chain.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            certs = x509.load_pem_x509_certificates(text.encode("utf-8", "strict"))
        except (ValueError, TypeError, UnicodeError) as exc:
            raise CollateralError(f"{what} is not a PEM certificate chain") from exc
    return certs


# ---------------------------------------------------------------------------
# Intel DCAP collateral
# ---------------------------------------------------------------------------

#: Fields of the ``QuoteCollateralV3`` JSON object (dcap-qvl / Intel PCCS naming).
_COLLATERAL_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


@dataclass(frozen=True)
class CollateralWindow:
    """The time window in which a DCAP collateral bundle is usable.

    Attributes:
        issued: the latest issue date of its parts (TCB info, QE identity, CRLs,
            issuer certificates) — the collateral is not valid before this.
        expires: the earliest ``nextUpdate`` / ``notAfter`` of its parts.
    """

    issued: datetime
    expires: datetime

    def contains(self, at: datetime) -> bool:
        """True if ``at`` lies inside the window."""
        return self.issued <= at <= self.expires


def _parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise CollateralError(f"collateral {what} missing")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CollateralError(f"collateral {what} is not a date") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _parse_collateral_object(text: str | bytes) -> dict[str, Any]:
    if len(text) > MAX_DOCUMENT_BYTES:
        raise CollateralError("collateral document too large")
    try:
        obj = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CollateralError("collateral is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise CollateralError("collateral is not a JSON object")
    for name in _COLLATERAL_FIELDS:
        if not isinstance(obj.get(name), str):
            raise CollateralError(f"collateral field {name} missing or not a string")
    return obj


def _load_crl(hex_or_pem: str, what: str) -> x509.CertificateRevocationList:
    text = hex_or_pem.strip()
    try:
        if text.startswith("-----BEGIN"):
            return x509.load_pem_x509_crl(text.encode("ascii"))
        return x509.load_der_x509_crl(bytes.fromhex(text))
    except (ValueError, TypeError, UnicodeError) as exc:
        raise CollateralError(f"collateral {what} is not a CRL") from exc


def collateral_window(text: str | bytes) -> CollateralWindow:
    """Compute the validity window of a ``QuoteCollateralV3`` JSON document.

    Covers the TCB info and QE identity (``issueDate`` / ``nextUpdate``, Intel
    PCS API v4), both CRLs (``thisUpdate`` / ``nextUpdate``, RFC 5280 §5.1.2.4-5)
    and every certificate of the three issuer chains.

    Args:
        text: the collateral JSON.

    Returns:
        The window.

    Raises:
        CollateralError: the document is malformed.
    """
    obj = _parse_collateral_object(text)
    issued: list[datetime] = []
    expires: list[datetime] = []
    for name in ("tcb_info", "qe_identity"):
        try:
            doc = json.loads(obj[name])
        except (ValueError, RecursionError) as exc:
            raise CollateralError(f"collateral {name} is not valid JSON") from exc
        if not isinstance(doc, dict):
            raise CollateralError(f"collateral {name} is not a JSON object")
        issued.append(_parse_time(doc.get("issueDate"), f"{name}.issueDate"))
        expires.append(_parse_time(doc.get("nextUpdate"), f"{name}.nextUpdate"))
    for name in ("root_ca_crl", "pck_crl"):
        crl = _load_crl(obj[name], name)
        issued.append(crl.last_update_utc)
        if crl.next_update_utc is None:
            raise CollateralError(f"collateral {name} has no nextUpdate")
        expires.append(crl.next_update_utc)
    for name in ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain"):
        for cert in load_pem_chain(obj[name], f"collateral {name}"):
            issued.append(cert.not_valid_before_utc)
            expires.append(cert.not_valid_after_utc)
    return CollateralWindow(issued=max(issued), expires=min(expires))


class IntelCollateralSource(abc.ABC):
    """Supplies DCAP collateral (``QuoteCollateralV3`` JSON) for a quote."""

    @abc.abstractmethod
    def collateral_for(self, quote: bytes, *, now: datetime) -> str:
        """Return collateral JSON suitable for verifying ``quote`` at ``now``.

        Raises:
            CollateralError: no collateral could be obtained.
            EvidenceError: the quote does not say which collateral it needs.
        """


class LocalCollateral(IntelCollateralSource):
    """Collateral from a local JSON file (or JSON text), the same for every quote.

    Args:
        source: a ``Path``; or a ``str`` that is the JSON text itself if it
            starts with ``{`` and a file path otherwise (use :meth:`from_text`
            to pass text unambiguously).

    Raises:
        ConfigurationError: the file cannot be read.
    """

    def __init__(self, source: Path | str) -> None:
        if isinstance(source, Path) or not source.lstrip().startswith("{"):
            path = Path(source)
            try:
                if path.stat().st_size > MAX_DOCUMENT_BYTES:
                    raise ConfigurationError(f"collateral file {path} too large")
                self._text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeError) as exc:
                raise ConfigurationError(f"cannot read collateral file {path}: {exc}") from exc
        else:
            self._text = source

    @classmethod
    def from_text(cls, text: str) -> LocalCollateral:
        """Collateral from JSON text (never interpreted as a path)."""
        source = cls.__new__(cls)
        source._text = text
        return source

    def collateral_for(self, quote: bytes, *, now: datetime) -> str:
        """Return the configured collateral (``quote`` and ``now`` are not used)."""
        return self._text


def quote_collateral_key(quote: bytes) -> tuple[str, str, str]:
    """Which collateral a DCAP quote needs: ``(tee, fmspc, ca)``.

    ``tee`` is ``"sgx"`` or ``"tdx"``; ``fmspc`` is 12 upper-case hex digits
    from the PCK certificate in the quote; ``ca`` is ``"processor"`` or
    ``"platform"`` (the PCK issuer).

    Raises:
        EvidenceError: the quote is malformed or carries no PCK certificate.
    """
    import dcap_qvl  # local import: only DCAP users need the extension module

    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
        tee = "tdx" if parsed.is_tdx() else "sgx"
        fmspc = str(parsed.fmspc()).upper()
        ca = str(parsed.ca()).lower()
    except Exception as exc:  # dcap_qvl raises ValueError (and may raise others)
        raise EvidenceError(f"cannot read FMSPC / CA from quote: {exc}") from exc
    if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
        raise EvidenceError("quote FMSPC malformed")
    if ca not in ("processor", "platform"):
        raise EvidenceError(f"quote PCK issuer {ca!r} unknown")
    return tee, fmspc, ca
