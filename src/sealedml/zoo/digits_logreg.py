"""A real, small classifier: logistic regression on scikit-learn's bundled digits.

The data set (1,797 8x8 grey-scale images, 10 classes) ships with
scikit-learn, so nothing is downloaded. The model is a
``StandardScaler`` + ``LogisticRegression`` pipeline trained on raw pixel
intensities (0..16) and written as an ONNX graph directly (MatMul/Add/Softmax/
ArgMax with the parameters as initializers); the scaler is part of the graph,
so clients send raw pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sealedml._internal.extras import require
from sealedml.zoo._builder import OPSET

# Serving never trains a model: scikit-learn is an extra (`sealedml[demo]`), said in one line if missing.
require("sklearn", "demo", "the digits models (trained with scikit-learn)")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

__all__ = ["DigitsModel", "digits", "digits_plaintext_accuracy"]

#: Number of features (8x8 pixels) of one digit image.
_FEATURES = 64
_TEST_SIZE = 0.25
_SPLIT_SEED = 0
_MAX_ITER = 1000


@dataclass(frozen=True, eq=False)
class DigitsModel:
    """A trained digits classifier, its ONNX form and its train/test split.

    The arrays are read-only (they are shared by every caller of :func:`digits`).

    Attributes:
        model: ONNX model with input ``input`` float32 ``[N, 64]`` and outputs
            ``label`` int64 ``[N]`` and ``probabilities`` float32 ``[N, 10]``.
        x_train: training images, float32 ``(n_train, 64)``, raw pixel values 0..16.
        y_train: training labels, int64 ``(n_train,)``.
        x_test: test images, float32 ``(n_test, 64)``, raw pixel values 0..16.
        y_test: test labels, int64 ``(n_test,)``.
        estimator: the fitted scikit-learn pipeline the ONNX model was converted
            from (shared; do not refit it).
    """

    model: onnx.ModelProto
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    estimator: Pipeline = field(repr=False)


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def _convert(estimator: Pipeline) -> onnx.ModelProto:
    """Build the ONNX graph directly from the fitted pipeline.

    ``(x - mean) / scale`` (the scaler), ``@ coef.T + intercept`` (the logits),
    then ``Softmax`` (probabilities) and ``ArgMax`` (the label: the classes are
    0..9). Every parameter is an initializer rather than a node attribute (as
    skl2onnx's ML operators would make them), so sealed copies keep their
    weights in the per-tensor layout and memory-bounded execution streams them.
    """
    scaler: StandardScaler = estimator.named_steps["scaler"]
    classifier: LogisticRegression = estimator.named_steps["classifier"]
    if list(classifier.classes_) != list(range(len(classifier.classes_))):
        raise ValueError("digits classes must be 0..9 for ArgMax to be the label")
    inits = [
        numpy_helper.from_array(np.asarray(scaler.mean_, np.float32), "scaler.mean"),
        numpy_helper.from_array(np.asarray(scaler.scale_, np.float32), "scaler.scale"),
        numpy_helper.from_array(np.ascontiguousarray(classifier.coef_.T, np.float32), "classifier.weight"),
        numpy_helper.from_array(np.asarray(classifier.intercept_, np.float32), "classifier.bias"),
    ]
    nodes = [
        helper.make_node("Sub", ["input", "scaler.mean"], ["centered"], name="scaler.sub"),
        helper.make_node("Div", ["centered", "scaler.scale"], ["scaled"], name="scaler.div"),
        helper.make_node("MatMul", ["scaled", "classifier.weight"], ["matmul"], name="classifier.matmul"),
        helper.make_node("Add", ["matmul", "classifier.bias"], ["logits"], name="classifier.add"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    classes = len(classifier.classes_)
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", _FEATURES])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    model.producer_name = "sealedml.zoo"
    model.doc_string = "digits: StandardScaler + LogisticRegression (scikit-learn load_digits)"
    onnx.checker.check_model(model)
    return model


@functools.lru_cache(maxsize=1)
def _train() -> DigitsModel:
    data = load_digits()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_TEST_SIZE, random_state=_SPLIT_SEED, stratify=y
    )
    estimator = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("classifier", LogisticRegression(max_iter=_MAX_ITER)),
        ]
    )
    estimator.fit(x_train, y_train)
    return DigitsModel(
        model=_convert(estimator),
        x_train=_read_only(x_train),
        y_train=_read_only(y_train),
        x_test=_read_only(x_test),
        y_test=_read_only(y_test),
        estimator=estimator,
    )


def digits() -> DigitsModel:
    """Return the digits classifier, training it on the first call of the process.

    Training and conversion run once per process (cached); every call returns
    a fresh copy of the ONNX model, so callers may mutate it (add metadata,
    seal it) without affecting each other. Test accuracy is about 0.97.

    Returns:
        A :class:`DigitsModel` with the ONNX model, the fitted estimator and the
        stratified 75/25 train/test split (``random_state=0``).
    """
    cached = _train()
    model = onnx.ModelProto()
    model.CopyFrom(cached.model)
    return DigitsModel(
        model=model,
        x_train=cached.x_train,
        y_train=cached.y_train,
        x_test=cached.x_test,
        y_test=cached.y_test,
        estimator=cached.estimator,
    )


def digits_plaintext_accuracy(dm: DigitsModel) -> float:
    """Return the accuracy of ``dm.model`` on ``dm.x_test``, run in ONNX Runtime.

    This is the "plaintext" baseline: the model run locally, unsealed, on the CPU.

    Args:
        dm: a model from :func:`digits`.

    Returns:
        The fraction of test images whose predicted ``label`` equals ``dm.y_test``.
    """
    session = ort.InferenceSession(dm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (labels,) = session.run(["label"], {"input": dm.x_test})
    return float(np.mean(np.asarray(labels) == dm.y_test))
