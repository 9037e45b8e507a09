"""Serve the gateway with the embedded local platform (``sealedml platform serve``)."""

from __future__ import annotations

from pathlib import Path

from sealedml.platform.executor_process import ExecutorSupervisor
from sealedml.platform.local import LocalPlatform
from sealedml.platform.pool import PoolConfig
from sealedml.platform.process import InstanceSpec

__all__ = ["serve"]


def serve(
    keyservice: str,
    store: Path,
    host: str,
    port: int,
    *,
    config: PoolConfig,
    policy: str = "sealedml",
    warm_pool: int = 0,
    from_template: bool = True,
    tee: str = "simulated",
    unsafe_plaintext_dir: Path | None = None,
    tls: str = "none",
    memory_budget: str | None = None,
    spill_dir: str | None = None,
    warm_first_segment: bool = True,
    worker_args: tuple[str, ...] = (),
    executor: str = "none",
    max_request: int | None = None,
) -> None:
    """Run the gateway until interrupted.

    ``worker_args`` go to every ``sealedml worker serve`` it starts (the
    ``--keyservice-*`` trust flags: which KeyService the instances accept).
    ``from_template``: fork instances from a pre-imported template (see
    :mod:`sealedml.platform.template`) rather than spawn each afresh.
    ``executor``: ``none``; ``local`` (start and supervise an executor for the
    middles of partitioned models); or the URL of one running elsewhere.
    """
    from sealedml._internal.limits import max_request as default_limit
    from sealedml._internal.serve import serve_app
    from sealedml.platform.app import create_app

    limit = max_request or default_limit()
    worker_args = (*worker_args, "--max-request", str(limit))  # its instances accept what it accepts
    supervisor = ExecutorSupervisor(store.resolve()) if executor == "local" else None
    if supervisor is not None:
        worker_args = (*worker_args, "--executor", supervisor.url)
    elif executor != "none":
        worker_args = (*worker_args, "--executor", executor)

    spec = InstanceSpec(
        keyservice=keyservice,
        store=store.resolve(),
        concurrency=config.concurrency,
        memory_mb=config.memory_mb,
        tee=tee,
        unsafe_plaintext_dir=unsafe_plaintext_dir,
        tls=tls,
        memory_budget=memory_budget,
        spill_dir=spill_dir,
        warm_first_segment=warm_first_segment,
        extra_args=worker_args,
        from_template=from_template,
    )
    platform = LocalPlatform(spec, config, policy=policy, warm_pool=warm_pool, executor=supervisor)
    serve_app(create_app(platform, max_body=limit), host, port, announce={"service": "platform", "policy": policy})
