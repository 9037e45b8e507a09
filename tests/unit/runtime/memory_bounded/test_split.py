"""Layer splitting (:mod:`sealedml.runtime.memory_bounded.split`): every piece reads a contiguous
weight range, and the rewritten fragment computes what the unsplit layer computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.runtime.memory_bounded.split import (
    Op,
    TensorInfo,
    WeightSlice,
    split_op,
    split_strategy,
    split_units,
)

F32 = TensorProto.FLOAT


def _whole(name: str, array: np.ndarray) -> WeightSlice:
    return WeightSlice.whole(name, F32, array.shape, array.nbytes)


def _run(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    constants: list[TensorProto],
    output: str,
) -> np.ndarray:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, F32, list(a.shape)) for n, a in inputs.items()],
        [helper.make_tensor_value_info(output, F32, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()] + constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([output], inputs)[0])


def _slice_bytes(full: dict[str, np.ndarray], weight: WeightSlice) -> np.ndarray:
    """Read a slice exactly as the executor does: a byte range of the row-major tensor."""
    raw = np.ascontiguousarray(full[weight.tensor]).tobytes()
    chunk = raw[weight.byte_start : weight.byte_start + weight.nbytes]
    return np.frombuffer(chunk, dtype=np.float32).reshape(weight.dims)


def _check_split(
    node: onnx.NodeProto,
    x: np.ndarray,
    weights: dict[str, np.ndarray],
    infos: dict[str, TensorInfo],
    pieces: int,
    strategy: str,
) -> None:
    op = Op(node, tuple(_whole(n, a) for n, a in weights.items()), node.name)
    assert split_strategy(op, infos) == strategy
    expected = _run([node], {"x": x}, weights, [], "y")
    result = split_op(op, pieces, infos)
    assert result.strategy == strategy
    assert result.ops[-1].outputs == ("y",)
    piece_weights: dict[str, np.ndarray] = {}
    for piece in result.ops:
        for w in piece.weights:
            piece_weights[w.name] = _slice_bytes(weights, w)
            assert w.nbytes <= weights[w.tensor].nbytes
    big = max(weights, key=lambda n: weights[n].nbytes)
    heavy = [w for piece in result.ops for w in piece.weights if w.tensor == big]
    assert len(heavy) == pieces
    assert sum(w.nbytes for w in heavy) == weights[big].nbytes
    got = _run([p.node for p in result.ops], {"x": x}, piece_weights, list(result.constants.values()), "y")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _info(shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(F32, shape, tuple(axis == 0 for axis in range(len(shape))))


@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_conv_split_by_output_channels_matches_unsplit(pieces: int) -> None:
    rng = np.random.default_rng(pieces)
    x = rng.standard_normal((2, 5, 9, 9)).astype(np.float32)
    w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])
    infos = {"x": _info(x.shape), "y": _info((2, 7, 5, 5))}
    _check_split(node, x, {"w": w, "b": b}, infos, pieces, "conv-out-channels")


def test_grouped_conv_split_by_whole_groups_matches_unsplit() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    w = rng.standard_normal((12, 2, 3, 3)).astype(np.float32)  # 4 groups of 2 in → 3 out channels
    b = rng.standard_normal(12).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="gconv", pads=[1, 1, 1, 1], group=4)
    infos = {"x": _info(x.shape), "y": _info((1, 12, 6, 6))}
    op = Op(node, (_whole("w", w), _whole("b", b)), "gconv")
    assert split_units(op, infos) == 4
    _check_split(node, x, {"w": w, "b": b}, infos, 3, "conv-groups")


@pytest.mark.parametrize("bias_shape", [(10,), (1, 10), ()])
def test_gemm_transb_split_by_output_columns_matches_unsplit(bias_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    w = rng.standard_normal((10, 16)).astype(np.float32)
    c = rng.standard_normal(bias_shape).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)
    infos = {"x": _info(x.shape), "y": _info((3, 10))}
    _check_split(node, x, {"w": w, "c": c}, infos, 4, "gemm-out-columns")


def test_gemm_without_transb_split_along_reduction_matches_unsplit() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    w = rng.standard_normal((20, 6)).astype(np.float32)
    c = rng.standard_normal(6).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=1.5, beta=0.5)
    infos = {"x": _info(x.shape), "y": _info((3, 6))}
    _check_split(node, x, {"w": w, "c": c}, infos, 3, "gemm-k-rows")


@pytest.mark.parametrize("pieces", [2, 5])
def test_matmul_split_along_reduction_sums_partial_products(pieces: int) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    w = rng.standard_normal((24, 8)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    infos = {"x": _info(x.shape), "y": _info((2, 3, 8))}
    _check_split(node, x, {"w": w}, infos, pieces, "matmul-k-rows")


def test_split_clamps_pieces_to_the_number_of_rows() -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    infos = {"x": _info((1, 4)), "y": _info((1, 3))}
    result = split_op(Op(node, (_whole("w", w),), "fc"), 100, infos)
    assert sum(1 for op in result.ops if op.node.op_type == "Gemm") == 3


def test_one_piece_returns_the_node_unchanged() -> None:
    w = np.ones((3, 4), dtype=np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    op = Op(node, (_whole("w", w),), "fc")
    result = split_op(op, 1, {"x": _info((1, 4)), "y": _info((1, 3))})
    assert result.ops == (op,)


def test_row_block_is_a_contiguous_byte_range() -> None:
    w = _whole("w", np.zeros((10, 4, 3, 3), dtype=np.float32))
    piece = w.row_block(2, 5)
    assert (piece.byte_start, piece.nbytes, piece.dims, piece.rows) == (2 * 36 * 4, 3 * 36 * 4, (3, 4, 3, 3), (2, 5))
    assert piece.name == "w[2:5]" and piece.tensor == "w"
    with pytest.raises(ValueError):
        piece.row_block(0, 1)  # slices are not re-sliced
    with pytest.raises(ValueError):
        w.row_block(5, 11)


def test_unsupported_layers_are_not_splittable() -> None:
    w = np.ones((4, 4), dtype=np.float32)
    infos = {"x": _info((1, 4)), "y": _info((1, 4))}
    add = Op(helper.make_node("Add", ["x", "w"], ["y"], name="add"), (_whole("w", w),), "add")
    assert split_strategy(add, infos) is None
    assert split_units(add, infos) == 1
    with pytest.raises(ValueError):
        split_op(add, 2, infos)
    # A Conv whose kernel is an activation (not a sealed weight) has nothing to split.
    conv = Op(helper.make_node("Conv", ["x", "k"], ["y"], name="conv"), (), "conv")
    assert split_strategy(conv, {"x": _info((1, 1, 4, 4)), "y": _info((1, 1, 4, 4))}) is None
    # An output of unknown shape cannot be sized, so it is not split either.
    gemm = Op(helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), (_whole("w", w),), "g")
    assert split_strategy(gemm, {"x": _info((1, 4)), "y": TensorInfo(F32, None)}) is None


# -- Gather: row blocks of an embedding table ------------------------------------------------------


def _gather_op(table: np.ndarray, index_type: int, ids_shape: tuple[int, ...]) -> tuple[Op, dict[str, TensorInfo]]:
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)
    batch = tuple(axis == 0 for axis in range(len(ids_shape)))
    out = ids_shape + table.shape[1:]
    infos = {
        "ids": TensorInfo(index_type, ids_shape, batch),
        "y": TensorInfo(F32, out, batch + (False,) * (table.ndim - 1)),
    }
    return Op(node, (_whole("table", table),), "embed"), infos


def _gather_session(op: Op, pieces: int, infos: dict[str, TensorInfo], table: np.ndarray) -> ort.InferenceSession:
    result = split_op(op, pieces, infos)
    assert result.strategy == "gather-rows" and result.ops[-1].outputs == ("y",)
    blocks = [w for piece in result.ops for w in piece.weights]
    # The pieces read consecutive row blocks that cover the table exactly once.
    rows = [w.rows or (-1, -1) for w in blocks]
    assert len(rows) == pieces
    assert [start for start, _ in rows] == [0] + [stop for _, stop in rows[:-1]]
    assert rows[-1][1] == table.shape[0]
    assert sum(w.nbytes for w in blocks) == table.nbytes
    weights = {w.name: _slice_bytes({"table": table}, w) for w in blocks}
    graph = helper.make_graph(
        [piece.node for piece in result.ops],
        "g",
        [helper.make_tensor_value_info("ids", infos["ids"].elem_type, list(infos["ids"].dims or ()))],
        [helper.make_tensor_value_info("y", F32, None)],
        [numpy_helper.from_array(a, n) for n, a in weights.items()] + list(result.constants.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("table_shape", "index_type", "pieces"),
    [
        ((50, 6), TensorProto.INT64, 2),
        ((50, 6), TensorProto.INT64, 7),
        ((50, 3, 2), TensorProto.INT32, 3),
        ((50,), TensorProto.INT64, 4),
    ],
)
def test_gather_split_by_table_rows_equals_unsplit_bit_for_bit(
    table_shape: tuple[int, ...], index_type: int, pieces: int
) -> None:
    rng = np.random.default_rng(pieces)
    table = rng.standard_normal(table_shape).astype(np.float32)
    op, infos = _gather_op(table, index_type, (2, 9))
    assert split_strategy(op, infos) == "gather-rows" and split_units(op, infos) == 50
    ids = rng.integers(-50, 50, (2, 9)).astype(helper.tensor_dtype_to_np_dtype(index_type))
    ids[0, :4] = [0, 49, -1, -50]  # both ends of the table, and negative indices as Gather wraps them
    got = _gather_session(op, pieces, infos, table).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, table[ids])


@pytest.mark.parametrize("bad", [50, 1000, -51])
def test_gather_split_refuses_an_out_of_range_index_like_the_unsplit_node(bad: int) -> None:
    table = np.ones((50, 4), dtype=np.float32)
    op, infos = _gather_op(table, TensorProto.INT64, (1, 5))
    session = _gather_session(op, 3, infos, table)
    ids = np.array([[1, 2, 3, bad, 4]], dtype=np.int64)
    with pytest.raises(Exception, match="out of"):
        session.run(None, {"ids": ids})


def test_gather_is_split_only_on_a_sealed_table_by_activation_indices() -> None:
    table = np.ones((50, 4), dtype=np.float32)
    op, infos = _gather_op(table, TensorProto.INT64, (1, 5))
    ids = _whole("ids", np.zeros((1, 5), dtype=np.float32))
    # Indices that are themselves a sealed tensor (position ids) are not split.
    with_sealed_ids = Op(op.node, (*op.weights, ids), "embed")
    assert split_strategy(with_sealed_ids, infos) is None
    on_axis1 = Op(helper.make_node("Gather", ["table", "ids"], ["y"], axis=1), op.weights, "g")
    assert split_strategy(on_axis1, infos) is None
    activation_table = Op(op.node, (), "embed")
    assert split_strategy(activation_table, infos) is None
