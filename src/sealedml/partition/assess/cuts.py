"""Which cuts an assessment looks at, and the two nets each cut makes: the front and the rest.

``--cuts auto`` keeps the count small: the single-tensor cuts of
:func:`~sealedml.partition.graph.candidate_cuts` that end a layer (after an activation, a pooling
or a flatten node, :data:`LAYER_ENDS`), plus the model's last cut (the tensor its final node reads,
usually the logits), so the back-cut rule sees where the label becomes readable. A Flatten or
Reshape right after a kept cut is dropped: it carries the same values. Explicit cuts are
comma-separated, a multi-tensor cut joins its tensors with ``+`` (``a+b``); each is validated by
:func:`~sealedml.partition.graph.check_cut`. Cuts are assessed front to back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

from sealedml.partition.graph import Cut, GraphIndex, PartitionError, candidate_cuts, check_cut

__all__ = ["LAYER_ENDS", "Slicer", "parse_cuts", "resolve_cuts", "run_onnx"]

#: Operators after which ``auto`` proposes a cut: a layer's end.
LAYER_ENDS: frozenset[str] = frozenset(
    {"Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten"}
)
_SAME_VALUES = frozenset({"Flatten", "Reshape"})


def parse_cuts(text: str) -> list[list[str]] | None:
    """``auto`` → None; ``a,b+c`` → ``[["a"], ["b", "c"]]``.

    Raises:
        PartitionError: an empty list or an empty cut.
    """
    if text.strip() == "auto":
        return None
    cuts = [[t.strip() for t in item.split("+")] for item in text.split(",")]
    if not cuts or any(not all(cut) for cut in cuts):
        raise PartitionError(f"--cuts {text!r}: give auto, or tensor names separated by commas (a+b for a set)")
    return cuts


def resolve_cuts(model: onnx.ModelProto, spec: Sequence[Sequence[str]] | None) -> list[Cut]:
    """The cuts to assess, front to back: ``auto`` (None) or the validated explicit ones.

    Raises:
        PartitionError: a tensor that is not in the model, a cut that does not separate it, the
            model's input or output named as a cut, or (``auto``) no cut at all.
    """
    index = GraphIndex(model)
    if spec is not None:
        cuts = [check_cut(model, list(tensors), index=index) for tensors in spec]
        for cut in cuts:
            crossing = set(cut.tensors) & {*index.inputs, *index.outputs}
            if crossing:
                raise PartitionError(f"cut {cut.name} contains the model's own input or output {sorted(crossing)[0]!r}")
        if len({c.tensors for c in cuts}) != len(cuts):
            raise PartitionError("a cut is listed twice in --cuts")
        return sorted(cuts, key=lambda c: c.position)
    every = candidate_cuts(model, max_tensors=1)
    if not every:
        raise PartitionError("the model has no single-tensor cut: name multi-tensor cuts with --cuts a+b")
    kept: list[Cut] = []
    for cut in every:
        if cut.after_op not in LAYER_ENDS and cut is not every[-1]:
            continue
        node = index.nodes[cut.position]
        if kept and cut.after_op in _SAME_VALUES and list(node.input[:1]) == list(kept[-1].tensors):
            continue
        kept.append(cut)
    return kept


class Slicer:
    """Extracts the front (inputs → cut) and the rest (cut → outputs) of one model, shapes inferred once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._inferred = shape_inference.infer_shapes(model)
        self._extractor = onnx.utils.Extractor(self._inferred)
        index = GraphIndex(model)
        self.inputs, self.outputs = list(index.inputs), list(index.outputs)
        known = {v.name: v for v in [*self._inferred.graph.value_info, *self._inferred.graph.output]}
        self._shapes = {
            name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for name, v in known.items()
        }

    def front(self, cut: Cut) -> onnx.ModelProto:
        """The model from its inputs to the cut's tensors."""
        return self._extractor.extract_model(self.inputs, list(cut.tensors))

    def rest(self, cut: Cut) -> onnx.ModelProto:
        """The model from the cut's tensors to its outputs (the middle and back together)."""
        return self._extractor.extract_model(list(cut.tensors), self.outputs)

    def shape(self, tensor: str) -> list[int | None] | None:
        """The inferred shape of ``tensor`` (None when unknown)."""
        return self._shapes.get(tensor)


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, chunk: int = 512) -> list[np.ndarray]:
    """Run ``model`` in ONNX Runtime (CPU) on batch-first ``feeds``, ``chunk`` samples at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session: Any = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    total = len(next(iter(feeds.values())))
    pieces: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, total, chunk):
        batch = {k: v[start : start + chunk] for k, v in feeds.items()}
        for i, out in enumerate(session.run(names, batch)):
            pieces[i].append(np.asarray(out))
    return [np.concatenate(p) for p in pieces]
