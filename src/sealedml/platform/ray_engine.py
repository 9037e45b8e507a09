"""The Ray Serve engine: runtime instances as a Ray Serve deployment, for clusters.

``sealedml platform serve --engine ray`` serves the platform's own gateway app
(``platform/app.py``: the same routes, headers, errors and ``/metrics`` as the local
engine) in front of :class:`RayPlatform`, which deploys one Ray Serve deployment:

* ``sealedml-runtime`` — one replica = one runtime instance: the replica starts an
  attested ``sealedml worker serve`` process and forwards ciphertext to it, so keys,
  decrypted models and plaintext never enter a Ray actor or Ray's object store
  (:class:`RuntimeReplica`); ``max_ongoing_requests`` = the instance concurrency;
  autoscaling from zero to ``max_replicas`` on ongoing requests, back to zero
  after the keep-alive window; **model multiplexing**: requests carry their
  model id as Ray Serve's multiplexed model id, so the router prefers a replica
  whose worker already holds the model (the worker process keeps the decrypted
  models, by id, version and key).

Ray's HTTP proxy is not started: the gateway calls the deployment through a handle.
Ray is an optional dependency (``pip install sealedml[ray]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from sealedml.errors import ConfigurationError

__all__ = ["RayEngineConfig", "RayPlatform", "build_runtime", "serve_ray"]

log = logging.getLogger(__name__)


class RayEngineConfig:
    """Settings of the Ray Serve deployment (mirrors the embedded platform's flags)."""

    def __init__(
        self,
        *,
        keyservice: str,
        store: Path,
        concurrency: int = 2,
        max_replicas: int = 2,
        keep_alive: float = 60.0,
        max_models_per_replica: int = 4,
        tee: str = "simulated",
        replica_cpus: float = 1.0,
        memory_budget: int | None = None,
        spill_dir: str | None = None,
        warm_first_segment: bool = True,
        trust_options: dict[str, Any] | None = None,
        record_dir: Path | None = None,
        tls: str = "none",
        memory_mb: int = 1024,
    ) -> None:
        self.keyservice = keyservice
        self.store = Path(store).resolve()
        self.concurrency = concurrency
        self.max_replicas = max_replicas
        self.keep_alive = keep_alive
        self.max_models_per_replica = max_models_per_replica
        self.tee = tee
        self.replica_cpus = replica_cpus
        self.memory_budget = memory_budget
        self.spill_dir = spill_dir
        self.warm_first_segment = warm_first_segment
        # Keyword arguments of attestation.trust.trust_from_options (absolute paths): which
        # KeyService the replicas accept. Options, not a KeyServiceTrust, because replicas are
        # built in other processes and the verifiers hold caches and clients.
        self.trust_options = dict(trust_options or {})
        # Where replicas write every body they carry (an audit of what Ray sees), or None.
        self.record_dir = Path(record_dir).resolve() if record_dir else None
        self.tls = tls  # "ra": each replica's worker serves HTTPS with an RA-TLS certificate
        self.memory_mb = memory_mb  # each worker's memory limit (its model cache gets the rest)


def _require_ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ConfigurationError("the Ray engine needs Ray Serve: pip install 'sealedml[ray]'") from exc
    return ray, serve


_, _serve = _require_ray()

from sealedml._internal.http import (  # noqa: E402
    PEAK_BYTES_HEADER,
    SERVER_TIMING_HEADER,
    error_body,
    parse_server_timing,
    status_for,
)
from sealedml.envelope.request import BINARY_CONTENT_TYPE, RequestEnvelope  # noqa: E402
from sealedml.errors import Error, NotFound, ServiceUnavailable  # noqa: E402
from sealedml.platform.base import Invocation, Platform, PlatformResult  # noqa: E402

#: Decrypted models one replica keeps (Ray Serve's multiplexing LRU).
MAX_MODELS_PER_REPLICA = 4


# Deployments live at module level so Ray pickles them by reference (the
# package is importable in every worker); settings arrive through ``bind``.
@_serve.deployment(name="sealedml-runtime")
class RuntimeReplica:
    """One runtime instance: an attested ``sealedml worker`` process this actor starts and forwards to.

    The actor handles ciphertext only. Key releases, decrypted models and plaintext inputs
    and outputs stay in the worker process (in a TEE, on hardware), never in the actor, Ray's
    object store or its control plane: whoever controls the Ray head can ship code into the
    actor, and finds nothing secret there. ``record_dir`` writes every body the actor carries
    to files, so that what Ray sees can be audited.
    """

    def __init__(self, config: RayEngineConfig) -> None:
        from sealedml.attestation.trust import trust_option_flags
        from sealedml.platform.process import InstanceSpec

        self._spec = InstanceSpec(
            keyservice=config.keyservice,
            store=config.store,
            concurrency=config.concurrency,
            tee=config.tee,
            memory_budget=str(config.memory_budget) if config.memory_budget else None,
            spill_dir=config.spill_dir,
            tls=config.tls,
            memory_mb=config.memory_mb,
            warm_first_segment=config.warm_first_segment,
            extra_args=trust_option_flags(config.trust_options),
        )
        self._worker: Any = None
        self._starting: Any = None  # an asyncio.Lock, made on the replica's event loop
        self._record = Path(config.record_dir) if config.record_dir else None
        self._recorded = 0
        self._name = secrets.token_hex(4)

    @_serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)  # type: ignore[untyped-decorator]
    async def get_model(self, model_id: str) -> str:
        # Routing only: Ray prefers the replica that served this model id before. The decrypted
        # model is cached in the worker process (by id, version and key), never here.
        return model_id

    async def _instance(self) -> Any:
        import asyncio

        from sealedml.platform.process import WorkerProcess

        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._worker is None or not self._worker.alive():
                worker = WorkerProcess(self._spec)
                await worker.start()
                self._worker = worker
        return self._worker

    def _note(self, kind: str, body: bytes) -> None:
        if self._record is not None:
            self._recorded += 1
            (self._record / f"{self._name}-{self._recorded:06d}.{kind}").write_bytes(body)

    async def predict(self, body: bytes) -> tuple[int, bytes, dict[str, str], dict[str, Any]]:
        """Forward one request's ciphertext to this replica's worker.

        Returns:
            The worker's status, body and timing headers, and what the platform meters:
            ``{"replica", "cold_start" (the worker was started for this call), "replica_s"}``.
        """
        t0 = time.perf_counter()
        self._note("in", body)
        cold = self._worker is None or not self._worker.alive()
        meta: dict[str, Any] = {"replica": self._name, "cold_start": cold}
        try:
            envelope = RequestEnvelope.parse(body)  # its clear metadata: the model id, for routing
            await self.get_model(envelope.model_id)
            worker = await self._instance()
            response = await worker.call("/v1/infer", body)
        except Error as exc:
            return status_for(exc), error_body(exc), {}, {**meta, "replica_s": time.perf_counter() - t0}
        self._note("out", response.content)
        headers = {
            k: v for k, v in response.headers.items() if k.lower() in (SERVER_TIMING_HEADER.lower(), PEAK_BYTES_HEADER)
        }
        return response.status_code, response.content, headers, {**meta, "replica_s": time.perf_counter() - t0}

    def __del__(self) -> None:
        worker = self._worker
        if worker is not None and worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()


def build_runtime(config: RayEngineConfig) -> Any:
    """The Ray Serve application: the autoscaled, multiplexed runtime deployment (no HTTP ingress:
    the platform's own gateway app calls it through a handle)."""
    runtime = RuntimeReplica.options(  # type: ignore[attr-defined]
        max_ongoing_requests=config.concurrency,
        ray_actor_options={"num_cpus": config.replica_cpus},
        autoscaling_config={
            "min_replicas": 0,
            "initial_replicas": 0,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.concurrency,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": config.keep_alive,
            "downscale_to_zero_delay_s": config.keep_alive,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 2.0,
        },
    )
    return runtime.bind(config)


def _ray_stats() -> dict[str, Any]:
    _, serve = _require_ray()
    status = serve.status()
    apps: dict[str, Any] = {}
    for app_name, app in status.applications.items():
        deployments = {}
        for name, dep in app.deployments.items():
            counts = {str(k.value if hasattr(k, "value") else k): v for k, v in dep.replica_states.items()}
            deployments[name] = {
                "status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
                "replicas": counts,
            }
        apps[app_name] = deployments
    return {"engine": "ray", "applications": apps}


def _local_auth_token(session_dir: Path) -> Path:
    """Token authentication for a local Ray cluster, with the token kept in its session directory.

    Ray ≥ 2.52 turns token authentication on for a new local cluster and, unless told
    otherwise, writes the token to ``~/.ray/auth_token`` whatever ``_temp_dir`` says —
    outside this deployment's own files, and shared with every other Ray on the host.
    Here a fresh token is written (mode 0600) into the session directory, and Ray is
    pointed at it through its environment (inherited by every Ray process this one
    starts) before ``ray.init``, which then turns token authentication on as usual
    (``RAY_AUTH_MODE`` is left to Ray: setting it here, after ``import ray``, would not
    reach the configuration Ray has already loaded).
    """
    session_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = session_dir / "auth_token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning("RAY_AUTH_MODE=%s: the local Ray cluster runs WITHOUT token authentication", mode)
    return path


class RayPlatform(Platform):
    """The :class:`~sealedml.platform.base.Platform` on Ray Serve, behind the platform's own gateway app.

    ``start`` starts (or joins) Ray and deploys the runtime (:func:`build_runtime`) without
    Ray's HTTP proxy; ``invoke`` sends each request's bytes to a replica through a deployment
    handle, with the model id as Ray's multiplexed model id; ``stats`` and ``/metrics`` count
    what the local platform counts (invocations, cold starts, latency, per-phase time). Not
    metered: GB-seconds, since Ray starts and stops replicas on its own.
    """

    def __init__(
        self,
        config: RayEngineConfig,
        *,
        ray_address: str | None = None,
        num_cpus: int | None = None,
        temp_dir: Path | None = None,
    ) -> None:
        from sealedml.platform.metering import Metrics

        self.config = config
        self._ray_address, self._num_cpus, self._temp_dir = ray_address, num_cpus, temp_dir
        self._owned_tmp: str | None = None
        self._handle: Any = None
        self.metrics = Metrics()
        self._meters: dict[str, Any] = {}

    def _start_ray(self) -> None:
        """Start (or join) Ray and deploy the runtime (blocking; idempotent)."""
        if self._handle is not None:
            return
        ray, serve = _require_ray()
        temp_dir = self._temp_dir
        if self._ray_address is None and temp_dir is None:
            self._owned_tmp = tempfile.mkdtemp(prefix="sr-")
            temp_dir = Path(self._owned_tmp)
        if self._ray_address is None and temp_dir is not None:
            _local_auth_token(temp_dir)
        ray.init(
            address=self._ray_address,
            num_cpus=self._num_cpus if self._ray_address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            namespace="sealedml",
            _temp_dir=str(temp_dir) if self._ray_address is None else None,
            runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("SEALEDML_")}},
        )
        serve.start(http_options={"location": "NoServer"})
        self._handle = serve.run(build_runtime(self.config), name="sealedml", route_prefix=None)

    async def start(self) -> None:
        import asyncio

        if self._handle is None:
            await asyncio.to_thread(self._start_ray)

    def _meter(self, function: str) -> Any:
        from sealedml.platform.metering import FunctionMeter

        meter = self._meters.get(function)
        if meter is None:
            meter = self._meters[function] = FunctionMeter(function, 0.0, self.metrics)
        return meter

    async def invoke(self, invocation: Invocation) -> PlatformResult:
        if self._handle is None:
            raise ServiceUnavailable("the Ray platform is not started")
        if invocation.path != "/v1/infer":  # the plaintext benchmark route is the local engine's only
            raise NotFound("the Ray engine serves /v1/infer only")
        started = time.perf_counter()
        try:
            handle = self._handle.options(multiplexed_model_id=invocation.model_id)
            status, body, headers, meta = await handle.predict.remote(invocation.body)
        except Exception as exc:  # Ray's own failures (a dead actor, a lost node): one typed error
            self._meter(invocation.model_id).request_rejected()
            raise ServiceUnavailable(f"Ray replica failed: {type(exc).__name__}") from None
        total = time.perf_counter() - started
        timing = headers.get(SERVER_TIMING_HEADER, "")
        queue = max(0.0, total - float(meta["replica_s"]))
        self._meter(invocation.model_id).request_done(
            queue_s=queue,
            total_s=total,
            cold=bool(meta["cold_start"]),
            phases=parse_server_timing(timing),
            ok=status == 200,
            loaded_model="fetch" in parse_server_timing(timing),
        )
        peak = headers.get(PEAK_BYTES_HEADER)
        return PlatformResult(
            status=status,
            body=body,
            content_type=BINARY_CONTENT_TYPE if status == 200 else "application/json",
            cold_start=bool(meta["cold_start"]),
            instance_id=str(meta["replica"]),
            queue_s=queue,
            total_s=total,
            server_timing=timing,
            peak_bytes=int(peak) if peak is not None else None,
        )

    def stats(self) -> dict[str, Any]:
        return {**_ray_stats(), "functions": [meter.summary() for meter in self._meters.values()]}

    async def stop(self) -> None:
        import asyncio

        await asyncio.to_thread(self._stop_ray)

    def _stop_ray(self) -> None:
        ray, serve = _require_ray()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if self._owned_tmp is not None:
                import shutil

                shutil.rmtree(self._owned_tmp, ignore_errors=True)


def serve_ray(
    config: RayEngineConfig,
    host: str,
    port: int,
    *,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    temp_dir: Path | None = None,
) -> None:
    """Serve the platform's gateway app in front of :class:`RayPlatform` until SIGINT/SIGTERM.

    Args:
        config: deployment settings.
        host: the gateway's HTTP host.
        port: HTTP port (0 = a free port; the URL is printed).
        ray_address: an existing cluster (``ray://`` or ``auto``); default: start a local one.
        num_cpus: CPUs of a local Ray (default: all).
        temp_dir: Ray's session directory for a local Ray (default: a new temporary directory).
    """
    from sealedml._internal.serve import serve_app
    from sealedml.platform.app import create_app

    platform = RayPlatform(config, ray_address=ray_address, num_cpus=num_cpus, temp_dir=temp_dir)
    platform._start_ray()  # before the listening line: a gateway that answers has a runtime behind it
    serve_app(create_app(platform), host, port, announce={"service": "platform", "engine": "ray"})
