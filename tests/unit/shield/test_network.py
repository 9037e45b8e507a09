"""The network shield over real loopback sockets: who gets through, who is refused, and how streams end."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealedml.errors import ConfigurationError
from sealedml.sessions.ca import SessionCA
from sealedml.shield.network import Forwarder, PeerRefusedError, TlsIdentity, check_peer, client_context, server_context

SESSION = "acme/trainer"
LOOPBACK = ("127.0.0.1", 0)
WAIT = 5.0  # seconds; nothing here should take more than a fraction of it


@pytest.fixture(scope="module")
def ca() -> SessionCA:
    return SessionCA.create(SESSION)


def identity(
    ca: SessionCA,
    service: str,
    peers: set[str],
    *,
    trust: SessionCA | None = None,
    now: datetime | None = None,
    lifetime: timedelta = timedelta(hours=1),
) -> TlsIdentity:
    """``service``'s identity, its certificate from ``ca``; ``trust`` is the CA it trusts (default ``ca``)."""
    moment = now or datetime.now(UTC)
    issued = ca.issue(service, not_after=moment + lifetime, now=moment)
    return TlsIdentity(ca.session, service, (trust or ca).cert_pem, issued.cert_pem, issued.key_pem, frozenset(peers))


def expired(ca: SessionCA, service: str, peers: set[str], *, trust: SessionCA | None = None) -> TlsIdentity:
    past = datetime.now(UTC) - timedelta(hours=2)
    return identity(ca, service, peers, trust=trust, now=past)


def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.005)


class Echo:
    """The program behind an inbound forwarder: echoes until end of stream, then ends its own."""

    def __init__(self) -> None:
        self.server = socket.create_server(LOOPBACK)
        self.server.settimeout(0.1)
        self.accepted = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.getsockname()[:2]
        return host, port

    def _run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping = True
        self.thread.join(WAIT)
        self.server.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    """Forwarders a test starts; all closed at the end, so none outlives its test."""
    started: list[Forwarder] = []
    yield started
    for forwarder in started:
        forwarder.close()


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` then end the stream; return all that comes back before the other end does."""
    with connect(address) as sock:

        def write() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        received = bytearray()
        while data := sock.recv(65536):
            received += data
        writer.join(WAIT)
    return bytes(received)


def read_outcome(sock: socket.socket) -> str:
    """How a stream ends for the program: 'reset', 'eof' (clean end) or 'tls-error'."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    except ssl.SSLError:
        return "tls-error"
    return "eof"


def pair(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder], *, server: TlsIdentity, client: TlsIdentity, peer: str
) -> tuple[Forwarder, Forwarder]:
    inbound = Forwarder.inbound(server, LOOPBACK, echo.address).start()
    outbound = Forwarder.outbound(client, LOOPBACK, inbound.address, peer).start()
    forwarders += [inbound, outbound]
    return outbound, inbound


# ------------------------------------------------------------------ the path that works


def test_two_services_of_a_session_exchange_bytes_both_ways(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder]
) -> None:
    outbound, inbound = pair(
        ca,
        echo,
        forwarders,
        server=identity(ca, "server", {"client"}),
        client=identity(ca, "client", {"server"}),
        peer="server",
    )
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the forwarders buffer
    # The echo only ends its stream after ours has ended: both half-closes crossed the shield.
    assert exchange(outbound.address, payload) == payload
    assert exchange(outbound.address, b"") == b""  # an empty stream ends cleanly too
    assert outbound.refused == inbound.refused == 0
    assert echo.accepted == 2


def test_a_server_that_speaks_first_reaches_the_client(ca: SessionCA, forwarders: list[Forwarder]) -> None:
    program = socket.create_server(LOOPBACK)
    program.settimeout(WAIT)

    def greet() -> None:
        conn, _ = program.accept()
        with conn:
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(WAIT)
            conn.recv(1)

    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    inbound = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, program.getsockname()).start()
    outbound = Forwarder.outbound(identity(ca, "client", {"server"}), LOOPBACK, inbound.address, "server").start()
    forwarders += [inbound, outbound]
    with connect(outbound.address) as sock:
        received = b""
        while data := sock.recv(100):
            received += data
        assert received == b"hello"
    thread.join(WAIT)
    program.close()


# ------------------------------------------------------------------ who is refused


def test_the_services_of_two_sessions_refuse_each_other(ca: SessionCA, echo: Echo, forwarders: list[Forwarder]) -> None:
    other = SessionCA.create("globex/trainer")
    outbound, inbound = pair(
        ca,
        echo,
        forwarders,
        server=identity(other, "server", {"client"}),
        client=identity(ca, "client", {"server"}),
        peer="server",
    )
    with connect(outbound.address) as sock:
        assert read_outcome(sock) == "reset"
    eventually(lambda: outbound.refused == 1 and inbound.refused == 1)
    assert echo.accepted == 0


def test_inbound_refuses_a_client_certificate_of_an_impostor_ca(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    """A CA made for the same session name by someone else: the URI matches, the signature does not."""
    impostor = SessionCA.create(SESSION)
    inbound = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, echo.address).start()
    forwarders.append(inbound)
    # It trusts the real CA, so it gets as far as presenting its certificate.
    intruder = identity(impostor, "client", {"server"}, trust=ca)
    context = client_context(intruder)
    with caplog.at_level(logging.WARNING, logger="sealedml.shield.network"):
        with context.wrap_socket(connect(inbound.address)) as tls:
            assert read_outcome(tls) in {"tls-error", "eof", "reset"}
        eventually(lambda: inbound.refused == 1)
    assert echo.accepted == 0
    assert "refused connection" in caplog.text and "certificate" in caplog.text
    assert "PRIVATE" not in caplog.text


def test_outbound_refuses_a_server_certificate_of_an_impostor_ca(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder]
) -> None:
    impostor = SessionCA.create(SESSION)
    outbound, inbound = pair(
        ca,
        echo,
        forwarders,
        server=identity(impostor, "server", {"client"}, trust=ca),  # would accept our client
        client=identity(ca, "client", {"server"}),
        peer="server",
    )
    with connect(outbound.address) as sock:
        assert read_outcome(sock) == "reset"  # an error for the program, not an empty answer
    eventually(lambda: outbound.refused == 1)
    assert echo.accepted == 0


def test_a_certificate_of_the_session_ca_naming_another_session_is_refused(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder]
) -> None:
    """Even a certificate the right CA signed is refused if it names another session."""
    inbound = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, echo.address).start()
    forwarders.append(inbound)
    # A CA object for another session name over the same key: only the test can build one.
    twisted = object.__new__(SessionCA)
    object.__setattr__(twisted, "session", "acme/other")
    object.__setattr__(twisted, "cert_pem", ca.cert_pem)
    object.__setattr__(twisted, "key_pem", ca.key_pem)
    stranger = identity(twisted, "client", {"server"})
    with client_context(stranger).wrap_socket(connect(inbound.address)) as tls:
        assert read_outcome(tls) in {"eof", "reset", "tls-error"}
    eventually(lambda: inbound.refused == 1)
    assert echo.accepted == 0


def test_a_service_of_the_session_outside_the_peer_list_is_refused(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sealedml.shield.network"):
        outbound, inbound = pair(
            ca,
            echo,
            forwarders,
            server=identity(ca, "server", {"client"}),
            client=identity(ca, "intruder", {"server"}),
            peer="server",
        )
        with connect(outbound.address) as sock:
            assert read_outcome(sock) in {"eof", "reset"}
        eventually(lambda: inbound.refused == 1)
    assert outbound.refused == 0 and echo.accepted == 0
    assert "'intruder'" in caplog.text and "not a peer of 'server'" in caplog.text


def test_outbound_needs_its_peer_in_the_peer_list(ca: SessionCA) -> None:
    with pytest.raises(ConfigurationError, match="not a peer"):
        Forwarder.outbound(identity(ca, "client", {"db"}), LOOPBACK, ("127.0.0.1", 9), "server")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.7", "::", "example.org"])
def test_the_plain_tcp_end_must_stay_on_loopback(ca: SessionCA, host: str) -> None:
    """A plain port the host can reach would let it speak as this service, or read plaintext."""
    with pytest.raises(ConfigurationError, match="loopback"):
        Forwarder.outbound(identity(ca, "client", {"server"}), (host, 0), ("10.0.0.7", 7443), "server")
    with pytest.raises(ConfigurationError, match="loopback"):
        Forwarder.inbound(identity(ca, "server", {"client"}), ("0.0.0.0", 0), (host, 8080))
    # The TLS ends may be anywhere: that is what TLS is for.
    Forwarder.outbound(identity(ca, "client", {"server"}), ("::1", 0), (host, 7443), "server").close()
    Forwarder.inbound(identity(ca, "server", {"client"}), (host, 0), ("localhost", 8080)).close()


def test_outbound_refuses_a_server_that_is_another_service_than_its_peer(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sealedml.shield.network"):
        outbound, inbound = pair(
            ca,
            echo,
            forwarders,
            server=identity(ca, "database", {"client"}),
            client=identity(ca, "client", {"server", "database"}),  # both are peers; it asked for "server"
            peer="server",
        )
        with connect(outbound.address) as sock:
            assert read_outcome(sock) == "reset"
        eventually(lambda: outbound.refused == 1)
    # The database may have accepted (the client is its peer), but no byte was sent to it.
    assert inbound.refused == 0
    assert "service 'database'" in caplog.text and "not 'server'" in caplog.text


def test_inbound_refuses_a_client_without_a_certificate(ca: SessionCA, echo: Echo, forwarders: list[Forwarder]) -> None:
    inbound = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, echo.address).start()
    forwarders.append(inbound)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.cert_pem.decode())
    with context.wrap_socket(connect(inbound.address)) as tls:
        assert read_outcome(tls) in {"tls-error", "eof", "reset"}
    eventually(lambda: inbound.refused == 1)
    assert echo.accepted == 0


def test_a_plain_tcp_client_is_refused_by_inbound(ca: SessionCA, echo: Echo, forwarders: list[Forwarder]) -> None:
    inbound = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, echo.address).start()
    forwarders.append(inbound)
    with connect(inbound.address) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        read_outcome(sock)
    eventually(lambda: inbound.refused == 1)
    assert echo.accepted == 0


def test_a_stalled_handshake_is_refused_after_the_timeout(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder]
) -> None:
    inbound = Forwarder.inbound(
        identity(ca, "server", {"client"}), LOOPBACK, echo.address, handshake_timeout=0.2
    ).start()
    forwarders.append(inbound)
    with connect(inbound.address) as sock:  # connects, then says nothing
        assert read_outcome(sock) in {"eof", "reset"}
    assert inbound.refused == 1


@pytest.mark.parametrize("side", ["client", "server"])
def test_an_expired_certificate_is_refused(ca: SessionCA, echo: Echo, forwarders: list[Forwarder], side: str) -> None:
    server = (expired if side == "server" else identity)(ca, "server", {"client"})
    client = (expired if side == "client" else identity)(ca, "client", {"server"})
    outbound, inbound = pair(ca, echo, forwarders, server=server, client=client, peer="server")
    with connect(outbound.address) as sock:
        sock.sendall(b"x")
        assert read_outcome(sock) in {"eof", "reset"}
    refusing = inbound if side == "client" else outbound
    eventually(lambda: refusing.refused == 1)
    assert echo.accepted == 0


# ------------------------------------------------------------------ renewals, endings, hygiene


def _served_certificate(address: tuple[str, int], client: TlsIdentity) -> bytes:
    with client_context(client).wrap_socket(connect(address)) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_reload_makes_new_connections_use_the_new_certificate(
    ca: SessionCA, echo: Echo, forwarders: list[Forwarder]
) -> None:
    first, second = identity(ca, "server", {"client"}), identity(ca, "server", {"client"})
    inbound = Forwarder.inbound(first, LOOPBACK, echo.address).start()
    stale_client = expired(ca, "client", {"server"})
    outbound = Forwarder.outbound(stale_client, LOOPBACK, inbound.address, "server").start()
    forwarders += [inbound, outbound]
    client = identity(ca, "client", {"server"})

    def der(pem: bytes) -> bytes:
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    assert _served_certificate(inbound.address, client) == der(first.cert_pem)
    inbound.reload(second)
    assert _served_certificate(inbound.address, client) == der(second.cert_pem)

    # The outbound side's lapsed certificate is refused until its renewal is loaded.
    with connect(outbound.address) as sock:
        sock.sendall(b"x")
        read_outcome(sock)
    eventually(lambda: inbound.refused == 1)
    outbound.reload(client)
    assert exchange(outbound.address, b"renewed") == b"renewed"


def test_reload_keeps_the_session_and_service(ca: SessionCA, echo: Echo) -> None:
    inbound = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, echo.address)
    with pytest.raises(ConfigurationError, match="keep the session and the service"):
        inbound.reload(identity(ca, "database", {"client"}))


def test_a_tls_stream_cut_without_close_notify_resets_the_program(ca: SessionCA, forwarders: list[Forwarder]) -> None:
    """The host can cut TCP; the program must see an error, not a shorter but complete answer."""
    server_id = identity(ca, "server", {"client"})
    listener = socket.create_server(LOOPBACK)
    listener.settimeout(WAIT)

    def serve_then_cut() -> None:
        conn, _ = listener.accept()
        with server_context(server_id).wrap_socket(conn, server_side=True) as tls:
            check_peer(server_id, tls)
            tls.sendall(b"partial")
            time.sleep(0.05)
            # SSLSocket.close() sends no close_notify: the TCP stream just ends.

    thread = threading.Thread(target=serve_then_cut, daemon=True)
    thread.start()
    outbound = Forwarder.outbound(
        identity(ca, "client", {"server"}), LOOPBACK, listener.getsockname(), "server"
    ).start()
    forwarders.append(outbound)
    with connect(outbound.address) as sock:
        assert read_outcome(sock) == "reset"
    thread.join(WAIT)
    listener.close()
    assert outbound.refused == 0


def test_close_ends_live_connections_and_is_idempotent(ca: SessionCA, echo: Echo) -> None:
    inbound = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, echo.address).start()
    outbound = Forwarder.outbound(identity(ca, "client", {"server"}), LOOPBACK, inbound.address, "server").start()
    with connect(outbound.address) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        address = outbound.address
        outbound.close()
        inbound.close()
        assert read_outcome(sock) in {"eof", "reset"}
    outbound.close()
    assert inbound.refused == outbound.refused == 0  # connections cut by close() are not refusals
    with pytest.raises(OSError):
        connect(address)  # no longer listening
    with pytest.raises(ConfigurationError):
        outbound.start()


def test_address_needs_a_started_forwarder(ca: SessionCA) -> None:
    forwarder = Forwarder.inbound(identity(ca, "server", {"client"}), LOOPBACK, ("127.0.0.1", 9))
    with pytest.raises(ConfigurationError, match="not started"):
        _ = forwarder.address
    forwarder.close()


def _memory_handshake(server: ssl.SSLObject, client: ssl.SSLObject, wires: list[ssl.MemoryBIO]) -> None:
    """Run a handshake between two in-memory TLS objects (wires: server in/out, client in/out)."""
    server_in, server_out, client_in, client_out = wires
    done: set[str] = set()
    for _ in range(20):
        for name, tls in (("client", client), ("server", server)):
            if name not in done:
                try:
                    tls.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if done == {"client", "server"}:
            return
    pytest.fail("the in-memory handshake did not finish")


def test_check_peer_refuses_without_a_completed_handshake_or_a_certificate(ca: SessionCA) -> None:
    me = identity(ca, "server", {"client"})
    context = server_context(me)
    wires = [ssl.MemoryBIO() for _ in range(4)]
    with pytest.raises(PeerRefusedError, match="not complete"):
        check_peer(me, context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True))
    # A server context loosened by hand (ours never are) lets a client in without a certificate.
    context.verify_mode = ssl.CERT_NONE
    server = context.wrap_bio(wires[0], wires[1], server_side=True)
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.cert_pem.decode())
    client = anonymous.wrap_bio(wires[2], wires[3])
    _memory_handshake(server, client, wires)
    with pytest.raises(PeerRefusedError, match="no certificate"):
        check_peer(me, server)


def test_an_identity_must_hold_its_own_certificate(ca: SessionCA) -> None:
    issued = ca.issue("database", not_after=datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(ConfigurationError, match="names service 'database'"):
        TlsIdentity(SESSION, "server", ca.cert_pem, issued.cert_pem, issued.key_pem, frozenset({"client"}))
    with pytest.raises(ConfigurationError):
        TlsIdentity(SESSION, "database", ca.cert_pem, issued.cert_pem, issued.key_pem, frozenset({"Bad Name"}))


def test_a_key_that_is_not_the_certificates_cannot_be_loaded(ca: SessionCA) -> None:
    a, b = identity(ca, "server", {"client"}), identity(ca, "server", {"client"})
    mixed = TlsIdentity(SESSION, "server", ca.cert_pem, a.cert_pem, b.key_pem, frozenset({"client"}))
    with pytest.raises(ConfigurationError, match="cannot load") as info:
        server_context(mixed)
    assert "PRIVATE" not in info.value.message


def test_repr_never_shows_key_material(ca: SessionCA) -> None:
    me = identity(ca, "server", {"client", "db"})
    text = repr(me)
    assert text == "TlsIdentity(session='acme/trainer', service='server', peers=['client', 'db'])"
    assert me.key_pem.decode() not in text and "PRIVATE" not in text


def test_contexts_require_tls13_and_a_peer_certificate(ca: SessionCA) -> None:
    me = identity(ca, "server", {"client"})
    for context in (server_context(me), client_context(me)):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", f"SealedML session {SESSION}"),),)]
    assert not client_context(me).check_hostname
