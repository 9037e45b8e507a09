"""Load-time preparation: every segment's state, the spill, and re-planning for grown weights.

:func:`prepare` runs once, when a model is built. Without optimization every segment
runs sealed (:meth:`~.builder.SegmentBuilder.sealed`). With it, every segment is
optimized and its weights spilled (:meth:`~.builder.SegmentBuilder.optimized`); NCHWc
pads channels, so optimized weights can outgrow the plan, and the executor's own plan is
then made again with that headroom kept out of the budget (at most twice). A segment
whose optimized weights still break the budget, or whose optimization failed, runs
sealed (a *fallback*, reported in the model's load figures).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from sealedml._internal.malloc import trim_heap
from sealedml._internal.units import format_bytes
from sealedml.crypto import TAG_SIZE
from sealedml.envelope.model_container import SealedModelReader
from sealedml.errors import ConfigurationError
from sealedml.runtime.memory_bounded.builder import SegmentBuilder, SegmentSet, SegmentState
from sealedml.runtime.memory_bounded.container import Container
from sealedml.runtime.memory_bounded.decrypt import ScratchBuffer
from sealedml.runtime.memory_bounded.optimize import memfd_supported
from sealedml.runtime.memory_bounded.planner import BudgetError
from sealedml.runtime.memory_bounded.planner import plan as make_plan
from sealedml.runtime.memory_bounded.segments import Plan, Segment
from sealedml.runtime.memory_bounded.spill import SpillStore

__all__ = ["DEFAULT_SPILL_CHUNK", "Prepared", "planning_reserve", "prepare", "spill_chunk_size"]

log = logging.getLogger(__name__)

#: Largest plaintext chunk of the spill (the scratch reserve may make it smaller).
DEFAULT_SPILL_CHUNK = 1 << 20
#: When the executor plans itself, a spill chunk may take up to this share of the budget.
_SPILL_SHARE = 32
#: Re-plans with more headroom when optimized weights outgrow the plan (then per-segment fallback).
_MAX_REPLANS = 2
_HEADROOM_QUANTUM = 64 * 1024


def spill_chunk_size(requested: int, reserve: int) -> int:
    """The spill chunk: at most ``requested`` bytes, its ciphertext buffer within ``reserve``.

    Args:
        requested: the preferred plaintext chunk size.
        reserve: the scratch bytes one decrypting thread may hold.

    Returns:
        A positive size, a multiple of 4 KiB when at least 4 KiB.
    """
    size = min(requested, reserve - TAG_SIZE)
    if size >= 4096:
        size -= size % 4096
    return max(1, size)


def planning_reserve(container_reserve: int, budget_bytes: int, spill_chunk: int, *, optimize: bool) -> int:
    """The scratch a plan made by the executor itself holds back from the budget.

    Args:
        container_reserve: scratch of one thread decrypting the container (:func:`~.container.decrypt_reserve`).
        budget_bytes: the budget.
        spill_chunk: the preferred spill chunk.
        optimize: whether segments are optimized (they read the spill, whose chunk may need more).

    Returns:
        The plan's ``reserve_bytes``.
    """
    if not optimize:
        return container_reserve
    own = spill_chunk_size(spill_chunk, min(spill_chunk, budget_bytes // _SPILL_SHARE) + TAG_SIZE)
    return max(container_reserve, own + TAG_SIZE)


@dataclass(frozen=True)
class Prepared:
    """What the load-time pass made.

    Attributes:
        segments: how each segment of ``segments.plan`` runs.
        plans: plans made (more than one when optimized weights outgrew the first).
        fallbacks: segment → why it runs the sealed path although optimization was asked for.
        optimize_s: time of the optimization pass (0 when not optimizing).
    """

    segments: SegmentSet
    plans: int
    fallbacks: Mapping[int, str]
    optimize_s: float


def prepare(
    container: Container,
    reader: SealedModelReader,
    plan: Plan,
    graph: onnx.ModelProto | None,
    *,
    scratch: ScratchBuffer,
    optimize: bool,
    verify: bool,
    threads: int,
    batch: int,
    spill_chunk: int,
    spill_dir: str | None,
    model_id: str,
    version: int,
) -> Prepared:
    """Build every segment's state.

    Args:
        container: the sealed container.
        reader: a reader of it, used during the call only.
        plan: the plan; its ``reserve_bytes`` is one decrypting thread's scratch (any
            headroom for grown optimized weights is added by re-planning).
        graph: the model graph when the executor made ``plan`` itself: it may then re-plan
            with headroom for grown optimized weights. None for a given plan, which is
            never re-planned (optimized segments whose weights do not fit it run sealed).
        scratch: per-thread ciphertext buffers (shared with the runs).
        optimize: optimize every segment and stream its weights from a spill.
        verify: with ``optimize``, check every optimized graph on a probe input.
        threads: ONNX Runtime intra-op threads per run.
        batch: the batch the plan is for (when re-planning).
        spill_chunk: the preferred spill chunk.
        spill_dir: keep the spill's ciphertext in an anonymous file there (None: in memory).
        model_id: for messages.
        version: for messages.

    Returns:
        The segments and what the pass did.

    Raises:
        SealedModelError: a weight chunk fails authentication, or ONNX Runtime rejects a segment.
    """

    def builder(spill: SpillStore | None) -> SegmentBuilder:
        return SegmentBuilder(
            container,
            spill,
            scratch,
            threads=threads,
            verify=verify,
            scratch_reserve=plan.reserve_bytes,
            model_id=model_id,
            version=version,
        )

    if not optimize or not memfd_supported():
        fallbacks: dict[int, str] = {}
        if optimize:
            # Optimized weights would have to go through a file: refuse, run unoptimized.
            log.warning("model %s: no memfd_create here; optimized segments disabled", model_id)
            fallbacks = {k: "memfd_create unavailable" for k in range(len(plan.segments))}
        sealed = builder(None)
        states = [sealed.sealed(plan, segment) for segment in plan.segments]
        return Prepared(SegmentSet(plan, states, sealed), 1, fallbacks, 0.0)
    t0 = time.perf_counter()
    spill = SpillStore(spill_chunk_size(spill_chunk, plan.reserve_bytes), spill_dir)
    try:
        optimizing = builder(spill)
        plan, states, plans, fallbacks = _prepare_optimized(
            optimizing, reader, plan, graph, batch=batch, max_replans=_MAX_REPLANS
        )
    except BaseException:
        spill.close()
        raise
    return Prepared(SegmentSet(plan, states, optimizing), plans, fallbacks, time.perf_counter() - t0)


def _prepare_optimized(
    builder: SegmentBuilder,
    reader: SealedModelReader,
    plan: Plan,
    graph: onnx.ModelProto | None,
    *,
    batch: int,
    max_replans: int,
) -> tuple[Plan, list[SegmentState], int, dict[int, str]]:
    """Optimize every segment; re-plan with headroom while optimized weights outgrow the plan.

    NCHWc pads channels to the SIMD block, so a segment's optimized weights can be
    larger than its original ones. The bound that must hold for every segment k is
    ``W'(k) + activations(k) + W'(k + 1) (prefetch) + scratch ≤ budget``. Each pass
    optimizes the plan's segments (re-using segments already optimized by an earlier
    pass) and, where the bound fails, falls back to the original weights of the
    segments that grew — the plan holds for those by construction. While some did, and
    the plan is the executor's own (``graph`` given), the plan is made again with the excess
    kept out of the budget (``reserve`` grows by that headroom). More headroom can split
    layers, and NCHWc pads every piece, so the pass kept is the one that runs the most
    optimized — by original weight bytes — then the fewest segments, not necessarily the last.
    """
    budget = plan.budget_bytes
    sizes = builder.container.weight_sizes
    cache: dict[tuple[object, ...], SegmentState | str] = {}
    plans = 0
    best: tuple[tuple[int, int], Plan, list[SegmentState | str], list[bool], dict[int, str]] | None = None
    while True:
        plans += 1
        built = [_build_cached(builder, reader, plan, segment, cache) for segment in plan.segments]
        optimized, fallbacks, grown = _assign(builder, plan, built)
        # Original weight bytes served by optimized segments: a proxy for the compute
        # that gets the fast kernels (node counts would favour split plans).
        score = (
            sum(segment.weight_bytes for segment, on in zip(plan.segments, optimized, strict=True) if on),
            -len(plan.segments),
        )
        if best is None or score > best[0]:
            best = (score, plan, built, optimized, fallbacks)
        if not grown or graph is None or plans > max_replans:
            break
        weights = [
            b.weight_bytes if isinstance(b, SegmentState) else s.weight_bytes
            for b, s in zip(built, plan.segments, strict=True)
        ]
        excess = max(builder.solo_peaks(plan, weights), default=0) - budget
        headroom = plan.reserve_bytes - builder.scratch_reserve
        headroom += max(1, -(-excess // _HEADROOM_QUANTUM)) * _HEADROOM_QUANTUM
        try:
            plan = make_plan(
                graph,
                sizes,
                budget,
                batch=batch,
                prefetch=plan.prefetch,
                reserve_bytes=builder.scratch_reserve + headroom,
            )
        except BudgetError:
            break
    _, plan, built, optimized, fallbacks = best
    states: list[SegmentState] = []
    for k, segment in enumerate(plan.segments):
        b = built[k]
        if optimized[k] and isinstance(b, SegmentState):
            states.append(b)
        else:
            if k in fallbacks:
                log.warning("model %s: segment %d runs unoptimized: %s", builder.model_id, k, fallbacks[k])
            states.append(builder.sealed(plan, segment))
    return plan, states, plans, fallbacks


def _assign(
    builder: SegmentBuilder, plan: Plan, built: list[SegmentState | str]
) -> tuple[list[bool], dict[int, str], bool]:
    """Which segments run optimized: every one that was optimized, except those whose
    grown weights break a segment's bound (then the original weights, which fit).

    Returns:
        Per segment whether it runs optimized, the fallback reasons, and whether any
        segment fell back for lack of budget.
    """
    optimized = [isinstance(b, SegmentState) for b in built]
    fallbacks = {k: b for k, b in enumerate(built) if isinstance(b, str)}
    grown = False
    n = len(plan.segments)
    while True:
        weights = [
            b.weight_bytes if optimized[k] and isinstance(b, SegmentState) else plan.segments[k].weight_bytes
            for k, b in enumerate(built)
        ]
        peaks = builder.solo_peaks(plan, weights)
        over = [k for k in range(n) if peaks[k] > plan.budget_bytes]
        if not over:
            return optimized, fallbacks, grown
        changed = False
        for k in over:
            # Prefetch only takes what the budget leaves, so only a segment's own grown
            # weights can break its bound.
            b = built[k]
            if optimized[k] and isinstance(b, SegmentState) and b.weight_bytes > plan.segments[k].weight_bytes:
                optimized[k] = False
                fallbacks[k] = (
                    f"optimized weights ({format_bytes(b.weight_bytes)}, originally "
                    f"{format_bytes(plan.segments[k].weight_bytes)}) do not fit the budget"
                )
                changed = grown = True
        if not changed:  # pragma: no cover - the plan holds for the original weights
            raise ConfigurationError("segment weights do not fit the plan")


def _build_cached(
    builder: SegmentBuilder,
    reader: SealedModelReader,
    plan: Plan,
    segment: Segment,
    cache: dict[tuple[object, ...], SegmentState | str],
) -> SegmentState | str:
    key = (segment.node_names, tuple(w.name for w in segment.weights), segment.inputs, segment.outputs)
    if key not in cache:
        cache[key] = builder.optimized(reader, plan, segment)
        # One segment's plaintext and ONNX Runtime's copies of it are gone: hand the pages
        # back before the next segment, so the load-time peak stays near one segment's worth.
        trim_heap()
    return cache[key]
