"""Ternary model partitioning (Gu et al., "Confidential Inference via Ternary Model Partitioning").

A model is cut twice: the *front* (the first layers, whose outputs still
resemble the input) and the *back* (the last layers, whose outputs reveal the
prediction) run in the TEE; the *middle* runs on untrusted, faster hardware and
sees only the intermediate representations at the front cut.

* :mod:`sealedml.partition.graph` — which tensor sets separate a graph (cuts);
* :mod:`sealedml.partition.split` — the three-way split and its manifest;
* :mod:`sealedml.partition.flops` — operations per node, for the TEE's share.

See ``docs/partition.md``.
"""
