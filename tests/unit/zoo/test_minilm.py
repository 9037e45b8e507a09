"""The MiniLM-sized encoder of the zoo: its shape, its attention mask, and a reference computation."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sealedml import zoo
from sealedml.errors import ConfigurationError
from sealedml.zoo.minilm import (
    HEADS,
    HIDDEN,
    LAYERS,
    MINILM,
    SEQUENCE,
    VOCAB,
    MiniLMConfig,
    minilm,
    sample_inputs,
)


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


def test_a_smaller_config_builds_the_same_graph_at_its_own_sizes() -> None:
    small = MiniLMConfig(layers=2, hidden=32, heads=4, ffn=64, sequence=8, vocab=100, positions=16)
    model = minilm(5, small)
    onnx.checker.check_model(model)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert shapes["embeddings.word"] == (100, 32) and shapes["layer1.ffn.up.weight"] == (32, 64)
    assert "layer2.ffn.up.weight" not in shapes
    assert minilm(5, small).SerializeToString() == model.SerializeToString()
    feeds = sample_inputs(3, seed=2, config=small, kept=5)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden, pooled = session.run(None, feeds)
    assert hidden.shape == (3, 8, 32) and pooled.shape == (3, 32)
    np.testing.assert_allclose(pooled, hidden[:, :5].mean(axis=1), atol=1e-5)


def test_the_default_config_is_minilm() -> None:
    assert (MINILM.layers, MINILM.hidden, MINILM.heads, MINILM.sequence, MINILM.vocab) == (
        LAYERS,
        HIDDEN,
        HEADS,
        SEQUENCE,
        VOCAB,
    )
    assert MINILM.head == 32


@pytest.mark.parametrize(
    "sizes",
    [{"hidden": 30, "heads": 4}, {"layers": 0}, {"sequence": 64, "positions": 32}],
)
def test_inconsistent_sizes_are_refused(sizes: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        MiniLMConfig(**sizes)


def test_sample_inputs_are_tokens_of_the_vocabulary_with_padding() -> None:
    feeds = sample_inputs(2, seed=4)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.shape == mask.shape == (2, SEQUENCE) and ids.dtype == mask.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < VOCAB
    assert (mask[:, :96] == 1).all() and (mask[:, 96:] == 0).all()  # three quarters kept, then padding
    np.testing.assert_array_equal(zoo.sample_inputs("minilm", batch=2, seed=4)["input_ids"], ids)
    assert not np.array_equal(sample_inputs(2, seed=5)["input_ids"], ids)


def test_zoo_sample_inputs_fit_each_model() -> None:
    assert zoo.sample_inputs("resnet50")["input"].shape == (1, 3, 224, 224)
    toy = zoo.sample_inputs("toy", batch=3)
    assert toy["x"].shape == (3, 4) and toy["idx"].dtype == np.int64
    with pytest.raises(ConfigurationError):
        zoo.sample_inputs("digits")
    with pytest.raises(ConfigurationError):
        zoo.sample_inputs("minilm", batch=0)
