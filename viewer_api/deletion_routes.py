"""Deleting studies and rejected instances, and study retention, over HTTP (logic in :mod:`pacs.studies.deletion`
and :mod:`pacs.studies.retention`; every route needs ``study.delete``, the admin's).

=========================================  ==========================================================================
route                                      answers
=========================================  ==========================================================================
``DELETE /api/studies/{study}``            204: the study, its objects, derived products, reports, links are gone
``DELETE /api/rejected/{sop}``             204: a rejected instance deleted now (before its retention ends)
``GET /api/retention/due``                 the studies due under the facility retention policy (paged)
``POST /api/retention/delete``             deletes the confirmed studies that are due; the others listed, refused
=========================================  ==========================================================================

The reason comes in the JSON body (``{"reason": "..."}``) or as ``?reason=``. A study of another facility is a
404, like an unknown one. Every deletion and every refusal is audited (by the core, so the CLI's are too).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies import deletion, retention
from pacs.studies.common import MAX_REASON
from viewer_api.security import context, require

router = APIRouter(tags=["study management"])

REASON_HELP = "why: written to the audit trail (or in the body)"


class DeleteIn(BaseModel):
    reason: str = Field(default="", max_length=MAX_REASON, description="why: written to the audit trail")


class RetentionDeleteIn(BaseModel):
    studies: list[str] = Field(min_length=1, max_length=1000, description="Study Instance UIDs the admin confirms")
    reason: str = Field(min_length=1, max_length=MAX_REASON, description="why: written to the audit trail")


def _reason(body: DeleteIn | None, reason: str | None) -> str:
    return (body.reason if body is not None and body.reason else reason) or ""


@router.delete("/api/studies/{study}", status_code=204,
               summary="Delete a study: index rows, objects, derived products, reports, share links (admin)")
async def delete_study(study: str, request: Request, body: DeleteIn | None = Body(None),  # noqa: B008
                       reason: str | None = Query(None, max_length=MAX_REASON, description=REASON_HELP),
                       principal: Principal = require(Capability.STUDY_DELETE)) -> Response:  # noqa: B008
    await run_in_threadpool(deletion.delete_study, context(request), principal, study,
                            _reason(body, reason))
    return Response(status_code=204)


@router.delete("/api/rejected/{sop}", status_code=204,
               summary="Delete a rejected instance now, before its retention ends (admin)")
async def delete_rejected(sop: str, request: Request, body: DeleteIn | None = Body(None),  # noqa: B008
                          reason: str | None = Query(None, max_length=MAX_REASON, description=REASON_HELP),
                          principal: Principal = require(Capability.STUDY_DELETE)) -> Response:  # noqa: B008
    await run_in_threadpool(deletion.delete_rejected, context(request), principal, [sop],
                            _reason(body, reason))
    return Response(status_code=204)


@router.get("/api/retention/due", summary="Studies due for deletion under the facility retention policy (admin)")
def retention_due(request: Request, facility: str | None = Query(None, max_length=64),
                  limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=10_000_000),
                  principal: Principal = require(Capability.STUDY_DELETE)) -> dict[str, Any]:  # noqa: B008
    page = retention.list_due(context(request), principal, facility=facility or None,
                              limit=limit, offset=offset)
    return {"total": page.total, "limit": limit, "offset": offset, "studies": [s.as_dict() for s in page.items]}


@router.post("/api/retention/delete", summary="Delete confirmed studies that are due; others are refused (admin)")
def retention_delete(body: RetentionDeleteIn, request: Request,
                     principal: Principal = require(Capability.STUDY_DELETE)) -> dict[str, Any]:  # noqa: B008
    done = retention.delete_due(context(request), principal, body.studies, body.reason)
    return {"deleted": [d.as_dict() for d in done.deleted],
            "refused": [{"study_instance_uid": uid, "message": why} for uid, why in done.refused]}
