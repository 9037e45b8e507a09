"""Async caches with single-flight loading (no busy-waiting).

Concurrent callers asking for the same missing key wait on one shared future
while the first caller loads it (Ray Serve's multiplexer pattern: a lock with a
double check). Entries have a size (bytes) and an optional expiry; the cache
evicts least recently used entries beyond its byte budget and calls
``on_evict`` so secrets can be dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["CacheStats", "SingleFlightLRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheStats:
    """Counters for metrics."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_seconds: list[float] = field(default_factory=list)


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int
    expires_at: float | None


class SingleFlightLRU(Generic[K, V]):
    """An LRU cache bounded by total size, with single-flight async loads.

    Args:
        max_bytes: total size budget (at least one entry is always kept).
        on_evict: called with each evicted or expired value.
        clock: wall clock for expiries (injectable for tests).
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        on_evict: Callable[[V], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self._on_evict = on_evict
        self._clock = clock
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def keys(self) -> list[K]:
        return list(self._entries)

    def peek(self, key: K) -> V | None:
        """The cached, unexpired value (marks it recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= self._clock():
            self.discard(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    def discard(self, key: K) -> None:
        """Drop an entry (calls ``on_evict``)."""
        entry = self._entries.pop(key, None)
        if entry is not None and self._on_evict is not None:
            self._on_evict(entry.value)

    async def get(self, key: K, load: Callable[[], Awaitable[tuple[V, int, float | None]]]) -> V:
        """Return the value for ``key``, loading it once for all concurrent callers.

        ``load`` returns ``(value, size_bytes, expires_at or None)``. If it
        raises, every waiter gets the same exception and nothing is cached.
        """
        value = self.peek(key)
        if value is not None:
            self.stats.hits += 1
            return value
        pending = self._inflight.get(key)
        if pending is None:
            self.stats.misses += 1
            # The load runs in its own task: a caller that is cancelled (its
            # client went away) must not cancel the load the others wait for.
            pending = asyncio.ensure_future(self._load(key, load))
            self._inflight[key] = pending
        else:
            self.stats.hits += 1
        return await asyncio.shield(pending)

    async def _load(self, key: K, load: Callable[[], Awaitable[tuple[V, int, float | None]]]) -> V:
        started = time.perf_counter()
        try:
            value, size, expires_at = await load()
        finally:
            self._inflight.pop(key, None)
        self.stats.loads += 1
        self.stats.load_seconds.append(time.perf_counter() - started)
        self._insert(key, value, size, expires_at)
        return value

    def _insert(self, key: K, value: V, size: int, expires_at: float | None) -> None:
        self.discard(key)
        self._entries[key] = _Entry(value, size, expires_at)
        while len(self._entries) > 1 and self.bytes > self.max_bytes:
            old_key = next(iter(self._entries))
            self.stats.evictions += 1
            self.discard(old_key)
