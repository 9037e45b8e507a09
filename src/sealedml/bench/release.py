"""``sealedml bench release``: key releases per second, the KeyService's core job.

One KeyService process (real HTTP on loopback, real SQLite with durable
commits, simulated evidence) and ``concurrency`` simulated runtimes in this
process, each running the real :class:`~sealedml.runtime.release.ReleaseClient`
in a loop: challenge → evidence → release → verify the KeyService's signature →
open the keys. Each runtime attests the KeyService once, before the clock
starts, as a running instance does. Measured per runtime KEM (``x25519``: an
X25519 ephemeral key; ``hybrid``: ML-KEM-768 + X25519, the default): releases
per second over the window and the latency of each release (p50, p99).

Both sides share the machine's cores, as they would a small host: the
KeyService process and the runtimes' client work (evidence, HPKE key
generation and decryption, signature checks, HTTP) compete for them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from sealedml.bench._harness import isolated_home, progress
from sealedml.errors import ConfigurationError

__all__ = ["KEMS", "TARGETS", "run_release"]

#: Runtime KEMs the benchmark knows, by their command-line names.
KEMS: dict[str, str] = {"x25519": "X25519", "hybrid": "MLKEM768_X25519"}

#: Releases per second on 2 cores (DESIGN.md, "Measured targets").
TARGETS: dict[str, float] = {"x25519": 1000.0, "hybrid": 700.0}

_USERS = 4  # distinct (model, user) pairs, so releases do not all touch one consent row
_WARMUP_S = 1.0


async def _drive(url: str, kem: str, concurrency: int, duration: float, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    from sealedml.attestation.simulated import SimulatedAttester
    from sealedml.crypto import HpkeKem
    from sealedml.runtime.release import ReleaseClient

    attester = SimulatedAttester(role="runtime")
    clients = [ReleaseClient(url, attester, kem=HpkeKem[KEMS[kem]]) for _ in range(concurrency)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    measuring = False
    try:
        await asyncio.gather(*(client.attest() for client in clients))

        async def runtime(index: int, client: ReleaseClient, deadline: float) -> None:
            pair = pairs[index % len(pairs)]
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await client.release([pair])
                except Exception as exc:  # counted and reported, never hidden
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(
            *(runtime(i, c, time.perf_counter() + _WARMUP_S) for i, c in enumerate(clients))
        )  # warm: connections, caches, the KeyService's SQLite pages
        measuring = True
        started = time.perf_counter()
        await asyncio.gather(*(runtime(i, c, started + duration) for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")
    return {
        "kem": KEMS[kem],
        "releases": len(latencies),
        "releases_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3) if ordered else None,
        "p99_ms": round(p99 * 1000, 3) if ordered else None,
        "errors": errors,
        "target_per_s": TARGETS[kem],
        "meets_target": len(latencies) / elapsed >= TARGETS[kem],
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
        ``{"concurrency", "duration_s", "results": {kem: {"releases_per_s", "p50_ms",
        "p99_ms", "releases", "errors", "target_per_s", "meets_target"}}}``.

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
                results[kem] = asyncio.run(_drive(ks.url, kem, concurrency, duration, pairs))
                r = results[kem]
                progress(
                    f"{kem}: {r['releases_per_s']}/s (target {TARGETS[kem]:g}), "
                    f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors'] or 'none'}",
                    quiet,
                )
    return {"concurrency": concurrency, "duration_s": duration, "results": results}
