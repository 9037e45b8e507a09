"""The next run's first segment, decrypted once a run has returned (a *warm head*).

A run cannot compute anything before its first segment's weights are decrypted. Every
later segment is decrypted (partly) while the one before it computes, but the first
has nothing before it. ResNet-50 at 32 MB waited ~1.4 ms per request for its first 20.7
MB, decrypted by two threads. Once a run has returned its outputs, its budget is free.
The prefetch threads then decrypt the *next* run's first segment into the arena the run
just used, at idle priority. The next run adopts that arena with the weights in place,
or helps finish them.

What holds, and what changes:

* **The budget.** Between runs the arena holds the first segment's weights and nothing
  else: the stale plaintext outside them is zeroed before the first chunk is decrypted.
  The plan fits that segment within the budget. The next run's tracker counts those
  bytes from the moment they are decrypted, so its reported peak includes them.
* **Authentication.** Every chunk is authenticated when it is decrypted. A chunk that
  fails fails the request that adopts the head (as a failure during the run does), and
  that segment is rebuilt before the request after it. A chunk tampered with *after*
  its authentic contents were decrypted is caught by the next read of that chunk.
* **Between requests, one arena holds the first segment's plaintext instead of zeros**
  (at most one per model, and only while the model has prefetch threads).
  ``StreamingModel(warm_first_segment=False)`` keeps zeros there instead, at the
  latency cost above.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.decrypt import SpillJob
from sealedml.runtime.memory_bounded.run_arena import Layout, RunArena

__all__ = ["WarmHead"]


class WarmHead:
    """The next run's tracker, arena and first-segment job, prepared after a run.

    Args:
        layout: the arena schedule it was laid out for (a run with another adopts nothing).
        tracker: the next run's tracker.
        arena: the next run's arena (adopted from the run that just finished).
        job: the first segment's spill job, created ``early`` (nothing claimable yet).
        span: the first segment's bytes in the arena.
    """

    def __init__(
        self, layout: Layout, tracker: MemoryTracker, arena: RunArena, job: SpillJob, span: tuple[int, int]
    ) -> None:
        self.layout = layout
        self.tracker = tracker
        self.arena = arena
        self.job = job
        self._span = span
        self._task: Future[None] | None = None

    def start(self, pool: ThreadPoolExecutor) -> bool:
        """Queue the preparation on a prefetch thread.

        Returns:
            False when the pool no longer takes work (closed): nothing was started.
        """
        try:
            self._task = pool.submit(self._prepare)
        except RuntimeError:
            return False
        return True

    def _prepare(self) -> None:
        # Stale plaintext first: until it is zeroed nothing of the first segment is counted
        # or decrypted, so the arena never holds more than the budget allows.
        self.arena.keep_only(*self._span)
        self.job.turn()  # counts the segment's bytes and lets the prefetch threads decrypt it

    def ready(self) -> None:
        """The adopting run, first: the stale bytes are zeroed and the job may decrypt everything.

        Does the preparation here when no prefetch thread has started it yet.
        """
        task = self._task
        if task is None or task.cancel():
            self._prepare()
        else:
            task.result()

    def wait(self) -> None:
        """Block until the preparation and the prefetch threads' decryption are done (or failed)."""
        task = self._task
        if task is not None:
            task.exception()  # a failure is for the adopting run to raise
        self.job.wait_claimed()

    def discard(self, wipe_with: ThreadPoolExecutor | None) -> None:
        """Not adopted (the segments changed, or the model closes): stop and hand the arena back.

        Args:
            wipe_with: the prefetch threads to wipe it on (None: wipe it now).
        """
        task = self._task
        if task is not None and not task.cancel():
            task.exception()  # waits; a failure concerns nobody now: the arena is wiped below
        self.job.abandon()
        self.arena.give_back(wipe_with.submit if wipe_with is not None else None)
