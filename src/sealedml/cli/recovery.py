"""Recovery of the KeyService's master key from holders' shares: ``keyservice recover``,
``keyservice recovery-share`` and ``identity recovery-key``.

::

    sealedml identity recovery-key --identity FILE
    sealedml keyservice recover --data-dir DIR [--store postgresql://…] [--host H] [--port P] [--tee T]
    sealedml keyservice recovery-share --keyservice URL --identity FILE [KeyService trust flags]

A KeyService makes the shares when started with ``--recovery-holders FILE``; docs/deployment.md
walks through a recovery.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sealedml.cli._args import (
    DEFAULT_HOST,
    Subcommands,
    add_command,
    add_group,
    add_identity,
    add_keyservice,
    add_tee,
    keyservice_client,
)

__all__ = ["add_parser", "handle_identity_recovery_key", "handle_recover", "handle_recovery_share"]


def handle_identity_recovery_key(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``identity recovery-key``: the public key a recovery holders file lists for this identity."""
    from sealedml._internal.encoding import b64e
    from sealedml.client.identity import Identity

    identity = Identity.load(args.identity)
    return {
        "principal_id": identity.principal_id,
        "recovery_public_key": b64e(identity.recovery_key().public_key.to_bytes()),
    }


def handle_recover(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``keyservice recover``: wait for holders' shares, rebuild and seal the master key, stop.

    Raises:
        ConfigurationError: the data directory already has a master key, or the store holds no shares.
    """
    from sealedml._internal.serve import serve_app
    from sealedml.attestation.tee import build_attester, build_sealer, resolve_tee
    from sealedml.keyservice.postgres_store import PostgresKeyStore, is_postgres_url
    from sealedml.keyservice.recovering import RecoveringKeyService, create_recovery_app, stop_soon
    from sealedml.keyservice.store import KeyStore, SQLiteKeyStore

    kind = resolve_tee(args.tee)
    attester = build_attester(kind, role="keyservice")
    store: KeyStore
    if args.store is not None and is_postgres_url(args.store):
        store = PostgresKeyStore(args.store)
    else:
        store = SQLiteKeyStore(args.data_dir / "keyservice.sqlite3")
    try:
        sealer = build_sealer(kind, attester)
        service = RecoveringKeyService(args.data_dir, store, attester, sealer, on_recovered=stop_soon)
        serve_app(
            create_recovery_app(service),
            args.host,
            args.port,
            announce={"service": "keyservice-recovery", "measurement": attester.measurement, **service.status()},
        )
    finally:
        store.close()
    return {**service.status(), "recovered": service.recovered.is_set(), "data_dir": str(args.data_dir)}


def handle_recovery_share(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``keyservice recovery-share``: open this holder's share and send it to the attested
    recovering KeyService.

    Raises:
        AttestationError: the recovering KeyService does not match the trust flags.
        ProtocolError: no share for this identity, or it does not open.
    """
    from sealedml._internal.encoding import b64e, canonical_json
    from sealedml.client.identity import Identity
    from sealedml.crypto import hpke_seal
    from sealedml.keyservice.recovering import ShareMessage, share_post_message
    from sealedml.keyservice.recovery import SealedShares, open_share, reshare_info

    identity = Identity.load(args.identity)
    with keyservice_client(args) as ks:
        sealed = SealedShares.model_validate(ks.get("/v1/recovery/shares"))
        share = open_share(sealed, identity.principal_id, identity.recovery_key())
        attested = ks.attest()  # the recovering instance must match this holder's trust before it gets a share
        raw = attested.hpke_key.to_bytes()
        ciphertext = hpke_seal(attested.hpke_key, canonical_json(share), reshare_info(raw, identity.principal_id))
        signature = identity.signing_key.sign(share_post_message(raw, identity.principal_id, ciphertext))
        message = ShareMessage(
            holder=identity.principal_id,
            sealed=b64e(ciphertext),
            service_key=b64e(raw),
            public_key=b64e(identity.signing_key.public_bytes),
            signature=b64e(signature),
        )
        answer = ks.post("/v1/recovery/share", message)
    return {"holder": identity.principal_id, "measurement": attested.measurement, **answer}


def add_parser(subparsers: Subcommands) -> None:
    """Register ``identity recovery-key``, ``keyservice recover`` and ``keyservice recovery-share``."""
    ident = add_group(subparsers, "identity", "identity commands")
    p = add_command(
        ident, "recovery-key", handle_identity_recovery_key, "this identity's public key for KeyService recovery shares"
    )
    add_identity(p)

    ks = add_group(subparsers, "keyservice", "KeyService commands")
    p = add_command(ks, "recover", handle_recover, "rebuild the master key from holders' recovery shares, then stop")
    p.add_argument("--data-dir", required=True, type=Path, help="where the recovered master key is sealed")
    p.add_argument("--store", metavar="URL", help="the PostgreSQL store (default: DATA_DIR/keyservice.sqlite3)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="port (0 = any free port; the URL is printed)")
    add_tee(p)
    p = add_command(
        ks,
        "recovery-share",
        handle_recovery_share,
        "holder: send your recovery share to an attested recovering KeyService",
    )
    add_keyservice(p)
    add_identity(p)
