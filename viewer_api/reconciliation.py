"""The reconciliation queue under ``/api/reconciliation`` (logic in :mod:`pacs.reconciliation.service`).

=================================================  ===============  ==========================================
route                                              capability       answers
=================================================  ===============  ==========================================
``GET /api/reconciliation``                        study.reconcile  held objects of the caller's facility
``GET /api/reconciliation/{id}``                   study.reconcile  one held object
``POST /api/reconciliation/{id}/resolve``          study.reconcile  the held object after ``action``
=================================================  ===============  ==========================================

``study.reconcile`` is the admin's and the technologist's. Scope: a facility user sees and resolves its own
facility's queue only (another facility's item is a 404, the same as a missing one); an unrestricted admin
every queue, including that of studies of no facility. Resolve body: ``{"action": "file" | "separate" |
"discard", "reason": "...", "study_instance_uid": "..."?}`` (the last only with ``separate``, to gather several
objects in one new study). Every listing, read and action is audited, the action with who and why.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from pacs.errors import NotFound
from pacs.reconciliation import service as reconciliation
from pacs.reconciliation.service import HeldItem
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.security import audit_access, audited, client_address, context, require

# a row id: an out-of-range number is a 422, not a database error
ItemId = Annotated[int, Path(ge=1, le=2**31 - 1)]

router = APIRouter(prefix="/api/reconciliation", tags=["reconciliation"])


class ResolveIn(BaseModel):
    action: str = Field(description="file (into the study it names, as received), separate (as a study of "
                        "its own, new Study/Series Instance UIDs) or discard", max_length=16)
    reason: str = Field(min_length=1, max_length=1024, description="why: written to the audit trail")
    study_instance_uid: str = Field(default="", max_length=64,
                                    description="separate only: the new study to gather objects in")


@router.get("", summary="Held objects (not filed) of the caller's facility, oldest first")
def search(request: Request, state: str = Query("pending", max_length=16, description="pending, filed, "
                                                "separated, discarded or all"),
           limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=1_000_000),
           principal: Principal = require(Capability.STUDY_RECONCILE)) -> list[dict[str, Any]]:  # noqa: B008
    with audited(request, principal, "reconciliation.read"), context(request).read_sessions() as session:
        items = reconciliation.list_items(session, principal.scope.facilities, None if state == "all" else state,
                                          limit, offset)
    audit_access(request, principal, "reconciliation.read", detail=f"{len(items)} held object(s)")
    return [item_json(i) for i in items]


@router.get("/{item_id}", summary="One held object")
def read(item_id: ItemId, request: Request,
         principal: Principal = require(Capability.STUDY_RECONCILE)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "reconciliation.read"), context(request).read_sessions() as session:
        item = reconciliation.get_item(session, item_id, principal.scope.facilities)
    audit_access(request, principal, "reconciliation.read", patient_id=item.patient_id,
                 study_instance_uid=item.study_instance_uid, detail=f"held object {item_id}")
    return item_json(item)


@router.post("/{item_id}/resolve", summary="File, separate or discard a held object (audited with the reason)")
def resolve(item_id: ItemId, body: ResolveIn, request: Request,
            principal: Principal = require(Capability.STUDY_RECONCILE)) -> dict[str, Any]:  # noqa: B008
    ctx = context(request)
    with audited(request, principal, "reconciliation.resolve"):
        if principal.scope.patient_ids is not None or principal.scope.study_uids is not None:
            raise NotFound(f"no held object {item_id}")
        item = reconciliation.resolve(
            ctx.sessions, ctx.store, request.app.state.ingestor, item_id, body.action.strip(), reason=body.reason,
            actor=principal.subject, role=principal.role.value,
            address=principal.source_address or client_address(request), facilities=principal.scope.facilities,
            study_instance_uid=body.study_instance_uid.strip())
    return item_json(item)


def item_json(i: HeldItem) -> dict[str, Any]:
    return {
        "id": i.id, "state": i.state, "facility": i.facility, "reason": i.reason, "detail": i.detail,
        "study_instance_uid": i.study_instance_uid, "series_instance_uid": i.series_instance_uid,
        "sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
        "patient": {"id": i.patient_id, "issuer": i.issuer_of_patient_id, "name": i.patient_name},
        "expected_patient": {"id": i.expected_patient_id, "issuer": i.expected_issuer_of_patient_id},
        "sender": {"transport": i.transport, "ae_title": i.source_ae, "address": i.source_address,
                   "user": i.source_user, "facility": i.source_facility, "registered": i.source_trusted},
        "sha256": i.sha256, "size": i.size, "received_at": i.received_at.isoformat() if i.received_at else None,
        "resolved": None if i.resolved_at is None else {
            "at": i.resolved_at.isoformat(), "by": i.resolved_by, "reason": i.resolution_note,
            "study_instance_uid": i.resolved_study_instance_uid or None},
    }
