"""SECO's server-to-server links: a signed handshake, then every tampered, replayed, reordered,
misdirected, cross-type or foreign message is a typed error and nothing is delivered."""

from __future__ import annotations

import pytest

from sealedml.crypto import HpkeKem, SigningKey
from sealedml.seco.link import Link, LinkError, LinkInitiator, LinkReplayError, LinkResponder, PartyIdentity

A, B, MALLORY = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()


def _pair(session: str = "s1", kem: HpkeKem = HpkeKem.MLKEM768_X25519) -> tuple[Link, Link]:
    initiator = LinkInitiator(A, "A", PartyIdentity("B", B.public_bytes), session, kem)
    reply, at_b = LinkResponder(B, "B", {"A": A.public_bytes}).accept(initiator.hello())
    return initiator.finish(reply), at_b


@pytest.mark.parametrize("kem", [HpkeKem.MLKEM768_X25519, HpkeKem.X25519])
def test_messages_flow_both_ways_in_order(kem: HpkeKem) -> None:
    at_a, at_b = _pair(kem=kem)
    assert at_b.open(at_a.seal("shares", b"one"), "shares") == b"one"
    assert at_b.open(at_a.seal("shares", b"two"), "shares") == b"two"
    assert at_a.open(at_b.seal("labels", b"back"), "labels") == b"back"
    assert at_a.bytes_sent == at_b.bytes_received > 0


def test_the_payload_is_encrypted() -> None:
    at_a, _ = _pair()
    assert b"secret-share" not in at_a.seal("shares", b"secret-share" * 4)


def test_a_replayed_message_is_refused() -> None:
    at_a, at_b = _pair()
    message = at_a.seal("shares", b"x")
    at_b.open(message, "shares")
    with pytest.raises(LinkReplayError):
        at_b.open(message, "shares")


def test_a_reordered_or_dropped_message_is_refused() -> None:
    at_a, at_b = _pair()
    first, second = at_a.seal("shares", b"1"), at_a.seal("shares", b"2")
    with pytest.raises(LinkReplayError):
        at_b.open(second, "shares")
    assert at_b.open(first, "shares") == b"1"  # nothing was consumed by the refusal


@pytest.mark.parametrize("where", [-1, -20, 30])
def test_a_tampered_message_is_refused(where: int) -> None:
    at_a, at_b = _pair()
    message = bytearray(at_a.seal("shares", b"payload" * 10))
    message[where] ^= 1
    with pytest.raises(LinkError):
        at_b.open(bytes(message), "shares")
    with pytest.raises(LinkReplayError):  # the tampered one was never accepted, so seq 1 is early
        at_b.open(at_a.seal("shares", b"next"), "shares")


def test_a_message_of_another_kind_is_refused() -> None:
    at_a, at_b = _pair()
    with pytest.raises(LinkError, match="expected a 'labels' message"):
        at_b.open(at_a.seal("shares", b"x"), "labels")


def test_a_message_from_another_session_or_link_is_refused() -> None:
    at_a, _ = _pair("s1")
    _, other_b = _pair("s2")
    with pytest.raises(LinkError):
        other_b.open(at_a.seal("shares", b"x"), "shares")
    with pytest.raises(LinkError):  # B's own message reflected back to B
        _, at_b = _pair("s3")
        at_b.open(at_b.seal("shares", b"x"), "shares")


def test_a_hello_from_an_unknown_or_impersonated_party_is_refused() -> None:
    responder = LinkResponder(B, "B", {"A": A.public_bytes})
    stranger = LinkInitiator(MALLORY, "M", PartyIdentity("B", B.public_bytes), "s")
    with pytest.raises(LinkError, match="unknown party"):
        responder.accept(stranger.hello())
    impostor = LinkInitiator(MALLORY, "A", PartyIdentity("B", B.public_bytes), "s")  # claims to be A
    with pytest.raises(LinkError, match="not signed by A"):
        responder.accept(impostor.hello())
    misdirected = LinkInitiator(A, "A", PartyIdentity("C", B.public_bytes), "s")
    with pytest.raises(LinkError, match="not for this party"):
        responder.accept(misdirected.hello())


def test_an_accept_not_from_the_expected_peer_is_refused() -> None:
    initiator = LinkInitiator(A, "A", PartyIdentity("B", B.public_bytes), "s")
    hello = initiator.hello()
    forged, _ = LinkResponder(MALLORY, "B", {"A": A.public_bytes}).accept(hello)  # Mallory answers as B
    with pytest.raises(LinkError, match="not signed by B"):
        initiator.finish(forged)
    other_hello = LinkInitiator(A, "A", PartyIdentity("B", B.public_bytes), "s").hello()
    stale, _ = LinkResponder(B, "B", {"A": A.public_bytes}).accept(other_hello)  # B's answer to another hello
    with pytest.raises(LinkError, match="for our hello"):
        initiator.finish(stale)


@pytest.mark.parametrize("garbage", [b"", b"\x00\x00\x00\x05abc", b"\xff" * 100, b"\x00\x00\x00\x02[]"])
def test_malformed_bytes_are_link_errors(garbage: bytes) -> None:
    _, at_b = _pair()
    with pytest.raises(LinkError):
        at_b.open(garbage, "shares")
    with pytest.raises(LinkError):
        LinkResponder(B, "B", {"A": A.public_bytes}).accept(garbage)


def test_seco_error_codes_come_back_typed_from_the_wire() -> None:
    from sealedml.errors import ServiceError, error_from_code
    from sealedml.seco.he.client import HeEngineError

    assert type(error_from_code(LinkReplayError.code, "out of sequence")) is LinkReplayError
    assert type(error_from_code(LinkError.code, "bad")) is LinkError
    # Its constructor needs a kind as well: it comes back as a generic service error, not a crash.
    assert type(error_from_code(HeEngineError.code, "failed")) is ServiceError
