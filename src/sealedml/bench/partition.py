"""``sealedml bench partition``: all-in-TEE against ternary execution, side by side.

Both configurations run in the runtime process with ONNX Runtime, interleaved
request by request: (a) the whole model in one session (everything in the
TEE); (b) the partitioned model as a runtime serves it — front and back in
this process, the middle in a real ``sealedml executor serve`` process over
loopback HTTP (``--device auto``: on the GPU when ONNX Runtime offers CUDA).
The envelope, gateway and KeyService costs are the same for both, so they are
left out. Reported: median and p99 latency, their ratio, the bytes that cross
the TEE boundary per request, the share of the model's operations and of the
measured time that stays in the TEE.

Zoo models have random weights: these figures are about speed, not leakage.
For the two trained victims (``digits-cnn``, ``faces-cnn``), :func:`run_leakage` trains the
model with a fixed seed and runs the Model Assessment Framework on its own test and auxiliary
splits — the table of ``sealedml partition assess`` with its plot.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sealedml.bench._harness import isolated_home, median_ms, progress, ratio

__all__ = ["DEFAULT_CUTS", "TARGET_RESNET50", "TRAINED_MODELS", "run_leakage", "run_partition"]

#: Cuts used unless given: the front after the first stages (whose outputs still resemble
#: the image), the back at the global pool (so logits and labels stay in the TEE).
DEFAULT_CUTS: dict[str, tuple[list[str], list[str]]] = {
    "mobilenetv2": (["features.3.add"], ["avgpool"]),
    "resnet50": (["layer2.3.relu3"], ["avgpool"]),
}
#: Trained victims whose leakage ``bench partition`` assesses (torch: ``sealedml[assess]``).
TRAINED_MODELS = ("digits-cnn", "faces-cnn")
#: ternary / all-in-TEE latency target on CPU with a local executor (DESIGN).
TARGET_RESNET50 = 1.15


def _p99_ms(samples: list[float]) -> float:
    return round(float(np.percentile(samples, 99)) * 1000, 3)


def run_partition(
    model_name: str,
    *,
    front_cut: list[str] | None = None,
    back_cut: list[str] | None = None,
    requests: int = 40,
    warmup: int = 5,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Measure all-in-TEE vs ternary for a zoo model; return medians, p99s, ratios and shares."""
    from sealedml import zoo
    from sealedml._internal.procs import ServiceProcess
    from sealedml.errors import ConfigurationError
    from sealedml.partition.split import split_model
    from sealedml.runtime.engine import LoadedModel, intra_op_threads
    from sealedml.runtime.partitioned import ExecutorClient, PartitionedModel
    from sealedml.storage.modelstore import LocalModelStore

    if model_name not in DEFAULT_CUTS:
        raise ConfigurationError(f"--model must be one of {', '.join(DEFAULT_CUTS)}")
    if requests < 1 or warmup < 0:
        raise ConfigurationError("--requests must be ≥ 1 and --warmup ≥ 0")
    front, back = DEFAULT_CUTS[model_name]
    front, back = front_cut or front, back_cut or back
    model = zoo.get(model_name)
    partition = split_model(model, front, back)
    threads = intra_op_threads(1)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    progress(f"[bench] {model_name}: front cut {','.join(front)}, back cut {','.join(back)}", quiet)
    with isolated_home(), tempfile.TemporaryDirectory(prefix="sealedml-partition-") as tmp:
        store = LocalModelStore(Path(tmp) / "store")
        store.put_part("bench", 1, "middle.onnx", partition.middle.SerializeToString())  # what the executor reads
        whole = LoadedModel(model, model_id="bench", version=1, threads=threads)
        parts = {
            name: LoadedModel(partition.part(name), model_id="bench", version=1, threads=threads)
            for name in ("front", "back")
        }
        with ServiceProcess.start(
            ["executor", "serve", "--store", str(store.root), "--port", "0", "--device", device],
            name="executor",
            log_path=Path(tmp) / "executor.log",
        ) as executor:
            client = ExecutorClient(executor.url)
            ternary = PartitionedModel(
                parts["front"], parts["back"], partition.manifest, client, model_id="bench", version=1
            )
            samples: dict[str, list[float]] = {"all_in_tee": [], "ternary": [], "front": [], "back": []}
            for i in range(warmup + requests):
                t0 = time.perf_counter()
                whole.run({"input": x})
                t1 = time.perf_counter()
                ternary.run({"input": x})
                t2 = time.perf_counter()
                parts["front"].run({"input": x})  # the TEE's own share, timed apart
                t3 = time.perf_counter()
                if i >= warmup:
                    samples["all_in_tee"].append(t1 - t0)
                    samples["ternary"].append(t2 - t1)
                    samples["front"].append(t3 - t2)
                if (i + 1) % 10 == 0:
                    progress(f"[bench] {i + 1}/{warmup + requests} rounds", quiet)
            back_inputs = {s.name: np.zeros([d or 1 for d in s.shape], s.dtype) for s in partition.manifest.back_cut}
            for _ in range(requests):
                t = time.perf_counter()
                parts["back"].run(back_inputs)
                samples["back"].append(time.perf_counter() - t)
            device_used = client.health().get("device", "cpu")
            client.close()
    med = {k: median_ms(v) for k, v in samples.items()}
    manifest = partition.manifest
    tee_time = statistics.median(samples["front"]) + statistics.median(samples["back"])
    over = ratio(med["ternary"], med["all_in_tee"])
    return {
        "model": model_name,
        "requests": requests,
        "front_cut": front,
        "back_cut": back,
        "executor_device": device_used,
        "median_ms": {"all_in_tee": med["all_in_tee"], "ternary": med["ternary"]},
        "p99_ms": {"all_in_tee": _p99_ms(samples["all_in_tee"]), "ternary": _p99_ms(samples["ternary"])},
        "tee_part_median_ms": {"front": med["front"], "back": med["back"]},
        "ternary_over_all_in_tee": over,
        "boundary_bytes": manifest.boundary_bytes_per_sample,
        "tee_flops_share": round(manifest.tee_flops_share, 4),
        "tee_time_share": round(tee_time / statistics.median(samples["ternary"]), 4),
        "target_ternary_over_all_in_tee": TARGET_RESNET50 if model_name == "resnet50" else None,
        "target_met": (over <= TARGET_RESNET50) if model_name == "resnet50" else None,
    }


def run_leakage(
    model_name: str, *, seed: int = 0, plot_path: Path | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Train ``digits-cnn`` or ``faces-cnn`` with ``seed`` and assess every cut's leakage (default settings).

    Returns the report of ``partition assess --json`` plus ``model``, ``test_accuracy``,
    ``train_seconds`` and, with ``plot_path``, ``plot``.

    Raises:
        ConfigurationError: another model name, or torch / scikit-image missing.
    """
    from sealedml.errors import ConfigurationError

    if model_name not in TRAINED_MODELS:
        raise ConfigurationError(f"leakage is assessed on the trained models only: {', '.join(TRAINED_MODELS)}")
    from sealedml.zoo import trained

    trained.require_torch()
    from sealedml.partition.assess import Dataset, Settings, assess, plot

    progress(f"[bench] {model_name}: training the victim (seed {seed})", quiet)
    t0 = time.perf_counter()
    victim = trained.load(model_name, seed=seed)
    train_seconds = time.perf_counter() - t0
    test = Dataset(victim.x_test, victim.y_test, "test split")
    aux = Dataset(victim.x_aux, victim.y_aux, "auxiliary split")
    assessment = assess(
        victim.model,
        test,
        aux,
        settings=Settings(seed=seed),
        progress=None if quiet else lambda line: progress(line, quiet),
    )
    result: dict[str, Any] = {
        "model": model_name,
        "test_accuracy": round(victim.test_accuracy, 4),
        "train_seconds": round(train_seconds, 1),
        **assessment.to_dict(),
    }
    if plot_path is not None:
        result["plot"] = str(plot(assessment, plot_path))
    return result
