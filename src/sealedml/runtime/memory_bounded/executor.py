"""The memory-bounded executor: run a sealed model segment by segment within a memory budget.

Occlumency (Lee et al., MobiCom 2019) runs a DNN in an SGX enclave whose
protected memory is far smaller than the model by (a) *on-demand weight
loading* — weights stay encrypted outside and are decrypted and integrity
checked right before the layer that needs them — (b) *memory-efficient
inference* — a buffer is freed as soon as its last consumer has run — and
(c) overlapping the loading of the next layer's weights with the current
layer's compute. :class:`StreamingModel` does the same over a sealed
container and ONNX Runtime:

* One ONNX Runtime session per planned segment, built once at construction.
  Its weights are graph **inputs**, not initializers, so no session holds a
  plaintext weight between requests: only the graph structure (the one
  exception, the next run's first segment, is below).
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
* With prefetch, once a run has returned, the prefetch threads decrypt the next run's
  first segment into the arena it used (:mod:`.warm`): a run does not start by waiting
  for its first weights. Between requests that arena holds the first segment's
  plaintext (within the budget); ``warm_first_segment=False`` keeps only zeros there.

A chunk that fails authentication fails the request with
:class:`~sealedml.errors.SealedModelError`. The model object keeps no
per-request state: a sealed segment serves again once the container is
restored; an optimized segment whose spill chunk was tampered with is rebuilt
from the sealed container at the start of the next request.

This module is the run loop. What runs at load is in :mod:`.prepare` and
:mod:`.builder`; per run, :mod:`.container` decrypts sealed segments,
:mod:`.decrypt` holds the jobs that decrypt a segment ahead, :mod:`.run_arena`
the run's weight arena, and :mod:`.stats` the figures a run reports.
"""

from __future__ import annotations

import functools
import logging
import operator
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from onnx import helper

from sealedml._internal.priority import yield_to_compute
from sealedml._internal.units import format_bytes
from sealedml.envelope.model_container import SealedModelReader
from sealedml.errors import ConfigurationError, InputError, SealedModelError
from sealedml.runtime.engine import InputSpec, Model, RunResult, bind_inputs, ort_failure
from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.arena import ArenaPool, Step, capacity_for, schedule
from sealedml.runtime.memory_bounded.builder import SegmentState
from sealedml.runtime.memory_bounded.container import Container, ReaderSource, RunReaders, planning_graph
from sealedml.runtime.memory_bounded.decrypt import Pending, ScratchBuffer, SealedPending, SpillJob
from sealedml.runtime.memory_bounded.planner import plan as make_plan
from sealedml.runtime.memory_bounded.prepare import DEFAULT_SPILL_CHUNK, planning_reserve, prepare
from sealedml.runtime.memory_bounded.run_arena import DecryptedWeights, Layout, RunArena, arena_segment, wipe
from sealedml.runtime.memory_bounded.segments import Plan, Segment
from sealedml.runtime.memory_bounded.spill import SpillStore
from sealedml.runtime.memory_bounded.stats import LoadStats, RunStats, SegmentStats
from sealedml.runtime.memory_bounded.warm import WarmHead

__all__ = ["ReaderSource", "StreamingModel"]

log = logging.getLogger(__name__)


class StreamingModel(Model):
    """A sealed model executed segment by segment within a memory budget.

    A :class:`~sealedml.runtime.engine.Model` (``model_id``, ``version``, ``nbytes``,
    ``inputs``, ``output_names``, ``bind_inputs``, ``run`` with the run's tracked peak),
    plus ``plan``, ``last_peak_bytes``, ``last_stats``, ``load_stats`` and
    ``segment_modes``. ``run`` is thread-safe; the budget is *per run*, so N concurrent
    runs may hold N budgets.

    For diagnostics and tests, read-only views of its state: ``segment_states``,
    ``spill``, ``stale_segments``, ``arena_pool`` and ``scratch_reserve_bytes``.

    Args:
        source: the container reader (shared by all runs: reads are ``pread`` or
            slices of immutable bytes), or a factory returning a fresh reader per run
            that needs the container. Every reader must be for the same sealed
            container as the first.
        budget_bytes: the per-run memory budget; required unless ``plan`` is given.
        plan: a ready plan (from :func:`~sealedml.runtime.memory_bounded.planner.plan` over
            this container's graph); its reserve must cover :func:`~.container.decrypt_reserve`.
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
        warm_first_segment: with ``prefetch``, decrypt the next run's first (optimized)
            segment after each run, so that runs do not start by waiting for it
            (:mod:`.warm`); its plaintext then stays in memory between requests.

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
        warm_first_segment: bool = True,
    ) -> None:
        started = time.perf_counter()
        if spill_chunk < 1:
            raise ConfigurationError("spill_chunk must be positive")
        if isinstance(source, SealedModelReader):
            reader, factory = source, None
        else:
            reader, factory = source(), source
        self.prefetch = prefetch
        self.threads = threads
        self.warm_first_segment = prefetch and warm_first_segment
        self._lock = threading.Lock()
        self._scratch = ScratchBuffer()
        try:
            self._container = container = Container(reader, factory)
            header = reader.header
            reserve = container.reserve_bytes
            graph = None
            if plan is None:
                if budget_bytes is None:
                    raise ConfigurationError("give a memory budget or a plan")
                graph = planning_graph(reader)
                scratch = planning_reserve(reserve, budget_bytes, spill_chunk, optimize=optimize)
                # The fewest segments, each filling the budget: prefetch decrypts as much of the
                # next segment as the arena and the budget leave beside the current one (.arena).
                plan = make_plan(
                    graph, container.weight_sizes, budget_bytes, batch=batch, prefetch=False, reserve_bytes=scratch
                )
            if budget_bytes is not None and budget_bytes != plan.budget_bytes:
                raise ConfigurationError("budget_bytes disagrees with the plan's budget")
            if plan.reserve_bytes < reserve:
                raise ConfigurationError(f"the plan must reserve ≥ {reserve} bytes for decryption scratch")
            container.check_plan(plan)
            #: Scratch one decrypting thread may hold (the plan's reserve without any headroom).
            self._scratch_reserve = plan.reserve_bytes
            self.model_id = model_id if model_id is not None else header.model_id
            self.version = version if version is not None else header.model_version
            prepared = prepare(
                container,
                reader,
                plan,
                graph,
                scratch=self._scratch,
                optimize=optimize,
                verify=verify,
                threads=threads,
                batch=batch,
                spill_chunk=spill_chunk,
                spill_dir=spill_dir,
                model_id=self.model_id,
                version=self.version,
            )
        finally:
            if factory is not None:
                reader.close()
        self._segments = segments = prepared.segments
        self.plan = plan = segments.plan
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
                initializer=yield_to_compute,
            )
            if prefetch
            else None
        )
        # Optimized segments decrypt into a reused, wiped arena per run (see .arena), laid
        # out once per set of segment states.
        self._arenas = ArenaPool()
        self._schedule: tuple[tuple[SegmentState, ...], Layout] | None = None
        #: The next run's first segment, being decrypted or ready (at most one; see .warm).
        self._warm: WarmHead | None = None
        self._last_stats: RunStats | None = None
        states = segments.states
        spill = segments.spill
        self.load_stats = LoadStats(
            total_s=time.perf_counter() - started,
            optimize_s=prepared.optimize_s,
            plans=prepared.plans,
            headroom_bytes=self._headroom,
            optimized_segments=sum(s.optimized for s in states),
            fallbacks=tuple(sorted(prepared.fallbacks.items())) if optimize else (),
            weight_bytes=sum(s.weight_bytes for s in states),
            sealed_weight_bytes=plan.weight_bytes,
            spill_bytes=spill.size if spill is not None else 0,
            nchwc_nodes=sum(s.nchwc_nodes for s in states),
        )
        if optimize:
            log.info(
                "model %s: %d/%d segments optimized (%d NCHWc nodes) in %.2f s; %d plan(s), headroom %s",
                self.model_id,
                self.load_stats.optimized_segments,
                len(plan.segments),
                self.load_stats.nchwc_nodes,
                prepared.optimize_s,
                prepared.plans,
                format_bytes(self._headroom),
            )

    # ----------------------------------------------------------------- LoadedModel API

    @property
    def nbytes(self) -> int:
        """Bytes resident between requests: the segment graphs, which hold no weights, and
        the first segment's weights decrypted for the next run (``warm_first_segment``).

        The per-run working set is bounded by ``plan.budget_bytes`` instead.
        """
        states = self._segments.states
        head = states[0].entry.nbytes if self.warm_first_segment and states and states[0].entry else 0
        return sum(state.graph_bytes for state in states) + head

    @property
    def peak_bound_bytes(self) -> int:
        """The tracked-peak bound of a run with the segments as they are now (≤ the budget).

        Per segment: the arena bytes that may hold plaintext (the segment's own and stale
        ones the budget has room for; see :mod:`.arena`), a sealed segment's weights, its
        activation peak, one decrypting thread's scratch, and what is decrypted ahead for
        the next segment.
        """
        steps = self._layout(self._segments.states).steps
        return max((step.peak for step in steps), default=self._scratch_reserve)

    @property
    def prefetch_ahead_bytes(self) -> tuple[int, ...]:
        """Per segment k, the bytes of segment k + 1's weights decrypted while k computes.

        An optimized segment's chunks clear of segment k's bytes in the arena, as far as
        the budget leaves room; a sealed one whole or not at all. The rest is decrypted
        (by two threads) once segment k is done. All zeros without prefetch.
        """
        steps = self._layout(self._segments.states).steps
        return (*(step.ahead_bytes for step in steps[1:]), 0) if steps else ()

    @property
    def segment_modes(self) -> tuple[str, ...]:
        """Per segment, ``"optimized"`` (spilled optimized weights) or ``"sealed"`` (from the container)."""
        return tuple("optimized" if state.optimized else "sealed" for state in self._segments.states)

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
            The outputs keyed by name, and this run's :class:`~.stats.RunStats` (peak bytes, times).

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
        readers = self._container.run_readers()
        try:
            if self._segments.stale:
                # A spill chunk failed authentication in an earlier run: rebuild those
                # segments from the sealed container before this run (outside its budget,
                # like construction).
                self._segments.rebuild_stale(readers.get)
            return self._run(inputs, list(self._segments.states), readers)
        finally:
            readers.close()

    def _run(
        self, inputs: Mapping[str, np.ndarray], states: list[SegmentState], readers: RunReaders
    ) -> tuple[dict[str, np.ndarray], RunStats]:
        started = time.perf_counter()
        pool = self._pool
        segments = self.plan.segments
        layout = self._layout(states)
        steps = layout.steps
        pending: Pending | None = None
        warm = self._take_warm(layout)
        if warm is not None:
            # The first segment was decrypted (or is being decrypted) after the previous run.
            tracker, arena, pending = warm.tracker, warm.arena, warm.job
        else:
            tracker = MemoryTracker(self.model_id)
            arena = RunArena(self._arenas, layout.capacity, tracker)
        env: dict[str, np.ndarray] = {}
        for name in self.plan.inputs:
            env[name] = np.asarray(inputs[name])
            if name in self._tracked_inputs:
                tracker.add(env[name].nbytes)
        segment_stats: list[SegmentStats] = []
        finished = False
        try:
            if warm is not None:
                warm.ready()
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
            finished = True
        finally:
            if pending is not None:
                pending.abandon()  # waits for chunks in flight: nothing writes the arena after it
            if not (finished and self._warm_next(arena, layout, states)):
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
        with self._lock:
            warm, self._warm = self._warm, None
        if warm is not None:
            warm.discard(None)
        self._arenas.drain()  # wipes still queued (none once the pool has run them)

    def settle(self) -> None:
        """Wait for the work done in the background for the next run: the first segment's
        decryption (``warm_first_segment``). For tests and diagnostics that look at memory
        or tamper with the spill between requests; serving never needs it."""
        with self._lock:
            warm = self._warm
        if warm is not None:
            warm.wait()

    def __enter__(self) -> StreamingModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- inspection (diagnostics, tests)

    @property
    def segment_states(self) -> tuple[SegmentState, ...]:
        """Per segment, how it runs now: session, spill entry (None: sealed), weight bytes.

        A snapshot: a segment rebuilt after a spill authentication failure gets a new state.
        """
        return self._segments.states

    @property
    def spill(self) -> SpillStore | None:
        """The spill of optimized weights, sealed under an ephemeral key (None when nothing is optimized)."""
        return self._segments.spill

    @property
    def stale_segments(self) -> frozenset[int]:
        """Segments whose spill failed authentication, to be rebuilt at the start of the next run."""
        return self._segments.stale

    @property
    def arena_pool(self) -> ArenaPool:
        """The weight arenas runs borrow (between runs they hold only zeros)."""
        return self._arenas

    @property
    def scratch_reserve_bytes(self) -> int:
        """Scratch one decrypting thread may hold: the plan's reserve without the headroom
        kept for grown optimized weights (``load_stats.headroom_bytes``)."""
        return self._scratch_reserve

    # ----------------------------------------------------------------- per run

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

    def _layout(self, states: Sequence[SegmentState]) -> Layout:
        """The arena schedule of a run with these segment states (cached until a rebuild)."""
        with self._lock:
            cached = self._schedule
        if cached is not None and len(cached[0]) == len(states) and all(map(operator.is_, cached[0], states)):
            return cached[1]
        segments = [
            arena_segment(state.entry, state.weight_bytes, segment.activation_peak_bytes)
            for state, segment in zip(states, self.plan.segments, strict=True)
        ]
        spill = self._segments.spill
        layout = Layout(
            capacity_for(segments) if any(state.optimized for state in states) else None,
            schedule(
                segments,
                budget=self.plan.budget_bytes,
                scratch=self._scratch_reserve,
                # Scratch one thread holds while decrypting spill chunks.
                second_scratch=spill.scratch_bytes if spill is not None else 0,
                prefetch=self.prefetch,
            ),
        )
        with self._lock:
            self._schedule = (tuple(states), layout)
        return layout

    def _take_warm(self, layout: Layout) -> WarmHead | None:
        """The warm head prepared after an earlier run, if it was laid out for ``layout``."""
        with self._lock:
            warm, self._warm = self._warm, None
        if warm is not None and warm.layout is not layout:
            warm.discard(self._pool)  # a segment was rebuilt since: its arena schedule changed
            return None
        return warm

    def _warm_next(self, arena: RunArena, layout: Layout, states: Sequence[SegmentState]) -> bool:
        """After a run: start decrypting the next run's first segment into its arena (see .warm).

        Returns:
            Whether the arena was kept for that (otherwise the caller gives it back).
        """
        pool, spill, first = self._pool, self._segments.spill, states[0]
        if not self.warm_first_segment or pool is None or spill is None or first.entry is None:
            return False
        with self._lock:
            if self._warm is not None:
                return False  # one warm head per model: a concurrent run made it
        weights = arena.detach()
        if weights is None:
            return False
        step = layout.steps[0]
        tracker = MemoryTracker(self.model_id)
        head = RunArena(self._arenas, None, tracker, adopt=weights)
        job = SpillJob(
            spill,
            first.entry,
            head,
            step,
            pool,
            self._scratch,
            functools.partial(self._segments.mark_stale, 0, first),
            early=True,  # nothing is claimable before the stale bytes are zeroed
        )
        warm = WarmHead(layout, tracker, head, job, (step.offset, step.offset + first.entry.nbytes))
        with self._lock:
            taken = self._warm is None
            if taken:
                self._warm = warm
        # Not kept when another run made one meanwhile, when the pool no longer takes work, or
        # when close() ran meanwhile (it may have looked for a warm head before this one existed).
        if not taken or not warm.start(pool) or self._pool is None:
            with self._lock:
                mine = self._warm is warm or not taken
                if self._warm is warm:
                    self._warm = None
            if mine:
                warm.discard(None)
        return True

    def _load_sealed(self, readers: RunReaders, index: int, tracker: MemoryTracker) -> DecryptedWeights:
        """Decrypt sealed segment ``index``'s weights from the container (any thread)."""
        return self._container.decrypt(readers.get(), self.plan.segments[index], tracker)

    def _compute(
        self,
        segment: Segment,
        session: ort.InferenceSession,
        env: dict[str, np.ndarray],
        loaded: DecryptedWeights,
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
                wipe(loaded.arrays)  # fresh buffers: zeroed before the allocator gets them back
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

    def _start(
        self,
        pool: ThreadPoolExecutor | None,
        readers: RunReaders,
        index: int,
        state: SegmentState,
        arena: RunArena,
        step: Step,
        *,
        early: bool,
    ) -> Pending | None:
        """Start decrypting segment ``index``.

        Args:
            pool: the prefetch threads (None without prefetch: the compute thread then
                decrypts the segment alone in :meth:`~.decrypt.SpillJob.finish`).
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
            return SealedPending(future, arena.tracker)
        spill = self._segments.spill
        assert spill is not None  # a segment has a spill entry only when there is a spill
        job = SpillJob(
            spill,
            state.entry,
            arena,
            step,
            pool,
            self._scratch,
            # A chunk that failed authentication: rebuild the segment before the next run.
            functools.partial(self._segments.mark_stale, index, state),
            early=early,
        )
        if pool is not None:
            job.submit()
        return job
