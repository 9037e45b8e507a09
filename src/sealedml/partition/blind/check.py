"""Blinded offload of a partition in one process: for ``partition split --check`` and benchmarks.

:func:`local_blinded` builds the TEE side exactly as a runtime does (plan, sealed
mask pool, Freivalds checks) around an executor in this process or given ones;
:func:`blinded_matches_quantized` checks that the blinded middle equals the
quantized middle bit for bit on given inputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sealedml.partition.blind.masks import MaskPool
from sealedml.partition.blind.plan import BlindPlan

if TYPE_CHECKING:
    from sealedml.partition.split import Partition
    from sealedml.runtime.blinded import BlindedMiddle, LinearExecutor

__all__ = ["blinded_matches_quantized", "front_outputs", "local_blinded"]


def local_blinded(
    partition: Partition,
    executors: Sequence[LinearExecutor] | None = None,
    *,
    masks_dir: Path | None = None,
    threads: int = 1,
) -> BlindedMiddle:
    """The TEE side of a blinded partition, with an honest in-process executor unless ``executors`` are given.

    The mask pool starts empty (records are made on demand); call ``masks.precompute(n)``
    to make them ahead, as a runtime does in the background.
    """
    from sealedml.errors import ConfigurationError
    from sealedml.runtime.blinded import BlindedMiddle, LocalLinearExecutor

    spec = partition.manifest.blind
    if spec is None:
        raise ConfigurationError("not a blinded partition (split it with --blind)")
    plan = BlindPlan(partition.middle, weight_bits=spec.weight_bits, input_bits=spec.input_bits, threads=threads)
    directory = masks_dir or Path(tempfile.mkdtemp(prefix="sealedml-masks-"))
    masks = MaskPool(plan.layers, [tuple(layer.input_shape) for layer in spec.layers], directory, label=b"local/1")
    return BlindedMiddle(plan, list(executors) if executors is not None else [LocalLinearExecutor(plan.layers)], masks)


def front_outputs(partition: Partition, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The front cut's tensors for ``inputs`` (the front run with ONNX Runtime)."""
    from sealedml.partition.split import _session

    front = partition.front
    names = [o.name for o in front.graph.output]
    return dict(zip(names, _session(front).run(names, dict(inputs)), strict=True))


def blinded_matches_quantized(partition: Partition, inputs: Mapping[str, np.ndarray]) -> bool:
    """Whether the blinded middle's outputs equal the quantized middle's exactly on ``inputs``."""
    middle = local_blinded(partition)
    try:
        crossing = front_outputs(partition, inputs)
        got, want = middle.run(crossing), middle.reference(crossing)
        return all(np.array_equal(got[name], want[name]) for name in want)
    finally:
        middle.close()
