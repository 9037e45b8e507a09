"""KeyService storage: the :class:`KeyStore` interface and its SQLite implementation.

The store holds only *wrapped* secrets (encrypted under the KeyService master
key by the service layer); it never sees a plaintext key. Every state change
and its audit record are written in one transaction, so an acknowledged call
is durable (SQLite WAL with ``synchronous=FULL``) and the audit log can never
miss a decision that took effect.
"""

from __future__ import annotations

import abc
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealedml._internal.encoding import canonical_json
from sealedml.errors import Conflict, NotFound, StoreError

__all__ = ["AuditRecord", "ConsentRecord", "KeyStore", "ModelRecord", "SQLiteKeyStore"]

GENESIS = "0" * 64


@dataclass(frozen=True)
class ModelRecord:
    """A registered model."""

    model_id: str
    owner_id: str
    current_version: int


@dataclass(frozen=True)
class ConsentRecord:
    """A user's request key (wrapped) and the runtime measurements they consented to."""

    model_id: str
    user_id: str
    wrapped_request_key: bytes
    measurements: frozenset[str]


@dataclass(frozen=True)
class AuditRecord:
    """One entry of the hash-chained audit log."""

    seq: int
    timestamp: float
    event: Mapping[str, Any]
    prev_hash: str
    hash: str


def chain_hash(prev_hash: str, seq: int, timestamp: float, event: Mapping[str, Any]) -> str:
    """``SHA-256(prev_hash ‖ canonical(seq, timestamp, event))``."""
    body = canonical_json({"seq": seq, "ts": timestamp, "event": dict(event)})
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


class KeyStore(abc.ABC):
    """Persistent KeyService state. Implementations must make each call atomic and durable."""

    # principals
    @abc.abstractmethod
    def add_principal(self, principal_id: str, public_key: bytes, audit: Mapping[str, Any]) -> bool:
        """Register; returns False if it already existed with the same key. Raises Conflict otherwise."""

    @abc.abstractmethod
    def principal_key(self, principal_id: str) -> bytes | None:
        """The principal's Ed25519 public key, or None."""

    # replay protection
    @abc.abstractmethod
    def use_nonce(self, principal_id: str, nonce: str, timestamp: int, horizon: int) -> bool:
        """Record a signed-call nonce; False if already used. Forgets nonces older than ``horizon``."""

    # models
    @abc.abstractmethod
    def model(self, model_id: str) -> ModelRecord | None:
        """The model record, or None."""

    @abc.abstractmethod
    def put_model_key(
        self, model_id: str, owner_id: str, version: int, wrapped_key: bytes, audit: Mapping[str, Any]
    ) -> None:
        """Store a model version's wrapped key; creates the model (owner = caller) if new.

        Raises:
            Conflict: the model belongs to someone else, or the version is not newer.
        """

    @abc.abstractmethod
    def wrapped_model_key(self, model_id: str, version: int) -> bytes | None:
        """The wrapped key of one model version, or None."""

    @abc.abstractmethod
    def set_runtime_allowed(self, model_id: str, measurement: str, allowed: bool, audit: Mapping[str, Any]) -> None:
        """Add or remove an allowed runtime measurement."""

    @abc.abstractmethod
    def allowed_runtimes(self, model_id: str) -> frozenset[str]:
        """Allowed runtime measurements of a model."""

    @abc.abstractmethod
    def set_grant(self, model_id: str, user_id: str, granted: bool, audit: Mapping[str, Any]) -> None:
        """Grant or revoke a user."""

    @abc.abstractmethod
    def is_granted(self, model_id: str, user_id: str) -> bool:
        """Whether the owner currently grants the user."""

    @abc.abstractmethod
    def set_consent(
        self,
        model_id: str,
        user_id: str,
        wrapped_request_key: bytes,
        measurements: Sequence[str],
        audit: Mapping[str, Any],
    ) -> None:
        """Store a user's wrapped request key and consented measurements (replaces earlier ones)."""

    @abc.abstractmethod
    def consent(self, model_id: str, user_id: str) -> ConsentRecord | None:
        """The user's consent for the model, or None."""

    # audit + metadata
    @abc.abstractmethod
    def audit(self, event: Mapping[str, Any]) -> None:
        """Append a decision that changed no state (for example a denial)."""

    @abc.abstractmethod
    def audit_records(self, since: int = 0) -> Iterator[AuditRecord]:
        """Audit records with ``seq > since`` in order."""

    @abc.abstractmethod
    def meta(self, key: str) -> str | None:
        """A metadata value."""

    @abc.abstractmethod
    def set_meta_once(self, key: str, value: str) -> str:
        """Set a metadata value if unset; return the stored value."""

    def verify_audit_chain(self) -> int:
        """Check the audit hash chain end to end; return the number of records.

        Raises:
            StoreError: the chain is broken (a record was altered, removed or reordered).
        """
        prev, count = GENESIS, 0
        for record in self.audit_records():
            if record.prev_hash != prev or chain_hash(prev, record.seq, record.timestamp, record.event) != record.hash:
                raise StoreError(f"audit chain broken at record {record.seq}")
            prev, count = record.hash, count + 1
        return count

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principals (id TEXT PRIMARY KEY, public_key BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (principal TEXT NOT NULL, nonce TEXT NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (principal, nonce));
CREATE INDEX IF NOT EXISTS nonces_ts ON nonces (ts);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, owner TEXT NOT NULL, current_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS model_keys (model_id TEXT NOT NULL, version INTEGER NOT NULL, wrapped BLOB NOT NULL,
    PRIMARY KEY (model_id, version));
CREATE TABLE IF NOT EXISTS runtimes (model_id TEXT NOT NULL, measurement TEXT NOT NULL,
    PRIMARY KEY (model_id, measurement));
CREATE TABLE IF NOT EXISTS grants (model_id TEXT NOT NULL, user_id TEXT NOT NULL, granted INTEGER NOT NULL,
    changed REAL NOT NULL, PRIMARY KEY (model_id, user_id));
CREATE TABLE IF NOT EXISTS consents (model_id TEXT NOT NULL, user_id TEXT NOT NULL, wrapped BLOB NOT NULL,
    measurements TEXT NOT NULL, PRIMARY KEY (model_id, user_id));
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, event TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""


class SQLiteKeyStore(KeyStore):
    """:class:`KeyStore` on SQLite in WAL mode with ``synchronous=FULL`` (durable commits).

    One connection guarded by a lock; callers run it from a thread pool.
    """

    def __init__(self, path: Path | str) -> None:
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open key store {path}: {exc}") from exc
        self._lock = threading.Lock()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"key store failure: {exc}") from exc

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"key store failure: {exc}") from exc

    @staticmethod
    def _append_audit(db: sqlite3.Connection, event: Mapping[str, Any]) -> None:
        row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
        ts = round(time.time(), 6)
        db.execute(
            "INSERT INTO audit (seq, ts, event, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
            (seq, ts, canonical_json(dict(event)).decode(), prev, chain_hash(prev, seq, ts, event)),
        )

    def add_principal(self, principal_id: str, public_key: bytes, audit: Mapping[str, Any]) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT public_key FROM principals WHERE id = ?", (principal_id,)).fetchone()
            if row is not None:
                if bytes(row[0]) != public_key:
                    raise Conflict("principal id already registered with another key")
                return False
            db.execute("INSERT INTO principals VALUES (?, ?, ?)", (principal_id, public_key, time.time()))
            self._append_audit(db, audit)
            return True

    def principal_key(self, principal_id: str) -> bytes | None:
        rows = self._read("SELECT public_key FROM principals WHERE id = ?", (principal_id,))
        return bytes(rows[0][0]) if rows else None

    def use_nonce(self, principal_id: str, nonce: str, timestamp: int, horizon: int) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM nonces WHERE ts < ?", (int(time.time()) - horizon,))
            try:
                db.execute("INSERT INTO nonces VALUES (?, ?, ?)", (principal_id, nonce, timestamp))
            except sqlite3.IntegrityError:
                return False
            return True

    def model(self, model_id: str) -> ModelRecord | None:
        rows = self._read("SELECT id, owner, current_version FROM models WHERE id = ?", (model_id,))
        return ModelRecord(*rows[0]) if rows else None

    def put_model_key(
        self, model_id: str, owner_id: str, version: int, wrapped_key: bytes, audit: Mapping[str, Any]
    ) -> None:
        with self._tx() as db:
            row = db.execute("SELECT owner, current_version FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                db.execute("INSERT INTO models VALUES (?, ?, ?)", (model_id, owner_id, version))
            elif row[0] != owner_id:
                raise Conflict("model belongs to another principal")
            elif version <= row[1]:
                raise Conflict(f"model version must be newer than {row[1]}")
            else:
                db.execute("UPDATE models SET current_version = ? WHERE id = ?", (version, model_id))
            db.execute("INSERT INTO model_keys VALUES (?, ?, ?)", (model_id, version, wrapped_key))
            self._append_audit(db, audit)

    def wrapped_model_key(self, model_id: str, version: int) -> bytes | None:
        rows = self._read("SELECT wrapped FROM model_keys WHERE model_id = ? AND version = ?", (model_id, version))
        return bytes(rows[0][0]) if rows else None

    def _require_model(self, db: sqlite3.Connection, model_id: str) -> None:
        if db.execute("SELECT 1 FROM models WHERE id = ?", (model_id,)).fetchone() is None:
            raise NotFound("no such model")

    def set_runtime_allowed(self, model_id: str, measurement: str, allowed: bool, audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            self._require_model(db, model_id)
            if allowed:
                db.execute("INSERT OR IGNORE INTO runtimes VALUES (?, ?)", (model_id, measurement.lower()))
            else:
                db.execute(
                    "DELETE FROM runtimes WHERE model_id = ? AND measurement = ?", (model_id, measurement.lower())
                )
            self._append_audit(db, audit)

    def allowed_runtimes(self, model_id: str) -> frozenset[str]:
        return frozenset(r[0] for r in self._read("SELECT measurement FROM runtimes WHERE model_id = ?", (model_id,)))

    def set_grant(self, model_id: str, user_id: str, granted: bool, audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            self._require_model(db, model_id)
            db.execute(
                "INSERT INTO grants VALUES (?, ?, ?, ?) ON CONFLICT (model_id, user_id) "
                "DO UPDATE SET granted = excluded.granted, changed = excluded.changed",
                (model_id, user_id, int(granted), time.time()),
            )
            self._append_audit(db, audit)

    def is_granted(self, model_id: str, user_id: str) -> bool:
        rows = self._read("SELECT granted FROM grants WHERE model_id = ? AND user_id = ?", (model_id, user_id))
        return bool(rows and rows[0][0])

    def set_consent(
        self,
        model_id: str,
        user_id: str,
        wrapped_request_key: bytes,
        measurements: Sequence[str],
        audit: Mapping[str, Any],
    ) -> None:
        with self._tx() as db:
            self._require_model(db, model_id)
            db.execute(
                "INSERT INTO consents VALUES (?, ?, ?, ?) ON CONFLICT (model_id, user_id) "
                "DO UPDATE SET wrapped = excluded.wrapped, measurements = excluded.measurements",
                (model_id, user_id, wrapped_request_key, json.dumps(sorted({m.lower() for m in measurements}))),
            )
            self._append_audit(db, audit)

    def consent(self, model_id: str, user_id: str) -> ConsentRecord | None:
        rows = self._read(
            "SELECT wrapped, measurements FROM consents WHERE model_id = ? AND user_id = ?", (model_id, user_id)
        )
        if not rows:
            return None
        return ConsentRecord(model_id, user_id, bytes(rows[0][0]), frozenset(json.loads(rows[0][1])))

    def audit(self, event: Mapping[str, Any]) -> None:
        with self._tx() as db:
            self._append_audit(db, event)

    def audit_records(self, since: int = 0) -> Iterator[AuditRecord]:
        rows = self._read("SELECT seq, ts, event, prev_hash, hash FROM audit WHERE seq > ? ORDER BY seq", (since,))
        for seq, ts, event, prev, digest in rows:
            yield AuditRecord(seq, ts, json.loads(event), prev, digest)

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta_once(self, key: str, value: str) -> str:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
            return str(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
