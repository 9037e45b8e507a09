"""Byte sizes as people type and read them: ``32MB``, ``64MiB``, ``40.5 kB``.

One place for both directions, so flags, errors and benchmark tables agree:
``MB`` is 10^6 bytes and ``MiB`` 2^20, as on a disk's label and in ``ls -h --si``.
"""

from __future__ import annotations

import math
import re

from sealedml.errors import ConfigurationError

__all__ = ["format_bytes", "parse_size", "parse_sizes"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_KB = 1_000
_MB = 1_000_000


def parse_size(text: str) -> int:
    """Parse a byte size such as ``"32MB"`` (32 * 10^6), ``"32MiB"`` (32 * 2^20) or ``"1048576"``.

    Args:
        text: a number with an optional unit: B, kB/KB, MB, GB (powers of 10) or KiB,
            MiB, GiB (powers of 2); case-insensitive.

    Returns:
        The size in bytes (rounded down).

    Raises:
        ConfigurationError: not a size, an unknown unit, or zero.
    """
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigurationError(f"not a size: {text!r} (use e.g. 32MB or 32MiB)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigurationError(f"size must be positive: {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    """Parse a comma-separated list of sizes (``"16MB,32MB,64MB"``).

    Raises:
        ConfigurationError: any item is not a size.
    """
    return [parse_size(part) for part in text.split(",") if part.strip()]


def format_bytes(nbytes: int, *, ceil: bool = False) -> str:
    """Format a byte count in decimal units with one decimal: kilobytes below 100 kB, else megabytes.

    Args:
        nbytes: the count.
        ceil: round up instead of to nearest (for minimums, so the printed value suffices).

    Returns:
        For example ``"12.3 MB"`` or ``"40.5 kB"``.
    """
    unit, name = (_KB, "kB") if nbytes < 100 * _KB else (_MB, "MB")
    tenths = math.ceil(nbytes / (unit / 10)) if ceil else round(nbytes / (unit / 10))
    return f"{tenths / 10:.1f} {name}"
