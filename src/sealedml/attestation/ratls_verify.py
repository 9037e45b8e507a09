"""Checking an RA-TLS certificate: does it prove that its key lives in an attested TEE?

A peer that completes a TLS handshake with an RA-TLS certificate knows the
other end holds the certificate's private key. The certificate carries
evidence (:mod:`sealedml.attestation.ratls_evidence`) whose report data is
``SHA-256(DER SubjectPublicKeyInfo) ‖ 32 zero bytes`` (Gramine's binding,
:func:`ratls_report_data`); verifying the evidence and that binding then tells
the peer the key lives in an attested TEE (:func:`verify_ratls_certificate`).
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sealedml.attestation.base import Claims, Evidence, Verifier
from sealedml.attestation.collateral import CERTIFICATE_PARSE_ERRORS, check_certificate_fields, load_certificate
from sealedml.attestation.policy import Policy
from sealedml.attestation.ratls_evidence import (
    DICE_TAGGED_EVIDENCE_OID,
    INTEL_QUOTE_OID,
    decode_tagged_evidence,
    intel_quote_evidence,
    unwrap_octet_string,
)
from sealedml.errors import CollateralError, EvidenceError

__all__ = [
    "extract_evidence",
    "load_ratls_certificate",
    "ratls_report_data",
    "verify_ratls_certificate",
]

_MAX_CERT = 256 * 1024


def _spki_der(public_key: Any) -> bytes:
    try:
        return bytes(
            public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    except (AttributeError, ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceError("certificate public key cannot be encoded") from exc


def ratls_report_data(public_key: Any) -> bytes:
    """Report data binding a public key: ``SHA-256(DER SPKI) ‖ 32 zero bytes`` (Gramine).

    Args:
        public_key: a ``cryptography`` public key, or an ``x509.Certificate``.

    Returns:
        64 bytes.
    """
    if isinstance(public_key, x509.Certificate):
        public_key = public_key.public_key()
    return hashlib.sha256(_spki_der(public_key)).digest() + bytes(32)


def load_ratls_certificate(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    """Load a peer's certificate (object, DER or PEM), every field a check reads parsed.

    Args:
        cert: the certificate.

    Returns:
        The certificate.

    Raises:
        EvidenceError: too large, not an X.509 certificate, or a malformed field.
    """
    if isinstance(cert, x509.Certificate):
        try:
            check_certificate_fields(cert)
        except CERTIFICATE_PARSE_ERRORS as exc:
            raise EvidenceError("malformed X.509 certificate") from exc
        return cert
    data = cert.encode("ascii", "replace") if isinstance(cert, str) else bytes(cert)
    if len(data) > _MAX_CERT:
        raise EvidenceError("certificate too large")
    try:
        return load_certificate(data)
    except CollateralError as exc:
        raise EvidenceError("not an X.509 certificate") from exc


def extract_evidence(cert: x509.Certificate | bytes | str) -> Evidence:
    """The evidence an RA-TLS certificate carries (not verified).

    Args:
        cert: the certificate (object, DER or PEM).

    Returns:
        The evidence.

    Raises:
        EvidenceError: no evidence extension, malformed extension, or two
            extensions carrying different evidence.
    """
    certificate = load_ratls_certificate(cert)
    quote_value: bytes | None = None
    dice_value: bytes | None = None
    try:
        extensions = list(certificate.extensions)
    except CERTIFICATE_PARSE_ERRORS as exc:
        raise EvidenceError(f"certificate extensions malformed: {exc}") from exc
    for ext in extensions:
        if not isinstance(ext.value, x509.UnrecognizedExtension):
            continue
        if ext.oid == INTEL_QUOTE_OID:
            quote_value = bytes(ext.value.value)
        elif ext.oid == DICE_TAGGED_EVIDENCE_OID:
            dice_value = bytes(ext.value.value)
    found: list[Evidence] = []
    if quote_value is not None:
        found.append(intel_quote_evidence(unwrap_octet_string(quote_value)))
    if dice_value is not None:
        found.append(decode_tagged_evidence(dice_value))
    if not found:
        raise EvidenceError("certificate carries no attestation evidence")
    if len(found) == 2 and found[0] != found[1]:
        raise EvidenceError("certificate carries two different pieces of evidence")
    return found[0]


def _check_self_signed(certificate: x509.Certificate) -> None:
    key = certificate.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = certificate.signature_hash_algorithm
            if algorithm is None:
                raise EvidenceError("certificate signature algorithm unsupported")
            key.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(certificate.signature, certificate.tbs_certificate_bytes)
        else:
            raise EvidenceError("RA-TLS certificate key must be EC or Ed25519")
    except (InvalidSignature, UnsupportedAlgorithm, ValueError) as exc:
        raise EvidenceError("RA-TLS certificate is not validly self-signed") from exc


def verify_ratls_certificate(
    cert: x509.Certificate | bytes | str,
    verifier: Verifier,
    policy: Policy,
    now: datetime | None = None,
) -> Claims:
    """Verify an RA-TLS certificate: its evidence, its key binding, and the policy.

    Args:
        cert: the peer certificate (object, DER or PEM).
        verifier: the verifier for the evidence's TEE type.
        policy: the policy the claims must satisfy.
        now: verification time (default: now).

    Returns:
        The verified claims.

    Raises:
        EvidenceError: malformed certificate or evidence, certificate outside
            its validity period, bad self-signature, evidence of another TEE
            type than ``verifier``'s, or report data that does not bind the
            certificate's key.
        CollateralError: the verifier's collateral is missing or stale.
        PolicyError: the claims do not satisfy ``policy``.
    """
    certificate = load_ratls_certificate(cert)
    at = now or datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
        raise EvidenceError("RA-TLS certificate is outside its validity period")
    _check_self_signed(certificate)
    evidence = extract_evidence(certificate)
    if evidence.tee is not verifier.tee:
        raise EvidenceError(
            f"certificate carries {evidence.tee.value} evidence, the verifier is for {verifier.tee.value}"
        )
    claims = verifier.verify(evidence, now=at)
    # Gramine's binding: the first 32 bytes are SHA-256 of the DER SPKI, the rest zero.
    if not hmac.compare_digest(claims.report_data[:64], ratls_report_data(certificate)):
        raise EvidenceError("evidence does not bind the certificate's public key")
    policy.verify(claims, now=at)
    return claims
