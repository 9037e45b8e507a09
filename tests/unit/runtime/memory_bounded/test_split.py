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
