"""Shared graph-building code for the synthetic CNNs of :mod:`sealedml.zoo`.

:class:`GraphBuilder` writes nodes and initializers straight into one
:class:`onnx.ModelProto` (no intermediate copies: VGG-16 carries ~553 MB of
weights) and draws every weight from a single :func:`numpy.random.default_rng`
stream in call order, so the same seed and the same sequence of builder calls
give a byte-identical serialized model.

Batch normalization is assumed folded into the preceding convolution, so every
convolution carries a bias. Weights use He-style scaling
(``std = gain / sqrt(fan_in)``); biases are small.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = [
    "BIAS_STD",
    "IMAGE_SIZE",
    "IR_VERSION",
    "NUM_CLASSES",
    "OPSET",
    "RELU_GAIN",
    "GraphBuilder",
    "count_parameters",
]

#: ai.onnx opset of every zoo model.
OPSET = 17
#: IR version matching opset 17 (ONNX 1.12), readable by any recent runtime.
IR_VERSION = 8
#: Side of the square RGB input of the CNNs.
IMAGE_SIZE = 224
#: Number of ImageNet classes of the CNN heads.
NUM_CLASSES = 1000
#: He gain for a layer followed by a ReLU-like activation.
RELU_GAIN = math.sqrt(2.0)
#: Standard deviation of the (folded batch-norm) biases.
BIAS_STD = 0.01

_PRODUCER = "sealedml.zoo"


def count_parameters(model: onnx.ModelProto) -> int:
    """Return the number of scalar parameters stored in ``model``'s initializers.

    Args:
        model: any ONNX model.

    Returns:
        The sum over initializers of the product of their dimensions.
    """
    return sum(math.prod(t.dims) for t in model.graph.initializer)


class GraphBuilder:
    """Incrementally build an image classifier graph with seeded random weights.

    Every layer method takes the name of its input tensor and returns the name
    of its output tensor; layer names are used as node names, as output tensor
    names, and as the prefix of initializer names (``<name>.weight``,
    ``<name>.bias``), so they must be unique.

    Args:
        graph_name: name of the ONNX graph.
        seed: seed of the weight generator.
        doc: documentation string stored on the model.
    """

    def __init__(self, graph_name: str, seed: int, doc: str = "") -> None:
        self._rng = np.random.default_rng(seed)
        self._model = onnx.ModelProto()
        self._model.ir_version = IR_VERSION
        self._model.producer_name = _PRODUCER
        self._model.doc_string = doc
        opset = self._model.opset_import.add()
        opset.domain = ""
        opset.version = OPSET
        self._graph = self._model.graph
        self._graph.name = graph_name
        self._names: set[str] = set()
        self._built = False

    # -- inputs, weights -------------------------------------------------------

    def image_input(self, name: str = "input", channels: int = 3) -> str:
        """Declare the float32 image input ``[N, channels, 224, 224]``.

        Args:
            name: input tensor name.
            channels: number of image channels.

        Returns:
            The input tensor name.
        """
        self._graph.input.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, IMAGE_SIZE, IMAGE_SIZE])
        )
        return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate name in graph: {name!r}")
        self._names.add(name)
        return name

    def _initializer(self, name: str, values: np.ndarray) -> str:
        tensor = self._graph.initializer.add()
        tensor.name = self._claim(name)
        tensor.data_type = TensorProto.FLOAT
        tensor.dims.extend(values.shape)
        tensor.raw_data = np.ascontiguousarray(values, dtype="<f4").tobytes()
        return name

    def _normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        values = self._rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        return values

    def _weight_and_bias(self, name: str, shape: tuple[int, ...], fan_in: int, gain: float) -> tuple[str, str]:
        weight = self._initializer(f"{name}.weight", self._normal(shape, gain / math.sqrt(fan_in)))
        bias = self._initializer(f"{name}.bias", self._normal((shape[0],), BIAS_STD))
        return weight, bias

    def _node(self, op: str, inputs: list[str], name: str, output: str | None = None, **attrs: Any) -> str:
        self._claim(name)
        if output is None:
            output = name
        else:
            self._claim(output)
        self._graph.node.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    # -- layers ----------------------------------------------------------------

    def conv(
        self,
        x: str,
        name: str,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        group: int = 1,
        gain: float = RELU_GAIN,
    ) -> str:
        """Add a square ``Conv`` with bias (batch-norm folded) and "same"-style padding.

        Args:
            x: input tensor name.
            name: layer name (node and initializer prefix).
            in_ch: input channels.
            out_ch: output channels.
            kernel: kernel side (padding is ``kernel // 2``).
            stride: stride on both axes.
            group: number of groups (``in_ch`` for a depthwise convolution).
            gain: He gain of the weights; ``RELU_GAIN`` before a ReLU, smaller
                for linear or residual-branch outputs.

        Returns:
            The output tensor name.
        """
        if in_ch % group or out_ch % group:
            raise ValueError(f"{name}: channels {in_ch}->{out_ch} not divisible by {group}")
        fan_in = in_ch // group * kernel * kernel
        weight, bias = self._weight_and_bias(name, (out_ch, in_ch // group, kernel, kernel), fan_in, gain)
        pad = kernel // 2
        return self._node(
            "Conv",
            [x, weight, bias],
            name,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
            group=group,
        )

    def gemm(
        self,
        x: str,
        name: str,
        in_features: int,
        out_features: int,
        gain: float,
        output: str | None = None,
    ) -> str:
        """Add a fully connected layer ``Gemm(x, W, b, transB=1)`` with ``W`` of shape (out, in).

        Args:
            x: input tensor name, shape ``[N, in_features]``.
            name: layer name (node and initializer prefix).
            in_features: input width.
            out_features: output width.
            gain: He gain of the weights.
            output: output tensor name if it differs from ``name`` (e.g. ``"logits"``).

        Returns:
            The output tensor name.
        """
        weight, bias = self._weight_and_bias(name, (out_features, in_features), in_features, gain)
        return self._node("Gemm", [x, weight, bias], name, output=output, transB=1)

    def relu(self, x: str, name: str) -> str:
        """Add a ``Relu``.

        Args:
            x: input tensor name.
            name: node name.

        Returns:
            The output tensor name.
        """
        return self._node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        """Add ``Clip(x, 0, 6)`` (ReLU6); the bounds are shared initializers.

        Args:
            x: input tensor name.
            name: node name.

        Returns:
            The output tensor name.
        """
        if "relu6.min" not in self._names:
            self._initializer("relu6.min", np.array(0.0, dtype=np.float32))
            self._initializer("relu6.max", np.array(6.0, dtype=np.float32))
        return self._node("Clip", [x, "relu6.min", "relu6.max"], name)

    def add(self, a: str, b: str, name: str) -> str:
        """Add an element-wise ``Add`` (residual connection).

        Args:
            a: first input tensor name.
            b: second input tensor name.
            name: node name.

        Returns:
            The output tensor name.
        """
        return self._node("Add", [a, b], name)

    def max_pool(self, x: str, name: str, kernel: int, stride: int, pad: int = 0) -> str:
        """Add a square ``MaxPool``.

        Args:
            x: input tensor name.
            name: node name.
            kernel: window side.
            stride: stride on both axes.
            pad: padding on every side.

        Returns:
            The output tensor name.
        """
        return self._node(
            "MaxPool",
            [x],
            name,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
        )

    def global_avg_pool(self, x: str, name: str) -> str:
        """Add a ``GlobalAveragePool``.

        Args:
            x: input tensor name.
            name: node name.

        Returns:
            The output tensor name.
        """
        return self._node("GlobalAveragePool", [x], name)

    def flatten(self, x: str, name: str) -> str:
        """Add ``Flatten(axis=1)``.

        Args:
            x: input tensor name.
            name: node name.

        Returns:
            The output tensor name.
        """
        return self._node("Flatten", [x], name, axis=1)

    # -- finish ----------------------------------------------------------------

    def build(self, logits: str, classes: int = NUM_CLASSES) -> onnx.ModelProto:
        """Declare ``logits`` as the float32 graph output ``[N, classes]``, check and return.

        Args:
            logits: name of the tensor holding the logits (the graph output name).
            classes: number of classes.

        Returns:
            The finished model, validated by :func:`onnx.checker.check_model`.
        """
        if self._built:
            raise RuntimeError("GraphBuilder.build() called twice")
        self._built = True
        self._graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes]))
        onnx.checker.check_model(self._model)
        return self._model
