"""Simulated measurement: SHA-384 over this build's own code and configuration.

A real TEE measures the code it loads (MRENCLAVE, MRTD, SNP launch digest).
The simulated TEE imitates that honestly: it hashes every Python file of the
installed ``sealedml`` package (sorted relative path and contents) and the
security-relevant configuration, so any code change changes the measurement
and an owner's allow-list stops matching.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sealedml._internal.encoding import canonical_json, fields

__all__ = ["ROLES", "code_digest", "measurement_for"]

ROLES = ("runtime", "keyservice", "program")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def code_digest() -> bytes:
    """SHA-384 over the package's Python sources (computed once per process)."""
    h = hashlib.sha384()
    for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(_PACKAGE_ROOT).as_posix()
        h.update(fields(b"file", rel, path.read_bytes()))
    return h.digest()


def measurement_for(role: str, config: Mapping[str, Any] | None = None) -> str:
    """The simulated measurement (96 hex chars) of ``role`` with ``config``.

    Args:
        role: ``"runtime"``, ``"keyservice"`` or ``"program"`` (a session's program under
            ``sealedml run``): the kinds of TEE SealedML runs.
        config: security-relevant configuration (never ports or paths).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    h = hashlib.sha384()
    h.update(fields(b"sealedml/v1/simulated-measurement", code_digest(), role, canonical_json(dict(config or {}))))
    return h.hexdigest()
