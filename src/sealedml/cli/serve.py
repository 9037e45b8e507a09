"""The long-running services: ``keyservice serve``, ``platform serve``, ``worker serve`` and ``up``.

::

    sealedml keyservice serve --data-dir DIR [--store postgresql://…] [--host H] [--port P] [--lease-ttl S] ...
    sealedml platform serve --keyservice URL --store DIR [--host H] [--port P] [--policy P] ...
    sealedml worker serve --keyservice URL --store DIR [--host H] [--port P] ...
    sealedml up --data-dir DIR [--host H] [--keyservice-port P] [--gateway-port P] [--lease-ttl S]

Each ``serve`` runs in the foreground until SIGTERM or Ctrl-C, announcing its URL on stdout as a
``{"event": "listening", ...}`` line; ``up`` starts a KeyService and a platform as child processes
(the way the demo, the benchmarks and the integration tests do).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sealedml._internal.limits import max_request
from sealedml.cli._args import (
    DEFAULT_HOST,
    Subcommands,
    add_budget,
    add_command,
    add_group,
    add_keyservice_trust,
    add_tee,
    add_tls,
    keyservice_trust,
    keyservice_trust_args,
    keyservice_trust_options,
    memory_budget,
    runtime_measurement,
    spill_dir,
    warm_first_segment,
)
from sealedml.errors import ConfigurationError
from sealedml.runtime.heap_reserve import HEAP_RESERVE_MODES

__all__ = [
    "add_parser",
    "handle_executor_serve",
    "handle_keyservice_serve",
    "handle_platform_serve",
    "handle_up",
    "handle_worker_serve",
]

#: ``platform serve`` flags only the local engine implements, with their defaults: Ray Serve
#: routes, queues and scales by itself. (``--tls`` and ``--memory-mb`` reach the worker each
#: Ray replica starts.)
_LOCAL_ENGINE_ONLY: dict[str, Any] = {
    "queue_limit": 512,
    "queue_timeout": 60.0,
    "policy": "sealedml",
    "warm_pool": 0,
    "instance_start": "fork",
    "unsafe_plaintext_dir": None,
    "executor": "none",
    "max_request": None,
}


def handle_keyservice_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``keyservice serve``: run the KeyService until stopped.

    Raises:
        ConfigurationError: bad verifier options or policy document.
    """
    from sealedml.attestation.tee import VerifierOptions
    from sealedml.keyservice.recovery import load_recovery_policy
    from sealedml.keyservice.server import serve

    policy = None
    if args.policy is not None:
        from sealedml.attestation.policy_document import load_policy

        policy = load_policy(args.policy)
    accept = tuple(t.strip() for t in args.accept.split(",") if t.strip()) if args.accept else None
    verifiers = None
    if accept is not None or args.collateral or args.pccs_url or args.vcek:
        verifiers = VerifierOptions(
            accept=accept or ("simulated",),
            collateral=args.collateral,
            pccs_url=args.pccs_url,
            cache_dir=args.cache_dir,
            vcek=args.vcek,
        )
    serve(
        args.data_dir,
        args.host,
        args.port,
        tee=args.tee,
        lease_ttl=args.lease_ttl,
        verifiers=verifiers,
        policy=policy,
        tls=args.tls,
        unsafe_allow_simulated=args.unsafe_allow_simulated,
        store=args.store,
        join=args.join,
        replica_measurements=frozenset(m.lower() for m in args.replica_measurement),
        recovery=load_recovery_policy(args.recovery_holders) if args.recovery_holders else None,
    )
    return {"stopped": "keyservice"}


def handle_platform_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``platform serve``: run the gateway (local process pool or Ray Serve) until stopped.

    Raises:
        ConfigurationError: bad memory budget, spill directory or trust options.
    """
    from sealedml.platform.server import serve

    if args.engine != "ray" and args.ray_record is not None:
        raise ConfigurationError("--ray-record applies to --engine ray")
    if args.engine == "ray":
        from sealedml.platform.ray_engine import RayEngineConfig, serve_ray

        local_only = [
            "--" + name.replace("_", "-")
            for name, default in _LOCAL_ENGINE_ONLY.items()
            if getattr(args, name) != default
        ]
        if local_only:
            raise ConfigurationError(f"--engine ray does not support {', '.join(local_only)} (local engine only)")
        keyservice_trust(args)  # a malformed policy is refused here, not in every replica
        serve_ray(
            RayEngineConfig(
                keyservice=args.keyservice,
                store=args.store,
                concurrency=args.concurrency,
                max_replicas=args.max_instances,
                keep_alive=args.keep_alive,
                tee=args.tee,
                memory_budget=memory_budget(args) or None,
                spill_dir=spill_dir(args),
                warm_first_segment=warm_first_segment(args),
                trust_options=keyservice_trust_options(args),
                record_dir=args.ray_record,
                tls=args.tls,
                memory_mb=args.memory_mb,
            ),
            args.host,
            args.port,
            ray_address=args.ray_address,
            num_cpus=args.ray_cpus,
            temp_dir=args.ray_temp_dir,
        )
        return {"stopped": "platform"}
    from sealedml.platform.pool import PoolConfig

    config = PoolConfig(
        memory_mb=args.memory_mb,
        concurrency=args.concurrency,
        max_instances=args.max_instances,
        keep_alive=args.keep_alive,
        queue_limit=args.queue_limit,
        queue_timeout=args.queue_timeout,
    )
    serve(
        args.keyservice,
        args.store,
        args.host,
        args.port,
        config=config,
        policy=args.policy,
        warm_pool=args.warm_pool,
        from_template=args.instance_start == "fork",
        tee=args.tee,
        unsafe_plaintext_dir=args.unsafe_plaintext_dir,
        tls=args.tls,
        # Checked here, passed on as typed: the workers parse it again.
        memory_budget=args.memory_budget if memory_budget(args) else None,
        spill_dir=spill_dir(args),
        warm_first_segment=warm_first_segment(args),
        worker_args=keyservice_trust_args(args),
        executor=args.executor,
        max_request=max_request(args.max_request),
    )
    return {"stopped": "platform"}


def handle_worker_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``worker serve``: run one runtime instance until stopped.

    Raises:
        ConfigurationError: bad memory budget, spill directory or trust options.
    """
    from sealedml.runtime.server import serve

    serve(
        args.keyservice,
        args.store,
        args.host,
        args.port,
        concurrency=args.concurrency,
        tee=args.tee,
        model_cache_bytes=args.model_cache_mb * 1024 * 1024,
        unsafe_plaintext_dir=args.unsafe_plaintext_dir,
        tls=args.tls,
        memory_budget=memory_budget(args),
        spill_dir=spill_dir(args),
        warm_first_segment=warm_first_segment(args),
        heap_reserve=args.heap_reserve,
        trust=keyservice_trust(args),
        executor_url=args.executor,
        max_request=max_request(args.max_request),
    )
    return {"stopped": "worker"}


def handle_executor_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``executor serve``: run the untrusted executor of partitioned models' middles.

    Raises:
        ConfigurationError: ``--device cuda`` without a CUDA-enabled ONNX Runtime, or bad ``--threads``.
    """
    from sealedml.platform.executor import serve as serve_executor

    if args.threads < 1:
        raise ConfigurationError("--threads must be ≥ 1")
    serve_executor(args.store, args.host, args.port, device=args.device, threads=args.threads)
    return {"stopped": "executor"}


def handle_up(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``up``: a KeyService and a platform as child processes, until Ctrl-C, SIGTERM or either exits.

    Raises:
        ServiceUnavailable: either service did not start.
    """
    from sealedml._internal.procs import ServiceProcess

    data = args.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    store = data / "store"
    host = ("--host", args.host)
    with (
        ServiceProcess.keyservice(
            data / "keyservice", *host, "--lease-ttl", str(args.lease_ttl), port=args.keyservice_port
        ) as ks,
        ServiceProcess.platform(ks.url, store, *host, port=args.gateway_port) as gw,
    ):
        print(
            f"KeyService: {ks.url}\nGateway:    {gw.url}\nStore:      {store}\n"
            f"Runtime measurement: {runtime_measurement()}\n(Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        stop = {"flag": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
        try:
            while not stop["flag"] and ks.alive() and gw.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return {"keyservice": ks.url, "gateway": gw.url, "store": str(store), "stopped": True}


def add_parser(subparsers: Subcommands) -> None:
    """Register ``up``, ``keyservice serve``, ``platform serve`` and ``worker serve`` on ``subparsers``."""
    p = add_command(subparsers, "up", handle_up, "run a KeyService and a platform gateway with embedded defaults")
    p.add_argument(
        "--data-dir", required=True, type=Path, help="directory for the KeyService's state and the model store"
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--keyservice-port", type=int, default=8700, help="the KeyService's port (default 8700)")
    p.add_argument("--gateway-port", type=int, default=8701, help="the gateway's port (default 8701)")
    p.add_argument(
        "--lease-ttl",
        type=int,
        default=60,
        help="seconds a released lease lasts before it must be renewed (default 60)",
    )

    ks = add_group(subparsers, "keyservice", "KeyService commands")
    p = add_command(ks, "serve", handle_keyservice_serve, "run the KeyService")
    p.add_argument("--data-dir", required=True, type=Path, help="the sealed master key (and the SQLite store)")
    p.add_argument(
        "--store",
        metavar="URL",
        help="keep the state in PostgreSQL (postgresql://…) instead of DATA_DIR/keyservice.sqlite3",
    )
    p.add_argument(
        "--join",
        metavar="URL",
        help="a new replica: receive the master key from the running KeyService at URL (same --store)",
    )
    p.add_argument(
        "--replica-measurement",
        action="append",
        default=[],
        metavar="HEX",
        help="another build that may join as a replica (an upgrade); this build's own always may",
    )
    p.add_argument(
        "--recovery-holders",
        type=Path,
        metavar="FILE",
        help="make k-of-n recovery shares of the master key for these holders (YAML: threshold, holders)",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="port (0 = any free port; the URL is printed)")
    p.add_argument("--lease-ttl", type=int, default=60, help="seconds released keys stay valid (default 60)")
    p.add_argument(
        "--accept",
        metavar="TEES",
        help="runtime TEE types to accept, comma-separated: simulated,sgx,tdx,sev-snp "
        "(default: simulated on a simulated KeyService)",
    )
    p.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="operator attestation policy (TCB statuses, minimum SVNs, debug, collateral age)",
    )
    p.add_argument("--collateral", type=Path, metavar="FILE", help="Intel collateral JSON for SGX/TDX (offline)")
    p.add_argument("--pccs-url", metavar="URL", help="PCCS for Intel collateral (cached in --cache-dir)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="collateral / VCEK cache directory")
    p.add_argument("--vcek", type=Path, metavar="FILE", help="SEV-SNP VCEK or VLEK certificate")
    p.add_argument(
        "--unsafe-allow-simulated",
        action="store_true",
        help="accept simulated evidence beside hardware TEEs in --accept (refused otherwise: anyone with this "
        "host's simulated platform root could forge it); development only, logged and shown in /v1/attestation",
    )
    add_tee(p)
    add_tls(p, "the KeyService")

    pf = add_group(subparsers, "platform", "platform commands")
    p = add_command(pf, "serve", handle_platform_serve, "run the gateway with the embedded local platform")
    p.add_argument("--keyservice", required=True, metavar="URL", help="the KeyService's URL")
    p.add_argument("--store", required=True, type=Path, help="the model store directory (sealed models only)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8701, help="port to listen on (default 8701; 0: any free port)")
    p.add_argument("--concurrency", type=int, default=2, help="requests per instance at once (default 2)")
    p.add_argument("--max-instances", type=int, default=2, help="most instances at once (default 2)")
    p.add_argument("--keep-alive", type=float, default=60.0, help="idle seconds before stopping an instance")
    p.add_argument(
        "--memory-mb",
        type=int,
        default=1024,
        help="memory limit per instance, MB (default 1024)",
    )
    p.add_argument(
        "--max-request",
        default=_LOCAL_ENGINE_ONLY["max_request"],
        metavar="SIZE",
        help="largest request (sealed envelope) the gateway and its instances accept, e.g. 128MB "
        "(default: $SEALEDML_MAX_REQUEST or 64MiB)",
    )
    p.add_argument(
        "--queue-limit",
        type=int,
        default=_LOCAL_ENGINE_ONLY["queue_limit"],
        help="most requests waiting per function (default 512)",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=_LOCAL_ENGINE_ONLY["queue_timeout"],
        help="longest wait for an instance slot before 429 (default 60 s)",
    )
    p.add_argument(
        "--policy",
        default=_LOCAL_ENGINE_ONLY["policy"],
        choices=["per-model", "sesemi", "sealedml"],
        help="routing: one function per model, or one packed pool (default sealedml)",
    )
    p.add_argument(
        "--warm-pool", type=int, default=_LOCAL_ENGINE_ONLY["warm_pool"], help="spare pre-started instances (default 0)"
    )
    p.add_argument(
        "--instance-start",
        default=_LOCAL_ENGINE_ONLY["instance_start"],
        choices=["fork", "spawn"],
        help="fork each instance from a pre-imported template process (default; skips the imports on a cold "
        "start) or spawn a fresh interpreter",
    )
    p.add_argument(
        "--executor",
        default=_LOCAL_ENGINE_ONLY["executor"],
        metavar="none|local|URL",
        help="where partitioned models' middles run, outside the TEE: none (default; such models are "
        "refused), local (start and supervise one beside the instances), or an executor's URL",
    )
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local processes (default) or a Ray Serve deployment (pip install 'sealedml[ray]')",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--ray-temp-dir", type=Path, default=None, help="session directory of a local Ray")
    p.add_argument(
        "--ray-record",
        type=Path,
        default=None,
        metavar="DIR",
        help="write every body Ray's replicas carry into DIR: an audit of what Ray sees (ciphertext only)",
    )
    p.add_argument("--unsafe-plaintext-dir", type=Path, default=None, help=argparse.SUPPRESS)
    add_tee(p)
    add_tls(p, "each instance")
    add_budget(p)
    add_keyservice_trust(p)

    wk = add_group(subparsers, "worker", "runtime instance commands")
    p = add_command(wk, "serve", handle_worker_serve, "run one runtime instance (OpenWhisk action protocol)")
    p.add_argument("--keyservice", required=True, metavar="URL", help="the KeyService's URL")
    p.add_argument("--store", required=True, type=Path, help="the model store directory (sealed models only)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: any free port)")
    p.add_argument("--concurrency", type=int, default=2, help="requests an instance serves at once (default 2)")
    p.add_argument("--model-cache-mb", type=int, default=1024, help="budget for decrypted models (LRU)")
    p.add_argument(
        "--heap-reserve",
        choices=HEAP_RESERVE_MODES,
        default=None,
        help="48 MB of heap kept faulted in for model loads: after-loads (default) tops it up after each "
        "request that loaded a model, at-start only before the first (default with --memory-budget; "
        "platforms with one model per instance pass it), off not at all",
    )
    p.add_argument(
        "--max-request",
        default=None,
        metavar="SIZE",
        help="largest request (sealed envelope) accepted (default: $SEALEDML_MAX_REQUEST or 64MiB)",
    )
    p.add_argument(
        "--executor",
        default=None,
        metavar="URL[,URL...]",
        help="untrusted executor for the middles of partitioned models (sealedml executor serve); further URLs "
        "are spares that replace an executor whose blinded products fail verification",
    )
    p.add_argument("--unsafe-plaintext-dir", type=Path, default=None, help=argparse.SUPPRESS)
    add_tee(p)
    add_tls(p, "the instance")
    add_budget(p)
    add_keyservice_trust(p)

    ex = add_group(subparsers, "executor", "untrusted executor of partitioned models' middles")
    p = add_command(ex, "serve", handle_executor_serve, "run the middles of partitioned models (outside any TEE)")
    p.add_argument("--store", required=True, type=Path, help="model store holding the middles (v<N>.middle.onnx)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8702, help="port to listen on (default 8702; 0: any free port)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the middles run (auto: CUDA when ONNX Runtime offers it, else CPU)",
    )
    p.add_argument("--threads", type=int, default=2, help="middles run at once (default 2)")
