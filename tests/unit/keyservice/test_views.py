"""What owners and granted users may learn about their own model: access categories, the owner's
audit records and ``model info``; strangers learn only "denied"."""

from __future__ import annotations

import pytest

from sealedml.errors import AccessDenied, NotFound
from sealedml.keyservice.store import AuditRecord
from sealedml.keyservice.views import owner_audit_page
from sealedml.protocol import keyservice as p
from tests.unit.keyservice.test_service import Harness, h  # noqa: F401  (the fixture)


def test_grant_to_an_unregistered_principal_is_refused_and_audited(h: Harness) -> None:  # noqa: F811
    owner, _ = h.publish("m")
    with pytest.raises(NotFound, match="register"):
        h.call(owner, "grant", "m", p.GrantRequest(user_id="ab" * 32))
    assert h.last_audit(action="grant")["reason"] == "no such principal"
    assert h.svc.store.granted_users("m") == []
    h.call(owner, "grant", "m", p.GrantRequest(user_id="ab" * 32, grant=False))  # revoking a stranger is harmless


def test_each_access_category_for_a_granted_user(h: Harness) -> None:  # noqa: F811
    user = h.register()
    owner = h.register()
    h.upload(owner, "m")
    h.call(owner, "grant", "m", p.GrantRequest(user_id=user.principal_id))

    def access() -> str:
        return str(h.call(user, "model_info", "m").access)

    assert access() == "not_enabled"
    h.enable(user, "m")
    info = h.call(user, "model_info", "m")
    assert info.access == "no_runtime_allowed" and "model allow-runtime m" in info.access_hint
    h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(measurement="ab" * 48))
    assert access() == "no_common_runtime"
    h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(measurement=h.runtime))
    info = h.call(user, "model_info", "m")
    assert info.access == "ok" and f"simulated:{h.runtime}" in info.allowed_runtimes
    assert info.grants is None and info.consents is None  # nothing about other users


def test_the_owner_sees_grants_and_consents_never_keys(h: Harness) -> None:  # noqa: F811
    users = [h.register(), h.register()]
    owner, _ = h.publish("m", users)
    info = h.call(owner, "model_info", "m")
    assert info.access is None and info.grants == sorted(u.principal_id for u in users)
    assert [c.user_id for c in info.consents] == sorted(u.principal_id for u in users)
    assert all(c.runtimes == [f"simulated:{h.runtime}"] and not c.accept_partitioned for c in info.consents)
    assert "request" not in info.model_dump_json()


def test_the_owner_reads_the_exact_reason_strangers_and_users_read_nothing(h: Harness) -> None:  # noqa: F811
    user, stranger = h.register(), h.register()
    owner, _ = h.publish("m", [user])
    h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(measurement=h.runtime, allow=False))
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id)])
    page = h.call(owner, "model_audit", "m", p.ModelAuditRequest())
    denial = [r.event for r in page.records if r.event["action"] == "release"][-1]
    assert denial["reason"] == f"m/{user.principal_id}: owner allows no runtime measurement"
    assert all("rows" not in r.event for r in page.records) and page.next_since is None
    for caller in (user, stranger):
        with pytest.raises(AccessDenied):
            h.call(caller, "model_audit", "m", p.ModelAuditRequest())
    assert h.last_audit(action="model_audit")["reason"] == "not the owner"


def test_audit_pages_follow_each_other(h: Harness) -> None:  # noqa: F811
    owner, _ = h.publish("m")
    for i in range(5):
        h.call(owner, "allow_runtime", "m", p.AllowRuntimeRequest(measurement=f"{i:02x}" * 48))
    first = h.call(owner, "model_audit", "m", p.ModelAuditRequest(limit=3))
    assert len(first.records) == 3 and first.next_since == first.records[-1].seq
    rest = h.call(owner, "model_audit", "m", p.ModelAuditRequest(since=first.next_since, limit=100))
    seqs = [r.seq for r in first.records + rest.records]
    assert seqs == sorted(set(seqs)) and rest.next_since is None and len(seqs) == 7  # key, 1 + 5 runtimes


def test_other_models_pairs_and_reasons_are_removed():
    def record(seq: int, event: dict) -> AuditRecord:
        return AuditRecord(seq, float(seq), event, "", "")

    records = [
        record(
            1,
            {
                "action": "release",
                "pairs": [["a", "u"], ["m", "v"]],
                "reason": "a/u: user not granted",
                "decision": "deny",
            },
        ),
        record(2, {"action": "release", "pairs": [["a", "u"]], "reason": "a/u: x", "decision": "deny"}),
        record(3, {"action": "grant", "model_id": "m", "user_id": "v", "rows": ["secret-row-digest"]}),
        record(4, {"action": "release", "pairs": [["m", "v"]], "reason": "m/v: policy: tcb", "decision": "deny"}),
    ]
    page, more = owner_audit_page(records, "m", 10)
    assert [seq for seq, _, _ in page] == [1, 3, 4] and more is None
    assert page[0][2]["pairs"] == [["m", "v"]] and "a/u" not in str(page[0][2])
    assert "rows" not in page[1][2] and page[2][2]["reason"] == "m/v: policy: tcb"


def test_the_owner_lists_and_deletes_their_models(h: Harness) -> None:  # noqa: F811
    user, mallory = h.register(), h.register()
    owner, _ = h.publish("m", [user])
    h.upload(owner, "n")
    listed = h.svc.list_models(owner.principal_id)
    assert [(m.model_id, m.current_version) for m in listed.models] == [("m", 1), ("n", 1)]
    assert h.svc.list_models(mallory.principal_id).models == []
    h.release([("m", user.principal_id)])  # served before the deletion
    with pytest.raises(AccessDenied):
        h.svc.delete_model(mallory.principal_id, "m")
    assert h.last_audit(action="delete_model")["reason"] == "not the owner"
    h.svc.delete_model(owner.principal_id, "m")
    event = h.last_audit(action="delete_model")
    assert event["decision"] == "allow"
    assert {row[0] for row in event["rows"]} == {"models", "model_keys", "runtimes", "grants", "consents"}
    with pytest.raises(AccessDenied):
        h.release([("m", user.principal_id)])
    assert h.last_audit(action="release")["reason"].endswith("no such model")
    with pytest.raises(AccessDenied):
        h.call(owner, "model_info", "m")
    assert [m.model_id for m in h.svc.list_models(owner.principal_id).models] == ["n"]
    # the id is free again; nothing of the old model's grants or keys comes back with it
    h.upload(mallory, "m")
    assert h.svc.store.granted_users("m") == [] and h.svc.store.consents("m") == []
    with pytest.raises(AccessDenied):
        h.svc.delete_model(owner.principal_id, "gone")
