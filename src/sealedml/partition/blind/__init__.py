"""Blinded, verified offload of linear layers (Slalom-style): see docs/blinded-offload.md.

``field`` (Z_p and its exactness bounds), ``linear`` (finding, quantizing and applying
the outsourced layers), ``plan`` (the middle's TEE segments between them), ``masks``
(sealed one-time masks in untrusted storage), ``verify`` (Freivalds checks), ``spec``
(what ``partition.json`` records) and ``check`` (the whole TEE side in one process).
The runtime's engine is :mod:`sealedml.runtime.blinded`.
"""
