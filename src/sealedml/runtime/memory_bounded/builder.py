"""One segment's state, and how it is built: its ONNX Runtime session and its spilled weights.

* A **sealed** segment (:meth:`SegmentBuilder.sealed`) gets a session built once. Its
  weights are graph **inputs**, not initializers, so the session holds no plaintext
  weight between requests: only the graph structure. Per request its weights
  are decrypted from the sealed container (:mod:`.container`).
* An **optimized** segment (:meth:`SegmentBuilder.optimized`) is optimized once by ONNX
  Runtime with its real weights (:mod:`.optimize`: NCHWc layout, reordered and padded
  weights, written to an in-memory file only). The optimized weights are re-encrypted
  into a spill (:mod:`.spill`) under a key that exists only in this process, and the
  plaintext is dropped. With ``verify`` the spilled weights are read back and the
  segment's output on a probe input is compared with ONNX Runtime's own.
* :class:`SegmentSet` holds how each segment runs now. A run whose spill chunk failed
  authentication marks the segment stale; the next run rebuilds it here, from the
  sealed container, before it starts (outside its budget, like construction).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import helper

from sealedml._internal.malloc import trim_heap
from sealedml.envelope.model_container import SealedModelReader
from sealedml.errors import SealedModelError
from sealedml.runtime.engine import ORT_LOG_SEVERITY
from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.arena import aligned_array
from sealedml.runtime.memory_bounded.container import Container
from sealedml.runtime.memory_bounded.decrypt import ScratchBuffer
from sealedml.runtime.memory_bounded.optimize import OptimizationError, optimize_segment
from sealedml.runtime.memory_bounded.run_arena import wipe
from sealedml.runtime.memory_bounded.segments import Plan, Segment
from sealedml.runtime.memory_bounded.spill import SpillEntry, SpillStore

__all__ = ["SegmentBuilder", "SegmentSet", "SegmentState", "segment_session_options"]

log = logging.getLogger(__name__)


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
class SegmentState:
    """How one segment runs; replaced as a whole when a segment is rebuilt.

    Attributes:
        session: the segment's ONNX Runtime session (its weights are graph inputs).
        entry: the segment's spill entry when it runs optimized, None when its weights
            come from the sealed container.
        weight_bytes: bytes decrypted for it per run.
        graph_bytes: bytes of its serialized graph (what stays resident).
        nchwc_nodes: NCHWc kernels in its optimized graph.
    """

    session: ort.InferenceSession
    entry: SpillEntry | None
    weight_bytes: int
    graph_bytes: int
    nchwc_nodes: int = 0

    @property
    def optimized(self) -> bool:
        """Whether the segment runs optimized (its weights come from the spill)."""
        return self.entry is not None


class SegmentBuilder:
    """Builds segment states: ONNX Runtime sessions, and optimized segments with spilled weights.

    Args:
        container: the sealed container.
        spill: where optimized weights go (None: build sealed segments only).
        scratch: per-thread ciphertext buffers, to read the spill back when verifying.
        threads: ONNX Runtime intra-op threads per run.
        verify: check each optimized graph against ONNX Runtime's own output for a probe input.
        scratch_reserve: scratch one decrypting thread may hold (part of every segment's bound).
        model_id: for messages.
        version: for messages.
    """

    def __init__(
        self,
        container: Container,
        spill: SpillStore | None,
        scratch: ScratchBuffer,
        *,
        threads: int,
        verify: bool,
        scratch_reserve: int,
        model_id: str,
        version: int,
    ) -> None:
        #: The sealed container.
        self.container = container
        #: Where optimized weights go (None: sealed segments only).
        self.spill = spill
        #: Scratch one decrypting thread may hold.
        self.scratch_reserve = scratch_reserve
        #: For messages.
        self.model_id = model_id
        self._scratch = scratch
        self._threads = threads
        self._verify = verify
        self._version = version

    def session(self, data: bytes, index: int) -> ort.InferenceSession:
        """An ONNX Runtime session of segment ``index``.

        Args:
            data: the serialized segment model.
            index: the segment (for messages).

        Returns:
            The session.

        Raises:
            SealedModelError: ONNX Runtime rejects the model.
        """
        try:
            options = segment_session_options(self._threads)
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise SealedModelError(f"model {self.model_id} v{self._version}: segment {index} cannot be loaded") from exc

    def sealed(self, plan: Plan, segment: Segment) -> SegmentState:
        """The unoptimized path: weights from the sealed container as graph inputs.

        Args:
            plan: the plan.
            segment: one of its segments.

        Returns:
            The segment's state.

        Raises:
            SealedModelError: ONNX Runtime rejects the segment.
        """
        data = plan.segment_model(segment.index).SerializeToString()
        return SegmentState(self.session(data, segment.index), None, segment.weight_bytes, len(data))

    def solo_peaks(self, plan: Plan, weights: Sequence[int]) -> list[int]:
        """Per segment: its weights, its activation peak and one decrypting thread's scratch.

        Args:
            plan: the plan.
            weights: per segment, the bytes it decrypts per run.

        Returns:
            The bound every segment must keep within the budget.
        """
        return [
            w + segment.activation_peak_bytes + self.scratch_reserve
            for w, segment in zip(weights, plan.segments, strict=True)
        ]

    def optimized(self, reader: SealedModelReader, plan: Plan, segment: Segment) -> SegmentState | str:
        """Optimize one segment with its real weights and spill them; a reason string on failure.

        Args:
            reader: a reader of the container.
            plan: the plan.
            segment: one of its segments.

        Returns:
            The optimized segment's state, or why it cannot run optimized.

        Raises:
            SealedModelError: the container's weight chunks fail authentication.
        """
        assert self.spill is not None  # only called when optimizing, which makes a spill
        loaded = self.container.decrypt(reader, segment, MemoryTracker())
        probe = _probe(plan, segment) if self._verify else None
        try:
            opt = optimize_segment(
                plan.segment_model(segment.index),
                loaded.arrays,
                inputs=segment.inputs,
                outputs=segment.outputs,
                constants=plan.constants,
                threads=self._threads,
                probe=probe,
            )
        except OptimizationError as exc:
            return str(exc)
        finally:
            wipe(loaded.arrays)
        try:
            session = ort.InferenceSession(
                opt.graph, segment_session_options(self._threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT's own exception types
            opt.drop()
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return f"ONNX Runtime rejected the optimized graph with weights as inputs: {first}"
        entry = self.spill.write(segment.index, opt.tensors)
        reference = opt.reference
        state = SegmentState(session, entry, entry.nbytes, len(opt.graph), opt.nchwc_nodes)
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
                wipe(spilled)
            for name, value, expected in zip(segment.outputs, got, reference.values(), strict=True):
                if not _close(np.asarray(value), expected):
                    return f"optimized output {name!r} differs from ONNX Runtime's reference"
        return state

    def _spilled_weights(self, entry: SpillEntry) -> dict[str, np.ndarray]:
        """Decrypt a spill entry into one fresh buffer, to check a segment at load time.

        Runs decrypt into their arena through a :class:`~.decrypt.SpillJob` instead. The
        tensors are aligned views of the buffer; zero them with :func:`~.run_arena.wipe`.
        """
        assert self.spill is not None  # see optimized()
        scratch_bytes = self.spill.scratch_bytes
        scratch = self._scratch.view(scratch_bytes) if scratch_bytes else None
        blob = aligned_array(entry.nbytes)
        self.spill.read_into(entry, blob.data, scratch)
        return entry.views(blob)


def _probe(plan: Plan, segment: Segment) -> dict[str, np.ndarray] | None:
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


def _close(got: np.ndarray, expected: np.ndarray) -> bool:
    """Whether a runtime output matches ONNX Runtime's reference (float tolerance, NaN-aware)."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if expected.dtype.kind not in "fc":
        return bool(np.array_equal(got, expected))
    scale = float(np.max(np.abs(expected), initial=0.0, where=np.isfinite(expected)))
    return bool(np.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True))


class SegmentSet:
    """How each segment of a plan runs now (thread-safe).

    A run takes a snapshot of :attr:`states`. A run whose spill chunk fails
    authentication marks that segment stale (:meth:`mark_stale`); the next run rebuilds
    it from the sealed container (:meth:`rebuild_stale`) before it starts.

    Args:
        plan: the plan.
        states: per segment, how it runs.
        builder: builds the replacements of stale segments.
    """

    def __init__(self, plan: Plan, states: Sequence[SegmentState], builder: SegmentBuilder) -> None:
        self.plan = plan
        self._builder = builder
        self._states = list(states)
        self._stale: set[int] = set()
        self._lock = threading.Lock()
        self._rebuild_lock = threading.Lock()

    @property
    def states(self) -> tuple[SegmentState, ...]:
        """Per segment, how it runs now (a snapshot)."""
        with self._lock:
            return tuple(self._states)

    @property
    def stale(self) -> frozenset[int]:
        """Segments to rebuild before the next run."""
        with self._lock:
            return frozenset(self._stale)

    @property
    def spill(self) -> SpillStore | None:
        """The spill of optimized weights (None when not optimizing)."""
        return self._builder.spill

    def mark_stale(self, index: int, state: SegmentState) -> None:
        """Rebuild segment ``index`` on the next run — and every segment a truncation cut off.

        Args:
            index: the segment whose spill chunk failed.
            state: the state the failed run used (a segment rebuilt meanwhile is left alone).
        """
        spill = self._builder.spill
        with self._lock:
            if self._states[index] is state:
                self._stale.add(index)
            for k, other in enumerate(self._states):
                if other.entry is not None and spill is not None and not spill.intact(other.entry):
                    self._stale.add(k)

    def rebuild_stale(self, reader: Callable[[], SealedModelReader]) -> None:
        """Rebuild segments whose spill failed authentication, from the sealed container.

        A segment whose rebuilt optimized weights no longer fit next to its neighbours,
        or whose optimization now fails, switches to the sealed path.

        Args:
            reader: returns a reader of the container (called only when there is work).

        Raises:
            SealedModelError: the container fails authentication (the segment stays stale).
        """
        builder, plan = self._builder, self.plan
        with self._rebuild_lock:
            with self._lock:
                todo = sorted(self._stale)
            for k in todo:
                segment = plan.segments[k]
                built = builder.optimized(reader(), plan, segment)
                state = built if isinstance(built, SegmentState) else builder.sealed(plan, segment)
                if state.optimized:
                    with self._lock:
                        weights = [s.weight_bytes for s in self._states]
                    weights[k] = state.weight_bytes
                    if any(p > plan.budget_bytes for p in builder.solo_peaks(plan, weights)):
                        state = builder.sealed(plan, segment)
                log.warning(
                    "model %s: segment %d rebuilt after a spill authentication failure (%s)",
                    builder.model_id,
                    k,
                    "optimized" if state.optimized else "unoptimized",
                )
                with self._lock:
                    old, self._states[k] = self._states[k], state
                    self._stale.discard(k)
                if old.entry is not None and builder.spill is not None:
                    # A run still holding the old state fails that segment with a typed
                    # error (its chunk failed authentication anyway).
                    builder.spill.discard(old.entry)
            trim_heap()
