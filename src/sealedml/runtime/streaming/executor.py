"""The streaming executor: run a sealed model segment by segment within a memory budget.

Occlumency (Lee et al., MobiCom 2019) runs a DNN in an SGX enclave whose
protected memory is far smaller than the model by (a) *on-demand weight
loading* — weights stay encrypted outside and are decrypted and integrity
checked right before the layer that needs them — (b) *memory-efficient
inference* — a buffer is freed as soon as its last consumer has run — and
(c) overlapping the loading of the next layer's weights with the current
layer's compute. :class:`StreamingModel` does the same over a sealed
container and ONNX Runtime:

* One ONNX Runtime session per planned segment, built once at construction.
  Its weights are graph **inputs**, not initializers, so no plaintext weight
  stays resident between requests: only the graph structure does.
* **Optimized segments** (``optimize=True``, the default): at construction each
  segment is optimized once by ONNX Runtime with its real weights
  (:mod:`.optimize`: NCHWc layout, reordered and padded weights, written to an
  in-memory file only); the optimized weights are re-encrypted under a key that
  exists only in this process into a spill (:mod:`.spill`) and the plaintext
  is dropped. Per request each segment's weights are decrypted from the spill
  straight into the run's weight arena (:mod:`.arena`), whose slices are the
  arrays fed to the optimized graph. A segment whose
  optimization fails, changes its interface, disagrees with ONNX Runtime's own
  output on a probe input, or whose optimized weights would break the budget
  runs the unoptimized path below instead.
* **Sealed segments** (``optimize=False``, and the fallback): each segment's
  weights are decrypted from the sealed container (every AES-GCM chunk
  authenticated) into fresh buffers just before the segment runs.
* Sealed weights are dropped as soon as the segment returns. Arena bytes stay
  counted until a later segment overwrites them or they are zeroed (when the
  budget needs the room, and at the end of the run). Activations are dropped
  after their last consumer segment.
* With ``prefetch=True`` a background thread decrypts segment *k + 1* while
  segment *k* computes. That is one segment ahead only, and only the chunks
  clear of *k*'s bytes in the arena that the budget has room for (a sealed
  *k + 1* only whole). Once *k* is done, the compute thread and the background
  thread decrypt the rest together.

A chunk that fails authentication fails the request with
:class:`~sealedml.errors.SealedModelError`. The model object keeps no
per-request state: a sealed segment serves again once the container is
restored; an optimized segment whose spill chunk was tampered with is rebuilt
from the sealed container at the start of the next request.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from sealedml._internal.units import format_bytes
from sealedml.crypto import TAG_SIZE
from sealedml.envelope.model_container import SealedModelReader, TensorEntry
from sealedml.errors import ConfigurationError, InputError, SealedModelError
from sealedml.runtime.engine import ORT_LOG_SEVERITY, InputSpec, Model, RunResult, bind_inputs, ort_failure
from sealedml.runtime.streaming.accounting import MemoryTracker, trim_heap
from sealedml.runtime.streaming.arena import (
    ArenaPool,
    ArenaSegment,
    Step,
    WeightArena,
    aligned_array,
    capacity_for,
    schedule,
)
from sealedml.runtime.streaming.optimize import OptimizationError, memfd_supported, optimize_segment
from sealedml.runtime.streaming.planner import BudgetError, Plan, Segment
from sealedml.runtime.streaming.planner import plan as make_plan
from sealedml.runtime.streaming.spill import SpillEntry, SpillStore

__all__ = [
    "DEFAULT_SPILL_CHUNK",
    "InputSpec",
    "LoadStats",
    "ReaderSource",
    "RunStats",
    "SegmentStats",
    "StreamingModel",
    "decrypt_reserve",
    "segment_session_options",
    "spill_chunk_size",
]

log = logging.getLogger(__name__)

#: A reader, or a function returning a fresh reader for each request (closed after it).
ReaderSource = SealedModelReader | Callable[[], SealedModelReader]

#: Largest plaintext chunk of the spill (the scratch reserve may make it smaller).
DEFAULT_SPILL_CHUNK = 1 << 20
#: When the executor plans itself, a spill chunk may take up to this share of the budget.
_SPILL_SHARE = 32
#: Re-plans with more headroom when optimized weights outgrow the plan (then per-segment fallback).
_MAX_REPLANS = 2
_HEADROOM_QUANTUM = 64 * 1024


def decrypt_reserve(chunk_size: int) -> int:
    """Scratch bytes one decrypting thread holds besides the weight buffers (sealed path).

    One ciphertext chunk being read, its plaintext, and the previous chunk's
    plaintext kept for a tensor that starts inside it.

    Args:
        chunk_size: the container's plaintext chunk size.

    Returns:
        The bytes the planner must keep out of the budget.
    """
    return 3 * chunk_size + TAG_SIZE


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


def segment_session_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime options of a segment session (those of ``LoadedModel``, arena off).

    Args:
        threads: intra-op threads per run.

    Returns:
        The options.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = ORT_LOG_SEVERITY
    # As LoadedModel: idle ORT threads must not spin on a shared machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without the arena, intermediates go back to the allocator after each run
    # instead of staying reserved per session (there is one session per segment).
    options.enable_cpu_mem_arena = False
    return options


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


@dataclass
class _Loaded:
    """Decrypted weights of one segment (owned by exactly one run)."""

    arrays: dict[str, np.ndarray]
    nbytes: int
    seconds: float
    #: In the run's arena, which counts its own bytes (they stay counted until zeroed).
    in_arena: bool = False


@dataclass(frozen=True)
class _State:
    """How one segment runs; replaced as a whole when a segment is rebuilt.

    ``entry`` is the segment's spill entry when it runs optimized, None when its
    weights come from the sealed container.
    """

    session: ort.InferenceSession
    entry: SpillEntry | None
    weight_bytes: int
    graph_bytes: int
    nchwc_nodes: int = 0

    @property
    def optimized(self) -> bool:
        return self.entry is not None


@dataclass(frozen=True)
class _Built:
    """An optimized segment: its runtime session and spilled weights."""

    state: _State


class _Readers:
    """The container reader of one run, opened on first use (optimized runs may need none)."""

    def __init__(self, model: StreamingModel) -> None:
        self._model = model
        self._reader: SealedModelReader | None = None
        self._lock = threading.Lock()

    def get(self) -> SealedModelReader:
        with self._lock:
            if self._reader is None:
                self._reader = self._model._open_reader()
            return self._reader

    def close(self) -> None:
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is not None and self._model._factory is not None:
            reader.close()


class StreamingModel(Model):
    """A sealed model executed segment by segment within a memory budget.

    A :class:`~sealedml.runtime.engine.Model` (``model_id``, ``version``, ``nbytes``,
    ``inputs``, ``output_names``, ``bind_inputs``, ``run`` with the run's tracked peak),
    plus ``plan``, ``last_peak_bytes``, ``last_stats``, ``load_stats`` and
    ``segment_modes``. ``run`` is thread-safe; the budget is *per run*, so N concurrent
    runs may hold N budgets.

    Args:
        source: the container reader (shared by all runs: reads are ``pread`` or
            slices of immutable bytes), or a factory returning a fresh reader per run
            that needs the container. Every reader must be for the same sealed
            container as the first.
        budget_bytes: the per-run memory budget; required unless ``plan`` is given.
        plan: a ready plan (from :func:`~sealedml.runtime.streaming.planner.plan` over
            this container's graph); its reserve must cover :func:`decrypt_reserve`.
            A given plan is never re-planned: optimized segments whose weights would
            not fit it run unoptimized.
        batch: the largest batch to plan for (when ``plan`` is not given).
        threads: ONNX Runtime intra-op threads per run.
        prefetch: decrypt segment k + 1 on a background thread while segment k computes.
        prefetch_workers: background threads shared by concurrent runs.
        model_id: for messages; defaults to the container's.
        version: defaults to the container's.
        optimize: optimize every segment once at construction and stream its optimized
            weights from an ephemeral-key spill (see the module docstring).
        verify: with ``optimize``, check each optimized runtime graph against ONNX
            Runtime's own output for a random probe input (falls back on a mismatch).
        spill_dir: keep the spill's ciphertext in an anonymous file in this directory
            (``pread`` per chunk) instead of in memory (the default: zero-copy
            decryption, but the ciphertext adds about the model's size to the RSS).
        spill_chunk: preferred plaintext bytes per spill chunk (smaller when the
            scratch reserve requires it).

    Raises:
        BudgetError: no plan fits ``budget_bytes``.
        ConfigurationError: inconsistent arguments.
        SealedModelError: the container header, manifest, graph or (when optimizing) a
            weight chunk fails authentication, or ONNX Runtime rejects a segment.
    """

    def __init__(
        self,
        source: ReaderSource,
        *,
        budget_bytes: int | None = None,
        plan: Plan | None = None,
        batch: int = 1,
        threads: int = 1,
        prefetch: bool = True,
        prefetch_workers: int = 2,
        model_id: str | None = None,
        version: int | None = None,
        optimize: bool = True,
        verify: bool = True,
        spill_dir: str | None = None,
        spill_chunk: int = DEFAULT_SPILL_CHUNK,
    ) -> None:
        started = time.perf_counter()
        self._reader: SealedModelReader | None
        self._factory: Callable[[], SealedModelReader] | None
        if isinstance(source, SealedModelReader):
            self._reader, self._factory = source, None
            reader = source
        else:
            self._reader, self._factory = None, source
            reader = source()
        if spill_chunk < 1:
            raise ConfigurationError("spill_chunk must be positive")
        self.prefetch = prefetch
        self.threads = threads
        self._verify = verify
        self._lock = threading.Lock()
        self._rebuild_lock = threading.Lock()
        self._stale: set[int] = set()
        self._spill: SpillStore | None = None
        self._scratch = threading.local()
        try:
            header = reader.header
            self._header_raw = header.raw
            self._chunk_size = header.chunk_size
            self._entries: dict[str, TensorEntry] = {entry.name: entry for entry in reader.manifest.tensors}
            reserve = decrypt_reserve(self._chunk_size)
            planned_here = plan is None
            graph = None
            sizes = {name: entry.length for name, entry in self._entries.items()}
            if plan is None:
                if budget_bytes is None:
                    raise ConfigurationError("give a memory budget or a plan")
                graph = reader.graph()
                scratch = reserve
                if optimize:
                    own = spill_chunk_size(spill_chunk, min(spill_chunk, budget_bytes // _SPILL_SHARE) + TAG_SIZE)
                    scratch = max(reserve, own + TAG_SIZE)
                # The fewest segments, each filling the budget: prefetch decrypts as much of the
                # next segment as the arena and the budget leave beside the current one (.arena).
                plan = make_plan(graph, sizes, budget_bytes, batch=batch, prefetch=False, reserve_bytes=scratch)
            if budget_bytes is not None and budget_bytes != plan.budget_bytes:
                raise ConfigurationError("budget_bytes disagrees with the plan's budget")
            if plan.reserve_bytes < reserve:
                raise ConfigurationError(f"the plan must reserve ≥ {reserve} bytes for decryption scratch")
            self._check_plan(plan)
            #: Scratch one decrypting thread may hold (the plan's reserve without any headroom).
            self._scratch_reserve = plan.reserve_bytes
            self.plan = plan
            self.model_id = model_id if model_id is not None else header.model_id
            self.version = version if version is not None else header.model_version
            self._states: list[_State] = []
            optimize_s = 0.0
            plans = 1
            fallbacks: dict[int, str] = {}
            if optimize and not memfd_supported():
                # Optimized weights would have to go through a file: refuse, run unoptimized.
                log.warning("model %s: no memfd_create here; optimized segments disabled", self.model_id)
                fallbacks = {k: "memfd_create unavailable" for k in range(len(plan.segments))}
                self._states = [self._sealed_state(segment) for segment in self.plan.segments]
            elif optimize:
                t0 = time.perf_counter()
                self._spill = SpillStore(spill_chunk_size(spill_chunk, plan.reserve_bytes), spill_dir)
                plans, fallbacks = self._prepare_optimized(
                    reader, graph, sizes, batch=batch, replan=planned_here, max_replans=_MAX_REPLANS
                )
                optimize_s = time.perf_counter() - t0
            else:
                self._states = [self._sealed_state(segment) for segment in self.plan.segments]
        except BaseException:
            if self._spill is not None:
                self._spill.close()
            raise
        finally:
            if self._factory is not None:
                reader.close()
        plan = self.plan
        self._headroom = plan.reserve_bytes - self._scratch_reserve
        self.inputs: list[InputSpec] = []
        for name in plan.inputs:
            info = plan.infos.get(name)
            if info is None or info.elem_type == 0:
                raise SealedModelError(f"model {self.model_id}: input {name} has an unknown type")
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(info.elem_type))
            self.inputs.append(InputSpec(name, dtype, len(info.dims) if info.dims is not None else None))
        self.output_names = list(plan.outputs)
        consumed = {name for segment in plan.segments for name in segment.inputs}
        self._tracked_inputs = frozenset(name for name in plan.inputs if name in consumed or name in plan.outputs)
        self._graph_inputs = frozenset(plan.inputs)
        self._pool = (
            ThreadPoolExecutor(
                max_workers=max(1, prefetch_workers),
                thread_name_prefix="sealedml-prefetch",
                initializer=_yield_to_compute,
            )
            if prefetch
            else None
        )
        # Optimized segments decrypt into a reused, wiped arena per run (see .arena), laid
        # out once per set of segment states.
        self._arenas = ArenaPool()
        self._schedule: tuple[tuple[_State, ...], _Layout] | None = None
        self._last_stats: RunStats | None = None
        self.load_stats = LoadStats(
            total_s=time.perf_counter() - started,
            optimize_s=optimize_s,
            plans=plans,
            headroom_bytes=self._headroom,
            optimized_segments=sum(s.optimized for s in self._states),
            fallbacks=tuple(sorted(fallbacks.items())) if optimize else (),
            weight_bytes=sum(s.weight_bytes for s in self._states),
            sealed_weight_bytes=plan.weight_bytes,
            spill_bytes=self._spill.size if self._spill is not None else 0,
            nchwc_nodes=sum(s.nchwc_nodes for s in self._states),
        )
        if optimize:
            log.info(
                "model %s: %d/%d segments optimized (%d NCHWc nodes) in %.2f s; %d plan(s), headroom %s",
                self.model_id,
                self.load_stats.optimized_segments,
                len(plan.segments),
                self.load_stats.nchwc_nodes,
                optimize_s,
                plans,
                format_bytes(self._headroom),
            )

    # ----------------------------------------------------------------- LoadedModel API

    @property
    def nbytes(self) -> int:
        """Bytes resident between requests: the segment graphs, which hold no weights.

        The per-run working set is bounded by ``plan.budget_bytes`` instead.
        """
        with self._lock:
            return sum(state.graph_bytes for state in self._states)

    @property
    def peak_bound_bytes(self) -> int:
        """The tracked-peak bound of a run with the segments as they are now (≤ the budget).

        Per segment: the arena bytes that may hold plaintext (the segment's own and stale
        ones the budget has room for; see :mod:`.arena`), a sealed segment's weights, its
        activation peak, one decrypting thread's scratch, and what is decrypted ahead for
        the next segment.
        """
        with self._lock:
            states = list(self._states)
        return max((step.peak for step in self._layout(states).steps), default=self._scratch_reserve)

    @property
    def prefetch_ahead_bytes(self) -> tuple[int, ...]:
        """Per segment k, the bytes of segment k + 1's weights decrypted while k computes.

        An optimized segment's chunks clear of segment k's bytes in the arena, as far as
        the budget leaves room; a sealed one whole or not at all. The rest is decrypted
        (by two threads) once segment k is done. All zeros without prefetch.
        """
        with self._lock:
            states = list(self._states)
        steps = self._layout(states).steps
        return (*(step.ahead_bytes for step in steps[1:]), 0) if steps else ()

    @property
    def segment_modes(self) -> tuple[str, ...]:
        """Per segment, ``"optimized"`` (spilled optimized weights) or ``"sealed"`` (from the container)."""
        with self._lock:
            return tuple("optimized" if state.optimized else "sealed" for state in self._states)

    def bind_inputs(self, tensors: Mapping[str, np.ndarray], positional: bool) -> dict[str, np.ndarray]:
        """Map request tensors to the model's inputs and check dtype, rank and batch.

        Args:
            tensors: the request's tensors (keys ``"0"``, ``"1"``… when positional).
            positional: whether the tensors are unnamed.

        Returns:
            Tensors keyed by input name.

        Raises:
            InputError: missing, unexpected or ill-typed inputs, or a batch larger than planned.
        """
        named = bind_inputs(self.inputs, tensors, positional)
        self._check_batch(named)
        return named

    def run(self, inputs: Mapping[str, np.ndarray]) -> RunResult:
        """Run the model within the budget (thread-safe; blocking); the result carries the tracked peak.

        See :meth:`run_with_stats` for the run's full figures.
        """
        outputs, stats = self.run_with_stats(inputs)
        return RunResult(outputs, peak_bytes=stats.peak_bytes)

    def run_with_stats(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], RunStats]:
        """Run the model within the budget (thread-safe; blocking); also return this run's figures.

        Args:
            inputs: tensors keyed by input name (see :meth:`bind_inputs`).

        Returns:
            The outputs keyed by name, and this run's :class:`RunStats` (peak bytes, times).

        Raises:
            SealedModelError: a weight chunk (sealed container or spill) failed
                authentication, or a segment to rebuild could not be; the model stays usable.
            InputError: missing inputs, a batch larger than planned, or ONNX Runtime
                rejected the inputs.
        """
        missing = [name for name in self.plan.inputs if name not in inputs]
        if missing:
            raise InputError(f"missing input(s) {missing}")
        self._check_batch(inputs)
        readers = _Readers(self)
        try:
            if self._stale:
                # A spill chunk failed authentication in an earlier run: rebuild those
                # segments from the sealed container before this run (outside its budget,
                # like construction).
                self._rebuild_stale(readers)
            with self._lock:
                states = list(self._states)
            return self._run(inputs, states, readers)
        finally:
            readers.close()

    def _run(
        self, inputs: Mapping[str, np.ndarray], states: list[_State], readers: _Readers
    ) -> tuple[dict[str, np.ndarray], RunStats]:
        started = time.perf_counter()
        tracker = MemoryTracker(self.model_id)
        env: dict[str, np.ndarray] = {}
        for name in self.plan.inputs:
            env[name] = np.asarray(inputs[name])
            if name in self._tracked_inputs:
                tracker.add(env[name].nbytes)
        pending: _Pending | None = None
        segment_stats: list[SegmentStats] = []
        pool = self._pool
        segments = self.plan.segments
        layout = self._layout(states)
        steps = layout.steps
        arena = _RunArena(self._arenas, layout.capacity, tracker)
        try:
            for k, segment in enumerate(segments):
                waited = 0.0
                if not states[k].optimized:
                    # Stale plaintext the budget has no room for beside these weights goes first.
                    arena.trim(steps[k])
                elif pending is None:
                    # The first segment (or one not prefetched): nothing computes yet, so the
                    # prefetch thread and this one decrypt it together.
                    pending = self._start(pool, readers, k, states[k], arena, steps[k], early=False)
                if pending is not None:
                    try:
                        # The compute thread decrypts the chunks the prefetch thread has not
                        # reached (when the budget has room for its scratch buffer too).
                        loaded, waited = pending.finish(help_allowed=steps[k].help)
                    finally:
                        pending = None
                else:
                    loaded = self._load_sealed(readers, k, tracker)
                if pool is not None and k + 1 < len(segments):
                    # One segment ahead only, and only as much of it as the arena and the
                    # budget leave beside this one.
                    pending = self._start(pool, readers, k + 1, states[k + 1], arena, steps[k + 1], early=True)
                compute = self._compute(segment, states[k].session, env, loaded, tracker)
                segment_stats.append(SegmentStats(k, loaded.nbytes, loaded.seconds, waited, compute))
        finally:
            if pending is not None:
                pending.abandon()  # waits for chunks in flight: nothing writes the arena after it
            # Zeroes the plaintext the run left behind: on a prefetch thread, after the
            # outputs are returned (a run that borrows the arena before then wipes it first).
            arena.give_back(pool.submit if pool is not None else None)
        outputs = {name: env[name] for name in self.output_names}
        snap = tracker.snapshot()
        stats = RunStats(
            peak_bytes=snap.peak,
            peak_breakdown=snap.peak_breakdown,
            budget_bytes=self.plan.budget_bytes,
            total_s=time.perf_counter() - started,
            decrypt_s=sum(s.decrypt_s for s in segment_stats),
            compute_s=sum(s.compute_s for s in segment_stats),
            wait_s=sum(s.wait_s for s in segment_stats),
            segments=tuple(segment_stats),
        )
        with self._lock:
            self._last_stats = stats
        return outputs, stats

    @property
    def last_stats(self) -> RunStats | None:
        """Figures of the most recently finished run (None before the first)."""
        with self._lock:
            return self._last_stats

    @property
    def last_peak_bytes(self) -> int | None:
        """Tracked peak bytes of the most recently finished run (None before the first)."""
        stats = self.last_stats
        return stats.peak_bytes if stats is not None else None

    def close(self) -> None:
        """Stop the prefetch threads (pending work, arena wipes included, finishes first).
        Idempotent.

        Later runs still work, without prefetch (the spill stays until the object is
        garbage-collected).
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._arenas.drain()  # wipes still queued (none once the pool has run them)

    def __enter__(self) -> StreamingModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- construction

    def _check_plan(self, plan: Plan) -> None:
        for segment in plan.segments:
            for weight in segment.weights:
                entry = self._entries.get(weight.tensor)
                if entry is None or weight.byte_start + weight.nbytes > entry.length:
                    raise ConfigurationError(f"plan reads weight {weight.name!r} that the container does not hold")

    def _session(self, data: bytes, index: int) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(data, segment_session_options(self.threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise SealedModelError(f"model {self.model_id} v{self.version}: segment {index} cannot be loaded") from exc

    def _sealed_state(self, segment: Segment, plan: Plan | None = None) -> _State:
        """The unoptimized path: weights from the sealed container as graph inputs."""
        data = (plan or self.plan).segment_model(segment.index).SerializeToString()
        return _State(self._session(data, segment.index), None, segment.weight_bytes, len(data))

    def _solo_peaks(self, plan: Plan, weights: list[int]) -> list[int]:
        """Per segment: its weights, its activation peak and one decrypting thread's scratch."""
        return [
            w + segment.activation_peak_bytes + self._scratch_reserve
            for w, segment in zip(weights, plan.segments, strict=True)
        ]

    def _layout(self, states: Sequence[_State]) -> _Layout:
        """The arena schedule of a run with these segment states (cached until a rebuild)."""
        with self._lock:
            cached = self._schedule
        if cached is not None and len(cached[0]) == len(states) and all(map(operator.is_, cached[0], states)):
            return cached[1]
        segments = [
            _arena_segment(state, segment.activation_peak_bytes)
            for state, segment in zip(states, self.plan.segments, strict=True)
        ]
        layout = _Layout(
            capacity_for(segments) if any(state.optimized for state in states) else None,
            schedule(
                segments,
                budget=self.plan.budget_bytes,
                scratch=self._scratch_reserve,
                second_scratch=self._scratch_bytes,
                prefetch=self.prefetch,
            ),
        )
        with self._lock:
            self._schedule = (tuple(states), layout)
        return layout

    def _prepare_optimized(
        self,
        reader: SealedModelReader,
        graph: onnx.ModelProto | None,
        sizes: Mapping[str, int],
        *,
        batch: int,
        replan: bool,
        max_replans: int,
    ) -> tuple[int, dict[int, str]]:
        """Optimize every segment; re-plan with headroom while optimized weights outgrow the plan.

        NCHWc pads channels to the SIMD block, so a segment's optimized weights can be
        larger than its original ones. The bound that must hold for every segment k is
        ``W'(k) + activations(k) + W'(k + 1) (prefetch) + scratch ≤ budget``. Each pass
        optimizes the plan's segments (re-using segments already optimized by an earlier
        pass) and, where the bound fails, falls back to the original weights of the
        segments that grew — the plan holds for those by construction. While some did, and
        the plan is the executor's own, the plan is made again with the excess kept out of
        the budget (``reserve`` grows by that headroom). More headroom can split layers,
        and NCHWc pads every piece, so the pass kept is the one that runs the most
        optimized — by original weight bytes — then the fewest segments, not necessarily the last.
        """
        plan = self.plan
        budget = plan.budget_bytes
        cache: dict[tuple[object, ...], _Built | str] = {}
        plans = 0
        best: tuple[tuple[int, int], Plan, list[_Built | str], list[bool], dict[int, str]] | None = None
        while True:
            plans += 1
            built = [self._build_cached(reader, plan, segment, cache) for segment in plan.segments]
            optimized, fallbacks, grown = self._assign(plan, built)
            # Original weight bytes served by optimized segments: a proxy for the compute
            # that gets the fast kernels (node counts would favour split plans).
            score = (
                sum(segment.weight_bytes for segment, on in zip(plan.segments, optimized, strict=True) if on),
                -len(plan.segments),
            )
            if best is None or score > best[0]:
                best = (score, plan, built, optimized, fallbacks)
            if not grown or not replan or plans > max_replans:
                break
            weights = [
                b.state.weight_bytes if isinstance(b, _Built) else s.weight_bytes
                for b, s in zip(built, plan.segments, strict=True)
            ]
            excess = max(self._solo_peaks(plan, weights), default=0) - budget
            headroom = plan.reserve_bytes - self._scratch_reserve
            headroom += max(1, -(-excess // _HEADROOM_QUANTUM)) * _HEADROOM_QUANTUM
            try:
                plan = make_plan(
                    graph,  # type: ignore[arg-type]
                    sizes,
                    budget,
                    batch=batch,
                    prefetch=plan.prefetch,
                    reserve_bytes=self._scratch_reserve + headroom,
                )
            except BudgetError:
                break
        _, plan, built, optimized, fallbacks = best
        self.plan = plan
        states: list[_State] = []
        for k, segment in enumerate(plan.segments):
            b = built[k]
            if optimized[k] and isinstance(b, _Built):
                states.append(b.state)
            else:
                if k in fallbacks:
                    log.warning("model %s: segment %d runs unoptimized: %s", self.model_id, k, fallbacks[k])
                states.append(self._sealed_state(segment, plan))
        self._states = states
        return plans, fallbacks

    def _assign(self, plan: Plan, built: list[_Built | str]) -> tuple[list[bool], dict[int, str], bool]:
        """Which segments run optimized: every one that was optimized, except those whose
        grown weights break a segment's bound (then the original weights, which fit).

        Returns:
            Per segment whether it runs optimized, the fallback reasons, and whether any
            segment fell back for lack of budget.
        """
        optimized = [isinstance(b, _Built) for b in built]
        fallbacks = {k: b for k, b in enumerate(built) if isinstance(b, str)}
        grown = False
        n = len(plan.segments)
        while True:
            weights = [
                b.state.weight_bytes if optimized[k] and isinstance(b, _Built) else plan.segments[k].weight_bytes
                for k, b in enumerate(built)
            ]
            peaks = self._solo_peaks(plan, weights)
            over = [k for k in range(n) if peaks[k] > plan.budget_bytes]
            if not over:
                return optimized, fallbacks, grown
            changed = False
            for k in over:
                # Prefetch only takes what the budget leaves, so only a segment's own grown
                # weights can break its bound.
                b = built[k]
                if optimized[k] and isinstance(b, _Built) and b.state.weight_bytes > plan.segments[k].weight_bytes:
                    optimized[k] = False
                    fallbacks[k] = (
                        f"optimized weights ({format_bytes(b.state.weight_bytes)}, originally "
                        f"{format_bytes(plan.segments[k].weight_bytes)}) do not fit the budget"
                    )
                    changed = grown = True
            if not changed:  # pragma: no cover - the plan holds for the original weights
                raise ConfigurationError("segment weights do not fit the plan")

    def _build_cached(
        self, reader: SealedModelReader, plan: Plan, segment: Segment, cache: dict[tuple[object, ...], _Built | str]
    ) -> _Built | str:
        key = (segment.node_names, tuple(w.name for w in segment.weights), segment.inputs, segment.outputs)
        if key not in cache:
            cache[key] = self._build(reader, plan, segment)
            # One segment's plaintext and ONNX Runtime's copies of it are gone: hand the pages
            # back before the next segment, so the load-time peak stays near one segment's worth.
            trim_heap()
        return cache[key]

    def _probe(self, plan: Plan, segment: Segment) -> dict[str, np.ndarray] | None:
        """Random activation inputs for checking an optimized segment (batch axes set to 1)."""
        rng = np.random.default_rng(segment.index)
        feeds: dict[str, np.ndarray] = {}
        for name in segment.inputs:
            info = plan.infos.get(name)
            if info is None or info.dims is None or info.elem_type == 0 or any(d < 0 for d in info.dims):
                return None
            dims = tuple(1 if info.symbolic and info.symbolic[axis] else d for axis, d in enumerate(info.dims))
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(info.elem_type))
            if dtype.kind == "f":
                feeds[name] = rng.standard_normal(dims).astype(dtype)
            else:
                feeds[name] = np.zeros(dims, dtype=dtype)
        return feeds

    def _build(self, reader: SealedModelReader, plan: Plan, segment: Segment) -> _Built | str:
        """Optimize one segment with its real weights and spill them; a reason string on failure.

        Raises:
            SealedModelError: the container's weight chunks fail authentication.
        """
        assert self._spill is not None
        loaded = self._decrypt(reader, segment, MemoryTracker())
        probe = self._probe(plan, segment) if self._verify else None
        try:
            opt = optimize_segment(
                plan.segment_model(segment.index),
                loaded.arrays,
                inputs=segment.inputs,
                outputs=segment.outputs,
                constants=plan.constants,
                threads=self.threads,
                probe=probe,
            )
        except OptimizationError as exc:
            return str(exc)
        finally:
            _wipe(loaded.arrays)
        try:
            session = ort.InferenceSession(
                opt.graph, segment_session_options(self.threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT's own exception types
            opt.drop()
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return f"ONNX Runtime rejected the optimized graph with weights as inputs: {first}"
        entry = self._spill.write(segment.index, opt.tensors)
        reference = opt.reference
        state = _State(session, entry, entry.nbytes, len(opt.graph), opt.nchwc_nodes)
        opt.drop()  # the plaintext optimized weights: only the spill (ciphertext) keeps them
        if reference is not None and probe is not None:
            # Round trip through the spill, exactly as a request does, then compare with what
            # ONNX Runtime computed with the same weights as constants.
            spilled = self._spilled_weights(entry)
            try:
                got = session.run(list(segment.outputs), {**probe, **spilled})
            except Exception as exc:  # ORT's own exception types
                return f"the optimized graph fails with weights as inputs: {str(exc).strip()[:200]}"
            finally:
                _wipe(spilled)
            for name, value, expected in zip(segment.outputs, got, reference.values(), strict=True):
                if not _close(np.asarray(value), expected):
                    return f"optimized output {name!r} differs from ONNX Runtime's reference"
        return _Built(state)

    # ----------------------------------------------------------------- internals

    def _check_batch(self, inputs: Mapping[str, np.ndarray]) -> None:
        for name in self.plan.inputs:
            info = self.plan.infos.get(name)
            array = inputs.get(name)
            if info is None or info.dims is None or array is None or np.ndim(array) != len(info.dims):
                continue
            shape = np.shape(array)
            for axis, planned in enumerate(info.dims):
                if info.symbolic and info.symbolic[axis] and shape[axis] > planned:
                    raise InputError(
                        f"input {name!r} axis {axis} is {shape[axis]}; the memory plan allows at most {planned} "
                        f"(batch {self.plan.batch})"
                    )

    def _open_reader(self) -> SealedModelReader:
        if self._reader is not None:
            return self._reader
        if self._factory is None:  # pragma: no cover - the constructor sets one of the two
            raise ConfigurationError("no container reader")
        reader = self._factory()
        if reader.header.raw != self._header_raw:
            reader.close()
            raise SealedModelError("the sealed container changed since the model was planned")
        return reader

    def _rebuild_stale(self, readers: _Readers) -> None:
        """Rebuild segments whose spill failed authentication, from the sealed container.

        A segment whose rebuilt optimized weights no longer fit next to its neighbours,
        or whose optimization now fails, switches to the sealed path.
        """
        with self._rebuild_lock:
            with self._lock:
                todo = sorted(self._stale)
            for k in todo:
                segment = self.plan.segments[k]
                built = self._build(readers.get(), self.plan, segment)
                state = built.state if isinstance(built, _Built) else self._sealed_state(segment)
                if state.optimized:
                    with self._lock:
                        weights = [s.weight_bytes for s in self._states]
                    weights[k] = state.weight_bytes
                    if any(p > self.plan.budget_bytes for p in self._solo_peaks(self.plan, weights)):
                        state = self._sealed_state(segment)
                log.warning(
                    "model %s: segment %d rebuilt after a spill authentication failure (%s)",
                    self.model_id,
                    k,
                    "optimized" if state.optimized else "unoptimized",
                )
                with self._lock:
                    old, self._states[k] = self._states[k], state
                    self._stale.discard(k)
                if old.entry is not None and self._spill is not None:
                    # A run still holding the old state fails that segment with a typed
                    # error (its chunk failed authentication anyway).
                    self._spill.discard(old.entry)
            trim_heap()

    def _mark_stale(self, index: int, state: _State) -> None:
        """Rebuild segment ``index`` on the next run — and every segment a truncation cut off."""
        spill = self._spill
        with self._lock:
            if self._states[index] is state:
                self._stale.add(index)
            for k, other in enumerate(self._states):
                if other.entry is not None and spill is not None and not spill.intact(other.entry):
                    self._stale.add(k)

    def _scratch_view(self, nbytes: int) -> memoryview:
        """This thread's reusable ciphertext buffer (never holds plaintext)."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, dtype=np.uint8)
            self._scratch.buf = buf
        view: memoryview = buf.data
        return view[:nbytes]

    def _load_sealed(self, readers: _Readers, index: int, tracker: MemoryTracker) -> _Loaded:
        """Decrypt sealed segment ``index``'s weights from the container (any thread)."""
        return self._decrypt(readers.get(), self.plan.segments[index], tracker)

    def _spilled_weights(self, entry: SpillEntry) -> dict[str, np.ndarray]:
        """Decrypt a spill entry into one fresh buffer, to check a segment at load time.

        Runs decrypt into their arena through a :class:`_SpillJob` instead. The tensors are
        aligned views of the buffer; zero them with :func:`_wipe` when done.
        """
        assert self._spill is not None
        scratch_bytes = self._spill.scratch_bytes
        scratch = self._scratch_view(scratch_bytes) if scratch_bytes else None
        blob = aligned_array(entry.nbytes)
        self._spill.read_into(entry, blob.data, scratch)
        return entry.views(blob)

    def _decrypt(self, reader: SealedModelReader, segment: Segment, tracker: MemoryTracker) -> _Loaded:
        """Decrypt one segment's weights from the sealed container into fresh buffers.

        Occlumency's on-demand weight loading: reads only the chunks covering each weight
        slice; each chunk is authenticated before its bytes are used. Chunks shared by
        adjacent tensors are decrypted once, into one reused chunk buffer that is zeroed
        at the end (freed memory is not cleared, so nothing is left to linger in it).
        """
        started = time.perf_counter()
        chunk_size = self._chunk_size
        scratch = decrypt_reserve(chunk_size)
        arrays: dict[str, np.ndarray] = {}
        held = 0
        tracker.add(scratch, "scratch")
        plain = np.empty(chunk_size, dtype=np.uint8)
        try:
            cached_index, cached = -1, 0
            chunk = memoryview(plain.data)
            for weight in sorted(segment.weights, key=lambda w: self._entries[w.tensor].offset + w.byte_start):
                buf = np.empty(weight.nbytes, dtype=np.uint8)
                tracker.add(weight.nbytes, "weights")
                held += weight.nbytes
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(weight.data_type))
                arrays[weight.name] = buf.view(dtype).reshape(weight.dims)
                start = self._entries[weight.tensor].offset + weight.byte_start
                end = start + weight.nbytes
                view = memoryview(buf.data)
                pos = start
                while pos < end:
                    index = pos // chunk_size
                    if index != cached_index:
                        cached_index, cached = index, reader.chunk_into(index, chunk)
                    lo = pos - index * chunk_size
                    n = min(cached - lo, end - pos)
                    if n <= 0:
                        raise SealedModelError("weight range runs past the sealed payload")
                    view[pos - start : pos - start + n] = chunk[lo : lo + n]
                    pos += n
        except BaseException:
            _wipe(arrays)
            tracker.release(held, "weights")
            raise
        finally:
            plain[:] = 0
            tracker.release(scratch, "scratch")
        return _Loaded(arrays, held, time.perf_counter() - started)

    def _compute(
        self,
        segment: Segment,
        session: ort.InferenceSession,
        env: dict[str, np.ndarray],
        loaded: _Loaded,
        tracker: MemoryTracker,
    ) -> float:
        """Run one segment; drop its weights and the activations it was the last consumer of."""
        feeds: dict[str, np.ndarray] = {name: env[name] for name in segment.inputs}
        feeds.update(loaded.arrays)
        # ORT's intermediates are not visible from Python: count the planner's estimate.
        tracker.add(segment.internal_bytes, "estimated")
        started = time.perf_counter()
        try:
            values = session.run(list(segment.outputs), feeds)
        except Exception as exc:
            raise InputError(f"model {self.model_id} rejected the inputs: {ort_failure(exc)}") from exc
        finally:
            elapsed = time.perf_counter() - started
            tracker.release(segment.internal_bytes, "estimated")
            # Drop the plaintext weights as soon as the segment has run.
            feeds.clear()
            if loaded.in_arena:
                loaded.arrays.clear()  # arena bytes stay counted until overwritten or zeroed
            else:
                _wipe(loaded.arrays)  # fresh buffers: zeroed before the allocator gets them back
                tracker.release(loaded.nbytes, "weights")
        for name, value in zip(segment.outputs, values, strict=True):
            array = np.asarray(value)
            env[name] = array
            tracker.add(array.nbytes)
        del values
        # Occlumency's memory-efficient inference: free a buffer after its last consumer.
        for name in segment.release_after:
            dropped = env.pop(name, None)
            if dropped is not None and (name in self._tracked_inputs or name not in self._graph_inputs):
                tracker.release(dropped.nbytes)
        return elapsed

    @property
    def _scratch_bytes(self) -> int:
        """Scratch one thread holds while decrypting spill chunks."""
        return self._spill.scratch_bytes if self._spill is not None else 0

    def _start(
        self,
        pool: ThreadPoolExecutor | None,
        readers: _Readers,
        index: int,
        state: _State,
        arena: _RunArena,
        step: Step,
        *,
        early: bool,
    ) -> _Pending | None:
        """Start decrypting segment ``index``.

        Args:
            pool: the prefetch threads (None without prefetch: the compute thread then
                decrypts the segment alone in :meth:`_SpillJob.finish`).
            arena: the run's arena, where optimized segments go.
            step: the segment's place in the arena schedule.
            early: while the previous segment still computes: only the chunks ``step``
                allows ahead (a sealed segment only when it fits whole), the rest once the
                previous segment is done.

        Returns None for a sealed segment that does not fit ahead, or when the pool was
        closed meanwhile (the caller then decrypts inline); a spill job always comes back
        (without a worker it is decrypted entirely by the compute thread).
        """
        if state.entry is None:
            if pool is None or (early and step.ahead_bytes < state.weight_bytes):
                return None  # container reads are not split: decrypt it once the budget allows
            try:
                future = pool.submit(self._load_sealed, readers, index, arena.tracker)
            except RuntimeError:  # close() raced with this run: decrypt inline instead
                return None
            return _SealedPending(future, arena.tracker)
        job = _SpillJob(self, index, state, arena, step, pool, early=early)
        if pool is not None:
            job.submit()
        return job


def _yield_to_compute() -> None:
    """Run the calling (prefetch) thread only on CPU time nothing else wants (``SCHED_IDLE``).

    ONNX Runtime's intra-op threads split each operator into equal parts and wait for the
    slowest: a prefetch thread competing for a core at normal priority preempts one of
    them and stalls the whole operator (measured on two cores: ResNet-50's segments ran
    ~30% slower beside it). At idle priority the kernel runs it only in the gaps —
    between operators, in serial stretches, whenever a request leaves a core free — and
    the compute thread decrypts whatever is left when it gets there. Best effort: where
    the policy is unavailable (not Linux, or a TEE runtime without it) the thread keeps
    normal priority.
    """
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_IDLE", None)
    if setter is None or policy is None:
        return
    try:
        setter(0, policy, os.sched_param(0))
    except OSError as exc:
        log.debug("prefetch thread keeps normal priority: %s", exc.strerror or exc)


class _SealedPending:
    """A sealed segment being decrypted from the container by the prefetch thread."""

    def __init__(self, future: Future[_Loaded], tracker: MemoryTracker) -> None:
        self._future = future
        self._tracker = tracker

    def finish(self, help_allowed: bool) -> tuple[_Loaded, float]:
        """Wait for the weights; returns them and the seconds waited."""
        del help_allowed  # container chunks are decrypted by one thread
        started = time.perf_counter()
        loaded = self._future.result()
        return loaded, time.perf_counter() - started

    def abandon(self) -> None:
        """After a failed run: wait for the decryption and drop what it produced."""
        if self._future.cancel():
            return
        try:
            loaded = self._future.result()
        except BaseException:  # the run already failed; its error is the one to report
            return
        _wipe(loaded.arrays)
        self._tracker.release(loaded.nbytes, "weights")


class _SpillJob:
    """One optimized segment's spill entry being decrypted into the run's arena, chunk by chunk.

    Created early — while the previous segment computes — the prefetch thread claims the
    chunks the arena schedule allows ahead (:class:`~.arena.Step`): those clear of the
    running segment's bytes, from the far end of the arena, within what the budget
    leaves. When the compute thread reaches this segment (the previous one is done) it
    zeroes the stale bytes the schedule says the budget has no room for, lifts the limit,
    wakes the prefetch thread again if it had stopped there, and claims chunks itself
    instead of waiting: two threads decrypt the rest (``cryptography`` releases the GIL
    for AES-GCM). On two cores ONNX Runtime keeps both busy, so the idle-priority
    prefetch thread gets little done during compute and most of a segment is decrypted
    this way. Chunks are disjoint parts of the arena, so the threads never touch the same
    bytes. The first failure stops further claims and is raised by :meth:`finish`.
    """

    def __init__(
        self,
        model: StreamingModel,
        index: int,
        state: _State,
        arena: _RunArena,
        step: Step,
        pool: ThreadPoolExecutor | None,
        *,
        early: bool,
    ) -> None:
        assert model._spill is not None and state.entry is not None
        self._model = model
        self._spill = model._spill
        self._index = index
        self._state = state
        self._entry = state.entry
        self._arena = arena
        self._step = step
        self._tracker = arena.tracker
        self._pool = pool
        self._n = len(self._entry.chunks)
        self._order = list(range(self._n - 1, -1, -1)) if step.reverse else list(range(self._n))
        self._blob = arena.blob(step.offset, self._entry.nbytes)
        self._turned = not early
        if early:
            self._limit = min(step.ahead, self._n)
            arena.count(step.ahead_growth)
        else:
            arena.trim(step)
            arena.count(step.ahead_growth + step.growth)
            self._limit = self._n
        self._next = 0
        self._in_flight = 0
        self._workers = 0  # prefetch-thread calls of work() submitted and not yet finished
        self._error: BaseException | None = None
        self._busy = 0.0
        self._cond = threading.Condition()
        #: No worker will come (no pool, or it was closed): the compute thread does everything.
        self.solo = pool is None

    def submit(self) -> None:
        """Have a prefetch thread claim chunks (up to the current limit)."""
        if self._pool is None:
            self.solo = True
            return
        with self._cond:
            self._workers += 1
        try:
            self._pool.submit(self._work_as_worker)
        except RuntimeError:  # close() raced with this run
            with self._cond:
                self._workers -= 1
            self.solo = True

    def _work_as_worker(self) -> None:
        self.work(worker=True)

    def _claim_locked(self) -> int:
        if self._error is not None or self._next >= self._limit:
            return -1
        index = self._order[self._next]
        self._next += 1
        self._in_flight += 1
        return index

    def work(self, worker: bool = False) -> None:
        """Decrypt chunks until none is left to claim (any thread).

        ``worker``: called from the pool (see :meth:`submit`). Such a call stops counting
        as a worker under the same lock as its last failed claim, so :meth:`finish`
        never mistakes a worker that stopped at the old limit for a running one.
        """
        scratch_bytes = self._spill.scratch_bytes
        with self._cond:
            index = self._claim_locked()
            if index < 0:
                if worker:
                    self._workers -= 1
                    self._cond.notify_all()
                return
            self._tracker.add(scratch_bytes, "scratch")
        try:
            scratch = self._model._scratch_view(scratch_bytes) if scratch_bytes else None
        except BaseException as exc:  # e.g. MemoryError: give the chunk back as failed
            with self._cond:
                self._in_flight -= 1
                self._error = self._error or exc
                self._tracker.release(scratch_bytes, "scratch")
                if worker:
                    self._workers -= 1
                self._cond.notify_all()
            return
        out = self._blob.data
        while index >= 0:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                self._spill.read_chunk(self._entry, index, out, scratch)
            except BaseException as exc:  # recorded and raised by finish() in the compute thread
                error = exc
            with self._cond:
                self._busy += time.perf_counter() - started
                self._in_flight -= 1
                if error is not None and self._error is None:
                    self._error = error
                index = self._claim_locked()
                if index < 0:
                    # Give the scratch back before anyone can see the job complete.
                    self._tracker.release(scratch_bytes, "scratch")
                    if worker:
                        self._workers -= 1
                self._cond.notify_all()

    def finish(self, help_allowed: bool) -> tuple[_Loaded, float]:
        """The decrypted weights (after helping, if allowed); and the seconds this took.

        Call it once the previous segment has run: its bytes in the arena are stale now.

        Raises:
            SealedModelError: a chunk was short or failed authentication (the segment is
                then rebuilt at the start of the next run).
        """
        started = time.perf_counter()
        if not self._turned:
            # The previous segment is done: zero the stale bytes the budget has no room for
            # (outside this segment's range, so no chunk in flight is touched), then allow
            # every chunk.
            self._turned = True
            self._arena.trim(self._step)
            self._arena.count(self._step.growth)
            with self._cond:
                self._limit = self._n
                idle = self._workers == 0
            if idle and not self.solo:
                self.submit()  # the prefetch thread stopped at the old limit: wake it again
        if help_allowed or self.solo:
            self.work()
        with self._cond:
            while self._in_flight or (self._error is None and self._next < self._n):
                self._cond.wait()
            error = self._error
        # Without a prefetch thread the compute thread decrypted it all: no waiting.
        waited = time.perf_counter() - started if self._pool is not None else 0.0
        if error is not None:
            if isinstance(error, SealedModelError):
                self._model._mark_stale(self._index, self._state)
            raise error
        arrays = self._entry.views(self._blob)
        return _Loaded(arrays, self._entry.nbytes, self._busy, in_arena=True), waited

    def abandon(self) -> None:
        """After a failed run: stop claiming and wait for chunks in flight (the arena is wiped later)."""
        with self._cond:
            self._next = self._n
            while self._in_flight:
                self._cond.wait()


@dataclass(frozen=True)
class _Layout:
    """A run's arena size (None: no optimized segment, no arena) and schedule."""

    capacity: int | None
    steps: tuple[Step, ...]


class _RunArena:
    """A run's weight arena, and the bytes of it the run's tracker counts as weights.

    The counts follow the arena schedule (:func:`~.arena.schedule`): what each step marks
    and zeroes. A run with only sealed segments borrows no arena.
    """

    def __init__(self, pool: ArenaPool, capacity: int | None, tracker: MemoryTracker) -> None:
        self.tracker = tracker
        self._pool = pool
        self._arena: WeightArena | None = pool.borrow(capacity) if capacity is not None else None
        self._counted = 0

    def blob(self, offset: int, nbytes: int) -> np.ndarray:
        """Where a segment's weights are decrypted to (marked in the arena from now on)."""
        assert self._arena is not None
        return self._arena.view(offset, nbytes)

    def count(self, nbytes: int) -> None:
        """Count ``nbytes`` more of the arena as (possibly) holding plaintext."""
        self.tracker.add(nbytes, "weights")
        self._counted += nbytes

    def trim(self, step: Step) -> None:
        """Zero the stale ranges ``step`` has no room for."""
        if self._arena is None or not step.zero:
            return
        self._arena.zero(step.zero)
        self.tracker.release(step.zeroed_bytes, "weights")
        self._counted -= step.zeroed_bytes

    def give_back(self, wipe_with: Callable[[Callable[[], None]], object] | None) -> None:
        """End of the run: stop counting the arena and hand it back for its wipe."""
        self.tracker.release(self._counted, "weights")
        self._counted = 0
        if self._arena is not None:
            arena, self._arena = self._arena, None
            self._pool.give_back(arena, wipe_with)


def _wipe(arrays: dict[str, np.ndarray]) -> None:
    """Zero a sealed segment's weight buffers and drop them."""
    for array in arrays.values():
        array[...] = 0
    arrays.clear()


def _arena_segment(state: _State, activation_bytes: int) -> ArenaSegment:
    """What the arena schedule needs of a segment state."""
    if state.entry is None:
        return ArenaSegment(activation_bytes, sealed_bytes=state.weight_bytes)
    chunks = tuple((c.start, c.start + c.length - TAG_SIZE) for c in state.entry.chunks)
    return ArenaSegment(activation_bytes, blob_bytes=state.entry.nbytes, chunks=chunks)


_Pending = _SealedPending | _SpillJob


def _close(got: np.ndarray, expected: np.ndarray) -> bool:
    """Whether a runtime output matches ONNX Runtime's reference (float tolerance, NaN-aware)."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if expected.dtype.kind not in "fc":
        return bool(np.array_equal(got, expected))
    scale = float(np.max(np.abs(expected), initial=0.0, where=np.isfinite(expected)))
    return bool(np.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True))
