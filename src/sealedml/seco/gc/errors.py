"""Errors of the garbled-circuit and oblivious-transfer layer.

They extend the SealedML tree (:mod:`sealedml.errors`) so a caller catching
``sealedml.errors.Error`` sees them too::

    ProtocolError                  (sealedml.errors)
    └── GcProtocolError            a SECO GC/OT message breaks the protocol
        ├── MessageFormatError     wrong length, wrong count, wrong batch
        ├── InvalidPointError      not a valid point of the prime-order Ed25519 subgroup
        └── OutputAuthenticationError
                                   an output label matches neither committed label
    ConfigurationError             (sealedml.errors)
    └── CircuitError               a circuit is malformed or a builder was misused
    InputError                     (sealedml.errors)
    └── GcInputError               a local input (share, mask, word, choice bit) is out of range

Messages name the message and the sizes involved, never label, key or share
bytes: an evaluator's labels are as secret as the garbler's inputs.
"""

from __future__ import annotations

from sealedml.errors import ConfigurationError, InputError, ProtocolError

__all__ = [
    "CircuitError",
    "GcInputError",
    "GcProtocolError",
    "InvalidPointError",
    "MessageFormatError",
    "OutputAuthenticationError",
]


class GcProtocolError(ProtocolError):
    """A garbled-circuit or OT message from a peer, or a call out of order, breaks the protocol."""

    code = "gc_protocol"


class MessageFormatError(GcProtocolError):
    """A message has the wrong length, count or batch number for the round it belongs to."""

    code = "gc_message_format"


class InvalidPointError(GcProtocolError):
    """A base-OT group element is not a valid point of the prime-order subgroup.

    Covers non-canonical encodings, the identity, small-order (torsion) points
    and points outside the subgroup: each would let the peer bias or learn the
    derived OT keys.
    """

    code = "gc_invalid_point"


class OutputAuthenticationError(GcProtocolError):
    """An output label matches neither of the garbler's committed output labels.

    Raised when a garbled table or an input label was altered (or corrupted in
    transit). It detects accidents and a tampering *evaluator-side* peer; a
    cheating garbler can still garble a different circuit (semi-honest only).
    """

    code = "gc_output_auth"


class CircuitError(ConfigurationError):
    """A circuit is malformed (wire out of range, not topological) or a builder was misused."""

    code = "gc_circuit"


class GcInputError(InputError):
    """A local input does not fit: a share or mask not in [0, p), a word too wide, a choice bit not 0/1."""

    code = "gc_input"
