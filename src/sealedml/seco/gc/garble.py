"""Garbling and evaluating many copies of one circuit: free-XOR + half-gates.

Construction (semi-honest; see ``docs/decisions/0009-in-house-garbled-circuits.md``):

* **Free-XOR** (Kolesnikov–Schneider 2008): one secret global offset ``Δ`` per
  garbling, ``W¹ = W⁰ ⊕ Δ`` on every wire; XOR gates cost nothing, INV gates
  flip the garbler's meaning (``W⁰_out = W⁰_in ⊕ Δ``) and the evaluator copies.
* **Point-and-permute**: ``lsb(Δ) = 1``, so a label's low bit (its colour) is
  independent of its meaning and selects table rows.
* **Half-gates** (Zahur–Rosulek–Evans 2015, Fig. 2): two 16-byte rows per AND;
  gate ``g`` of copy ``c`` hashes with tweaks ``(2g, c)`` and ``(2g + 1, c)``,
  so no tweak repeats under one ``Δ`` across all copies.
* **Output decoding**: the colour of ``W⁰`` per output wire, plus a 64-bit digest
  of each output label, so an evaluator holding a label the garbler never
  produced (tampered table or input label, corrupted transfer) is told so
  instead of silently decoding a wrong bit.

The hash is :class:`~sealedml.seco.gc._primitives.FixedKeyHash`. All copies are
garbled together: gate ``g`` of every copy in a chunk goes through a single
AES call, which is what makes a layer of thousands of ReLUs affordable in Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import numpy as np
import numpy.typing as npt

from sealedml.crypto.random import random_bytes as os_random_bytes
from sealedml.seco.gc._primitives import (
    GARBLE_HASH_KEY,
    LABEL_DTYPE,
    Blocks,
    FixedKeyHash,
    RandomBytes,
    random_blocks,
)
from sealedml.seco.gc.circuit import Bits, Circuit, Op
from sealedml.seco.gc.errors import CircuitError, MessageFormatError, OutputAuthenticationError

__all__ = ["GarbledCircuit", "GarblerKeys", "LabelArray", "evaluate", "garble"]

LabelArray = npt.NDArray[np.uint64]
"""``(n_wires, n_copies, 2)`` little-endian uint64: one 128-bit label per wire and copy."""

_OUTPUT_TWEAK = np.uint64(1 << 63)  # output-digest tweaks sit above every gate tweak (2g + 1 < 2^63)
_CHUNK = 1024  # copies garbled together: bounds label memory to n_wires · 16 KiB


def _mask(bits: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """0/1 per row → all-zero / all-one 128-bit row mask of shape ``(n, 1)``."""
    return (np.uint64(0) - bits)[:, None]


def _colour(labels: Blocks) -> npt.NDArray[np.uint64]:
    return labels[:, 0] & np.uint64(1)


@dataclass(frozen=True, eq=False)
class GarbledCircuit:
    """What the garbler sends the evaluator, besides input labels.

    Attributes:
        n_copies: how many copies of the circuit were garbled together.
        tables: ``(and_count, n_copies, 2, 2)`` uint64: rows ``T_G``, ``T_E`` per AND gate.
        decoding: ``(n_output_wires, n_copies)`` colour of each output's 0-label.
        digests: ``(n_output_wires, n_copies, 2)`` 64-bit hash of the output label of each colour.
    """

    n_copies: int
    tables: npt.NDArray[np.uint64]
    decoding: Bits
    digests: npt.NDArray[np.uint64]

    def to_bytes(self) -> bytes:
        """Canonical encoding: tables, then packed decoding bits, then digests (little-endian)."""
        return b"".join(
            (
                np.ascontiguousarray(self.tables, dtype=LABEL_DTYPE).tobytes(),
                np.packbits(self.decoding, axis=None, bitorder="little").tobytes(),
                np.ascontiguousarray(self.digests, dtype=LABEL_DTYPE).tobytes(),
            )
        )

    @classmethod
    def from_bytes(cls, circuit: Circuit, n_copies: int, data: bytes) -> GarbledCircuit:
        """Parse :meth:`to_bytes` output for a known circuit and copy count.

        Raises:
            MessageFormatError: the length does not match the circuit and copy count.
        """
        n_out = len(circuit.output_wires)
        table_bytes = circuit.and_count * n_copies * 32
        bit_bytes = (n_out * n_copies + 7) // 8
        digest_bytes = n_out * n_copies * 16
        if n_copies <= 0 or len(data) != table_bytes + bit_bytes + digest_bytes:
            raise MessageFormatError(
                f"garbled circuit message has {len(data)} bytes, expected {table_bytes + bit_bytes + digest_bytes}"
            )
        tables = np.frombuffer(data, LABEL_DTYPE, count=table_bytes // 8).reshape(circuit.and_count, n_copies, 2, 2)
        packed = np.frombuffer(data, np.uint8, count=bit_bytes, offset=table_bytes)
        decoding = np.unpackbits(packed, count=n_out * n_copies, bitorder="little").reshape(n_out, n_copies)
        digests = np.frombuffer(data, LABEL_DTYPE, offset=table_bytes + bit_bytes).reshape(n_out, n_copies, 2)
        return cls(n_copies=n_copies, tables=tables, decoding=decoding, digests=digests)


@dataclass(frozen=True, eq=False)
class GarblerKeys:
    """The garbler's secrets: ``Δ`` and the 0-label of every input wire of every copy.

    Attributes:
        delta: ``(1, 2)`` uint64, the global free-XOR offset (``lsb = 1``).
        zero_labels: ``(n_inputs, n_copies, 2)`` uint64.
    """

    delta: Blocks
    zero_labels: LabelArray

    def label_pairs(self, wires: Sequence[int]) -> tuple[LabelArray, LabelArray]:
        """``(W⁰, W¹)`` of the given input wires for every copy: the sender's messages of an OT."""
        zero = self.zero_labels[list(wires)]
        return zero, zero ^ self.delta

    def active_labels(self, wires: Sequence[int], bits: Bits) -> LabelArray:
        """The label encoding ``bits`` (``(len(wires), n_copies)``) on each wire: the garbler's own inputs.

        Raises:
            CircuitError: ``bits`` does not have one row per wire and one column per copy.
        """
        zero = self.zero_labels[list(wires)]
        if bits.shape != zero.shape[:2]:
            raise CircuitError("need one bit per input wire and copy")
        return zero ^ ((np.uint64(0) - bits.astype(np.uint64))[..., None] & self.delta)


def garble(
    circuit: Circuit, n_copies: int, random_bytes: RandomBytes = os_random_bytes
) -> tuple[GarbledCircuit, GarblerKeys]:
    """Garble ``n_copies`` independent copies of ``circuit`` under one ``Δ``.

    Args:
        circuit: the public circuit.
        n_copies: number of copies (e.g. one per ReLU of a layer).
        random_bytes: source of ``Δ`` and the input labels; the OS CSPRNG unless
            a known-answer test needs a fixed stream.

    Returns:
        The garbled circuit to send, and the keys the garbler keeps.

    Raises:
        CircuitError: ``n_copies`` is not positive.
    """
    if n_copies <= 0:
        raise CircuitError("garble at least one copy")
    delta = random_blocks(1, random_bytes)
    delta[0, 0] |= np.uint64(1)  # point-and-permute: the two labels of a wire have different colours
    zero_labels = random_blocks(circuit.n_inputs * n_copies, random_bytes).reshape(circuit.n_inputs, n_copies, 2)
    n_out = len(circuit.output_wires)
    tables = np.empty((circuit.and_count, n_copies, 2, 2), dtype=LABEL_DTYPE)
    decoding = np.empty((n_out, n_copies), dtype=np.uint8)
    digests = np.empty((n_out, n_copies, 2), dtype=LABEL_DTYPE)
    hash_ = FixedKeyHash(GARBLE_HASH_KEY)
    for start in range(0, n_copies, _CHUNK):
        stop = min(start + _CHUNK, n_copies)
        labels = _garble_chunk(circuit, zero_labels[:, start:stop], delta, tables[:, start:stop], hash_, start)
        for row, wire in enumerate(circuit.output_wires):
            zero = labels[wire]
            colour = _colour(zero)
            decoding[row, start:stop] = colour
            tweak = _tweaks(start, stop, _OUTPUT_TWEAK + np.uint64(row))
            h0 = hash_(zero, tweak)[:, 0]
            h1 = hash_(zero ^ delta, tweak)[:, 0]
            digests[row, start:stop, 0] = np.where(colour == 0, h0, h1)
            digests[row, start:stop, 1] = np.where(colour == 0, h1, h0)
    return (
        GarbledCircuit(n_copies=n_copies, tables=tables, decoding=decoding, digests=digests),
        GarblerKeys(delta=delta, zero_labels=zero_labels),
    )


def _tweaks(start: int, stop: int, low: np.uint64) -> Blocks:
    tweak = np.empty((stop - start, 2), dtype=LABEL_DTYPE)
    tweak[:, 0] = low
    tweak[:, 1] = np.arange(start, stop, dtype=LABEL_DTYPE)
    return tweak


@dataclass(frozen=True)
class _Level:
    """Gates whose inputs are all ready once the previous levels ran: done together."""

    xor: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]  # out, a, b
    inv: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]  # out, a
    and_: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]  # + index


_SCHEDULES: WeakKeyDictionary[Circuit, list[_Level]] = WeakKeyDictionary()


def _schedule(circuit: Circuit) -> list[_Level]:
    """The gates by depth (1 + the deepest input), each AND keeping its index (its tweak).

    Running a level at once turns thousands of small array operations into a few hundred
    larger ones — the same results, since gates of one level never feed each other.
    """
    cached = _SCHEDULES.get(circuit)
    if cached is not None:
        return cached
    depth = [0] * circuit.n_wires
    by_level: dict[int, list[tuple[Op, int, int, int, int]]] = {}
    and_index = 0
    for op, a, b, out in circuit.gates:
        level = 1 + max(depth[a], depth[b] if b >= 0 else 0)
        depth[out] = level
        by_level.setdefault(level, []).append((op, a, b, out, and_index))
        and_index += op is Op.AND

    def columns(gates: list[tuple[Op, int, int, int, int]], op: Op, fields: tuple[int, ...]) -> list[np.ndarray]:
        chosen = [g for g in gates if g[0] is op]
        return [np.array([g[f] for g in chosen], dtype=np.intp) for f in fields]

    levels = []
    for level in sorted(by_level):
        gates = by_level[level]
        xo, xa, xb = columns(gates, Op.XOR, (3, 1, 2))
        io, ia = columns(gates, Op.INV, (3, 1))
        ao, aa, ab, ai = columns(gates, Op.AND, (3, 1, 2, 4))
        levels.append(_Level((xo, xa, xb), (io, ia), (ao, aa, ab, ai)))
    _SCHEDULES[circuit] = levels
    return levels


def _and_levels(
    circuit: Circuit, labels: LabelArray, inv_offset: Blocks | None
) -> Iterator[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """Run each level's free gates on ``labels`` in place; yield its AND gates (out, a, b, index).

    INV flips the garbler's meaning (``inv_offset`` = Δ) and is a copy for the evaluator (None).
    """
    for level in _schedule(circuit):
        (xo, xa, xb), (io, ia), and_gates = level.xor, level.inv, level.and_
        if len(xo):
            labels[xo] = labels[xa] ^ labels[xb]
        if len(io):
            labels[io] = labels[ia] if inv_offset is None else labels[ia] ^ inv_offset
        if len(and_gates[0]):
            yield and_gates


def _all_tweaks(and_count: int, n: int, first_copy: int) -> npt.NDArray[np.uint64]:
    """Tweaks ``[parity, g, copy] = (2g + parity, copy)`` of every AND gate g for copies ``first_copy …``."""
    tweak = np.empty((2, and_count, n, 2), dtype=LABEL_DTYPE)
    gates = np.arange(and_count, dtype=LABEL_DTYPE)[:, None]
    tweak[0, :, :, 0] = np.uint64(2) * gates
    tweak[1, :, :, 0] = np.uint64(2) * gates + np.uint64(1)
    tweak[:, :, :, 1] = np.arange(first_copy, first_copy + n, dtype=LABEL_DTYPE)
    return tweak


def _garble_chunk(
    circuit: Circuit,
    zero_inputs: LabelArray,
    delta: Blocks,
    tables: npt.NDArray[np.uint64],
    hash_: FixedKeyHash,
    first_copy: int,
) -> LabelArray:
    """0-labels of every wire for copies ``first_copy …``; fills the chunk's tables in place."""
    n = zero_inputs.shape[1]
    labels = np.empty((circuit.n_wires, n, 2), dtype=LABEL_DTYPE)
    labels[: circuit.n_inputs] = zero_inputs
    all_tweaks = _all_tweaks(circuit.and_count, n, first_copy)
    for ao, aa, ab, index in _and_levels(circuit, labels, inv_offset=delta):
        k = len(ao)
        a0, b0 = labels[aa].reshape(-1, 2), labels[ab].reshape(-1, 2)
        even, odd = all_tweaks[0, index].reshape(-1, 2), all_tweaks[1, index].reshape(-1, 2)
        h = hash_(np.concatenate((a0, a0 ^ delta, b0, b0 ^ delta)), np.concatenate((even, even, odd, odd)))
        ha0, ha1, hb0, hb1 = np.split(h, 4)
        pa, pb = _mask(_colour(a0)), _mask(_colour(b0))
        # ZRE15 Fig. 2: garbler half-gate (a AND known p_b), evaluator half-gate (a AND b ⊕ p_b)
        t_g = ha0 ^ ha1 ^ (pb & delta)
        w_g = ha0 ^ (pa & t_g)
        t_e = hb0 ^ hb1 ^ a0
        w_e = hb0 ^ (pb & (t_e ^ a0))
        labels[ao] = (w_g ^ w_e).reshape(k, n, 2)
        tables[index, :, 0] = t_g.reshape(k, n, 2)
        tables[index, :, 1] = t_e.reshape(k, n, 2)
    return labels


def evaluate(circuit: Circuit, garbled: GarbledCircuit, input_labels: LabelArray) -> Bits:
    """Evaluate every copy and decode its outputs.

    Args:
        circuit: the public circuit the garbler used.
        garbled: tables, decoding bits and output digests from the garbler.
        input_labels: ``(n_inputs, n_copies, 2)`` active label of every input wire.

    Returns:
        ``(n_output_wires, n_copies)`` output bits, rows in ``circuit.output_wires`` order.

    Raises:
        CircuitError: the label array or the tables do not fit the circuit.
        OutputAuthenticationError: some output label is neither label the garbler
            committed to (a table or input label was altered).
    """
    n, n_out = garbled.n_copies, len(circuit.output_wires)
    if (
        input_labels.shape != (circuit.n_inputs, n, 2)
        or garbled.tables.shape != (circuit.and_count, n, 2, 2)
        or garbled.decoding.shape != (n_out, n)
        or garbled.digests.shape != (n_out, n, 2)
    ):
        raise CircuitError("input labels or garbled circuit do not match the circuit and copy count")
    hash_ = FixedKeyHash(GARBLE_HASH_KEY)
    bits = np.empty((n_out, n), dtype=np.uint8)
    forged = 0
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        labels = _evaluate_chunk(circuit, input_labels[:, start:stop], garbled.tables[:, start:stop], hash_, start)
        for row, wire in enumerate(circuit.output_wires):
            label = labels[wire]
            colour = _colour(label)
            digest = hash_(label, _tweaks(start, stop, _OUTPUT_TWEAK + np.uint64(row)))[:, 0]
            expected = np.take_along_axis(garbled.digests[row, start:stop], colour[:, None].astype(np.intp), axis=1)
            forged += int(np.count_nonzero(digest != expected[:, 0]))
            bits[row, start:stop] = colour.astype(np.uint8) ^ garbled.decoding[row, start:stop]
    if forged:
        raise OutputAuthenticationError(f"{forged} output labels match no committed label")
    return bits


def _evaluate_chunk(
    circuit: Circuit, inputs: LabelArray, tables: npt.NDArray[np.uint64], hash_: FixedKeyHash, first_copy: int
) -> LabelArray:
    n = inputs.shape[1]
    labels = np.empty((circuit.n_wires, n, 2), dtype=LABEL_DTYPE)
    labels[: circuit.n_inputs] = inputs
    all_tweaks = _all_tweaks(circuit.and_count, n, first_copy)
    for ao, aa, ab, index in _and_levels(circuit, labels, inv_offset=None):
        k = len(ao)
        wa, wb = labels[aa].reshape(-1, 2), labels[ab].reshape(-1, 2)
        h = hash_(np.concatenate((wa, wb)), all_tweaks[:, index].reshape(-1, 2))
        rows = tables[index]  # (k, n, 2, 2)
        t_g, t_e = rows[:, :, 0].reshape(-1, 2), rows[:, :, 1].reshape(-1, 2)
        w_g = h[: k * n] ^ (_mask(_colour(wa)) & t_g)
        w_e = h[k * n :] ^ (_mask(_colour(wb)) & (t_e ^ wa))
        labels[ao] = (w_g ^ w_e).reshape(k, n, 2)
    return labels
