"""SEV-SNP report verification: the real Milan vector and a test-only chain."""

from __future__ import annotations

import importlib.resources
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sealedml.attestation.base import Evidence, TeeType
from sealedml.attestation.collateral import CacheDirVcekSource, build_snp_cert_table
from sealedml.attestation.sev_snp import (
    REPORT_SIZE,
    SevSnpVerifier,
    decode_tcb,
    load_pinned_roots,
    parse_snp_report,
)
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

from ._snp_chain import make_chain, make_vcek, milan_tcb, set_signing_key, sign_report
from ._support import SNP_MEASUREMENT, SNP_TIME


@pytest.fixture(scope="module")
def snp(vectors: Path) -> tuple[bytes, bytes]:
    return (
        (vectors / "sev-snp" / "report-milan.bin").read_bytes(),
        (vectors / "sev-snp" / "vcek-milan.der").read_bytes(),
    )


@pytest.fixture(scope="module")
def chain():  # type: ignore[no-untyped-def]
    return make_chain("Milan")


def _package_roots(product: str) -> bytes:
    return (importlib.resources.files("sealedml.attestation") / "roots" / f"ask_ark_{product.lower()}.pem").read_bytes()


def test_snp_vector_claims(snp: tuple[bytes, bytes]) -> None:
    report, vcek = snp
    claims = SevSnpVerifier(vcek=vcek).verify(Evidence(TeeType.SEV_SNP, report), now=SNP_TIME)
    assert claims.tee is TeeType.SEV_SNP
    assert claims.measurement == SNP_MEASUREMENT
    assert claims.report_data.startswith(bytes.fromhex("0102030405"))
    assert claims.report_data == bytes.fromhex("0102030405") + bytes(59)
    # The vector's guest policy is 0xB0000: SMT allowed, reserved bit 17, DEBUG (bit 19).
    assert claims.debug is True
    details = claims.details
    assert details["policy"] == 0xB0000
    assert details["version"] == 2
    assert details["vmpl"] == 0
    assert details["guest_svn"] == 0
    assert details["product"] == "Milan"
    assert details["product_name"] == "Milan-B0"
    assert details["signing_key"] == "vcek"
    assert details["reported_tcb"] == {"bootloader": 2, "tee": 0, "snp": 5, "microcode": 68}
    assert details["chip_id"].startswith("3ac3fe21e13fb099")
    assert details["host_data"] == "00" * 32
    assert claims.collateral_expires == datetime(2029, 9, 24, 0, 55, 28, tzinfo=UTC)
    json.dumps(claims.to_json())


def test_snp_vcek_from_cert_table_then_cache(snp: tuple[bytes, bytes], tmp_path: Path) -> None:
    report, vcek = snp
    cache = tmp_path / "vceks"
    verifier = SevSnpVerifier(vcek_cache_dir=cache)
    table = build_snp_cert_table({"vcek": vcek})
    claims = verifier.verify(Evidence(TeeType.SEV_SNP, report, table), now=SNP_TIME)
    assert claims.measurement == SNP_MEASUREMENT
    parsed = parse_snp_report(report)
    assert CacheDirVcekSource(cache).find(chip_id=parsed.chip_id, reported_tcb=parsed.reported_tcb, aux=b"") == vcek
    # Later reports of the same chip and TCB need no certificate table.
    again = SevSnpVerifier(vcek_cache_dir=cache).verify(Evidence(TeeType.SEV_SNP, report), now=SNP_TIME)
    assert again.measurement == SNP_MEASUREMENT


def test_snp_without_vcek_is_collateral_error(snp: tuple[bytes, bytes]) -> None:
    report, _ = snp
    with pytest.raises(CollateralError, match="no VCEK"):
        SevSnpVerifier().verify(Evidence(TeeType.SEV_SNP, report), now=SNP_TIME)


def test_snp_vcek_outside_validity(snp: tuple[bytes, bytes]) -> None:
    report, vcek = snp
    with pytest.raises(EvidenceError, match="VCEK expired"):
        SevSnpVerifier(vcek=vcek).verify(Evidence(TeeType.SEV_SNP, report), now=datetime(2030, 1, 1, tzinfo=UTC))
    with pytest.raises(EvidenceError, match="not valid before"):
        SevSnpVerifier(vcek=vcek).verify(Evidence(TeeType.SEV_SNP, report), now=datetime(2022, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[:-1], "must be 1184 bytes"),
        (lambda r: r + b"\x00", "must be 1184 bytes"),
        (lambda r: struct.pack("<I", 1) + r[4:], "unsupported SEV-SNP report version"),
        (lambda r: struct.pack("<I", 6) + r[4:], "unsupported SEV-SNP report version"),
        (lambda r: r[:0x34] + struct.pack("<I", 2) + r[0x38:], "signature algorithm"),
        (lambda r: set_signing_key(r, 7), "not VCEK or VLEK"),
    ],
)
def test_snp_malformed_reports(snp: tuple[bytes, bytes], mutate: object, message: str) -> None:
    report, vcek = snp
    with pytest.raises(EvidenceError, match=message):
        SevSnpVerifier(vcek=vcek).verify(Evidence(TeeType.SEV_SNP, mutate(report)), now=SNP_TIME)  # type: ignore[operator]


def test_snp_wrong_evidence_type(snp: tuple[bytes, bytes]) -> None:
    report, vcek = snp
    with pytest.raises(EvidenceError, match="tdx evidence"):
        SevSnpVerifier(vcek=vcek).verify(Evidence(TeeType.TDX, report), now=SNP_TIME)


def test_pinned_roots_load_and_match_fingerprints() -> None:
    roots = load_pinned_roots()
    assert sorted(roots) == ["Genoa", "Milan", "Turin"]
    for product, bundle in roots.items():
        assert bundle.ark.subject == bundle.ark.issuer
        assert bundle.ask.issuer == bundle.ark.subject
        assert product in bundle.ask.subject.rfc4514_string()


def test_milan_vcek_rejected_without_milan_roots(snp: tuple[bytes, bytes]) -> None:
    report, vcek = snp
    verifier = SevSnpVerifier(vcek=vcek, roots={"Genoa": _package_roots("Genoa"), "Turin": _package_roots("Turin")})
    with pytest.raises(EvidenceError, match="does not chain to a pinned AMD root"):
        verifier.verify(Evidence(TeeType.SEV_SNP, report), now=SNP_TIME)


def test_mislabelled_or_mixed_roots_are_configuration_errors() -> None:
    milan = _package_roots("Milan")
    genoa = _package_roots("Genoa")
    with pytest.raises(ConfigurationError, match="ARK is 'ARK-Genoa'"):
        SevSnpVerifier(roots={"Milan": genoa})
    milan_ask = milan[: milan.index(b"-----END CERTIFICATE-----") + 26]
    genoa_ark = genoa[genoa.index(b"-----END CERTIFICATE-----") + 26 :]
    with pytest.raises(ConfigurationError):
        SevSnpVerifier(roots={"Milan": milan_ask + genoa_ark})
    with pytest.raises(ConfigurationError):
        SevSnpVerifier(roots={"Milan": milan_ask})


def test_ask_of_another_product_in_cert_table_is_not_used(snp: tuple[bytes, bytes]) -> None:
    report, vcek = snp
    genoa_ask = load_pinned_roots()["Genoa"].ask.public_bytes(serialization.Encoding.DER)
    table = build_snp_cert_table({"vcek": vcek, "ask": genoa_ask})
    claims = SevSnpVerifier().verify(Evidence(TeeType.SEV_SNP, report, table), now=SNP_TIME)
    assert claims.details["product"] == "Milan"


# ---------------------------------------------------------------------------
# Checks after the chain, with a test-only root
# ---------------------------------------------------------------------------


def test_test_chain_accepts_a_matching_vcek(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    vcek, key = make_vcek(chain.ask, chain.ask_key, tcb=milan_tcb(parsed.reported_tcb), hwid=parsed.chip_id)
    signed = sign_report(report, key)
    verifier = SevSnpVerifier(vcek=vcek, roots={"Milan": chain.roots_pem})
    claims = verifier.verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)
    assert claims.measurement == SNP_MEASUREMENT


def test_vcek_of_another_chip_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    other_chip = bytes(b ^ 0xFF for b in parsed.chip_id)
    vcek, key = make_vcek(chain.ask, chain.ask_key, tcb=milan_tcb(parsed.reported_tcb), hwid=other_chip)
    signed = sign_report(report, key)
    verifier = SevSnpVerifier(vcek=vcek, roots={"Milan": chain.roots_pem})
    with pytest.raises(EvidenceError, match="another chip"):
        verifier.verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)


def test_vcek_for_another_tcb_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    tcb = milan_tcb(parsed.reported_tcb) | {"snp": 6}
    vcek, key = make_vcek(chain.ask, chain.ask_key, tcb=tcb, hwid=parsed.chip_id)
    signed = sign_report(report, key)
    verifier = SevSnpVerifier(vcek=vcek, roots={"Milan": chain.roots_pem})
    with pytest.raises(EvidenceError, match="REPORTED_TCB"):
        verifier.verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)


def test_vcek_missing_spl_extension_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    tcb = milan_tcb(parsed.reported_tcb)
    del tcb["microcode"]
    vcek, key = make_vcek(chain.ask, chain.ask_key, tcb=tcb, hwid=parsed.chip_id)
    verifier = SevSnpVerifier(vcek=vcek, roots={"Milan": chain.roots_pem})
    with pytest.raises(EvidenceError, match="microcode SPL"):
        verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(report, key)), now=SNP_TIME)


def test_vlek_chain_through_an_asvk_from_the_cert_table(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    asvk, asvk_key = chain.intermediate("SEV-VLEK-Milan")
    vlek, key = make_vcek(asvk, asvk_key, tcb=milan_tcb(parsed.reported_tcb), hwid=None, cn="SEV-VLEK")
    signed = sign_report(set_signing_key(report, 1), key)
    table = build_snp_cert_table({"vlek": vlek, "ask": asvk.public_bytes(serialization.Encoding.DER)})
    verifier = SevSnpVerifier(roots={"Milan": chain.roots_pem})
    claims = verifier.verify(Evidence(TeeType.SEV_SNP, signed, table), now=SNP_TIME)
    assert claims.details["signing_key"] == "vlek"
    # The same VLEK cannot stand in for a VCEK-signed report.
    vcek_signed = sign_report(report, key)
    with pytest.raises(EvidenceError, match="not a VCEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, vcek_signed, table), now=SNP_TIME)


def test_vcek_cannot_sign_a_vlek_report(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    vcek, key = make_vcek(chain.ask, chain.ask_key, tcb=milan_tcb(parsed.reported_tcb), hwid=parsed.chip_id)
    signed = sign_report(set_signing_key(report, 1), key)
    verifier = SevSnpVerifier(vcek=vcek, roots={"Milan": chain.roots_pem})
    with pytest.raises(EvidenceError, match="not a VLEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)


def test_turin_tcb_layout_and_hwid() -> None:
    raw = int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 9]), "little")
    assert decode_tcb(raw, "Turin") == {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 9}
    assert decode_tcb(raw, "Milan") == {"bootloader": 1, "tee": 2, "snp": 0, "microcode": 9}


def test_turin_vcek_uses_an_eight_byte_hwid(snp: tuple[bytes, bytes]) -> None:
    report, _ = snp
    turin = make_chain("Turin")
    parsed = parse_snp_report(report)
    tcb = decode_tcb(parsed.reported_tcb, "Turin")
    vcek, key = make_vcek(turin.ask, turin.ask_key, tcb=tcb, hwid=parsed.chip_id[:8], product_name="Turin-B0")
    verifier = SevSnpVerifier(vcek=vcek, roots={"Turin": turin.roots_pem})
    claims = verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(report, key)), now=SNP_TIME)
    assert claims.details["product"] == "Turin"
    wrong, key2 = make_vcek(turin.ask, turin.ask_key, tcb=tcb, hwid=bytes(8), product_name="Turin-B0")
    verifier = SevSnpVerifier(vcek=wrong, roots={"Turin": turin.roots_pem})
    with pytest.raises(EvidenceError, match="another chip"):
        verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(report, key2)), now=SNP_TIME)


def test_report_size_constant() -> None:
    assert REPORT_SIZE == 1184
