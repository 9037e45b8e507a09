"""Background threads that must not take CPU time from a request."""

from __future__ import annotations

import logging
import os

__all__ = ["yield_to_compute"]

log = logging.getLogger(__name__)


def yield_to_compute() -> None:
    """Run the calling background thread only on CPU time nothing else wants (``SCHED_IDLE``).

    ONNX Runtime's intra-op threads split each operator into equal parts and wait for the
    slowest: a background thread competing for a core at normal priority preempts one of
    them and stalls the whole operator (measured on two cores: ResNet-50's memory-bounded
    segments ran ~30% slower beside a prefetch thread). At idle priority the kernel runs
    it only in the gaps — between operators, in serial stretches, whenever a request
    leaves a core free. Used by the memory-bounded engine's prefetch threads and the
    instance's heap reserve (:mod:`sealedml.runtime.heap_reserve`). Best effort: where the
    policy is unavailable (not Linux, or a TEE runtime without it) the thread keeps normal
    priority.
    """
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_IDLE", None)
    if setter is None or policy is None:
        return
    try:
        setter(0, policy, os.sched_param(0))
    except OSError as exc:
        log.debug("background thread keeps normal priority: %s", exc.strerror or exc)
