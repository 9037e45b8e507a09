"""Owner-side conversion of a TensorFlow SavedModel to ONNX (``sealedml model convert``).

Never inside a TEE: the owner converts once, checks the result, then seals the ONNX model like
any other. TensorFlow (274 MB) and tf2onnx are an optional extra (``sealedml[convert]``); when
the running interpreter lacks them, the conversion runs in one that has them (``--python``,
``SEALEDML_CONVERT_PYTHON``, or ``.venv-convert`` from ``make convert-venv``), executing
``client/_tf_convert.py`` there. That script also runs the original on seeded random inputs;
this side runs the ONNX model on the same inputs with ONNX Runtime and reports the largest
absolute difference per output. A model that differs by more than the tolerance is not written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sealedml.errors import ConfigurationError, InputError

__all__ = ["ConversionReport", "convert_python", "convert_saved_model"]

_SIDE_SCRIPT = Path(__file__).with_name("_tf_convert.py")


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion produced and how closely it matches the original."""

    out: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int
    samples: int
    max_abs_diff: float
    per_output: dict[str, float]
    tensorflow: str

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "opset": self.opset,
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "per_output": self.per_output,
            "tensorflow": self.tensorflow,
        }


def convert_python(explicit: Path | None = None) -> Path:
    """The interpreter that converts: ``explicit``, ``SEALEDML_CONVERT_PYTHON``, this one if it has
    TensorFlow and tf2onnx, else ``.venv-convert`` beside the running virtual environment or here.

    Raises:
        ConfigurationError: none found.
    """
    named = os.environ.get("SEALEDML_CONVERT_PYTHON")
    chosen = explicit or (Path(named) if named else None)
    if chosen is not None:
        if not chosen.is_file():
            raise ConfigurationError(f"{chosen}: no such interpreter")
        return chosen
    if importlib.util.find_spec("tensorflow") and importlib.util.find_spec("tf2onnx"):
        return Path(sys.executable)
    for candidate in (Path(sys.prefix).parent / ".venv-convert/bin/python", Path.cwd() / ".venv-convert/bin/python"):
        if candidate.is_file():
            return candidate
    raise ConfigurationError(
        "model convert needs TensorFlow and tf2onnx: pip install 'sealedml[convert]', run `make convert-venv`, "
        "or name an interpreter that has them with --python"
    )


def _by_name(names: list[str], wanted: str, position: int) -> str:
    """The ONNX name for a TensorFlow one (tf2onnx keeps signature names; ``:0`` suffixes aside)."""
    for name in names:
        if name == wanted or name.split(":")[0] == wanted:
            return name
    return names[position]


def convert_saved_model(
    saved_model: Path,
    out: Path,
    *,
    signature: str = "serving_default",
    opset: int = 17,
    samples: int = 8,
    seed: int = 0,
    tolerance: float = 1e-4,
    python: Path | None = None,
    timeout: float = 900.0,
) -> ConversionReport:
    """Convert ``saved_model``'s ``signature`` to ONNX at ``out`` and measure the difference.

    Raises:
        ConfigurationError: no SavedModel there, ``out`` exists, no converting interpreter, or
            the conversion failed (its reason in one line).
        InputError: the ONNX model differs from the original by more than ``tolerance``.
    """
    import onnx
    import onnxruntime as ort

    if not tolerance >= 0:
        raise ConfigurationError("--tolerance must be 0 or more")
    if not (saved_model / "saved_model.pb").is_file():
        raise ConfigurationError(f"{saved_model}: not a SavedModel directory (no saved_model.pb)")
    if out.exists():
        raise ConfigurationError(f"{out} exists; it is never overwritten")
    if not 1 <= samples <= 1024:
        raise ConfigurationError("--samples must be 1 to 1024")
    interpreter = convert_python(python)
    with tempfile.TemporaryDirectory(prefix="sealedml-convert-") as tmp:
        onnx_path, reference = Path(tmp) / "model.onnx", Path(tmp) / "reference.npz"
        command = [str(interpreter), str(_SIDE_SCRIPT), str(saved_model), str(onnx_path), str(reference), signature,
                   str(opset), str(samples), str(seed)]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConfigurationError(f"conversion took longer than {timeout:.0f} s") from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        try:
            answer = json.loads(lines[-1])
        except (IndexError, ValueError):
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigurationError(f"conversion failed in {interpreter}: {tail}") from None
        if "error" in answer:
            raise ConfigurationError(str(answer["error"]))
        model = onnx.load(str(onnx_path))
        onnx.checker.check_model(model)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        data = np.load(reference)
        tf_inputs = [k[3:] for k in data.files if k.startswith("in:")]
        tf_outputs = [k[4:] for k in data.files if k.startswith("out:")]
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]
        if len(input_names) != len(tf_inputs) or len(output_names) != len(tf_outputs):
            raise ConfigurationError("the ONNX model's inputs or outputs do not match the signature's")
        feed = {_by_name(input_names, name, i): data[f"in:{name}"] for i, name in enumerate(tf_inputs)}
        produced = dict(zip(output_names, session.run(output_names, feed), strict=True))
        per_output = {
            name: float(np.max(np.abs(produced[_by_name(output_names, name, i)] - data[f"out:{name}"])))
            for i, name in enumerate(tf_outputs)
        }
        worst = max(per_output.values(), default=0.0)
        if not worst <= tolerance:  # NaN fails too
            raise InputError(f"the ONNX model differs from the SavedModel by {worst:.3g} > tolerance {tolerance:g}")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with out.open("xb") as f:  # exclusive: never overwrite, even a file made meanwhile
                f.write(onnx_path.read_bytes())
        except FileExistsError:
            raise ConfigurationError(f"{out} exists; it is never overwritten") from None
    return ConversionReport(
        out=out,
        inputs=answer["inputs"],
        outputs=answer["outputs"],
        opset=opset,
        samples=samples,
        max_abs_diff=worst,
        per_output=per_output,
        tensorflow=str(answer.get("tensorflow", "")),
    )
