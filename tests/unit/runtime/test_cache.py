"""Single-flight LRU cache (:mod:`sealedml.runtime.cache`).

pytest-asyncio is not installed: each test drives its own event loop with
``asyncio.run``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sealedml.runtime.cache import SingleFlightLRU


class Value:
    """A cached object with identity (so tests can check everyone got the same one)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Value({self.name!r})"


class LoaderError(RuntimeError):
    pass


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def loader(
    value: object, size: int = 1, expires_at: float | None = None, calls: list[str] | None = None
) -> Callable[[], Awaitable[tuple[object, int, float | None]]]:
    async def load() -> tuple[object, int, float | None]:
        if calls is not None:
            calls.append(str(value))
        return value, size, expires_at

    return load


async def _settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- single flight ----------------------------------------------------------------------


def test_concurrent_gets_for_same_key_load_once() -> None:
    async def scenario() -> None:
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=1000)
        release = asyncio.Event()
        calls: list[int] = []
        model = Value("mobilenet")

        async def load() -> tuple[Value, int, float | None]:
            calls.append(1)
            await release.wait()  # hold the load until every caller is waiting
            return model, 10, None

        tasks = [asyncio.create_task(cache.get("mobilenet", load)) for _ in range(20)]
        await _settle()
        assert len(calls) == 1
        assert not any(t.done() for t in tasks)  # everyone waits; nobody busy-loops or fails
        release.set()
        results = await asyncio.gather(*tasks)
        assert len(calls) == 1
        assert all(r is model for r in results)
        assert cache.stats.loads == 1
        assert cache.stats.misses == 1
        assert cache.stats.hits == 19
        assert len(cache.stats.load_seconds) == 1
        # Afterwards it is a plain hit, without calling the loader.
        assert await cache.get("mobilenet", load) is model
        assert len(calls) == 1
        assert cache.stats.hits == 20

    asyncio.run(scenario())


def test_concurrent_gets_for_different_keys_load_in_parallel() -> None:
    async def scenario() -> None:
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=1000)
        release = asyncio.Event()
        started: list[str] = []

        def make(key: str) -> Callable[[], Awaitable[tuple[Value, int, float | None]]]:
            async def load() -> tuple[Value, int, float | None]:
                started.append(key)
                await release.wait()
                return Value(key), 1, None

            return load

        tasks = [asyncio.create_task(cache.get(k, make(k))) for k in ("a", "b", "c")]
        await _settle()
        assert sorted(started) == ["a", "b", "c"]  # one load per key, not serialized behind each other
        release.set()
        assert [v.name for v in await asyncio.gather(*tasks)] == ["a", "b", "c"]

    asyncio.run(scenario())


def test_loader_failure_reaches_every_waiter_and_next_get_retries() -> None:
    async def scenario() -> None:
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=1000)
        release = asyncio.Event()
        calls: list[int] = []
        error = LoaderError("key release denied")

        async def failing() -> tuple[Value, int, float | None]:
            calls.append(1)
            await release.wait()
            raise error

        tasks = [asyncio.create_task(cache.get("m", failing)) for _ in range(20)]
        await _settle()
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert len(calls) == 1
        assert all(r is error for r in results)
        assert len(cache) == 0 and cache.peek("m") is None  # nothing cached
        assert cache.stats.loads == 0

        good = Value("m")
        assert await cache.get("m", loader(good)) is good  # the next get loads again
        assert cache.stats.loads == 1
        assert cache.peek("m") is good

    asyncio.run(scenario())


def test_loader_failure_with_single_caller_is_raised() -> None:
    async def scenario() -> None:
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=1000)

        async def failing() -> tuple[Value, int, float | None]:
            raise LoaderError("boom")

        with pytest.raises(LoaderError, match="boom"):
            await cache.get("m", failing)
        assert cache.keys() == []

    asyncio.run(scenario())


def test_cancelling_first_caller_does_not_fail_other_waiters() -> None:
    async def scenario() -> None:
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=1000)
        release = asyncio.Event()
        model = Value("m")

        async def load() -> tuple[Value, int, float | None]:
            await release.wait()
            return model, 1, None

        first = asyncio.create_task(cache.get("m", load))
        await _settle()
        waiters = [asyncio.create_task(cache.get("m", load)) for _ in range(5)]
        await _settle()
        first.cancel()
        await _settle()
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*waiters), timeout=5)
        assert all(r is model for r in results)

    asyncio.run(scenario())


# -- LRU by bytes ---------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_by_bytes_and_calls_on_evict() -> None:
    async def scenario() -> None:
        evicted: list[Value] = []
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=100, on_evict=evicted.append)
        a, b, c = Value("a"), Value("b"), Value("c")
        await cache.get("a", loader(a, 40))
        await cache.get("b", loader(b, 40))
        assert cache.bytes == 80 and evicted == []
        assert await cache.get("a", loader(Value("unused"), 40)) is a  # a is now the most recent
        await cache.get("c", loader(c, 40))  # 120 > 100: evict the LRU entry, which is b
        assert evicted == [b]
        assert cache.keys() == ["a", "c"]
        assert cache.bytes == 80
        assert cache.stats.evictions == 1

    asyncio.run(scenario())


def test_lru_evicts_as_many_entries_as_needed() -> None:
    async def scenario() -> None:
        evicted: list[Value] = []
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=100, on_evict=evicted.append)
        small = [Value(f"s{i}") for i in range(5)]
        for value in small:
            await cache.get(value.name, loader(value, 20))
        big = Value("big")
        await cache.get("big", loader(big, 70))
        assert evicted == small[:4]
        assert cache.keys() == ["s4", "big"]
        assert cache.bytes == 90

    asyncio.run(scenario())


def test_peek_marks_recently_used() -> None:
    async def scenario() -> None:
        evicted: list[Value] = []
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=2, on_evict=evicted.append)
        a, b = Value("a"), Value("b")
        await cache.get("a", loader(a))
        await cache.get("b", loader(b))
        assert cache.peek("a") is a
        await cache.get("c", loader(Value("c")))
        assert evicted == [b]

    asyncio.run(scenario())


def test_entry_larger_than_budget_is_kept() -> None:
    async def scenario() -> None:
        evicted: list[Value] = []
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=10, on_evict=evicted.append)
        huge = Value("resnet")
        assert await cache.get("resnet", loader(huge, 1000)) is huge
        assert cache.keys() == ["resnet"] and evicted == []
        assert cache.peek("resnet") is huge
        vgg = Value("vgg")
        await cache.get("vgg", loader(vgg, 5000))
        assert cache.keys() == ["vgg"]  # the older one goes, the newest stays
        assert evicted == [huge]

    asyncio.run(scenario())


def test_discard_calls_on_evict_once() -> None:
    async def scenario() -> None:
        evicted: list[Value] = []
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=100, on_evict=evicted.append)
        value = Value("a")
        await cache.get("a", loader(value))
        cache.discard("a")
        cache.discard("a")
        cache.discard("never-there")
        assert evicted == [value]
        assert len(cache) == 0

    asyncio.run(scenario())


# -- expiry ---------------------------------------------------------------------------------


def test_entries_expire_by_injected_clock() -> None:
    async def scenario() -> None:
        clock = Clock(1000.0)
        evicted: list[Value] = []
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=100, on_evict=evicted.append, clock=clock)
        calls: list[str] = []
        lease = Value("lease-1")
        await cache.get("k", loader(lease, 1, expires_at=1060.0, calls=calls))
        clock.now = 1059.9
        assert cache.peek("k") is lease
        assert await cache.get("k", loader(Value("lease-2"), 1, 2000.0, calls)) is lease
        assert len(calls) == 1
        clock.now = 1060.0  # expiry is inclusive
        assert cache.peek("k") is None
        assert evicted == [lease]  # expired secrets are handed to on_evict
        assert len(cache) == 0
        renewed = Value("lease-2")
        assert await cache.get("k", loader(renewed, 1, 2000.0, calls)) is renewed
        assert len(calls) == 2

    asyncio.run(scenario())


def test_entries_without_expiry_never_expire() -> None:
    async def scenario() -> None:
        clock = Clock(0.0)
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=100, clock=clock)
        value = Value("model")
        await cache.get("k", loader(value, 1, None))
        clock.now = 1e12
        assert cache.peek("k") is value

    asyncio.run(scenario())


def test_reloading_a_key_replaces_and_evicts_the_old_value() -> None:
    async def scenario() -> None:
        clock = Clock(0.0)
        evicted: list[Value] = []
        cache: SingleFlightLRU[str, Value] = SingleFlightLRU(max_bytes=100, on_evict=evicted.append, clock=clock)
        old, new = Value("old"), Value("new")
        await cache.get("k", loader(old, 30, 10.0))
        clock.now = 11.0
        assert await cache.get("k", loader(new, 30, 100.0)) is new
        assert evicted == [old]
        assert cache.bytes == 30

    asyncio.run(scenario())
