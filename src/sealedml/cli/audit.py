"""The KeyService's signed audit-log head: ``keyservice audit-head``.

::

    sealedml keyservice audit-head --identity FILE --keyservice URL [--at N]

Keep the printed head; later, ``--at N`` also returns the hash of record N, to compare with the
head you kept: a difference means the log was truncated or rolled back. The head's signature
(the attested KeyService's key) is checked before anything is printed.
"""

from __future__ import annotations

import argparse
from typing import Any

from sealedml.cli._args import Subcommands, add_command, add_group, add_identity, add_keyservice, keyservice_client

__all__ = ["add_parser", "handle_keyservice_audit_head"]


def handle_keyservice_audit_head(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``keyservice audit-head``: the signed head, and with ``--at N`` the hash of record N.

    Raises:
        ConfigurationError: unreadable identity or bad trust options.
        AttestationError: the head is not signed by the attested KeyService.
    """
    with keyservice_client(args) as ks:
        head = ks.audit_head(args.at)
        result: dict[str, Any] = {
            "service_id": head.service_id,
            "records": head.records,
            "head": head.head,
            "issued_at": head.issued_at,
            "signature": "verified (attested KeyService key)",
        }
        if args.at is not None:
            result.update({"at": head.at, "at_hash": head.at_hash})
        return result


def add_parser(subparsers: Subcommands) -> None:
    """Register ``keyservice audit-head`` on ``subparsers`` (in the ``keyservice`` group)."""
    ks = add_group(subparsers, "keyservice", "KeyService commands")
    p = add_command(
        ks,
        "audit-head",
        handle_keyservice_audit_head,
        "the KeyService's signed audit-log head (keep it to check later)",
    )
    p.add_argument(
        "--at",
        type=int,
        metavar="N",
        default=None,
        help="also the hash of record N: compare it with a head you kept to detect truncation or rollback",
    )
    add_identity(p)
    add_keyservice(p)
