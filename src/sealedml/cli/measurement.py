"""This build's measurements: ``measurement``.

::

    sealedml measurement [--role runtime|keyservice|program] [--program SCRIPT]
                         [--keyservice-measurement HEX | --keyservice-policy FILE]

Without ``--json`` it prints the bare hex, for ``$(sealedml measurement)``; the value is that of a
simulated TEE (a warning on stderr says so). A runtime's measurement includes the KeyService it
trusts, so the trust flags change it. A program's (``--role program``, what ``sealedml run``
attests as) also includes the SHA-256 of its script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sealedml.cli._args import Subcommands, add_command, add_keyservice_trust
from sealedml.errors import ConfigurationError

__all__ = ["add_parser", "handle_measurement"]


def handle_measurement(args: argparse.Namespace) -> dict[str, Any]:
    """Handler of ``measurement``: the simulated-TEE measurement of this build's runtime or KeyService.

    Returns:
        ``{}`` without ``--json`` (the hex is printed directly), else ``{"measurement", "role", "tee", "warning"}``.

    Raises:
        ConfigurationError: both trust flags, or trust flags with ``--role keyservice``.
    """
    from sealedml.attestation.measurement import measurement_for
    from sealedml.attestation.simulated import SIMULATED_WARNING
    from sealedml.attestation.trust import measured_trust, runtime_trust_config

    config: dict[str, Any] = {"tee": "simulated"}
    if (args.role == "program") != (args.program is not None):
        raise ConfigurationError("--role program needs --program SCRIPT, and --program needs --role program")
    if args.role in ("runtime", "program"):  # its measurement includes the KeyService it trusts
        if args.keyservice_measurement and args.keyservice_policy:
            raise ConfigurationError("give --keyservice-measurement or --keyservice-policy, not both")
        measured = measured_trust(measurement=args.keyservice_measurement, policy_file=args.keyservice_policy)
        config.update(runtime_trust_config(measured))
    elif args.keyservice_measurement or args.keyservice_policy:
        raise ConfigurationError("--keyservice-measurement/--keyservice-policy apply to --role runtime or program")
    if args.program is not None:  # a session's program: this build and the script it runs
        from sealedml.sessions.launcher import program_digest

        config["program"] = program_digest(args.program)
    value = measurement_for(args.role, config)
    if not args.json:  # bare hex, for $(sealedml measurement); the warning goes to stderr
        print(f"warning: {SIMULATED_WARNING}", file=sys.stderr)
        print(value)
        return {}
    return {"measurement": value, "role": args.role, "tee": "simulated", "warning": SIMULATED_WARNING}


def add_parser(subparsers: Subcommands) -> None:
    """Register ``measurement`` on ``subparsers``."""
    p = add_command(subparsers, "measurement", handle_measurement, "print this build's runtime measurement")
    p.add_argument(
        "--role",
        default="runtime",
        choices=["runtime", "keyservice", "program"],
        help="whose measurement: runtime (default), keyservice or program",
    )
    p.add_argument(
        "--program", type=Path, metavar="SCRIPT", help="with --role program: the script `sealedml run` will run"
    )
    add_keyservice_trust(p)
