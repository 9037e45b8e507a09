"""The AMD SEV-SNP ATTESTATION_REPORT: its layout, parsed but not verified.

Offsets, sizes and field meanings are those of the *SEV Secure Nested Paging
Firmware ABI Specification* (AMD publication 56860), "ATTESTATION_REPORT
Structure" (Table 23 in rev. 1.57, Table 21 in earlier revisions): exactly 1184
bytes, VERSION 2 to 5, SIGNATURE_ALGO 1 (ECDSA P-384 with SHA-384), SIGNING_KEY
0 (VCEK) or 1 (VLEK). The signature covers bytes 0x000-0x29F; R and S are
little-endian, zero-extended to 72 bytes each, at 0x2A0 and 0x2E8 ("ECDSA P-384
with SHA-384 Signature" format). TCB values are TCB_VERSION u64s, whose layout
depends on the product (:func:`decode_tcb`, ABI spec Table 3).

:class:`~sealedml.attestation.sev_snp.SevSnpVerifier` checks the signature and
the certificate chain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sealedml.errors import EvidenceError

__all__ = [
    "REPORT_SIZE",
    "SIGNED_LEN",
    "SnpReport",
    "decode_tcb",
    "parse_snp_report",
]

#: Size of ATTESTATION_REPORT (0x4A0).
REPORT_SIZE = 0x4A0
#: The signature covers bytes 0x000-0x29F.
SIGNED_LEN = 0x2A0
_SIG_R = 0x2A0
_SIG_S = 0x2E8
_SIG_COMPONENT = 72


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
