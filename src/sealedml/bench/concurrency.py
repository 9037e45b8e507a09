"""``sealedml bench concurrency``: one instance serving 2 at once vs two instances serving 1 each.

Both configurations run side by side (two gateways); the same closed-loop load
(``clients`` requests always outstanding) is applied to each in alternating
windows, so machine noise hits both alike. Reports throughput (median over
windows) and the workers' resident memory (VmRSS, summed over instances).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sealedml._internal.procs import ServiceProcess
from sealedml.bench._harness import bench_stack, progress
from sealedml.bench._setup import publish_for_user

__all__ = ["rss_bytes", "run_concurrency"]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def _instance_pids(gateway: str) -> list[int]:
    stats = httpx.get(f"{gateway}/v1/stats").json()
    return [i["pid"] for f in stats["functions"].values() for i in f["instances"]]


async def _closed_loop(gateway: str, user: Any, inputs: dict[str, np.ndarray], clients: int, seconds: float) -> int:
    from sealedml.envelope.request import BINARY_CONTENT_TYPE, ResponseEnvelope, open_response, seal_request_binary

    done = 0
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                body, ctx = seal_request_binary(
                    inputs, request_key=user.request_key("conc"), model_id="conc", user_id=user.principal_id
                )
                r = await http.post("/v1/infer", content=bytes(body), headers={"content-type": BINARY_CONTENT_TYPE})
                r.raise_for_status()
                open_response(ctx, ResponseEnvelope.parse(r.content))
                done += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    return done


def run_concurrency(
    model_name: str = "mobilenetv2", *, clients: int = 4, window: float = 5.0, rounds: int = 3, quiet: bool = False
) -> dict[str, Any]:
    """Run the comparison; return throughputs, memory and their ratios."""
    from sealedml import zoo

    model = zoo.get(model_name)
    inputs = zoo.sample_inputs(model_name)
    configs = {"one_instance_c2": ("1", "2"), "two_instances_c1": ("2", "1")}
    # per-model routing: start an instance whenever none has a free slot, so the 2 x 1
    # configuration really runs two instances (a packing policy might rather queue).
    common = ["--policy", "per-model", "--keep-alive", "3600"]
    with bench_stack(["--max-instances", "1", "--concurrency", "2", *common]) as stack:
        user = publish_for_user(stack, model, ["conc"])
        gateways = {"one_instance_c2": stack.gateway}
        n_instances, concurrency = configs["two_instances_c1"]
        extra = ServiceProcess.platform(
            stack.keyservice.url,
            stack.store,
            "--max-instances",
            n_instances,
            "--concurrency",
            concurrency,
            *common,
            name="platform-2x1",
            log_path=stack.workdir / "platform-2x1.log",
        )
        try:
            gateways["two_instances_c1"] = extra
            for gw in gateways.values():  # warm up: all instances started, model loaded
                asyncio.run(_closed_loop(gw.url, user, inputs, clients, 3.0))
            started = {name: _instance_pids(gw.url) for name, gw in gateways.items()}
            if len(started["two_instances_c1"]) != 2 or len(started["one_instance_c2"]) != 1:
                raise RuntimeError(f"unexpected instance counts after warm-up: {started}")
            throughput: dict[str, list[float]] = {k: [] for k in gateways}
            for r in range(rounds):
                for name, gw in gateways.items():
                    n = asyncio.run(_closed_loop(gw.url, user, inputs, clients, window))
                    throughput[name].append(n / window)
                    progress(f"[concurrency] round {r + 1} {name}: {n / window:.1f} req/s", quiet)
            memory: dict[str, int] = {}
            instances: dict[str, int] = {}
            for name, gw in gateways.items():
                pids = _instance_pids(gw.url)
                memory[name] = sum(rss_bytes(pid) for pid in pids)
                instances[name] = len(pids)
        finally:
            extra.stop()
    med = {k: statistics.median(v) for k, v in throughput.items()}
    tp_ratio = med["one_instance_c2"] / med["two_instances_c1"]
    mem_ratio = memory["one_instance_c2"] / memory["two_instances_c1"] if memory["two_instances_c1"] else float("nan")
    return {
        "model": model_name,
        "clients": clients,
        "window_s": window,
        "rounds": rounds,
        "instances": instances,
        "throughput_rps": {k: round(v, 2) for k, v in med.items()},
        "rss_mb": {k: round(v / 2**20, 1) for k, v in memory.items()},
        "throughput_ratio": round(tp_ratio, 3),
        "memory_ratio": round(mem_ratio, 3),
        "target": {"throughput_ratio_min": 0.9, "memory_ratio_max": 0.6},
        "target_met": tp_ratio >= 0.9 and mem_ratio <= 0.6,
    }
