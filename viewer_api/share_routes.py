"""Share links over HTTP (SPEC §6): the API that makes and manages them, and the public pages they open.

=================================================  ============  ==============================================
route                                              capability    answers
=================================================  ============  ==============================================
``POST /api/studies/{study}/shares``               share.create  201 ``{"id", "url", "expires_at", …}``
``GET /api/shares``                                share.create  the caller's facility's links (admins: all)
``DELETE /api/shares/{id}``                        share.create  204: revoked
``GET /s/{token}``                                 (the link)    the share page (HTML), or the birth-date form
``POST /s/{token}``                                (the link)    the birth-date form's answer
``GET /s/{token}/report.pdf``                      (the link)    a signed report as PDF (``?n=``: which one)
``GET /s/{token}/images/{n}.jpg``                  (the link)    key image ``n`` (scopes with images)
``GET /s/{token}/viewer``                          (the link)    scope "study": opens the OHIF viewer
``GET /share-static/{name}``                       —             the pages' stylesheet and hand-off script
=================================================  ============  ==============================================

The public pages are HTML in Vietnamese or English (``?lang=``, then ``Accept-Language``, then Vietnamese;
:mod:`pacs.i18n`), errors included: unknown link 404, expired or revoked 410, locked 423, too many failures
from one address 429. They carry their own headers: a CSP without inline scripts, ``Cache-Control: no-store``,
``Referrer-Policy: no-referrer`` (the token is in the URL) and ``X-Robots-Tag: noindex``.

The token never reaches the audit trail or a log: these routes do not use ``audit_access`` (which records the
request path); :func:`pacs.sharing.links.open_link` audits with the link's id, and the log filter prints
``/s/<redacted>`` (pacs.security.redaction). A correct birth date is remembered for ``share_session_ttl_s`` by
an HttpOnly, SameSite=Strict cookie limited to the link's path and signed with the archive's secret.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from babel.dates import format_date
from fastapi import APIRouter, Form, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from pacs.dicomweb.wado import Unrenderable
from pacs.errors import NotFound
from pacs.imaging.render import placeholder
from pacs.jobs import utcnow
from pacs.reports.document import REPORT_TIMEZONE
from pacs.security.authenticate import Authenticator
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.sharing import content
from pacs.sharing.links import (
    LinkInfo,
    OpenedLink,
    ShareScope,
    birth_date_cookie,
    create_link,
    lifetime_days,
    link_url,
    list_links,
    revoke_link,
)
from pacs.viewer import EXPIRY_STORAGE_KEY, TOKEN_STORAGE_KEY
from viewer_api import public_pages as pages
from viewer_api.security import audit_access, audited, context, require
from viewer_api.urls import public_base

router = APIRouter(tags=["share links"])

STATIC = Path(__file__).parent / "static" / "share"
STATIC_FILES = {"share.css": "text/css; charset=utf-8", "viewer.js": "text/javascript; charset=utf-8",
                "icon.svg": "image/svg+xml"}
LinkId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
_IMAGE_NUMBER = re.compile(r"[0-9]{1,4}")  # ASCII digits only ("²".isdigit() is True, int("²") raises)
Token = Annotated[str, PathParam(description="the link's token (anything else: the 404 page)")]


class ShareRequest(BaseModel):
    scope: ShareScope = Field(description="report, report+key-images or study")
    expires_in_days: int | None = Field(default=None, ge=1, le=365,
                                        description="1-365; default PACS_SHARE_LINK_DEFAULT_DAYS")
    birth_date_check: bool = Field(default=False, description="ask for the patient's birth date before opening")


# -- the API --------------------------------------------------------------------------------------------


@router.post("/api/studies/{study}/shares", status_code=201, summary="Make a share link to a study's report")
def create_share(study: str, body: ShareRequest, request: Request,
                 principal: Principal = require(Capability.SHARE_CREATE)) -> dict[str, Any]:  # noqa: B008
    ctx = context(request)
    days = lifetime_days(body.expires_in_days, ctx.settings)
    with audited(request, principal, "share.create", study), ctx.sessions() as session, session.begin():
        made = create_link(session, principal, study, scope=body.scope, expires_in_days=days,
                           birth_date_check=body.birth_date_check, base_url=public_base(request))
    return {"id": made.id, "url": made.url, "expires_at": made.expires_at.isoformat(), "scope": made.scope.value,
            "birth_date_check": body.birth_date_check, "study_instance_uid": study}


@router.get("/api/shares", summary="Share links of the caller's facility (every link for admins)")
def list_shares(request: Request, study: str = Query("", max_length=64),
                principal: Principal = require(Capability.SHARE_CREATE)) -> list[dict[str, Any]]:  # noqa: B008
    with context(request).read_sessions() as session:
        links = list_links(session, principal, study)
    audit_access(request, principal, "share.list", study_instance_uid=study, detail=f"{len(links)} link(s)")
    return [_link_json(link) for link in links]


@router.delete("/api/shares/{link_id}", status_code=204, summary="Revoke a share link")
def revoke_share(link_id: LinkId, request: Request,
                 principal: Principal = require(Capability.SHARE_CREATE)) -> Response:  # noqa: B008
    with audited(request, principal, "share.revoke"), context(request).sessions() as session, session.begin():
        revoke_link(session, principal, link_id)
    return Response(status_code=204)


def _link_json(link: LinkInfo) -> dict[str, Any]:
    return {"id": link.id, "study_instance_uid": link.study_instance_uid, "scope": link.scope,
            "purpose": link.purpose, "consult_id": link.consult_id, "birth_date_check": link.birth_date_check,
            "state": link.state, "failed_attempts": link.failed_attempts, "locked_at": pages.iso(link.locked_at),
            "created_by": link.created_by, "created_by_facility": link.created_by_facility,
            "created_at": pages.iso(link.created_at), "expires_at": pages.iso(link.expires_at),
            "revoked_at": pages.iso(link.revoked_at), "revoked_by": link.revoked_by,
            "last_opened_at": pages.iso(link.last_opened_at), "open_count": link.open_count}


# -- the public pages -----------------------------------------------------------------------------------


@router.get("/s/{token}", response_class=HTMLResponse, summary="The share page (no login; the token is the key)")
async def share_page(token: Token, request: Request) -> Response:
    lang = pages.language(request)
    refusal = await pages.refused(request, lang, "share.open")
    return refusal if refusal is not None else await run_in_threadpool(_page, request, token, lang)


def _page(request: Request, token: str, lang: str) -> Response:
    opened = pages.open_for_page(request, token, lang, action="share.open")
    if isinstance(opened, Response):
        return opened
    return _render_page(request, token, opened, lang)


@router.post("/s/{token}", response_class=HTMLResponse, summary="The birth-date form of a share link")
async def share_birth_date(token: Token, request: Request, birth_date: Annotated[str, Form(max_length=32)] = "",
                           lang: Annotated[str, Form(max_length=8)] = "") -> Response:
    chosen = pages.language(request, lang)
    refusal = await pages.refused(request, chosen, "share.birth-date")
    return refusal if refusal is not None else await run_in_threadpool(_birth_date, request, token, chosen,
                                                                       birth_date)


def _birth_date(request: Request, token: str, lang: str, birth_date: str) -> Response:
    opened = pages.open_for_page(request, token, lang, action="share.birth-date", birth_date=birth_date.strip())
    if isinstance(opened, Response):
        return opened
    ctx = context(request)
    ttl = ctx.settings.share_session_ttl_s
    response = RedirectResponse(f"/s/{token}?lang={lang}", status_code=303, headers=pages.PAGE_HEADERS)
    response.set_cookie(pages.COOKIE, birth_date_cookie(pages.secret(ctx), token, ttl), max_age=ttl,
                        path=f"/s/{token}", httponly=True, samesite="strict", secure=_secure(request))
    return response


@router.get("/s/{token}/report.pdf", summary="A signed report of a share link as PDF",
            response_class=Response, responses={200: {"content": {"application/pdf": {}}}})
async def share_pdf(token: Token, request: Request, n: int = Query(1, ge=1, le=1000)) -> Response:
    lang = pages.language(request)
    refusal = await pages.refused(request, lang, "share.pdf")
    return refusal if refusal is not None else await run_in_threadpool(_pdf, request, token, lang, n)


def _pdf(request: Request, token: str, lang: str, n: int) -> Response:
    opened = pages.open_for_page(request, token, lang, action="share.pdf", sub_route=True)
    if isinstance(opened, Response):
        return opened
    ctx = context(request)
    try:
        pdf, filename = content.report_pdf(ctx, opened, n, language=lang,
                                           share_url=link_url(public_base(request), token))
    except NotFound:
        return pages.not_available(request, token, lang)
    return Response(pdf, media_type="application/pdf", headers={
        **pages.PAGE_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/s/{token}/images/{n}.jpg", summary="A key image of a share link, sized for phones",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
async def share_image(token: Token, n: Annotated[str, PathParam(description="1, 2, …")], request: Request
                      ) -> Response:
    lang = pages.language(request)
    refusal = await pages.refused(request, lang, "share.image")
    return refusal if refusal is not None else await run_in_threadpool(_image, request, token, lang, n)


def _image(request: Request, token: str, lang: str, n: str) -> Response:
    if not _IMAGE_NUMBER.fullmatch(n):
        return pages.not_available(request, token, lang)
    opened = pages.open_for_page(request, token, lang, action="share.image", sub_route=True)
    if isinstance(opened, Response):
        return opened
    try:
        image = content.key_image_jpeg(context(request), opened, int(n))
    except NotFound:
        return pages.not_available(request, token, lang)
    except Unrenderable:  # pixel data the renderer cannot show: a grey square, as thumbnails do
        image = placeholder(256)
    return Response(image, media_type="image/jpeg", headers=pages.PAGE_HEADERS)


@router.get("/s/{token}/viewer", response_class=HTMLResponse,
            summary="Scope 'study': open the viewer on this study only (a short-lived viewer session)")
async def share_viewer(token: Token, request: Request) -> Response:
    lang = pages.language(request)
    refusal = await pages.refused(request, lang, "share.viewer")
    return refusal if refusal is not None else await run_in_threadpool(_viewer, request, token, lang)


def _viewer(request: Request, token: str, lang: str) -> Response:
    opened = pages.open_for_page(request, token, lang, action="share.viewer", sub_route=True)
    if isinstance(opened, Response):
        return opened
    if opened.scope is not ShareScope.STUDY:
        return pages.not_available(request, token, lang)
    ctx = context(request)
    remaining = int((opened.expires_at - utcnow()).total_seconds())
    authenticator: Authenticator = request.app.state.authenticator
    session_token, ttl = authenticator.issue_share_token(opened.link_id,
                                                         max(60, min(ctx.settings.share_session_ttl_s, remaining)))
    return pages.html(request, "share/viewer.html", lang, opened, token, session_token=session_token,
                      expires_in=ttl, token_key=TOKEN_STORAGE_KEY, expiry_key=EXPIRY_STORAGE_KEY,
                      next_url=f"/ohif/viewer?StudyInstanceUIDs={opened.study_instance_uid}")


@router.get("/share-static/{name}", summary="The share pages' stylesheet and viewer hand-off script")
def share_static(name: Annotated[str, PathParam(max_length=32)]) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response((STATIC / name).read_bytes(), media_type=media_type,
                    headers={"Cache-Control": "public, max-age=3600"})


# -- helpers --------------------------------------------------------------------------------------------


def _render_page(request: Request, token: str, opened: OpenedLink, lang: str) -> Response:
    ctx = context(request)
    with ctx.read_sessions() as session:
        page = content.page_content(session, opened)
    reports = [{"number": r.number, "status": r.status, "findings": r.findings, "impression": r.impression,
                "amend_reason": r.amend_reason, "signer": r.signed_by,
                "signed": pages.local_time(r.signed_at, lang)} for r in page.reports]
    return pages.html(request, "share/page.html", lang, opened, token, page=page, reports=reports,
                      study_date=_study_date(page.study_date, lang), images=list(range(1, page.key_images + 1)),
                      viewer=opened.scope is ShareScope.STUDY, consult=opened.purpose == "consult",
                      consult_question=page.consult_question,
                      expires=_day(opened.expires_at.astimezone(REPORT_TIMEZONE).date(), lang))


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or context(request).settings.public_url.startswith("https:")


def _study_date(value: str, lang: str) -> str:
    try:
        return _day(date(int(value[:4]), int(value[4:6]), int(value[6:8])), lang)
    except (ValueError, IndexError):
        return value


def _day(day: date, lang: str) -> str:
    return format_date(day, "dd/MM/yyyy" if lang == "vi" else "d MMM yyyy", locale=lang)
