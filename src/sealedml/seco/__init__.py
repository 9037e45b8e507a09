"""SECO mode: cryptographic split inference across a server hierarchy, no TEE.

The user's gateway A and two remote servers B and C evaluate a model's back
part on additive shares: linear layers under threshold homomorphic
encryption, ReLUs in a three-party garbled circuit (:mod:`sealedml.seco.gc`).
See ``docs/decisions/0009-in-house-garbled-circuits.md`` for what the garbled
layer does and does not protect against.
"""
