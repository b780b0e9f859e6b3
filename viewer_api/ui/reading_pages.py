"""The radiologist's pages: the reading list (``/ui/reading``) and the report editor (``/ui/reading/{study}``).

They call the services the JSON API calls (:mod:`viewer_api.reports` is the model: the same capability, the same
``audited``/``audit_access`` rows, the same :mod:`pacs.reports` functions), with the cookie session instead of a
bearer token. The study's heading and its instances come from the QIDO-RS search service in the user's scope,
the instance thumbnails from the WADO-RS thumbnail service (:func:`viewer_api.dicomweb.reading.serve`), so a study
of another facility is 404 here exactly as there.

=====================================================  ==========================================================
page / route                                           does
=====================================================  ==========================================================
``GET /ui/reading``                                    the reading list (STAT first, then by waiting time)
``GET /ui/reading/rows``                               the list's rows alone (``reading.js`` refreshes with it)
``POST /ui/reading/{study}/claim|release``             claim / release (like ``POST|DELETE /api/studies/…/claim``)
``GET /ui/reading/{study}``                            the report editor beside the images
``POST /ui/reading/{study}``                           save the draft, make it preliminary, or sign it
``PUT /ui/reading/{study}/draft``                      autosave (JSON): the first save creates the draft
``POST /ui/reading/{study}/amend``                     amend a signed report with a reason (then sign, if asked)
``POST /ui/reading/{study}/key-images``                mark key images (a KOS, like ``POST …/key-images``)
``GET /ui/reading/{study}/thumbnails/{series}/{sop}``  an instance's thumbnail (the WADO-RS thumbnail service)
=====================================================  ==========================================================

Refusals of the services (another radiologist's claim, someone else's draft, an empty report…) are shown on the
page in the user's language (:func:`explain`); they are audited by ``audited`` as the API audits them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from pacs.dicomweb.qido import parse_search
from pacs.dicomweb.rendering import parse_rendered
from pacs.dicomweb.resources import Target
from pacs.dicomweb.wado import Body, Wado
from pacs.errors import Conflict, InvalidInput, NotFound, PacsError
from pacs.i18n import gettext
from pacs.query.engine import QueryEngine
from pacs.reports import lifecycle, service
from pacs.reports.lifecycle import ReportView
from pacs.reports.models import DRAFT, PRELIMINARY, SIGNED_STATES
from pacs.reports.publish import key_images, mark_key_images
from pacs.reports.reading_list import ReadingFilters, ReadingItem, reading_list
from pacs.reports.templates import Template, templates
from pacs.security.access import Forbidden
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.dicomweb.reading import accept, serve
from viewer_api.security import audit_access, audited, context
from viewer_api.ui.core import N_, check_csrf, page_language, redirect, render, require_page

router = APIRouter(prefix="/ui/reading", include_in_schema=False)

WRITE = Capability.REPORT_WRITE
PAGE_SIZE = 100  # studies on the reading list page
MAX_PICKABLE = 200  # instances offered for key-image marking (the rest by SOP Instance UID)
NOT_IMAGES = ("SR", "KO", "PR", "DOC")  # the report's SR, key-image selections, presentation states
UID = Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$")]
Text = Annotated[str, Form(max_length=20_000)]
CSRF = [Depends(check_csrf)]


# The refusals of pacs.reports (their messages are English, for logs and the API) → what the page says.
_EXPLAINED: tuple[tuple[str, str], ...] = (
    (r"claimed by (?P<who>.+?); ask them", N_("This study is claimed by %(who)s: ask them to release it first.")),
    (r"already claimed by (?P<who>.+)$", N_("This study is claimed by %(who)s: ask them to release it first.")),
    (r"claimed by someone else a moment ago", N_("Another radiologist claimed this study a moment ago.")),
    (r"the study is not claimed", N_("This study is not claimed.")),
    (r"claimed by (?P<who>.+?); only they or an admin",
     N_("This study is claimed by %(who)s: only they or an administrator may release it.")),
    (r"only the author \((?P<who>.+?)\) may change", N_("Only the author (%(who)s) may change this draft.")),
    (r"signed text never changes", N_("A signed report never changes: amend it instead.")),
    (r"already signed", N_("This version is already signed.")),
    (r"not a draft", N_("Only a draft can be made preliminary.")),
    (r"may not (sign|amend) reports", N_("Your role may not sign or amend reports.")),
    (r"empty report cannot be signed", N_("An empty report cannot be signed: write the findings or the impression.")),
    (r"only a signed report can be amended", N_("Only a signed report can be amended.")),
    (r"amendment needs a reason", N_("Give the reason for the amendment.")),
    (r"reason must be at most", N_("The reason is too long (at most 2000 characters).")),
    (r"must be at most \d+ characters", N_("The text is too long (at most 20,000 characters).")),
    (r"contains control characters", N_("The text contains characters that cannot be stored.")),
    (r"name at least one instance", N_("Choose at least one image.")),
    (r"at most \d+ key images", N_("Too many key images (at most 500).")),
    (r"not instances of this study", N_("Some of these UIDs are not images of this study.")),
)
_BY_KIND: tuple[tuple[type[Exception], str], ...] = (
    (NotFound, N_("Not found, or not in your facility.")),
    (Forbidden, N_("You are not allowed to do this.")),
    (Conflict, N_("This cannot be done in the report's present state.")),
    (InvalidInput, N_("The request was refused: check what you typed.")),
)


def refusal(exc: Exception) -> tuple[str, dict[str, str]]:
    """The message id (and its values) that tells a user why the services refused."""
    text = str(exc)
    for pattern, message in _EXPLAINED:
        found = re.search(pattern, text)
        if found:
            return message, {k: v[:128] for k, v in found.groupdict().items()}
    for kind, message in _BY_KIND:
        if isinstance(exc, kind):
            return message, {}
    return N_("The archive could not do this now. Please try again."), {}


def explain(exc: Exception, language: str) -> str:
    """A refusal of the services, in ``language`` (never a stack trace, never JSON)."""
    message, values = refusal(exc)
    return gettext(language, message, **values)


def _status(exc: Exception) -> int:
    for kind, status in ((NotFound, 404), (Forbidden, 403), (Conflict, 409), (InvalidInput, 400)):
        if isinstance(exc, kind):
            return status
    return 503


@contextmanager
def _refusals(request: Request, values: dict[str, Any]) -> Iterator[None]:
    """Turn a refusal into a message on the page (re-rendered by the caller with ``values['error']``)."""
    try:
        yield
    except PacsError as exc:
        values["error"] = explain(exc, page_language(request))
        values["status"] = _status(exc)


# -- the reading list ---------------------------------------------------------------------------------------


def _filters(principal: Principal, modality: str, priority: str, assigned: str) -> ReadingFilters:
    return ReadingFilters(modality=modality, priority=priority,
                          assigned=principal.subject if assigned == "me" else assigned)


def _reading(request: Request, principal: Principal, filters: ReadingFilters) -> tuple[list[ReadingItem], int]:
    """The list as ``GET /api/reading-list`` reads and audits it."""
    with (
        audited(request, principal, "reading-list.read"),
        context(request).read_sessions() as session,
    ):
        items, total = reading_list(session, principal.scope, filters, limit=PAGE_SIZE)
    audit_access(request, principal, "reading-list.read", detail=f"{len(items)} of {total} studies")
    return items, total


ModalityQ = Annotated[str, Query(max_length=16)]
PriorityQ = Annotated[str, Query(max_length=8, pattern="^(|STAT|URGENT|ROUTINE)$")]
AssignedQ = Annotated[str, Query(max_length=128)]


@router.get("")
def reading_page(request: Request, principal: Annotated[Principal, require_page(WRITE)],
                 modality: ModalityQ = "", priority: PriorityQ = "", assigned: AssignedQ = "") -> Response:
    values: dict[str, Any] = {"items": [], "total": 0}
    with _refusals(request, values):
        values["items"], values["total"] = _reading(request, principal, _filters(principal, modality, priority,
                                                                                   assigned))
    status = values.pop("status", 200)
    return render(request, "ui/reading/list.html", principal, status=status, me=principal.subject,
                  filters={"modality": modality, "priority": priority, "assigned": assigned}, **values)


@router.get("/rows")
def reading_rows(request: Request, principal: Annotated[Principal, require_page(WRITE)],
                 modality: ModalityQ = "", priority: PriorityQ = "", assigned: AssignedQ = "") -> Response:
    """The rows alone, for ``reading.js`` (it swaps them in every 15 s and keeps the focus where it was)."""
    items, total = _reading(request, principal, _filters(principal, modality, priority, assigned))
    return render(request, "ui/reading/rows.html", principal, items=items, total=total, me=principal.subject)


@router.post("/{study}/claim", dependencies=CSRF)
def claim(study: UID, request: Request, principal: Annotated[Principal, require_page(WRITE)]) -> Response:
    return _claim_change(request, principal, study, "study.claim", lifecycle.claim,
                         N_("Study claimed: it is yours to read."))


@router.post("/{study}/release", dependencies=CSRF)
def release(study: UID, request: Request, principal: Annotated[Principal, require_page(WRITE)]) -> Response:
    return _claim_change(request, principal, study, "study.release", lifecycle.release,
                         N_("Study released: back on the list for everyone."))


def _claim_change(request: Request, principal: Principal, study: str, action: str,
                  change: Callable[..., object], done: str) -> Response:
    """Claim or release (the same service as POST/DELETE /api/studies/{study}/claim), audited; back to the list."""
    try:
        with (
            audited(request, principal, action, study),
            context(request).sessions() as session, session.begin(),
        ):
            change(session, principal, study)
    except PacsError as exc:
        message, values = refusal(exc)
        return redirect("/ui/reading", flash=message, flash_values=values)
    return redirect("/ui/reading", flash=done)


# -- the report editor --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyHeading:
    study_instance_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_description: str
    accession_number: str
    modalities: tuple[str, ...]


@dataclass(frozen=True)
class PickableInstance:
    series_instance_uid: str
    sop_instance_uid: str
    series_number: str
    instance_number: str
    modality: str
    series_description: str
    key: bool  # already in a key-image selection


def _search(request: Request, principal: Principal, resource: str, study: str,
            params: list[tuple[str, str]], limit: int) -> list[dict[str, Any]]:
    """Rows of a QIDO-RS search in the principal's scope (the one search service), keyed by attribute keyword."""
    search = parse_search(resource, [*params, ("limit", str(limit))], scope=principal.scope, study_uid=study)
    engine: QueryEngine = request.app.state.query_engine
    return engine.search(search.query).head(limit).rows


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return "\\".join(_plain(v) for v in value)
    if isinstance(value, dict):  # a person name as DICOM JSON gives it
        return str(value.get("Alphabetic", ""))
    return "" if value is None else str(value)


def _heading(request: Request, principal: Principal, study: str) -> StudyHeading:
    rows = _search(request, principal, "studies", study, [("StudyInstanceUID", study), ("includefield", "all")], 1)
    if not rows:
        raise NotFound(f"no study {study}")
    row = rows[0]
    return StudyHeading(study, _plain(row.get("PatientName")).replace("^", " ").strip(), _plain(row.get("PatientID")),
                        _plain(row.get("PatientBirthDate")), _plain(row.get("PatientSex")),
                        _plain(row.get("StudyDate")), _plain(row.get("StudyDescription")),
                        _plain(row.get("AccessionNumber")),
                        tuple(m for m in _plain(row.get("ModalitiesInStudy")).split("\\") if m and m not in NOT_IMAGES))


def _instances(request: Request, principal: Principal, study: str, keys: set[str]) -> tuple[list[PickableInstance],
                                                                                            bool]:
    rows = _search(request, principal, "instances", study,
                   [("includefield", "SeriesNumber,SeriesDescription,Modality,InstanceNumber")], MAX_PICKABLE + 1)
    picked = [PickableInstance(_plain(r.get("SeriesInstanceUID")), _plain(r.get("SOPInstanceUID")),
                               _plain(r.get("SeriesNumber")), _plain(r.get("InstanceNumber")),
                               _plain(r.get("Modality")), _plain(r.get("SeriesDescription")),
                               _plain(r.get("SOPInstanceUID")) in keys)
              for r in rows[:MAX_PICKABLE]]
    picked = [p for p in picked if p.modality not in NOT_IMAGES]
    picked.sort(key=lambda p: (_number(p.series_number), p.series_instance_uid, _number(p.instance_number)))
    return picked, len(rows) > MAX_PICKABLE


def _number(text: str) -> int:
    return int(text) if text.lstrip("-").isdigit() else 1 << 30


def _current(views: list[ReportView]) -> ReportView | None:
    """The report the editor works on: the study's newest."""
    return views[-1] if views else None


def _template_choices(modalities: tuple[str, ...]) -> list[Template]:
    """Both languages' templates for the study's modalities (all of them when none matches)."""
    chosen: list[Template] = []
    for language in ("vi", "en"):
        everything = templates(language)
        matching = [t for t in everything if set(t.modalities) & set(modalities)]
        chosen += matching or everything
    return chosen


def _editor(request: Request, principal: Principal, study: str, *, status: int = 200, error: str = "",
            findings: str | None = None, impression: str | None = None, template_id: str = "",
            amend_reason: str = "") -> Response:
    """The editor page: the study's heading, the report (every version), the templates, the key images."""
    ctx = context(request)
    with audited(request, principal, "report.read", study):
        heading = _heading(request, principal, study)
        with ctx.read_sessions() as session:
            views = lifecycle.study_reports(session, principal.scope, study)
            selections = key_images(session, principal, study)
    report = _current(views)
    audit_access(request, principal, "report.read", study_instance_uid=study, patient_id=heading.patient_id,
                 detail=f"{len(views)} report(s) (report editor)")
    audit_access(request, principal, "study.key-images.read", study_instance_uid=study,
                 patient_id=heading.patient_id, detail=f"{len(selections)} selection(s) (report editor)")
    keys = {sop for k in selections for _, sop in k.instances}
    with audited(request, principal, "dicomweb.search", study):
        instances, more = _instances(request, principal, study, keys)
    audit_access(request, principal, "dicomweb.search", study_instance_uid=study, patient_id=heading.patient_id,
                 detail=f"{len(instances)} instance(s) for key-image marking")
    choices = _template_choices(heading.modalities)
    current = report.current if report is not None else None
    editable = current is None or (current.status in (DRAFT, PRELIMINARY) and current.author == principal.subject)
    chosen = next((t for t in choices if f"{t.language}:{t.id}" == template_id), None)
    if chosen is not None and editable:
        findings, impression = chosen.findings, chosen.impression
    language = (chosen.language if chosen is not None else "") or (current.language if current else "") \
        or page_language(request)
    return render(request, "ui/reading/editor.html", principal, status=status, study=heading, report=report,
                  current=current, editable=editable, signed=current is not None and current.status in SIGNED_STATES,
                  findings=findings if findings is not None else (current.findings if current else ""),
                  impression=impression if impression is not None else (current.impression if current else ""),
                  report_language=language, templates=choices, template_id=template_id, instances=instances,
                  more_instances=more, key_images=selections, key_sops=keys, error=error, amend_reason=amend_reason,
                  viewer_url=f"/ui/viewer/{study}")


def _not_found_page(request: Request, principal: Principal, exc: PacsError) -> Response:
    return render(request, "ui/reading/refused.html", principal, status=_status(exc),
                  message=explain(exc, page_language(request)))


@router.get("/{study}")
def editor_page(study: UID, request: Request, principal: Annotated[Principal, require_page(WRITE)],
                template: Annotated[str, Query(max_length=80)] = "") -> Response:
    try:
        return _editor(request, principal, study, template_id=template)
    except PacsError as exc:
        return _not_found_page(request, principal, exc)


def _save(request: Request, principal: Principal, study: str, findings: str, impression: str,
          language: str) -> ReportView:
    """Create the draft (like ``POST /api/studies/{study}/reports``) or edit it (like ``PUT /api/reports/{id}``)."""
    ctx = context(request)
    with audited(request, principal, "report.read", study), ctx.read_sessions() as session:
        report = _current(lifecycle.study_reports(session, principal.scope, study))
    if report is None or report.current.status in SIGNED_STATES:
        if report is not None:  # signed: a change is an amendment (409, as the API answers)
            with audited(request, principal, "report.edit", report_id=report.id):
                raise Conflict(f"version {report.version} is {report.status}: signed text never changes "
                               "(amend the report instead)")
        with audited(request, principal, "report.create", study):
            return service.create_draft(ctx, principal, study, findings, impression, language)
    if report.current.findings == findings and report.current.impression == impression:
        return report  # nothing changed: no new audit row for an idle autosave
    with audited(request, principal, "report.edit", report_id=report.id):
        return service.edit(ctx, principal, report.id, findings, impression)


Language = Annotated[str, Form(max_length=2, pattern="^(|vi|en)$")]


@router.post("/{study}", dependencies=CSRF)
def editor_action(study: UID, request: Request, principal: Annotated[Principal, require_page(WRITE)],
                  action: Annotated[str, Form(pattern="^(save|preliminary|sign)$")],
                  findings: Text = "", impression: Text = "", language: Language = "") -> Response:
    """The editor's buttons: save the draft, make it preliminary, or sign (each saves the text first)."""
    lang = page_language(request)
    ctx = context(request)
    try:
        view = _save(request, principal, study, findings, impression, language or lang)
        if action == "preliminary":
            with audited(request, principal, "report.preliminary", report_id=view.id):
                view = service.make_preliminary(ctx, principal, view.id)
        elif action == "sign":
            with audited(request, principal, "report.sign", report_id=view.id):
                view = service.sign(ctx, principal, view.id)
    except PacsError as exc:
        try:
            return _editor(request, principal, study, status=_status(exc), error=explain(exc, lang),
                           findings=findings, impression=impression)
        except PacsError as again:
            return _not_found_page(request, principal, again)
    done = {"save": N_("Draft saved."), "preliminary": N_("The report is preliminary: clinicians can read it."),
            "sign": N_("The report is signed.")}[action]
    return redirect(f"/ui/reading/{study}", flash=done)


class DraftText(BaseModel):
    findings: str = Field(default="", max_length=20_000)
    impression: str = Field(default="", max_length=20_000)
    language: str = Field(default="", pattern="^(|vi|en)$")


@router.put("/{study}/draft", dependencies=CSRF)
def autosave(study: UID, body: DraftText, request: Request,
             principal: Annotated[Principal, require_page(WRITE)]) -> JSONResponse:
    """``reading.js``'s autosave: ``{report_id, version, status}``, or ``{message}`` in the page's language."""
    try:
        view = _save(request, principal, study, body.findings, body.impression,
                     body.language or page_language(request))
    except PacsError as exc:
        return JSONResponse({"message": explain(exc, page_language(request))}, status_code=_status(exc))
    return JSONResponse({"report_id": view.id, "version": view.version, "status": view.current.status})


@router.post("/{study}/amend", dependencies=CSRF)
def amend(study: UID, request: Request, principal: Annotated[Principal, require_page(WRITE)],
          reason: Annotated[str, Form(max_length=2000)] = "", findings: Text = "", impression: Text = "",
          action: Annotated[str, Form(pattern="^(draft|sign)$")] = "draft") -> Response:
    """Amend the signed report (like ``POST /api/reports/{id}/amend``); "sign" signs the new version at once."""
    lang = page_language(request)
    ctx = context(request)
    try:
        with audited(request, principal, "report.read", study), ctx.read_sessions() as session:
            report = _current(lifecycle.study_reports(session, principal.scope, study))
        if report is None:
            raise NotFound(f"no report on study {study}")
        with audited(request, principal, "report.amend", report_id=report.id):
            view = service.amend(ctx, principal, report.id, reason, findings, impression)
        if action == "sign":
            with audited(request, principal, "report.sign", report_id=view.id):
                service.sign(ctx, principal, view.id)
    except PacsError as exc:
        try:
            return _editor(request, principal, study, status=_status(exc), error=explain(exc, lang),
                           amend_reason=reason, findings=findings, impression=impression)
        except PacsError as again:
            return _not_found_page(request, principal, again)
    message = N_("The amendment is signed.") if action == "sign" else \
        N_("The amendment is a draft: edit it, then sign it.")
    return redirect(f"/ui/reading/{study}", flash=message)


@router.post("/{study}/key-images", dependencies=CSRF)
def mark(study: UID, request: Request, principal: Annotated[Principal, require_page(WRITE)],
         sop: Annotated[list[str] | None, Form(max_length=64)] = None,
         sop_uids: Annotated[str, Form(max_length=20_000)] = "",
         description: Annotated[str, Form(max_length=64)] = "") -> Response:
    """Key images (a KOS in the study, like ``POST /api/studies/{study}/key-images``): the ticked thumbnails and
    any SOP Instance UIDs typed or pasted (e.g. from the viewer's overlay)."""
    lang = page_language(request)
    uids = [*(sop or []), *re.split(r"[\s,;]+", sop_uids.strip())]
    uids = [u for u in uids if u]
    try:
        with audited(request, principal, "study.key-images", study):
            made = mark_key_images(context(request), principal, study, uids, description)
    except PacsError as exc:
        try:
            return _editor(request, principal, study, status=_status(exc), error=explain(exc, lang))
        except PacsError as again:
            return _not_found_page(request, principal, again)
    return redirect(f"/ui/reading/{study}#key-images", flash=N_("%(n)s key image(s) marked."),
                    flash_values={"n": len(made.instances)})


@router.get("/{study}/thumbnails/{series}/{sop}")
def thumbnail(study: UID, series: UID, sop: UID, request: Request,
              principal: Annotated[Principal, require_page(Capability.STUDY_READ)]) -> Response:
    """An instance's thumbnail for the key-image picker: the WADO-RS thumbnail service, audited the same way."""
    def produce(wado: Wado, target: Target) -> Body:
        return wado.thumbnail(target, parse_rendered(request.query_params), accept(request, query_parameter=True))

    return serve(request, principal, "dicomweb.thumbnail", study, series, sop, produce)
