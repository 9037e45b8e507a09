"""Access-control rows the database cannot forge, alter, move or replay.

Whoever runs the KeyService's database (a PostgreSQL operator, or the host of a SQLite file)
can change any row. Every access-control row — principals, models and their keys, allowed
runtimes, grants, consents, sessions, session secrets, volume roots — therefore carries:

* ``seq``: the number of the audit record that wrote it, and
* ``mac``: HMAC-SHA256 under a key derived from the master key, over the table, the row's
  primary key, its content and ``seq`` (:meth:`RowKey.tag`).

Every write appends an audit record naming the rows it wrote or deleted. The audit log is a
hash chain whose head is anchored under the master key, so it is the truth the tables are
checked against: :class:`RowLedger` follows the log (incrementally, from the last head it
verified) and knows, for every row, the record that wrote it last. A row is accepted only if
its MAC verifies *and* its ``seq`` is that record's — so

* an inserted or altered row fails its MAC;
* a row moved to another key fails its MAC (the key is inside it);
* an older version put back (a revoked grant, a deleted runtime restored) names an older
  record than the ledger's, or a row the ledger knows was deleted.

A deleted row reads as absent, which denies (no grant, no consent, no runtime). Not covered:
rolling the *whole* database back, audit log and anchor included, to an earlier consistent
state while no KeyService is running (a running one refuses a head that goes backwards);
clients that pin signed audit heads (``sealedml keyservice audit-head``) detect that.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sealedml._internal.encoding import canonical_json, fields
from sealedml.errors import StoreError

__all__ = ["PROTECTED_TABLES", "SELECT_ROWS", "RowKey", "RowLedger", "RowTamperedError", "row_key_text"]

#: Protected tables: their primary-key columns, then their content columns (``seq`` and ``mac`` follow).
PROTECTED_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "principals": (("id",), ("public_key", "created")),
    "models": (("id",), ("owner", "current_version")),
    "model_keys": (("model_id", "version"), ("wrapped", "partition", "signature")),
    "runtimes": (("model_id", "tee", "measurement"), ()),
    "grants": (("model_id", "user_id"), ("granted", "changed")),
    "consents": (("model_id", "user_id"), ("wrapped", "runtimes", "accept_partitioned")),
    "sessions": (("name", "revision"), ("digest", "document", "signatures", "created")),
    "session_secrets": (("session", "name"), ("wrapped",)),
    "volume_roots": (("session", "volume"), ("version", "root")),
}

#: ``SELECT <every column> FROM <table>`` of each protected table (constants: no input reaches them).
SELECT_ROWS = {
    table: f"SELECT {', '.join((*key, *content, 'seq', 'mac'))} FROM {table}"  # noqa: S608
    for table, (key, content) in PROTECTED_TABLES.items()
}


class RowTamperedError(StoreError):
    """A stored row that the KeyService did not write as it is: forged, altered, moved or replayed."""

    code = "store_tampered"


def row_key_text(key: Sequence[Any]) -> str:
    """A row's primary key as the canonical text the ledger and audit records use."""
    return json.dumps([str(k) for k in key], separators=(",", ":"))


def _plain(value: Any) -> Any:
    """A column value as canonical JSON can hold it (bytes as hex; floats as their repr)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, bool):
        return int(value)
    return value


class RowKey:
    """The HMAC key of row tags (derived from the master key; ``repr`` hides it)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise StoreError("row key must be 32 bytes")
        self._key = key

    def tag(self, table: str, key: Sequence[Any], content: Sequence[Any], seq: int) -> str:
        """HMAC-SHA256 (hex) over the table, primary key, content and writing record."""
        body = canonical_json({"key": [_plain(k) for k in key], "content": [_plain(c) for c in content]})
        message = fields(b"sealedml/v1/row", table, body, seq)
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "RowKey(…)"


class RowLedger:
    """For every protected row, the audit record that last wrote it (None: deleted), from the verified log.

    The store feeds it each verified audit record in order (:meth:`apply`); :meth:`check`
    then accepts a row only if its tag verifies and its ``seq`` is the ledger's.
    """

    def __init__(self, key: RowKey) -> None:
        self._key = key
        self._latest: dict[tuple[str, tuple[str, ...]], int | None] = {}
        self._live: dict[tuple[str, str], set[tuple[str, ...]]] = {}  # (table, first key column) → live keys
        # Rows already verified, as read: the same bytes again need no second HMAC.
        self._seen: dict[tuple[str, tuple[str, ...]], tuple[Any, ...]] = {}
        self._lock = threading.Lock()

    def apply(self, seq: int, event: Mapping[str, Any]) -> None:
        """Record the rows audit record ``seq`` wrote (``rows``: ``[table, key_text, "put"|"del"]``)."""
        rows = event.get("rows")
        if not rows:
            return
        with self._lock:
            for table, key_text, op in rows:
                key = tuple(str(k) for k in json.loads(key_text))
                self._latest[(str(table), key)] = seq if op == "put" else None
                live = self._live.setdefault((str(table), key[0]), set())
                if op == "put":
                    live.add(key)
                else:
                    live.discard(key)

    def live_keys(self, table: str, prefix: Sequence[Any]) -> list[list[str]]:
        """The keys of ``table`` the log says exist and that start with ``prefix`` (a non-empty prefix)."""
        wanted = tuple(str(p) for p in prefix)
        with self._lock:
            keys = list(self._live.get((table, wanted[0]), ()))
        return [list(k) for k in keys if k[: len(wanted)] == wanted]

    def check(self, table: str, key: Sequence[Any], content: Sequence[Any], seq: Any, mac: Any) -> None:
        """Accept a row read from the database, or raise.

        Raises:
            RowTamperedError: the tag does not verify, or the row is not the last one written there.
        """
        name = (table, tuple(str(k) for k in key))
        row = (tuple(content), seq, mac)
        with self._lock:
            latest = self._latest.get(name, -1)
            if latest == seq and self._seen.get(name) == row:
                return  # exactly the row verified before, still the latest: its tag was checked then
        where = f"{table} row {row_key_text(key)}"
        if not isinstance(seq, int) or not isinstance(mac, str):
            raise RowTamperedError(f"{where} has no integrity tag (inserted behind the KeyService's back)")
        if not hmac.compare_digest(self._key.tag(table, key, content, seq), mac):
            raise RowTamperedError(f"{where} does not match its integrity tag (altered, forged or moved)")
        if latest != seq:
            state = "deleted" if latest is None else ("never written" if latest == -1 else f"at record {latest}")
            raise RowTamperedError(f"{where} is from audit record {seq}, but the log has it {state} (replayed)")
        with self._lock:
            self._seen[name] = row

    def check_all(self, table: str, rows: Iterable[Sequence[Any]]) -> None:
        """:meth:`check` rows given as ``(*key, *content, seq, mac)`` tuples of ``table``."""
        key_columns, content_columns = PROTECTED_TABLES[table]
        k, c = len(key_columns), len(content_columns)
        for row in rows:
            self.check(table, row[:k], row[k : k + c], row[k + c], row[k + c + 1])
