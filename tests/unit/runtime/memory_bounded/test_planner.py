"""The memory planner (:mod:`sealedml.runtime.memory_bounded.planner`): segments in execution order,
each within the budget, the right tensors crossing each cut, and a clear error when no plan fits."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml import zoo
from sealedml._internal.units import format_bytes
from sealedml.envelope.model_container import SealedModelReader, seal_model
from sealedml.errors import ConfigurationError
from sealedml.runtime.memory_bounded.planner import BudgetError, Plan, plan

F32 = TensorProto.FLOAT
KEY = bytes(range(32))


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    weights: dict[str, np.ndarray],
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _sizes(model: onnx.ModelProto) -> dict[str, int]:
    return {init.name: numpy_helper.to_array(init).nbytes for init in model.graph.initializer}


def residual_mlp() -> onnx.ModelProto:
    """x → MatMul → Relu → MatMul → Add(·, x) → MatMul → Relu; each weight 256 KiB, so x crosses a cut."""
    rng = np.random.default_rng(0)
    weights = {f"w{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in (1, 2, 3)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        helper.make_node("Add", ["h2", "x"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "w3"], ["h3"], name="mm3"),
        helper.make_node("Relu", ["h3"], ["y"], name="relu3"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["N", 256])],
        [helper.make_tensor_value_info("y", F32, ["N", 256])],
        weights,
    )


def check_plan(p: Plan, model: onnx.ModelProto) -> None:
    """Invariants every plan must satisfy."""
    # Segments cover the nodes in execution order (split pieces keep their source's name).
    sources = [op.source for seg in p.segments for op in seg.ops]
    collapsed = [name for i, name in enumerate(sources) if i == 0 or sources[i - 1] != name]
    assert collapsed == [n.name for n in model.graph.node]
    limit = p.budget_bytes - p.reserve_bytes
    for seg in p.segments:
        assert seg.peak_bytes + seg.prefetch_bytes <= limit
        assert seg.weight_bytes == sum(w.nbytes for w in seg.weights)
    for k in range(len(p.segments) - 1):
        expected = p.segments[k + 1].weight_bytes if p.prefetch else 0
        assert p.segments[k].prefetch_bytes == expected
    assert p.peak_bytes <= p.budget_bytes
    # Crossing tensors: what a segment reads from outside is exactly its inputs, and
    # every input was produced by an earlier segment or is a graph input.
    available = set(p.inputs)
    weight_names = {w.name for seg in p.segments for w in seg.weights}
    for k, seg in enumerate(p.segments):
        inside: set[str] = set()
        outside: list[str] = []
        for op in seg.ops:
            for name in op.inputs:
                if name in weight_names or name in p.constants or name in inside:
                    continue
                outside.append(name)
            inside.update(op.outputs)
        assert set(seg.inputs) == set(outside)
        assert set(seg.inputs) <= available
        later = {name for s in p.segments[k + 1 :] for op in s.ops for name in op.inputs}
        for name in seg.outputs:
            assert name in inside
            assert name in later or name in p.outputs
        for name in inside - set(seg.outputs):
            assert name not in later and name not in p.outputs
        available.update(seg.outputs)
    assert set(p.outputs) <= available


def test_residual_graph_cuts_with_the_skip_tensor_crossing() -> None:
    model = residual_mlp()
    p = plan(model, _sizes(model), 300_000, prefetch=False)
    check_plan(p, model)
    assert [s.node_names for s in p.segments] == [("mm1", "relu1"), ("mm2", "add"), ("mm3", "relu3")]
    first, second, third = p.segments
    assert first.inputs == ("x",) and first.outputs == ("r1",)
    assert second.inputs == ("r1", "x") and second.outputs == ("s",)
    assert third.inputs == ("s",) and third.outputs == ("y",)
    # x passes over segment 0 (held, not released) and dies in segment 1.
    assert first.release_after == ()
    assert set(second.release_after) == {"r1", "x"}
    assert second.held_bytes == 2 * 1024
    assert [w.name for w in second.weights] == ["w2"]


def test_prefetch_plan_bounds_each_segment_plus_the_next_segments_weights() -> None:
    model = residual_mlp()
    sizes = _sizes(model)
    # At 300 kB two 256 KiB weights cannot coexist: weight-free segments separate the
    # MatMuls so that a prefetch never overlaps a MatMul's own weights.
    tight = plan(model, sizes, 300_000, prefetch=True)
    check_plan(tight, model)
    assert not tight.splits
    assert all(not (a.weight_bytes and b.weight_bytes) for a, b in itertools.pairwise(tight.segments))
    # At 200 kB not even one weight fits next to a prefetch: the MatMuls are split along K.
    tighter = plan(model, sizes, 200_000, prefetch=True)
    check_plan(tighter, model)
    assert {name: strategy for name, (strategy, _) in tighter.splits.items()} == {
        "mm1": "matmul-k-rows",
        "mm2": "matmul-k-rows",
        "mm3": "matmul-k-rows",
    }
    p = plan(model, sizes, 600_000, prefetch=True)
    check_plan(p, model)
    assert len(p.segments) == 3
    big = plan(model, sizes, 2_000_000, prefetch=True)
    check_plan(big, model)
    assert len(big.segments) == 1


def test_unsatisfiable_budget_names_the_activation_and_the_smallest_feasible_budget() -> None:
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", F32, ["N", 1_000_000])],
        [helper.make_tensor_value_info("y", F32, ["N", 1_000_000])],
        {},
    )
    with pytest.raises(BudgetError) as info:
        plan(model, {}, 4_000_000)
    err = info.value
    assert isinstance(err, ConfigurationError)
    assert err.kind == "activation" and err.tensor in ("x", "y")
    assert err.needed_bytes == 4_000_000
    # x and y are alive together: 8 MB is the least that works.
    assert 8_000_000 <= err.minimum_budget <= 8_000_000 * 1.002 + 4096
    message = str(err)
    assert message.startswith("budget 4.0 MB too small: activation ")
    assert f"'{err.tensor}' needs 4.0 MB" in message
    assert "smallest feasible budget is 8.0 MB" in message
    plan(model, {}, err.minimum_budget)  # the reported minimum is feasible
    with pytest.raises(BudgetError):
        plan(model, {}, 7_900_000)


def test_unsplittable_weight_larger_than_the_budget_is_named() -> None:
    table = np.zeros((1000, 5000), dtype=np.float32)  # 20 MB, gathered by columns: no row blocks
    model = _model(
        [helper.make_node("Gather", ["table", "idx"], ["y"], name="lookup", axis=1)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", F32, [1000, "N"])],
        {"table": table},
    )
    with pytest.raises(BudgetError) as info:
        plan(model, _sizes(model), 8_000_000, prefetch=False)
    err = info.value
    assert (err.kind, err.tensor, err.node) == ("weight", "table", "lookup")
    assert "weight 'table' needs 20.0 MB" in str(err)
    assert 20_000_000 < err.minimum_budget < 20_100_000


def test_embedding_table_heavier_than_the_budget_is_split_into_row_blocks() -> None:
    table = np.zeros((5000, 1000), dtype=np.float32)  # 20 MB embedding table
    model = _model(
        [helper.make_node("Gather", ["table", "idx"], ["y"], name="lookup")],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 8])],
        [helper.make_tensor_value_info("y", F32, ["N", 8, 1000])],
        {"table": table},
    )
    for prefetch in (False, True):
        p = plan(model, _sizes(model), 8_000_000, prefetch=prefetch)
        check_plan(p, model)
        strategy, pieces = p.splits["lookup"]
        assert strategy == "gather-rows" and pieces >= 3
        rows = sorted(w.rows for seg in p.segments for w in seg.weights if w.tensor == "table" and w.rows)
        assert len(rows) == pieces and rows[0][0] == 0 and rows[-1][1] == 5000
        assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))


def test_layer_heavier_than_the_budget_is_split_into_contiguous_row_blocks() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4096, 1024)).astype(np.float32)  # 16 MB
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        [helper.make_tensor_value_info("x", F32, ["N", 1024])],
        [helper.make_tensor_value_info("y", F32, ["N", 4096])],
        {"w": w, "b": rng.standard_normal(4096).astype(np.float32)},
    )
    for prefetch in (False, True):
        p = plan(model, _sizes(model), 4_000_000, prefetch=prefetch, reserve_bytes=100_000)
        check_plan(p, model)
        strategy, pieces = p.splits["fc"]
        assert strategy == "gemm-out-columns" and pieces >= 5
        rows = sorted(w.rows for seg in p.segments for w in seg.weights if w.tensor == "w" and w.rows)
        assert rows[0][0] == 0 and rows[-1][1] == 4096
        assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))
        for seg in p.segments:
            for weight in seg.weights:
                if weight.tensor == "w" and weight.rows is not None:
                    assert weight.byte_start == weight.rows[0] * 1024 * 4


def test_batch_scales_activations_and_stays_symbolic() -> None:
    model = residual_mlp()
    one = plan(model, _sizes(model), 10_000_000, batch=1)
    four = plan(model, _sizes(model), 10_000_000, batch=4)
    assert four.segments[0].activation_peak_bytes == 4 * one.segments[0].activation_peak_bytes
    assert four.infos["x"].dims == (4, 256) and four.infos["x"].symbolic == (True, False)
    segment = four.segment_model(0)
    dim = segment.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param  # smaller batches still run


def test_segment_models_take_weights_as_inputs_not_initializers() -> None:
    model = residual_mlp()
    p = plan(model, _sizes(model), 300_000, prefetch=False)
    for seg in p.segments:
        m = p.segment_model(seg.index)
        onnx.checker.check_model(m)
        assert m.ir_version == model.ir_version
        assert not m.graph.initializer
        assert [v.name for v in m.graph.input] == [*seg.inputs, *(w.name for w in seg.weights)]


@pytest.mark.parametrize("budget", [12_000_000, 16_000_000, 32_000_000])
@pytest.mark.parametrize("prefetch", [True, False])
def test_mobilenet_plans_respect_the_budget(budget: int, prefetch: bool, mobilenet_sealed: SealedModelReader) -> None:
    graph = mobilenet_sealed.graph()
    sizes = {e.name: e.length for e in mobilenet_sealed.manifest.tensors}
    p = plan(graph, sizes, budget, prefetch=prefetch, reserve_bytes=3 * 256 * 1024)
    check_plan(p, graph)
    assert p.weight_bytes >= sum(sizes.values())  # every weight is read at least once per run
    assert not p.estimated


def test_mobilenet_below_its_largest_activation_pair_is_refused(mobilenet_sealed: SealedModelReader) -> None:
    graph = mobilenet_sealed.graph()
    sizes = {e.name: e.length for e in mobilenet_sealed.manifest.tensors}
    with pytest.raises(BudgetError) as info:
        plan(graph, sizes, 4_000_000)
    assert info.value.kind == "activation"
    assert info.value.needed_bytes == 96 * 112 * 112 * 4  # the expanded features of block 2
    plan(graph, sizes, info.value.minimum_budget)


def test_unknown_shapes_are_estimated_and_reported() -> None:
    # The Reshape target is a sealed weight, so shape inference cannot read it.
    model = _model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
            helper.make_node("Relu", ["r"], ["y"], name="relu"),
        ],
        [helper.make_tensor_value_info("x", F32, ["N", 8])],
        [helper.make_tensor_value_info("y", F32, None)],
        {"shape": np.array([-1, 2], dtype=np.int64)},
    )
    reader = SealedModelReader(seal_model(model, model_id="r", model_version=1, model_key=KEY), KEY)
    p = plan(reader.graph(), {e.name: e.length for e in reader.manifest.tensors}, 1_000_000)
    assert "r" in p.estimated
    assert p.infos["r"].nbytes == 32  # assumed as large as its input


def test_bad_arguments_are_configuration_errors() -> None:
    model = residual_mlp()
    with pytest.raises(ConfigurationError):
        plan(model, _sizes(model), 0)
    with pytest.raises(ConfigurationError):
        plan(model, _sizes(model), 1_000_000, batch=0)
    wrong = dict(_sizes(model), w1=12)
    with pytest.raises(ConfigurationError, match="w1"):
        plan(model, wrong, 1_000_000)


def test_format_bytes_uses_decimal_units() -> None:
    assert format_bytes(12_345_678) == "12.3 MB"
    assert format_bytes(12_300_001, ceil=True) == "12.4 MB"
    assert format_bytes(100_000) == "0.1 MB"
    assert format_bytes(40_520) == "40.5 kB"  # small models' budgets do not all print as "0.0 MB"
    assert format_bytes(40_501, ceil=True) == "40.6 kB"


def test_budget_error_names_the_decryption_reserve() -> None:
    model = residual_mlp()  # 256 KiB weights, 1 kB activations per row
    with pytest.raises(BudgetError) as caught:
        plan(model, _sizes(model), 50_000, reserve_bytes=45_000)
    message = str(caught.value)
    assert "45.0 kB of the budget is held for decryption scratch" in message
    assert caught.value.reserve == 45_000
    assert caught.value.minimum_budget > 50_000


@pytest.fixture(scope="module")
def mobilenet_sealed() -> SealedModelReader:
    sealed = seal_model(zoo.mobilenetv2(), model_id="mobilenetv2", model_version=1, model_key=KEY)
    return SealedModelReader(sealed, KEY)
