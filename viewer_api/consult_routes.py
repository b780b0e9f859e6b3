"""Teleconsultation over HTTP (issue 14); the rules are :mod:`pacs.consults.service`'s.

=================================================  ==========  ==============================================
route                                              capability  answers
=================================================  ==========  ==============================================
``POST /api/studies/{study}/consults``             consult     201: a consult to ``to_facility``, or
                                                               ``external`` (+ the share link's ``url``)
``GET /api/studies/{study}/consults``              consult     the study's consults with their answers
``GET /api/consults?box=inbox|sent&state=``        consult     the caller's inbox / sent box, ``unread`` flags
``GET /api/consults/unread``                       consult     ``{"inbox": n, "sent": m}`` unread counts
``GET /api/consults/{id}``                         consult     one consult; marks it read for the caller's side
``POST /api/consults/{id}/answers``                consult     201: an answer (``as_report``: + a draft report)
``POST /api/consults/{id}/close``                  consult     closed: the consulted side loses the study
``GET|POST /s/{token}/consult``                    (link)      an outside doctor's page: question, answers, form
=================================================  ==========  ==============================================

``consult`` is held by radiologists, clinicians and admins. Refusals are JSON and audited (401/403 by the
security layer, 404/409/400 here); an unknown consult and another facility's consult are the same 404.

The outside doctor's page needs no login: its token is resolved only by :func:`pacs.sharing.links.open_link`
(expiry, revocation, the birth-date check and the address throttle apply as for the link's own page). Its form
carries a per-page CSRF token: an HMAC, under the archive's secret, of the link's id and the time the page was
made (valid :data:`FORM_TTL_S`), so a form posted from another site — which cannot read the page — is refused
(403) even where the browser holds the link's birth-date cookie. The page has no script (CSP ``default-src
'none'``, ``form-action 'self'``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from pacs.consults import service
from pacs.consults.models import ACTIVE_STATES
from pacs.consults.service import AnswerView, ConsultView, LinkGrant
from pacs.context import AppContext
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.i18n import environment, gettext
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.sharing.links import OpenedLink
from viewer_api import public_pages as pages
from viewer_api.public_pages import iso as _iso
from viewer_api.security import audit_access, audited, context, require
from viewer_api.urls import public_base

router = APIRouter(tags=["consults"])
ConsultId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Token = Annotated[str, Path(max_length=128)]
FORM_TTL_S = 12 * 3600  # how long a page's form may be posted
_ISSUED = re.compile(r"[0-9]{1,12}")  # ASCII digits only ("²".isdigit() is True, int("²") raises)
STATE_LABELS = {"open": "Waiting for an answer", "answered": "Answered", "closed": "Closed", "expired": "Expired"}


class ConsultRequest(BaseModel):
    question: str = Field(default="", max_length=service.MAX_QUESTION,
                          description="The question to the consulted side (Vietnamese or English)")
    to_facility: str | None = Field(default=None, max_length=64, description="The facility asked")
    external: bool = Field(default=False, description="Ask an outside doctor through a share link of scope "
                           "'study' instead (its url is in the answer, once)")
    expires_in_days: int | None = Field(default=None, ge=1, le=365, description="The consult's lifetime "
                                        "(PACS_CONSULT_DEFAULT_DAYS when absent, at most PACS_CONSULT_MAX_DAYS)")
    birth_date_check: bool = Field(default=False, description="external only: the link asks for the "
                                   "patient's birth date")


class AnswerRequest(BaseModel):
    text: str = Field(default="", max_length=service.MAX_ANSWER)
    as_report: bool = Field(default=False, description="radiologists: also start a draft report with this text")


# -- the API ------------------------------------------------------------------------------------------------


@router.post("/api/studies/{study}/consults", status_code=201,
             summary="Ask another facility (or an outside doctor through a share link) about a study")
def create_consult(study: str, body: ConsultRequest, request: Request, response: Response,
                   principal: Principal = require(Capability.CONSULT)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "consult.request", study):
        made = service.request_consult(context(request), principal, study, question=body.question,
                                       to_facility=body.to_facility, external=body.external,
                                       expires_in_days=body.expires_in_days,
                                       birth_date_check=body.birth_date_check, base_url=public_base(request))
    response.headers["Location"] = f"/api/consults/{made.consult.id}"
    result = _consult(made.consult)
    if made.link_url is not None:
        result["url"] = made.link_url
        result["link_expires_at"] = _iso(made.link_expires_at)
    return result


@router.get("/api/studies/{study}/consults", summary="A study's consults and their answers")
def list_study_consults(study: str, request: Request,
                        principal: Principal = require(Capability.CONSULT)) -> list[dict[str, Any]]:  # noqa: B008
    with audited(request, principal, "consult.read", study):
        views = service.study_consults(context(request), principal, study)
    return [_consult(v) for v in views]


@router.get("/api/consults", summary="The caller's consult inbox (asked of its facility) or sent box")
def list_consults(request: Request, response: Response,
                  box: str = Query("inbox", max_length=8, description="inbox or sent"),
                  state: str = Query("", max_length=16, description="open, answered, closed or expired"),
                  limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=1_000_000),
                  principal: Principal = require(Capability.CONSULT)) -> list[dict[str, Any]]:  # noqa: B008
    with audited(request, principal, "consult.list"):
        views, total = service.list_consults(context(request), principal, box=box, state=state, limit=limit,
                                             offset=offset)
    response.headers["X-Total-Count"] = str(total)
    audit_access(request, principal, "consult.list", detail=f"{box}: {len(views)} of {total} consults")
    return [_consult(v) for v in views]


@router.get("/api/consults/unread", summary="How many consults in each box have news for the caller's side")
def unread(request: Request,
           principal: Principal = require(Capability.CONSULT)) -> dict[str, int]:  # noqa: B008
    return service.unread_counts(context(request), principal)


@router.get("/api/consults/{consult_id}", summary="One consult with its answers (marks it read for your side)")
def read_consult(consult_id: ConsultId, request: Request,
                 principal: Principal = require(Capability.CONSULT)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "consult.open"):
        return _consult(service.open_consult(context(request), principal, consult_id))


@router.post("/api/consults/{consult_id}/answers", status_code=201,
             summary="Answer a consult (the consulted facility); radiologists may also start a draft report")
def answer_consult(consult_id: ConsultId, body: AnswerRequest, request: Request,
                   principal: Principal = require(Capability.CONSULT)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "consult.answer"):
        view, row = service.answer(context(request), principal, consult_id, body.text, as_report=body.as_report)
    return {**_answer(row), "consult": _consult(view)}


@router.post("/api/consults/{consult_id}/close", summary="Close a consult (either side): the study's grant ends")
def close_consult(consult_id: ConsultId, request: Request,
                  principal: Principal = require(Capability.CONSULT)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "consult.close"):
        return _consult(service.close(context(request), principal, consult_id))


# -- the outside doctor's page (a share link of purpose "consult") ---------------------------------------------


@router.get("/s/{token}/consult", response_class=HTMLResponse,
            summary="A consult's page for an outside doctor (no login; the share link is the key)")
def consult_page(token: Token, request: Request, sent: int = Query(0, ge=0, le=1)) -> Response:
    language = pages.language(request)
    opened = _open_consult_link(request, token, language, "share.consult")
    if isinstance(opened, Response):
        return opened
    try:
        view = service.external_consult(context(request), _grant(opened), pages.client_host(request))
    except NotFound:
        return pages.not_available(request, token, language)
    return _page(request, token, opened, view, language, sent=bool(sent))


@router.post("/s/{token}/consult", response_class=HTMLResponse,
             summary="An outside doctor's answer to a consult (the page's form)")
def consult_page_answer(token: Token, request: Request, name: Annotated[str, Form(max_length=400)] = "",
                        text: Annotated[str, Form(max_length=60_000)] = "",
                        csrf: Annotated[str, Form(max_length=200)] = "",
                        lang: Annotated[str, Form(max_length=8)] = "") -> Response:
    language = pages.language(request, lang)
    opened = _open_consult_link(request, token, language, "share.consult-answer")
    if isinstance(opened, Response):
        return opened
    ctx = context(request)
    if not _form_token_ok(_form_secret(ctx), opened.link_id, csrf):
        return pages.error_page(request, 403, language, "The form has expired",
                                [gettext(language, "Open the consultation again and send your answer from there.")],
                                back=f"/s/{token}/consult?lang={language}")
    grant, address = _grant(opened), pages.client_host(request)
    problem = ""
    if not name.strip():
        problem = gettext(language, "Enter your name and title.")
    elif not text.strip():
        problem = gettext(language, "Write your answer.")
    else:
        try:
            service.answer_external(ctx, grant, name, text, address)
        except InvalidInput as exc:
            problem = gettext(language, "The answer could not be saved: %(reason)s", reason=str(exc))
        except Conflict:
            problem = gettext(language, "This consultation is closed: no more answers can be sent.")
        except NotFound:
            return pages.not_available(request, token, language)
    if problem:
        try:
            view = service.external_consult(ctx, grant, address)
        except NotFound:
            return pages.not_available(request, token, language)
        return _page(request, token, opened, view, language, error=problem, name=name, text=text, status=400)
    return RedirectResponse(f"/s/{token}/consult?lang={language}&sent=1", status_code=303,
                            headers=pages.PAGE_HEADERS)


def _open_consult_link(request: Request, token: str, language: str, action: str) -> OpenedLink | Response:
    """The link, opened exactly as its own sub-pages are (expiry, revocation, lock, throttle; a birth date it asks
    for is taken on the link's own page), and only a link made for a consult."""
    opened = pages.open_for_page(request, token, language, action=action, sub_route=True)
    if isinstance(opened, Response):
        return opened
    if opened.purpose != "consult" or opened.consult_id is None:
        return pages.not_available(request, token, language)
    return opened


def _grant(opened: OpenedLink) -> LinkGrant:
    assert opened.consult_id is not None  # checked by _open_consult_link
    return LinkGrant(opened.link_id, opened.consult_id, opened.study_instance_uid)


def _page(request: Request, token: str, opened: OpenedLink, view: ConsultView, language: str, *,
          sent: bool = False, error: str = "", name: str = "", text: str = "", status: int = 200) -> HTMLResponse:
    ctx = context(request)
    names = ctx.settings.facility_names
    answers = [{"author": a.author_name or a.author, "when": pages.local_time(a.created_at, language), "text": a.text}
               for a in view.answers]
    body = environment(pages.TEMPLATES, language).get_template("consult/page.html").render(
        facility_name=opened.facility_name, base=f"/s/{token}", self_url=request.url.path, consult=view,
        patient_name=view.study.patient_name if view.study is not None else "",
        requesting_facility=names.get(view.requesting_facility, view.requesting_facility),
        asked_on=pages.local_time(view.created_at, language), state_label=gettext(language, STATE_LABELS[view.state]),
        answers=answers, active=view.state in ACTIVE_STATES, sent=sent, error=error, name=name, text=text,
        csrf=_form_token(_form_secret(ctx), opened.link_id), expires=pages.local_time(view.expires_at, language))
    return HTMLResponse(body, status_code=status, headers=pages.PAGE_HEADERS)


def _form_secret(ctx: AppContext) -> bytes:
    """The form tokens' key: derived from the archive's secret (pacs.security.authenticate), so that a form
    token is never a valid MAC of anything else made with that secret."""
    return hmac.new(pages.secret(ctx), b"consult-form", hashlib.sha256).digest()


def _form_token(secret: bytes, link_id: int, issued: int | None = None) -> str:
    """``<issued>.<HMAC(link id, issued)>``: made with the page, checked when its form is posted."""
    issued = int(time.time()) if issued is None else issued
    mac = hmac.new(secret, f"{link_id}|{issued}".encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{mac}"


def _form_token_ok(secret: bytes, link_id: int, value: str) -> bool:
    issued = value.partition(".")[0]
    if not _ISSUED.fullmatch(issued) or not 0 <= time.time() - int(issued) <= FORM_TTL_S:
        return False
    return hmac.compare_digest(_form_token(secret, link_id, int(issued)), value)


# -- JSON -----------------------------------------------------------------------------------------------------


def _answer(row: AnswerView) -> dict[str, Any]:
    return {"id": row.id, "text": row.text, "author": row.author, "author_name": row.author_name,
            "author_facility": row.author_facility, "share_link_id": row.share_link_id,
            "report_id": row.report_id, "created_at": _iso(row.created_at)}


def _consult(view: ConsultView) -> dict[str, Any]:
    study = view.study
    return {
        "id": view.id, "study_instance_uid": view.study_instance_uid, "state": view.state,
        "question": view.question, "requested_by": view.requested_by, "requested_by_name": view.requested_by_name,
        "requesting_facility": view.requesting_facility, "consulted_facility": view.consulted_facility,
        "external": view.external, "share_link_id": view.share_link_id, "created_at": _iso(view.created_at),
        "answered_at": _iso(view.answered_at), "closed_at": _iso(view.closed_at), "closed_by": view.closed_by,
        "expires_at": _iso(view.expires_at), "side": view.side, "unread": view.unread,
        "answers": [_answer(a) for a in view.answers],
        "study": None if study is None else {
            "patient_name": study.patient_name, "patient_id": study.patient_id,
            "patient_birth_date": study.patient_birth_date, "accession_number": study.accession_number,
            "study_date": study.study_date, "study_description": study.study_description,
            "modalities": [m for m in study.modalities.split("\\") if m], "facility": study.facility},
    }
