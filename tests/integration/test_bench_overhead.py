"""``sealedml bench overhead`` end to end: all three paths through real processes, repeated runs.

The plain path (b) is the only user of ``/v1/unsafe-plaintext`` on the gateway and the
instance; this test keeps it working, and checks that a repeated measurement reports
every run and counts the targets as met only when each run meets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sealedml", "bench", "overhead", *args],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=300,
    )


def test_repeated_runs_report_each_run_and_their_medians() -> None:
    proc = _bench("--model", "toy", "--requests", "6", "--warmup", "1", "--runs", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["runs"] == 2 and len(doc["per_run"]) == 2
    for run in doc["per_run"]:
        assert set(run["median_ms"]) == {"a_in_process", "b_plain_http", "c_secure"}
        assert all(v > 0 for v in run["median_ms"].values())
        # Serving over two HTTP hops cannot be faster than calling ONNX Runtime in process.
        assert run["median_ms"]["b_plain_http"] > run["median_ms"]["a_in_process"]
    ratios = sorted(r["ratio_c_over_b"] for r in doc["per_run"])
    assert doc["ratio_c_over_b"] == pytest.approx(sum(ratios) / 2, abs=1e-3)  # the median of two
    assert doc["runs_meeting_targets"] == sum(r["target_met"] for r in doc["per_run"])
    assert doc["target_met"] is all(r["target_met"] for r in doc["per_run"])


def test_a_single_run_keeps_the_flat_report_and_bad_runs_are_refused() -> None:
    proc = _bench("--model", "toy", "--requests", "4", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert "per_run" not in doc and doc["requests"] == 4
    assert {"ratio_c_over_b", "added_ms_c_minus_a", "target_met"} <= set(doc)
    refused = _bench("--runs", "0", "--json")
    assert refused.returncode != 0
    assert "--runs must be at least 1" in refused.stdout + refused.stderr
