"""The network shield of secureTF: plain TCP in, mutual TLS between a session's services out.

An unmodified program speaks plain TCP. Next to it, inside the same TEE, a :class:`Forwarder`
turns that into mutual TLS 1.3 with another service of the same session:

* :meth:`Forwarder.outbound` accepts plain TCP from the program and opens TLS to the peer's
  address, checking that the server is the service it expects;
* :meth:`Forwarder.inbound` accepts TLS from peers, checking their client certificates, and
  hands the bytes to the program over plain TCP.

**Adversary.** The cloud host sees every packet between the TEEs and can drop, alter,
replay, reorder or redirect any of them, and can run its own programs that connect or accept.
It cannot get a certificate of the session CA (``sessions/ca.py``): that CA's key stays in the
KeyService, which issues a certificate to a service only after that service's attestation.
So each side trusts only its session's CA, and a peer is accepted only if its certificate
names a service of *this* session that the session lets this one talk to
(:func:`check_peer`); host names are not trusted and not checked. A connection cut by the host
is passed on as a reset, never as a clean end of stream, so a truncated reply is not mistaken
for a whole one.

**Not hidden.** Traffic sizes and timing, which services talk to which and when, and the
addresses and ports. The plain hop between the program and its forwarder must stay inside
the TEE (loopback inside a Gramine enclave or a confidential VM); see
``docs/network-shield.md``.

**Threads.** The launcher runs the program in the main thread, so everything here runs in
daemon threads: one accepts, and one per connection moves bytes both ways. One thread owns
each TLS object, through memory BIOs and a selector, because an OpenSSL connection must not
be read and written from two threads at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealedml.errors import ConfigurationError
from sealedml.sessions.ca import PeerRefusedError, certificate_identity, service_uri

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "Forwarder",
    "PeerRefusedError",
    "TlsIdentity",
    "check_peer",
    "client_context",
    "server_context",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds for TCP connect plus TLS handshake; a stalled peer is refused
_CHUNK = 64 * 1024
_HIGH_WATER = 256 * 1024  # stop reading one side while this much waits to be written to the other
_POLL = 1.0  # seconds between checks for close() while a connection is idle
_JOIN = 2.0  # seconds close() waits for its threads


@dataclass(frozen=True, repr=False)
class TlsIdentity:
    """What one service needs for the shield: its session CA, its certificate and key, its peers.

    ``peers`` are the services of this session this one may talk to, in either direction.
    Checked on construction: the names follow the session grammar and the certificate is the
    one of ``service`` in ``session``, so a misplaced certificate fails here, not at a peer.

    Raises:
        ConfigurationError: bad names or a certificate of another service.
    """

    session: str
    service: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    peers: frozenset[str]

    def __post_init__(self) -> None:
        peers = frozenset(self.peers)
        service_uri(self.session, self.service)
        for peer in peers:
            service_uri(self.session, peer)
        object.__setattr__(self, "peers", peers)
        try:
            der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)
            named = certificate_identity(der)
        except (ValueError, PeerRefusedError) as exc:
            raise ConfigurationError(f"the certificate of service {self.service!r} is unreadable") from exc
        if named != (self.session, self.service):
            raise ConfigurationError(
                f"the certificate names service {named[1]!r} of session {named[0]!r}, "
                f"not {self.service!r} of {self.session!r}"
            )

    def __repr__(self) -> str:
        return f"TlsIdentity(session={self.session!r}, service={self.service!r}, peers={sorted(self.peers)!r})"


def _load_own_certificate(context: ssl.SSLContext, identity: TlsIdentity) -> None:
    """Load the service's certificate and key through ``memfd`` paths: the key never touches a disk.

    ``load_cert_chain`` takes only paths. A memfd is an anonymous in-memory file; OpenSSL opens
    it through ``/proc/self/fd/N``, and it disappears when the descriptor is closed, right after.
    """
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        raise ConfigurationError("memfd_create is not available: refusing to write a TLS key to a file")
    fds: list[int] = []
    try:
        paths: list[str] = []
        for label, data in (("cert", identity.cert_pem), ("key", identity.key_pem)):
            fd = os.memfd_create(f"sealedml-tls-{label}", os.MFD_CLOEXEC)
            fds.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            paths.append(f"/proc/self/fd/{fd}")
        context.load_cert_chain(certfile=paths[0], keyfile=paths[1])
    except (ssl.SSLError, OSError) as exc:
        # OpenSSL's message names the failing step ("key values mismatch"), never key bytes.
        raise ConfigurationError(f"cannot load the TLS certificate of {identity.service!r}: {exc}") from exc
    finally:
        for fd in fds:
            os.close(fd)


def _context(identity: TlsIdentity, *, server_side: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server_side:
        # Peers are named by the URI in their certificate (check_peer), not by host names,
        # which the host controls; check_hostname must go off before anything else.
        context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        # A fresh SSLContext trusts nothing: the session CA becomes the only root.
        context.load_verify_locations(cadata=identity.ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"the CA certificate of session {identity.session!r} is unreadable") from exc
    _load_own_certificate(context, identity)
    return context


def server_context(identity: TlsIdentity) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate from the session CA.

    Raises:
        ConfigurationError: unreadable CA, certificate or key, or no ``memfd_create``.
    """
    context = _context(identity, server_side=True)
    context.num_tickets = 0  # no resumption: each connection shows its certificate afresh
    return context


def client_context(identity: TlsIdentity) -> ssl.SSLContext:
    """A TLS 1.3 client context that trusts only the session CA and presents the service's certificate.

    Host names are not checked (``check_hostname`` is off): call :func:`check_peer` after the
    handshake, which checks the server's service URI instead.

    Raises:
        ConfigurationError: unreadable CA, certificate or key, or no ``memfd_create``.
    """
    return _context(identity, server_side=False)


def check_peer(identity: TlsIdentity, tls: ssl.SSLSocket | ssl.SSLObject, expected: str | None = None) -> str:
    """The peer's service name, once its verified certificate shows it may talk to this service.

    Call after the handshake, which has already checked the chain up to the session CA. The
    peer must name this session, a service in ``identity.peers`` and, if given, ``expected``.

    Raises:
        PeerRefusedError: with a one-line reason naming the peer's session and service.
    """
    try:
        der = tls.getpeercert(binary_form=True)
    except ValueError as exc:  # "handshake not done yet": nothing is verified
        raise PeerRefusedError("the TLS handshake is not complete") from exc
    if not der:
        raise PeerRefusedError("the peer presented no certificate")
    session, service = certificate_identity(der)
    if session != identity.session:
        raise PeerRefusedError(f"service {service!r} of session {session!r} is not of session {identity.session!r}")
    if service not in identity.peers:
        raise PeerRefusedError(f"service {service!r} of session {session!r} is not a peer of {identity.service!r}")
    if expected is not None and service != expected:
        raise PeerRefusedError(f"the server is service {service!r} of session {session!r}, not {expected!r}")
    return service


def _require_loopback(address: tuple[str, int], role: str) -> None:
    """Refuse a plain-TCP end outside loopback: the plain hop carries cleartext and this service's identity.

    An outbound forwarder listening where the host can reach it would let the host speak to
    peers *as this service*; an inbound one handing plaintext to a remote target would send
    it past the host in the clear.
    """
    host = address[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(f"the plain-TCP {role} must be a loopback address, not {host!r}")


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, so the program sees an error rather than a clean end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Link:
    """One TLS connection driven through memory BIOs, so one thread owns it for both directions."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext, *, server_side: bool) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.to_raw = bytearray()  # ciphertext waiting for the TLS socket
        self.to_plain = bytearray()  # plaintext waiting for the program's socket

    def handshake(self, timeout: float) -> None:
        """Complete the handshake within ``timeout`` seconds (raises ``ssl.SSLError``, ``OSError``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush(deadline)
                self.raw.settimeout(self._remaining(deadline))
                data = self.raw.recv(_CHUNK)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
        self._flush(deadline)

    def send_alert(self) -> None:
        """Best effort: send what OpenSSL queued (an alert, after a failed handshake)."""
        with contextlib.suppress(OSError):
            self.raw.setblocking(False)
            self.raw.send(self.outgoing.read())

    @staticmethod
    def _remaining(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS handshake timed out")
        return left

    def _flush(self, deadline: float) -> None:
        data = self.outgoing.read()
        if data:
            self.raw.settimeout(self._remaining(deadline))
            self.raw.sendall(data)

    def _drain(self) -> bool:
        """Decrypt what has arrived into ``to_plain``; True once the peer has sent close_notify."""
        try:
            while True:
                chunk = self.tls.read(_CHUNK)
                if not chunk:
                    return True
                self.to_plain += chunk
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLZeroReturnError:
            return True
        finally:
            self.to_raw += self.outgoing.read()  # TLS 1.3 may answer while reading (key update)

    def _close_notify(self) -> None:
        """Half-close the TLS direction: TLS 1.3 lets us keep reading after our close_notify."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()  # sends close_notify; the peer's is not awaited
        self.to_raw += self.outgoing.read()

    def pump(self, plain: socket.socket, closing: Callable[[], bool]) -> None:
        """Move bytes both ways until both directions have ended, passing each end on.

        The end of the program's stream becomes a TLS close_notify (then a TCP FIN); a peer's
        close_notify becomes ``shutdown(SHUT_WR)`` on the program's socket. A TLS stream that
        ends without close_notify raises ``ssl.SSLEOFError``: the caller resets the program's
        connection. Raises ``OSError`` or ``ssl.SSLError`` on any failure.
        """
        raw = self.raw
        plain.setblocking(False)
        raw.setblocking(False)
        plain_eof = False  # the program ended its stream
        tls_eof = self._drain()  # data may have come with the last handshake message
        plain_shut = raw_shut = False  # we ended our write side towards the program / the peer
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        with selectors.DefaultSelector() as selector:
            while True:
                if tls_eof and not self.to_plain and not plain_shut:
                    plain.shutdown(socket.SHUT_WR)
                    plain_shut = True
                if plain_eof and not self.to_raw and not raw_shut:
                    raw.shutdown(socket.SHUT_WR)
                    raw_shut = True
                if plain_shut and raw_shut:
                    return
                if closing():
                    raise ConnectionAbortedError("the forwarder is closing")
                wants = {
                    plain: (read if not plain_eof and len(self.to_raw) < _HIGH_WATER else 0)
                    | (write if self.to_plain else 0),
                    raw: (read if not tls_eof and len(self.to_plain) < _HIGH_WATER else 0)
                    | (write if self.to_raw else 0),
                }
                for sock, events in wants.items():
                    _watch(selector, sock, events)
                for key, events in selector.select(timeout=_POLL):
                    if key.fileobj is plain:
                        if events & read and not plain_eof:
                            data = _recv(plain)
                            if data == b"":
                                plain_eof = True
                                self._close_notify()
                            elif data:
                                self.tls.write(data)
                                self.to_raw += self.outgoing.read()
                        if events & write and self.to_plain:
                            del self.to_plain[: _send(plain, self.to_plain)]
                    else:
                        if events & read and not tls_eof:
                            data = _recv(raw)
                            if data is not None:
                                if data:
                                    self.incoming.write(data)
                                else:
                                    self.incoming.write_eof()  # without close_notify: SSLEOFError below
                                tls_eof = self._drain()
                        if events & write and self.to_raw:
                            del self.to_raw[: _send(raw, self.to_raw)]


def _watch(selector: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    """Register ``sock`` for exactly ``events``; none unregisters (epoll would report hang-ups forever)."""
    try:
        current = selector.get_key(sock).events
    except KeyError:
        current = 0
    if events == current:
        return
    if not events:
        selector.unregister(sock)
    elif not current:
        selector.register(sock, events)
    else:
        selector.modify(sock, events)


def _recv(sock: socket.socket) -> bytes | None:
    """Bytes, ``b""`` at end of stream, or None when a readiness report was spurious."""
    try:
        return sock.recv(_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None


def _send(sock: socket.socket, data: bytearray) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


class Forwarder:
    """Plain TCP ↔ mutual TLS between services of one session.

    Build one with :meth:`outbound` or :meth:`inbound`, then :meth:`start` it; it serves from
    daemon threads until :meth:`close`. ``refused`` counts connections turned away (failed
    handshakes and peer checks); each is logged at WARNING with its reason.
    """

    def __init__(
        self,
        identity: TlsIdentity,
        listen: tuple[str, int],
        target: tuple[str, int],
        *,
        peer: str | None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        """Use :meth:`outbound` (``peer`` set) or :meth:`inbound` (``peer`` None) instead."""
        _require_loopback(listen if peer is not None else target, "listen address" if peer is not None else "target")
        self._peer = peer
        self._listen = listen
        self._target = target
        self._timeout = handshake_timeout
        self._lock = threading.Lock()
        self._identity, self._context = self._prepare(identity)
        self._refused = 0
        self._closed = False
        self._server: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._threads: set[threading.Thread] = set()
        self._live: set[socket.socket] = set()

    @classmethod
    def outbound(
        cls,
        identity: TlsIdentity,
        listen: tuple[str, int],
        target: tuple[str, int],
        peer: str,
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> Forwarder:
        """Accept plain TCP on ``listen``; carry each connection over mutual TLS to ``peer`` at ``target``.

        The server must prove it is service ``peer`` of this session; otherwise the program's
        connection is reset and the refusal counted.

        Raises:
            ConfigurationError: ``peer`` not in ``identity.peers``, ``listen`` not a loopback
                address, or an unloadable identity.
        """
        return cls(identity, listen, target, peer=peer, handshake_timeout=handshake_timeout)

    @classmethod
    def inbound(
        cls,
        identity: TlsIdentity,
        listen: tuple[str, int],
        target: tuple[str, int],
        *,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> Forwarder:
        """Accept mutual TLS on ``listen`` from this session's peers; pass each connection to ``target`` in plain TCP.

        A client without a certificate of this session naming a service in ``identity.peers``
        is refused before anything reaches the program.

        Raises:
            ConfigurationError: ``target`` not a loopback address, or an unloadable identity.
        """
        return cls(identity, listen, target, peer=None, handshake_timeout=handshake_timeout)

    @property
    def _direction(self) -> str:
        return "inbound" if self._peer is None else "outbound"

    def _prepare(self, identity: TlsIdentity) -> tuple[TlsIdentity, ssl.SSLContext]:
        if self._peer is not None and self._peer not in identity.peers:
            raise ConfigurationError(f"{self._peer!r} is not a peer of {identity.service!r}")
        context = server_context(identity) if self._peer is None else client_context(identity)
        return identity, context

    @property
    def refused(self) -> int:
        """Connections refused so far: failed handshakes (no, foreign or expired certificate) and peer checks."""
        with self._lock:
            return self._refused

    @property
    def address(self) -> tuple[str, int]:
        """The address the forwarder listens on (the real port when ``listen`` asked for port 0).

        Raises:
            ConfigurationError: not started.
        """
        if self._bound is None:
            raise ConfigurationError("the forwarder is not started")
        return self._bound

    def start(self) -> Forwarder:
        """Bind ``listen`` and start accepting in a daemon thread; returns ``self``.

        Raises:
            ConfigurationError: already started or closed, or the address cannot be bound.
        """
        with self._lock:
            if self._closed or self._server is not None:
                raise ConfigurationError("the forwarder was already started or closed: make a new one")
            family = socket.AF_INET6 if ":" in self._listen[0] else socket.AF_INET
            try:
                server = socket.create_server(self._listen, family=family, backlog=128)
            except OSError as exc:
                raise ConfigurationError(f"cannot listen on {self._listen[0]}:{self._listen[1]}: {exc}") from exc
            server.setblocking(False)
            self._server = server
            host, port = server.getsockname()[:2]
            self._bound = (str(host), int(port))
            self._wake = socket.socketpair()
            thread = threading.Thread(
                target=self._accept_loop,
                args=(server, self._wake[0]),
                name=f"sealedml-shield-{self._direction}-{port}",
                daemon=True,
            )
            self._threads.add(thread)
        thread.start()
        return self

    def reload(self, identity: TlsIdentity) -> None:
        """Use a renewed certificate (or peer list) for new connections; live ones keep theirs.

        Raises:
            ConfigurationError: an identity of another session or service, or one that cannot load.
        """
        if (identity.session, identity.service) != (self._identity.session, self._identity.service):
            raise ConfigurationError("reload must keep the session and the service")
        prepared = self._prepare(identity)
        with self._lock:
            self._identity, self._context = prepared

    def close(self, *, drain: float = 0.0) -> None:
        """Stop accepting and reset live connections; waits briefly for the threads. Idempotent.

        ``drain``: first give live connections up to this many seconds to end on their own (a
        program that wrote its last answer and exited must not have that answer cut off).
        """
        if drain > 0:
            with self._lock:
                connections = [t for t in self._threads if t.name.endswith("-conn")]
            deadline = time.monotonic() + drain
            for thread in connections:
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
            threads = [t for t in self._threads if t is not threading.current_thread()]
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the connection's thread, which closes it
        deadline = time.monotonic() + _JOIN
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._wake is not None:
            self._wake[1].close()

    # ------------------------------------------------------------------ threads

    def _closing(self) -> bool:
        return self._closed

    def _track(self, sock: socket.socket) -> bool:
        """Record a live socket so close() can reach it; False once closing (the caller drops it)."""
        with self._lock:
            if self._closed:
                return False
            self._live.add(sock)
            return True

    def _accept_loop(self, server: socket.socket, wake: socket.socket) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(server, selectors.EVENT_READ)
                selector.register(wake, selectors.EVENT_READ)
                while not self._closed:
                    for key, _ in selector.select():
                        if key.fileobj is wake:
                            return
                        self._accept_one(server)
        finally:
            server.close()
            wake.close()

    def _accept_one(self, server: socket.socket) -> None:
        try:
            conn, addr = server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of descriptors, say: do not spin on the ready listener
            log.warning("shield %s: accept failed: %s", self._direction, exc)
            time.sleep(0.1)
            return
        conn.setblocking(True)
        if not self._track(conn):
            conn.close()
            return
        thread = threading.Thread(
            target=self._serve,
            args=(conn, f"{addr[0]}:{addr[1]}"),
            name=f"sealedml-shield-{self._direction}-conn",
            daemon=True,
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _refuse(self, client: str, reason: object) -> None:
        with self._lock:
            if self._closed:
                return  # a connection cut by close() is not a refusal
            self._refused += 1
        log.warning("shield %s: refused connection from %s: %s", self._direction, client, reason)

    def _connect(self, client: str) -> socket.socket | None:
        try:
            sock = socket.create_connection(self._target, timeout=self._timeout)
        except OSError as exc:
            log.warning("shield %s: cannot reach %s:%d for %s: %s", self._direction, *self._target, client, exc)
            return None
        if not self._track(sock):
            sock.close()
            return None
        return sock

    def _secure(self, raw: socket.socket, client: str) -> _Link | None:
        """Handshake and check the peer on ``raw``; None (refusal counted and logged) on failure."""
        with self._lock:
            identity, context = self._identity, self._context
        link = _Link(raw, context, server_side=self._peer is None)
        try:
            link.handshake(self._timeout)
            check_peer(identity, link.tls, expected=self._peer)
        except PeerRefusedError as exc:
            self._refuse(client, exc.message)
            return None
        except (ssl.SSLError, OSError) as exc:  # TimeoutError is an OSError
            link.send_alert()
            self._refuse(client, f"TLS handshake failed: {exc}")
            return None
        return link

    def _serve(self, conn: socket.socket, client: str) -> None:
        plain: socket.socket | None = None
        raw: socket.socket | None = None
        try:
            if self._peer is None:  # inbound: TLS from the peer, plain to the program
                raw = conn
                link = self._secure(raw, client)
                plain = self._connect(client) if link is not None else None
                if link is None or plain is None:
                    return
            else:  # outbound: plain from the program, TLS to the peer
                plain = conn
                raw = self._connect(client)
                link = self._secure(raw, client) if raw is not None else None
                if link is None:
                    _reset(plain)  # the program sees a refused connection as an error, not as EOF
                    return
            try:
                link.pump(plain, self._closing)
            except (ssl.SSLError, OSError) as exc:
                log.info("shield %s: connection from %s ended abnormally: %s", self._direction, client, exc)
                _reset(plain)  # the program must not take a cut stream for a complete one
        finally:
            for sock in (conn, plain, raw):
                if sock is not None:
                    with self._lock:
                        self._live.discard(sock)
                    sock.close()  # a no-op for a socket already reset
            with self._lock:
                self._threads.discard(threading.current_thread())
