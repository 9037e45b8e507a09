"""Victim models trained with torch at call time, on data that ships inside installed packages.

The random-weight CNNs of :mod:`sealedml.zoo` are right for exactness and timing, but leakage
measured on random weights means nothing; these two small CNNs are trained for real:

* :func:`digits_cnn` — 10 digit classes on scikit-learn's ``load_digits`` (1,797 images of 8x8,
  scaled to [0, 1]);
* :func:`faces_cnn` — face vs non-face on scikit-image's ``data.lfw_subset()`` (200 images of
  25x25: the first 100 are faces, the last 100 are not), the privacy-sensitive case.

Each comes with three disjoint, stratified splits: ``train`` (the victim trained on it),
``aux`` (the attacker's own data, as in He et al.'s threat model) and ``test`` (the inputs whose
leakage is measured). Nothing is downloaded. Training is seeded and takes a few seconds on two
cores; the result is cached per process and seed. torch is imported only when a model is built,
so the rest of the zoo works without it (``pip install 'sealedml[assess]'``).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from sealedml.errors import ConfigurationError

__all__ = ["NAMES", "TrainedModel", "digits_cnn", "faces_cnn", "load", "require_torch"]

#: The trained models' zoo names.
NAMES: tuple[str, ...] = ("digits-cnn", "faces-cnn")

_OPSET = 17
_BATCH = 64
# (victim-train, attacker-aux, test) fractions of each data set.
_SPLIT = (0.5, 0.25, 0.25)


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained victim CNN, its ONNX form and its three disjoint splits (arrays are read-only).

    Attributes:
        name: the zoo name (``digits-cnn`` or ``faces-cnn``).
        model: ONNX model, input ``input`` float32 ``[N, 1, H, W]`` in [0, 1], output
            ``probabilities`` float32 ``[N, classes]`` (a Softmax over the tensor ``logits``).
        x_train: the victim's training images, float32 ``[n, 1, H, W]``.
        y_train: their labels, int64.
        x_aux: the attacker's auxiliary images (disjoint from train and test).
        y_aux: their labels.
        x_test: test images, whose leakage is assessed.
        y_test: their labels.
        test_accuracy: the ONNX model's accuracy on the test split.
    """

    name: str
    model: onnx.ModelProto
    x_train: np.ndarray
    y_train: np.ndarray
    x_aux: np.ndarray
    y_aux: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_accuracy: float


def require_torch() -> Any:
    """The ``torch`` module.

    Raises:
        ConfigurationError: torch is not installed.
    """
    try:
        import torch
    except ImportError as exc:
        raise ConfigurationError("this needs torch and scikit-image: pip install 'sealedml[assess]'") from exc
    return torch


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def _split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/aux/test indices: every class is cut in the :data:`_SPLIT` proportions."""
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        first = round(len(members) * _SPLIT[0])
        second = first + round(len(members) * _SPLIT[1])
        for part, chunk in zip(parts, (members[:first], members[first:second], members[second:]), strict=True):
            part.extend(int(i) for i in chunk)
    return tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)  # type: ignore[return-value]


def _rename(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Give torch's generated tensor names (``/conv1/Conv_output_0``) the layer names users type in ``--cuts``."""
    mapping: dict[str, str] = {}
    outputs = {o.name for o in model.graph.output}  # the graph's own names (``probabilities``) stay
    for node in model.graph.node:
        layer = node.name.strip("/").split("/")[0]
        if layer in names and len(node.output) == 1:
            node.name = names[layer]
            if node.output[0] not in outputs:
                mapping[node.output[0]] = names[layer]
    for node in model.graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for value in model.graph.value_info:
        value.name = mapping.get(value.name, value.name)


def _export_torchscript(torch: Any, net: Any, shape: tuple[int, ...], buffer: io.BytesIO) -> None:
    torch.onnx.export(
        net,
        (torch.zeros((1, *shape)),),
        buffer,
        dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript
        opset_version=_OPSET,
        input_names=["input"],
        output_names=["probabilities"],
        dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}},
    )


def _export(torch: Any, net: Any, shape: tuple[int, ...], name: str, doc: str) -> onnx.ModelProto:
    buffer = io.BytesIO()
    net.eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and chosen on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_torchscript(torch, net, shape, buffer)
    model = onnx.load_from_string(buffer.getvalue())
    # Layer names as the Sequential's children; the last Linear's output is the logits.
    children = [child for child, _ in net.named_children()]
    _rename(model, {child: ("logits" if child == children[-2] else child) for child in children})
    model.producer_name = "sealedml.zoo"
    model.graph.name = name.replace("-", "_")
    model.doc_string = doc
    onnx.checker.check_model(model)
    return model


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {"input": x})
    return float(np.mean(np.argmax(probabilities, axis=1) == y))


def _train(
    name: str,
    build: Callable[[Any], Any],
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    steps: int,
    flip: bool,
    doc: str,
) -> TrainedModel:
    torch = require_torch()
    train, aux, test = _split(y, seed)
    torch.manual_seed(seed)
    net = build(torch.nn)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    xs, ys = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    net.train()
    for _ in range(steps):
        batch = torch.randint(0, len(train), (_BATCH,), generator=generator)
        inputs = xs[batch]
        if flip:  # faces are mirror-symmetric: mirroring half the batch doubles a tiny training set
            mirror = torch.rand(_BATCH, generator=generator) < 0.5
            inputs = torch.where(mirror[:, None, None, None], inputs.flip(-1), inputs)
        logits = net[:-1](inputs)  # the Softmax is for export; train on the logits
        loss = torch.nn.functional.cross_entropy(logits, ys[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model = _export(torch, net, x.shape[1:], name, doc)
    return TrainedModel(
        name=name,
        model=model,
        x_train=_read_only(x[train]),
        y_train=_read_only(y[train]),
        x_aux=_read_only(x[aux]),
        y_aux=_read_only(y[aux]),
        x_test=_read_only(x[test]),
        y_test=_read_only(y[test]),
        test_accuracy=_accuracy(model, x[test], y[test]),
    )


def _fresh(cached: TrainedModel) -> TrainedModel:
    model = onnx.ModelProto()
    model.CopyFrom(cached.model)
    return TrainedModel(**{**cached.__dict__, "model": model})


@functools.lru_cache(maxsize=4)
def _digits(seed: int) -> TrainedModel:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (np.asarray(data.images, dtype=np.float32) / 16.0)[:, None]
    y = np.asarray(data.target, dtype=np.int64)

    def build(nn: Any) -> Any:
        from collections import OrderedDict

        # 3 conv + 2 FC, as in the research brief's probe: 8x8 -> 4x4 -> 2x2 -> 256 -> 64 -> 10.
        return nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, 16, 3, padding=1)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(32, 64, 3, padding=1)),
                    ("relu3", nn.ReLU()),
                    ("pool3", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(256, 64)),
                    ("relu4", nn.ReLU()),
                    ("fc2", nn.Linear(64, 10)),
                    ("softmax", nn.Softmax(dim=1)),
                ]
            )
        )

    doc = "digits-cnn: 3 conv + 2 FC on scikit-learn load_digits (8x8, [0, 1]), trained with torch"
    return _train("digits-cnn", build, x, y, seed=seed, steps=600, flip=False, doc=doc)


@functools.lru_cache(maxsize=4)
def _faces(seed: int) -> TrainedModel:
    from skimage import data

    lfw_subset: Any = data.lfw_subset  # untyped
    x = np.asarray(lfw_subset(), dtype=np.float32)[:, None]
    y = np.repeat(np.asarray([1, 0], dtype=np.int64), 100)  # first 100 faces (class 1), then non-faces

    def build(nn: Any) -> Any:
        from collections import OrderedDict

        # 25x25 -> 12x12 -> 6x6 -> 3x3 -> 288 -> 32 -> 2.
        return nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, 8, 3, padding=1)),
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv2", nn.Conv2d(8, 16, 3, padding=1)),
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(16, 32, 3, padding=1)),
                    ("relu3", nn.ReLU()),
                    ("pool3", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(288, 32)),
                    ("relu4", nn.ReLU()),
                    ("fc2", nn.Linear(32, 2)),
                    ("softmax", nn.Softmax(dim=1)),
                ]
            )
        )

    doc = "faces-cnn: face vs non-face on scikit-image lfw_subset (25x25, [0, 1]), trained with torch"
    return _train("faces-cnn", build, x, y, seed=seed, steps=400, flip=True, doc=doc)


def digits_cnn(seed: int = 0) -> TrainedModel:
    """The digits CNN (3 conv + 2 FC, test accuracy about 0.97), trained on the first call per seed.

    Args:
        seed: seed of the split and of training; the same seed gives the same model and splits.

    Returns:
        A :class:`TrainedModel` (a fresh copy of the ONNX model; the arrays are shared, read-only)
        with splits of 898 / 450 / 449 images.

    Raises:
        ConfigurationError: torch is not installed.
    """
    return _fresh(_digits(seed))


def faces_cnn(seed: int = 0) -> TrainedModel:
    """The face vs non-face CNN (3 conv + 2 FC) on ``lfw_subset``, trained on the first call per seed.

    Args:
        seed: seed of the split and of training.

    Returns:
        A :class:`TrainedModel` with splits of 100 / 50 / 50 images (half faces each).

    Raises:
        ConfigurationError: torch or scikit-image is not installed.
    """
    try:
        import skimage  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError("this needs torch and scikit-image: pip install 'sealedml[assess]'") from exc
    return _fresh(_faces(seed))


def load(name: str, seed: int = 0) -> TrainedModel:
    """The trained model called ``name`` (one of :data:`NAMES`).

    Raises:
        ConfigurationError: an unknown name, or torch (or scikit-image) is missing.
    """
    builders = {"digits-cnn": digits_cnn, "faces-cnn": faces_cnn}
    if name not in builders:
        raise ConfigurationError(f"no trained zoo model {name!r}; valid names: {', '.join(NAMES)}")
    return builders[name](seed)
