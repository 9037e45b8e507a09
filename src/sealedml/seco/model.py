"""A model as SECO computes it: affine layers separated by ReLUs, in fixed point mod p.

SECO evaluates linear layers under threshold HE and ReLUs in garbled circuits, so a model
must be a chain ``affine → ReLU → affine → … → affine``. :func:`compile_model` reads an
ONNX graph into that form:

* the graph is cut at its Relu nodes; every segment between two ReLUs must contain only
  operations that are affine in the input (Gemm, MatMul, Conv, AveragePool,
  GlobalAveragePool, BatchNormalization, Add/Sub/Mul with a constant, Flatten, Reshape,
  Identity, Dropout); a trailing Softmax is left to the user, who gets the logits;
* each segment's affine map x ↦ A·x + b is read off by running it (ONNX Runtime) on the
  zero vector and the unit vectors — so a convolution becomes its dense matrix, with no
  hand-written convolution arithmetic — and then checked on random inputs;
* anything else (MaxPool, Sigmoid, a residual connection, …) is refused naming the node.

Fixed point: inputs and weights are scaled by 2^f and rounded (f = 12; SECO's code uses 8), so
a layer's output carries scale 2^(2f) and its bias is scaled to match. The garbled ReLU then
truncates by f bits (⌊ReLU(y) / 2^f⌋, as Delphi does), so every layer's input is back at 2^f
and depth is not limited by the field. With ``truncate=False`` the scale grows by 2^f per
layer instead. :meth:`SecoModel.check_range` refuses a model whose values on calibration
data come within a factor 4 of p/2. Additive weight shares for B and C come from
:meth:`SecoModel.split`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
import onnxruntime as ort
from onnx import shape_inference, utils

from sealedml.errors import InputError
from sealedml.seco.he.packing import uniform_mod

__all__ = ["SECO_FRACTION_BITS", "SECO_PRIME", "AffineLayer", "SecoArchitecture", "SecoModel", "compile_model"]

#: SECO's field: the 41-bit prime of the authors' code (also the BFV plaintext modulus).
SECO_PRIME = 2061584302081
#: Fractional bits of SECO mode's fixed point. SECO's code uses 8; with 8, four of the 450 test
#: digits get another prediction than the float model (digits-mlp), with 12 none do, and values
#: still stay three orders of magnitude below p/2 (the ReLU drops the extra bits: no cost).
SECO_FRACTION_BITS = 12

_AFFINE_OPS = frozenset(
    {
        "Gemm",
        "MatMul",
        "Conv",
        "AveragePool",
        "GlobalAveragePool",
        "BatchNormalization",
        "Add",
        "Sub",
        "Mul",
        "Flatten",
        "Reshape",
        "Identity",
        "Dropout",
    }
)
_WHY_NOT = {
    "MaxPool": "max pooling needs comparisons; SECO mode computes only ReLU outside the linear layers",
    "Sigmoid": "only ReLU is computed by garbled circuits",
    "Tanh": "only ReLU is computed by garbled circuits",
    "Softmax": "a Softmax may only end the graph (the user applies it to the logits)",
}


@dataclass(frozen=True, eq=False)
class AffineLayer:
    """x ↦ weight·x + bias (float64), ``weight`` of shape (out, in)."""

    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class SecoArchitecture:
    """What every party may know of a deployed model: its shapes and number format, no weights.

    The user encodes inputs and decodes outputs with it; the gateway, which holds no
    weights, lays out the HE products with it.
    """

    input_name: str
    input_shape: tuple[int, ...]  # one sample's
    layer_shapes: tuple[tuple[int, int], ...]  # (n_out, n_in) per affine layer
    frac_bits: int = SECO_FRACTION_BITS
    prime: int = SECO_PRIME
    truncate: bool = True  # the ReLU circuit divides by 2^frac_bits
    softmax: bool = False  # the ONNX graph ended with a Softmax, which the user applies to the logits

    def __post_init__(self) -> None:
        if not self.layer_shapes or self.layer_shapes[0][1] != self.n_inputs:
            raise InputError("the first layer must take the whole input")
        for (n_out, _), (_, n_next) in itertools.pairwise(self.layer_shapes):
            if n_out != n_next:
                raise InputError("each layer must take the previous one's outputs")

    def _input_scale_bits(self, k: int) -> int:
        """log2 of layer k's input scale."""
        return self.frac_bits if self.truncate else self.frac_bits * (k + 1)

    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def n_outputs(self) -> int:
        return self.layer_shapes[-1][0]

    @property
    def relu_widths(self) -> list[int]:
        """The width of every ReLU layer (after each affine layer but the last)."""
        return [n_out for n_out, _ in self.layer_shapes[:-1]]

    def encode_input(self, x: np.ndarray) -> np.ndarray:
        """One sample (any shape with n_inputs values) as fixed point mod p."""
        flat = np.asarray(x, dtype=np.float64).reshape(-1)
        if flat.shape != (self.n_inputs,):
            raise InputError(f"expected {self.n_inputs} input values, got {flat.size}")
        if not np.all(np.isfinite(flat)):
            raise InputError("input values must be finite")
        return np.round(flat * (1 << self.frac_bits)).astype(np.int64) % self.prime

    def output_scale(self) -> int:
        return 1 << (self._input_scale_bits(len(self.layer_shapes) - 1) + self.frac_bits)

    def signed(self, values: np.ndarray) -> np.ndarray:
        """Field elements as signed integers in (−p/2, p/2]."""
        v = np.asarray(values, dtype=np.int64) % self.prime
        return np.where(v > self.prime // 2, v - self.prime, v)

    def decode_output(self, values: np.ndarray) -> np.ndarray:
        """Logits (float64) from their field representation."""
        return self.signed(values).astype(np.float64) / self.output_scale()

    def model_output(self, logits: np.ndarray) -> np.ndarray:
        """What the original ONNX model outputs: the logits, or their softmax if it ended with one."""
        if not self.softmax:
            return logits
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return np.asarray(shifted / shifted.sum(axis=-1, keepdims=True))

    def to_json(self) -> dict[str, object]:
        return {
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "layer_shapes": [list(shape) for shape in self.layer_shapes],
            "frac_bits": self.frac_bits,
            "prime": self.prime,
            "truncate": self.truncate,
            "softmax": self.softmax,
        }

    @classmethod
    def from_json(cls, doc: object) -> SecoArchitecture:
        """Raises: InputError — not an architecture document."""
        if not isinstance(doc, dict):
            raise InputError("not a SECO model architecture")
        try:
            return cls(
                input_name=str(doc["input_name"]),
                input_shape=tuple(int(d) for d in doc["input_shape"]),
                layer_shapes=tuple((int(o), int(i)) for o, i in doc["layer_shapes"]),
                frac_bits=int(doc["frac_bits"]),
                prime=int(doc["prime"]),
                truncate=bool(doc["truncate"]),
                softmax=bool(doc.get("softmax", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError("not a SECO model architecture") from exc


@dataclass(frozen=True, eq=False)
class SecoModel:
    """Affine layers with a ReLU after every one but the last."""

    layers: tuple[AffineLayer, ...]
    input_name: str
    input_shape: tuple[int, ...]  # one sample's
    frac_bits: int = SECO_FRACTION_BITS
    prime: int = SECO_PRIME
    truncate: bool = True  # the ReLU circuit divides by 2^frac_bits
    softmax: bool = False  # the graph ended with a Softmax (left to the user)

    @cached_property
    def architecture(self) -> SecoArchitecture:
        """The public part: shapes and number format (built once; the model is frozen)."""
        return SecoArchitecture(
            self.input_name,
            self.input_shape,
            tuple((int(layer.weight.shape[0]), int(layer.weight.shape[1])) for layer in self.layers),
            self.frac_bits,
            self.prime,
            self.truncate,
            self.softmax,
        )

    def _input_scale_bits(self, k: int) -> int:
        return self.architecture._input_scale_bits(k)

    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    def encode_input(self, x: np.ndarray) -> np.ndarray:
        """One sample (any shape with n_inputs values) as fixed point mod p."""
        return self.architecture.encode_input(x)

    def fixed_point(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each layer's (W, b) mod p: W at scale 2^f, b at the layer's output scale."""
        out = []
        for k, layer in enumerate(self.layers):
            scale = 1 << (self._input_scale_bits(k) + self.frac_bits)
            w = np.round(layer.weight * (1 << self.frac_bits)).astype(np.int64) % self.prime
            # Python integers: without truncation the scale outgrows int64 (check_range then refuses).
            b = np.array([round(float(v) * scale) % self.prime for v in layer.bias], dtype=np.int64)
            out.append((w, b))
        return out

    def output_scale(self) -> int:
        return self.architecture.output_scale()

    def signed(self, values: np.ndarray) -> np.ndarray:
        """Field elements as signed integers in (−p/2, p/2]."""
        return self.architecture.signed(values)

    def decode_output(self, values: np.ndarray) -> np.ndarray:
        """Logits (float64) from their field representation."""
        return self.architecture.decode_output(values)

    def reference(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """The exact fixed-point computation the protocol reproduces, in Python integers.

        Returns the output in the field and the largest magnitude any intermediate reached.
        """
        h = [int(v) for v in self.encode_input(x)]
        peak = 0
        for k, (w, b) in enumerate(self.fixed_point()):
            signed_w = self.signed(w)
            signed_h = [v - self.prime if v > self.prime // 2 else v for v in h]
            y = [
                sum(int(a) * c for a, c in zip(row, signed_h, strict=True)) + int(self.signed(bias))
                for row, bias in zip(signed_w, b, strict=True)
            ]
            peak = max(peak, *(abs(v) for v in y))
            if k < len(self.layers) - 1:
                shift = self.frac_bits if self.truncate else 0
                y = [max(0, v) >> shift for v in y]
            h = [v % self.prime for v in y]
        return np.array(h, dtype=np.int64), peak

    def check_range(self, calibration: np.ndarray) -> int:
        """Refuse the model if fixed-point values on ``calibration`` samples near p/2; return the peak.

        Raises:
            InputError: a value within a factor 4 of p/2 (it would wrap around the field).
        """
        peak = max(self.reference(sample)[1] for sample in calibration)
        if peak * 4 > self.prime // 2:
            raise InputError(
                f"fixed-point values reach {peak}, too close to p/2 = {self.prime // 2}: "
                "the weights or activations are too large for the field at this precision"
            )
        return peak

    def split(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Additive shares of every layer's W mod p: (B's, C's), each uniformly random alone."""
        shares_b, shares_c = [], []
        for w, _ in self.fixed_point():
            share = uniform_mod(self.prime, w.size).reshape(w.shape)
            shares_b.append(share)
            shares_c.append((w - share) % self.prime)
        return shares_b, shares_c


def _refuse(node: onnx.NodeProto, why: str) -> InputError:
    return InputError(f"node {node.name or node.output[0]!r} ({node.op_type}): {why}")


def _affine_map(
    model: onnx.ModelProto, start: str, end: str, shape: tuple[int, ...]
) -> tuple[AffineLayer, tuple[int, ...]]:
    """The segment from ``start`` to ``end`` as (A, b), and its output's per-sample shape."""
    n_in = int(np.prod(shape))
    segment = utils.Extractor(shape_inference.infer_shapes(model)).extract_model([start], [end])
    session = ort.InferenceSession(segment.SerializeToString(), providers=["CPUExecutionProvider"])
    basis = np.vstack([np.zeros((1, n_in)), np.eye(n_in)]).astype(np.float32).reshape((n_in + 1, *shape))
    raw = session.run(None, {start: basis})[0]
    out = raw.reshape(n_in + 1, -1).astype(np.float64)
    bias, weight = out[0], (out[1:] - out[0]).T
    probe = np.random.default_rng(0).standard_normal((4, n_in)).astype(np.float32)
    got = session.run(None, {start: probe.reshape((4, *shape))})[0].reshape(4, -1)
    if not np.allclose(got, probe.astype(np.float64) @ weight.T + bias, rtol=1e-3, atol=1e-3):
        raise InputError(f"the layers from {start!r} to {end!r} are not affine in their input")
    return AffineLayer(weight, bias), tuple(int(d) for d in raw.shape[1:])


def compile_model(model: onnx.ModelProto) -> SecoModel:
    """Read ``model`` as affine layers separated by ReLUs (see the module docstring).

    Raises:
        InputError: more than one input, a dynamic sample shape, an operation SECO mode
            cannot compute (naming the node), or a graph that is not a chain.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"SECO mode needs a model with one input, not {len(inputs)}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim][1:]
    if not dims or any(d <= 0 for d in dims):
        raise InputError("SECO mode needs a fixed per-sample input shape")
    nodes = list(graph.node)
    output = graph.output[0].name
    softmax = bool(nodes) and nodes[-1].op_type == "Softmax" and nodes[-1].output[0] == output
    if softmax:
        output = nodes[-1].input[0]  # the user applies the Softmax to the logits
        nodes = nodes[:-1]
    for node in nodes:
        if node.op_type != "Relu" and node.op_type not in _AFFINE_OPS:
            why = _WHY_NOT.get(node.op_type, "not an operation SECO mode can compute")
            raise _refuse(node, why)
    boundaries = [inputs[0].name, *(n.output[0] for n in nodes if n.op_type == "Relu"), output]
    consumers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for node in nodes:
        if node.op_type == "Relu" and consumers.get(node.output[0], 0) > 1:
            raise _refuse(node, "its output feeds several nodes; SECO mode needs a chain of layers")
    layers = []
    shape = tuple(dims)
    relu_inputs = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Relu"}
    for start, stop in itertools.pairwise(boundaries):
        end = relu_inputs.get(stop, stop)
        try:
            layer, shape = _affine_map(model, start, end, shape)
        except InputError:
            raise
        except Exception as exc:  # the extractor or ONNX Runtime: the segment is not self-contained
            raise InputError(f"the layers from {start!r} to {end!r} do not form a chain segment") from exc
        layers.append(layer)
    return SecoModel(tuple(layers), inputs[0].name, tuple(dims), softmax=softmax)
