"""Oblivious transfer of 128-bit labels: Chou–Orlandi base OT, IKNP extension.

Message-based: every round is a method that returns the bytes to send and a
method that consumes the peer's bytes, so a transport can carry them between
processes later. Nothing here opens a socket. Semi-honest security only (see
``docs/decisions/0009-in-house-garbled-circuits.md``).

**Base OT** — "the simplest OT" (Chou–Orlandi 2015) in the prime-order subgroup
of Ed25519: the sender publishes ``A = aG``; for choice ``c`` the receiver sends
``B = bG + cA``; keys are ``k₀ = H(aB)``, ``k₁ = H(a(B − A))`` on the sender's
side and ``k_c = H(bA)`` on the receiver's. ``H`` hashes the transcript (session,
OT index, ``A``, ``B``, shared point), so keys of different OTs or sessions
never coincide. Every peer point is checked (:func:`~._primitives.check_point`).

**Extension** — IKNP (Ishai–Kilian–Nissim–Petrank 2003) with κ = 128. Roles swap:
the extension *receiver* (who chooses) is the base-OT *sender*; the extension
*sender* picks a secret ``s`` as its base-OT choices. The receiver expands each
seed pair with AES-CTR into columns ``t_i = G(k_i⁰)``, sends
``u_i = t_i ⊕ G(k_i¹) ⊕ r``; the sender forms ``q_i = G(k_i^{s_i}) ⊕ s_i·u_i``,
so rows satisfy ``q_j = t_j ⊕ r_j·s`` and it sends
``y_j^b = x_j^b ⊕ H(q_j ⊕ b·s, j)``. ``H`` is the fixed-key AES hash (tweak: the
row and the batch). One base-OT phase serves any number of batches; batches
are numbered and must be answered in order.

Round order for one link (chooser R, sender S)::

    R.base_message()  ─►  S.base_reply(msg)  ─►  R.finish_base(reply)
    R.request(choices) ─►  S.respond(request, x0, x1)  ─►  R.receive(response)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from sealedml.crypto.random import random_bytes as os_random_bytes
from sealedml.seco.gc._primitives import (
    LABEL_BYTES,
    LABEL_DTYPE,
    OT_HASH_KEY,
    POINT_BYTES,
    Blocks,
    FixedKeyHash,
    RandomBytes,
    check_point,
    point_add,
    point_base_mul,
    point_mul,
    point_sub,
    prg,
    random_scalar,
    transcript_hash,
)
from sealedml.seco.gc.errors import GcInputError, GcProtocolError, InvalidPointError, MessageFormatError

__all__ = [
    "KAPPA",
    "BaseOtReceiver",
    "BaseOtSender",
    "OtExtensionReceiver",
    "OtExtensionSender",
    "base_ot_decrypt",
    "base_ot_encrypt",
]

KAPPA = 128
"""Base OTs per IKNP link: the computational security parameter."""

_BASE_DOMAIN = b"sealedml/seco/gc/base-ot/v1"
_REQUEST_HEADER = struct.Struct("<II")  # batch number, number of OTs


def _choice_bits(choices: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    bits = np.asarray(choices)
    if bits.ndim != 1 or bits.size == 0 or bits.dtype.kind not in "iub" or np.any((bits != 0) & (bits != 1)):
        raise GcInputError("choices must be a non-empty 1-D array of 0/1")
    return bits.astype(np.uint8)


def _key(session: bytes, index: int, a_point: bytes, b_point: bytes, shared: bytes) -> bytes:
    return transcript_hash(_BASE_DOMAIN, session, struct.pack("<I", index), a_point, b_point, shared)[:LABEL_BYTES]


class BaseOtSender:
    """Chou–Orlandi sender of ``count`` OTs; speaks first and ends with two keys per OT."""

    def __init__(self, count: int, session: bytes = b"", random_bytes: RandomBytes = os_random_bytes) -> None:
        if count <= 0:
            raise GcInputError("run at least one OT")
        self._count = count
        self._session = session
        self._secret = random_scalar(random_bytes)
        self._public = point_base_mul(self._secret)

    def first_message(self) -> bytes:
        """``A = aG`` (32 bytes)."""
        return self._public

    def keys(self, reply: bytes) -> tuple[list[bytes], list[bytes]]:
        """Both 16-byte keys of every OT from the receiver's reply.

        Raises:
            MessageFormatError: the reply is not ``count`` points.
            InvalidPointError: a point is invalid, small-order or equal to ``A``.
        """
        if len(reply) != self._count * POINT_BYTES:
            raise MessageFormatError(f"base-OT reply has {len(reply)} bytes, expected {self._count * POINT_BYTES}")
        a_times_a = point_mul(self._secret, self._public)
        keys0: list[bytes] = []
        keys1: list[bytes] = []
        for i in range(self._count):
            b_point = reply[i * POINT_BYTES : (i + 1) * POINT_BYTES]
            check_point(b_point)
            if b_point == self._public:  # B − A would be the identity: a key everyone knows
                raise InvalidPointError("base-OT reply point equals the sender's point")
            shared0 = point_mul(self._secret, b_point)
            shared1 = point_sub(shared0, a_times_a)  # a(B − A) = aB − aA, one multiplication per OT
            keys0.append(_key(self._session, i, self._public, b_point, shared0))
            keys1.append(_key(self._session, i, self._public, b_point, shared1))
        return keys0, keys1


class BaseOtReceiver:
    """Chou–Orlandi receiver with one choice bit per OT; ends with the chosen key of each."""

    def __init__(
        self, choices: npt.ArrayLike, session: bytes = b"", random_bytes: RandomBytes = os_random_bytes
    ) -> None:
        self._choices = _choice_bits(choices)
        self._session = session
        self._random_bytes = random_bytes
        self._keys: list[bytes] | None = None

    def reply(self, first_message: bytes) -> bytes:
        """One point ``B_i`` per OT, given the sender's ``A``.

        Raises:
            GcProtocolError: called twice.
            MessageFormatError: the message is not 32 bytes.
            InvalidPointError: ``A`` is not a valid prime-order point.
        """
        if self._keys is not None:
            raise GcProtocolError("base-OT reply already sent")
        if len(first_message) != POINT_BYTES:
            raise MessageFormatError(f"base-OT first message has {len(first_message)} bytes, expected {POINT_BYTES}")
        check_point(first_message)
        points: list[bytes] = []
        keys: list[bytes] = []
        for i, choice in enumerate(self._choices.tolist()):
            secret = random_scalar(self._random_bytes)
            b_times_g = point_base_mul(secret)
            # Both candidates are computed so the work does not depend on the choice.
            candidates = (b_times_g, point_add(first_message, b_times_g))
            b_point = candidates[choice]
            points.append(b_point)
            keys.append(_key(self._session, i, first_message, b_point, point_mul(secret, first_message)))
        self._keys = keys
        return b"".join(points)

    def keys(self) -> list[bytes]:
        """The 16-byte key ``k_{c_i}`` of every OT.

        Raises:
            GcProtocolError: :meth:`reply` has not run yet.
        """
        if self._keys is None:
            raise GcProtocolError("base-OT keys exist only after the reply")
        return list(self._keys)


def base_ot_encrypt(keys0: Sequence[bytes], keys1: Sequence[bytes], m0: Blocks, m1: Blocks) -> bytes:
    """Chosen-message base OT: ``(m0_i ⊕ k0_i, m1_i ⊕ k1_i)`` for 16-byte messages; each key pads once.

    Raises:
        GcInputError: message and key counts differ.
    """
    if not len(keys0) == len(keys1) == len(m0) == len(m1) or m0.shape[1:] != (2,) or m1.shape != m0.shape:
        raise GcInputError("need one (m0, m1) pair of 16-byte blocks per key pair")
    pads0 = np.frombuffer(b"".join(keys0), dtype=LABEL_DTYPE).reshape(-1, 2)
    pads1 = np.frombuffer(b"".join(keys1), dtype=LABEL_DTYPE).reshape(-1, 2)
    return np.stack((m0 ^ pads0, m1 ^ pads1), axis=1).astype(LABEL_DTYPE).tobytes()


def base_ot_decrypt(keys: Sequence[bytes], choices: npt.ArrayLike, ciphertext: bytes) -> Blocks:
    """The chosen message of each OT from :func:`base_ot_encrypt`'s output.

    Raises:
        MessageFormatError: the ciphertext is not two blocks per key.
    """
    bits = _choice_bits(choices)
    if len(ciphertext) != 2 * LABEL_BYTES * len(keys) or len(bits) != len(keys):
        raise MessageFormatError(f"base-OT ciphertext has {len(ciphertext)} bytes, expected {32 * len(keys)}")
    pairs = np.frombuffer(ciphertext, dtype=LABEL_DTYPE).reshape(-1, 2, 2)
    pads = np.frombuffer(b"".join(keys), dtype=LABEL_DTYPE).reshape(-1, 2)
    return pairs[np.arange(len(keys)), bits.astype(np.intp)] ^ pads


def _columns(seeds: Sequence[bytes], batch: int, n_bytes: int) -> npt.NDArray[np.uint8]:
    """``(κ, n_bytes)``: the PRG expansion of each seed for one batch."""
    return np.frombuffer(b"".join(prg(seed, batch, n_bytes) for seed in seeds), dtype=np.uint8).reshape(
        len(seeds), n_bytes
    )


def _rows(columns: npt.NDArray[np.uint8], m: int) -> Blocks:
    """Transpose a ``(κ, ⌈m/8⌉)`` bit matrix into ``m`` 128-bit rows (row ``j`` bit ``i`` = column ``i`` bit ``j``)."""
    bits = np.unpackbits(columns, axis=1, count=m, bitorder="little")
    packed = np.packbits(np.ascontiguousarray(bits.T), axis=1, bitorder="little")
    return packed.view(LABEL_DTYPE).reshape(m, 2)


def _hash_rows(hash_: FixedKeyHash, rows: Blocks, batch: int) -> Blocks:
    tweak = np.empty_like(rows)
    tweak[:, 0] = np.arange(len(rows), dtype=LABEL_DTYPE)
    tweak[:, 1] = batch
    return hash_(rows, tweak)


class OtExtensionReceiver:
    """IKNP chooser (SECO's A for its share and mask, C for its share): many OTs from κ base OTs."""

    def __init__(self, session: bytes = b"", random_bytes: RandomBytes = os_random_bytes) -> None:
        self._base = BaseOtSender(KAPPA, session, random_bytes)
        self._seeds: tuple[list[bytes], list[bytes]] | None = None
        self._batch = 0
        self._pending: tuple[npt.NDArray[np.uint8], Blocks] | None = None

    def base_message(self) -> bytes:
        """Round 1 of the base OTs (this side is their sender)."""
        return self._base.first_message()

    def finish_base(self, reply: bytes) -> None:
        """Consume the extension sender's base-OT reply; derives the κ seed pairs.

        Raises:
            MessageFormatError, InvalidPointError: the reply is malformed.
        """
        self._seeds = self._base.keys(reply)

    def request(self, choices: npt.ArrayLike) -> bytes:
        """Start a batch of ``m = len(choices)`` OTs: header ``(batch, m)`` then the κ columns ``u_i``.

        Raises:
            GcProtocolError: base OTs unfinished, or the previous batch is still open.
            GcInputError: choices are not 0/1.
        """
        if self._seeds is None or self._pending is not None:
            raise GcProtocolError("request needs finished base OTs and no open batch")
        bits = _choice_bits(choices)
        m, n_bytes = len(bits), (len(bits) + 7) // 8
        packed = np.packbits(bits, bitorder="little")
        t_cols = _columns(self._seeds[0], self._batch, n_bytes)
        u_cols = t_cols ^ _columns(self._seeds[1], self._batch, n_bytes) ^ packed[None, :]
        self._pending = (bits, _rows(t_cols, m))
        return _REQUEST_HEADER.pack(self._batch, m) + u_cols.tobytes()

    def receive(self, response: bytes) -> Blocks:
        """The chosen 16-byte message of every OT of the open batch, as ``(m, 2)`` uint64.

        Raises:
            GcProtocolError: no batch is open.
            MessageFormatError: the response is not two blocks per OT.
        """
        if self._pending is None:
            raise GcProtocolError("no OT batch is open")
        bits, t_rows = self._pending
        m = len(bits)
        if len(response) != 2 * LABEL_BYTES * m:
            raise MessageFormatError(f"OT response has {len(response)} bytes, expected {2 * LABEL_BYTES * m}")
        pairs = np.frombuffer(response, dtype=LABEL_DTYPE).reshape(m, 2, 2)
        chosen = pairs[np.arange(m), bits.astype(np.intp)]
        out = chosen ^ _hash_rows(FixedKeyHash(OT_HASH_KEY), t_rows, self._batch)
        self._pending = None
        self._batch += 1
        return out


class OtExtensionSender:
    """IKNP sender (SECO's garbler B): transfers label pairs, learns nothing of the choices."""

    def __init__(self, session: bytes = b"", random_bytes: RandomBytes = os_random_bytes) -> None:
        secret = np.unpackbits(np.frombuffer(random_bytes(KAPPA // 8), dtype=np.uint8), bitorder="little")
        self._s_bits = secret
        self._s_block = np.packbits(secret, bitorder="little").view(LABEL_DTYPE).reshape(1, 2)
        self._base = BaseOtReceiver(secret, session, random_bytes)
        self._seeds: list[bytes] | None = None
        self._batch = 0

    def base_reply(self, base_message: bytes) -> bytes:
        """Round 2 of the base OTs (this side is their receiver, choosing ``s``).

        Raises:
            MessageFormatError, InvalidPointError: the chooser's point is malformed or invalid.
            GcProtocolError: called twice.
        """
        reply = self._base.reply(base_message)
        self._seeds = self._base.keys()
        return reply

    def respond(self, request: bytes, m0: Blocks, m1: Blocks) -> bytes:
        """Answer a batch request with ``(y_j⁰, y_j¹)`` per OT.

        Args:
            request: the chooser's :meth:`OtExtensionReceiver.request` bytes.
            m0, m1: ``(m, 2)`` uint64 messages for choice 0 and 1.

        Raises:
            GcProtocolError: base OTs unfinished.
            MessageFormatError: wrong header, batch out of order, OT count or length mismatch.
            GcInputError: ``m0``/``m1`` shapes differ or are not ``(m, 2)``.
        """
        if self._seeds is None:
            raise GcProtocolError("respond needs finished base OTs")
        if m0.ndim != 2 or m0.shape[1] != 2 or m1.shape != m0.shape:
            raise GcInputError("m0 and m1 must both be (m, 2) uint64")
        if len(request) < _REQUEST_HEADER.size:
            raise MessageFormatError("OT request shorter than its header")
        batch, m = _REQUEST_HEADER.unpack_from(request)
        n_bytes = (m + 7) // 8
        if batch != self._batch:
            raise MessageFormatError(f"OT request for batch {batch}, expected batch {self._batch}")
        if m != len(m0):
            raise MessageFormatError(f"OT request for {m} transfers, sender has {len(m0)} message pairs")
        if len(request) != _REQUEST_HEADER.size + KAPPA * n_bytes:
            raise MessageFormatError(
                f"OT request has {len(request)} bytes, expected {_REQUEST_HEADER.size + KAPPA * n_bytes}"
            )
        u_cols = np.frombuffer(request, dtype=np.uint8, offset=_REQUEST_HEADER.size).reshape(KAPPA, n_bytes)
        q_cols = _columns(self._seeds, batch, n_bytes) ^ (u_cols * self._s_bits[:, None])
        q_rows = _rows(q_cols, m)
        hash_ = FixedKeyHash(OT_HASH_KEY)
        y0 = m0 ^ _hash_rows(hash_, q_rows, batch)
        y1 = m1 ^ _hash_rows(hash_, q_rows ^ self._s_block, batch)
        self._batch += 1
        return np.stack((y0, y1), axis=1).astype(LABEL_DTYPE).tobytes()
