"""Where an ONNX graph can be cut: sets of tensors that separate its inputs from its outputs.

A *cut* is a set of tensors such that every path from a graph input to a graph
output passes through one of them: everything after the cut can be computed
from the cut's tensors (and the model's constants) alone. In a chain of layers
a cut is one tensor; inside a residual block it is the block's input *and* its
running branch, so both cross.

:func:`candidate_cuts` lists the cuts one gets by splitting the node list (which
ONNX keeps in topological order) after each node: the input-dependent tensors
produced up to that node and used after it. :func:`check_cut` validates a cut
given by name and, when it does not separate the graph, names a path from an
input to an output that avoids it, so the user sees why.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx

from sealedml.errors import ConfigurationError

__all__ = ["Cut", "GraphIndex", "PartitionError", "candidate_cuts", "check_cut"]


class PartitionError(ConfigurationError):
    """A cut or a split that does not fit the model."""

    code = "partition"


@dataclass(frozen=True)
class Cut:
    """A set of tensors that separates a graph's inputs from its outputs.

    Attributes:
        tensors: the tensor names, in the order the graph produces them.
        position: index of the last node before the cut (−1: at the inputs).
        after_op: the operator type of that node ("" at the inputs).
    """

    tensors: tuple[str, ...]
    position: int
    after_op: str = ""

    @property
    def name(self) -> str:
        """The cut as users write it: tensor names joined by commas."""
        return ",".join(self.tensors)


class GraphIndex:
    """Producers, consumers and input dependence of every tensor of a graph (top level only)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.constants = {init.name for init in graph.initializer} | {
            init.values.name for init in graph.sparse_initializer
        }
        self.inputs = [i.name for i in graph.input if i.name not in self.constants]
        self.outputs = [o.name for o in graph.output]
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
            for name in node.output:
                if name:
                    self.producer[name] = index
        # Which tensors depend on a graph input (constant subgraphs, e.g. folded shapes, do not).
        self.dynamic: set[str] = set(self.inputs)
        for node in self.nodes:
            if any(name in self.dynamic for name in node.input):
                self.dynamic.update(name for name in node.output if name)
        self.all_tensors = set(self.producer) | set(self.inputs) | self.constants

    def path_avoiding(self, cut: Iterable[str], targets: Iterable[str] | None = None) -> list[str] | None:
        """A chain of tensors from a graph input to a target that avoids ``cut``, or None.

        Walks backwards from the targets (default: the graph's outputs); tensors of
        the cut and constants stop the walk.
        """
        blocked = set(cut) | self.constants
        parent: dict[str, str | None] = {}
        stack: list[str] = []
        for name in self.outputs if targets is None else targets:
            if name not in blocked and name not in parent:
                parent[name] = None
                stack.append(name)
        inputs = set(self.inputs)
        while stack:
            name = stack.pop()
            if name in inputs:
                path = [name]
                step = parent[name]
                while step is not None:
                    path.append(step)
                    step = parent[step]
                return path  # input → … → output
            producer = self.producer.get(name)
            if producer is None:
                continue
            for source in self.nodes[producer].input:
                if source and source not in blocked and source not in parent:
                    parent[source] = name
                    stack.append(source)
        return None

    def describe_path(self, path: list[str], position: int) -> str:
        """``path`` shortened to its ends and the step that jumps over node ``position``."""
        if len(path) <= 8:
            return " → ".join(path)
        keep = {0, 1, len(path) - 2, len(path) - 1}
        for i in range(len(path) - 1):
            if self.producer.get(path[i], -1) <= position < self.producer.get(path[i + 1], -1):
                keep.update({i, i + 1})
                break
        return _elide(path, keep)


def _elide(path: list[str], keep: set[int]) -> str:
    parts: list[str] = []
    for i, name in enumerate(path):
        if i in keep:
            parts.append(name)
        elif parts and parts[-1] != "…":
            parts.append("…")
    return " → ".join(parts)


def check_cut(model: onnx.ModelProto, tensors: Sequence[str], *, index: GraphIndex | None = None) -> Cut:
    """The cut named by ``tensors``, validated.

    Raises:
        PartitionError: an unknown or constant tensor, or a set that does not
            separate the inputs from the outputs (the message names a path that
            crosses it).
    """
    index = index or GraphIndex(model)
    names = [t.strip() for t in tensors if t.strip()]
    if not names:
        raise PartitionError("a cut needs at least one tensor name")
    if len(set(names)) != len(names):
        raise PartitionError(f"tensor listed twice in cut {','.join(names)}")
    for name in names:
        if name not in index.all_tensors:
            raise PartitionError(f"no tensor {name!r} in the model")
        if name not in index.dynamic:
            raise PartitionError(f"tensor {name!r} does not depend on the input (a constant cannot be a cut)")
    path = index.path_avoiding(names)
    if path is not None:
        where = max(index.producer.get(n, -1) for n in names)
        shown = index.describe_path(path, where)
        raise PartitionError(f"cut {','.join(names)} does not separate the model: the path {shown} crosses it")
    order = {name: index.producer.get(name, -1) for name in names}
    ordered = tuple(sorted(names, key=lambda n: order[n]))
    position = max(order.values())
    after = index.nodes[position].op_type if position >= 0 else ""
    return Cut(ordered, position, after)


def candidate_cuts(model: onnx.ModelProto, *, max_tensors: int = 4) -> list[Cut]:
    """Every cut between two consecutive nodes, front to back, with at most ``max_tensors`` tensors.

    A cut that contains a graph input or output is left out: the raw input or the
    final output would cross to the untrusted side. Cuts that repeat the previous
    one are left out too.
    """
    index = GraphIndex(model)
    inputs, outputs = set(index.inputs), set(index.outputs)
    last_use: dict[str, int] = {}
    for name, users in index.consumers.items():
        last_use[name] = max(users)
    for name in outputs:
        last_use[name] = len(index.nodes)  # needed until the end
    live: dict[str, int] = {name: -1 for name in index.inputs}  # tensor → producing position
    cuts: list[Cut] = []
    previous: tuple[str, ...] = tuple(index.inputs)
    for position, node in enumerate(index.nodes[:-1]):
        for name in node.output:
            if name and name in index.dynamic:
                live[name] = position
        for name in [n for n in live if last_use.get(n, -1) <= position]:
            del live[name]
        frontier = tuple(sorted(live, key=lambda n: live[n]))
        if not frontier or frontier == previous or len(frontier) > max_tensors:
            previous = frontier or previous
            continue
        previous = frontier
        if set(frontier) & (inputs | outputs):
            continue  # a raw input or a final output would cross: never a useful cut
        cuts.append(Cut(frontier, position, node.op_type))
    return cuts
