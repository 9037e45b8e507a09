"""Deterministic ONNX models for tests, the demo and the benchmarks (no torch needed).

* :func:`digits` — a real logistic-regression classifier trained on
  scikit-learn's bundled digits data, with its train/test split.
* :func:`mobilenetv2`, :func:`resnet50`, :func:`vgg16` — the ImageNet
  architectures at their real size (3.5 M, 25.5 M and 138 M parameters) with
  seeded random weights and batch norm folded, for latency and size benchmarks.
  Input ``input`` float32 ``[N, 3, 224, 224]``, output ``logits`` float32
  ``[N, 1000]``.
* :func:`toy_multi_io` — a tiny two-input, two-output model for protocol tests.
* ``digits-mlp`` and ``digits-small-cnn`` (:mod:`sealedml.zoo.digits_mlp`) — ReLU networks
  trained with scikit-learn on the digits, the models SECO mode serves; ``seed`` is ignored.
* ``digits-cnn`` and ``faces-cnn`` (:mod:`sealedml.zoo.trained`) — small CNNs trained with torch
  when first asked for, the victims of ``sealedml partition assess``. Only these need torch,
  which is imported lazily (``pip install 'sealedml[assess]'``); :data:`NAMES` lists the others.

:func:`sample_inputs` gives a seeded input batch for the random-weight models (an image
for the CNNs, padded token ids for ``minilm``), as the benchmarks feed them.

Every builder is deterministic: the same ``seed`` gives a byte-identical
``SerializeToString()``. All models use ai.onnx opset 17 and pass
:func:`onnx.checker.check_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from sealedml.errors import ConfigurationError
from sealedml.zoo import trained
from sealedml.zoo.minilm import minilm
from sealedml.zoo.minilm import sample_inputs as _minilm_inputs
from sealedml.zoo.mobilenet import mobilenetv2
from sealedml.zoo.resnet import resnet50
from sealedml.zoo.toy import toy_multi_io
from sealedml.zoo.vgg import vgg16

if TYPE_CHECKING:
    from sealedml.zoo.digits_logreg import DigitsModel


def __getattr__(name: str) -> Any:
    """``DigitsModel``, imported on first use (PEP 562): its module needs scikit-learn (``sealedml[demo]``)."""
    if name == "DigitsModel":
        from sealedml.zoo.digits_logreg import DigitsModel

        return DigitsModel
    raise AttributeError(f"module 'sealedml.zoo' has no attribute {name!r}")


def digits() -> DigitsModel:
    """The trained digits classifier (``zoo/digits_logreg.py``; scikit-learn, ``sealedml[demo]``).

    Returns:
        The model with its train and test splits (cached per process).

    Raises:
        ConfigurationError: scikit-learn is not installed.
    """
    from sealedml.zoo.digits_logreg import digits as build

    return build()


def digits_plaintext_accuracy(dm: DigitsModel) -> float:
    """The digits model's test accuracy in plain ONNX Runtime (see ``zoo/digits_logreg.py``).

    Returns:
        The share of the test split classified correctly.
    """
    from sealedml.zoo.digits_logreg import digits_plaintext_accuracy as accuracy

    return accuracy(dm)


__all__ = [
    "NAMES",
    "DigitsModel",
    "digits",
    "digits_plaintext_accuracy",
    "get",
    "minilm",
    "mobilenetv2",
    "resnet50",
    "sample_inputs",
    "toy_multi_io",
    "vgg16",
]


def _digits_model(seed: int) -> onnx.ModelProto:
    del seed  # the digits model is trained, not drawn at random
    return digits().model  # scikit-learn, on first use


def _trained_model(name: str) -> Callable[[int], onnx.ModelProto]:
    def build(seed: int) -> onnx.ModelProto:
        return trained.load(name, seed).model  # imports torch only now

    return build


def _seco_model(name: str) -> Callable[[int], onnx.ModelProto]:
    def build(seed: int) -> onnx.ModelProto:
        from sealedml.zoo.digits_mlp import digits_mlp, digits_small_cnn  # scikit-learn training on first use

        return (digits_mlp if name == "digits-mlp" else digits_small_cnn)().model

    return build


_BUILDERS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "digits": _digits_model,
    "digits-mlp": _seco_model("digits-mlp"),
    "digits-small-cnn": _seco_model("digits-small-cnn"),
    "mobilenetv2": mobilenetv2,
    "resnet50": resnet50,
    "minilm": minilm,
    "vgg16": vgg16,
    "toy": toy_multi_io,
}

#: Names accepted by :func:`get` that build without torch.
NAMES: tuple[str, ...] = tuple(_BUILDERS)

# The victims of `partition assess`, trained with torch on first use (sealedml.zoo.trained).
_TRAINED: dict[str, Callable[[int], onnx.ModelProto]] = {name: _trained_model(name) for name in trained.NAMES}


def get(name: str, seed: int = 0) -> onnx.ModelProto:
    """Return the zoo model called ``name``.

    Args:
        name: one of :data:`NAMES`: ``"digits"``, ``"mobilenetv2"``,
            ``"resnet50"``, ``"vgg16"`` or ``"toy"``; or a trained CNN,
            ``"digits-cnn"`` or ``"faces-cnn"`` (needs torch).
        seed: weight seed of the random-weight models, training seed of the
            trained CNNs; ignored for ``"digits"``, which is trained deterministically.

    Returns:
        A fresh :class:`onnx.ModelProto` the caller may modify.

    Raises:
        ConfigurationError: ``name`` is not a zoo model, or torch is missing for a trained one.
    """
    try:
        builder = _BUILDERS.get(name) or _TRAINED[name]
    except KeyError:
        valid = ", ".join((*NAMES, *_TRAINED))
        raise ConfigurationError(f"unknown zoo model {name!r}; valid names: {valid}") from None
    return builder(seed)


#: The ImageNet CNNs: input ``input`` float32 ``[N, 3, 224, 224]``.
_IMAGE_MODELS = ("mobilenetv2", "resnet50", "vgg16")


def sample_inputs(name: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded input batch for zoo model ``name``.

    Args:
        name: ``"minilm"``, ``"mobilenetv2"``, ``"resnet50"``, ``"vgg16"`` or ``"toy"``.
        batch: rows.
        seed: input seed.

    Returns:
        Input name → array: standard-normal images for the CNNs; for ``minilm``, token ids
        in the vocabulary and an attention mask keeping the first three quarters of the
        sequence (:func:`sealedml.zoo.minilm.sample_inputs`); for ``toy``, ``x`` and ``idx``.

    Raises:
        ConfigurationError: ``name`` has no sample inputs here, or ``batch`` < 1.
    """
    if batch < 1:
        raise ConfigurationError("batch must be ≥ 1")
    rng = np.random.default_rng(seed)
    if name in _IMAGE_MODELS:
        return {"input": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    if name == "minilm":
        return _minilm_inputs(batch, seed)
    if name == "toy":
        return {"x": rng.standard_normal((batch, 4), dtype=np.float32), "idx": np.arange(batch, dtype=np.int64)}
    raise ConfigurationError(
        f"no sample inputs for zoo model {name!r}; valid: {', '.join((*_IMAGE_MODELS, 'minilm', 'toy'))}"
    )
