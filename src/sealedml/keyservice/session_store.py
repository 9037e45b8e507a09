"""KeyService storage of sessions: their revisions, wrapped secrets and volume root tags.

The interface (:class:`SessionStore`) is part of every :class:`~sealedml.keyservice.store.KeyStore`;
:class:`SqlSessionTables` implements it for the SQLite store. As for models, the store
holds only *wrapped* secrets (the service layer wraps them under the master key, bound to the
session and the secret's name), and every change is written in one transaction with its
audit record.

Two writes are compare-and-swap, so that two KeyService calls racing each other cannot both
win: a new revision must follow the latest one stored, and a volume's root tag advances only
from the tag its writer read.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sealedml.errors import Conflict
from sealedml.keyservice.rows import PROTECTED_TABLES, SELECT_ROWS, RowTamperedError

__all__ = ["SESSION_SCHEMA", "SessionRecord", "SessionStore", "SqlSessionTables"]

#: Added to the store's schema (``CREATE … IF NOT EXISTS``: stores from before sessions open unchanged).
SESSION_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (name TEXT NOT NULL, revision INTEGER NOT NULL, digest TEXT NOT NULL,
    document TEXT NOT NULL, signatures TEXT NOT NULL, created REAL NOT NULL, seq INTEGER, mac TEXT,
    PRIMARY KEY (name, revision));
CREATE TABLE IF NOT EXISTS session_secrets (session TEXT NOT NULL, name TEXT NOT NULL, wrapped BLOB NOT NULL,
    seq INTEGER, mac TEXT, PRIMARY KEY (session, name));
CREATE TABLE IF NOT EXISTS volume_roots (session TEXT NOT NULL, volume TEXT NOT NULL, version INTEGER NOT NULL,
    root TEXT NOT NULL, seq INTEGER, mac TEXT, PRIMARY KEY (session, volume));
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


class SqlSessionTables(SessionStore):
    """:class:`SessionStore` on the tables of :data:`SESSION_SCHEMA`, for the SQL key stores.

    A mixin: it uses the store's transaction, read and audit helpers (SQLite and PostgreSQL).
    """

    # Provided by SqlKeyStore.
    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError  # pragma: no cover

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # pragma: no cover

    def _append_audit(self, db: Any, event: Mapping[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover

    def _put_row(self, db: Any, table: str, key: Sequence[Any], content: Sequence[Any], written: list[Any]) -> None:
        raise NotImplementedError  # pragma: no cover

    def _verified(self, table: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # pragma: no cover

    def _check_latest(self, table: str, prefix: Sequence[Any], found: Sequence[Any] | None) -> None:
        raise NotImplementedError  # pragma: no cover

    def _newest(self, table: str, where: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The newest row of ``table`` matching ``where``, checked, and checked to be the log's newest.

        A newer row deleted behind the KeyService's back would make an older one current. A row
        another replica wrote between the read and the check looks the same for a moment, so the
        read is tried again before the mismatch counts as tampering.
        """
        for attempt in range(3):
            rows = self._read(SELECT_ROWS[table] + where, args)
            found = self._verified(table, rows)[0] if rows else None
            try:
                key_columns = len(PROTECTED_TABLES[table][0])
                self._check_latest(table, args, found[:key_columns] if found else None)
            except RowTamperedError:
                if attempt == 2:
                    raise
                continue
            return found
        return None  # pragma: no cover - the loop returns or raises

    def session(self, name: str) -> SessionRecord | None:
        latest = self._newest("sessions", " WHERE name = ? ORDER BY revision DESC LIMIT 1", (name,))
        if latest is None:
            return None
        return SessionRecord(str(latest[0]), int(latest[1]), str(latest[2]), str(latest[3]), str(latest[4]))

    def put_session(self, record: SessionRecord, new_secrets: Mapping[str, bytes], audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            row = db.execute("SELECT MAX(revision) FROM sessions WHERE name = ?", (record.name,)).fetchone()
            latest = int(row[0]) if row and row[0] is not None else 0
            if record.revision != latest + 1:
                raise Conflict(f"session {record.name} is at revision {latest}; revision {record.revision} is stale")
            written: list[Any] = []
            content = (record.digest, record.document, record.signatures, time.time())
            self._put_row(db, "sessions", (record.name, record.revision), content, written)
            known = {
                str(r[0]) for r in db.execute("SELECT name FROM session_secrets WHERE session = ?", (record.name,))
            }
            for name, wrapped in new_secrets.items():
                if name not in known:  # a secret keeps its value across revisions
                    self._put_row(db, "session_secrets", (record.name, name), (wrapped,), written)
            self._append_audit(db, {**audit, "rows": written})

    def session_secrets(self, session: str) -> dict[str, bytes]:
        rows = self._verified(
            "session_secrets", self._read(SELECT_ROWS["session_secrets"] + " WHERE session = ?", (session,))
        )
        return {str(row[1]): bytes(row[2]) for row in rows}

    def set_session_secret(self, session: str, name: str, wrapped: bytes, audit: Mapping[str, Any]) -> None:
        with self._tx() as db:
            written: list[Any] = []
            self._put_row(db, "session_secrets", (session, name), (wrapped,), written)
            self._append_audit(db, {**audit, "rows": written})

    def volume_root(self, session: str, volume: str) -> tuple[int, str] | None:
        found = self._newest("volume_roots", " WHERE session = ? AND volume = ?", (session, volume))
        return (int(found[2]), str(found[3])) if found else None

    def advance_volume_root(
        self, session: str, volume: str, version: int, root: str, previous: str | None, audit: Mapping[str, Any]
    ) -> None:
        with self._tx() as db:
            row = db.execute(
                SELECT_ROWS["volume_roots"] + " WHERE session = ? AND volume = ?", (session, volume)
            ).fetchone()
            if row is not None:
                self._verified("volume_roots", [tuple(row)])
            current_version, current_root = (int(row[2]), str(row[3])) if row else (0, None)
            if current_root != previous or version != current_version + 1:
                raise Conflict(f"volume {volume} of session {session} changed since it was opened")
            written: list[Any] = []
            self._put_row(db, "volume_roots", (session, volume), (version, root), written)
            self._append_audit(db, {**audit, "rows": written})
