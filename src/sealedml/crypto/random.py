"""Randomness and best-effort erasure of secrets."""

from __future__ import annotations

import os

__all__ = ["random_bytes", "wipe"]


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG."""
    return os.urandom(n)


def wipe(buffer: bytearray | memoryview | None) -> None:
    """Overwrite a mutable buffer with zeros (best effort: Python may hold copies)."""
    if buffer is None:
        return
    view = memoryview(buffer).cast("B")
    view[:] = bytes(len(view))
