"""What the KeyService tells a model's owner and its granted users about the model.

Callers of the release protocol only ever see ``denied``; the exact reason goes to
the audit log. The people behind a model may know more, each about what is theirs:

* a **granted user** learns the category of the reason their own requests would be
  denied now (:func:`access_category`), derived from their own pair's state only —
  never another user's grant or consent;
* the **owner** reads the audit records that concern the model
  (:func:`owner_audit_page`), with every other model's pairs removed from release
  events, and sees every grant and consent in ``model info``.

A stranger (neither owner nor granted) still gets ``denied`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sealedml.errors import AccessDenied
from sealedml.keyservice.access import PairState
from sealedml.keyservice.store import AuditRecord, KeyStore
from sealedml.protocol import keyservice as p

__all__ = [
    "access_category",
    "delete_model",
    "list_models",
    "model_audit",
    "model_info",
    "owner_audit_page",
    "runtime_names",
]

_HINTS = {
    "ok": "your requests can be served",
    "not_enabled": "you have not enabled the model: run `sealedml model enable {model}`",
    "no_runtime_allowed": "the owner allows no runtime for this model yet: ask them to run "
    "`sealedml model allow-runtime {model}`",
    "no_common_runtime": "no runtime the owner allows is one you consented to: compare `allowed_runtimes` in "
    "`sealedml model info {model}` with your `sealedml model enable {model} --measurement ...`",
    "partition_not_accepted": "the current version is partitioned and you did not accept that: "
    "`sealedml model enable {model} --accept-partitioned` (docs/partition.md)",
}


def runtime_names(runtimes: Iterable[Any]) -> list[str]:
    """Runtimes as ``TEE:measurement``, sorted."""
    return sorted(f"{r.tee.value}:{r.measurement}" for r in runtimes)


def access_category(state: PairState) -> tuple[str, str]:
    """The category of why a granted user's requests would be denied now (or ``ok``), and what to do.

    Evidence-dependent reasons (a runtime's TCB, the operator's policy) are not known
    before a runtime attests; they show in the owner's audit records.
    """
    if state.consent is None:
        category = "not_enabled"
    elif not state.allowed_runtimes:
        category = "no_runtime_allowed"
    elif not state.runtimes:
        category = "no_common_runtime"
    elif state.model is not None and state.model.partition_sha256 is not None and not state.consent.accept_partitioned:
        category = "partition_not_accepted"
    else:
        category = "ok"
    return category, _HINTS[category].format(model=state.model_id)


def _about(event: dict[str, Any], model_id: str) -> dict[str, Any] | None:
    """The event as the model's owner may see it, or None when it does not concern the model."""
    if event.get("model_id") == model_id:
        return {k: v for k, v in event.items() if k != "rows"}
    pairs = event.get("pairs")
    if isinstance(pairs, list):
        mine = [pair for pair in pairs if isinstance(pair, list) and pair and pair[0] == model_id]
        if mine:
            shown = {**{k: v for k, v in event.items() if k != "rows"}, "pairs": mine}
            reason = str(event.get("reason", ""))
            # A release's denial names its pair as "model/user: why"; another model's is not the owner's business.
            if "/" in reason.split(":", 1)[0] and not reason.startswith(f"{model_id}/"):
                shown["reason"] = "another model's pair in the same release was denied"
            return shown
    return None


def owner_audit_page(
    records: Iterable[AuditRecord], model_id: str, limit: int
) -> tuple[list[tuple[int, float, dict[str, Any]]], int | None]:
    """Up to ``limit`` records about ``model_id`` from ``records`` (in order), and where the next page starts."""
    page: list[tuple[int, float, dict[str, Any]]] = []
    for record in records:
        event = _about(dict(record.event), model_id)
        if event is None:
            continue
        if len(page) == limit:
            return page, page[-1][0]
        page.append((record.seq, record.timestamp, event))
    return page, None


def model_info(
    store: KeyStore, principal: str, model_id: str, pair_state: Callable[[str, str], PairState]
) -> p.ModelInfoResponse:
    """What the caller may know of a model (owner, or a granted user)."""
    record = store.model(model_id)
    granted = store.is_granted(model_id, principal)
    if record is None or (record.owner_id != principal and not granted):
        store.audit(
            {
                "action": "model_info",
                "principal": principal,
                "model_id": model_id,
                "decision": "deny",
                "reason": "no such model" if record is None else "neither owner nor granted",
            }
        )
        raise AccessDenied()
    state = pair_state(model_id, principal)
    consent, owner = state.consent, record.owner_id == principal
    access = access_category(state) if granted else (None, None)
    signature = p.ModelSignature.model_validate_json(record.signature) if record.signature else None
    return p.ModelInfoResponse(
        model_id=model_id,
        current_version=record.current_version,
        is_owner=owner,
        granted=granted,
        consented=consent is not None,
        partitioned=record.partition_sha256 is not None,
        partition_sha256=record.partition_sha256,
        accepts_partitioned=consent is not None and consent.accept_partitioned,
        allowed_runtimes=runtime_names(state.allowed_runtimes),
        access=access[0],
        access_hint=access[1],
        inputs=signature.inputs if signature is not None else None,
        outputs=signature.outputs if signature is not None else None,
        grants=store.granted_users(model_id) if owner else None,
        consents=[
            p.ConsentSummary(
                user_id=c.user_id, runtimes=runtime_names(c.runtimes), accept_partitioned=c.accept_partitioned
            )
            for c in store.consents(model_id)
        ]
        if owner
        else None,
    )


def model_audit(store: KeyStore, principal: str, model_id: str, req: p.ModelAuditRequest) -> p.ModelAuditResponse:
    """The audit records about the caller's model (owner only), oldest first, a page at a time.

    Raises:
        AccessDenied: the caller is not the model's owner (or there is no such model).
    """
    record = store.model(model_id)
    if record is None or record.owner_id != principal:
        store.audit(
            {
                "action": "model_audit",
                "principal": principal,
                "model_id": model_id,
                "decision": "deny",
                "reason": "no such model" if record is None else "not the owner",
            }
        )
        raise AccessDenied()
    page, next_since = owner_audit_page(store.audit_records(req.since), model_id, req.limit)
    return p.ModelAuditResponse(
        model_id=model_id,
        records=[p.ModelAuditRecord(seq=seq, ts=ts, event=event) for seq, ts, event in page],
        next_since=next_since,
    )


def list_models(store: KeyStore, principal: str) -> p.ModelListResponse:
    """The models ``principal`` owns, with their current version."""
    return p.ModelListResponse(
        models=[
            p.ModelSummary(
                model_id=m.model_id, current_version=m.current_version, partitioned=m.partition_sha256 is not None
            )
            for m in store.models_of(principal)
        ]
    )


def delete_model(store: KeyStore, principal: str, model_id: str) -> None:
    """Delete ``model_id`` with its keys, allowed runtimes, grants and consents (owner only; audited).

    Raises:
        AccessDenied: the caller is not the model's owner (or there is no such model).
    """
    record = store.model(model_id)
    event = {"action": "delete_model", "principal": principal, "model_id": model_id}
    if record is None or record.owner_id != principal:
        store.audit({**event, "decision": "deny", "reason": "no such model" if record is None else "not the owner"})
        raise AccessDenied()
    store.delete_model(model_id, {**event, "decision": "allow", "reason": "owner"})
