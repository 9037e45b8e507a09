"""The SealedML side of a party's HE side process: start it, frame requests, type its errors.

OpenFHE's wheels import only on Python 3.10 here, so each SECO party runs its threshold-BFV
work in ``seco/he/sidecar.py`` under a separate interpreter (``make he-venv`` creates
``.venv-he`` with it) and talks to it over pipes. Which interpreter: ``SEALEDML_HE_PYTHON``
if set, else ``.venv-he/bin/python`` beside the running virtual environment or in the
current directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sealedml.errors import ConfigurationError, ProtocolError, ServiceUnavailable

__all__ = ["HeEngineError", "HeSidecar", "he_python"]

#: The OpenFHE release whose wheel imports on this machine's Python 3.10.
OPENFHE_REQUIREMENT = "openfhe==1.6.1.0.22.4"
_SIDECAR = Path(__file__).with_name("sidecar.py")
_HEADER_BYTES = 4


class HeEngineError(ProtocolError):
    """The HE side process refused or failed an operation (``kind``: malformed, state, engine, framing)."""

    code = "he_engine"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"HE engine: {message}")
        self.kind = kind


def he_python() -> Path:
    """The interpreter that runs the HE side process.

    Raises:
        ConfigurationError: none found.
    """
    explicit = os.environ.get("SEALEDML_HE_PYTHON")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(f"SEALEDML_HE_PYTHON={explicit}: no such interpreter")
        return path
    candidates = [Path(sys.prefix).parent / ".venv-he/bin/python", Path.cwd() / ".venv-he/bin/python"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigurationError(
        f"SECO's HE side process needs Python 3.10 with {OPENFHE_REQUIREMENT}: run `make he-venv` "
        "or set SEALEDML_HE_PYTHON to such an interpreter"
    )


class HeSidecar:
    """One party's HE engine in its own process; requests are serialized (one at a time).

    Usage::

        with HeSidecar.start() as engine:
            context = engine.call("context_new", {"plaintext_modulus": P})[1][0]
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self._lock = threading.Lock()

    @classmethod
    def start(cls, python: Path | None = None) -> HeSidecar:
        """Start a side process (``python``: default :func:`he_python`).

        Raises:
            ConfigurationError: no suitable interpreter.
            ServiceUnavailable: it did not start.
        """
        interpreter = python or he_python()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            process = subprocess.Popen(
                [str(interpreter), "-I", str(_SIDECAR)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            raise ServiceUnavailable(f"cannot start the HE side process with {interpreter}") from exc
        return cls(process)

    def call(
        self, op: str, args: dict[str, Any] | None = None, blobs: list[bytes] | None = None
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Run ``op``; return the answer's fields and blobs.

        Raises:
            HeEngineError: the engine refused or failed the operation.
            ServiceUnavailable: the side process is gone.
        """
        blobs = blobs or []
        header = json.dumps(
            {"op": op, "args": args or {}, "blobs": [len(b) for b in blobs]}, separators=(",", ":")
        ).encode()
        with self._lock:
            stdin, stdout = self._process.stdin, self._process.stdout
            assert stdin is not None and stdout is not None
            try:
                stdin.write(len(header).to_bytes(_HEADER_BYTES, "big") + header)
                for blob in blobs:
                    stdin.write(blob)
                stdin.flush()
                answer, out = self._read(stdout)
            except (OSError, ValueError) as exc:
                raise ServiceUnavailable("the HE side process is gone") from exc
        if not answer.get("ok"):
            kind = str(answer.get("error", "engine"))
            raise HeEngineError(kind, str(answer.get("message", "failed")))
        return answer, out

    @staticmethod
    def _read(stdout: Any) -> tuple[dict[str, Any], list[bytes]]:
        prefix = stdout.read(_HEADER_BYTES)
        if len(prefix) != _HEADER_BYTES:
            raise ValueError("closed")
        answer = json.loads(stdout.read(int.from_bytes(prefix, "big")))
        sizes = answer.get("blobs", [])
        out = [stdout.read(n) for n in sizes]
        if any(len(b) != n for b, n in zip(out, sizes, strict=True)):
            raise ValueError("truncated")
        return answer, out

    def close(self) -> None:
        """Stop the side process (its secret-key share dies with it)."""
        if self._process.poll() is None:
            try:
                if self._process.stdin is not None:
                    self._process.stdin.close()
                self._process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()

    def kill(self) -> None:
        """Kill it at once (tests of a party going away)."""
        self._process.kill()
        self._process.wait()

    def __enter__(self) -> HeSidecar:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
