"""Release challenges: single-use nonces, in one KeyService's memory or shared by its replicas.

A runtime asks one KeyService for a challenge and may send its evidence to another replica;
so replicas that share a store share their challenges too (:class:`StoreChallenges`). Only the
challenge's id and expiry are stored; its nonce is an HMAC of the id under a key derived from
the master key, so the database never holds a nonce. Whoever runs the database can put a
consumed id back (a replay of old evidence): the evidence binds the runtime's one-time HPKE
key, so whatever is released again is sealed to a key only that old runtime instance held.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from sealedml.crypto import random_bytes
from sealedml.errors import Overloaded

if TYPE_CHECKING:
    from sealedml.keyservice.store import KeyStore

__all__ = ["ChallengeTable", "MemoryChallenges", "StoreChallenges"]


class ChallengeTable(Protocol):
    """Where outstanding challenges live."""

    def issue(self, ttl: int) -> tuple[str, bytes]:
        """A new challenge: its id and nonce (raises ``Overloaded`` when too many are outstanding)."""
        ...

    def consume(self, challenge_id: str) -> bytes | None:
        """The nonce of ``challenge_id`` if it is outstanding and unexpired, forgetting it; else None."""
        ...


class MemoryChallenges:
    """Challenges in this process (one KeyService; decision 0004)."""

    def __init__(self, max_outstanding: int) -> None:
        self._max = max_outstanding
        self._table: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, ttl: int) -> tuple[str, bytes]:
        now = time.monotonic()
        with self._lock:
            while self._table:
                cid, (_, expires) = next(iter(self._table.items()))
                if expires > now:
                    break
                del self._table[cid]
            if len(self._table) >= self._max:
                raise Overloaded("too many outstanding challenges", retry_after=1)
            cid, nonce = secrets.token_hex(16), random_bytes(32)
            self._table[cid] = (nonce, now + ttl)
        return cid, nonce

    def consume(self, challenge_id: str) -> bytes | None:
        with self._lock:
            entry = self._table.pop(challenge_id, None)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]


class StoreChallenges:
    """Challenges in the store replicas share (see the module docstring)."""

    def __init__(self, store: KeyStore, key: bytes) -> None:
        self._store, self._key = store, key

    def _nonce(self, challenge_id: str) -> bytes:
        return hmac.new(self._key, b"sealedml/v1/challenge" + challenge_id.encode(), hashlib.sha256).digest()

    def issue(self, ttl: int) -> tuple[str, bytes]:
        cid = secrets.token_hex(16)
        self._store.put_challenge(cid, time.time() + ttl)
        return cid, self._nonce(cid)

    def consume(self, challenge_id: str) -> bytes | None:
        expires = self._store.take_challenge(challenge_id)
        if expires is None or expires < time.time():
            return None
        return self._nonce(challenge_id)
