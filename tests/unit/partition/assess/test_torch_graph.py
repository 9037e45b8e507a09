"""The ONNX → torch translator: known answers against ONNX Runtime, gradients, and refusals by name."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sealedml import zoo
from sealedml.partition.assess.cuts import Slicer, run_onnx
from sealedml.partition.assess.torch_graph import SUPPORTED_OPS, TranslationError, reinitialize, to_torch
from sealedml.partition.graph import check_cut
from sealedml.zoo.trained import TrainedModel

from .conftest import image, make_model, vector

REQUIRED_OPS = {
    "Conv", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
    "BatchNormalization", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Flatten", "Reshape", "Concat",
    "Identity", "Softmax", "Constant", "Shape", "Gather", "Unsqueeze",
}  # fmt: skip


def _assert_matches_onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> None:
    """Every output within 1e-5 of ONNX Runtime's, relative to the output's scale (at least 1)."""
    expected = run_onnx(model, {model.graph.input[0].name: x})
    with torch.no_grad():
        got = to_torch(model)(torch.from_numpy(x.copy()))
    got = list(got) if isinstance(got, tuple) else [got]
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        scale = max(1.0, float(np.abs(e).max()))
        assert float(np.abs(g.numpy() - e).max()) <= 1e-5 * scale


def _front(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    return Slicer(model).front(check_cut(model, [tensor]))


def test_the_translator_covers_the_operators_cnn_fronts_use() -> None:
    assert REQUIRED_OPS <= SUPPORTED_OPS


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "tensor"),
    [("mobilenetv2", "features.3.add"), ("resnet50", "layer1.0.relu3")],
)
def test_zoo_fronts_match_onnxruntime(name: str, tensor: str) -> None:
    """A few layers of the random-weight ImageNet CNNs: depthwise conv, Clip, MaxPool, residual Add."""
    front = _front(zoo.get(name), tensor)
    assert {"Conv", "Add"} <= {n.op_type for n in front.graph.node}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    _assert_matches_onnxruntime(front, x)


def test_trained_cnns_match_onnxruntime_whole_and_in_parts(digits: TrainedModel, faces: TrainedModel) -> None:
    for victim in (digits, faces):
        _assert_matches_onnxruntime(victim.model, victim.x_test[:16].copy())
        slicer = Slicer(victim.model)
        cut = check_cut(victim.model, ["relu2"])
        _assert_matches_onnxruntime(slicer.front(cut), victim.x_test[:16].copy())
        ir = run_onnx(slicer.front(cut), {"input": victim.x_test[:16]})[0]
        _assert_matches_onnxruntime(slicer.rest(cut), ir)


def test_gradients_reach_the_input(digits: TrainedModel) -> None:
    module = to_torch(_front(digits.model, "relu3"))
    x = torch.from_numpy(digits.x_test[:4].copy()).requires_grad_(True)
    module(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert all(p.requires_grad for p in module.parameters())


def _every_other_op_model() -> onnx.ModelProto:
    """One small graph with the operators the zoo models do not use, including an exported-style dynamic flatten."""
    rng = np.random.default_rng(1)
    f = np.float32
    w = {
        "w": rng.standard_normal((4, 2, 3, 3)).astype(f),
        "scale": rng.uniform(0.5, 1.5, 4).astype(f),
        "bias": rng.standard_normal(4).astype(f),
        "mean": rng.standard_normal(4).astype(f),
        "var": rng.uniform(0.5, 1.5, 4).astype(f),
        "m": rng.standard_normal((24, 5)).astype(f),  # 4 channels x 3 x 2 after the pool
        "two": np.array(2.0, f),
        "zero": np.array([0], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("Conv", ["input", "w"], ["c"], pads=[1, 0, 1, 0], strides=[1, 1]),  # asymmetric padding
        node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-3),
        node("LeakyRelu", ["bn"], ["lr"], alpha=0.2),
        node("AveragePool", ["lr"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Sigmoid", ["ap"], ["sg"]),
        node("Tanh", ["ap"], ["th"]),
        node("Sub", ["sg", "th"], ["sub"]),
        node("Constant", [], ["three"], value_float=3.0),
        node("Mul", ["sub", "three"], ["mul"]),
        node("Div", ["mul", "two"], ["div"]),
        node("Identity", ["div"], ["idn"]),
        node("Shape", ["idn"], ["shape"]),
        node("Gather", ["shape", "zero"], ["batch"], axis=0),
        node("Constant", [], ["minus1"], value_ints=[-1]),
        node("Concat", ["batch", "minus1"], ["newshape"], axis=0),
        node("Reshape", ["idn", "newshape"], ["flat"]),
        node("MatMul", ["flat", "m"], ["mm"]),
        node("Unsqueeze", ["mm", "zero"], ["unsq"]),
        node("Softmax", ["mm"], ["probabilities"], axis=1),
        node("GlobalAveragePool", ["lr"], ["gap"]),
    ]
    outputs = [vector("probabilities", 5), helper.make_tensor_value_info("gap", TensorProto.FLOAT, ["N", 4, 1, 1])]
    return make_model(nodes, [image("input", 2, 6)], outputs, w)


def test_the_other_operators_match_onnxruntime() -> None:
    model = _every_other_op_model()
    used = {n.op_type for n in model.graph.node}
    assert REQUIRED_OPS - used <= {"Relu", "Clip", "MaxPool", "Gemm", "Add", "Flatten"}  # covered by the CNNs
    x = np.random.default_rng(2).standard_normal((3, 2, 6, 6)).astype(np.float32)
    _assert_matches_onnxruntime(model, x)


def test_an_unsupported_operator_is_refused_by_name() -> None:
    model = make_model(
        [helper.make_node("Relu", ["input"], ["r"]), helper.make_node("Einsum", ["r"], ["out"], equation="nchw->nc")],
        [image("input", 1, 4)],
        [vector("out", 1)],
        {},
    )
    with pytest.raises(TranslationError) as info:
        to_torch(model)
    message = info.value.message
    assert "Einsum" in message and "\n" not in message


def test_reinitialize_draws_new_layer_weights_of_the_same_shape(digits: TrainedModel) -> None:
    module = to_torch(_front(digits.model, "relu2"))
    before = [p.detach().clone() for p in module.weights]
    reinitialize(module, seed=3)
    after = list(module.weights)
    assert [a.shape for a in after] == [b.shape for b in before]
    roles = [module.roles[i] for i in range(len(after))]
    assert roles == ["weight", "bias", "weight", "bias"]
    for role, b, a in zip(roles, before, after, strict=True):
        assert not torch.equal(a, b)
        if role == "bias":
            assert float(a.detach().abs().sum()) == 0.0
