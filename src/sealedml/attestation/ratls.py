"""RA-TLS: TLS certificates that carry attestation evidence for their own key.

A TEE creates a key pair, obtains evidence whose report data is
``SHA-256(DER SubjectPublicKeyInfo) ‖ 32 zero bytes`` and puts the evidence in
a self-signed X.509 certificate for that key. A peer that completes a TLS
handshake with the certificate knows the other end holds the private key;
verifying the evidence and its report data then tells it the key lives in an
attested TEE. This is the scheme of Gramine's RA-TLS library
(``tools/sgx/ra-tls``), so certificates interoperate both ways for SGX.

Evidence encodings (all as non-critical X.509 extensions):

- ``1.2.840.113741.1337.6`` — an Intel SGX/TDX quote, the raw quote bytes as
  the extension value (what Gramine emits, and what this module emits for
  Intel quotes). A value that is itself one DER OCTET STRING wrapping the
  quote (an older variant) is accepted too.
- ``2.23.133.5.4.9`` — TCG DICE tagged evidence (TCG DICE Attestation
  Architecture): ``TaggedEvidence ::= SEQUENCE { type OBJECT IDENTIFIER |
  INTEGER, value OCTET STRING }`` (or a SEQUENCE OF them). Known types:
  OID ``1.2.840.113741.1337.6`` and tag ``0x1a7501`` (Intel TEE quote), tag
  ``0x1a7504`` (SEV-SNP report; the tag numbers of the RATS-TLS project), and
  :data:`SEALEDML_EVIDENCE_OID`, whose value is SealedML's own envelope
  ``SEQUENCE { tee UTF8String, data OCTET STRING, aux OCTET STRING }`` — used
  for evidence that has no standard tag (simulated evidence, SEV-SNP with its
  certificate table).

The DER handled here is the small subset these structures need; every length
and tag is checked and every failure is an :class:`~sealedml.errors.EvidenceError`.

Freshness: evidence is only as fresh as the certificate carrying it, so a
server keeps one key and re-issues a short-lived certificate with new evidence
every minute (:class:`RotatingRaTlsCertificate`). Clients verify whatever
certificate the server presents *during* the TLS handshake
(:func:`attested_client_context`) instead of pinning one certificate's bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from sealedml.attestation.base import Attester, Claims, Evidence, TeeType, Verifier
from sealedml.attestation.collateral import CERTIFICATE_PARSE_ERRORS, check_certificate_fields, load_certificate
from sealedml.attestation.dcap import parse_quote_layout
from sealedml.attestation.policy import Policy
from sealedml.errors import AttestationError, CollateralError, ConfigurationError, EvidenceError

__all__ = [
    "DICE_TAGGED_EVIDENCE_OID",
    "INTEL_QUOTE_OID",
    "SEALEDML_EVIDENCE_OID",
    "RaTlsPeerVerifier",
    "RaTlsVerificationError",
    "RotatingRaTlsCertificate",
    "attestation_failure",
    "attested_client_context",
    "client_ssl_context",
    "connect_verified",
    "decode_tagged_evidence",
    "encode_tagged_evidence",
    "extract_evidence",
    "fetch_peer_certificate",
    "make_ratls_certificate",
    "ratls_report_data",
    "server_ssl_context",
    "verify_ratls_certificate",
]

#: Intel's RA-TLS quote extension (Gramine, Intel SGX RA-TLS white paper).
INTEL_QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
#: TCG DICE ``tcg-dice-TaggedEvidence`` extension.
DICE_TAGGED_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
#: SealedML's evidence envelope type, a UUID-based OID (ITU-T X.667, arc 2.25).
SEALEDML_EVIDENCE_OID = x509.ObjectIdentifier("2.25.109655821611794003088819032462751165417")

_TAG_INTEL_QUOTE = 0x1A7501  # RATS-TLS "OCBR_TAG_EVIDENCE_INTEL_TEE_QUOTE"
_TAG_SEV_SNP = 0x1A7504  # RATS-TLS "OCBR_TAG_EVIDENCE_SEV_SNP"
_MAX_CERT = 256 * 1024
_MAX_DEPTH = 4
#: notBefore is this far before the issue time: tolerates peers whose clocks run a little behind.
_CLOCK_SKEW = timedelta(minutes=1)

# ---------------------------------------------------------------------------
# Minimal DER (ITU-T X.690): definite lengths, single-byte tags
# ---------------------------------------------------------------------------

_SEQUENCE = 0x30
_INTEGER = 0x02
_OCTET_STRING = 0x04
_OID = 0x06
_UTF8STRING = 0x0C


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def _read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """Read one TLV at ``pos``; return ``(tag, value_start, value_end)``."""
    if pos + 2 > len(data):
        raise EvidenceError("DER: truncated header")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise EvidenceError("DER: multi-byte tags are not supported")
    first = data[pos + 1]
    start = pos + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise EvidenceError("DER: indefinite length not allowed")
    else:
        count = first & 0x7F
        if count > 4 or start + count > len(data):
            raise EvidenceError("DER: bad length")
        length = int.from_bytes(data[start : start + count], "big")
        if length < 0x80 or data[start] == 0:
            raise EvidenceError("DER: non-minimal length")
        start += count
    end = start + length
    if end > len(data):
        raise EvidenceError("DER: value runs past the end")
    return tag, start, end


def _items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    items = []
    pos = start
    while pos < end:
        tag, vstart, vend = _read_tlv(data[:end], pos)
        items.append((tag, vstart, vend))
        pos = vend
    return items


def _encode_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _tlv(_OID, bytes(body))


def _decode_oid(body: bytes) -> str:
    if not body or len(body) > 64:
        raise EvidenceError("DER: bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    fresh = True
    for byte in body:
        if fresh and byte == 0x80:
            raise EvidenceError("DER: non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (byte & 0x7F)
        fresh = not byte & 0x80
        if fresh:
            arcs.append(value)
            value = 0
    if not fresh:
        raise EvidenceError("DER: truncated OBJECT IDENTIFIER")
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _encode_int(n: int) -> bytes:
    body = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True)
    return _tlv(_INTEGER, body)


def _decode_int(body: bytes) -> int:
    if not body or len(body) > 8:
        raise EvidenceError("DER: bad INTEGER")
    if len(body) > 1 and ((body[0] == 0 and not body[1] & 0x80) or (body[0] == 0xFF and body[1] & 0x80)):
        raise EvidenceError("DER: non-minimal INTEGER")
    return int.from_bytes(body, "big", signed=True)


# ---------------------------------------------------------------------------
# Tagged evidence
# ---------------------------------------------------------------------------


def _intel_evidence(quote: bytes) -> Evidence:
    layout = parse_quote_layout(quote)
    return Evidence(layout.tee, bytes(quote))


def encode_tagged_evidence(evidence: Evidence) -> bytes:
    """DER ``TaggedEvidence`` for ``evidence`` (the value of the DICE extension).

    SGX / TDX quotes are tagged with :data:`INTEL_QUOTE_OID`; everything else
    uses :data:`SEALEDML_EVIDENCE_OID` with SealedML's envelope (TEE type,
    data, auxiliary data).

    Args:
        evidence: the evidence to encode.

    Returns:
        The DER bytes.
    """
    if evidence.tee in (TeeType.SGX, TeeType.TDX) and not evidence.aux:
        body = _encode_oid(INTEL_QUOTE_OID) + _tlv(_OCTET_STRING, bytes(evidence.data))
    else:
        envelope = _tlv(
            _SEQUENCE,
            _tlv(_UTF8STRING, evidence.tee.value.encode())
            + _tlv(_OCTET_STRING, bytes(evidence.data))
            + _tlv(_OCTET_STRING, bytes(evidence.aux)),
        )
        body = _encode_oid(SEALEDML_EVIDENCE_OID) + _tlv(_OCTET_STRING, envelope)
    return _tlv(_SEQUENCE, body)


def _decode_envelope(value: bytes) -> Evidence:
    tag, start, end = _read_tlv(value, 0)
    if tag != _SEQUENCE or end != len(value):
        raise EvidenceError("SealedML evidence envelope is not one SEQUENCE")
    items = _items(value, start, end)
    if len(items) != 3 or [t for t, _, _ in items] != [_UTF8STRING, _OCTET_STRING, _OCTET_STRING]:
        raise EvidenceError("SealedML evidence envelope malformed")
    (_, ts, te), (_, ds, de), (_, xs, xe) = items
    try:
        tee = TeeType(value[ts:te].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EvidenceError("SealedML evidence envelope names an unknown TEE") from exc
    return Evidence(tee, value[ds:de], value[xs:xe])


def _decode_entry(data: bytes, start: int, end: int) -> Evidence | None:
    items = _items(data, start, end)
    if len(items) != 2 or items[1][0] != _OCTET_STRING:
        raise EvidenceError("TaggedEvidence entry malformed")
    (kind_tag, ks, ke), (_, vs, ve) = items
    value = data[vs:ve]
    if kind_tag == _OID:
        kind = _decode_oid(data[ks:ke])
        if kind == INTEL_QUOTE_OID.dotted_string:
            return _intel_evidence(value)
        if kind == SEALEDML_EVIDENCE_OID.dotted_string:
            return _decode_envelope(value)
        return None
    if kind_tag == _INTEGER:
        number = _decode_int(data[ks:ke])
        if number == _TAG_INTEL_QUOTE:
            return _intel_evidence(value)
        if number == _TAG_SEV_SNP:
            return Evidence(TeeType.SEV_SNP, value)
        return None
    raise EvidenceError("TaggedEvidence type is neither an OID nor an INTEGER")


def decode_tagged_evidence(value: bytes) -> Evidence:
    """Decode the value of a TCG DICE tagged-evidence extension.

    Args:
        value: DER ``TaggedEvidence`` or ``SEQUENCE OF TaggedEvidence``.

    Returns:
        The first entry of a known type.

    Raises:
        EvidenceError: malformed DER or no entry of a known type.
    """
    data = bytes(value)
    tag, start, end = _read_tlv(data, 0)
    if tag != _SEQUENCE or end != len(data):
        raise EvidenceError("TaggedEvidence is not one DER SEQUENCE")
    items = _items(data, start, end)
    if items and all(t == _SEQUENCE for t, _, _ in items):
        entries = [(s, e) for _, s, e in items]  # SEQUENCE OF TaggedEvidence
    else:
        entries = [(start, end)]
    for entry_start, entry_end in entries:
        evidence = _decode_entry(data, entry_start, entry_end)
        if evidence is not None:
            return evidence
    raise EvidenceError("TaggedEvidence carries no evidence of a known type")


# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


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


def _load_cert(cert: x509.Certificate | bytes | str) -> x509.Certificate:
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


def _unwrap_octet_string(value: bytes) -> bytes:
    """Return the content if ``value`` is exactly one DER OCTET STRING, else ``value``."""
    try:
        tag, start, end = _read_tlv(value, 0)
    except EvidenceError:
        return value
    if tag == _OCTET_STRING and end == len(value) and end > start:
        return value[start:end]
    return value


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
    certificate = _load_cert(cert)
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
        found.append(_intel_evidence(_unwrap_octet_string(quote_value)))
    if dice_value is not None:
        found.append(decode_tagged_evidence(dice_value))
    if not found:
        raise EvidenceError("certificate carries no attestation evidence")
    if len(found) == 2 and found[0] != found[1]:
        raise EvidenceError("certificate carries two different pieces of evidence")
    return found[0]


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
    certificate = _load_cert(cert)
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


# ---------------------------------------------------------------------------
# TLS helpers
# ---------------------------------------------------------------------------


def server_ssl_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context presenting an RA-TLS certificate.

    Args:
        cert_pem: the certificate (PEM).
        key_pem: its private key (PEM).

    Returns:
        The context (TLS 1.2 or later).

    Raises:
        ConfigurationError: the certificate and key cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ``load_cert_chain`` only reads files: use a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="sealedml-ratls-") as directory:
        cert_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        try:
            context.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(f"cannot load RA-TLS certificate and key: {exc}") from exc
    return context


def client_ssl_context(pinned_certificate: bytes | None = None) -> ssl.SSLContext:
    """A TLS client context for talking to an RA-TLS server.

    With ``pinned_certificate`` (DER, as returned by :func:`connect_verified`)
    the handshake succeeds only with exactly that certificate — until the
    server rotates it (:class:`RotatingRaTlsCertificate`). Without it the
    context does *no* certificate verification at all. Long-lived clients
    should use :func:`attested_client_context`, which verifies every
    certificate during the handshake.

    Args:
        pinned_certificate: the verified peer certificate (DER) to pin.

    Returns:
        The context (TLS 1.2 or later, no host name check: RA-TLS
        authenticates the key, not a name).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if pinned_certificate is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pinned_certificate)
    return context


def fetch_peer_certificate(host: str, port: int, *, timeout: float = 10.0) -> bytes:
    """Complete a TLS handshake with ``host:port`` and return its certificate (DER).

    Raises:
        AttestationError: the connection or handshake failed, or no certificate.
    """
    context = client_ssl_context()
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise AttestationError(f"TLS connection to {host}:{port} failed: {exc}") from exc
    if not der:
        raise AttestationError(f"{host}:{port} presented no certificate")
    return der


def connect_verified(
    host: str,
    port: int,
    verifier: Verifier,
    policy: Policy,
    *,
    now: datetime | None = None,
    timeout: float = 10.0,
) -> tuple[Claims, ssl.SSLContext]:
    """Attest an RA-TLS server before sending it anything.

    Fetches the server's certificate, verifies it
    (:func:`verify_ratls_certificate`), and returns a client context pinned to
    that exact certificate — pass it as ``httpx.Client(verify=context)``: every
    later connection fails unless the server presents that certificate, so
    also once a rotating server (:class:`RotatingRaTlsCertificate`) re-issued
    it. Long-lived clients should use :func:`attested_client_context`.

    Returns:
        ``(claims, pinned SSL context)``.

    Raises:
        AttestationError: connection failure, or any verification failure
            (``EvidenceError``, ``CollateralError``, ``PolicyError``).
    """
    der = fetch_peer_certificate(host, port, timeout=timeout)
    claims = verify_ratls_certificate(der, verifier, policy, now=now)
    return claims, client_ssl_context(der)


class RaTlsPeerVerifier:
    """Verifies the RA-TLS certificate of an established TLS connection.

    Picks the verifier by the TEE type of the certificate's evidence, runs
    :func:`verify_ratls_certificate` and caches each verdict by certificate
    digest until the certificate or the collateral behind it expires
    (whichever is first); expired entries are dropped, so a client talking to
    a server that rotates its certificate keeps a bounded cache.

    :func:`attested_client_context` runs it inside the TLS handshake. It can
    also serve as an httpx response hook (``event_hooks={"response":
    [peer.httpx_hook]}``), but a response hook runs after the request was sent.

    Args:
        verifier: the verifier for the server's TEE type, or verifiers by TEE type.
        policy: policy the server's claims must satisfy.
        now: fixed verification time (default: the time of each check).
        on_verified: optional callback receiving the claims of each newly
            verified certificate.
    """

    def __init__(
        self,
        verifier: Verifier | Mapping[TeeType, Verifier],
        policy: Policy,
        *,
        now: datetime | None = None,
        on_verified: Callable[[Claims], None] | None = None,
    ) -> None:
        verifiers = {verifier.tee: verifier} if isinstance(verifier, Verifier) else dict(verifier)
        self.verifiers: Mapping[TeeType, Verifier] = MappingProxyType(verifiers)
        self.policy = policy
        self.now = now
        self.on_verified = on_verified
        self._verified: dict[bytes, tuple[Claims, datetime]] = {}
        self._lock = threading.Lock()

    def verify_certificate(self, der: bytes) -> Claims:
        """Verify a peer certificate (DER), using the cache when possible.

        Raises:
            AttestationError: the certificate does not verify (``EvidenceError``
                also when no verifier handles its TEE type).
        """
        digest = hashlib.sha256(der).digest()
        at = self.now or datetime.now(UTC)
        with self._lock:
            cached = self._verified.get(digest)
        if cached is not None and at < cached[1]:
            return cached[0]
        tee = extract_evidence(der).tee
        verifier = self.verifiers.get(tee)
        if verifier is None:
            raise EvidenceError(f"no verifier accepts {tee.value} evidence")
        claims = verify_ratls_certificate(der, verifier, self.policy, now=at)
        horizon = _load_cert(der).not_valid_after_utc
        if claims.collateral_expires is not None:
            horizon = min(horizon, claims.collateral_expires)
        with self._lock:
            for stale in [key for key, (_, until) in self._verified.items() if until <= at]:
                del self._verified[stale]
            self._verified[digest] = (claims, horizon)
        if self.on_verified is not None:
            self.on_verified(claims)
        return claims

    def verify_ssl_object(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Claims:
        """Verify the certificate of a connected ``SSLObject`` / ``SSLSocket``.

        Raises:
            AttestationError: no certificate, or it does not verify.
        """
        der = ssl_object.getpeercert(True)  # positional: httpcore hands out _ssl._SSLSocket
        if not der:
            raise EvidenceError("peer presented no certificate")
        return self.verify_certificate(der)

    def httpx_hook(self, response: Any) -> None:
        """An httpx response event hook verifying the connection's certificate.

        Raises:
            AttestationError: the connection is not TLS or not attested.
        """
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        if ssl_object is None:
            raise EvidenceError("response did not come over TLS; cannot check RA-TLS evidence")
        self.verify_ssl_object(ssl_object)


# ---------------------------------------------------------------------------
# Verification inside the TLS handshake
# ---------------------------------------------------------------------------

#: OpenSSL's ``X509_V_ERR_APPLICATION_VERIFICATION``: the application refused the certificate.
_X509_V_ERR_APPLICATION_VERIFICATION = 50


class RaTlsVerificationError(ssl.SSLCertVerificationError):
    """The server's RA-TLS certificate did not verify: the handshake failed, nothing was sent.

    A subclass of :class:`ssl.SSLCertVerificationError`, so HTTP clients treat
    it as any certificate failure (httpx raises ``httpx.ConnectError``); the
    precise reason is :attr:`attestation_error` (also ``__cause__``), which
    :func:`attestation_failure` digs out of a wrapped exception.

    Args:
        error: why the certificate was refused.
    """

    def __init__(self, error: AttestationError) -> None:
        message = f"RA-TLS certificate not attested: {error}"
        super().__init__(ssl.SSL_ERROR_SSL, message)  # (code, text) like ssl's own errors: str() is the text
        self.attestation_error = error
        self.library = "SSL"
        self.reason = "CERTIFICATE_VERIFY_FAILED"
        self.verify_code = _X509_V_ERR_APPLICATION_VERIFICATION
        self.verify_message = message
        self.__cause__ = error
        self.__suppress_context__ = True

    def __reduce__(self) -> tuple[type[RaTlsVerificationError], tuple[AttestationError]]:
        return type(self), (self.attestation_error,)


def attestation_failure(exc: BaseException) -> AttestationError | None:
    """The :class:`AttestationError` behind ``exc``, if there is one.

    HTTP clients wrap a handshake failure (``httpx.ConnectError`` from
    ``httpcore.ConnectError`` from :class:`RaTlsVerificationError`); this walks
    ``__cause__`` / ``__context__`` (and exception groups) so a caller can
    re-raise the precise reason.

    Args:
        exc: the exception caught.

    Returns:
        The attestation error, or ``None`` if the failure was something else.
    """
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, AttestationError):
            return current
        if isinstance(current, RaTlsVerificationError):
            return current.attestation_error
        if isinstance(current, BaseExceptionGroup):
            pending.extend(reversed(current.exceptions))
        for linked in (current.__context__, current.__cause__):
            if linked is not None:
                pending.append(linked)
    return None


def _attest(peer: RaTlsPeerVerifier, connection: ssl.SSLSocket | ssl.SSLObject) -> None:
    try:
        peer.verify_ssl_object(connection)
    except AttestationError as exc:
        raise RaTlsVerificationError(exc) from exc


class _AttestedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` (memory-BIO TLS: asyncio, anyio, httpx async) that attests the peer.

    The check runs when ``do_handshake`` completes, before the caller can
    write; ``read`` / ``write`` also run it first, so an implicit handshake
    (OpenSSL completes one inside ``SSL_write``) cannot skip it.
    """

    _ratls_peer: ClassVar[RaTlsPeerVerifier]
    _ratls_attested = False

    def do_handshake(self) -> None:
        super().do_handshake()
        _attest(self._ratls_peer, self)
        self._ratls_attested = True

    def read(self, len: int = 1024, buffer: Any = None) -> bytes:
        if not self._ratls_attested:
            self.do_handshake()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        if not self._ratls_attested:
            self.do_handshake()
        return super().write(data)


class _AttestedSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` (blocking TLS: ``wrap_socket``, httpx sync) that attests the peer.

    Like :class:`_AttestedSSLObject`; ``sendall``, ``recv`` and ``sendfile`` go
    through ``send`` / ``read``.
    """

    _ratls_peer: ClassVar[RaTlsPeerVerifier]
    _ratls_attested = False

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _attest(self._ratls_peer, self)
        self._ratls_attested = True

    def _ensure_attested(self) -> None:
        # No TLS object (closed or unwrapped): nothing to attest, the parent method decides.
        if not self._ratls_attested and getattr(self, "_sslobj", None) is not None:
            self.do_handshake()

    def read(self, len: int = 1024, buffer: Any = None) -> bytes:
        self._ensure_attested()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        self._ensure_attested()
        return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:
        self._ensure_attested()
        return super().send(data, flags)


def attested_client_context(
    verifiers: Mapping[TeeType, Verifier],
    policy: Policy,
    *,
    now: datetime | None = None,
    on_verified: Callable[[Claims], None] | None = None,
) -> ssl.SSLContext:
    """A TLS client context that verifies the server's RA-TLS certificate during the handshake.

    Whatever certificate the server presents — including one it rotated in
    after this context was made — is verified (:class:`RaTlsPeerVerifier`:
    verifier by the evidence's TEE type, :func:`verify_ratls_certificate`,
    verdicts cached per certificate) when the handshake completes, before the
    caller can send a byte. A certificate that does not verify fails the
    handshake with :class:`RaTlsVerificationError` (httpx: ``ConnectError``;
    :func:`attestation_failure` recovers the reason). Works with
    ``ssl.SSLContext.wrap_socket`` / ``wrap_bio``, i.e. ``httpx.Client`` and
    ``httpx.AsyncClient`` (``verify=context``) under asyncio or uvloop.

    Args:
        verifiers: verifiers by TEE type; evidence of another type is refused.
        policy: policy the server's claims must satisfy.
        now: fixed verification time (default: the time of each handshake).
        on_verified: optional callback receiving the claims of each newly
            verified certificate.

    Returns:
        The context (TLS 1.2 or later; no host name check: RA-TLS
        authenticates the key, not a name; OpenSSL's chain check off, the
        certificate is self-signed and the evidence check replaces it).

    Raises:
        ConfigurationError: no verifiers (every server would be refused).
    """
    if not verifiers:
        raise ConfigurationError("attested_client_context needs at least one verifier")
    peer = RaTlsPeerVerifier(verifiers, policy, now=now, on_verified=on_verified)

    # Python's ssl has no verify callback: the context builds its TLS objects from
    # these classes (``wrap_socket`` → ``sslsocket_class``, ``wrap_bio`` →
    # ``sslobject_class``), whose ``do_handshake`` verifies the peer certificate.
    class _Socket(_AttestedSSLSocket):
        _ratls_peer = peer

    class _Object(_AttestedSSLObject):
        _ratls_peer = peer

    # A plain SSLContext, not a subclass: anyio wraps a subclass's wrap_bio in a thread.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.sslsocket_class = _Socket
    context.sslobject_class = _Object
    return context
