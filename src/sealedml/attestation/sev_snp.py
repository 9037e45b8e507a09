"""AMD SEV-SNP attestation report verification, with ``cryptography`` only.

What is verified, in order (references are to the *SEV Secure Nested Paging
Firmware ABI Specification*, AMD publication 56860, and the *Versioned Chip
Endorsement Key (VCEK) Certificate and KDS Interface Specification*, AMD
publication 57230):

1. **Report format** — exactly 1184 bytes, VERSION 2 to 5, SIGNATURE_ALGO 1
   (ECDSA P-384 with SHA-384), SIGNING_KEY 0 (VCEK) or 1 (VLEK)
   (ABI spec, "ATTESTATION_REPORT Structure": Table 23 in rev. 1.57, Table 21
   in earlier revisions).
2. **Certificate chain, chosen by SIGNING_KEY** — a VCEK-signed report
   (SIGNING_KEY 0) verifies only with a certificate that chains VCEK → ASK →
   ARK; a VLEK-signed report (SIGNING_KEY 1) only with one that chains VLEK →
   ASVK → ARK (KDS spec: AMD's ASK signs chip-unique VCEKs, the ASVK signs the
   Versioned Loaded Endorsement Keys that cloud providers load with the ABI
   spec's SNP_VLEK_LOAD instead).
   Every link is RSASSA-PSS with SHA-384, MGF1-SHA-384 and a 48-byte salt, the
   ARK self-signed and pinned per product (Milan, Genoa, Turin): the ASK, ARK
   and ASVK ship in ``sealedml/attestation/roots/ask_ark_asvk_<product>.pem``
   and are checked at load against the ARK's SPKI fingerprint below (ASK and
   ASVK signed by the ARK). Each certificate must be valid at ``now``. The
   product is tried first from the issuer name of the certificate; another
   product's ASK or ASVK never verifies it. An ASVK from the certificate table
   is used only if its name is ``SEV-VLEK-<product>`` and the pinned ARK of that
   product signed it. A VLEK offered for a VCEK-signed report, or a VCEK for a
   VLEK-signed one, is an :class:`~sealedml.errors.EvidenceError`.
3. **Report signature** — ECDSA P-384 over bytes 0x000-0x29F; R and S are
   little-endian, zero-extended to 72 bytes each, at 0x2A0 and 0x2E8 (ABI spec,
   "ECDSA P-384 with SHA-384 Signature" format).
4. **Certificate ↔ report binding** — the certificate's AMD extensions (KDS
   spec Table 8: blSPL 1.3.6.1.4.1.3704.1.3.1, teeSPL .3.2, snpSPL .3.3,
   ucodeSPL .3.8, fmcSPL .3.9 on Turin, hwID .4) must equal the report's
   REPORTED_TCB (decoded with the product's TCB_VERSION layout, ABI spec
   Table 3); a VCEK's hwID must equal CHIP_ID (the first 8 bytes on Turin, KDS
   spec). A VLEK is not chip-unique and must have no hwID.

Claims: ``measurement`` = MEASUREMENT (48 bytes hex), ``report_data`` =
REPORT_DATA, ``debug`` = guest POLICY bit 19 (ABI spec §4.3, Guest Policy),
details with the other report fields, among them ``signing_key`` (``"vcek"`` or
``"vlek"``: the kind of the certificate that verified the report, which always
equals the report's SIGNING_KEY). SEV-SNP has no TCB-status service: the
verifier reports ``tcb_status = "UpToDate"`` once the certificate matches the
report; whether that TCB is recent enough is the policy's ``min_tcb`` decision.

Where each part lives: the report layout in
:mod:`sealedml.attestation.sev_snp_report`, the pinned AMD roots in
:mod:`sealedml.attestation.sev_snp_roots`, the VCEK / VLEK sources and the
certificate table in :mod:`sealedml.attestation.sev_snp_collateral`; this
module holds the verifier (chain search, signature, certificate ↔ report binding).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealedml.attestation.base import Claims, Evidence, TeeType, Verifier
from sealedml.attestation.collateral import CERTIFICATE_PARSE_ERRORS, load_certificate
from sealedml.attestation.sev_snp_collateral import (
    CacheDirVcekSource,
    CertTableVcekSource,
    FileVcekSource,
    VcekSource,
    parse_snp_cert_table,
)
from sealedml.attestation.sev_snp_report import SnpReport, decode_tcb, parse_snp_report
from sealedml.attestation.sev_snp_roots import ProductRoots, common_name, load_pinned_roots, pss_signed_by
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

__all__ = ["SevSnpVerifier"]

# AMD VCEK / VLEK certificate extensions (KDS spec, Table 8).
_OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
_OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
_OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
_OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
_OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
_OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
_OID_HWID = "1.3.6.1.4.1.3704.1.4"
_TURIN_HWID_LEN = 8


def _check_valid_at(cert: x509.Certificate, at: datetime, what: str) -> None:
    if at < cert.not_valid_before_utc:
        raise EvidenceError(f"{what} not valid before {cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise EvidenceError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


# ---------------------------------------------------------------------------
# VCEK extensions
# ---------------------------------------------------------------------------


def _der_small_int(value: bytes, what: str) -> int:
    """Decode a DER INTEGER in short form (the KDS SPL extensions: 0-255)."""
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 2:
        raise EvidenceError(f"VCEK extension {what} is not a small DER INTEGER")
    number = int.from_bytes(value[2:], "big", signed=True)
    if not 0 <= number <= 255:
        raise EvidenceError(f"VCEK extension {what} out of range")
    return number


def _extensions(cert: x509.Certificate) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        for ext in cert.extensions:
            if isinstance(ext.value, x509.UnrecognizedExtension):
                found[ext.oid.dotted_string] = bytes(ext.value.value)
    except CERTIFICATE_PARSE_ERRORS as exc:
        raise EvidenceError(f"VCEK extensions malformed: {exc}") from exc
    return found


def _vcek_tcb(extensions: Mapping[str, bytes], product: str) -> dict[str, int]:
    names = {
        "bootloader": _OID_BL_SPL,
        "tee": _OID_TEE_SPL,
        "snp": _OID_SNP_SPL,
        "microcode": _OID_UCODE_SPL,
    }
    if product == "Turin":
        names["fmc"] = _OID_FMC_SPL
    tcb: dict[str, int] = {}
    for name, oid in names.items():
        if oid not in extensions:
            raise EvidenceError(f"VCEK lacks the {name} SPL extension ({oid})")
        tcb[name] = _der_small_int(extensions[oid], name)
    return tcb


def _vcek_hwid(extensions: Mapping[str, bytes]) -> bytes | None:
    value = extensions.get(_OID_HWID)
    if value is None:
        return None
    # KDS puts the raw chip id in the extension; accept an OCTET STRING wrapper too.
    if len(value) in (66, 10) and value[0] == 0x04 and value[1] == len(value) - 2:
        value = value[2:]
    return value


# ---------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


#: SIGNING_KEY values (ABI spec, report table) and the names used in claims.
_SIGNING_KEYS: Mapping[int, str] = MappingProxyType({0: "vcek", 1: "vlek"})
#: The AMD intermediate that signs each kind of endorsement key.
_INTERMEDIATE_NAMES: Mapping[str, str] = MappingProxyType({"vcek": "ASK", "vlek": "ASVK"})
#: Certificate-table entries that may carry an ASVK (the GHCB table has no ASVK
#: GUID: hosts put the ASVK of a VLEK in the ASK slot).
_TABLE_ASVK_ENTRIES = ("asvk", "ask")


@dataclass(frozen=True)
class _Chain:
    """A certificate's verified path to a pinned ARK."""

    product: str
    kind: str  # "vcek" (through the ASK) or "vlek" (through the ASVK)
    intermediate: x509.Certificate


class SevSnpVerifier(Verifier):
    """Verifies AMD SEV-SNP attestation reports against pinned AMD roots.

    The report's SIGNING_KEY decides the chain: a VCEK-signed report needs a
    certificate signed by a pinned ASK, a VLEK-signed report one signed by a
    pinned ASVK (or by an ASVK from the certificate table that a pinned ARK
    signed). The certificate is looked up in ``vcek_sources`` in order
    (default: the evidence's certificate table, then ``vcek`` if given, then
    ``vcek_cache_dir``); each candidate is tried until one verifies. A verified
    certificate is stored in ``vcek_cache_dir`` (keyed by chip id and TCB) for
    later reports.

    Args:
        vcek_sources: explicit VCEK / VLEK sources (replaces the defaults).
        vcek: a VCEK or VLEK certificate file (or its DER / PEM bytes).
        vcek_cache_dir: a cache directory of verified certificates.
        roots: ``{product: PEM bytes of ASK + ARK [+ ASVK]}`` to pin instead of
            the shipped AMD roots (test infrastructures, or pinning a subset of
            products); without an ASVK a product verifies VLEKs only through an
            ASVK from the certificate table.

    Raises:
        ConfigurationError: unreadable VCEK file or bad roots.
    """

    tee = TeeType.SEV_SNP

    def __init__(
        self,
        vcek_sources: Sequence[VcekSource] | None = None,
        *,
        vcek: Path | bytes | None = None,
        vcek_cache_dir: Path | None = None,
        roots: Mapping[str, bytes] | None = None,
    ) -> None:
        self._cache = CacheDirVcekSource(vcek_cache_dir) if vcek_cache_dir else None
        if vcek_sources is not None:
            sources = list(vcek_sources)
        else:
            sources = [CertTableVcekSource()]
            if isinstance(vcek, bytes):
                sources.append(_BytesVcekSource(vcek))
            elif vcek is not None:
                sources.append(FileVcekSource(Path(vcek)))
            if self._cache is not None:
                sources.append(self._cache)
        self._sources = sources
        if roots is None:
            self._roots = load_pinned_roots()
        else:
            self._roots = MappingProxyType(
                {product: ProductRoots.from_pem(product, pem) for product, pem in roots.items()}
            )
        if not self._roots:
            raise ConfigurationError("no AMD roots pinned")
        # Outcome of each (certificate, signing key, table ASVKs) chain search:
        # the chain, or why there is none.
        self._chain_memo: dict[tuple[bytes, str, tuple[bytes, ...]], _Chain | str] = {}
        self._memo_lock = threading.Lock()

    # -- chain ---------------------------------------------------------------

    def _chain(self, cert: x509.Certificate, kind: str, table: Mapping[str, bytes]) -> _Chain:
        """Return the verified chain of ``cert`` for a report signed by ``kind``, or raise."""
        table_asvks = tuple(table[name] for name in _TABLE_ASVK_ENTRIES if table.get(name))
        key = (cert.fingerprint(hashes.SHA256()), kind, table_asvks)
        with self._memo_lock:
            outcome = self._chain_memo.get(key)
        if outcome is None:
            outcome = self._search(cert, kind, table_asvks)
            with self._memo_lock:
                if len(self._chain_memo) > 256:
                    self._chain_memo.clear()
                self._chain_memo[key] = outcome
        if isinstance(outcome, str):
            raise EvidenceError(outcome)
        return outcome

    def _search(self, cert: x509.Certificate, kind: str, table_asvks: tuple[bytes, ...]) -> _Chain | str:
        """The chain of ``cert`` through the intermediate for ``kind``, or the reason there is none."""
        asvks: list[x509.Certificate] = []
        for raw in table_asvks:
            try:
                asvks.append(load_certificate(raw, what="ASVK from the certificate table"))
            except CollateralError:
                continue
        chain = self._find_chain(cert, kind, asvks)
        if chain is not None:
            return chain
        # Name the mix-up when the certificate is the other kind of key.
        other = "vlek" if kind == "vcek" else "vcek"
        wrong = self._find_chain(cert, other, asvks)
        if wrong is not None:
            return (
                f"report is signed by a {kind.upper()} but the certificate is not a {kind.upper()}: "
                f"it is a {other.upper()} (issued by the {_INTERMEDIATE_NAMES[other]} "
                f"{common_name(wrong.intermediate.subject)!r})"
            )
        return f"{kind.upper()} does not chain to a pinned AMD root through an {_INTERMEDIATE_NAMES[kind]}"

    def _find_chain(self, cert: x509.Certificate, kind: str, table_asvks: Sequence[x509.Certificate]) -> _Chain | None:
        issuer_cn = common_name(cert.issuer)
        # Try the product named by the certificate's issuer first ("SEV-Milan",
        # "SEV-VLEK-Genoa"), then the others in turn.
        ordered = sorted(self._roots, key=lambda p: 0 if issuer_cn.endswith(p) else 1)
        for product in ordered:
            for intermediate in self._intermediates(product, kind, table_asvks):
                if pss_signed_by(cert, intermediate):
                    return _Chain(product=product, kind=kind, intermediate=intermediate)
        return None

    def _intermediates(
        self, product: str, kind: str, table_asvks: Sequence[x509.Certificate]
    ) -> list[x509.Certificate]:
        """The certificates of ``product`` that may sign a ``kind`` key: the ASK, or the ASVKs."""
        roots = self._roots[product]
        if kind == "vcek":
            return [roots.ask]  # the ASK is pinned; one from the table is never needed
        found = [roots.asvk] if roots.asvk is not None else []
        for asvk in table_asvks:
            # An ASVK from the certificate table counts only if it is this
            # product's ASVK and the pinned ARK signed it.
            if (
                asvk not in found
                and common_name(asvk.subject) == f"SEV-VLEK-{product}"
                and pss_signed_by(asvk, roots.ark)
            ):
                found.append(asvk)
        return found

    # -- verification --------------------------------------------------------

    def verify(self, evidence: Evidence, *, now: datetime | None = None) -> Claims:
        """Verify an SEV-SNP report at ``now`` and return its claims.

        Args:
            evidence: ``Evidence(TeeType.SEV_SNP, report, aux=certificate table)``.
            now: verification time for certificate validity (default: now).

        Returns:
            Claims with measurement, report data, debug flag and report details.

        Raises:
            EvidenceError: malformed report, bad signature, broken chain, a
                VLEK for a VCEK-signed report or the reverse, or a VCEK of
                another chip / TCB.
            CollateralError: no VCEK / VLEK found, or a certificate / certificate
                table is malformed.
        """
        at = _utc(now)
        if evidence.tee is not TeeType.SEV_SNP:
            raise EvidenceError(f"{evidence.tee.value} evidence given to the sev-snp verifier")
        report = parse_snp_report(evidence.data)
        kind = _SIGNING_KEYS[report.signing_key]
        table = parse_snp_cert_table(evidence.aux)
        candidates: list[tuple[VcekSource, bytes]] = []
        for source in self._sources:
            found = source.find_all(
                chip_id=report.chip_id, reported_tcb=report.reported_tcb, aux=evidence.aux, signing_key=kind
            )
            for der in found:
                if all(der != seen for _, seen in candidates):
                    candidates.append((source, der))
        if not candidates:
            raise CollateralError("no VCEK / VLEK certificate for this SEV-SNP report")
        first_error: EvidenceError | CollateralError | None = None
        for source, der in candidates:
            try:
                claims = self._verify_with(report, kind, der, table, at)
            except (EvidenceError, CollateralError) as exc:
                first_error = first_error or exc
                continue
            if self._cache is not None and source is not self._cache:
                self._cache.store(report.chip_id, report.reported_tcb, der)
            return claims
        if first_error is None:  # pragma: no cover - candidates is non-empty
            raise EvidenceError("SEV-SNP report not verified")
        raise first_error

    def _verify_with(
        self, report: SnpReport, kind: str, cert_bytes: bytes, table: Mapping[str, bytes], at: datetime
    ) -> Claims:
        name = kind.upper()
        cert = load_certificate(cert_bytes, what=name)
        chain = self._chain(cert, kind, table)
        product = chain.product
        roots = self._roots[product]
        intermediate = chain.intermediate
        _check_valid_at(roots.ark, at, f"ARK-{product}")
        _check_valid_at(intermediate, at, f"{common_name(intermediate.subject)} certificate")
        _check_valid_at(cert, at, name)

        # Report signature (ECDSA P-384 / SHA-384 over 0x000-0x29F).
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise EvidenceError(f"{name} key is not ECDSA P-384")
        try:
            signature = encode_dss_signature(report.signature_r, report.signature_s)
            key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError) as exc:
            raise EvidenceError("SEV-SNP report signature invalid") from exc

        # The certificate must be for this TCB, and a VCEK for this chip (KDS spec Table 8).
        extensions = _extensions(cert)
        cert_tcb = _vcek_tcb(extensions, product)
        reported = decode_tcb(report.reported_tcb, product)
        if cert_tcb != reported:
            raise EvidenceError(f"{name} is for TCB {cert_tcb}, the report's REPORTED_TCB is {reported}")
        # The chain already decided the kind; the name and hwID must agree with it.
        hwid = _vcek_hwid(extensions)
        subject = common_name(cert.subject)
        named_vlek = "VLEK" in subject.upper()
        if chain.kind == "vcek":
            if named_vlek:
                raise EvidenceError(f"report is signed by a VCEK but the certificate is not a VCEK (named {subject!r})")
            if hwid is None:
                raise EvidenceError("report is signed by a VCEK but the certificate is not a VCEK (it has no hwID)")
            expected = report.chip_id[:_TURIN_HWID_LEN] if product == "Turin" else report.chip_id
            if len(hwid) != len(expected) or hwid != expected:
                raise EvidenceError("VCEK belongs to another chip (hwID != CHIP_ID)")
        elif not named_vlek:
            raise EvidenceError(f"report is signed by a VLEK but the certificate is not a VLEK (named {subject!r})")
        elif hwid is not None:
            raise EvidenceError("report is signed by a VLEK but the certificate is not a VLEK (it has a hwID)")

        expires = min(
            cert.not_valid_after_utc,
            intermediate.not_valid_after_utc,
            roots.ark.not_valid_after_utc,
        )
        return Claims(
            tee=TeeType.SEV_SNP,
            measurement=report.measurement.hex(),
            report_data=report.report_data,
            debug=report.debug,
            tcb_status="UpToDate",
            advisory_ids=(),
            signer=None,
            details=MappingProxyType(self._details(report, chain, extensions)),
            collateral_expires=expires,
        )

    @staticmethod
    def _details(report: SnpReport, chain: _Chain, extensions: Mapping[str, bytes]) -> dict[str, Any]:
        product = chain.product
        name = extensions.get(_OID_PRODUCT_NAME, b"")
        product_name = name[2:].decode("ascii", "replace") if name[:1] == b"\x16" else product
        details: dict[str, Any] = {
            "version": report.version,
            "product": product,
            "product_name": product_name,
            # The kind of the certificate that verified the report (its chain
            # went through the ASK or the ASVK); it equals SIGNING_KEY.
            "signing_key": chain.kind,
            "guest_svn": report.guest_svn,
            "policy": report.policy,
            "policy_flags": {
                "smt": bool(report.policy >> 16 & 1),
                "migrate_ma": bool(report.policy >> 18 & 1),
                "debug": report.debug,
                "single_socket": bool(report.policy >> 20 & 1),
            },
            "family_id": report.family_id.hex(),
            "image_id": report.image_id.hex(),
            "vmpl": report.vmpl,
            "host_data": report.host_data.hex(),
            "id_key_digest": report.id_key_digest.hex(),
            "author_key_digest": report.author_key_digest.hex(),
            "report_id": report.report_id.hex(),
            "chip_id": report.chip_id.hex(),
            "platform_info": report.platform_info,
            "reported_tcb": decode_tcb(report.reported_tcb, product),
            "current_tcb": decode_tcb(report.current_tcb, product),
            "committed_tcb": decode_tcb(report.committed_tcb, product),
            "launch_tcb": decode_tcb(report.launch_tcb, product),
            "current_version": report.current_version,
            "committed_version": report.committed_version,
        }
        if report.cpuid_fam_id is not None:
            details["cpuid"] = {
                "family": report.cpuid_fam_id,
                "model": report.cpuid_mod_id,
                "stepping": report.cpuid_step,
            }
        return details


class _BytesVcekSource(VcekSource):
    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    def find(self, *, chip_id: bytes, reported_tcb: int, aux: bytes) -> bytes | None:
        return self._data
