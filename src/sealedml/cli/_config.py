"""Client options from the environment or a config file, when the command line does not give them.

``--keyservice``, ``--gateway`` and ``--identity`` fall back to ``SEALEDML_KEYSERVICE``,
``SEALEDML_GATEWAY`` and ``SEALEDML_IDENTITY``, then to the TOML file named by
``SEALEDML_CONFIG`` (keys ``keyservice``, ``gateway``, ``identity``). A flag overrides
both. Nothing is read from the home directory unless ``SEALEDML_CONFIG`` points there.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path

from sealedml.errors import ConfigurationError

__all__ = ["ENVIRONMENT", "configured", "require_configured", "resolve_configured"]

#: The options that may be configured, and their environment variables.
ENVIRONMENT = {"keyservice": "SEALEDML_KEYSERVICE", "gateway": "SEALEDML_GATEWAY", "identity": "SEALEDML_IDENTITY"}
_FILE_VARIABLE = "SEALEDML_CONFIG"


def _from_file(option: str) -> str | None:
    name = os.environ.get(_FILE_VARIABLE)
    if not name:
        return None
    path = Path(name).expanduser()
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigurationError(f"{_FILE_VARIABLE}={path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{_FILE_VARIABLE}={path} is not TOML: {exc}") from exc
    unknown = sorted(set(document) - set(ENVIRONMENT))
    if unknown:
        raise ConfigurationError(f"{path}: unknown keys {', '.join(unknown)} (known: {', '.join(ENVIRONMENT)})")
    value = document.get(option)
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{path}: {option} must be a string")
    return value


def configured(option: str) -> str | None:
    """The environment's value of ``option``, else the config file's, else None.

    Raises:
        ConfigurationError: an unreadable or malformed config file.
    """
    return os.environ.get(ENVIRONMENT[option]) or _from_file(option)


def require_configured(parser: argparse.ArgumentParser, option: str) -> None:
    """Mark ``option`` (a flag defaulting to None) as needed: :func:`resolve_configured` fills or refuses it."""
    needed = parser.get_default("_configured") or ()
    parser.set_defaults(_configured=(*needed, option))


def resolve_configured(args: argparse.Namespace) -> None:
    """Fill each needed option the command line left out from the environment or the config file.

    Raises:
        ConfigurationError: a needed option given nowhere (the message names the flag and the variable).
    """
    for option in getattr(args, "_configured", ()) or ():
        if getattr(args, option, None) is not None:
            continue
        value = configured(option)
        if value is None:
            raise ConfigurationError(f"give --{option} or set {ENVIRONMENT[option]} (or {_FILE_VARIABLE}=FILE)")
        setattr(args, option, Path(value) if option == "identity" else value)
