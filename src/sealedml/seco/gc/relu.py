"""SECO's three-party ReLU (``relu_3``): shares in, re-masked ReLU out, one garbled copy per value.

Arithmetic is over SECO's field ``p = 2061584302081`` (41 bits) with fixed-point
values carrying :data:`FRACTIONAL_BITS` fractional bits; a field element above
``(p − 1) / 2`` is negative. Per value, with ``y = y_A + y_B + y_C mod p``::

    out = (ReLU(y) + r'_A + r'_B) mod p

Roles (``docs/decisions/0009-in-house-garbled-circuits.md``): **B** garbles and
sends the circuit plus the labels of its own ``y_B`` and ``r'_B`` to **C**; **A**
obtains the labels of ``y_A`` and ``r'_A`` from B by OT and forwards them to C;
**C** obtains the labels of ``y_C`` from B by OT, evaluates and learns ``out``
— the next layer's masked input. ReLU is not scaled: ReLU commutes with the
fixed-point encoding, so no truncation is needed here. (SECO's code clamps to
ReLU6 as Delphi does; this circuit computes the plain ReLU.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

from sealedml.crypto.random import random_bytes as os_random_bytes
from sealedml.seco.gc._primitives import LABEL_DTYPE, RandomBytes
from sealedml.seco.gc.builder import ZERO, CircuitBuilder
from sealedml.seco.gc.circuit import Circuit, Words, bits_to_words
from sealedml.seco.gc.errors import GcInputError
from sealedml.seco.gc.garble import GarbledCircuit, evaluate, garble
from sealedml.seco.gc.ot import OtExtensionReceiver, OtExtensionSender

__all__ = [
    "FRACTIONAL_BITS",
    "MODULUS",
    "WORD_BITS",
    "Relu3Result",
    "decode_fixed",
    "encode_fixed",
    "relu3_circuit",
    "run_relu3",
]

MODULUS = 2061584302081
"""SECO's plaintext prime p (= 15·2^37 + 1)."""
WORD_BITS = MODULUS.bit_length()
"""41: bits of a field element in the circuit."""
FRACTIONAL_BITS = 8
"""Fixed-point scale 2^8, as in SECO."""

GARBLER, CHOOSER, EVALUATOR = "B", "A", "C"


@cache
def relu3_circuit(shift: int = 0) -> Circuit:
    """The ``relu_3`` circuit for one value (inputs: ``y_B, r_B`` of B, ``y_A, r_A`` of A, ``y_C`` of C).

    ``shift``: truncate ReLU(v) by that many bits (⌊ReLU(v) / 2^shift⌋) before the masks are
    added — how a fixed-point product at scale 2^(2f) returns to 2^f (``shift = f``), as
    Delphi's ReLU circuits do. It costs nothing: the low bits are dropped wires, and their
    AND gates vanish with them.

    572 AND gates with k = 41: four additions mod p at 123 each (the two that sum
    the shares, one for ``r'_A + r'_B``, one adding that to the result), the sign
    test ``[v < (p + 1) / 2]`` against a folded constant (40), and ReLU as
    ``v ∧ positive`` on the 40 bits a positive value can use (40). Summing three shares first and reducing
    from ``[0, 3p)`` costs about the same (two conditional subtractions), so the
    simpler form stays.
    """
    if not 0 <= shift < WORD_BITS - 1:
        raise GcInputError(f"shift must be in [0, {WORD_BITS - 1})")
    b = CircuitBuilder()
    y_b = b.input(GARBLER, "y_B", WORD_BITS)
    r_b = b.input(GARBLER, "r_B", WORD_BITS)
    y_a = b.input(CHOOSER, "y_A", WORD_BITS)
    r_a = b.input(CHOOSER, "r_A", WORD_BITS)
    y_c = b.input(EVALUATOR, "y_C", WORD_BITS)
    v = b.add_mod(b.add_mod(y_a, y_b, MODULUS), y_c, MODULUS)
    positive = b.less_than(v, b.const((MODULUS + 1) // 2, WORD_BITS))  # v ≤ (p − 1)/2
    # A positive v is at most (p − 1)/2 < 2^40, so ReLU's top bit is always 0: one AND saved.
    relu = (*(b.and_(bit, positive) for bit in v[shift:-1]), *(ZERO,) * (shift + 1))
    b.output(EVALUATOR, "out", b.add_mod(relu, b.add_mod(r_a, r_b, MODULUS), MODULUS))
    return b.build()


def encode_fixed(values: npt.ArrayLike) -> Words:
    """Reals → field elements: ``round(x · 2^8) mod p``.

    Raises:
        GcInputError: a value's magnitude exceeds ``(p − 1) / 2`` after scaling.
    """
    scaled = np.rint(np.asarray(values, dtype=np.float64) * (1 << FRACTIONAL_BITS))
    if np.any(np.abs(scaled) > (MODULUS - 1) // 2):
        raise GcInputError("a value is outside the fixed-point range of the field")
    return np.mod(scaled.astype(np.int64), MODULUS).astype(np.uint64)


def decode_fixed(words: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Field elements → reals, reading elements above ``(p − 1) / 2`` as negative."""
    signed = np.asarray(words, dtype=np.uint64).astype(np.int64)
    signed = np.where(signed > (MODULUS - 1) // 2, signed - MODULUS, signed)
    return signed.astype(np.float64) / (1 << FRACTIONAL_BITS)


@dataclass(frozen=True)
class Relu3Result:
    """Outcome of :func:`run_relu3`.

    Attributes:
        values: what C learns, ``(ReLU(y) + r'_A + r'_B) mod p`` per value.
        and_gates: AND gates per ReLU (each costs 32 bytes of table).
        traffic: bytes sent per link and message (``"B→C tables"``, ``"A→C labels"``, …).
    """

    values: Words
    and_gates: int
    traffic: Mapping[str, int]


def _field_words(name: str, values: npt.ArrayLike, n: int | None) -> Words:
    array = np.asarray(values)
    if array.ndim != 1 or (n is not None and len(array) != n):
        raise GcInputError(f"{name} must be a 1-D array with one element per value")
    as_int = [int(v) for v in array.tolist()]
    if any(not 0 <= v < MODULUS for v in as_int):
        raise GcInputError(f"{name} has an element outside [0, p)")
    return np.array(as_int, dtype=np.uint64)


def _transfer(
    wires: tuple[int, ...],
    bits: npt.NDArray[np.uint8],
    pairs: tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]],
    session: bytes,
    random_bytes: RandomBytes,
    traffic: dict[str, int],
    chooser: str,
) -> npt.NDArray[np.uint64]:
    """One IKNP link between ``chooser`` and the garbler, message by message; returns the chosen labels."""
    receiver = OtExtensionReceiver(session, random_bytes)
    sender = OtExtensionSender(session, random_bytes)
    first = receiver.base_message()
    reply = sender.base_reply(first)
    receiver.finish_base(reply)
    request = receiver.request(bits.ravel())
    zero, one = pairs
    response = sender.respond(request, zero.reshape(-1, 2), one.reshape(-1, 2))
    traffic[f"{chooser}→B OT"] = len(first) + len(request)
    traffic[f"B→{chooser} OT"] = len(reply) + len(response)
    return receiver.receive(response).reshape(len(wires), bits.shape[1], 2)


def run_relu3(
    y_a: npt.ArrayLike,
    y_b: npt.ArrayLike,
    y_c: npt.ArrayLike,
    r_a: npt.ArrayLike,
    r_b: npt.ArrayLike,
    *,
    session: bytes = b"seco/relu3",
    random_bytes: RandomBytes = os_random_bytes,
) -> Relu3Result:
    """Run garbling → OT → evaluation for ``n`` ReLUs in one process, passing every message as bytes.

    Args:
        y_a, y_b, y_c: additive shares of ``y`` mod p held by A, B and C.
        r_a, r_b: the next layer's output masks of A and B.
        session: binds the base-OT keys to this run (use a fresh value per query and layer).
        random_bytes: secret randomness for labels and OT (OS CSPRNG by default).

    Returns:
        C's masked outputs, the AND count and the bytes each link carried.

    Raises:
        GcInputError: an input is not a 1-D array of elements of ``[0, p)``, or lengths differ.
    """
    y_a_w = _field_words("y_A", y_a, None)
    n = len(y_a_w)
    if n == 0:
        raise GcInputError("run at least one ReLU")
    inputs = {
        "y_A": y_a_w,
        "y_B": _field_words("y_B", y_b, n),
        "y_C": _field_words("y_C", y_c, n),
        "r_A": _field_words("r_A", r_a, n),
        "r_B": _field_words("r_B", r_b, n),
    }
    circuit = relu3_circuit()
    traffic: dict[str, int] = {}

    # B: garble; its own labels and the tables go to C.
    garbled, keys = garble(circuit, n, random_bytes)
    tables_message = garbled.to_bytes()
    b_wires = circuit.party_wires(GARBLER)
    b_labels = keys.active_labels(b_wires, circuit.party_input_bits(GARBLER, inputs)).astype(LABEL_DTYPE).tobytes()
    traffic["B→C tables"] = len(tables_message)
    traffic["B→C labels"] = len(b_labels)

    # A ↔ B: labels of y_A, r'_A by OT; A forwards them to C unread (it cannot read them anyway).
    a_wires = circuit.party_wires(CHOOSER)
    a_labels = _transfer(
        a_wires,
        circuit.party_input_bits(CHOOSER, inputs),
        keys.label_pairs(a_wires),
        session + b"/A-B",
        random_bytes,
        traffic,
        CHOOSER,
    )
    forwarded = a_labels.astype(LABEL_DTYPE).tobytes()
    traffic["A→C labels"] = len(forwarded)

    # C ↔ B: labels of y_C by OT.
    c_wires = circuit.party_wires(EVALUATOR)
    c_labels = _transfer(
        c_wires,
        circuit.party_input_bits(EVALUATOR, inputs),
        keys.label_pairs(c_wires),
        session + b"/C-B",
        random_bytes,
        traffic,
        EVALUATOR,
    )

    # C: parse what it received, place labels by wire, evaluate, decode.
    received = GarbledCircuit.from_bytes(circuit, n, tables_message)
    labels = np.empty((circuit.n_inputs, n, 2), dtype=LABEL_DTYPE)
    labels[list(b_wires)] = np.frombuffer(b_labels, dtype=LABEL_DTYPE).reshape(len(b_wires), n, 2)
    labels[list(a_wires)] = np.frombuffer(forwarded, dtype=LABEL_DTYPE).reshape(len(a_wires), n, 2)
    labels[list(c_wires)] = c_labels
    out = bits_to_words(evaluate(circuit, received, labels))
    return Relu3Result(values=out, and_gates=circuit.and_count, traffic=traffic)
