"""RA-TLS over TLS connections: server and client contexts, and verification during the handshake.

Freshness: evidence is only as fresh as the certificate carrying it, so a
server keeps one key and re-issues a short-lived certificate with new evidence
every minute (:class:`~sealedml.attestation.ratls.RotatingRaTlsCertificate`).
Clients verify whatever certificate the server presents *during* the TLS
handshake (:func:`attested_client_context`) instead of pinning one
certificate's bytes (:func:`connect_verified`, for short-lived clients only).
Each check is :func:`~sealedml.attestation.ratls_verify.verify_ratls_certificate`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, ClassVar

from sealedml.attestation.base import Claims, TeeType, Verifier
from sealedml.attestation.policy import Policy
from sealedml.attestation.ratls_verify import extract_evidence, load_ratls_certificate, verify_ratls_certificate
from sealedml.errors import AttestationError, ConfigurationError, EvidenceError

__all__ = [
    "RaTlsPeerVerifier",
    "RaTlsVerificationError",
    "attestation_failure",
    "attested_client_context",
    "client_ssl_context",
    "connect_verified",
    "fetch_peer_certificate",
    "server_ssl_context",
]

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
    server rotates it (:class:`~sealedml.attestation.ratls.RotatingRaTlsCertificate`).
    Without it the context does *no* certificate verification at all.
    Long-lived clients should use :func:`attested_client_context`, which
    verifies every certificate during the handshake.

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
    (:func:`~sealedml.attestation.ratls_verify.verify_ratls_certificate`),
    and returns a client context pinned to that exact certificate — pass it as
    ``httpx.Client(verify=context)``: every later connection fails unless the
    server presents that certificate, so also once a rotating server
    (:class:`~sealedml.attestation.ratls.RotatingRaTlsCertificate`) re-issued it.
    Long-lived clients should use :func:`attested_client_context`.

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
    :func:`~sealedml.attestation.ratls_verify.verify_ratls_certificate`
    and caches each verdict by certificate digest until the certificate or the
    collateral behind it expires (whichever is first); expired entries are
    dropped, so a client talking to a server that rotates its certificate
    keeps a bounded cache.

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
        horizon = load_ratls_certificate(der).not_valid_after_utc
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
    ``httpcore.ConnectError``, or SealedML's ``TransportError``, from
    :class:`RaTlsVerificationError`); this walks
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
    verifier by the evidence's TEE type,
    :func:`~sealedml.attestation.ratls_verify.verify_ratls_certificate`,
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
