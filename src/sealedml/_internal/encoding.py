"""Canonical byte encodings for signed and authenticated data.

Signed or encrypted headers use one explicit encoding, kept apart from the
pydantic wire models: length-prefixed fields for AAD and signature inputs, and
canonical JSON (sorted keys, no whitespace, ASCII) for structured headers.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

__all__ = ["b64d", "b64e", "canonical_json", "fields", "loads_json"]


def fields(label: bytes, *parts: bytes | str | int) -> bytes:
    """``label ‖ (len ‖ part)*`` with 4-byte big-endian lengths; ints as 8-byte big-endian."""
    out = bytearray(label)
    for part in parts:
        if isinstance(part, int):
            raw = part.to_bytes(8, "big", signed=True)
        elif isinstance(part, str):
            raw = part.encode("utf-8")
        else:
            raw = bytes(part)
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} not allowed")


def loads_json(data: bytes | str) -> Any:
    """``json.loads`` for untrusted input: only ``ValueError`` escapes.

    Deeply nested documents (``RecursionError``), ``NaN``/``Infinity`` and
    undecodable bytes are all reported as ``ValueError``.
    """
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise ValueError("JSON is not UTF-8") from exc


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes for hashing and signing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def b64e(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    """Strict base64 decoding.

    Raises:
        ValueError: not valid base64.
    """
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("invalid base64") from exc
