"""``sealedml demo``: the whole confidential path on one machine, for real.

::

    sealedml demo [--lease-ttl S] [--samples N] [--memory-budget SIZE [--spill-dir DIR] [--no-warm-first-segment]]

KeyService and platform run as separate processes on free loopback ports in
a temporary directory (its own simulated platform root included); the owner
and users act through the same SDK the CLI uses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from sealedml._internal.procs import ServiceProcess
from sealedml.cli._args import (
    Subcommands,
    add_budget,
    add_command,
    memory_budget,
    spill_dir,
    warm_first_segment,
)
from sealedml.errors import AccessDenied, SealedModelError

__all__ = ["add_parser", "handle_demo", "run_demo"]


@contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def run_demo(
    *,
    lease_ttl: int = 2,
    samples: int | None = None,
    quiet: bool = False,
    workdir: Path | None = None,
    memory_budget: str | None = None,
    spill_dir: str | None = None,
    warm_first_segment: bool = True,
) -> dict[str, Any]:
    """Run the demo; return the results (see the ``--json`` keys in the README)."""

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    from sealedml import zoo
    from sealedml.attestation.measurement import measurement_for
    from sealedml.client.gateway import InferenceClient
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient
    from sealedml.client.owner import publish_model
    from sealedml.storage.modelstore import LocalModelStore

    with ExitStack() as stack:
        tmp = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sealedml-demo-")))
        home = tmp / "home"
        stack.enter_context(_env("SEALEDML_HOME", str(home)))
        say(f"[demo] working in {tmp} (simulated TEE: no hardware protection)")
        ks = stack.enter_context(
            ServiceProcess.keyservice(
                tmp / "keyservice", "--lease-ttl", str(lease_ttl), log_path=tmp / "keyservice.log"
            )
        )
        store_dir = tmp / "store"
        budget = ["--memory-budget", memory_budget] if memory_budget else []
        if memory_budget and spill_dir:
            budget += ["--spill-dir", spill_dir]
        if memory_budget and not warm_first_segment:
            budget += ["--no-warm-first-segment"]
        gw = stack.enter_context(
            ServiceProcess.platform(ks.url, store_dir, "--keep-alive", "60", *budget, log_path=tmp / "platform.log")
        )
        say(f"[demo] KeyService {ks.url}, gateway {gw.url}")

        owner, user, stranger = Identity.generate(), Identity.generate(), Identity.generate()
        clients = {
            name: stack.enter_context(KeyServiceClient(ks.url, ident))
            for name, ident in (("owner", owner), ("user", user), ("stranger", stranger))
        }
        for client in clients.values():
            client.register()
        say(
            f"[demo] registered owner {owner.principal_id[:8]}…, user {user.principal_id[:8]}…, "
            f"stranger {stranger.principal_id[:8]}… "
            f"(KeyService attested: {clients['owner'].attest().measurement[:16]}…)"
        )

        dm = zoo.digits()
        store = LocalModelStore(store_dir)
        runtime = measurement_for("runtime", {"tee": "simulated"})
        published = publish_model(dm.model, model_id="digits", keyservice=clients["owner"], store=store)
        clients["owner"].allow_runtime("digits", runtime)
        clients["owner"].grant("digits", user.principal_id)
        clients["user"].enable("digits", [runtime])
        say(
            f"[demo] sealed digits v{published.version} ({published.sealed_bytes} bytes); allowed runtime "
            f"{runtime[:16]}…; granted and enabled"
        )

        x, y = dm.x_test, dm.y_test
        if samples is not None:
            x, y = x[:samples], y[:samples]
        plaintext_accuracy = float(
            zoo.digits_plaintext_accuracy(dm) if samples is None else np.mean(_plain_labels(dm.model, x) == y)
        )
        latencies, predictions = [], []
        cold_ms = 0.0
        peak_bytes = 0
        with InferenceClient(gw.url, user) as infer:
            for i in range(len(x)):
                t0 = time.perf_counter()
                out = infer.infer("digits", {"input": x[i : i + 1]})
                ms = (time.perf_counter() - t0) * 1000
                if i == 0:
                    cold_ms = ms
                    say(
                        f"[demo] first request (cold start: instance spawn, attestation, key release, "
                        f"decrypt, session): {ms:.1f} ms"
                    )
                else:
                    latencies.append(ms)
                predictions.append(int(out["label"][0]))
                peak_bytes = max(peak_bytes, infer.last_peak_bytes or 0)
                if not quiet and (i + 1) % 100 == 0:
                    say(f"[demo] {i + 1}/{len(x)} encrypted requests")
        accuracy = float(np.mean(np.array(predictions) == y))
        warm_p50 = statistics.median(latencies) if latencies else cold_ms
        say(
            f"[demo] accuracy {accuracy:.4f} (plaintext ONNX Runtime {plaintext_accuracy:.4f}) on {len(x)} samples; "
            f"warm p50 {warm_p50:.2f} ms"
        )

        # A registered user without a grant is refused.
        clients["stranger"].enable("digits", [runtime])
        denied_unauthorized = _denied(gw.url, stranger, x[:1])
        say(f"[demo] user without grant denied: {denied_unauthorized}")

        # Revocation ends access within the lease TTL.
        clients["owner"].grant("digits", user.principal_id, grant=False)
        time.sleep(lease_ttl + 1.0)
        denied_after_revoke = _denied(gw.url, user, x[:1])
        say(f"[demo] access after revoke (waited TTL {lease_ttl}s) denied: {denied_after_revoke}")

        # A tampered sealed model is rejected by the runtime.
        publish_model(dm.model, model_id="digits-tampered", keyservice=clients["owner"], store=store)
        clients["owner"].allow_runtime("digits-tampered", runtime)
        clients["owner"].grant("digits-tampered", user.principal_id)
        clients["user"].enable("digits-tampered", [runtime])
        path = store.path("digits-tampered", 1)
        blob = bytearray(path.read_bytes())
        blob[-100] ^= 0x01
        path.write_bytes(bytes(blob))
        tampered_rejected = False
        try:
            with InferenceClient(gw.url, user) as infer:
                infer.infer("digits-tampered", {"input": x[:1]})
        except SealedModelError:
            tampered_rejected = True
        say(f"[demo] tampered sealed model rejected: {tampered_rejected}")

        ok = accuracy == plaintext_accuracy and denied_unauthorized and denied_after_revoke and tampered_rejected
        return {
            "accuracy": accuracy,
            "plaintext_accuracy": plaintext_accuracy,
            "n": len(x),
            "cold_start_ms": round(cold_ms, 2),
            "warm_p50_ms": round(warm_p50, 3),
            "warm_p99_ms": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
            "denied_unauthorized": denied_unauthorized,
            "denied_after_revoke": denied_after_revoke,
            "tampered_model_rejected": tampered_rejected,
            "lease_ttl_s": lease_ttl,
            "memory_budget": memory_budget,
            "spill_dir": spill_dir if memory_budget else None,
            "peak_tracked_bytes": peak_bytes if memory_budget else None,
            "tee": "simulated",
            "ok": ok,
            "_exit": 0 if ok else 1,
        }
    raise AssertionError("unreachable")  # pragma: no cover


def _denied(gateway: str, identity: Any, x: np.ndarray) -> bool:
    from sealedml.client.gateway import InferenceClient

    try:
        with InferenceClient(gateway, identity) as infer:
            infer.infer("digits", {"input": x})
    except AccessDenied:
        return True
    return False


def _plain_labels(model: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["label"], {"input": x})[0])


def handle_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``demo``: :func:`run_demo` with the command's flags (progress on stderr unless ``--json``).

    Raises:
        ConfigurationError: a bad ``--memory-budget`` or ``--spill-dir`` (checked before anything starts).
    """
    return run_demo(
        lease_ttl=args.lease_ttl,
        samples=args.samples,
        quiet=args.json,
        memory_budget=args.memory_budget if memory_budget(args) else None,
        spill_dir=spill_dir(args),
        warm_first_segment=warm_first_segment(args),
    )


def add_parser(subparsers: Subcommands) -> None:
    """Register ``demo`` on ``subparsers``."""
    p = add_command(
        subparsers, "demo", handle_demo, "run everything on one machine and print accuracy, latency, denials"
    )
    p.add_argument("--lease-ttl", type=int, default=2, help="key lease TTL in seconds for the demo (default 2)")
    p.add_argument("--samples", type=int, default=None, help="test samples to run (default: whole test split)")
    add_budget(p)
