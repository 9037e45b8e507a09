"""A 3-party threshold-BFV session on real OpenFHE side processes (``make he-venv`` creates them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sealedml.errors import ConfigurationError
from sealedml.seco.he import HeSidecar, ThresholdSession, he_python


@pytest.fixture(scope="session")
def he_interpreter() -> str:
    try:
        return str(he_python())
    except ConfigurationError as exc:  # make test creates it: its absence is a broken setup, not a skip
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def session(he_interpreter: str) -> Iterator[ThresholdSession]:
    engines = [HeSidecar.start() for _ in range(3)]
    try:
        yield ThresholdSession(engines)
    finally:
        for engine in engines:
            engine.close()
