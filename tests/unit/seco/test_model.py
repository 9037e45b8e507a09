"""SECO's view of a model: affine layers between ReLUs, fixed point mod p, additive weight shares."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml import zoo
from sealedml.errors import InputError
from sealedml.seco.model import SECO_PRIME, compile_model
from sealedml.zoo.digits_mlp import digits_mlp


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], shape: list[int], out: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _small_cnn() -> onnx.ModelProto:
    """conv 3×3 (1→4, pad 1) → ReLU → average pool 2×2 → flatten → fc 64→3."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.b"),
        numpy_helper.from_array(rng.standard_normal((3, 64)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.w", "conv.b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("AveragePool", ["relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [1, 8, 8], 3)


def test_the_digits_mlp_compiles_and_its_fixed_point_keeps_its_accuracy() -> None:
    trained = digits_mlp()
    model = compile_model(trained.model)
    assert [layer.weight.shape for layer in model.layers] == [(32, 64), (10, 32)]
    floats = ort.InferenceSession(trained.model.SerializeToString()).run(None, {"input": trained.x_test})[0]
    fixed = np.array([model.decode_output(model.reference(x)[0]) for x in trained.x_test])
    float_accuracy = float((floats.argmax(1) == trained.y_test).mean())
    fixed_accuracy = float((fixed.argmax(1) == trained.y_test).mean())
    assert float_accuracy > 0.95
    assert abs(fixed_accuracy - float_accuracy) <= 0.005
    assert model.check_range(trained.x_test[:20]) < SECO_PRIME // 8


def test_a_convolution_becomes_its_dense_matrix() -> None:
    onnx_model = _small_cnn()
    model = compile_model(onnx_model)
    assert [layer.weight.shape for layer in model.layers] == [(256, 64), (3, 256)]
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(onnx_model.SerializeToString()).run(None, {"input": x})[0]
    h = np.maximum(0, x.reshape(5, -1) @ model.layers[0].weight.T + model.layers[0].bias)
    got = h @ model.layers[1].weight.T + model.layers[1].bias
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_weight_shares_add_up_and_each_alone_is_not_the_weights() -> None:
    model = compile_model(digits_mlp().model)
    shares_b, shares_c = model.split()
    for (w, _), b, c in zip(model.fixed_point(), shares_b, shares_c, strict=True):
        assert np.array_equal((b + c) % SECO_PRIME, w)
        assert not np.array_equal(b, w) and not np.array_equal(c, w)
        assert b.max() > SECO_PRIME // 2  # uniform over the field, not small like the weights


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: zoo.get("mobilenetv2"), "Clip"),
        (lambda: zoo.get("resnet50"), "MaxPool"),
        (lambda: zoo.toy_multi_io(), "one input"),
    ],
)
def test_operations_seco_cannot_compute_are_refused_by_name(build: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        compile_model(build())  # type: ignore[operator]


def test_a_relu_that_feeds_two_branches_is_refused() -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "r"], ["y"], name="skip"),
    ]
    with pytest.raises(InputError, match=r"relu.*chain"):
        compile_model(_model(nodes, [w], [4], 4))


def test_inputs_of_the_wrong_size_are_refused() -> None:
    model = compile_model(digits_mlp().model)
    with pytest.raises(InputError, match="expected 64 input values"):
        model.encode_input(np.zeros(63))


def test_values_that_would_wrap_around_the_field_are_refused() -> None:
    model = compile_model(digits_mlp().model)
    with pytest.raises(InputError, match="too close to p/2"):
        model.check_range(np.full((1, 64), 1e9))


def _deep_mlp(widths: list[int]) -> onnx.ModelProto:
    """A random ReLU MLP of the given widths (digits-sized input), weights ~ N(0, 1/fan_in)."""
    rng = np.random.default_rng(5)
    nodes, inits, previous = [], [], "input"
    for k, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{k}"),
            numpy_helper.from_array(np.full(n_out, 0.1, np.float32), f"b{k}"),
        ]
        nodes.append(helper.make_node("Gemm", [previous, f"w{k}", f"b{k}"], [f"fc{k}"], name=f"fc{k}", transB=1))
        previous = f"fc{k}"
        if k < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [previous], [f"relu{k}"], name=f"relu{k}"))
            previous = f"relu{k}"
    nodes[-1].output[0] = "y"
    return _model(nodes, inits, [widths[0]], widths[-1])


def test_truncation_keeps_deep_models_inside_the_field() -> None:
    import dataclasses

    model = compile_model(_deep_mlp([64, 32, 32, 32, 32, 10]))
    x = digits_mlp().x_test[:10]
    assert model.truncate and model.check_range(x) < SECO_PRIME // 1000
    untruncated = dataclasses.replace(model, truncate=False)
    with pytest.raises(InputError, match="too close to p/2"):
        untruncated.check_range(x)  # scale 2^72 after five layers: far beyond p
    floats = ort.InferenceSession(_deep_mlp([64, 32, 32, 32, 32, 10]).SerializeToString()).run(None, {"input": x})[0]
    fixed = np.array([model.decode_output(model.reference(sample)[0]) for sample in x])
    np.testing.assert_allclose(fixed, floats, rtol=0.03, atol=0.1)  # 12-bit fixed point through five layers
