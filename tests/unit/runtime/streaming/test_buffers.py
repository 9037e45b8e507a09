"""Reused weight buffers: aligned, hold no plaintext outside what a segment uses, wiped on return
(now or in the background, but always before anyone borrows them again)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from sealedml.runtime.streaming.buffers import BufferPool, WeightBuffer, WeightBuffers
from sealedml.runtime.streaming.spill import ALIGN


def _fill(view: np.ndarray, value: int) -> None:
    view[:] = value


def test_take_is_aligned_and_zeroes_what_a_larger_segment_left_behind() -> None:
    buffer = WeightBuffer(10_000)
    first = buffer.take(10_000)
    assert first.ctypes.data % ALIGN == 0
    _fill(first, 7)
    second = buffer.take(4_000)
    assert second.ctypes.data == first.ctypes.data  # the same memory, reused
    assert buffer.dirty == 4_000
    assert not np.any(first[4_000:]), "the tail of the earlier segment must be zeroed"
    assert np.all(second == 7)  # the part handed out is overwritten by decryption, not wiped


def test_a_new_buffer_holds_only_zeros() -> None:
    for capacity in (1_000, 3 << 20):  # heap-allocated and mmap-allocated sizes
        freed = np.full(capacity + ALIGN, 0xAB, dtype=np.uint8)  # the heap may hand this memory out again
        del freed
        assert not np.any(WeightBuffer(capacity)._base)


def test_take_grows_after_wiping_the_old_storage() -> None:
    buffer = WeightBuffer(1_000)
    old = buffer.take(1_000)
    _fill(old, 3)
    grown = buffer.take(5_000)
    assert buffer.capacity == 5_000 and grown.nbytes == 5_000
    assert not np.any(old), "storage given up for a larger one must not keep plaintext"


def test_pool_wipes_on_return_and_keeps_a_bounded_number() -> None:
    pool = BufferPool(2_048, slots=2, keep=3)
    first = pool.borrow()
    second = pool.borrow()  # a concurrent run gets its own slots
    assert {id(s) for s in first.slots}.isdisjoint(id(s) for s in second.slots)
    views = [first.for_segment(k).take(2_048 - k) for k in range(2)]
    assert first.for_segment(2) is first.slots[0]  # segment k uses slot k % 2
    for view in views:
        _fill(view, 9)
    pool.give_back(first)
    pool.give_back(second)
    assert pool.idle == 3  # one of the four is freed
    for view in views:
        assert not np.any(view), "a returned buffer must hold only zeros"
    again = pool.borrow()
    assert all(slot.dirty == 0 for slot in again.slots)


def _dirty_set(pool: BufferPool, value: int) -> tuple[WeightBuffers, list[np.ndarray]]:
    """Borrow a set and fill each slot with plaintext-like bytes; the set and views of them."""
    borrowed = pool.borrow()
    views = [borrowed.for_segment(k).take(pool.capacity) for k in range(pool.slots)]
    for view in views:
        _fill(view, value)
    return borrowed, views


def test_background_wipe_runs_later_and_keeps_the_set() -> None:
    pool = BufferPool(4_096, slots=2)
    borrowed, views = _dirty_set(pool, 5)
    jobs: list[Callable[[], None]] = []
    pool.give_back(borrowed, jobs.append)
    assert pool.dirty == 1 and pool.idle == 0
    assert all(np.all(view == 5) for view in views)  # not wiped yet: the job has not run
    jobs.pop()()
    assert pool.dirty == 0 and pool.idle == 2
    assert not any(np.any(view) for view in views)


def test_borrow_wipes_a_set_whose_background_wipe_has_not_run() -> None:
    pool = BufferPool(4_096, slots=2)
    borrowed, views = _dirty_set(pool, 8)
    returned = list(borrowed.slots)
    jobs: list[Callable[[], None]] = []
    pool.give_back(borrowed, jobs.append)
    again = pool.borrow()
    assert {id(s) for s in again.slots} == {id(s) for s in returned}  # reused, not reallocated
    assert not any(np.any(view) for view in views), "a borrowed buffer must hold only zeros"
    assert all(slot.dirty == 0 for slot in again.slots)
    jobs.pop()()  # the late background job finds nothing left to wipe
    assert pool.dirty == 0 and pool.idle == 0


def test_wipe_happens_now_when_the_background_is_gone_and_drain_wipes_the_rest() -> None:
    pool = BufferPool(4_096, slots=1)

    def shut_down(job: Callable[[], None]) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    borrowed, views = _dirty_set(pool, 3)
    pool.give_back(borrowed, shut_down)
    assert pool.dirty == 0 and not np.any(views[0])
    borrowed, later = _dirty_set(pool, 4)
    pool.give_back(borrowed, lambda job: None)  # never runs the job
    assert pool.dirty == 1
    pool.drain()
    assert pool.dirty == 0 and pool.idle == 1 and not np.any(later[0])


def test_pool_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BufferPool(1_000, slots=0)
    with pytest.raises(ValueError):
        BufferPool(-1, slots=1)
