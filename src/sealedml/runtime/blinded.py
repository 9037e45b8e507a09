"""Blinded, verified offload: the TEE runs the middle and outsources its linear layers' products.

For each outsourced layer of a request the TEE quantizes the layer's input
(x_q, signed integers), adds a one-time mask r drawn uniformly from Z_p and
sends only a = x_q + r mod p to the untrusted executor, which returns y = W·a.
The TEE subtracts the precomputed u = W·r (mod p), which leaves W·x_q, checks
it with a secret Freivalds vector (:mod:`sealedml.partition.blind.verify`) and
dequantizes it. Activations, pooling and everything else stay in the TEE.

What the executor learns: the quantized weights of the outsourced layers (the
owner hands them over, as in ternary partitioning) and, per request, values
uniform in Z_p and independent of the input — because every r is fresh and
uniform, a is uniform whatever x_q is (a one-time pad over Z_p). It learns
nothing about the request or the response, not even across identical requests.

What it can do: answer wrongly, or not at all. A wrong answer that changes any
element mod p fails the check except with probability 1/p per layer; the
request then fails with :class:`~sealedml.errors.VerificationError` and the
executor is condemned — replaced by the next one configured, and never used
again by this model. Fresh check vectors are drawn at the same time, so what a
condemned executor learned about the old ones (one bit) is worthless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sealedml._internal.httpclient import FastClient, TransportError
from sealedml.envelope.tensors import decode_tensors, encode_tensors
from sealedml.errors import Error, InputError, ProtocolError, ServiceUnavailable, VerificationError
from sealedml.partition.blind.field import PRIME, centered
from sealedml.partition.blind.linear import LinearLayer, apply_linear, dequantize, quantize_input
from sealedml.partition.blind.masks import MaskPool
from sealedml.partition.blind.plan import BlindPlan
from sealedml.partition.blind.verify import Freivalds, valid_product

__all__ = [
    "LINEAR_SHA256_HEADER",
    "BlindStats",
    "BlindedMiddle",
    "HttpLinearExecutor",
    "LinearExecutor",
    "LocalLinearExecutor",
    "linear_path",
]

log = logging.getLogger(__name__)

#: Names the layer artifact an executor must run (it refuses any other file under the name).
LINEAR_SHA256_HEADER = "x-sealedml-linear-sha256"


def linear_path(model_id: str, version: int, layer: int) -> str:
    """The executor's path for one outsourced layer of a model version."""
    return f"/v1/linear/{model_id}/{version}/{layer}"


class LinearExecutor(Protocol):
    """Where outsourced products are computed: ``compute(layer, a)`` returns W·a (float64 integers)."""

    name: str

    def compute(self, layer: int, blinded: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class LocalLinearExecutor:
    """An honest executor in this process (numpy, float64): for tests, benchmarks and the CPU executor."""

    def __init__(self, layers: Sequence[LinearLayer], name: str = "local") -> None:
        self.layers, self.name = list(layers), name

    def compute(self, layer: int, blinded: np.ndarray) -> np.ndarray:
        return apply_linear(self.layers[layer], blinded)

    def close(self) -> None:
        pass


class HttpLinearExecutor:
    """An executor process over HTTP (``sealedml executor serve``), for one model version.

    Args:
        url: the executor's base URL.
        model_id: the model; version: its version.
        digests: each layer's artifact SHA-256, from the sealed partition manifest.
    """

    def __init__(self, url: str, model_id: str, version: int, digests: Sequence[str], *, timeout: float = 120.0):
        self.name = url
        self.model_id, self.version, self.digests = model_id, version, list(digests)
        self._http = FastClient(url, timeout=timeout)

    def compute(self, layer: int, blinded: np.ndarray) -> np.ndarray:
        headers = {"content-type": "application/octet-stream", LINEAR_SHA256_HEADER: self.digests[layer]}
        try:
            answer = self._http.post(
                linear_path(self.model_id, self.version, layer), content=encode_tensors({"x": blinded}), headers=headers
            )
        except TransportError as exc:
            raise ServiceUnavailable("the executor for blinded layers is unreachable") from exc
        if answer.status_code != 200:
            raise ServiceUnavailable(f"the executor failed layer {layer} of {self.model_id} v{self.version}")
        try:
            out, _ = decode_tensors(answer.content, max_tensors=1)
            return out["y"]
        except (Error, KeyError) as exc:
            raise ProtocolError("the executor's answer is not one tensor y") from exc

    def close(self) -> None:
        self._http.close()


@dataclass
class BlindStats:
    """What crossed the TEE boundary, and what the checks caught."""

    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    faults_detected: int = 0
    executors_replaced: int = 0


class BlindedMiddle:
    """A middle part run in the TEE with every linear layer outsourced blinded and verified.

    Args:
        plan: the middle's segments and layers.
        executors: the executor to use, then its replacements in order.
        masks: the sealed mask pool for ``plan.layers``.
    """

    def __init__(self, plan: BlindPlan, executors: Sequence[LinearExecutor], masks: MaskPool) -> None:
        self.plan, self.masks = plan, masks
        self._executors = list(executors)
        self._lock = threading.Lock()
        self._checks = [Freivalds(layer) for layer in plan.layers]
        self._bounds = [layer.l1_max() * (PRIME // 2) for layer in plan.layers]
        self.stats = BlindStats()

    @property
    def executor(self) -> LinearExecutor:
        """The executor in use.

        Raises:
            ServiceUnavailable: every configured executor was condemned.
        """
        with self._lock:
            if not self._executors:
                raise ServiceUnavailable("every executor for blinded layers failed verification; none is left")
            return self._executors[0]

    def set_executors(self, executors: Sequence[LinearExecutor]) -> None:
        """Use ``executors`` from now on: the first, then its replacements in order."""
        with self._lock:
            self._executors = list(executors)

    def _condemn(self, executor: LinearExecutor, why: str) -> None:
        with self._lock:
            if self._executors and self._executors[0] is executor:
                self._executors.pop(0)
                self.stats.faults_detected += 1
                self.stats.executors_replaced += 1
                self._checks = [Freivalds(layer) for layer in self.plan.layers]  # the old vectors leaked a bit
                log.warning("executor %s condemned: %s; %d left", executor.name, why, len(self._executors))
        executor.close()

    def _offload(
        self, executor: LinearExecutor, masks: list[tuple[np.ndarray, np.ndarray]], layer: LinearLayer, x: np.ndarray
    ) -> np.ndarray:
        x_q, scale = quantize_input(layer, x)
        r, u = masks[layer.index]
        if r.shape != x_q.shape:
            raise InputError(f"layer {layer.index} takes {list(r.shape)[1:]} per sample, not {list(x_q.shape)[1:]}")
        blinded = centered(x_q + r).astype(np.float64)
        answer = executor.compute(layer.index, blinded)
        self.stats.bytes_out += blinded.nbytes
        self.stats.bytes_in += answer.nbytes
        shape = (x_q.shape[0], *self.masks.output_shapes[layer.index])
        if not valid_product(answer, shape, self._bounds[layer.index]):
            raise VerificationError(f"the executor's product for layer {layer.index} is malformed")
        product = centered(answer.astype(np.int64) - u)
        if not self._checks[layer.index].check(x_q, product):
            raise VerificationError(f"the executor's product for layer {layer.index} failed its Freivalds check")
        return dequantize(layer, product, scale)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The middle's outputs, every linear product outsourced blinded and checked.

        Raises:
            VerificationError: the executor answered wrongly (it is condemned; the request fails).
            ServiceUnavailable: no executor is left, or it cannot be reached.
            MaskError: the untrusted store altered, swapped or replayed a mask record.
        """
        executor = self.executor
        batch = next(iter(inputs.values())).shape[0]
        masks = self.masks.take(batch)
        self.stats.requests += 1
        try:
            return self.plan.run(inputs, lambda layer, x: self._offload(executor, masks, layer, x))
        except (VerificationError, ProtocolError) as exc:
            self._condemn(executor, exc.message)
            raise VerificationError(exc.message) from exc

    def reference(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The quantized middle computed here, nothing outsourced: what :meth:`run` must equal."""

        def exact(layer: LinearLayer, x: np.ndarray) -> np.ndarray:
            x_q, scale = quantize_input(layer, x)
            return dequantize(layer, np.rint(apply_linear(layer, x_q)).astype(np.int64), scale)

        return self.plan.run(inputs, exact)

    def close(self) -> None:
        self.masks.close()
        with self._lock:
            executors, self._executors = self._executors, []
        for executor in executors:
            executor.close()
