"""The platform's executor process: started with the platform, restarted when it dies.

``platform serve --executor local`` runs one ``sealedml executor serve`` beside
the instances, on a port fixed at start, so that instances keep one URL across
restarts. A killed executor fails the middles in flight (those requests get a
sealed error); the next requests wait for the restarted one (a runtime retries
a refused connection for a few seconds) and succeed.

This module does not import ONNX Runtime: the platform only supervises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["ExecutorSupervisor", "free_port"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the executor binds it, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ExecutorSupervisor:
    """Keeps one local executor process running.

    Args:
        store: the model store the executor reads middles from.
        host: where it listens (loopback by default).
        port: its port (default: a free one, kept across restarts).
        device: ``auto``, ``cpu`` or ``cuda`` (``sealedml executor serve --device``).
        restart_delay: seconds between an exit and the restart.
    """

    def __init__(
        self,
        store: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        device: str = "auto",
        restart_delay: float = 0.5,
    ) -> None:
        self.store, self.host, self.device = store, host, device
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.restart_delay = restart_delay
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self.announced: dict[str, Any] = {}
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sealedml",
            "executor",
            "serve",
            "--store",
            str(self.store),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--device",
            self.device,
        ]

    async def start(self) -> None:
        """Start the executor and its supervision (returns at once; the executor comes up in the background)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run_forever())

    async def _run_forever(self) -> None:
        while not self._closed:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(), stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
            )
            if self.process.stdout is not None:
                with contextlib.suppress(ValueError, asyncio.IncompleteReadError):
                    line = await self.process.stdout.readline()
                    event = json.loads(line) if line else {}
                    if isinstance(event, dict) and event.get("event") == "listening":
                        self.announced = event
                        log.info("executor listening on %s (%s)", self.url, event.get("device"))
            code = await self.process.wait()
            if self._closed:
                break
            self.restarts += 1
            log.warning("executor exited with %s; restarting (restart %d)", code, self.restarts)
            await asyncio.sleep(self.restart_delay)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace: float = 10.0) -> None:
        """Stop supervising and terminate the executor (SIGTERM, then SIGKILL after ``grace`` s)."""
        self._closed = True
        proc = self.process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def describe(self) -> dict[str, Any]:
        """For the platform's ``/v1/stats``."""
        return {
            "url": self.url,
            "pid": self.process.pid if self.process is not None else None,
            "alive": self.alive,
            "device": self.announced.get("device"),
            "restarts": self.restarts,
        }
