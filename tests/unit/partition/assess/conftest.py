"""Shared fixtures: the trained victims (trained once per session, a few seconds each) and tiny hand-made graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sealedml.zoo.trained import TrainedModel, digits_cnn, faces_cnn


@pytest.fixture(scope="session")
def digits() -> TrainedModel:
    return digits_cnn(0)


@pytest.fixture(scope="session")
def faces() -> TrainedModel:
    return faces_cnn(0)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    weights: dict[str, np.ndarray],
    opset: int = 17,
) -> onnx.ModelProto:
    """A checked opset-``opset`` model from nodes, value infos and named initializers."""
    graph = helper.make_graph(
        nodes, "hand", inputs, outputs, [numpy_helper.from_array(v, name=k) for k, v in weights.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def image(name: str, channels: int, side: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, side, side])


def vector(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width])


def residual_model() -> onnx.ModelProto:
    """input [N,1,8,8] → conv a → relu ra → conv b → relu rb → add(ra, rb) → flatten → gemm → softmax.

    ``rb`` alone does not separate the graph (``ra`` bypasses it); ``ra`` and ``sum`` do.
    """
    rng = np.random.default_rng(0)
    w = {
        "wa": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        "wb": rng.standard_normal((2, 2, 3, 3)).astype(np.float32),
        "wf": rng.standard_normal((3, 128)).astype(np.float32) * 0.1,
        "bf": np.zeros(3, np.float32),
    }
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], pads=pads),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["b"], pads=pads),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Add", ["ra", "rb"], ["sum"]),
        helper.make_node("Flatten", ["sum"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return make_model(nodes, [image("input", 1, 8)], [vector("probabilities", 3)], w)
