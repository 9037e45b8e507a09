"""Randomness from the operating system."""

from __future__ import annotations

import os

__all__ = ["random_bytes"]


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG."""
    return os.urandom(n)
