"""The partitioned engine: front and back in the TEE, the middle on an untrusted executor.

A partitioned model version (``sealedml partition split`` then ``model seal
--partition``) is three parts: the sealed front and back, which this runtime
opens with the lease's key and runs like any model (whole, or memory-bounded
under ``--memory-budget``), and the middle, which an executor process outside
the TEE runs on the front's outputs (``sealedml executor serve``).

What leaves the TEE per request is exactly the front cut's tensors, and what
comes back is the back cut's: never the request, the response, a key or a
sealed part. The executor is untrusted for integrity as well: the runtime
checks that its answer has the back cut's names, dtypes and shapes, not that
its values are right (docs/partition.md says what that means).

A *blinded* partition (``partition split --blind``) differs: its middle is sealed
too and runs here, and only its linear layers' products go to the executor,
masked and verified (:mod:`sealedml.runtime.blinded`, docs/blinded-offload.md).
"""

from __future__ import annotations

import hashlib
import hmac
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sealedml._internal.httpclient import FastClient, TransportError
from sealedml.envelope.model_container import SealedModelHeader, read_header
from sealedml.envelope.tensors import decode_tensors, encode_tensors
from sealedml.errors import ConfigurationError, ProtocolError, SealedModelError, ServiceUnavailable
from sealedml.partition.split import PartitionManifest, TensorSpec
from sealedml.runtime.blinded import BlindedMiddle, HttpLinearExecutor
from sealedml.runtime.engine import Model, RunResult

if TYPE_CHECKING:
    import onnx

    from sealedml.runtime.release import Lease
    from sealedml.storage.modelstore import ModelStore

__all__ = ["MIDDLE_SHA256_HEADER", "ExecutorClient", "PartitionedModel", "middle_path", "open_partitioned"]

#: Names the middle model an executor must run (it refuses any other file under the name).
MIDDLE_SHA256_HEADER = "x-sealedml-middle-sha256"
#: How long a request waits for an executor that refuses connections (restarting) before failing.
CONNECT_RETRY_S = 5.0


def middle_path(model_id: str, version: int) -> str:
    """The executor's path for one model version's middle."""
    return f"/v1/middle/{model_id}/{version}"


class ExecutorClient:
    """Sends front-cut tensors to an untrusted executor and reads back the back-cut tensors.

    Args:
        url: the executor's base URL (the platform starts one: ``platform serve --executor local``);
            further comma-separated URLs are spares that replace an executor whose blinded
            products fail verification.
        timeout: seconds for one middle run, transfer included.
    """

    def __init__(self, url: str, *, timeout: float = 120.0) -> None:
        self.urls = [u.strip() for u in url.split(",") if u.strip()]
        self.url = self.urls[0]
        self.timeout = timeout
        self._http = FastClient(self.url, timeout=timeout)

    def run_middle(
        self, model_id: str, version: int, middle_sha256: str, tensors: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Run one model version's middle on ``tensors``.

        Raises:
            ServiceUnavailable: the executor cannot be reached, or failed.
            ProtocolError: its answer is not a tensor set.
        """
        body = encode_tensors(tensors)
        headers = {"content-type": "application/octet-stream", MIDDLE_SHA256_HEADER: middle_sha256}
        deadline = time.monotonic() + CONNECT_RETRY_S
        while True:
            try:
                answer = self._http.post(middle_path(model_id, version), content=body, headers=headers)
                break
            except TransportError as exc:
                # Only a refused connection is retried (nothing was sent: an executor restarting);
                # a request that may have reached the executor fails as it is.
                if not exc.not_sent or time.monotonic() > deadline:
                    raise ServiceUnavailable("the executor for partitioned models is unreachable") from exc
                time.sleep(0.1)
        if answer.status_code != 200:
            raise ServiceUnavailable(f"the executor failed the middle of {model_id} v{version} ({answer.status_code})")
        try:
            out, _ = decode_tensors(answer.content)
        except Exception as exc:
            raise ProtocolError("the executor's answer is not a tensor set") from exc
        return out

    def health(self) -> dict[str, Any]:
        """The executor's ``/v1/health`` (its device).

        Raises:
            ServiceUnavailable: it cannot be reached.
        """
        try:
            answer: dict[str, Any] = self._http.request("GET", "/v1/health").json()
        except (TransportError, ValueError) as exc:
            raise ServiceUnavailable("the executor for partitioned models is unreachable") from exc
        return answer

    def close(self) -> None:
        self._http.close()


def _check(name: str, array: np.ndarray, spec: TensorSpec, batch: int) -> None:
    expected = [batch if d is None else d for d in spec.shape]
    if array.dtype != np.dtype(spec.dtype) or list(array.shape) != expected:
        raise ProtocolError(
            f"the executor's {name} is {array.dtype}{list(array.shape)}, expected {spec.dtype}{expected}"
        )


class PartitionedModel(Model):
    """Front and back (any engine, in the TEE) around a middle run by an executor.

    Args:
        front: the opened front part (its outputs are the front cut).
        back: the opened back part (its inputs are the back cut).
        manifest: the partition manifest (authenticated by both parts' headers).
        executor: where the middle runs; None refuses every request with a clear error.
        model_id: for messages and the executor's path.
        version: the model version.
        blinded: a blinded partition's middle, run here with outsourced linear layers.
    """

    def __init__(
        self,
        front: Model,
        back: Model,
        manifest: PartitionManifest,
        executor: ExecutorClient | None,
        *,
        model_id: str,
        version: int,
        blinded: BlindedMiddle | None = None,
    ) -> None:
        self.front, self.back, self.manifest, self.executor = front, back, manifest, executor
        self.model_id, self.version, self.blinded = model_id, version, blinded
        self.inputs = front.inputs
        self.output_names = back.output_names
        self.middle_sha256 = manifest.parts["middle"].sha256
        self._plain_bytes = 0

    @property
    def boundary_bytes(self) -> int:
        """Bytes that left and re-entered the TEE in this model's runs (for stats)."""
        if self.blinded is not None:
            return self.blinded.stats.bytes_out + self.blinded.stats.bytes_in
        return self._plain_bytes

    @property
    def nbytes(self) -> int:
        """What the parts in the TEE hold (a plain partition's middle is not here)."""
        return self.front.nbytes + self.back.nbytes

    def run(self, inputs: Mapping[str, np.ndarray]) -> RunResult:
        """Front here, middle on the executor, back here.

        Raises:
            InputError: the front or back rejected the tensors.
            ServiceUnavailable: no executor, or it failed (only this request fails).
            ProtocolError: the executor answered something other than the back cut.
        """
        if self.executor is None and self.blinded is None:
            raise ConfigurationError(
                f"model {self.model_id} v{self.version} is partitioned and this runtime has no executor "
                "(start the platform with --executor local, or the worker with --executor URL)"
            )
        batch = next(iter(inputs.values())).shape[0] if inputs else 1
        front = self.front.run(inputs)
        crossing = {spec.name: front.outputs[spec.name] for spec in self.manifest.front_cut}
        if self.blinded is not None:
            middle = self.blinded.run(crossing)  # in the TEE; only masked products cross
        else:
            assert self.executor is not None
            middle = self.executor.run_middle(self.model_id, self.version, self.middle_sha256, crossing)
            if set(middle) != {spec.name for spec in self.manifest.back_cut}:
                raise ProtocolError("the executor answered other tensors than the back cut")
            for spec in self.manifest.back_cut:
                _check(spec.name, middle[spec.name], spec, batch)
            self._plain_bytes += sum(a.nbytes for a in crossing.values()) + sum(a.nbytes for a in middle.values())
        back = self.back.run(middle)
        peaks = [p for p in (front.peak_bytes, back.peak_bytes) if p is not None]
        return RunResult(back.outputs, max(peaks) if peaks else None)

    def close(self) -> None:
        self.front.close()
        self.back.close()
        if self.blinded is not None:
            self.blinded.close()


def open_partitioned(
    store: ModelStore,
    lease: Lease,
    front_header: SealedModelHeader,
    open_part: Callable[[Path, str], Model],
    executor: ExecutorClient | None,
    open_middle: Callable[[Path], onnx.ModelProto] | None = None,
    *,
    threads: int = 1,
) -> PartitionedModel:
    """Open a partitioned model version whose sealed front is ``front_header``'s container.

    The partition manifest comes from the untrusted store; it is used only if its
    SHA-256 is the one in the front's header (authenticated by the model key when
    the front's chunks are decrypted) *and* the one the KeyService recorded for
    the version (the lease): so neither the cloud nor the owner can run a
    partitioned version under a user's consent to whole models only.

    Args:
        store: where the parts are.
        lease: the version's keys and the KeyService's partition record.
        front_header: the header of ``v<N>.sealed``.
        open_part: opens a sealed part (path, ``"front"``/``"back"``) with the lease's key.
        executor: where the middle runs (a blinded middle: where its products are computed).
        open_middle: opens a blinded partition's sealed middle (path) with the lease's key.
        threads: ONNX Runtime threads of a blinded middle's segments.

    Raises:
        SealedModelError: a whole model where the KeyService recorded a partition or the
            reverse, a manifest that does not match, or parts that do not open.
    """
    if front_header.part != "front" or lease.partition_sha256 is None:
        raise SealedModelError("the stored version and the KeyService's record disagree on whether it is partitioned")
    if not hmac.compare_digest(front_header.partition_sha256 or "", lease.partition_sha256):
        raise SealedModelError("the sealed front belongs to another partition than the KeyService recorded")
    manifest_bytes = store.part_path(lease.model_id, lease.model_version, "partition.json").read_bytes()
    if not hmac.compare_digest(hashlib.sha256(manifest_bytes).hexdigest(), lease.partition_sha256):
        raise SealedModelError("the stored partition manifest is not the one the parts were sealed with")
    try:
        manifest = PartitionManifest.model_validate_json(manifest_bytes)
    except ValueError as exc:
        raise SealedModelError("the partition manifest is malformed") from exc
    back_path = store.part_path(lease.model_id, lease.model_version, "back.sealed")
    if read_header(back_path).partition_sha256 != lease.partition_sha256:  # authenticated when opened below
        raise SealedModelError("the sealed back belongs to another partition than the KeyService recorded")
    front = open_part(store.path(lease.model_id, lease.model_version), "front")
    try:
        back = open_part(back_path, "back")
    except BaseException:
        front.close()
        raise
    blinded = None
    if manifest.blind is not None:
        try:
            blinded = _open_blinded(store, lease, manifest, executor, open_middle, threads)
        except BaseException:
            front.close()
            back.close()
            raise
    model = PartitionedModel(
        front, back, manifest, executor, model_id=lease.model_id, version=lease.model_version, blinded=blinded
    )
    if {s.name for s in manifest.front_cut} != set(front.output_names) or {s.name for s in manifest.back_cut} != {
        i.name for i in back.inputs
    }:
        model.close()
        raise SealedModelError("the sealed parts do not fit the partition manifest")
    return model


def _open_blinded(
    store: ModelStore,
    lease: Lease,
    manifest: PartitionManifest,
    executor: ExecutorClient | None,
    open_middle: Callable[[Path], onnx.ModelProto] | None,
    threads: int,
) -> BlindedMiddle | None:
    """A blinded partition's middle, opened in the TEE, with its masks precomputing in the background."""
    from sealedml.partition.blind.linear import artifact_sha256
    from sealedml.partition.blind.masks import MaskPool
    from sealedml.partition.blind.plan import BlindPlan
    from sealedml.partition.graph import PartitionError

    spec = manifest.blind
    assert spec is not None
    if open_middle is None:
        raise SealedModelError("this runtime cannot open a blinded partition's middle")
    path = store.part_path(lease.model_id, lease.model_version, "middle.sealed")
    if read_header(path).partition_sha256 != lease.partition_sha256:  # authenticated when opened below
        raise SealedModelError("the sealed middle belongs to another partition than the KeyService recorded")
    middle = open_middle(path)
    try:
        plan = BlindPlan(middle, weight_bits=spec.weight_bits, input_bits=spec.input_bits, threads=threads)
    except PartitionError as exc:
        raise SealedModelError(f"the sealed middle cannot be blinded: {exc}") from exc
    if [artifact_sha256(layer) for layer in plan.layers] != [layer.sha256 for layer in spec.layers]:
        raise SealedModelError("the partition's executor layers are not the sealed middle's")
    if executor is None:
        return None  # every request is refused with the no-executor error
    masks = MaskPool(
        plan.layers,
        [tuple(layer.input_shape) for layer in spec.layers],
        Path(tempfile.mkdtemp(prefix="sealedml-masks-")),
        label=f"{lease.model_id}/{lease.model_version}".encode(),
    )
    masks.start_refill()
    digests = [layer.sha256 for layer in spec.layers]
    executors = [
        HttpLinearExecutor(url, lease.model_id, lease.model_version, digests, timeout=executor.timeout)
        for url in executor.urls
    ]
    return BlindedMiddle(plan, executors, masks)
