"""The :class:`~sealedml.keyservice.store.KeyStore` on PostgreSQL (psycopg 3), for KeyServices that share one store.

The SQL is :class:`~sealedml.keyservice.store.SqlKeyStore`'s, written for both databases;
this class supplies connections, transactions and the schema's PostgreSQL types.

* **Every write is serialized** across every KeyService on the database: each write
  transaction starts with a transaction-scoped advisory lock, so the audit chain gets one
  record after another (two replicas can never both append record *n*) and every check that
  precedes a write in the same transaction sees the state it changes.
* **Reads** run on a connection per thread (the KeyService calls its store from a thread
  pool), each in its own short transaction.
* **A lost connection** (a restarted server) fails the call in progress with
  :class:`~sealedml.errors.StoreError` — nothing half-written: the transaction is rolled
  back by the server — and the next call connects again.

The database is storage the KeyService does not trust more than a file: wrapped keys are
ciphertext under the master key and the audit log is anchored under it, as with SQLite.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sealedml.errors import ConfigurationError, StoreError
from sealedml.keyservice.group_commit import GroupCommit
from sealedml.keyservice.rows import RowKey
from sealedml.keyservice.session_store import SESSION_SCHEMA
from sealedml.keyservice.store import _SCHEMA, SCHEMA_VERSION, AuditAnchor, SqlKeyStore

__all__ = ["PostgresKeyStore", "is_postgres_url"]

#: The advisory lock every write transaction holds (an arbitrary constant: "SMLKS" in ASCII).
_WRITE_LOCK = 0x534D4C4B53


def is_postgres_url(value: str) -> bool:
    """Whether ``value`` names a PostgreSQL database (``postgresql://…`` or ``postgres://…``)."""
    return value.startswith(("postgresql://", "postgres://"))


def _postgres_schema() -> list[str]:
    """The SQLite schema's statements with PostgreSQL's types."""
    text = (_SCHEMA + SESSION_SCHEMA).replace("BLOB", "BYTEA").replace("REAL", "DOUBLE PRECISION")
    text = text.replace("INTEGER", "BIGINT")
    statements = [statement.strip() for statement in text.split(";") if statement.strip()]
    # Release challenges shared by replicas (id and expiry only: the nonce is derived, challenges.py).
    return [
        *statements,
        "CREATE TABLE IF NOT EXISTS challenges (id TEXT PRIMARY KEY, expires DOUBLE PRECISION NOT NULL)",
    ]


class _Qmark:
    """A psycopg connection that takes the shared SQL's ``?`` parameters."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), tuple(args))


class PostgresKeyStore(SqlKeyStore):
    """:class:`~sealedml.keyservice.store.KeyStore` on PostgreSQL (see the module docstring).

    Args:
        url: ``postgresql://user@host:port/database`` (libpq syntax; a password is best given
            in ``PGPASSWORD`` or a passfile, not in the URL).
        anchor: maintains and checks the audit head (the KeyService always passes one).
        rows: tags and checks access-control rows (the KeyService always passes one).
        connect_timeout: seconds to wait for the server on each (re)connection.

    Raises:
        ConfigurationError: psycopg is not installed.
        StoreError: the server cannot be reached, or the database was written with another schema.
    """

    def __init__(
        self, url: str, *, anchor: AuditAnchor | None = None, rows: RowKey | None = None, connect_timeout: int = 10
    ) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - psycopg is a dependency
            raise ConfigurationError("a PostgreSQL store needs psycopg: pip install 'psycopg[binary]'") from exc
        self._psycopg = psycopg
        self._url, self._timeout = url, connect_timeout
        self._anchor = anchor
        self._init_rows(rows)
        self._local = threading.local()
        self._connections: list[Any] = []
        self._connections_lock = threading.Lock()
        self._group = GroupCommit(self)
        self._issued = 0
        with self._tx() as db:  # under the write lock: replicas starting together create the schema once
            for statement in _postgres_schema():
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema', ?) ON CONFLICT DO NOTHING", (str(SCHEMA_VERSION),))
            version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if version != str(SCHEMA_VERSION):
            raise StoreError(
                f"key store {self._where()} was written by another SealedML version (schema {version}, "
                f"this one reads {SCHEMA_VERSION}); it is not migrated automatically"
            )

    def _where(self) -> str:
        """The database, without credentials (for messages)."""
        info = self._psycopg.conninfo.conninfo_to_dict(self._url)
        return f"postgresql://{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        try:
            conn = self._psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)
        except self._psycopg.Error as exc:
            raise StoreError(f"key store {self._where()} unreachable: {type(exc).__name__}") from None
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    @contextmanager
    def _tx(self) -> Iterator[_Qmark]:
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                yield _Qmark(conn)
        except BaseException as exc:
            self._rolled_back()
            if isinstance(exc, self._psycopg.Error):
                raise StoreError(f"key store failure: {type(exc).__name__}") from None
            raise
        self._committed()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._connection()
        try:
            with conn.transaction():
                return list(_Qmark(conn).execute(sql, args).fetchall())
        except self._psycopg.Error as exc:
            raise StoreError(f"key store failure: {type(exc).__name__}") from None

    # ------------------------------------------------------------------ challenges shared by replicas
    shares_challenges = True

    def put_challenge(self, challenge_id: str, expires: float) -> None:
        conn = self._connection()
        try:
            conn.execute("INSERT INTO challenges VALUES (%s, %s)", (challenge_id, expires))
            self._issued += 1
            if self._issued % 256 == 0:  # forget expired ones now and then
                conn.execute("DELETE FROM challenges WHERE expires < %s", (time.time(),))
        except self._psycopg.Error as exc:
            raise StoreError(f"key store failure: {type(exc).__name__}") from None

    def take_challenge(self, challenge_id: str) -> float | None:
        conn = self._connection()
        try:
            row = conn.execute("DELETE FROM challenges WHERE id = %s RETURNING expires", (challenge_id,)).fetchone()
        except self._psycopg.Error as exc:
            raise StoreError(f"key store failure: {type(exc).__name__}") from None
        return None if row is None else float(row[0])

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
