"""The untrusted executor: runs the middles of partitioned models, outside any TEE.

``sealedml executor serve --store DIR`` (or ``platform serve --executor local``,
which starts and supervises one). It reads ``<model_id>/v<N>.middle.onnx`` from
the model store — the part the owner chose to run in the clear — and answers
``POST /v1/middle/{model_id}/{version}`` (safetensors in, safetensors out) with
ONNX Runtime, on the GPU when its CUDA execution provider is installed
(``onnxruntime-gpu``) and ``--device`` allows it.

It is *untrusted*: it sees the middle's weights and the intermediate
representations at the front cut, nothing else. Runtimes name the middle by
its SHA-256 (from the sealed, authenticated partition manifest), so a middle
file that the store swapped is refused here, and they check the shapes and
dtypes of what comes back.

For blinded partitions (``partition split --blind``) it also answers
``POST /v1/linear/{model_id}/{version}/{layer}``: the product of one outsourced
layer's quantized weights (``linear-<layer>.onnx``) with a masked input, in
float64 (numpy on the CPU; ONNX Runtime's CUDA provider on a GPU). There it sees
only values uniform in Z_p, and the runtime verifies every product it returns
(docs/blinded-offload.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sealedml._internal.http import guarded, json_response, read_body
from sealedml._internal.ops import ops_routes
from sealedml.envelope.request import ID_PATTERN
from sealedml.envelope.tensors import decode_tensors, encode_tensors
from sealedml.errors import ConfigurationError, Conflict, InputError, NotFound, ProtocolError
from sealedml.partition.blind.linear import LinearLayer, apply_linear, layer_from_artifact
from sealedml.partition.blind.spec import artifact_name
from sealedml.partition.graph import PartitionError
from sealedml.runtime.blinded import LINEAR_SHA256_HEADER
from sealedml.runtime.engine import ORT_LOG_SEVERITY, ort_failure
from sealedml.runtime.partitioned import MIDDLE_SHA256_HEADER
from sealedml.storage.modelstore import LocalModelStore

__all__ = ["DEVICES", "ExecutorService", "create_app", "providers_for", "serve"]

log = logging.getLogger(__name__)

#: ``--device`` choices: ``auto`` takes CUDA when ONNX Runtime offers it.
DEVICES = ("auto", "cpu", "cuda")
#: The largest front-cut tensor set a request may carry.
MAX_BODY = 512 * 1024 * 1024


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``device``.

    Raises:
        ConfigurationError: ``cuda`` asked for but this ONNX Runtime has no CUDA provider.
    """
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ConfigurationError("--device cuda: this ONNX Runtime has no CUDA provider (pip install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


@dataclass
class _Middle:
    sha256: str
    session: Any
    input_names: list[str]
    output_names: list[str]


@dataclass
class ExecutorStats:
    """What an executor did (``GET /v1/stats``)."""

    requests: int = 0
    failures: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    compute_s: float = 0.0
    models: dict[str, str] = field(default_factory=dict)


class ExecutorService:
    """Loads middles from the store (cached by id, version and digest) and runs them.

    Args:
        store: the model store directory.
        device: one of :data:`DEVICES`.
        threads: concurrent middle runs.
    """

    def __init__(self, store: Path, *, device: str = "auto", threads: int = 2) -> None:
        self.store = LocalModelStore(store)
        self.providers = providers_for(device)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.stats = ExecutorStats()
        self._middles: dict[tuple[str, int], _Middle] = {}
        self._linears: dict[tuple[str, int, int], tuple[str, LinearLayer, Any]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="middle")

    def _middle(self, model_id: str, version: int, sha256: str) -> _Middle:
        key = (model_id, version)
        with self._lock:
            cached = self._middles.get(key)
            if cached is not None and cached.sha256 == sha256:
                return cached
            data = self.store.part_path(model_id, version, "middle.onnx").read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise Conflict(f"the stored middle of {model_id} v{version} is not the one the runtime names")
            options = ort.SessionOptions()
            options.log_severity_level = ORT_LOG_SEVERITY
            # As in the runtime (runtime/engine.py): no spin-waiting after a run. On a CPU host
            # the spinning threads would take the cores the TEE needs for the front and back,
            # and an executor that spins while the runtime's sessions do not would also flatter
            # `bench partition`'s ratio.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                session = ort.InferenceSession(data, options, providers=self.providers)
            except Exception as exc:
                raise InputError(f"the middle of {model_id} v{version} does not load: {ort_failure(exc)}") from exc
            middle = _Middle(
                sha256, session, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
            )
            self._middles[key] = middle
            self.stats.models[f"{model_id}/v{version}"] = sha256
            return middle

    def run(self, model_id: str, version: int, sha256: str, body: bytes) -> bytes:
        """Run one middle on a safetensors body; return the outputs as safetensors.

        Raises:
            NotFound: no middle for that version in the store.
            Conflict: the stored middle is not the one named by ``sha256``.
            InputError: the tensors do not fit the middle.
        """
        middle = self._middle(model_id, version, sha256)
        tensors, _ = decode_tensors(body, max_tensors=len(middle.input_names))
        if set(tensors) != set(middle.input_names):
            raise InputError(f"the middle of {model_id} v{version} takes {sorted(middle.input_names)}")
        t0 = time.perf_counter()
        try:
            outputs = middle.session.run(middle.output_names, tensors)
        except Exception as exc:
            raise InputError(f"the middle of {model_id} v{version} failed: {ort_failure(exc)}") from exc
        self.stats.compute_s += time.perf_counter() - t0
        return encode_tensors({n: np.asarray(v) for n, v in zip(middle.output_names, outputs, strict=True)})

    def _linear(self, model_id: str, version: int, layer: int, sha256: str) -> tuple[str, LinearLayer, Any]:
        key = (model_id, version, layer)
        with self._lock:
            cached = self._linears.get(key)
            if cached is not None and cached[0] == sha256:
                return cached
            data = self.store.part_path(model_id, version, artifact_name(layer)).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise Conflict(f"the stored layer {layer} of {model_id} v{version} is not the one the runtime names")
            try:
                parsed = layer_from_artifact(data)
            except PartitionError as exc:
                raise InputError(f"layer {layer} of {model_id} v{version}: {exc}") from exc
            session = None
            if self.device == "cuda":  # float64 Conv and MatMul run on the GPU through ONNX Runtime's CUDA provider
                session = ort.InferenceSession(data, providers=self.providers)
            self._linears[key] = (sha256, parsed, session)
            return self._linears[key]

    def run_linear(self, model_id: str, version: int, layer: int, sha256: str, body: bytes) -> bytes:
        """Multiply one blinded input (safetensors ``x``, float64) by an outsourced layer's weights.

        Raises:
            NotFound: no such layer in the store.
            Conflict: the stored layer is not the one named by ``sha256``.
            InputError: the body is not one float64 tensor ``x`` that fits the layer.
        """
        _, parsed, session = self._linear(model_id, version, layer, sha256)
        tensors, _ = decode_tensors(body, max_tensors=1)
        x = tensors.get("x")
        if x is None or x.dtype != np.float64:
            raise InputError("a blinded layer takes one float64 tensor x")
        t0 = time.perf_counter()
        try:
            y = session.run(["y"], {"x": x})[0] if session is not None else apply_linear(parsed, x)
        except Exception as exc:
            raise InputError(f"layer {layer} of {model_id} v{version} failed: {exc.__class__.__name__}") from exc
        self.stats.compute_s += time.perf_counter() - t0
        return encode_tensors({"y": np.asarray(y, dtype=np.float64)})

    async def handle(self, model_id: str, version: int, sha256: str, body: bytes, layer: int | None = None) -> bytes:
        """:meth:`run` (or :meth:`run_linear` for a blinded ``layer``) on the thread pool, counted in the stats."""
        self.stats.requests += 1
        self.stats.bytes_in += len(body)
        loop = asyncio.get_running_loop()
        try:
            if layer is None:
                out = await loop.run_in_executor(self._pool, self.run, model_id, version, sha256, body)
            else:
                out = await loop.run_in_executor(self._pool, self.run_linear, model_id, version, layer, sha256, body)
        except Exception:
            self.stats.failures += 1
            raise
        self.stats.bytes_out += len(out)
        return out

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {
            "service": "executor",
            "device": self.device,
            "providers": self.providers,
            "requests": s.requests,
            "failures": s.failures,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "compute_s": round(s.compute_s, 3),
            "models": dict(s.models),
        }


def create_app(service: ExecutorService) -> Starlette:
    """The executor's HTTP API."""
    valid_id = re.compile(ID_PATTERN)

    def number(request: Request, name: str) -> int:
        try:
            value = int(request.path_params[name])
        except ValueError as exc:
            raise NotFound(f"no such {name}") from exc
        if value < 0:
            raise NotFound(f"no such {name}")
        return value

    async def compute(request: Request, header: str, layer: int | None) -> Response:
        model_id = request.path_params["model_id"]
        if not valid_id.match(model_id):
            raise NotFound("no such model")
        version = number(request, "version")
        sha256 = request.headers.get(header, "")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ProtocolError(f"{header} must name the file's SHA-256")
        body = await read_body(request, MAX_BODY)
        out = await service.handle(model_id, version, sha256, body, layer)
        return Response(out, media_type="application/octet-stream")

    @guarded
    async def middle(request: Request) -> Response:
        return await compute(request, MIDDLE_SHA256_HEADER, None)

    @guarded
    async def linear(request: Request) -> Response:
        return await compute(request, LINEAR_SHA256_HEADER, number(request, "layer"))

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "device": service.device})

    async def stats(request: Request) -> Response:
        return json_response(service.describe())

    routes = [
        Route("/v1/middle/{model_id}/{version}", middle, methods=["POST"]),
        Route("/v1/linear/{model_id}/{version}/{layer}", linear, methods=["POST"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
    ]
    return Starlette(routes=[*routes, *ops_routes("SealedML executor (untrusted)", routes)])


def serve(store: Path, host: str, port: int, *, device: str = "auto", threads: int = 2) -> None:
    """Run an executor until SIGTERM or Ctrl-C, announcing its URL and device on stdout."""
    from sealedml._internal.serve import serve_app

    service = ExecutorService(store.resolve(), device=device, threads=threads)
    log.warning("executor on %s: middles of partitioned models run here, outside any TEE", service.device)
    serve_app(create_app(service), host, port, announce={"service": "executor", "device": service.device})
