"""The MiniLM-sized encoder of the zoo: its shape, its attention mask, and a reference computation."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sealedml import zoo
from sealedml.zoo.minilm import HEADS, HIDDEN, LAYERS, SEQUENCE, VOCAB


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return zoo.get("minilm")


@pytest.fixture(scope="module")
def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs(n: int, kept: int, seed: int = 1) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, VOCAB, (n, SEQUENCE)).astype(np.int64)
    mask = np.zeros((n, SEQUENCE), np.int64)
    mask[:, :kept] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_it_has_the_shape_of_minilm(model: onnx.ModelProto) -> None:
    params = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert 22_000_000 < params < 23_500_000  # all-MiniLM-L6-v2: 22.7 M
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "sentence_embedding"]
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == LAYERS
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == LAYERS * 8  # q, k, v, out, 2 ffn, 2 attention
    assert zoo.get("minilm").SerializeToString() == model.SerializeToString()  # deterministic
    assert zoo.get("minilm", seed=1).SerializeToString() != model.SerializeToString()


def test_masked_tokens_change_nothing_the_kept_ones_compute(session: ort.InferenceSession) -> None:
    inputs = _inputs(2, kept=90)
    hidden, pooled = session.run(None, inputs)
    assert hidden.shape == (2, SEQUENCE, HIDDEN) and pooled.shape == (2, HIDDEN)
    changed = {**inputs, "input_ids": inputs["input_ids"].copy()}
    changed["input_ids"][:, 100:] = 7  # masked positions only
    hidden2, pooled2 = session.run(None, changed)
    np.testing.assert_array_equal(pooled, pooled2)
    np.testing.assert_array_equal(hidden[:, :90], hidden2[:, :90])
    np.testing.assert_allclose(pooled, hidden[:, :90].mean(axis=1), atol=1e-5)  # masked mean pooling


def test_the_first_layer_matches_a_reference_computation(model: onnx.ModelProto) -> None:
    """Embeddings and one encoder layer computed in numpy equal the graph's (the layer's output tensor)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_tensor_value_info("layer0.norm2", onnx.TensorProto.FLOAT, None)])
    inputs = _inputs(1, kept=64, seed=3)
    got = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, inputs)[0]

    def norm(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ weights[f"{name}.weight"] + weights[f"{name}.bias"]

    h = norm(weights["embeddings.word"][inputs["input_ids"]] + weights["embeddings.position"][:SEQUENCE])
    heads = {
        name: linear(h, f"layer0.{name}").reshape(1, SEQUENCE, HEADS, HIDDEN // HEADS).transpose(0, 2, 1, 3)
        for name in ("query", "key", "value")
    }
    scores = heads["query"] @ heads["key"].transpose(0, 1, 3, 2) / math.sqrt(HIDDEN // HEADS)
    scores = scores + (1 - inputs["attention_mask"][:, None, None, :]) * -10000.0
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ heads["value"]).transpose(0, 2, 1, 3).reshape(1, SEQUENCE, HIDDEN)
    h = norm(linear(context, "layer0.output") + h)
    up = linear(h, "layer0.ffn.up")
    gelu = 0.5 * up * (1 + np.vectorize(math.erf)(up / math.sqrt(2)))
    expected = norm(linear(gelu, "layer0.ffn.down") + h)
    np.testing.assert_allclose(got, expected, atol=2e-4)
