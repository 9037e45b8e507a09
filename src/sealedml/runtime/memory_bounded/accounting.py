"""Byte accounting for memory-bounded execution.

Two views of memory, kept deliberately apart:

* :class:`MemoryTracker` — the *tracked* working set: every buffer the
  streaming executor holds (decrypted weights, live activations, decryption
  scratch) plus the planner's estimate of the activations ONNX Runtime keeps
  inside a running segment. This is what the budget bounds, and what
  ``StreamingModel.last_peak_bytes`` reports.
* :func:`process_memory` — what the kernel says about the whole process
  (``VmRSS`` / ``VmHWM`` from ``/proc/self/status``): Python, NumPy and ONNX
  Runtime code, allocator slack and ONNX Runtime's own scratch buffers
  included. The benchmark reports both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

__all__ = [
    "KINDS",
    "MemoryTracker",
    "ProcessMemory",
    "TrackerSnapshot",
    "process_memory",
    "reset_peak_rss",
]

#: The categories a tracked byte belongs to.
KINDS: tuple[str, ...] = ("weights", "activations", "estimated", "scratch")

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class TrackerSnapshot:
    """A consistent view of a :class:`MemoryTracker`.

    Attributes:
        current: bytes held now.
        peak: the largest ``current`` ever observed.
        peak_breakdown: bytes per kind (see :data:`KINDS`) at the moment of the peak.
    """

    current: int
    peak: int
    peak_breakdown: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


class MemoryTracker:
    """A thread-safe counter of bytes held, with its high-water mark.

    The executor calls :meth:`add` when it allocates or receives a buffer and
    :meth:`release` when it drops the last reference; the prefetch thread and
    the compute thread update the same tracker, so every update takes a lock.

    Args:
        name: a label for messages.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._by_kind: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._current = 0
        self._peak = 0
        self._peak_breakdown: dict[str, int] = dict.fromkeys(KINDS, 0)

    def add(self, nbytes: int, kind: str = "activations") -> None:
        """Count ``nbytes`` more bytes of ``kind`` as held.

        Args:
            nbytes: a non-negative byte count.
            kind: one of :data:`KINDS`.

        Raises:
            ValueError: negative size or unknown kind.
        """
        if nbytes < 0:
            raise ValueError("cannot add a negative size")
        if kind not in self._by_kind:
            raise ValueError(f"unknown memory kind {kind!r}")
        with self._lock:
            self._by_kind[kind] += nbytes
            self._current += nbytes
            if self._current > self._peak:
                self._peak = self._current
                self._peak_breakdown = dict(self._by_kind)

    def release(self, nbytes: int, kind: str = "activations") -> None:
        """Count ``nbytes`` bytes of ``kind`` as freed.

        Args:
            nbytes: a non-negative byte count, at most what is held of ``kind``.
            kind: one of :data:`KINDS`.

        Raises:
            ValueError: negative size, unknown kind, or more released than held.
        """
        if nbytes < 0:
            raise ValueError("cannot release a negative size")
        with self._lock:
            held = self._by_kind.get(kind)
            if held is None:
                raise ValueError(f"unknown memory kind {kind!r}")
            if nbytes > held:
                raise ValueError(f"releasing {nbytes} bytes of {kind} but only {held} are held")
            self._by_kind[kind] = held - nbytes
            self._current -= nbytes

    @contextmanager
    def hold(self, nbytes: int, kind: str = "scratch") -> Iterator[None]:
        """Count ``nbytes`` as held for the duration of a ``with`` block.

        Args:
            nbytes: bytes held inside the block.
            kind: one of :data:`KINDS`.
        """
        self.add(nbytes, kind)
        try:
            yield
        finally:
            self.release(nbytes, kind)

    def held(self, kind: str) -> int:
        """Bytes of ``kind`` held now.

        Raises:
            ValueError: unknown kind.
        """
        with self._lock:
            if kind not in self._by_kind:
                raise ValueError(f"unknown memory kind {kind!r}")
            return self._by_kind[kind]

    @property
    def current(self) -> int:
        """Bytes held now."""
        with self._lock:
            return self._current

    @property
    def peak(self) -> int:
        """The high-water mark of :attr:`current`."""
        with self._lock:
            return self._peak

    def snapshot(self) -> TrackerSnapshot:
        """Current bytes, peak, and the per-kind breakdown at the peak."""
        with self._lock:
            return TrackerSnapshot(self._current, self._peak, MappingProxyType(dict(self._peak_breakdown)))


@dataclass(frozen=True)
class ProcessMemory:
    """Resident memory of this process as the kernel reports it.

    Attributes:
        rss_bytes: ``VmRSS``, resident now.
        hwm_bytes: ``VmHWM``, the resident high-water mark (since start or the
            last :func:`reset_peak_rss`).
    """

    rss_bytes: int
    hwm_bytes: int


def process_memory() -> ProcessMemory:
    """Read ``VmRSS`` and ``VmHWM`` from ``/proc/self/status``.

    Returns:
        The current values; both 0 where ``/proc`` is unavailable (not Linux).
    """
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        text = _STATUS.read_text()
    except OSError:
        return ProcessMemory(0, 0)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024  # the kernel reports kB (KiB)
    return ProcessMemory(values["VmRSS"], values["VmHWM"])


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0: write ``5`` to ``/proc/self/clear_refs``).

    Returns:
        True if the kernel accepted the reset, False otherwise (then ``VmHWM``
        keeps its value since process start).
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
