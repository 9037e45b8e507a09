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

from collections.abc import Iterable
from typing import Any

from sealedml.keyservice.access import PairState
from sealedml.keyservice.store import AuditRecord

__all__ = ["access_category", "owner_audit_page", "runtime_names"]

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
