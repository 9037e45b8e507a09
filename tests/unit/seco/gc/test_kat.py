"""Known answers for the garbling primitives, against a straightforward per-block re-computation.

The reference functions below are written from the papers, block by block with
Python integers and a one-block AES call each: no numpy, no code shared with
:mod:`sealedml.seco.gc`. The pinned hex vectors catch any later change to the
construction (hash, σ, tweak layout, fixed key, table layout) — such a change
breaks interoperability between parties running different versions and must
be deliberate.
"""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sealedml.seco.gc._primitives import (
    GARBLE_HASH_KEY,
    LABEL_DTYPE,
    OT_HASH_KEY,
    FixedKeyHash,
    blocks_from_bytes,
    prg,
)
from sealedml.seco.gc.builder import CircuitBuilder
from sealedml.seco.gc.circuit import Circuit
from sealedml.seco.gc.garble import GarbledCircuit, GarblerKeys, evaluate, garble

MASK64 = (1 << 64) - 1


def ref_aes(key: bytes, block: int) -> int:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return int.from_bytes(enc.update(block.to_bytes(16, "little")) + enc.finalize(), "little")


def ref_sigma(x: int) -> int:
    lo, hi = x & MASK64, x >> 64
    return hi | ((lo ^ hi) << 64)


def ref_hash(key: bytes, x: int, tweak: int) -> int:
    """BHKR13 / ZRE15: H(x, T) = π(K) ⊕ K with K = σ(x) ⊕ T."""
    k = ref_sigma(x) ^ tweak
    return ref_aes(key, k) ^ k


def tweak(low: int, copy: int) -> int:
    return low | (copy << 64)


def to_int(block: np.ndarray) -> int:
    return int(block[0]) | (int(block[1]) << 64)


def ref_half_gates(a0: int, b0: int, delta: int, gate: int, copy: int) -> tuple[int, int, int]:
    """ZRE15 Fig. 2 for one AND gate: (T_G, T_E, W⁰_out)."""
    pa, pb = a0 & 1, b0 & 1
    j, j2 = tweak(2 * gate, copy), tweak(2 * gate + 1, copy)
    ha0, ha1 = ref_hash(GARBLE_HASH_KEY, a0, j), ref_hash(GARBLE_HASH_KEY, a0 ^ delta, j)
    hb0, hb1 = ref_hash(GARBLE_HASH_KEY, b0, j2), ref_hash(GARBLE_HASH_KEY, b0 ^ delta, j2)
    t_g = ha0 ^ ha1 ^ (delta if pb else 0)
    w_g = ha0 ^ (t_g if pa else 0)
    t_e = hb0 ^ hb1 ^ a0
    w_e = hb0 ^ ((t_e ^ a0) if pb else 0)
    return t_g, t_e, w_g ^ w_e


class Stream:
    """A fixed byte stream standing in for the CSPRNG (KATs only)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __call__(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        assert len(out) == n
        return out


def test_fixed_keys_are_the_documented_hashes() -> None:
    assert GARBLE_HASH_KEY == hashlib.sha256(b"sealedml/seco/gc/garble-hash/v1").digest()[:16]
    assert OT_HASH_KEY == hashlib.sha256(b"sealedml/seco/gc/ot-hash/v1").digest()[:16]


def test_fixed_key_hash_matches_the_per_block_reference() -> None:
    rng = random.Random(1)
    xs = [rng.getrandbits(128) for _ in range(64)]
    ts = [rng.getrandbits(128) for _ in range(64)]
    x = blocks_from_bytes(b"".join(v.to_bytes(16, "little") for v in xs))
    t = blocks_from_bytes(b"".join(v.to_bytes(16, "little") for v in ts))
    for key in (GARBLE_HASH_KEY, OT_HASH_KEY):
        got = FixedKeyHash(key)(x, t)
        assert [to_int(row) for row in got] == [ref_hash(key, xi, ti) for xi, ti in zip(xs, ts, strict=True)]


def test_fixed_key_hash_pinned_vector() -> None:
    x = blocks_from_bytes(bytes(range(16)))
    t = np.array([[5, 7]], dtype=LABEL_DTYPE)
    got = FixedKeyHash(GARBLE_HASH_KEY)(x, t).astype(LABEL_DTYPE).tobytes().hex()
    reference = ref_hash(GARBLE_HASH_KEY, int.from_bytes(bytes(range(16)), "little"), tweak(5, 7))
    assert got == reference.to_bytes(16, "little").hex()
    assert got == PINNED_HASH


def test_fixed_key_hash_rejects_a_wrong_key_size() -> None:
    with pytest.raises(ValueError):
        FixedKeyHash(bytes(15))


def test_prg_is_aes_ctr_from_nonce_then_zero() -> None:
    seed = bytes(range(16))
    stream = prg(seed, 3, 40)
    enc = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    expected = b"".join(enc.update(struct.pack(">QQ", 3, i)) for i in range(3))[:40]
    assert stream == expected
    assert prg(seed, 4, 40) != stream


DELTA = 0x0123456789ABCDEF_FEDCBA9876543211  # lsb 1
A0 = 0x00112233445566778899AABBCCDDEEFF
B0 = 0xF0E1D2C3B4A5968778695A4B3C2D1E0E


def and_gate_garbling() -> tuple[Circuit, GarbledCircuit, GarblerKeys]:
    b = CircuitBuilder()
    x = b.input("B", "x", 1)
    y = b.input("C", "y", 1)
    b.output("C", "z", (b.and_(x[0], y[0]),))
    circuit = b.build()
    stream = Stream(b"".join(v.to_bytes(16, "little") for v in (DELTA, A0, B0)))
    garbled, keys = garble(circuit, 1, stream)
    return circuit, garbled, keys


def test_half_gates_and_table_matches_the_per_gate_reference() -> None:
    circuit, garbled, keys = and_gate_garbling()
    assert to_int(keys.delta[0]) == DELTA
    t_g, t_e, w0 = ref_half_gates(A0, B0, DELTA, gate=0, copy=0)
    table = garbled.tables[0, 0]
    assert (to_int(table[0]), to_int(table[1])) == (t_g, t_e)
    assert int(garbled.decoding[0, 0]) == w0 & 1
    assert garbled.tables.astype(LABEL_DTYPE).tobytes().hex() == PINNED_AND_TABLE
    # and the evaluator reaches W⁰ or W⁰ ⊕ Δ exactly as the truth table says
    for a in (0, 1):
        for b in (0, 1):
            labels = keys.active_labels(range(2), np.array([[a], [b]], dtype=np.uint8))
            assert evaluate(circuit, garbled, labels).tolist() == [[a & b]]


def test_copies_hash_under_distinct_tweaks() -> None:
    """Two copies given the same input labels must still get unrelated tables (copy index in the tweak)."""
    circuit, _, _ = and_gate_garbling()
    stream = Stream(b"".join(v.to_bytes(16, "little") for v in (DELTA, A0, A0, B0, B0)))
    garbled, _ = garble(circuit, 2, stream)
    for copy in (0, 1):
        t_g, t_e, _ = ref_half_gates(A0, B0, DELTA, gate=0, copy=copy)
        table = garbled.tables[0, copy]
        assert (to_int(table[0]), to_int(table[1])) == (t_g, t_e)
    assert garbled.tables[0, 0].tolist() != garbled.tables[0, 1].tolist()


PINNED_HASH = "02db0da9fcb3950471fda0a28cea2c1a"
# T_G ‖ T_E, 16 bytes each, for A0, B0, DELTA above (gate 0, copy 0)
PINNED_AND_TABLE = "0fc113bc74e4f6d2f107ee6246c18b11804a541b3c2a30a98ea6bc61cd0a350f"
