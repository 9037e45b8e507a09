"""Authenticated, encrypted, replay-proof links between SECO parties (no TEE, no TLS needed).

Every SECO party (gateway A, remote servers B and C) has a long-term Ed25519 identity; the
others know its public key (``seco deploy`` writes them into each server's configuration).
Two parties open a link with a two-message handshake:

1. initiator → responder: ``hello`` = (session id, both identities, a fresh HPKE public key —
   hybrid ML-KEM-768 + X25519 by default), signed by the initiator;
2. responder → initiator: ``accept`` = an HPKE ciphertext of a fresh 32-byte secret, sealed to
   that key with the hello's digest as HPKE info, signed over the hello's digest and itself.

Both derive one AES-256-GCM key per direction with HKDF from the secret and the transcript.
Forward secrecy comes from the initiator's one-time HPKE key; post-quantum confidentiality
from the hybrid KEM; authentication from the two signatures over the whole transcript.

Every message afterwards is ``seal(kind, payload)``: the header (sender, receiver, session,
direction, sequence number, kind) is the AEAD's associated data and the nonce is derived
from the sequence number. The receiver accepts only the next sequence number and only the
kind it expects, so a replayed, reordered, dropped, tampered, misdirected or cross-type
message is a :class:`LinkError` — never a silently wrong input to the protocol.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from sealedml.crypto import (
    HpkeKem,
    HpkePrivateKey,
    HpkePublicKey,
    SigningKey,
    aead_decrypt,
    aead_encrypt,
    derive_nonce,
    hkdf_sha256,
    hpke_open,
    hpke_seal,
    random_bytes,
    verify_signature,
)
from sealedml.errors import CryptoError, ProtocolError

__all__ = ["Link", "LinkError", "LinkInitiator", "LinkReplayError", "LinkResponder", "PartyIdentity", "peek"]

_VERSION = b"sealedml-seco-link-v1"
_PREFIX = struct.Struct(">I")
MAX_HEADER = 4096


class LinkError(ProtocolError):
    """A link message that is not authentic, not for us, or not the one expected."""

    code = "seco_link"


class LinkReplayError(LinkError):
    """A message out of sequence: replayed, reordered or after a dropped one."""

    code = "seco_link_replay"


@dataclass(frozen=True)
class PartyIdentity:
    """A party's name and long-term Ed25519 public key."""

    name: str
    public_key: bytes


def _frame(header: Mapping[str, object], body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX.pack(len(raw)) + raw + body


def _unframe(data: bytes) -> tuple[dict[str, object], bytes, bytes]:
    """(header, raw header bytes, body)."""
    if len(data) < _PREFIX.size:
        raise LinkError("truncated link message")
    (length,) = _PREFIX.unpack_from(data)
    if length > MAX_HEADER or len(data) < _PREFIX.size + length:
        raise LinkError("malformed link message header")
    raw = data[_PREFIX.size : _PREFIX.size + length]
    try:
        header = json.loads(raw)
    except ValueError:
        raise LinkError("malformed link message header") from None
    if not isinstance(header, dict):
        raise LinkError("malformed link message header")
    return header, raw, data[_PREFIX.size + length :]


def _field(header: dict[str, object], key: str, kind: type) -> object:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LinkError(f"link message without a valid {key!r}")
    return value


def peek(message: bytes) -> tuple[str, str, str, str]:
    """A sealed message's (sender, receiver, session, kind), unauthenticated: for routing only.

    The receiving :class:`Link` authenticates all three (they are in the AAD).

    Raises:
        LinkError: not a link message.
    """
    header, _, _ = _unframe(message)
    sender, receiver, session, kind = (str(_field(header, key, str)) for key in ("from", "to", "session", "kind"))
    return sender, receiver, session, kind


class Link:
    """One established link, as seen by one end: ``seal`` outgoing, ``open`` incoming messages."""

    def __init__(self, me: str, peer: str, session: str, send_key: bytes, receive_key: bytes) -> None:
        self.me, self.peer, self.session = me, peer, session
        self._keys = {"send": send_key, "receive": receive_key}
        self._next = {"send": 0, "receive": 0}
        self.bytes_sent = 0
        self.bytes_received = 0

    def _aad(self, sender: str, receiver: str, seq: int, kind: str) -> bytes:
        return json.dumps(
            {"from": sender, "to": receiver, "session": self.session, "seq": seq, "kind": kind},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def seal(self, kind: str, payload: bytes) -> bytes:
        """The next outgoing message of ``kind``."""
        seq = self._next["send"]
        self._next["send"] = seq + 1
        aad = self._aad(self.me, self.peer, seq, kind)
        body = aead_encrypt(self._keys["send"], derive_nonce(b"\x00" * 12, seq), payload, aad)
        message = _frame({"from": self.me, "to": self.peer, "session": self.session, "seq": seq, "kind": kind}, body)
        self.bytes_sent += len(message)
        return message

    def open(self, message: bytes, kind: str) -> bytes:
        """The payload of the next incoming message, which must be of ``kind``.

        Raises:
            LinkError: not from the peer, not to us, another session or kind, or tampered.
            LinkReplayError: not the next sequence number (replayed, reordered or after a gap).
        """
        header, _, body = _unframe(message)
        if (header.get("from"), header.get("to"), header.get("session")) != (self.peer, self.me, self.session):
            raise LinkError(f"link message not from {self.peer} to {self.me} in this session")
        seq = _field(header, "seq", int)
        if header.get("kind") != kind:
            raise LinkError(f"expected a {kind!r} message from {self.peer}, got another kind")
        if seq != self._next["receive"]:
            raise LinkReplayError(f"message {seq} from {self.peer} out of sequence (expected {self._next['receive']})")
        try:
            payload = aead_decrypt(
                self._keys["receive"], derive_nonce(b"\x00" * 12, seq), body, self._aad(self.peer, self.me, seq, kind)
            )
        except CryptoError:
            raise LinkError(f"link message from {self.peer} failed authentication") from None
        self._next["receive"] = seq + 1
        self.bytes_received += len(message)
        return payload


def _keys(secret: bytes, transcript: bytes, initiator: str, responder: str) -> tuple[bytes, bytes]:
    """(initiator→responder key, responder→initiator key)."""
    salt = hashlib.sha256(transcript).digest()
    forward = hkdf_sha256(secret, salt=salt, info=_VERSION + f"|{initiator}->{responder}".encode())
    backward = hkdf_sha256(secret, salt=salt, info=_VERSION + f"|{responder}->{initiator}".encode())
    return forward, backward


class LinkInitiator:
    """The side that opens a link: ``hello()``, then ``finish(accept)`` → :class:`Link`."""

    def __init__(
        self, me: SigningKey, my_name: str, peer: PartyIdentity, session: str, kem: HpkeKem = HpkeKem.MLKEM768_X25519
    ) -> None:
        self._me, self._name, self._peer, self._session = me, my_name, peer, session
        self._ephemeral = HpkePrivateKey(kem)
        self._hello: bytes | None = None

    def hello(self) -> bytes:
        header = {
            "v": _VERSION.decode(),
            "from": self._name,
            "to": self._peer.name,
            "session": self._session,
            "hpke": self._ephemeral.public_key.to_bytes().hex(),
        }
        unsigned = _frame(header, b"")
        self._hello = unsigned + self._me.sign(unsigned)
        return self._hello

    def finish(self, accept: bytes) -> Link:
        """Raises: LinkError — not signed by the expected peer, or not sealed to our key."""
        if self._hello is None:
            raise LinkError("hello() first")
        header, raw, signature = _unframe(accept)
        digest = hashlib.sha256(self._hello).hexdigest()
        if header.get("hello") != digest or header.get("from") != self._peer.name:
            raise LinkError(f"link accept not from {self._peer.name} for our hello")
        try:
            verify_signature(self._peer.public_key, signature, _PREFIX.pack(len(raw)) + raw)
        except CryptoError:
            raise LinkError(f"link accept not signed by {self._peer.name}") from None
        try:
            secret = hpke_open(self._ephemeral, bytes.fromhex(str(header.get("sealed", ""))), self._hello)
        except (CryptoError, ValueError):
            raise LinkError("link accept not sealed to this handshake") from None
        forward, backward = _keys(secret, self._hello + accept, self._name, self._peer.name)
        return Link(self._name, self._peer.name, self._session, forward, backward)


class LinkResponder:
    """The side that accepts links from known peers: ``accept(hello)`` → (reply, :class:`Link`)."""

    def __init__(self, me: SigningKey, my_name: str, peers: dict[str, bytes]) -> None:
        self._me, self._name, self._peers = me, my_name, dict(peers)

    def accept(self, hello: bytes) -> tuple[bytes, Link]:
        """Raises: LinkError — an unknown peer, a bad signature, or a hello not for us."""
        if len(hello) < 64:
            raise LinkError("truncated link hello")
        unsigned, signature = hello[:-64], hello[-64:]
        header, _, rest = _unframe(unsigned)
        if rest:
            raise LinkError("malformed link hello")
        peer = header.get("from")
        if not isinstance(peer, str) or peer not in self._peers:
            raise LinkError("link hello from an unknown party")
        try:
            verify_signature(self._peers[peer], signature, unsigned)
        except CryptoError:
            raise LinkError(f"link hello not signed by {peer}") from None
        if header.get("to") != self._name or header.get("v") != _VERSION.decode():
            raise LinkError("link hello not for this party")
        session = str(_field(header, "session", str))
        try:
            ephemeral = HpkePublicKey.from_bytes(bytes.fromhex(str(_field(header, "hpke", str))))
        except (CryptoError, ValueError):
            raise LinkError("link hello with an unusable HPKE key") from None
        secret = random_bytes(32)
        sealed = hpke_seal(ephemeral, secret, hello)
        reply_header = {"from": self._name, "hello": hashlib.sha256(hello).hexdigest(), "sealed": sealed.hex()}
        unsigned_reply = _frame(reply_header, b"")
        reply = unsigned_reply + self._me.sign(unsigned_reply)
        forward, backward = _keys(secret, hello + reply, peer, self._name)
        return reply, Link(self._name, peer, session, backward, forward)
