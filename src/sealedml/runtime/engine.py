"""The :class:`Model` interface every engine implements, and the whole-model engine.

A worker serves any engine the same way: :meth:`Model.bind_inputs` maps a
request's tensors to the model's inputs, :meth:`Model.run` returns a
:class:`RunResult` (outputs, plus the tracked peak where the engine tracks one),
:attr:`Model.nbytes` sizes it for the cache. Engines: :class:`LoadedModel` (one
ONNX Runtime session over the decrypted model) and the memory-bounded
``StreamingModel`` (``runtime/memory_bounded``), and ``PartitionedModel``
(``runtime/partitioned.py``: front and back, each one of the others, around a
middle that an untrusted executor runs).

ONNX Runtime's ``InferenceSession.run`` is thread-safe, so one session (one
copy of the weights) serves N requests at once; intra-op threads are sized so
N × threads does not exceed the cores (no oversubscription).

ONNX Runtime's own logging is silenced (severity FATAL) in every session the
runtime creates and in its default logger: its error lines quote values of the
tensors being computed (an out-of-range ``Gather`` index is an input value),
and its stderr lands in the platform's logs. A run's failure reaches only the
user, sealed in the response (:func:`sealedml.envelope.request.seal_error`).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from sealedml.envelope.model_container import OpenedModel
from sealedml.errors import InputError, SealedModelError

__all__ = [
    "ORT_LOG_SEVERITY",
    "InputSpec",
    "LoadedModel",
    "Model",
    "RunResult",
    "bind_inputs",
    "intra_op_threads",
    "ort_dtype",
    "ort_failure",
]

log = logging.getLogger(__name__)

#: ONNX Runtime log severity in the runtime: 4 = FATAL only (see the module docstring).
ORT_LOG_SEVERITY = 4
ort.set_default_logger_severity(ORT_LOG_SEVERITY)

_ORT_TYPES: dict[str, np.dtype[np.generic]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}


def ort_dtype(type_name: str) -> np.dtype[np.generic] | None:
    """The numpy dtype of an ONNX Runtime tensor type name, or None if unsupported."""
    return _ORT_TYPES.get(type_name)


def intra_op_threads(concurrency: int, cores: int | None = None) -> int:
    """Threads per request so that ``concurrency × threads ≤ cores``."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, concurrency))


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, dtype and rank (None if unknown)."""

    name: str
    dtype: np.dtype[np.generic]
    rank: int | None


def bind_inputs(
    specs: Sequence[InputSpec], tensors: Mapping[str, np.ndarray], positional: bool
) -> dict[str, np.ndarray]:
    """Map request tensors to a model's inputs and check dtype and rank.

    Positional tensors (``"0"``, ``"1"``, …) map to the inputs in order.

    Raises:
        InputError: missing, unexpected or ill-typed inputs (named in the message).
    """
    if positional:
        if len(tensors) != len(specs):
            raise InputError(f"model takes {len(specs)} input(s), got {len(tensors)} unnamed tensor(s)")
        if set(tensors) != {str(i) for i in range(len(specs))}:
            raise InputError("unnamed tensors must be numbered 0, 1, …")
        named = {spec.name: tensors[str(i)] for i, spec in enumerate(specs)}
    else:
        expected = {s.name for s in specs}
        missing, extra = expected - set(tensors), set(tensors) - expected
        if missing or extra:
            raise InputError(f"inputs do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
        named = dict(tensors)
    for spec in specs:
        array = named[spec.name]
        if array.dtype != spec.dtype:
            raise InputError(f"input {spec.name!r} must be {spec.dtype}, got {array.dtype}")
        if spec.rank is not None and array.ndim != spec.rank:
            raise InputError(f"input {spec.name!r} must have rank {spec.rank}, got {array.ndim}")
    return named


@dataclass(frozen=True)
class RunResult:
    """What one run of a model gives.

    Attributes:
        outputs: output name → array.
        peak_bytes: the run's tracked peak of decrypted weights and live
            activations, for engines that track it (memory-bounded); else None.
    """

    outputs: dict[str, np.ndarray]
    peak_bytes: int | None = None


class Model(abc.ABC):
    """A model ready to serve, whatever runs it.

    Attributes:
        model_id: for messages.
        version: the model version.
        inputs: the model's inputs, in order.
        output_names: its outputs, in order.
    """

    model_id: str
    version: int
    inputs: list[InputSpec]
    output_names: list[str]

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes this model holds (what a model cache budgets)."""

    def bind_inputs(self, tensors: Mapping[str, np.ndarray], positional: bool) -> dict[str, np.ndarray]:
        """Map request tensors to the model's inputs (see :func:`bind_inputs`).

        Raises:
            InputError: missing, unexpected or ill-typed inputs.
        """
        return bind_inputs(self.inputs, tensors, positional)

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> RunResult:
        """Run the model on bound inputs (thread-safe; blocking).

        Raises:
            InputError: the model rejected the inputs (the message may quote their
                values: it is for the user only, sealed).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the model holds beyond its memory (threads, files)."""


class LoadedModel(Model):
    """A decrypted model ready to serve: one shared ONNX Runtime session.

    Args:
        model: the ONNX model with weights inline, or a sealed model as opened
            (:class:`~sealedml.envelope.model_container.OpenedModel`: its weights are
            handed to ONNX Runtime in place, which saves a cold start a copy and a
            protobuf round trip).
        model_id: for messages.
        version: the model version.
        threads: intra-op threads per run.
    """

    def __init__(
        self, model: onnx.ModelProto | bytes | OpenedModel, *, model_id: str, version: int, threads: int = 1
    ) -> None:
        self.model_id = model_id
        self.version = version
        options = ort.SessionOptions()
        if isinstance(model, OpenedModel):
            names = list(model.weights)
            # ONNX Runtime borrows these buffers for the session's lifetime: kept here.
            self._weights = (model.payload, [ort.OrtValue.ortvalue_from_numpy(model.weights[n]) for n in names])
            if names:
                options.add_external_initializers(names, self._weights[1])
            data = model.graph.SerializeToString()
            self._nbytes = len(model.payload)
        else:
            data = model if isinstance(model, bytes) else model.SerializeToString()
            self._nbytes = len(data)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = ORT_LOG_SEVERITY
        # No spin-waiting after a run: on a shared machine idle ORT threads would
        # otherwise burn the cores the HTTP stack and other requests need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise SealedModelError(f"model {model_id} v{version} cannot be loaded by ONNX Runtime") from exc
        self.inputs: list[InputSpec] = []
        for meta in self.session.get_inputs():
            dtype = ort_dtype(meta.type)
            if dtype is None:
                raise SealedModelError(f"model {model_id}: input {meta.name} has unsupported type {meta.type}")
            rank = len(meta.shape) if meta.shape is not None else None
            self.inputs.append(InputSpec(meta.name, dtype, rank))
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def nbytes(self) -> int:
        """Size of the serialized model (weights inline)."""
        return self._nbytes

    def run(self, inputs: Mapping[str, np.ndarray]) -> RunResult:
        """Run the model (thread-safe; blocking).

        Raises:
            InputError: ONNX Runtime rejected the inputs (for example a wrong dimension).
        """
        try:
            outputs = self.session.run(self.output_names, dict(inputs))
        except Exception as exc:
            raise InputError(f"model {self.model_id} rejected the inputs: {ort_failure(exc)}") from exc
        return RunResult({name: np.asarray(value) for name, value in zip(self.output_names, outputs, strict=True)})


def warm_up_onnxruntime() -> None:
    """Create and run a one-node session once, so that ONNX Runtime's one-time set-up in this
    process (its environment, kernel registries) is not paid by the first model a user waits for."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "warm-up",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros(1, dtype=np.float32)})


def ort_failure(exc: BaseException) -> str:
    """An ONNX Runtime error on one line (it may quote tensor values: for sealed errors only).

    Its first lines are kept, joined: a shape error's detail ("index: 2 Got: 32 Expected: 28")
    comes on the line after "Got invalid dimensions for input".
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return " ".join(lines[:4])[:400] if lines else type(exc).__name__
