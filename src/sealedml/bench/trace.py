"""``sealedml bench trace``: replay a workload against real platform processes, per policy.

One KeyService; for each routing policy a fresh gateway (its own instances),
the same trace replayed in real time (open loop: requests leave at their
timestamps whatever the answers), then a wait until every instance has been
stopped by keep-alive so billing covers whole lifetimes. Reports, per policy:
GB-seconds (allocated and busy), cold starts, model loads, p50/p99 latency,
SLO violations, errors; and the ratios the design targets.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sealedml._internal.procs import ServiceProcess
from sealedml.bench._harness import bench_stack, progress
from sealedml.bench.traces import TraceEvent, load_csv_trace, synthetic_trace
from sealedml.errors import ConfigurationError

__all__ = ["PolicyConfig", "run_trace"]


@dataclass(frozen=True)
class PolicyConfig:
    """How each policy's platform is configured (printed with the results)."""

    policy: str
    memory_mb: int
    max_instances: int
    concurrency: int = 2


DEFAULT_CONFIGS = {
    # One function per model: each instance holds one model, so it needs less memory.
    "per-model": PolicyConfig("per-model", memory_mb=256, max_instances=2),
    # One packed pool for all models: bigger instances that cache several models.
    "sesemi": PolicyConfig("sesemi", memory_mb=512, max_instances=4),
    "sealedml": PolicyConfig("sealedml", memory_mb=512, max_instances=4),
}


def _count(values: Any) -> dict[int, int]:
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _replay(
    gateway: str, events: list[TraceEvent], users: dict[str, Any], x: np.ndarray, timeout: float
) -> list[tuple[float, int]]:
    from sealedml.envelope.request import BINARY_CONTENT_TYPE, ResponseEnvelope, open_response, seal_request

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=gateway, timeout=timeout, limits=limits) as client:
        start = time.perf_counter() + 0.5

        async def one(event: TraceEvent) -> tuple[float, int]:
            delay = start + event.t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            user = users[event.model]
            env, ctx = seal_request(
                {"input": x}, request_key=user.request_key(event.model), model_id=event.model, user_id=user.principal_id
            )
            sent = start + event.t
            try:
                response = await client.post(
                    "/v1/infer", content=env.to_binary(), headers={"content-type": BINARY_CONTENT_TYPE}
                )
            except httpx.HTTPError:
                return time.perf_counter() - sent, 0
            if response.status_code == 200:
                open_response(ctx, ResponseEnvelope.parse(response.content))
            return time.perf_counter() - sent, response.status_code

        return await asyncio.gather(*(one(e) for e in events))


def _wait_for_warm_pool(gateway: str, spares: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{gateway}/v1/stats", timeout=10).json().get("warm_pool_ready", 0) >= spares:
            return
        time.sleep(0.2)


def _wait_until_idle(gateway: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = httpx.get(f"{gateway}/v1/stats", timeout=10).json()
        if all(not f["instances"] and not f["starting"] for f in stats["functions"].values()):
            break
        time.sleep(0.5)
    return stats


def run_trace(
    *,
    models: int = 10,
    policies: tuple[str, ...] = ("per-model", "sesemi", "sealedml"),
    trace_file: Path | None = None,
    duration: float = 60.0,
    seed: int = 0,
    keep_alive: float = 10.0,
    slo_ms: float = 1000.0,
    model_name: str = "mobilenetv2",
    plot: Path | None = None,
    warm_pool: int = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the trace benchmark; return per-policy figures and the comparison."""
    from sealedml import zoo
    from sealedml.attestation.measurement import measurement_for
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.client.owner import publish_model
    from sealedml.storage.modelstore import LocalModelStore

    for name in policies:
        if name not in DEFAULT_CONFIGS:
            raise ConfigurationError(f"unknown policy {name!r}; choose from {', '.join(DEFAULT_CONFIGS)}")
    if trace_file is not None:
        events = load_csv_trace(trace_file)
    else:
        events = synthetic_trace(models, duration, seed=seed)
    model_ids = sorted({e.model for e in events})
    progress(
        f"[trace] {len(events)} requests over {events[-1].t:.1f}s for {len(model_ids)} models; "
        f"policies {', '.join(policies)}",
        quiet,
    )

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, 224, 224), dtype=np.float32) if model_name != "digits" else zoo.digits().x_test[:1]
    results: dict[str, Any] = {}
    with bench_stack([], lease_ttl=3600) as stack:
        stack.gateway.stop()  # this benchmark starts one gateway per policy
        runtime = measurement_for("runtime", {"tee": "simulated"})
        owner = Identity.generate()
        users: dict[str, Identity] = {}
        with KeyServiceClient(stack.keyservice.url, owner) as oks:
            oks.register()
            for i, model_id in enumerate(model_ids):
                model = zoo.digits().model if model_name == "digits" else zoo.get(model_name, seed=i)
                publish_model(model, model_id=model_id, keyservice=oks, store=LocalModelStore(stack.store))
                oks.allow_runtime(model_id, runtime)
                user = Identity.generate()
                with KeyServiceClient(stack.keyservice.url, user) as uks:
                    uks.register()
                    oks.grant(model_id, user.principal_id)
                    uks.enable(model_id, [runtime])
                users[model_id] = user
        progress(f"[trace] published {len(model_ids)} sealed {model_name} models", quiet)

        for name in policies:
            cfg = DEFAULT_CONFIGS[name]
            flags = [
                *("--policy", name, "--memory-mb", str(cfg.memory_mb)),
                *("--max-instances", str(cfg.max_instances), "--concurrency", str(cfg.concurrency)),
                *("--keep-alive", str(keep_alive), "--queue-timeout", "120", "--warm-pool", str(warm_pool)),
            ]
            progress(f"[trace] policy {name}: replaying …", quiet)
            with ServiceProcess.platform(
                stack.keyservice.url,
                stack.store,
                *flags,
                name=f"platform-{name}",
                log_path=stack.workdir / f"platform-{name}.log",
            ) as gw:
                _wait_for_warm_pool(gw.url, warm_pool)  # every policy starts from the same state
                t0 = time.perf_counter()
                outcomes = asyncio.run(_replay(gw.url, events, users, x, timeout=300))
                replay_s = time.perf_counter() - t0
                progress(f"[trace] policy {name}: replayed in {replay_s:.1f}s; waiting for keep-alive to expire", quiet)
                stats = _wait_until_idle(gw.url, keep_alive + 30)
            latencies = [lat for lat, status in outcomes if status == 200]
            errors = sum(1 for _, status in outcomes if status != 200)
            totals = stats.get("totals", {})
            results[name] = {
                "config": {
                    "memory_mb": cfg.memory_mb,
                    "max_instances": cfg.max_instances,
                    "concurrency": cfg.concurrency,
                    "keep_alive_s": keep_alive,
                    "warm_pool": warm_pool,
                },
                "gb_seconds": totals.get("gb_seconds"),
                "busy_gb_seconds": totals.get("busy_gb_seconds"),
                "cold_starts": totals.get("cold_starts"),
                "model_loads": totals.get("model_loads"),
                "functions": len(stats.get("functions", {})),
                "requests": len(outcomes),
                "errors": errors,
                "status_counts": {str(k): v for k, v in sorted(_count(s for _, s in outcomes).items())},
                "p50_ms": round(_percentile(latencies, 50) * 1000, 2),
                "p99_ms": round(_percentile(latencies, 99) * 1000, 2),
                "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
                "slo_violations": sum(1 for lat, status in outcomes if status != 200 or lat * 1000 > slo_ms),
                "_latencies": latencies,
                "_outcomes": [(e.t, e.model, round(lat, 4), st) for e, (lat, st) in zip(events, outcomes, strict=True)],
            }
            r = results[name]
            progress(
                f"[trace] policy {name}: GB-s {r['gb_seconds']}, cold starts {r['cold_starts']}, "
                f"loads {r['model_loads']}, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                f"SLO violations {r['slo_violations']}",
                quiet,
            )

    comparison: dict[str, Any] = {}
    if "sealedml" in results and "per-model" in results:
        a, b = results["sealedml"], results["per-model"]
        comparison["gb_seconds_per_model_over_sealedml"] = round(b["gb_seconds"] / a["gb_seconds"], 3)
        comparison["p99_sealedml_over_per_model"] = round(a["p99_ms"] / b["p99_ms"], 3)
        comparison["target_met"] = (
            comparison["gb_seconds_per_model_over_sealedml"] >= 2.0 and comparison["p99_sealedml_over_per_model"] <= 1.1
        )
    if "sealedml" in results and "sesemi" in results:
        a, s = results["sealedml"], results["sesemi"]
        comparison["sealedml_not_worse_than_sesemi"] = (
            a["gb_seconds"] <= s["gb_seconds"] * 1.02 and a["p99_ms"] <= s["p99_ms"] * 1.02
        )
        comparison["gb_seconds_sesemi_over_sealedml"] = round(s["gb_seconds"] / a["gb_seconds"], 3)
        comparison["p99_sealedml_over_sesemi"] = round(a["p99_ms"] / s["p99_ms"], 3)
    if plot is not None:
        _plot(results, plot)
    for r in results.values():
        r.pop("_latencies", None)
        r.pop("_outcomes", None)
    return {
        "trace": {
            "requests": len(events),
            "models": len(model_ids),
            "duration_s": round(events[-1].t, 2),
            "source": str(trace_file) if trace_file else f"synthetic(seed={seed})",
            "model": model_name,
        },
        "slo_ms": slo_ms,
        "policies": results,
        "comparison": comparison,
        "plot": str(plot) if plot else None,
    }


def _plot(results: dict[str, Any], path: Path) -> None:
    from sealedml._internal.extras import require

    matplotlib = require("matplotlib", "demo", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [results[n]["gb_seconds"] for n in names], color="#4477aa", label="allocated")
    axes[0].bar(names, [results[n]["busy_gb_seconds"] for n in names], color="#ee6677", label="busy")
    axes[0].set_title("GB-seconds (lower is better)")
    axes[0].legend()
    width = 0.38
    idx = np.arange(len(names))
    axes[1].bar(idx - width / 2, [results[n]["p50_ms"] for n in names], width, label="p50")
    axes[1].bar(idx + width / 2, [results[n]["p99_ms"] for n in names], width, label="p99")
    axes[1].set_xticks(idx, names)
    axes[1].set_title("latency, ms")
    axes[1].legend()
    for n in names:
        lat = sorted(results[n]["_latencies"])
        if lat:
            axes[2].plot(np.array(lat) * 1000, np.linspace(0, 1, len(lat)), label=n)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("latency, ms (log)")
    axes[2].set_title("latency CDF")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
