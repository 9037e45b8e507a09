"""Shared fixtures: the real attestation vectors in ``../shared/vectors/attestation``."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealedml.attestation.base import Claims, Evidence, TeeType
from sealedml.attestation.dcap import SgxDcapVerifier

from ._support import SGX_TIME, VECTORS


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.skip(f"attestation vectors not found at {VECTORS.resolve()}")
    return VECTORS.resolve()


@pytest.fixture(scope="session")
def sgx_vector_claims(vectors: Path) -> Claims:
    """The verified claims of the real SGX DCAP quote (at :data:`SGX_TIME`, in its collateral window)."""
    quote = (vectors / "sgx-dcap" / "quote.bin").read_bytes()
    return SgxDcapVerifier(vectors / "sgx-dcap" / "collateral.json").verify(Evidence(TeeType.SGX, quote), now=SGX_TIME)
