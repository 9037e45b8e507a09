"""The planner's analysis of a graph: shapes, split layers, liveness (steps 1–3 of :mod:`.planner`).

* :func:`analyze` — the nodes in execution order, their sealed weights and inline
  constants, and every activation's type and shape (symbolic axes found by inferring
  at ``batch`` and ``batch + 1``).
* :func:`expand` — the node list with some layers split into pieces (:mod:`.split`).
* :func:`liveness` — producer, last consumer and size of every activation, and the
  bytes alive at each node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sealedml.errors import ConfigurationError
from sealedml.runtime.memory_bounded.split import Op, TensorInfo, WeightSlice, split_op

__all__ = [
    "SHAPE_TENSOR_BYTES",
    "Analysis",
    "Expanded",
    "Liveness",
    "analyze",
    "expand",
    "liveness",
    "shape_tensors",
    "tensor_size",
    "with_values",
]

#: Sealed integer tensors up to this size are shapes, axes and index lists (``Reshape``,
#: ``Unsqueeze``, ``ReduceSum``, ``Slice`` inputs): shape inference needs their values,
#: which the caller may inline (:func:`with_values`) before planning.
SHAPE_TENSOR_BYTES = 4096

_INTEGER_TYPES = frozenset(
    {
        TensorProto.INT8,
        TensorProto.INT16,
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.UINT8,
        TensorProto.UINT16,
        TensorProto.UINT32,
        TensorProto.UINT64,
    }
)


@dataclass(frozen=True, eq=False)
class Analysis:
    """The model before splitting: nodes, types, constants.

    Attributes:
        ops: the nodes in execution order, each with the sealed weights it reads.
        infos: type and shape of every activation (estimated where inference gave none).
        constants: inline initializers (not sealed weights).
        inputs: graph input names (initializers excluded).
        outputs: graph output names.
        weight_names: the sealed weights.
        estimated: activations whose size was estimated from their neighbours.
    """

    ops: tuple[Op, ...]
    infos: dict[str, TensorInfo]
    constants: dict[str, TensorProto]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_names: frozenset[str]
    estimated: tuple[str, ...]


def _is_shape_tensor(init: TensorProto, nbytes: int) -> bool:
    return init.data_type in _INTEGER_TYPES and nbytes <= SHAPE_TENSOR_BYTES


def shape_tensors(model: onnx.ModelProto, weight_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The sealed weights whose values shape inference needs: small integer tensors.

    A graph whose ``Reshape`` targets or ``Unsqueeze`` axes are sealed leaves shape inference
    blind after them, and the planner would have to guess activation sizes; with these
    tensors' values inlined (:func:`with_values`) every size is exact.

    Args:
        model: the graph (sealed weights as external placeholders).
        weight_sizes: byte size of every sealed weight.

    Returns:
        Their names, in graph order.
    """
    return tuple(
        init.name
        for init in model.graph.initializer
        if init.name in weight_sizes and _is_shape_tensor(init, weight_sizes[init.name])
    )


def with_values(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``values`` carry those values inline.

    They stay sealed weights for the planner (decrypted per segment like any other); only
    shape inference reads the inline values (:func:`analyze`).

    Args:
        model: the graph.
        values: initializer name → its decrypted value (same type and shape).

    Returns:
        The copy (``model`` is not modified).

    Raises:
        ConfigurationError: a value's type or shape differs from its initializer's.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, init in enumerate(copy.graph.initializer):
        if init.name not in values:
            continue
        value = np.asarray(values[init.name])
        if value.dtype != helper.tensor_dtype_to_np_dtype(init.data_type) or value.shape != tuple(init.dims):
            raise ConfigurationError(f"value of {init.name!r} does not match its initializer")
        copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, init.name))
    return copy


def _probe(model: onnx.ModelProto, weights: Mapping[str, WeightSlice]) -> onnx.ModelProto:
    """A copy of ``model`` whose sealed weights are data-less stubs (shape inference needs
    only their dims and type, and an inline model may carry hundreds of megabytes), except
    small integer weights carried inline (:func:`with_values`): shapes and axes."""
    graph = model.graph
    probe = onnx.ModelProto()
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    probe.graph.name = graph.name
    probe.graph.node.extend(graph.node)
    probe.graph.input.extend(graph.input)
    probe.graph.output.extend(graph.output)
    probe.graph.sparse_initializer.extend(graph.sparse_initializer)
    for init in graph.initializer:
        weight = weights.get(init.name)
        if weight is None or (init.data_location != TensorProto.EXTERNAL and _is_shape_tensor(init, weight.nbytes)):
            probe.graph.initializer.append(init)
            continue
        stub = probe.graph.initializer.add()
        stub.name, stub.data_type = init.name, init.data_type
        stub.dims.extend(init.dims)
        stub.data_location = TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "sealedml:weights"
    return probe


def _infer(model: onnx.ModelProto, batch: int) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """Element type and shape of every value, with every symbolic dimension set to ``batch``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    for value in probe.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") or not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = batch
    for value in probe.graph.output:
        # Declared output shapes may name dimensions differently; let inference fill them in.
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError/ValidationError and plain RuntimeErrors
        raise ConfigurationError(f"shape inference failed: {str(exc).splitlines()[0][:200]}") from exc
    found: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            continue
        dims: tuple[int, ...] | None = None
        if tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        found[value.name] = (tensor_type.elem_type, dims)
    return found


def analyze(model: onnx.ModelProto, weight_sizes: Mapping[str, int], batch: int) -> Analysis:
    """Step 1 of the planner: the nodes, the sealed weights they read, and every activation's shape.

    Args:
        model: the model (sealed weights may be external placeholders).
        weight_sizes: byte size of every sealed weight, from the container manifest.
        batch: the value of every symbolic dimension.

    Returns:
        The analysis.

    Raises:
        ConfigurationError: the graph cannot be planned (control flow, unsorted nodes, sizes
            that disagree with the manifest, unsupported weight types, failed shape inference).
    """
    graph = model.graph
    weights: dict[str, WeightSlice] = {}
    constants: dict[str, TensorProto] = {}
    for init in graph.initializer:
        if init.name in weight_sizes:
            dims = tuple(int(d) for d in init.dims)
            try:
                item = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigurationError(f"weight {init.name!r} has unsupported type {init.data_type}") from exc
            expected = math.prod(dims) * item
            if weight_sizes[init.name] != expected:
                raise ConfigurationError(
                    f"weight {init.name!r}: {weight_sizes[init.name]} bytes stored, shape needs {expected}"
                )
            weights[init.name] = WeightSlice.whole(init.name, init.data_type, dims, expected)
        elif init.data_location == TensorProto.EXTERNAL:
            raise ConfigurationError(f"initializer {init.name!r} is external but has no size in the manifest")
        else:
            constants[init.name] = init
    initializer_names = {init.name for init in graph.initializer}
    inputs = tuple(v.name for v in graph.input if v.name not in initializer_names)
    outputs = tuple(v.name for v in graph.output)
    for name in outputs:
        if name in weights or name in constants:
            raise ConfigurationError(f"graph output {name!r} is an initializer; nothing to plan")

    available = set(inputs) | set(weights) | set(constants) | {""}
    ops: list[Op] = []
    for index, node in enumerate(graph.node):
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise ConfigurationError(f"node {node.name or node.op_type!r} has a subgraph; control flow cannot stream")
        missing = [name for name in node.input if name not in available]
        if missing:
            raise ConfigurationError(f"graph is not topologically sorted: node {index} reads {missing[0]!r} early")
        available.update(node.output)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if not copy.name:
            copy.name = f"{node.op_type}_{index}"
        node_weights = tuple(dict.fromkeys(weights[name] for name in node.input if name in weights))
        ops.append(Op(copy, node_weights, copy.name))

    probe = _probe(model, weights)
    first, second = _infer(probe, batch), _infer(probe, batch + 1)
    infos: dict[str, TensorInfo] = {}
    for name, (elem_type, shape) in first.items():
        if name in weights or name in constants:
            continue
        other = second.get(name, (elem_type, shape))[1]
        symbolic: tuple[bool, ...] = ()
        if shape is not None and other is not None and len(other) == len(shape):
            symbolic = tuple(a != b for a, b in zip(shape, other, strict=True))
        infos[name] = TensorInfo(elem_type, shape, symbolic)

    # Unknown sizes (e.g. a Reshape whose target shape is a sealed weight): assume the
    # largest known neighbour, and say so in the plan.
    estimated: list[str] = []
    for op in ops:
        for name in op.outputs:
            info = infos.get(name)
            if info is not None and info.nbytes is not None:
                continue
            neighbours = [infos[n].nbytes for n in (*op.inputs, *op.outputs) if n in infos]
            guess = max((n for n in neighbours if n is not None), default=0)
            elem = info.elem_type if info is not None else 0
            known = info.dims if info is not None else None
            infos[name] = TensorInfo(elem, known, info.symbolic if info is not None else (), estimate=guess)
            estimated.append(name)
    return Analysis(tuple(ops), infos, constants, inputs, outputs, frozenset(weights), tuple(estimated))


def tensor_size(infos: Mapping[str, TensorInfo], name: str) -> int:
    """Bytes of activation ``name`` (0 when unknown).

    Args:
        infos: type and shape of every activation.
        name: the activation.

    Returns:
        Its size in bytes.
    """
    info = infos.get(name)
    if info is None:
        return 0
    return info.nbytes or 0


# ----------------------------------------------------------------------------- splitting


@dataclass(frozen=True, eq=False)
class Expanded:
    """The node list with split layers replaced by their pieces.

    Attributes:
        ops: the nodes and pieces, in execution order.
        origin: per entry of ``ops``, the index of the node it comes from in :attr:`Analysis.ops`.
        infos: activation types and shapes, the pieces' own included.
        constants: inline initializers, those the splits created included.
    """

    ops: tuple[Op, ...]
    origin: tuple[int, ...]
    infos: dict[str, TensorInfo]
    constants: dict[str, TensorProto]


def expand(base: Analysis, pieces: Mapping[int, int]) -> Expanded:
    """Step 3 of the planner, applied: split the nodes named in ``pieces`` (:mod:`.split`).

    Args:
        base: the analysis.
        pieces: node index → number of pieces (nodes not named stay whole).

    Returns:
        The expanded node list.
    """
    ops: list[Op] = []
    origin: list[int] = []
    infos = dict(base.infos)
    constants = dict(base.constants)
    for index, op in enumerate(base.ops):
        count = pieces.get(index, 1)
        if count <= 1:
            ops.append(op)
            origin.append(index)
            continue
        result = split_op(op, count, base.infos)
        ops.extend(result.ops)
        origin.extend([index] * len(result.ops))
        infos.update(result.infos)
        constants.update(result.constants)
    return Expanded(tuple(ops), tuple(origin), infos, constants)


@dataclass(frozen=True, eq=False)
class Liveness:
    """Producer, last consumer and size of every activation of an expanded node list."""

    n: int
    produced: dict[str, int]
    last: dict[str, int]
    size: dict[str, int]
    live_at: tuple[int, ...]
    op_weights: tuple[int, ...]


def liveness(exp: Expanded, base: Analysis) -> Liveness:
    """Step 2 of the planner: where each activation lives, and the bytes alive at each node.

    Args:
        exp: the node list.
        base: its analysis (graph inputs, outputs and sealed weights).

    Returns:
        The liveness of every activation.
    """
    n = len(exp.ops)
    produced: dict[str, int] = dict.fromkeys(base.inputs, -1)
    last: dict[str, int] = {}
    skip = base.weight_names | set(exp.constants) | {w.name for op in exp.ops for w in op.weights}
    for i, op in enumerate(exp.ops):
        for name in op.inputs:
            if name not in skip:
                last[name] = i
        for name in op.outputs:
            produced[name] = i
    for name in base.outputs:
        last[name] = n
    for name, p in produced.items():
        last.setdefault(name, p)
    size = {name: tensor_size(exp.infos, name) for name in produced}
    delta = [0] * (n + 1)
    for name, p in produced.items():
        start, end = max(p, 0), last[name]
        if end < start:
            continue
        delta[start] += size[name]
        delta[min(end, n - 1) + 1] -= size[name]
    live: list[int] = []
    running = 0
    for i in range(n):
        running += delta[i]
        live.append(running)
    return Liveness(n, produced, last, size, tuple(live), tuple(op.weight_bytes for op in exp.ops))
