"""A test-only AMD-style certificate chain (ARK → ASK → VCEK, ARK → ASVK → VLEK) and report signer.

Real VCEKs and VLEKs are signed by AMD; to exercise the checks that come
*after* the chain (chip id, TCB, VCEK vs VLEK) the tests pin a chain of their
own, built with the same algorithms: RSASSA-PSS / SHA-384 (salt 48) for
certificates, ECDSA P-384 for the report. There is no real VLEK-signed report
among the vectors, so VLEK tests sign the Milan vector again with a test VLEK.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2040, 1, 1, tzinfo=UTC)

OID_BL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE = "1.3.6.1.4.1.3704.1.3.8"
OID_FMC = "1.3.6.1.4.1.3704.1.3.9"
OID_HWID = "1.3.6.1.4.1.3704.1.4"
OID_PRODUCT = "1.3.6.1.4.1.3704.1.2"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return bytes([0x02, len(body)]) + body


@dataclass
class Chain:
    product: str
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    ark: x509.Certificate
    ask: x509.Certificate
    asvk_key: rsa.RSAPrivateKey
    asvk: x509.Certificate

    @property
    def roots_pem(self) -> bytes:
        """ASK + ARK only: pins no ASVK (as ``ask_ark_<product>.pem``)."""
        return self.ask.public_bytes(serialization.Encoding.PEM) + self.ark.public_bytes(serialization.Encoding.PEM)

    @property
    def roots_asvk_pem(self) -> bytes:
        """ASK + ARK + ASVK (as ``ask_ark_asvk_<product>.pem``)."""
        return self.roots_pem + self.asvk.public_bytes(serialization.Encoding.PEM)

    @property
    def asvk_der(self) -> bytes:
        return self.asvk.public_bytes(serialization.Encoding.DER)

    def intermediate(self, cn: str, *, not_after: datetime = NOT_AFTER) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        """An extra intermediate (e.g. another ASVK) signed by this chain's ARK."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = _ca(cn, self.ark.subject, key.public_key(), self.ark_key, not_after=not_after)
        return cert, key


def _ca(
    cn: str,
    issuer: x509.Name,
    public_key: rsa.RSAPublicKey,
    signer: rsa.RSAPrivateKey,
    *,
    not_after: datetime = NOT_AFTER,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(signer, hashes.SHA384(), rsa_padding=PSS)
    )


def make_chain(product: str = "Milan") -> Chain:
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark = _ca(f"ARK-{product}", _name(f"ARK-{product}"), ark_key.public_key(), ark_key)
    ask = _ca(f"SEV-{product}", ark.subject, ask_key.public_key(), ark_key)
    asvk_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    asvk = _ca(f"SEV-VLEK-{product}", ark.subject, asvk_key.public_key(), ark_key)
    return Chain(product, ark_key, ask_key, ark, ask, asvk_key, asvk)


def make_vcek(
    issuer: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
    *,
    tcb: dict[str, int],
    hwid: bytes | None,
    cn: str = "SEV-VCEK",
    key: ec.EllipticCurvePrivateKey | None = None,
    not_after: datetime = NOT_AFTER,
    product_name: str = "Milan-B0",
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(not_after)
    )
    ia5 = product_name.encode()
    extensions = {OID_PRODUCT: bytes([0x16, len(ia5)]) + ia5}
    names = {"bootloader": OID_BL, "tee": OID_TEE, "snp": OID_SNP, "microcode": OID_UCODE, "fmc": OID_FMC}
    for part, level in tcb.items():
        extensions[names[part]] = der_int(level)
    if hwid is not None:
        extensions[OID_HWID] = hwid
    for oid, value in extensions.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA384(), rsa_padding=PSS)
    return cert.public_bytes(serialization.Encoding.DER), key


def make_vlek(
    issuer: x509.Certificate,
    issuer_key: rsa.RSAPrivateKey,
    *,
    tcb: dict[str, int],
    key: ec.EllipticCurvePrivateKey | None = None,
    product_name: str = "Milan-B0",
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A VLEK as AMD's KDS issues one: CN ``SEV-VLEK``, TCB extensions, no hwID."""
    return make_vcek(issuer, issuer_key, tcb=tcb, hwid=None, cn="SEV-VLEK", key=key, product_name=product_name)


def milan_tcb(raw: int) -> dict[str, int]:
    b = raw.to_bytes(8, "little")
    return {"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]}


def sign_report(report: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Re-sign a report: ECDSA P-384 over 0x000-0x29F, R and S little-endian in 72 bytes."""
    data = bytearray(report)
    signature = key.sign(bytes(data[:0x2A0]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(signature)
    data[0x2A0:0x2E8] = r.to_bytes(72, "little")
    data[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(data)


def set_signing_key(report: bytes, signing_key: int) -> bytes:
    data = bytearray(report)
    flags = int.from_bytes(data[0x48:0x4C], "little") & ~(0x7 << 2)
    data[0x48:0x4C] = (flags | signing_key << 2).to_bytes(4, "little")
    return bytes(data)


def with_timedelta(days: int) -> datetime:
    return NOT_BEFORE + timedelta(days=days)
