"""The weight arena: aligned, zero outside what is marked, wiped before anyone borrows it again;
and its schedule, which counts stale plaintext and never lets a run exceed its budget."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealedml.runtime.memory_bounded.arena import ArenaPool, ArenaSegment, WeightArena, capacity_for, schedule
from sealedml.runtime.memory_bounded.spill import ALIGN

# -- the arena ----------------------------------------------------------------------------------


def test_views_are_aligned_and_marked() -> None:
    arena = WeightArena(10_000)
    front = arena.view(0, 4_000)
    back = arena.view(6_016, 3_984)
    assert front.ctypes.data % ALIGN == 0 and back.ctypes.data % ALIGN == 0
    assert arena.marked == 4_000 + 3_984
    arena.view(2_048, 4_000)  # bridges the gap between the two: only the new bytes are marked
    assert arena.marked == 10_000


@pytest.mark.parametrize(("offset", "nbytes"), [(-64, 10), (1, 10), (9_984, 64)])
def test_views_outside_the_arena_or_unaligned_are_refused(offset: int, nbytes: int) -> None:
    with pytest.raises(ValueError, match="outside the arena or not aligned"):
        WeightArena(10_000).view(offset, nbytes)


def test_zero_and_wipe_leave_no_plaintext() -> None:
    arena = WeightArena(8_192)
    arena.view(0, 8_192)[:] = 7
    arena.zero([(1_000, 3_000)])
    assert arena.marked == 8_192 - 2_000
    assert not np.any(arena._base[1_000:3_000]) and np.all(arena._base[:1_000] == 7)
    arena.wipe()
    assert arena.marked == 0 and arena.nonzero_bytes() == 0


def test_a_new_arena_holds_only_zeros() -> None:
    for capacity in (1_000, 3 << 20):  # heap-allocated and mmap-allocated sizes
        freed = np.full(capacity + ALIGN, 0xAB, dtype=np.uint8)  # the heap may hand this memory out again
        del freed
        assert WeightArena(capacity).nonzero_bytes() == 0


# -- the pool -----------------------------------------------------------------------------------


def _dirty(pool: ArenaPool, capacity: int, value: int) -> tuple[WeightArena, np.ndarray]:
    arena = pool.borrow(capacity)
    view = arena.view(0, capacity)
    view[:] = value
    return arena, view


def test_pool_wipes_on_return_and_keeps_a_bounded_number() -> None:
    pool = ArenaPool(keep=2)
    arenas = [_dirty(pool, 2_048, 9) for _ in range(3)]  # concurrent runs get their own arenas
    assert len({id(a) for a, _ in arenas}) == 3
    for arena, _ in arenas:
        pool.give_back(arena)
    assert pool.idle == 2  # one of the three is freed
    for _, view in arenas:
        assert not np.any(view), "a returned arena must hold only zeros"
    again = pool.borrow(2_048)
    assert any(again is arena for arena, _ in arenas)  # reused, not reallocated


def test_a_deferred_wipe_runs_later_and_nothing_dirty_is_handed_out() -> None:
    pool = ArenaPool()
    queued: list[Callable[[], None]] = []
    arena, view = _dirty(pool, 4_096, 5)
    pool.give_back(arena, wipe_with=queued.append)
    assert pool.dirty == 1 and np.all(view == 5)  # not wiped yet: the caller returned first
    borrowed = pool.borrow(4_096)  # before the background wipe ran
    assert borrowed is arena and not np.any(view), "a borrowed arena must be wiped first"
    queued.pop()()  # the background wipe finds nothing left to do
    assert pool.dirty == 0


def test_drain_wipes_what_is_still_queued_and_a_dead_executor_wipes_at_once() -> None:
    pool = ArenaPool()
    arena, view = _dirty(pool, 4_096, 3)
    pool.give_back(arena, wipe_with=lambda fn: None)  # an executor that never gets to it
    pool.drain()
    assert pool.dirty == 0 and not np.any(view)

    def shut_down(fn: Callable[[], None]) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    arena, view = _dirty(pool, 4_096, 4)
    pool.give_back(arena, wipe_with=shut_down)
    assert pool.dirty == 0 and not np.any(view)


def test_a_larger_run_gets_a_larger_arena_and_the_small_one_is_wiped() -> None:
    pool = ArenaPool()
    small, view = _dirty(pool, 1_024, 6)
    pool.give_back(small, wipe_with=lambda fn: None)
    big = pool.borrow(8_192)
    assert big.capacity == 8_192 and big is not small
    assert not np.any(view)


def test_pool_rejects_a_negative_keep() -> None:
    with pytest.raises(ValueError, match="keep"):
        ArenaPool(keep=-1)


# -- the schedule -------------------------------------------------------------------------------


def _chunks(nbytes: int, chunk: int) -> tuple[tuple[int, int], ...]:
    return tuple((start, min(start + chunk, nbytes)) for start in range(0, nbytes, chunk))


def _optimized(blob: int, activations: int, chunk: int = 64) -> ArenaSegment:
    return ArenaSegment(activations, blob_bytes=blob, chunks=_chunks(blob, chunk))


def test_alternate_ends_and_prefetch_only_clear_of_the_running_segment() -> None:
    segments = [_optimized(640, 0), _optimized(512, 0), _optimized(640, 0)]
    steps = schedule(segments, budget=10_000, scratch=0, second_scratch=0, prefetch=True)
    assert capacity_for(segments) == 640
    assert [s.offset for s in steps] == [0, 128, 0]
    assert [s.reverse for s in steps] == [False, True, False]
    # Segment 1 sits at [128, 640); segment 0 runs in [0, 640): no chunk of 1 is clear of it.
    assert steps[1].ahead == 0
    # Segment 2 sits at [0, 640); segment 1 runs in [128, 640): its first two 64-byte chunks are clear.
    assert steps[2].ahead == 2 and steps[2].ahead_bytes == 128 and steps[2].ahead_growth == 0  # stale bytes
    assert all(not s.zero for s in steps)


def test_stale_plaintext_is_counted_and_zeroed_nearest_first_when_the_budget_needs_it() -> None:
    # Segment 1 has large activations: beside them the budget has no room for all of
    # segment 0's stale bytes, so the ones next to segment 1 are zeroed first.
    segments = [_optimized(640, 0), _optimized(320, 500)]
    steps = schedule(segments, budget=1_000, scratch=0, second_scratch=0, prefetch=True)
    assert steps[1].offset == 320
    assert steps[1].zero == ((180, 320),)
    assert steps[1].peak == 1_000  # 180 stale + 320 live + 500 activations
    serial = schedule(segments, budget=1_000, scratch=0, second_scratch=0, prefetch=False)
    assert serial[1].offset == 0 and serial[1].zero == ((320, 460),)


def test_a_sealed_segment_is_held_beside_the_arena() -> None:
    segments = [_optimized(640, 0), ArenaSegment(100, sealed_bytes=600), _optimized(640, 0)]
    steps = schedule(segments, budget=1_000, scratch=0, second_scratch=0, prefetch=True)
    # 640 stale + 600 sealed + 100 activations > 1000: 340 stale bytes go first.
    assert steps[1].zeroed_bytes == 340 and steps[1].peak <= 1_000
    assert steps[1].ahead_bytes == 0  # it did not fit whole beside segment 0
    roomy = schedule(segments, budget=2_000, scratch=0, second_scratch=0, prefetch=True)
    assert roomy[1].ahead_bytes == 600 and roomy[0].peak == 640 + 600


def test_help_needs_room_for_a_second_scratch_buffer() -> None:
    segments = [_optimized(640, 300)]
    assert schedule(segments, budget=1_000, scratch=30, second_scratch=30, prefetch=True)[0].help
    assert not schedule(segments, budget=1_000, scratch=30, second_scratch=31, prefetch=True)[0].help


def test_a_segment_that_cannot_fit_alone_is_refused() -> None:
    with pytest.raises(ValueError, match="segment 0 does not fit"):
        schedule([_optimized(640, 500)], budget=1_000, scratch=0, second_scratch=0, prefetch=True)


_segment = st.one_of(
    st.builds(
        _optimized,
        blob=st.integers(1, 40).map(lambda n: n * 50),
        activations=st.integers(0, 600),
        chunk=st.sampled_from([64, 200, 1_000]),
    ),
    st.builds(lambda w, a: ArenaSegment(a, sealed_bytes=w), st.integers(0, 1_500), st.integers(0, 600)),
)


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(_segment, min_size=1, max_size=8), prefetch=st.booleans(), scratch=st.integers(0, 64))
def test_replaying_the_schedule_never_exceeds_the_budget(
    segments: list[ArenaSegment], prefetch: bool, scratch: int
) -> None:
    """Replay every step on a real arena, writing each chunk as the executor does."""
    budget = 2_000 + 2 * scratch
    fits = all((s.blob_bytes or s.sealed_bytes) + s.activation_bytes + scratch <= budget for s in segments)
    if not fits:
        with pytest.raises(ValueError, match="does not fit"):
            schedule(segments, budget=budget, scratch=scratch, second_scratch=scratch, prefetch=prefetch)
        return
    steps = schedule(segments, budget=budget, scratch=scratch, second_scratch=scratch, prefetch=prefetch)
    arena = WeightArena(capacity_for(segments))
    counted = 0  # what the run's tracker counts as weights in the arena
    for k, (segment, step) in enumerate(zip(segments, steps, strict=True)):
        held = segment.sealed_bytes if segment.blob_bytes is None else 0
        live = (step.offset, step.offset + segment.blob_bytes) if segment.blob_bytes is not None else (0, 0)
        for lo, hi in step.zero:
            assert hi <= live[0] or lo >= live[1], "the schedule zeroes the segment's own bytes"
        arena.zero(step.zero)
        counted -= step.zeroed_bytes
        if segment.blob_bytes is not None:
            arena.view(step.offset, segment.blob_bytes)[:] = k + 1
        counted += step.ahead_growth + step.growth
        assert arena.nonzero_bytes() <= counted == arena.marked
        if prefetch and k + 1 < len(segments) and segments[k + 1].blob_bytes is not None:
            nxt, nstep = segments[k + 1], steps[k + 1]
            order = list(reversed(nxt.chunks)) if nstep.reverse else list(nxt.chunks)
            for start, end in order[: nstep.ahead]:
                lo, hi = nstep.offset + start, nstep.offset + end
                assert hi <= live[0] or lo >= live[1], "decrypted ahead over the running segment"
                arena._base[lo:hi] = k + 2
                arena._marked.add(lo, hi)
            assert arena.marked == counted + nstep.ahead_growth
        ahead_sealed = steps[k + 1].ahead_bytes if k + 1 < len(segments) and segments[k + 1].blob_bytes is None else 0
        assert arena.marked + held + segment.activation_bytes + scratch + ahead_sealed <= step.peak <= budget
