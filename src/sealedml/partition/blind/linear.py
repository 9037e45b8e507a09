"""The linear layers blinded offload outsources: found in ONNX, quantized, applied exactly.

A layer is a Conv, Gemm or MatMul node whose weight (and bias) are constants.
Its weights are quantized per output channel to signed ``weight_bits`` integers;
its input is quantized per sample to signed ``input_bits`` integers at run time
(dynamic quantization: no calibration data, and the scale never leaves the TEE).
The output is ``(W_q · x_q) · s_x · s_w + bias`` in float32 — the *quantized
model* whose outputs blinded offload reproduces exactly.

:func:`apply_linear` computes ``W · x`` in float64 with numpy (im2col and BLAS for
convolutions): exact whenever the bounds of :mod:`.field` hold. The TEE uses it
to precompute unblinding factors and the CPU executor to answer requests.
:func:`executor_artifact` writes the layer as a one-node ONNX model with float64
integer weights: what the untrusted executor loads, named by its SHA-256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from sealedml.partition.blind.field import PRIME, check_layer_bounds
from sealedml.partition.graph import PartitionError

__all__ = [
    "LINEAR_OPS",
    "LinearLayer",
    "apply_linear",
    "dequantize",
    "executor_artifact",
    "find_linear_layers",
    "layer_from_artifact",
    "quantize_input",
]

#: ONNX operators outsourced when their weight is a constant.
LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LinearLayer:
    """One outsourced layer.

    ``weight`` holds the quantized integers (float64): ``[M, C/group, kh, kw]`` for a
    convolution, ``[K, N]`` for Gemm and MatMul (``y = x @ weight``).
    """

    index: int
    op: Literal["conv", "matmul"]
    input: str
    output: str
    weight: np.ndarray
    weight_scale: np.ndarray  # per output channel, float64
    bias: np.ndarray | None  # per output channel, float32
    input_bits: int
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    group: int = 1

    @property
    def channel_axis(self) -> int:
        """The output's channel axis (1 for NCHW convolutions, the last for products)."""
        return 1 if self.op == "conv" else -1

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0] if self.op == "conv" else self.weight.shape[1])

    @property
    def input_max(self) -> int:
        return int(2 ** (self.input_bits - 1) - 1)

    def l1_max(self) -> int:
        """The largest sum of absolute weights feeding one output."""
        w = np.abs(self.weight)
        rows = w.reshape(w.shape[0], -1).sum(axis=1) if self.op == "conv" else w.sum(axis=0)
        return int(rows.max()) if rows.size else 0


def _conv(x: np.ndarray, w: np.ndarray, layer: LinearLayer) -> np.ndarray:
    n, c, _, _ = x.shape
    m, cg, kh, kw = w.shape
    g = layer.group
    top, left, bottom, right = layer.pads
    (sh, sw), (dh, dw) = layer.strides, layer.dilations
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(padded, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # n, c, oh, ow, kh, kw
    oh, ow = windows.shape[2], windows.shape[3]
    if g == 1:
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
        out = cols @ w.reshape(m, -1).T  # BLAS: exact for integers below 2^53
        return np.ascontiguousarray(out.reshape(n, oh, ow, m).transpose(0, 3, 1, 2))
    grouped = windows.reshape(n, g, cg, oh, ow, kh, kw)
    out = np.einsum("ngchwij,gmcij->ngmhw", grouped, w.reshape(g, m // g, cg, kh, kw), optimize=True)
    result: np.ndarray = out.reshape(n, m, oh, ow)
    return result


def apply_linear(layer: LinearLayer, x: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """``weight · x`` (default: the layer's quantized weight) in float64, without bias or scales."""
    w = layer.weight if weight is None else weight
    x = np.asarray(x, dtype=np.float64)
    if layer.op == "conv":
        return _conv(x, w, layer)
    product: np.ndarray = np.matmul(x, w)
    return product


def quantize_input(layer: LinearLayer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed integers (int64) and the per-sample scale (float64, shape ``[N]``) of a float input."""
    x = np.asarray(x, dtype=np.float64)
    flat = np.abs(x.reshape(x.shape[0], -1))
    peak = flat.max(axis=1) if flat.shape[1] else np.zeros(x.shape[0])
    scale = np.where(peak > 0, peak / layer.input_max, 1.0)
    shaped = scale.reshape((-1,) + (1,) * (x.ndim - 1))
    q = np.clip(np.rint(x / shaped), -layer.input_max, layer.input_max).astype(np.int64)
    return q, scale


def dequantize(layer: LinearLayer, product: np.ndarray, input_scale: np.ndarray) -> np.ndarray:
    """float32 output of the layer from the exact integer product ``W_q · x_q``."""
    out = product.astype(np.float64)
    out *= input_scale.reshape((-1,) + (1,) * (out.ndim - 1))
    channel = [1] * out.ndim
    channel[layer.channel_axis] = -1
    out *= layer.weight_scale.reshape(channel)
    if layer.bias is not None:
        out += layer.bias.astype(np.float64).reshape(channel)
    return out.astype(np.float32)


def _quantize_weight(w: np.ndarray, axis: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    top = 2 ** (bits - 1) - 1
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    peak = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scale = np.where(peak > 0, peak / top, 1.0)
    q = np.rint(moved / scale.reshape((-1,) + (1,) * (moved.ndim - 1)))
    return np.ascontiguousarray(np.moveaxis(q, 0, axis)), scale


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _layer(
    index: int, node: onnx.NodeProto, consts: dict[str, np.ndarray], weight_bits: int, input_bits: int
) -> LinearLayer | str:
    """The node as a layer, or why it cannot be outsourced."""
    if len(node.input) < 2 or node.input[1] not in consts:
        return "its weight is not a constant"
    weight = consts[node.input[1]]
    bias: np.ndarray | None = None
    if node.op_type == "Conv":
        if weight.ndim != 4:
            return "only 2-D convolutions are outsourced"
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            return "auto_pad SAME_* is not supported (export with explicit pads)"
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                return "its bias is not a constant"
            bias = consts[node.input[2]].astype(np.float32)
        q, scale = _quantize_weight(weight, 0, weight_bits)
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
        return LinearLayer(
            index,
            "conv",
            node.input[0],
            node.output[0],
            q,
            scale,
            bias,
            input_bits,
            strides=tuple(_attr(node, "strides", [1, 1])),  # type: ignore[arg-type]
            pads=(pads[0], pads[1], pads[2], pads[3]),
            dilations=tuple(_attr(node, "dilations", [1, 1])),  # type: ignore[arg-type]
            group=int(_attr(node, "group", 1)),  # type: ignore[call-overload]
        )
    if weight.ndim != 2:
        return "only 2-D weight matrices are outsourced"
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return "Gemm with transA is not supported"
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))  # type: ignore[arg-type]
        weight = (weight.T if _attr(node, "transB", 0) else weight) * alpha
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts or consts[node.input[2]].size != weight.shape[1]:
                return "its bias is not a constant vector"
            bias = (consts[node.input[2]].reshape(-1) * beta).astype(np.float32)
    q, scale = _quantize_weight(weight, 1, weight_bits)
    return LinearLayer(index, "matmul", node.input[0], node.output[0], q, scale, bias, input_bits)


def find_linear_layers(model: onnx.ModelProto, *, weight_bits: int = 8, input_bits: int = 8) -> list[LinearLayer]:
    """Every Conv, Gemm and MatMul of ``model``, quantized, in graph order.

    Raises:
        PartitionError: a linear node that cannot be outsourced exactly (the message names
            it and says why), bits outside 2–16, or a model without linear layers.
    """
    for name, bits in (("--weight-bits", weight_bits), ("--input-bits", input_bits)):
        if not 2 <= bits <= 16:
            raise PartitionError(f"{name} must be between 2 and 16")
    consts = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    layers: list[LinearLayer] = []
    for node in model.graph.node:
        if node.op_type not in LINEAR_OPS:
            continue
        made = _layer(len(layers), node, consts, weight_bits, input_bits)
        if isinstance(made, str):
            raise PartitionError(f"cannot outsource {node.op_type} {node.output[0]!r}: {made}")
        why = check_layer_bounds(made.l1_max(), made.input_max)
        if why is not None:
            raise PartitionError(f"cannot outsource {node.op_type} {node.output[0]!r} exactly: {why}")
        layers.append(made)
    if not layers:
        raise PartitionError("the middle has no Conv, Gemm or MatMul layer to outsource")
    return layers


def executor_artifact(layer: LinearLayer) -> bytes:
    """The layer as the executor runs it: one node, float64 integer weights, no bias (ONNX bytes)."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, None)
    y = helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, None)
    weight = numpy_helper.from_array(layer.weight.astype(np.float64), "w")
    if layer.op == "conv":
        node = helper.make_node(
            "Conv",
            ["x", "w"],
            ["y"],
            strides=list(layer.strides),
            pads=list(layer.pads[:2]) + list(layer.pads[2:]),
            dilations=list(layer.dilations),
            group=layer.group,
        )
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], f"sealedml_linear_{layer.index}", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sealedml")
    model.doc_string = f"blinded offload layer {layer.index}: W·x over Z_{PRIME} (float64 exact)"
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def artifact_sha256(layer: LinearLayer) -> str:
    """SHA-256 (hex) of :func:`executor_artifact`."""
    return hashlib.sha256(executor_artifact(layer)).hexdigest()


def layer_from_artifact(data: bytes) -> LinearLayer:
    """The layer an executor artifact describes (weights and shape attributes; no scales or bias).

    Raises:
        PartitionError: not an artifact of :func:`executor_artifact`.
    """
    try:
        model = onnx.ModelProto.FromString(data)
        (node,) = model.graph.node
        (init,) = model.graph.initializer
        weight = numpy_helper.to_array(init).astype(np.float64)
    except Exception as exc:
        raise PartitionError("not a blinded-offload layer") from exc
    if node.op_type == "Conv" and weight.ndim == 4:
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
        return LinearLayer(
            0,
            "conv",
            "x",
            "y",
            weight,
            np.ones(weight.shape[0]),
            None,
            16,
            strides=tuple(_attr(node, "strides", [1, 1])),  # type: ignore[arg-type]
            pads=(pads[0], pads[1], pads[2], pads[3]),
            dilations=tuple(_attr(node, "dilations", [1, 1])),  # type: ignore[arg-type]
            group=int(_attr(node, "group", 1)),  # type: ignore[call-overload]
        )
    if node.op_type == "MatMul" and weight.ndim == 2:
        return LinearLayer(0, "matmul", "x", "y", weight, np.ones(weight.shape[1]), None, 16)
    raise PartitionError("not a blinded-offload layer")
