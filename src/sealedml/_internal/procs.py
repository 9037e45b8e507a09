"""Start SealedML services as child processes and learn their URLs.

Used by ``sealedml up``, ``sealedml demo``, the benchmarks and the integration
tests: real processes on loopback, each announcing its URL on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from sealedml.errors import ServiceUnavailable

__all__ = ["ServiceProcess"]


class ServiceProcess:
    """A running ``python -m sealedml ...`` service."""

    def __init__(
        self, proc: subprocess.Popen[bytes], url: str, name: str, announce: dict[str, Any], log_path: Path | None
    ) -> None:
        self.proc, self.url, self.name, self.announce, self.log_path = proc, url, name, announce, log_path

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        log_path: Path | None = None,
    ) -> ServiceProcess:
        """Start ``sealedml ARGS`` and wait for its ``listening`` line.

        Args:
            args: the command's arguments (use ``--port 0`` for a free port).
            name: for messages.
            env: environment overrides.
            timeout: seconds to wait for the service to listen.
            log_path: where its stderr goes (default: inherit).

        Raises:
            ServiceUnavailable: it exited or did not listen in time.
        """
        stderr: IO[bytes] | int | None = None
        if log_path is not None:
            stderr = open(log_path, "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "sealedml", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        if stderr is not None and not isinstance(stderr, int):
            stderr.close()
        found: dict[str, Any] = {}

        def read() -> None:
            if proc.stdout is None:
                return
            for raw in proc.stdout:
                with contextlib.suppress(ValueError):
                    event = json.loads(raw)
                    if isinstance(event, dict) and event.get("event") == "listening":
                        found.update(event)
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            code = proc.poll()
            cls._kill(proc)
            hint = f" (see {log_path})" if log_path else ""
            raise ServiceUnavailable(
                f"{name} did not start" + (f": exited with code {code}" if code is not None else " in time") + hint
            )
        return cls(proc, str(found["url"]), name, found, log_path)

    @classmethod
    def keyservice(
        cls,
        data_dir: Path,
        *extra: str,
        log_path: Path | None = None,
        port: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> ServiceProcess:
        """``sealedml keyservice serve --data-dir DATA_DIR --port PORT EXTRA...``."""
        args = ["keyservice", "serve", "--data-dir", str(data_dir), "--port", str(port), *extra]
        return cls.start(args, name="keyservice", log_path=log_path, env=env)

    @classmethod
    def platform(
        cls,
        keyservice_url: str,
        store: Path,
        *extra: str,
        log_path: Path | None = None,
        port: int = 0,
        name: str = "platform",
        timeout: float = 60.0,
    ) -> ServiceProcess:
        """``sealedml platform serve --keyservice URL --store STORE --port PORT EXTRA...``."""
        args = ["platform", "serve", "--keyservice", keyservice_url, "--store", str(store), "--port", str(port), *extra]
        return cls.start(args, name=name, log_path=log_path, timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole process group (the service and its workers), then SIGKILL."""
        self._kill(self.proc, grace)

    def kill9(self) -> None:
        """SIGKILL the service only (crash simulation)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
