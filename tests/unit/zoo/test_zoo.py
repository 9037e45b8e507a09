"""Tests of :mod:`sealedml.zoo`: shapes, dtypes, determinism, sizes and numerics."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from sealedml import zoo
from sealedml.errors import ConfigurationError

DIGITS_SAMPLES = 1797
CNN_INPUT_SHAPE: list[int | str] = ["N", 3, 224, 224]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _param_count(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _io(values: Iterable[onnx.ValueInfoProto]) -> list[tuple[str, int, list[int | str]]]:
    return [(v.name, v.type.tensor_type.elem_type, _shape(v)) for v in values]


@pytest.fixture(scope="module")
def mobilenet() -> onnx.ModelProto:
    return zoo.mobilenetv2()


@pytest.fixture(scope="module")
def resnet() -> onnx.ModelProto:
    return zoo.resnet50()


@pytest.fixture(params=["mobilenetv2", "resnet50"])
def cnn(request: pytest.FixtureRequest) -> onnx.ModelProto:
    model: onnx.ModelProto = request.getfixturevalue({"mobilenetv2": "mobilenet", "resnet50": "resnet"}[request.param])
    return model


# -- digits --------------------------------------------------------------------


def test_digits_accuracy_and_onnx_matches_sklearn() -> None:
    dm = zoo.digits()
    accuracy = zoo.digits_plaintext_accuracy(dm)
    assert accuracy >= 0.93

    labels, probabilities = _session(dm.model).run(None, {"input": dm.x_test})
    np.testing.assert_array_equal(labels, dm.estimator.predict(dm.x_test))
    assert accuracy == pytest.approx(float(np.mean(labels == dm.y_test)))
    np.testing.assert_allclose(probabilities, dm.estimator.predict_proba(dm.x_test), rtol=0, atol=1e-4)


def test_digits_data_split() -> None:
    dm = zoo.digits()
    assert dm.x_train.dtype == np.float32 and dm.x_test.dtype == np.float32
    assert dm.y_train.dtype == np.int64 and dm.y_test.dtype == np.int64
    assert dm.x_train.shape[1] == dm.x_test.shape[1] == 64
    assert len(dm.x_train) == len(dm.y_train) and len(dm.x_test) == len(dm.y_test)
    assert len(dm.x_train) + len(dm.x_test) == DIGITS_SAMPLES
    assert len(dm.x_test) == math.ceil(0.25 * DIGITS_SAMPLES)
    # Stratified: every class is in the test set, with about a quarter of its samples.
    test_counts = np.bincount(dm.y_test, minlength=10)
    train_counts = np.bincount(dm.y_train, minlength=10)
    assert np.all(np.abs(test_counts / (test_counts + train_counts) - 0.25) < 0.01)
    assert dm.x_test.min() == 0.0 and dm.x_test.max() == 16.0


def test_digits_model_io() -> None:
    model = zoo.digits().model
    onnx.checker.check_model(model)
    assert _io(model.graph.input) == [("input", TensorProto.FLOAT, ["N", 64])]
    assert _io(model.graph.output) == [
        ("label", TensorProto.INT64, ["N"]),
        ("probabilities", TensorProto.FLOAT, ["N", 10]),
    ]
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == 17
    assert len(opsets) == len(model.opset_import)  # one entry per domain
    # Plain tensors (no ZipMap), batch dimension dynamic.
    dm = zoo.digits()
    for batch in (1, 7):
        labels, probabilities = _session(model).run(None, {"input": dm.x_test[:batch]})
        assert labels.dtype == np.int64 and labels.shape == (batch,)
        assert probabilities.dtype == np.float32 and probabilities.shape == (batch, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))


def test_digits_is_cached_but_model_is_a_private_copy() -> None:
    first, second = zoo.digits(), zoo.digits()
    assert first.estimator is second.estimator
    assert first.x_test is second.x_test
    assert not first.x_test.flags.writeable
    assert first.model is not second.model
    first.model.doc_string = "mutated by a caller"
    assert zoo.digits().model.doc_string != "mutated by a caller"
    assert second.model.SerializeToString() == zoo.get("digits").SerializeToString()


# -- CNNs ----------------------------------------------------------------------


def test_cnn_interface_and_graph_hygiene(cnn: onnx.ModelProto) -> None:
    assert _io(cnn.graph.input) == [("input", TensorProto.FLOAT, CNN_INPUT_SHAPE)]
    assert _io(cnn.graph.output) == [("logits", TensorProto.FLOAT, ["N", 1000])]
    assert [(o.domain, o.version) for o in cnn.opset_import] == [("", 17)]
    node_names = [n.name for n in cnn.graph.node]
    init_names = [t.name for t in cnn.graph.initializer]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    assert len(set(init_names)) == len(init_names)
    assert all(t.data_type == TensorProto.FLOAT for t in cnn.graph.initializer)
    assert "BatchNormalization" not in {n.op_type for n in cnn.graph.node}
    # Every convolution carries a (folded batch-norm) bias.
    for node in cnn.graph.node:
        if node.op_type == "Conv":
            assert len(node.input) == 3 and node.input[2] == f"{node.name}.bias"


def test_mobilenetv2_structure(mobilenet: onnx.ModelProto) -> None:
    ops = [n.op_type for n in mobilenet.graph.node]
    assert set(ops) == {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    # stem + 2 convs in the t=1 block + 3 in each of the 16 others + final 1x1
    assert ops.count("Conv") == 1 + 2 + 16 * 3 + 1
    assert ops.count("Add") == 10  # identity shortcuts: blocks with stride 1 and same width
    groups = [next(a.i for a in n.attribute if a.name == "group") for n in mobilenet.graph.node if n.op_type == "Conv"]
    assert sum(g > 1 for g in groups) == 17  # one depthwise conv per inverted residual
    weights = {t.name: tuple(t.dims) for t in mobilenet.graph.initializer}
    assert weights["features.0.weight"] == (32, 3, 3, 3)
    assert weights["features.18.weight"] == (1280, 320, 1, 1)
    assert weights["classifier.1.weight"] == (1000, 1280)


def test_resnet50_structure(resnet: onnx.ModelProto) -> None:
    ops = [n.op_type for n in resnet.graph.node]
    assert set(ops) == {
        "Conv", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Gemm",
    }  # fmt: skip
    assert ops.count("Conv") == 1 + 16 * 3 + 4  # stem, bottlenecks, projection shortcuts
    assert ops.count("Add") == 16
    nodes = {n.name: n for n in resnet.graph.node}
    # v1.5: the stride of a downsampling block sits on the 3x3 convolution.
    strides = {
        name: next(a.ints for a in nodes[name].attribute if a.name == "strides")
        for name in ("layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0")
    }
    assert strides == {
        "layer2.0.conv1": [1, 1],
        "layer2.0.conv2": [2, 2],
        "layer2.0.downsample.0": [2, 2],
    }
    weights = {t.name: tuple(t.dims) for t in resnet.graph.initializer}
    assert weights["conv1.weight"] == (64, 3, 7, 7)
    assert weights["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert weights["fc.weight"] == (1000, 2048)


@pytest.mark.parametrize(("fixture", "expected"), [("mobilenet", 3.50e6), ("resnet", 25.56e6)])
def test_cnn_parameter_count(request: pytest.FixtureRequest, fixture: str, expected: float) -> None:
    count = _param_count(request.getfixturevalue(fixture))
    assert abs(count - expected) / expected < 0.05, count


def test_cnn_runs_in_onnxruntime(cnn: onnx.ModelProto) -> None:
    session = _session(cnn)
    rng = np.random.default_rng(123)
    images = rng.standard_normal((2, 3, 224, 224), dtype=np.float32)

    (single,) = session.run(["logits"], {"input": images[:1]})
    (pair,) = session.run(["logits"], {"input": images})
    assert single.shape == (1, 1000) and pair.shape == (2, 1000)
    assert single.dtype == pair.dtype == np.float32
    assert np.all(np.isfinite(pair))
    # Batching does not change a sample's result.
    np.testing.assert_allclose(single[0], pair[0], rtol=1e-4, atol=1e-4)
    # Logits have a sane spread (no explosion, no collapse) ...
    assert 1e-3 < float(pair.std()) < 1e3
    assert float(np.ptp(pair[0])) > 1e-2
    # ... and depend on the input.
    assert float(np.mean(np.abs(pair[0] - pair[1]))) > 1e-3 * float(pair.std())


def test_mobilenetv2_deterministic(mobilenet: onnx.ModelProto) -> None:
    data = mobilenet.SerializeToString()
    assert zoo.mobilenetv2(0).SerializeToString() == data
    other = zoo.mobilenetv2(1)
    assert other.SerializeToString() != data
    # A different seed changes the weights, not the architecture.
    assert [n.name for n in other.graph.node] == [n.name for n in mobilenet.graph.node]
    first = {t.name: numpy_helper.to_array(t) for t in mobilenet.graph.initializer}
    second = {t.name: numpy_helper.to_array(t) for t in other.graph.initializer}
    assert not np.array_equal(first["features.0.weight"], second["features.0.weight"])


def test_resnet50_deterministic(resnet: onnx.ModelProto) -> None:
    assert zoo.resnet50(0).SerializeToString() == resnet.SerializeToString()


@pytest.mark.slow
def test_vgg16_size() -> None:
    model = zoo.vgg16()
    assert _param_count(model) == 138_357_544
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert [n.name for n in gemms] == ["classifier.0", "classifier.3", "classifier.6"]
    weights = {t.name: t for t in model.graph.initializer}
    first = weights[gemms[0].input[1]]
    assert math.prod(first.dims) == 25088 * 4096
    assert len(first.raw_data) == 25088 * 4096 * 4
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 13
    assert sum(n.op_type == "MaxPool" for n in model.graph.node) == 5
    assert _io(model.graph.output) == [("logits", TensorProto.FLOAT, ["N", 1000])]
    assert model.ByteSize() < 2**31


# -- toy -----------------------------------------------------------------------


def test_toy_computes_affine_map_and_increment() -> None:
    model = zoo.toy_multi_io(seed=5)
    assert _io(model.graph.input) == [
        ("x", TensorProto.FLOAT, ["N", 4]),
        ("idx", TensorProto.INT64, ["N"]),
    ]
    assert _io(model.graph.output) == [
        ("y", TensorProto.FLOAT, ["N", 3]),
        ("idx_plus_one", TensorProto.INT64, ["N"]),
    ]
    params = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight, bias = params["linear.weight"], params["linear.bias"]
    assert weight.shape == (4, 3) and bias.shape == (3,)

    session = _session(model)
    rng = np.random.default_rng(7)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 4), dtype=np.float32)
        idx = rng.integers(-(2**40), 2**40, size=batch, dtype=np.int64)
        y, idx_plus_one = session.run(["y", "idx_plus_one"], {"x": x, "idx": idx})
        assert y.dtype == np.float32 and y.shape == (batch, 3)
        assert idx_plus_one.dtype == np.int64
        np.testing.assert_array_equal(idx_plus_one, idx + 1)
        expected = x.astype(np.float64) @ weight.astype(np.float64) + bias
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_toy_deterministic() -> None:
    data = zoo.toy_multi_io(0).SerializeToString()
    assert zoo.toy_multi_io(0).SerializeToString() == data
    assert zoo.toy_multi_io(1).SerializeToString() != data


# -- registry ------------------------------------------------------------------


def test_get_builds_each_fast_model_by_name() -> None:
    assert zoo.NAMES == (
        "digits",
        "digits-mlp",
        "digits-small-cnn",
        "mobilenetv2",
        "resnet50",
        "minilm",
        "vgg16",
        "toy",
    )
    builders: dict[str, Callable[[int], onnx.ModelProto]] = {
        "toy": zoo.toy_multi_io,
        "mobilenetv2": zoo.mobilenetv2,
    }
    for name, builder in builders.items():
        assert zoo.get(name, seed=3).SerializeToString() == builder(3).SerializeToString()
    assert [o.name for o in zoo.get("digits").graph.output] == ["label", "probabilities"]
    assert [i.name for i in zoo.get("digits-small-cnn").graph.input] == ["input"]
    assert zoo.get("digits-mlp").SerializeToString() == zoo.get("digits-mlp", seed=5).SerializeToString()


def test_get_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigurationError) as info:
        zoo.get("nope")
    message = str(info.value)
    assert "nope" in message
    assert all(name in message for name in zoo.NAMES)


def test_public_api_is_explicit() -> None:
    assert set(zoo.__all__) == {
        "NAMES", "DigitsModel", "digits", "digits_plaintext_accuracy", "get",
        "minilm", "mobilenetv2", "resnet50", "sample_inputs", "toy_multi_io", "vgg16",
    }  # fmt: skip
    assert "Attributes:" in (zoo.DigitsModel.__doc__ or "")
    for name in (
        "digits",
        "digits_plaintext_accuracy",
        "get",
        "minilm",
        "mobilenetv2",
        "resnet50",
        "toy_multi_io",
        "vgg16",
    ):
        assert "Returns:" in (getattr(zoo, name).__doc__ or ""), name
