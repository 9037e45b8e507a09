"""Gu et al.'s KL metric on hand-made graphs whose answer is known."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from sealedml.partition.assess.cuts import run_onnx
from sealedml.partition.assess.gu import channel_images, class_probabilities, gu_metric, kl_divergence

from .conftest import image, make_model, vector

SIDE = 4


def _model(conv_weight: np.ndarray, conv_bias: np.ndarray) -> onnx.ModelProto:
    """input [N,1,4,4] → Conv (1x1, 2 channels) → "ir"; the class head reads the *input* through Identity.

    The head is a fixed non-uniform linear map of the input, so F(x) is known and never uniform;
    "ir" is a side output, the tensor whose channels the metric turns into images.
    """
    rng = np.random.default_rng(0)
    weights = {
        "cw": conv_weight.astype(np.float32),
        "cb": conv_bias.astype(np.float32),
        "hw": (rng.standard_normal((3, SIDE * SIDE)) * 2).astype(np.float32),
        "hb": np.zeros(3, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "cw", "cb"], ["ir"]),
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Gemm", ["flat", "hw", "hb"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return make_model(nodes, [image("input", 1, SIDE)], [vector("probabilities", 3)], weights)


def _inputs(n: int = 6) -> np.ndarray:
    """Images that each span exactly [0, 1], so a min-max rescaled copy of one is the image itself."""
    x = np.random.default_rng(1).uniform(0, 1, (n, 1, SIDE, SIDE)).astype(np.float32)
    flat = x.reshape(n, -1)
    flat[:, 0], flat[:, 1] = 0.0, 1.0
    return x


def test_kl_divergence_known_values() -> None:
    p = np.array([[0.5, 0.25, 0.25]])
    assert kl_divergence(p, p)[0] == pytest.approx(0.0)
    uniform = np.full_like(p, 1 / 3)
    entropy = -float(np.sum(p * np.log(p)))
    assert kl_divergence(p, uniform)[0] == pytest.approx(np.log(3) - entropy)
    assert kl_divergence(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]))[0] == pytest.approx(np.log(2))


def test_logits_become_distributions_and_distributions_stay() -> None:
    probs = np.array([[0.2, 0.8]])
    assert np.allclose(class_probabilities(probs), probs)
    logits = np.array([[0.0, np.log(4.0)]])
    assert np.allclose(class_probabilities(logits), [[0.2, 0.8]])


def test_an_ir_channel_that_copies_the_input_leaks_every_input() -> None:
    """Channel 0 is the input itself: F(IR_0) = F(x), so d_min = 0 < δ for every input."""
    model = _model(np.array([1.0, -1.0]).reshape(2, 1, 1, 1), np.zeros(2))
    x = _inputs()
    ir = _ir(model, x)
    images = channel_images(ir, (1, SIDE, SIDE), (0.0, 1.0))
    assert np.allclose(images[:, 0], x, atol=1e-6)  # the copy, rescaled to [0, 1], is the input
    assert np.allclose(images[:, 1], 1.0 - x, atol=1e-6)  # the negated copy is its negative
    result = gu_metric(model, "input", x, [ir], (0.0, 1.0))
    assert result is not None
    assert result.channels == 2
    assert result.below_delta == 1.0
    assert result.median_ratio == pytest.approx(0.0, abs=1e-5)


def _ir(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("ir", onnx.TensorProto.FLOAT, None))
    return run_onnx(probe, {"input": x})[1]


def test_constant_channels_give_the_divergence_of_a_grey_image() -> None:
    """Both channels constant: each becomes the mid-grey image g, so d_min = KL(F(x) ‖ F(g)) exactly."""
    model = _model(np.zeros((2, 1, 1, 1)), np.array([3.0, -2.0]))
    x = _inputs()
    ir = _ir(model, x)
    result = gu_metric(model, "input", x, [ir], (0.0, 1.0))
    p = class_probabilities(run_onnx(model, {"input": x})[0])
    grey = np.full((1, 1, SIDE, SIDE), 0.5, np.float32)
    q = class_probabilities(run_onnx(model, {"input": grey})[0])
    d = kl_divergence(p, np.repeat(q, len(x), axis=0))
    delta = kl_divergence(p, np.full_like(p, 1 / 3))
    assert result is not None
    assert result.below_delta == pytest.approx(float(np.mean(d < delta)))
    assert result.median_ratio == pytest.approx(float(np.median(d / delta)), rel=1e-5)


def test_undefined_without_spatial_channels() -> None:
    model = _model(np.ones((2, 1, 1, 1)), np.zeros(2))
    x = _inputs()
    assert gu_metric(model, "input", x, [np.zeros((len(x), 64), np.float32)], (0.0, 1.0)) is None
