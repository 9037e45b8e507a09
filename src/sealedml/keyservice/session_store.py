"""KeyService storage of sessions: their revisions, wrapped secrets and volume root tags.

The interface (:class:`SessionStore`) is part of every :class:`~sealedml.keyservice.store.KeyStore`;
:class:`SQLiteSessionTables` implements it for the SQLite store. As for models, the store
holds only *wrapped* secrets (the service layer wraps them under the master key, bound to the
session and the secret's name), and every change is written in one transaction with its
audit record.

Two writes are compare-and-swap, so that two KeyService calls racing each other cannot both
win: a new revision must follow the latest one stored, and a volume's root tag advances only
from the tag its writer read.
"""

from __future__ import annotations

import abc
import sqlite3
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sealedml.errors import Conflict

__all__ = ["SESSION_SCHEMA", "SQLiteSessionTables", "SessionRecord", "SessionStore"]

#: Added to the store's schema (``CREATE … IF NOT EXISTS``: stores from before sessions open unchanged).
SESSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (name TEXT NOT NULL, revision INTEGER NOT NULL, digest TEXT NOT NULL,
    document TEXT NOT NULL, signatures TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (name, revision));
CREATE TABLE IF NOT EXISTS session_secrets (session TEXT NOT NULL, name TEXT NOT NULL, wrapped BLOB NOT NULL,
    PRIMARY KEY (session, name));
CREATE TABLE IF NOT EXISTS volume_roots (session TEXT NOT NULL, volume TEXT NOT NULL, version INTEGER NOT NULL,
    root TEXT NOT NULL, PRIMARY KEY (session, volume));
"""


@dataclass(frozen=True)
class SessionRecord:
    """One stored revision: the document and its signatures as JSON text, as they were accepted."""

    name: str
    revision: int
    digest: str
    document: str
    signatures: str


class SessionStore(abc.ABC):
    """Sessions, their secrets and their volumes' root tags (see the module docstring)."""

    @abc.abstractmethod
    def session(self, name: str) -> SessionRecord | None:
        """The latest revision of ``name``, or None."""

    @abc.abstractmethod
    def put_session(self, record: SessionRecord, new_secrets: Mapping[str, bytes], audit: Mapping[str, Any]) -> None:
        """Store a revision that follows the latest one, and the wrapped values of secrets new to it.

        A secret that already has a value keeps it (an update never regenerates a secret).

        Raises:
            Conflict: the latest stored revision is not ``record.revision - 1``.
        """

    @abc.abstractmethod
    def session_secrets(self, session: str) -> dict[str, bytes]:
        """Every wrapped secret value of ``session``, by name."""

    @abc.abstractmethod
    def set_session_secret(self, session: str, name: str, wrapped: bytes, audit: Mapping[str, Any]) -> None:
        """Set (or replace) one secret's wrapped value."""

    @abc.abstractmethod
    def volume_root(self, session: str, volume: str) -> tuple[int, str] | None:
        """The (version, root tag) last committed for a volume of ``session``, or None."""

    @abc.abstractmethod
    def advance_volume_root(
        self, session: str, volume: str, version: int, root: str, previous: str | None, audit: Mapping[str, Any]
    ) -> None:
        """Commit ``version``/``root`` if the stored tag is still ``previous`` and ``version`` is the next one.

        Raises:
            Conflict: another writer committed first, or the version does not follow.
        """


class SQLiteSessionTables(SessionStore):
    """:class:`SessionStore` on the tables of :data:`SESSION_SCHEMA`, for :class:`SQLiteKeyStore`.

    A mixin: it uses the store's transaction, read and audit helpers.
    """

    # Provided by SQLiteKeyStore.
    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # pragma: no cover

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # pragma: no cover

    def _append_audit(self, db: sqlite3.Connection, event: Mapping[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover

    def session(self, name: str) -> SessionRecord | None:
        rows = self._read(
            "SELECT name, revision, digest, document, signatures FROM sessions WHERE name = ? "
            "ORDER BY revision DESC LIMIT 1",
            (name,),
        )
        return SessionRecord(str(rows[0][0]), int(rows[0][1]), *map(str, rows[0][2:])) if rows else None

    def put_session(self, record: SessionRecord, new_secrets: Mapping[str, bytes], audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            row = db.execute("SELECT MAX(revision) FROM sessions WHERE name = ?", (record.name,)).fetchone()
            latest = int(row[0]) if row and row[0] is not None else 0
            if record.revision != latest + 1:
                raise Conflict(f"session {record.name} is at revision {latest}; revision {record.revision} is stale")
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                (record.name, record.revision, record.digest, record.document, record.signatures, time.time()),
            )
            for name, wrapped in new_secrets.items():
                db.execute("INSERT OR IGNORE INTO session_secrets VALUES (?, ?, ?)", (record.name, name, wrapped))
            self._append_audit(db, audit)

    def session_secrets(self, session: str) -> dict[str, bytes]:
        rows = self._read("SELECT name, wrapped FROM session_secrets WHERE session = ?", (session,))
        return {str(name): bytes(wrapped) for name, wrapped in rows}

    def set_session_secret(self, session: str, name: str, wrapped: bytes, audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO session_secrets VALUES (?, ?, ?) ON CONFLICT (session, name) "
                "DO UPDATE SET wrapped = excluded.wrapped",
                (session, name, wrapped),
            )
            self._append_audit(db, audit)

    def volume_root(self, session: str, volume: str) -> tuple[int, str] | None:
        rows = self._read("SELECT version, root FROM volume_roots WHERE session = ? AND volume = ?", (session, volume))
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def advance_volume_root(
        self, session: str, volume: str, version: int, root: str, previous: str | None, audit: Mapping[str, Any]
    ) -> None:
        with self._tx() as db:
            row = db.execute(
                "SELECT version, root FROM volume_roots WHERE session = ? AND volume = ?", (session, volume)
            ).fetchone()
            current_version, current_root = (int(row[0]), str(row[1])) if row else (0, None)
            if current_root != previous or version != current_version + 1:
                raise Conflict(f"volume {volume} of session {session} changed since it was opened")
            db.execute(
                "INSERT INTO volume_roots VALUES (?, ?, ?, ?) ON CONFLICT (session, volume) "
                "DO UPDATE SET version = excluded.version, root = excluded.root",
                (session, volume, version, root),
            )
            self._append_audit(db, audit)
