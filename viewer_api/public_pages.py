"""What the public share-link pages have in common (viewer_api.share_routes, viewer_api.consult_routes):
opening a link for a page, the error pages, the language choice, the page headers, the archive's secret and
the per-app throttle of failed opens.

These pages need no login: the token in the URL is the key. They are HTML in Vietnamese or English (``?lang=``,
then ``Accept-Language``, then Vietnamese; :mod:`pacs.i18n`), errors included: unknown link 404, expired or
revoked 410, locked 423, too many failures from one address 429.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from babel.dates import format_datetime
from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from pacs import audit
from pacs.context import AppContext
from pacs.errors import InvalidInput
from pacs.i18n import choose_language, environment, gettext
from pacs.reports.document import REPORT_TIMEZONE
from pacs.security.authenticate import load_or_create_secret
from pacs.sharing.links import (
    BirthDateRequired,
    LinkGone,
    LinkLocked,
    LinkNotFound,
    OpenedLink,
    WrongBirthDate,
    check_birth_date_cookie,
    open_link,
)
from pacs.sharing.throttle import ShareThrottle, Throttled
from viewer_api.security import context

TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "pacs_share"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
}


def client_host(request: Request) -> str:
    """The client's host without its port: the throttle's key (a client changes its port every connection)
    and the source address of the share pages' audit rows. Behind a proxy in PACS_TRUSTED_PROXIES, the client
    its X-Forwarded-For names (``request.client`` is set by viewer_api.http_server)."""
    return request.client.host if request.client else ""


def language(request: Request, form_value: str = "") -> str:
    return choose_language(form_value or request.query_params.get("lang"), request.headers.get("accept-language"))


def secret(ctx: AppContext) -> bytes:
    """The archive's secret (pacs.security.authenticate), loaded once per app: the birth-date cookie's and the
    consult form token's key (each derives its own MAC input)."""
    value = ctx.extras.get("share_secret")
    if not isinstance(value, bytes):
        value = ctx.extras["share_secret"] = load_or_create_secret(ctx.settings)
    return value


def throttle(ctx: AppContext) -> ShareThrottle:
    """The app's one throttle of failed share-link opens."""
    value = ctx.extras.get("share_throttle")
    if not isinstance(value, ShareThrottle):
        value = ctx.extras["share_throttle"] = ShareThrottle(ctx.settings.share_open_failures_per_minute)
    return value


async def refused(request: Request, lang: str, action: str) -> Response | None:
    """The 429 page when the client has used up its failures, before any database work (the first refusal of a
    window is audited; the rest are not); None otherwise."""
    try:
        throttle(context(request)).check(client_host(request))
    except Throttled as exc:
        return await run_in_threadpool(throttled_page, request, lang, action, exc)
    return None


def throttled_page(request: Request, lang: str, action: str, exc: Throttled) -> Response:
    ctx, host = context(request), client_host(request)
    if throttle(ctx).refusal_to_audit(host):
        audit.record(ctx.sessions, action=action, actor="share:unknown", role="share", outcome="failure",
                     source_address=host, detail=f"throttled: {exc.retry_after} s")
    return error_page(request, 429, lang, "Too many attempts", [gettext(
        lang, "Too many failed attempts from your network. Try again in %(n)s seconds.", n=exc.retry_after)],
        headers={"Retry-After": str(exc.retry_after)})


def open_for_page(request: Request, token: str, lang: str, *, action: str, birth_date: str | None = None,
                  sub_route: bool = False) -> OpenedLink | Response:
    """The link ``token`` opens (pacs.sharing.links.open_link, with the app's throttle and the birth-date
    cookie), or the page that says why not: the birth-date form when the link asks for it (a sub-route
    redirects to the link's own page for that)."""
    ctx = context(request)
    verified = check_birth_date_cookie(secret(ctx), token, request.cookies.get(COOKIE))
    try:
        with ctx.sessions() as session:
            return open_link(session, token, address=client_host(request), birth_date=birth_date,
                             birth_date_verified=verified, action=action, settings=ctx.settings,
                             throttle=throttle(ctx))
    except Throttled as exc:  # used up between the check before and this open
        return throttled_page(request, lang, action, exc)
    except LinkNotFound:
        return error_page(request, 404, lang, "Link not found",
                          [gettext(lang, "This link does not exist. Check that it was typed or scanned completely.")])
    except LinkGone as exc:
        why = "This link has expired." if exc.reason == "expired" else "This link was withdrawn by the facility."
        return error_page(request, 410, lang, "Link no longer valid", [
            gettext(lang, why), gettext(lang, "Ask the facility that gave it to you for a new one.")])
    except LinkLocked:
        return error_page(request, 423, lang, "Link locked",
                          [gettext(lang, "This link was locked after too many wrong dates of birth."),
                           gettext(lang, "Ask the facility that gave it to you for a new one.")])
    except BirthDateRequired:
        if sub_route:
            return RedirectResponse(f"/s/{token}?lang={lang}", status_code=303, headers=PAGE_HEADERS)
        return birth_date_form(request, token, lang, "", 200)
    except WrongBirthDate as exc:
        return birth_date_form(request, token, lang, gettext(
            lang, "The date of birth does not match. %(n)s tries left.", n=exc.remaining), 403)
    except InvalidInput:
        return birth_date_form(request, token, lang, gettext(lang, "Enter the date as dd/mm/yyyy."), 400)


def html(request: Request, template: str, lang: str, opened: OpenedLink | None, token: str, status: int = 200,
         headers: dict[str, str] | None = None, **values: Any) -> HTMLResponse:
    """A page of ``templates/`` with the share pages' headers."""
    body = environment(TEMPLATES, lang).get_template(template).render(
        facility_name=opened.facility_name if opened is not None else "", base=f"/s/{token}",
        self_url=request.url.path, **values)
    return HTMLResponse(body, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def error_page(request: Request, status: int, lang: str, heading: str, lines: list[str],
               headers: dict[str, str] | None = None, back: str = "") -> HTMLResponse:
    body = environment(TEMPLATES, lang).get_template("share/error.html").render(
        facility_name="", heading=gettext(lang, heading), lines=lines, back=back, self_url=request.url.path)
    return HTMLResponse(body, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def not_available(request: Request, token: str, lang: str) -> HTMLResponse:
    return error_page(request, 404, lang, "Not available",
                      [gettext(lang, "This link does not include that.")], back=f"/s/{token}?lang={lang}")


def birth_date_form(request: Request, token: str, lang: str, error: str, status: int) -> HTMLResponse:
    return html(request, "share/birth_date.html", lang, None, token, status=status, error=error)


def local_time(moment: datetime | None, lang: str) -> str:
    """A stored time as the facility's local time (pacs.reports.pdf.REPORT_TIMEZONE), written for ``lang``."""
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_datetime(moment.astimezone(REPORT_TIMEZONE), "dd/MM/yyyy HH:mm" if lang == "vi"
                           else "d MMM yyyy, HH:mm", locale=lang)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
