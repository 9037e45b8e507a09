"""Small TensorFlow Lite models built for the tests, without TensorFlow.

The FlatBuffers schema's generated object API ships inside ``ai-edge-litert``: a model is a
``ModelT`` with operator codes, one subgraph of tensors and operators, and buffers holding
the constants; ``Pack`` and a ``TFL3`` file identifier make the ``.tflite`` bytes.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

__all__ = ["reference_mlp", "tflite_mlp"]


def tflite_mlp(weights: list[np.ndarray], biases: list[np.ndarray], *, batch: int = 1) -> bytes:
    """FULLY_CONNECTED layers (ReLU fused after all but the last), then SOFTMAX.

    ``weights[k]`` has shape (out, in), as TFLite's FULLY_CONNECTED stores it. Input
    ``"input"`` of shape (batch, in), output ``"probabilities"``.
    """
    model = schema.ModelT()
    model.version = 3
    model.description = b"sealedml test mlp"
    model.buffers = [schema.BufferT()]  # buffer 0 is the empty one, by convention
    codes = []
    for builtin in (schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.SOFTMAX):
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = builtin
        codes.append(code)
    model.operatorCodes = codes
    graph = schema.SubGraphT()
    graph.tensors, graph.operators = [], []

    def tensor(name: str, shape: tuple[int, ...], data: np.ndarray | None = None) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), list(shape), schema.TensorType.FLOAT32, 0
        if data is not None:
            buffer = schema.BufferT()
            buffer.data = np.ascontiguousarray(data, dtype=np.float32).tobytes()
            model.buffers.append(buffer)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def operator(code: int, inputs: list[int], outputs: list[int], kind: int, options: object) -> None:
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, inputs, outputs
        op.builtinOptionsType, op.builtinOptions = kind, options
        graph.operators.append(op)

    x = tensor("input", (batch, weights[0].shape[1]))
    graph.inputs = [x]
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        w_index, b_index = tensor(f"w{k}", w.shape, w), tensor(f"b{k}", b.shape, b)
        y = tensor(f"h{k}", (batch, w.shape[0]))
        options = schema.FullyConnectedOptionsT()
        last = k == len(weights) - 1
        options.fusedActivationFunction = (
            schema.ActivationFunctionType.NONE if last else schema.ActivationFunctionType.RELU
        )
        operator(0, [x, w_index, b_index], [y], schema.BuiltinOptions.FullyConnectedOptions, options)
        x = y
    out = tensor("probabilities", (batch, weights[-1].shape[0]))
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    operator(1, [x], [out], schema.BuiltinOptions.SoftmaxOptions, softmax)
    graph.outputs = [out]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def reference_mlp(weights: list[np.ndarray], biases: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same computation in NumPy (float64)."""
    h = x.astype(np.float64)
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = h @ w.T.astype(np.float64) + b
        if k < len(weights) - 1:
            h = np.maximum(h, 0)
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
