"""``sealedml bench blind``: all-in-TEE vs blinded, verified offload vs plain ternary, side by side.

All three run interleaved request by request, with ONNX Runtime in this process
for the TEE's share and a real ``sealedml executor serve`` process over loopback
HTTP for the untrusted share (``--device auto``: on a GPU when ONNX Runtime
offers CUDA):

* **all in TEE** — the whole float model in one session;
* **blinded** — front and back in the TEE, the middle in the TEE too, its linear
  layers outsourced masked and checked (one executor round trip per layer);
  masks are precomputed ahead, as a runtime does in the background, and their
  cost is reported separately (``precompute_ms_per_request``);
* **ternary** — front and back in the TEE, the whole middle on the executor in
  the clear.

Then a fault campaign: ``--faults N`` requests through an executor that alters one
random element of one random layer's product (by a random nonzero amount mod p),
each answered by a fresh executor; ``faults_detected`` is the share caught.

For the trained digits CNN (torch) it also reports test accuracy of the float
model, the blinded (quantized) model and ternary. Zoo CNNs have random weights:
their figures are about speed only. ``executor_compute_ms_per_round`` is the
executor's own compute per measured round (the blinded products plus the ternary
middle), read from its ``/v1/stats``: what a GPU would shorten.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sealedml.bench._harness import isolated_home, median_ms, progress, ratio

__all__ = ["MODELS", "run_blind"]

#: Models and their default cuts: the front after the first block, the back before the classifier.
MODELS: dict[str, tuple[list[str], list[str]]] = {
    "digits-cnn": (["relu1"], ["relu4"]),
    "mobilenetv2": (["features.3.add"], ["avgpool"]),
    "resnet50": (["layer2.3.relu3"], ["avgpool"]),
}


class _Faulty:
    """Passes products from ``inner`` on, one layer's product altered in one random element."""

    def __init__(self, inner: Any, layer: int, rng: np.random.Generator) -> None:
        from sealedml.partition.blind.field import PRIME

        self.inner, self.layer, self.rng, self.prime = inner, layer, rng, PRIME
        self.name = f"faulty({inner.name})"

    def compute(self, layer: int, blinded: np.ndarray) -> np.ndarray:
        y: np.ndarray = self.inner.compute(layer, blinded)
        if layer == self.layer:
            y = y.copy()
            y.flat[int(self.rng.integers(y.size))] += float(self.rng.integers(1, self.prime))
        return y

    def close(self) -> None:
        pass  # the honest executor underneath is shared


def _p99_ms(samples: list[float]) -> float:
    return round(float(np.percentile(samples, 99)) * 1000, 3)


def _inputs(model_name: str, samples: int) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """The model, ``samples`` inputs and labels (labels for the trained model only)."""
    from sealedml import zoo

    if model_name == "digits-cnn":
        from sealedml.zoo import trained

        trained.require_torch()
        victim = trained.load("digits-cnn")
        return victim.model, victim.x_test, victim.y_test
    rng = np.random.default_rng(0)
    return zoo.get(model_name), rng.standard_normal((samples, 3, 224, 224)).astype(np.float32), None


def run_blind(
    model_name: str = "digits-cnn",
    *,
    requests: int = 40,
    warmup: int = 5,
    faults: int = 1000,
    weight_bits: int = 8,
    input_bits: int = 8,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Measure all-in-TEE, blinded offload and ternary for one model; return medians, ratios and checks.

    Raises:
        ConfigurationError: an unknown model, bad counts, or torch missing for digits-cnn.
    """
    from sealedml._internal.procs import ServiceProcess
    from sealedml.errors import ConfigurationError, VerificationError
    from sealedml.partition.blind.check import local_blinded
    from sealedml.partition.blind.spec import artifact_name
    from sealedml.partition.split import split_model
    from sealedml.runtime.blinded import HttpLinearExecutor
    from sealedml.runtime.engine import LoadedModel, intra_op_threads
    from sealedml.runtime.partitioned import ExecutorClient, PartitionedModel
    from sealedml.storage.modelstore import LocalModelStore

    if model_name not in MODELS:
        raise ConfigurationError(f"--model must be one of {', '.join(MODELS)}")
    if requests < 1 or warmup < 0 or faults < 0:
        raise ConfigurationError("--requests must be ≥ 1, --warmup and --faults ≥ 0")
    model, x_all, labels = _inputs(model_name, 4)
    front_cut, back_cut = MODELS[model_name]
    progress(f"[bench] {model_name}: splitting at {front_cut[0]} / {back_cut[0]} and quantizing the middle", quiet)
    plain = split_model(model, front_cut, back_cut)
    blinded = split_model(model, front_cut, back_cut, blind=(weight_bits, input_bits))
    spec = blinded.manifest.blind
    assert spec is not None
    threads = intra_op_threads(1)
    x = x_all[:1]
    with isolated_home(), tempfile.TemporaryDirectory(prefix="sealedml-blind-") as tmp:
        store = LocalModelStore(Path(tmp) / "store")
        store.put_part("bench", 1, "middle.onnx", plain.middle.SerializeToString())
        for name, data in blinded.artifacts.items():
            store.put_part("bench", 1, name, data)
        assert all(artifact_name(layer.index) in blinded.artifacts for layer in spec.layers)
        whole = LoadedModel(model, model_id="bench", version=1, threads=threads)
        front = LoadedModel(plain.front, model_id="bench", version=1, threads=threads)
        back = LoadedModel(plain.back, model_id="bench", version=1, threads=threads)
        with ServiceProcess.start(
            ["executor", "serve", "--store", str(store.root), "--port", "0", "--device", device],
            name="executor",
            log_path=Path(tmp) / "executor.log",
        ) as executor:
            client = ExecutorClient(executor.url)
            ternary = PartitionedModel(front, back, plain.manifest, client, model_id="bench", version=1)
            http = HttpLinearExecutor(executor.url, "bench", 1, [layer.sha256 for layer in spec.layers])
            middle = local_blinded(blinded, [http], masks_dir=Path(tmp) / "masks", threads=threads)
            offload = PartitionedModel(front, back, blinded.manifest, None, model_id="bench", version=1, blinded=middle)
            executor_stats = httpx.Client(base_url=executor.url, timeout=30)
            rounds = warmup + requests
            progress(f"[bench] precomputing {rounds} mask records in the TEE", quiet)
            t0 = time.perf_counter()
            middle.masks.precompute(rounds)
            precompute_s = (time.perf_counter() - t0) / rounds
            samples: dict[str, list[float]] = {"all_in_tee": [], "blinded": [], "ternary": []}
            compute_before = 0.0
            for i in range(rounds):
                if i == warmup:
                    compute_before = executor_stats.get("/v1/stats").json()["compute_s"]
                times = []
                for engine in (whole, offload, ternary):
                    t = time.perf_counter()
                    engine.run({"input": x})
                    times.append(time.perf_counter() - t)
                if i >= warmup:
                    for key, value in zip(samples, times, strict=True):
                        samples[key].append(value)
                if (i + 1) % 10 == 0:
                    progress(f"[bench] {i + 1}/{rounds} rounds", quiet)
            # the executor's compute in the measured rounds: blinded products and ternary middles
            executor_compute_s = (executor_stats.get("/v1/stats").json()["compute_s"] - compute_before) / requests
            executor_stats.close()
            bytes_per_request = (middle.stats.bytes_out + middle.stats.bytes_in) // max(middle.stats.requests, 1)
            accuracy = None
            if labels is not None:
                progress(f"[bench] accuracy on {len(labels)} test images", quiet)
                accuracy = {}
                for name, engine in (("float", whole), ("blinded", offload), ("ternary", ternary)):
                    predicted = engine.run({"input": x_all}).outputs["probabilities"].argmax(1)
                    accuracy[name] = round(float((predicted == labels).mean()), 4)
            crossing = {t.name: front.run({"input": x}).outputs[t.name] for t in plain.manifest.front_cut}
            detected = 0
            rng = np.random.default_rng(0)
            if faults:
                progress(f"[bench] injecting {faults} faults", quiet)
            blinded_log = logging.getLogger("sealedml.runtime.blinded")
            level = blinded_log.level
            blinded_log.setLevel(logging.ERROR)  # one condemnation warning per injected fault is noise here
            for trial in range(faults):
                middle.set_executors([_Faulty(http, int(rng.integers(len(spec.layers))), rng)])
                try:
                    middle.run(crossing)
                except VerificationError:
                    detected += 1
                if faults >= 10 and (trial + 1) % (faults // 10) == 0:
                    progress(f"[bench] {trial + 1}/{faults} faults injected, {detected} detected", quiet)
            blinded_log.setLevel(level)
            device_used = client.health().get("device", "cpu")
            middle.close()
            http.close()
            client.close()
    med = {k: median_ms(v) for k, v in samples.items()}
    return {
        "model": model_name,
        "requests": requests,
        "front_cut": front_cut,
        "back_cut": back_cut,
        "executor_device": device_used,
        "outsourced_layers": len(spec.layers),
        "weight_bits": weight_bits,
        "input_bits": input_bits,
        "prime": spec.prime,
        "median_ms": med,
        "p99_ms": {k: _p99_ms(v) for k, v in samples.items()},
        "latency_ratio_vs_all_in_tee": ratio(med["blinded"], med["all_in_tee"]),
        "ternary_ratio_vs_all_in_tee": ratio(med["ternary"], med["all_in_tee"]),
        "precompute_ms_per_request": round(precompute_s * 1000, 3),
        "executor_compute_ms_per_round": round(executor_compute_s * 1000, 3),
        "tee_flops_share": {
            "blinded": round(blinded.manifest.tee_flops_share, 4),
            "ternary": round(plain.manifest.tee_flops_share, 4),
        },
        "bytes_crossing_per_request": {
            "blinded": bytes_per_request,
            "ternary": plain.manifest.boundary_bytes_per_sample,
        },
        "accuracy": accuracy,
        "faults_injected": faults,
        "faults_detected": round(detected / faults, 4) if faults else None,
        "faults_detected_count": detected,
    }
