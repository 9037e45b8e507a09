"""A small ReLU network on scikit-learn's digits: the model SECO mode serves in its tests.

``digits-mlp``: 64 pixels (0..16) → ×1/16 → 32 ReLU units → 10 logits, trained with
scikit-learn's ``MLPClassifier`` (no torch) on the same split as :func:`sealedml.zoo.digits`
(stratified, 25 % test, seed 0). The ONNX graph is written directly: Mul, Gemm, Relu, Gemm,
Softmax, every parameter an initializer.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from sealedml.zoo._builder import OPSET
from sealedml.zoo.digits import DigitsModel, digits

__all__ = ["digits_mlp"]

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
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    model.producer_name = "sealedml.zoo"
    model.doc_string = "digits-mlp: 64-32-10 ReLU MLP (scikit-learn MLPClassifier on load_digits)"
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
