"""One run's plaintext weight memory: a single reused buffer, counted byte for byte.

Optimized segments decrypt their weights into a *weight arena* — one aligned
buffer per run, borrowed from a per-model :class:`ArenaPool` — instead of a
fresh allocation per segment. Fresh buffers made the kernel fault in and zero
every page (~100 MB per ResNet-50 request, a third of the cost of decrypting)
and unmap them again afterwards.

**What is counted.** Memory that held a segment's plaintext keeps holding it
after the segment has run, until something overwrites or zeroes it. So the
run's tracker counts the arena's *marked* bytes — everything that may hold
plaintext, live or stale — not just the segment that is running. A segment's
weights are "released" only when its bytes are overwritten by a later segment's
weights or zeroed. (The two-slot design this replaces counted only the live
segment. While segment *k* ran, the other slot still held segment *k − 1*.
ResNet-50 at 32 MB then had ~45 MB of plaintext resident while the tracker
said ≤ 32 MB.)

**Layout** (:func:`schedule`). The arena is as large as the largest segment.
With prefetch, segment *k* sits at the front (even *k*) or the back (odd *k*),
so segment *k + 1* can be decrypted while *k* computes:

* Its chunks that lie outside *k*'s bytes are claimed first. A back-placed
  segment is claimed last chunk first, so its writes grow from the far end
  toward *k*. They stop at the first chunk that would touch *k*, or that would
  take the marked bytes past what the budget leaves beside *k*.
* Writing over stale plaintext costs nothing: those bytes are marked already.
* When *k + 1*'s turn comes, *k*'s bytes are stale. If the marked bytes plus
  *k + 1*'s activations would exceed the budget, the stale bytes nearest to
  *k + 1* are zeroed first. The plan guarantees that a segment alone fits, so
  this always succeeds. For ResNet-50 at 32 MB no zeroing is needed at all.

Without prefetch every segment starts at the front.

**Between requests the pool holds only zeros.** Giving an arena back zeroes its
marked bytes, either on the spot or on a background thread after the run's
outputs are returned (``give_back(..., wipe_with=...)``). An arena whose wipe
has not run yet is never handed out as is: :meth:`ArenaPool.borrow` wipes it
first, and :meth:`ArenaPool.drain` (called by ``StreamingModel.close``) wipes
whatever is left. The one arena outside the pool between requests is the one a run
hands to the next with its first segment decrypted (:mod:`.warm`): it holds that
segment and zeros.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sealedml.runtime.memory_bounded.spill import ALIGN

__all__ = [
    "ArenaPool",
    "ArenaSegment",
    "Step",
    "WeightArena",
    "aligned_array",
    "schedule",
]

#: Runs a callable in the background, e.g. ``ThreadPoolExecutor.submit``.
Submit = Callable[[Callable[[], None]], object]
#: A half-open byte range ``[lo, hi)`` of the arena.
Span = tuple[int, int]


def aligned_array(capacity: int, *, zeroed: bool = False) -> np.ndarray:
    """A ``capacity``-byte array starting on an :data:`ALIGN` boundary (keeps its allocation alive).

    Uninitialized unless ``zeroed``: for a buffer about to be overwritten whole.
    """
    raw = (np.zeros if zeroed else np.empty)(capacity + ALIGN, dtype=np.uint8)
    shift = -raw.ctypes.data % ALIGN
    return raw[shift : shift + capacity]


class _Ranges:
    """Disjoint, sorted half-open byte ranges (a handful at most: no tree needed)."""

    def __init__(self, items: Sequence[Span] = ()) -> None:
        self.items: list[Span] = list(items)

    def copy(self) -> _Ranges:
        return _Ranges(self.items)

    @property
    def total(self) -> int:
        return sum(hi - lo for lo, hi in self.items)

    def overlap(self, lo: int, hi: int) -> int:
        return sum(max(0, min(hi, b) - max(lo, a)) for a, b in self.items)

    def add(self, lo: int, hi: int) -> int:
        """Include ``[lo, hi)``; returns how many bytes were not included before."""
        if hi <= lo:
            return 0
        grown = hi - lo - self.overlap(lo, hi)
        kept: list[Span] = []
        for a, b in self.items:
            if b < lo or a > hi:
                kept.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        kept.append((lo, hi))
        self.items = sorted(kept)
        return grown

    def remove(self, lo: int, hi: int) -> None:
        kept: list[Span] = []
        for a, b in self.items:
            if a < lo:
                kept.append((a, min(b, lo)))
            if b > hi:
                kept.append((max(a, hi), b))
        self.items = [(a, b) for a, b in kept if b > a]

    def nearest_outside(self, lo: int, hi: int, nbytes: int) -> list[Span]:
        """``nbytes`` of the included bytes outside ``[lo, hi)``, nearest to it first."""
        pieces: list[tuple[int, Span]] = []
        for a, b in self.items:
            if a < lo:
                below = (a, min(b, lo))
                pieces.append((lo - below[1], below))
            if b > hi:
                above = (max(a, hi), b)
                pieces.append((above[0] - hi, above))
        chosen: list[Span] = []
        for _, (a, b) in sorted(pieces):
            if nbytes <= 0:
                break
            take = min(nbytes, b - a)
            # Take the part of the piece next to [lo, hi).
            chosen.append((b - take, b) if b <= lo else (a, a + take))
            nbytes -= take
        return chosen


@dataclass(frozen=True)
class ArenaSegment:
    """What :func:`schedule` needs to know about one segment.

    Attributes:
        activation_bytes: the planner's activation peak of the segment.
        blob_bytes: plaintext bytes of its weight blob in the arena (optimized segments);
            None for a segment whose weights come from the sealed container (fresh
            buffers, not the arena).
        chunks: each spill chunk's plaintext range ``[start, end)`` within the blob.
        sealed_bytes: weight bytes of a sealed segment (held beside the arena).
    """

    activation_bytes: int
    blob_bytes: int | None = None
    chunks: tuple[Span, ...] = ()
    sealed_bytes: int = 0


@dataclass(frozen=True)
class Step:
    """How one segment uses the arena in every run (see :func:`schedule`).

    Attributes:
        offset: where its blob starts in the arena (optimized segments).
        reverse: claim its chunks last first (a back-placed blob).
        ahead: chunks claimable while the previous segment computes (optimized segments).
        ahead_bytes: plaintext bytes decrypted while the previous segment computes: those
            chunks, or a sealed segment's whole weights when they fit (else 0).
        ahead_growth: arena bytes those chunks mark that were not marked before.
        zero: stale ranges to zero when its turn comes, before the rest is decrypted.
        growth: arena bytes the rest of its chunks mark that were not marked before.
        help: whether the compute thread may decrypt beside the prefetch thread (room for
            a second scratch buffer).
        peak: bound of the tracked bytes while it computes (including what is decrypted
            ahead for the next segment).
    """

    offset: int = 0
    reverse: bool = False
    ahead: int = 0
    ahead_bytes: int = 0
    ahead_growth: int = 0
    zero: tuple[Span, ...] = ()
    growth: int = 0
    help: bool = True
    peak: int = 0

    @property
    def zeroed_bytes(self) -> int:
        """Bytes :attr:`zero` covers."""
        return sum(hi - lo for lo, hi in self.zero)


def capacity_for(segments: Sequence[ArenaSegment]) -> int:
    """The arena size :func:`schedule` lays ``segments`` out in: the largest blob."""
    return max((s.blob_bytes for s in segments if s.blob_bytes is not None), default=0)


def _span(segment: ArenaSegment, index: int, capacity: int, alternate: bool) -> Span:
    assert segment.blob_bytes is not None
    if alternate and index % 2:
        start = (capacity - segment.blob_bytes) // ALIGN * ALIGN
        return start, start + segment.blob_bytes
    return 0, segment.blob_bytes


def schedule(
    segments: Sequence[ArenaSegment], *, budget: int, scratch: int, second_scratch: int, prefetch: bool
) -> tuple[Step, ...]:
    """Lay the segments out in an arena of :func:`capacity_for` bytes and bound every run's peak.

    The arena starts a run zeroed, and every run follows the same steps, so this is
    decided once per set of segments. For segment ``k``, when its turn comes:

    1. The stale bytes nearest to it are zeroed while the marked bytes, together with
       ``k``'s activations, a scratch buffer and a sealed segment's weights, would
       exceed the budget once ``k`` is fully decrypted.
    2. ``k`` is fully decrypted, marking its bytes.
    3. While ``k`` computes, segment ``k + 1`` is decrypted ahead (with ``prefetch``):
       its chunks clear of ``k``'s bytes, in order from the far end, while the marked
       bytes stay within what the budget leaves; a sealed ``k + 1`` only whole.

    Args:
        segments: per segment, in execution order.
        budget: the plan's budget in bytes.
        scratch: one decrypting thread's scratch reserve (counted throughout).
        second_scratch: the compute thread's scratch when it helps decrypt.
        prefetch: whether the next segment is decrypted while one computes.

    Returns:
        One :class:`Step` per segment.

    Raises:
        ValueError: a segment does not fit the budget even alone (the plan was not
            made for these segments).
    """
    capacity = capacity_for(segments)
    spans = [_span(s, k, capacity, prefetch) if s.blob_bytes is not None else (0, 0) for k, s in enumerate(segments)]
    marked = _Ranges()
    ahead: list[tuple[int, int, int]] = [(0, 0, 0)] * len(segments)
    steps: list[Step] = []
    for k, segment in enumerate(segments):
        lo, hi = spans[k]
        held = segment.sealed_bytes if segment.blob_bytes is None else 0
        target = budget - segment.activation_bytes - scratch - held
        excess = marked.total + (hi - lo) - marked.overlap(lo, hi) - target
        zero: list[Span] = []
        if excess > 0:
            zero = marked.nearest_outside(lo, hi, excess)
            if sum(b - a for a, b in zero) < excess:
                raise ValueError(f"segment {k} does not fit the budget even alone")
            for a, b in zero:
                marked.remove(a, b)
        growth = marked.add(lo, hi) - ahead[k][2]
        extra = 0
        if prefetch and k + 1 < len(segments):
            room = target - marked.total
            ahead[k + 1] = _ahead(segments[k + 1], spans[k + 1], (lo, hi), marked, room, reverse=(k + 1) % 2 == 1)
            extra = ahead[k + 1][2] if segments[k + 1].blob_bytes is not None else ahead[k + 1][1]
        base = marked.total + held + segment.activation_bytes
        steps.append(
            Step(
                offset=lo,
                reverse=prefetch and k % 2 == 1,
                ahead=ahead[k][0],
                ahead_bytes=ahead[k][1],
                ahead_growth=ahead[k][2],
                zero=tuple(zero),
                growth=growth,
                help=base + scratch + second_scratch <= budget,
                peak=base + scratch + extra,
            )
        )
    return tuple(steps)


def _ahead(
    segment: ArenaSegment, span: Span, live: Span, marked: _Ranges, room: int, *, reverse: bool
) -> tuple[int, int, int]:
    """``(chunks, plaintext bytes, newly marked bytes)`` of ``segment`` decrypted ahead."""
    if segment.blob_bytes is None:
        return (0, segment.sealed_bytes, 0) if segment.sealed_bytes <= room else (0, 0, 0)
    probe = marked.copy()
    count = nbytes = used = 0
    order = reversed(segment.chunks) if reverse else iter(segment.chunks)
    for start, end in order:
        lo, hi = span[0] + start, span[0] + end
        if lo < live[1] and live[0] < hi:
            break  # the running segment's bytes
        grown = hi - lo - probe.overlap(lo, hi)
        if used + grown > room:
            break
        probe.add(lo, hi)
        used += grown
        count += 1
        nbytes += hi - lo
    return count, nbytes, used


class WeightArena:
    """One run's weight memory (see the module docstring); used by one run at a time."""

    def __init__(self, capacity: int) -> None:
        # Zeroed, not just allocated: a small allocation may reuse heap memory that held
        # anything, and everything not marked must be zeros. (Large ones are fresh zero
        # pages either way, so this costs nothing where it matters.)
        self._base = aligned_array(capacity, zeroed=True)
        self._marked = _Ranges()

    @property
    def capacity(self) -> int:
        """Bytes of the buffer."""
        return int(self._base.nbytes)

    @property
    def marked(self) -> int:
        """Bytes that may hold plaintext (0 once wiped)."""
        return self._marked.total

    def nonzero_bytes(self) -> int:
        """Bytes of the buffer that are not zero (scans it all; for tests and diagnostics).

        Every such byte may be plaintext, so it must lie in the marked ranges.
        """
        return int(np.count_nonzero(self._base))

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        """The ``nbytes`` bytes at ``offset``, marked from now on as possibly holding plaintext."""
        if offset < 0 or offset % ALIGN or offset + nbytes > self.capacity:
            raise ValueError("view outside the arena or not aligned")
        self._marked.add(offset, offset + nbytes)
        return self._base[offset : offset + nbytes]

    def marked_outside(self, lo: int, hi: int) -> list[Span]:
        """The marked ranges outside ``[lo, hi)``."""
        probe = self._marked.copy()
        probe.remove(lo, hi)
        return list(probe.items)

    def zero(self, spans: Sequence[Span]) -> None:
        """Zero ``spans`` (stale plaintext) and unmark them."""
        for lo, hi in spans:
            self._base[lo:hi] = 0
            self._marked.remove(lo, hi)

    def wipe(self) -> None:
        """Zero every marked byte."""
        self.zero(self._marked.items)


class ArenaPool:
    """Wiped arenas shared by the runs of one model (thread-safe).

    Concurrent runs each borrow their own arena; at most ``keep`` idle arenas stay
    allocated (holding only zeros), the rest are freed.
    """

    def __init__(self, *, keep: int = 2) -> None:
        if keep < 0:
            raise ValueError("keep ≥ 0 required")
        self._keep = keep
        self._idle: list[WeightArena] = []
        #: Arenas given back whose wipe has not started yet (newest last).
        self._dirty: list[WeightArena] = []
        self._lock = threading.Lock()

    @property
    def idle(self) -> int:
        """Idle, wiped arenas kept for the next runs."""
        with self._lock:
            return len(self._idle)

    @property
    def idle_arenas(self) -> tuple[WeightArena, ...]:
        """The idle arenas themselves (for tests and diagnostics: each holds only zeros)."""
        with self._lock:
            return tuple(self._idle)

    @property
    def dirty(self) -> int:
        """Arenas given back and not yet wiped."""
        with self._lock:
            return len(self._dirty)

    def borrow(self, capacity: int) -> WeightArena:
        """A wiped arena of at least ``capacity`` bytes for one run.

        An idle one first, then one still waiting for its wipe (wiped here, before it is
        handed out); a new one otherwise. Smaller ones found on the way are freed.
        """
        with self._lock:
            arena = self._idle.pop() if self._idle else None
            if arena is None and self._dirty:
                arena = self._dirty.pop()
        if arena is not None:
            arena.wipe()
            if arena.capacity >= capacity:
                return arena
        return WeightArena(capacity)

    def give_back(self, arena: WeightArena, wipe_with: Submit | None = None) -> None:
        """Return a run's arena: wipe it and keep it for later runs (up to ``keep``).

        Call it only once no thread writes into the arena any more.

        Args:
            arena: from :meth:`borrow`.
            wipe_with: runs a callable in the background (e.g. an executor's ``submit``):
                the wipe then happens there, off the caller's critical path. Without it,
                or when it raises ``RuntimeError`` (a shut-down executor), the wipe
                happens now.
        """
        if wipe_with is None:
            self._wipe_and_keep(arena)
            return
        with self._lock:
            self._dirty.append(arena)
        try:
            wipe_with(self._wipe_oldest)
        except RuntimeError:
            self._wipe_oldest()

    def drain(self) -> None:
        """Wipe every arena still waiting for its wipe, now."""
        while self.dirty:
            self._wipe_oldest()

    def _wipe_oldest(self) -> None:
        with self._lock:
            if not self._dirty:
                return  # a borrower took it (and wiped it) first
            arena = self._dirty.pop(0)
        self._wipe_and_keep(arena)

    def _wipe_and_keep(self, arena: WeightArena) -> None:
        arena.wipe()
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(arena)
