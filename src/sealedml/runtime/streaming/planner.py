"""The memory planner: cut a model into segments whose working set fits a byte budget.

Occlumency (Lee et al., MobiCom 2019) keeps a DNN inside a small enclave by
loading each layer's weights on demand and freeing buffers as soon as they
are dead. This planner does the static half of that work, ahead of any
request:

1. **Shapes.** Activation shapes come from :func:`onnx.shape_inference` with
   every symbolic dimension fixed to ``batch`` (inferred twice, at ``batch``
   and ``batch + 1``, to learn which axes depend on the batch; those stay
   symbolic in the segment graphs, so smaller batches run too).
2. **Liveness.** In execution (topological) order, a tensor lives from the
   node that produces it to its last consumer (graph outputs: to the end).
   Inside a segment ONNX Runtime frees a tensor after its last use, but a
   tensor fed *into* the segment stays alive for the whole segment.
3. **Splitting.** A node whose weights cannot fit next to its activations is
   split into pieces over contiguous weight ranges (:mod:`.split`).
4. **Cutting.** The node sequence is cut into the fewest segments such that
   every segment's working set fits (weights of the segment + the largest set
   of activations alive at any node inside it, including tensors that cross
   the segment and must stay alive).

Prefetch and the budget: with ``prefetch=True`` the executor decrypts the
weights of segment *k + 1* while segment *k* computes (Occlumency overlaps
weight loading and integrity checking with compute the same way). The plan
therefore bounds, for every adjacent pair, ``peak(k) + weights(k + 1)`` —
not each segment alone — so the tracked peak stays within the budget. This
wastes less than planning every segment to half the budget: a segment
whose neighbour is light may use almost the whole budget.
:class:`~sealedml.runtime.streaming.StreamingModel` plans with
``prefetch=False`` itself (the fewest segments) and prefetches only what the
budget leaves beside each segment; a paired plan is for callers that pass one
in (see docs/memory-bounded.md for the measured trade-off).

``reserve_bytes`` is held back from the budget for the decryption scratch
buffers (a few AES-GCM chunks).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import onnx
from onnx import TensorProto, helper

from sealedml._internal.units import format_bytes
from sealedml.errors import ConfigurationError
from sealedml.runtime.streaming.split import (
    Op,
    TensorInfo,
    WeightSlice,
    split_op,
    split_strategy,
    split_units,
)

__all__ = [
    "BudgetError",
    "Plan",
    "Segment",
    "WeightSlice",
    "plan",
]

#: Binary search for the smallest feasible budget stops at this relative precision.
_SEARCH_PRECISION = 1e-3
_MAX_SPLIT_ROUNDS = 200


class BudgetError(ConfigurationError):
    """The memory budget cannot be met by any plan.

    Attributes:
        tensor: the largest tensor at the bottleneck (an activation or a weight that
            cannot be split further).
        kind: ``"activation"`` or ``"weight"``.
        needed_bytes: that tensor's size.
        node: the node at the bottleneck.
        budget: the budget that was asked for.
        minimum_budget: the smallest budget (bytes) for which a plan exists, with the
            same batch, prefetch and reserve settings.
        reserve: bytes of the budget held back for decryption scratch (0 if none).
    """

    code = "budget"

    def __init__(
        self,
        *,
        tensor: str,
        kind: str,
        needed_bytes: int,
        node: str,
        node_bytes: int,
        budget: int,
        minimum_budget: int,
        prefetch: bool,
        reserve: int = 0,
    ) -> None:
        self.tensor = tensor
        self.kind = kind
        self.needed_bytes = needed_bytes
        self.node = node
        self.budget = budget
        self.minimum_budget = minimum_budget
        self.reserve = reserve
        mode = "with prefetch" if prefetch else "without prefetch"
        # The reserve is what makes small models' budgets infeasible; say so.
        held = f"; {format_bytes(reserve)} of the budget is held for decryption scratch" if reserve else ""
        super().__init__(
            f"budget {format_bytes(budget)} too small: {kind} {tensor!r} needs {format_bytes(needed_bytes)} "
            f"(node {node!r} needs {format_bytes(node_bytes)} {mode}){held}; "
            f"smallest feasible budget is {format_bytes(minimum_budget, ceil=True)}"
        )


@dataclass(frozen=True, eq=False)
class Segment:
    """A run of consecutive nodes executed as one ONNX Runtime session.

    Attributes:
        index: position in the plan.
        ops: the nodes, in execution order.
        weights: the weight slices the segment reads (decrypted just before it runs).
        inputs: activations crossing into the segment (produced earlier or graph inputs).
        outputs: activations crossing out (consumed later) and graph outputs it produces.
        release_after: tensors the executor drops once the segment has run.
        held_bytes: activations the executor holds when the segment starts (every
            tensor crossing the cut, including ones that only pass over it).
        weight_bytes: bytes of ``weights``.
        activation_peak_bytes: the largest set of activations alive at any node inside
            (``held_bytes`` included).
        prefetch_bytes: weights of the next segment, decrypted while this one runs
            (0 without prefetch or for the last segment).
    """

    index: int
    ops: tuple[Op, ...]
    weights: tuple[WeightSlice, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release_after: tuple[str, ...]
    held_bytes: int
    weight_bytes: int
    activation_peak_bytes: int
    prefetch_bytes: int

    @property
    def node_names(self) -> tuple[str, ...]:
        """Names of the nodes (split pieces carry a ``#part`` suffix)."""
        return tuple(op.node.name or op.outputs[0] for op in self.ops)

    @property
    def peak_bytes(self) -> int:
        """Weights plus the activation peak: the working set while it computes."""
        return self.weight_bytes + self.activation_peak_bytes

    @property
    def internal_bytes(self) -> int:
        """Activation peak beyond what the executor holds (ONNX Runtime's intermediates, estimated)."""
        return self.activation_peak_bytes - self.held_bytes


@dataclass(frozen=True, eq=False)
class Plan:
    """A memory plan: segments in execution order and what they need.

    Attributes:
        budget_bytes: the budget the plan was made for.
        batch: the batch size activations were sized for (larger batches are refused).
        prefetch: whether the plan leaves room to decrypt the next segment during compute.
        reserve_bytes: budget held back for decryption scratch.
        segments: the segments.
        inputs: graph input names.
        outputs: graph output names.
        infos: type and shape of every activation.
        constants: small inline initializers (not sealed weights) the nodes read.
        splits: original node name → (strategy, pieces) for every split layer.
        estimated: activations whose size could not be inferred (estimated from neighbours).
        opset_imports: the model's opsets.
        ir_version: the model's IR version (segment models use the same).
        functions: model-local functions, copied into every segment model.
        graph_name: the model graph's name.
    """

    budget_bytes: int
    batch: int
    prefetch: bool
    reserve_bytes: int
    segments: tuple[Segment, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    infos: Mapping[str, TensorInfo]
    constants: Mapping[str, TensorProto]
    splits: Mapping[str, tuple[str, int]]
    estimated: tuple[str, ...]
    opset_imports: tuple[onnx.OperatorSetIdProto, ...]
    ir_version: int
    functions: tuple[onnx.FunctionProto, ...] = ()
    graph_name: str = "model"

    @property
    def peak_bytes(self) -> int:
        """The planned peak: max over segments of working set + prefetched weights, plus the reserve."""
        if not self.segments:
            return self.reserve_bytes
        return max(s.peak_bytes + s.prefetch_bytes for s in self.segments) + self.reserve_bytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights decrypted per run (all segments)."""
        return sum(s.weight_bytes for s in self.segments)

    def segment_model(self, index: int) -> onnx.ModelProto:
        """Build the ONNX model of segment ``index``: its weights are graph *inputs*, not initializers.

        Args:
            index: the segment.

        Returns:
            A model whose inputs are the crossing activations followed by the weight slices.

        Raises:
            ConfigurationError: a crossing activation has an unknown element type.
        """
        seg = self.segments[index]
        inputs: list[onnx.ValueInfoProto] = []
        outputs: list[onnx.ValueInfoProto] = []
        for names, target in ((seg.inputs, inputs), (seg.outputs, outputs)):
            for name in names:
                info = self.infos.get(name)
                if info is None or info.elem_type == 0:
                    raise ConfigurationError(f"cannot cut the graph at tensor {name!r}: its type is unknown")
                target.append(info.value_info(name))
        inputs.extend(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)) for w in seg.weights)
        used = {name for op in seg.ops for name in op.inputs}
        initializers = [self.constants[name] for name in sorted(used & set(self.constants))]
        graph = helper.make_graph(
            [op.node for op in seg.ops], f"{self.graph_name}.segment{index}", inputs, outputs, initializers
        )
        model = helper.make_model(graph, opset_imports=list(self.opset_imports), producer_name="sealedml.streaming")
        model.ir_version = self.ir_version
        model.functions.extend(self.functions)
        return model

    def describe(self) -> list[dict[str, object]]:
        """One row per segment (for logs, docs and the benchmark).

        Returns:
            Dicts with index, node count, first and last node, weight, activation,
            prefetch and peak bytes.
        """
        return [
            {
                "segment": s.index,
                "nodes": len(s.ops),
                "first": s.node_names[0],
                "last": s.node_names[-1],
                "weight_bytes": s.weight_bytes,
                "activation_peak_bytes": s.activation_peak_bytes,
                "prefetch_bytes": s.prefetch_bytes,
                "peak_bytes": s.peak_bytes + s.prefetch_bytes + self.reserve_bytes,
            }
            for s in self.segments
        ]


# ----------------------------------------------------------------------------- analysis


@dataclass(frozen=True, eq=False)
class _Base:
    """The model before splitting: nodes, types, constants."""

    ops: tuple[Op, ...]
    infos: dict[str, TensorInfo]
    constants: dict[str, TensorProto]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_names: frozenset[str]
    estimated: tuple[str, ...]


def _probe(model: onnx.ModelProto, weights: frozenset[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose sealed weights are data-less stubs (shape inference needs
    only their dims and type, and an inline model may carry hundreds of megabytes)."""
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
        if init.name not in weights:
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


def _analyze(model: onnx.ModelProto, weight_sizes: Mapping[str, int], batch: int) -> _Base:
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

    probe = _probe(model, frozenset(weights))
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
    return _Base(tuple(ops), infos, constants, inputs, outputs, frozenset(weights), tuple(estimated))


def _size(infos: Mapping[str, TensorInfo], name: str) -> int:
    info = infos.get(name)
    if info is None:
        return 0
    return info.nbytes or 0


# ----------------------------------------------------------------------------- splitting


@dataclass(frozen=True, eq=False)
class _Expanded:
    ops: tuple[Op, ...]
    origin: tuple[int, ...]
    infos: dict[str, TensorInfo]
    constants: dict[str, TensorProto]


def _expand(base: _Base, pieces: Mapping[int, int]) -> _Expanded:
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
    return _Expanded(tuple(ops), tuple(origin), infos, constants)


@dataclass(frozen=True, eq=False)
class _Liveness:
    """Producer, last consumer and size of every activation of an expanded node list."""

    n: int
    produced: dict[str, int]
    last: dict[str, int]
    size: dict[str, int]
    live_at: tuple[int, ...]
    op_weights: tuple[int, ...]


def _liveness(exp: _Expanded, base: _Base) -> _Liveness:
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
    size = {name: _size(exp.infos, name) for name in produced}
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
    return _Liveness(n, produced, last, size, tuple(live), tuple(op.weight_bytes for op in exp.ops))


@dataclass(frozen=True)
class _Violation:
    index: int
    node: str
    node_bytes: int
    tensor: str
    kind: str
    tensor_bytes: int


def _violations(exp: _Expanded, life: _Liveness, limit: int, prefetch: bool) -> list[tuple[int, int]]:
    """Nodes that cannot fit even as single-node segments, as ``(index, bytes needed)``.

    A plan exists iff every node fits alone and, with prefetch, every node's working
    set plus the next node's weights fits: any segment containing node i holds at
    least node i's working set, and node i + 1's weights are either in the same
    segment or prefetched during it. (Shared weights make this sufficient rather
    than exact, which only errs on the safe side.)
    """
    found: list[tuple[int, int]] = []
    for i in range(life.n):
        need = life.op_weights[i] + life.live_at[i]
        if prefetch and i + 1 < life.n:
            need += life.op_weights[i + 1]
        if need > limit:
            found.append((i, need))
    return found


def _describe(exp: _Expanded, life: _Liveness, i: int, need: int, prefetch: bool) -> _Violation:
    """Name the largest tensor at node ``i``: the bottleneck reported to the user."""
    op = exp.ops[i]
    weights = (*op.weights, *(exp.ops[i + 1].weights if prefetch and i + 1 < life.n else ()))
    candidates: list[tuple[int, str, str]] = [
        (life.size[name], name, "activation") for name, p in life.produced.items() if max(p, 0) <= i <= life.last[name]
    ]
    candidates.extend((w.nbytes, w.tensor, "weight") for w in weights)
    nbytes, name, kind = max(candidates, default=(0, op.node.name, "activation"))
    return _Violation(i, op.source, need, name, kind, nbytes)


class _Infeasible(Exception):
    def __init__(self, violation: _Violation) -> None:
        super().__init__(violation.node)
        self.violation = violation


def _initial_pieces(base: _Base, index: int, live: int, limit: int, prefetch: bool) -> int:
    """A first guess at how many pieces node ``index`` needs (refined by doubling)."""
    op = base.ops[index]
    units = split_units(op, base.infos)
    strategy = split_strategy(op, base.infos)
    out = _size(base.infos, op.outputs[0])
    # Splitting adds activations: the pieces' outputs next to the concatenated result,
    # or a running sum and a partial product next to the result.
    extra = out if strategy in ("conv-out-channels", "conv-groups", "gemm-out-columns") else 2 * out
    allowance = (limit - live - extra) // (2 if prefetch else 1)
    if allowance <= 0:
        return units
    return max(2, min(units, math.ceil(op.weight_bytes / allowance)))


def _activation_floor(base: _Base) -> tuple[int, _Expanded, _Liveness]:
    """The largest set of activations alive at one node of the unsplit graph.

    Splitting never lowers it (a split layer's last piece still sees its input and the
    whole output), so no budget below it (plus the reserve) can work.
    """
    exp = _expand(base, {})
    life = _liveness(exp, base)
    return max(life.live_at, default=0), exp, life


def _fit(base: _Base, limit: int, prefetch: bool) -> tuple[_Expanded, _Liveness, dict[int, int]]:
    """Split nodes until every node fits ``limit`` alone; raise :class:`_Infeasible` if impossible."""
    floor, exp, base_life = _activation_floor(base)
    if floor > limit:
        i = base_life.live_at.index(floor)
        raise _Infeasible(_describe(exp, base_life, i, floor + base_life.op_weights[i], prefetch))
    pieces: dict[int, int] = {}
    life = base_life
    for _ in range(_MAX_SPLIT_ROUNDS):
        bad = _violations(exp, life, limit, prefetch)
        if not bad:
            return exp, life, pieces
        progressed = False
        for i, _need in bad:
            culprits = {exp.origin[i]}
            if prefetch and i + 1 < life.n:
                culprits.add(exp.origin[i + 1])
            splittable = [c for c in culprits if pieces.get(c, 1) < split_units(base.ops[c], base.infos)]
            if not splittable:
                continue
            # Split the heavier candidate: that is the one whose weights crowd the budget.
            target = max(splittable, key=lambda c: base.ops[c].weight_bytes)
            if target in pieces:
                pieces[target] = min(split_units(base.ops[target], base.infos), pieces[target] * 2)
            else:
                # base_life comes from the unsplit graph, so it is indexed like base.ops.
                pieces[target] = _initial_pieces(base, target, base_life.live_at[target], limit, prefetch)
            progressed = True
        if not progressed:
            i, need = max(bad, key=lambda v: v[1])
            raise _Infeasible(_describe(exp, life, i, need, prefetch))
        exp = _expand(base, pieces)
        life = _liveness(exp, base)
    i, need = max(bad, key=lambda v: v[1])  # pragma: no cover - doubling ends long before
    raise _Infeasible(_describe(exp, life, i, need, prefetch))  # pragma: no cover


def _minimum_budget(base: _Base, start: int, prefetch: bool, reserve: int) -> int:
    """The smallest budget for which :func:`_fit` succeeds (binary search, rounded up)."""

    def feasible(budget: int) -> bool:
        try:
            _fit(base, budget - reserve, prefetch)
        except _Infeasible:
            return False
        return True

    floor = _activation_floor(base)[0] + reserve
    if floor > start and feasible(floor):
        return floor  # activation-bound: the floor is exact
    lo = max(start, floor - 1)
    hi = max(2 * lo, floor, 1 << 20)
    while not feasible(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 50:  # pragma: no cover - would need petabytes of activations
            raise ConfigurationError("no memory budget fits this model")
    while hi - lo > max(4096, int(hi * _SEARCH_PRECISION)):
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------- cutting


def _cut(exp: _Expanded, life: _Liveness, limit: int, prefetch: bool) -> list[tuple[int, int]]:
    """The fewest segments [a, b) with peak(a, b) ≤ limit and, with prefetch,
    peak(k) + weights(k + 1) ≤ limit for adjacent segments (exact dynamic programme)."""
    n = life.n
    by_last: dict[int, list[tuple[int, int]]] = {}
    for name, p in life.produced.items():
        by_last.setdefault(life.last[name], []).append((p, life.size[name]))
    # ends[a] = [(b, peak(a, b), weights(a, b))] for every feasible segment starting at a.
    ends: list[list[tuple[int, int, int]]] = []
    for a in range(n):
        row: list[tuple[int, int, int]] = []
        seen: set[str] = set()
        weight = 0
        act = 0
        dead_held = 0
        for i in range(a, n):
            if i > a:
                # Tensors fed into the segment stay alive to its end even after their last use.
                dead_held += sum(s for p, s in by_last.get(i - 1, ()) if p < a)
            for w in exp.ops[i].weights:
                if w.name not in seen:
                    seen.add(w.name)
                    weight += w.nbytes
            act = max(act, life.live_at[i] + dead_held)
            if weight + act > limit:
                break
            row.append((i + 1, weight + act, weight))
        ends.append(row)
    if not prefetch:
        # Without prefetch segments are independent: taking the longest feasible one is optimal.
        cuts: list[tuple[int, int]] = []
        a = 0
        while a < n:
            if not ends[a]:  # pragma: no cover - _fit guarantees single nodes fit
                raise ConfigurationError(f"node {a} does not fit")
            b = ends[a][-1][0]
            cuts.append((a, b))
            a = b
        return cuts
    # Fewest segments first; among those, the smallest heaviest segment, which spreads the
    # weights evenly so each prefetch has a segment's compute to hide behind.
    # best[(a, b)] = ((segments, heaviest weights) covering [0, b) ending with [a, b), previous start)
    best: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}
    # by_end[a] = [(peak, cost, start)] of reachable segments ending at a
    by_end: dict[int, list[tuple[int, tuple[int, int], int]]] = {}
    for b, peak, weight in ends[0] if n else []:
        best[(0, b)] = ((1, weight), -1)
        by_end.setdefault(b, []).append((peak, (1, weight), 0))
    for a in range(1, n):
        preds = sorted(by_end.get(a, ()))
        if not preds:
            continue
        peaks = [p for p, _, _ in preds]
        # Running minimum of (cost, start) over predecessors sorted by peak: the admissible
        # predecessors of [a, b) are a prefix (peak ≤ limit - weights(a, b)). The cost update
        # (count + 1, max(heaviest, w)) is monotone, so the prefix minimum stays optimal.
        prefix: list[tuple[tuple[int, int], int]] = []
        for _, cost, start in preds:
            prefix.append(min(prefix[-1], (cost, start)) if prefix else (cost, start))
        for b, peak, weight in ends[a]:
            k = bisect.bisect_right(peaks, limit - weight)
            if k == 0:
                break  # heavier segments from a only make it worse
            (count, heaviest), start = prefix[k - 1]
            cost = (count + 1, max(heaviest, weight))
            key = (a, b)
            if key not in best or best[key][0] > cost:
                best[key] = (cost, start)
                by_end.setdefault(b, []).append((peak, cost, a))
    finals = [(best[key][0], key) for key in best if key[1] == n]
    if not finals:  # pragma: no cover - _fit guarantees the all-singleton plan
        raise ConfigurationError("no segmentation fits the budget")
    _, key = min(finals)
    cuts = []
    while True:
        cuts.append(key)
        start = best[key][1]
        if start < 0:
            break
        key = (start, key[0])
    return cuts[::-1]


def _segments(
    exp: _Expanded, life: _Liveness, base: _Base, cuts: Sequence[tuple[int, int]], prefetch: bool
) -> tuple[Segment, ...]:
    skip = base.weight_names | set(exp.constants) | {w.name for op in exp.ops for w in op.weights}
    out: list[Segment] = []
    weights_of: list[tuple[WeightSlice, ...]] = []
    for a, b in cuts:
        weights_of.append(tuple(dict.fromkeys(w for op in exp.ops[a:b] for w in op.weights)))
    for k, (a, b) in enumerate(cuts):
        ops = exp.ops[a:b]
        consumed = dict.fromkeys(name for op in ops for name in op.inputs if name not in skip)
        inputs = tuple(name for name in consumed if life.produced.get(name, -1) < a)
        outputs = tuple(name for op in ops for name in op.outputs if life.last[name] >= b or name in base.outputs)
        held = [name for name, p in life.produced.items() if p < a <= life.last[name]]
        release = tuple(
            name
            for name, p in life.produced.items()
            if p < a and life.last[name] < b and name not in base.outputs and (life.last[name] >= a or k == 0)
        )
        held_bytes = sum(life.size[name] for name in held)
        act = 0
        dead_held = 0
        for i in range(a, b):
            if i > a:
                dead_held += sum(life.size[name] for name in held if life.last[name] == i - 1)
            act = max(act, life.live_at[i] + dead_held)
        weight_bytes = sum(w.nbytes for w in weights_of[k])
        prefetch_bytes = sum(w.nbytes for w in weights_of[k + 1]) if prefetch and k + 1 < len(cuts) else 0
        out.append(
            Segment(k, ops, weights_of[k], inputs, outputs, release, held_bytes, weight_bytes, act, prefetch_bytes)
        )
    return tuple(out)


def plan(
    model_graph: onnx.ModelProto,
    weight_sizes: Mapping[str, int],
    budget_bytes: int,
    *,
    batch: int = 1,
    prefetch: bool = True,
    reserve_bytes: int = 0,
) -> Plan:
    """Plan memory-bounded execution of ``model_graph`` within ``budget_bytes``.

    Args:
        model_graph: the model; initializers named in ``weight_sizes`` are sealed weights
            (their data may be external placeholders — only dims and types are read).
            Other initializers must be inline; they are small constants kept in the
            segment graphs.
        weight_sizes: byte size of every sealed weight (``{entry.name: entry.length}``
            from the container manifest).
        budget_bytes: the most bytes of decrypted weights plus live activations (plus
            ``reserve_bytes``) a run may hold at once.
        batch: the batch size to size activations for; symbolic dimensions take this value.
        prefetch: leave room to decrypt segment k + 1 while segment k computes.
        reserve_bytes: part of the budget kept for decryption scratch buffers.

    Returns:
        The plan, with the fewest segments that fit.

    Raises:
        BudgetError: no plan fits ``budget_bytes``; the message names the bottleneck
            tensor and the smallest feasible budget.
        ConfigurationError: the graph cannot be planned (control flow, unsorted nodes,
            sizes that disagree with the manifest, bad arguments).
    """
    if batch < 1:
        raise ConfigurationError("batch must be ≥ 1")
    if budget_bytes <= 0 or reserve_bytes < 0:
        raise ConfigurationError("budget must be positive and the reserve non-negative")
    base = _analyze(model_graph, weight_sizes, batch)
    limit = budget_bytes - reserve_bytes
    try:
        exp, life, pieces = _fit(base, limit, prefetch)
    except _Infeasible as exc:
        v = exc.violation
        minimum = _minimum_budget(base, budget_bytes, prefetch, reserve_bytes)
        raise BudgetError(
            tensor=v.tensor,
            kind=v.kind,
            needed_bytes=v.tensor_bytes,
            node=v.node,
            node_bytes=v.node_bytes,
            budget=budget_bytes,
            minimum_budget=minimum,
            prefetch=prefetch,
            reserve=reserve_bytes,
        ) from None
    cuts = _cut(exp, life, limit, prefetch)
    segments = _segments(exp, life, base, cuts, prefetch)
    splits = {
        base.ops[index].source: (split_strategy(base.ops[index], base.infos) or "", count)
        for index, count in sorted(pieces.items())
        if count > 1
    }
    return Plan(
        budget_bytes=budget_bytes,
        batch=batch,
        prefetch=prefetch,
        reserve_bytes=reserve_bytes,
        segments=segments,
        inputs=base.inputs,
        outputs=base.outputs,
        infos=MappingProxyType(exp.infos),
        constants=MappingProxyType(exp.constants),
        splits=MappingProxyType(splits),
        estimated=base.estimated,
        opset_imports=tuple(model_graph.opset_import),
        ir_version=model_graph.ir_version,
        functions=tuple(model_graph.functions),
        graph_name=model_graph.graph.name or "model",
    )
