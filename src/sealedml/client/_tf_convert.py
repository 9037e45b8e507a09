"""Runs in an interpreter that has TensorFlow and tf2onnx (``sealedml[convert]``, or ``make convert-venv``).

Converts a SavedModel's signature to ONNX with tf2onnx, and runs the original on seeded random
inputs so the caller can compare ONNX Runtime's outputs with TensorFlow's. Imports nothing of
SealedML: it is executed by path, as a script, in that other interpreter.

Usage: python _tf_convert.py SAVEDMODEL OUT.onnx REFERENCE.npz SIGNATURE OPSET SAMPLES SEED
Prints one JSON line: the signature's inputs and outputs (name, shape, dtype).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str]) -> int:
    saved_model, out, reference, signature_name, opset, samples, seed = argv
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model)
    if signature_name not in loaded.signatures:
        names = ", ".join(sorted(loaded.signatures)) or "none"
        print(json.dumps({"error": f"the SavedModel has no signature {signature_name!r} (it has: {names})"}))
        return 2
    function = loaded.signatures[signature_name]
    _, specs = function.structured_input_signature
    rng = np.random.default_rng(int(seed))
    inputs = {}
    for name, spec in sorted(specs.items()):
        if not spec.dtype.is_floating:
            print(json.dumps({"error": f"input {name!r} is {spec.dtype.name}: only floating-point inputs are checked"}))
            return 2
        shape = [int(samples) if i == 0 and d is None else (1 if d is None else int(d)) for i, d in
                 enumerate(spec.shape.as_list())]  # fmt: skip
        inputs[name] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
    outputs = {
        name: value.numpy() for name, value in function(**{k: tf.constant(v) for k, v in inputs.items()}).items()
    }
    arrays: dict[str, Any] = {f"in:{k}": v for k, v in inputs.items()}
    arrays.update({f"out:{k}": v for k, v in outputs.items()})
    np.savez(reference, **arrays)
    convert = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved_model, "--output", out,
               "--opset", opset, "--signature_def", signature_name]  # fmt: skip
    done = subprocess.run(convert, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(json.dumps({"error": f"tf2onnx failed: {tail}"}))
        return 2
    describe = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in inputs.items()]
    produced = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()]
    print(json.dumps({"inputs": describe, "outputs": produced, "tensorflow": tf.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
