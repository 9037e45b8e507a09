"""Optimized segments (:mod:`sealedml.runtime.memory_bounded.optimize` and the executor's optimized mode):
ONNX Runtime's NCHWc graphs with spilled weights, same outputs, budget kept, fallbacks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.envelope.model_container import SealedModelReader, open_model, seal_model
from sealedml.runtime.engine import LoadedModel
from sealedml.runtime.memory_bounded import StreamingModel, decrypt_reserve, plan
from sealedml.runtime.memory_bounded import builder as builder_module
from sealedml.runtime.memory_bounded import prepare as prepare_module
from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.container import Container
from sealedml.runtime.memory_bounded.optimize import OptimizationError, _split_weights, optimize_segment
from sealedml.runtime.memory_bounded.spill import ALIGN

KEY = bytes(range(32))
F32 = TensorProto.FLOAT


def padded_convs(channels: tuple[int, ...] = (20, 24, 20, 24, 20, 24), seed: int = 0) -> onnx.ModelProto:
    """3×3 convolutions with 20/24 channels: NCHWc pads them to 32, so optimized weights grow."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, c_in = "x", 16
    for i, c in enumerate(channels):
        w = (rng.standard_normal((c, c_in, 3, 3)) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight")]
        inits += [numpy_helper.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), f"conv{i}.bias")]
        nodes.append(
            helper.make_node(
                "Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        prev, c_in = f"r{i}", c
    graph = helper.make_graph(
        nodes,
        "padded",
        [helper.make_tensor_value_info("x", F32, ["N", 16, 28, 28])],
        [helper.make_tensor_value_info(prev, F32, ["N", c_in, 28, 28])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def padded() -> tuple[bytes, dict[str, np.ndarray], dict[str, np.ndarray]]:
    sealed = seal_model(padded_convs(), model_id="padded", model_version=1, model_key=KEY, chunk_size=4096)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 16, 28, 28)).astype(np.float32)}
    expected = LoadedModel(open_model(sealed, KEY), model_id="p", version=1).run(feeds).outputs
    return sealed, feeds, expected


def max_diff(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    assert list(got) == list(expected)
    return max(float(np.max(np.abs(got[k] - expected[k]))) for k in expected)


def test_optimized_segments_use_nchwc_and_match(padded: tuple[bytes, dict, dict]) -> None:
    sealed, feeds, expected = padded
    with StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=2_000_000, prefetch=True) as model:
        assert set(model.segment_modes) == {"optimized"}
        stats = model.load_stats
        assert stats.nchwc_nodes > 0 and stats.optimized_segments == len(model.plan.segments)
        assert stats.fallbacks == () and stats.plans == 1
        # NCHWc pads 20/24 channels to 32: the optimized weights are larger than the sealed ones.
        assert stats.weight_bytes > stats.sealed_weight_bytes == model.plan.weight_bytes
        # The spill holds each segment's blob + one tag per chunk; a run holds the blob + alignment room.
        assert stats.spill_bytes > stats.weight_bytes - ALIGN * len(model.plan.segments)
        for _ in range(2):
            assert max_diff(model.run(feeds).outputs, expected) <= 1e-4
            assert model.last_peak_bytes is not None and model.last_peak_bytes <= 2_000_000
        run = model.last_stats
        assert run is not None and sum(s.weight_bytes for s in run.segments) == stats.weight_bytes
        # Resident between requests: the graphs, and the first segment's weights decrypted
        # for the next run (warm_first_segment, the default with prefetch).
        graphs = sum(state.graph_bytes for state in model.segment_states)
        head = model.segment_states[0].entry
        assert graphs > 0 and head is not None and model.nbytes == graphs + head.nbytes


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("budget", [200_000, 230_000, 300_000, 400_000])
def test_grown_weights_are_replanned_or_fall_back_within_budget(
    padded: tuple[bytes, dict, dict], budget: int, prefetch: bool
) -> None:
    sealed, feeds, expected = padded
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=budget, prefetch=prefetch)
    stats = model.load_stats
    assert stats.headroom_bytes == model.plan.reserve_bytes - model.scratch_reserve_bytes >= 0
    assert stats.headroom_bytes > 0 or stats.plans == 1 or stats.fallbacks
    for k, reason in stats.fallbacks:
        assert model.segment_modes[k] == "sealed" and reason
    assert max_diff(model.run(feeds).outputs, expected) <= 1e-4
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= model.peak_bound_bytes <= budget
    model.close()


def test_grown_weights_trigger_a_replan_with_headroom(padded: tuple[bytes, dict, dict]) -> None:
    sealed, feeds, expected = padded
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=300_000, prefetch=False)
    stats = model.load_stats
    # The first plan (three segments, every weight optimized) breaks the budget by the padding;
    # the second keeps the excess out of the budget and then fits with everything optimized.
    assert stats.plans >= 2 and stats.headroom_bytes > 0 and stats.fallbacks == ()
    assert set(model.segment_modes) == {"optimized"}
    assert max_diff(model.run(feeds).outputs, expected) <= 1e-4
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= 300_000


def test_given_plan_is_kept_and_grown_segments_fall_back(padded: tuple[bytes, dict, dict]) -> None:
    sealed, feeds, expected = padded
    reader = SealedModelReader(sealed, KEY)
    sizes = {e.name: e.length for e in reader.manifest.tensors}
    given = plan(reader.graph(), sizes, 230_000, prefetch=True, reserve_bytes=decrypt_reserve(4096))
    model = StreamingModel(reader, plan=given, prefetch=True)
    assert model.plan is given and model.load_stats.plans == 1
    assert model.load_stats.fallbacks  # optimized weights of some segment would break the budget
    assert "do not fit the budget" in model.load_stats.fallbacks[0][1]
    assert max_diff(model.run(feeds).outputs, expected) <= 1e-4
    assert model.last_peak_bytes is not None and model.last_peak_bytes <= 230_000
    model.close()


def test_failed_optimization_falls_back_to_the_sealed_path(
    monkeypatch: pytest.MonkeyPatch, padded: tuple[bytes, dict, dict]
) -> None:
    sealed, feeds, expected = padded
    real = builder_module.optimize_segment
    calls: list[int] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise OptimizationError("simulated failure")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builder_module, "optimize_segment", flaky)
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=400_000, prefetch=False)
    assert model.segment_modes.count("sealed") == 1
    assert dict(model.load_stats.fallbacks)[model.segment_modes.index("sealed")] == "simulated failure"
    assert max_diff(model.run(feeds).outputs, expected) <= 1e-4
    model.close()


def test_verification_mismatch_falls_back(monkeypatch: pytest.MonkeyPatch, padded: tuple[bytes, dict, dict]) -> None:
    sealed, feeds, expected = padded
    monkeypatch.setattr(builder_module, "_close", lambda got, ref: False)
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=400_000, prefetch=False)
    assert set(model.segment_modes) == {"sealed"}
    assert all("differs" in reason for _, reason in model.load_stats.fallbacks)
    assert max_diff(model.run(feeds).outputs, expected) <= 1e-4
    unverified = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=400_000, prefetch=False, verify=False)
    assert set(unverified.segment_modes) == {"optimized"}  # no probe run, so no comparison


def test_optimize_off_runs_the_sealed_path(padded: tuple[bytes, dict, dict]) -> None:
    sealed, feeds, expected = padded
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=400_000, optimize=False)
    assert set(model.segment_modes) == {"sealed"}
    assert model.load_stats.optimize_s == 0 and model.load_stats.spill_bytes == 0
    assert model.load_stats.weight_bytes == model.plan.weight_bytes
    assert max_diff(model.run(feeds).outputs, expected) <= 1e-4


def test_without_memfd_everything_runs_unoptimized(
    monkeypatch: pytest.MonkeyPatch, padded: tuple[bytes, dict, dict]
) -> None:
    sealed, feeds, expected = padded
    monkeypatch.setattr(prepare_module, "memfd_supported", lambda: False)
    model = StreamingModel(SealedModelReader(sealed, KEY), budget_bytes=400_000, prefetch=True)
    assert set(model.segment_modes) == {"sealed"}
    assert {reason for _, reason in model.load_stats.fallbacks} == {"memfd_create unavailable"}
    assert max_diff(model.run(feeds).outputs, expected) <= 1e-4
    model.close()


def test_interface_changes_are_refused() -> None:
    x = helper.make_tensor_value_info("x", F32, [1, 4])
    y = helper.make_tensor_value_info("y", F32, [1, 4])
    renamed = helper.make_tensor_value_info("y_renamed", F32, [1, 4])
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")

    def model(out: onnx.ValueInfoProto, *, external: bool = False) -> onnx.ModelProto:
        init = onnx.TensorProto()
        init.CopyFrom(w)
        if external:
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            entry = init.external_data.add()
            entry.key, entry.value = "location", "weights.bin"
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], [out.name])], "g", [x], [out], [init])
        return helper.make_model(graph)

    with pytest.raises(OptimizationError, match="interface"):
        _split_weights(model(renamed), ["x"], ["y"], {}, None)
    with pytest.raises(OptimizationError, match="interface"):
        _split_weights(model(y), ["x", "extra"], ["y"], {}, None)
    with pytest.raises(OptimizationError, match="external"):
        _split_weights(model(y, external=True), ["x"], ["y"], {}, None)
    result = _split_weights(model(y), ["x"], ["y"], {}, None)
    assert [name for name, _, _, _ in result.tensors] == ["w"]
    runtime = onnx.ModelProto.FromString(result.graph)
    assert not runtime.graph.initializer and {v.name for v in runtime.graph.input} == {"x", "w"}


def test_optimize_segment_keeps_structural_constants_inline() -> None:
    # A split Gemm reads Slice bounds that the plan created itself: they stay initializers.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        "g",
        [helper.make_tensor_value_info("x", F32, ["N", 64])],
        [helper.make_tensor_value_info("y", F32, ["N", 256])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sealed = seal_model(model, model_id="g", model_version=1, model_key=KEY, chunk_size=4096)
    reader = SealedModelReader(sealed, KEY)
    sizes = {e.name: e.length for e in reader.manifest.tensors}
    p = plan(reader.graph(), sizes, 60_000, prefetch=False, reserve_bytes=decrypt_reserve(4096))
    assert p.splits  # the 64 kB weight is split
    segment = p.segments[0]
    loaded = Container(reader).decrypt(reader, segment, MemoryTracker())
    result = optimize_segment(
        p.segment_model(segment.index),
        loaded.arrays,
        inputs=segment.inputs,
        outputs=segment.outputs,
        constants=p.constants,
    )
    runtime = onnx.ModelProto.FromString(result.graph)
    spilled = {name for name, _, _, _ in result.tensors}
    assert spilled and not spilled & set(p.constants)
    assert {init.name for init in runtime.graph.initializer} <= set(p.constants)
