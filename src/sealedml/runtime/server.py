"""Assemble and serve one runtime instance (``sealedml worker serve``).

The KeyService an instance trusts (``--keyservice-measurement`` or
``--keyservice-policy``) is part of its measured configuration; where the
instance learns the KeyService's *address* (``--keyservice``) is not, since
the platform that tells it is untrusted — the release client attests whatever
answers there.

An instance serves from an empty private working directory, created at start
and removed at exit, so nothing a model could name by a relative path is there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from sealedml.attestation.base import Attester
from sealedml.attestation.tee import build_attester as _build_attester
from sealedml.attestation.tee import ratls_identity
from sealedml.attestation.trust import KeyServiceTrust, default_trust
from sealedml.errors import ConfigurationError
from sealedml.runtime.release import ReleaseClient
from sealedml.runtime.worker import Worker, WorkerConfig
from sealedml.storage.modelstore import LocalModelStore

__all__ = ["build_attester", "build_worker", "enter_private_workdir", "serve"]


def build_attester(tee: str, trust: KeyServiceTrust | None = None) -> Attester:
    """The runtime's attester for ``tee`` (``simulated``, ``gramine``, ``tsm`` or ``auto``).

    ``trust`` (the KeyService this runtime accepts) is measured with the
    runtime's configuration; the default trust adds nothing, so a default
    runtime has ``sealedml measurement``'s measurement.
    """
    config = trust.measured_config() if trust is not None else {}
    return _build_attester(tee, role="runtime", config=config)


def enter_private_workdir() -> Path:
    """Move this process into a new, empty directory only it can use (removed at exit).

    ONNX Runtime resolves relative external-data paths against the working
    directory: whatever a model might still name that way (sealed models are
    checked for it) finds nothing there.
    """
    directory = Path(tempfile.mkdtemp(prefix="sealedml-worker-"))
    os.chmod(directory, 0o700)
    os.chdir(directory)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def build_worker(
    keyservice: str,
    store: Path,
    *,
    concurrency: int = 2,
    tee: str = "simulated",
    model_cache_bytes: int = 1 << 30,
    memory_budget: int | None = None,
    spill_dir: str | None = None,
    warm_first_segment: bool = True,
    heap_reserve: str | None = None,
    trust: KeyServiceTrust | None = None,
    executor_url: str | None = None,
) -> Worker:
    """A worker reading sealed models from ``store`` and keys from the KeyService at ``keyservice``.

    Args:
        keyservice: the KeyService's URL.
        store: the sealed-model directory.
        concurrency: requests served at once.
        tee: the TEE this instance runs in.
        model_cache_bytes: budget of decrypted models.
        memory_budget: run models memory-bounded within this many bytes.
        spill_dir: where memory-bounded models keep their re-encrypted weights.
        warm_first_segment: memory-bounded models decrypt the next request's first segment
            after each request (False: only zeros in their weight arena between requests).
        heap_reserve: ``after-loads``, ``at-start`` or ``off`` (:mod:`sealedml.runtime.heap_reserve`;
            None: ``at-start`` with a memory budget, else ``after-loads``).
        trust: the KeyService to accept (default: this build's simulated KeyService on this host).
        executor_url: the untrusted executor that runs the middles of partitioned models.
    """
    if concurrency < 1:
        raise ConfigurationError("concurrency must be ≥ 1")
    trust = trust or default_trust()
    attester = build_attester(tee, trust)
    return Worker(
        attester,
        ReleaseClient(keyservice, attester, trust=trust),
        LocalModelStore(store),
        WorkerConfig(
            concurrency=concurrency,
            model_cache_bytes=model_cache_bytes,
            memory_budget=memory_budget,
            spill_dir=spill_dir,
            warm_first_segment=warm_first_segment,
            heap_reserve=heap_reserve,
            executor_url=executor_url,
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
    warm_first_segment: bool = True,
    heap_reserve: str | None = None,
    trust: KeyServiceTrust | None = None,
    executor_url: str | None = None,
    max_request: int | None = None,
) -> None:
    """Run one runtime instance until interrupted (``tls="ra"``: HTTPS with an RA-TLS certificate;
    ``max_request``: the request-size limit, default ``max_request()``)."""
    from sealedml._internal.malloc import single_arena
    from sealedml._internal.serve import serve_app
    from sealedml.runtime.app import create_app

    # Before the worker starts its threads (a no-op in instances the template forked, or
    # started with MALLOC_ARENA_MAX=1): the heap reserve only helps within one arena.
    single_arena()
    # Paths from the command line are resolved before leaving the working directory.
    store = store.resolve()
    spill_dir = str(Path(spill_dir).resolve()) if spill_dir else None
    plain = unsafe_plaintext_dir.resolve() if unsafe_plaintext_dir is not None else None
    enter_private_workdir()
    worker = build_worker(
        keyservice,
        store,
        concurrency=concurrency,
        tee=tee,
        model_cache_bytes=model_cache_bytes,
        memory_budget=memory_budget,
        spill_dir=spill_dir,
        warm_first_segment=warm_first_segment,
        heap_reserve=heap_reserve,
        trust=trust,
        executor_url=executor_url,
    )
    from sealedml._internal.limits import max_request as default_limit

    app = create_app(worker, max_body=max_request or default_limit(), unsafe_plaintext_dir=plain)
    serve_app(
        app,
        host,
        port,
        announce={"service": "worker", "measurement": worker.measurement},
        tls=ratls_identity(worker.attester, tls),
    )
