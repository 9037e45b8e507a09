"""KeyService storage: the :class:`KeyStore` interface and its SQLite implementation.

The store holds only *wrapped* secrets (encrypted under the KeyService master
key by the service layer); it never sees a plaintext key. Every state change
and its audit record are written in one transaction, so an acknowledged call
is durable (SQLite WAL with ``synchronous=FULL``) and the audit log can never
miss a decision that took effect.

The audit log is a hash chain; its head — the number of records and the last
hash — is *anchored*: an HMAC under a key derived from the master key
(:class:`AuditAnchor`), updated in the same transaction as each record. The
chain alone catches an edited, reordered or removed record in the middle;
the anchor catches records removed from the end (a truncated log chains on
cleanly otherwise). Every append checks the anchor first, and
:meth:`KeyStore.verify_audit_chain` checks it after walking the chain.

Runtime measurements are always stored with their TEE type
(:class:`RuntimeId`): a measurement allowed for TDX can never be satisfied by
evidence of another TEE type.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealedml._internal.encoding import canonical_json, fields
from sealedml.attestation.base import TeeType
from sealedml.errors import Conflict, NotFound, StoreError
from sealedml.keyservice.audit_chain import GENESIS, AuditHead, chain_hash
from sealedml.keyservice.group_commit import GroupCommit
from sealedml.keyservice.row_checks import RowChecks
from sealedml.keyservice.rows import (
    PROTECTED_TABLES,
    SELECT_ROWS,
    RowKey,
    RowTamperedError,
)
from sealedml.keyservice.session_store import SESSION_SCHEMA, SessionStore, SqlSessionTables

__all__ = [
    "AuditAnchor",
    "AuditHead",
    "AuditRecord",
    "ConsentRecord",
    "KeyStore",
    "ModelRecord",
    "RuntimeId",
    "SQLiteKeyStore",
    "SqlKeyStore",
]

#: Schema of the SQLite store; a store written by another schema is refused, never guessed at.
SCHEMA_VERSION = 5


@dataclass(frozen=True, order=True)
class RuntimeId:
    """A runtime measurement (lowercase hex) of one TEE type."""

    tee: TeeType
    measurement: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "tee", TeeType(self.tee))
        object.__setattr__(self, "measurement", self.measurement.strip().lower())

    def to_json(self) -> dict[str, str]:
        return {"tee": self.tee.value, "measurement": self.measurement}


@dataclass(frozen=True)
class ModelRecord:
    """A registered model; ``partition_sha256``: its current version is partitioned (that manifest's digest);
    ``signature``: the current version's inputs and outputs (JSON of ``ModelSignature``), if recorded."""

    model_id: str
    owner_id: str
    current_version: int
    partition_sha256: str | None = None
    signature: str | None = None


@dataclass(frozen=True)
class ConsentRecord:
    """A user's request key (wrapped), the runtimes (TEE type + measurement) they consented to, and
    whether they accept partitioned execution (intermediate representations of their inputs
    computed on outside the TEE)."""

    model_id: str
    user_id: str
    wrapped_request_key: bytes
    runtimes: frozenset[RuntimeId]
    accept_partitioned: bool = False


@dataclass(frozen=True)
class AuditRecord:
    """One entry of the hash-chained audit log."""

    seq: int
    timestamp: float
    event: Mapping[str, Any]
    prev_hash: str
    hash: str


class AuditAnchor:
    """Authenticates the head of the audit chain with a key the database never sees.

    Args:
        key: a 32-byte key derived from the KeyService master key.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise StoreError("audit anchor key must be 32 bytes")
        self._key = key

    def tag(self, head: AuditHead) -> str:
        """HMAC-SHA256 over (record count, head hash), hex."""
        message = fields(b"sealedml/v1/audit-anchor", head.records, head.head)
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def check(self, head: AuditHead, tag: str) -> bool:
        """Whether ``tag`` authenticates ``head``."""
        return hmac.compare_digest(self.tag(head), tag)

    def __repr__(self) -> str:
        return "AuditAnchor(…)"


class KeyStore(SessionStore):
    """Persistent KeyService state. Implementations must make each call atomic and durable.

    Sessions (:class:`~sealedml.keyservice.session_store.SessionStore`) are part of it.
    """

    #: Whether KeyService replicas share release challenges through this store (see challenges.py).
    shares_challenges = False

    def put_challenge(self, challenge_id: str, expires: float) -> None:
        """Record an outstanding challenge (stores with :attr:`shares_challenges` only)."""
        raise NotImplementedError("this store does not share challenges")

    def take_challenge(self, challenge_id: str) -> float | None:
        """Forget a challenge and return its expiry (unix seconds), or None if it is not outstanding."""
        raise NotImplementedError("this store does not share challenges")

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
        self,
        model_id: str,
        owner_id: str,
        version: int,
        wrapped_key: bytes,
        audit: Mapping[str, Any],
        partition_sha256: str | None = None,
        signature: str | None = None,
    ) -> None:
        """Store a model version's wrapped key (and, if partitioned, its partition digest; if given,
        its inputs and outputs as JSON); creates the model (owner = caller) if new.

        Raises:
            Conflict: the model belongs to someone else, or the version is not newer.
        """

    @abc.abstractmethod
    def wrapped_model_key(self, model_id: str, version: int) -> bytes | None:
        """The wrapped key of one model version, or None."""

    @abc.abstractmethod
    def set_runtime_allowed(self, model_id: str, runtime: RuntimeId, allowed: bool, audit: Mapping[str, Any]) -> None:
        """Add or remove an allowed runtime (TEE type + measurement)."""

    @abc.abstractmethod
    def allowed_runtimes(self, model_id: str) -> frozenset[RuntimeId]:
        """Allowed runtimes (TEE type + measurement) of a model."""

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
        runtimes: Sequence[RuntimeId],
        audit: Mapping[str, Any],
        accept_partitioned: bool = False,
    ) -> None:
        """Store a user's wrapped request key and consented runtimes (replaces earlier ones)."""

    @abc.abstractmethod
    def consent(self, model_id: str, user_id: str) -> ConsentRecord | None:
        """The user's consent for the model, or None."""

    @abc.abstractmethod
    def models_of(self, owner_id: str) -> list[ModelRecord]:
        """The models ``owner_id`` owns, by id."""

    @abc.abstractmethod
    def delete_model(self, model_id: str, audit: Mapping[str, Any]) -> None:
        """Delete a model with its keys, allowed runtimes, grants and consents, in one audited transaction.

        Raises:
            NotFound: no such model.
        """

    @abc.abstractmethod
    def granted_users(self, model_id: str) -> list[str]:
        """The users the owner currently grants, sorted (for the owner's ``model info``)."""

    @abc.abstractmethod
    def consents(self, model_id: str) -> list[ConsentRecord]:
        """Every user's consent for the model, by user (for the owner's ``model info``)."""

    # audit + metadata
    @abc.abstractmethod
    def audit(self, event: Mapping[str, Any]) -> None:
        """Append a decision that changed no state (for example a denial)."""

    @abc.abstractmethod
    def audit_records(self, since: int = 0) -> Iterator[AuditRecord]:
        """Audit records with ``seq > since`` in order."""

    @abc.abstractmethod
    def audit_head(self) -> AuditHead:
        """The head of the chain as stored (not yet checked against the anchor)."""

    @abc.abstractmethod
    def audit_anchor(self) -> tuple[AuditHead, str] | None:
        """The stored anchor (head and tag), or None if none was ever written."""

    @property
    @abc.abstractmethod
    def anchor(self) -> AuditAnchor | None:
        """The anchor key this store maintains the audit head with (None: not anchored)."""

    @abc.abstractmethod
    def holds_state(self) -> bool:
        """Whether any principal or model is stored (each was recorded in the audit log)."""

    def check_audit_anchor(self) -> AuditHead:
        """Check, cheaply, that the stored head is the anchored one (done on start and before each append).

        Raises:
            StoreError: the log was truncated, rolled back or extended behind the
                KeyService's back, or the anchor was removed or forged.
        """
        head = self.audit_head()
        if self.anchor is None:
            return head
        anchored = self.audit_anchor()
        if anchored is None:
            # An empty log without an anchor is a fresh store, unless state exists whose
            # creation was audited: then the whole log and its anchor were removed.
            if head.records == 0 and not self.holds_state():
                return head
            raise StoreError("audit log has no anchor but the store holds audited state (truncated or tampered)")
        stored, tag = anchored
        if not self.anchor.check(stored, tag):
            raise StoreError("audit anchor does not authenticate (tampered)")
        if stored != head:
            raise StoreError(
                f"audit log does not match its anchor: {head.records} record(s) stored, "
                f"{stored.records} anchored (truncated, rolled back or altered)"
            )
        return head

    @abc.abstractmethod
    def meta(self, key: str) -> str | None:
        """A metadata value."""

    @abc.abstractmethod
    def set_meta_once(self, key: str, value: str) -> str:
        """Set a metadata value if unset; return the stored value."""

    def verify_audit_chain(self) -> int:
        """Check the audit hash chain end to end, then its anchored head; return the number of records.

        Raises:
            StoreError: the chain is broken (a record was altered, removed or
                reordered), or it ends elsewhere than its anchor says (truncated).
        """
        prev, count = GENESIS, 0
        for record in self.audit_records():
            if (
                record.seq != count + 1
                or record.prev_hash != prev
                or chain_hash(prev, record.seq, record.timestamp, record.event) != record.hash
            ):
                raise StoreError(f"audit chain broken at record {record.seq}")
            prev, count = record.hash, count + 1
        if self.anchor is not None:
            anchored = self.audit_anchor()
            walked = AuditHead(count, prev)
            if anchored is None:
                if count or self.holds_state():
                    raise StoreError(
                        "audit log has no anchor but the store holds audited state (truncated or tampered)"
                    )
            elif not self.anchor.check(*anchored) or anchored[0] != walked:
                raise StoreError(
                    f"audit chain ends at record {count}, its anchor says {anchored[0].records} "
                    "(truncated or rolled back)"
                )
        return count

    def close(self) -> None:
        """Release resources."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principals (id TEXT PRIMARY KEY, public_key BLOB NOT NULL, created REAL NOT NULL,
    seq INTEGER, mac TEXT);
CREATE TABLE IF NOT EXISTS nonces (principal TEXT NOT NULL, nonce TEXT NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (principal, nonce));
CREATE INDEX IF NOT EXISTS nonces_ts ON nonces (ts);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, owner TEXT NOT NULL, current_version INTEGER NOT NULL,
    seq INTEGER, mac TEXT);
CREATE TABLE IF NOT EXISTS model_keys (model_id TEXT NOT NULL, version INTEGER NOT NULL, wrapped BLOB NOT NULL,
    partition TEXT, signature TEXT, seq INTEGER, mac TEXT, PRIMARY KEY (model_id, version));
CREATE TABLE IF NOT EXISTS runtimes (model_id TEXT NOT NULL, tee TEXT NOT NULL, measurement TEXT NOT NULL,
    seq INTEGER, mac TEXT, PRIMARY KEY (model_id, tee, measurement));
CREATE TABLE IF NOT EXISTS grants (model_id TEXT NOT NULL, user_id TEXT NOT NULL, granted INTEGER NOT NULL,
    changed REAL NOT NULL, seq INTEGER, mac TEXT, PRIMARY KEY (model_id, user_id));
CREATE TABLE IF NOT EXISTS consents (model_id TEXT NOT NULL, user_id TEXT NOT NULL, wrapped BLOB NOT NULL,
    runtimes TEXT NOT NULL, accept_partitioned INTEGER NOT NULL DEFAULT 0, seq INTEGER, mac TEXT,
    PRIMARY KEY (model_id, user_id));
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, event TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
"""


class SqlKeyStore(RowChecks, SqlSessionTables, KeyStore):
    """The :class:`KeyStore`'s SQL, shared by :class:`SQLiteKeyStore` and
    :class:`~sealedml.keyservice.postgres_store.PostgresKeyStore`.

    Statements use ``?`` parameters and syntax both databases accept (``ON CONFLICT``);
    the PostgreSQL store translates the parameter style. Subclasses provide the
    transactions (:meth:`_tx`), the reads (:meth:`_read`) and the audit group commit.
    """

    _anchor: AuditAnchor | None
    _group: GroupCommit

    @property
    def anchor(self) -> AuditAnchor | None:
        return self._anchor

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError  # pragma: no cover

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _head(db: Any) -> AuditHead:
        row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return AuditHead(int(row[0]), str(row[1])) if row else AuditHead(0, GENESIS)

    @staticmethod
    def _parse_anchor(value: str) -> tuple[AuditHead, str]:
        try:
            doc = json.loads(value)
            return AuditHead(int(doc["records"]), str(doc["head"])), str(doc["tag"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError("audit anchor is malformed (tampered)") from exc

    @classmethod
    def _anchor_row(cls, db: Any) -> tuple[AuditHead, str] | None:
        row = db.execute("SELECT value FROM meta WHERE key = 'audit_anchor'").fetchone()
        return None if row is None else cls._parse_anchor(str(row[0]))

    def _append_audit(self, db: Any, event: Mapping[str, Any]) -> None:
        head = self._head(db)
        if self._anchor is not None:
            anchored = self._anchor_row(db)
            expected = anchored[0] if anchored is not None else AuditHead(0, GENESIS)
            if (anchored is not None and not self._anchor.check(*anchored)) or expected != head:
                # Refuse to chain a new record onto a truncated or altered log: the
                # decision would be recorded after a gap nobody could see.
                raise StoreError("audit log does not match its anchor (truncated, rolled back or altered)")
        seq, prev = head.records + 1, head.head
        ts = round(time.time(), 6)
        digest = chain_hash(prev, seq, ts, event)
        db.execute(
            "INSERT INTO audit (seq, ts, event, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
            (seq, ts, canonical_json(dict(event)).decode(), prev, digest),
        )
        if self._anchor is not None:
            new = AuditHead(seq, digest)
            value = json.dumps({"records": new.records, "head": new.head, "tag": self._anchor.tag(new)})
            db.execute(
                "INSERT INTO meta VALUES ('audit_anchor', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (value,),
            )
        if self._ledger is not None:
            self._pending().append((AuditHead(seq, digest), event))

    # ------------------------------------------------------------------ principals and models
    def add_principal(self, principal_id: str, public_key: bytes, audit: Mapping[str, Any]) -> bool:
        with self._tx() as db:
            row = db.execute(SELECT_ROWS["principals"] + " WHERE id = ?", (principal_id,))
            found = row.fetchone()
            if found is not None:
                self._verified("principals", [tuple(found)])
                if bytes(found[1]) != public_key:
                    raise Conflict("principal id already registered with another key")
                return False
            written: list[Any] = []
            self._put_row(db, "principals", (principal_id,), (public_key, time.time()), written)
            self._append_audit(db, {**audit, "rows": written})
            return True

    def principal_key(self, principal_id: str) -> bytes | None:
        rows = self._read(SELECT_ROWS["principals"] + " WHERE id = ?", (principal_id,))
        return bytes(self._verified("principals", rows)[0][1]) if rows else None

    def use_nonce(self, principal_id: str, nonce: str, timestamp: int, horizon: int) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM nonces WHERE ts < ?", (int(time.time()) - horizon,))
            inserted = db.execute(
                "INSERT INTO nonces VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (principal_id, nonce, timestamp)
            )
            return bool(inserted.rowcount == 1)

    def model(self, model_id: str) -> ModelRecord | None:
        rows = self._verified("models", self._read(SELECT_ROWS["models"] + " WHERE id = ?", (model_id,)))
        if not rows:
            return None
        _, owner, version, _, _ = rows[0]
        keys = self._verified(
            "model_keys",
            self._read(
                SELECT_ROWS["model_keys"] + " WHERE model_id = ? AND version = ?",
                (model_id, version),
            ),
        )
        partition, signature = (keys[0][3], keys[0][4]) if keys else (None, None)
        return ModelRecord(model_id, str(owner), int(version), partition, signature)

    def put_model_key(
        self,
        model_id: str,
        owner_id: str,
        version: int,
        wrapped_key: bytes,
        audit: Mapping[str, Any],
        partition_sha256: str | None = None,
        signature: str | None = None,
    ) -> None:
        with self._tx() as db:
            found = db.execute(SELECT_ROWS["models"] + " WHERE id = ?", (model_id,)).fetchone()
            if found is not None:
                self._verified("models", [tuple(found)])
                if found[1] != owner_id:
                    raise Conflict("model belongs to another principal")
                if version <= found[2]:
                    raise Conflict(f"model version must be newer than {found[2]}")
            elif db.execute("SELECT 1 FROM model_keys WHERE model_id = ?", (model_id,)).fetchone() is not None:
                raise RowTamperedError(f"model {model_id} has keys but no model row (deleted behind the KeyService)")
            written: list[Any] = []
            self._put_row(db, "models", (model_id,), (owner_id, version), written)
            content = (wrapped_key, partition_sha256, signature)
            self._put_row(db, "model_keys", (model_id, version), content, written)
            self._append_audit(db, {**audit, "rows": written})

    def wrapped_model_key(self, model_id: str, version: int) -> bytes | None:
        rows = self._read(
            SELECT_ROWS["model_keys"] + " WHERE model_id = ? AND version = ?",
            (model_id, version),
        )
        return bytes(self._verified("model_keys", rows)[0][2]) if rows else None

    def _require_model(self, db: Any, model_id: str) -> None:
        found = db.execute(SELECT_ROWS["models"] + " WHERE id = ?", (model_id,)).fetchone()
        if found is None:
            raise NotFound("no such model")
        self._verified("models", [tuple(found)])

    # ------------------------------------------------------------------ runtimes, grants, consents
    def set_runtime_allowed(self, model_id: str, runtime: RuntimeId, allowed: bool, audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            self._require_model(db, model_id)
            key = (model_id, runtime.tee.value, runtime.measurement)
            written: list[Any] = []
            if allowed:
                self._put_row(db, "runtimes", key, (), written)
            else:
                self._delete_row(db, "runtimes", key, written)
            self._append_audit(db, {**audit, "rows": written})

    def allowed_runtimes(self, model_id: str) -> frozenset[RuntimeId]:
        rows = self._read(SELECT_ROWS["runtimes"] + " WHERE model_id = ?", (model_id,))
        try:
            return frozenset(RuntimeId(TeeType(row[1]), row[2]) for row in self._verified("runtimes", rows))
        except ValueError as exc:
            raise StoreError("allowed runtime with an unknown TEE type (tampered)") from exc

    def set_grant(self, model_id: str, user_id: str, granted: bool, audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            self._require_model(db, model_id)
            written: list[Any] = []
            self._put_row(db, "grants", (model_id, user_id), (int(granted), time.time()), written)
            self._append_audit(db, {**audit, "rows": written})

    def is_granted(self, model_id: str, user_id: str) -> bool:
        rows = self._read(SELECT_ROWS["grants"] + " WHERE model_id = ? AND user_id = ?", (model_id, user_id))
        return bool(rows and self._verified("grants", rows)[0][2])

    def set_consent(
        self,
        model_id: str,
        user_id: str,
        wrapped_request_key: bytes,
        runtimes: Sequence[RuntimeId],
        audit: Mapping[str, Any],
        accept_partitioned: bool = False,
    ) -> None:
        encoded = json.dumps([[r.tee.value, r.measurement] for r in sorted(set(runtimes))])
        with self._tx() as db:
            self._require_model(db, model_id)
            written: list[Any] = []
            content = (wrapped_request_key, encoded, int(accept_partitioned))
            self._put_row(db, "consents", (model_id, user_id), content, written)
            self._append_audit(db, {**audit, "rows": written})

    def consent(self, model_id: str, user_id: str) -> ConsentRecord | None:
        rows = self._read(
            SELECT_ROWS["consents"] + " WHERE model_id = ? AND user_id = ?",
            (model_id, user_id),
        )
        return self._consent_record(self._verified("consents", rows)[0]) if rows else None

    @staticmethod
    def _consent_record(row: Sequence[Any]) -> ConsentRecord:
        model_id, user_id, wrapped, encoded, accept_partitioned, _, _ = row
        try:
            runtimes = frozenset(RuntimeId(TeeType(tee), str(m)) for tee, m in json.loads(encoded))
        except (ValueError, TypeError) as exc:
            raise StoreError("malformed consent record (tampered)") from exc
        return ConsentRecord(str(model_id), str(user_id), bytes(wrapped), runtimes, bool(accept_partitioned))

    def models_of(self, owner_id: str) -> list[ModelRecord]:
        rows = self._verified("models", self._read(SELECT_ROWS["models"] + " WHERE owner = ?", (owner_id,)))
        found = (self.model(str(row[0])) for row in sorted(rows))
        return [record for record in found if record is not None]

    def delete_model(self, model_id: str, audit: Mapping[str, Any]) -> None:
        tables = ("model_keys", "runtimes", "grants", "consents")
        with self._tx() as db:
            self._require_model(db, model_id)
            written: list[Any] = []
            for table in tables:
                key_columns, _ = PROTECTED_TABLES[table]
                keys = db.execute(
                    f"SELECT {', '.join(key_columns)} FROM {table} WHERE model_id = ?",  # noqa: S608 (constants)
                    (model_id,),
                ).fetchall()
                for key in keys:
                    self._delete_row(db, table, tuple(key), written)
            self._delete_row(db, "models", (model_id,), written)
            self._append_audit(db, {**audit, "rows": written})

    def granted_users(self, model_id: str) -> list[str]:
        rows = self._read(SELECT_ROWS["grants"] + " WHERE model_id = ?", (model_id,))
        return sorted(str(row[1]) for row in self._verified("grants", rows) if row[2])

    def consents(self, model_id: str) -> list[ConsentRecord]:
        rows = self._read(SELECT_ROWS["consents"] + " WHERE model_id = ?", (model_id,))
        return sorted((self._consent_record(row) for row in self._verified("consents", rows)), key=lambda c: c.user_id)

    def audit(self, event: Mapping[str, Any]) -> None:
        self._group.append(event)

    def audit_records(self, since: int = 0) -> Iterator[AuditRecord]:
        rows = self._read("SELECT seq, ts, event, prev_hash, hash FROM audit WHERE seq > ? ORDER BY seq", (since,))
        for seq, ts, event, prev, digest in rows:
            yield AuditRecord(seq, ts, json.loads(event), prev, digest)

    def holds_state(self) -> bool:
        rows = self._read("SELECT EXISTS (SELECT 1 FROM principals) OR EXISTS (SELECT 1 FROM models)")
        return bool(rows[0][0])

    def audit_head(self) -> AuditHead:
        rows = self._read("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        return AuditHead(int(rows[0][0]), str(rows[0][1])) if rows else AuditHead(0, GENESIS)

    def audit_anchor(self) -> tuple[AuditHead, str] | None:
        rows = self._read("SELECT value FROM meta WHERE key = 'audit_anchor'")
        return self._parse_anchor(str(rows[0][0])) if rows else None

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta_once(self, key: str, value: str) -> str:
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value))
            return str(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


class SQLiteKeyStore(SqlKeyStore):
    """:class:`KeyStore` on SQLite in WAL mode with ``synchronous=FULL`` (durable commits).

    Writes go through one connection guarded by a lock; reads use one read-only
    connection per calling thread (callers run the store from a thread pool), so
    in WAL mode they proceed while a write commits instead of queueing behind its
    fsync — a key release's half-dozen reads no longer wait for the previous
    release's audit record to reach the disk. Audit records that change no state
    (:meth:`audit`: every release decision, every denial) are committed in
    groups (:class:`GroupCommit`): one fsync for all the records waiting, each
    caller returning only once its own record is durable.

    Args:
        path: the database file.
        anchor: maintains and checks the audit head (the KeyService always passes
            one; without it the audit chain is checked link by link only).

    Raises:
        StoreError: the file cannot be opened, or was written with another schema.
    """

    def __init__(self, path: Path | str, *, anchor: AuditAnchor | None = None, rows: RowKey | None = None) -> None:
        self._anchor = anchor
        self._init_rows(rows)
        self._path = str(path)
        # An in-memory database exists only in its one connection: read through it.
        self._shared_reads = self._path == ":memory:" or self._path.startswith("file::memory:")
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._group = GroupCommit(self)
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._check_schema(path)
            self._db.executescript(_SCHEMA + SESSION_SCHEMA)
            self._db.execute("INSERT INTO meta VALUES ('schema', ?) ON CONFLICT DO NOTHING", (str(SCHEMA_VERSION),))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open key store {path}: {exc}") from exc
        self._lock = threading.Lock()

    def _check_schema(self, path: Path | str) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return
        version = None
        if "meta" in tables:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            version = row[0] if row else None
        if version != str(SCHEMA_VERSION):
            # Schema 1 stored runtime measurements without their TEE type: guessing one
            # could let evidence of one TEE type satisfy a measurement meant for another.
            raise StoreError(
                f"key store {path} was written by another SealedML version (schema {version or 1}, "
                f"this one reads {SCHEMA_VERSION}); it is not migrated automatically: re-register the "
                "owners' models and runtimes in a new data directory"
            )

    _single_writer = True

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
            except BaseException as exc:
                self._rolled_back()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"key store failure: {exc}") from exc
                raise
        self._committed()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (created on first use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            if self._shared_reads:
                with self._lock:
                    return self._db.execute(sql, args).fetchall()
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"key store failure: {exc}") from exc

    def close(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        with self._lock:
            self._db.close()
