"""The audit chain's head and link hash (shared by the stores and the row checks)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sealedml._internal.encoding import canonical_json

__all__ = ["GENESIS", "AuditHead", "chain_hash"]

#: The ``prev_hash`` of the first record.
GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditHead:
    """The head of the audit chain: how many records, and the last record's hash."""

    records: int
    head: str


def chain_hash(prev_hash: str, seq: int, timestamp: float, event: Mapping[str, Any]) -> str:
    """``SHA-256(prev_hash ‖ canonical(seq, timestamp, event))``."""
    body = canonical_json({"seq": seq, "ts": timestamp, "event": dict(event)})
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()
