"""What a sealed ONNX graph may refer to outside itself: nothing but its own container.

A tensor that keeps an ONNX external-data reference would make ONNX Runtime read that file
from the runtime's disk into the model (see :mod:`sealedml.envelope.model_container`). Only
the top-level initializers a container's manifest lists may refer to external data, and
only to :data:`EXTERNAL_LOCATION`; :func:`check_external_data` refuses anything else.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import onnx
from onnx import TensorProto

from sealedml.errors import SealedModelError

__all__ = ["EXTERNAL_LOCATION", "check_external_data"]

EXTERNAL_LOCATION = "sealedml:weights"


def _uses_external_data(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _attribute_tensors(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor in node attributes of ``graph`` (sparse ones as values and indices), subgraphs included."""
    for node in graph.node:
        for attr in node.attribute:
            where = f"attribute {attr.name!r} of node {node.name or node.op_type!r}"
            tensors = [attr.t] if attr.HasField("t") else []
            tensors += list(attr.tensors)
            sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
            sparse += list(attr.sparse_tensors)
            for tensor in tensors:
                yield where, tensor
            for item in sparse:
                yield where, item.values
                yield where, item.indices
            subgraphs = [attr.g] if attr.HasField("g") else []
            for sub in subgraphs + list(attr.graphs):
                yield from _graph_tensors(sub, top_level=False)


def _graph_tensors(graph: onnx.GraphProto, *, top_level: bool) -> Iterator[tuple[str, TensorProto]]:
    """Every tensor of ``graph`` except, at the top level, its dense initializers (checked apart)."""
    if not top_level:
        for init in graph.initializer:
            yield f"initializer {init.name!r} of subgraph {graph.name!r}", init
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer {sparse.values.name!r}", sparse.values
        yield f"sparse initializer {sparse.values.name!r}", sparse.indices
    yield from _attribute_tensors(graph)


def check_external_data(model: onnx.ModelProto, container_tensors: Collection[str]) -> None:
    """Refuse a graph with any external-data reference outside this container.

    Args:
        model: the graph (weights inline or still external).
        container_tensors: names of the top-level initializers whose data this
            container holds (the manifest's tensors); only they may point to
            :data:`EXTERNAL_LOCATION`, and nothing may point anywhere else.

    Raises:
        SealedModelError: naming the first offending tensor.
    """
    for init in model.graph.initializer:
        if not _uses_external_data(init):
            continue
        entries = [(e.key, e.value) for e in init.external_data]
        if init.name not in container_tensors or entries != [("location", EXTERNAL_LOCATION)]:
            raise SealedModelError(f"initializer {init.name!r} refers to external data outside the sealed model")
    others = list(_graph_tensors(model.graph, top_level=True))
    for function in model.functions:
        others += list(_attribute_tensors(function))
    for info in model.training_info:
        for graph in (info.initialization, info.algorithm):
            others += list(_graph_tensors(graph, top_level=False))
    for where, tensor in others:
        if _uses_external_data(tensor):
            raise SealedModelError(f"{where} refers to external data: refused")
