"""A certificate authority per session: the root of trust of secureTF's network shield.

Each session gets its own self-signed CA (EC P-256, SHA-256). Its key stays in the
KeyService; it issues a short-lived certificate to a service only after that service's
attestation, so holding a certificate of the session CA *is* the proof that the peer is an
attested service of the session. A certificate names its service by one URI in its subject
alternative name, ``sealedml://session/<session>/service/<service>``; peers are identified
by that URI, never by host names, which the cloud host controls.

This module is pure X.509: building, loading and reading certificates. The TLS forwarder
that uses them is ``shield/network.py``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealedml.errors import AttestationError, ConfigurationError

__all__ = [
    "SERVICE_URI_PREFIX",
    "PeerRefusedError",
    "ServiceCertificate",
    "SessionCA",
    "certificate_identity",
    "parse_service_uri",
    "service_uri",
]

SERVICE_URI_PREFIX = "sealedml://session/"

# The same name grammar as a session document (sessions/document.py): a session name may
# hold one '/', a service name none, so a URI splits into 3 or 4 segments and never both.
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_CA_VALIDITY = timedelta(days=3652)
_CA_BACKDATE = timedelta(minutes=5)
_LEAF_BACKDATE = timedelta(seconds=60)
_CN_MAX = 64  # X.509 upper bound on commonName (RFC 5280 ub-common-name)
_SHOWN = 160  # longest untrusted text quoted in an error message


class PeerRefusedError(AttestationError):
    """A peer whose certificate does not name an allowed service of this session.

    Defined here rather than in ``shield/network.py`` (which re-exports it) because reading a
    certificate's identity can already refuse it, and the forwarder imports this module.
    """

    code = "peer_refused"


def _is_name(text: str) -> bool:
    return _NAME.fullmatch(text) is not None


def _is_session(text: str) -> bool:
    parts = text.split("/")
    return len(parts) <= 2 and all(_is_name(p) for p in parts)


def _shown(text: str) -> str:
    """Untrusted text for a one-line message: escaped by ``repr`` and cut short."""
    return repr(text[:_SHOWN] + ("…" if len(text) > _SHOWN else ""))


def _check_names(session: str, service: str | None = None) -> None:
    if not _is_session(session):
        raise ConfigurationError(f"session name {_shown(session)} is not NAME or NAME/NAME")
    if service is not None and not _is_name(service):
        raise ConfigurationError(f"service name {_shown(service)} does not match [a-z0-9][a-z0-9_.-]{{0,62}}")


def service_uri(session: str, service: str) -> str:
    """The URI that names ``service`` of ``session`` in its certificate.

    Raises:
        ConfigurationError: a name outside the session document's grammar.
    """
    _check_names(session, service)
    return f"{SERVICE_URI_PREFIX}{session}/service/{service}"


def parse_service_uri(uri: str) -> tuple[str, str]:
    """``(session, service)`` from a URI made by :func:`service_uri`.

    Raises:
        PeerRefusedError: anything else (a peer's certificate is untrusted input).
    """
    if not isinstance(uri, str) or not uri.startswith(SERVICE_URI_PREFIX):
        raise PeerRefusedError(f"not a SealedML service URI: {_shown(str(uri))}")
    parts = uri[len(SERVICE_URI_PREFIX) :].split("/")
    if len(parts) == 3 and parts[1] == "service":
        session, service = parts[0], parts[2]
    elif len(parts) == 4 and parts[2] == "service":
        session, service = f"{parts[0]}/{parts[1]}", parts[3]
    else:
        raise PeerRefusedError(f"malformed service URI {_shown(uri)}")
    if not (_is_session(session) and _is_name(service)):
        raise PeerRefusedError(f"malformed service URI {_shown(uri)}")
    return session, service


def _aware(moment: datetime | None) -> datetime:
    """``now`` or a caller's time; a naive datetime is refused, since local time would be read as UTC."""
    if moment is None:
        return datetime.now(UTC)
    if moment.tzinfo is None:
        raise ConfigurationError("times must be timezone-aware (use datetime.now(timezone.utc))")
    return moment


def _ca_common_name(session: str) -> str:
    """``SealedML session <name>``, shortened with a digest where it would pass 64 characters.

    The name is informational (trust comes from the CA key), but it is deterministic so that
    :meth:`SessionCA.from_pem` can check that a CA belongs to the session it is loaded for.
    """
    name = f"SealedML session {session}"
    if len(name) <= _CN_MAX:
        return name
    digest = hashlib.sha256(session.encode()).hexdigest()[:12]
    return f"{name[: _CN_MAX - len(digest) - 1]}~{digest}"


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True, repr=False)
class ServiceCertificate:
    """A service's certificate and its private key (PKCS#8 PEM, unencrypted: it lives in memory only)."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        try:
            session, service = certificate_identity(
                x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)
            )
        except (ValueError, PeerRefusedError):
            return "ServiceCertificate(<unreadable>)"
        return f"ServiceCertificate(session={session!r}, service={service!r})"


@dataclass(frozen=True, repr=False)
class SessionCA:
    """The certificate authority of one session.

    Checked on construction: the key must be the certificate's, the certificate a CA, and its
    name the session's, so a mismatched pair never issues anything.

    Raises:
        ConfigurationError: from the constructor, on any of those checks.
    """

    session: str
    cert_pem: bytes
    key_pem: bytes

    def __post_init__(self) -> None:
        _check_names(self.session)
        cert, key = self._load()
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise ConfigurationError(f"the key of session {self.session!r}'s CA does not match its certificate")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ConfigurationError(f"the certificate of session {self.session!r}'s CA is not a CA certificate")
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [_ca_common_name(self.session)]:
            raise ConfigurationError(f"this CA certificate is not session {self.session!r}'s")

    def __repr__(self) -> str:
        return f"SessionCA(session={self.session!r})"

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.cert_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # The message of a key-parsing error could quote input: say only which part failed.
            raise ConfigurationError(f"session {self.session!r}'s CA certificate or key is unreadable") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ConfigurationError(f"session {self.session!r}'s CA key is not an EC P-256 key")
        return cert, key

    @classmethod
    def create(cls, session: str, *, now: datetime | None = None) -> SessionCA:
        """A new CA for ``session``: valid from five minutes before ``now`` for ten years.

        The key is fresh; the caller (the KeyService) stores ``key_pem`` where only it can read it.

        Raises:
            ConfigurationError: a bad session name or a naive ``now``.
        """
        _check_names(session)
        moment = _aware(now)
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _ca_common_name(session))])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(moment - _CA_BACKDATE)
            .not_valid_after(moment + _CA_VALIDITY)
            # path_length=0: the session CA signs services only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(session, cert.public_bytes(serialization.Encoding.PEM), _pkcs8(key))

    @classmethod
    def from_pem(cls, session: str, cert_pem: bytes, key_pem: bytes) -> SessionCA:
        """Load a stored CA.

        Raises:
            ConfigurationError: unreadable PEM, a key that is not the certificate's, or a
                certificate that is not ``session``'s CA.
        """
        return cls(session, cert_pem, key_pem)

    def issue(self, service: str, *, not_after: datetime, now: datetime | None = None) -> ServiceCertificate:
        """A certificate for ``service`` of this session, with a fresh key, valid until ``not_after``.

        It names the service by its URI only (no DNS names: see the module docstring), may be
        used for TLS server and client authentication, and is back-dated 60 s for clock skew.

        Raises:
            ConfigurationError: a bad service name, a naive time, or a validity window that is
                empty or outlives the CA.
        """
        _check_names(self.session, service)
        moment, end = _aware(now), _aware(not_after)
        start = moment - _LEAF_BACKDATE
        ca_cert, ca_key = self._load()
        if end <= start:
            raise ConfigurationError("not_after must be later than now - 60 s")
        if end > ca_cert.not_valid_after_utc:
            raise ConfigurationError(f"not_after outlives session {self.session!r}'s CA")
        key = _new_key()
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(service_uri(self.session, service))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return ServiceCertificate(cert.public_bytes(serialization.Encoding.PEM), _pkcs8(key))


def certificate_identity(cert_der: bytes) -> tuple[str, str]:
    """``(session, service)`` named by a DER certificate's single ``sealedml:`` URI.

    This reads the name only: it does not check who signed the certificate. Call it on a
    certificate the TLS handshake has already verified against the session CA.

    Raises:
        PeerRefusedError: unreadable DER, no subject alternative names, no ``sealedml:`` URI
            or more than one, or a malformed one.
    """
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound as exc:
        raise PeerRefusedError("the certificate has no subject alternative names") from exc
    except (ValueError, TypeError) as exc:
        raise PeerRefusedError("the certificate is unreadable") from exc
    ours = [u for u in uris if u.lower().startswith("sealedml:")]
    if len(ours) != 1:
        raise PeerRefusedError(f"the certificate names {len(ours)} SealedML URIs, not one")
    return parse_service_uri(ours[0])
