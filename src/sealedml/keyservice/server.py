"""Assemble a KeyService from a data directory and a TEE choice, and serve it."""

from __future__ import annotations

import logging
from pathlib import Path

from sealedml.attestation.base import TeeType
from sealedml.attestation.policy import Policy
from sealedml.attestation.simulated import SIMULATED_WARNING
from sealedml.attestation.tee import (
    VerifierOptions,
    build_attester,
    build_sealer,
    build_verifiers,
    ratls_identity,
    resolve_tee,
)
from sealedml.errors import ConfigurationError
from sealedml.keyservice.service import KeyService, check_tee_mix, load_master_key
from sealedml.keyservice.store import SQLiteKeyStore

__all__ = ["build_keyservice", "serve"]

log = logging.getLogger(__name__)


def build_keyservice(
    data_dir: Path,
    *,
    tee: str = "simulated",
    lease_ttl: int = 60,
    verifiers: VerifierOptions | None = None,
    policy: Policy | None = None,
    unsafe_allow_simulated: bool = False,
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
        unsafe_allow_simulated: accept simulated evidence beside hardware TEEs
            (refused otherwise; development only).

    Raises:
        ConfigurationError: unknown TEE or verifier options, or simulated beside
            hardware TEEs without ``unsafe_allow_simulated``.
        StoreError: the data directory belongs to another build or platform, or
            its audit log was truncated or rolled back.
    """
    kind = resolve_tee(tee)
    options = verifiers or VerifierOptions(accept=("simulated",) if kind == "simulated" else ())
    try:
        accepted = [TeeType(name) for name in options.accept]
    except ValueError as exc:
        raise ConfigurationError(f"unknown TEE type in --accept: {exc}") from exc
    check_tee_mix(accepted, unsafe_allow_simulated=unsafe_allow_simulated)  # before touching any state
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    attester = build_attester(kind, role="keyservice")
    if kind == "simulated":
        log.warning("KeyService: %s", SIMULATED_WARNING)
    master = load_master_key(data_dir, build_sealer(kind, attester))
    store = SQLiteKeyStore(data_dir / "keyservice.sqlite3", anchor=master.audit_anchor())
    return KeyService(
        store,
        master,
        attester,
        build_verifiers(options),
        lease_ttl=lease_ttl,
        policy=policy,
        unsafe_allow_simulated=unsafe_allow_simulated,
    )


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
    unsafe_allow_simulated: bool = False,
) -> None:
    """Run the KeyService until interrupted (``tls="ra"``: HTTPS with an RA-TLS certificate)."""
    from sealedml._internal.serve import serve_app
    from sealedml.keyservice.app import create_app

    service = build_keyservice(
        data_dir,
        tee=tee,
        lease_ttl=lease_ttl,
        verifiers=verifiers,
        policy=policy,
        unsafe_allow_simulated=unsafe_allow_simulated,
    )
    serve_app(
        create_app(service),
        host,
        port,
        tls=ratls_identity(service.attester, tls),
        announce={
            "service": "keyservice",
            "measurement": service.attester.measurement,
            "accepts": sorted(t.value for t in service.verifiers),
            "kem": service.kem.name,
            "unsafe_allow_simulated": service.unsafe_allow_simulated,
        },
    )
