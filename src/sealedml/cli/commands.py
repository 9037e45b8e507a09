"""Handlers of the ``sealedml`` commands (each returns a JSON-able dict)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sealedml.cli._common import add_json_flag
from sealedml.errors import ConfigurationError, InputError

__all__ = ["add_all"]

DEFAULT_HOST = "127.0.0.1"
#: TEE types a runtime measurement can belong to.
TEE_TYPES = ("simulated", "sgx", "tdx", "sev-snp")


# ---------------------------------------------------------------------- shared argument groups
def _ks(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--keyservice", required=required, metavar="URL", help="KeyService base URL")
    _ks_trust(p)


def _ks_trust(p: argparse.ArgumentParser) -> None:
    """The flags that say which KeyService to trust (for a runtime: part of its measurement)."""
    p.add_argument(
        "--keyservice-measurement",
        metavar="HEX",
        help="pin the expected KeyService measurement (default: this build's, simulated TEE)",
    )
    real = p.add_argument_group("KeyService in a real TEE")
    real.add_argument(
        "--keyservice-policy",
        type=Path,
        metavar="FILE",
        help="attestation policy document the KeyService must satisfy (docs/attestation.md)",
    )
    real.add_argument("--collateral", type=Path, metavar="FILE", help="Intel collateral JSON (SGX/TDX, offline)")
    real.add_argument("--pccs-url", metavar="URL", help="PCCS to fetch Intel collateral from")
    real.add_argument("--vcek", type=Path, metavar="FILE", help="SEV-SNP VCEK certificate")


def _identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", required=True, type=Path, metavar="FILE", help="identity file")


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    from sealedml._internal.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigurationError(f"bad size {text!r}: use e.g. 32MB or 64MiB") from exc


def _budget(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        default=None,
        help="run models memory-bounded within SIZE per request (e.g. 32MB): weights stay sealed "
        "and are decrypted segment by segment (docs/memory-bounded.md)",
    )
    p.add_argument(
        "--spill-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="with --memory-budget: keep the re-encrypted weights (the spill) in an anonymous file "
        "in DIR instead of process memory; for a TEE whose process memory is the scarce, protected "
        "kind (SGX). Default: process memory",
    )


def _spill_dir(args: argparse.Namespace) -> str | None:
    """``--spill-dir`` checked: an existing, writable directory, and only with ``--memory-budget``."""
    directory: Path | None = args.spill_dir
    if directory is None:
        return None
    if not _size(args.memory_budget):
        raise ConfigurationError("--spill-dir needs --memory-budget (only memory-bounded models spill)")
    if not directory.is_dir():
        raise ConfigurationError(f"--spill-dir {directory}: not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigurationError(f"--spill-dir {directory}: not writable")
    return str(directory.resolve())


def _tls(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--tls",
        default="none",
        choices=["none", "ra"],
        help=f"transport: plain HTTP, or HTTPS with an RA-TLS certificate carrying {what}'s evidence",
    )


def _tee(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tee",
        default="auto",
        choices=["auto", "simulated", "gramine", "tsm"],
        help="TEE this process runs in; auto = Gramine or configfs-tsm if present, "
        "else simulated (no hardware protection)",
    )


def _ks_trust_from(args: argparse.Namespace) -> Any:
    from sealedml.attestation.trust import trust_from_options

    return trust_from_options(
        measurement=args.keyservice_measurement,
        policy_file=args.keyservice_policy,
        collateral=args.collateral,
        pccs_url=args.pccs_url,
        vcek=args.vcek,
    )


def _ks_trust_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The trust flags as they are passed on to runtime instances (paths made absolute)."""
    out: list[str] = []
    if args.keyservice_measurement:
        out += ["--keyservice-measurement", args.keyservice_measurement]
    for flag, path in (
        ("--keyservice-policy", args.keyservice_policy),
        ("--collateral", args.collateral),
        ("--vcek", args.vcek),
    ):
        if path is not None:
            out += [flag, str(Path(path).resolve())]
    if args.pccs_url:
        out += ["--pccs-url", args.pccs_url]
    return tuple(out)


def _ks_client(args: argparse.Namespace, with_identity: bool = True) -> Any:
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient

    identity = Identity.load(args.identity) if with_identity else None
    return KeyServiceClient(args.keyservice, identity, trust=_ks_trust_from(args))


def _measurement_hex(value: str) -> str:
    """``HEX`` or ``TEE:HEX`` (a runtime measurement, optionally with its TEE type)."""
    tee, sep, digits = value.strip().lower().rpartition(":")
    if sep and tee not in TEE_TYPES:
        raise argparse.ArgumentTypeError(f"unknown TEE type {tee!r}: use one of {', '.join(TEE_TYPES)}")
    if len(digits) not in (64, 96) or any(c not in "0123456789abcdef" for c in digits):
        raise argparse.ArgumentTypeError("measurement must be [TEE:]HEX with 64 or 96 hex characters")
    return f"{tee}:{digits}" if sep else digits


# ---------------------------------------------------------------------- identity / register
def cmd_identity_new(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.client.identity import Identity

    identity = Identity.generate()
    identity.save(args.out)
    return {"principal_id": identity.principal_id, "identity": str(args.out)}


def cmd_register(args: argparse.Namespace) -> dict[str, Any]:
    with _ks_client(args) as ks:
        principal = ks.register()
        return {"principal_id": principal, "keyservice": ks.url, "keyservice_measurement": ks.attest().measurement}


# ---------------------------------------------------------------------- model commands
def cmd_model_seal(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.client.owner import load_onnx, publish_model
    from sealedml.storage.modelstore import LocalModelStore

    model = load_onnx(args.input)
    with _ks_client(args) as ks:
        published = publish_model(
            model, model_id=args.model_id, keyservice=ks, store=LocalModelStore(args.store), version=args.version
        )
    return {
        "model_id": published.model_id,
        "version": published.version,
        "sealed_bytes": published.sealed_bytes,
        "sealed_sha256": published.sealed_sha256,
        "store": str(args.store),
    }


def cmd_model_allow_runtime(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.client.keyservice import parse_runtime

    runtime = parse_runtime(args.measurement, args.tee)
    with _ks_client(args) as ks:
        ks.allow_runtime(args.model_id, runtime.measurement, tee=runtime.tee, allow=not args.remove)
        tee = runtime.tee or _only_accepted_tee(ks)
    return {"model_id": args.model_id, "tee": tee, "measurement": runtime.measurement, "allowed": not args.remove}


def _only_accepted_tee(ks: Any) -> str | None:
    """The TEE type the KeyService applied to a runtime named without one (its only accepted type)."""
    accepts = ks.attest().accepts
    return str(accepts[0]) if len(accepts) == 1 else None


def cmd_model_grant(args: argparse.Namespace) -> dict[str, Any]:
    grant = args.action == "grant"
    with _ks_client(args) as ks:
        ks.grant(args.model_id, args.user, grant=grant)
    return {"model_id": args.model_id, "user_id": args.user, "granted": grant}


def cmd_model_enable(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.client.keyservice import parse_runtime

    measurements = args.measurement or [f"simulated:{_runtime_measurement()}"]
    runtimes = [parse_runtime(m, args.tee) for m in measurements]
    with _ks_client(args) as ks:
        ks.enable(args.model_id, measurements, tee=args.tee)
        user = ks.identity.principal_id
        default_tee = _only_accepted_tee(ks)
    return {
        "model_id": args.model_id,
        "user_id": user,
        "consented_runtimes": [f"{r.tee or default_tee}:{r.measurement}" for r in runtimes],
    }


def cmd_keyservice_audit_head(args: argparse.Namespace) -> dict[str, Any]:
    with _ks_client(args) as ks:
        head = ks.audit_head(args.at)
        result: dict[str, Any] = {
            "service_id": head.service_id,
            "records": head.records,
            "head": head.head,
            "issued_at": head.issued_at,
            "signature": "verified (attested KeyService key)",
        }
        if args.at is not None:
            result.update({"at": head.at, "at_hash": head.at_hash})
        return result


def cmd_model_info(args: argparse.Namespace) -> dict[str, Any]:
    with _ks_client(args) as ks:
        info: dict[str, Any] = ks.model_info(args.model_id).model_dump()
        return info


# ---------------------------------------------------------------------- infer
def _load_inputs(specs: list[str]) -> tuple[dict[str, np.ndarray] | list[np.ndarray], bool]:
    if not specs:
        raise InputError("give --input X.npy, --input NAME=FILE.npy (repeatable), or --input FILE.npz")
    if len(specs) == 1 and "=" not in specs[0]:
        path = Path(specs[0])
        data = _np_load(path)
        if isinstance(data, np.ndarray):
            return [data], True
        names = list(data)
        if all(n.startswith("arr_") for n in names):
            return [data[f"arr_{i}"] for i in range(len(names))], True
        return {n: data[n] for n in names}, False
    named: dict[str, np.ndarray] = {}
    for spec in specs:
        if "=" not in spec:
            raise InputError(f"--input {spec!r}: with several inputs use NAME=FILE.npy")
        name, _, file = spec.partition("=")
        array = _np_load(Path(file))
        if not isinstance(array, np.ndarray):
            raise InputError(f"--input {spec!r}: expected a .npy file")
        if name in named:
            raise InputError(f"input {name!r} given twice")
        named[name] = array
    return named, False


def _np_load(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a .npy/.npz file") from exc
    if isinstance(data, np.lib.npyio.NpzFile):
        return {k: data[k] for k in data.files}
    return data


def _save_outputs(outputs: dict[str, np.ndarray], out: Path) -> Path:
    if len(outputs) == 1 and out.suffix == ".npy":
        np.save(out, next(iter(outputs.values())))
        return out
    if out.suffix == ".npy":
        # Keep the result rather than fail after the work is done.
        target = out.with_suffix(".npz")
        np.savez(target, **outputs)  # type: ignore[arg-type]
        print(f"note: the model has {len(outputs)} outputs; wrote {target} (.npz) instead of {out}", file=sys.stderr)
        return target
    target = out if out.suffix == ".npz" else out.with_suffix(".npz")
    np.savez(target, **outputs)  # type: ignore[arg-type]
    return target


def _describe(array: np.ndarray) -> dict[str, Any]:
    info: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if array.size <= 64:
        info["values"] = array.tolist()
    return info


def cmd_infer(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.client.gateway import InferenceClient
    from sealedml.client.identity import Identity

    inputs, _ = _load_inputs(args.input)
    identity = Identity.load(args.identity)
    if not args.skip_check:
        with _ks_client(args) as ks:
            info = ks.model_info(args.model_id)
        if not info.consented:
            raise ConfigurationError(f"run `sealedml model enable {args.model_id}` first (no request key/consent)")
    t0 = time.perf_counter()
    with InferenceClient(args.gateway, identity) as client:
        outputs = client.infer(args.model_id, inputs)
        cold = client.last_cold_start
    result: dict[str, Any] = {
        "model_id": args.model_id,
        "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
        "cold_start": cold,
        "outputs": {name: _describe(value) for name, value in outputs.items()},
    }
    if args.out is not None:
        result["out"] = str(_save_outputs(outputs, args.out))
    return result


# ---------------------------------------------------------------------- measurement
def cmd_measurement(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.attestation.measurement import measurement_for
    from sealedml.attestation.simulated import SIMULATED_WARNING
    from sealedml.attestation.trust import measured_trust, runtime_trust_config

    config: dict[str, Any] = {"tee": "simulated"}
    if args.role == "runtime":  # a runtime's measurement includes the KeyService it trusts
        if args.keyservice_measurement and args.keyservice_policy:
            raise ConfigurationError("give --keyservice-measurement or --keyservice-policy, not both")
        measured = measured_trust(measurement=args.keyservice_measurement, policy_file=args.keyservice_policy)
        config.update(runtime_trust_config(measured))
    elif args.keyservice_measurement or args.keyservice_policy:
        raise ConfigurationError("--keyservice-measurement/--keyservice-policy apply to --role runtime")
    value = measurement_for(args.role, config)
    if not args.json:  # bare hex, for $(sealedml measurement); the warning goes to stderr
        print(f"warning: {SIMULATED_WARNING}", file=sys.stderr)
        print(value)
        return {}
    return {"measurement": value, "role": args.role, "tee": "simulated", "warning": SIMULATED_WARNING}


# ---------------------------------------------------------------------- servers
def cmd_keyservice_serve(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.attestation.tee import VerifierOptions
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
    )
    return {"stopped": "keyservice"}


def cmd_platform_serve(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.platform.server import serve

    if args.engine == "ray":
        from sealedml.platform.ray_engine import RayEngineConfig, serve_ray

        serve_ray(
            RayEngineConfig(
                keyservice=args.keyservice,
                store=args.store,
                concurrency=args.concurrency,
                max_replicas=args.max_instances,
                keep_alive=args.keep_alive,
                tee=args.tee,
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
        tee=args.tee,
        unsafe_plaintext_dir=args.unsafe_plaintext_dir,
        tls=args.tls,
        memory_budget=args.memory_budget if _size(args.memory_budget) else None,
        spill_dir=_spill_dir(args),
        worker_args=_ks_trust_args(args),
    )
    return {"stopped": "platform"}


def cmd_worker_serve(args: argparse.Namespace) -> dict[str, Any]:
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
        memory_budget=_size(args.memory_budget),
        spill_dir=_spill_dir(args),
        trust=_ks_trust_from(args),
    )
    return {"stopped": "worker"}


def cmd_up(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml._internal.procs import ServiceProcess

    data = args.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    store = data / "store"
    with (
        ServiceProcess.start(
            [
                "keyservice",
                "serve",
                "--data-dir",
                str(data / "keyservice"),
                "--host",
                args.host,
                "--port",
                str(args.keyservice_port),
                "--lease-ttl",
                str(args.lease_ttl),
            ],
            name="keyservice",
        ) as ks,
        ServiceProcess.start(
            [
                "platform",
                "serve",
                "--keyservice",
                ks.url,
                "--store",
                str(store),
                "--host",
                args.host,
                "--port",
                str(args.gateway_port),
            ],
            name="platform",
        ) as gw,
    ):
        print(
            f"KeyService: {ks.url}\nGateway:    {gw.url}\nStore:      {store}\n"
            f"Runtime measurement: {_runtime_measurement()}\n(Ctrl-C to stop)",
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


def _runtime_measurement() -> str:
    from sealedml.attestation.measurement import measurement_for

    return measurement_for("runtime", {"tee": "simulated"})


# ---------------------------------------------------------------------- zoo, demo, bench
def cmd_zoo_export(args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from sealedml import zoo

    model = zoo.get(args.name, seed=args.seed)
    onnx.save(model, str(args.out))
    result: dict[str, Any] = {"model": args.name, "out": str(args.out), "bytes": args.out.stat().st_size}
    if args.test_data is not None:
        if args.name != "digits":
            raise ConfigurationError("--test-data exists for the digits model only")
        dm = zoo.digits()
        np.save(args.test_data, dm.x_test[: args.samples])
        result["test_data"] = str(args.test_data)
    return result


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.cli.demo import run_demo

    return run_demo(
        lease_ttl=args.lease_ttl,
        samples=args.samples,
        quiet=args.json,
        memory_budget=args.memory_budget if _size(args.memory_budget) else None,
        spill_dir=_spill_dir(args),
    )


def cmd_bench_trace(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.bench.trace import run_trace

    policies = tuple(p.strip() for p in args.policy.split(",") if p.strip())
    return run_trace(
        models=args.models,
        policies=policies,
        trace_file=args.trace,
        duration=args.duration,
        seed=args.seed,
        keep_alive=args.keep_alive,
        slo_ms=args.slo_ms,
        model_name=args.model,
        plot=args.plot,
        warm_pool=args.warm_pool,
        quiet=args.json,
    )


def cmd_bench_coldstart(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.bench.coldstart import run_coldstart

    return run_coldstart(args.model, repeats=args.repeats, quiet=args.json)


def cmd_bench_concurrency(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.bench.concurrency import run_concurrency

    return run_concurrency(args.model, clients=args.clients, window=args.window, rounds=args.rounds, quiet=args.json)


def cmd_bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml._internal.units import parse_sizes
    from sealedml.bench.memory import format_table, run_memory

    try:
        budgets = parse_sizes(args.budget)
    except ValueError as exc:
        raise ConfigurationError(f"bad --budget {args.budget!r}: use e.g. 16MB,32MB,64MB") from exc
    result = run_memory(args.model, budgets, repeats=args.repeats, threads=args.threads, quiet=args.json)
    if not args.json:
        print(format_table(result))
    return result


def cmd_bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    from sealedml.bench.overhead import run_overhead

    return run_overhead(args.model, requests=args.requests, warmup=args.warmup, quiet=args.json)


# ---------------------------------------------------------------------- parser
def add_all(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register every command."""

    def command(parent: Any, name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
        add_json_flag(p)
        p.set_defaults(func=func)
        return p

    p = command(sub, "demo", cmd_demo, "run everything on one machine and print accuracy, latency, denials")
    p.add_argument("--lease-ttl", type=int, default=2, help="key lease TTL in seconds for the demo (default 2)")
    p.add_argument("--samples", type=int, default=None, help="test samples to run (default: whole test split)")
    _budget(p)

    p = command(sub, "up", cmd_up, "run a KeyService and a platform gateway with embedded defaults")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--keyservice-port", type=int, default=8700)
    p.add_argument("--gateway-port", type=int, default=8701)
    p.add_argument("--lease-ttl", type=int, default=60)

    ks = sub.add_parser("keyservice", help="KeyService commands").add_subparsers(dest="sub", required=True)
    p = command(ks, "serve", cmd_keyservice_serve, "run the KeyService")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--host", default=DEFAULT_HOST)
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
    _tee(p)
    _tls(p, "the KeyService")

    p = command(
        ks, "audit-head", cmd_keyservice_audit_head, "the KeyService's signed audit-log head (keep it to check later)"
    )
    p.add_argument(
        "--at",
        type=int,
        metavar="N",
        default=None,
        help="also the hash of record N: compare it with a head you kept to detect truncation or rollback",
    )
    _identity(p)
    _ks(p)

    pf = sub.add_parser("platform", help="platform commands").add_subparsers(dest="sub", required=True)
    p = command(pf, "serve", cmd_platform_serve, "run the gateway with the embedded local platform")
    p.add_argument("--keyservice", required=True, metavar="URL")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=8701)
    p.add_argument("--concurrency", type=int, default=2, help="requests per instance at once (default 2)")
    p.add_argument("--max-instances", type=int, default=2, help="most instances at once (default 2)")
    p.add_argument("--keep-alive", type=float, default=60.0, help="idle seconds before stopping an instance")
    p.add_argument("--memory-mb", type=int, default=1024, help="memory limit per instance, MB (default 1024)")
    p.add_argument("--queue-limit", type=int, default=512, help="most requests waiting per function (default 512)")
    p.add_argument(
        "--queue-timeout", type=float, default=60.0, help="longest wait for an instance slot before 429 (default 60 s)"
    )
    p.add_argument(
        "--policy",
        default="sealedml",
        choices=["per-model", "sesemi", "sealedml"],
        help="routing: one function per model, or one packed pool (default sealedml)",
    )
    p.add_argument("--warm-pool", type=int, default=0, help="spare pre-started instances (default 0)")
    p.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="local processes (default) or a Ray Serve deployment (pip install 'sealedml[ray]')",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--ray-temp-dir", type=Path, default=None, help="session directory of a local Ray")
    p.add_argument("--unsafe-plaintext-dir", type=Path, default=None, help=argparse.SUPPRESS)
    _tee(p)
    _tls(p, "each instance")
    _budget(p)
    _ks_trust(p)

    wk = sub.add_parser("worker", help="runtime instance commands").add_subparsers(dest="sub", required=True)
    p = command(wk, "serve", cmd_worker_serve, "run one runtime instance (OpenWhisk action protocol)")
    p.add_argument("--keyservice", required=True, metavar="URL")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--model-cache-mb", type=int, default=1024, help="budget for decrypted models (LRU)")
    p.add_argument("--unsafe-plaintext-dir", type=Path, default=None, help=argparse.SUPPRESS)
    _tee(p)
    _tls(p, "the instance")
    _budget(p)
    _ks_trust(p)

    ident = sub.add_parser("identity", help="identity commands").add_subparsers(dest="sub", required=True)
    p = command(ident, "new", cmd_identity_new, "create a new identity file (Ed25519 key + request-key seed)")
    p.add_argument("--out", required=True, type=Path)

    p = command(sub, "register", cmd_register, "register an identity with the KeyService")
    _ks(p)
    _identity(p)

    model = sub.add_parser("model", help="model owner and user commands").add_subparsers(dest="sub", required=True)
    p = command(model, "seal", cmd_model_seal, "seal an ONNX model, store it, upload its key")
    p.add_argument("input", type=Path, metavar="IN.onnx")
    p.add_argument("--model-id", required=True)
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--version", type=int, default=None, help="version number (default: next)")
    _identity(p)
    _ks(p)
    p = command(model, "allow-runtime", cmd_model_allow_runtime, "allow a runtime measurement for a model")
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--measurement", required=True, type=_measurement_hex, metavar="[TEE:]HEX")
    p.add_argument(
        "--tee",
        choices=TEE_TYPES,
        default=None,
        help="the TEE type the measurement is for (default: the KeyService's only accepted type; "
        "required where it accepts several)",
    )
    p.add_argument("--remove", action="store_true", help="disallow instead")
    _identity(p)
    _ks(p)
    for action in ("grant", "revoke"):
        p = command(model, action, cmd_model_grant, f"{action} a user's access to a model")
        p.add_argument("model_id", metavar="ID")
        p.add_argument("--user", required=True, metavar="USER_ID")
        p.set_defaults(action=action)
        _identity(p)
        _ks(p)
    p = command(model, "enable", cmd_model_enable, "user: upload your request key and consent to runtimes")
    p.add_argument("model_id", metavar="ID")
    p.add_argument(
        "--measurement",
        action="append",
        type=_measurement_hex,
        metavar="[TEE:]HEX",
        help="runtime you consent to (repeatable; default: this build's simulated runtime)",
    )
    p.add_argument(
        "--tee",
        choices=TEE_TYPES,
        default=None,
        help="TEE type of the --measurement values that name none (default: the KeyService's only accepted type)",
    )
    _identity(p)
    _ks(p)
    p = command(model, "info", cmd_model_info, "what you may know about a model")
    p.add_argument("model_id", metavar="ID")
    _identity(p)
    _ks(p)

    p = command(sub, "infer", cmd_infer, "encrypted inference through the gateway")
    p.add_argument("model_id", metavar="ID")
    p.add_argument("--input", action="append", default=[], metavar="X.npy|NAME=FILE.npy|FILE.npz")
    p.add_argument("--out", type=Path, default=None, metavar="Y.npy|Y.npz")
    p.add_argument("--gateway", required=True, metavar="URL")
    p.add_argument("--skip-check", action="store_true", help="do not ask the KeyService whether you enabled the model")
    _identity(p)
    _ks(p)

    p = command(sub, "measurement", cmd_measurement, "print this build's runtime measurement")
    p.add_argument("--role", default="runtime", choices=["runtime", "keyservice"])
    _ks_trust(p)

    zoo = sub.add_parser("zoo", help="built-in models").add_subparsers(dest="sub", required=True)
    p = command(zoo, "export", cmd_zoo_export, "write a built-in model as ONNX")
    p.add_argument("name", choices=["digits", "mobilenetv2", "resnet50", "vgg16", "toy"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-data", type=Path, default=None, help="digits only: also write test inputs (.npy)")
    p.add_argument("--samples", type=int, default=10)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="sub", required=True)
    p = command(bench, "overhead", cmd_bench_overhead, "secure vs plain serving vs in-process ONNX Runtime")
    p.add_argument("--model", default="mobilenetv2", choices=["mobilenetv2", "resnet50", "digits", "toy"])
    p.add_argument("--requests", type=int, default=60, help="measured requests per path (default 60)")
    p.add_argument("--warmup", type=int, default=5)

    p = command(bench, "coldstart", cmd_bench_coldstart, "first request with no instance, with/without warm pool")
    p.add_argument("--model", default="mobilenetv2", choices=["mobilenetv2", "resnet50"])
    p.add_argument("--repeats", type=int, default=5)

    p = command(bench, "concurrency", cmd_bench_concurrency, "1 instance x concurrency 2 vs 2 instances x 1")
    p.add_argument("--model", default="mobilenetv2", choices=["mobilenetv2", "resnet50"])
    p.add_argument("--clients", type=int, default=4, help="requests kept outstanding (default 4)")
    p.add_argument("--window", type=float, default=5.0, help="seconds per measurement window (default 5)")
    p.add_argument("--rounds", type=int, default=3)

    p = command(bench, "memory", cmd_bench_memory, "whole-model vs memory-bounded execution at several budgets")
    p.add_argument("--model", default="resnet50", choices=["resnet50", "mobilenetv2", "vgg16"])
    p.add_argument("--budget", default="16MB,32MB,64MB", help="comma-separated budgets (default 16MB,32MB,64MB)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every configuration (default: all cores; an instance serving "
        "N requests at once gives each cores/N)",
    )

    p = command(bench, "trace", cmd_bench_trace, "replay a bursty or CSV trace against each routing policy")
    p.add_argument("--models", type=int, default=10, help="models in a synthetic trace (default 10)")
    p.add_argument("--policy", default="per-model,sesemi,sealedml", help="comma-separated policies to compare")
    p.add_argument("--trace", type=Path, default=None, help="CSV of timestamp,model rows instead of synthetic")
    p.add_argument("--duration", type=float, default=60.0, help="synthetic trace length, seconds (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-alive", type=float, default=10.0, help="instance keep-alive, seconds (default 10)")
    p.add_argument("--slo-ms", type=float, default=1000.0, help="latency SLO, ms (default 1000)")
    p.add_argument("--model", default="mobilenetv2", choices=["mobilenetv2", "digits", "resnet50"])
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    p.add_argument("--warm-pool", type=int, default=1, help="spare pre-started instances per platform (default 1)")
