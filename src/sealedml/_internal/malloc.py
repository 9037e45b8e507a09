"""glibc allocator settings for processes that move large buffers per request.

Every request moves a few hundred kilobytes to megabytes through several fresh
buffers (the body read, the decrypted payload, the tensors, the sealed answer).
glibc serves allocations above its mmap threshold with fresh ``mmap`` pages and
returns freed memory at the top of the heap to the kernel: each such buffer then
costs a page fault per 4 KiB and the kernel's zeroing of every page. Measured on
this project's machine: sealing a 600 KB MobileNetV2 request took 0.75–0.94 ms,
0.18 ms with the buffers served from the heap. :func:`tune_for_large_buffers`
raises both thresholds so those buffers are reused from the heap instead.

The memory-bounded engine still hands freed memory back explicitly after its
load-time passes (:func:`trim_heap`), which these settings do not prevent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any

__all__ = [
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "prefault_heap",
    "single_arena",
    "trim_heap",
    "tune_for_large_buffers",
]

#: Allocations below this size come from the heap, not from fresh mmap pages.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap is returned to the kernel only above this.
TRIM_THRESHOLD = 128 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free.restype = None
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        libc.memset.restype = ctypes.c_void_p
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


def tune_for_large_buffers() -> bool:
    """Serve request-sized buffers from the heap (see the module docstring).

    Returns:
        True if glibc accepted the settings, False where there is no glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def trim_heap() -> bool:
    """Return freed heap memory to the operating system (glibc ``malloc_trim(0)``).

    A one-off pass that allocates and frees a lot — the optimized-segment mode decrypts
    every weight and lets ONNX Runtime copy and reorder it at load — leaves the freed
    memory cached in the allocator's arenas: resident, and still holding the freed
    (plaintext) bytes until they are reused. Trimming hands those pages back to the
    kernel, which zeroes them before any reuse.

    Returns:
        True if ``malloc_trim`` ran (glibc), False where it does not exist.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def single_arena() -> bool:
    """Have every thread of this process allocate from one glibc arena (``M_ARENA_MAX`` 1).

    glibc gives threads their own arenas, so memory one thread faulted in and freed is
    not what another thread's next allocation reuses. An instance faults in heap pages
    ahead of its model loads (:func:`prefault_heap`, :mod:`sealedml.runtime.heap_reserve`)
    on one thread, and loads them on another: that only helps if both share the arena.
    Effective for threads that allocate for the first time after the call; the instance
    template calls it before anything starts a thread (``sealedml.platform.template``),
    and instances started as fresh processes also get ``MALLOC_ARENA_MAX=1``.

    Returns:
        True if glibc accepted the setting, False where there is no glibc.
    """
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, 1))


def prefault_heap(nbytes: int, *, piece: int = 4 * 1024 * 1024, stop: Callable[[], bool] | None = None) -> int:
    """Leave ``nbytes`` of zeroed heap pages faulted in and free, for the next large allocations to reuse.

    A process pays a page fault (and the kernel's zeroing) for every 4 KiB the first time
    its heap grows: measured here, loading MobileNetV2 (a 14 MB payload, as much again in
    ONNX Runtime's packed weights) spent ~25 ms of a 70 ms load on ~9,500 faults. The
    pages are allocated in zero-filled pieces below :data:`MMAP_THRESHOLD` (so they come
    from the heap), through glibc without holding the GIL, and freed together; with
    :func:`tune_for_large_buffers` freed pages stay in the heap and the next allocations
    reuse them. Zero-filling also wipes stale
    bytes (other buffers' plaintext) from the freed memory it reuses.

    Args:
        nbytes: how much to fault in.
        piece: the allocation size; ``stop`` is asked between pieces.
        stop: when it returns True, stop early and free what is held (a model load wants
            the memory now).

    Returns:
        The bytes faulted in and freed.
    """
    libc = _libc()
    held: list[Any] = []  # glibc pointers, or bytearrays where there is no glibc
    done = 0
    try:
        while done < nbytes and not (stop is not None and stop()):
            size = min(piece, nbytes - done)
            if libc is None:
                held.append(bytearray(size))  # zero-filled, holding the GIL meanwhile
            else:
                # ctypes releases the GIL around each call, so a piece's ~1,000 page faults
                # (several milliseconds) never hold up the instance's event loop.
                pointer = libc.malloc(size)
                if not pointer:
                    break
                held.append(pointer)
                libc.memset(pointer, 0, size)  # every page faulted in and zeroed
            done += size
    finally:
        if libc is not None:
            for pointer in held:
                libc.free(pointer)
    return done
