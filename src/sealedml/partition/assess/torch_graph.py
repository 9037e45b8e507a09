"""A minimal ONNX → ``torch.nn.Module`` translator, so attacks can take gradients through an ONNX front net.

The white-box and query-free attacks need ∂IR/∂input and a trainable copy of the front;
ONNX Runtime gives neither. ``onnx2torch`` would, but it hard-depends on torchvision, which has no
CPU build for the pinned torch (docs/decisions/0007-onnx-to-torch-translator.md). The translator
covers what CNN and MLP front and back nets use: :data:`SUPPORTED_OPS`. Anything else is refused
with :class:`TranslationError` naming the operator, before anything runs.

:func:`to_torch` turns every float initializer into an ``nn.Parameter`` (so a shadow network can be
trained) and every other one into a buffer. :class:`OnnxModule` runs the nodes in graph order;
tensors shaped by ``Shape``/``Gather``/``Unsqueeze``/``Concat`` (as TorchScript exports emit for a
dynamic flatten) are computed as int64 tensors and read back when ``Reshape`` needs a shape.
Outputs equal ONNX Runtime's within 1e-5 (tests/unit/partition/assess/test_torch_graph.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from sealedml.partition.graph import PartitionError

__all__ = ["SUPPORTED_OPS", "OnnxModule", "TranslationError", "reinitialize", "to_torch"]


class TranslationError(PartitionError):
    """An ONNX graph the translator cannot express in torch (an unsupported operator or attribute)."""


Tensor = torch.Tensor
Attrs = dict[str, Any]
OpFunc = Callable[[list[Tensor | None], Attrs, int], Tensor | list[Tensor]]


# ---------------------------------------------------------------------- operators
def _at(x: list[Tensor | None], index: int) -> Tensor:
    """Input ``index`` of a node, which the operator requires."""
    tensor = x[index] if index < len(x) else None
    if tensor is None:
        raise TranslationError(f"a required input (position {index}) is missing")
    return tensor


def _opt(x: list[Tensor | None], index: int) -> Tensor | None:
    return x[index] if index < len(x) else None


def _pads(attrs: Attrs, spatial: int) -> list[int]:
    return list(attrs.get("pads", [0] * (2 * spatial)))  # auto_pad other than NOTSET/VALID is refused up front


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX ``[b1, b2, …, e1, e2, …]`` → torch's ``F.pad`` order (last axis first, begin then end)."""
    half = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(half)):
        out += [pads[axis], pads[axis + half]]
    return out


def _conv(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    data, weight, bias = _at(x, 0), _at(x, 1), _opt(x, 2)
    spatial = weight.dim() - 2
    pads = _pads(a, spatial)
    stride, dilation = a.get("strides", [1] * spatial), a.get("dilations", [1] * spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(spatial)
    if conv is None:
        raise TranslationError(f"Conv with {spatial} spatial axes is not supported")
    if pads[:spatial] == pads[spatial:]:
        return conv(data, weight, bias, stride, pads[:spatial], dilation, a.get("group", 1))
    data = F.pad(data, _torch_pad(pads))  # asymmetric padding: pad first, then convolve without
    return conv(data, weight, bias, stride, 0, dilation, a.get("group", 1))


def _pool(kind: str) -> OpFunc:
    def run(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
        data = _at(x, 0)
        kernel = list(a["kernel_shape"])
        spatial = len(kernel)
        if spatial != 2:
            raise TranslationError(f"{kind} with {spatial} spatial axes is not supported")
        pads = _pads(a, spatial)
        stride, ceil = a.get("strides", [1] * spatial), bool(a.get("ceil_mode", 0))
        if kind == "MaxPool":
            dilation = a.get("dilations", [1] * spatial)
            if pads[:spatial] != pads[spatial:]:
                data = F.pad(data, _torch_pad(pads), value=-math.inf)
                pads = [0] * (2 * spatial)
            return F.max_pool2d(data, kernel, stride, pads[:spatial], dilation, ceil_mode=ceil)
        if pads[:spatial] != pads[spatial:]:
            raise TranslationError("AveragePool with asymmetric pads is not supported")
        include = bool(a.get("count_include_pad", 0))
        return F.avg_pool2d(data, kernel, stride, pads[:spatial], ceil_mode=ceil, count_include_pad=include)

    return run


def _gemm(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    first, second, third = _at(x, 0), _at(x, 1), _opt(x, 2)
    if a.get("transA", 0):
        first = first.t()
    if a.get("transB", 0):
        second = second.t()
    out: Tensor = a.get("alpha", 1.0) * (first @ second)
    if third is not None:
        out = out + a.get("beta", 1.0) * third
    return out


def _clip(x: list[Tensor | None], a: Attrs, opset: int) -> Tensor:
    data = _at(x, 0)
    if opset < 11:  # bounds were attributes before opset 11
        return data.clamp(a.get("min", -math.inf), a.get("max", math.inf))
    return data.clamp(_opt(x, 1), _opt(x, 2))


def _softmax(x: list[Tensor | None], a: Attrs, opset: int) -> Tensor:
    data = _at(x, 0)
    if opset >= 13:
        return torch.softmax(data, dim=a.get("axis", -1))
    axis = a.get("axis", 1)  # before opset 13: coerce to 2-D at axis, softmax over the tail
    flat = data.reshape(int(np.prod(data.shape[:axis])), -1)
    return torch.softmax(flat, dim=1).reshape(data.shape)


def _batch_norm(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    data, scale, bias, mean, var = (_at(x, i) for i in range(5))
    return F.batch_norm(data, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


def _flatten(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    data = _at(x, 0)
    axis = int(a.get("axis", 1))
    axis = axis + data.dim() if axis < 0 else axis
    return data.reshape(int(np.prod(data.shape[:axis])), -1)


def _reshape(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    data, shape = _at(x, 0), _at(x, 1)
    dims = [int(d) for d in shape.tolist()]
    if not a.get("allowzero", 0):  # 0 copies the input's dimension
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


def _axes(x: list[Tensor | None], a: Attrs, opset: int) -> list[int]:
    if opset >= 13:
        axes = _opt(x, 1)
        return [] if axes is None else [int(v) for v in axes.tolist()]
    return list(a.get("axes", []))


def _unsqueeze(x: list[Tensor | None], a: Attrs, opset: int) -> Tensor:
    data = _at(x, 0)
    rank = data.dim() + len(_axes(x, a, opset))
    for axis in sorted(v % rank for v in _axes(x, a, opset)):
        data = data.unsqueeze(axis)
    return data


def _squeeze(x: list[Tensor | None], a: Attrs, opset: int) -> Tensor:
    data = _at(x, 0)
    axes = _axes(x, a, opset)
    if not axes:
        return data.squeeze()
    for axis in sorted((v % data.dim() for v in axes), reverse=True):
        data = data.squeeze(axis)
    return data


def _gather(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    data, indices = _at(x, 0), _at(x, 1)
    axis = a.get("axis", 0) % data.dim()
    flat = indices.reshape(-1).long() % data.shape[axis]  # negative indices count from the end
    picked = data.index_select(axis, flat)
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def _shape(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    data = _at(x, 0)
    dims = list(data.shape)[a.get("start", 0) : a.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _binary(func: Callable[[Tensor, Tensor], Tensor]) -> OpFunc:
    def run(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
        return func(_at(x, 0), _at(x, 1))

    return run


def _unary(func: Callable[[Tensor], Tensor]) -> OpFunc:
    def run(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
        return func(_at(x, 0))

    return run


def _div(a: Tensor, b: Tensor) -> Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


def _concat(x: list[Tensor | None], a: Attrs, _: int) -> Tensor:
    return torch.cat([t for t in x if t is not None], dim=a["axis"])


_OPS: dict[str, OpFunc] = {
    "Conv": _conv,
    "Relu": _unary(torch.relu),
    "LeakyRelu": lambda x, a, _: F.leaky_relu(_at(x, 0), a.get("alpha", 0.01)),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Clip": _clip,
    "MaxPool": _pool("MaxPool"),
    "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": _unary(lambda t: t.mean(dim=tuple(range(2, t.dim())), keepdim=True)),
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": _concat,
    "Identity": _unary(lambda t: t),
    "Dropout": _unary(lambda t: t),  # inference: the identity
    "Softmax": _softmax,
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
}

#: Operators :func:`to_torch` translates (plus ``Constant``, folded at translation time).
SUPPORTED_OPS: frozenset[str] = frozenset({*_OPS, "Constant"})

# Inputs that hold weights a shadow network retrains, by operator and input position.
_WEIGHT_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2, 3, 4)}


# ---------------------------------------------------------------------- the module
def _attributes(node: onnx.NodeProto) -> Attrs:
    attrs: Attrs = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        attrs[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return attrs


def _constant(node: onnx.NodeProto) -> np.ndarray:
    attrs = {a.name: a for a in node.attribute}
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"].t)
    for name, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        for key in (name, f"{name}s"):  # a scalar, or a list
            if key in attrs:
                return np.asarray(helper.get_attribute_value(attrs[key]), dtype=dtype)
    raise TranslationError(f"Constant node {node.name or node.output[0]!r}: unsupported value attribute")


class OnnxModule(torch.nn.Module):
    """An ONNX graph run node by node in torch (built by :func:`to_torch`).

    ``forward`` takes the graph inputs positionally, in graph order, and returns one tensor for a
    one-output graph, else a tuple in graph order. Float initializers are parameters (``weights``),
    the rest buffers; :attr:`roles` says which parameters are layer weights or biases.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
                where = node.name or (node.output[0] if node.output else "?")
                raise TranslationError(
                    f"operator {node.op_type} (node {where!r}) is not supported by the ONNX-to-torch translator "
                    f"(supported: {', '.join(sorted(SUPPORTED_OPS))})"
                )
            if _attributes(node).get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                raise TranslationError(f"{node.op_type} node {node.name!r}: auto_pad SAME_* is not supported")
        initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        self.weights = torch.nn.ParameterList()
        self._slots: dict[str, tuple[str, int]] = {}  # tensor name → ("param" | "buffer", index)
        self.roles: dict[int, str] = {}  # parameter index → "weight" | "bias" | "bn_scale" | …
        buffers: list[Tensor] = []
        roles = _roles(graph)
        for name, array in initializers.items():
            if array.dtype.kind == "f":
                self._slots[name] = ("param", len(self.weights))
                self.roles[len(self.weights)] = roles.get(name, "constant")
                self.weights.append(torch.nn.Parameter(torch.from_numpy(array.astype(np.float32).copy())))
            else:
                self._slots[name] = ("buffer", len(buffers))
                buffers.append(torch.from_numpy(np.array(array)))
        self._nodes: list[tuple[str, list[str], list[str], Attrs]] = []
        for node in graph.node:
            if node.op_type == "Constant":
                array = _constant(node)
                self._slots[node.output[0]] = ("buffer", len(buffers))
                buffers.append(torch.from_numpy(np.array(array)))
                continue
            self._nodes.append((node.op_type, list(node.input), list(node.output), _attributes(node)))
        for index, tensor in enumerate(buffers):
            self.register_buffer(f"const{index}", tensor)

    def _initial(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for name, (kind, index) in self._slots.items():
            values[name] = self.weights[index] if kind == "param" else getattr(self, f"const{index}")
        return values

    def forward(self, *inputs: Tensor) -> Any:
        """Run the graph on ``inputs`` (one per graph input, in order)."""
        if len(inputs) != len(self.input_names):
            raise TranslationError(f"the graph takes {len(self.input_names)} inputs, got {len(inputs)}")
        values = self._initial()
        values.update(zip(self.input_names, inputs, strict=True))
        for op, names, outputs, attrs in self._nodes:
            args = [values[n] if n else None for n in names]
            result = _OPS[op](args, attrs, self.opset)
            for name, tensor in zip(outputs, result if isinstance(result, list) else [result], strict=False):
                if name:
                    values[name] = tensor
        out = [values[n] for n in self.output_names]
        return out[0] if len(out) == 1 else tuple(out)


def _roles(graph: onnx.GraphProto) -> dict[str, str]:
    roles: dict[str, str] = {}
    names = ("weight", "bias")
    bn = ("bn_scale", "bn_bias", "bn_mean", "bn_var")
    for node in graph.node:
        for position in _WEIGHT_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position]:
                kind = bn[position - 1] if node.op_type == "BatchNormalization" else names[position - 1]
                if node.op_type == "Gemm" and position == 1 and _attributes(node).get("transB", 0):
                    kind = "weight_t"  # stored (out, in): fan-in is its second axis
                roles.setdefault(node.input[position], kind)
    return roles


def to_torch(model: onnx.ModelProto) -> OnnxModule:
    """Translate ``model`` into an :class:`OnnxModule` in eval mode.

    Args:
        model: an ONNX model whose nodes are all in :data:`SUPPORTED_OPS` (default domain).

    Returns:
        The module; its float initializers are trainable parameters.

    Raises:
        TranslationError: an unsupported operator, domain or attribute (the message names it).
    """
    return OnnxModule(model).eval()


def reinitialize(module: OnnxModule, seed: int) -> OnnxModule:
    """Draw fresh weights for ``module``'s layers in place (the same architecture, unknown weights).

    Conv, Gemm and MatMul weights get He-uniform values, biases zeros, batch norm the identity;
    other float constants (clip bounds, folded scalars) keep their values.

    Args:
        module: from :func:`to_torch`.
        seed: seed of the draw.

    Returns:
        ``module``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, param in enumerate(module.weights):
            role = module.roles.get(index, "constant")
            if role in ("weight", "weight_t") and param.dim() >= 2:
                # Conv (out, in, k…) and transposed Gemm (out, in): fan-in is one row; MatMul (in, out).
                fan_in = param.shape[0] if role == "weight" and param.dim() == 2 else param[0].numel()
                bound = math.sqrt(6.0 / max(fan_in, 1))
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
            elif role in ("bias", "bn_bias", "bn_mean"):
                param.zero_()
            elif role in ("bn_scale", "bn_var"):
                param.fill_(1.0)
    return module
