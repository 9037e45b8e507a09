"""``sealedml bench memory``: memory-bounded (streaming) execution against the whole-model path.

One interleaved run per model, batch 1, warm, in one process so machine noise hits
every configuration alike, on the model's own inputs (:func:`sealedml.zoo.sample_inputs`:
an image for the CNNs, padded token ids for ``minilm``):

* **whole** — decrypt the whole sealed model once, then serve from one
  :class:`~sealedml.runtime.engine.LoadedModel` (the default runtime path);
* **streaming** at each budget, with and without prefetch — a
  :class:`~sealedml.runtime.memory_bounded.StreamingModel` that decrypts each
  segment's weights per request: by default its *optimized* segments (ONNX
  Runtime's NCHWc graphs, weights streamed from the ephemeral-key spill);
  with ``baseline=True`` also the unoptimized segments (weights straight from
  the sealed container) for comparison.

Reported per configuration: median latency and its ratio to whole, the tracked
peak (decrypted weights + live activations; for whole: model bytes + the
activation peak), the planned peak, the largest output difference from whole,
time split into decrypt / compute / waiting for prefetch, the load time (for
optimized segments: the one-off optimization pass) and — each in a fresh
subprocess, so allocator state from one configuration cannot hide another's —
the process's resident high-water mark (``VmHWM``), during loading and during
the runs separately.

Sizes: ``_internal.units.parse_size`` reads ``MB`` as 10^6 bytes and ``MiB`` as 2^20 (likewise
k/K and G), so ``32MB`` is 32,000,000 bytes, matching the planner's messages.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sealedml.bench._harness import progress
from sealedml.errors import ConfigurationError

__all__ = ["MODELS", "TARGETS", "format_table", "run_memory"]

#: Models the benchmark accepts.
MODELS: tuple[str, ...] = ("resnet50", "mobilenetv2", "vgg16", "minilm")

#: Acceptance targets of the memory-bounded execution issue.
TARGETS: dict[str, float] = {
    "max_abs_diff": 1e-4,
    "resnet50_32mb_ratio": 1.3,
}

_MB = 1_000_000
_RSS_TIMEOUT_S = 900


def _mb(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / _MB, 2)


def _input(model: str, seed: int) -> dict[str, np.ndarray]:
    """Batch 1 of the model's own inputs (an image for the CNNs, padded token ids for minilm)."""
    from sealedml import zoo

    return zoo.sample_inputs(model, batch=1, seed=seed)


def _rss_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration in a fresh subprocess; return its resident memory figures."""
    cmd = [sys.executable, "-c", "from sealedml.bench.memory import _rss_probe_main; _rss_probe_main()"]
    done = subprocess.run(
        cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=_RSS_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:300]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _rss_probe_main() -> None:
    """Subprocess entry point of :func:`_rss_probe` (spec as JSON on stdin, result as JSON on stdout)."""
    from sealedml.envelope.model_container import SealedModelReader, open_model
    from sealedml.runtime.engine import LoadedModel
    from sealedml.runtime.memory_bounded import StreamingModel, process_memory, reset_peak_rss

    spec = json.loads(sys.stdin.read())
    key = bytes.fromhex(spec["key"])
    inputs = _input(spec["model"], spec["seed"])
    baseline = process_memory()
    model: LoadedModel | StreamingModel
    if spec["mode"] == "whole":
        model = LoadedModel(open_model(spec["path"], key), model_id="bench", version=1, threads=spec["threads"])
    else:
        model = StreamingModel(
            SealedModelReader(spec["path"], key),
            budget_bytes=spec["budget"],
            prefetch=spec["prefetch"],
            threads=spec["threads"],
            optimize=spec.get("optimize", True),
        )
    loaded = process_memory()
    # Separate the load-time peak (the optimization pass) from the per-request peak.
    reset = reset_peak_rss()
    for _ in range(spec["runs"]):
        model.run(inputs)
    after = process_memory()
    print(
        json.dumps(
            {
                "baseline_rss_bytes": baseline.rss_bytes,
                "loaded_rss_bytes": loaded.rss_bytes,
                "load_hwm_bytes": loaded.hwm_bytes,
                "rss_after_bytes": after.rss_bytes,
                "hwm_bytes": max(after.hwm_bytes, loaded.hwm_bytes),
                "run_hwm_bytes": after.hwm_bytes if reset else None,
            }
        )
    )


def run_memory(
    model: str,
    budgets: list[int],
    *,
    repeats: int = 10,
    quiet: bool = False,
    warmup: int = 2,
    threads: int | None = None,
    rss: bool = True,
    seed: int = 0,
    optimize: bool = True,
    baseline: bool = False,
) -> dict[str, Any]:
    """Compare whole-model execution with streaming execution at each budget.

    Args:
        model: one of :data:`MODELS` (``"resnet50"``, ``"mobilenetv2"``, ``"vgg16"`` or ``"minilm"``).
        budgets: per-run memory budgets in bytes (see :func:`parse_size`).
        repeats: timed rounds; each round runs every configuration once, in rotated order.
        quiet: no progress lines on stderr.
        warmup: untimed runs per configuration first.
        threads: ONNX Runtime intra-op threads for every configuration (default: all
            cores, as a worker serving one request at a time).
        rss: also measure each configuration's resident high-water mark in a subprocess.
        seed: input seed (:func:`sealedml.zoo.sample_inputs`).
        optimize: stream optimized segments (the default of ``StreamingModel``).
        baseline: with ``optimize``, also measure the unoptimized segments (rows with
            ``"optimized": False``; their speedups under ``prefetch_speedup_unoptimized``).

    Returns:
        A JSON-serialisable dict: ``whole`` and ``streaming`` (one entry per budget and
        prefetch setting: median and p90 latency, ratio to whole, tracked / planned peak,
        RSS, max abs output difference, decrypt / compute / wait times, segments, splits,
        or ``error`` when the budget is infeasible), ``prefetch_speedup`` per budget,
        and ``targets``.

    Raises:
        ConfigurationError: unknown model, no budgets, or ``repeats`` < 1.
    """
    from sealedml import zoo
    from sealedml.crypto import random_bytes
    from sealedml.envelope.model_container import seal_model
    from sealedml.runtime.engine import intra_op_threads

    if model not in MODELS:
        raise ConfigurationError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if not budgets or repeats < 1:
        raise ConfigurationError("give at least one budget and repeats ≥ 1")
    threads = threads or intra_op_threads(1)
    key = random_bytes(32)

    progress(f"[memory] building and sealing {model}", quiet)
    onnx_model = zoo.get(model)
    sealed = seal_model(onnx_model, model_id=f"bench-{model}", model_version=1, model_key=key)
    del onnx_model
    with tempfile.TemporaryDirectory(prefix="sealedml-memory-") as workdir:
        path = Path(workdir) / f"{model}.sealed"
        path.write_bytes(sealed)
        del sealed  # streaming reads the file with pread; keep no ciphertext copy resident
        modes = [optimize] + ([False] if baseline and optimize else [])
        weight_bytes, whole_row, rows = _measure(
            model,
            path,
            key,
            budgets,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            seed=seed,
            quiet=quiet,
            modes=modes,
        )
        if rss:
            progress("[memory] measuring resident memory of each configuration in a subprocess", quiet)
            spec_base = {
                "path": str(path),
                "key": key.hex(),
                "model": model,
                "threads": threads,
                "runs": 3,
                "seed": seed,
            }
            whole_row.update(_rss_fields(_rss_probe({**spec_base, "mode": "whole"})))
            for row in rows.values():
                if "median_ms" in row:
                    row.update(
                        _rss_fields(
                            _rss_probe(
                                {
                                    **spec_base,
                                    "mode": "streaming",
                                    "budget": row["budget_bytes"],
                                    "prefetch": row["prefetch"],
                                    "optimize": row["optimized"],
                                }
                            )
                        )
                    )

    speedup: dict[str, float] = {}
    speedup_unoptimized: dict[str, float] = {}
    for budget in budgets:
        for suffix, target in (("", speedup), ("/unoptimized", speedup_unoptimized)):
            on, off = rows.get(f"{budget}/prefetch{suffix}", {}), rows.get(f"{budget}/serial{suffix}", {})
            if "median_ms" in on and "median_ms" in off:
                target[str(budget)] = round(off["median_ms"] / on["median_ms"], 3)
    streaming = list(rows.values())
    measured = [r for r in streaming if "median_ms" in r]
    targets: dict[str, Any] = {
        "outputs_match": all(r["max_abs_diff"] <= TARGETS["max_abs_diff"] for r in measured),
        "peaks_within_budget": all(r["within_budget"] for r in measured),
        "prefetch_helps": {b: s > 1.0 for b, s in speedup.items()},
    }
    if model == "resnet50":
        at32 = rows.get(f"{32 * _MB}/prefetch")
        if at32 and "median_ms" in at32:
            targets["resnet50_32mb_ratio"] = at32["ratio_to_whole"]
            targets["resnet50_32mb_ratio_met"] = at32["ratio_to_whole"] <= TARGETS["resnet50_32mb_ratio"]
            targets["resnet50_32mb_peak_met"] = at32["within_budget"]
        serial32 = rows.get(f"{32 * _MB}/serial")
        if serial32 and "median_ms" in serial32:
            targets["resnet50_32mb_ratio_serial"] = serial32["ratio_to_whole"]
    if model == "vgg16":
        at64 = rows.get(f"{64 * _MB}/prefetch")
        if at64 and "tracked_peak_bytes" in at64:
            targets["vgg16_64mb_peak_met"] = at64["within_budget"]
    if model == "minilm":
        # Issue 20: the transformer within 16 MB, its 47 MB word-embedding table included.
        at16 = [r for r in measured if r["budget_bytes"] == 16 * _MB]
        if at16:
            targets["minilm_16mb_peak_met"] = all(r["within_budget"] for r in at16)
            targets["minilm_16mb_outputs_match"] = all(r["max_abs_diff"] <= TARGETS["max_abs_diff"] for r in at16)
    if not targets["outputs_match"]:
        progress("[memory] WARNING: some streaming outputs differ from whole-model outputs by more than 1e-4", quiet)
    return {
        "model": model,
        "batch": 1,
        "repeats": repeats,
        "intra_op_threads": threads,
        "cpu_count": os.cpu_count(),
        "weight_bytes": weight_bytes,
        "weight_mb": _mb(weight_bytes),
        "whole": whole_row,
        "streaming": streaming,
        "prefetch_speedup": speedup,
        "prefetch_speedup_unoptimized": speedup_unoptimized,
        "targets": targets,
    }


def _outputs_of(model: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs: dict[str, np.ndarray] = model.run(feeds).outputs
        return outputs

    return run


def _max_diff(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(got[k] - reference[k]))) for k in reference)


def _measure(
    model: str,
    path: Path,
    key: bytes,
    budgets: list[int],
    *,
    repeats: int,
    warmup: int,
    threads: int,
    seed: int,
    quiet: bool,
    modes: list[bool],
) -> tuple[int, dict[str, Any], dict[str, dict[str, Any]]]:
    """The interleaved latency run; every model object is freed when it returns."""
    from sealedml.envelope.model_container import SealedModelReader, open_model
    from sealedml.runtime.engine import LoadedModel
    from sealedml.runtime.memory_bounded import BudgetError, StreamingModel, plan, planning_graph

    inputs = _input(model, seed)
    t0 = time.perf_counter()
    whole = LoadedModel(open_model(path, key), model_id=model, version=1, threads=threads)
    whole_load_s = time.perf_counter() - t0
    reference = whole.run(inputs).outputs
    reader = SealedModelReader(path, key)
    sizes = {entry.name: entry.length for entry in reader.manifest.tensors}
    # The whole-model working set: every weight plus the activation peak of one run.
    unbounded = plan(planning_graph(reader), sizes, 1 << 50, prefetch=False)
    whole_activations = max(s.activation_peak_bytes for s in unbounded.segments)

    configs: dict[str, StreamingModel] = {}
    rows: dict[str, dict[str, Any]] = {}
    for optimized in modes:
        for budget in budgets:
            for prefetch in (True, False):
                name = f"{budget}/{'prefetch' if prefetch else 'serial'}" + ("" if optimized else "/unoptimized")
                row: dict[str, Any] = {
                    "budget_bytes": budget,
                    "budget_mb": _mb(budget),
                    "prefetch": prefetch,
                    "optimized": optimized,
                }
                rows[name] = row
                try:
                    t0 = time.perf_counter()
                    sm = StreamingModel(
                        reader, budget_bytes=budget, prefetch=prefetch, threads=threads, optimize=optimized
                    )
                    row["build_s"] = round(time.perf_counter() - t0, 3)
                except BudgetError as exc:
                    row["error"] = str(exc)
                    row["minimum_budget_bytes"] = exc.minimum_budget
                    progress(f"[memory] {model} {_mb(budget)} MB prefetch={prefetch}: {exc}", quiet)
                    continue
                configs[name] = sm
                ls = sm.load_stats
                row.update(
                    {
                        "segments": len(sm.plan.segments),
                        "optimized_segments": ls.optimized_segments,
                        "fallbacks": [{"segment": k, "reason": r} for k, r in ls.fallbacks],
                        "plans": ls.plans,
                        "headroom_bytes": ls.headroom_bytes,
                        "optimize_s": round(ls.optimize_s, 3),
                        "nchwc_nodes": ls.nchwc_nodes,
                        "decrypted_weight_mb": _mb(ls.weight_bytes),
                        "spill_mb": _mb(ls.spill_bytes),
                        "splits": {k: {"strategy": s, "pieces": p} for k, (s, p) in sm.plan.splits.items()},
                        # The bound with the weights each segment actually decrypts (optimized
                        # weights may be padded): what the tracked peak must stay under.
                        "planned_peak_bytes": sm.peak_bound_bytes,
                        "planned_peak_mb": _mb(sm.peak_bound_bytes),
                        "plan_peak_mb": _mb(sm.plan.peak_bytes),
                    }
                )
                progress(
                    f"[memory] {model} {_mb(budget)} MB prefetch={prefetch} optimize={optimized}: "
                    f"{len(sm.plan.segments)} segments ({ls.optimized_segments} optimized), built in "
                    f"{row['build_s']} s",
                    quiet,
                )

    # Both paths return a RunResult; the runners return its outputs.
    runners: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {"whole": _outputs_of(whole)}
    runners.update({name: _outputs_of(sm) for name, sm in configs.items()})
    progress(f"[memory] warming up {len(runners)} configurations", quiet)
    diffs: dict[str, float] = {}
    for name, fn in runners.items():
        for _ in range(max(1, warmup)):
            out = fn(inputs)
        diffs[name] = _max_diff(out, reference)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, int] = dict.fromkeys(configs, 0)
    stats: dict[str, list[Any]] = {name: [] for name in configs}
    order = list(runners)
    for i in range(repeats):
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:  # rotate so no configuration always runs first
            t = time.perf_counter()
            out = runners[name](inputs)
            samples[name].append(time.perf_counter() - t)
            if name in configs:
                st = configs[name].last_stats
                if st is not None:
                    peaks[name] = max(peaks[name], st.peak_bytes)
                    stats[name].append(st)
                diffs[name] = max(diffs[name], _max_diff(out, reference))
        if (i + 1) % 5 == 0 or i + 1 == repeats:
            progress(f"[memory] {model}: {i + 1}/{repeats} rounds", quiet)

    whole_ms = statistics.median(samples["whole"]) * 1000
    whole_row: dict[str, Any] = {
        "median_ms": round(whole_ms, 2),
        "p90_ms": round(float(np.percentile(samples["whole"], 90)) * 1000, 2),
        "load_s": round(whole_load_s, 3),
        "tracked_peak_bytes": whole.nbytes + whole_activations,
        "tracked_peak_mb": _mb(whole.nbytes + whole_activations),
    }
    for name, sm in configs.items():
        row = rows[name]
        med = statistics.median(samples[name]) * 1000
        runs = stats[name]
        row.update(
            {
                "median_ms": round(med, 2),
                "p90_ms": round(float(np.percentile(samples[name], 90)) * 1000, 2),
                "ratio_to_whole": round(med / whole_ms, 3),
                "tracked_peak_bytes": peaks[name],
                "tracked_peak_mb": _mb(peaks[name]),
                "within_budget": peaks[name] <= row["budget_bytes"],
                "max_abs_diff": diffs[name],
                "decrypt_ms": round(statistics.median(s.decrypt_s for s in runs) * 1000, 2),
                "compute_ms": round(statistics.median(s.compute_s for s in runs) * 1000, 2),
                "wait_ms": round(statistics.median(s.wait_s for s in runs) * 1000, 2),
                # Of which before anything computed (near 0 when the first segment was decrypted
                # after the previous run: warm_first_segment).
                "first_wait_ms": round(statistics.median(s.segments[0].wait_s for s in runs) * 1000, 2),
                "warm_first_segment": sm.warm_first_segment,
            }
        )
        sm.close()
    reader.close()
    weight_bytes = sum(sizes.values())
    return weight_bytes, whole_row, rows


def _rss_fields(probe: dict[str, Any]) -> dict[str, Any]:
    if "error" in probe:
        return {"rss_error": probe["error"]}
    fields = {
        "rss_hwm_mb": _mb(probe["hwm_bytes"]),
        "rss_baseline_mb": _mb(probe["baseline_rss_bytes"]),
        "rss_delta_mb": _mb(probe["hwm_bytes"] - probe["baseline_rss_bytes"]),
    }
    if probe.get("load_hwm_bytes") is not None:
        fields["rss_load_delta_mb"] = _mb(probe["load_hwm_bytes"] - probe["baseline_rss_bytes"])
        fields["rss_loaded_delta_mb"] = _mb(probe["loaded_rss_bytes"] - probe["baseline_rss_bytes"])
    if probe.get("run_hwm_bytes") is not None:
        fields["rss_run_delta_mb"] = _mb(probe["run_hwm_bytes"] - probe["baseline_rss_bytes"])
    return fields


def format_table(result: dict[str, Any]) -> str:
    """Render a :func:`run_memory` result as a Markdown table.

    Args:
        result: the dict returned by :func:`run_memory`.

    Returns:
        A header line and one row per configuration (whole first).
    """

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:,.2f}".rstrip("0").rstrip(".")
        return str(value)

    head = (
        "| config | budget MB | segments (optimized) | load s | median ms | x whole | tracked peak MB "
        "| planned peak MB | RSS HWM MB (Δ) | RSS Δ load / runs MB | decrypt ms | compute ms | wait ms "
        "| max abs diff |"
    )
    lines = [
        f"**{result['model']}** — weights {result['weight_mb']} MB, batch 1, "
        f"{result['intra_op_threads']} intra-op threads, {result['repeats']} rounds",
        "",
        head,
        "|" + "---|" * 14,
    ]
    whole = result["whole"]
    rss = f"{cell(whole.get('rss_hwm_mb'))} ({cell(whole.get('rss_delta_mb'))})" if "rss_hwm_mb" in whole else "-"
    lines.append(
        f"| whole model | - | 1 | {cell(whole['load_s'])} | {cell(whole['median_ms'])} | 1 "
        f"| {cell(whole['tracked_peak_mb'])} | - "
        f"| {rss} | - | - | - | - | 0 |"
    )
    for row in result["streaming"]:
        kind = "optimized" if row.get("optimized", False) else "unoptimized"
        label = f"{kind}, {'prefetch' if row['prefetch'] else 'serial'}"
        if "error" in row:
            lines.append(f"| {label} | {cell(row['budget_mb'])} | infeasible: {row['error']} |" + " |" * 11)
            continue
        rss = f"{cell(row.get('rss_hwm_mb'))} ({cell(row.get('rss_delta_mb'))})" if "rss_hwm_mb" in row else "-"
        split_rss = (
            f"{cell(row.get('rss_load_delta_mb'))} / {cell(row.get('rss_run_delta_mb'))}"
            if "rss_load_delta_mb" in row
            else "-"
        )
        segments = f"{row['segments']} ({row.get('optimized_segments', 0)})"
        lines.append(
            f"| {label} | {cell(row['budget_mb'])} | {segments} | {cell(row['build_s'])} "
            f"| {cell(row['median_ms'])} "
            f"| {cell(row['ratio_to_whole'])} | {cell(row['tracked_peak_mb'])} | {cell(row['planned_peak_mb'])} "
            f"| {rss} | {split_rss} | {cell(row['decrypt_ms'])} | {cell(row['compute_ms'])} "
            f"| {cell(row['wait_ms'])} | {row['max_abs_diff']:.2e} |"
        )
    for key, label in (("prefetch_speedup", "optimized"), ("prefetch_speedup_unoptimized", "unoptimized")):
        if result.get(key):
            parts = ", ".join(f"{cell(int(b) / _MB)} MB: {s}x" for b, s in result[key].items())
            lines += ["", f"Prefetch speedup, {label} (serial / prefetch median): {parts}"]
    return "\n".join(lines)
