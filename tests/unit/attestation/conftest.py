"""Shared fixtures: the real attestation vectors in ``../shared/vectors/attestation``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._support import VECTORS


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(f"attestation vectors not found at {VECTORS.resolve()}")
    return VECTORS.resolve()
