"""ONNX Runtime's wheels carry Microsoft's 1DS telemetry (it writes a session file into the
temporary directory and a device id under the cache directory when imported, and is built to
send events to a Microsoft collector). SealedML turns it off before onnxruntime is imported:
a runtime serving confidential models must not report on them to a third party."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Import what a runtime instance imports, then open and run a model.
_RUN_A_MODEL = """
import numpy as np
import sealedml.runtime.engine
import onnxruntime as ort
from sealedml import zoo
digits = zoo.digits()
ort.InferenceSession(digits.model.SerializeToString()).run(None, {"input": digits.x_test[:1]})
"""


def _run_fresh(tmp_path: Path, **env: str) -> list[str]:
    """Run ``_RUN_A_MODEL`` with a fresh home, temporary and working directory; return what it wrote."""
    home, scratch, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for directory in (home, scratch, cwd):
        directory.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    subprocess.run(
        [sys.executable, "-c", _RUN_A_MODEL],
        cwd=cwd,
        env={**clean, "HOME": str(home), "TMPDIR": str(scratch), **env},
        check=True,
        timeout=120,
    )
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())


def test_running_a_model_writes_no_telemetry_files(tmp_path: Path) -> None:
    assert _run_fresh(tmp_path) == []


def test_the_check_sees_telemetry_when_an_operator_opts_in(tmp_path: Path) -> None:
    """ORT_DISABLE_TELEMETRY=0 is respected (an explicit choice), and the files appear: the test above can fail."""
    written = _run_fresh(tmp_path, ORT_DISABLE_TELEMETRY="0")
    if not written:
        pytest.skip("this onnxruntime build has no telemetry")
    assert any(name.startswith("tmp/") for name in written) or any(".onnxruntime" in name for name in written)
