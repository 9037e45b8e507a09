"""The ``sealedml`` command line (DESIGN §"Public command line").

Every command takes ``--json``, exits 0 on success and non-zero with a
one-line reason on error.

One module per command group, each with its handlers and its flags and an
``add_parser(subparsers)`` that registers them: :mod:`~sealedml.cli.serve`
(``up`` and the ``serve`` commands), :mod:`~sealedml.cli.identity`
(``identity new``, ``register``), :mod:`~sealedml.cli.model`,
:mod:`~sealedml.cli.infer`, :mod:`~sealedml.cli.bench`,
:mod:`~sealedml.cli.attest`, and one module per small command
(:mod:`~sealedml.cli.demo`, :mod:`~sealedml.cli.audit` for ``keyservice
audit-head``, :mod:`~sealedml.cli.measurement`, :mod:`~sealedml.cli.zoo`).
Flags several groups share are in :mod:`sealedml.cli._args`; output and
errors in :mod:`sealedml.cli._common`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sealedml import __version__
from sealedml.cli import (
    attest,
    audit,
    bench,
    demo,
    identity,
    infer,
    measurement,
    model,
    partition,
    recovery,
    seco,
    serve,
    session,
    zoo,
)
from sealedml.cli._common import run_handler

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="sealedml",
        description="Confidential, serverless ML inference: sealed models, attested runtimes, encrypted requests.",
    )
    parser.add_argument("--version", action="version", version=f"sealedml {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="log level on stderr (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # In the order of `sealedml --help`.
    for group in (
        demo,
        serve,
        audit,
        identity,
        model,
        infer,
        measurement,
        zoo,
        partition,
        seco,
        bench,
        attest,
        session,  # `session …` and `run`
        recovery,  # into the `identity` and `keyservice` groups
    ):
        group.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sealedml`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from sealedml._internal.serve import configure_logging

    # SEALEDML_LOG_LEVEL reaches processes started for us (workers spawned by the platform).
    configure_logging(os.environ.get("SEALEDML_LOG_LEVEL", args.log_level))
    logging.captureWarnings(True)
    handler = getattr(args, "func", None)
    if handler is None:  # pragma: no cover - argparse enforces a subcommand
        parser.print_help()
        return 2
    return run_handler(handler, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
