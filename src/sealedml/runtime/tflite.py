"""TensorFlow Lite models, unmodified: the LiteRT engine beside ONNX Runtime.

A sealed ``.tflite`` payload is decrypted into memory and handed to LiteRT's interpreter as
bytes (``model_content``): the decrypted model never touches a file. A LiteRT interpreter is
not thread-safe (it owns its tensors), so :class:`TfliteModel` keeps one interpreter per
concurrency slot and lends each run one of them; all of them share the model bytes.

The interpreter's inputs are resized to each request's shape when it differs (a batch of
any size, as the ONNX engine allows), then its tensors are allocated again.
"""

from __future__ import annotations

import queue
from collections.abc import Mapping

import numpy as np

from sealedml.envelope.model_container import is_tflite
from sealedml.errors import InputError, SealedModelError
from sealedml.runtime.engine import InputSpec, Model, RunResult

__all__ = ["TfliteModel", "is_tflite"]


class TfliteModel(Model):
    """A decrypted ``.tflite`` model: ``slots`` LiteRT interpreters over the same bytes.

    Args:
        data: the model (FlatBuffer bytes).
        model_id: for messages.
        version: the model version.
        slots: interpreters, one per request served at once.
        threads: LiteRT threads per interpreter.

    Raises:
        SealedModelError: LiteRT cannot load the model.
    """

    def __init__(self, data: bytes, *, model_id: str, version: int, slots: int = 1, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.model_id, self.version = model_id, version
        self._data = bytes(data)
        self._pool: queue.LifoQueue[object] = queue.LifoQueue()
        try:
            interpreters = [Interpreter(model_content=self._data, num_threads=threads) for _ in range(max(1, slots))]
            for interpreter in interpreters:
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise SealedModelError(f"model {model_id} v{version} cannot be loaded by LiteRT") from exc
        first = interpreters[0]
        self._input_details = first.get_input_details()
        self._output_details = first.get_output_details()
        self.inputs = [InputSpec(d["name"], np.dtype(d["dtype"]), len(d["shape"])) for d in self._input_details]
        self.output_names = [d["name"] for d in self._output_details]
        for interpreter in interpreters:
            self._pool.put(interpreter)
        self.slots = len(interpreters)

    @property
    def nbytes(self) -> int:
        """The model's bytes (shared by every interpreter; their arenas are not counted)."""
        return len(self._data)

    def run(self, inputs: Mapping[str, np.ndarray]) -> RunResult:
        """Run on one free interpreter (blocks until one is free).

        Raises:
            InputError: LiteRT rejected the inputs (for example a dimension it cannot resize).
        """
        interpreter = self._pool.get()
        try:
            return self._run(interpreter, inputs)
        finally:
            self._pool.put(interpreter)

    def _run(self, interpreter: object, inputs: Mapping[str, np.ndarray]) -> RunResult:
        it = interpreter  # ai_edge_litert.interpreter.Interpreter (untyped package)
        try:
            resized = False
            current = it.get_input_details()  # type: ignore[attr-defined]
            for position, detail in enumerate(self._input_details):
                array = inputs[detail["name"]]
                if tuple(current[position]["shape"]) != array.shape:
                    it.resize_tensor_input(detail["index"], list(array.shape))  # type: ignore[attr-defined]
                    resized = True
            if resized:
                it.allocate_tensors()  # type: ignore[attr-defined]
            for detail in self._input_details:
                it.set_tensor(detail["index"], np.ascontiguousarray(inputs[detail["name"]]))  # type: ignore[attr-defined]
            it.invoke()  # type: ignore[attr-defined]
            # Copies: the interpreter's buffers are reused by its next run.
            outputs = {d["name"]: np.array(it.get_tensor(d["index"])) for d in self._output_details}  # type: ignore[attr-defined]
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"model {self.model_id} rejected the inputs: {str(exc).splitlines()[0][:300]}") from exc
        return RunResult(outputs)
