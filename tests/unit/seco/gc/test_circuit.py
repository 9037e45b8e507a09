"""Circuits and the arithmetic builder, in the clear, against Python integers.

The garbled evaluation is tested against :meth:`Circuit.evaluate_bits`
(``test_garble.py``), so this module pins that reference itself: every gate on
every input, every word operation on edge cases (0, the top value, full carry
chains, the modulus minus one) and on random words, and the AND counts the
decision record quotes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealedml.seco.gc.builder import ONE, ZERO, CircuitBuilder, Word
from sealedml.seco.gc.circuit import Circuit, Gate, Op, Port, bits_to_words, words_to_bits
from sealedml.seco.gc.errors import CircuitError, GcInputError
from sealedml.seco.gc.relu import MODULUS, WORD_BITS

K = WORD_BITS


def one_gate_circuit(op: Op) -> Circuit:
    b = -1 if op is Op.INV else 1
    return Circuit(
        inputs=(Port("B", "a", (0,)), Port("C", "b", (1,))),
        gates=(Gate(op, 0, b, 2),),
        outputs=(Port("C", "z", (2,)),),
    )


@pytest.mark.parametrize(
    ("op", "truth"),
    [(Op.XOR, lambda a, b: a ^ b), (Op.AND, lambda a, b: a & b), (Op.INV, lambda a, b: 1 - a)],
)
def test_every_gate_on_every_input(op: Op, truth: object) -> None:
    circuit = one_gate_circuit(op)
    combos = list(itertools.product((0, 1), repeat=2))
    bits = np.array(combos, dtype=np.uint8).T
    assert circuit.evaluate_bits(bits)[0].tolist() == [truth(a, b) for a, b in combos]  # type: ignore[operator]


def test_circuit_rejects_malformed_gate_lists() -> None:
    ports = (Port("B", "a", (0,)), Port("C", "b", (1,)))
    out = (Port("C", "z", (2,)),)
    with pytest.raises(CircuitError, match="numbering"):
        Circuit(ports, (Gate(Op.AND, 0, 1, 3),), out)
    with pytest.raises(CircuitError, match="not yet defined"):
        Circuit(ports, (Gate(Op.AND, 0, 2, 2),), out)
    with pytest.raises(CircuitError, match="not yet defined"):
        Circuit(ports, (Gate(Op.INV, 0, 1, 2),), out)
    with pytest.raises(CircuitError, match="wire the circuit does not have"):
        Circuit(ports, (Gate(Op.AND, 0, 1, 2),), (Port("C", "z", (5,)),))
    with pytest.raises(CircuitError, match="unique"):
        Circuit((Port("B", "a", (0,)), Port("C", "a", (1,))), (), ())
    with pytest.raises(CircuitError, match="input wires"):
        Circuit((Port("B", "a", (1,)), Port("C", "b", (0,))), (), ())


def test_party_input_bits_selects_one_partys_rows() -> None:
    circuit = word_circuit(4, 11)
    values = {"x": [3, 5], "y": [1, 2], "s": [1, 0]}
    full = circuit.input_bits(values)
    assert circuit.party_input_bits("C", values).tolist() == full[list(circuit.party_wires("C"))].tolist()
    with pytest.raises(CircuitError):
        circuit.party_input_bits("C", {"y": [1]})
    with pytest.raises(CircuitError):
        circuit.party_input_bits("Z", values)


def test_inputs_must_come_before_gates() -> None:
    b = CircuitBuilder()
    x = b.input("B", "x", 2)
    b.and_(x[0], x[1])
    with pytest.raises(CircuitError):
        b.input("C", "y", 2)


def test_words_to_bits_round_trip_and_range() -> None:
    values = np.array([0, 1, MODULUS - 1, (1 << K) - 1], dtype=np.uint64)
    assert bits_to_words(words_to_bits(values, K)).tolist() == values.tolist()
    assert words_to_bits([5], 3)[:, 0].tolist() == [1, 0, 1]  # least significant bit first
    with pytest.raises(GcInputError):
        words_to_bits([1 << K], K)
    with pytest.raises(GcInputError):
        words_to_bits([-1], K)
    with pytest.raises(GcInputError):
        words_to_bits([0.5], K)


# --- word operations --------------------------------------------------------------------


def word_circuit(width: int, modulus: int = MODULUS) -> Circuit:
    """Every builder operation on the same two inputs (and a select bit), one output each."""
    b = CircuitBuilder()
    x = b.input("B", "x", width)
    y = b.input("C", "y", width)
    s = b.input("C", "s", 1)
    b.output("C", "add", b.add(x, y))
    diff, borrow = b.sub(x, y)
    b.output("C", "sub", diff)
    b.output("C", "borrow", (borrow,))
    b.output("C", "lt", (b.less_than(x, y),))
    b.output("C", "mux", b.mux(s[0], x, y))
    b.output("C", "add_mod", b.add_mod(x, y, modulus))
    return b.build()


def expected(x: int, y: int, s: int, width: int, modulus: int) -> dict[str, int]:
    return {
        "add": x + y,
        "sub": (x - y) % (1 << width),
        "borrow": int(x < y),
        "lt": int(x < y),
        "mux": y if s else x,
        "add_mod": (x + y) % modulus if x < modulus and y < modulus else -1,
    }


def check(circuit: Circuit, xs: list[int], ys: list[int], ss: list[int], width: int, modulus: int) -> None:
    got = circuit.evaluate({"x": xs, "y": ys, "s": ss})
    for i, (x, y, s) in enumerate(zip(xs, ys, ss, strict=True)):
        want = expected(x, y, s, width, modulus)
        for name, value in want.items():
            if value >= 0:
                assert int(got[name][i]) == value, (name, x, y, s)


def test_word_operations_exhaustively_on_4_bits() -> None:
    modulus = 11
    circuit = word_circuit(4, modulus)
    pairs = list(itertools.product(range(16), range(16), (0, 1)))
    xs, ys, ss = (list(col) for col in zip(*pairs, strict=True))
    check(circuit, xs, ys, ss, 4, modulus)


def test_add_mod_with_a_power_of_two_modulus_is_plain_wrapping_addition() -> None:
    circuit = word_circuit(4, 16)
    pairs = list(itertools.product(range(16), range(16)))
    got = circuit.evaluate({"x": [p[0] for p in pairs], "y": [p[1] for p in pairs], "s": [0] * len(pairs)})
    assert got["add_mod"].tolist() == [(x + y) % 16 for x, y in pairs]


WIDE = word_circuit(K)
EDGES = [0, 1, 2, (MODULUS - 1) // 2, (MODULUS + 1) // 2, MODULUS - 2, MODULUS - 1, 1 << 37, (1 << 37) - 1]


def test_word_operations_on_41_bit_edge_cases() -> None:
    pairs = list(itertools.product([*EDGES, (1 << K) - 1], repeat=2))
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    check(WIDE, xs, ys, [i % 2 for i in range(len(pairs))], K, MODULUS)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, (1 << K) - 1), st.integers(0, (1 << K) - 1), st.integers(0, 1)),
        min_size=1,
        max_size=32,
    )
)
def test_word_operations_on_random_41_bit_words(rows: list[tuple[int, int, int]]) -> None:
    xs, ys, ss = (list(col) for col in zip(*rows, strict=True))
    check(WIDE, xs, ys, ss, K, MODULUS)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, MODULUS - 1), st.integers(0, MODULUS - 1)), min_size=1, max_size=32))
def test_add_mod_p_on_reduced_operands(rows: list[tuple[int, int]]) -> None:
    xs, ys = [r[0] for r in rows], [r[1] for r in rows]
    got = WIDE.evaluate({"x": xs, "y": ys, "s": [0] * len(rows)})["add_mod"]
    assert got.tolist() == [(x + y) % MODULUS for x, y in rows]


# --- gate economy -------------------------------------------------------------------------


def and_count(build: object) -> int:
    b = CircuitBuilder()
    x = b.input("B", "x", K)
    y = b.input("C", "y", K)
    s = b.input("C", "s", 1)
    out: Word = build(b, x, y, s[0])  # type: ignore[operator]
    b.output("C", "out", out)
    return b.build().and_count


def test_each_word_operation_costs_one_and_per_bit() -> None:
    assert and_count(lambda b, x, y, s: b.add(x, y)) == K
    assert and_count(lambda b, x, y, s: b.add(x, y)[:K]) == K - 1  # unused carry-out is dropped
    assert and_count(lambda b, x, y, s: (b.less_than(x, y),)) == K
    assert and_count(lambda b, x, y, s: b.sub(x, y)[0]) == K - 1
    assert and_count(lambda b, x, y, s: b.mux(s, x, y)) == K
    assert and_count(lambda b, x, y, s: b.add_mod(x, y, MODULUS)) <= 3 * K + 1


def test_constants_fold_without_gates() -> None:
    b = CircuitBuilder()
    x = b.input("B", "x", 1)[0]
    assert b.xor(x, ZERO) == x
    assert b.and_(x, ONE) == x
    assert b.and_(x, ZERO) == ZERO
    assert b.xor(ONE, ONE) == ZERO
    assert b.and_(x, b.inv(x)) == ZERO
    assert b.inv(b.inv(x)) == x
    assert b.xor(x, x) == ZERO
    b.output("C", "consts", (ZERO, ONE, x))
    circuit = b.build()
    assert circuit.and_count == 0
    assert circuit.evaluate({"x": [0, 1]})["consts"].tolist() == [0b010, 0b110]


def test_builder_rejects_misuse() -> None:
    b = CircuitBuilder()
    x = b.input("B", "x", 4)
    with pytest.raises(CircuitError):
        b.add(x, x[:3])
    with pytest.raises(CircuitError):
        b.add_mod(x, x, 17)
    with pytest.raises(CircuitError):
        b.const(16, 4)
    with pytest.raises(CircuitError):
        CircuitBuilder().output("C", "z", (ONE,))
