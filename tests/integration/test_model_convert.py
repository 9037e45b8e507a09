"""``sealedml model convert``: a TensorFlow SavedModel to ONNX, owner-side, with its largest difference
from the original reported; TensorFlow runs in the side interpreter ``make convert-venv`` builds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sealedml.client.convert import convert_python, convert_saved_model
from sealedml.errors import ConfigurationError
from tests.conftest import REPO

SIDE = REPO / ".venv-convert" / "bin" / "python"

MAKE_SAVED_MODEL = """\
import sys
import numpy as np
import tensorflow as tf

class Classifier(tf.Module):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.w1 = tf.Variable(rng.standard_normal((8, 16)).astype("float32"))
        self.w2 = tf.Variable(rng.standard_normal((16, 4)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
    def __call__(self, x):
        return {"probabilities": tf.nn.softmax(tf.nn.relu(x @ self.w1) @ self.w2)}

model = Classifier()
tf.saved_model.save(model, sys.argv[1], signatures={"serving_default": model.__call__})
np.save(sys.argv[2], model.w1.numpy()); np.save(sys.argv[3], model.w2.numpy())
"""


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    if not SIDE.is_file():
        pytest.fail("no .venv-convert: `make test` builds it (make convert-venv)")
    work = tmp_path_factory.mktemp("savedmodel")
    script = work / "make.py"
    script.write_text(textwrap.dedent(MAKE_SAVED_MODEL))
    args = [str(SIDE), str(script), str(work / "sm"), str(work / "w1.npy"), str(work / "w2.npy")]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    return work / "sm", np.load(work / "w1.npy"), np.load(work / "w2.npy")


def test_convert_reports_the_difference_and_the_onnx_model_computes_the_same(
    saved_model: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    directory, w1, w2 = saved_model
    out = tmp_path / "model.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "sealedml", "model", "convert", str(directory), "--out", str(out),
         "--python", str(SIDE), "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["max_abs_diff"] <= 1e-5 and set(report["per_output"]) == {"probabilities"}
    assert report["inputs"] == [{"name": "x", "shape": [8, 8], "dtype": "float32"}]
    x = np.random.default_rng(7).standard_normal((3, 8)).astype(np.float32)
    logits = np.maximum(x @ w1, 0) @ w2
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    assert np.max(np.abs(got - expected)) <= 1e-5  # independent of TensorFlow: numpy's own forward pass


def test_convert_refuses_to_overwrite_and_names_a_missing_signature(
    saved_model: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    directory, _, _ = saved_model
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(ConfigurationError, match="never overwritten"):
        convert_saved_model(directory, existing, python=SIDE)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ConfigurationError, match=r"no signature 'predict'.*serving_default"):
        convert_saved_model(directory, tmp_path / "other.onnx", signature="predict", python=SIDE)
    assert not (tmp_path / "other.onnx").exists()


def test_convert_explains_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a SavedModel"):
        convert_saved_model(tmp_path, tmp_path / "m.onnx", python=SIDE)
    with pytest.raises(ConfigurationError, match="no such interpreter"):
        convert_python(tmp_path / "python-that-is-not-there")
    with pytest.raises(ConfigurationError, match="tolerance"):
        convert_saved_model(tmp_path, tmp_path / "m.onnx", tolerance=-1.0, python=SIDE)
