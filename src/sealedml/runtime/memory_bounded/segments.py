"""What a memory plan is: segments in execution order, and each segment's ONNX model.

:func:`~sealedml.runtime.memory_bounded.planner.plan` makes a :class:`Plan`; the executor
builds one ONNX Runtime session per :class:`Segment` from :meth:`Plan.segment_model`,
whose weights are graph *inputs*, so no plaintext weight stays in a session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from sealedml.errors import ConfigurationError
from sealedml.runtime.memory_bounded.split import Op, TensorInfo, WeightSlice

__all__ = ["Plan", "Segment"]


@dataclass(frozen=True, eq=False)
class Segment:
    """A run of consecutive nodes executed as one ONNX Runtime session.

    Attributes:
        index: position in the plan.
        ops: the nodes, in execution order.
        weights: the weight slices the segment reads (decrypted just before it runs).
        inputs: activations crossing into the segment (produced earlier or graph inputs).
        outputs: activations crossing out (consumed later) and graph outputs it produces.
        release_after: tensors the executor drops once the segment has run.
        held_bytes: activations the executor holds when the segment starts (every
            tensor crossing the cut, including ones that only pass over it).
        weight_bytes: bytes of ``weights``.
        activation_peak_bytes: the largest set of activations alive at any node inside
            (``held_bytes`` included).
        prefetch_bytes: weights of the next segment, decrypted while this one runs
            (0 without prefetch or for the last segment).
    """

    index: int
    ops: tuple[Op, ...]
    weights: tuple[WeightSlice, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release_after: tuple[str, ...]
    held_bytes: int
    weight_bytes: int
    activation_peak_bytes: int
    prefetch_bytes: int

    @property
    def node_names(self) -> tuple[str, ...]:
        """Names of the nodes (split pieces carry a ``#part`` suffix)."""
        return tuple(op.node.name or op.outputs[0] for op in self.ops)

    @property
    def peak_bytes(self) -> int:
        """Weights plus the activation peak: the working set while it computes."""
        return self.weight_bytes + self.activation_peak_bytes

    @property
    def internal_bytes(self) -> int:
        """Activation peak beyond what the executor holds (ONNX Runtime's intermediates, estimated)."""
        return self.activation_peak_bytes - self.held_bytes


@dataclass(frozen=True, eq=False)
class Plan:
    """A memory plan: segments in execution order and what they need.

    Attributes:
        budget_bytes: the budget the plan was made for.
        batch: the batch size activations were sized for (larger batches are refused).
        prefetch: whether the plan leaves room to decrypt the next segment during compute.
        reserve_bytes: budget held back for decryption scratch.
        segments: the segments.
        inputs: graph input names.
        outputs: graph output names.
        infos: type and shape of every activation.
        constants: small inline initializers (not sealed weights) the nodes read.
        splits: original node name → (strategy, pieces) for every split layer.
        estimated: activations whose size could not be inferred (estimated from neighbours).
        opset_imports: the model's opsets.
        ir_version: the model's IR version (segment models use the same).
        functions: model-local functions, copied into every segment model.
        graph_name: the model graph's name.
    """

    budget_bytes: int
    batch: int
    prefetch: bool
    reserve_bytes: int
    segments: tuple[Segment, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    infos: Mapping[str, TensorInfo]
    constants: Mapping[str, TensorProto]
    splits: Mapping[str, tuple[str, int]]
    estimated: tuple[str, ...]
    opset_imports: tuple[onnx.OperatorSetIdProto, ...]
    ir_version: int
    functions: tuple[onnx.FunctionProto, ...] = ()
    graph_name: str = "model"

    @property
    def peak_bytes(self) -> int:
        """The planned peak: max over segments of working set + prefetched weights, plus the reserve."""
        if not self.segments:
            return self.reserve_bytes
        return max(s.peak_bytes + s.prefetch_bytes for s in self.segments) + self.reserve_bytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights decrypted per run (all segments)."""
        return sum(s.weight_bytes for s in self.segments)

    def segment_model(self, index: int) -> onnx.ModelProto:
        """Build the ONNX model of segment ``index``: its weights are graph *inputs*, not initializers.

        Args:
            index: the segment.

        Returns:
            A model whose inputs are the crossing activations followed by the weight slices.

        Raises:
            ConfigurationError: a crossing activation has an unknown element type.
        """
        seg = self.segments[index]
        inputs: list[onnx.ValueInfoProto] = []
        outputs: list[onnx.ValueInfoProto] = []
        for names, target in ((seg.inputs, inputs), (seg.outputs, outputs)):
            for name in names:
                info = self.infos.get(name)
                if info is None or info.elem_type == 0:
                    raise ConfigurationError(f"cannot cut the graph at tensor {name!r}: its type is unknown")
                target.append(info.value_info(name))
        inputs.extend(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)) for w in seg.weights)
        used = {name for op in seg.ops for name in op.inputs}
        initializers = [self.constants[name] for name in sorted(used & set(self.constants))]
        graph = helper.make_graph(
            [op.node for op in seg.ops], f"{self.graph_name}.segment{index}", inputs, outputs, initializers
        )
        model = helper.make_model(graph, opset_imports=list(self.opset_imports), producer_name="sealedml.streaming")
        model.ir_version = self.ir_version
        model.functions.extend(self.functions)
        return model

    def describe(self) -> list[dict[str, object]]:
        """One row per segment (for logs, docs and the benchmark).

        Returns:
            Dicts with index, node count, first and last node, weight, activation,
            prefetch and peak bytes.
        """
        return [
            {
                "segment": s.index,
                "nodes": len(s.ops),
                "first": s.node_names[0],
                "last": s.node_names[-1],
                "weight_bytes": s.weight_bytes,
                "activation_peak_bytes": s.activation_peak_bytes,
                "prefetch_bytes": s.prefetch_bytes,
                "peak_bytes": s.peak_bytes + s.prefetch_bytes + self.reserve_bytes,
            }
            for s in self.segments
        ]
