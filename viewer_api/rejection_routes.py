"""Rejecting and restoring instances over HTTP (IHE IOCM; logic in :mod:`pacs.studies.rejection`): thin routes.

=================================================  ===============  ==========================================
route                                              capability       answers
=================================================  ===============  ==========================================
``POST /api/studies/{study}/reject``               study.reject     the rejection note and the rejected UIDs
``POST /api/studies/{study}/restore``              study.reject     the restored UIDs, notes deleted/created
``GET /api/rejected``                              study.reject     rejected (not deleted) instances in scope
=================================================  ===============  ==========================================

Body of ``reject``: ``{"reason": "quality" | "patient-safety" | "incorrect-worklist-entry" |
"retention-expired", "series": [uids]?, "instances": [uids]?}`` — the whole study when neither list is given.
Radiologists reject (and restore) for ``quality`` only (403). A study the caller may not change (another
facility's, one it only borrows) is a 404 like an unknown one; a series or instance not of the study is a 400
and nothing is rejected. Every refusal is audited by the core, every success too.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies import rejection
from viewer_api.security import audit_access, audited, context, require

router = APIRouter(tags=["study management"])

Uid = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]
UidList = list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]]


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(max_length=32, description="quality, patient-safety, incorrect-worklist-entry or "
                        "retention-expired (IHE IOCM, CID 7011)")
    series: UidList | None = Field(None, max_length=1000, description="Series Instance UIDs of the study")
    instances: UidList | None = Field(None, max_length=10000, description="SOP Instance UIDs of the study")


class RestoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    series: UidList | None = Field(None, max_length=1000)
    instances: UidList | None = Field(None, max_length=10000)


@router.post("/api/studies/{study}/reject", summary="Reject a study, or series/instances of it (IHE IOCM)")
async def post_reject(request: Request, study: Uid, body: RejectIn,
                      principal: Principal = require(Capability.STUDY_REJECT)) -> dict[str, Any]:  # noqa: B008
    result = await run_in_threadpool(rejection.reject, context(request), principal, study, body.reason,
                                     series=body.series, instances=body.instances)
    return {"study_instance_uid": result.study_instance_uid, "reason": result.reason,
            "note_sop_instance_uid": result.note_sop_instance_uid, "rejected": result.rejected,
            "count": len(result.rejected)}


@router.post("/api/studies/{study}/restore", summary="Restore rejected instances not yet deleted")
async def post_restore(request: Request, study: Uid, body: RestoreIn | None = None,
                       principal: Principal = require(Capability.STUDY_REJECT)) -> dict[str, Any]:  # noqa: B008
    body = body or RestoreIn()
    result = await run_in_threadpool(rejection.restore, context(request), principal, study,
                                     series=body.series, instances=body.instances)
    return {"study_instance_uid": result.study_instance_uid, "restored": result.restored,
            "count": len(result.restored), "notes_deleted": result.notes_deleted,
            "notes_created": result.notes_created}


@router.get("/api/rejected", summary="Rejected instances not yet deleted (study, series, reason, when, by)")
def get_rejected(request: Request,
                 study: str = Query("", max_length=64, pattern=r"^[0-9.]*$"),
                 reason: str = Query("", max_length=32),
                 limit: int = Query(1000, ge=1, le=rejection.MAX_LISTED),
                 principal: Principal = require(Capability.STUDY_REJECT)) -> list[dict[str, Any]]:  # noqa: B008
    with audited(request, principal, "instance.rejected-list", study), context(request).read_sessions() as session:
        items = rejection.list_rejected(session, principal, study_uid=study or None, reason=reason or None,
                                        limit=limit)
    audit_access(request, principal, "instance.rejected-list", study_instance_uid=study,
                 detail=f"{len(items)} rejected instance(s)" + (f" reason={reason}" if reason else ""))
    return [{"sop_instance_uid": i.sop_instance_uid, "series_instance_uid": i.series_instance_uid,
             "study_instance_uid": i.study_instance_uid, "facility": i.facility, "reason": i.reason,
             "note_sop_instance_uid": i.note_sop_instance_uid, "rejected_at": i.rejected_at.isoformat(),
             "rejected_by": i.rejected_by, "size": i.size} for i in items]
