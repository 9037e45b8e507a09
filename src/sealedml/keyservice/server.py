"""Assemble a KeyService from a data directory and a TEE choice, and serve it."""

from __future__ import annotations

import logging
from pathlib import Path

from sealedml.attestation.base import Attester, TeeType, Verifier
from sealedml.attestation.sealing import Sealer, SimulatedSealer
from sealedml.attestation.simulated import (
    SIMULATED_WARNING,
    SimulatedAttester,
    SimulatedPlatform,
    SimulatedVerifier,
)
from sealedml.errors import ConfigurationError
from sealedml.keyservice.service import KeyService, load_master_key
from sealedml.keyservice.store import SQLiteKeyStore

__all__ = ["build_keyservice", "serve"]

log = logging.getLogger(__name__)


def _tee_parts(tee: str) -> tuple[Attester, Sealer, dict[TeeType, Verifier]]:
    if tee == "simulated":
        platform = SimulatedPlatform.load()
        attester = SimulatedAttester(platform, role="keyservice")
        verifiers: dict[TeeType, Verifier] = {TeeType.SIMULATED: SimulatedVerifier([platform.public_key])}
        return attester, SimulatedSealer(platform, attester.measurement), verifiers
    raise ConfigurationError(f"TEE {tee!r} is not supported by this build yet (use --tee simulated)")


def build_keyservice(data_dir: Path, *, tee: str = "simulated", lease_ttl: int = 60) -> KeyService:
    """Open (or initialise) the KeyService state in ``data_dir``.

    Raises:
        ConfigurationError: unknown TEE.
        StoreError: the data directory belongs to another build or platform.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    attester, sealer, verifiers = _tee_parts(tee)
    if tee == "simulated":
        log.warning("KeyService: %s", SIMULATED_WARNING)
    master = load_master_key(data_dir, sealer)
    store = SQLiteKeyStore(data_dir / "keyservice.sqlite3")
    return KeyService(store, master, attester, verifiers, lease_ttl=lease_ttl)


def serve(data_dir: Path, host: str, port: int, *, tee: str = "simulated", lease_ttl: int = 60) -> None:
    """Run the KeyService until interrupted."""
    from sealedml._internal.serve import serve_app
    from sealedml.keyservice.app import create_app

    service = build_keyservice(data_dir, tee=tee, lease_ttl=lease_ttl)
    serve_app(create_app(service), host, port,
              announce={"service": "keyservice", "measurement": service.attester.measurement})
