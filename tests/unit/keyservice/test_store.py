"""Unit tests of ``SQLiteKeyStore``: durability, ownership, replay protection, audit chain."""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sealedml.attestation.base import TeeType
from sealedml.errors import Conflict, NotFound, StoreError
from sealedml.keyservice.store import (
    GENESIS,
    AuditAnchor,
    AuditHead,
    ModelRecord,
    RuntimeId,
    SQLiteKeyStore,
    chain_hash,
)

M1 = "ab" * 48
M2 = "cd" * 48
R1 = RuntimeId(TeeType.SIMULATED, M1)
R2 = RuntimeId(TeeType.TDX, M2)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keyservice.sqlite3"


def _reopen(path: Path, store: SQLiteKeyStore) -> SQLiteKeyStore:
    store.close()
    return SQLiteKeyStore(path)


def _audit_events(store: SQLiteKeyStore) -> list[dict[str, object]]:
    return [dict(r.event) for r in store.audit_records()]


# ---------------------------------------------------------------------------- durability


def _with_model(s: SQLiteKeyStore) -> None:
    s.put_model_key("m", "owner", 1, b"wrapped-1", {"action": "upload"})


def _w_principal(s: SQLiteKeyStore) -> None:
    s.add_principal("p1", b"k" * 32, {"action": "register"})


def _c_principal(s: SQLiteKeyStore) -> None:
    assert s.principal_key("p1") == b"k" * 32


def _w_nonce(s: SQLiteKeyStore) -> None:
    assert s.use_nonce("p1", "n" * 32, int(time.time()), horizon=600) is True


def _c_nonce(s: SQLiteKeyStore) -> None:
    # checking consumes nothing new: the nonce is already recorded, so this is refused
    assert s.use_nonce("p1", "n" * 32, int(time.time()), horizon=600) is False


def _c_model(s: SQLiteKeyStore) -> None:
    record = s.model("m")
    assert record is not None and record.owner_id == "owner" and record.current_version == 1
    assert s.wrapped_model_key("m", 1) == b"wrapped-1"


def _w_model_v2(s: SQLiteKeyStore) -> None:
    _with_model(s)
    s.put_model_key("m", "owner", 2, b"wrapped-2", {"action": "upload"})


def _c_model_v2(s: SQLiteKeyStore) -> None:
    record = s.model("m")
    assert record is not None and record.current_version == 2
    assert s.wrapped_model_key("m", 2) == b"wrapped-2"
    assert s.wrapped_model_key("m", 1) == b"wrapped-1"


def _w_allow(s: SQLiteKeyStore) -> None:
    _with_model(s)
    s.set_runtime_allowed("m", RuntimeId(TeeType.SIMULATED, M1.upper()), True, {"action": "allow"})
    s.set_runtime_allowed("m", R2, True, {"action": "allow"})


def _c_allow(s: SQLiteKeyStore) -> None:
    assert s.allowed_runtimes("m") == {R1, R2}


def _w_disallow(s: SQLiteKeyStore) -> None:
    _with_model(s)
    s.set_runtime_allowed("m", R1, True, {"action": "allow"})
    s.set_runtime_allowed("m", RuntimeId(TeeType.SIMULATED, M1.upper()), False, {"action": "disallow"})


def _c_disallow(s: SQLiteKeyStore) -> None:
    assert s.allowed_runtimes("m") == frozenset()


def _w_grant(s: SQLiteKeyStore) -> None:
    _with_model(s)
    s.set_grant("m", "u", True, {"action": "grant"})


def _c_grant(s: SQLiteKeyStore) -> None:
    assert s.is_granted("m", "u")


def _w_revoke(s: SQLiteKeyStore) -> None:
    _w_grant(s)
    s.set_grant("m", "u", False, {"action": "revoke"})


def _c_revoke(s: SQLiteKeyStore) -> None:
    assert not s.is_granted("m", "u")


def _w_consent(s: SQLiteKeyStore) -> None:
    _with_model(s)
    s.set_consent("m", "u", b"rk-1", [R1], {"action": "consent"})
    s.set_consent("m", "u", b"rk-2", [RuntimeId(TeeType.TDX, M2.upper())], {"action": "consent"})


def _c_consent(s: SQLiteKeyStore) -> None:
    consent = s.consent("m", "u")
    assert consent is not None
    assert consent.wrapped_request_key == b"rk-2"
    assert consent.runtimes == {R2}


def _w_audit(s: SQLiteKeyStore) -> None:
    s.audit({"action": "release", "decision": "deny", "reason": "r"})


def _c_audit(s: SQLiteKeyStore) -> None:
    assert _audit_events(s)[-1]["reason"] == "r"


def _w_meta(s: SQLiteKeyStore) -> None:
    assert s.set_meta_once("service_id", "first") == "first"
    assert s.set_meta_once("service_id", "second") == "first"


def _c_meta(s: SQLiteKeyStore) -> None:
    assert s.meta("service_id") == "first"


WRITES: dict[str, tuple[Callable[[SQLiteKeyStore], None], Callable[[SQLiteKeyStore], None]]] = {
    "principal": (_w_principal, _c_principal),
    "nonce": (_w_nonce, _c_nonce),
    "model_key": (_with_model, _c_model),
    "model_key_v2": (_w_model_v2, _c_model_v2),
    "runtime_allowed": (_w_allow, _c_allow),
    "runtime_disallowed": (_w_disallow, _c_disallow),
    "grant": (_w_grant, _c_grant),
    "revoke": (_w_revoke, _c_revoke),
    "consent": (_w_consent, _c_consent),
    "audit": (_w_audit, _c_audit),
    "meta": (_w_meta, _c_meta),
}


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_write_survives_reopen(db_path: Path, kind: str) -> None:
    write, check = WRITES[kind]
    store = SQLiteKeyStore(db_path)
    write(store)
    check(store)
    store = _reopen(db_path, store)
    check(store)
    assert store.verify_audit_chain() >= 0
    store.close()


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_write_is_visible_to_another_connection_before_close(db_path: Path, kind: str) -> None:
    """An acknowledged write is committed at once (no buffering until close)."""
    write, check = WRITES[kind]
    writer = SQLiteKeyStore(db_path)
    write(writer)
    reader = SQLiteKeyStore(db_path)
    try:
        check(reader)
    finally:
        reader.close()
        writer.close()


def test_acknowledged_writes_survive_a_killed_process(db_path: Path) -> None:
    """A process that exits abruptly (no close, no checkpoint) loses nothing it was told was written."""
    script = f"""
import os, time
from sealedml.attestation.base import TeeType
from sealedml.keyservice.store import RuntimeId, SQLiteKeyStore
s = SQLiteKeyStore({str(db_path)!r})
s.add_principal("p1", b"k" * 32, {{"action": "register"}})
s.put_model_key("m", "p1", 1, b"wrapped", {{"action": "upload"}})
s.set_runtime_allowed("m", RuntimeId(TeeType.SIMULATED, {M1!r}), True, {{"action": "allow"}})
s.set_grant("m", "u", True, {{"action": "grant"}})
s.set_consent("m", "u", b"rk", [RuntimeId(TeeType.SIMULATED, {M1!r})], {{"action": "consent"}})
s.use_nonce("p1", "n" * 32, int(time.time()), horizon=600)
s.audit({{"action": "release", "reason": "last"}})
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    store = SQLiteKeyStore(db_path)
    assert store.principal_key("p1") == b"k" * 32
    assert store.wrapped_model_key("m", 1) == b"wrapped"
    assert store.allowed_runtimes("m") == {R1}
    assert store.is_granted("m", "u")
    assert store.consent("m", "u") is not None
    assert store.use_nonce("p1", "n" * 32, int(time.time()), horizon=600) is False
    assert store.verify_audit_chain() == 6
    assert _audit_events(store)[-1]["reason"] == "last"
    store.close()


# ---------------------------------------------------------------------------- principals and ownership


def test_add_principal_is_idempotent_for_the_same_key(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    assert store.add_principal("p1", b"k" * 32, {"n": 1}) is True
    assert store.add_principal("p1", b"k" * 32, {"n": 2}) is False
    assert store.verify_audit_chain() == 1  # the repeat changed nothing and logged nothing


def test_add_principal_refuses_another_key_for_the_same_id(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    store.add_principal("p1", b"k" * 32, {"n": 1})
    with pytest.raises(Conflict):
        store.add_principal("p1", b"x" * 32, {"n": 2})
    assert store.principal_key("p1") == b"k" * 32


def test_put_model_key_refuses_another_owner(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    store.put_model_key("m", "owner", 1, b"w1", {"n": 1})
    with pytest.raises(Conflict, match="another principal"):
        store.put_model_key("m", "mallory", 2, b"evil", {"n": 2})
    record = store.model("m")
    assert record is not None and record.owner_id == "owner" and record.current_version == 1
    assert store.wrapped_model_key("m", 2) is None


@pytest.mark.parametrize("version", [1, 0, -3])
def test_put_model_key_refuses_a_version_that_is_not_newer(db_path: Path, version: int) -> None:
    store = SQLiteKeyStore(db_path)
    store.put_model_key("m", "owner", 1, b"w1", {"n": 1})
    with pytest.raises(Conflict, match="newer"):
        store.put_model_key("m", "owner", version, b"w-rollback", {"n": 2})
    assert store.wrapped_model_key("m", 1) == b"w1"
    assert store.model("m").current_version == 1  # type: ignore[union-attr]


def test_refused_write_leaves_no_audit_record(db_path: Path) -> None:
    """State change and audit record share one transaction: a refused write logs nothing from inside it."""
    store = SQLiteKeyStore(db_path)
    store.put_model_key("m", "owner", 1, b"w1", {"n": 1})
    with pytest.raises(Conflict):
        store.put_model_key("m", "mallory", 2, b"evil", {"n": 2})
    with pytest.raises(NotFound):
        store.set_grant("missing", "u", True, {"n": 3})
    assert store.verify_audit_chain() == 1


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.set_runtime_allowed("missing", R1, True, {}),
        lambda s: s.set_grant("missing", "u", True, {}),
        lambda s: s.set_consent("missing", "u", b"rk", [R1], {}),
    ],
    ids=["runtime", "grant", "consent"],
)
def test_writes_about_an_unknown_model_are_refused(db_path: Path, write: Callable[[SQLiteKeyStore], None]) -> None:
    store = SQLiteKeyStore(db_path)
    with pytest.raises(NotFound):
        write(store)
    assert store.allowed_runtimes("missing") == frozenset()
    assert not store.is_granted("missing", "u")
    assert store.consent("missing", "u") is None


# ---------------------------------------------------------------------------- nonces


def test_nonce_replay_returns_false(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    now = int(time.time())
    assert store.use_nonce("p1", "a" * 32, now, horizon=600) is True
    assert store.use_nonce("p1", "a" * 32, now, horizon=600) is False
    assert store.use_nonce("p1", "a" * 32, now + 5, horizon=600) is False  # a new timestamp does not help


def test_nonces_are_per_principal(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    now = int(time.time())
    assert store.use_nonce("p1", "a" * 32, now, horizon=600) is True
    assert store.use_nonce("p2", "a" * 32, now, horizon=600) is True


def test_nonces_within_the_horizon_are_kept(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    now = int(time.time())
    assert store.use_nonce("p1", "a" * 32, now - 500, horizon=600) is True
    assert store.use_nonce("p1", "b" * 32, now, horizon=600) is True  # triggers the clean-up
    assert store.use_nonce("p1", "a" * 32, now - 500, horizon=600) is False


def test_nonces_older_than_the_horizon_are_forgotten(db_path: Path) -> None:
    """Bounded storage: the timestamp window (not the table) refuses calls that old."""
    store = SQLiteKeyStore(db_path)
    now = int(time.time())
    assert store.use_nonce("p1", "a" * 32, now - 1000, horizon=600) is True
    assert store.use_nonce("p1", "a" * 32, now - 1000, horizon=600) is True


# ---------------------------------------------------------------------------- audit chain


def _store_with_audit(db_path: Path, n: int = 5) -> SQLiteKeyStore:
    store = SQLiteKeyStore(db_path)
    for i in range(n):
        store.audit({"action": "release", "decision": "deny", "reason": f"reason {i}"})
    return store


def _tamper(db_path: Path, sql: str, args: tuple[object, ...] = ()) -> None:
    db = sqlite3.connect(str(db_path))
    try:
        db.execute(sql, args)
        db.commit()
    finally:
        db.close()


def test_audit_chain_verifies_and_links_every_record(db_path: Path) -> None:
    store = _store_with_audit(db_path)
    store.put_model_key("m", "o", 1, b"w", {"action": "upload"})
    assert store.verify_audit_chain() == 6
    records = list(store.audit_records())
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0].prev_hash == GENESIS
    for prev, record in itertools.pairwise(records):
        assert record.prev_hash == prev.hash
        assert record.hash == chain_hash(prev.hash, record.seq, record.timestamp, record.event)
    assert [r.seq for r in store.audit_records(since=4)] == [5, 6]
    store.close()
    assert SQLiteKeyStore(db_path).verify_audit_chain() == 6


def test_audit_chain_detects_an_edited_event(db_path: Path) -> None:
    _store_with_audit(db_path).close()
    _tamper(
        db_path,
        "UPDATE audit SET event = ? WHERE seq = 3",
        ('{"action":"release","decision":"allow","reason":"reason 2"}',),
    )
    with pytest.raises(StoreError, match="broken at record 3"):
        SQLiteKeyStore(db_path).verify_audit_chain()


def test_audit_chain_detects_an_edited_timestamp(db_path: Path) -> None:
    _store_with_audit(db_path).close()
    _tamper(db_path, "UPDATE audit SET ts = ts + 1 WHERE seq = 2")
    with pytest.raises(StoreError, match="broken at record 2"):
        SQLiteKeyStore(db_path).verify_audit_chain()


def test_audit_chain_detects_an_edited_prev_hash(db_path: Path) -> None:
    _store_with_audit(db_path).close()
    _tamper(db_path, "UPDATE audit SET prev_hash = ? WHERE seq = 4", ("f" * 64,))
    with pytest.raises(StoreError, match="broken at record 4"):
        SQLiteKeyStore(db_path).verify_audit_chain()


def test_audit_chain_detects_a_deleted_record(db_path: Path) -> None:
    _store_with_audit(db_path).close()
    _tamper(db_path, "DELETE FROM audit WHERE seq = 3")
    with pytest.raises(StoreError, match="broken at record 4"):
        SQLiteKeyStore(db_path).verify_audit_chain()


def test_audit_chain_detects_a_deleted_first_record(db_path: Path) -> None:
    _store_with_audit(db_path).close()
    _tamper(db_path, "DELETE FROM audit WHERE seq = 1")
    with pytest.raises(StoreError, match="broken at record 2"):
        SQLiteKeyStore(db_path).verify_audit_chain()


def test_audit_chain_detects_a_rehashed_record(db_path: Path) -> None:
    """Recomputing one record's hash after editing it breaks the link to the next one."""
    _store_with_audit(db_path).close()
    db = sqlite3.connect(str(db_path))
    seq, ts, prev = db.execute("SELECT seq, ts, prev_hash FROM audit WHERE seq = 2").fetchone()
    forged = {"action": "release", "decision": "allow", "reason": "forged"}
    db.execute(
        "UPDATE audit SET event = ?, hash = ? WHERE seq = 2", (json.dumps(forged), chain_hash(prev, seq, ts, forged))
    )
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="broken at record 3"):
        SQLiteKeyStore(db_path).verify_audit_chain()


def test_audit_chain_detects_reordered_records(db_path: Path) -> None:
    _store_with_audit(db_path).close()
    db = sqlite3.connect(str(db_path))
    db.execute("UPDATE audit SET seq = 100 WHERE seq = 2")
    db.execute("UPDATE audit SET seq = 2 WHERE seq = 3")
    db.execute("UPDATE audit SET seq = 3 WHERE seq = 100")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="broken at record 2"):
        SQLiteKeyStore(db_path).verify_audit_chain()


def test_appends_after_reopen_continue_the_chain(db_path: Path) -> None:
    _store_with_audit(db_path, 2).close()
    store = SQLiteKeyStore(db_path)
    store.audit({"action": "after-reopen"})
    assert store.verify_audit_chain() == 3


def test_unopenable_store_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SQLiteKeyStore(tmp_path / "missing-dir" / "ks.sqlite3")
    bogus = tmp_path / "not-a-db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        SQLiteKeyStore(bogus)


# ---------------------------------------------------------------------------- anchored audit head

ANCHOR_KEY = b"\x01" * 32


def _anchored(db_path: Path, records: int = 5) -> SQLiteKeyStore:
    store = SQLiteKeyStore(db_path, anchor=AuditAnchor(ANCHOR_KEY))
    store.add_principal("p1", b"k" * 32, {"action": "register"})
    for i in range(records - 1):
        store.audit({"action": "release", "decision": "deny", "reason": f"reason {i}"})
    return store


def _reopen_anchored(db_path: Path) -> SQLiteKeyStore:
    return SQLiteKeyStore(db_path, anchor=AuditAnchor(ANCHOR_KEY))


def test_anchored_chain_verifies_and_its_anchor_follows_every_append(db_path: Path) -> None:
    store = _anchored(db_path)
    assert store.verify_audit_chain() == 5
    assert store.check_audit_anchor().records == 5
    store.close()
    reopened = _reopen_anchored(db_path)
    reopened.audit({"action": "after-reopen"})
    assert reopened.verify_audit_chain() == 6


def test_truncated_audit_log_is_detected_on_start_and_by_verify(db_path: Path) -> None:
    """Deleting the last records keeps a valid chain; the anchor still says how long it was."""
    _anchored(db_path).close()
    _tamper(db_path, "DELETE FROM audit WHERE seq > 3")
    store = _reopen_anchored(db_path)
    plain = SQLiteKeyStore(db_path)
    assert plain.verify_audit_chain() == 3  # the chain alone cannot see it
    with pytest.raises(StoreError, match="5 anchored"):
        store.check_audit_anchor()
    with pytest.raises(StoreError, match="truncated"):
        store.verify_audit_chain()


def test_truncated_audit_log_refuses_the_next_append(db_path: Path) -> None:
    """The next record must not chain on cleanly after the gap."""
    _anchored(db_path).close()
    _tamper(db_path, "DELETE FROM audit WHERE seq = 5")
    store = _reopen_anchored(db_path)
    with pytest.raises(StoreError, match="does not match its anchor"):
        store.audit({"action": "next"})
    with pytest.raises(StoreError):
        store.add_principal("p2", b"j" * 32, {"action": "register"})
    assert store.principal_key("p2") is None  # the state change was rolled back with its record


def test_audit_log_removed_with_its_anchor_is_detected(db_path: Path) -> None:
    _anchored(db_path).close()
    _tamper(db_path, "DELETE FROM audit")
    _tamper(db_path, "DELETE FROM meta WHERE key = 'audit_anchor'")
    store = _reopen_anchored(db_path)
    with pytest.raises(StoreError, match="holds audited state"):
        store.check_audit_anchor()
    with pytest.raises(StoreError, match="holds audited state"):
        store.verify_audit_chain()


def test_removed_anchor_is_detected(db_path: Path) -> None:
    _anchored(db_path).close()
    _tamper(db_path, "DELETE FROM meta WHERE key = 'audit_anchor'")
    with pytest.raises(StoreError, match="no anchor"):
        _reopen_anchored(db_path).check_audit_anchor()


def test_forged_anchor_is_detected(db_path: Path) -> None:
    """Rewriting the anchor for a truncated log needs the anchor key, which the database never sees."""
    _anchored(db_path).close()
    _tamper(db_path, "DELETE FROM audit WHERE seq > 3")
    head = SQLiteKeyStore(db_path).audit_head()
    forged = AuditAnchor(b"\x02" * 32).tag(head)
    _tamper(
        db_path,
        "UPDATE meta SET value = ? WHERE key = 'audit_anchor'",
        (json.dumps({"records": head.records, "head": head.head, "tag": forged}),),
    )
    with pytest.raises(StoreError, match="does not authenticate"):
        _reopen_anchored(db_path).check_audit_anchor()
    with pytest.raises(StoreError, match="truncated"):
        _reopen_anchored(db_path).verify_audit_chain()


def test_malformed_anchor_is_a_store_error(db_path: Path) -> None:
    _anchored(db_path).close()
    _tamper(db_path, "UPDATE meta SET value = 'not json' WHERE key = 'audit_anchor'")
    with pytest.raises(StoreError, match="malformed"):
        _reopen_anchored(db_path).check_audit_anchor()


def test_fresh_anchored_store_has_nothing_to_check(db_path: Path) -> None:
    store = _reopen_anchored(db_path)
    assert store.check_audit_anchor() == AuditHead(0, GENESIS)
    assert store.verify_audit_chain() == 0


def test_store_of_another_schema_is_refused(db_path: Path) -> None:
    """A schema-1 store kept runtime measurements without TEE types: it is refused, not guessed at."""
    db = sqlite3.connect(str(db_path))
    db.execute("CREATE TABLE runtimes (model_id TEXT NOT NULL, measurement TEXT NOT NULL)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 1"):
        SQLiteKeyStore(db_path)


def test_tampered_allow_list_tee_type_is_a_store_error(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    store.put_model_key("m", "o", 1, b"w", {"action": "upload"})
    store.set_runtime_allowed("m", R1, True, {"action": "allow"})
    store.close()
    _tamper(db_path, "UPDATE runtimes SET tee = 'nitro'")
    with pytest.raises(StoreError, match="unknown TEE type"):
        SQLiteKeyStore(db_path).allowed_runtimes("m")


def test_concurrent_audit_appends_are_grouped_yet_each_durable_and_chained(db_path: Path) -> None:
    """Group commit: many threads appending at once; every record lands once, in one valid chain."""
    import threading

    store = SQLiteKeyStore(db_path, anchor=AuditAnchor(ANCHOR_KEY))
    commits: list[int] = []
    original = store._tx

    def counting_tx():  # type: ignore[no-untyped-def]
        commits.append(1)
        return original()

    store._tx = counting_tx  # type: ignore[method-assign]

    def work(worker: int) -> None:
        for i in range(50):
            store.audit({"action": "release", "worker": worker, "i": i})

    threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.verify_audit_chain() == 800
    seen = {(r.event["worker"], r.event["i"]) for r in store.audit_records()}
    assert len(seen) == 800
    assert len(commits) < 800  # records shared transactions


def test_a_failed_group_commit_fails_every_caller_in_the_group(db_path: Path) -> None:
    """A record whose group failed is reported to its caller, never silently dropped."""
    _anchored(db_path).close()
    _tamper(db_path, "DELETE FROM audit WHERE seq = 5")  # every append now refuses to chain
    store = _reopen_anchored(db_path)
    with pytest.raises(StoreError, match="does not match its anchor"):
        store.audit({"action": "release"})
    assert store.audit_head().records == 4


def test_partition_digest_and_acceptance_survive_a_reopen(db_path: Path) -> None:
    store = SQLiteKeyStore(db_path)
    store.put_model_key("m", "owner", 1, b"w1", {"action": "upload"})
    assert store.model("m") == ModelRecord("m", "owner", 1, None)
    store.put_model_key("m", "owner", 2, b"w2", {"action": "upload"}, partition_sha256="ab" * 32)
    runtime = RuntimeId(TeeType.SIMULATED, "cd" * 48)
    store.set_consent("m", "u", b"rk", [runtime], {"action": "consent"}, accept_partitioned=True)
    store.set_consent("m", "v", b"rk", [runtime], {"action": "consent"})
    store = _reopen(db_path, store)
    assert store.model("m") == ModelRecord("m", "owner", 2, "ab" * 32)  # the current version's record
    consent_u, consent_v = store.consent("m", "u"), store.consent("m", "v")
    assert consent_u is not None and consent_u.accept_partitioned
    assert consent_v is not None and not consent_v.accept_partitioned
    store.set_consent("m", "u", b"rk", [runtime], {"action": "consent"})  # enabling again without the flag
    consent_u = store.consent("m", "u")
    assert consent_u is not None and not consent_u.accept_partitioned
