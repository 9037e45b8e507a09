"""Load-time graph optimization of one segment, entirely in memory.

ONNX Runtime's fastest CPU path (the NCHWc layout transformer: blocked
``com.microsoft.nchwc`` convolutions with weights reordered and channel-padded
to the SIMD block) is only applied to *constant initializers*. A streaming
segment feeds its weights as graph inputs, so it would run the generic kernels
(ResNet-50 1.25×, MobileNetV2 2.6× slower). Instead, once per model instance:

1. the segment's weights are decrypted and handed to a temporary session as
   initializers (``SessionOptions.add_external_initializers``: ONNX Runtime reads
   the NumPy buffers in place, no protobuf copy) at the highest optimization
   level, with weight pre-packing off (pre-packed panels are not serialized and
   would only cost time and memory here);
2. ONNX Runtime writes the optimized graph — NCHWc nodes *and their reordered
   plaintext weights* — to ``optimized_model_filepath``, which points at an
   anonymous in-memory file (``memfd_create``, path ``/proc/self/fd/N``): nothing
   reaches a file system;
3. the graph is read back, checked (same inputs and outputs as the segment,
   no external data), and every initializer that is not one of the plan's
   structural constants is taken out and becomes a graph *input* of the runtime
   segment graph. The caller seals those tensors into the spill
   (:mod:`.spill`) and drops the plaintext.

Verified empirically (ONNX Runtime 1.31): the optimized graph with its reordered
weights as inputs loads, and runs at the speed of the whole model with
constant weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from sealedml.runtime.engine import ORT_LOG_SEVERITY
from sealedml.runtime.memory_bounded.analysis import SHAPE_TENSOR_BYTES

__all__ = ["OptimizationError", "OptimizedSegment", "memfd_supported", "optimize_segment"]

_STUB_LOCATION = "sealedml:in-memory"


class OptimizationError(Exception):
    """A segment could not be optimized; the executor runs it unoptimized instead."""


@dataclass
class OptimizedSegment:
    """The result of optimizing one segment.

    Attributes:
        graph: the serialized runtime graph (spilled tensors are graph inputs; only the
            plan's structural constants remain initializers).
        tensors: ``(name, ONNX data type, dims, plaintext bytes)`` of every tensor to
            spill, in graph order. Plaintext: seal it, then :meth:`drop` it.
        reference: the temporary session's outputs for the probe inputs (None when no
            probe was given), to check the runtime graph against.
        op_counts: ``"domain:op_type"`` → count in the optimized graph.
    """

    graph: bytes
    tensors: list[tuple[str, int, tuple[int, ...], memoryview]]
    reference: dict[str, np.ndarray] | None
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        """Plaintext bytes of the tensors to spill."""
        return sum(view.nbytes for _, _, _, view in self.tensors)

    @property
    def nchwc_nodes(self) -> int:
        """How many nodes ONNX Runtime turned into NCHWc kernels."""
        return sum(n for key, n in self.op_counts.items() if key.startswith("com.microsoft.nchwc:"))

    def drop(self) -> None:
        """Forget the plaintext tensors (and the reference outputs)."""
        self.tensors.clear()
        self.reference = None


def memfd_supported() -> bool:
    """Whether anonymous in-memory files reachable by path exist here (Linux ≥ 3.17 with /proc)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _temporary_options(threads: int, path: str) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = path
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = ORT_LOG_SEVERITY  # also hides the expected "hardware-specific NCHWc model" warning
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Pre-packed weight panels are not serialized; packing them here only costs time and memory.
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    parts: list[bytes] = []
    offset = 0
    while offset < size:
        part = os.pread(fd, size - offset, offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


def optimize_segment(
    model: onnx.ModelProto,
    weights: Mapping[str, np.ndarray],
    *,
    inputs: Sequence[str],
    outputs: Sequence[str],
    constants: Mapping[str, TensorProto],
    threads: int = 1,
    probe: Mapping[str, np.ndarray] | None = None,
) -> OptimizedSegment:
    """Optimize a segment graph with its real weights, in memory only.

    Args:
        model: the segment graph with its weights as graph inputs (``Plan.segment_model``).
        weights: the decrypted weights, by input name.
        inputs: the segment's activation inputs (the optimized graph must keep them).
        outputs: the segment's outputs, in order (likewise).
        constants: the plan's structural initializers (kept inline when unchanged).
        threads: intra-op threads of the temporary session.
        probe: activation inputs to run the temporary session on, for a later check.

    Returns:
        The optimized segment.

    Raises:
        OptimizationError: no in-memory file, ONNX Runtime failed, or the optimized graph
            changed the segment's interface or refers to external data.
    """
    if not memfd_supported():
        raise OptimizationError("memfd_create is not available: refusing to write optimized weights to a file")
    stub = onnx.ModelProto()
    stub.CopyFrom(model)
    graph = stub.graph
    names = [value.name for value in graph.input if value.name in weights]
    if len(names) != len(weights):
        raise OptimizationError("weights do not match the segment's graph inputs")
    kept_inputs = [value for value in graph.input if value.name not in weights]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    values: list[ort.OrtValue] = []
    arrays: list[np.ndarray] = []  # an OrtValue from NumPy borrows the buffer: keep it alive
    external: list[str] = []
    for name in names:
        array = np.ascontiguousarray(weights[name])
        if array.dtype.kind in "iu" and array.nbytes <= SHAPE_TENSOR_BYTES:
            # A shape or axes tensor: ONNX Runtime's shape inference cannot read an external
            # initializer's data ("Cannot parse data from external tensors"), so it goes inline.
            graph.initializer.append(numpy_helper.from_array(array, name))
            continue
        arrays.append(array)
        external.append(name)
        init = graph.initializer.add()
        init.name = name
        init.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        init.dims.extend(array.shape)
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", _STUB_LOCATION
        values.append(ort.OrtValue.ortvalue_from_numpy(array))

    fd = os.memfd_create("sealedml-optimized-segment", os.MFD_CLOEXEC)
    try:
        options = _temporary_options(threads, f"/proc/self/fd/{fd}")
        if external:
            options.add_external_initializers(external, values)
        try:
            session = ort.InferenceSession(stub.SerializeToString(), options, providers=["CPUExecutionProvider"])
            reference = None
            if probe is not None:
                reference = dict(zip(outputs, session.run(list(outputs), dict(probe)), strict=True))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise OptimizationError(f"ONNX Runtime could not optimize the segment: {first}") from exc
        del session, options, values, arrays
        data = _read_all(fd)
    finally:
        os.close(fd)
    try:
        optimized = onnx.ModelProto.FromString(data)
    except Exception as exc:  # protobuf DecodeError
        raise OptimizationError("ONNX Runtime wrote an unreadable optimized graph") from exc
    del data
    return _split_weights(optimized, inputs, outputs, constants, reference)


def _split_weights(
    optimized: onnx.ModelProto,
    inputs: Sequence[str],
    outputs: Sequence[str],
    constants: Mapping[str, TensorProto],
    reference: dict[str, np.ndarray] | None,
) -> OptimizedSegment:
    graph = optimized.graph
    init_names = {init.name for init in graph.initializer}
    got_inputs = [value.name for value in graph.input if value.name not in init_names]
    got_outputs = [value.name for value in graph.output]
    if sorted(got_inputs) != sorted(inputs) or got_outputs != list(outputs):
        raise OptimizationError(
            f"optimization changed the segment's interface (inputs {got_inputs}, outputs {got_outputs})"
        )
    kept: list[TensorProto] = []
    tensors: list[tuple[str, int, tuple[int, ...], memoryview]] = []
    for init in graph.initializer:
        if init.data_location == TensorProto.EXTERNAL or init.external_data:
            raise OptimizationError(f"optimized initializer {init.name!r} refers to external data")
        original = constants.get(init.name)
        if init.data_type == TensorProto.STRING or (
            original is not None and original.SerializeToString() == init.SerializeToString()
        ):
            kept.append(init)  # a structural constant the plan put there itself: not a weight
            continue
        if init.HasField("raw_data"):
            raw = memoryview(init.raw_data)
        else:
            raw = memoryview(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
        tensors.append((init.name, init.data_type, tuple(int(d) for d in init.dims), raw))
    spilled = {name for name, _, _, _ in tensors}
    remaining = [value for value in graph.input if value.name not in spilled]
    del graph.input[:]
    graph.input.extend(remaining)
    graph.input.extend(onnx.helper.make_tensor_value_info(name, t, list(dims)) for name, t, dims, _ in tensors)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain or 'ai.onnx'}:{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return OptimizedSegment(optimized.SerializeToString(), tensors, reference, counts)
