"""RA-TLS certificates: encodings, binding, and a real TLS round trip on loopback."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from sealedml.attestation import simulated
from sealedml.attestation.base import Attester, Claims, Evidence, TeeType, Verifier
from sealedml.attestation.dcap import SgxDcapVerifier
from sealedml.attestation.policy import Policy
from sealedml.attestation.ratls import (
    RaTlsPeerVerifier,
    RaTlsVerificationError,
    RotatingRaTlsCertificate,
    attestation_failure,
    attested_client_context,
    client_ssl_context,
    connect_verified,
    extract_evidence,
    make_ratls_certificate,
    ratls_report_data,
    server_ssl_context,
    verify_ratls_certificate,
)
from sealedml.attestation.ratls_evidence import (
    DICE_TAGGED_EVIDENCE_OID,
    INTEL_QUOTE_OID,
    decode_tagged_evidence,
    encode_tagged_evidence,
)
from sealedml.errors import AttestationError, ConfigurationError, EvidenceError, PolicyError

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


class _RecordingServer(http.server.ThreadingHTTPServer):
    seen: list[str]


class _Hello(http.server.BaseHTTPRequestHandler):
    server: _RecordingServer

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        body = b"attested hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _tls_server(cert_pem: bytes, key_pem: bytes, seen: list[str] | None = None) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 presenting ``cert_pem``; request paths go to ``seen``."""
    server = _RecordingServer(("127.0.0.1", 0), _Hello)
    server.seen = seen if seen is not None else []
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


# ---------------------------------------------------------------------------
# Rotation: one key, short-lived certificates with fresh evidence
# ---------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The simulated attester's clock (its evidence's ``issued_at``), set by the test."""
    now = [float(int(time.time()))]
    monkeypatch.setattr(simulated, "time", SimpleNamespace(time=lambda: now[0]))
    return now


SIMULATED_MEASUREMENT = "5e" * 48
SIMULATED_POLICY = Policy.for_measurements([SIMULATED_MEASUREMENT])


def _public_key_der(cert_pem: bytes) -> bytes:
    return (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_rotation_issues_certificates_for_the_same_key_with_fresh_evidence(clock: list[float]) -> None:
    start = datetime.fromtimestamp(clock[0], UTC)
    identity = RotatingRaTlsCertificate(simulated.SimulatedAttester(measurement=SIMULATED_MEASUREMENT), now=start)
    first_cert, first_key = identity.current
    assert identity.issued_at == start
    clock[0] += 60
    later = start + timedelta(seconds=60)
    cert, key = identity.issue(now=later)
    assert identity.current == (cert, key)
    assert identity.issued_at == later
    assert cert != first_cert
    assert key == first_key  # one key for the identity's lifetime
    assert _public_key_der(cert) == _public_key_der(first_cert)
    assert isinstance(x509.load_pem_x509_certificate(cert).public_key(), ec.EllipticCurvePublicKey)
    old_claims = verify_ratls_certificate(first_cert, simulated.SimulatedVerifier(), SIMULATED_POLICY, now=start)
    new_claims = verify_ratls_certificate(cert, simulated.SimulatedVerifier(), SIMULATED_POLICY, now=later)
    assert new_claims.details["issued_at"] == old_claims.details["issued_at"] + 60  # fresh evidence
    parsed = x509.load_pem_x509_certificate(cert)
    assert parsed.not_valid_after_utc - parsed.not_valid_before_utc == timedelta(minutes=5)  # 4 min + 1 min skew


def test_rotated_certificate_verifies_ten_minutes_after_start_where_the_start_certificate_does_not(
    clock: list[float],
) -> None:
    start = datetime.fromtimestamp(clock[0], UTC)
    identity = RotatingRaTlsCertificate(simulated.SimulatedAttester(measurement=SIMULATED_MEASUREMENT), now=start)
    start_cert, _ = identity.current
    # What a server made once at start before rotation: a day-long certificate.
    day_long, _ = make_ratls_certificate(simulated.SimulatedAttester(measurement=SIMULATED_MEASUREMENT), now=start)
    clock[0] += 600
    later = start + timedelta(minutes=10)
    rotated, _ = identity.issue(now=later)
    verifier = simulated.SimulatedVerifier()
    assert verify_ratls_certificate(rotated, verifier, SIMULATED_POLICY, now=later).measurement == SIMULATED_MEASUREMENT
    with pytest.raises(EvidenceError, match="validity period"):
        verify_ratls_certificate(start_cert, verifier, SIMULATED_POLICY, now=later)
    # Inside its validity period, the day-long one is refused too: its evidence is stale.
    with pytest.raises(EvidenceError, match="stale"):
        verify_ratls_certificate(day_long, verifier, SIMULATED_POLICY, now=later)


def test_short_lived_certificate_never_outlives_its_simulated_evidence(clock: list[float]) -> None:
    start = datetime.fromtimestamp(clock[0], UTC)
    identity = RotatingRaTlsCertificate(simulated.SimulatedAttester(measurement=SIMULATED_MEASUREMENT), now=start)
    cert, _ = identity.current
    not_after = x509.load_pem_x509_certificate(cert).not_valid_after_utc
    assert (not_after - start).total_seconds() < simulated.MAX_EVIDENCE_AGE
    verify_ratls_certificate(cert, simulated.SimulatedVerifier(), SIMULATED_POLICY, now=not_after)


@pytest.mark.parametrize(
    ("rotate_every", "validity"),
    [
        (240.0, timedelta(minutes=4)),
        (300.0, timedelta(minutes=4)),
        (0.0, timedelta(minutes=4)),
        (-1.0, timedelta(minutes=4)),
        (float("nan"), timedelta(minutes=4)),
        (60.0, timedelta(0)),
    ],
)
def test_rotation_slower_than_certificate_expiry_is_refused(rotate_every: float, validity: timedelta) -> None:
    with pytest.raises(ConfigurationError):
        RotatingRaTlsCertificate(HmacAttester(), rotate_every=rotate_every, validity=validity)


# ---------------------------------------------------------------------------
# Verification inside the TLS handshake
# ---------------------------------------------------------------------------

HMAC_VERIFIERS: dict[TeeType, Verifier] = {TeeType.SIMULATED: HmacVerifier()}


def _refused(cert_pem: bytes, key_pem: bytes, verifiers: dict[TeeType, Verifier] | None = None) -> AttestationError:
    """Connect with an attested context; return why the handshake failed, check nothing was sent."""
    seen: list[str] = []
    context = attested_client_context(verifiers or HMAC_VERIFIERS, POLICY)
    with _tls_server(cert_pem, key_pem, seen) as port, httpx.Client(verify=context) as client:
        with pytest.raises(httpx.ConnectError) as caught:
            client.get(f"https://127.0.0.1:{port}/secret")
        time.sleep(0.2)  # let the server thread read whatever it was sent
    assert seen == []  # the handshake failed before any request byte
    reason = attestation_failure(caught.value)
    assert reason is not None
    return reason


def test_attested_context_accepts_an_attested_server_and_caches_the_verdict() -> None:
    verified: list[Claims] = []
    seen: list[str] = []
    context = attested_client_context(HMAC_VERIFIERS, POLICY, on_verified=verified.append)
    assert context.check_hostname is False
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    with _tls_server(*make_ratls_certificate(HmacAttester()), seen) as port:
        for _ in range(3):  # new connections each time: verified once, then cached
            with httpx.Client(verify=context) as client:
                assert client.get(f"https://127.0.0.1:{port}/hello").text == "attested hello"
    assert seen == ["/hello"] * 3
    assert [claims.measurement for claims in verified] == [MEASUREMENT]


def test_attested_context_accepts_a_rotated_certificate_without_pinning() -> None:
    identity = RotatingRaTlsCertificate(HmacAttester())
    verified: list[Claims] = []
    context = attested_client_context(HMAC_VERIFIERS, POLICY, on_verified=verified.append)
    with httpx.Client(verify=context) as client:
        with _tls_server(*identity.current) as port:
            assert client.get(f"https://127.0.0.1:{port}/").status_code == 200
        with _tls_server(*identity.issue()) as port:
            assert client.get(f"https://127.0.0.1:{port}/").status_code == 200
    assert len(verified) == 2


def test_attested_context_refuses_evidence_with_another_measurement() -> None:
    reason = _refused(*make_ratls_certificate(HmacAttester("cd" * 48)))
    assert isinstance(reason, PolicyError)
    assert "measurement" in str(reason)


def test_attested_context_refuses_evidence_not_binding_the_certificate_key() -> None:
    reason = _refused(*make_ratls_certificate(HmacAttester(ignore_report_data=True)))
    assert isinstance(reason, EvidenceError)
    assert "does not bind" in str(reason)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_attested_context_refuses_a_certificate_without_evidence() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed_with([], key).public_bytes(serialization.Encoding.PEM)
    reason = _refused(cert, _key_pem(key))
    assert isinstance(reason, EvidenceError)
    assert "no attestation evidence" in str(reason)


def test_attested_context_refuses_a_plain_self_signed_certificate() -> None:
    # What `openssl req -x509 -subj /CN=localhost` makes: RSA, a host name, no evidence.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    reason = _refused(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
    assert isinstance(reason, EvidenceError)


def test_attested_context_refuses_evidence_of_a_tee_it_has_no_verifier_for() -> None:
    reason = _refused(*make_ratls_certificate(HmacAttester()), {TeeType.SGX: SgxDcapVerifier("{}")})
    assert isinstance(reason, EvidenceError)
    assert "no verifier accepts simulated evidence" in str(reason)


def test_deferred_handshake_cannot_skip_the_attestation() -> None:
    # With do_handshake_on_connect=False, OpenSSL would run the handshake inside the
    # first write; the context still attests before that write sends anything.
    seen: list[str] = []
    context = attested_client_context(HMAC_VERIFIERS, POLICY)
    with _tls_server(*make_ratls_certificate(HmacAttester("cd" * 48)), seen) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            tls = context.wrap_socket(raw, do_handshake_on_connect=False)
            with pytest.raises(RaTlsVerificationError) as caught:
                tls.sendall(b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(RaTlsVerificationError):
                tls.sendall(b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n")  # still refused on a retry
            tls.close()
        time.sleep(0.2)
    assert seen == []
    assert isinstance(caught.value, ssl.SSLCertVerificationError)
    assert isinstance(caught.value.attestation_error, PolicyError)
    assert caught.value.__cause__ is caught.value.attestation_error


def test_attestation_failure_walks_the_exception_chain() -> None:
    reason = PolicyError("measurement not allowed")
    try:
        try:
            try:
                raise RaTlsVerificationError(reason)
            except RaTlsVerificationError:
                raise OSError("transport") from None  # only __context__ links back
        except OSError as exc:
            raise httpx.ConnectError("connect failed") from exc
    except httpx.ConnectError as outer:
        assert attestation_failure(outer) is reason
    assert attestation_failure(ExceptionGroup("many", [ValueError("x"), RaTlsVerificationError(reason)])) is reason
    assert attestation_failure(httpx.ConnectError("refused")) is None


def test_attested_context_needs_a_verifier() -> None:
    with pytest.raises(ConfigurationError):
        attested_client_context({}, POLICY)


def test_peer_verifier_drops_expired_verdicts() -> None:
    start = datetime.now(UTC)
    first, _ = make_ratls_certificate(HmacAttester(), validity=timedelta(minutes=2), now=start)
    second, _ = make_ratls_certificate(HmacAttester(), validity=timedelta(minutes=2), now=start + timedelta(minutes=3))
    peer = RaTlsPeerVerifier(HMAC_VERIFIERS, POLICY, now=start)
    peer.verify_certificate(x509.load_pem_x509_certificate(first).public_bytes(serialization.Encoding.DER))
    peer.now = start + timedelta(minutes=3)
    peer.verify_certificate(x509.load_pem_x509_certificate(second).public_bytes(serialization.Encoding.DER))
    assert len(peer._verified) == 1  # the first certificate's verdict expired with it
