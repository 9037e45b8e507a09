"""The negative matrix of attestation: every altered or unacceptable evidence is refused.

Built on the real vectors in ``../shared/vectors/attestation``: a verifier that
accepts them and refuses every altered copy is verifying for real.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealedml.attestation.base import Evidence, TeeType
from sealedml.attestation.dcap import SgxDcapVerifier, TdxDcapVerifier
from sealedml.attestation.policy import Policy
from sealedml.attestation.ratls import verify_ratls_certificate
from sealedml.attestation.ratls_evidence import INTEL_QUOTE_OID
from sealedml.attestation.sev_snp import SevSnpVerifier
from sealedml.attestation.sev_snp_collateral import build_snp_cert_table
from sealedml.attestation.sev_snp_report import parse_snp_report
from sealedml.errors import CollateralError, EvidenceError, PolicyError

REPO_ROOT = Path(__file__).resolve().parents[2]
VECTORS = (REPO_ROOT / ".." / "shared" / "vectors" / "attestation").resolve()
if not VECTORS.is_dir():
    pytest.skip(f"attestation vectors not found at {VECTORS}", allow_module_level=True)

AT = datetime(2025, 7, 1, tzinfo=UTC)
SEED = 20251121
SAMPLES = 200

SGX_QUOTE = (VECTORS / "sgx-dcap" / "quote.bin").read_bytes()
TDX_QUOTE = (VECTORS / "tdx" / "quote-v4.bin").read_bytes()
SNP_REPORT = (VECTORS / "sev-snp" / "report-milan.bin").read_bytes()
SNP_VCEK = (VECTORS / "sev-snp" / "vcek-milan.der").read_bytes()
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
SNP_MEASUREMENT = "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01"
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@pytest.fixture(scope="module")
def sgx() -> SgxDcapVerifier:
    return SgxDcapVerifier(VECTORS / "sgx-dcap" / "collateral.json")


@pytest.fixture(scope="module")
def tdx() -> TdxDcapVerifier:
    return TdxDcapVerifier(VECTORS / "tdx" / "collateral-v4.json")


@pytest.fixture(scope="module")
def snp() -> SevSnpVerifier:
    return SevSnpVerifier(vcek=SNP_VCEK)


def _flips(length: int, positions: list[int], seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(p, rng.randrange(1, 256)) for p in positions if p < length]


def _flipped(data: bytes, position: int, xor: int) -> bytes:
    out = bytearray(data)
    out[position] ^= xor
    return bytes(out)


def _sample(start: int, stop: int, seed: int) -> list[int]:
    positions = list(range(start, stop))
    return sorted(random.Random(seed).sample(positions, min(SAMPLES, len(positions))))


# ---------------------------------------------------------------------------
# Freshness and TCB
# ---------------------------------------------------------------------------


def test_sgx_rejects_expired_collateral_today(sgx: SgxDcapVerifier) -> None:
    # The vector's collateral is valid 2025-06-19 … 2025-07-19; "today" is later.
    with pytest.raises(CollateralError, match="expired"):
        sgx.verify(Evidence(TeeType.SGX, SGX_QUOTE))


def test_tdx_rejects_outdated_quote_with_no_matching_tcb_level() -> None:
    verifier = TdxDcapVerifier(VECTORS / "tdx" / "collateral-outdated.json")
    quote = (VECTORS / "tdx" / "quote-outdated.bin").read_bytes()
    with pytest.raises(EvidenceError, match="No matching TCB level"):
        verifier.verify(Evidence(TeeType.TDX, quote), now=datetime(2026, 3, 1, tzinfo=UTC))


def test_sgx_rejects_collateral_before_its_issue_date(sgx: SgxDcapVerifier) -> None:
    with pytest.raises(CollateralError):
        sgx.verify(Evidence(TeeType.SGX, SGX_QUOTE), now=datetime(2025, 6, 1, tzinfo=UTC))


# ---------------------------------------------------------------------------
# Single-byte flips (≥ 200 positions per vector, deterministic seed)
# ---------------------------------------------------------------------------

# SGX quote v3: header 0-47 and report body 48-431 are signed by the attestation
# key; the ECDSA signature (r ‖ s) is at 436-499, the attestation key at 500-563.
SGX_SIGNED = _sample(0, 432, SEED)
SGX_SIGNATURE = list(range(436, 564))
# TDX quote v4: header + TD quote body 0-631 signed; signature at 636-699.
TDX_SIGNED = _sample(0, 632, SEED + 1)
TDX_SIGNATURE = list(range(636, 764))
# SEV-SNP: bytes 0x000-0x29F signed; R and S (72 bytes each, little-endian) at 0x2A0.
SNP_SIGNED = _sample(0, 0x2A0, SEED + 2)
SNP_SIGNATURE = list(range(0x2A0, 0x330))


def test_flip_samples_are_large_enough() -> None:
    assert len(SGX_SIGNED) + len(SGX_SIGNATURE) >= 200
    assert len(TDX_SIGNED) + len(TDX_SIGNATURE) >= 200
    assert len(SNP_SIGNED) + len(SNP_SIGNATURE) >= 200


@pytest.mark.parametrize(("region", "positions"), [("signed region", SGX_SIGNED), ("signature", SGX_SIGNATURE)])
def test_sgx_rejects_single_byte_flips(sgx: SgxDcapVerifier, region: str, positions: list[int]) -> None:
    accepted = []
    for position, xor in _flips(len(SGX_QUOTE), positions, SEED):
        try:
            sgx.verify(Evidence(TeeType.SGX, _flipped(SGX_QUOTE, position, xor)), now=AT)
        except EvidenceError:
            continue
        accepted.append(position)
    assert accepted == [], f"flips in the {region} accepted at {accepted}"


@pytest.mark.parametrize(("region", "positions"), [("signed region", TDX_SIGNED), ("signature", TDX_SIGNATURE)])
def test_tdx_rejects_single_byte_flips(tdx: TdxDcapVerifier, region: str, positions: list[int]) -> None:
    accepted = []
    for position, xor in _flips(len(TDX_QUOTE), positions, SEED + 1):
        try:
            tdx.verify(Evidence(TeeType.TDX, _flipped(TDX_QUOTE, position, xor)), now=AT)
        except EvidenceError:
            continue
        accepted.append(position)
    assert accepted == [], f"flips in the {region} accepted at {accepted}"


@pytest.mark.parametrize(("region", "positions"), [("signed region", SNP_SIGNED), ("signature", SNP_SIGNATURE)])
def test_snp_rejects_single_byte_flips(snp: SevSnpVerifier, region: str, positions: list[int]) -> None:
    accepted = []
    for position, xor in _flips(len(SNP_REPORT), positions, SEED + 2):
        try:
            snp.verify(Evidence(TeeType.SEV_SNP, _flipped(SNP_REPORT, position, xor)), now=AT)
        except EvidenceError:
            continue
        accepted.append(position)
    assert accepted == [], f"flips in the {region} accepted at {accepted}"


def test_sgx_quote_rejected_by_the_tdx_verifier(tdx: TdxDcapVerifier) -> None:
    with pytest.raises(EvidenceError):
        tdx.verify(Evidence(TeeType.TDX, SGX_QUOTE), now=AT)


# ---------------------------------------------------------------------------
# SEV-SNP certificate chain
# ---------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _vcek(issuer_name: x509.Name, signer: object, hwid: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A VCEK-shaped certificate: P-384 key, AMD TCB extensions, hwID."""
    tcb = {
        "1.3.6.1.4.1.3704.1.3.1": 2,
        "1.3.6.1.4.1.3704.1.3.2": 0,
        "1.3.6.1.4.1.3704.1.3.3": 5,
        "1.3.6.1.4.1.3704.1.3.8": 68,
    }
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("SEV-VCEK"))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4"), hwid), critical=False)
    )
    for oid, value in tcb.items():
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), bytes([2, 1, value])), critical=False
        )
    if isinstance(signer, rsa.RSAPrivateKey):
        cert = builder.sign(signer, hashes.SHA384(), rsa_padding=PSS)
    else:
        cert = builder.sign(signer, hashes.SHA384())  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


def _resign(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    data = bytearray(report)
    r, s = decode_dss_signature(key.sign(bytes(data[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    data[0x2A0:0x2E8] = r.to_bytes(72, "little")
    data[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(data)


def test_snp_rejects_a_forged_vcek_for_another_chip() -> None:
    # A fresh P-384 certificate with a different hwID, signed by a fresh key and
    # claiming AMD's SEV-Milan issuer; the report is re-signed with its key.
    key = ec.generate_private_key(ec.SECP384R1())
    other_chip = bytes(64 * [0x42])
    forged = _vcek(_name("SEV-Milan"), ec.generate_private_key(ec.SECP384R1()), other_chip, key)
    report = _resign(SNP_REPORT, key)
    with pytest.raises(EvidenceError, match="does not chain to a pinned AMD root"):
        SevSnpVerifier(vcek=forged).verify(Evidence(TeeType.SEV_SNP, report), now=AT)
    # Also via the certificate table, and with AMD's real ASK and ARK next to it.
    ask, ark = (VECTORS / "sev-snp" / "ask_ark_milan.pem").read_bytes().split(b"-----END CERTIFICATE-----")[:2]
    table = build_snp_cert_table(
        {
            "vcek": forged,
            "ask": x509.load_pem_x509_certificate(ask + b"-----END CERTIFICATE-----\n").public_bytes(
                serialization.Encoding.DER
            ),
        }
    )
    with pytest.raises(EvidenceError, match="does not chain"):
        SevSnpVerifier().verify(Evidence(TeeType.SEV_SNP, report, table), now=AT)
    del ark


def test_snp_rejects_vcek_of_another_chip_under_a_trusted_chain() -> None:
    # With a chain the verifier trusts (a test root pinned as "Milan"), a VCEK
    # whose hwID differs from the report's CHIP_ID is still refused.
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def ca(cn: str, issuer: str, public: rsa.RSAPublicKey) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(issuer))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
            .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
            .sign(ark_key, hashes.SHA384(), rsa_padding=PSS)
        )

    ark = ca("ARK-Milan", "ARK-Milan", ark_key.public_key())
    ask = ca("SEV-Milan", "ARK-Milan", ask_key.public_key())
    roots = ask.public_bytes(serialization.Encoding.PEM) + ark.public_bytes(serialization.Encoding.PEM)
    key = ec.generate_private_key(ec.SECP384R1())
    chip = parse_snp_report(SNP_REPORT).chip_id
    report = _resign(SNP_REPORT, key)
    own = _vcek(ask.subject, ask_key, chip, key)
    assert (
        SevSnpVerifier(vcek=own, roots={"Milan": roots}).verify(Evidence(TeeType.SEV_SNP, report), now=AT).measurement
        == SNP_MEASUREMENT
    )
    other = _vcek(ask.subject, ask_key, bytes(b ^ 1 for b in chip), key)
    with pytest.raises(EvidenceError, match="another chip"):
        SevSnpVerifier(vcek=other, roots={"Milan": roots}).verify(Evidence(TeeType.SEV_SNP, report), now=AT)


def test_snp_rejects_ask_and_ark_of_the_wrong_product() -> None:
    genoa = (VECTORS / "sev-snp" / "ask_ark_genoa.pem").read_bytes()
    turin = (VECTORS / "sev-snp" / "ask_ark_turin.pem").read_bytes()
    verifier = SevSnpVerifier(vcek=SNP_VCEK, roots={"Genoa": genoa, "Turin": turin})
    with pytest.raises(EvidenceError, match="does not chain to a pinned AMD root"):
        verifier.verify(Evidence(TeeType.SEV_SNP, SNP_REPORT), now=AT)
    # A Genoa ASK offered in the certificate table does not verify a Milan VCEK either.
    genoa_ask = x509.load_pem_x509_certificates(genoa)[0].public_bytes(serialization.Encoding.DER)
    table = build_snp_cert_table({"vcek": SNP_VCEK, "ask": genoa_ask})
    with pytest.raises(EvidenceError, match="does not chain"):
        SevSnpVerifier(roots={"Genoa": genoa}).verify(Evidence(TeeType.SEV_SNP, SNP_REPORT, table), now=AT)


# ---------------------------------------------------------------------------
# Policy rejections on real claims
# ---------------------------------------------------------------------------

TOLERANT_SGX = Policy.for_measurements([MRENCLAVE], tcb_statuses=frozenset({"ConfigurationAndSWHardeningNeeded"}))


def test_sgx_debug_enclave_rejected_by_default_policy(sgx: SgxDcapVerifier) -> None:
    claims = sgx.verify(Evidence(TeeType.SGX, SGX_QUOTE), now=AT)
    TOLERANT_SGX.verify(claims)
    with pytest.raises(PolicyError, match="debug TEE not allowed"):
        TOLERANT_SGX.verify(replace(claims, debug=True))


def test_sgx_setting_the_debug_attribute_breaks_the_signature(sgx: SgxDcapVerifier) -> None:
    # ATTRIBUTES.FLAGS is at quote offset 96; bit 1 is DEBUG.
    assert SGX_QUOTE[96] & 0x2 == 0
    with pytest.raises(EvidenceError):
        sgx.verify(Evidence(TeeType.SGX, _flipped(SGX_QUOTE, 96, 0x2)), now=AT)


def test_snp_debug_guest_rejected_by_default_policy(snp: SevSnpVerifier) -> None:
    # The public Milan report was produced by a guest with POLICY.DEBUG set.
    claims = snp.verify(Evidence(TeeType.SEV_SNP, SNP_REPORT), now=AT)
    assert claims.debug is True
    with pytest.raises(PolicyError, match="debug TEE not allowed"):
        Policy.for_measurements([SNP_MEASUREMENT]).verify(claims)
    # Clearing the bit would need a new signature.
    with pytest.raises(EvidenceError):
        snp.verify(Evidence(TeeType.SEV_SNP, _flipped(SNP_REPORT, 0x0A, 0x08)), now=AT)


def test_tcb_status_not_in_policy_rejected(sgx: SgxDcapVerifier) -> None:
    claims = sgx.verify(Evidence(TeeType.SGX, SGX_QUOTE), now=AT)
    with pytest.raises(PolicyError, match="TCB status ConfigurationAndSWHardeningNeeded not accepted"):
        Policy.for_measurements([MRENCLAVE]).verify(claims)


def test_advisory_not_accepted_rejected(sgx: SgxDcapVerifier) -> None:
    claims = sgx.verify(Evidence(TeeType.SGX, SGX_QUOTE), now=AT)
    policy = replace(TOLERANT_SGX, accepted_advisories=frozenset({"INTEL-SA-00289"}))
    with pytest.raises(PolicyError, match="INTEL-SA-00615"):
        policy.verify(claims)


def test_measurement_not_in_policy_rejected(tdx: TdxDcapVerifier) -> None:
    claims = tdx.verify(Evidence(TeeType.TDX, TDX_QUOTE), now=AT)
    Policy.for_measurements([MRTD]).verify(claims)
    with pytest.raises(PolicyError, match="measurement"):
        Policy.for_measurements([MRENCLAVE]).verify(claims)
    with pytest.raises(PolicyError, match="empty policy"):
        Policy().verify(claims)


def test_stale_collateral_rejected_by_max_age(sgx: SgxDcapVerifier) -> None:
    claims = sgx.verify(Evidence(TeeType.SGX, SGX_QUOTE), now=AT)
    policy = replace(TOLERANT_SGX, max_collateral_age=timedelta(days=7))
    with pytest.raises(PolicyError, match="older than"):
        policy.verify(claims, now=AT)


def test_ratls_rejects_a_real_quote_not_bound_to_the_key(sgx: SgxDcapVerifier) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("RATLS")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2001, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 12, 31, tzinfo=UTC))
        .add_extension(x509.UnrecognizedExtension(INTEL_QUOTE_OID, SGX_QUOTE), critical=False)
        .sign(key, hashes.SHA384())
    )
    with pytest.raises(EvidenceError, match="does not bind the certificate's public key"):
        verify_ratls_certificate(cert, sgx, TOLERANT_SGX, now=AT)
