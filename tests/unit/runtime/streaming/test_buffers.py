"""Reused weight buffers: aligned, hold no plaintext outside what a segment uses, wiped on return."""

from __future__ import annotations

import numpy as np
import pytest

from sealedml.runtime.streaming.buffers import BufferPool, WeightBuffer
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


def test_pool_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BufferPool(1_000, slots=0)
    with pytest.raises(ValueError):
        BufferPool(-1, slots=1)
