"""Boolean circuits: the public description every party of a garbled evaluation shares.

A :class:`Circuit` is a list of XOR, AND and INV gates in topological order over
numbered wires. Wires ``0 … n_inputs − 1`` are the inputs, grouped into named
words (:class:`Port`), each owned by one party; gate ``i`` writes wire
``n_inputs + i``. That numbering makes "single assignment, topological order" a
property checked once in the constructor instead of an assumption of every
garbler and evaluator.

Words are unsigned, least significant bit first. Build circuits with
:class:`sealedml.seco.gc.builder.CircuitBuilder`; this module only holds,
validates and evaluates them in the clear (the reference the garbled
evaluation is tested against).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from sealedml.seco.gc.errors import CircuitError, GcInputError

__all__ = [
    "Bits",
    "Circuit",
    "Gate",
    "Op",
    "Port",
    "Words",
    "bits_to_words",
    "words_to_bits",
]

Bits = npt.NDArray[np.uint8]
"""``(n_wires, n_copies)`` array of 0/1: one column per circuit copy."""

Words = npt.NDArray[np.uint64]
"""``(n_copies,)`` unsigned words, at most 64 bits."""


class Op(IntEnum):
    """Gate types. XOR and INV are free under free-XOR; only AND costs a garbled table."""

    XOR = 0
    AND = 1
    INV = 2


class Gate(NamedTuple):
    """One gate: ``out = a op b`` (``b`` is ``-1`` for INV)."""

    op: Op
    a: int
    b: int
    out: int


@dataclass(frozen=True)
class Port:
    """A named word of wires, least significant bit first.

    For an input, ``party`` is the party whose value it is (it decides who
    obtains the labels, and how); for an output, the party that learns it.
    """

    party: str
    name: str
    wires: tuple[int, ...]

    @property
    def width(self) -> int:
        """Number of bits of the word."""
        return len(self.wires)


@dataclass(frozen=True, eq=False)
class Circuit:
    """A validated boolean circuit.

    Raises:
        CircuitError: from the constructor, when inputs are not wires
            ``0 … n_inputs − 1`` in order, a gate does not write the next wire
            or reads a wire not yet written, an output names an unknown wire, or
            two ports share a name.
    """

    inputs: tuple[Port, ...]
    gates: tuple[Gate, ...]
    outputs: tuple[Port, ...]
    and_count: int = field(init=False)

    def __post_init__(self) -> None:
        names = [port.name for port in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise CircuitError("port names must be unique")
        input_wires = [w for port in self.inputs for w in port.wires]
        if input_wires != list(range(len(input_wires))):
            raise CircuitError("input wires must be 0 … n_inputs − 1, in port order")
        next_wire = len(input_wires)
        for gate in self.gates:
            if gate.out != next_wire:
                raise CircuitError(f"gate writing wire {gate.out} breaks the numbering (expected {next_wire})")
            unary = gate.op is Op.INV
            operands_ok = 0 <= gate.a < next_wire and (gate.b == -1 if unary else 0 <= gate.b < next_wire)
            if not operands_ok or not isinstance(gate.op, Op):
                raise CircuitError(f"gate writing wire {gate.out} reads a wire that is not yet defined")
            next_wire += 1
        if any(not 0 <= w < next_wire for port in self.outputs for w in port.wires):
            raise CircuitError("an output names a wire the circuit does not have")
        object.__setattr__(self, "and_count", sum(1 for g in self.gates if g.op is Op.AND))

    @property
    def n_inputs(self) -> int:
        """Number of input wires (all parties)."""
        return sum(port.width for port in self.inputs)

    @property
    def n_wires(self) -> int:
        """Number of wires: inputs plus one per gate."""
        return self.n_inputs + len(self.gates)

    @property
    def output_wires(self) -> tuple[int, ...]:
        """All output wires, in port order (the row order of evaluation results)."""
        return tuple(w for port in self.outputs for w in port.wires)

    def input_port(self, name: str) -> Port:
        """The input port called ``name``.

        Raises:
            CircuitError: no such input.
        """
        for port in self.inputs:
            if port.name == name:
                return port
        raise CircuitError(f"no input called {name!r}")

    def party_wires(self, party: str) -> tuple[int, ...]:
        """Input wires owned by ``party``, in port order."""
        return tuple(w for port in self.inputs if port.party == party for w in port.wires)

    def evaluate_bits(self, input_bits: Bits) -> Bits:
        """Plaintext evaluation of many copies at once.

        Args:
            input_bits: ``(n_inputs, n_copies)`` 0/1 array, one row per input wire.

        Returns:
            ``(len(output_wires), n_copies)`` 0/1 array.

        Raises:
            CircuitError: ``input_bits`` has the wrong number of rows.
        """
        if input_bits.ndim != 2 or input_bits.shape[0] != self.n_inputs:
            raise CircuitError(f"expected {self.n_inputs} input rows")
        values = np.empty((self.n_wires, input_bits.shape[1]), dtype=np.uint8)
        values[: self.n_inputs] = input_bits & 1
        for op, a, b, out in self.gates:
            if op is Op.XOR:
                values[out] = values[a] ^ values[b]
            elif op is Op.AND:
                values[out] = values[a] & values[b]
            else:
                values[out] = values[a] ^ 1
        return values[list(self.output_wires)]

    def input_bits(self, values: Mapping[str, npt.ArrayLike]) -> Bits:
        """The ``(n_inputs, n_copies)`` bit matrix for named input words.

        Raises:
            CircuitError: a port is missing or unknown.
            GcInputError: a value does not fit its port's width.
        """
        if set(values) != {port.name for port in self.inputs}:
            raise CircuitError("give exactly one value array per input port")
        return np.concatenate([words_to_bits(values[port.name], port.width) for port in self.inputs])

    def party_input_bits(self, party: str, values: Mapping[str, npt.ArrayLike]) -> Bits:
        """The rows of :meth:`input_bits` for ``party``'s ports only (order of :meth:`party_wires`).

        What a party feeds to its OT choices or, for the garbler, to
        :meth:`GarblerKeys.active_labels <sealedml.seco.gc.garble.GarblerKeys.active_labels>`.

        Raises:
            CircuitError: a port of ``party`` is missing, or ``party`` owns no input.
            GcInputError: a value does not fit its port's width.
        """
        ports = [port for port in self.inputs if port.party == party]
        if not ports or any(port.name not in values for port in ports):
            raise CircuitError(f"give one value array per input port of {party!r}")
        return np.concatenate([words_to_bits(values[port.name], port.width) for port in ports])

    def evaluate(self, values: Mapping[str, npt.ArrayLike]) -> dict[str, Words]:
        """Plaintext evaluation on named words (one array element per copy).

        Returns:
            Output port name → ``uint64`` words.
        """
        return self.decode_outputs(self.evaluate_bits(self.input_bits(values)))

    def decode_outputs(self, output_bits: Bits) -> dict[str, Words]:
        """Split an ``(n_output_wires, n_copies)`` bit matrix into named output words."""
        words: dict[str, Words] = {}
        row = 0
        for port in self.outputs:
            words[port.name] = bits_to_words(output_bits[row : row + port.width])
            row += port.width
        return words


def words_to_bits(values: npt.ArrayLike, width: int) -> Bits:
    """``(width, n)`` bits of unsigned words, least significant first.

    Raises:
        GcInputError: a value is negative or needs more than ``width`` bits.
    """
    if not 0 < width <= 64:
        raise GcInputError("word width must be 1 … 64 bits")
    array = np.atleast_1d(np.asarray(values))
    if array.dtype.kind not in "iu" and array.dtype != object:
        raise GcInputError("words must be integers")
    if array.dtype.kind == "i" or array.dtype == object:
        as_int = [int(v) for v in array.ravel()]
        if any(v < 0 or v >> width for v in as_int):
            raise GcInputError(f"a word does not fit {width} unsigned bits")
        words = np.array(as_int, dtype=np.uint64)
    else:
        words = array.astype(np.uint64).ravel()
        if width < 64 and bool(np.any(words >> np.uint64(width))):
            raise GcInputError(f"a word does not fit {width} unsigned bits")
    shifts = np.arange(width, dtype=np.uint64)[:, None]
    return ((words[None, :] >> shifts) & np.uint64(1)).astype(np.uint8)


def bits_to_words(bits: Bits) -> Words:
    """Inverse of :func:`words_to_bits` for a ``(width, n)`` bit block (width ≤ 64)."""
    shifts = np.arange(bits.shape[0], dtype=np.uint64)[:, None]
    words: Words = np.bitwise_or.reduce(bits.astype(np.uint64) << shifts, axis=0)
    return words
