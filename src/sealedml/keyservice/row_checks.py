"""Checked rows for the SQL key stores: write each access-control row with its tag, read it back checked.

A mixin of :class:`~sealedml.keyservice.store.SqlKeyStore` (see ``keyservice/rows.py`` for the
scheme). The :class:`~sealedml.keyservice.rows.RowLedger` learns of writes two ways: by
following the anchored audit log (:meth:`RowChecks._sync_ledger`: at start, and before each
checked read when other replicas may write), and from this process's own commits
(:meth:`RowChecks._committed`), applied in log order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sealedml.errors import StoreError
from sealedml.keyservice.audit_chain import GENESIS, AuditHead, chain_hash
from sealedml.keyservice.rows import PROTECTED_TABLES, RowKey, RowLedger, RowTamperedError, row_key_text

__all__ = ["RowChecks"]


class RowChecks:
    """Row tags and the ledger, over the store's ``_read``, ``_head``, audit records and anchor."""

    _rows: RowKey | None = None
    _ledger: RowLedger | None = None
    _anchor: Any

    # Provided by SqlKeyStore.
    @staticmethod
    def _head(db: Any) -> Any:
        raise NotImplementedError  # pragma: no cover

    def audit_anchor(self) -> Any:
        raise NotImplementedError  # pragma: no cover

    def audit_records(self, since: int = 0) -> Iterator[Any]:
        raise NotImplementedError  # pragma: no cover

    #: Only this process writes the store (SQLite: one KeyService per file): after one walk of the
    #: log at start, the ledger follows this process's own commits instead of re-reading the log.
    _single_writer = False

    def _init_rows(self, rows: RowKey | None) -> None:
        """Tag and check access-control rows with ``rows`` (``keyservice/rows.py``); None: unprotected (tests)."""
        self._rows = rows
        self._ledger = RowLedger(rows) if rows is not None else None
        self._ledger_lock = threading.Lock()
        self._ledger_head = AuditHead(0, GENESIS)
        self._ledger_synced = False
        self._uncommitted = threading.local()  # this thread's records appended in its open transaction
        self._backlog: dict[int, tuple[AuditHead, Mapping[str, Any]]] = {}  # committed, not yet applied

    def _pending(self) -> list[tuple[AuditHead, Mapping[str, Any]]]:
        records: list[tuple[AuditHead, Mapping[str, Any]]] | None = getattr(self._uncommitted, "records", None)
        if records is None:
            records = self._uncommitted.records = []
        return records

    def _committed(self) -> None:
        """Feed the ledger this thread's just-committed records, in log order (called by ``_tx``)."""
        records, self._uncommitted.records = self._pending(), []
        if self._ledger is None or not records:
            return
        with self._ledger_lock:
            for head, event in records:
                self._backlog[head.records] = (head, event)
            self._drain_backlog()

    def _drain_backlog(self) -> None:
        if self._ledger is None:
            return
        for seq in [s for s in self._backlog if s <= self._ledger_head.records]:
            del self._backlog[seq]  # already applied from the log
        while (nxt := self._backlog.pop(self._ledger_head.records + 1, None)) is not None:
            head, event = nxt
            self._ledger.apply(head.records, event)
            self._ledger_head = head

    def _rolled_back(self) -> None:
        self._uncommitted.records = []

    # ------------------------------------------------------------------ protected rows (keyservice/rows.py)
    def _put_row(self, db: Any, table: str, key: Sequence[Any], content: Sequence[Any], written: list[Any]) -> None:
        """Insert or replace one protected row, tagged with the audit record this transaction appends."""
        key_columns, content_columns = PROTECTED_TABLES[table]
        seq = self._head(db).records + 1
        mac = self._rows.tag(table, key, content, seq) if self._rows is not None else None
        columns = (*key_columns, *content_columns, "seq", "mac")
        updates = ", ".join(f"{c} = excluded.{c}" for c in (*content_columns, "seq", "mac"))
        db.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "  # noqa: S608
            f"ON CONFLICT ({', '.join(key_columns)}) DO UPDATE SET {updates}",
            (*key, *content, seq, mac),
        )
        written.append([table, row_key_text(key), "put"])

    def _delete_row(self, db: Any, table: str, key: Sequence[Any], written: list[Any]) -> None:
        key_columns, _ = PROTECTED_TABLES[table]
        where = " AND ".join(f"{c} = ?" for c in key_columns)
        db.execute(f"DELETE FROM {table} WHERE {where}", tuple(key))  # noqa: S608
        written.append([table, row_key_text(key), "del"])

    def _verified(self, table: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """``rows`` of ``table``, each checked against its tag and the audit log (no-op without a row key)."""
        if self._ledger is not None and rows:
            self._sync_ledger()
            self._ledger.check_all(table, rows)
        return rows

    def _check_latest(self, table: str, prefix: Sequence[Any], found: Sequence[Any] | None) -> None:
        """Refuse a read whose newest row under ``prefix`` (``found``: its key, or None) is not the log's.

        A newer row deleted behind the KeyService's back would make an older one look current.
        """
        if self._ledger is None:
            return
        self._sync_ledger()
        live = self._ledger.live_keys(table, prefix)
        newest = max(live, key=lambda k: [int(x) if x.isdigit() else x for x in k]) if live else None
        if newest != (None if found is None else [str(x) for x in found]):
            where = f"{table} {row_key_text(prefix)}"
            raise RowTamperedError(f"{where}: the newest row is not the one the audit log wrote last (deleted)")

    def _sync_ledger(self) -> None:
        """Follow the audit log from the last verified head to the anchored one, feeding the ledger."""
        if self._ledger is None or (self._single_writer and self._ledger_synced):
            return
        with self._ledger_lock:
            anchored = self.audit_anchor()
            if anchored is None:
                if self._ledger_head.records:
                    raise StoreError("audit anchor removed (tampered)")
                self._ledger_synced = True
                return
            head, tag = anchored
            if self._anchor is None or not self._anchor.check(head, tag):
                raise StoreError("audit anchor does not authenticate (tampered)")
            if head.records < self._ledger_head.records:
                raise StoreError("audit log went back in time (rolled back)")
            if head == self._ledger_head:
                self._ledger_synced = True
                return
            prev, pending = self._ledger_head, []
            for record in self.audit_records(since=prev.records):
                if record.seq > head.records:
                    break
                if (
                    record.seq != prev.records + 1
                    or record.prev_hash != prev.head
                    or chain_hash(prev.head, record.seq, record.timestamp, record.event) != record.hash
                ):
                    raise StoreError(f"audit chain broken at record {record.seq}")
                pending.append(record)
                prev = AuditHead(record.seq, record.hash)
            if prev != head:
                raise StoreError("audit log does not match its anchor (truncated, rolled back or altered)")
            for record in pending:
                self._ledger.apply(record.seq, record.event)
            self._ledger_head = head
            self._ledger_synced = True
            self._drain_backlog()
