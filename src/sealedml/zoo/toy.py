"""A tiny two-input, two-output model for protocol and envelope tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sealedml.zoo._builder import IR_VERSION, OPSET

__all__ = ["toy_multi_io"]

#: Width of the float input ``x``.
_IN_FEATURES = 4
#: Width of the float output ``y``.
_OUT_FEATURES = 3


def toy_multi_io(seed: int = 0) -> onnx.ModelProto:
    """Build a tiny model with two inputs and two outputs of different dtypes.

    Computes ``y = x @ W + b`` (initializers ``linear.weight`` of shape (4, 3)
    and ``linear.bias`` of shape (3,), both drawn from ``seed``) and
    ``idx_plus_one = idx + 1``. The batch dimension ``N`` is dynamic.

    Args:
        seed: seed of :func:`numpy.random.default_rng` for ``W`` and ``b``; the
            same seed gives a byte-identical ``SerializeToString()``.

    Returns:
        An opset-17 model with inputs ``x`` float32 ``[N, 4]`` and ``idx``
        int64 ``[N]`` and outputs ``y`` float32 ``[N, 3]`` and
        ``idx_plus_one`` int64 ``[N]``.
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((_IN_FEATURES, _OUT_FEATURES), dtype=np.float32)
    bias = rng.standard_normal((_OUT_FEATURES,), dtype=np.float32)
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["x", "linear.weight"], ["linear.matmul"], name="linear.matmul"),
            helper.make_node("Add", ["linear.matmul", "linear.bias"], ["y"], name="linear.add"),
            helper.make_node("Add", ["idx", "one"], ["idx_plus_one"], name="increment"),
        ],
        name="toy_multi_io",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", _IN_FEATURES]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"]),
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", _OUT_FEATURES]),
            helper.make_tensor_value_info("idx_plus_one", TensorProto.INT64, ["N"]),
        ],
        initializer=[
            numpy_helper.from_array(weight, "linear.weight"),
            numpy_helper.from_array(bias, "linear.bias"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        ],
    )
    model = helper.make_model(
        graph,
        producer_name="sealedml.zoo",
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        doc_string="toy multi-input/multi-output model (random weights)",
    )
    onnx.checker.check_model(model)
    return model
