"""Assemble and serve one runtime instance (``sealedml worker serve``)."""

from __future__ import annotations

from pathlib import Path

from sealedml.attestation.base import Attester
from sealedml.attestation.tee import build_attester as _build_attester
from sealedml.errors import ConfigurationError
from sealedml.runtime.release import ReleaseClient
from sealedml.runtime.worker import Worker, WorkerConfig
from sealedml.storage.modelstore import LocalModelStore

__all__ = ["build_attester", "build_worker", "serve"]


def build_attester(tee: str) -> Attester:
    """The runtime's attester for ``tee`` (``simulated``, ``gramine``, ``tsm`` or ``auto``)."""
    return _build_attester(tee, role="runtime")


def build_worker(
    keyservice: str,
    store: Path,
    *,
    concurrency: int = 2,
    tee: str = "simulated",
    model_cache_bytes: int = 1 << 30,
    memory_budget: int | None = None,
    spill_dir: str | None = None,
) -> Worker:
    """A worker reading sealed models from ``store`` and keys from ``keyservice``."""
    if concurrency < 1:
        raise ConfigurationError("concurrency must be ≥ 1")
    attester = build_attester(tee)
    return Worker(
        attester,
        ReleaseClient(keyservice, attester),
        LocalModelStore(store),
        WorkerConfig(
            concurrency=concurrency,
            model_cache_bytes=model_cache_bytes,
            memory_budget=memory_budget,
            spill_dir=spill_dir,
        ),
    )


def serve(
    keyservice: str,
    store: Path,
    host: str,
    port: int,
    *,
    concurrency: int = 2,
    tee: str = "simulated",
    model_cache_bytes: int = 1 << 30,
    unsafe_plaintext_dir: Path | None = None,
    tls: str = "none",
    memory_budget: int | None = None,
    spill_dir: str | None = None,
) -> None:
    """Run one runtime instance until interrupted (``tls="ra"``: HTTPS with an RA-TLS certificate)."""
    from sealedml._internal.serve import serve_app
    from sealedml.keyservice.server import ratls_pair
    from sealedml.runtime.app import create_app

    worker = build_worker(
        keyservice,
        store,
        concurrency=concurrency,
        tee=tee,
        model_cache_bytes=model_cache_bytes,
        memory_budget=memory_budget,
        spill_dir=spill_dir,
    )
    app = create_app(worker, unsafe_plaintext_dir=unsafe_plaintext_dir)
    serve_app(
        app,
        host,
        port,
        announce={"service": "worker", "measurement": worker.measurement},
        tls=ratls_pair(worker.attester, tls),
    )
