"""Garbled evaluation equals plaintext evaluation; tampering is detected where the scheme allows.

Correctness: every gate on every input, random circuits (seeded), the 41-bit
arithmetic, and more copies than one chunk (tweaks must stay unique across
chunks). Wire format: round trip and wrong lengths. Tampering: a flipped table
bit or a forged input label makes evaluation fail loudly through the output
digests; a *valid* but wrong label (the other one of the pair) cannot be
detected — that is the semi-honest limit the decision record states.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from sealedml.seco.gc._primitives import LABEL_DTYPE
from sealedml.seco.gc.builder import CircuitBuilder
from sealedml.seco.gc.circuit import Circuit, Gate, Op, Port
from sealedml.seco.gc.errors import CircuitError, MessageFormatError, OutputAuthenticationError
from sealedml.seco.gc.garble import GarbledCircuit, GarblerKeys, evaluate, garble
from sealedml.seco.gc.relu import MODULUS, WORD_BITS


def garbled_run(circuit: Circuit, bits: np.ndarray) -> np.ndarray:
    garbled, keys = garble(circuit, bits.shape[1])
    wire = GarbledCircuit.from_bytes(circuit, bits.shape[1], garbled.to_bytes())
    return evaluate(circuit, wire, keys.active_labels(range(circuit.n_inputs), bits))


def random_circuit(rng: random.Random, n_inputs: int, n_gates: int) -> Circuit:
    ports = tuple(Port("BC"[i % 2], f"in{i}", (i,)) for i in range(n_inputs))
    gates = []
    for out in range(n_inputs, n_inputs + n_gates):
        op = rng.choice([Op.XOR, Op.AND, Op.AND, Op.INV])
        a = rng.randrange(out)
        b = -1 if op is Op.INV else rng.randrange(out)  # a == b is allowed: x ∧ x, x ⊕ x
        gates.append(Gate(op, a, b, out))
    n_wires = n_inputs + n_gates
    outputs = (Port("C", "out", tuple(rng.sample(range(n_wires), 12))),)
    return Circuit(ports, tuple(gates), outputs)


@pytest.mark.parametrize("op", list(Op))
def test_every_gate_type_garbled_on_every_input(op: Op) -> None:
    circuit = Circuit(
        inputs=(Port("B", "a", (0,)), Port("C", "b", (1,))),
        gates=(Gate(op, 0, -1 if op is Op.INV else 1, 2),),
        outputs=(Port("C", "z", (2,)),),
    )
    bits = np.array([[0, 0, 1, 1], [0, 1, 0, 1]], dtype=np.uint8)  # the four combinations, one per copy
    assert garbled_run(circuit, bits).tolist() == circuit.evaluate_bits(bits).tolist()


def test_random_circuits_evaluate_like_plaintext() -> None:
    rng = random.Random(2024)
    for _ in range(12):
        circuit = random_circuit(rng, n_inputs=rng.randrange(2, 10), n_gates=rng.randrange(1, 150))
        bits = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 2, (circuit.n_inputs, 40), dtype=np.uint8)
        assert garbled_run(circuit, bits).tolist() == circuit.evaluate_bits(bits).tolist()


def arithmetic_circuit() -> Circuit:
    b = CircuitBuilder()
    x = b.input("B", "x", WORD_BITS)
    y = b.input("C", "y", WORD_BITS)
    s = b.input("C", "s", 1)
    b.output("C", "add_mod", b.add_mod(x, y, MODULUS))
    b.output("C", "lt", (b.less_than(x, y),))
    b.output("C", "mux", b.mux(s[0], x, y))
    diff, _ = b.sub(x, y)
    b.output("C", "sub", diff)
    return b.build()


def test_garbled_arithmetic_matches_python_integers() -> None:
    rng = random.Random(7)
    edges = [0, 1, MODULUS - 1, MODULUS - 2, (MODULUS - 1) // 2, 1 << 37]
    xs = edges * len(edges) + [rng.randrange(MODULUS) for _ in range(64)]
    ys = [e for e in edges for _ in edges] + [rng.randrange(MODULUS) for _ in range(64)]
    ss = [i % 2 for i in range(len(xs))]
    circuit = arithmetic_circuit()
    bits = circuit.input_bits({"x": xs, "y": ys, "s": ss})
    got = circuit.decode_outputs(garbled_run(circuit, bits))
    assert got["add_mod"].tolist() == [(x + y) % MODULUS for x, y in zip(xs, ys, strict=True)]
    assert got["lt"].tolist() == [int(x < y) for x, y in zip(xs, ys, strict=True)]
    assert got["mux"].tolist() == [y if s else x for x, y, s in zip(xs, ys, ss, strict=True)]
    assert got["sub"].tolist() == [(x - y) % (1 << WORD_BITS) for x, y in zip(xs, ys, strict=True)]


def test_copies_beyond_one_chunk_are_correct() -> None:
    circuit = random_circuit(random.Random(5), n_inputs=4, n_gates=30)
    bits = np.random.default_rng(5).integers(0, 2, (4, 1100), dtype=np.uint8)
    assert garbled_run(circuit, bits).tolist() == circuit.evaluate_bits(bits).tolist()


def test_labels_have_the_free_xor_shape() -> None:
    circuit = arithmetic_circuit()
    _, keys = garble(circuit, 3)
    assert int(keys.delta[0, 0]) & 1 == 1  # point-and-permute: colours of a pair differ
    zero, one = keys.label_pairs(range(circuit.n_inputs))
    assert np.all((zero ^ one) == keys.delta)
    rows = zero.reshape(-1, 2).tolist()
    assert len({tuple(row) for row in rows}) == len(rows)  # fresh labels per wire and copy


# --- wire format --------------------------------------------------------------------------


def test_garbled_circuit_bytes_round_trip_and_reject_wrong_lengths() -> None:
    circuit = arithmetic_circuit()
    garbled, _ = garble(circuit, 5)
    data = garbled.to_bytes()
    per_copy = circuit.and_count * 32 + len(circuit.output_wires) * 16
    assert len(data) == 5 * per_copy + (len(circuit.output_wires) * 5 + 7) // 8
    again = GarbledCircuit.from_bytes(circuit, 5, data)
    assert again.to_bytes() == data
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(MessageFormatError):
            GarbledCircuit.from_bytes(circuit, 5, bad)
    with pytest.raises(MessageFormatError):
        GarbledCircuit.from_bytes(circuit, 4, data)


def test_evaluate_rejects_labels_that_do_not_fit_the_circuit() -> None:
    circuit = arithmetic_circuit()
    garbled, keys = garble(circuit, 2)
    with pytest.raises(CircuitError):
        evaluate(circuit, garbled, keys.zero_labels[:-1])
    with pytest.raises(CircuitError):
        keys.active_labels([0, 1], np.zeros((3, 2), dtype=np.uint8))
    with pytest.raises(CircuitError):
        garble(circuit, 0)


# --- tampering ------------------------------------------------------------------------------


def setup_tamper(n: int = 16) -> tuple[Circuit, GarbledCircuit, GarblerKeys, np.ndarray]:
    circuit = arithmetic_circuit()
    rng = random.Random(11)
    xs, ys = [rng.randrange(MODULUS) for _ in range(n)], [rng.randrange(MODULUS) for _ in range(n)]
    bits = circuit.input_bits({"x": xs, "y": ys, "s": [1] * n})
    garbled, keys = garble(circuit, n)
    return circuit, garbled, keys, bits


def test_a_flipped_table_bit_is_detected() -> None:
    circuit, garbled, keys, bits = setup_tamper()
    labels = keys.active_labels(range(circuit.n_inputs), bits)
    rng = random.Random(3)
    for _ in range(10):
        gate, row = rng.randrange(circuit.and_count), rng.randrange(2)
        tables = garbled.tables.copy()
        tables[gate, :, row, 0] ^= np.uint64(1 << rng.randrange(64))  # every copy, so every colour path
        tampered = GarbledCircuit(garbled.n_copies, tables, garbled.decoding, garbled.digests)
        with pytest.raises(OutputAuthenticationError):
            evaluate(circuit, tampered, labels)


def test_a_forged_input_label_never_decodes_silently() -> None:
    circuit, garbled, keys, bits = setup_tamper()
    for wire in (0, WORD_BITS - 1, WORD_BITS, circuit.n_inputs - 1):
        labels = keys.active_labels(range(circuit.n_inputs), bits)
        labels[wire] ^= np.array([0, 1 << 40], dtype=LABEL_DTYPE)  # neither W⁰ nor W¹ any more
        with pytest.raises(OutputAuthenticationError):
            evaluate(circuit, garbled, labels)


def test_tampered_digests_are_detected() -> None:
    circuit, garbled, keys, bits = setup_tamper()
    digests = garbled.digests.copy()
    digests[3, 0, :] ^= np.uint64(1)
    tampered = GarbledCircuit(garbled.n_copies, garbled.tables, garbled.decoding, digests)
    with pytest.raises(OutputAuthenticationError, match="1 output labels"):
        evaluate(circuit, tampered, keys.active_labels(range(circuit.n_inputs), bits))


def test_the_other_valid_label_is_undetectable_by_design() -> None:
    """Semi-honest limit: a label pair's other label just evaluates the flipped input."""
    circuit, garbled, keys, bits = setup_tamper()
    flipped = bits.copy()
    flipped[0] ^= 1
    got = evaluate(circuit, garbled, keys.active_labels(range(circuit.n_inputs), flipped))
    assert got.tolist() == circuit.evaluate_bits(flipped).tolist()
    assert got.tolist() != circuit.evaluate_bits(bits).tolist()
