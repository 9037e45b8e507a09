"""Audit records that change no state, committed in groups (one transaction, one fsync for many)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sealedml.errors import StoreError

if TYPE_CHECKING:
    from sealedml.keyservice.store import SqlKeyStore

__all__ = ["GroupCommit"]


class GroupCommit:
    """Audit appends in groups: one transaction, one fsync, for every record waiting.

    The first caller that finds no commit running leads: it takes every pending
    record, writes them in one transaction and wakes the others; records that
    arrived meanwhile wait for the next leader. Records are committed in arrival
    order, and :meth:`append` returns only once the caller's own record is durable
    (or raises the error its group's commit raised).
    """

    def __init__(self, store: SqlKeyStore) -> None:
        self._store = store
        self._cond = threading.Condition()
        self._pending: list[tuple[int, Mapping[str, Any]]] = []
        self._issued = 0  # tickets handed out
        self._committed = 0  # every ticket up to this one is durable (or failed)
        self._failed: dict[int, StoreError] = {}
        self._leading = False

    def append(self, event: Mapping[str, Any]) -> None:
        """Append ``event`` to the audit log; return once it is durable.

        Raises:
            StoreError: the commit of its group failed (nothing of the group was written).
        """
        with self._cond:
            self._issued += 1
            ticket = self._issued
            self._pending.append((ticket, event))
            while ticket > self._committed and self._leading:
                self._cond.wait()
            if ticket <= self._committed:
                error = self._failed.pop(ticket, None)
                if error is not None:
                    raise error
                return
            self._leading = True
            batch, self._pending = self._pending, []
        error = None
        try:
            with self._store._tx() as db:
                for _, item in batch:
                    self._store._append_audit(db, item)
        except StoreError as exc:
            error = exc
        with self._cond:
            if error is not None:
                self._failed.update({t: error for t, _ in batch if t != ticket})
            self._committed = batch[-1][0]
            self._leading = False
            self._cond.notify_all()
        if error is not None:
            raise error
