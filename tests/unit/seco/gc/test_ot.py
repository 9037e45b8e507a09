"""Oblivious transfer: correctness, the receiver's view, and malformed messages.

Correctness: every OT delivers ``m_b`` for its choice bit ``b``, for the base OT
and for IKNP at sizes that do and do not fill a byte. The receiver's view:
re-running with the same randomness but a different ``m_{1−b}`` changes nothing
the receiver gets. Malformed input: wrong lengths and counts raise
:class:`MessageFormatError`; the identity, small-order points, points outside
the prime-order subgroup and non-canonical encodings raise
:class:`InvalidPointError`; rounds out of order raise :class:`GcProtocolError`.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from sealedml.seco.gc._primitives import LABEL_DTYPE, point_add, point_base_mul, random_blocks, random_scalar
from sealedml.seco.gc.errors import GcInputError, GcProtocolError, InvalidPointError, MessageFormatError
from sealedml.seco.gc.ot import (
    KAPPA,
    BaseOtReceiver,
    BaseOtSender,
    OtExtensionReceiver,
    OtExtensionSender,
    base_ot_decrypt,
    base_ot_encrypt,
)

IDENTITY = bytes([1]) + bytes(31)
ORDER_8 = bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
ORDER_2 = bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")  # (0, −1)
NON_CANONICAL = bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")  # y ≥ p


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


def outside_subgroup() -> bytes:
    """A curve point with a torsion component: in the full group, not the prime-order subgroup."""
    return point_add(point_base_mul(random_scalar(seeded(1).randbytes)), ORDER_8)


BAD_POINTS = [IDENTITY, ORDER_8, ORDER_2, NON_CANONICAL]


def blocks(n: int, seed: int) -> np.ndarray:
    return random_blocks(n, seeded(seed).randbytes)


def pick(choices: np.ndarray, m0: np.ndarray, m1: np.ndarray) -> np.ndarray:
    return np.where(choices[:, None] == 1, m1, m0)


# --- base OT ---------------------------------------------------------------------------------


def base_run(choices: np.ndarray, seed: int = 9) -> tuple[list[bytes], list[bytes], list[bytes]]:
    sender = BaseOtSender(len(choices), b"test", seeded(seed).randbytes)
    receiver = BaseOtReceiver(choices, b"test", seeded(seed + 1).randbytes)
    keys0, keys1 = sender.keys(receiver.reply(sender.first_message()))
    return keys0, keys1, receiver.keys()


def test_base_ot_receiver_gets_exactly_the_chosen_key_and_message() -> None:
    choices = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    keys0, keys1, chosen = base_run(choices)
    for c, k0, k1, k in zip(choices, keys0, keys1, chosen, strict=True):
        assert k == (k1 if c else k0) and k != (k0 if c else k1)
    m0, m1 = blocks(8, 1), blocks(8, 2)
    got = base_ot_decrypt(chosen, choices, base_ot_encrypt(keys0, keys1, m0, m1))
    assert np.array_equal(got, pick(choices, m0, m1))


def test_base_ot_output_does_not_depend_on_the_other_message() -> None:
    choices = np.array([0, 1, 0, 1])
    keys0, keys1, chosen = base_run(choices)
    m0, m1 = blocks(4, 3), blocks(4, 4)
    other0, other1 = m0.copy(), m1.copy()
    other0[choices == 1] ^= np.uint64(0xFF)  # change only what the receiver did not choose
    other1[choices == 0] ^= np.uint64(0xFF)
    first = base_ot_decrypt(chosen, choices, base_ot_encrypt(keys0, keys1, m0, m1))
    second = base_ot_decrypt(chosen, choices, base_ot_encrypt(keys0, keys1, other0, other1))
    assert np.array_equal(first, second)


def test_base_ot_keys_are_bound_to_the_session() -> None:
    choices = np.array([1])
    s1 = BaseOtSender(1, b"one", seeded(1).randbytes)
    s2 = BaseOtSender(1, b"two", seeded(1).randbytes)
    reply = BaseOtReceiver(choices, b"one", seeded(2).randbytes).reply(s1.first_message())
    assert s1.keys(reply) != s2.keys(reply)


@pytest.mark.parametrize("bad", [*BAD_POINTS, "outside"], ids=["identity", "order8", "order2", "noncanon", "outside"])
def test_base_ot_receiver_rejects_an_invalid_sender_point(bad: bytes | str) -> None:
    point = outside_subgroup() if bad == "outside" else bad
    assert isinstance(point, bytes)
    with pytest.raises(InvalidPointError):
        BaseOtReceiver(np.array([0, 1])).reply(point)


@pytest.mark.parametrize("bad", [*BAD_POINTS, "outside"], ids=["identity", "order8", "order2", "noncanon", "outside"])
def test_base_ot_sender_rejects_an_invalid_receiver_point(bad: bytes | str) -> None:
    sender = BaseOtSender(2)
    good = BaseOtReceiver(np.array([0, 1])).reply(sender.first_message())
    point = outside_subgroup() if bad == "outside" else bad
    assert isinstance(point, bytes)
    with pytest.raises(InvalidPointError):
        sender.keys(good[:32] + point)


def test_base_ot_sender_rejects_its_own_point_echoed_back() -> None:
    sender = BaseOtSender(1)
    with pytest.raises(InvalidPointError):
        sender.keys(sender.first_message())


def test_base_ot_rejects_wrong_lengths_and_order() -> None:
    sender = BaseOtSender(3)
    receiver = BaseOtReceiver(np.array([0, 1, 1]))
    with pytest.raises(MessageFormatError):
        receiver.reply(sender.first_message()[:31])
    with pytest.raises(GcProtocolError):
        receiver.keys()
    reply = receiver.reply(sender.first_message())
    with pytest.raises(GcProtocolError):
        receiver.reply(sender.first_message())
    for bad in (reply[:-32], reply + reply[:32], reply[:-1]):
        with pytest.raises(MessageFormatError):
            sender.keys(bad)
    keys0, keys1 = sender.keys(reply)
    ciphertext = base_ot_encrypt(keys0, keys1, blocks(3, 1), blocks(3, 2))
    with pytest.raises(MessageFormatError):
        base_ot_decrypt(receiver.keys(), [0, 1, 1], ciphertext[:-1])
    with pytest.raises(GcInputError):
        base_ot_encrypt(keys0, keys1, blocks(2, 1), blocks(3, 2))
    with pytest.raises(GcInputError):
        BaseOtReceiver(np.array([0, 2]))
    with pytest.raises(GcInputError):
        BaseOtSender(0)


# --- IKNP -------------------------------------------------------------------------------------


def iknp_pair(seed: int = 5) -> tuple[OtExtensionReceiver, OtExtensionSender]:
    receiver = OtExtensionReceiver(b"link", seeded(seed).randbytes)
    sender = OtExtensionSender(b"link", seeded(seed + 1).randbytes)
    receiver.finish_base(sender.base_reply(receiver.base_message()))
    return receiver, sender


def test_iknp_delivers_the_chosen_label_for_every_choice_bit() -> None:
    receiver, sender = iknp_pair()
    rng = np.random.default_rng(0)
    for m in (1, 7, 8, 129, 5000):  # partial bytes, one byte, past one block, thousands
        choices = rng.integers(0, 2, m)
        m0, m1 = blocks(m, m), blocks(m, m + 1)
        request = receiver.request(choices)
        assert len(request) == 8 + KAPPA * ((m + 7) // 8)
        response = sender.respond(request, m0, m1)
        assert len(response) == 32 * m
        assert np.array_equal(receiver.receive(response), pick(choices, m0, m1))


def test_iknp_output_does_not_depend_on_the_other_message() -> None:
    choices = np.random.default_rng(1).integers(0, 2, 300)
    m0, m1 = blocks(300, 1), blocks(300, 2)
    other0, other1 = m0.copy(), m1.copy()
    other0[choices == 1] = blocks(int(np.sum(choices == 1)), 3)
    other1[choices == 0] = blocks(int(np.sum(choices == 0)), 4)
    outputs = []
    for x0, x1 in ((m0, m1), (other0, other1)):
        receiver, sender = iknp_pair(seed=8)  # same randomness both times
        outputs.append(receiver.receive(sender.respond(receiver.request(choices), x0, x1)))
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], pick(choices, m0, m1))


def test_iknp_request_looks_random_even_for_constant_choices() -> None:
    """Sanity check of the sender's view: ``u_i = G(k⁰_i) ⊕ G(k¹_i) ⊕ r`` is balanced whatever ``r`` is."""
    receiver, _ = iknp_pair()
    for choice in (0, 1):
        request = receiver.request(np.full(4096, choice, dtype=np.uint8))
        ones = np.unpackbits(np.frombuffer(request[8:], dtype=np.uint8)).mean()
        assert 0.49 < ones < 0.51
        receiver.receive(bytes(32 * 4096))


def test_iknp_rejects_malformed_requests_and_responses() -> None:
    receiver, sender = iknp_pair()
    m0, m1 = blocks(20, 1), blocks(20, 2)
    request = receiver.request(np.ones(20, dtype=np.uint8))
    for bad in (request[:-1], request + b"\0", request[:5]):
        with pytest.raises(MessageFormatError):
            sender.respond(bad, m0, m1)
    with pytest.raises(MessageFormatError, match="20 transfers"):
        sender.respond(request, m0[:19], m1[:19])
    with pytest.raises(GcInputError):
        sender.respond(request, m0, m1[:19])
    response = sender.respond(request, m0, m1)
    with pytest.raises(MessageFormatError, match="batch 0, expected batch 1"):
        sender.respond(request, m0, m1)  # a replayed request
    for bad in (response[:-1], response + b"\0"):
        with pytest.raises(MessageFormatError):
            receiver.receive(bad)
    assert np.array_equal(receiver.receive(response), m1)


def test_iknp_enforces_round_order() -> None:
    receiver = OtExtensionReceiver()
    sender = OtExtensionSender()
    with pytest.raises(GcProtocolError):
        receiver.request([0, 1])
    with pytest.raises(GcProtocolError):
        sender.respond(b"\0" * 8, blocks(1, 1), blocks(1, 2))
    receiver.finish_base(sender.base_reply(receiver.base_message()))
    with pytest.raises(GcProtocolError):
        receiver.receive(bytes(32))
    receiver.request([0, 1])
    with pytest.raises(GcProtocolError):
        receiver.request([0, 1])  # the open batch must be answered first
    fresh, _ = iknp_pair()
    with pytest.raises(GcInputError):
        fresh.request([0, 3])


def test_iknp_base_phase_rejects_invalid_points() -> None:
    with pytest.raises(InvalidPointError):
        OtExtensionSender().base_reply(ORDER_8)
    receiver = OtExtensionReceiver()
    reply = OtExtensionSender().base_reply(receiver.base_message())
    with pytest.raises(InvalidPointError):
        receiver.finish_base(IDENTITY + reply[32:])
    with pytest.raises(MessageFormatError):
        receiver.finish_base(reply[:-32])


def test_messages_are_little_endian_blocks() -> None:
    receiver, sender = iknp_pair()
    m0 = np.array([[1, 2]], dtype=LABEL_DTYPE)
    got = receiver.receive(sender.respond(receiver.request([0]), m0, m0 ^ np.uint64(5)))
    assert got.astype(LABEL_DTYPE).tobytes() == (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
