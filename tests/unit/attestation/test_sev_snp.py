"""SEV-SNP report verification: the real Milan vector and a test-only chain."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealedml.attestation.base import Evidence, TeeType
from sealedml.attestation.sev_snp import SevSnpVerifier
from sealedml.attestation.sev_snp_collateral import CacheDirVcekSource, build_snp_cert_table
from sealedml.attestation.sev_snp_report import REPORT_SIZE, decode_tcb, parse_snp_report
from sealedml.attestation.sev_snp_roots import (
    PINNED_ARK_SPKI_SHA256,
    PRODUCTS,
    ProductRoots,
    load_pinned_roots,
    roots_bundle_product,
)
from sealedml.errors import CollateralError, ConfigurationError, EvidenceError

from ._snp_chain import make_chain, make_vcek, make_vlek, milan_tcb, set_signing_key, sign_report
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
    roots = importlib.resources.files("sealedml.attestation") / "roots"
    return (roots / f"ask_ark_asvk_{product.lower()}.pem").read_bytes()


def _spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


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


def test_shipped_asvk_roots_load_and_match_the_pinned_ark_fingerprints(vectors: Path) -> None:
    roots = load_pinned_roots()
    for product in PRODUCTS:
        bundle = roots[product]
        assert _spki_sha256(bundle.ark) == PINNED_ARK_SPKI_SHA256[product]
        assert bundle.asvk is not None
        cn = bundle.asvk.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == f"SEV-VLEK-{product}"
        assert bundle.asvk.issuer == bundle.ark.subject
        assert bundle.asvk != bundle.ask
        # The shipped bundle is AMD's, as copied into the vectors (ASK, ARK, ASVK).
        shipped = x509.load_pem_x509_certificates(_package_roots(product))
        amd = x509.load_pem_x509_certificates(
            (vectors / "sev-snp" / f"ask_ark_asvk_{product.lower()}.pem").read_bytes()
        )
        assert shipped == amd == [bundle.ask, bundle.ark, bundle.asvk]
        assert roots_bundle_product(_package_roots(product)) == product


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


def test_asvk_of_another_product_or_ark_in_pinned_roots_is_a_configuration_error() -> None:
    milan, genoa = make_chain("Milan"), make_chain("Genoa")
    genoa_asvk = genoa.asvk.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ConfigurationError, match="ASVK is 'SEV-VLEK-Genoa'"):
        ProductRoots.from_pem("Milan", milan.roots_pem + genoa_asvk)
    # Named SEV-VLEK-Milan but signed by another ARK.
    other_milan = make_chain("Milan")
    with pytest.raises(ConfigurationError, match="ASVK is not signed by the ARK"):
        ProductRoots.from_pem("Milan", milan.roots_pem + other_milan.asvk.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigurationError, match="expected ASK, ARK and optionally ASVK"):
        ProductRoots.from_pem("Milan", milan.roots_asvk_pem + genoa_asvk)
    assert ProductRoots.from_pem("Milan", milan.roots_asvk_pem).asvk == milan.asvk
    assert ProductRoots.from_pem("Milan", milan.roots_pem).asvk is None


def test_roots_bundle_product_reads_the_ark_name() -> None:
    assert roots_bundle_product(make_chain("Genoa").roots_asvk_pem) == "Genoa"
    milan = make_chain("Milan")
    with pytest.raises(ConfigurationError, match="one ARK"):
        roots_bundle_product(milan.ask.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigurationError, match="unknown product 'Rome'"):
        roots_bundle_product(make_chain("Rome").roots_pem)


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


# ---------------------------------------------------------------------------
# VCEK vs VLEK: the report's SIGNING_KEY picks ASK or ASVK
# ---------------------------------------------------------------------------


def _vlek_signed(report: bytes, chain, **kwargs):  # type: ignore[no-untyped-def]
    """The vector as a VLEK-signed report (SIGNING_KEY 1), signed by a VLEK from ``chain``'s ASVK."""
    parsed = parse_snp_report(report)
    vlek, key = make_vlek(chain.asvk, chain.asvk_key, tcb=milan_tcb(parsed.reported_tcb), **kwargs)
    return sign_report(set_signing_key(report, 1), key), vlek, key


def _vcek_signed(report: bytes, chain):  # type: ignore[no-untyped-def]
    """The vector signed by a VCEK from ``chain``'s ASK (SIGNING_KEY 0)."""
    parsed = parse_snp_report(report)
    vcek, key = make_vcek(chain.ask, chain.ask_key, tcb=milan_tcb(parsed.reported_tcb), hwid=parsed.chip_id)
    return sign_report(report, key), vcek, key


def test_vlek_signed_report_verifies_with_the_pinned_asvk_alone(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    signed, vlek, _ = _vlek_signed(report, chain)
    verifier = SevSnpVerifier(vcek=vlek, roots={"Milan": chain.roots_asvk_pem})
    claims = verifier.verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)
    assert claims.measurement == SNP_MEASUREMENT
    assert claims.details["signing_key"] == "vlek"
    assert claims.details["product"] == "Milan"
    assert claims.collateral_expires == min(chain.asvk.not_valid_after_utc, chain.ark.not_valid_after_utc)


def test_vlek_chain_through_an_asvk_from_the_cert_table(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    # Roots without an ASVK: the table's ASVK is used because the pinned ARK signed it.
    report, _ = snp
    signed, vlek, _ = _vlek_signed(report, chain)
    table = build_snp_cert_table({"vlek": vlek, "ask": chain.asvk_der})
    verifier = SevSnpVerifier(roots={"Milan": chain.roots_pem})
    claims = verifier.verify(Evidence(TeeType.SEV_SNP, signed, table), now=SNP_TIME)
    assert claims.details["signing_key"] == "vlek"
    # Without the table's ASVK nothing pins one.
    with pytest.raises(EvidenceError, match="VLEK does not chain to a pinned AMD root through an ASVK"):
        SevSnpVerifier(vcek=vlek, roots={"Milan": chain.roots_pem}).verify(
            Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME
        )


def test_vlek_offered_for_a_vcek_signed_report_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    _, vlek, key = _vlek_signed(report, chain)
    vcek_signed = sign_report(report, key)  # SIGNING_KEY 0, signed with the VLEK's key
    verifier = SevSnpVerifier(vcek=vlek, roots={"Milan": chain.roots_asvk_pem})
    with pytest.raises(EvidenceError, match="signed by a VCEK but the certificate is not a VCEK: it is a VLEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, vcek_signed), now=SNP_TIME)


def test_vlek_offered_for_a_vcek_signed_report_through_the_cert_table_is_rejected(  # type: ignore[no-untyped-def]
    snp: tuple[bytes, bytes], chain
) -> None:
    report, _ = snp
    _, vlek, key = _vlek_signed(report, chain)
    vcek_signed = sign_report(report, key)
    table = build_snp_cert_table({"vlek": vlek, "ask": chain.asvk_der})
    for roots in (chain.roots_pem, chain.roots_asvk_pem):
        verifier = SevSnpVerifier(roots={"Milan": roots})
        with pytest.raises(EvidenceError, match="not a VCEK: it is a VLEK"):
            verifier.verify(Evidence(TeeType.SEV_SNP, vcek_signed, table), now=SNP_TIME)


def test_vcek_offered_for_a_vlek_signed_report_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    _, vcek, key = _vcek_signed(report, chain)
    vlek_signed = sign_report(set_signing_key(report, 1), key)
    for roots in (chain.roots_pem, chain.roots_asvk_pem):
        verifier = SevSnpVerifier(vcek=vcek, roots={"Milan": roots})
        with pytest.raises(EvidenceError, match="signed by a VLEK but the certificate is not a VLEK: it is a VCEK"):
            verifier.verify(Evidence(TeeType.SEV_SNP, vlek_signed), now=SNP_TIME)


def test_vcek_offered_for_a_vlek_signed_report_through_the_cert_table_is_rejected(  # type: ignore[no-untyped-def]
    snp: tuple[bytes, bytes], chain
) -> None:
    # The table's ASK slot holds the real ASK: it is no ASVK, so it cannot make a VCEK a VLEK.
    report, _ = snp
    _, vcek, key = _vcek_signed(report, chain)
    vlek_signed = sign_report(set_signing_key(report, 1), key)
    table = build_snp_cert_table({"vcek": vcek, "ask": chain.ask.public_bytes(serialization.Encoding.DER)})
    verifier = SevSnpVerifier(roots={"Milan": chain.roots_asvk_pem})
    with pytest.raises(EvidenceError, match="not a VLEK: it is a VCEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, vlek_signed, table), now=SNP_TIME)


def test_real_vcek_offered_for_a_vlek_signed_report_is_rejected(snp: tuple[bytes, bytes]) -> None:
    # AMD's real Milan VCEK, with the shipped ASK, ARK and ASVK.
    report, vcek = snp
    with pytest.raises(EvidenceError, match="not a VLEK: it is a VCEK \\(issued by the ASK 'SEV-Milan'\\)"):
        SevSnpVerifier(vcek=vcek).verify(Evidence(TeeType.SEV_SNP, set_signing_key(report, 1)), now=SNP_TIME)
    table = build_snp_cert_table({"vcek": vcek})
    with pytest.raises(EvidenceError, match="not a VLEK"):
        SevSnpVerifier().verify(Evidence(TeeType.SEV_SNP, set_signing_key(report, 1), table), now=SNP_TIME)


def test_vlek_named_certificate_signed_by_the_ask_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    # A "SEV-VLEK" certificate without hwID is still a VCEK if the ASK signed it.
    report, _ = snp
    parsed = parse_snp_report(report)
    fake, key = make_vlek(chain.ask, chain.ask_key, tcb=milan_tcb(parsed.reported_tcb))
    signed = sign_report(set_signing_key(report, 1), key)
    verifier = SevSnpVerifier(vcek=fake, roots={"Milan": chain.roots_asvk_pem})
    with pytest.raises(EvidenceError, match="not a VLEK: it is a VCEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)


def test_vcek_named_certificate_signed_by_the_asvk_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    # A "SEV-VCEK" with this chip's hwID is still a VLEK if the ASVK signed it.
    report, _ = snp
    parsed = parse_snp_report(report)
    fake, key = make_vcek(chain.asvk, chain.asvk_key, tcb=milan_tcb(parsed.reported_tcb), hwid=parsed.chip_id)
    verifier = SevSnpVerifier(vcek=fake, roots={"Milan": chain.roots_asvk_pem})
    with pytest.raises(EvidenceError, match="not a VCEK: it is a VLEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(report, key)), now=SNP_TIME)
    # Nor can it sign a VLEK report: its name (and hwID) say VCEK.
    with pytest.raises(EvidenceError, match="signed by a VLEK but the certificate is not a VLEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(set_signing_key(report, 1), key)), now=SNP_TIME)


def test_vlek_under_another_products_chain_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    signed, vlek, _ = _vlek_signed(report, chain)  # Milan test chain
    genoa = make_chain("Genoa")
    verifier = SevSnpVerifier(vcek=vlek, roots={"Genoa": genoa.roots_asvk_pem})
    with pytest.raises(EvidenceError, match="VLEK does not chain to a pinned AMD root"):
        verifier.verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)
    # Nor with the shipped AMD roots.
    with pytest.raises(EvidenceError, match="VLEK does not chain to a pinned AMD root"):
        SevSnpVerifier(vcek=vlek).verify(Evidence(TeeType.SEV_SNP, signed), now=SNP_TIME)


def test_vlek_under_another_products_chain_through_the_cert_table_is_rejected(  # type: ignore[no-untyped-def]
    snp: tuple[bytes, bytes], chain
) -> None:
    report, _ = snp
    signed, vlek, _ = _vlek_signed(report, chain)
    genoa = make_chain("Genoa")
    # The Milan ASVK in the table is not signed by the pinned Genoa ARK.
    table = build_snp_cert_table({"vlek": vlek, "ask": chain.asvk_der})
    with pytest.raises(EvidenceError, match="VLEK does not chain to a pinned AMD root"):
        SevSnpVerifier(roots={"Genoa": genoa.roots_pem}).verify(Evidence(TeeType.SEV_SNP, signed, table), now=SNP_TIME)


def test_asvk_of_another_product_in_cert_table_is_not_used(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    # An intermediate signed by the pinned Milan ARK but named for Genoa is no Milan ASVK.
    report, _ = snp
    mislabelled, mislabelled_key = chain.intermediate("SEV-VLEK-Genoa")
    parsed = parse_snp_report(report)
    vlek, key = make_vlek(mislabelled, mislabelled_key, tcb=milan_tcb(parsed.reported_tcb))
    signed = sign_report(set_signing_key(report, 1), key)
    table = build_snp_cert_table({"vlek": vlek, "ask": mislabelled.public_bytes(serialization.Encoding.DER)})
    with pytest.raises(EvidenceError, match="VLEK does not chain"):
        SevSnpVerifier(roots={"Milan": chain.roots_pem}).verify(Evidence(TeeType.SEV_SNP, signed, table), now=SNP_TIME)


def test_altered_vlek_signed_report_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    signed, vlek, _ = _vlek_signed(report, chain)
    verifier = SevSnpVerifier(vcek=vlek, roots={"Milan": chain.roots_asvk_pem})
    altered = bytearray(signed)
    altered[0x90] ^= 1  # MEASUREMENT
    with pytest.raises(EvidenceError, match="signature invalid"):
        verifier.verify(Evidence(TeeType.SEV_SNP, bytes(altered)), now=SNP_TIME)
    # Turning SIGNING_KEY to VCEK: the VLEK no longer fits the report.
    with pytest.raises(EvidenceError, match="not a VCEK"):
        verifier.verify(Evidence(TeeType.SEV_SNP, set_signing_key(signed, 0)), now=SNP_TIME)


def test_vlek_for_another_tcb_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    vlek, key = make_vlek(chain.asvk, chain.asvk_key, tcb=milan_tcb(parsed.reported_tcb) | {"snp": 6})
    verifier = SevSnpVerifier(vcek=vlek, roots={"Milan": chain.roots_asvk_pem})
    with pytest.raises(EvidenceError, match=r"VLEK is for TCB .* REPORTED_TCB"):
        verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(set_signing_key(report, 1), key)), now=SNP_TIME)


def test_vlek_with_a_hwid_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    parsed = parse_snp_report(report)
    vlek, key = make_vcek(
        chain.asvk, chain.asvk_key, tcb=milan_tcb(parsed.reported_tcb), hwid=parsed.chip_id, cn="SEV-VLEK"
    )
    verifier = SevSnpVerifier(vcek=vlek, roots={"Milan": chain.roots_asvk_pem})
    with pytest.raises(EvidenceError, match="not a VLEK \\(it has a hwID\\)"):
        verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(set_signing_key(report, 1), key)), now=SNP_TIME)


def test_expired_asvk_is_rejected(snp: tuple[bytes, bytes], chain) -> None:  # type: ignore[no-untyped-def]
    report, _ = snp
    asvk, asvk_key = chain.intermediate("SEV-VLEK-Milan", not_after=datetime(2025, 1, 1, tzinfo=UTC))
    parsed = parse_snp_report(report)
    vlek, key = make_vlek(asvk, asvk_key, tcb=milan_tcb(parsed.reported_tcb))
    roots = chain.roots_pem + asvk.public_bytes(serialization.Encoding.PEM)
    verifier = SevSnpVerifier(vcek=vlek, roots={"Milan": roots})
    with pytest.raises(EvidenceError, match="SEV-VLEK-Milan certificate expired"):
        verifier.verify(Evidence(TeeType.SEV_SNP, sign_report(set_signing_key(report, 1), key)), now=SNP_TIME)


def test_cert_table_with_vcek_and_vlek_offers_the_key_the_report_names(  # type: ignore[no-untyped-def]
    snp: tuple[bytes, bytes], chain
) -> None:
    report, _ = snp
    vlek_signed, vlek, _ = _vlek_signed(report, chain)
    vcek_signed, vcek, _ = _vcek_signed(report, chain)
    table = build_snp_cert_table({"vcek": vcek, "vlek": vlek})
    verifier = SevSnpVerifier(roots={"Milan": chain.roots_asvk_pem})
    assert verifier.verify(Evidence(TeeType.SEV_SNP, vlek_signed, table), now=SNP_TIME).details["signing_key"] == "vlek"
    assert verifier.verify(Evidence(TeeType.SEV_SNP, vcek_signed, table), now=SNP_TIME).details["signing_key"] == "vcek"


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
