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
import contextlib
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
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
    done_at: list[float]  # wall-clock completion time of each measured release
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
    done_at: list[float] = []
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
                    await asyncio.sleep(0.05)  # a dead replica answers at once: do not spin on it
                    continue
                if now >= share.start_at:  # before: warming connections, caches, SQLite pages
                    done = time.time()
                    latencies.append(done - now)
                    done_at.append(done)

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
    return _Outcome(latencies, done_at, errors, cpu)


def _cpu_or_zero(pid: int) -> float:
    try:
        return _process_cpu_s(pid)
    except OSError:  # a replica killed on purpose
        return 0.0


@dataclass(frozen=True)
class _Kill:
    """Kill -9 one replica halfway through the window, while an owner writes to it."""

    keyservice: Any  # the ServiceProcess to kill
    owner: Any  # an Identity owning the "bench" model
    store_url: str


def _measure(
    urls: list[str],
    kem: str,
    concurrency: int,
    duration: float,
    pairs: list[tuple[str, str]],
    keyservice_pids: list[int],
    kill: _Kill | None = None,
) -> dict[str, Any]:
    """Run ``concurrency`` runtimes spread over one process per core; measure one common window.

    Runtimes are spread over the KeyService replicas ``urls`` round-robin, by process.
    """
    # One per core, but at least one per replica (each process talks to one replica).
    processes = max(1, min(concurrency, max(os.cpu_count() or 1, len(urls))))
    start_at = time.time() + _START_S
    shares = [
        _Share(urls[i % len(urls)], kem, concurrency // processes + (i < concurrency % processes), pairs, start_at,
               duration)
        for i in range(processes)
    ]  # fmt: skip
    failover: dict[str, Any] | None = None
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_runtimes_process, share) for share in shares]
        time.sleep(max(0.0, start_at - time.time()))
        ks_before = [_cpu_or_zero(pid) for pid in keyservice_pids]
        if kill is not None:
            failover = _kill_halfway(kill, start_at, duration)
        time.sleep(max(0.0, start_at + duration - time.time()))
        ks_cpu = sum(max(0.0, _cpu_or_zero(pid) - b) for pid, b in zip(keyservice_pids, ks_before, strict=True))
        outcomes = [f.result() for f in futures]
    ordered = sorted(x for o in outcomes for x in o.latencies)
    errors: dict[str, int] = {}
    for outcome in outcomes:
        for name, n in outcome.errors.items():
            errors[name] = errors.get(name, 0) + n
    count = max(1, len(ordered))
    runtimes_cpu = sum(o.cpu_s for o in outcomes)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None
    result = {
        "kem": KEMS[kem],
        "replicas": len(urls),
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
    if failover is not None:
        after = [t for o in outcomes for t in o.done_at if t > failover["killed_at"]]
        remaining = start_at + duration - failover["killed_at"]
        failover["releases_per_s_after_kill"] = round(len(after) / max(remaining, 1e-9), 1)
        failover["killed_at_s"] = round(failover.pop("killed_at") - start_at, 2)
        result["failover"] = failover
    return result


def _kill_halfway(kill: _Kill, start_at: float, duration: float) -> dict[str, Any]:
    """Write grants to the doomed replica, SIGKILL it halfway, then count acknowledged writes not stored."""
    import signal
    import threading

    import psycopg

    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.errors import Error

    acknowledged: list[str] = []
    stop = threading.Event()

    def write() -> None:
        with KeyServiceClient(kill.keyservice.url, kill.owner) as client:
            while not stop.is_set():
                grantee = Identity.generate()
                try:
                    with KeyServiceClient(kill.keyservice.url, grantee) as registering:
                        registering.register()  # grants name registered principals only
                    client.grant("bench", grantee.principal_id)
                except Error:
                    return
                acknowledged.append(grantee.principal_id)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    time.sleep(max(0.0, start_at + duration / 2 - time.time()))
    killed_at = time.time()
    os.killpg(kill.keyservice.pid, signal.SIGKILL)
    kill.keyservice.proc.wait(10)
    stop.set()
    writer.join(30)
    with psycopg.connect(kill.store_url) as db:
        stored = {row[0] for row in db.execute("SELECT user_id FROM grants WHERE granted = 1")}
    return {
        "killed_at": killed_at,
        "acknowledged_writes": len(acknowledged),
        "lost_acknowledged_writes": sum(1 for grantee in acknowledged if grantee not in stored),
    }


def _publish(url: str, users: int) -> tuple[Any, list[tuple[str, str]]]:
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
    return owner, pairs


@contextlib.contextmanager
def _keyservices(workdir: Path, replicas: int) -> Iterator[tuple[list[Any], str | None]]:
    """One KeyService on SQLite, or ``replicas`` on a PostgreSQL server started here (pgserver)."""
    from sealedml._internal.procs import ServiceProcess

    if replicas == 1:
        with ServiceProcess.keyservice(workdir / "ks", "--lease-ttl", "600", log_path=workdir / "keyservice.log") as ks:
            yield [ks], None
        return
    try:
        from pgserver import get_server  # type: ignore[attr-defined]
    except ImportError:
        needed = "pip install 'sealedml[postgres-server]'"
        raise ConfigurationError(f"--replicas needs PostgreSQL binaries: {needed}") from None
    server = get_server(workdir / "postgres", cleanup_mode="stop")
    url = str(server.get_uri())
    services: list[Any] = []
    try:
        for i in range(replicas):
            join = ("--join", services[0].url) if services else ()
            services.append(
                ServiceProcess.keyservice(
                    workdir / f"ks{i}", "--lease-ttl", "600", "--store", url, *join, log_path=workdir / f"ks{i}.log"
                )
            )
        yield services, url
    finally:
        for service in services:
            service.stop()
        server.cleanup()


def run_release(
    concurrency: int = 8,
    kems: tuple[str, ...] = ("x25519", "hybrid"),
    duration: float = 10.0,
    quiet: bool = False,
    replicas: int = 1,
    kill: bool = False,
) -> dict[str, Any]:
    """Measure key releases per second against one KeyService process, or several replicas.

    Args:
        concurrency: simulated runtimes releasing at once.
        kems: runtime KEMs to measure, from :data:`KEMS`.
        duration: seconds measured per KEM (after a one-second warm-up).
        quiet: no progress lines on stderr.
        replicas: KeyService processes; more than one share a PostgreSQL store (started here)
            and the runtimes are spread over them.
        kill: during the last KEM's window, kill -9 the first replica halfway while an owner
            writes to it, and report the writes it acknowledged that the store lost.

    Returns:
        ``{"concurrency", "duration_s", "cores", "replicas", "store", "results": {kem: {"releases_per_s",
        "p50_ms", "p99_ms", "releases", "errors", "keyservice_cpu_ms_per_release",
        "runtimes_cpu_ms_per_release", "cores_busy", "target_per_s", "meets_target"[, "failover"]}}}``.

    Raises:
        ConfigurationError: an unknown KEM, concurrency < 1, duration ≤ 0, replicas < 1, or
            ``kill`` with one replica.
    """
    unknown = [k for k in kems if k not in KEMS]
    if unknown or not kems:
        raise ConfigurationError(f"unknown KEM {unknown}: choose from {', '.join(KEMS)}")
    if concurrency < 1 or duration <= 0:
        raise ConfigurationError("concurrency must be ≥ 1 and duration > 0")
    if replicas < 1 or (kill and replicas < 2):
        raise ConfigurationError("--replicas must be ≥ 1, and --kill needs at least 2 (one survives)")
    results: dict[str, Any] = {}
    with isolated_home() as workdir, _keyservices(workdir, replicas) as (services, store_url):
        owner, pairs = _publish(services[0].url, _USERS)
        urls, pids = [s.url for s in services], [s.pid for s in services]
        for kem in kems:
            doomed = _Kill(services[0], owner, store_url) if kill and kem == kems[-1] and store_url else None
            what = f"{concurrency} runtimes over {replicas} replica(s)" + (", killing one halfway" if doomed else "")
            progress(f"{kem}: {what}, releasing for {duration:g} s …", quiet)
            results[kem] = _measure(urls, kem, concurrency, duration, pairs, pids, doomed)
            r = results[kem]
            progress(
                f"{kem}: {r['releases_per_s']}/s (target {TARGETS[kem]:g}), "
                f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors'] or 'none'}; CPU per "
                f"release: KeyService {r['keyservice_cpu_ms_per_release']} ms, runtimes "
                f"{r['runtimes_cpu_ms_per_release']} ms (cores busy: KeyService {r['keyservice_cores_busy']}, "
                f"runtimes {r['runtimes_cores_busy']})",
                quiet,
            )
            if "failover" in r:
                progress(f"{kem}: failover {r['failover']}", quiet)
    return {
        "concurrency": concurrency,
        "duration_s": duration,
        "cores": os.cpu_count(),
        "replicas": replicas,
        "store": "postgresql" if store_url else "sqlite",
        "results": results,
    }
