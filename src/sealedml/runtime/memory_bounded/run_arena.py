"""A run's plaintext weights: the arena it borrows, and each segment's decrypted weights.

The arena, its pool and its schedule are in :mod:`.arena`. This module holds what one
run does with them: it borrows an arena as large as its :class:`Layout` asks, and counts
in the run's tracker the bytes that the schedule marks and zeroes (:class:`RunArena`).
A sealed segment's weights are fresh buffers instead, zeroed by :func:`wipe` before the
allocator gets them back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sealedml.crypto import TAG_SIZE
from sealedml.runtime.memory_bounded.accounting import MemoryTracker
from sealedml.runtime.memory_bounded.arena import ArenaPool, ArenaSegment, Step, WeightArena
from sealedml.runtime.memory_bounded.spill import SpillEntry

__all__ = ["DecryptedWeights", "Layout", "RunArena", "arena_segment", "wipe"]


@dataclass
class DecryptedWeights:
    """Decrypted weights of one segment (owned by exactly one run).

    Attributes:
        arrays: the weights, keyed by graph input name.
        nbytes: their bytes.
        seconds: time spent decrypting them.
        in_arena: they are views of the run's arena, which counts its own bytes (they stay
            counted until zeroed); otherwise fresh buffers, counted as weights until wiped.
    """

    arrays: dict[str, np.ndarray]
    nbytes: int
    seconds: float
    in_arena: bool = False


@dataclass(frozen=True)
class Layout:
    """A run's arena size (None: no optimized segment, no arena) and schedule.

    Attributes:
        capacity: bytes of the arena the run borrows.
        steps: per segment, its place in the arena (:func:`~.arena.schedule`).
    """

    capacity: int | None
    steps: tuple[Step, ...]


class RunArena:
    """A run's weight arena, and the bytes of it the run's tracker counts as weights.

    The counts follow the arena schedule (:func:`~.arena.schedule`): what each step marks
    and zeroes. A run with only sealed segments borrows no arena.

    Args:
        pool: the model's arenas.
        capacity: the arena's size (None: borrow none).
        tracker: the run's tracker.
        adopt: an arena taken over from an earlier run instead of one borrowed (see
            :mod:`.warm`); the caller zeroes what it must not keep (:meth:`keep_only`).
    """

    def __init__(
        self, pool: ArenaPool, capacity: int | None, tracker: MemoryTracker, *, adopt: WeightArena | None = None
    ) -> None:
        self.tracker = tracker
        self._pool = pool
        self._arena: WeightArena | None = adopt
        if adopt is None and capacity is not None:
            self._arena = pool.borrow(capacity)
        self._counted = 0

    def blob(self, offset: int, nbytes: int) -> np.ndarray:
        """Where a segment's weights are decrypted to (marked in the arena from now on).

        Args:
            offset: the segment's place in the arena.
            nbytes: its bytes.

        Returns:
            The arena's bytes there.
        """
        assert self._arena is not None  # only optimized segments ask, and then the run has an arena
        return self._arena.view(offset, nbytes)

    def count(self, nbytes: int) -> None:
        """Count ``nbytes`` more of the arena as (possibly) holding plaintext.

        Args:
            nbytes: the bytes the schedule marks.
        """
        self.tracker.add(nbytes, "weights")
        self._counted += nbytes

    def trim(self, step: Step) -> None:
        """Zero the stale ranges ``step`` has no room for.

        Args:
            step: the segment about to run.
        """
        if self._arena is None or not step.zero:
            return
        self._arena.zero(step.zero)
        self.tracker.release(step.zeroed_bytes, "weights")
        self._counted -= step.zeroed_bytes

    def keep_only(self, lo: int, hi: int) -> None:
        """Zero every marked byte of the arena outside ``[lo, hi)`` (stale plaintext an adopted
        arena brought along; uncounted, since this run never counted it).

        Args:
            lo: start of the range to keep.
            hi: its end.
        """
        if self._arena is not None:
            self._arena.zero(self._arena.marked_outside(lo, hi))

    def detach(self) -> WeightArena | None:
        """End of the run for an arena the next run takes over: stop counting it, keep it.

        Returns:
            The arena (None when the run had none); the caller gives it back eventually.
        """
        self.tracker.release(self._counted, "weights")
        self._counted = 0
        arena, self._arena = self._arena, None
        return arena

    def give_back(self, wipe_with: Callable[[Callable[[], None]], object] | None) -> None:
        """End of the run: stop counting the arena and hand it back for its wipe.

        Args:
            wipe_with: runs the wipe in the background (see :meth:`~.arena.ArenaPool.give_back`).
        """
        self.tracker.release(self._counted, "weights")
        self._counted = 0
        if self._arena is not None:
            arena, self._arena = self._arena, None
            self._pool.give_back(arena, wipe_with)


def wipe(arrays: dict[str, np.ndarray]) -> None:
    """Zero a sealed segment's weight buffers and drop them.

    Args:
        arrays: the buffers (emptied).
    """
    for array in arrays.values():
        array[...] = 0
    arrays.clear()


def arena_segment(entry: SpillEntry | None, weight_bytes: int, activation_bytes: int) -> ArenaSegment:
    """What the arena schedule needs of a segment.

    Args:
        entry: its spill entry when it runs optimized; None when it runs sealed.
        weight_bytes: the weights it decrypts per run.
        activation_bytes: its activation peak.

    Returns:
        The segment as :func:`~.arena.schedule` sees it.
    """
    if entry is None:
        return ArenaSegment(activation_bytes, sealed_bytes=weight_bytes)
    chunks = tuple((c.start, c.start + c.length - TAG_SIZE) for c in entry.chunks)
    return ArenaSegment(activation_bytes, blob_bytes=entry.nbytes, chunks=chunks)
