"""FunctionMeter: counts and Prometheus histograms per request, no per-request state kept."""

from __future__ import annotations

import sys

from prometheus_client import generate_latest

from sealedml.platform.metering import FunctionMeter, Metrics


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name))
    return float(line.rsplit(" ", 1)[1])


def test_requests_are_counted_and_observed_without_growing_state() -> None:
    meter = FunctionMeter(function="f", memory_gb=0.5, metrics=Metrics())
    phases = {"open": 0.001, "compute": 0.004, "seal": 0.0005}
    meter.request_done(queue_s=0.0001, total_s=0.006, cold=True, phases=phases, ok=True, loaded_model=True)
    size = sys.getsizeof(meter.__dict__) + sum(sys.getsizeof(v) for v in meter.__dict__.values())
    for _ in range(2000):
        meter.request_done(queue_s=0.0001, total_s=0.006, cold=False, phases=phases, ok=True, loaded_model=False)
    meter.request_done(queue_s=0.0001, total_s=0.006, cold=False, phases={}, ok=False, loaded_model=False)
    assert sys.getsizeof(meter.__dict__) + sum(sys.getsizeof(v) for v in meter.__dict__.values()) == size
    assert (meter.invocations, meter.cold_starts, meter.model_loads, meter.failures) == (2002, 1, 1, 1)
    text = generate_latest(meter.metrics.registry).decode()
    assert _sample(text, 'sealedml_invocations_total{function="f",outcome="ok"}') == 2001
    assert _sample(text, 'sealedml_invocations_total{function="f",outcome="error"}') == 1
    assert _sample(text, 'sealedml_phase_seconds_count{function="f",phase="compute"}') == 2001
    assert _sample(text, 'sealedml_request_seconds_count{function="f"}') == 2002
    assert _sample(text, 'sealedml_cold_starts_total{function="f"}') == 1


def test_only_the_latest_instance_starts_are_kept() -> None:
    meter = FunctionMeter(function="f", memory_gb=0.5, metrics=Metrics())
    for i in range(50):
        meter.starts.append({"instance": f"i{i}"})
    shown = meter.summary()["starts"]
    assert [s["instance"] for s in shown] == [f"i{i}" for i in range(30, 50)]
