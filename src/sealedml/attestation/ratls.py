"""RA-TLS: TLS certificates that carry attestation evidence for their own key.

A TEE creates a key pair, obtains evidence whose report data is
``SHA-256(DER SubjectPublicKeyInfo) ‖ 32 zero bytes`` and puts the evidence in
a self-signed X.509 certificate for that key. A peer that completes a TLS
handshake with the certificate knows the other end holds the private key;
verifying the evidence and its report data then tells it the key lives in an
attested TEE. This is the scheme of Gramine's RA-TLS library
(``tools/sgx/ra-tls``), so certificates interoperate both ways for SGX.

Freshness: evidence is only as fresh as the certificate carrying it, so a
server keeps one key and re-issues a short-lived certificate with new evidence
every minute (:class:`RotatingRaTlsCertificate`). Clients verify whatever
certificate the server presents *during* the TLS handshake
(:func:`attested_client_context`) instead of pinning one certificate's bytes.

This module makes certificates and is the public RA-TLS API; the rest lives
next to it, one question per module:

- :mod:`sealedml.attestation.ratls_evidence` — how evidence is encoded in the
  certificate's extensions (Intel quote extension, TCG DICE tagged evidence, DER).
- :mod:`sealedml.attestation.ratls_verify` — whether a certificate proves an
  attested key (:func:`verify_ratls_certificate`, :func:`extract_evidence`).
- :mod:`sealedml.attestation.ratls_tls` — TLS contexts and verification during
  the handshake (:func:`attested_client_context`, :class:`RaTlsPeerVerifier`).
"""

from __future__ import annotations

import math
import secrets
import threading
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from sealedml.attestation.base import Attester, TeeType
from sealedml.attestation.ratls_evidence import DICE_TAGGED_EVIDENCE_OID, INTEL_QUOTE_OID, encode_tagged_evidence
from sealedml.attestation.ratls_tls import (
    RaTlsPeerVerifier,
    RaTlsVerificationError,
    attestation_failure,
    attested_client_context,
    client_ssl_context,
    connect_verified,
    fetch_peer_certificate,
    server_ssl_context,
)
from sealedml.attestation.ratls_verify import extract_evidence, ratls_report_data, verify_ratls_certificate
from sealedml.errors import ConfigurationError

__all__ = [
    "RaTlsPeerVerifier",
    "RaTlsVerificationError",
    "RotatingRaTlsCertificate",
    "attestation_failure",
    "attested_client_context",
    "client_ssl_context",
    "connect_verified",
    "extract_evidence",
    "fetch_peer_certificate",
    "make_ratls_certificate",
    "ratls_report_data",
    "server_ssl_context",
    "verify_ratls_certificate",
]

#: notBefore is this far before the issue time: tolerates peers whose clocks run a little behind.
_CLOCK_SKEW = timedelta(minutes=1)


def make_ratls_certificate(
    attester: Attester,
    private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None = None,
    *,
    validity: timedelta = timedelta(days=1),
    now: datetime | None = None,
    common_name: str = "sealedml-ratls",
) -> tuple[bytes, bytes]:
    """Create a self-signed RA-TLS certificate for a (new or given) key.

    Args:
        attester: produces the evidence (report data = :func:`ratls_report_data`).
        private_key: an EC (P-256 / P-384) or Ed25519 key; a new P-256 key if ``None``.
        validity: certificate lifetime.
        now: issue time (default: now); the certificate is valid from 1 minute before (clock skew).
        common_name: subject and issuer CN.

    Returns:
        ``(certificate PEM, PKCS#8 private key PEM)``.

    Raises:
        ConfigurationError: unsupported key type.
        AttestationError: the attester failed.
    """
    key = private_key or ec.generate_private_key(ec.SECP256R1())
    algorithm: hashes.HashAlgorithm | None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            algorithm = hashes.SHA256()
        elif isinstance(key.curve, ec.SECP384R1):
            algorithm = hashes.SHA384()
        else:
            raise ConfigurationError("RA-TLS keys must be P-256, P-384 or Ed25519")
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = None
    else:
        raise ConfigurationError("RA-TLS keys must be P-256, P-384 or Ed25519")
    public_key = key.public_key()
    evidence = attester.evidence(ratls_report_data(public_key))
    issued = now or datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(secrets.randbits(159) | 1)
        .not_valid_before(issued - _CLOCK_SKEW)
        .not_valid_after(issued + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if evidence.tee in (TeeType.SGX, TeeType.TDX) and not evidence.aux:
        # Gramine-compatible: the raw quote is the extension value.
        builder = builder.add_extension(
            x509.UnrecognizedExtension(INTEL_QUOTE_OID, bytes(evidence.data)), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(DICE_TAGGED_EVIDENCE_OID, encode_tagged_evidence(evidence)),
            critical=False,
        )
    certificate = builder.sign(key, algorithm)
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


class RotatingRaTlsCertificate:
    """A server's RA-TLS identity: one key, a short-lived certificate re-issued with fresh evidence.

    Why: evidence is only as fresh as the certificate carrying it. A certificate
    made once at start carries start-time evidence for as long as it is valid —
    simulated evidence is refused :data:`~sealedml.attestation.simulated.MAX_EVIDENCE_AGE`
    seconds after it was made (locking new clients out of a long-running server),
    and an SGX/TDX quote would be accepted for a day-long certificate's whole
    lifetime. Here each certificate is valid for ``validity`` only (default 4
    minutes, below the simulated verifier's 5-minute limit, so a certificate
    inside its validity window always carries fresh-enough evidence) and a new
    one is issued every ``rotate_every`` seconds (:func:`sealedml._internal.serve.serve_app`
    installs it into the live server).

    The TLS private key (P-256) is created here, inside the TEE, and kept for
    the object's lifetime: every certificate certifies the same key, so
    swapping the certificate under a running server never pairs it with
    another key. Clients must verify each certificate they see
    (:func:`attested_client_context`), not pin one.

    Args:
        attester: produces the evidence for each certificate.
        rotate_every: seconds between two issues.
        validity: lifetime of each certificate; must be longer than ``rotate_every``.
        common_name: subject and issuer CN of the certificates.
        now: time of the first issue (default: now).

    Raises:
        ConfigurationError: ``rotate_every`` is not a positive number of seconds
            shorter than ``validity``.
        AttestationError: the attester failed on the first issue.
    """

    def __init__(
        self,
        attester: Attester,
        *,
        rotate_every: float = 60.0,
        validity: timedelta = timedelta(minutes=4),
        common_name: str = "sealedml-ratls",
        now: datetime | None = None,
    ) -> None:
        if not (math.isfinite(rotate_every) and rotate_every > 0):
            raise ConfigurationError("RA-TLS rotate_every must be a positive number of seconds")
        if rotate_every >= validity.total_seconds():
            raise ConfigurationError(
                f"RA-TLS certificates must be re-issued (every {rotate_every:g} s) before they expire "
                f"(validity {validity.total_seconds():g} s)"
            )
        self._attester = attester
        self._rotate_every = float(rotate_every)
        self._validity = validity
        self._common_name = common_name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._issue_lock = threading.Lock()  # one issue at a time (evidence may be slow)
        self._lock = threading.Lock()  # guards the current pair, never held during an issue
        self._current: tuple[bytes, bytes] = (b"", b"")
        self._issued_at = datetime.now(UTC)
        self.issue(now)

    @property
    def rotate_every(self) -> float:
        """Seconds between two issues."""
        return self._rotate_every

    @property
    def validity(self) -> timedelta:
        """Lifetime of each certificate."""
        return self._validity

    @property
    def current(self) -> tuple[bytes, bytes]:
        """The last issued ``(certificate PEM, PKCS#8 key PEM)``."""
        with self._lock:
            return self._current

    @property
    def issued_at(self) -> datetime:
        """Issue time of :attr:`current`."""
        with self._lock:
            return self._issued_at

    def issue(self, now: datetime | None = None) -> tuple[bytes, bytes]:
        """Issue a new certificate with fresh evidence for the same key; it becomes :attr:`current`.

        Blocking (evidence generation may take a while on real hardware): call
        it from a worker thread in async code.

        Args:
            now: issue time (default: now).

        Returns:
            ``(certificate PEM, PKCS#8 key PEM)``.

        Raises:
            AttestationError: the attester failed (:attr:`current` is unchanged).
        """
        at = now or datetime.now(UTC)
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        with self._issue_lock:
            pair = make_ratls_certificate(
                self._attester, self._key, validity=self._validity, now=at, common_name=self._common_name
            )
            with self._lock:
                self._current = pair
                self._issued_at = at
        return pair
