"""Building circuits for unsigned k-bit arithmetic with as few AND gates as possible.

Under free-XOR garbling only AND gates cost anything (two 16-byte rows with
half-gates), so every word operation here is built to spend one AND per bit:

* the ripple-carry full adder ``s = a ⊕ b ⊕ c``,
  ``c' = c ⊕ ((a ⊕ c) ∧ (b ⊕ c))`` (Kolesnikov–Schneider 2008; 1 AND);
* subtraction as ``a + ¬b + 1`` and comparison as the borrow of it alone;
* the multiplexer ``x ⊕ (s ∧ (x ⊕ y))`` (1 AND per bit).

Public constants (the modulus p, the sign threshold) are folded in while
building: a bit is a wire number ``≥ 0`` or one of :data:`ZERO` / :data:`ONE`,
and gates with a constant operand simplify or vanish. :meth:`CircuitBuilder.build`
then drops every gate no output depends on (an adder's unused carry-out, a
subtraction used only for its borrow), so the counts below are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

from sealedml.seco.gc.circuit import Circuit, Gate, Op, Port
from sealedml.seco.gc.errors import CircuitError

__all__ = ["ONE", "ZERO", "Bit", "CircuitBuilder", "Word"]

Bit = int
"""A wire number, or :data:`ZERO` / :data:`ONE` for a public constant."""

Word = tuple[Bit, ...]
"""Bits of an unsigned word, least significant first."""

ZERO: Bit = -1
ONE: Bit = -2


class CircuitBuilder:
    """Records gates for a :class:`Circuit`; declare all inputs before the first gate."""

    def __init__(self) -> None:
        self._inputs: list[Port] = []
        self._outputs: list[Port] = []
        self._gates: list[Gate] = []
        self._next_wire = 0
        self._inverse: dict[int, int] = {}

    # --- wires and gates -----------------------------------------------------------------

    def input(self, party: str, name: str, width: int) -> Word:
        """Declare a ``width``-bit input word of ``party``.

        Raises:
            CircuitError: a gate was already added (inputs must come first) or the width is not positive.
        """
        if self._gates:
            raise CircuitError("declare every input before the first gate")
        if width <= 0:
            raise CircuitError("an input needs at least one bit")
        wires = tuple(range(self._next_wire, self._next_wire + width))
        self._next_wire += width
        self._inputs.append(Port(party, name, wires))
        return wires

    def _gate(self, op: Op, a: int, b: int) -> int:
        out = self._next_wire
        self._gates.append(Gate(op, a, b, out))
        self._next_wire += 1
        return out

    def xor(self, a: Bit, b: Bit) -> Bit:
        """``a ⊕ b`` (free)."""
        if a < 0 and b < 0:
            return ZERO if a == b else ONE
        if a < 0 or b < 0:
            wire, const = (b, a) if a < 0 else (a, b)
            return wire if const == ZERO else self.inv(wire)
        if a == b:
            return ZERO
        return self._gate(Op.XOR, min(a, b), max(a, b))

    def and_(self, a: Bit, b: Bit) -> Bit:
        """``a ∧ b`` (one garbled AND unless an operand is constant or both are the same wire)."""
        if a == ZERO or b == ZERO:
            return ZERO
        if a == ONE:
            return b
        if b == ONE or a == b:
            return a
        if self._inverse.get(a) == b:
            return ZERO
        return self._gate(Op.AND, min(a, b), max(a, b))

    def inv(self, a: Bit) -> Bit:
        """``¬a`` (free); inverting twice returns the original wire."""
        if a < 0:
            return ONE if a == ZERO else ZERO
        if a not in self._inverse:
            out = self._gate(Op.INV, a, -1)
            self._inverse[a] = out
            self._inverse[out] = a
        return self._inverse[a]

    # --- words -----------------------------------------------------------------------------

    @staticmethod
    def const(value: int, width: int) -> Word:
        """A public constant word.

        Raises:
            CircuitError: the value does not fit ``width`` unsigned bits.
        """
        if value < 0 or value >> width:
            raise CircuitError(f"constant does not fit {width} bits")
        return tuple(ONE if (value >> i) & 1 else ZERO for i in range(width))

    def _carry(self, a: Bit, b: Bit, c: Bit) -> Bit:
        # majority(a, b, c) with one AND: c ⊕ ((a ⊕ c) ∧ (b ⊕ c))
        return self.xor(c, self.and_(self.xor(a, c), self.xor(b, c)))

    def add(self, a: Word, b: Word, carry_in: Bit = ZERO) -> Word:
        """``a + b + carry_in`` as a ``k + 1``-bit word (k ANDs; an unused top bit costs none).

        Raises:
            CircuitError: the words differ in width.
        """
        _same_width(a, b)
        out: list[Bit] = []
        carry = carry_in
        for ai, bi in zip(a, b, strict=True):
            out.append(self.xor(self.xor(ai, bi), carry))
            carry = self._carry(ai, bi, carry)
        return (*out, carry)

    def sub(self, a: Word, b: Word) -> tuple[Word, Bit]:
        """``(a − b mod 2^k, borrow)`` with ``borrow = [a < b]``, as ``a + ¬b + 1`` (k ANDs)."""
        total = self.add(a, tuple(self.inv(bi) for bi in b), carry_in=ONE)
        return total[:-1], self.inv(total[-1])

    def less_than(self, a: Word, b: Word) -> Bit:
        """``[a < b]`` for unsigned words: the borrow of ``a − b`` (k ANDs, fewer against constants)."""
        return self.sub(a, b)[1]

    def mux(self, select: Bit, if_zero: Word, if_one: Word) -> Word:
        """``if_one if select else if_zero``, bit by bit (1 AND per bit that can differ)."""
        _same_width(if_zero, if_one)
        return tuple(self.xor(x, self.and_(select, self.xor(x, y))) for x, y in zip(if_zero, if_one, strict=True))

    def add_mod(self, a: Word, b: Word, modulus: int) -> Word:
        """``(a + b) mod modulus`` for ``a, b < modulus ≤ 2^k``: add, subtract the modulus, select.

        About ``3k`` ANDs: the k+1-bit sum, its comparison/subtraction against the
        (folded) modulus, and a k-bit multiplexer. The result is wrong if an
        operand is not already reduced; callers check their inputs' range.

        Raises:
            CircuitError: the modulus does not fit the width, or the words differ in width.
        """
        width = len(a)
        _same_width(a, b)
        if not 1 < modulus <= 1 << width:
            raise CircuitError("modulus must be in (1, 2^k]")
        total = self.add(a, b)
        reduced, borrow = self.sub(total, self.const(modulus, width + 1))
        return self.mux(borrow, reduced[:width], total[:width])

    def output(self, party: str, name: str, word: Sequence[Bit]) -> None:
        """Mark ``word`` as an output learnt by ``party``; constant bits get a (free) wire.

        Raises:
            CircuitError: a constant bit must be materialised but the circuit has no input.
        """
        wires: list[int] = []
        for bit in word:
            if bit < 0:
                if self._next_wire == 0:
                    raise CircuitError("a constant output needs at least one input wire")
                zero = self._gate(Op.XOR, 0, 0)
                bit = zero if bit == ZERO else self._gate(Op.INV, zero, -1)
            wires.append(bit)
        self._outputs.append(Port(party, name, tuple(wires)))

    # --- finishing -------------------------------------------------------------------------

    def build(self) -> Circuit:
        """The circuit, without gates that no output depends on, wires renumbered densely."""
        live = {w for port in self._outputs for w in port.wires}
        kept: list[Gate] = []
        for gate in reversed(self._gates):
            if gate.out in live:
                kept.append(gate)
                live.add(gate.a)
                if gate.b >= 0:
                    live.add(gate.b)
        kept.reverse()
        n_inputs = sum(port.width for port in self._inputs)
        renumber = {w: w for w in range(n_inputs)}
        gates: list[Gate] = []
        for gate in kept:
            out = n_inputs + len(gates)
            renumber[gate.out] = out
            b = renumber[gate.b] if gate.b >= 0 else -1
            gates.append(Gate(gate.op, renumber[gate.a], b, out))
        outputs = tuple(Port(p.party, p.name, tuple(renumber[w] for w in p.wires)) for p in self._outputs)
        return Circuit(inputs=tuple(self._inputs), gates=tuple(gates), outputs=outputs)


def _same_width(a: Word, b: Word) -> None:
    if len(a) != len(b):
        raise CircuitError(f"word widths differ ({len(a)} vs {len(b)})")
