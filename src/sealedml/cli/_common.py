"""Shared plumbing of the command line: output, errors, exit codes.

Every command prints a human-readable result by default and one JSON object
with ``--json``; it exits 0 on success and non-zero with a one-line reason on
error (``{"error": code, "message": ...}`` with ``--json``). The exit code says
what kind of error it was (:data:`EXIT_CODES`, README "Exit codes").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from sealedml.errors import (
    AccessDenied,
    AuthenticationError,
    EnvelopeError,
    Error,
    InputError,
    NotFound,
    Overloaded,
    SealedModelError,
    ServiceUnavailable,
)

__all__ = ["EXIT_CODES", "Handler", "add_json_flag", "emit", "exit_code_for", "fail", "run_handler"]

#: Exit codes by kind of error (2 is argparse's for a malformed command line, 130 an interrupt).
EXIT_CODES: dict[str, int] = {
    "error": 1,  # anything else: configuration, attestation, integrity, protocol, ...
    "usage": 2,
    "bad_input": 3,  # the inputs, the model file or the request envelope
    "denied": 4,  # access denied or not authenticated
    "not_found": 5,
    "unavailable": 6,  # a service unreachable, overloaded or failing: retrying may help
}


def exit_code_for(exc: Error) -> int:
    """The exit code of a SealedML error (:data:`EXIT_CODES`)."""
    if isinstance(exc, AccessDenied | AuthenticationError):
        return EXIT_CODES["denied"]
    if isinstance(exc, NotFound):
        return EXIT_CODES["not_found"]
    if isinstance(exc, ServiceUnavailable | Overloaded):
        return EXIT_CODES["unavailable"]
    if isinstance(exc, InputError) or (isinstance(exc, EnvelopeError) and not isinstance(exc, SealedModelError)):
        return EXIT_CODES["bad_input"]
    return EXIT_CODES["error"]


Handler = Callable[[argparse.Namespace], Mapping[str, Any]]


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Add the ``--json`` flag every command has."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _human(value: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Mapping | list) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_human(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {item}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping):
                sub = _human(item, indent + 1)
                lines.append(f"{pad}- {sub[0].strip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {item}")
    else:
        lines.append(f"{pad}{value}")
    return lines


def emit(result: Mapping[str, Any], as_json: bool) -> None:
    """Print ``result`` as JSON or as indented ``key: value`` lines."""
    if as_json:
        print(json.dumps(result, sort_keys=False, default=str))
    else:
        for line in _human(result):
            print(line)


def fail(code: str, message: str, as_json: bool, exit_code: int = 1) -> int:
    """Report an error in the chosen format; return the exit code."""
    one_line = " ".join(message.split())
    if as_json:
        print(json.dumps({"error": code, "message": one_line}))
    else:
        print(f"error: {one_line}", file=sys.stderr)
    return exit_code


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command handler; map SealedML errors to a one-line reason and exit 1."""
    from sealedml.cli._config import resolve_configured

    as_json = bool(getattr(args, "json", False))
    try:
        resolve_configured(args)  # flags the command line left out, from the environment or the config file
        result = handler(args)
    except Error as exc:
        return fail(exc.code, exc.message, as_json, exit_code_for(exc))
    except KeyboardInterrupt:
        return fail("interrupted", "interrupted", as_json, 130)
    except OSError as exc:
        return fail("os", f"{exc.strerror or exc}: {exc.filename or ''}".strip(": "), as_json)
    exit_code = int(result.get("_exit", 0)) if isinstance(result, Mapping) else 0
    if result.get("_silent"):  # the command's output is its own (``run``: the program's)
        return exit_code
    emit({k: v for k, v in result.items() if k != "_exit"}, as_json)
    return exit_code
