"""The technologist's pages and the study-management pages (issue 16): thin routes over the same pacs services as
the JSON API, with the same capabilities, scopes and audit rows.

=======================================  =============  ================================================================
page / route                             capability     service (the API route it mirrors)
=======================================  =============  ================================================================
``GET /ui/worklist``, ``…/table``        study.search   pacs.ris.orders.list_orders (GET /api/orders), MPPS state
``GET /ui/studies/{s}/completeness``     study.read     pacs.ris.completeness: received vs announced by MPPS
``GET|POST /ui/studies/{s}/correct``     study.correct  pacs.studies.corrections.correct_study (PATCH /api/studies/{s})
``GET /ui/studies/{s}/manage``           study.reject   series, rejected instances, send destinations of the study
``GET /ui/studies/{s}/archive.zip``      study.export   pacs.studies.archive_zip (GET /api/studies/{s}/archive.zip)
``POST /ui/studies/{s}/send``            study.send     pacs.studies.send.queue_send (POST /api/studies/{s}/send)
``GET /ui/studies/{s}/send-progress``    study.send     pacs.studies.send.send_progress (GET /api/studies/{s}/send)
``POST /ui/studies/{s}/reject|restore``  study.reject   pacs.studies.rejection (POST /api/studies/{s}/reject|restore)
``POST /ui/studies/{s}/delete``          study.delete   pacs.studies.deletion.delete_study (DELETE /api/studies/{s})
``GET|POST /ui/upload``                  study.store    pacs.studies.upload.store_upload (POST /api/studies/upload)
=======================================  =============  ================================================================

Every state-changing route checks the CSRF token (:func:`viewer_api.ui.core.check_csrf`). A study the principal may
not see (or, for correct/manage, may not change) is a 404 page like an unknown one. Refusals of the services are
audited by the services (``refusals_audited``) or here with :func:`viewer_api.security.audited`, as in the API.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from pacs.errors import Conflict, InvalidInput, NotFound, PacsError
from pacs.ris import completeness as completeness_service
from pacs.ris.models import ORDER_STATES
from pacs.ris.order_steps import order_studies, step_states
from pacs.ris.orders import list_orders
from pacs.security.access import Forbidden
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies import corrections, deletion, rejection, send, upload
from pacs.studies.models import REASON_CODES
from pacs.studies.send_targets import send_targets
from viewer_api.security import audit_access, audited, client_address, context
from viewer_api.transfer_routes import _receive_upload, exported_zip  # the API's streaming reader and zip
from viewer_api.ui.core import N_, check_csrf, redirect, render, require_page, translate

log = logging.getLogger("viewer_api")
router = APIRouter(include_in_schema=False)

Uid = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]
WORKLIST_LIMIT = 500
MODALITIES = ("CR", "CT", "DX", "MG", "MR", "NM", "PT", "RF", "US", "XA")


def _t(request: Request, message: str, **values: object) -> str:
    return translate(request, message, **values)


def _addressed(request: Request, principal: Principal) -> Principal:
    """The principal with the client's address, for the audit rows the services write (as the API does)."""
    if principal.source_address:
        return principal
    return replace(principal, source_address=client_address(request))


def _not_found(request: Request, principal: Principal) -> HTMLResponse:
    return render(request, "ui/error.html", principal, status=404, status_code=404, title=_t(request, "Not found"),
                  message=_t(request, "No such study, or it is not one you may open."))


def _error(request: Request, principal: Principal, exc: PacsError) -> HTMLResponse:
    """A refusal of a service as a translated page (NotFound 404, Forbidden 403, Conflict 409, InvalidInput 400)."""
    if isinstance(exc, NotFound):
        return _not_found(request, principal)
    if isinstance(exc, Forbidden):
        status, message = 403, _t(request, "You may not do this.")
    elif isinstance(exc, Conflict):
        status, message = 409, _conflict_message(request, exc)
    elif isinstance(exc, InvalidInput):
        status, message = 400, _t(request, "The request was refused: %(detail)s", detail=str(exc)[:300])
    else:
        raise exc
    return render(request, "ui/error.html", principal, status=status, status_code=status, title=_t(request, "Refused"),
                  message=message)


def _conflict_message(request: Request, exc: Conflict) -> str:
    text = str(exc)
    if "another correction" in text:
        return _t(request, "Another correction is running. Try again in a moment.")
    if "rejected instances" in text:
        return _t(request, "This study (or another study of the patient) has rejected instances: restore or "
                  "delete them before correcting.")
    return _t(request, "The request conflicts with the study's current state: %(detail)s", detail=text[:300])


# -- worklist --------------------------------------------------------------------------------------------------


def _worklist(request: Request, principal: Principal, day: str, modality: str, state: str) -> dict[str, Any]:
    if state and state not in ORDER_STATES:
        state = ""
    modality = modality.strip().upper()[:16]
    with audited(request, principal, "order.read"), context(request).read_sessions() as session:
        orders = list_orders(session, state or None, day, facilities=principal.scope.facilities,
                             limit=WORKLIST_LIMIT)
        if modality:
            orders = [o for o in orders if o.modality == modality]
        steps = step_states(session, [o.accession_number for o in orders])
        studies = order_studies(session, principal, orders)
    audit_access(request, principal, "order.read", detail=f"{len(orders)} order(s) (worklist page)")
    rows = [{"order": o, "mpps": steps.get(o.accession_number, ""), "study": studies.get(o.accession_number, "")}
            for o in orders]
    return {"rows": rows, "day": day, "modality": modality, "state": state, "states": ORDER_STATES,
            "modalities": MODALITIES}


def _day(value: str) -> str:
    cleaned = value.strip().replace("-", "")
    if len(cleaned) == 8 and cleaned.isdigit():
        return cleaned
    return f"{date.today():%Y%m%d}"


@router.get("/ui/worklist", response_class=HTMLResponse)
async def worklist_page(request: Request, day: str = Query("", alias="date", max_length=10),
                        modality: str = Query("", max_length=16), state: str = Query("", max_length=16),
                        principal: Principal = require_page(Capability.STUDY_SEARCH)) -> Response:  # noqa: B008
    values = await run_in_threadpool(_worklist, request, principal, _day(day), modality, state)
    return render(request, "ui/tech/worklist.html", principal, **values)


@router.get("/ui/worklist/table", response_class=HTMLResponse)
async def worklist_table(request: Request, day: str = Query("", alias="date", max_length=10),
                         modality: str = Query("", max_length=16), state: str = Query("", max_length=16),
                         principal: Principal = require_page(Capability.STUDY_SEARCH)) -> Response:  # noqa: B008
    """The worklist's table alone, for the page's auto-refresh (static/ui/tech.js)."""
    values = await run_in_threadpool(_worklist, request, principal, _day(day), modality, state)
    return render(request, "ui/tech/worklist_table.html", principal, **values)


# -- completeness ----------------------------------------------------------------------------------------------


@router.get("/ui/studies/{study}/completeness", response_class=HTMLResponse)
async def completeness_page(study: Uid, request: Request,
                            principal: Principal = require_page(Capability.STUDY_READ)) -> Response:  # noqa: B008
    def load() -> completeness_service.StudyCompleteness:
        with audited(request, principal, "study.completeness", study), \
                context(request).read_sessions() as session:
            found = completeness_service.study_completeness(session, principal, study)
        audit_access(request, principal, "study.completeness", study_instance_uid=study,
                     patient_id=found.header.patient_id,
                     detail=f"{len(found.series)} series, {found.missing} missing ({found.state})")
        return found

    try:
        found = await run_in_threadpool(load)
    except PacsError as exc:
        return _error(request, principal, exc)
    return render(request, "ui/tech/completeness.html", principal, study=found,
                  may_correct=principal.can(Capability.STUDY_CORRECT),
                  may_manage=principal.can(Capability.STUDY_REJECT))


# -- correct ---------------------------------------------------------------------------------------------------


def _owned_header(request: Request, principal: Principal, study: str, action: str, *,
                  shown: bool = True) -> completeness_service.StudyHeader:
    """The study's header if the principal may change the study (else NotFound, audited); ``shown``: the page
    shows it (an access row), else it is only the baseline of a change the service audits itself."""
    with audited(request, principal, action, study), context(request).read_sessions() as session:
        header = completeness_service.study_header(session, principal, study, owned=True)
    if shown:
        audit_access(request, principal, action, study_instance_uid=study, patient_id=header.patient_id,
                     detail="page")
    return header


def _form_values(header: completeness_service.StudyHeader) -> dict[str, str]:
    birth = header.patient_birth_date
    return {"name": header.patient_name, "id": header.patient_id, "issuer": header.issuer_of_patient_id,
            "birth_date": f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}" if len(birth) == 8 else "",
            "sex": header.patient_sex, "accession_number": header.accession_number,
            "description": header.study_description, "reason": ""}


@router.get("/ui/studies/{study}/correct", response_class=HTMLResponse)
async def correct_page(study: Uid, request: Request,
                       principal: Principal = require_page(Capability.STUDY_CORRECT)) -> Response:  # noqa: B008
    try:
        header = await run_in_threadpool(_owned_header, request, principal, study, "study.correct-page")
    except PacsError as exc:
        return _error(request, principal, exc)
    return render(request, "ui/tech/correct.html", principal, header=header, form=_form_values(header), error="")


def _changes(header: completeness_service.StudyHeader, form: dict[str, str]) -> corrections.StudyChanges:
    """Only what the form changed: an unchanged field is None, so an accession fix is not a patient-level change."""
    def changed(new: str, old: str) -> str | None:
        return new if new.strip() != old.strip() else None

    birth = form["birth_date"].replace("-", "").strip()
    patient = corrections.PatientChanges(
        name=changed(form["name"], header.patient_name), id=changed(form["id"], header.patient_id),
        issuer=changed(form["issuer"], header.issuer_of_patient_id),
        birth_date=changed(birth, header.patient_birth_date), sex=changed(form["sex"], header.patient_sex))
    return corrections.StudyChanges(patient, changed(form["accession_number"], header.accession_number),
                                    changed(form["description"], header.study_description))


@router.post("/ui/studies/{study}/correct", response_class=HTMLResponse, dependencies=[Depends(check_csrf)])
async def correct_submit(study: Uid, request: Request,
                         name: str = Form("", max_length=400), patient_id: str = Form("", max_length=128),
                         issuer: str = Form("", max_length=128), birth_date: str = Form("", max_length=32),
                         sex: str = Form("", max_length=8), accession_number: str = Form("", max_length=64),
                         description: str = Form("", max_length=256), reason: str = Form("", max_length=4096),
                         principal: Principal = require_page(Capability.STUDY_CORRECT)) -> Response:  # noqa: B008
    principal = _addressed(request, principal)
    form = {"name": name, "id": patient_id, "issuer": issuer, "birth_date": birth_date, "sex": sex,
            "accession_number": accession_number, "description": description, "reason": reason}
    try:
        header = await run_in_threadpool(lambda: _owned_header(request, principal, study, "study.correct",
                                                               shown=False))
    except PacsError as exc:
        return _error(request, principal, exc)
    error = ""
    status = 200
    try:
        result = await run_in_threadpool(corrections.correct_study, context(request), principal, study,
                                         _changes(header, form), reason)
    except InvalidInput as exc:
        error, status = _invalid_message(request, exc), 422
    except Conflict as exc:
        error, status = _conflict_message(request, exc), 409
    except PacsError as exc:
        return _error(request, principal, exc)
    if error:
        return render(request, "ui/tech/correct.html", principal, status=status, header=header, form=form,
                      error=error)
    return redirect(f"/ui/studies/{study}/correct",
                    flash=N_("Correction saved: %(rewritten)s object(s) rewritten, %(unchanged)s already correct."),
                    flash_values={"rewritten": result.objects_rewritten, "unchanged": result.objects_unchanged})


def _invalid_message(request: Request, exc: InvalidInput) -> str:
    text = str(exc)
    if text.startswith("say why"):
        return _t(request, "Say why: the reason is required and is written to the audit trail.")
    if text.startswith("nothing to correct"):
        return _t(request, "Nothing to correct: change at least one field.")
    return _t(request, "The correction was refused: %(detail)s", detail=text[:300])


# -- manage ----------------------------------------------------------------------------------------------------


@router.get("/ui/studies/{study}/manage", response_class=HTMLResponse)
async def manage_page(study: Uid, request: Request, destination: str = Query("", max_length=16),
                      principal: Principal = require_page(Capability.STUDY_REJECT)) -> Response:  # noqa: B008
    def load() -> dict[str, Any]:
        with audited(request, principal, "study.manage-page", study), \
                context(request).read_sessions() as session:
            found = completeness_service.study_completeness(session, principal, study, owned=True)
            targets = send_targets(session, principal, study) if principal.can(Capability.STUDY_SEND) else []
            rejected = rejection.list_rejected(session, principal, study_uid=study)
        audit_access(request, principal, "study.manage-page", study_instance_uid=study,
                     patient_id=found.header.patient_id, detail=f"{len(rejected)} rejected instance(s)")
        return {"study": found, "targets": targets, "rejected": _rejected_by_series(rejected)}

    try:
        values = await run_in_threadpool(load)
    except PacsError as exc:
        return _error(request, principal, exc)
    caps = {"export": principal.can(Capability.STUDY_EXPORT), "send": principal.can(Capability.STUDY_SEND),
            "reject": principal.can(Capability.STUDY_REJECT), "delete": principal.can(Capability.STUDY_DELETE),
            "correct": principal.can(Capability.STUDY_CORRECT)}
    return render(request, "ui/tech/manage.html", principal, caps=caps, reasons=list(REASON_CODES),
                  destination=destination.strip().upper(), **values)


def _rejected_by_series(items: list[rejection.RejectedItem]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for item in items:
        group = groups.setdefault(item.series_instance_uid, {"series": item.series_instance_uid, "count": 0,
                                                              "reasons": set()})
        group["count"] += 1
        group["reasons"].add(item.reason)
    return [{**g, "reasons": sorted(g["reasons"])} for g in groups.values()]


@router.get("/ui/studies/{study}/archive.zip")
async def study_zip(study: Uid, request: Request,
                    principal: Principal = require_page(Capability.STUDY_EXPORT)) -> Response:  # noqa: B008
    return await _zip(request, principal, study, None)


@router.get("/ui/studies/{study}/series/{series}/archive.zip")
async def series_zip(study: Uid, series: Uid, request: Request,
                     principal: Principal = require_page(Capability.STUDY_EXPORT)) -> Response:  # noqa: B008
    return await _zip(request, principal, study, series)


async def _zip(request: Request, principal: Principal, study: str, series: str | None) -> Response:
    try:
        return await exported_zip(request, principal, study, series)
    except PacsError as exc:
        return _error(request, principal, exc)


@router.post("/ui/studies/{study}/send", dependencies=[Depends(check_csrf)])
async def send_submit(study: Uid, request: Request, destination: str = Form(..., max_length=16),
                      series: list[str] = Form([]),  # noqa: B008
                      principal: Principal = require_page(Capability.STUDY_SEND)) -> Response:  # noqa: B008
    principal = _addressed(request, principal)
    chosen = [s for s in series if s.strip()] or None

    def queue() -> send.QueuedSend:
        with audited(request, principal, "study.send", study):
            return send.queue_send(context(request), principal, study, destination, series=chosen)

    try:
        queued = await run_in_threadpool(queue)
    except PacsError as exc:
        return _error(request, principal, exc)
    return redirect(f"/ui/studies/{study}/manage?destination={queued.destination}",
                    flash=N_("%(count)s instance(s) queued for %(destination)s."),
                    flash_values={"count": queued.queued, "destination": queued.destination})


@router.get("/ui/studies/{study}/send-progress")
async def send_progress(study: Uid, request: Request, destination: str = Query(..., max_length=16),
                        principal: Principal = require_page(Capability.STUDY_SEND)) -> Response:  # noqa: B008
    """JSON for the manage page's progress line (static/ui/tech.js polls it)."""
    def load() -> send.DestinationProgress:
        with audited(request, principal, "study.send-progress", study), \
                context(request).read_sessions() as session:
            return send.send_progress(session, principal, study, destination=destination).of(destination.strip())

    try:
        mine = await run_in_threadpool(load)
    except NotFound:
        return JSONResponse({"code": "not_found"}, status_code=404)
    except PacsError as exc:
        return JSONResponse({"code": "invalid_request", "message": str(exc)[:300]}, status_code=400)
    done = mine.pending == 0 and mine.sent + mine.failed > 0
    text = _t(request, "%(destination)s: %(sent)s sent, %(pending)s waiting, %(failed)s failed",
              destination=mine.destination, sent=mine.sent, pending=mine.pending, failed=mine.failed)
    return JSONResponse({"destination": mine.destination, "pending": mine.pending, "sent": mine.sent,
                         "failed": mine.failed, "done": done, "text": text})


@router.post("/ui/studies/{study}/reject", dependencies=[Depends(check_csrf)])
async def reject_submit(study: Uid, request: Request, reason: str = Form(..., max_length=32),
                        series: list[str] = Form([]),  # noqa: B008
                        principal: Principal = require_page(Capability.STUDY_REJECT)) -> Response:  # noqa: B008
    principal = _addressed(request, principal)
    chosen = [s for s in series if s.strip()] or None
    try:
        result = await run_in_threadpool(rejection.reject, context(request), principal, study, reason,
                                         series=chosen)
    except PacsError as exc:
        return _error(request, principal, exc)
    return redirect(f"/ui/studies/{study}/manage",
                    flash=N_("%(count)s instance(s) rejected."), flash_values={"count": len(result.rejected)})


@router.post("/ui/studies/{study}/restore", dependencies=[Depends(check_csrf)])
async def restore_submit(study: Uid, request: Request, series: list[str] = Form([]),  # noqa: B008
                         principal: Principal = require_page(Capability.STUDY_REJECT)) -> Response:  # noqa: B008
    principal = _addressed(request, principal)
    chosen = [s for s in series if s.strip()] or None
    try:
        result = await run_in_threadpool(rejection.restore, context(request), principal, study, series=chosen)
    except PacsError as exc:
        return _error(request, principal, exc)
    return redirect(f"/ui/studies/{study}/manage",
                    flash=N_("%(count)s instance(s) restored."), flash_values={"count": len(result.restored)})


@router.post("/ui/studies/{study}/delete", response_class=HTMLResponse, dependencies=[Depends(check_csrf)])
async def delete_submit(study: Uid, request: Request, reason: str = Form("", max_length=1024),
                        confirm: str = Form("", max_length=8),
                        principal: Principal = require_page(Capability.STUDY_DELETE)) -> Response:  # noqa: B008
    """Two steps: without ``confirm`` the confirmation page (what will go, the reason); with it, the deletion."""
    principal = _addressed(request, principal)
    if confirm != "yes":
        try:
            header = await run_in_threadpool(_owned_header, request, principal, study, "study.delete-page")
        except PacsError as exc:
            return _error(request, principal, exc)
        return render(request, "ui/tech/delete_confirm.html", principal, header=header, reason=reason)
    try:
        await run_in_threadpool(deletion.delete_study, context(request), principal, study, reason)
    except InvalidInput:
        return redirect(f"/ui/studies/{study}/manage",
                        flash=N_("Say why: the reason is required and is written to the audit trail."))
    except PacsError as exc:
        return _error(request, principal, exc)
    return redirect("/", flash=N_("The study was deleted."))


# -- upload ----------------------------------------------------------------------------------------------------


@router.get("/ui/upload", response_class=HTMLResponse)
async def upload_page(request: Request,
                      principal: Principal = require_page(Capability.STUDY_STORE)) -> Response:  # noqa: B008
    return render(request, "ui/tech/upload.html", principal, result=None)


@router.post("/ui/upload", dependencies=[Depends(check_csrf)])
async def upload_submit(request: Request,
                        principal: Principal = require_page(Capability.STUDY_STORE)) -> Response:  # noqa: B008
    """The drop zone's post (multipart/form-data): JSON for static/ui/tech.js, the result page for a plain form."""
    ctx = context(request)
    principal = _addressed(request, principal)
    wants_json = "application/json" in request.headers.get("accept", "")
    files = upload.UploadFiles(ctx.settings.upload_max_files)
    try:
        try:
            if request.headers.get("x-csrf-token"):  # the drop zone's fetch: the body streams to disk
                await _receive_upload(request, files, ctx.settings.http_request_timeout_s)
            else:  # a plain form post: check_csrf has parsed the form (its files are spooled) to read the token
                await _copy_form_files(request, files)
            result = await run_in_threadpool(upload.store_upload, ctx, request.app.state.ingestor, principal,
                                             files, address=principal.source_address)
        except Exception as exc:  # refused: nothing stored; audited like the API's refusals
            await run_in_threadpool(audit_access, request, principal, "study.upload", outcome="failure",
                                    detail=f"refused: {type(exc).__name__}: {exc}"[:300])
            message = _t(request, "The upload was refused: %(detail)s", detail=str(exc)[:300])
            if wants_json:
                return JSONResponse({"code": "refused", "message": message}, status_code=400)
            return render(request, "ui/tech/upload.html", principal, status=400, result=None, error=message)
    finally:
        files.close()
    rows = [{"file": f.file, "entry": f.entry, "status": f.status, "status_text": _status_text(request, f.status),
             "study": f.study_instance_uid, "message": f.message} for f in result.files]
    totals = {"files": len(result.files), "stored": result.count(upload.STORED),
              "duplicate": result.count(upload.DUPLICATE), "refused": result.count(upload.REFUSED)}
    if wants_json:
        summary = _t(request, "%(files)s file(s): %(stored)s stored, %(duplicate)s already here, %(refused)s "
                     "refused", **totals)
        return JSONResponse({"totals": totals, "summary": summary, "files": rows})
    return render(request, "ui/tech/upload.html", principal, result={"totals": totals, "files": rows})


async def _copy_form_files(request: Request, files: upload.UploadFiles) -> None:
    form = await request.form()
    for value in form.getlist("files"):
        if isinstance(value, StarletteUpload) and value.filename:
            files.begin_file(value.filename, value.content_type or "")
            while block := await value.read(1024 * 1024):
                await run_in_threadpool(files.part_data, block)
            files.end_part()


def _status_text(request: Request, status: str) -> str:
    return {upload.STORED: _t(request, "stored"), upload.DUPLICATE: _t(request, "already here"),
            upload.REFUSED: _t(request, "refused")}.get(status, status)
