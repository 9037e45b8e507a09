"""Benchmarks: ``bench overhead|coldstart|concurrency|memory|trace|release|partition|blind|seco``.

::

    sealedml bench overhead [--model M] [--requests N] [--warmup N] [--runs N]
    sealedml bench coldstart [--model M] [--repeats N]
    sealedml bench concurrency [--model M] [--clients N] [--window S] [--rounds N]
    sealedml bench memory [--model M] [--budget SIZES] [--repeats N] [--threads N]
    sealedml bench trace [--models N] [--policy P,...] [--trace CSV] [--duration S] [--seed S] [--seeds N] ...
    sealedml bench release [--concurrency N] [--kem x25519|hybrid|both] [--duration S]
    sealedml bench partition [--model M] [--front-cut T,...] [--back-cut T,...] [--requests N] [--device D]
    sealedml bench partition --model digits-cnn|faces-cnn [--seed N] [--plot FILE.png]
    sealedml bench blind [--model M] [--requests N] [--faults N] [--device D]
    sealedml bench seco [--model digits-mlp|small-cnn] [--queries N] [--no-tee-path] [--in-process]

Each runs real processes on loopback (see ``sealedml.bench``), prints progress on stderr and
its results on stdout (one JSON object with ``--json``). The benchmark modules are imported
only when their command runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from sealedml._internal.units import parse_sizes
from sealedml.cli._args import Subcommands, add_command, add_group
from sealedml.errors import ConfigurationError

__all__ = [
    "RELEASE_KEMS",
    "add_parser",
    "handle_bench_blind",
    "handle_bench_coldstart",
    "handle_bench_concurrency",
    "handle_bench_memory",
    "handle_bench_overhead",
    "handle_bench_partition",
    "handle_bench_release",
    "handle_bench_seco",
    "handle_bench_trace",
    "release_options",
]

#: ``bench release --kem`` choices and the runtime KEMs each measures.
RELEASE_KEMS: dict[str, tuple[str, ...]] = {
    "x25519": ("x25519",),
    "hybrid": ("hybrid",),
    "both": ("x25519", "hybrid"),
}


def handle_bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench overhead``: secure serving vs plain serving vs in-process ONNX Runtime."""
    from sealedml.bench.overhead import run_overhead_repeated

    if args.runs < 1:
        raise ConfigurationError(f"--runs must be at least 1, not {args.runs}")
    return run_overhead_repeated(
        args.model, runs=args.runs, requests=args.requests, warmup=args.warmup, quiet=args.json
    )


def handle_bench_coldstart(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench coldstart``: the first request with no instance, with and without a warm pool."""
    from sealedml.bench.coldstart import run_coldstart

    return run_coldstart(args.model, repeats=args.repeats, quiet=args.json)


def handle_bench_concurrency(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench concurrency``: one instance serving 2 at once vs two instances serving 1."""
    from sealedml.bench.concurrency import run_concurrency

    return run_concurrency(args.model, clients=args.clients, window=args.window, rounds=args.rounds, quiet=args.json)


def handle_bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench memory``: whole-model vs memory-bounded execution at each ``--budget``.

    Raises:
        ConfigurationError: a budget is not a size.
    """
    from sealedml.bench.memory import format_table, run_memory

    budgets = parse_sizes(args.budget)
    result = run_memory(args.model, budgets, repeats=args.repeats, threads=args.threads, quiet=args.json)
    if not args.json:
        print(format_table(result))
    return result


def handle_bench_trace(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench trace``: replay a synthetic or CSV trace against each routing policy, per seed.

    Without ``--json`` prints the per-seed table and returns only the verdict.

    Raises:
        ConfigurationError: unknown policy, ``--seeds`` below 1, or several seeds of a CSV trace.
    """
    from sealedml.bench.trace import format_table, run_trace

    policies = tuple(p.strip() for p in args.policy.split(",") if p.strip())
    result = run_trace(
        models=args.models,
        policies=policies,
        trace_file=args.trace,
        duration=args.duration,
        seed=args.seed,
        seeds=args.seeds,
        keep_alive=args.keep_alive,
        slo_ms=args.slo_ms,
        model_name=args.model,
        plot=args.plot,
        warm_pool=args.warm_pool,
        quiet=args.json,
    )
    if args.json:
        return result
    print(format_table(result))
    return {"targets_met": result["targets_met"], "plot": result["plot"]}


def release_options(args: argparse.Namespace) -> tuple[int, tuple[str, ...], float]:
    """The checked flags of ``bench release``: ``(concurrency, kems, duration)``.

    Raises:
        ConfigurationError: ``--concurrency`` below 1 or ``--duration`` not a positive number.
    """
    concurrency: int = args.concurrency
    duration: float = args.duration
    if concurrency < 1:
        raise ConfigurationError(f"--concurrency must be at least 1, not {concurrency}")
    if not (duration > 0 and math.isfinite(duration)):
        raise ConfigurationError(f"--duration must be a positive number of seconds, not {args.duration}")
    return concurrency, RELEASE_KEMS[args.kem], duration


def handle_bench_release(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench release``: key releases per second against one KeyService process.

    Raises:
        ConfigurationError: bad flags (checked before anything starts).
    """
    concurrency, kems, duration = release_options(args)
    from sealedml.bench.release import run_release

    if args.replicas < 1 or (args.kill and args.replicas < 2):
        raise ConfigurationError("--replicas must be at least 1, and --kill needs --replicas 2 or more")
    return run_release(
        concurrency=concurrency, kems=kems, duration=duration, quiet=args.json, replicas=args.replicas, kill=args.kill
    )


def handle_bench_partition(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench partition``: all-in-TEE vs ternary execution with a real executor process.

    Raises:
        ConfigurationError: bad flags or cuts.
    """
    from sealedml.bench.partition import TRAINED_MODELS, run_leakage, run_partition
    from sealedml.cli.partition_assess import check_plot_path, emit_assessment

    check_plot_path(args.plot)
    if args.model in TRAINED_MODELS:
        if args.front_cut or args.back_cut:
            raise ConfigurationError(
                "--front-cut and --back-cut time a split; the trained models are assessed at every cut"
            )
        result = run_leakage(args.model, seed=args.seed, plot_path=args.plot, quiet=args.json)
        return emit_assessment(result, as_json=args.json)
    if args.plot is not None:
        raise ConfigurationError(f"--plot exists for the trained models only ({', '.join(TRAINED_MODELS)})")

    def cut(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    return run_partition(
        args.model,
        front_cut=cut(args.front_cut),
        back_cut=cut(args.back_cut),
        requests=args.requests,
        warmup=args.warmup,
        device=args.device,
        quiet=args.json,
    )


def handle_bench_blind(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench blind``: all-in-TEE vs blinded, verified offload vs plain ternary, and a fault campaign.

    Raises:
        ConfigurationError: bad flags, or torch missing for digits-cnn.
    """
    from sealedml.bench.blind import run_blind

    return run_blind(
        args.model,
        requests=args.requests,
        warmup=args.warmup,
        faults=args.faults,
        weight_bits=args.weight_bits,
        input_bits=args.input_bits,
        device=args.device,
        quiet=args.json,
    )


def handle_bench_seco(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``bench seco``: SECO mode's offline and online cost per query, bytes per link, accuracy."""
    from sealedml.bench.seco import run_seco

    return run_seco(
        args.model, queries=args.queries, tee_path=args.tee_path, in_process=args.in_process, quiet=args.json
    )


def add_parser(subparsers: Subcommands) -> None:
    """Register the ``bench`` group on ``subparsers``."""
    bench = add_group(subparsers, "bench", "benchmarks")
    p = add_command(bench, "overhead", handle_bench_overhead, "secure vs plain serving vs in-process ONNX Runtime")
    p.add_argument(
        "--model",
        default="mobilenetv2",
        choices=["mobilenetv2", "resnet50", "minilm", "digits", "toy"],
        help="which model (default mobilenetv2)",
    )
    p.add_argument("--requests", type=int, default=60, help="measured requests per path (default 60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds before measuring (default 5)")
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the whole measurement N times; targets met only if every run meets them (default 1)",
    )

    p = add_command(
        bench, "coldstart", handle_bench_coldstart, "first request with no instance, with/without warm pool"
    )
    p.add_argument(
        "--model",
        default="mobilenetv2",
        choices=["mobilenetv2", "resnet50", "minilm"],
        help="which model (default mobilenetv2; minilm is the transformer, fed padded token ids)",
    )
    p.add_argument("--repeats", type=int, default=5, help="measured repetitions (default 5)")

    p = add_command(bench, "concurrency", handle_bench_concurrency, "1 instance x concurrency 2 vs 2 instances x 1")
    p.add_argument(
        "--model",
        default="mobilenetv2",
        choices=["mobilenetv2", "resnet50", "minilm"],
        help="which model (default mobilenetv2; minilm is the transformer, fed padded token ids)",
    )
    p.add_argument("--clients", type=int, default=4, help="requests kept outstanding (default 4)")
    p.add_argument("--window", type=float, default=5.0, help="seconds per measurement window (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")

    p = add_command(bench, "memory", handle_bench_memory, "whole-model vs memory-bounded execution at several budgets")
    p.add_argument(
        "--model",
        default="resnet50",
        choices=["resnet50", "mobilenetv2", "vgg16", "minilm"],
        help="which model (default resnet50; minilm is the transformer, fed padded token ids)",
    )
    p.add_argument("--budget", default="16MB,32MB,64MB", help="comma-separated budgets (default 16MB,32MB,64MB)")
    p.add_argument("--repeats", type=int, default=10, help="measured repetitions (default 10)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every configuration (default: all cores; an instance serving "
        "N requests at once gives each cores/N)",
    )

    p = add_command(bench, "trace", handle_bench_trace, "replay a bursty or CSV trace against each routing policy")
    p.add_argument("--models", type=int, default=10, help="models in a synthetic trace (default 10)")
    p.add_argument("--policy", default="per-model,sesemi,sealedml", help="comma-separated policies to compare")
    p.add_argument("--trace", type=Path, default=None, help="CSV of timestamp,model rows instead of synthetic")
    p.add_argument(
        "--duration",
        type=float,
        default=300.0,
        help="synthetic trace length, seconds (default 300: every model requested, p99 past the first loads)",
    )
    p.add_argument("--seed", type=int, default=0, help="first trace seed (default 0)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run the seeds --seed … --seed+N-1 and check the targets on each (default 1)",
    )
    p.add_argument(
        "--keep-alive",
        type=float,
        default=60.0,
        help="instance keep-alive, seconds, the same for every policy (default 60, as platform serve)",
    )
    p.add_argument("--slo-ms", type=float, default=1000.0, help="latency SLO, ms (default 1000)")
    p.add_argument(
        "--model",
        default="mobilenetv2",
        choices=["mobilenetv2", "digits", "resnet50"],
        help="which model (default mobilenetv2)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="write a PNG: GB-seconds and p99 per policy and seed, and the latency CDFs",
    )
    p.add_argument("--warm-pool", type=int, default=1, help="spare pre-started instances per platform (default 1)")

    p = add_command(
        bench,
        "release",
        handle_bench_release,
        "key releases per second against one KeyService process (real HTTP, real SQLite, simulated evidence)",
    )
    p.add_argument("--concurrency", type=int, default=8, help="simulated runtimes releasing at once (default 8)")
    p.add_argument(
        "--kem",
        default="both",
        choices=list(RELEASE_KEMS),
        help="runtime KEM to measure: X25519, hybrid ML-KEM-768 + X25519, or both (default both)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per KEM (default 10)")
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="KeyService replicas (default 1, on SQLite); more share a PostgreSQL server started for the run",
    )
    p.add_argument(
        "--kill",
        action="store_true",
        help="kill -9 one replica halfway through the last window while an owner writes to it; report lost writes",
    )

    p = add_command(
        bench, "partition", handle_bench_partition, "all-in-TEE vs ternary (front and back in the TEE, middle outside)"
    )
    p.add_argument(
        "--model",
        default="mobilenetv2",
        choices=["mobilenetv2", "resnet50", "digits-cnn", "faces-cnn"],
        help="mobilenetv2, resnet50: latency of the split; digits-cnn, faces-cnn: train the victim and "
        "assess each cut's leakage (needs sealedml[assess]) (default mobilenetv2)",
    )
    p.add_argument("--front-cut", default=None, metavar="T[,T...]", help="default: after the first stages")
    p.add_argument("--back-cut", default=None, metavar="T[,T...]", help="default: the global pool")
    p.add_argument("--requests", type=int, default=40, help="measured requests per configuration (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds before measuring (default 5)")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the executor runs the middle"
    )
    p.add_argument("--seed", type=int, default=0, help="trained models: training and attack seed (default 0)")
    p.add_argument(
        "--plot", type=Path, default=None, metavar="FILE.png", help="trained models: write the leakage figure"
    )
    p = add_command(
        bench,
        "blind",
        handle_bench_blind,
        "all-in-TEE vs blinded, verified offload of linear layers vs plain ternary; injected faults detected",
    )
    p.add_argument(
        "--model",
        default="digits-cnn",
        choices=["digits-cnn", "mobilenetv2", "resnet50"],
        help="digits-cnn (trained, needs sealedml[assess]; reports accuracy) or a zoo CNN (speed only) "
        "(default digits-cnn)",
    )
    p.add_argument("--requests", type=int, default=40, help="measured requests per configuration (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds before measuring (default 5)")
    p.add_argument("--faults", type=int, default=1000, help="requests with an altered product (default 1000)")
    p.add_argument("--weight-bits", type=int, default=8, help="quantized weight bits (default 8)")
    p.add_argument("--input-bits", type=int, default=8, help="quantized layer input bits (default 8)")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the executor computes the products"
    )
    p = add_command(
        bench,
        "seco",
        handle_bench_seco,
        "SECO mode (no TEE): offline and online time per query, bytes per link, user CPU, accuracy",
    )
    p.add_argument("--model", default="digits-mlp", choices=["digits-mlp", "small-cnn"], help="default digits-mlp")
    p.add_argument("--queries", type=int, default=10, help="queries on the test split (default 10)")
    p.add_argument(
        "--no-tee-path",
        dest="tee_path",
        action="store_false",
        help="skip the comparison with the same model served through SealedML's TEE path",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run A, B and C in this process instead of as three server processes over HTTP",
    )
