"""Run a middle part with its linear layers handed to a callback: the rest stays in ONNX Runtime.

:class:`BlindPlan` cuts the middle's node list (ONNX keeps it topologically
sorted) at every outsourced layer. The runs of other nodes between them become
small ONNX models run by ONNX Runtime in the TEE (activations, pooling,
normalization, additions, reshapes); each linear layer becomes a call to
``linear(layer, x)``, which the blinded engine answers through the executor and
the quantized reference answers locally. Both share this plan, so they differ
only in where ``W_q · x_q`` is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, shape_inference

from sealedml.partition.blind.linear import LINEAR_OPS, LinearLayer, find_linear_layers
from sealedml.partition.graph import PartitionError

__all__ = ["BlindPlan", "LinearFn"]

#: Computes one linear layer's float32 output from its float32 input.
LinearFn = Callable[[LinearLayer, np.ndarray], np.ndarray]


@dataclass
class _Segment:
    session: Any
    inputs: list[str]
    outputs: list[str]


def _session(model: onnx.ModelProto, threads: int) -> Any:
    import onnxruntime as ort

    from sealedml.runtime.engine import ORT_LOG_SEVERITY

    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class BlindPlan:
    """The middle's steps: TEE segments (ONNX Runtime) and outsourced linear layers.

    Args:
        middle: the middle part (weights inline), as sealed.
        weight_bits: bits of the quantized weights.
        input_bits: bits of the quantized layer inputs.
        threads: ONNX Runtime intra-op threads of the segments.

    Raises:
        PartitionError: a linear layer that cannot be outsourced exactly.
    """

    def __init__(self, middle: onnx.ModelProto, *, weight_bits: int = 8, input_bits: int = 8, threads: int = 1):
        self.layers = find_linear_layers(middle, weight_bits=weight_bits, input_bits=input_bits)
        inferred = shape_inference.infer_shapes(middle)
        infos = {v.name: v for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
        consts = {init.name: init for init in middle.graph.initializer}
        self.inputs = [i.name for i in middle.graph.input if i.name not in consts]
        self.outputs = [o.name for o in middle.graph.output]
        by_output = {layer.output: layer for layer in self.layers}
        nodes = list(middle.graph.node)
        # Which tensors are needed after node i (by a later node or as a middle output).
        later: list[set[str]] = [set() for _ in nodes]
        needed = set(self.outputs)
        for i in range(len(nodes) - 1, -1, -1):
            later[i] = set(needed)
            needed |= {t for t in nodes[i].input if t}
        self._steps: list[_Segment | LinearLayer] = []
        run: list[int] = []

        def close_run() -> None:
            if run:
                self._steps.append(
                    self._segment(middle, [nodes[i] for i in run], later[run[-1]], infos, consts, threads)
                )
                run.clear()

        for i, node in enumerate(nodes):
            if node.op_type in LINEAR_OPS:
                close_run()
                self._steps.append(by_output[node.output[0]])
            else:
                run.append(i)
        close_run()

    @staticmethod
    def _segment(
        middle: onnx.ModelProto,
        nodes: list[onnx.NodeProto],
        needed_after: set[str],
        infos: Mapping[str, onnx.ValueInfoProto],
        consts: Mapping[str, onnx.TensorProto],
        threads: int,
    ) -> _Segment:
        produced = {t for n in nodes for t in n.output if t}
        consumed: list[str] = []
        for n in nodes:
            for t in n.input:
                if t and t not in produced and t not in consts and t not in consumed:
                    consumed.append(t)
        outputs = [t for n in nodes for t in n.output if t in needed_after]
        missing = [t for t in (*consumed, *outputs) if t not in infos]
        if missing:
            raise PartitionError(f"no type known for {', '.join(missing)} in the middle")
        used = {t for n in nodes for t in n.input}
        graph = helper.make_graph(
            nodes,
            f"{middle.graph.name}_tee",
            [infos[t] for t in consumed],
            [infos[t] for t in outputs],
            [consts[t] for t in consts if t in used],
        )
        model = helper.make_model(graph, opset_imports=list(middle.opset_import))
        model.ir_version = middle.ir_version
        return _Segment(_session(model, threads), consumed, outputs)

    @property
    def segments(self) -> int:
        """How many TEE segments the middle has."""
        return sum(isinstance(s, _Segment) for s in self._steps)

    def run(self, inputs: Mapping[str, np.ndarray], linear: LinearFn) -> dict[str, np.ndarray]:
        """The middle's outputs: segments here, each linear layer through ``linear``."""
        values: dict[str, np.ndarray] = dict(inputs)
        for step in self._steps:
            if isinstance(step, LinearLayer):
                values[step.output] = linear(step, values[step.input])
            else:
                outs = step.session.run(step.outputs, {t: values[t] for t in step.inputs})
                values.update(zip(step.outputs, outs, strict=True))
        return {t: values[t] for t in self.outputs}
