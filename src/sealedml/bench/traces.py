"""Workload traces: synthetic (Zipf popularity, bursty on/off arrivals) or from CSV.

Synthetic traces follow what serverless studies report for inference traffic
(Azure Functions traces, Shahrad et al., ATC 2020): a few models get most
requests (Zipf popularity) and arrivals come in bursts separated by
heavy-tailed idle gaps. Each burst picks a model by popularity, lasts a
heavy-tailed number of requests, and spaces them closely; the gaps between
bursts are Pareto-distributed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sealedml.errors import ConfigurationError

__all__ = ["TraceEvent", "load_csv_trace", "synthetic_trace"]


@dataclass(frozen=True)
class TraceEvent:
    """One request: when (seconds from the start) and for which model."""

    t: float
    model: str


def synthetic_trace(
    models: int = 10,
    duration: float = 60.0,
    *,
    seed: int = 0,
    zipf_s: float = 1.1,
    mean_gap: float = 2.0,
    pareto_shape: float = 1.5,
    mean_burst: float = 8.0,
    intra_burst: float = 0.1,
    prefix: str = "model",
) -> list[TraceEvent]:
    """A bursty trace over ``models`` models lasting ``duration`` seconds.

    Args:
        models: number of distinct models.
        duration: trace length, seconds.
        seed: RNG seed (same seed, same trace).
        zipf_s: Zipf exponent of model popularity (rank r has weight r^-s).
        mean_gap: mean idle gap between bursts (Pareto with ``pareto_shape``), seconds.
        pareto_shape: tail index of gaps and burst sizes (< 2: heavy-tailed).
        mean_burst: mean requests per burst.
        intra_burst: mean spacing of requests inside a burst (exponential), seconds.
        prefix: model names are ``{prefix}-0`` … ``{prefix}-{models-1}``.
    """
    if models < 1 or duration <= 0:
        raise ConfigurationError("a trace needs at least one model and a positive duration")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, models + 1) ** zipf_s
    weights /= weights.sum()
    gap_scale = mean_gap * (pareto_shape - 1) / pareto_shape
    burst_scale = mean_burst * (pareto_shape - 1) / pareto_shape
    events: list[TraceEvent] = []
    t = float(rng.exponential(mean_gap / 2))
    while t < duration:
        model = int(rng.choice(models, p=weights))
        size = max(1, round((rng.pareto(pareto_shape) + 1) * burst_scale))
        size = min(size, 200)
        for _ in range(size):
            if t >= duration:
                break
            events.append(TraceEvent(round(t, 4), f"{prefix}-{model}"))
            t += float(rng.exponential(intra_burst))
        t += float((rng.pareto(pareto_shape) + 1) * gap_scale)
    return events


def load_csv_trace(path: Path) -> list[TraceEvent]:
    """Rows of ``timestamp,model`` (header optional; timestamps in seconds, any origin).

    Raises:
        ConfigurationError: unreadable file or malformed row (the message names the line).
    """
    events: list[TraceEvent] = []
    try:
        with open(path, newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if not row or row[0].strip().startswith("#"):
                    continue
                if lineno == 1 and not _is_number(row[0]):
                    continue  # header
                if len(row) < 2:
                    raise ConfigurationError(f"{path}:{lineno}: expected 'timestamp,model'")
                if not _is_number(row[0]):
                    raise ConfigurationError(f"{path}:{lineno}: timestamp {row[0]!r} is not a number")
                events.append(TraceEvent(float(row[0]), row[1].strip()))
    except OSError as exc:
        raise ConfigurationError(f"cannot read trace {path}: {exc.strerror}") from exc
    if not events:
        raise ConfigurationError(f"{path}: no requests in the trace")
    events.sort(key=lambda e: e.t)
    origin = events[0].t
    return [TraceEvent(round(e.t - origin, 4), e.model) for e in events]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
