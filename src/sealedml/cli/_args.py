"""Flags and helpers shared by several command groups of the ``sealedml`` command line.

Parser side (``add_*``): how a command is registered, and the flag groups several commands take
(KeyService URL and trust, identity, TEE, transport, memory budget). Handler side: the checked
values those flags turn into (a KeyService client, the trust a runtime gets, the spill directory).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from sealedml._internal.units import parse_size
from sealedml.cli._common import Handler, add_json_flag
from sealedml.cli._config import require_configured
from sealedml.errors import ConfigurationError

if TYPE_CHECKING:
    from sealedml.attestation.trust import KeyServiceTrust
    from sealedml.client.keyservice import KeyServiceClient

__all__ = [
    "DEFAULT_HOST",
    "TEE_TYPES",
    "Subcommands",
    "add_budget",
    "add_command",
    "add_group",
    "add_identity",
    "add_keyservice",
    "add_keyservice_trust",
    "add_tee",
    "add_tls",
    "keyservice_client",
    "keyservice_trust",
    "keyservice_trust_args",
    "measurement_hex",
    "memory_budget",
    "runtime_measurement",
    "spill_dir",
    "warm_first_segment",
]

DEFAULT_HOST = "127.0.0.1"
#: TEE types a runtime measurement can belong to.
TEE_TYPES = ("simulated", "sgx", "tdx", "sev-snp")

#: What ``ArgumentParser.add_subparsers()`` returns: where the commands of one level are added.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# ---------------------------------------------------------------------- registering commands
def add_command(parent: Subcommands, name: str, func: Handler, help_text: str) -> argparse.ArgumentParser:
    """Register a leaf command: its help is also its description, it has ``--json``, and runs ``func``.

    Args:
        parent: the level to add it to (the top level, or a group from :func:`add_group`).
        name: the command's word.
        func: its handler (parsed arguments in, JSON-able dict out).
        help_text: one line, shown in the parent's list and atop the command's ``--help``.

    Returns:
        The command's parser, for its own flags.
    """
    parser = parent.add_parser(name, help=help_text, description=help_text)
    add_json_flag(parser)
    parser.set_defaults(func=func)
    return parser


def add_group(parent: Subcommands, name: str, help_text: str) -> Subcommands:
    """The subcommands of group ``name`` (``sealedml NAME SUB``), created on the first call.

    A later call with the same ``name`` returns the same group, so one group (``keyservice``)
    can take commands from several modules; the first call's ``help_text`` is kept.

    Args:
        parent: the level the group belongs to.
        name: the group's word.
        help_text: one line, shown in the parent's list.

    Returns:
        Where to add the group's commands.
    """
    group = parent.choices.get(name)
    if group is None:
        return parent.add_parser(name, help=help_text).add_subparsers(dest="sub", required=True)
    for action in group._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError(f"`{name}` is already a command, not a group")  # a bug in the parser's construction


# ---------------------------------------------------------------------- shared flags
def add_keyservice(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--keyservice URL`` and the flags saying which KeyService to trust (:func:`add_keyservice_trust`)."""
    parser.add_argument(
        "--keyservice", default=None, metavar="URL", help="KeyService base URL (default: $SEALEDML_KEYSERVICE)"
    )
    if required:
        require_configured(parser, "keyservice")
    add_keyservice_trust(parser)


def add_keyservice_trust(parser: argparse.ArgumentParser) -> None:
    """The flags that say which KeyService to trust (for a runtime: part of its measurement)."""
    parser.add_argument(
        "--keyservice-measurement",
        metavar="HEX",
        help="pin the expected KeyService measurement (default: this build's, simulated TEE)",
    )
    real = parser.add_argument_group("KeyService in a real TEE")
    real.add_argument(
        "--keyservice-policy",
        type=Path,
        metavar="FILE",
        help="attestation policy document the KeyService must satisfy (docs/attestation.md)",
    )
    real.add_argument("--collateral", type=Path, metavar="FILE", help="Intel collateral JSON (SGX/TDX, offline)")
    real.add_argument("--pccs-url", metavar="URL", help="PCCS to fetch Intel collateral from")
    real.add_argument("--vcek", type=Path, metavar="FILE", help="SEV-SNP VCEK certificate")


def add_identity(parser: argparse.ArgumentParser) -> None:
    """``--identity FILE`` (needed: the flag, ``$SEALEDML_IDENTITY`` or the config file): who is acting."""
    parser.add_argument(
        "--identity", type=Path, default=None, metavar="FILE", help="identity file (default: $SEALEDML_IDENTITY)"
    )
    require_configured(parser, "identity")


def add_budget(parser: argparse.ArgumentParser) -> None:
    """``--memory-budget SIZE``, ``--spill-dir DIR`` and ``--no-warm-first-segment`` (read back with
    :func:`memory_budget`, :func:`spill_dir`, :func:`warm_first_segment`)."""
    parser.add_argument(
        "--memory-budget",
        metavar="SIZE",
        default=None,
        help="run models memory-bounded within SIZE per request (e.g. 32MB): weights stay sealed "
        "and are decrypted segment by segment (docs/memory-bounded.md)",
    )
    parser.add_argument(
        "--spill-dir",
        metavar="DIR",
        type=Path,
        default=None,
        help="with --memory-budget: keep the re-encrypted weights (the spill) in an anonymous file "
        "in DIR instead of process memory; for a TEE whose process memory is the scarce, protected "
        "kind (SGX). Default: process memory",
    )
    parser.add_argument(
        "--no-warm-first-segment",
        action="store_true",
        help="with --memory-budget: keep only zeros in the weight arena between requests instead of "
        "decrypting the next request's first segment ahead (docs/memory-bounded.md; costs ResNet-50 "
        "at 32 MB ~1.4-2.3 ms per request)",
    )


def add_tls(parser: argparse.ArgumentParser, what: str) -> None:
    """``--tls none|ra``; ``what`` names whose evidence the RA-TLS certificate carries."""
    parser.add_argument(
        "--tls",
        default="none",
        choices=["none", "ra"],
        help=f"transport: plain HTTP, or HTTPS with an RA-TLS certificate carrying {what}'s evidence",
    )


def add_tee(parser: argparse.ArgumentParser) -> None:
    """``--tee auto|simulated|gramine|tsm``: the TEE this process runs in."""
    parser.add_argument(
        "--tee",
        default="auto",
        choices=["auto", "simulated", "gramine", "tsm"],
        help="TEE this process runs in; auto = Gramine or configfs-tsm if present, "
        "else simulated (no hardware protection)",
    )


def measurement_hex(value: str) -> str:
    """Argument type of ``--measurement``: ``HEX`` or ``TEE:HEX`` (a runtime measurement, optionally with its TEE).

    Args:
        value: as typed; case and surrounding spaces do not matter.

    Returns:
        The value in lower case.

    Raises:
        argparse.ArgumentTypeError: an unknown TEE type, or not 64 or 96 hex characters.
    """
    tee, sep, digits = value.strip().lower().rpartition(":")
    if sep and tee not in TEE_TYPES:
        raise argparse.ArgumentTypeError(f"unknown TEE type {tee!r}: use one of {', '.join(TEE_TYPES)}")
    if len(digits) not in (64, 96) or any(c not in "0123456789abcdef" for c in digits):
        raise argparse.ArgumentTypeError("measurement must be [TEE:]HEX with 64 or 96 hex characters")
    return f"{tee}:{digits}" if sep else digits


# ---------------------------------------------------------------------- reading the shared flags
def memory_budget(args: argparse.Namespace) -> int | None:
    """``--memory-budget`` in bytes, or None when not given.

    Raises:
        ConfigurationError: not a size (see :func:`sealedml._internal.units.parse_size`).
    """
    text: str | None = args.memory_budget
    return None if text is None else parse_size(text)


def warm_first_segment(args: argparse.Namespace) -> bool:
    """Whether memory-bounded models decrypt the next request's first segment ahead (not
    ``--no-warm-first-segment``).

    Raises:
        ConfigurationError: ``--no-warm-first-segment`` without a memory budget.
    """
    if args.no_warm_first_segment and args.memory_budget is None:
        raise ConfigurationError("--no-warm-first-segment needs --memory-budget")
    return not args.no_warm_first_segment


def spill_dir(args: argparse.Namespace) -> str | None:
    """``--spill-dir`` checked: an existing, writable directory, and only with ``--memory-budget``.

    Returns:
        The directory's absolute path, or None when not given.

    Raises:
        ConfigurationError: given without a memory budget, not a directory, or not writable.
    """
    directory: Path | None = args.spill_dir
    if directory is None:
        return None
    if not memory_budget(args):
        raise ConfigurationError("--spill-dir needs --memory-budget (only memory-bounded models spill)")
    if not directory.is_dir():
        raise ConfigurationError(f"--spill-dir {directory}: not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigurationError(f"--spill-dir {directory}: not writable")
    return str(directory.resolve())


def keyservice_trust(args: argparse.Namespace) -> KeyServiceTrust:
    """The KeyService trust the flags of :func:`add_keyservice_trust` describe.

    Raises:
        ConfigurationError: contradictory or unreadable trust options.
    """
    from sealedml.attestation.trust import trust_from_options

    return trust_from_options(**keyservice_trust_options(args))


def keyservice_trust_options(args: argparse.Namespace) -> dict[str, Any]:
    """The trust flags as keyword arguments of ``trust_from_options`` (paths made absolute)."""

    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(path).resolve()

    pinned = args.keyservice_measurement
    if pinned is not None and not re.fullmatch(r"(?:[0-9a-fA-F]{64}|[0-9a-fA-F]{96})", pinned.strip()):
        raise ConfigurationError(
            f"--keyservice-measurement must be 64 or 96 hex digits, not {pinned[:20]!r} "
            "(print it with `sealedml measurement --role keyservice`)"
        )
    return {
        "measurement": pinned,
        "policy_file": absolute(args.keyservice_policy),
        "collateral": absolute(args.collateral),
        "pccs_url": args.pccs_url,
        "vcek": absolute(args.vcek),
    }


def keyservice_trust_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The trust flags as they are passed on to runtime instances (paths made absolute)."""
    from sealedml.attestation.trust import trust_option_flags

    return trust_option_flags(keyservice_trust_options(args))


def keyservice_client(args: argparse.Namespace) -> KeyServiceClient:
    """A client of ``--keyservice`` acting as ``--identity``, trusting what the trust flags say.

    Raises:
        ConfigurationError: the identity file cannot be read, or bad trust options.
    """
    from sealedml._internal.http import check_url
    from sealedml.client.identity import Identity
    from sealedml.client.keyservice import KeyServiceClient

    url = check_url(args.keyservice, "the KeyService URL (--keyservice)")  # before anything else is read
    return KeyServiceClient(url, Identity.load(args.identity), trust=keyservice_trust(args))


def runtime_measurement() -> str:
    """This build's runtime measurement in a simulated TEE (trusting this build's KeyService)."""
    from sealedml.attestation.measurement import measurement_for

    return measurement_for("runtime", {"tee": "simulated"})
