"""What a memory-bounded model reports: per-run figures and what construction did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LoadStats", "RunStats", "SegmentStats"]


@dataclass(frozen=True)
class SegmentStats:
    """Timings of one segment in one run.

    Attributes:
        index: the segment.
        weight_bytes: bytes decrypted for it (optimized weights for an optimized segment).
        decrypt_s: seconds spent decrypting its weights (on the prefetch thread when prefetching).
        wait_s: seconds the compute thread waited for those weights.
        compute_s: seconds in ONNX Runtime.
    """

    index: int
    weight_bytes: int
    decrypt_s: float
    wait_s: float
    compute_s: float


@dataclass(frozen=True)
class RunStats:
    """Per-run figures of a :class:`StreamingModel`.

    Attributes:
        peak_bytes: tracked peak of decrypted weights + live activations (+ the planner's
            estimate of ONNX Runtime's intermediates inside the running segment, + decryption
            scratch).
        peak_breakdown: bytes per kind at the peak (weights, activations, estimated, scratch).
        budget_bytes: the plan's budget.
        total_s: wall time of the run.
        decrypt_s: total decryption time (overlapped with compute when prefetching).
        compute_s: total ONNX Runtime time.
        wait_s: time the compute thread waited for weights.
        segments: per-segment figures.
    """

    peak_bytes: int
    peak_breakdown: Mapping[str, int]
    budget_bytes: int
    total_s: float
    decrypt_s: float
    compute_s: float
    wait_s: float
    segments: tuple[SegmentStats, ...]


@dataclass(frozen=True)
class LoadStats:
    """What construction did (the optimized-segment pass in particular).

    Attributes:
        total_s: construction wall time (planning, optimization, sessions).
        optimize_s: time of the optimization pass: decrypting the container, ONNX Runtime's
            optimizer, spilling, verification and runtime sessions (0 when not optimizing).
        plans: plans made (more than one when optimized weights outgrew the first plan).
        headroom_bytes: budget held back for optimized weights larger than the originals.
        optimized_segments: segments running the optimized graph.
        fallbacks: ``(segment, reason)`` for every segment that runs the unoptimized path
            although optimization was asked for.
        weight_bytes: bytes of weights decrypted per run with the final segment modes.
        sealed_weight_bytes: bytes of the plan's original weights (``plan.weight_bytes``).
        spill_bytes: ciphertext bytes in the spill after load (tags included).
        nchwc_nodes: NCHWc kernels in the optimized segment graphs.
    """

    total_s: float
    optimize_s: float
    plans: int
    headroom_bytes: int
    optimized_segments: int
    fallbacks: tuple[tuple[int, str], ...]
    weight_bytes: int
    sealed_weight_bytes: int
    spill_bytes: int
    nchwc_nodes: int
