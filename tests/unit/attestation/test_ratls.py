"""RA-TLS certificates: encodings, binding, and a real TLS round trip on loopback."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from sealedml.attestation.base import Attester, Claims, Evidence, TeeType, Verifier
from sealedml.attestation.dcap import SgxDcapVerifier
from sealedml.attestation.policy import Policy
from sealedml.attestation.ratls import (
    DICE_TAGGED_EVIDENCE_OID,
    INTEL_QUOTE_OID,
    RaTlsPeerVerifier,
    client_ssl_context,
    connect_verified,
    decode_tagged_evidence,
    encode_tagged_evidence,
    extract_evidence,
    make_ratls_certificate,
    ratls_report_data,
    server_ssl_context,
    verify_ratls_certificate,
)
from sealedml.errors import AttestationError, EvidenceError, PolicyError

from ._support import SGX_TIME

# ---------------------------------------------------------------------------
# An in-test TEE: evidence is (measurement ‖ report data) authenticated by HMAC
# ---------------------------------------------------------------------------

_KEY = b"test-only platform key"
MEASUREMENT = "ab" * 48


class HmacAttester(Attester):
    tee = TeeType.SIMULATED

    def __init__(self, measurement: str = MEASUREMENT, *, ignore_report_data: bool = False) -> None:
        self._measurement = measurement
        self._ignore = ignore_report_data

    def evidence(self, report_data: bytes) -> Evidence:
        if self._ignore:  # a broken / malicious attester: binds nothing
            report_data = bytes(64)
        body = bytes.fromhex(self._measurement) + report_data
        return Evidence(TeeType.SIMULATED, body + hmac.new(_KEY, body, hashlib.sha256).digest())

    @property
    def measurement(self) -> str:
        return self._measurement


class HmacVerifier(Verifier):
    tee = TeeType.SIMULATED

    def verify(self, evidence: Evidence, *, now: datetime | None = None) -> Claims:
        data = evidence.data
        if len(data) != 48 + 64 + 32:
            raise EvidenceError("bad length")
        body, tag = data[:-32], data[-32:]
        if not hmac.compare_digest(tag, hmac.new(_KEY, body, hashlib.sha256).digest()):
            raise EvidenceError("bad tag")
        return Claims(
            tee=TeeType.SIMULATED,
            measurement=body[:48].hex(),
            report_data=body[48:],
            debug=False,
            details=MappingProxyType({}),
        )


POLICY = Policy.for_measurements([MEASUREMENT])


# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [None, ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()],
)
def test_make_and_verify_certificate(key: object) -> None:
    cert_pem, key_pem = make_ratls_certificate(HmacAttester(), key)  # type: ignore[arg-type]
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(DICE_TAGGED_EVIDENCE_OID)
    assert ext.critical is False
    claims = verify_ratls_certificate(cert_pem, HmacVerifier(), POLICY)
    assert claims.measurement == MEASUREMENT
    assert claims.report_data == ratls_report_data(cert)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert claims.report_data == hashlib.sha256(spki).digest() + bytes(32)
    assert serialization.load_pem_private_key(key_pem, None).public_key() == cert.public_key()
    # DER input works too.
    verify_ratls_certificate(cert.public_bytes(serialization.Encoding.DER), HmacVerifier(), POLICY)


def test_certificate_not_binding_its_key_is_rejected() -> None:
    cert_pem, _ = make_ratls_certificate(HmacAttester(ignore_report_data=True))
    with pytest.raises(EvidenceError, match="does not bind the certificate's public key"):
        verify_ratls_certificate(cert_pem, HmacVerifier(), POLICY)


def test_policy_is_applied() -> None:
    cert_pem, _ = make_ratls_certificate(HmacAttester("cd" * 48))
    with pytest.raises(PolicyError, match="measurement"):
        verify_ratls_certificate(cert_pem, HmacVerifier(), POLICY)


def test_certificate_validity_and_verifier_type() -> None:
    cert_pem, _ = make_ratls_certificate(HmacAttester(), validity=timedelta(hours=1))
    later = datetime.now(UTC) + timedelta(hours=2)
    with pytest.raises(EvidenceError, match="validity period"):
        verify_ratls_certificate(cert_pem, HmacVerifier(), POLICY, now=later)
    with pytest.raises(EvidenceError, match="verifier is for sgx"):
        verify_ratls_certificate(cert_pem, SgxDcapVerifier("{}"), POLICY)


def _self_signed_with(
    extensions: list[x509.Extension[x509.ExtensionType]], key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2001, 1, 1, tzinfo=UTC))  # Gramine's default window
        .not_valid_after(datetime(2030, 12, 31, tzinfo=UTC))
    )
    for ext in extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(key, hashes.SHA256())


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _intel_ext(value: bytes) -> x509.Extension[x509.ExtensionType]:
    return x509.Extension(INTEL_QUOTE_OID, False, x509.UnrecognizedExtension(INTEL_QUOTE_OID, value))


def test_gramine_quote_extension_raw_and_wrapped(vectors: Path) -> None:
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    key = ec.generate_private_key(ec.SECP384R1())
    raw = _self_signed_with([_intel_ext(quote)], key)
    assert extract_evidence(raw) == Evidence(TeeType.SGX, quote)
    wrapped_value = b"\x04\x82" + len(quote).to_bytes(2, "big") + quote
    wrapped = _self_signed_with([_intel_ext(wrapped_value)], key)
    assert extract_evidence(wrapped) == Evidence(TeeType.SGX, quote)


def test_real_quote_in_a_certificate_does_not_bind_a_fresh_key(vectors: Path) -> None:
    # A genuine quote copied into a certificate for another key is refused:
    # its report data is "Hello, world!", not the key's hash.
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    cert = _self_signed_with([_intel_ext(quote)], ec.generate_private_key(ec.SECP256R1()))
    verifier = SgxDcapVerifier(vectors / "sgx-dcap" / "collateral.json")
    with pytest.raises(EvidenceError, match="does not bind"):
        verify_ratls_certificate(cert, verifier, Policy.for_measurements(["00"]), now=SGX_TIME)


def test_dice_tagged_evidence_forms(vectors: Path) -> None:
    quote = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    sgx_quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    # OID-typed Intel quote (what encode_tagged_evidence emits for SGX/TDX).
    encoded = encode_tagged_evidence(Evidence(TeeType.TDX, quote))
    assert decode_tagged_evidence(encoded) == Evidence(TeeType.TDX, quote)

    # INTEGER-typed (RATS-TLS tag numbers), and a SEQUENCE OF entries.
    def octets(data: bytes) -> bytes:
        return _der(0x04, data)

    def seq(body: bytes) -> bytes:
        return _der(0x30, body)

    intel = seq(b"\x02\x03\x1a\x75\x01" + octets(sgx_quote))
    assert decode_tagged_evidence(intel) == Evidence(TeeType.SGX, sgx_quote)
    report = (vectors / "sev-snp" / "report-milan.bin").read_bytes()
    snp = seq(b"\x02\x03\x1a\x75\x04" + octets(report))
    assert decode_tagged_evidence(snp) == Evidence(TeeType.SEV_SNP, report)
    unknown = seq(b"\x02\x01\x07" + octets(b"x"))
    assert decode_tagged_evidence(seq(unknown + snp)) == Evidence(TeeType.SEV_SNP, report)
    with pytest.raises(EvidenceError, match="no evidence of a known type"):
        decode_tagged_evidence(unknown)
    # SealedML envelope keeps the TEE type and the auxiliary data.
    evidence = Evidence(TeeType.SEV_SNP, report, b"cert table")
    assert decode_tagged_evidence(encode_tagged_evidence(evidence)) == evidence


def test_both_extensions_must_agree(vectors: Path) -> None:
    sgx = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    tdx = (vectors / "tdx" / "quote-v4.bin").read_bytes()
    dice = x509.Extension(
        DICE_TAGGED_EVIDENCE_OID,
        False,
        x509.UnrecognizedExtension(DICE_TAGGED_EVIDENCE_OID, encode_tagged_evidence(Evidence(TeeType.TDX, tdx))),
    )
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EvidenceError, match="two different"):
        extract_evidence(_self_signed_with([_intel_ext(sgx), dice], key))
    same = x509.Extension(
        DICE_TAGGED_EVIDENCE_OID,
        False,
        x509.UnrecognizedExtension(DICE_TAGGED_EVIDENCE_OID, encode_tagged_evidence(Evidence(TeeType.SGX, sgx))),
    )
    assert extract_evidence(_self_signed_with([_intel_ext(sgx), same], key)).data == sgx


def test_extract_evidence_errors() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EvidenceError, match="no attestation evidence"):
        extract_evidence(_self_signed_with([], key))
    with pytest.raises(EvidenceError, match=r"not an X\.509 certificate"):
        extract_evidence(b"junk")
    with pytest.raises(EvidenceError):
        extract_evidence(_self_signed_with([_intel_ext(b"\x03\x00short")], key))


def test_tampered_certificate_signature_is_rejected() -> None:
    cert_pem, _ = make_ratls_certificate(HmacAttester())
    der = bytearray(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    with pytest.raises(EvidenceError):
        verify_ratls_certificate(bytes(der), HmacVerifier(), POLICY)


# ---------------------------------------------------------------------------
# TLS round trip on 127.0.0.1
# ---------------------------------------------------------------------------


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"attested hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _tls_server(cert_pem: bytes, key_pem: bytes) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = server_ssl_context(cert_pem, key_pem).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_tls_round_trip_with_pinning_and_hook() -> None:
    cert_pem, key_pem = make_ratls_certificate(HmacAttester())
    seen: list[Claims] = []
    with _tls_server(cert_pem, key_pem) as port:
        claims, pinned = connect_verified("127.0.0.1", port, HmacVerifier(), POLICY)
        assert claims.measurement == MEASUREMENT
        peer = RaTlsPeerVerifier(HmacVerifier(), POLICY, on_verified=seen.append)
        with httpx.Client(verify=pinned, event_hooks={"response": [peer.httpx_hook]}) as client:
            for _ in range(3):
                response = client.get(f"https://127.0.0.1:{port}/")
                assert response.text == "attested hello"
    assert len(seen) == 1  # verified once, then cached


def test_tls_client_refuses_an_unattested_server() -> None:
    bad_cert, bad_key = make_ratls_certificate(HmacAttester(ignore_report_data=True))
    with _tls_server(bad_cert, bad_key) as port:
        with pytest.raises(EvidenceError, match="does not bind"):
            connect_verified("127.0.0.1", port, HmacVerifier(), POLICY)
        # Even with an unverified context, the hook refuses the response.
        peer = RaTlsPeerVerifier(HmacVerifier(), POLICY)
        with httpx.Client(verify=client_ssl_context(), event_hooks={"response": [peer.httpx_hook]}) as client:
            with pytest.raises(EvidenceError, match="does not bind"):
                client.get(f"https://127.0.0.1:{port}/")


def test_pinned_context_refuses_a_different_server() -> None:
    good = make_ratls_certificate(HmacAttester())
    other = make_ratls_certificate(HmacAttester())  # attested too, but a different key
    with _tls_server(*good) as good_port:
        _, pinned = connect_verified("127.0.0.1", good_port, HmacVerifier(), POLICY)
    with _tls_server(*other) as other_port, httpx.Client(verify=pinned) as client:
        with pytest.raises(httpx.ConnectError):
            client.get(f"https://127.0.0.1:{other_port}/")


def test_connect_verified_reports_connection_failures() -> None:
    with pytest.raises(AttestationError, match="TLS connection"):
        connect_verified("127.0.0.1", 9, HmacVerifier(), POLICY, timeout=1.0)


def test_hook_requires_tls() -> None:
    peer = RaTlsPeerVerifier(HmacVerifier(), POLICY)
    response = httpx.Response(200)
    with pytest.raises(EvidenceError, match="did not come over TLS"):
        peer.httpx_hook(response)
