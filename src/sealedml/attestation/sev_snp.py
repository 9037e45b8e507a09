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
"""

from __future__ import annotations

import hashlib
import importlib.resources
import struct
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sealedml.attestation.base import Claims, Evidence, TeeType, Verifier
from sealedml.attestation.collateral import (
    CERTIFICATE_PARSE_ERRORS,
    CacheDirVcekSource,
    CertTableVcekSource,
    FileVcekSource,
    VcekSource,
    load_certificate,
    parse_snp_cert_table,
)
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

__all__ = [
    "PINNED_ARK_SPKI_SHA256",
    "PRODUCTS",
    "REPORT_SIZE",
    "ProductRoots",
    "SevSnpVerifier",
    "SnpReport",
    "decode_tcb",
    "load_pinned_roots",
    "parse_snp_report",
    "roots_bundle_product",
]

#: Size of ATTESTATION_REPORT (0x4A0).
REPORT_SIZE = 0x4A0
#: The signature covers bytes 0x000-0x29F.
SIGNED_LEN = 0x2A0
_SIG_R = 0x2A0
_SIG_S = 0x2E8
_SIG_COMPONENT = 72

#: Products whose roots are pinned, in the order they are tried.
PRODUCTS: tuple[str, ...] = ("Milan", "Genoa", "Turin")

#: SHA-256 of the DER SubjectPublicKeyInfo of each product's ARK (AMD root key).
PINNED_ARK_SPKI_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "Milan": "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
        "Genoa": "429a69c9422aa258ee4d8db5fcda9c6470ef15f8cd5a9cebd6cbc7d90b863831",
        "Turin": "4f125410563a2ab9a50356f9243f6fe0b6f73de98603f53f90339c70e9d7ad08",
    }
)

# AMD VCEK / VLEK certificate extensions (KDS spec, Table 8).
_OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
_OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
_OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
_OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
_OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
_OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
_OID_HWID = "1.3.6.1.4.1.3704.1.4"
_TURIN_HWID_LEN = 8

# AMD KDS certificates: RSASSA-PSS, SHA-384, MGF1-SHA-384, salt length 48.
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def decode_tcb(raw: int, product: str) -> dict[str, int]:
    """Split a TCB_VERSION into its security patch levels.

    Milan and Genoa (ABI spec Table 3): byte 0 boot loader, 1 TEE, 6 SNP,
    7 microcode. Turin (family 1Ah): byte 0 FMC, 1 boot loader, 2 TEE, 3 SNP,
    7 microcode.

    Args:
        raw: the TCB_VERSION as a little-endian u64.
        product: ``"Milan"``, ``"Genoa"`` or ``"Turin"``.

    Returns:
        ``{"bootloader", "tee", "snp", "microcode"}`` (plus ``"fmc"`` on Turin).
    """
    b = raw.to_bytes(8, "little")
    if product == "Turin":
        return {"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]}
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


@dataclass(frozen=True)
class SnpReport:
    """A parsed (not yet verified) SEV-SNP ATTESTATION_REPORT.

    Attributes mirror the report fields; byte strings are raw, TCB values are
    little-endian u64 integers. ``raw`` is the whole report.
    """

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: int
    current_version: str
    committed_version: str
    launch_tcb: int
    signature_r: int
    signature_s: int

    @property
    def debug(self) -> bool:
        """Guest POLICY bit 19: DEBUG (the hypervisor may read and write guest memory)."""
        return bool(self.policy >> 19 & 1)

    @property
    def signed_bytes(self) -> bytes:
        """Bytes 0x000-0x29F, the part the signature covers."""
        return self.raw[:SIGNED_LEN]


def parse_snp_report(data: bytes) -> SnpReport:
    """Parse an ATTESTATION_REPORT (offsets from the ABI spec report table).

    Args:
        data: the 1184-byte report.

    Returns:
        The parsed report.

    Raises:
        EvidenceError: wrong size, unsupported version, signature algorithm or
            signing key.
    """
    raw = bytes(data)
    if len(raw) != REPORT_SIZE:
        raise EvidenceError(f"SEV-SNP report must be {REPORT_SIZE} bytes, got {len(raw)}")
    version = _u32(raw, 0x00)
    if not 2 <= version <= 5:
        raise EvidenceError(f"unsupported SEV-SNP report version {version}")
    signature_algo = _u32(raw, 0x34)
    if signature_algo != 1:
        raise EvidenceError(f"unsupported SEV-SNP signature algorithm {signature_algo}")
    flags = _u32(raw, 0x48)
    signing_key = flags >> 2 & 0x7  # bits 4:2; 0 = VCEK, 1 = VLEK, 7 = none
    if signing_key not in (0, 1):
        raise EvidenceError(f"SEV-SNP report signing key {signing_key} is not VCEK or VLEK")
    has_cpuid = version >= 3  # CPUID_FAM_ID / MOD_ID / STEP at 0x188 since version 3
    return SnpReport(
        raw=raw,
        version=version,
        guest_svn=_u32(raw, 0x04),
        policy=_u64(raw, 0x08),
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=_u32(raw, 0x30),
        signature_algo=signature_algo,
        current_tcb=_u64(raw, 0x38),
        platform_info=_u64(raw, 0x40),
        author_key_en=bool(flags & 0x1),
        mask_chip_key=bool(flags & 0x2),
        signing_key=signing_key,
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=_u64(raw, 0x180),
        cpuid_fam_id=raw[0x188] if has_cpuid else None,
        cpuid_mod_id=raw[0x189] if has_cpuid else None,
        cpuid_step=raw[0x18A] if has_cpuid else None,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=_u64(raw, 0x1E0),
        current_version=f"{raw[0x1EA]}.{raw[0x1E9]}.{raw[0x1E8]}",
        committed_version=f"{raw[0x1EE]}.{raw[0x1ED]}.{raw[0x1EC]}",
        launch_tcb=_u64(raw, 0x1F0),
        signature_r=int.from_bytes(raw[_SIG_R : _SIG_R + _SIG_COMPONENT], "little"),
        signature_s=int.from_bytes(raw[_SIG_S : _SIG_S + _SIG_COMPONENT], "little"),
    )


# ---------------------------------------------------------------------------
# Roots and chain
# ---------------------------------------------------------------------------


def _common_name(name: x509.Name) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # odd attribute lengths in untrusted certs
        values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _pss_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s RSA key signed ``cert`` with AMD's RSASSA-PSS parameters."""
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or cert.issuer != issuer.subject:
        return False
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _check_valid_at(cert: x509.Certificate, at: datetime, what: str) -> None:
    if at < cert.not_valid_before_utc:
        raise EvidenceError(f"{what} not valid before {cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise EvidenceError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


@dataclass(frozen=True)
class ProductRoots:
    """The pinned ASK, ARK and (optionally) ASVK of one AMD product line.

    Attributes:
        product: ``"Milan"``, ``"Genoa"`` or ``"Turin"``.
        ask: the AMD SEV signing key certificate, ``SEV-<product>`` (signs VCEKs).
        ark: the AMD root key certificate, ``ARK-<product>`` (self-signed).
        asvk: the AMD SEV VLEK signing key certificate, ``SEV-VLEK-<product>``
            (signs VLEKs), or ``None`` if not pinned.
    """

    product: str
    ask: x509.Certificate
    ark: x509.Certificate
    asvk: x509.Certificate | None = None

    @classmethod
    def from_pem(cls, product: str, pem: bytes, *, fingerprint: str | None = None) -> ProductRoots:
        """Load and check a roots bundle: ASK, then ARK, then optionally ASVK.

        This is the order of ``ask_ark_asvk_<product>.pem`` (AMD KDS
        ``cert_chain`` followed by the ASVK); an ``ask_ark_<product>.pem`` of
        ASK and ARK only pins no ASVK.

        Args:
            product: the product the bundle is for.
            pem: the two or three certificates.
            fingerprint: if given, the ARK's SPKI SHA-256 must equal it.

        Returns:
            The roots.

        Raises:
            ConfigurationError: not two or three certificates, names not of
                ``product``, ARK not self-signed, ASK or ASVK not signed by the
                ARK (RSASSA-PSS, SHA-384, salt 48), or fingerprint mismatch.
        """
        try:
            certs = [load_certificate(block) for block in _pem_blocks(pem)]
        except CollateralError as exc:
            raise ConfigurationError(f"{product} roots: {exc.message}") from exc
        if len(certs) not in (2, 3):
            raise ConfigurationError(f"{product} roots: expected ASK, ARK and optionally ASVK certificates")
        ask, ark = certs[0], certs[1]
        asvk = certs[2] if len(certs) == 3 else None
        if _common_name(ark.subject) != f"ARK-{product}":
            raise ConfigurationError(f"{product} roots: ARK is {_common_name(ark.subject)!r}")
        if _common_name(ask.subject) != f"SEV-{product}":
            raise ConfigurationError(f"{product} roots: ASK is {_common_name(ask.subject)!r}")
        if asvk is not None and _common_name(asvk.subject) != f"SEV-VLEK-{product}":
            raise ConfigurationError(f"{product} roots: ASVK is {_common_name(asvk.subject)!r}")
        if fingerprint is not None and _spki_sha256(ark) != fingerprint:
            raise ConfigurationError(f"{product} roots: ARK key does not match the pinned key")
        if not _pss_signed_by(ark, ark):
            raise ConfigurationError(f"{product} roots: ARK is not self-signed")
        if not _pss_signed_by(ask, ark):
            raise ConfigurationError(f"{product} roots: ASK is not signed by the ARK")
        if asvk is not None and not _pss_signed_by(asvk, ark):
            raise ConfigurationError(f"{product} roots: ASVK is not signed by the ARK")
        return cls(product=product, ask=ask, ark=ark, asvk=asvk)


def roots_bundle_product(pem: bytes) -> str:
    """The product of an AMD roots bundle, read from its ARK's name ``ARK-<product>``.

    Used to pin bundles whose product is not given separately (``sealedml
    attest verify --amd-roots FILE``). The bundle itself is checked by
    :meth:`ProductRoots.from_pem` when a verifier pins it.

    Args:
        pem: a bundle of ASK, ARK and optionally ASVK (PEM).

    Returns:
        One of :data:`PRODUCTS`.

    Raises:
        ConfigurationError: unreadable certificates, no single ``ARK-<product>``
            certificate, or a product other than Milan, Genoa and Turin.
    """
    try:
        certs = [load_certificate(block) for block in _pem_blocks(pem)]
    except CollateralError as exc:
        raise ConfigurationError(f"AMD roots: {exc.message}") from exc
    arks = {_common_name(cert.subject) for cert in certs if _common_name(cert.subject).startswith("ARK-")}
    if len(arks) != 1:
        raise ConfigurationError("AMD roots: expected one ARK certificate named ARK-<product>")
    product = arks.pop().removeprefix("ARK-")
    if product not in PRODUCTS:
        raise ConfigurationError(f"AMD roots: unknown product {product!r}; expected one of {', '.join(PRODUCTS)}")
    return product


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks: list[bytes] = []
    for part in pem.split(marker):
        if b"-----BEGIN CERTIFICATE-----" in part:
            blocks.append(part[part.index(b"-----BEGIN") :] + marker + b"\n")
    return blocks


_PINNED_LOCK = threading.Lock()
_PINNED: dict[str, ProductRoots] = {}


def load_pinned_roots() -> Mapping[str, ProductRoots]:
    """The AMD roots shipped with the package, checked against their pinned fingerprints.

    Each product's ``roots/ask_ark_asvk_<product>.pem`` holds its ASK, ARK and
    ASVK, as AMD's key distribution service serves them.

    Returns:
        ``{product: ProductRoots}`` for Milan, Genoa and Turin, each with its ASVK.

    Raises:
        ConfigurationError: a root file is missing, lacks the ASVK or does not
            match its pin.
    """
    with _PINNED_LOCK:
        if not _PINNED:
            package = importlib.resources.files("sealedml.attestation") / "roots"
            loaded: dict[str, ProductRoots] = {}  # all or nothing: a failure leaves none pinned
            for product in PRODUCTS:
                try:
                    pem = (package / f"ask_ark_asvk_{product.lower()}.pem").read_bytes()
                except OSError as exc:
                    raise ConfigurationError(f"AMD {product} roots missing: {exc}") from exc
                roots = ProductRoots.from_pem(product, pem, fingerprint=PINNED_ARK_SPKI_SHA256[product])
                if roots.asvk is None:
                    raise ConfigurationError(f"AMD {product} roots lack the ASVK")
                loaded[product] = roots
            _PINNED.update(loaded)
        return MappingProxyType(dict(_PINNED))


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
                f"{_common_name(wrong.intermediate.subject)!r})"
            )
        return f"{kind.upper()} does not chain to a pinned AMD root through an {_INTERMEDIATE_NAMES[kind]}"

    def _find_chain(self, cert: x509.Certificate, kind: str, table_asvks: Sequence[x509.Certificate]) -> _Chain | None:
        issuer_cn = _common_name(cert.issuer)
        # Try the product named by the certificate's issuer first ("SEV-Milan",
        # "SEV-VLEK-Genoa"), then the others in turn.
        ordered = sorted(self._roots, key=lambda p: 0 if issuer_cn.endswith(p) else 1)
        for product in ordered:
            for intermediate in self._intermediates(product, kind, table_asvks):
                if _pss_signed_by(cert, intermediate):
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
                and _common_name(asvk.subject) == f"SEV-VLEK-{product}"
                and _pss_signed_by(asvk, roots.ark)
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
        _check_valid_at(intermediate, at, f"{_common_name(intermediate.subject)} certificate")
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
        subject = _common_name(cert.subject)
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
