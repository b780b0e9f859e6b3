"""``/api/audit``: the audit trail for administrators: search, chain verification and a FHIR export.

Every read of the trail is itself audited (action ``audit.read``, written after the read, so a
page never shows its own read). Filters and their rules, and which rows an administrator of one
facility sees: :mod:`pacs.audit.search`; the FHIR mapping: :mod:`pacs.audit.fhir_export`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pacs import audit
from pacs.audit import fhir_export as audit_fhir
from pacs.audit import search as audit_search
from pacs.audit.search import AuditFilter
from pacs.security.access import Forbidden
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.security import audit_access, context, require

router = APIRouter(prefix="/api/audit", tags=["audit"])

FHIR_JSON = "application/fhir+json"
READ_ACTION = "audit.read"


class AuditEventOut(BaseModel):
    id: int
    at: str
    actor: str
    role: str
    source_address: str
    action: str
    outcome: str
    patient_id: str
    study_instance_uid: str
    detail: str
    entry_hash: str


class AuditProblemOut(BaseModel):
    id: int
    reason: str


class VerifyOut(BaseModel):
    intact: bool
    rows: int
    problems: list[AuditProblemOut]
    last_hash: str


def audit_filter(
    actor: Annotated[str | None, Query(max_length=128, description="Exact actor (user, token, AE title)")] = None,
    action: Annotated[str | None, Query(max_length=65, description="Exact action, or a prefix ending in `.` or "
                                        "`*` (e.g. `dimse.`)")] = None,
    outcome: Annotated[str | None, Query(max_length=16, description="success, warning, partial or failure")] = None,
    patient_id: Annotated[str | None, Query(max_length=64, description="Exact Patient ID")] = None,
    study: Annotated[str | None, Query(max_length=64, description="Study Instance UID")] = None,
    since: Annotated[str | None, Query(max_length=40, description="ISO 8601 date or date-time, inclusive")] = None,
    until: Annotated[str | None, Query(max_length=40, description="ISO 8601 date or date-time, inclusive "
                                       "(a bare date: the whole day)")] = None,
) -> AuditFilter:
    """The filters shared by the list and the FHIR export (a bad value: 400 naming the parameter)."""
    return audit_search.make_filter(actor=actor, action=action, outcome=outcome, patient_id=patient_id,
                                    study=study, since=since, until=until)


Admin = Annotated[Principal, require(Capability.AUDIT_READ)]  # first parameter: 401/403 before any 400
Filter = Annotated[AuditFilter, Depends(audit_filter)]
Limit = Annotated[int, Query(ge=1, le=audit_search.MAX_LIMIT, description="Page size (at most 1000)")]
Offset = Annotated[int, Query(ge=0, description="Rows to skip")]


@router.get("", response_model=list[AuditEventOut], summary="Search the audit trail (administrators; an "
            "administrator of one facility sees that facility's rows and their own actions)",
            responses={200: {"headers": {"X-Total-Count": {"description": "Matching rows over all pages",
                                                           "schema": {"type": "integer"}}}},
                       400: {"description": "A malformed filter"}})
def list_events(principal: Admin, request: Request, response: Response, flt: Filter,
                limit: Limit = audit_search.DEFAULT_LIMIT, offset: Offset = 0) -> list[dict[str, Any]]:
    ctx = context(request)
    flt = audit_search.visible_to(flt, principal.scope, principal.subject)
    with ctx.read_sessions() as session:
        total = audit_search.count(session, flt)
        rows = audit_search.search(session, flt, limit, offset)
    response.headers["X-Total-Count"] = str(total)
    audit_access(request, principal, READ_ACTION, detail=f"list rows={len(rows)} total={total}")
    return rows


@router.get("/verify", response_model=VerifyOut, summary="Check the hash chain of the whole audit trail",
            responses={403: {"description": "Not an administrator, or an administrator of one facility only"}})
def verify_chain(principal: Admin, request: Request) -> VerifyOut:
    if not principal.scope.unrestricted:  # the chain spans every facility's rows
        audit_access(request, principal, READ_ACTION, outcome="failure", detail="verify refused: facility admin")
        raise Forbidden("the audit chain spans every facility: verifying it is for an archive-wide administrator")
    checked, problems, last = audit.verify(context(request).read_sessions)
    audit_access(request, principal, READ_ACTION, outcome="success",
                 detail=f"verify rows={checked} problems={len(problems)}")
    return VerifyOut(intact=not problems, rows=checked, last_hash=last,
                     problems=[AuditProblemOut(id=p.event_id, reason=p.reason) for p in problems])


@router.get("/fhir", summary="The audit trail as a FHIR R4 searchset Bundle of AuditEvent resources",
            response_class=JSONResponse,
            responses={200: {"content": {FHIR_JSON: {}}, "description": "A Bundle (type searchset)"},
                       400: {"description": "A malformed filter"}})
def fhir_bundle(principal: Admin, request: Request, flt: Filter, limit: Limit = audit_search.DEFAULT_LIMIT,
                offset: Offset = 0) -> JSONResponse:
    ctx = context(request)
    flt = audit_search.visible_to(flt, principal.scope, principal.subject)
    with ctx.read_sessions() as session:
        total = audit_search.count(session, flt)
        rows = audit_search.search(session, flt, limit, offset)
    observer = audit_fhir.Observer(ctx.settings.ae_title)
    body = audit_fhir.bundle(rows, observer, total=total, self_url=str(request.url))
    audit_access(request, principal, READ_ACTION, detail=f"fhir rows={len(rows)} total={total}")
    return JSONResponse(body, media_type=FHIR_JSON, headers={"X-Total-Count": str(total)})
