"""Assemble a KeyService from a data directory and a TEE choice, and serve it."""

from __future__ import annotations

import logging
from pathlib import Path

from sealedml.attestation.base import TeeType
from sealedml.attestation.policy import Policy
from sealedml.attestation.tee import (
    VerifierOptions,
    build_attester,
    build_sealer,
    build_verifiers,
    ratls_identity,
    resolve_tee,
)
from sealedml.errors import ConfigurationError
from sealedml.keyservice.postgres_store import PostgresKeyStore, is_postgres_url
from sealedml.keyservice.recovery import META_KEY as RECOVERY_META
from sealedml.keyservice.recovery import RecoveryPolicy, split_master_key
from sealedml.keyservice.service import MASTER_FILE, KeyService, check_tee_mix, load_master_key
from sealedml.keyservice.store import KeyStore, SQLiteKeyStore

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
    store: str | None = None,
    join: str | None = None,
    recovery: RecoveryPolicy | None = None,
) -> KeyService:
    """Open (or initialise) the KeyService state in ``data_dir`` (and ``store``, if given).

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
        store: a PostgreSQL URL to keep the state in (default: SQLite in ``data_dir``); the
            sealed master key stays in ``data_dir``.
        join: the URL of a running KeyService on the same ``store`` to receive the master key
            from (a new replica; ``keyservice/replicas.py``). Needs a ``store``.
        recovery: holders of k-of-n recovery shares of the master key, made once and kept in
            the store (``keyservice/recovery.py``).

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
    attester = build_attester(kind, role="keyservice")  # a simulated one warns, once per process
    sealer = build_sealer(kind, attester)
    if join is not None:
        if store is None:
            raise ConfigurationError("--join needs --store: replicas share one PostgreSQL store")
        if not (data_dir / MASTER_FILE).exists():
            from sealedml.attestation.trust import default_trust
            from sealedml.client.keyservice import KeyServiceClient
            from sealedml.keyservice.replicas import join_master_key

            # Mutual: this instance accepts only a KeyService of its own build (its measurement).
            with KeyServiceClient(join, trust=default_trust(attester.measurement)) as existing:
                join_master_key(existing, attester, sealer, data_dir)
    master = load_master_key(data_dir, sealer)
    key_store: KeyStore
    if store is None:
        key_store = SQLiteKeyStore(data_dir / "keyservice.sqlite3", anchor=master.audit_anchor(), rows=master.row_key())
    elif is_postgres_url(store):
        key_store = PostgresKeyStore(store, anchor=master.audit_anchor(), rows=master.row_key())
    else:
        raise ConfigurationError(f"--store: expected a postgresql:// URL, got {store.split(':')[0]}:…")
    service = KeyService(
        key_store,
        master,
        attester,
        build_verifiers(options),
        lease_ttl=lease_ttl,
        policy=policy,
        unsafe_allow_simulated=unsafe_allow_simulated,
    )
    if recovery is not None and key_store.meta(RECOVERY_META) is None:
        shares = split_master_key(master.export_for_replica(), recovery, service.service_id)
        key_store.set_meta_once(RECOVERY_META, shares.model_dump_json())
        log.info(
            "recovery shares made: %d of %d holders rebuild the master key", recovery.threshold, len(shares.shares)
        )
    return service


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
    store: str | None = None,
    join: str | None = None,
    replica_measurements: frozenset[str] = frozenset(),
    recovery: RecoveryPolicy | None = None,
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
        store=store,
        join=join,
        recovery=recovery,
    )
    serve_app(
        create_app(service, replica_measurements=replica_measurements),
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
