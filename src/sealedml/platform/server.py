"""Serve the gateway with the embedded local platform (``sealedml platform serve``)."""

from __future__ import annotations

from pathlib import Path

from sealedml.platform.local import LocalPlatform, PoolConfig
from sealedml.platform.process import InstanceSpec

__all__ = ["serve"]


def serve(keyservice: str, store: Path, host: str, port: int, *, concurrency: int = 2, max_instances: int = 2,
          keep_alive: float = 60.0, tee: str = "simulated", unsafe_plaintext_dir: Path | None = None) -> None:
    """Run the gateway until interrupted."""
    from sealedml._internal.serve import serve_app
    from sealedml.platform.app import create_app

    spec = InstanceSpec(keyservice=keyservice, store=store.resolve(), concurrency=concurrency, tee=tee,
                        unsafe_plaintext_dir=unsafe_plaintext_dir)
    platform = LocalPlatform(spec, PoolConfig(max_instances=max_instances, keep_alive=keep_alive))
    serve_app(create_app(platform), host, port, announce={"service": "platform"})
