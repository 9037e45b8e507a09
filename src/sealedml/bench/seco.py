"""``sealedml bench seco``: SECO mode's cost per query, side by side with plaintext and the TEE path.

By default the parties run as four processes on loopback, as deployed: ``seco deploy`` writes
the per-party directories, the gateway A and the remote servers B and C run as
``sealedml seco serve`` processes (each with its own OpenFHE engine, a Python 3.10 side
process), and the user U is this process, speaking HTTP to A. ``--in-process`` runs the same
party classes in this process instead. Reported per query: the offline (input-independent)
time, the online time from U's masked input to the three output shares, U's own CPU time, and
the bytes on each link (U–A, A–B, A–C, B–C; U's sealed shares for B and C are relayed by A and
counted on U–A; B–C messages, relayed by A too, count on B–C). Session set-up (the links'
handshakes, 3-party key generation, base OTs) is reported apart, and a warm-up query is left
out of the medians (``--queries`` counts the rest). Every query's output is compared with the
exact fixed-point model; accuracy is reported beside the plaintext model's on the same inputs
and on the whole test split. For comparison, the same model on the same inputs through
SealedML's TEE path — a real KeyService and gateway, a (simulated-TEE) runtime instance, sealed
model, encrypted requests — gives ``tee_path_ms`` (warm, median), and ``tee_compute_ms`` is the
whole model in one ONNX Runtime session.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sealedml.bench._harness import bench_stack, isolated_home, progress

if TYPE_CHECKING:
    from sealedml.seco.model import SecoModel
    from sealedml.seco.user import QueryResult, SecoUser

__all__ = ["SECO_MODELS", "TARGETS", "run_seco"]

SECO_MODELS = ("digits-mlp", "small-cnn")
#: (offline seconds, online milliseconds) per query: DESIGN's targets on 2 cores, four parties on one machine.
TARGETS = {"digits-mlp": (0.5, 50.0), "small-cnn": (5.0, 500.0)}


def _tee_path(model: Any, model_input: str, inputs: np.ndarray, quiet: bool) -> tuple[float, list[int]]:
    """Warm median latency (ms) and predictions of the model served through the TEE path."""
    from sealedml.bench._setup import publish_for_user
    from sealedml.client.gateway import InferenceClient

    platform_args = ["--max-instances", "1", "--keep-alive", "3600"]
    with bench_stack(platform_args) as stack:
        user = publish_for_user(stack, model, ["seco-compare"])
        with InferenceClient(stack.gateway.url, user) as client:
            client.infer("seco-compare", {model_input: inputs[:1]})  # cold start, key release
            progress("[bench] TEE path warm", quiet)
            samples, predicted = [], []
            for x in inputs:
                t = time.perf_counter()
                out = client.infer("seco-compare", {model_input: x[None]})
                samples.append(time.perf_counter() - t)
                predicted.append(int(next(iter(out.values())).argmax()))
    return statistics.median(samples) * 1000, predicted


def _timed_queries(user: SecoUser, x_test: np.ndarray, queries: int, quiet: bool) -> tuple[float, list[QueryResult]]:
    """Session set-up time, then a warm-up query (left out) and ``queries`` measured ones."""
    t0 = time.perf_counter()
    user.connect()  # links, and at first use the servers' key generation, links and base OTs
    setup_s = time.perf_counter() - t0
    progress(f"[bench] session set up in {setup_s:.2f} s", quiet)
    user.query(x_test[-1])  # warm-up: first use of every connection and code path
    results = []
    for i, x in enumerate(x_test[:queries]):
        results.append(user.query(x))
        progress(
            f"[bench] query {i + 1}/{queries}: offline {results[-1].offline_s:.2f} s, "
            f"online {results[-1].online_ms:.1f} ms",
            quiet,
        )
    return setup_s, results


def _four_processes(
    model: SecoModel, workdir: Path, x_test: np.ndarray, queries: int, quiet: bool
) -> tuple[float, list[QueryResult]]:
    """``seco deploy`` into ``workdir``, B, C and A as ``sealedml seco serve`` processes, U here."""
    from sealedml.seco.deploy import deploy, load_party
    from sealedml.seco.http import HttpGateway
    from sealedml.seco.serve import seco_servers
    from sealedml.seco.user import SecoUser

    directories = deploy(model, workdir / "seco")
    with seco_servers(workdir / "seco", log_dir=workdir) as servers:
        progress("[bench] SECO servers A, B, C up", quiet)
        party = load_party(directories["U"], expect="U")
        gateway = HttpGateway(servers["A"].url)
        try:
            return _timed_queries(SecoUser(party.architecture, party.key, party.peers, gateway), x_test, queries, quiet)
        finally:
            gateway.close()


def _in_process(
    model: SecoModel, workdir: Path, x_test: np.ndarray, queries: int, quiet: bool
) -> tuple[float, list[QueryResult]]:
    """U, A, B and C in this process, each with its own HE engine process."""
    from sealedml.seco.he import HeSidecar
    from sealedml.seco.protocol import SecoParties

    engines = [HeSidecar.start() for _ in range(3)]
    parties = SecoParties(model, engines)
    try:
        return _timed_queries(parties.user, x_test, queries, quiet)
    finally:
        parties.close()
        for engine in engines:
            engine.close()


def run_seco(
    model_name: str, *, queries: int = 10, tee_path: bool = True, in_process: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Run ``queries`` SECO queries on the test split of ``model_name``; return medians and checks.

    ``in_process``: the four parties in this process instead of four processes over HTTP.
    """
    import onnxruntime as ort

    from sealedml.errors import ConfigurationError
    from sealedml.seco.model import compile_model
    from sealedml.zoo.digits_mlp import digits_mlp, digits_small_cnn

    if model_name not in SECO_MODELS:
        raise ConfigurationError(f"--model must be one of {', '.join(SECO_MODELS)}")
    if queries < 1:
        raise ConfigurationError("--queries must be ≥ 1")
    trained = digits_mlp() if model_name == "digits-mlp" else digits_small_cnn()
    x_test = trained.x_test.astype(np.float32)
    model = compile_model(trained.model)
    peak = model.check_range(x_test[:50])
    session = ort.InferenceSession(trained.model.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = session.run(None, {model.input_name: x_test})[0].argmax(1)
    fixed = np.array([model.decode_output(model.reference(x)[0]).argmax() for x in x_test])
    tee = []
    for x in x_test[:queries]:
        t = time.perf_counter()
        session.run(None, {model.input_name: x[None]})
        tee.append(time.perf_counter() - t)
    with isolated_home() as workdir:
        runner = _in_process if in_process else _four_processes
        setup_s, results = runner(model, workdir, x_test, queries, quiet)
    tee_ms, tee_predicted = (
        _tee_path(trained.model, model.input_name, x_test[:queries], quiet) if tee_path else (None, None)
    )
    exact = sum(np.array_equal(r.output_field, model.reference(x)[0]) for r, x in zip(results, x_test, strict=False))
    predicted = np.array([r.logits.argmax() for r in results])
    y = trained.y_test[:queries]
    offline_s = statistics.median(r.offline_s for r in results)
    online_ms = statistics.median(r.online_ms for r in results)
    target_offline, target_online = TARGETS[model_name]
    return {
        "model": model_name,
        "queries": queries,
        "layers": [list(layer.weight.shape) for layer in model.layers],
        "relus_per_query": sum(layer.weight.shape[0] for layer in model.layers[:-1]),
        "setup_s": round(setup_s, 3),
        "offline_s": round(offline_s, 3),
        "online_ms": round(online_ms, 2),
        "user_cpu_ms": round(statistics.median(r.user_cpu_ms for r in results), 3),
        "bytes_per_link": {k: int(statistics.median(r.link_bytes[k] for r in results)) for k in results[0].link_bytes},
        "exact_fixed_point": f"{exact}/{queries}",
        "accuracy": round(float((predicted == y).mean()), 4),
        "plaintext_accuracy": round(float((plain[:queries] == y).mean()), 4),
        "test_split": {
            "samples": len(x_test),
            "plaintext_accuracy": round(float((plain == trained.y_test).mean()), 4),
            "fixed_point_accuracy": round(float((fixed == trained.y_test).mean()), 4),
        },
        "fixed_point_peak": int(peak),
        "tee_compute_ms": round(statistics.median(tee) * 1000, 3),
        "tee_path_ms": None if tee_ms is None else round(tee_ms, 3),
        "tee_path_accuracy": None if tee_predicted is None else round(float((np.array(tee_predicted) == y).mean()), 4),
        "targets": {"offline_s": target_offline, "online_ms": target_online},
        "target_met": offline_s <= target_offline and online_ms <= target_online,
        "deployment": (
            "A, B and C in one process (their own keys, state and HE engine processes)"
            if in_process
            else "four processes on loopback: user (this one), gateway A, remote servers B and C (HTTP)"
        ),
    }
