"""Check, before anything is sealed or uploaded, that a model loads, and describe its inputs and outputs.

``model seal`` of an empty file or of something ONNX Runtime cannot load used to
succeed and upload a key; the failure showed at the user's first request. Here
the owner's own ONNX Runtime (or LiteRT, for a ``.tflite`` file) loads the model
first; what it reports as inputs and outputs goes to the KeyService with the key,
and ``model info`` shows it to the owner and granted users (as Triton's and
MLServer's model metadata do).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sealedml.envelope.model_container import is_tflite
from sealedml.errors import InputError
from sealedml.protocol.keyservice import ModelSignature, TensorInfo

__all__ = ["check_model_file", "is_tflite_file", "signature_of_model", "signature_of_specs"]

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def _dims(shape: Any) -> list[int | None]:
    """Dimensions as ints; symbolic ones (names, None, -1) as None."""
    return [int(d) if isinstance(d, int | np.integer) and d >= 0 else None for d in list(shape)[:16]]


def _onnx_signature(source: Path | bytes, what: str) -> ModelSignature:
    import onnxruntime as ort

    from sealedml.runtime.engine import ORT_LOG_SEVERITY, ort_failure

    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    try:
        model = str(source) if isinstance(source, Path) else source
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"{what}: ONNX Runtime cannot load it ({ort_failure(exc)}); nothing was sealed") from exc

    def info(args: Any) -> TensorInfo:
        return TensorInfo(name=args.name, dtype=_ORT_TYPES.get(args.type, args.type), shape=_dims(args.shape))

    return ModelSignature(
        inputs=[info(i) for i in session.get_inputs()], outputs=[info(o) for o in session.get_outputs()]
    )


def _tflite_signature(what: str, data: bytes) -> ModelSignature:
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=data)
        interpreter.allocate_tensors()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what}: LiteRT cannot load it ({first}); nothing was sealed") from exc

    def info(detail: dict[str, Any]) -> TensorInfo:
        return TensorInfo(name=detail["name"], dtype=np.dtype(detail["dtype"]).name, shape=_dims(detail["shape"]))

    return ModelSignature(
        inputs=[info(d) for d in interpreter.get_input_details()],
        outputs=[info(d) for d in interpreter.get_output_details()],
    )


def is_tflite_file(path: Path) -> bool:
    """Whether ``path`` starts like a TFLite FlatBuffer."""
    with open(path, "rb") as fh:
        return is_tflite(fh.read(8))


def check_model_file(path: Path) -> ModelSignature:
    """Load the model at ``path`` as its runtime will (ONNX Runtime, or LiteRT for TFLite); its inputs and outputs.

    Raises:
        InputError: a missing or empty file, or one its runtime cannot load (the message
            carries the runtime's first line, and says nothing was sealed).
    """
    if not path.is_file():
        raise InputError(f"{path} not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty; nothing was sealed")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if is_tflite(head):
        return _tflite_signature(str(path), path.read_bytes())
    return _in_side_process(path)


def _in_side_process(path: Path) -> ModelSignature:
    """:func:`_onnx_signature` in a process of its own.

    ONNX Runtime holds about twice the model while it loads one: that memory goes with the
    side process instead of staying in the sealer's (which then seals from the file in about
    the size of one tensor, ``envelope/onnx_file.py``). A model that crashes ONNX Runtime
    kills only the side process, and is refused in one line.

    Raises:
        InputError: ONNX Runtime cannot load the model (its reason), or crashed on it.
    """
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sealedml.client.model_check", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if done.returncode == 0 and "signature" in answer:
        return ModelSignature.model_validate(answer["signature"])
    if "error" in answer:
        raise InputError(str(answer["error"]))
    raise InputError(f"{path}: ONNX Runtime crashed loading it (exit {done.returncode}); nothing was sealed")


def _main(argv: list[str]) -> int:
    """``python -m sealedml.client.model_check PATH``: the signature as one JSON line, or the error."""
    import json

    try:
        signature = _onnx_signature(Path(argv[0]), argv[0])
    except InputError as exc:
        print(json.dumps({"error": exc.message}))
        return 3
    print(json.dumps({"signature": signature.model_dump(mode="json")}))
    return 0


def signature_of_model(model: Any, what: str = "the model") -> ModelSignature:
    """:func:`check_model_file` for a model in memory (an ``onnx.ModelProto``, or TFLite bytes)."""
    if isinstance(model, bytes | bytearray):
        if is_tflite(bytes(model)):
            return _tflite_signature(what, bytes(model))
        return _onnx_signature(bytes(model), what)
    return _onnx_signature(model.SerializeToString(), what)


def signature_of_specs(inputs: Any, outputs: Any) -> ModelSignature:
    """A signature from a partition manifest's input and output specs."""
    return ModelSignature(
        inputs=[TensorInfo(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in inputs],
        outputs=[TensorInfo(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in outputs],
    )


if __name__ == "__main__":  # pragma: no cover - run by _in_side_process
    import sys

    sys.exit(_main(sys.argv[1:]))
