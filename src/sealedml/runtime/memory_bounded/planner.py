"""The memory planner: cut a model into segments whose working set fits a byte budget.

Occlumency (Lee et al., MobiCom 2019) keeps a DNN inside a small enclave by
loading each layer's weights on demand and freeing buffers as soon as they
are dead. This planner does the static half of that work, ahead of any
request:

1. **Shapes.** Activation shapes come from :func:`onnx.shape_inference` with
   every symbolic dimension fixed to ``batch`` (inferred twice, at ``batch``
   and ``batch + 1``, to learn which axes depend on the batch; those stay
   symbolic in the segment graphs, so smaller batches run too).
2. **Liveness.** In execution (topological) order, a tensor lives from the
   node that produces it to its last consumer (graph outputs: to the end).
   Inside a segment ONNX Runtime frees a tensor after its last use, but a
   tensor fed *into* the segment stays alive for the whole segment.
3. **Splitting.** A node whose weights cannot fit next to its activations is
   split into pieces over contiguous weight ranges (:mod:`.split`).
4. **Cutting.** The node sequence is cut into the fewest segments such that
   every segment's working set fits (weights of the segment + the largest set
   of activations alive at any node inside it, including tensors that cross
   the segment and must stay alive).

Prefetch and the budget: with ``prefetch=True`` the executor decrypts the
weights of segment *k + 1* while segment *k* computes (Occlumency overlaps
weight loading and integrity checking with compute the same way). The plan
therefore bounds, for every adjacent pair, ``peak(k) + weights(k + 1)`` —
not each segment alone — so the tracked peak stays within the budget. This
wastes less than planning every segment to half the budget: a segment
whose neighbour is light may use almost the whole budget.
:class:`~sealedml.runtime.memory_bounded.StreamingModel` plans with
``prefetch=False`` itself (the fewest segments) and prefetches only what the
budget leaves beside each segment; a paired plan is for callers that pass one
in (see docs/memory-bounded.md for the measured trade-off).

``reserve_bytes`` is held back from the budget for the decryption scratch
buffers (a few AES-GCM chunks).

Steps 1–3 (the graph's analysis) are in :mod:`.analysis`; this module finds the
splits and the cuts (step 4) and names the bottleneck when none fits. What a plan
holds, and each segment's ONNX model, is in :mod:`.segments`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import onnx

from sealedml._internal.units import format_bytes
from sealedml.errors import ConfigurationError
from sealedml.runtime.memory_bounded.analysis import (
    Analysis,
    Expanded,
    Liveness,
    analyze,
    expand,
    liveness,
    tensor_size,
)
from sealedml.runtime.memory_bounded.segments import Plan, Segment
from sealedml.runtime.memory_bounded.split import WeightSlice, split_strategy, split_units

__all__ = [
    "BudgetError",
    "Plan",
    "Segment",
    "WeightSlice",
    "plan",
]

#: Binary search for the smallest feasible budget stops at this relative precision.
_SEARCH_PRECISION = 1e-3
_MAX_SPLIT_ROUNDS = 200


class BudgetError(ConfigurationError):
    """The memory budget cannot be met by any plan.

    Attributes:
        tensor: the largest tensor at the bottleneck (an activation or a weight that
            cannot be split further).
        kind: ``"activation"`` or ``"weight"``.
        needed_bytes: that tensor's size.
        node: the node at the bottleneck.
        budget: the budget that was asked for.
        minimum_budget: the smallest budget (bytes) for which a plan exists, with the
            same batch, prefetch and reserve settings.
        reserve: bytes of the budget held back for decryption scratch (0 if none).
    """

    code = "budget"

    def __init__(
        self,
        *,
        tensor: str,
        kind: str,
        needed_bytes: int,
        node: str,
        node_bytes: int,
        budget: int,
        minimum_budget: int,
        prefetch: bool,
        reserve: int = 0,
    ) -> None:
        self.tensor = tensor
        self.kind = kind
        self.needed_bytes = needed_bytes
        self.node = node
        self.budget = budget
        self.minimum_budget = minimum_budget
        self.reserve = reserve
        mode = "with prefetch" if prefetch else "without prefetch"
        # The reserve is what makes small models' budgets infeasible; say so.
        held = f"; {format_bytes(reserve)} of the budget is held for decryption scratch" if reserve else ""
        super().__init__(
            f"budget {format_bytes(budget)} too small: {kind} {tensor!r} needs {format_bytes(needed_bytes)} "
            f"(node {node!r} needs {format_bytes(node_bytes)} {mode}){held}; "
            f"smallest feasible budget is {format_bytes(minimum_budget, ceil=True)}"
        )


@dataclass(frozen=True)
class _Violation:
    index: int
    node: str
    node_bytes: int
    tensor: str
    kind: str
    tensor_bytes: int


def _violations(exp: Expanded, life: Liveness, limit: int, prefetch: bool) -> list[tuple[int, int]]:
    """Nodes that cannot fit even as single-node segments, as ``(index, bytes needed)``.

    A plan exists iff every node fits alone and, with prefetch, every node's working
    set plus the next node's weights fits: any segment containing node i holds at
    least node i's working set, and node i + 1's weights are either in the same
    segment or prefetched during it. (Shared weights make this sufficient rather
    than exact, which only errs on the safe side.)
    """
    found: list[tuple[int, int]] = []
    for i in range(life.n):
        need = life.op_weights[i] + life.live_at[i]
        if prefetch and i + 1 < life.n:
            need += life.op_weights[i + 1]
        if need > limit:
            found.append((i, need))
    return found


def _describe(exp: Expanded, life: Liveness, i: int, need: int, prefetch: bool) -> _Violation:
    """Name the largest tensor at node ``i``: the bottleneck reported to the user."""
    op = exp.ops[i]
    weights = (*op.weights, *(exp.ops[i + 1].weights if prefetch and i + 1 < life.n else ()))
    candidates: list[tuple[int, str, str]] = [
        (life.size[name], name, "activation") for name, p in life.produced.items() if max(p, 0) <= i <= life.last[name]
    ]
    candidates.extend((w.nbytes, w.tensor, "weight") for w in weights)
    nbytes, name, kind = max(candidates, default=(0, op.node.name, "activation"))
    return _Violation(i, op.source, need, name, kind, nbytes)


class _Infeasible(Exception):
    def __init__(self, violation: _Violation) -> None:
        super().__init__(violation.node)
        self.violation = violation


def _initial_pieces(base: Analysis, index: int, live: int, limit: int, prefetch: bool) -> int:
    """A first guess at how many pieces node ``index`` needs (refined by doubling)."""
    op = base.ops[index]
    units = split_units(op, base.infos)
    strategy = split_strategy(op, base.infos)
    out = tensor_size(base.infos, op.outputs[0])
    # Splitting adds activations: the pieces' outputs next to the concatenated result,
    # or a running sum and a partial product next to the result.
    extra = out if strategy in ("conv-out-channels", "conv-groups", "gemm-out-columns") else 2 * out
    allowance = (limit - live - extra) // (2 if prefetch else 1)
    if allowance <= 0:
        return units
    return max(2, min(units, math.ceil(op.weight_bytes / allowance)))


def _activation_floor(base: Analysis) -> tuple[int, Expanded, Liveness]:
    """The largest set of activations alive at one node of the unsplit graph.

    Splitting never lowers it (a split layer's last piece still sees its input and the
    whole output), so no budget below it (plus the reserve) can work.
    """
    exp = expand(base, {})
    life = liveness(exp, base)
    return max(life.live_at, default=0), exp, life


def _fit(base: Analysis, limit: int, prefetch: bool) -> tuple[Expanded, Liveness, dict[int, int]]:
    """Split nodes until every node fits ``limit`` alone; raise :class:`_Infeasible` if impossible."""
    floor, exp, base_life = _activation_floor(base)
    if floor > limit:
        i = base_life.live_at.index(floor)
        raise _Infeasible(_describe(exp, base_life, i, floor + base_life.op_weights[i], prefetch))
    pieces: dict[int, int] = {}
    life = base_life
    for _ in range(_MAX_SPLIT_ROUNDS):
        bad = _violations(exp, life, limit, prefetch)
        if not bad:
            return exp, life, pieces
        progressed = False
        for i, _need in bad:
            culprits = {exp.origin[i]}
            if prefetch and i + 1 < life.n:
                culprits.add(exp.origin[i + 1])
            splittable = [c for c in culprits if pieces.get(c, 1) < split_units(base.ops[c], base.infos)]
            if not splittable:
                continue
            # Split the heavier candidate: that is the one whose weights crowd the budget.
            target = max(splittable, key=lambda c: base.ops[c].weight_bytes)
            if target in pieces:
                pieces[target] = min(split_units(base.ops[target], base.infos), pieces[target] * 2)
            else:
                # base_life comes from the unsplit graph, so it is indexed like base.ops.
                pieces[target] = _initial_pieces(base, target, base_life.live_at[target], limit, prefetch)
            progressed = True
        if not progressed:
            i, need = max(bad, key=lambda v: v[1])
            raise _Infeasible(_describe(exp, life, i, need, prefetch))
        exp = expand(base, pieces)
        life = liveness(exp, base)
    i, need = max(bad, key=lambda v: v[1])  # pragma: no cover - doubling ends long before
    raise _Infeasible(_describe(exp, life, i, need, prefetch))  # pragma: no cover


def _minimum_budget(base: Analysis, start: int, prefetch: bool, reserve: int) -> int:
    """The smallest budget for which :func:`_fit` succeeds (binary search, rounded up)."""

    def feasible(budget: int) -> bool:
        try:
            _fit(base, budget - reserve, prefetch)
        except _Infeasible:
            return False
        return True

    floor = _activation_floor(base)[0] + reserve
    if floor > start and feasible(floor):
        return floor  # activation-bound: the floor is exact
    lo = max(start, floor - 1)
    hi = max(2 * lo, floor, 1 << 20)
    while not feasible(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 50:  # pragma: no cover - would need petabytes of activations
            raise ConfigurationError("no memory budget fits this model")
    while hi - lo > max(4096, int(hi * _SEARCH_PRECISION)):
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------- cutting


def _cut(exp: Expanded, life: Liveness, limit: int, prefetch: bool) -> list[tuple[int, int]]:
    """The fewest segments [a, b) with peak(a, b) ≤ limit and, with prefetch,
    peak(k) + weights(k + 1) ≤ limit for adjacent segments (exact dynamic programme)."""
    n = life.n
    by_last: dict[int, list[tuple[int, int]]] = {}
    for name, p in life.produced.items():
        by_last.setdefault(life.last[name], []).append((p, life.size[name]))
    # ends[a] = [(b, peak(a, b), weights(a, b))] for every feasible segment starting at a.
    ends: list[list[tuple[int, int, int]]] = []
    for a in range(n):
        row: list[tuple[int, int, int]] = []
        seen: set[str] = set()
        weight = 0
        act = 0
        dead_held = 0
        for i in range(a, n):
            if i > a:
                # Tensors fed into the segment stay alive to its end even after their last use.
                dead_held += sum(s for p, s in by_last.get(i - 1, ()) if p < a)
            for w in exp.ops[i].weights:
                if w.name not in seen:
                    seen.add(w.name)
                    weight += w.nbytes
            act = max(act, life.live_at[i] + dead_held)
            if weight + act > limit:
                break
            row.append((i + 1, weight + act, weight))
        ends.append(row)
    if not prefetch:
        # Without prefetch segments are independent: taking the longest feasible one is optimal.
        cuts: list[tuple[int, int]] = []
        a = 0
        while a < n:
            if not ends[a]:  # pragma: no cover - _fit guarantees single nodes fit
                raise ConfigurationError(f"node {a} does not fit")
            b = ends[a][-1][0]
            cuts.append((a, b))
            a = b
        return cuts
    # Fewest segments first; among those, the smallest heaviest segment, which spreads the
    # weights evenly so each prefetch has a segment's compute to hide behind.
    # best[(a, b)] = ((segments, heaviest weights) covering [0, b) ending with [a, b), previous start)
    best: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}
    # by_end[a] = [(peak, cost, start)] of reachable segments ending at a
    by_end: dict[int, list[tuple[int, tuple[int, int], int]]] = {}
    for b, peak, weight in ends[0] if n else []:
        best[(0, b)] = ((1, weight), -1)
        by_end.setdefault(b, []).append((peak, (1, weight), 0))
    for a in range(1, n):
        preds = sorted(by_end.get(a, ()))
        if not preds:
            continue
        peaks = [p for p, _, _ in preds]
        # Running minimum of (cost, start) over predecessors sorted by peak: the admissible
        # predecessors of [a, b) are a prefix (peak ≤ limit - weights(a, b)). The cost update
        # (count + 1, max(heaviest, w)) is monotone, so the prefix minimum stays optimal.
        prefix: list[tuple[tuple[int, int], int]] = []
        for _, cost, start in preds:
            prefix.append(min(prefix[-1], (cost, start)) if prefix else (cost, start))
        for b, peak, weight in ends[a]:
            k = bisect.bisect_right(peaks, limit - weight)
            if k == 0:
                break  # heavier segments from a only make it worse
            (count, heaviest), start = prefix[k - 1]
            cost = (count + 1, max(heaviest, weight))
            key = (a, b)
            if key not in best or best[key][0] > cost:
                best[key] = (cost, start)
                by_end.setdefault(b, []).append((peak, cost, a))
    finals = [(best[key][0], key) for key in best if key[1] == n]
    if not finals:  # pragma: no cover - _fit guarantees the all-singleton plan
        raise ConfigurationError("no segmentation fits the budget")
    _, key = min(finals)
    cuts = []
    while True:
        cuts.append(key)
        start = best[key][1]
        if start < 0:
            break
        key = (start, key[0])
    return cuts[::-1]


def _segments(
    exp: Expanded, life: Liveness, base: Analysis, cuts: Sequence[tuple[int, int]], prefetch: bool
) -> tuple[Segment, ...]:
    skip = base.weight_names | set(exp.constants) | {w.name for op in exp.ops for w in op.weights}
    out: list[Segment] = []
    weights_of: list[tuple[WeightSlice, ...]] = []
    for a, b in cuts:
        weights_of.append(tuple(dict.fromkeys(w for op in exp.ops[a:b] for w in op.weights)))
    for k, (a, b) in enumerate(cuts):
        ops = exp.ops[a:b]
        consumed = dict.fromkeys(name for op in ops for name in op.inputs if name not in skip)
        inputs = tuple(name for name in consumed if life.produced.get(name, -1) < a)
        outputs = tuple(name for op in ops for name in op.outputs if life.last[name] >= b or name in base.outputs)
        held = [name for name, p in life.produced.items() if p < a <= life.last[name]]
        release = tuple(
            name
            for name, p in life.produced.items()
            if p < a and life.last[name] < b and name not in base.outputs and (life.last[name] >= a or k == 0)
        )
        held_bytes = sum(life.size[name] for name in held)
        act = 0
        dead_held = 0
        for i in range(a, b):
            if i > a:
                dead_held += sum(life.size[name] for name in held if life.last[name] == i - 1)
            act = max(act, life.live_at[i] + dead_held)
        weight_bytes = sum(w.nbytes for w in weights_of[k])
        prefetch_bytes = sum(w.nbytes for w in weights_of[k + 1]) if prefetch and k + 1 < len(cuts) else 0
        out.append(
            Segment(k, ops, weights_of[k], inputs, outputs, release, held_bytes, weight_bytes, act, prefetch_bytes)
        )
    return tuple(out)


def plan(
    model_graph: onnx.ModelProto,
    weight_sizes: Mapping[str, int],
    budget_bytes: int,
    *,
    batch: int = 1,
    prefetch: bool = True,
    reserve_bytes: int = 0,
) -> Plan:
    """Plan memory-bounded execution of ``model_graph`` within ``budget_bytes``.

    Args:
        model_graph: the model; initializers named in ``weight_sizes`` are sealed weights
            (their data may be external placeholders — only dims and types are read).
            Other initializers must be inline; they are small constants kept in the
            segment graphs.
        weight_sizes: byte size of every sealed weight (``{entry.name: entry.length}``
            from the container manifest).
        budget_bytes: the most bytes of decrypted weights plus live activations (plus
            ``reserve_bytes``) a run may hold at once.
        batch: the batch size to size activations for; symbolic dimensions take this value.
        prefetch: leave room to decrypt segment k + 1 while segment k computes.
        reserve_bytes: part of the budget kept for decryption scratch buffers.

    Returns:
        The plan, with the fewest segments that fit.

    Raises:
        BudgetError: no plan fits ``budget_bytes``; the message names the bottleneck
            tensor and the smallest feasible budget.
        ConfigurationError: the graph cannot be planned (control flow, unsorted nodes,
            sizes that disagree with the manifest, bad arguments).
    """
    if batch < 1:
        raise ConfigurationError("batch must be ≥ 1")
    if budget_bytes <= 0 or reserve_bytes < 0:
        raise ConfigurationError("budget must be positive and the reserve non-negative")
    base = analyze(model_graph, weight_sizes, batch)
    limit = budget_bytes - reserve_bytes
    try:
        exp, life, pieces = _fit(base, limit, prefetch)
    except _Infeasible as exc:
        v = exc.violation
        minimum = _minimum_budget(base, budget_bytes, prefetch, reserve_bytes)
        raise BudgetError(
            tensor=v.tensor,
            kind=v.kind,
            needed_bytes=v.tensor_bytes,
            node=v.node,
            node_bytes=v.node_bytes,
            budget=budget_bytes,
            minimum_budget=minimum,
            prefetch=prefetch,
            reserve=reserve_bytes,
        ) from None
    cuts = _cut(exp, life, limit, prefetch)
    segments = _segments(exp, life, base, cuts, prefetch)
    splits = {
        base.ops[index].source: (split_strategy(base.ops[index], base.infos) or "", count)
        for index, count in sorted(pieces.items())
        if count > 1
    }
    return Plan(
        budget_bytes=budget_bytes,
        batch=batch,
        prefetch=prefetch,
        reserve_bytes=reserve_bytes,
        segments=segments,
        inputs=base.inputs,
        outputs=base.outputs,
        infos=MappingProxyType(exp.infos),
        constants=MappingProxyType(exp.constants),
        splits=MappingProxyType(splits),
        estimated=base.estimated,
        opset_imports=tuple(model_graph.opset_import),
        ir_version=model_graph.ir_version,
        functions=tuple(model_graph.functions),
        graph_name=model_graph.graph.name or "model",
    )
