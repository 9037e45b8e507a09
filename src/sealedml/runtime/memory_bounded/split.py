"""Layer splitting: rewrite one weighted node into pieces whose weights are smaller.

A layer whose weights alone exceed the memory budget cannot run as one ONNX
node. Occlumency ("partitioned convolution", Lee et al., MobiCom 2019) splits
such layers so that each part's working set fits the enclave; we split along
the axis that keeps every piece's weights a *contiguous byte range* of the
sealed tensor, so the executor decrypts only the chunks covering that range
and never needs the whole tensor in memory:

* ``Conv`` (``W`` is ``(O, I/g, kh, kw)``): by output-channel groups — rows of
  ``W`` (and of the bias) — followed by ``Concat(axis=1)``. With ``group > 1``
  a piece takes whole groups and the matching slice of the input channels.
* ``Gemm`` with ``transB=1`` (``W`` is ``(N, K)``): by output-column blocks,
  which are row blocks of ``W``; the bias is sliced the same way; then
  ``Concat(axis=1)``.
* ``MatMul`` with a weight ``W`` of shape ``(K, N)`` (and ``Gemm`` with
  ``transB=0``): by row blocks of ``W`` along the reduction axis ``K``. Each
  piece multiplies the matching column slice of the input, and the partial
  products are summed with a chain of ``Add`` nodes. Column blocks of a
  row-major ``(K, N)`` matrix would be strided, not contiguous, which is why
  the reduction axis is split instead. Summation order differs from the
  unsplit product, so outputs agree within float tolerance, not bit for bit.
  Splitting by output columns ``N`` would merge with a ``Concat`` and hold the
  same activations (the pieces' outputs next to the result, where the ``Add``
  chain holds a running sum and one partial product), but each column block is
  ``K`` strided runs of the sealed tensor, so decrypting one would mean
  decrypting nearly all of it: the ``K`` split is the one whose peak is
  bounded by the piece, not by the whole weight.
* ``Gather`` on axis 0 of a weight table (an embedding, ``(V, ...)``) with
  activation indices: by row blocks of the table. Piece ``j`` holds rows
  ``r0..r1``, gathers ``clip(i - r0, 0, r1 - r0 - 1)`` and keeps the rows whose
  index fell inside its block (``Where``), the others pass through from the
  previous piece; the result is bit-identical to the unsplit ``Gather``.
  Every block is decrypted whatever the tokens are: reading only the rows the
  indices name would be cheaper, but *which* chunks of the sealed file are read
  is visible to the host, so it would disclose the input tokens (an access
  pattern side channel); a scan of every block is oblivious to them. Negative
  indices are wrapped first, as ``Gather`` does, and an index out of range
  reaches the last piece's ``Gather`` out of bounds, so the run fails as it
  does unsplit (no silent row of zeros).

This module only rewrites graph fragments; choosing how many pieces a layer
needs is the planner's job (:mod:`sealedml.runtime.memory_bounded.planner`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "Op",
    "SplitResult",
    "TensorInfo",
    "WeightSlice",
    "split_op",
    "split_strategy",
    "split_units",
]


@dataclass(frozen=True)
class WeightSlice:
    """A contiguous byte range of one sealed weight tensor, fed to a segment as a graph input.

    Attributes:
        name: the graph-input name the segment uses (the tensor name when whole,
            ``"<tensor>[a:b]"`` for rows ``a..b``).
        tensor: the weight's name in the container manifest.
        byte_start: offset of the range from the start of the tensor's bytes.
        nbytes: length of the range.
        data_type: ONNX element type.
        dims: shape of the slice.
        rows: ``(start, stop)`` along the sliced axis, or None for the whole tensor.
    """

    name: str
    tensor: str
    byte_start: int
    nbytes: int
    data_type: int
    dims: tuple[int, ...]
    rows: tuple[int, int] | None = None

    @classmethod
    def whole(cls, tensor: str, data_type: int, dims: Sequence[int], nbytes: int) -> WeightSlice:
        """The whole tensor ``tensor``.

        Args:
            tensor: manifest name.
            data_type: ONNX element type.
            dims: its shape.
            nbytes: its size in bytes.

        Returns:
            A slice covering every byte.
        """
        return cls(tensor, tensor, 0, nbytes, data_type, tuple(int(d) for d in dims))

    def row_block(self, start: int, stop: int) -> WeightSlice:
        """Rows ``start..stop`` (axis 0) of this whole tensor — a contiguous range in row-major order.

        Args:
            start: first row.
            stop: one past the last row.

        Returns:
            The sub-slice.

        Raises:
            ValueError: this is already a slice, a scalar, or the range is empty or out of bounds.
        """
        if self.rows is not None or not self.dims:
            raise ValueError(f"{self.name}: only a whole tensor of rank ≥ 1 can be sliced")
        if not 0 <= start < stop <= self.dims[0]:
            raise ValueError(f"{self.name}: bad row range {start}:{stop}")
        row_bytes = self.nbytes // self.dims[0]
        return WeightSlice(
            name=f"{self.tensor}[{start}:{stop}]",
            tensor=self.tensor,
            byte_start=start * row_bytes,
            nbytes=(stop - start) * row_bytes,
            data_type=self.data_type,
            dims=(stop - start, *self.dims[1:]),
            rows=(start, stop),
        )

    def column_block(self, start: int, stop: int) -> WeightSlice:
        """Columns ``start..stop`` of a ``(1, N)`` tensor (contiguous because there is one row).

        Args:
            start: first column.
            stop: one past the last column.

        Returns:
            The sub-slice.

        Raises:
            ValueError: the tensor is not whole and ``(1, N)``, or the range is bad.
        """
        if self.rows is not None or len(self.dims) != 2 or self.dims[0] != 1:
            raise ValueError(f"{self.name}: column blocks need a whole (1, N) tensor")
        if not 0 <= start < stop <= self.dims[1]:
            raise ValueError(f"{self.name}: bad column range {start}:{stop}")
        item = self.nbytes // self.dims[1]
        return WeightSlice(
            name=f"{self.tensor}[:,{start}:{stop}]",
            tensor=self.tensor,
            byte_start=start * item,
            nbytes=(stop - start) * item,
            data_type=self.data_type,
            dims=(1, stop - start),
            rows=(start, stop),
        )


@dataclass(frozen=True)
class TensorInfo:
    """Element type and shape of an activation at the planned batch size.

    Attributes:
        elem_type: ONNX element type (0 when unknown).
        dims: the shape at the planned batch, or None when the rank is unknown.
        symbolic: for each axis, whether its size depends on the batch (declared
            symbolic in segment graphs so smaller batches also run).
        estimate: a size in bytes assumed by the planner when the shape is unknown.
    """

    elem_type: int
    dims: tuple[int, ...] | None
    symbolic: tuple[bool, ...] = ()
    estimate: int | None = None

    @property
    def nbytes(self) -> int | None:
        """Size in bytes (the estimate when the shape is unknown), or None when nothing is known."""
        if self.dims is None or self.elem_type == 0 or any(d < 0 for d in self.dims):
            return self.estimate
        try:
            item = np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            return self.estimate
        return math.prod(self.dims) * item

    def with_axis(self, axis: int, size: int) -> TensorInfo:
        """A copy with axis ``axis`` resized to ``size`` (its symbolic flag cleared).

        Args:
            axis: axis index (negative counts from the end).
            size: the new size.

        Returns:
            The new info (unchanged when the rank is unknown).
        """
        if self.dims is None or not self.dims:
            return self
        axis = axis % len(self.dims)
        dims = list(self.dims)
        dims[axis] = size
        symbolic = list(self.symbolic) if self.symbolic else [False] * len(dims)
        symbolic[axis] = False
        return TensorInfo(self.elem_type, tuple(dims), tuple(symbolic))

    def value_info(self, name: str) -> onnx.ValueInfoProto:
        """An ONNX value info (batch-dependent axes symbolic).

        Args:
            name: the tensor name.

        Returns:
            A ``ValueInfoProto``; with no shape when the rank is unknown.
        """
        if self.dims is None:
            return helper.make_tensor_value_info(name, self.elem_type, None)
        shape: list[int | str | None] = [
            f"s{axis}" if (self.symbolic and self.symbolic[axis]) else (dim if dim >= 0 else None)
            for axis, dim in enumerate(self.dims)
        ]
        return helper.make_tensor_value_info(name, self.elem_type, shape)


@dataclass(frozen=True, eq=False)
class Op:
    """One node of a plan, with the weights it reads.

    Attributes:
        node: the ONNX node as it appears in its segment graph.
        weights: the weight slices among its inputs.
        source: the name of the original node it comes from (itself unless split).
    """

    node: onnx.NodeProto
    weights: tuple[WeightSlice, ...]
    source: str

    @property
    def inputs(self) -> tuple[str, ...]:
        """Non-empty input names."""
        return tuple(name for name in self.node.input if name)

    @property
    def outputs(self) -> tuple[str, ...]:
        """Non-empty output names."""
        return tuple(name for name in self.node.output if name)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this node reads (shared slices counted once)."""
        return sum({w.name: w.nbytes for w in self.weights}.values())


@dataclass(frozen=True, eq=False)
class SplitResult:
    """The pieces one node was rewritten into.

    Attributes:
        ops: the new nodes in execution order; the last one writes the original output.
        infos: type and shape of every new intermediate tensor.
        constants: small structural initializers (``Slice`` bounds) the new nodes read.
        strategy: which split was applied (see :func:`split_strategy`).
    """

    ops: tuple[Op, ...]
    infos: dict[str, TensorInfo]
    constants: dict[str, TensorProto]
    strategy: str


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    for attr in node.attribute:
        if attr.name == name:
            value: int | float = helper.get_attribute_value(attr)
            return value
    return default


def _weight_of(op: Op, name: str) -> WeightSlice | None:
    for weight in op.weights:
        if weight.name == name:
            return weight
    return None


def split_strategy(op: Op, infos: Mapping[str, TensorInfo]) -> str | None:
    """How ``op`` can be split, or None if it cannot.

    Args:
        op: a node whose weights are whole tensors.
        infos: activation types and shapes (the output's shape must be known).

    Returns:
        ``"conv-out-channels"``, ``"conv-groups"``, ``"gemm-out-columns"``,
        ``"gemm-k-rows"``, ``"matmul-k-rows"``, ``"gather-rows"`` or None.
    """
    node = op.node
    if node.domain not in ("", "ai.onnx") or len(op.outputs) != 1 or len(node.output) != 1:
        return None
    out = infos.get(node.output[0])
    if out is None or out.nbytes is None or out.dims is None:
        return None
    inputs = list(node.input)
    if node.op_type == "Conv" and len(inputs) >= 2:
        weight = _weight_of(op, inputs[1])
        if weight is None or weight.rows is not None or len(weight.dims) < 3 or len(out.dims) < 2:
            return None
        if len(inputs) >= 3 and inputs[2]:
            bias = _weight_of(op, inputs[2])
            if bias is None or bias.dims != (weight.dims[0],):
                return None
        x = infos.get(inputs[0])
        group = int(_attr(node, "group", 1))
        if group == 1:
            return "conv-out-channels"
        if x is None or x.dims is None or len(x.dims) < 2 or weight.dims[0] % group:
            return None
        return "conv-groups"
    if node.op_type == "Gemm" and len(inputs) >= 2:
        weight = _weight_of(op, inputs[1])
        if weight is None or weight.rows is not None or len(weight.dims) != 2:
            return None
        if int(_attr(node, "transB", 0)) == 1:
            if len(inputs) >= 3 and inputs[2]:
                bias = _weight_of(op, inputs[2])
                n = weight.dims[0]
                if bias is None or bias.dims not in ((n,), (1, n), (), (1,), (1, 1)):
                    return None
            return "gemm-out-columns"
        if infos.get(inputs[0]) is None:
            return None
        return "gemm-k-rows"
    if node.op_type == "MatMul" and len(inputs) == 2:
        weight = _weight_of(op, inputs[1])
        a = infos.get(inputs[0])
        if weight is None or weight.rows is not None or len(weight.dims) != 2 or a is None or a.dims is None:
            return None
        if _weight_of(op, inputs[0]) is not None or len(a.dims) < 1:
            return None
        return "matmul-k-rows"
    if node.op_type == "Gather" and len(inputs) == 2:
        return _gather_strategy(op, infos, out)
    return None


def _gather_strategy(op: Op, infos: Mapping[str, TensorInfo], out: TensorInfo) -> str | None:
    """``"gather-rows"`` for a weight table gathered on axis 0 by activation indices of a known type."""
    table = _weight_of(op, op.node.input[0])
    indices = infos.get(op.node.input[1])
    if table is None or table.rows is not None or not table.dims or out.dims is None:
        return None
    if _weight_of(op, op.node.input[1]) is not None or indices is None:
        return None
    if indices.elem_type not in (TensorProto.INT32, TensorProto.INT64):
        return None
    if int(_attr(op.node, "axis", 0)) % len(table.dims) != 0 or len(out.dims) < len(table.dims) - 1:
        return None
    return "gather-rows"


def split_units(op: Op, infos: Mapping[str, TensorInfo]) -> int:
    """The most pieces ``op`` can be split into (1 when it cannot be split).

    Args:
        op: the node.
        infos: activation types and shapes.

    Returns:
        Output channels, groups, output columns, reduction rows or table rows, by strategy.
    """
    strategy = split_strategy(op, infos)
    if strategy is None:
        return 1
    weight = _weight_of(op, op.node.input[0 if strategy == "gather-rows" else 1])
    if weight is None:  # pragma: no cover - split_strategy checked it
        return 1
    if strategy == "conv-groups":
        return int(_attr(op.node, "group", 1))
    return weight.dims[0]


def _bounds(units: int, pieces: int) -> list[int]:
    return [round(i * units / pieces) for i in range(pieces + 1)]


def _slice_constants(prefix: str, start: int, stop: int, axis: int) -> dict[str, TensorProto]:
    return {
        f"{prefix}.starts": numpy_helper.from_array(np.array([start], dtype=np.int64), f"{prefix}.starts"),
        f"{prefix}.ends": numpy_helper.from_array(np.array([stop], dtype=np.int64), f"{prefix}.ends"),
        f"{prefix}.axes": numpy_helper.from_array(np.array([axis], dtype=np.int64), f"{prefix}.axes"),
    }


def _slice_node(name: str, data: str, out: str, prefix: str) -> onnx.NodeProto:
    return helper.make_node("Slice", [data, f"{prefix}.starts", f"{prefix}.ends", f"{prefix}.axes"], [out], name=name)


def _copy_attrs(node: onnx.NodeProto, new: onnx.NodeProto, *, skip: tuple[str, ...] = ()) -> None:
    for attr in node.attribute:
        if attr.name not in skip:
            new.attribute.append(attr)


def split_op(op: Op, pieces: int, infos: Mapping[str, TensorInfo]) -> SplitResult:
    """Rewrite ``op`` into ``pieces`` nodes over contiguous weight ranges plus a merge.

    Args:
        op: a splittable node (see :func:`split_strategy`).
        pieces: how many pieces; clamped to ``[1, split_units(op)]``.
        infos: activation types and shapes.

    Returns:
        The replacement nodes, their intermediate tensors and constants. With
        one piece, the node itself.

    Raises:
        ValueError: ``op`` cannot be split.
    """
    strategy = split_strategy(op, infos)
    if strategy is None:
        raise ValueError(f"node {op.source!r} ({op.node.op_type}) cannot be split")
    pieces = max(1, min(pieces, split_units(op, infos)))
    if pieces == 1:
        return SplitResult((op,), {}, {}, strategy)
    if strategy in ("conv-out-channels", "conv-groups", "gemm-out-columns"):
        return _split_outputs(op, pieces, infos, strategy)
    if strategy == "gather-rows":
        return _split_gather(op, pieces, infos)
    return _split_reduction(op, pieces, infos, strategy)


def _split_outputs(op: Op, pieces: int, infos: Mapping[str, TensorInfo], strategy: str) -> SplitResult:
    node = op.node
    inputs = list(node.input)
    y = node.output[0]
    y_info = infos[y]
    weight = _weight_of(op, inputs[1])
    bias = _weight_of(op, inputs[2]) if len(inputs) >= 3 and inputs[2] else None
    if weight is None:  # pragma: no cover - checked by split_strategy
        raise ValueError("no weight")
    base = node.name or y
    group = int(_attr(node, "group", 1)) if strategy == "conv-groups" else 1
    units = group if strategy == "conv-groups" else weight.dims[0]
    rows_per_unit = weight.dims[0] // units
    others = {w.name: w for w in op.weights if w.name not in (inputs[1], inputs[2] if bias else None)}
    ops: list[Op] = []
    new_infos: dict[str, TensorInfo] = {}
    constants: dict[str, TensorProto] = {}
    parts: list[str] = []
    bounds = _bounds(units, pieces)
    for j in range(pieces):
        u0, u1 = bounds[j], bounds[j + 1]
        r0, r1 = u0 * rows_per_unit, u1 * rows_per_unit
        w_j = weight.row_block(r0, r1)
        weights = [w_j, *others.values()]
        x_name = inputs[0]
        if strategy == "conv-groups":
            # A piece takes whole groups; it reads the matching input channels only.
            channels = weight.dims[1]
            x_info = infos[inputs[0]]
            x_name = f"{y}#in{j}"
            prefix = f"{y}#in{j}"
            constants.update(_slice_constants(prefix, u0 * channels, u1 * channels, 1))
            ops.append(Op(_slice_node(f"{base}#in{j}", inputs[0], x_name, prefix), (), op.source))
            new_infos[x_name] = x_info.with_axis(1, (u1 - u0) * channels)
        piece_inputs = [x_name, w_j.name]
        if bias is not None:
            if strategy == "gemm-out-columns" and bias.dims in ((), (1,), (1, 1)):
                b_j = bias  # a broadcast scalar is shared by every piece
            elif len(bias.dims) == 2:
                b_j = bias.column_block(r0, r1)
            else:
                b_j = bias.row_block(r0, r1)
            weights.append(b_j)
            piece_inputs.append(b_j.name)
        part = f"{y}#part{j}"
        new = helper.make_node(node.op_type, piece_inputs, [part], name=f"{base}#part{j}")
        _copy_attrs(node, new, skip=("group",))
        if strategy == "conv-groups":
            new.attribute.append(helper.make_attribute("group", u1 - u0))
        elif node.op_type == "Conv" and any(a.name == "group" for a in node.attribute):
            new.attribute.append(helper.make_attribute("group", 1))
        ops.append(Op(new, tuple(weights), op.source))
        new_infos[part] = y_info.with_axis(1, r1 - r0)
        parts.append(part)
    concat = helper.make_node("Concat", parts, [y], name=f"{base}#concat", axis=1)
    ops.append(Op(concat, (), op.source))
    return SplitResult(tuple(ops), new_infos, constants, strategy)


def _split_reduction(op: Op, pieces: int, infos: Mapping[str, TensorInfo], strategy: str) -> SplitResult:
    node = op.node
    inputs = list(node.input)
    y = node.output[0]
    y_info = infos[y]
    weight = _weight_of(op, inputs[1])
    a_info = infos[inputs[0]]
    if weight is None or a_info.dims is None:  # pragma: no cover - checked by split_strategy
        raise ValueError("no weight")
    base = node.name or y
    trans_a = int(_attr(node, "transA", 0)) if node.op_type == "Gemm" else 0
    axis = (0 if trans_a else 1) if node.op_type == "Gemm" else len(a_info.dims) - 1
    c_name = inputs[2] if node.op_type == "Gemm" and len(inputs) >= 3 and inputs[2] else None
    others = {w.name: w for w in op.weights if w.name not in (inputs[1], c_name)}
    c_weight = _weight_of(op, c_name) if c_name else None
    ops: list[Op] = []
    new_infos: dict[str, TensorInfo] = {}
    constants: dict[str, TensorProto] = {}
    bounds = _bounds(weight.dims[0], pieces)
    running = ""
    for j in range(pieces):
        k0, k1 = bounds[j], bounds[j + 1]
        w_j = weight.row_block(k0, k1)
        prefix = f"{y}#in{j}"
        a_j = prefix
        constants.update(_slice_constants(prefix, k0, k1, axis))
        ops.append(Op(_slice_node(f"{base}#in{j}", inputs[0], a_j, prefix), (), op.source))
        new_infos[a_j] = a_info.with_axis(axis, k1 - k0)
        part = f"{y}#part{j}"
        weights = [w_j, *others.values()]
        if node.op_type == "Gemm":
            piece_inputs = [a_j, w_j.name]
            if j == 0 and c_name:
                # The bias is added once, by the first partial product.
                piece_inputs.append(c_name)
                if c_weight is not None:
                    weights.append(c_weight)
            new = helper.make_node("Gemm", piece_inputs, [part], name=f"{base}#part{j}")
            _copy_attrs(node, new)
        else:
            new = helper.make_node("MatMul", [a_j, w_j.name], [part], name=f"{base}#part{j}")
        ops.append(Op(new, tuple(weights), op.source))
        new_infos[part] = y_info
        if j == 0:
            running = part
            continue
        total = y if j == pieces - 1 else f"{y}#sum{j}"
        ops.append(Op(helper.make_node("Add", [running, part], [total], name=f"{base}#sum{j}"), (), op.source))
        if total != y:
            new_infos[total] = y_info
        running = total
    return SplitResult(tuple(ops), new_infos, constants, strategy)


def _scalar(name: str, value: int, elem_type: int) -> TensorProto:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _split_gather(op: Op, pieces: int, infos: Mapping[str, TensorInfo]) -> SplitResult:
    """Row blocks of a gathered table, merged with ``Where`` (see the module docstring).

    Indices are first wrapped as ``Gather`` reads them (``i < 0`` → ``i + V``); an index
    still negative becomes ``V``. The last piece clamps its local index from below only, so
    an index ≥ ``V`` reaches its ``Gather`` out of range and the run fails as the unsplit
    node would, instead of producing a row of zeros.
    """
    node = op.node
    table_name, ids = node.input[0], node.input[1]
    y = node.output[0]
    y_info = infos[y]
    table = _weight_of(op, table_name)
    if table is None or y_info.dims is None:  # pragma: no cover - checked by split_strategy
        raise ValueError("no table")
    index_type = infos[ids].elem_type
    # The indices have the output's leading axes (Gather on axis 0: out = ids.shape + row shape).
    lead = len(y_info.dims) - (len(table.dims) - 1)
    flags = y_info.symbolic[:lead] if y_info.symbolic else ()
    index_info = TensorInfo(index_type, y_info.dims[:lead], flags)
    mask_info = TensorInfo(TensorProto.BOOL, y_info.dims[:lead], flags)
    base = node.name or y
    rows = table.dims[0]
    others = tuple(w for w in op.weights if w.name != table_name)
    ops: list[Op] = []
    new_infos: dict[str, TensorInfo] = {}
    constants: dict[str, TensorProto] = {}

    def emit(op_type: str, inputs: list[str], out: str, info: TensorInfo) -> str:
        ops.append(Op(helper.make_node(op_type, inputs, [out], name=f"{base}#{out.rsplit('#', 1)[1]}"), (), op.source))
        new_infos[out] = info
        return out

    def const(key: str, value: int) -> str:
        name = f"{y}#{key}"
        constants[name] = _scalar(name, value, index_type)
        return name

    zero, size = const("zero", 0), const("rows", rows)
    # A block's "inside" mask is broadcast over the row axes of the gathered output.
    extra = len(table.dims) - 1
    axes = f"{y}#axes"
    if extra:
        constants[axes] = numpy_helper.from_array(np.arange(-extra, 0, dtype=np.int64), axes)
    row_mask = TensorInfo(
        TensorProto.BOOL, y_info.dims[:lead] + (1,) * extra, (*flags, *(False,) * extra) if flags else ()
    )
    wrapped = emit(
        "Where",
        [emit("Less", [ids, zero], f"{y}#neg", mask_info), emit("Add", [ids, size], f"{y}#wrap", index_info), ids],
        f"{y}#wrapped",
        index_info,
    )
    n = emit("Where", [emit("Less", [wrapped, zero], f"{y}#bad", mask_info), size, wrapped], f"{y}#index", index_info)
    bounds = _bounds(rows, pieces)
    running = ""
    for j in range(pieces):
        r0, r1 = bounds[j], bounds[j + 1]
        w_j = table.row_block(r0, r1)
        shifted = emit("Sub", [n, const(f"start{j}", r0)], f"{y}#shift{j}", index_info) if r0 else n
        if j < pieces - 1:
            local = emit("Clip", [shifted, zero, const(f"last{j}", r1 - r0 - 1)], f"{y}#local{j}", index_info)
        else:
            local = emit("Max", [shifted, zero], f"{y}#local{j}", index_info)
        part = f"{y}#part{j}"
        gather = helper.make_node("Gather", [w_j.name, local], [part], name=f"{base}#part{j}", axis=0)
        ops.append(Op(gather, (w_j, *others), op.source))
        new_infos[part] = y_info
        if j == 0:
            # Every index is in exactly one block, and a later block overwrites its own rows,
            # so the first piece's rows need no mask.
            running = part
            continue
        inside = emit("Equal", [shifted, local], f"{y}#inside{j}", mask_info)
        if extra:
            inside = emit("Unsqueeze", [inside, axes], f"{y}#rows{j}", row_mask)
        total = y if j == pieces - 1 else f"{y}#merge{j}"
        ops.append(
            Op(helper.make_node("Where", [inside, part, running], [total], name=f"{base}#merge{j}"), (), op.source)
        )
        if total != y:
            new_infos[total] = y_info
        running = total
    return SplitResult(tuple(ops), new_infos, constants, "gather-rows")
