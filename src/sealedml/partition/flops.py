"""Floating-point operations of an ONNX graph's nodes, from inferred shapes.

Counts what dominates CNN and MLP inference: a multiply-accumulate is two
operations in ``Conv``, ``ConvTranspose``, ``Gemm`` and ``MatMul``; every other
node counts one operation per output element (activations, pooling, adds).
Good enough to say which share of a model's work a partition keeps in the TEE;
not a cycle-accurate cost model.
"""

from __future__ import annotations

import math

import onnx
from onnx import shape_inference

__all__ = ["node_flops", "shapes_of"]


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """Static shapes of every tensor shape inference can size (batch dimensions taken as 1)."""
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    out: dict[str, tuple[int, ...] | None] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            out[info.name] = None
            continue
        dims: list[int] = []
        for position, dim in enumerate(tensor.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            elif position == 0:
                dims.append(1)  # a symbolic batch dimension: count one sample
            else:
                dims = []
                break
        out[info.name] = tuple(dims) if dims or not tensor.shape.dim else None
    for init in graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _elements(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape else 0


def node_flops(model: onnx.ModelProto) -> list[int]:
    """Operations of each top-level node, in graph order (0 where a shape is unknown)."""
    shapes = shapes_of(model)
    flops: list[int] = []
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            weight = shapes.get(node.input[1])
            # out elements × (input channels per group × kernel area), one MAC each.
            per_output = _elements(weight[1:]) if weight else 0
            flops.append(2 * _elements(out) * per_output)
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            a = shapes.get(node.input[0])
            inner = 0
            if a:
                transposed = node.op_type == "Gemm" and any(
                    attr.name == "transA" and attr.i == 1 for attr in node.attribute
                )
                inner = a[-2] if transposed and len(a) >= 2 else a[-1]
            flops.append(2 * _elements(out) * inner)
        else:
            flops.append(_elements(out))
    return flops
