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
* Per request, each segment's weights are decrypted (every AES-GCM chunk
  authenticated) into fresh buffers just before the segment runs, fed to the
  session, and dropped as soon as it returns. Activations are dropped after
  their last consumer segment.
* With ``prefetch=True`` a background thread decrypts segment *k + 1* while
  segment *k* computes — one segment ahead only, which the planner budgets
  for (see :mod:`.planner`).

Every request re-reads the container, so a tampered weight chunk fails the
request with :class:`~sealedml.errors.SealedModelError`, even when the tampering
happened after the model was loaded. The model object keeps no per-request
state: once the container is restored (or a reader factory hands out a good
reader) the same object serves again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import helper

from sealedml.crypto import TAG_SIZE
from sealedml.envelope.model_container import SealedModelReader, TensorEntry
from sealedml.errors import ConfigurationError, InputError, SealedModelError
from sealedml.runtime.streaming.accounting import MemoryTracker
from sealedml.runtime.streaming.planner import Plan, Segment
from sealedml.runtime.streaming.planner import plan as make_plan

__all__ = [
    "InputSpec",
    "ReaderSource",
    "RunStats",
    "SegmentStats",
    "StreamingModel",
    "decrypt_reserve",
    "segment_session_options",
]

log = logging.getLogger(__name__)

#: A reader, or a function returning a fresh reader for each request (closed after it).
ReaderSource = SealedModelReader | Callable[[], SealedModelReader]


def decrypt_reserve(chunk_size: int) -> int:
    """Scratch bytes one decrypting thread holds besides the weight buffers.

    One ciphertext chunk being read, its plaintext, and the previous chunk's
    plaintext kept for a tensor that starts inside it.

    Args:
        chunk_size: the container's plaintext chunk size.

    Returns:
        The bytes the planner must keep out of the budget.
    """
    return 3 * chunk_size + TAG_SIZE


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
    options.log_severity_level = 3
    # As LoadedModel: idle ORT threads must not spin on a shared machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without the arena, intermediates go back to the allocator after each run
    # instead of staying reserved per session (there is one session per segment).
    options.enable_cpu_mem_arena = False
    return options


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, dtype and rank (as ``LoadedModel.inputs``)."""

    name: str
    dtype: np.dtype[np.generic]
    rank: int | None


@dataclass(frozen=True)
class SegmentStats:
    """Timings of one segment in one run.

    Attributes:
        index: the segment.
        weight_bytes: bytes decrypted for it.
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


@dataclass
class _Loaded:
    """Decrypted weights of one segment (owned by exactly one run)."""

    arrays: dict[str, np.ndarray]
    nbytes: int
    seconds: float


class StreamingModel:
    """A sealed model executed segment by segment within a memory budget.

    Same interface as :class:`~sealedml.runtime.engine.LoadedModel` (``model_id``,
    ``version``, ``nbytes``, ``inputs``, ``output_names``, ``bind_inputs``, ``run``),
    plus ``plan``, ``last_peak_bytes`` and ``last_stats``. ``run`` is thread-safe;
    the budget is *per run*, so N concurrent runs may hold N budgets.

    Args:
        source: the container reader (shared by all runs: reads are ``pread`` or
            slices of immutable bytes), or a factory returning a fresh reader per run.
            Every reader must be for the same sealed container as the first.
        budget_bytes: the per-run memory budget; required unless ``plan`` is given.
        plan: a ready plan (from :func:`~sealedml.runtime.streaming.planner.plan` over
            this container's graph); its reserve must cover :func:`decrypt_reserve`.
        batch: the largest batch to plan for (when ``plan`` is not given).
        threads: ONNX Runtime intra-op threads per run.
        prefetch: decrypt segment k + 1 on a background thread while segment k computes.
        prefetch_workers: background threads shared by concurrent runs.
        model_id: for messages; defaults to the container's.
        version: defaults to the container's.

    Raises:
        BudgetError: no plan fits ``budget_bytes``.
        ConfigurationError: inconsistent arguments.
        SealedModelError: the container header, manifest or graph fails authentication,
            or ONNX Runtime rejects a segment.
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
    ) -> None:
        self._reader: SealedModelReader | None
        self._factory: Callable[[], SealedModelReader] | None
        if isinstance(source, SealedModelReader):
            self._reader, self._factory = source, None
            reader = source
        else:
            self._reader, self._factory = None, source
            reader = source()
        try:
            header = reader.header
            self._header_raw = header.raw
            self._chunk_size = header.chunk_size
            self._entries: dict[str, TensorEntry] = {entry.name: entry for entry in reader.manifest.tensors}
            reserve = decrypt_reserve(self._chunk_size)
            if plan is None:
                if budget_bytes is None:
                    raise ConfigurationError("give a memory budget or a plan")
                sizes = {name: entry.length for name, entry in self._entries.items()}
                plan = make_plan(
                    reader.graph(), sizes, budget_bytes, batch=batch, prefetch=prefetch, reserve_bytes=reserve
                )
        finally:
            if self._factory is not None:
                reader.close()
        if budget_bytes is not None and budget_bytes != plan.budget_bytes:
            raise ConfigurationError("budget_bytes disagrees with the plan's budget")
        if prefetch and not plan.prefetch:
            raise ConfigurationError("this plan leaves no room for prefetch; plan with prefetch=True")
        if plan.reserve_bytes < reserve:
            raise ConfigurationError(f"the plan must reserve ≥ {reserve} bytes for decryption scratch")
        for segment in plan.segments:
            for weight in segment.weights:
                entry = self._entries.get(weight.tensor)
                if entry is None or weight.byte_start + weight.nbytes > entry.length:
                    raise ConfigurationError(f"plan reads weight {weight.name!r} that the container does not hold")
        self.plan = plan
        self.model_id = model_id if model_id is not None else header.model_id
        self.version = version if version is not None else header.model_version
        self.prefetch = prefetch
        self.threads = threads
        self._sessions: list[ort.InferenceSession] = []
        nbytes = 0
        for segment in plan.segments:
            data = plan.segment_model(segment.index).SerializeToString()
            nbytes += len(data)
            try:
                session = ort.InferenceSession(
                    data, segment_session_options(threads), providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                raise SealedModelError(
                    f"model {self.model_id} v{self.version}: segment {segment.index} cannot be loaded"
                ) from exc
            self._sessions.append(session)
        #: Bytes resident between requests: the segment graphs, which hold no weights.
        #: The per-run working set is bounded by ``plan.budget_bytes`` instead.
        self.nbytes = nbytes
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
            ThreadPoolExecutor(max_workers=max(1, prefetch_workers), thread_name_prefix="sealedml-prefetch")
            if prefetch
            else None
        )
        self._lock = threading.Lock()
        self._last_stats: RunStats | None = None

    # ----------------------------------------------------------------- LoadedModel API

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
        if positional:
            if len(tensors) != len(self.inputs):
                raise InputError(f"model takes {len(self.inputs)} input(s), got {len(tensors)} unnamed tensor(s)")
            named = {spec.name: tensors[str(i)] for i, spec in enumerate(self.inputs)}
        else:
            expected = {s.name for s in self.inputs}
            missing, extra = expected - set(tensors), set(tensors) - expected
            if missing or extra:
                raise InputError(
                    f"inputs do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}"
                )
            named = dict(tensors)
        for spec in self.inputs:
            array = named[spec.name]
            if array.dtype != spec.dtype:
                raise InputError(f"input {spec.name!r} must be {spec.dtype}, got {array.dtype}")
            if spec.rank is not None and array.ndim != spec.rank:
                raise InputError(f"input {spec.name!r} must have rank {spec.rank}, got {array.ndim}")
        self._check_batch(named)
        return named

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model within the budget (thread-safe; blocking); see :meth:`run_with_stats`."""
        outputs, _ = self.run_with_stats(inputs)
        return outputs

    def run_with_stats(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], RunStats]:
        """Run the model within the budget (thread-safe; blocking); also return this run's figures.

        Args:
            inputs: tensors keyed by input name (see :meth:`bind_inputs`).

        Returns:
            The outputs keyed by name, and this run's :class:`RunStats` (peak bytes, times).

        Raises:
            SealedModelError: a weight chunk failed authentication (tampered, truncated,
                or another container); the model stays usable.
            InputError: missing inputs, a batch larger than planned, or ONNX Runtime
                rejected the inputs.
        """
        missing = [name for name in self.plan.inputs if name not in inputs]
        if missing:
            raise InputError(f"missing input(s) {missing}")
        self._check_batch(inputs)
        started = time.perf_counter()
        tracker = MemoryTracker(self.model_id)
        env: dict[str, np.ndarray] = {}
        for name in self.plan.inputs:
            env[name] = np.asarray(inputs[name])
            if name in self._tracked_inputs:
                tracker.add(env[name].nbytes)
        reader = self._open_reader()
        pending: Future[_Loaded] | None = None
        segment_stats: list[SegmentStats] = []
        pool = self._pool
        try:
            if pool is not None and self.plan.segments:
                pending = self._prefetch(pool, reader, self.plan.segments[0], tracker)
            for k, segment in enumerate(self.plan.segments):
                waited = 0.0
                if pending is not None:
                    t0 = time.perf_counter()
                    try:
                        loaded = pending.result()
                    finally:
                        pending = None
                    waited = time.perf_counter() - t0
                    if pool is not None and k + 1 < len(self.plan.segments):
                        # One segment ahead only: the planner budgeted for exactly this.
                        pending = self._prefetch(pool, reader, self.plan.segments[k + 1], tracker)
                else:
                    loaded = self._decrypt(reader, segment, tracker)
                compute = self._compute(segment, env, loaded, tracker)
                segment_stats.append(SegmentStats(k, loaded.nbytes, loaded.seconds, waited, compute))
        finally:
            if pending is not None:
                self._abandon(pending, tracker)
            if self._factory is not None:
                reader.close()
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
        """Stop the prefetch threads (pending work finishes first). Idempotent.

        Later runs still work, without prefetch.
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> StreamingModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _decrypt(self, reader: SealedModelReader, segment: Segment, tracker: MemoryTracker) -> _Loaded:
        """Decrypt one segment's weights into fresh buffers (Occlumency's on-demand weight loading).

        Reads only the chunks covering each weight slice; each chunk is authenticated
        before its bytes are used. Chunks shared by adjacent tensors are decrypted once.
        """
        started = time.perf_counter()
        chunk_size = self._chunk_size
        scratch = decrypt_reserve(chunk_size)
        arrays: dict[str, np.ndarray] = {}
        held = 0
        tracker.add(scratch, "scratch")
        try:
            cached_index, cached = -1, b""
            for weight in sorted(segment.weights, key=lambda w: self._entries[w.tensor].offset + w.byte_start):
                buf = np.empty(weight.nbytes, dtype=np.uint8)
                tracker.add(weight.nbytes, "weights")
                held += weight.nbytes
                start = self._entries[weight.tensor].offset + weight.byte_start
                end = start + weight.nbytes
                view = memoryview(buf.data)
                pos = start
                while pos < end:
                    index = pos // chunk_size
                    if index != cached_index:
                        cached_index, cached = index, reader.chunk(index)
                    lo = pos - index * chunk_size
                    n = min(len(cached) - lo, end - pos)
                    if n <= 0:
                        raise SealedModelError("weight range runs past the sealed payload")
                    view[pos - start : pos - start + n] = memoryview(cached)[lo : lo + n]
                    pos += n
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(weight.data_type))
                arrays[weight.name] = buf.view(dtype).reshape(weight.dims)
        except BaseException:
            arrays.clear()
            tracker.release(held, "weights")
            raise
        finally:
            tracker.release(scratch, "scratch")
        return _Loaded(arrays, held, time.perf_counter() - started)

    def _compute(self, segment: Segment, env: dict[str, np.ndarray], loaded: _Loaded, tracker: MemoryTracker) -> float:
        """Run one segment; drop its weights and the activations it was the last consumer of."""
        feeds: dict[str, np.ndarray] = {name: env[name] for name in segment.inputs}
        feeds.update(loaded.arrays)
        # ORT's intermediates are not visible from Python: count the planner's estimate.
        tracker.add(segment.internal_bytes, "estimated")
        started = time.perf_counter()
        try:
            values = self._sessions[segment.index].run(list(segment.outputs), feeds)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise InputError(f"model {self.model_id} rejected the inputs: {first}") from exc
        finally:
            elapsed = time.perf_counter() - started
            tracker.release(segment.internal_bytes, "estimated")
            # Drop the plaintext weights as soon as the segment has run.
            feeds.clear()
            loaded.arrays.clear()
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

    def _prefetch(
        self, pool: ThreadPoolExecutor, reader: SealedModelReader, segment: Segment, tracker: MemoryTracker
    ) -> Future[_Loaded] | None:
        """Start decrypting ``segment`` in the background; None if the pool was closed meanwhile."""
        try:
            return pool.submit(self._decrypt, reader, segment, tracker)
        except RuntimeError:  # close() raced with this run: decrypt inline instead
            return None

    def _abandon(self, pending: Future[_Loaded], tracker: MemoryTracker) -> None:
        """After a failed run: wait for an in-flight prefetch and drop what it decrypted."""
        if pending.cancel():
            return
        try:
            loaded = pending.result()
        except BaseException:  # the run already failed; its error is the one to report
            return
        loaded.arrays.clear()
        tracker.release(loaded.nbytes, "weights")
