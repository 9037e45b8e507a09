"""``sealedml bench coldstart``: first request with no instance running, with and without a warm pool.

Each repetition waits until keep-alive has stopped every instance (and, with a
warm pool, until a spare is ready), then times one request end to end and
reads the phases the platform and the instance report (``Server-Timing``):
getting an instance (spawn, or taking a spare), attestation, key release,
model fetch, decryption, session creation, compute.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

from sealedml._internal.http import parse_server_timing
from sealedml.bench._harness import bench_stack, progress
from sealedml.bench._setup import publish_for_user

__all__ = ["run_coldstart"]

#: Medians a cold start must stay within (issue 20): a fresh instance, and a warm-pool spare.
TARGET_WITHOUT_POOL_MS = 500
TARGET_WITH_POOL_MS = 100

PHASES = ("platform-queue", "attest", "release", "fetch", "decrypt", "session", "open", "compute", "seal")


def _wait_for(gateway: str, *, spares: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(f"{gateway}/v1/stats", timeout=10).json()
        idle = all(not f["instances"] and not f["starting"] for f in stats["functions"].values())
        # A platform still starting its instance template is not what a cold start measures.
        template_ready = stats.get("template_ready") is not False
        if idle and stats["warm_pool_ready"] >= spares and template_ready:
            return
        time.sleep(0.2)
    raise TimeoutError("platform did not scale to zero in time")


def _one_setting(model_name: str, warm_pool: int, repeats: int, quiet: bool) -> dict[str, Any]:
    from sealedml import zoo
    from sealedml.client.gateway import InferenceClient

    model = zoo.get(model_name)
    inputs = zoo.sample_inputs(model_name)
    args = ["--max-instances", "1", "--keep-alive", "0.5", "--warm-pool", str(warm_pool)]
    totals: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    with bench_stack(args) as stack:
        user = publish_for_user(stack, model, ["cold"])
        with InferenceClient(stack.gateway.url, user) as client:
            for i in range(repeats):
                _wait_for(stack.gateway.url, spares=warm_pool)
                t0 = time.perf_counter()
                client.infer("cold", inputs)
                totals.append(time.perf_counter() - t0)
                if not client.last_cold_start:
                    raise RuntimeError("expected a cold start")
                timing = parse_server_timing(client.last_server_timing)
                for p in PHASES:
                    phases[p].append(timing.get(p, 0.0))
                progress(f"[coldstart] warm_pool={warm_pool} #{i + 1}: {totals[-1] * 1000:.0f} ms", quiet)
    return {
        "warm_pool": warm_pool,
        "median_ms": round(statistics.median(totals) * 1000, 1),
        "all_ms": [round(t * 1000, 1) for t in totals],
        "breakdown_median_ms": {p: round(statistics.median(v) * 1000, 2) for p, v in phases.items()},
    }


def run_coldstart(model_name: str = "mobilenetv2", *, repeats: int = 5, quiet: bool = False) -> dict[str, Any]:
    """Cold starts of ``model_name`` without and with a warm pool of one spare."""
    without = _one_setting(model_name, 0, repeats, quiet)
    with_pool = _one_setting(model_name, 1, repeats, quiet)
    return {
        "model": model_name,
        "repeats": repeats,
        "without_warm_pool": without,
        "with_warm_pool": with_pool,
        "targets_ms": {"without_warm_pool": TARGET_WITHOUT_POOL_MS, "with_warm_pool": TARGET_WITH_POOL_MS},
        "targets_met": {
            "without_warm_pool": without["median_ms"] <= TARGET_WITHOUT_POOL_MS,
            "with_warm_pool": with_pool["median_ms"] <= TARGET_WITH_POOL_MS,
        },
    }
