"""Reusable plaintext weight buffers for optimized segments, wiped before reuse by another run.

Decrypting a segment into a freshly allocated buffer makes the kernel fault in and
zero every page first (and unmap them again when the buffer is freed, which
interrupts the other cores to flush their TLBs). For ResNet-50 that is ~100 MB of
page zeroing per request, which costs about a third as much as the decryption
itself (measured: 100 MiB decrypted into fresh 16 MiB buffers 16.5 ms, into two
reused ones 11.4 ms, reused and wiped at the end 12.7 ms).

So a run decrypts segment *k* into slot ``k % slots`` of a :class:`WeightBuffers`
it borrowed from a :class:`BufferPool` — two slots with prefetch (segment *k + 1*
is decrypted while *k* computes), one without — and gives it back at the end of
the run. Each slot remembers how far plaintext may reach (``dirty``):

* handing a slot out for a smaller segment first zeroes the tail the previous
  segment left beyond it, so the plaintext a slot holds is always exactly the
  segment it was handed out for (what the run's tracker counts);
* giving the set back zeroes every slot's plaintext, so between requests the pool
  holds only zeros: no plaintext weight stays resident between requests.

Only the pages a run actually wrote are zeroed: the last segment or two, not the
whole model. That is still ~30 MB for ResNet-50 at 32 MB (~1.7 ms, measured), so
a run may hand the wipe to a background thread (:meth:`BufferPool.give_back` with
``wipe_with``) and return its outputs first. The set is *dirty* until wiped, and
never handed out so: a :meth:`BufferPool.borrow` that finds it still dirty wipes it
itself, and :meth:`BufferPool.drain` (called by ``StreamingModel.close``) wipes
whatever is left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from sealedml.runtime.streaming.spill import ALIGN

__all__ = ["BufferPool", "WeightBuffer", "WeightBuffers", "aligned_array"]

#: Runs a callable in the background, e.g. ``ThreadPoolExecutor.submit``.
Submit = Callable[[Callable[[], None]], object]


class WeightBuffer:
    """One reusable, aligned buffer for a segment's decrypted weights."""

    def __init__(self, capacity: int) -> None:
        # Zeroed, not just allocated: a small allocation may reuse heap memory that held
        # anything, and everything past ``dirty`` must be zeros. (Large ones are fresh
        # zero pages either way, so this costs nothing where it matters.)
        self._base = aligned_array(capacity, zeroed=True)
        #: Bytes from the start that may hold plaintext (zero once wiped).
        self.dirty = 0

    @property
    def capacity(self) -> int:
        """Bytes a segment's weights may take."""
        return int(self._base.nbytes)

    def take(self, nbytes: int) -> np.ndarray:
        """An aligned view of the first ``nbytes`` bytes, for one segment's weights.

        Zeroes what an earlier segment left beyond ``nbytes`` first, so the buffer holds
        no plaintext outside the returned view. Grows (after wiping) when ``nbytes``
        exceeds the capacity.
        """
        if nbytes > self.capacity:
            self.wipe()
            self._base = aligned_array(nbytes, zeroed=True)
        elif self.dirty > nbytes:
            self._base[nbytes : self.dirty] = 0
        self.dirty = nbytes
        return self._base[:nbytes]

    def wipe(self) -> None:
        """Zero whatever plaintext the buffer may hold."""
        if self.dirty:
            self._base[: self.dirty] = 0
            self.dirty = 0


def aligned_array(capacity: int, *, zeroed: bool = False) -> np.ndarray:
    """A ``capacity``-byte array starting on an :data:`ALIGN` boundary (keeps its allocation alive).

    Uninitialized unless ``zeroed``: for a buffer about to be overwritten whole.
    """
    raw = (np.zeros if zeroed else np.empty)(capacity + ALIGN, dtype=np.uint8)
    shift = -raw.ctypes.data % ALIGN
    return raw[shift : shift + capacity]


class WeightBuffers:
    """The slots one run decrypts its segments into (segment ``k`` → slot ``k % len``)."""

    def __init__(self, slots: list[WeightBuffer]) -> None:
        self.slots = slots

    def for_segment(self, index: int) -> WeightBuffer:
        """The slot segment ``index`` is decrypted into."""
        return self.slots[index % len(self.slots)]


class BufferPool:
    """Wiped weight buffers shared by the runs of one model (thread-safe).

    Concurrent runs each borrow their own set; at most ``keep`` idle buffers stay
    allocated (holding only zeros), the rest are freed.
    """

    def __init__(self, capacity: int, slots: int, *, keep: int = 4) -> None:
        if capacity < 0 or slots < 1 or keep < 0:
            raise ValueError("capacity ≥ 0, slots ≥ 1 and keep ≥ 0 required")
        self.capacity = capacity
        self.slots = slots
        self._keep = keep
        self._idle: list[WeightBuffer] = []
        #: Sets given back whose wipe has not started yet (newest last).
        self._dirty: list[list[WeightBuffer]] = []
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        """Idle, wiped buffers kept for the next runs."""
        with self._lock:
            return len(self._idle)

    @property
    def dirty(self) -> int:
        """Sets given back and not yet wiped."""
        with self._lock:
            return len(self._dirty)

    def borrow(self) -> WeightBuffers:
        """A set of ``slots`` wiped buffers for one run.

        Takes idle buffers first, then a set still waiting for its wipe (wiped here,
        before anything is handed out), and allocates only what is still missing.
        """
        with self._lock:
            taken = [self._idle.pop() for _ in range(min(self.slots, len(self._idle)))]
            dirty = self._dirty.pop() if len(taken) < self.slots and self._dirty else []
        for buffer in dirty:
            buffer.wipe()
        need = self.slots - len(taken)
        taken += dirty[:need]
        self._keep_idle(dirty[need:])
        taken += [WeightBuffer(self.capacity) for _ in range(self.slots - len(taken))]
        return WeightBuffers(taken)

    def give_back(self, buffers: WeightBuffers, wipe_with: Submit | None = None) -> None:
        """Return a run's buffers: wipe them, and keep them for later runs (up to ``keep``).

        Call it only once no thread writes into the buffers any more.

        Args:
            buffers: the set from :meth:`borrow`; emptied.
            wipe_with: runs a callable in the background (e.g. an executor's ``submit``):
                the wipe then happens there, off the caller's critical path. Without it,
                or when it raises ``RuntimeError`` (a shut-down executor), the wipe
                happens now.
        """
        slots, buffers.slots = buffers.slots, []
        if wipe_with is None:
            self._wipe_and_keep(slots)
            return
        with self._lock:
            self._dirty.append(slots)
        try:
            wipe_with(self._wipe_oldest)
        except RuntimeError:
            self._wipe_oldest()

    def drain(self) -> None:
        """Wipe every set still waiting for its wipe, now."""
        while self.dirty:
            self._wipe_oldest()

    def _wipe_oldest(self) -> None:
        with self._lock:
            if not self._dirty:
                return  # a borrower took it (and wiped it) first
            slots = self._dirty.pop(0)
        self._wipe_and_keep(slots)

    def _wipe_and_keep(self, slots: list[WeightBuffer]) -> None:
        for buffer in slots:
            buffer.wipe()
        self._keep_idle(slots)

    def _keep_idle(self, wiped: list[WeightBuffer]) -> None:
        with self._lock:
            room = max(0, self._keep - len(self._idle))
            self._idle.extend(wiped[:room])
