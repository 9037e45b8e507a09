"""What a blinded partition records: the field, the bits, and each outsourced layer.

``partition split --blind`` adds a :class:`BlindSpec` to ``partition.json`` and
writes one executor artifact per outsourced layer (``linear-<i>.onnx``, the
quantized weights the untrusted executor multiplies by). The sealed middle keeps
everything else, and the TEE re-derives the quantized weights from it: an
artifact whose digest differs from the one recorded here is refused by the
executor, and one that computes anything else fails the Freivalds checks.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnx
from onnx import shape_inference
from pydantic import BaseModel, ConfigDict, Field

from sealedml.partition.blind.field import PRIME
from sealedml.partition.blind.linear import LinearLayer, apply_linear, executor_artifact, find_linear_layers
from sealedml.partition.graph import PartitionError

__all__ = ["BlindLayerSpec", "BlindSpec", "artifact_name", "blind_middle", "sample_shapes"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class BlindLayerSpec(_Frozen):
    """One outsourced layer: its output tensor, operator, executor artifact digest and per-sample shapes."""

    index: int
    node: str
    op: str
    sha256: str
    input_shape: list[int]
    output_shape: list[int]


class BlindSpec(_Frozen):
    """How the middle of a blinded partition is outsourced."""

    prime: int = PRIME
    weight_bits: int = Field(ge=2, le=16)
    input_bits: int = Field(ge=2, le=16)
    layers: list[BlindLayerSpec] = Field(min_length=1)
    #: Operations of the outsourced products (the executor's share of the model).
    outsourced_flops: int = 0

    @property
    def boundary_bytes_per_sample(self) -> int:
        """Bytes that leave and re-enter the TEE per sample: blinded inputs and products, float64."""
        count = sum(math.prod(layer.input_shape) + math.prod(layer.output_shape) for layer in self.layers)
        return 8 * count


def artifact_name(index: int) -> str:
    """The store name of layer ``index``'s executor artifact."""
    return f"linear-{index}.onnx"


def sample_shapes(middle: onnx.ModelProto, layers: list[LinearLayer]) -> list[tuple[int, ...]]:
    """Each layer's input shape for one sample.

    Raises:
        PartitionError: a shape that is not static beyond the batch dimension.
    """
    inferred = shape_inference.infer_shapes(middle)
    infos = {v.name: v for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    shapes = []
    for layer in layers:
        info = infos.get(layer.input)
        dims = list(info.type.tensor_type.shape.dim) if info is not None else []
        if not dims or any(not d.HasField("dim_value") for d in dims[1:]):
            raise PartitionError(f"the input of {layer.output!r} needs a static shape beyond the batch to be blinded")
        shapes.append(tuple(d.dim_value for d in dims[1:]))
    return shapes


def blind_middle(middle: onnx.ModelProto, *, weight_bits: int, input_bits: int) -> tuple[BlindSpec, dict[str, bytes]]:
    """The blind spec of ``middle`` and its executor artifacts (by store name).

    Raises:
        PartitionError: a linear layer that cannot be outsourced exactly, or dynamic shapes.
    """
    layers = find_linear_layers(middle, weight_bits=weight_bits, input_bits=input_bits)
    shapes = sample_shapes(middle, layers)
    specs, artifacts = [], {}
    for layer, shape in zip(layers, shapes, strict=True):
        artifact = executor_artifact(layer)
        out = apply_linear(layer, np.zeros((1, *shape))).shape[1:]
        artifacts[artifact_name(layer.index)] = artifact
        specs.append(
            BlindLayerSpec(
                index=layer.index,
                node=layer.output,
                op=layer.op,
                sha256=hashlib.sha256(artifact).hexdigest(),
                input_shape=list(shape),
                output_shape=[int(d) for d in out],
            )
        )
    return BlindSpec(weight_bits=weight_bits, input_bits=input_bits, layers=specs), artifacts
