"""The radiologist's API under ``/api``: reading list, claims, reports, their PDF, templates and key images.

=================================================  ============  ======================================
route                                              capability    answers
=================================================  ============  ======================================
``GET /api/reading-list``                          report.write  studies with images and no signed report
``POST|DELETE /api/studies/{study}/claim``         report.write  claim / release a study for reading
``POST /api/studies/{study}/reports``              report.write  201: a new draft (version 1)
``GET /api/studies/{study}/reports``               report.read   the study's reports
``GET /api/reports/{id}``                          report.read   one report with every version
``PUT /api/reports/{id}``                          report.write  edit a draft / preliminary (its author)
``POST /api/reports/{id}/preliminary``             report.write  draft → preliminary
``POST /api/reports/{id}/sign``                    report.write  → final (or amended); radiologists only
``POST /api/reports/{id}/amend``                   report.write  a new draft version with a reason
``GET /api/reports/{id}/pdf``                      report.read   the signed (or preliminary) report as PDF
``GET /api/report-templates``                      report.write  templates by language / modality
``POST|GET /api/studies/{study}/key-images``       report.write  mark key images (a KOS) / list them
                                                   / report.read
=================================================  ============  ======================================

Who sees what: writers (radiologists, admins) see every version; other readers (clinicians, EMRs)
see preliminary and signed versions only, patients signed versions only; a report whose every
version is hidden from the caller is 404, like one of another facility. Every read and change is
audited; refusals too (401/403 by the security layer, 404/409/400 here).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, Field

from pacs.errors import NotFound
from pacs.reports import lifecycle, service
from pacs.reports.lifecycle import ReportView, VersionView
from pacs.reports.models import DRAFT, PRELIMINARY, SIGNED_STATES
from pacs.reports.publish import facility_names, key_images, mark_key_images
from pacs.reports.reading_list import ReadingFilters, ReadingItem, reading_list
from pacs.reports.templates import templates
from pacs.security.principal import Principal
from pacs.security.roles import Capability, Role
from viewer_api.security import audit_access, audited, context, require

router = APIRouter(prefix="/api", tags=["reports"])
# a report id as the index stores it (a 32-bit integer): larger numbers are a 400, never a database error
ReportId = Annotated[int, Path(ge=1, le=2**31 - 1)]


class ReportText(BaseModel):
    findings: str = Field(default="", max_length=20_000)
    impression: str = Field(default="", max_length=20_000)
    language: str = Field(default="", max_length=2, description="vi or en (the report's language)")


class Amendment(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)
    findings: str = Field(default="", max_length=20_000)
    impression: str = Field(default="", max_length=20_000)


class KeyImageRequest(BaseModel):
    instances: list[str] = Field(min_length=1, max_length=500, description="SOP Instance UIDs of the study")
    description: str = Field(default="", max_length=64)


# -- reading list and claims -------------------------------------------------------------------------


@router.get("/reading-list", summary="Studies with images and no signed report, most urgent first")
def get_reading_list(request: Request, response: Response,
                     modality: str = Query("", max_length=16), facility: str = Query("", max_length=64),
                     priority: str = Query("", max_length=8, description="STAT, URGENT or ROUTINE"),
                     date_from: str = Query("", max_length=10, description="study date, YYYYMMDD"),
                     date_to: str = Query("", max_length=10),
                     assigned: str = Query("", max_length=128, description="a user name, `me`, or `-` (unclaimed)"),
                     limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=1_000_000),
                     principal: Principal = require(Capability.REPORT_WRITE)) -> list[dict[str, Any]]:  # noqa: B008
    filters = ReadingFilters(modality, facility, priority, date_from, date_to,
                             principal.subject if assigned == "me" else assigned)
    with (
        audited(request, principal, "reading-list.read"),
        context(request).read_sessions() as session,
    ):
        items, total = reading_list(session, principal.scope, filters, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    audit_access(request, principal, "reading-list.read", detail=f"{len(items)} of {total} studies")
    return [_reading_item(i) for i in items]


@router.post("/studies/{study}/claim", summary="Claim a study for reading (409 when another radiologist has it)")
def claim_study(study: str, request: Request,
                principal: Principal = require(Capability.REPORT_WRITE)) -> dict[str, Any]:  # noqa: B008
    with (
        audited(request, principal, "study.claim", study),
        context(request).sessions() as session, session.begin(),
    ):
        row = lifecycle.claim(session, principal, study)
        return {"study_instance_uid": study, "claimed_by": row.claimed_by, "claimed_at": _iso(row.claimed_at)}


@router.delete("/studies/{study}/claim", status_code=204, summary="Release a claim (its holder or an admin)")
def release_study(study: str, request: Request,
                  principal: Principal = require(Capability.REPORT_WRITE)) -> Response:  # noqa: B008
    with (
        audited(request, principal, "study.release", study),
        context(request).sessions() as session, session.begin(),
    ):
        lifecycle.release(session, principal, study)
    return Response(status_code=204)


# -- reports -----------------------------------------------------------------------------------------


@router.post("/studies/{study}/reports", status_code=201, summary="Start a report: a new draft (version 1)")
def create_report(study: str, body: ReportText, request: Request, response: Response,
                  principal: Principal = require(Capability.REPORT_WRITE)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "report.create", study):
        view = service.create_draft(context(request), principal, study, body.findings, body.impression,
                                    body.language)
    response.headers["Location"] = f"/api/reports/{view.id}"
    return _report(view, principal)


@router.get("/studies/{study}/reports", summary="A study's reports (the versions the caller may see)")
def list_study_reports(study: str, request: Request,
                       principal: Principal = require(Capability.REPORT_READ)) -> list[dict[str, Any]]:  # noqa: B008
    with (
        audited(request, principal, "report.read", study),
        context(request).read_sessions() as session,
    ):
        views = lifecycle.study_reports(session, principal.scope, study)
    visible = [_report(v, principal) for v in views if _visible_versions(v, principal)]
    audit_access(request, principal, "report.read", study_instance_uid=study,
                 patient_id=views[0].patient_id if views else "", detail=f"{len(visible)} report(s)")
    return visible


@router.get("/reports/{report_id}", summary="One report with all its versions")
def read_report(report_id: ReportId, request: Request,
                principal: Principal = require(Capability.REPORT_READ)) -> dict[str, Any]:  # noqa: B008
    view = _load_visible(request, principal, report_id)
    audit_access(request, principal, "report.read", study_instance_uid=view.study_instance_uid,
                 patient_id=view.patient_id, detail=f"report {report_id}")
    return _report(view, principal)


@router.put("/reports/{report_id}", summary="Edit the draft or preliminary version (its author only)")
def edit_report(report_id: ReportId, body: ReportText, request: Request,
                principal: Principal = require(Capability.REPORT_WRITE)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "report.edit", report_id=report_id):
        return _report(service.edit(context(request), principal, report_id, body.findings, body.impression),
                       principal)


@router.post("/reports/{report_id}/preliminary", summary="Make the draft preliminary")
def preliminary_report(report_id: ReportId, request: Request,
                       principal: Principal = require(Capability.REPORT_WRITE)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "report.preliminary", report_id=report_id):
        return _report(service.make_preliminary(context(request), principal, report_id), principal)


@router.post("/reports/{report_id}/sign", summary="Sign: final (or amended); the SR, FHIR and HL7 ORU follow")
def sign_report(report_id: ReportId, request: Request,
                principal: Principal = require(Capability.REPORT_WRITE)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "report.sign", report_id=report_id):
        return _report(service.sign(context(request), principal, report_id), principal)


@router.post("/reports/{report_id}/amend", summary="Amend a signed report: a new draft version with a reason")
def amend_report(report_id: ReportId, body: Amendment, request: Request,
                 principal: Principal = require(Capability.REPORT_WRITE)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "report.amend", report_id=report_id):
        return _report(service.amend(context(request), principal, report_id, body.reason, body.findings,
                                     body.impression), principal)


@router.get("/reports/{report_id}/pdf", summary="The report as PDF (a signed or preliminary version)",
            response_class=Response, responses={200: {"content": {"application/pdf": {}}}})
def report_pdf(report_id: ReportId, request: Request, version: int | None = Query(None, ge=1, le=100_000),
               lang: str = Query("", pattern="^(|vi|en)$"),
               principal: Principal = require(Capability.REPORT_READ)) -> Response:  # noqa: B008
    from pacs.reports.pdf import render_report_pdf

    view = _load_visible(request, principal, report_id)
    published = [v for v in _visible_versions(view, principal) if v.status != DRAFT]
    chosen = next((v for v in published if v.version == version), None) if version else \
        (published[-1] if published else None)
    if chosen is None:
        audit_access(request, principal, "report.pdf", outcome="failure", study_instance_uid=view.study_instance_uid,
                     detail=f"report {report_id}: no published version {version or ''}".strip())
        raise NotFound(f"report {report_id} has no published version {version or ''}".strip())
    ctx = context(request)
    with ctx.read_sessions() as session:
        doc = lifecycle.report_document(session, report_id, chosen.version, facility_name=facility_names(ctx))
    pdf = render_report_pdf(doc, language=lang or doc.language or "vi")
    audit_access(request, principal, "report.pdf", study_instance_uid=view.study_instance_uid,
                 patient_id=view.patient_id, detail=f"report {report_id} version {chosen.version}")
    return Response(pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'inline; filename="report-{report_id}-v{chosen.version}.pdf"'})


@router.get("/report-templates", summary="Report templates (Vietnamese or English), matching ones first")
def list_templates(lang: str = Query("vi", pattern="^(vi|en)$"), modality: str = Query("", max_length=16),
                   procedure: str = Query("", max_length=64),
                   _: Principal = require(Capability.REPORT_WRITE)) -> list[dict[str, Any]]:  # noqa: B008
    return [{"id": t.id, "modalities": list(t.modalities), "title": t.title, "findings": t.findings,
             "impression": t.impression, "language": t.language} for t in templates(lang, modality, procedure)]


# -- key images ----------------------------------------------------------------------------------------


@router.post("/studies/{study}/key-images", status_code=201,
             summary="Mark key images: stored as a Key Object Selection document in the study")
def create_key_images(study: str, body: KeyImageRequest, request: Request,
                      principal: Principal = require(Capability.REPORT_WRITE)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "study.key-images", study):
        made = mark_key_images(context(request), principal, study, body.instances, body.description)
    return {"study_instance_uid": made.study_instance_uid, "sop_instance_uid": made.kos_sop_instance_uid,
            "series_instance_uid": made.kos_series_instance_uid,
            "instances": [{"series_instance_uid": s, "sop_instance_uid": u} for s, u in made.instances]}


@router.get("/studies/{study}/key-images", summary="The study's key-image selections")
def list_key_images(study: str, request: Request,
                    principal: Principal = require(Capability.REPORT_READ)) -> list[dict[str, Any]]:  # noqa: B008
    with (
        audited(request, principal, "study.key-images.read", study),
        context(request).read_sessions() as session,
    ):
        found = key_images(session, principal, study)
    audit_access(request, principal, "study.key-images.read", study_instance_uid=study)
    return [{"sop_instance_uid": k.kos_sop_instance_uid, "series_instance_uid": k.kos_series_instance_uid,
             "created_by": k.created_by,
             "instances": [{"series_instance_uid": s, "sop_instance_uid": u} for s, u in k.instances]}
            for k in found]


# -- helpers ------------------------------------------------------------------------------------------


def _load_visible(request: Request, principal: Principal, report_id: int) -> ReportView:
    with (
        audited(request, principal, "report.read", report_id=report_id),
        context(request).read_sessions() as session,
    ):
        view = lifecycle.get_report(session, principal.scope, report_id)
        if not _visible_versions(view, principal):
            raise NotFound(f"no report {report_id}")
    return view


def _visible_versions(view: ReportView, principal: Principal) -> list[VersionView]:
    if principal.can(Capability.REPORT_WRITE):
        return list(view.versions)
    shown = SIGNED_STATES if principal.role is Role.PATIENT else (PRELIMINARY, *SIGNED_STATES)
    return [v for v in view.versions if v.status in shown]


def _report(view: ReportView, principal: Principal) -> dict[str, Any]:
    versions = _visible_versions(view, principal)
    newest = versions[-1] if versions else view.current
    return {
        "id": view.id, "study_instance_uid": view.study_instance_uid, "patient_id": view.patient_id,
        "facility": view.facility, "accession_number": view.accession_number,
        "status": view.status if principal.can(Capability.REPORT_WRITE) else newest.status,
        "version": newest.version, "findings": newest.findings, "impression": newest.impression,
        "language": newest.language, "created_by": view.created_by, "created_at": _iso(view.created_at),
        "updated_at": _iso(view.updated_at), "versions": [_version(v) for v in versions],
    }


def _version(v: VersionView) -> dict[str, Any]:
    return {"version": v.version, "status": v.status, "findings": v.findings, "impression": v.impression,
            "language": v.language, "author": v.author, "amend_reason": v.amend_reason,
            "created_at": _iso(v.created_at), "updated_at": _iso(v.updated_at),
            "preliminary_at": _iso(v.preliminary_at), "signed_by": v.signed_by, "signed_at": _iso(v.signed_at),
            "sr_sop_instance_uid": v.sr_sop_instance_uid}


def _reading_item(i: ReadingItem) -> dict[str, Any]:
    return {
        "study_instance_uid": i.study_instance_uid, "priority": i.priority, "claimed_by": i.claimed_by or None,
        "claimed_at": _iso(i.claimed_at), "patient_id": i.patient_id, "patient_name": i.patient_name,
        "patient_birth_date": i.patient_birth_date, "patient_sex": i.patient_sex, "facility": i.facility,
        "accession_number": i.accession_number, "study_date": i.study_date,
        "study_description": i.study_description, "modalities": [m for m in i.modalities.split("\\") if m],
        "number_of_instances": i.number_of_instances, "procedure": i.procedure,
        "received_at": _iso(i.received_at), "waiting_s": i.waiting_s, "report_status": i.report_status or None,
        "priors": [{"study_instance_uid": p.study_instance_uid, "study_date": p.study_date,
                    "modalities": [m for m in p.modalities.split("\\") if m], "description": p.description,
                    "report_status": p.report_status or None, "facility": p.facility} for p in i.priors],
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None

