"""Per-run decryption jobs: a segment's weights, decrypted while the previous segment computes.

Occlumency (Lee et al., MobiCom 2019) overlaps loading the next layer's weights with the
current layer's compute. A run starts at most one job ahead:

* :class:`SealedPending` — a sealed segment decrypted from the container on a prefetch
  thread (container reads are not split: the whole segment or nothing ahead);
* :class:`SpillJob` — an optimized segment's spill entry decrypted chunk by chunk into
  the run's arena, by the prefetch thread and the compute thread together.

Prefetch threads run at idle priority (:func:`~sealedml._internal.priority.yield_to_compute`). A job holds no
reference to the model: it is given the spill, the run's arena and tracker, the
per-thread ciphertext buffers (:class:`ScratchBuffer`) and what to do when a chunk
fails authentication.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from sealedml.errors import SealedModelError
from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.arena import Step
from sealedml.runtime.memory_bounded.run_arena import DecryptedWeights, RunArena, wipe
from sealedml.runtime.memory_bounded.spill import SpillEntry, SpillStore

__all__ = ["Pending", "ScratchBuffer", "SealedPending", "SpillJob"]


class ScratchBuffer:
    """Each thread's reusable buffer for spill ciphertext (it never holds plaintext)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def view(self, nbytes: int) -> memoryview:
        """The calling thread's buffer, grown to at least ``nbytes``.

        Args:
            nbytes: the bytes needed.

        Returns:
            A view of exactly ``nbytes`` bytes.
        """
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(nbytes, dtype=np.uint8)
            self._local.buf = buf
        view: memoryview = buf.data
        return view[:nbytes]


class SealedPending:
    """A sealed segment being decrypted from the container by the prefetch thread.

    Args:
        future: the decryption (its weights are counted in ``tracker``).
        tracker: the run's tracker.
    """

    def __init__(self, future: Future[DecryptedWeights], tracker: MemoryTracker) -> None:
        self._future = future
        self._tracker = tracker

    def finish(self, help_allowed: bool) -> tuple[DecryptedWeights, float]:
        """Wait for the weights.

        Args:
            help_allowed: ignored (one thread decrypts container chunks).

        Returns:
            The weights, and the seconds waited.

        Raises:
            SealedModelError: a container chunk failed authentication.
        """
        del help_allowed  # container chunks are decrypted by one thread
        started = time.perf_counter()
        loaded = self._future.result()
        return loaded, time.perf_counter() - started

    def abandon(self) -> None:
        """After a failed run: wait for the decryption and drop what it produced."""
        if self._future.cancel():
            return
        try:
            loaded = self._future.result()
        except BaseException:  # the run already failed; its error is the one to report
            return
        wipe(loaded.arrays)
        self._tracker.release(loaded.nbytes, "weights")


class SpillJob:
    """One optimized segment's spill entry being decrypted into the run's arena, chunk by chunk.

    Created early — while the previous segment computes — the prefetch thread claims the
    chunks the arena schedule allows ahead (:class:`~.arena.Step`): those clear of the
    running segment's bytes, from the far end of the arena, within what the budget
    leaves. When the compute thread reaches this segment (the previous one is done) it
    zeroes the stale bytes the schedule says the budget has no room for, lifts the limit,
    wakes the prefetch thread again if it had stopped there, and claims chunks itself
    instead of waiting: two threads decrypt the rest (``cryptography`` releases the GIL
    for AES-GCM). On two cores ONNX Runtime keeps both busy, so the idle-priority
    prefetch thread gets little done during compute and most of a segment is decrypted
    this way. Chunks are disjoint parts of the arena, so the threads never touch the same
    bytes. The first failure stops further claims and is raised by :meth:`finish`.

    Args:
        spill: the spill store.
        entry: the segment's entry in it.
        arena: the run's arena (its tracker counts the scratch too).
        step: the segment's place in the arena schedule.
        pool: the prefetch threads (None: the compute thread decrypts everything in
            :meth:`finish`).
        scratch: the per-thread ciphertext buffers.
        on_auth_failure: called by :meth:`finish` when a chunk was short or failed
            authentication (the model rebuilds the segment before its next run).
        early: created while the previous segment still computes: only the chunks
            ``step`` allows ahead, the rest once :meth:`finish` is called.
    """

    def __init__(
        self,
        spill: SpillStore,
        entry: SpillEntry,
        arena: RunArena,
        step: Step,
        pool: ThreadPoolExecutor | None,
        scratch: ScratchBuffer,
        on_auth_failure: Callable[[], None],
        *,
        early: bool,
    ) -> None:
        self._spill = spill
        self._entry = entry
        self._scratch = scratch
        self._on_auth_failure = on_auth_failure
        self._arena = arena
        self._step = step
        self._tracker = arena.tracker
        self._pool = pool
        self._n = len(self._entry.chunks)
        self._order = list(range(self._n - 1, -1, -1)) if step.reverse else list(range(self._n))
        self._blob = arena.blob(step.offset, self._entry.nbytes)
        self._turned = not early
        if early:
            self._limit = min(step.ahead, self._n)
            arena.count(step.ahead_growth)
        else:
            arena.trim(step)
            arena.count(step.ahead_growth + step.growth)
            self._limit = self._n
        self._next = 0
        self._in_flight = 0
        self._workers = 0  # prefetch-thread calls of work() submitted and not yet finished
        self._error: BaseException | None = None
        self._busy = 0.0
        self._cond = threading.Condition()
        #: No worker will come (no pool, or it was closed): the compute thread does everything.
        self.solo = pool is None

    def submit(self) -> None:
        """Have a prefetch thread claim chunks (up to the current limit)."""
        if self._pool is None:
            self.solo = True
            return
        with self._cond:
            self._workers += 1
        try:
            self._pool.submit(self._work_as_worker)
        except RuntimeError:  # close() raced with this run
            with self._cond:
                self._workers -= 1
            self.solo = True

    def _work_as_worker(self) -> None:
        self.work(worker=True)

    def _claim_locked(self) -> int:
        if self._error is not None or self._next >= self._limit:
            return -1
        index = self._order[self._next]
        self._next += 1
        self._in_flight += 1
        return index

    def work(self, worker: bool = False) -> None:
        """Decrypt chunks until none is left to claim (any thread).

        Args:
            worker: called from the pool (see :meth:`submit`). Such a call stops counting
                as a worker under the same lock as its last failed claim, so :meth:`finish`
                never mistakes a worker that stopped at the old limit for a running one.
        """
        scratch_bytes = self._spill.scratch_bytes
        with self._cond:
            index = self._claim_locked()
            if index < 0:
                if worker:
                    self._workers -= 1
                    self._cond.notify_all()
                return
            self._tracker.add(scratch_bytes, "scratch")
        try:
            scratch = self._scratch.view(scratch_bytes) if scratch_bytes else None
        except BaseException as exc:  # e.g. MemoryError: give the chunk back as failed
            with self._cond:
                self._in_flight -= 1
                self._error = self._error or exc
                self._tracker.release(scratch_bytes, "scratch")
                if worker:
                    self._workers -= 1
                self._cond.notify_all()
            return
        out = self._blob.data
        while index >= 0:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                self._spill.read_chunk(self._entry, index, out, scratch)
            except BaseException as exc:  # recorded and raised by finish() in the compute thread
                error = exc
            with self._cond:
                self._busy += time.perf_counter() - started
                self._in_flight -= 1
                if error is not None and self._error is None:
                    self._error = error
                index = self._claim_locked()
                if index < 0:
                    # Give the scratch back before anyone can see the job complete.
                    self._tracker.release(scratch_bytes, "scratch")
                    if worker:
                        self._workers -= 1
                self._cond.notify_all()

    def turn(self) -> None:
        """The previous segment is done: allow every chunk (idempotent; one thread at a time).

        Zeroes the stale bytes the budget has no room for (outside this segment's range, so
        no chunk in flight is touched), counts the rest of the segment's bytes, and wakes
        the prefetch thread if it had stopped at the old limit.
        """
        if self._turned:
            return
        self._turned = True
        self._arena.trim(self._step)
        self._arena.count(self._step.growth)
        with self._cond:
            self._limit = self._n
            idle = self._workers == 0
        if idle and not self.solo:
            self.submit()

    def finish(self, help_allowed: bool) -> tuple[DecryptedWeights, float]:
        """The decrypted weights (after helping, if allowed); and the seconds this took.

        Call it once the previous segment has run: its bytes in the arena are stale now.

        Args:
            help_allowed: the compute thread may decrypt chunks too (the budget has room
                for its scratch buffer beside the prefetch thread's).

        Returns:
            The weights (views of the arena), and the seconds the compute thread waited.

        Raises:
            SealedModelError: a chunk was short or failed authentication (the segment is
                then rebuilt at the start of the next run).
        """
        started = time.perf_counter()
        self.turn()
        if help_allowed or self.solo:
            self.work()
        with self._cond:
            while self._in_flight or (self._error is None and self._next < self._n):
                self._cond.wait()
            error = self._error
        # Without a prefetch thread the compute thread decrypted it all: no waiting.
        waited = time.perf_counter() - started if self._pool is not None else 0.0
        if error is not None:
            if isinstance(error, SealedModelError):
                self._on_auth_failure()
            raise error
        arrays = self._entry.views(self._blob)
        return DecryptedWeights(arrays, self._entry.nbytes, self._busy, in_arena=True), waited

    def wait_claimed(self) -> None:
        """Block while prefetch threads are still decrypting what they may claim now (for
        diagnostics: a job nobody works on returns at once)."""
        with self._cond:
            while self._in_flight or (self._error is None and self._next < self._limit and self._workers):
                self._cond.wait()

    def abandon(self) -> None:
        """After a failed run: stop claiming and wait for chunks in flight (the arena is wiped later)."""
        with self._cond:
            self._next = self._n
            while self._in_flight:
                self._cond.wait()


#: A segment being decrypted for a run.
Pending = SealedPending | SpillJob
