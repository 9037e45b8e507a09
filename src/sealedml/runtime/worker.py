"""SeMIRT: one runtime instance (one TEE) serving many requests and many models.

Lifecycle like MLServer/LitServe: :meth:`Worker.load` (decrypt + session,
single-flight per model version and key), :meth:`Worker.predict` (lease, open
the request envelope, run, seal the response), :meth:`Worker.aclose`. Any
engine that implements :class:`~sealedml.runtime.engine.Model` serves the same
way: the whole model (:class:`~sealedml.runtime.engine.LoadedModel`) or, with a
memory budget, the memory-bounded ``StreamingModel``.

Per request: the lease of the (model, user) pair must be valid — leases expire
after the KeyService's TTL, so revocation reaches a warm instance within the
TTL — then the decrypted model is taken from an LRU cache (by bytes) or loaded
once for all concurrent callers. Blocking work (decryption, ONNX Runtime) runs
on a thread pool sized by the concurrency; the event loop never blocks.

Decrypted models are cached under (model id, version, :func:`model_key_id` of
the key that opened them): a request is only ever served by a model that its
own lease's key opens, so a container planted under a genuine id and version
can never stand in for the genuine model.

Once a request is open, nothing derived from its data leaves the instance
outside the sealed response: its tensors not fitting the model, or the model
failing on them, is answered with a sealed error (:func:`seal_error`), and only
the error's code reaches the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealedml.attestation.base import Attester
from sealedml.envelope.model_container import (
    SealedModelReader,
    check_part,
    open_model,
    open_model_weights,
    open_tflite,
    read_header,
)
from sealedml.envelope.request import (
    MAX_CLOCK_SKEW,
    RequestEnvelope,
    ResponseEnvelope,
    authenticate_request,
    seal_error,
    seal_response,
)
from sealedml.envelope.tensors import decode_tensors
from sealedml.errors import EnvelopeError, Error, SealedModelError, ServiceError
from sealedml.runtime.cache import SingleFlightLRU
from sealedml.runtime.engine import LoadedModel, Model, intra_op_threads, warm_up_onnxruntime
from sealedml.runtime.heap_reserve import HeapReserve
from sealedml.runtime.partitioned import ExecutorClient, open_partitioned
from sealedml.runtime.release import Lease, ReleaseClient
from sealedml.storage.modelstore import ModelStore

__all__ = ["Prediction", "Worker", "WorkerConfig", "WorkerStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one runtime instance.

    Attributes:
        concurrency: requests served at once.
        model_cache_bytes: budget of decrypted models kept (LRU).
        memory_budget: if set, run models memory-bounded (Occlumency): weights stay
            sealed and are decrypted per segment for each request, within this many
            bytes of decrypted weights plus live activations per request.
        spill_dir: with ``memory_budget``: keep each model's re-encrypted weights in an
            anonymous file in this directory instead of process memory.
        stream_prefetch: decrypt segment k+1 while segment k computes.
        warm_first_segment: with ``stream_prefetch``, decrypt the next request's first
            segment after each request (False: only zeros in the weight arena between requests).
        heap_reserve: heap kept faulted in for model loads (:mod:`sealedml.runtime.heap_reserve`):
            ``after-loads``, ``at-start`` or ``off``; None: ``at-start`` with a memory budget
            (such instances run where memory is scarce), else ``after-loads``.
        executor_url: where the middles of partitioned models run (an untrusted executor);
            None: partitioned models are refused with a clear error.
        lease_margin: seconds before expiry at which a lease is renewed.
        replay_window: seconds a request id is remembered to refuse replays.
    """

    concurrency: int = 2
    model_cache_bytes: int = 1 << 30
    memory_budget: int | None = None
    spill_dir: str | None = None
    stream_prefetch: bool = True
    warm_first_segment: bool = True
    heap_reserve: str | None = None
    executor_url: str | None = None
    lease_margin: float = 0.5
    replay_window: int = 2 * MAX_CLOCK_SKEW


@dataclass(frozen=True)
class Prediction:
    """A served request: the sealed answer and what the platform may see of it.

    Attributes:
        response: the response envelope (outputs, or a sealed error).
        timings: seconds per phase (attest, release, fetch, decrypt, session when
            they happened; queue, open, compute, seal always).
        peak_bytes: the run's tracked peak (memory-bounded engines), else None.
    """

    response: ResponseEnvelope
    timings: dict[str, float]
    peak_bytes: int | None = None


@dataclass
class WorkerStats:
    """Counters for the stats endpoint and benchmarks."""

    requests: int = 0
    errors: int = 0
    sealed_errors: int = 0
    releases: int = 0
    model_loads: int = 0
    peak_bytes: int = 0
    load_breakdown: list[dict[str, float]] = field(default_factory=list)


class _ReplayCache:
    """Remembers recent request ids so a replayed request is refused by this instance."""

    def __init__(self, window: float, capacity: int = 200_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._window, self._capacity = window, capacity
        self._lock = threading.Lock()  # called from the request thread pool

    def check_and_add(self, request_id: str, now: float) -> None:
        with self._lock:
            self._check_and_add(request_id, now)

    def _check_and_add(self, request_id: str, now: float) -> None:
        while self._seen:
            rid, ts = next(iter(self._seen.items()))
            if now - ts <= self._window and len(self._seen) < self._capacity:
                break
            del self._seen[rid]
        if request_id in self._seen:
            raise EnvelopeError("replayed request")
        self._seen[request_id] = now


#: Heap an instance keeps faulted in and free for its next model load (``runtime/heap_reserve.py``).
PREFAULT_BYTES = 48 * 1024 * 1024


class Worker:
    """The runtime's core, independent of HTTP.

    Args:
        attester: this instance's attester (evidence for key release).
        releaser: client of the KeyService release protocol.
        store: where sealed models are read from.
        config: instance settings.
    """

    def __init__(
        self, attester: Attester, releaser: ReleaseClient, store: ModelStore, config: WorkerConfig | None = None
    ) -> None:
        self.attester = attester
        self.config = config or WorkerConfig()
        self._releaser = releaser
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="semirt")
        self._gate = asyncio.Semaphore(self.config.concurrency)
        self._threads = intra_op_threads(self.config.concurrency)
        self._executor = ExecutorClient(self.config.executor_url) if self.config.executor_url else None
        self._leases: SingleFlightLRU[tuple[str, str], Lease] = SingleFlightLRU(max_bytes=1 << 62)
        self._readiness: asyncio.Task[None] | None = None
        # Keyed by (model id, version, model key id): see the module docstring.
        self._models: SingleFlightLRU[tuple[str, int, str], Model] = SingleFlightLRU(
            self.config.model_cache_bytes, on_evict=self._evicted
        )
        self._replays = _ReplayCache(self.config.replay_window)
        default_mode = "at-start" if self.config.memory_budget is not None else "after-loads"
        self._heap = HeapReserve.for_mode(self.config.heap_reserve or default_mode, PREFAULT_BYTES)
        self.stats = WorkerStats()
        self.started_at = time.time()

    @property
    def measurement(self) -> str:
        return self.attester.measurement

    def _evicted(self, model: Model) -> None:
        log.info("evicted model %s v%d", model.model_id, model.version)
        model.close()

    async def _run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def keep_ready(self) -> None:
        """From ``/init`` on, keep the KeyService attested and a release challenge at hand; set
        up ONNX Runtime and fault in heap pages for the first model load.

        An instance waiting for its first request (a warm-pool spare above all) then
        spends one round trip on its first release instead of three.
        """
        if self._readiness is None:
            self._readiness = asyncio.get_running_loop().create_task(self._keep_ready())
            self._pool.submit(warm_up_onnxruntime)
            self._heap.replenish()

    async def _keep_ready(self) -> None:
        while True:
            try:
                wait = await self._releaser.prepare()
            except Exception as exc:  # not fatal: the first release tries again and tells its user
                log.info("could not prepare key release ahead of requests: %s", type(exc).__name__)
                wait = 5.0
            await asyncio.sleep(wait)

    # ------------------------------------------------------------------ leases
    async def lease(self, model_id: str, user_id: str, timings: dict[str, float] | None = None) -> Lease:
        """A valid lease for the pair, from cache or a fresh release (timed into ``timings``)."""

        async def load() -> tuple[Lease, int, float | None]:
            (lease,), spent = await self._releaser.release_timed([(model_id, user_id)])
            self.stats.releases += 1
            if timings is not None:
                timings.update(spent)
            return lease, 1, lease.expires_at - self.config.lease_margin

        return await self._leases.get((model_id, user_id), load)

    # ------------------------------------------------------------------ models
    async def load(self, lease: Lease, timings: dict[str, float] | None = None) -> Model:
        """The model named by ``lease`` and opened by its key, ready to run (single-flight, LRU by bytes).

        Whole (decrypted once) or, with a memory budget, memory-bounded (weights stay
        sealed and are decrypted per run). Phases are timed into ``timings``.

        Raises:
            NotFound: the version is not in the store.
            SealedModelError: the container does not open with the lease's key, or
                is for another model or version, or refers to external data.
        """
        key = (lease.model_id, lease.model_version, lease.key_id)

        async def load() -> tuple[Model, int, float | None]:
            breakdown: dict[str, float] = {}
            t0 = time.perf_counter()
            path = self._store.path(lease.model_id, lease.model_version)
            breakdown["fetch_s"] = time.perf_counter() - t0

            def decrypt_and_build() -> Model:
                breakdown.update(decrypt_s=0.0, session_s=0.0)
                header = read_header(path)
                if header.part is None and lease.partition_sha256 is None:
                    return self._open_part(path, lease, None, breakdown)
                return open_partitioned(
                    self._store,
                    lease,
                    header,
                    lambda part_path, part: self._open_part(part_path, lease, part, breakdown),
                    self._executor,
                    lambda part_path: open_model(
                        part_path,
                        lease.model_key,
                        expected_model_id=lease.model_id,
                        expected_version=lease.model_version,
                        expected_part="middle",
                    ),
                    threads=self._threads,
                )

            self._heap.load_started()
            try:
                loaded: Model = await self._run_blocking(decrypt_and_build)
            finally:
                self._heap.load_finished()
            self.stats.model_loads += 1
            self.stats.load_breakdown.append(breakdown)
            if timings is not None:
                timings.update(
                    {
                        "fetch": breakdown["fetch_s"],
                        "decrypt": breakdown["decrypt_s"],
                        "session": breakdown["session_s"],
                    }
                )
            log.info("loaded model %s v%d (%d bytes)", lease.model_id, lease.model_version, loaded.nbytes)
            return loaded, loaded.nbytes, None

        return await self._models.get(key, load)

    def _open_part(self, path: Path, lease: Lease, part: str | None, breakdown: dict[str, float]) -> Model:
        """A whole model (``part`` None) or one sealed part of a partitioned one, opened with the lease's key.

        Whole (decrypted once) or, with a memory budget, memory-bounded. Decryption and
        session times are added to ``breakdown``.
        """
        t1 = time.perf_counter()
        if read_header(path).payload == "tflite":
            return self._tflite(path, lease, part, breakdown, t1)
        if self.config.memory_budget is not None:
            return self._streaming(path, lease, self.config.memory_budget, breakdown, t1, part)
        model = open_model_weights(
            path,
            lease.model_key,
            expected_model_id=lease.model_id,
            expected_version=lease.model_version,
            expected_part=part,
        )
        t2 = time.perf_counter()
        loaded = LoadedModel(model, model_id=lease.model_id, version=lease.model_version, threads=self._threads)
        breakdown["decrypt_s"] += t2 - t1
        breakdown["session_s"] += time.perf_counter() - t2
        return loaded

    def _tflite(self, path: Path, lease: Lease, part: str | None, breakdown: dict[str, float], t1: float) -> Model:
        """An unmodified TFLite model, decrypted into memory: one LiteRT interpreter per concurrency slot.

        Raises:
            SealedModelError: a TFLite part of a partitioned model, or a memory budget (both ONNX only).
        """
        from sealedml.runtime.tflite import TfliteModel

        if part is not None:
            raise SealedModelError("a partitioned model's parts are ONNX, not TFLite")
        if self.config.memory_budget is not None:
            raise SealedModelError("memory-bounded execution (a memory budget) runs ONNX models only, not TFLite")
        data = open_tflite(
            path, lease.model_key, expected_model_id=lease.model_id, expected_version=lease.model_version
        )
        t2 = time.perf_counter()
        model = TfliteModel(
            data,
            model_id=lease.model_id,
            version=lease.model_version,
            slots=self.config.concurrency,
            threads=self._threads,
        )
        breakdown["decrypt_s"] += t2 - t1
        breakdown["session_s"] += time.perf_counter() - t2
        return model

    def _streaming(
        self, path: Path, lease: Lease, budget: int, breakdown: dict[str, float], t1: float, part: str | None
    ) -> Model:
        """A memory-bounded model: segment sessions now, weights decrypted per request."""
        from sealedml.runtime.memory_bounded import StreamingModel

        def reader() -> SealedModelReader:
            opened = SealedModelReader(path, lease.model_key)
            try:
                if (opened.header.model_id, opened.header.model_version) != (lease.model_id, lease.model_version):
                    raise SealedModelError("sealed model is for another model id or version")
                check_part(opened.header, part)
            except SealedModelError:
                opened.close()
                raise
            return opened

        reader().close()  # check the header against the lease before planning
        breakdown["decrypt_s"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        model = StreamingModel(
            reader,
            budget_bytes=budget,
            threads=self._threads,
            prefetch=self.config.stream_prefetch,
            spill_dir=self.config.spill_dir,
            warm_first_segment=self.config.warm_first_segment,
            model_id=lease.model_id,
            version=lease.model_version,
        )
        breakdown["session_s"] += time.perf_counter() - t2
        return model

    @property
    def loaded_models(self) -> list[dict[str, Any]]:
        return [{"model_id": m, "version": v} for m, v, _ in self._models.keys()]

    # ------------------------------------------------------------------ predict
    async def predict(self, envelope: RequestEnvelope) -> ResponseEnvelope:
        """Serve one encrypted request.

        Raises:
            AccessDenied: no valid lease (not granted, no consent, revoked).
            EnvelopeError: tampered, stale, replayed, or sealed for another model.
            SealedModelError: the stored model failed authentication.
            InputError: the tensors do not fit the model.
        """
        return (await self.predict_timed(envelope)).response

    async def predict_timed(
        self,
        envelope: RequestEnvelope,
        *,
        load: Callable[[Lease, dict[str, float]], Awaitable[Model]] | None = None,
    ) -> Prediction:
        """:meth:`predict`, also returning seconds per phase and the run's tracked peak.

        ``load`` replaces the worker's own model cache (the Ray engine passes Ray
        Serve's multiplexed loader so its router knows which replica holds which model).
        """
        self.stats.requests += 1
        timings: dict[str, float] = {}
        try:
            lease = await self.lease(envelope.model_id, envelope.user_id, timings)
            model = await (load or self.load)(lease, timings)
            t0 = time.perf_counter()
            async with self._gate:
                timings["queue"] = time.perf_counter() - t0
                prediction: Prediction = await self._run_blocking(
                    self._predict_blocking, envelope, lease, model, timings
                )
            return prediction
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._heap.request_finished()

    def _predict_blocking(
        self, envelope: RequestEnvelope, lease: Lease, model: Model, timings: dict[str, float]
    ) -> Prediction:
        t0 = time.perf_counter()
        payload, context = authenticate_request(envelope, request_key=lease.request_key)
        self._replays.check_and_add(envelope.request_id, time.time())
        t1 = t2 = t0
        peak: int | None = None
        try:
            # At most as many tensors as the model has inputs, checked before any is decoded.
            tensors, positional = decode_tensors(payload, max_tensors=len(model.inputs))
            inputs = model.bind_inputs(tensors, positional)
            t1 = time.perf_counter()
            result = model.run(inputs)
            t2 = time.perf_counter()
            peak = result.peak_bytes
            if peak is not None:
                self.stats.peak_bytes = max(self.stats.peak_bytes, peak)
            response = seal_response(context, result.outputs)
        except Error as exc:
            response = self._sealed_failure(context, exc, exc.code)
        except Exception:  # anything else the model run raised: its text may quote the inputs too
            response = self._sealed_failure(context, ServiceError("the model run failed"), "internal")
        timings.update({"open": t1 - t0, "compute": t2 - t1, "seal": time.perf_counter() - max(t1, t2)})
        return Prediction(response, timings, peak)

    def _sealed_failure(self, context: Any, error: Error, code: str) -> ResponseEnvelope:
        # The message may be derived from the request's data: it goes to the user only,
        # sealed; the log gets the code.
        self.stats.sealed_errors += 1
        log.info("request failed inside the instance (%s); answered with a sealed error", code)
        return seal_error(context, error)

    async def aclose(self) -> None:
        """Stop: drop models and leases, release the thread pool."""
        if self._readiness is not None:
            self._readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness
        for model_key in self._models.keys():
            self._models.discard(model_key)
        for lease_key in self._leases.keys():
            self._leases.discard(lease_key)
        await self._releaser.aclose()
        if self._executor is not None:
            self._executor.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._heap.close()

    def describe(self) -> dict[str, Any]:
        """State for the stats endpoint (ids and counters only, never keys)."""
        return {
            "measurement": self.measurement,
            "tee": self.attester.tee.value,
            "concurrency": self.config.concurrency,
            "intra_op_threads": self._threads,
            "models": self.loaded_models,
            "model_cache_bytes": self._models.bytes,
            "requests": self.stats.requests,
            "errors": self.stats.errors,
            "sealed_errors": self.stats.sealed_errors,
            "releases": self.stats.releases,
            "model_loads": self.stats.model_loads,
            "load_breakdown": self.stats.load_breakdown[-10:],
            "memory_budget": self.config.memory_budget,
            # Where memory-bounded models keep their re-encrypted weights.
            "spill": None if self.config.memory_budget is None else ("file" if self.config.spill_dir else "memory"),
            # Whether they decrypt the next request's first segment ahead (docs/memory-bounded.md).
            "warm_first_segment": None if self.config.memory_budget is None else self.config.warm_first_segment,
            "peak_tracked_bytes": self.stats.peak_bytes,
            # Heap faulted in ahead of model loads, and how often it was topped up after one.
            "heap_reserve": {"mode": self._heap.mode, "bytes": self._heap.nbytes, "top_ups": self._heap.top_ups},
            "rss_bytes": _rss_bytes(),
            "uptime_s": round(time.time() - self.started_at, 3),
        }


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0
