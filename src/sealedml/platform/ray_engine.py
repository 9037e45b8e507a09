"""The Ray Serve engine: the same runtime as a Ray Serve deployment, for clusters.

``sealedml platform serve --engine ray`` deploys two Ray Serve deployments:

* ``sealedml-runtime`` — one replica = one runtime instance: the replica starts an
  attested ``sealedml worker serve`` process and forwards ciphertext to it, so keys,
  decrypted models and plaintext never enter a Ray actor or Ray's object store
  (:class:`RuntimeReplica`); ``max_ongoing_requests`` = the instance concurrency;
  autoscaling from zero to ``max_replicas`` on ongoing requests, back to zero
  after the keep-alive window; **model multiplexing**: requests carry their
  model id as Ray Serve's multiplexed model id, so the router prefers a replica
  whose worker already holds the model (the worker process keeps the decrypted
  models, by id, version and key).
* ``sealedml-gateway`` — the HTTP ingress (same API as the embedded gateway:
  ``POST /v1/infer``, ``GET /v1/health``, ``GET /v1/stats``); it reads only the
  envelope's metadata and forwards the bytes.

Ray is an optional dependency (``pip install sealedml[ray]``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from sealedml.errors import ConfigurationError

__all__ = ["RayEngineConfig", "build_app", "serve_ray"]

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
        trust_options: dict[str, Any] | None = None,
        record_dir: Path | None = None,
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
        # Keyword arguments of attestation.trust.trust_from_options (absolute paths): which
        # KeyService the replicas accept. Options, not a KeyServiceTrust, because replicas are
        # built in other processes and the verifiers hold caches and clients.
        self.trust_options = dict(trust_options or {})
        # Where replicas write every body they carry (an audit of what Ray sees), or None.
        self.record_dir = Path(record_dir).resolve() if record_dir else None


def _require_ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ConfigurationError("the Ray engine needs Ray Serve: pip install 'sealedml[ray]'") from exc
    return ray, serve


_, _serve = _require_ray()
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

from sealedml._internal.http import (  # noqa: E402
    PEAK_BYTES_HEADER,
    SERVER_TIMING_HEADER,
    error_body,
    error_response,
    status_for,
)
from sealedml.envelope.request import BINARY_CONTENT_TYPE, RequestEnvelope  # noqa: E402
from sealedml.errors import Error  # noqa: E402

#: Decrypted models one replica keeps (Ray Serve's multiplexing LRU).
MAX_MODELS_PER_REPLICA = 4


def _trust_args(options: dict[str, Any]) -> tuple[str, ...]:
    """The worker's KeyService trust flags from ``trust_from_options`` keyword arguments."""
    flags = {
        "measurement": "--keyservice-measurement",
        "policy_file": "--keyservice-policy",
        "collateral": "--collateral",
        "pccs_url": "--pccs-url",
        "vcek": "--vcek",
    }
    out: list[str] = []
    for name, flag in flags.items():
        if options.get(name) is not None:
            out += [flag, str(options[name])]
    return tuple(out)


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
        from sealedml.platform.process import InstanceSpec

        self._spec = InstanceSpec(
            keyservice=config.keyservice,
            store=config.store,
            concurrency=config.concurrency,
            tee=config.tee,
            memory_budget=str(config.memory_budget) if config.memory_budget else None,
            spill_dir=config.spill_dir,
            extra_args=_trust_args(config.trust_options),
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

    async def predict(self, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        self._note("in", body)
        try:
            envelope = RequestEnvelope.parse(body)  # its clear metadata: the model id, for routing
            await self.get_model(envelope.model_id)
            worker = await self._instance()
            response = await worker.call("/v1/infer", body)
        except Error as exc:
            return status_for(exc), error_body(exc), {}
        self._note("out", response.content)
        headers = {
            k: v for k, v in response.headers.items() if k.lower() in (SERVER_TIMING_HEADER.lower(), PEAK_BYTES_HEADER)
        }
        return response.status_code, response.content, headers

    def __del__(self) -> None:
        worker = self._worker
        if worker is not None and worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()


@_serve.deployment(name="sealedml-gateway", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Gateway:
    """HTTP ingress: reads the envelope's metadata only and forwards the bytes."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            if request.method == "GET" and path == "/v1/health":
                return JSONResponse({"status": "ok", "engine": "ray"})
            if request.method == "GET" and path == "/v1/stats":
                return JSONResponse(_ray_stats())
            if request.method == "POST" and path == "/v1/infer":
                body = await request.body()
                if len(body) > 64 * 1024 * 1024:
                    return JSONResponse({"error": "too_large", "message": "body too large"}, status_code=413)
                envelope = RequestEnvelope.parse(body)
                handle = self.runtime.options(multiplexed_model_id=envelope.model_id)
                status, out, headers = await handle.predict.remote(body)
                media = BINARY_CONTENT_TYPE if status == 200 else "application/json"
                return Response(out, status_code=status, media_type=media, headers=headers)
            return JSONResponse({"error": "not_found", "message": "not found"}, status_code=404)
        except Error as exc:
            return error_response(exc)


def build_app(config: RayEngineConfig) -> Any:
    """The Ray Serve application: the gateway bound to the autoscaled, multiplexed runtime."""
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
    return Gateway.bind(runtime.bind(config))  # type: ignore[attr-defined]


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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def serve_ray(
    config: RayEngineConfig,
    host: str,
    port: int,
    *,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    temp_dir: Path | None = None,
) -> None:
    """Start (or join) Ray, deploy SealedML on Ray Serve, and block until SIGINT/SIGTERM.

    Args:
        config: deployment settings.
        host: HTTP host of Ray Serve's proxy.
        port: HTTP port (0 = a free port; the URL is printed).
        ray_address: an existing cluster (``ray://`` or ``auto``); default: start a local one.
        num_cpus: CPUs of a local Ray (default: all).
        temp_dir: Ray's session directory for a local Ray (default: a new temporary directory).
    """
    ray, serve = _require_ray()
    port = port or _free_port(host)
    owned_tmp = None
    if ray_address is None and temp_dir is None:
        owned_tmp = tempfile.mkdtemp(prefix="sr-")
        temp_dir = Path(owned_tmp)
    if ray_address is None and temp_dir is not None:
        _local_auth_token(temp_dir)
    ray.init(
        address=ray_address,
        num_cpus=num_cpus if ray_address is None else None,
        include_dashboard=False,
        log_to_driver=False,
        namespace="sealedml",
        _temp_dir=str(temp_dir) if ray_address is None else None,
        runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("SEALEDML_")}},
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name="sealedml", route_prefix="/")
        print(
            json.dumps({"event": "listening", "url": f"http://{host}:{port}", "service": "platform", "engine": "ray"}),
            flush=True,
        )
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if owned_tmp is not None:
                import shutil

                shutil.rmtree(owned_tmp, ignore_errors=True)
