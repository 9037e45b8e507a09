"""Who you are to the KeyService: ``identity new`` and ``register``.

::

    sealedml identity new --out FILE
    sealedml register --keyservice URL --identity FILE [KeyService trust flags]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sealedml.cli._args import Subcommands, add_command, add_group, add_identity, add_keyservice, keyservice_client

__all__ = ["add_parser", "handle_identity_new", "handle_register"]


def handle_identity_new(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``identity new``: generate an identity and save it to ``--out``.

    Raises:
        ConfigurationError: the file exists (it is never overwritten).
    """
    from sealedml.client.identity import Identity

    identity = Identity.generate()
    identity.save(args.out)
    return {"principal_id": identity.principal_id, "identity": str(args.out)}


def handle_register(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``register``: register ``--identity`` with the (attested) KeyService.

    Raises:
        ConfigurationError: unreadable identity or bad trust options.
        ServiceUnavailable: the KeyService is unreachable.
    """
    with keyservice_client(args) as ks:
        principal = ks.register()
        return {"principal_id": principal, "keyservice": ks.url, "keyservice_measurement": ks.attest().measurement}


def add_parser(subparsers: Subcommands) -> None:
    """Register ``identity new`` and ``register`` on ``subparsers``."""
    ident = add_group(subparsers, "identity", "identity commands")
    p = add_command(ident, "new", handle_identity_new, "create a new identity file (Ed25519 key + request-key seed)")
    p.add_argument(
        "--out", required=True, type=Path, help="where to write the identity file (mode 0600; never overwritten)"
    )

    p = add_command(subparsers, "register", handle_register, "register an identity with the KeyService")
    add_keyservice(p)
    add_identity(p)
