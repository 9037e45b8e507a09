"""The heap an instance keeps faulted in for its next model load (:mod:`sealedml.runtime.heap_reserve`).

The reserve only helps if memory one thread faulted in and freed is what another
thread's allocation reuses: that is measured here with the kernel's count of the
second thread's page faults, in a fresh interpreter with and without one malloc arena.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sealedml._internal.malloc import prefault_heap
from sealedml.errors import ConfigurationError
from sealedml.runtime.heap_reserve import HeapReserve

MB = 1024 * 1024
linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and per-thread page faults")


def _eventually(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_prefault_heap_stops_between_pieces_when_asked() -> None:
    assert prefault_heap(3 * MB, piece=MB) == 3 * MB
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2  # two pieces, then a load wants the memory

    assert prefault_heap(8 * MB, piece=MB, stop=stop) == 2 * MB


def test_a_reserve_is_topped_up_after_the_request_that_loaded_not_during_the_load() -> None:
    reserve = HeapReserve(2 * MB)
    try:
        reserve.replenish()  # at start
        assert _eventually(lambda: reserve.top_ups == 1)
        assert reserve.running

        reserve.load_started()
        reserve.replenish()  # asked while a load runs: the thread waits for the load's request
        reserve.load_finished()
        time.sleep(0.2)
        assert reserve.top_ups == 1
        reserve.request_finished()
        assert _eventually(lambda: reserve.top_ups == 2)

        reserve.request_finished()  # a request that loaded nothing asks for nothing
        time.sleep(0.2)
        assert reserve.top_ups == 2
    finally:
        reserve.close()
    assert _eventually(lambda: not reserve.running, timeout=10)


def test_a_reserve_for_memory_bounded_instances_is_faulted_in_once() -> None:
    reserve = HeapReserve(MB, after_loads=False)
    try:
        reserve.replenish()
        assert _eventually(lambda: reserve.top_ups == 1)
        reserve.load_started()
        reserve.load_finished()
        reserve.request_finished()
        time.sleep(0.2)
        assert reserve.top_ups == 1
    finally:
        reserve.close()


def test_a_closed_reserve_starts_nothing() -> None:
    reserve = HeapReserve(MB)
    reserve.close()
    reserve.replenish()
    assert not reserve.running and reserve.top_ups == 0


def report_second_thread_faults(set_single_arena: bool = False) -> int:
    """One thread faults in 24 MB of heap and frees it, staying alive; prints (one JSON line) how
    many page faults a second thread then takes to allocate as much.

    Run in a fresh interpreter here, and in a child forked from the instance template in
    ``tests/unit/platform/test_template.py``.
    """
    import resource
    import threading

    from sealedml._internal.malloc import single_arena, tune_for_large_buffers

    tune_for_large_buffers()  # as every server does before it serves
    if set_single_arena:
        single_arena()
    done, hold = threading.Event(), threading.Event()

    def first() -> None:
        prefault_heap(24 << 20)
        done.set()
        hold.wait()  # alive, so that its arena is not handed to the next thread

    faults = []

    def second() -> None:
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        data = bytearray(24 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        del data

    t1 = threading.Thread(target=first)
    t1.start()
    done.wait()
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join()
    hold.set()
    t1.join()
    print(json.dumps({"faults": faults[0]}), flush=True)
    return 0


def second_thread_faults(set_single_arena: bool) -> int:
    """:func:`report_second_thread_faults` in a fresh interpreter."""
    root = Path(__file__).resolve().parents[3]
    # glibc's defaults for the control, whatever the environment running the tests sets.
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = "import sys\nfrom tests.unit.runtime.test_heap_reserve import report_second_thread_faults as f\nf(sys.argv[1] == 'one')"
    out = subprocess.run(
        [sys.executable, "-c", code, "one" if set_single_arena else "default"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
        cwd=root,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["faults"])


@linux_glibc
def test_with_one_arena_a_thread_reuses_the_pages_another_faulted_in() -> None:
    pages = (24 << 20) // 4096
    # Control: glibc's default gives the second thread an arena of its own, which faults
    # every page in again: the measurement can tell the two apart.
    assert second_thread_faults(set_single_arena=False) > pages // 2
    assert second_thread_faults(set_single_arena=True) < pages // 10


def test_modes_choose_when_the_reserve_is_faulted_in() -> None:
    assert HeapReserve.for_mode("after-loads", MB).mode == "after-loads"
    at_start = HeapReserve.for_mode("at-start", MB)
    assert at_start.mode == "at-start" and not at_start.after_loads and at_start.nbytes == MB
    off = HeapReserve.for_mode("off", MB)
    off.replenish()
    assert off.mode == "off" and off.nbytes == 0 and not off.running
    with pytest.raises(ConfigurationError, match="unknown heap reserve mode 'sometimes'"):
        HeapReserve.for_mode("sometimes", MB)


def test_instances_of_one_model_functions_fault_the_reserve_in_only_at_start(tmp_path) -> None:
    from sealedml.platform.local import LocalPlatform
    from sealedml.platform.process import InstanceSpec

    spec = InstanceSpec(keyservice="http://127.0.0.1:1", store=tmp_path)
    assert "--heap-reserve" not in spec.arguments()  # the instance's own default
    per_model = LocalPlatform(spec, policy="per-model").spec
    assert per_model.heap_reserve == "at-start"
    assert per_model.arguments()[-2:] == ["--heap-reserve", "at-start"]
    assert LocalPlatform(spec, policy="sealedml").spec.heap_reserve is None
    chosen = InstanceSpec(keyservice="http://127.0.0.1:1", store=tmp_path, heap_reserve="off")
    assert LocalPlatform(chosen, policy="per-model").spec.heap_reserve == "off"  # an operator's choice stays
