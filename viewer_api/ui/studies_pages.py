"""The study browser, the study page and the consult inbox: the pages of clinicians (their home) and of everyone
who looks for a study.

They call the services the JSON API calls, with the cookie session instead of a bearer token: the list's conditions
are QIDO-RS's (:mod:`pacs.query.study_browser` builds them with :func:`pacs.dicomweb.qido.parse_search`), its
thumbnails come from the WADO-RS thumbnail service (:func:`viewer_api.dicomweb.reading.serve`, audited as
``dicomweb.thumbnail``), reports from :mod:`pacs.reports.lifecycle` shown by the reports API's rule, share links
from :func:`pacs.sharing.links.create_link`, consults from :mod:`pacs.consults.service`. A study outside the
user's scope is the same 404 page as an unknown one.

=====================================================  ===============  ===========================================
page / route                                           capability       does
=====================================================  ===============  ===========================================
``GET /ui/studies``                                    study.search     search form, one page of 50, newest first
``GET /ui/studies/updates?since=``                     study.search     JSON ``{"new": n, "latest": id}`` (the poll)
``GET /ui/studies/{study}``                            study.search     the study page
``GET /ui/patients/{study}``                           study.search     the study's patient: their studies and reports
``GET /ui/studies/{study}/thumbnail.jpg``              study.read       the study's thumbnail (as WADO-RS's)
``GET /ui/studies/{study}/series/{s}/thumbnail.jpg``   study.read       a series' thumbnail
``POST /ui/studies/{study}/share``                     share.create     a share link: the page shows it and its QR
``POST /ui/studies/{study}/consult``                   consult          ask another facility or an outside doctor
``GET /ui/consults``                                   consult          inbox / sent box
``GET /ui/consults/{id}``                              consult          one consult (marks it read), answer form
``POST /ui/consults/{id}/answer`` / ``…/close``        consult          answer / close
=====================================================  ===============  ===========================================
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from pacs.consults import service as consults
from pacs.consults.models import ACTIVE_STATES
from pacs.consults.service import ConsultView
from pacs.dicomweb.rendering import parse_rendered
from pacs.dicomweb.resources import Target
from pacs.dicomweb.wado import Body, Wado
from pacs.errors import Conflict, InvalidInput, NotFound, PacsError
from pacs.i18n import gettext
from pacs.query import study_browser
from pacs.query.study_browser import BrowserFilters, StudyRow
from pacs.reports import lifecycle
from pacs.reports.lifecycle import ReportView, VersionView
from pacs.reports.models import PRELIMINARY, SIGNED_STATES
from pacs.ris.orders import OrderRecord, order_for_study
from pacs.security.access import Forbidden
from pacs.security.principal import Principal
from pacs.security.roles import Capability, Role
from pacs.sharing.links import MAX_DAYS, MIN_DAYS, ShareScope, create_link, lifetime_days
from pacs.sharing.qr import qr_png
from viewer_api.dicomweb.reading import accept, serve
from viewer_api.security import audit_access, audited, context
from viewer_api.ui.core import N_, check_csrf, page_language, redirect, render, require_page
from viewer_api.urls import public_base

router = APIRouter(include_in_schema=False)

SEARCH = Capability.STUDY_SEARCH
UID = Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$")]
ConsultId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Field64 = Annotated[str, Query(max_length=64)]
CSRF = [Depends(check_csrf)]
POLL_SECONDS = 10  # how often the browser asks for new studies
CONSULTS_PAGE = 50


REPORT_STATUS = {"none": N_("No report"), "draft": N_("Draft"), "preliminary": N_("Preliminary"),
                 "final": N_("Final"), "amended": N_("Amended")}
CONSULT_STATES = {"open": N_("Waiting for an answer"), "answered": N_("Answered"), "closed": N_("Closed"),
                  "expired": N_("Expired")}
SHARE_SCOPES = {"report": N_("The report"), "report+key-images": N_("The report and its key images"),
                "study": N_("The whole study in the viewer (for a doctor)")}


# -- the study browser ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Form:
    filters: BrowserFilters
    page: int

    def query(self, **changes: Any) -> str:
        """The list's URL query for this search (``changes`` replace fields, e.g. ``page``)."""
        f = self.filters
        values = {"name": f.patient_name, "patient_id": f.patient_id, "accession": f.accession_number,
                  "date_from": f.date_from, "date_to": f.date_to, "modality": f.modality, "facility": f.facility,
                  "page": str(self.page)}
        values.update({k: str(v) for k, v in changes.items()})
        return urlencode({k: v for k, v in values.items() if v and not (k == "page" and v == "1")})


def _form(name: str, patient_id: str, accession: str, date_from: str, date_to: str, modality: str, facility: str,
          page: int) -> _Form:
    return _Form(BrowserFilters(name.strip(), patient_id.strip(), accession.strip(), date_from.strip(),
                                date_to.strip(), modality.strip().upper(), facility.strip()), page)


@router.get("/ui/studies")
def studies_page(request: Request, principal: Annotated[Principal, require_page(SEARCH)],
                 name: Annotated[str, Query(max_length=200)] = "", patient_id: Field64 = "",
                 accession: Field64 = "", date_from: Annotated[str, Query(max_length=10)] = "",
                 date_to: Annotated[str, Query(max_length=10)] = "",
                 modality: Annotated[str, Query(max_length=16)] = "", facility: Field64 = "",
                 page: Annotated[int, Query(ge=1, le=20_000)] = 1,
                 poll: Annotated[int, Query(ge=2, le=600)] = POLL_SECONDS) -> Response:
    """The study browser: the search form and one page of matches, newest first."""
    form = _form(name, patient_id, accession, date_from, date_to, modality, facility, page)
    language = page_language(request)
    offset = (page - 1) * study_browser.PAGE_SIZE
    try:
        with audited(request, principal, "study.search"), context(request).read_sessions() as session:
            result = study_browser.browse(session, principal, form.filters, offset=offset)
    except InvalidInput as exc:
        return render(request, "ui/studies/list.html", principal, status=400, form=form, rows=[], total=0,
                      pages=0, page=page, latest=0, poll=poll, error=str(exc), **_list_values(request, language))
    _audit_disclosed(request, principal, result.rows, result.total, form)
    pages = max(1, -(-result.total // study_browser.PAGE_SIZE))
    return render(request, "ui/studies/list.html", principal, form=form,
                  rows=[_row(r, language, facilities=_facility_names(request)) for r in result.rows],
                  total=result.total, pages=pages, page=page, latest=result.latest, poll=poll, error="",
                  first=offset + 1 if result.rows else 0, last=offset + len(result.rows),
                  **_list_values(request, language))


@router.get("/ui/studies/updates")
def studies_updates(request: Request, principal: Annotated[Principal, require_page(SEARCH)],
                    since: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
                    name: Annotated[str, Query(max_length=200)] = "", patient_id: Field64 = "",
                    accession: Field64 = "", date_from: Annotated[str, Query(max_length=10)] = "",
                    date_to: Annotated[str, Query(max_length=10)] = "",
                    modality: Annotated[str, Query(max_length=16)] = "", facility: Field64 = "") -> JSONResponse:
    """How many studies matching the page's search arrived since it was shown (a count: no patient data)."""
    form = _form(name, patient_id, accession, date_from, date_to, modality, facility, 1)
    try:
        with context(request).read_sessions() as session:
            new, latest = study_browser.count_newer(session, principal, form.filters, since)
    except InvalidInput as exc:
        return JSONResponse({"code": "invalid_request", "message": str(exc)[:300]}, status_code=400)
    return JSONResponse({"new": new, "latest": latest}, headers={"Cache-Control": "no-store"})


def _list_values(request: Request, language: str) -> dict[str, Any]:
    principal: Principal = request.state.principal
    return {"report_status": REPORT_STATUS, "archive_wide": principal.scope.facilities is None,
            "facility_options": sorted(_facility_names(request).items()), "modalities": MODALITIES}


MODALITIES = ("CR", "CT", "DX", "MG", "MR", "NM", "OT", "PT", "RF", "SR", "US", "XA")


def _audit_disclosed(request: Request, principal: Principal, rows: list[StudyRow], total: int, form: _Form) -> None:
    """One audit row for a search, as QIDO-RS writes it: the studies and patients shown (named when one)."""
    studies = list(dict.fromkeys(r.study_instance_uid for r in rows))
    patients = list(dict.fromkeys(r.patient_id for r in rows if r.patient_id))
    detail = (f"{total} match(es); returned studies={len(studies)} [{','.join(studies[:20])}] "
              f"patients={len(patients)} [{','.join(patients[:20])}]")
    audit_access(request, principal, "study.search", study_instance_uid=studies[0][:64] if len(studies) == 1 else "",
                 patient_id=patients[0][:64] if len(patients) == 1 else "", detail=detail[:1500])


# -- thumbnails (the WADO-RS thumbnail service, with the cookie session) ----------------------------------------


def _thumbnail(request: Request, principal: Principal, study: str, series: str | None) -> Response:
    def produce(wado: Wado, target: Target) -> Body:
        return wado.thumbnail(target, parse_rendered(request.query_params), accept(request, query_parameter=True))

    response = serve(request, principal, "dicomweb.thumbnail", study, series, None, produce)
    response.headers["Cache-Control"] = "private, max-age=300"
    return response


@router.get("/ui/studies/{study}/thumbnail.jpg")
def study_thumbnail(study: UID, request: Request,
                    principal: Annotated[Principal, require_page(Capability.STUDY_READ)]) -> Response:
    return _thumbnail(request, principal, study, None)


@router.get("/ui/studies/{study}/series/{series}/thumbnail.jpg")
def series_thumbnail(study: UID, series: UID, request: Request,
                     principal: Annotated[Principal, require_page(Capability.STUDY_READ)]) -> Response:
    return _thumbnail(request, principal, study, series)


# -- the study page -----------------------------------------------------------------------------------------------


@router.get("/ui/studies/{study}")
def study_page(study: UID, request: Request, principal: Annotated[Principal, require_page(SEARCH)]) -> Response:
    """A study: header, series, report, order, the person's other studies, and what the user may do with it."""
    language = page_language(request)
    ctx = context(request)
    with audited(request, principal, "study.view", study), ctx.read_sessions() as session:
        detail = study_browser.study_detail(session, principal, study)
        if detail is None:
            raise NotFound(f"no study {study}")
        priors = study_browser.prior_studies(session, principal, detail.patient_fk, study)
        reports = lifecycle.study_reports(session, principal.scope, study) \
            if principal.can(Capability.REPORT_READ) else []
        order = order_for_study(session, study)
    order = order if order is not None and _order_visible(principal, order) else None
    shown = [_report(v, principal, language) for v in reports if _visible_versions(v, principal)]
    row = detail.study
    audit_access(request, principal, "study.view", study_instance_uid=study, patient_id=row.patient_id,
                 detail=f"study page: {len(detail.series)} series, {len(priors)} prior(s)")
    if principal.can(Capability.REPORT_READ):
        audit_access(request, principal, "report.read", study_instance_uid=study, patient_id=row.patient_id,
                     detail=f"{len(shown)} report(s)")
    if order is not None:
        audit_access(request, principal, "order.read", patient_id=order.patient_id, study_instance_uid=study,
                     detail=f"order {order.accession_number}")
    study_consults: list[ConsultView] = []
    if principal.can(Capability.CONSULT):
        with audited(request, principal, "consult.read", study):
            study_consults = consults.study_consults(ctx, principal, study)
    names = _facility_names(request)
    return render(request, "ui/studies/study.html", principal, study=_row(row, language, facilities=names),
                  referring=_person(detail.referring_physician_name), study_id=detail.study_id,
                  series=detail.series, reports=shown, order=order, priors=[
                      {"uid": p.study_instance_uid, "date": _date(p.study_date, language), "modalities": p.modalities,
                       "description": p.description, "facility": names.get(p.facility, p.facility),
                       "status": p.report_status} for p in priors],
                  consults=[_consult(c, language, names) for c in study_consults],
                  report_status=REPORT_STATUS, share_scopes=SHARE_SCOPES, actions=_actions(principal),
                  states=CONSULT_STATES,
                  patient_studies=f"/ui/patients/{study}",
                  default_share_days=ctx.settings.share_link_default_days,
                  default_consult_days=ctx.settings.consult_default_days, min_days=MIN_DAYS, max_days=MAX_DAYS,
                  consult_max_days=ctx.settings.consult_max_days,
                  facility_options=sorted((k, v) for k, v in names.items() if k != principal.facility))


@router.get("/ui/patients/{study}")
def patient_page(study: UID, request: Request, principal: Annotated[Principal, require_page(SEARCH)]) -> Response:
    """The patient of a study (a Patient ID names a patient only within its facility, so the page is reached from
    one of their studies): every study of the person the user may see, newest first, with its signed report."""
    language = page_language(request)
    names = _facility_names(request)
    with audited(request, principal, "patient.view", study), context(request).read_sessions() as session:
        detail = study_browser.study_detail(session, principal, study)
        if detail is None:
            raise NotFound(f"no study {study}")
        studies = study_browser.prior_studies(session, principal, detail.patient_fk, "")
        reports: dict[str, list[dict[str, Any]]] = {}
        if principal.can(Capability.REPORT_READ):
            for item in studies:
                views = lifecycle.study_reports(session, principal.scope, item.study_instance_uid)
                reports[item.study_instance_uid] = [_report(v, principal, language) for v in views
                                                    if _visible_versions(v, principal)]
    row = detail.study
    uids = [p.study_instance_uid for p in studies]
    audit_access(request, principal, "patient.view", patient_id=row.patient_id, study_instance_uid=study,
                 detail=f"{len(uids)} studies [{','.join(uids[:20])}]"[:1500])
    if principal.can(Capability.REPORT_READ):
        shown = sum(len(v) for v in reports.values())
        audit_access(request, principal, "report.read", patient_id=row.patient_id, study_instance_uid=study,
                     detail=f"patient page: {shown} report(s) of {len(uids)} studies")
    return render(request, "ui/studies/patient.html", principal, patient=_row(row, language, facilities=names),
                  report_status=REPORT_STATUS, studies=[
                      {"uid": p.study_instance_uid, "date": _date(p.study_date, language), "modalities": p.modalities,
                       "description": p.description, "facility": names.get(p.facility, p.facility),
                       "status": p.report_status, "reports": reports.get(p.study_instance_uid, [])}
                      for p in studies])


def _actions(principal: Principal) -> dict[str, bool]:
    """The buttons and links this principal's capabilities allow (the pages behind them check again)."""
    can = principal.can
    return {"viewer": can(Capability.STUDY_READ), "share": can(Capability.SHARE_CREATE),
            "consult": can(Capability.CONSULT),
            # the manage page needs STUDY_REJECT (viewer_api.ui.tech_pages); a role that may only export (clinicians)
            # gets the zip link on the study page instead of a button to a page it would be refused
            "manage": can(Capability.STUDY_REJECT),
            "download": can(Capability.STUDY_EXPORT) and not can(Capability.STUDY_REJECT),
            "correct": can(Capability.STUDY_CORRECT),
            "completeness": can(Capability.ORDER_MANAGE) and principal.role is not Role.EMR}


def _order_visible(principal: Principal, order: OrderRecord) -> bool:
    """The orders API's rule (viewer_api.orders._visible): a facility user sees its facility's orders."""
    scope = principal.scope
    return not ((scope.facilities is not None and order.facility not in scope.facilities)
                or (scope.patient_ids is not None and order.patient_id not in scope.patient_ids))


def _visible_versions(view: ReportView, principal: Principal) -> list[VersionView]:
    """The reports API's rule (viewer_api.reports): writers see every version, other readers preliminary and
    signed ones, patients signed ones."""
    if principal.can(Capability.REPORT_WRITE):
        return list(view.versions)
    shown = SIGNED_STATES if principal.role is Role.PATIENT else (PRELIMINARY, *SIGNED_STATES)
    return [v for v in view.versions if v.status in shown]


def _report(view: ReportView, principal: Principal, language: str) -> dict[str, Any]:
    versions = _visible_versions(view, principal)
    newest = versions[-1]
    signed = [v for v in versions if v.status in SIGNED_STATES]
    return {"id": view.id, "status": newest.status, "version": newest.version, "findings": newest.findings,
            "impression": newest.impression, "author": newest.author, "amend_reason": newest.amend_reason,
            "signed_by": newest.signed_by, "signed_at": _when(newest.signed_at, language),
            "updated_at": _when(newest.updated_at, language),
            # a reader sees what was signed; an amendment still in draft is shown to writers only
            "earlier": [{"version": v.version, "status": v.status, "signed_at": _when(v.signed_at, language),
                         "signed_by": v.signed_by} for v in signed if v is not newest]}


# -- share links and consults from the study page ---------------------------------------------------------------


@router.post("/ui/studies/{study}/share", dependencies=CSRF)
def share_study(study: UID, request: Request,
                principal: Annotated[Principal, require_page(Capability.SHARE_CREATE)],
                scope: Annotated[str, Form(max_length=32)] = "report",
                expires_in_days: Annotated[str, Form(max_length=4)] = "",
                birth_date_check: Annotated[str, Form(max_length=8)] = "") -> Response:
    """A share link of the study (``POST /api/studies/{study}/shares``'s service): shown once, with its QR."""
    language = page_language(request)
    ctx = context(request)
    try:
        days = lifetime_days(_days(expires_in_days), ctx.settings)
        with audited(request, principal, "share.create", study), ctx.sessions() as session, session.begin():
            made = create_link(session, principal, study, scope=ShareScope(scope) if scope in SHARE_SCOPES
                               else _bad(N_("Choose what the link opens.")), expires_in_days=days,
                               birth_date_check=bool(birth_date_check), base_url=public_base(request))
    except (InvalidInput, Forbidden, NotFound) as exc:  # NotFound: a study this facility only borrows
        return _refused(f"/ui/studies/{study}", exc)
    qr = base64.b64encode(qr_png(made.url, pixels_per_module=6)).decode("ascii")
    return render(request, "ui/studies/shared.html", principal, study_uid=study, url=made.url,
                  qr=f"data:image/png;base64,{qr}", expires=_when(made.expires_at, language),
                  scope_label=SHARE_SCOPES[made.scope.value], birth_date_check=bool(birth_date_check),
                  consult_id=None)


@router.post("/ui/studies/{study}/consult", dependencies=CSRF)
def request_consult(study: UID, request: Request, principal: Annotated[Principal, require_page(Capability.CONSULT)],
                    question: Annotated[str, Form(max_length=consults.MAX_QUESTION)] = "",
                    to_facility: Annotated[str, Form(max_length=64)] = "",
                    external: Annotated[str, Form(max_length=8)] = "",
                    expires_in_days: Annotated[str, Form(max_length=4)] = "",
                    birth_date_check: Annotated[str, Form(max_length=8)] = "") -> Response:
    """Ask another facility (or an outside doctor by a share link) about the study (``POST …/consults``)."""
    language = page_language(request)
    try:
        with audited(request, principal, "consult.request", study):
            made = consults.request_consult(context(request), principal, study, question=question,
                                            to_facility=None if external else to_facility,
                                            external=bool(external), expires_in_days=_days(expires_in_days),
                                            birth_date_check=bool(birth_date_check), base_url=public_base(request))
    except (InvalidInput, Forbidden, Conflict, NotFound) as exc:  # NotFound: as for a share link
        return _refused(f"/ui/studies/{study}", exc)
    if made.link_url is not None:  # the outside doctor's link is shown once, here
        qr = base64.b64encode(qr_png(made.link_url, pixels_per_module=6)).decode("ascii")
        return render(request, "ui/studies/shared.html", principal, study_uid=study, url=made.link_url,
                      qr=f"data:image/png;base64,{qr}", expires=_when(made.link_expires_at, language),
                      scope_label=SHARE_SCOPES["study"], birth_date_check=bool(birth_date_check),
                      consult_id=made.consult.id)
    return redirect(f"/ui/consults/{made.consult.id}",
                    flash=N_("Consult sent: the other facility sees it in its inbox."))


# -- the consult inbox ----------------------------------------------------------------------------------------------


@router.get("/ui/consults")
def consults_page(request: Request, principal: Annotated[Principal, require_page(Capability.CONSULT)],
                  box: Annotated[str, Query(pattern="^(inbox|sent)$")] = "inbox",
                  state: Annotated[str, Query(pattern="^(|open|answered|closed|expired)$")] = "",
                  page: Annotated[int, Query(ge=1, le=20_000)] = 1) -> Response:
    """The caller's inbox (consults asked of its facility) or sent box (``GET /api/consults``'s service)."""
    language = page_language(request)
    ctx = context(request)
    with audited(request, principal, "consult.list"):
        views, total = consults.list_consults(ctx, principal, box=box, state=state, limit=CONSULTS_PAGE,
                                              offset=(page - 1) * CONSULTS_PAGE)
        unread = consults.unread_counts(ctx, principal)
    audit_access(request, principal, "consult.list", detail=f"{box}: {len(views)} of {total} consults")
    names = _facility_names(request)
    return render(request, "ui/consults/list.html", principal, box=box, state=state, page=page, total=total,
                  pages=max(1, -(-total // CONSULTS_PAGE)), unread=unread, states=CONSULT_STATES,
                  consults=[_consult(v, language, names) for v in views])


@router.get("/ui/consults/{consult_id}")
def consult_page(consult_id: ConsultId, request: Request,
                 principal: Annotated[Principal, require_page(Capability.CONSULT)]) -> Response:
    """One consult with its answers (marks it read for the caller's side), the answer form and close."""
    language = page_language(request)
    with audited(request, principal, "consult.open"):
        view = consults.open_consult(context(request), principal, consult_id)
    return _consult_page(request, principal, view, language)


def _consult_page(request: Request, principal: Principal, view: ConsultView, language: str, *, status: int = 200,
                  error: str = "", text: str = "") -> Response:
    active = view.state in ACTIVE_STATES
    return render(request, "ui/consults/consult.html", principal, status=status,
                  consult=_consult(view, language, _facility_names(request)), error=error, text=text,
                  states=CONSULT_STATES,
                  may_answer=active and view.side == consults.CONSULTANT, may_close=active and view.side in (
                      consults.REQUESTER, consults.CONSULTANT),
                  as_report=principal.role in lifecycle.SIGNING_ROLES and principal.can(Capability.REPORT_WRITE))


@router.post("/ui/consults/{consult_id}/answer", dependencies=CSRF)
def answer_consult(consult_id: ConsultId, request: Request,
                   principal: Annotated[Principal, require_page(Capability.CONSULT)],
                   text: Annotated[str, Form(max_length=consults.MAX_ANSWER)] = "",
                   as_report: Annotated[str, Form(max_length=8)] = "") -> Response:
    language = page_language(request)
    ctx = context(request)
    try:
        with audited(request, principal, "consult.answer"):
            consults.answer(ctx, principal, consult_id, text, as_report=bool(as_report))
    except NotFound:
        raise
    except (InvalidInput, Forbidden, Conflict) as exc:
        with audited(request, principal, "consult.open"):
            view = consults.open_consult(ctx, principal, consult_id)
        return _consult_page(request, principal, view, language, status=400, error=_message(exc, language),
                             text=text)
    return redirect(f"/ui/consults/{consult_id}", flash=N_("Answer sent."))


@router.post("/ui/consults/{consult_id}/close", dependencies=CSRF)
def close_consult(consult_id: ConsultId, request: Request,
                  principal: Annotated[Principal, require_page(Capability.CONSULT)]) -> Response:
    try:
        with audited(request, principal, "consult.close"):
            consults.close(context(request), principal, consult_id)
    except NotFound:
        raise
    except (InvalidInput, Forbidden, Conflict) as exc:
        return _refused(f"/ui/consults/{consult_id}", exc)
    return redirect(f"/ui/consults/{consult_id}",
                    flash=N_("Consult closed: the consulted facility no longer sees the study."))


# -- helpers ----------------------------------------------------------------------------------------------------------


def _consult(view: ConsultView, language: str, names: dict[str, str]) -> dict[str, Any]:
    s = view.study
    return {"id": view.id, "study_uid": view.study_instance_uid, "state": view.state, "question": view.question,
            "requested_by": view.requested_by_name or view.requested_by,
            "from": names.get(view.requesting_facility, view.requesting_facility),
            "to": names.get(view.consulted_facility, view.consulted_facility), "external": view.external,
            "created": _when(view.created_at, language), "expires": _when(view.expires_at, language),
            "closed": _when(view.closed_at, language), "closed_by": view.closed_by, "side": view.side,
            "unread": view.unread,
            "answers": [{"author": a.author_name or a.author, "facility": names.get(a.author_facility,
                                                                                   a.author_facility),
                         "when": _when(a.created_at, language), "text": a.text, "report_id": a.report_id}
                        for a in view.answers],
            "study": None if s is None else {
                "patient_name": _person(s.patient_name), "patient_id": s.patient_id,
                "birth_date": _date(s.patient_birth_date, language), "accession": s.accession_number,
                "date": _date(s.study_date, language), "description": s.study_description,
                "modalities": [m for m in s.modalities.split("\\") if m],
                "facility": names.get(s.facility, s.facility)}}


def _row(r: StudyRow, language: str, *, facilities: dict[str, str]) -> dict[str, Any]:
    return {"uid": r.study_instance_uid, "patient_name": _person(r.patient_name), "patient_id": r.patient_id,
            "birth_date": _date(r.patient_birth_date, language), "sex": r.patient_sex,
            "date": _date(r.study_date, language), "time": _time(r.study_time), "accession": r.accession_number,
            "modalities": r.modalities, "description": r.description, "series": r.number_of_series,
            "instances": r.number_of_instances, "status": r.report_status,
            "facility": facilities.get(r.facility, r.institution_name or r.facility), "facility_code": r.facility}


def _facility_names(request: Request) -> dict[str, str]:
    return dict(context(request).settings.facility_names or {})


def _person(value: str) -> str:
    """A DICOM person name as people write it: "Nguyễn^Văn^An" → "Nguyễn Văn An" (the first group only)."""
    first = (value or "").split("=")[0]
    return " ".join(p.strip() for p in first.split("^") if p.strip())


def _date(value: str, language: str) -> str:
    v = (value or "").strip()
    if len(v) != 8 or not v.isdigit():
        return v
    return f"{v[6:8]}/{v[4:6]}/{v[:4]}" if language == "vi" else f"{v[:4]}-{v[4:6]}-{v[6:8]}"


def _time(value: str) -> str:
    v = (value or "").strip()
    return f"{v[:2]}:{v[2:4]}" if len(v) >= 4 and v[:4].isdigit() else ""


def _when(value: Any, language: str) -> str:
    if value is None:
        return ""
    from pacs.reports.document import REPORT_TIMEZONE

    local = value.astimezone(REPORT_TIMEZONE)
    return local.strftime("%d/%m/%Y %H:%M") if language == "vi" else local.strftime("%Y-%m-%d %H:%M")


def _days(value: str) -> int | None:
    text = value.strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit():
        raise InvalidInput("expires_in_days is a whole number")
    return int(text)


def _bad(message: str) -> Any:
    raise InvalidInput(message)


# The refusals of pacs.sharing and pacs.consults (English, for logs and the API) → what the page says; first match.
_EXPLAINED: tuple[tuple[str, str], ...] = (
    (r"^no study ", N_("This study cannot be shared or asked about from your facility.")),
    (r"can be sent to a consult", N_("This study cannot be shared or asked about from your facility.")),
    (r"birth date on record", N_("The patient has no birth date on record: make the link without the birth-date "
                                 "check.")),
    (r"^expires_in_days", N_("The number of days is out of range.")),
    (r"^Choose what the link opens", N_("Choose what the link opens.")),
    (r"exactly one of \"to_facility\"", N_("Name a facility to ask, or choose an outside doctor.")),
    (r"another facility than your own", N_("Name a facility to ask, or choose an outside doctor.")),
    (r"already sees this study", N_("That facility already sees this study.")),
    (r"^unknown facility", N_("This archive does not know that facility.")),
    (r"^the question is empty", N_("Write the question.")),
    (r"^the answer is empty", N_("Write your answer.")),
    (r"^only the consulted facility", N_("Only the consulted facility answers a consult.")),
    (r"^only a radiologist", N_("Only a radiologist may answer with a report.")),
    (r"^consult \d+ is closed", N_("This consult is closed.")),
    (r"^consult \d+ has expired", N_("This consult has expired.")),
)


def _explain(exc: PacsError) -> tuple[str, dict[str, str]]:
    """A service's refusal (English, for logs and the API) as a message id of the user's language and its values."""
    text = str(exc)
    for pattern, message in _EXPLAINED:
        if re.search(pattern, text):
            return message, {}
    return N_("The request was refused: %(reason)s"), {"reason": text[:300]}


def _message(exc: PacsError, language: str) -> str:
    message, values = _explain(exc)
    return gettext(language, message, **values)


def _refused(url: str, exc: PacsError) -> Response:
    message, values = _explain(exc)
    return redirect(url, flash=message, flash_values=values)
