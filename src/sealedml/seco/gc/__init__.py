"""Garbled circuits and oblivious transfer for SECO's three-party ReLU.

Built in-house on standard primitives because no maintained Python library
exists (``docs/decisions/0009-in-house-garbled-circuits.md``). Semi-honest only:
a garbler that cheats or a garbler and evaluator that collude are out of scope.

* :mod:`.circuit` / :mod:`.builder` — boolean circuits, k-bit arithmetic with 1 AND per bit.
* :mod:`.garble` — free-XOR + half-gates garbling of many copies at once (fixed-key AES).
* :mod:`.ot` — Chou–Orlandi base OT on Ed25519, IKNP extension; message-based.
* :mod:`.relu` — SECO's ``relu_3`` circuit over p = 2061584302081 and an in-process run.
* :mod:`.errors` — the typed errors (protocol, circuit, input).
"""

from __future__ import annotations

from sealedml.seco.gc.builder import CircuitBuilder
from sealedml.seco.gc.circuit import Circuit, Gate, Op, Port, bits_to_words, words_to_bits
from sealedml.seco.gc.errors import (
    CircuitError,
    GcInputError,
    GcProtocolError,
    InvalidPointError,
    MessageFormatError,
    OutputAuthenticationError,
)
from sealedml.seco.gc.garble import GarbledCircuit, GarblerKeys, evaluate, garble
from sealedml.seco.gc.ot import (
    KAPPA,
    BaseOtReceiver,
    BaseOtSender,
    OtExtensionReceiver,
    OtExtensionSender,
    base_ot_decrypt,
    base_ot_encrypt,
)
from sealedml.seco.gc.relu import (
    FRACTIONAL_BITS,
    MODULUS,
    WORD_BITS,
    Relu3Result,
    decode_fixed,
    encode_fixed,
    relu3_circuit,
    run_relu3,
)

__all__ = [
    "FRACTIONAL_BITS",
    "KAPPA",
    "MODULUS",
    "WORD_BITS",
    "BaseOtReceiver",
    "BaseOtSender",
    "Circuit",
    "CircuitBuilder",
    "CircuitError",
    "GarbledCircuit",
    "GarblerKeys",
    "Gate",
    "GcInputError",
    "GcProtocolError",
    "InvalidPointError",
    "MessageFormatError",
    "Op",
    "OtExtensionReceiver",
    "OtExtensionSender",
    "OutputAuthenticationError",
    "Port",
    "Relu3Result",
    "base_ot_decrypt",
    "base_ot_encrypt",
    "bits_to_words",
    "decode_fixed",
    "encode_fixed",
    "evaluate",
    "garble",
    "relu3_circuit",
    "run_relu3",
    "words_to_bits",
]
