"""A loaded model (:mod:`sealedml.runtime.engine`): input binding, checks and execution on the toy model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.errors import InputError, SealedModelError
from sealedml.runtime.engine import LoadedModel, intra_op_threads, ort_dtype


@pytest.fixture(scope="module")
def toy(toy_model: onnx.ModelProto) -> LoadedModel:
    return LoadedModel(toy_model, model_id="toy", version=1)


@pytest.fixture(scope="module")
def toy_weights(toy_model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in toy_model.graph.initializer}
    return inits["linear.weight"], inits["linear.bias"]


def _inputs(batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(batch)
    return rng.standard_normal((batch, 4)).astype(np.float32), np.arange(batch, dtype=np.int64) * 10


def test_loaded_model_describes_inputs_and_outputs(toy: LoadedModel, toy_model: onnx.ModelProto) -> None:
    assert [s.name for s in toy.inputs] == ["x", "idx"]
    assert [s.dtype for s in toy.inputs] == [np.dtype(np.float32), np.dtype(np.int64)]
    assert [s.rank for s in toy.inputs] == [2, 1]
    assert toy.output_names == ["y", "idx_plus_one"]
    assert toy.nbytes == len(toy_model.SerializeToString())
    assert (toy.model_id, toy.version) == ("toy", 1)


def test_loaded_model_accepts_serialized_bytes(toy_model: onnx.ModelProto) -> None:
    model = LoadedModel(toy_model.SerializeToString(), model_id="toy", version=2, threads=2)
    x, idx = _inputs()
    np.testing.assert_array_equal(model.run({"x": x, "idx": idx}).outputs["idx_plus_one"], idx + 1)


def test_bind_named_inputs(toy: LoadedModel) -> None:
    x, idx = _inputs()
    bound = toy.bind_inputs({"idx": idx, "x": x}, positional=False)
    assert set(bound) == {"x", "idx"}
    assert bound["x"] is x and bound["idx"] is idx


def test_bind_positional_inputs_in_model_order(toy: LoadedModel) -> None:
    x, idx = _inputs()
    bound = toy.bind_inputs({"0": x, "1": idx}, positional=True)
    assert bound["x"] is x and bound["idx"] is idx


def test_positional_inputs_in_wrong_order_are_caught_by_dtype(toy: LoadedModel) -> None:
    x, idx = _inputs()
    with pytest.raises(InputError, match="'x'"):
        toy.bind_inputs({"0": idx, "1": x}, positional=True)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_positional_input_count_mismatch(toy: LoadedModel, count: int) -> None:
    x, _ = _inputs()
    tensors = {str(i): x for i in range(count)}
    with pytest.raises(InputError, match=f"takes 2 input\\(s\\), got {count}"):
        toy.bind_inputs(tensors, positional=True)


def test_missing_named_input_is_named(toy: LoadedModel) -> None:
    x, _ = _inputs()
    with pytest.raises(InputError, match=r"missing \['idx'\]"):
        toy.bind_inputs({"x": x}, positional=False)


def test_unexpected_named_input_is_named(toy: LoadedModel) -> None:
    x, idx = _inputs()
    with pytest.raises(InputError, match=r"unexpected \['attention_mask'\]"):
        toy.bind_inputs({"x": x, "idx": idx, "attention_mask": idx}, positional=False)


def test_misnamed_input_reports_both_sides(toy: LoadedModel) -> None:
    x, idx = _inputs()
    with pytest.raises(InputError, match=r"missing \['x'\], unexpected \['X'\]"):
        toy.bind_inputs({"X": x, "idx": idx}, positional=False)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("x", np.zeros((2, 4), np.float64)),
        ("x", np.zeros((2, 4), np.float16)),
        ("x", np.zeros((2, 4), np.int32)),
        ("idx", np.zeros(2, np.int32)),
        ("idx", np.zeros(2, np.uint64)),
        ("idx", np.zeros(2, np.bool_)),
    ],
)
def test_wrong_dtype_is_rejected_with_input_name(toy: LoadedModel, name: str, bad: np.ndarray) -> None:
    x, idx = _inputs(2)
    tensors = {"x": x, "idx": idx, name: bad}
    with pytest.raises(InputError, match=f"input '{name}' must be .*, got {bad.dtype}"):
        toy.bind_inputs(tensors, positional=False)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("x", np.zeros(4, np.float32)),
        ("x", np.zeros((1, 2, 4), np.float32)),
        ("x", np.array(1.0, np.float32)),
        ("idx", np.zeros((2, 1), np.int64)),
    ],
)
def test_wrong_rank_is_rejected_with_input_name(toy: LoadedModel, name: str, bad: np.ndarray) -> None:
    x, idx = _inputs(2)
    tensors = {"x": x, "idx": idx, name: bad}
    with pytest.raises(InputError, match=f"input '{name}' must have rank"):
        toy.bind_inputs(tensors, positional=False)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_run_returns_correct_values(toy: LoadedModel, toy_weights: tuple[np.ndarray, np.ndarray], batch: int) -> None:
    weight, bias = toy_weights
    x, idx = _inputs(batch)
    out = toy.run(toy.bind_inputs({"x": x, "idx": idx}, positional=False)).outputs
    assert set(out) == {"y", "idx_plus_one"}
    assert out["y"].shape == (batch, 3) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], x @ weight + bias, rtol=1e-5, atol=1e-6)
    assert out["idx_plus_one"].dtype == np.int64
    np.testing.assert_array_equal(out["idx_plus_one"], idx + 1)


def test_run_with_empty_batch(toy: LoadedModel) -> None:
    out = toy.run({"x": np.zeros((0, 4), np.float32), "idx": np.zeros(0, np.int64)}).outputs
    assert out["y"].shape == (0, 3)
    assert out["idx_plus_one"].shape == (0,)


def test_run_rejects_wrong_dimension_as_input_error(toy: LoadedModel) -> None:
    x = np.zeros((2, 5), np.float32)  # right dtype and rank, wrong width
    bound = toy.bind_inputs({"x": x, "idx": np.zeros(2, np.int64)}, positional=False)
    with pytest.raises(InputError, match="model toy rejected the inputs"):
        toy.run(bound)


def test_run_rejects_mismatched_batch_as_input_error(toy: LoadedModel) -> None:
    with pytest.raises(InputError, match="rejected the inputs"):
        toy.run({"x": np.zeros((2, 4), np.float32), "idx": np.zeros(3, np.int64), "extra": np.zeros(1)})


def test_positional_inputs_with_non_index_names_raise_input_error(toy: LoadedModel) -> None:
    x, idx = _inputs()
    with pytest.raises(InputError):
        toy.bind_inputs({"a": x, "b": idx}, positional=True)


def test_unloadable_model_raises_sealed_model_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(SealedModelError, match="broken-model v3 cannot be loaded"):
        LoadedModel(model, model_id="broken-model", version=3)
    with pytest.raises(SealedModelError):
        LoadedModel(b"not an onnx model", model_id="garbage", version=1)


def test_model_with_unsupported_input_type_raises_sealed_model_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(SealedModelError, match="input s has unsupported type"):
        LoadedModel(model, model_id="strings", version=1)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("tensor(float)", np.float32),
        ("tensor(int64)", np.int64),
        ("tensor(bool)", np.bool_),
        ("tensor(uint8)", np.uint8),
        ("tensor(float16)", np.float16),
    ],
)
def test_ort_dtype_maps_supported_types(name: str, dtype: type[np.generic]) -> None:
    assert ort_dtype(name) == np.dtype(dtype)


@pytest.mark.parametrize("name", ["tensor(string)", "tensor(bfloat16)", "seq(tensor(float))", ""])
def test_ort_dtype_returns_none_for_unsupported_types(name: str) -> None:
    assert ort_dtype(name) is None


# -- intra-op threads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("concurrency", "cores", "expected"),
    [
        (2, 2, 1),
        (1, 2, 2),
        (4, 2, 1),
        (3, 8, 2),
        (1, 16, 16),
        (16, 16, 1),
        (0, 4, 4),
        (-3, 4, 4),
    ],
)
def test_intra_op_threads(concurrency: int, cores: int, expected: int) -> None:
    assert intra_op_threads(concurrency, cores=cores) == expected


def test_intra_op_threads_never_oversubscribes_and_is_never_zero() -> None:
    for cores in range(1, 33):
        for concurrency in range(1, 65):
            threads = intra_op_threads(concurrency, cores=cores)
            assert threads >= 1
            if concurrency <= cores:
                assert concurrency * threads <= cores


def test_intra_op_threads_defaults_to_machine_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 12)
    assert intra_op_threads(1) == 12
    assert intra_op_threads(5) == 2
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert intra_op_threads(1) == 1


def test_every_engine_is_a_model_and_only_a_bounded_one_reports_a_peak(toy_model: onnx.ModelProto) -> None:
    """The worker serves any engine through ``Model``; the peak travels in ``RunResult``, typed."""
    from sealedml.envelope.model_container import SealedModelReader, seal_model
    from sealedml.runtime.engine import Model, RunResult
    from sealedml.runtime.memory_bounded import StreamingModel

    x, idx = _inputs(batch=1)  # a memory plan is for batch 1 unless asked otherwise
    whole = LoadedModel(toy_model, model_id="toy", version=1)
    key = bytes(range(32))
    sealed = seal_model(toy_model, model_id="toy", model_version=1, model_key=key)
    with StreamingModel(SealedModelReader(sealed, key), budget_bytes=1 << 20) as bounded:
        for model in (whole, bounded):
            assert isinstance(model, Model)
            result = model.run(model.bind_inputs({"x": x, "idx": idx}, positional=False))
            assert isinstance(result, RunResult)
            np.testing.assert_array_equal(result.outputs["idx_plus_one"], idx + 1)
        assert whole.run({"x": x, "idx": idx}).peak_bytes is None
        peak = bounded.run({"x": x, "idx": idx}).peak_bytes
        assert peak is not None and 0 < peak <= 1 << 20


def test_a_sealed_model_opened_in_place_runs_as_the_inline_one() -> None:
    """The cold-start path: large weights handed to ONNX Runtime in place, while the shape and axes
    tensors a transformer's Reshape and ReduceSum read go back into the graph (ONNX shape inference
    cannot read an external tensor). A small MiniLM has both."""
    import os

    from sealedml.envelope.model_container import open_model, open_model_weights, seal_model
    from sealedml.zoo.minilm import MiniLMConfig, minilm, sample_inputs

    small = MiniLMConfig(layers=2, hidden=64, heads=4, ffn=256, sequence=16, vocab=500, positions=32)
    key = os.urandom(32)
    sealed = seal_model(minilm(0, small), model_id="m", model_version=1, model_key=key)
    opened = open_model_weights(sealed, key)
    assert opened.weights and all(not w.flags.writeable for w in opened.weights.values())
    assert all(w.dtype.kind == "f" and w.size > 64 for w in opened.weights.values())
    in_place = LoadedModel(opened, model_id="m", version=1)
    inline = LoadedModel(open_model(sealed, key), model_id="m", version=1)
    assert in_place.nbytes == len(opened.payload)
    inputs = sample_inputs(2, 0, small)
    got, want = in_place.run(inputs).outputs, inline.run(inputs).outputs
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
