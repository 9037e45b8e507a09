"""The per-session CA: the certificates it makes, the names it reads, and the inputs it refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealedml.errors import AttestationError, ConfigurationError
from sealedml.sessions.ca import (
    SERVICE_URI_PREFIX,
    PeerRefusedError,
    ServiceCertificate,
    SessionCA,
    certificate_identity,
    parse_service_uri,
    service_uri,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SESSION = "acme/trainer"


@pytest.fixture(scope="module")
def ca() -> SessionCA:
    return SessionCA.create(SESSION, now=NOW)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _der(pem: bytes) -> bytes:
    return _cert(pem).public_bytes(serialization.Encoding.DER)


def _leaf_with_sans(ca: SessionCA, names: list[x509.GeneralName] | None) -> bytes:
    """A certificate signed by the session CA but with the given SANs: what a buggy issuer could make."""
    ca_cert = _cert(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(hours=1))
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# ------------------------------------------------------------------ service URIs


@pytest.mark.parametrize(
    ("session", "service"), [("acme", "web"), ("acme/trainer", "worker-1"), ("a.b_c-d/0", "svc.v2_x-y")]
)
def test_service_uris_round_trip(session: str, service: str) -> None:
    uri = service_uri(session, service)
    assert uri == f"{SERVICE_URI_PREFIX}{session}/service/{service}"
    assert parse_service_uri(uri) == (session, service)


def test_a_session_or_service_named_service_is_not_ambiguous() -> None:
    assert parse_service_uri(service_uri("service", "service")) == ("service", "service")
    assert parse_service_uri(service_uri("service/service", "service")) == ("service/service", "service")


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "sealedml://session/acme",
        "sealedml://session/acme/service/",
        "sealedml://session/acme/service/web/extra",
        "sealedml://session/a/b/c/service/web",
        "sealedml://session//service/web",
        "sealedml://session/acme/services/web",
        "sealedml://session/Acme/service/web",
        "sealedml://session/acme/service/Web",
        "sealedml://session/../service/web",
        "sealedml://session/acme/service/-web",
        "sealedml://session/acme/service/web\n",
        "sealedml://session/acme/service/web%2F",
        "SEALEDML://session/acme/service/web",
        "https://session/acme/service/web",
        "sealedml://session/acme/service/" + "w" * 64,
    ],
)
def test_parse_service_uri_refuses_malformed_uris(uri: str) -> None:
    with pytest.raises(PeerRefusedError) as info:
        parse_service_uri(uri)
    assert "\n" not in info.value.message  # one line, even for a URI holding a newline


def test_peer_refused_is_an_attestation_error_with_its_own_code() -> None:
    assert issubclass(PeerRefusedError, AttestationError) and PeerRefusedError.code == "peer_refused"


@pytest.mark.parametrize(("session", "service"), [("", "web"), ("a/b/c", "web"), ("acme", "a/b"), ("acme", "UP")])
def test_service_uri_refuses_names_outside_the_session_grammar(session: str, service: str) -> None:
    with pytest.raises(ConfigurationError):
        service_uri(session, service)


# ------------------------------------------------------------------ the CA certificate


def test_the_ca_certificate_is_a_constrained_self_signed_p256_ca(ca: SessionCA) -> None:
    cert = _cert(ca.cert_pem)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"SealedML session {SESSION}"
    cert.verify_directly_issued_by(cert)  # self-signed
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public)

    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert timedelta(days=3650) <= cert.not_valid_after_utc - NOW <= timedelta(days=3653)
    assert ca.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted


def test_a_long_session_name_still_fits_the_common_name_limit() -> None:
    session = "a" * 63 + "/" + "b" * 63
    ca = SessionCA.create(session)
    name = str(_cert(ca.cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    assert len(name) <= 64 and name.startswith("SealedML session aaa")
    assert SessionCA.from_pem(session, ca.cert_pem, ca.key_pem).session == session


def test_from_pem_loads_a_stored_ca(ca: SessionCA) -> None:
    again = SessionCA.from_pem(SESSION, ca.cert_pem, ca.key_pem)
    assert again == ca
    cert = again.issue("web", not_after=NOW + timedelta(hours=1), now=NOW)
    _cert(cert.cert_pem).verify_directly_issued_by(_cert(ca.cert_pem))


def test_from_pem_refuses_a_key_that_is_not_the_certificates(ca: SessionCA) -> None:
    other = SessionCA.create(SESSION)
    with pytest.raises(ConfigurationError, match="does not match") as info:
        SessionCA.from_pem(SESSION, ca.cert_pem, other.key_pem)
    assert b"PRIVATE" not in str(info.value).encode()


def test_from_pem_refuses_another_sessions_ca(ca: SessionCA) -> None:
    with pytest.raises(ConfigurationError, match="not session 'acme/other'"):
        SessionCA.from_pem("acme/other", ca.cert_pem, ca.key_pem)


def test_from_pem_refuses_a_service_certificate_posing_as_a_ca(ca: SessionCA) -> None:
    leaf = ca.issue("web", not_after=NOW + timedelta(hours=1), now=NOW)
    with pytest.raises(ConfigurationError, match="not a CA"):
        SessionCA.from_pem(SESSION, leaf.cert_pem, leaf.key_pem)


@pytest.mark.parametrize("which", ["cert", "key"])
def test_from_pem_refuses_unreadable_pem(ca: SessionCA, which: str) -> None:
    cert, key = (b"garbage", ca.key_pem) if which == "cert" else (ca.cert_pem, b"garbage")
    with pytest.raises(ConfigurationError, match="unreadable"):
        SessionCA.from_pem(SESSION, cert, key)


# ------------------------------------------------------------------ service certificates


def test_an_issued_certificate_names_its_service_by_uri_only(ca: SessionCA) -> None:
    issued = ca.issue("worker-1", not_after=NOW + timedelta(hours=2), now=NOW)
    cert, ca_cert = _cert(issued.cert_pem), _cert(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "worker-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(service_uri(SESSION, "worker-1"))]  # no DNS names
    assert certificate_identity(_der(issued.cert_pem)) == (SESSION, "worker-1")

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    assert cert.not_valid_before_utc == NOW - timedelta(seconds=60)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=2)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_each_certificate_gets_a_fresh_key_and_serial(ca: SessionCA) -> None:
    a = ca.issue("web", not_after=NOW + timedelta(hours=1), now=NOW)
    b = ca.issue("web", not_after=NOW + timedelta(hours=1), now=NOW)
    assert a.key_pem != b.key_pem
    assert _cert(a.cert_pem).serial_number != _cert(b.cert_pem).serial_number


@pytest.mark.parametrize(
    ("not_after", "now", "match"),
    [
        (NOW - timedelta(minutes=2), NOW, "later than"),
        (NOW + timedelta(days=4000), NOW, "outlives"),
        (datetime(2026, 3, 1, 13, 0), NOW, "timezone-aware"),  # naive on purpose
        (NOW + timedelta(hours=1), datetime(2026, 3, 1, 12, 0), "timezone-aware"),
    ],
)
def test_issue_refuses_a_bad_validity_window(ca: SessionCA, not_after: datetime, now: datetime, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ca.issue("web", not_after=not_after, now=now)


def test_issue_refuses_a_bad_service_name(ca: SessionCA) -> None:
    with pytest.raises(ConfigurationError):
        ca.issue("Not/A/Name", not_after=NOW + timedelta(hours=1), now=NOW)


def test_repr_never_shows_key_material(ca: SessionCA) -> None:
    issued = ca.issue("web", not_after=NOW + timedelta(hours=1), now=NOW)
    for obj, expected in ((ca, "SessionCA(session='acme/trainer')"), (issued, "service='web'")):
        text = repr(obj)
        assert expected in text
        assert "PRIVATE" not in text and "BEGIN" not in text
    assert repr(ServiceCertificate(b"junk", b"secret")) == "ServiceCertificate(<unreadable>)"


# ------------------------------------------------------------------ reading identities


def test_certificate_identity_refuses_unreadable_der() -> None:
    with pytest.raises(PeerRefusedError, match="unreadable"):
        certificate_identity(b"\x30\x03\x02\x01\x00")


def test_certificate_identity_refuses_a_certificate_without_sans(ca: SessionCA) -> None:
    with pytest.raises(PeerRefusedError, match="no subject alternative names"):
        certificate_identity(_der(ca.cert_pem))


@pytest.mark.parametrize(
    "names",
    [
        [x509.DNSName("web.example")],
        [x509.UniformResourceIdentifier("spiffe://acme/web")],
        [
            x509.UniformResourceIdentifier(service_uri(SESSION, "web")),
            x509.UniformResourceIdentifier(service_uri(SESSION, "db")),
        ],
    ],
    ids=["dns-only", "foreign-uri-only", "two-service-uris"],
)
def test_certificate_identity_needs_exactly_one_sealedml_uri(ca: SessionCA, names: list[x509.GeneralName]) -> None:
    with pytest.raises(PeerRefusedError, match="SealedML URIs, not one"):
        certificate_identity(_leaf_with_sans(ca, names))


def test_certificate_identity_refuses_a_malformed_sealedml_uri(ca: SessionCA) -> None:
    der = _leaf_with_sans(ca, [x509.UniformResourceIdentifier("sealedml://session/acme/web")])
    with pytest.raises(PeerRefusedError, match="malformed"):
        certificate_identity(der)


def test_certificate_identity_ignores_other_uris_beside_the_sealedml_one(ca: SessionCA) -> None:
    der = _leaf_with_sans(
        ca,
        [x509.UniformResourceIdentifier("https://example.org"), x509.UniformResourceIdentifier(service_uri("s", "w"))],
    )
    assert certificate_identity(der) == ("s", "w")
