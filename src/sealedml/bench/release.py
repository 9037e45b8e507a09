"""``sealedml bench release``: key releases per second, the KeyService's core job.

One KeyService process (real HTTP on loopback, real SQLite with durable
commits, simulated evidence) and ``concurrency`` simulated runtimes — spread
over one process per core, as instances are processes — each running the real
:class:`~sealedml.runtime.release.ReleaseClient` in a loop: challenge →
evidence → release → verify the KeyService's signature → open the keys. Each
runtime attests the KeyService once, before the clock starts, as a running
instance does. Measured per runtime KEM (``x25519``: an X25519 ephemeral key;
``hybrid``: ML-KEM-768 + X25519, the default): releases per second over the
window and the latency of each release (p50, p99).

Both sides share the machine's cores, as they would a small host: the
KeyService process and the runtimes' client work (evidence, HPKE key
generation and decryption, signature checks, HTTP) compete for them. So the
result also says where the time goes: CPU seconds per release spent by the
KeyService process and by the runtimes' processes, from the kernel's
accounting over one measured window common to all. The runtimes run on uvloop,
as instances do.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import uvloop

from sealedml.bench._harness import isolated_home, progress
from sealedml.errors import ConfigurationError

__all__ = ["KEMS", "TARGETS", "run_release"]

#: Runtime KEMs the benchmark knows, by their command-line names.
KEMS: dict[str, str] = {"x25519": "X25519", "hybrid": "MLKEM768_X25519"}

#: Releases per second on 2 cores (DESIGN.md, "Measured targets").
TARGETS: dict[str, float] = {"x25519": 1000.0, "hybrid": 700.0}

_USERS = 4  # distinct (model, user) pairs, so releases do not all touch one consent row
_START_S = 4.0  # processes start, attest and warm up before the measured window opens


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class _Share:
    """What one process of simulated runtimes is asked to do."""

    url: str
    kem: str
    runtimes: int
    pairs: list[tuple[str, str]]
    start_at: float  # wall clock: the measured window is [start_at, start_at + duration)
    duration: float


@dataclass(frozen=True)
class _Outcome:
    latencies: list[float]
    errors: dict[str, int]
    cpu_s: float  # this process's CPU during the measured window


def _runtimes_process(share: _Share) -> _Outcome:
    """Entry point of one process of simulated runtimes (instances are processes, each its own GIL)."""
    return uvloop.run(_drive(share))


async def _drive(share: _Share) -> _Outcome:
    from sealedml.attestation.simulated import SimulatedAttester
    from sealedml.crypto import HpkeKem
    from sealedml.runtime.release import ReleaseClient

    attester = SimulatedAttester(role="runtime")
    clients = [ReleaseClient(share.url, attester, kem=HpkeKem[KEMS[share.kem]]) for _ in range(share.runtimes)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    end = share.start_at + share.duration
    try:
        await asyncio.gather(*(client.attest() for client in clients))

        async def runtime(index: int, client: ReleaseClient) -> None:
            pair = share.pairs[index % len(share.pairs)]
            while (now := time.time()) < end:
                try:
                    await client.release([pair])
                except Exception as exc:  # counted and reported, never hidden
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if now >= share.start_at:  # before: warming connections, caches, SQLite pages
                    latencies.append(time.time() - now)

        async def cpu_at_window() -> float:
            await asyncio.sleep(max(0.0, share.start_at - time.time()))
            before = _own_cpu_s()
            await asyncio.sleep(max(0.0, end - time.time()))
            return _own_cpu_s() - before

        window = asyncio.ensure_future(cpu_at_window())
        await asyncio.gather(*(runtime(i, c) for i, c in enumerate(clients)))
        cpu = await window
    finally:
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
    return _Outcome(latencies, errors, cpu)


def _measure(
    url: str, kem: str, concurrency: int, duration: float, pairs: list[tuple[str, str]], keyservice_pid: int
) -> dict[str, Any]:
    """Run ``concurrency`` runtimes spread over one process per core; measure one common window."""
    processes = max(1, min(concurrency, os.cpu_count() or 1))
    start_at = time.time() + _START_S
    shares = [
        _Share(url, kem, concurrency // processes + (i < concurrency % processes), pairs, start_at, duration)
        for i in range(processes)
    ]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_runtimes_process, share) for share in shares]
        time.sleep(max(0.0, start_at - time.time()))
        ks_before = _process_cpu_s(keyservice_pid)
        time.sleep(max(0.0, start_at + duration - time.time()))
        ks_cpu = _process_cpu_s(keyservice_pid) - ks_before
        outcomes = [f.result() for f in futures]
    ordered = sorted(x for o in outcomes for x in o.latencies)
    errors: dict[str, int] = {}
    for outcome in outcomes:
        for name, n in outcome.errors.items():
            errors[name] = errors.get(name, 0) + n
    count = max(1, len(ordered))
    runtimes_cpu = sum(o.cpu_s for o in outcomes)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None
    return {
        "kem": KEMS[kem],
        "runtime_processes": processes,
        "releases": len(ordered),
        "releases_per_s": round(len(ordered) / duration, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3) if ordered else None,
        "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
        "errors": errors,
        # Where the time goes: CPU per release on each side (they share the cores).
        "keyservice_cpu_ms_per_release": round(ks_cpu / count * 1000, 3),
        "runtimes_cpu_ms_per_release": round(runtimes_cpu / count * 1000, 3),
        "keyservice_cores_busy": round(ks_cpu / duration, 2),
        "runtimes_cores_busy": round(runtimes_cpu / duration, 2),
        "target_per_s": TARGETS[kem],
        "meets_target": len(ordered) / duration >= TARGETS[kem],
    }


def _publish(url: str, users: int) -> list[tuple[str, str]]:
    """An owner's model key, this build's runtime allowed, ``users`` granted and consenting."""
    from sealedml.attestation.measurement import measurement_for
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.crypto import random_bytes

    runtime = measurement_for("runtime", {"tee": "simulated"})
    owner = Identity.generate()
    pairs = []
    with KeyServiceClient(url, owner) as oks:
        oks.register()
        oks.upload_model_key("bench", 1, random_bytes(32))
        oks.allow_runtime("bench", runtime)
        for _ in range(users):
            user = Identity.generate()
            with KeyServiceClient(url, user) as uks:
                uks.register()
                oks.grant("bench", user.principal_id)
                uks.enable("bench", [runtime])
            pairs.append(("bench", user.principal_id))
    return pairs


def run_release(
    concurrency: int = 8, kems: tuple[str, ...] = ("x25519", "hybrid"), duration: float = 10.0, quiet: bool = False
) -> dict[str, Any]:
    """Measure key releases per second against one KeyService process.

    Args:
        concurrency: simulated runtimes releasing at once.
        kems: runtime KEMs to measure, from :data:`KEMS`.
        duration: seconds measured per KEM (after a one-second warm-up).
        quiet: no progress lines on stderr.

    Returns:
        ``{"concurrency", "duration_s", "cores", "results": {kem: {"releases_per_s",
        "p50_ms", "p99_ms", "releases", "errors", "keyservice_cpu_ms_per_release",
        "runtimes_cpu_ms_per_release", "cores_busy", "target_per_s", "meets_target"}}}``.

    Raises:
        ConfigurationError: an unknown KEM, concurrency < 1 or duration ≤ 0.
    """
    from sealedml._internal.procs import ServiceProcess

    unknown = [k for k in kems if k not in KEMS]
    if unknown or not kems:
        raise ConfigurationError(f"unknown KEM {unknown}: choose from {', '.join(KEMS)}")
    if concurrency < 1 or duration <= 0:
        raise ConfigurationError("concurrency must be ≥ 1 and duration > 0")
    results: dict[str, Any] = {}
    with isolated_home() as workdir:
        with ServiceProcess.keyservice(workdir / "ks", "--lease-ttl", "600", log_path=workdir / "keyservice.log") as ks:
            pairs = _publish(ks.url, _USERS)
            for kem in kems:
                progress(f"{kem}: {concurrency} runtimes releasing for {duration:g} s …", quiet)
                results[kem] = _measure(ks.url, kem, concurrency, duration, pairs, ks.pid)
                r = results[kem]
                progress(
                    f"{kem}: {r['releases_per_s']}/s (target {TARGETS[kem]:g}), "
                    f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors'] or 'none'}; CPU per "
                    f"release: KeyService {r['keyservice_cpu_ms_per_release']} ms, runtimes "
                    f"{r['runtimes_cpu_ms_per_release']} ms (cores busy: KeyService {r['keyservice_cores_busy']}, "
                    f"runtimes {r['runtimes_cores_busy']})",
                    quiet,
                )
    return {"concurrency": concurrency, "duration_s": duration, "cores": os.cpu_count(), "results": results}
