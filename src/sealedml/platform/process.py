"""A runtime instance as a real OS process (``sealedml worker serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sealedml._internal.httpclient import FastAsyncClient, HttpResponse, TransportError
from sealedml.envelope.request import BINARY_CONTENT_TYPE, is_binary
from sealedml.errors import ServiceUnavailable
from sealedml.platform.template import ForkedInstance, fork_instance

__all__ = ["InstanceNotRunning", "InstanceSpec", "WorkerProcess"]

log = logging.getLogger(__name__)


class InstanceNotRunning(ServiceUnavailable):
    """The instance was gone before the request was sent: safe to route the request elsewhere."""


@dataclass(frozen=True)
class InstanceSpec:
    """How to start a runtime instance."""

    keyservice: str
    store: Path
    concurrency: int = 2
    memory_mb: int = 1024
    tee: str = "simulated"
    host: str = "127.0.0.1"
    start_timeout: float = 60.0
    request_timeout: float = 300.0
    unsafe_plaintext_dir: Path | None = None
    tls: str = "none"
    memory_budget: str | None = None
    spill_dir: str | None = None
    warm_first_segment: bool = True
    # ``worker serve --heap-reserve``; None: the instance's default (runtime/heap_reserve.py).
    heap_reserve: str | None = None
    extra_args: tuple[str, ...] = ()
    # Fork instances from a pre-imported template (platform/template.py) instead of
    # starting a fresh interpreter for each: the same command line, without the imports.
    from_template: bool = False

    def command(self) -> list[str]:
        """The command line of a freshly spawned instance."""
        return [sys.executable, "-m", "sealedml", *self.arguments()]

    def arguments(self) -> list[str]:
        """The ``sealedml`` arguments that start an instance (``worker serve …``)."""
        cmd = [
            "worker",
            "serve",
            "--keyservice",
            self.keyservice,
            "--store",
            str(self.store),
            "--host",
            self.host,
            "--port",
            "0",
            "--concurrency",
            str(self.concurrency),
            "--tee",
            self.tee,
            # The decrypted-model cache gets what the memory limit leaves after the
            # runtime itself (~250 MB for Python + ONNX Runtime).
            "--model-cache-mb",
            str(max(64, self.memory_mb - 250)),
            "--tls",
            self.tls,
        ]
        if self.memory_budget:
            cmd += ["--memory-budget", self.memory_budget]
            if self.spill_dir:
                cmd += ["--spill-dir", self.spill_dir]
            if not self.warm_first_segment:
                cmd.append("--no-warm-first-segment")
        if self.heap_reserve is not None:
            cmd += ["--heap-reserve", self.heap_reserve]
        if self.unsafe_plaintext_dir is not None:
            cmd += ["--unsafe-plaintext-dir", str(self.unsafe_plaintext_dir)]
        return cmd + list(self.extra_args)


@dataclass
class WorkerProcess:
    """One running instance: its process, address and client (the pool keeps the bookkeeping)."""

    spec: InstanceSpec
    instance_id: str = field(default_factory=lambda: secrets.token_hex(4))
    url: str = ""
    process: asyncio.subprocess.Process | ForkedInstance | None = None
    client: FastAsyncClient | None = None
    spawn_s: float = 0.0
    dead: bool = False
    workdir: str | None = None

    async def start(self) -> None:
        """Spawn the process, wait for its listening line, call ``/init``.

        Raises:
            ServiceUnavailable: the process did not come up in time.
        """
        t0 = time.perf_counter()
        # An empty working directory of its own (the instance also moves into a fresh
        # one itself): nothing a model could name by a relative path is there.
        self.workdir = tempfile.mkdtemp(prefix="sealedml-instance-")
        if self.spec.from_template:
            self.process = await fork_instance(self.spec.arguments(), self.workdir)
        else:
            self.process = await asyncio.create_subprocess_exec(
                *self.spec.command(),
                stdout=asyncio.subprocess.PIPE,
                stdin=asyncio.subprocess.DEVNULL,
                # Whatever a library caches (ONNX Runtime's telemetry, off by default: see
                # sealedml/__init__.py) stays in the instance's directory, not the home. One
                # malloc arena, as for instances forked from the template (template_arena.py).
                env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": self.workdir, "MALLOC_ARENA_MAX": "1"},
                cwd=self.workdir,
            )
        if self.process.stdout is None:  # pragma: no cover - PIPE always gives a stream
            raise ServiceUnavailable("no stdout from worker")
        try:
            while True:
                line = await asyncio.wait_for(self.process.stdout.readline(), timeout=self.spec.start_timeout)
                if not line:
                    raise ServiceUnavailable(f"worker exited during start (code {await self.process.wait()})")
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "listening":
                    self.url = str(event["url"])
                    break
            # The gateway is untrusted and forwards ciphertext: with an RA-TLS worker it
            # encrypts the hop but does not judge the evidence (users' keys do that).
            verify: ssl.SSLContext | bool = True
            if self.url.startswith("https://"):
                from sealedml.attestation.ratls import client_ssl_context

                verify = client_ssl_context()
            self.client = FastAsyncClient(self.url, timeout=self.spec.request_timeout, verify=verify)
            response = await self.client.post(
                "/init", content=b'{"value": {}}', headers={"content-type": "application/json"}
            )
            if response.status_code != 200:
                raise ServiceUnavailable(f"worker /init failed with HTTP {response.status_code}")
        except (TimeoutError, TransportError) as exc:
            await self.stop()
            raise ServiceUnavailable(f"worker did not start: {type(exc).__name__}") from exc
        except BaseException:
            await self.stop()
            raise
        self.spawn_s = time.perf_counter() - t0
        log.info("instance %s started at %s in %.3fs", self.instance_id, self.url, self.spawn_s)

    async def call(self, path: str, body: bytes) -> HttpResponse:
        """POST ``body`` to the instance.

        Raises:
            ServiceUnavailable: the instance died or the connection failed.
        """
        if self.client is None or self.dead:
            raise InstanceNotRunning(f"instance {self.instance_id} is not running")
        try:
            content_type = BINARY_CONTENT_TYPE if is_binary(body) else "application/json"
            return await self.client.post(path, content=body, headers={"content-type": content_type})
        except TransportError as exc:
            self.dead = True
            raise ServiceUnavailable(f"instance {self.instance_id} failed: {type(exc).__name__}") from exc

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None and not self.dead

    async def stop(self, grace: float = 5.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        self.dead = True
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
        proc = self.process
        try:
            if proc is None or proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
