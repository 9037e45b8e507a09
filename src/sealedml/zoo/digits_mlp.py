"""Small ReLU networks on scikit-learn's digits: the models SECO mode serves.

* ``digits-mlp``: 64 pixels (0..16) → ×1/16 → 32 ReLU units → 10 logits, trained with
  scikit-learn's ``MLPClassifier``;
* ``digits-small-cnn``: 1×8×8 raw pixels → conv 3×3, 8 channels, padding 1 → ReLU → average
  pool 2×2 → 128 features → 10 logits. (No 1/16 input scaling: folded into the filters it
  would leave weights too small for SECO's 8 fractional bits.) The convolution's filters are fixed, seeded random
  (He-scaled) features and only the last layer is trained (a logistic regression, its
  standardization folded into the weights): a real trained CNN with no torch.

Both use the split of :func:`sealedml.zoo.digits` (stratified, 25 % test, seed 0), and their
ONNX graphs are written directly with every parameter an initializer.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sealedml._internal.extras import require
from sealedml.zoo._builder import OPSET
from sealedml.zoo.digits_logreg import DigitsModel, digits

require("sklearn", "demo", "the SECO digits models (trained with scikit-learn)")
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

__all__ = ["digits_mlp", "digits_small_cnn"]

_HIDDEN = 32
_SEED = 0


def _convert(classifier: MLPClassifier) -> onnx.ModelProto:
    (w1, w2), (b1, b2) = classifier.coefs_, classifier.intercepts_
    inits = [
        numpy_helper.from_array(np.array(1 / 16, np.float32), "scale"),
        numpy_helper.from_array(np.ascontiguousarray(w1.T, np.float32), "fc1.weight"),
        numpy_helper.from_array(np.asarray(b1, np.float32), "fc1.bias"),
        numpy_helper.from_array(np.ascontiguousarray(w2.T, np.float32), "fc2.weight"),
        numpy_helper.from_array(np.asarray(b2, np.float32), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Mul", ["input", "scale"], ["scaled"], name="scale"),
        helper.make_node("Gemm", ["scaled", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node("Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    return _finish(nodes, inits, "digits_mlp", [64], "digits-mlp: 64-32-10 ReLU MLP (scikit-learn MLPClassifier)")


def _finish(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str, sample: list[int], doc: str
) -> onnx.ModelProto:
    """The checked model: input ``input`` [N, *sample], output ``probabilities`` [N, 10]."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *sample])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    model.producer_name = "sealedml.zoo"
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model


@functools.lru_cache(maxsize=1)
def _train() -> DigitsModel:
    base = digits()
    classifier = MLPClassifier(hidden_layer_sizes=(_HIDDEN,), max_iter=600, random_state=_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(base.x_train / 16, base.y_train)
    return DigitsModel(
        model=_convert(classifier),
        x_train=base.x_train,
        y_train=base.y_train,
        x_test=base.x_test,
        y_test=base.y_test,
        estimator=classifier,
    )


def digits_mlp() -> DigitsModel:
    """The trained digits MLP and its split (trained on the first call of the process; a fresh ModelProto)."""
    cached = _train()
    model = onnx.ModelProto()
    model.CopyFrom(cached.model)
    return DigitsModel(model, cached.x_train, cached.y_train, cached.x_test, cached.y_test, cached.estimator)


_CHANNELS = 8


def _conv_features(x: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """ReLU(conv 3×3, padding 1) then 2×2 average pooling, in numpy: the training-time features."""
    images = np.pad(x.reshape(-1, 8, 8), ((0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(images, (3, 3), axis=(1, 2))  # n, 8, 8, 3, 3
    maps = np.maximum(0, np.einsum("nhwij,cij->nchw", windows, filters[:, 0]))
    pooled: np.ndarray = maps.reshape(len(x), _CHANNELS, 4, 2, 4, 2).mean(axis=(3, 5))
    return pooled.reshape(len(x), -1)


def _convert_cnn(filters: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(filters.astype(np.float32), "conv.weight"),
        numpy_helper.from_array(weight.astype(np.float32), "fc.weight"),
        numpy_helper.from_array(bias.astype(np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("AveragePool", ["relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    return _finish(
        nodes,
        inits,
        "digits_small_cnn",
        [1, 8, 8],
        "digits-small-cnn: fixed random conv features + logistic regression",
    )


@functools.lru_cache(maxsize=1)
def _train_cnn() -> DigitsModel:
    base = digits()
    rng = np.random.default_rng(_SEED)
    filters = rng.standard_normal((_CHANNELS, 1, 3, 3)) * np.sqrt(2 / 9)
    scaler = StandardScaler().fit(_conv_features(base.x_train, filters))
    classifier = LogisticRegression(max_iter=2000).fit(
        scaler.transform(_conv_features(base.x_train, filters)), base.y_train
    )
    weight = classifier.coef_ / scaler.scale_  # fold (f − mean) / scale into the last layer
    bias = classifier.intercept_ - weight @ scaler.mean_
    x4 = base.x_test.reshape(-1, 1, 8, 8)
    return DigitsModel(
        model=_convert_cnn(filters, weight, bias),
        x_train=base.x_train.reshape(-1, 1, 8, 8),
        y_train=base.y_train,
        x_test=x4,
        y_test=base.y_test,
        estimator=classifier,
    )


def digits_small_cnn() -> DigitsModel:
    """The digits CNN (inputs shaped 1×8×8) and its split; a fresh ModelProto per call."""
    cached = _train_cnn()
    model = onnx.ModelProto()
    model.CopyFrom(cached.model)
    return DigitsModel(model, cached.x_train, cached.y_train, cached.x_test, cached.y_test, cached.estimator)
