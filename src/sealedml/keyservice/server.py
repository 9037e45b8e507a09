"""Assemble a KeyService from a data directory and a TEE choice, and serve it."""

from __future__ import annotations

import logging
from pathlib import Path

from sealedml.attestation.base import Attester
from sealedml.attestation.policy import Policy
from sealedml.attestation.simulated import SIMULATED_WARNING
from sealedml.attestation.tee import VerifierOptions, build_attester, build_sealer, build_verifiers, resolve_tee
from sealedml.keyservice.service import KeyService, load_master_key
from sealedml.keyservice.store import SQLiteKeyStore

__all__ = ["build_keyservice", "ratls_pair", "serve"]

log = logging.getLogger(__name__)


def ratls_pair(attester: Attester, tls: str) -> tuple[bytes, bytes] | None:
    """An RA-TLS certificate and key from ``attester`` for ``--tls ra``, None for ``--tls none``."""
    if tls == "none":
        return None
    if tls != "ra":
        from sealedml.errors import ConfigurationError

        raise ConfigurationError("--tls must be none or ra")
    from sealedml.attestation.ratls import make_ratls_certificate

    return make_ratls_certificate(attester)


def build_keyservice(
    data_dir: Path,
    *,
    tee: str = "simulated",
    lease_ttl: int = 60,
    verifiers: VerifierOptions | None = None,
    policy: Policy | None = None,
) -> KeyService:
    """Open (or initialise) the KeyService state in ``data_dir``.

    Args:
        data_dir: where the sealed master key and the SQLite store live.
        tee: the TEE this KeyService runs in (``simulated``, ``gramine``, ``tsm``, ``auto``).
        lease_ttl: seconds released keys stay valid.
        verifiers: which runtime TEEs to accept (default: simulated on a simulated
            KeyService, nothing else).
        policy: the operator's attestation policy (TCB statuses, minimum SVNs,
            debug, collateral age) applied on top of owners' and users' lists.

    Raises:
        ConfigurationError: unknown TEE or verifier options.
        StoreError: the data directory belongs to another build or platform.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    kind = resolve_tee(tee)
    attester = build_attester(kind, role="keyservice")
    if kind == "simulated":
        log.warning("KeyService: %s", SIMULATED_WARNING)
    options = verifiers or VerifierOptions(accept=("simulated",) if kind == "simulated" else ())
    master = load_master_key(data_dir, build_sealer(kind, attester))
    store = SQLiteKeyStore(data_dir / "keyservice.sqlite3")
    return KeyService(store, master, attester, build_verifiers(options), lease_ttl=lease_ttl, policy=policy)


def serve(
    data_dir: Path,
    host: str,
    port: int,
    *,
    tee: str = "simulated",
    lease_ttl: int = 60,
    verifiers: VerifierOptions | None = None,
    policy: Policy | None = None,
    tls: str = "none",
) -> None:
    """Run the KeyService until interrupted (``tls="ra"``: HTTPS with an RA-TLS certificate)."""
    from sealedml._internal.serve import serve_app
    from sealedml.keyservice.app import create_app

    service = build_keyservice(data_dir, tee=tee, lease_ttl=lease_ttl, verifiers=verifiers, policy=policy)
    serve_app(
        create_app(service),
        host,
        port,
        tls=ratls_pair(service.attester, tls),
        announce={
            "service": "keyservice",
            "measurement": service.attester.measurement,
            "accepts": sorted(t.value for t in service.verifiers),
        },
    )
