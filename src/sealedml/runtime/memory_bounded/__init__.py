"""Memory-bounded execution of sealed models (after Occlumency, Lee et al., MobiCom 2019).

TEEs and serverless instances charge for memory, so instead of decrypting the
whole model the runtime can stream it: decrypt each segment's weights on demand,
free activations after their last consumer, split layers too big for the budget,
and decrypt segment k + 1 while segment k computes.

* :func:`plan` — cut a graph (:func:`planning_graph` reads it from a container) into
  segments that fit a byte budget
  (:mod:`.planner`; the graph's analysis in :mod:`.analysis`, layer splitting in
  :mod:`.split`, the resulting :class:`Plan` and :class:`Segment` in :mod:`.segments`).
* :class:`StreamingModel` — run a sealed model from a
  :class:`~sealedml.envelope.model_container.SealedModelReader` with the same
  interface as :class:`~sealedml.runtime.engine.LoadedModel` (:mod:`.executor`, the
  run loop). At load: :mod:`.prepare` and :mod:`.builder` (segment sessions, re-planning).
  Per run: :mod:`.container` (sealed weights), :mod:`.decrypt` (decrypting ahead),
  :mod:`.run_arena` (the run's weight arena, :mod:`.arena`); figures in :mod:`.stats`.
* Optimized segments (the default): ONNX Runtime's NCHWc graph of each segment, built once
  at load (:mod:`.optimize`), its reordered weights streamed from a spill sealed under
  an ephemeral in-memory key (:mod:`.spill`).
* :class:`MemoryTracker`, :func:`process_memory` — byte accounting (:mod:`.accounting`).

Typical use::

    reader = SealedModelReader(path, model_key)
    model = StreamingModel(reader, budget_bytes=32_000_000, threads=2)
    outputs = model.run(model.bind_inputs(tensors, positional=False))
    model.last_stats.peak_bytes  # ≤ 32 MB

See ``docs/memory-bounded.md``.
"""

from __future__ import annotations

from sealedml.runtime.engine import InputSpec
from sealedml.runtime.memory_bounded.accounting import MemoryTracker, ProcessMemory, process_memory, reset_peak_rss
from sealedml.runtime.memory_bounded.container import decrypt_reserve, planning_graph
from sealedml.runtime.memory_bounded.executor import StreamingModel
from sealedml.runtime.memory_bounded.planner import BudgetError, Plan, Segment, plan
from sealedml.runtime.memory_bounded.prepare import spill_chunk_size
from sealedml.runtime.memory_bounded.split import WeightSlice
from sealedml.runtime.memory_bounded.stats import LoadStats, RunStats, SegmentStats

__all__ = [
    "BudgetError",
    "InputSpec",
    "LoadStats",
    "MemoryTracker",
    "Plan",
    "ProcessMemory",
    "RunStats",
    "Segment",
    "SegmentStats",
    "StreamingModel",
    "WeightSlice",
    "decrypt_reserve",
    "plan",
    "planning_graph",
    "process_memory",
    "reset_peak_rss",
    "spill_chunk_size",
]
