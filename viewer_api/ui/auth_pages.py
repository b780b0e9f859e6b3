"""The front door of the web pages: ``/`` (the user's start page), sign-in, sign-out and the language choice.

``POST /login`` checks the password on the same path as ``POST /api/auth/login`` (:func:`pacs.security.login.
password_login`: the login guard's limits, the ``auth.login`` audit rows) and keeps the same short-lived session
token in the session cookie. EMR service accounts and patients have no pages: their sign-in is refused with a
message (and audited as a failure). When OIDC sign-in is configured (``oidc_issuer`` + ``oidc_client_id``) the page
also offers "Sign in with …" (viewer_api.ui.oidc_pages), and an OIDC user's sign-out goes on to the provider's
end-session endpoint when it has one (viewer_api.ui.oidc_common).

Sign-out cannot revoke the session token (a signed, short-lived token with no server-side list): it drops the
cookie and audits ``auth.logout``; the token itself ends at its expiry, or at once when the password changes or
the user is disabled.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from pacs import audit
from pacs.i18n import LANGUAGES
from pacs.security.login import LoginRefused, RoleWithoutAccess, WrongCredentials, password_login
from pacs.security.principal import Principal
from viewer_api.security import client_address, context
from viewer_api.ui.core import (
    LANG_COOKIE,
    LANG_MAX_AGE_S,
    LOGIN_NONCE_COOKIE,
    N_,
    PAGE_ROLES,
    check_csrf,
    clear_session_cookie,
    current_principal,
    home_of,
    is_https,
    local_path,
    redirect,
    render,
    require_page,
    set_session_cookie,
    translate,
)
from viewer_api.ui.oidc_common import end_session_page, login_page

router = APIRouter(include_in_schema=False)

SIGNED_OUT = N_("You have signed out.")
WRONG_PASSWORD = N_("Wrong user name or password.")
NO_PAGES = N_("This account cannot use the web pages (EMR service accounts and patient accounts have none). "
              "Patients open their results with the link or QR code on their result slip.")
TOO_MANY = N_("Too many sign-in attempts. Wait a minute and try again.")
BUSY = N_("The server is busy. Try again in a moment.")


# the area module that serves each role's home page (viewer_api.ui.router.AREAS)
HOME_AREAS = {"/ui/admin": "admin_pages", "/ui/reading": "reading_pages", "/ui/worklist": "tech_pages",
              "/ui/studies": "studies_pages"}


def _start_page(request: Request, principal: Principal) -> str:
    """The role's home (design: admin → /ui/admin, radiologist → /ui/reading, …) when that area is installed,
    else the general start page ``/ui``."""
    home = home_of(principal)
    area = HOME_AREAS.get(home)
    return home if area and importlib.util.find_spec(f"viewer_api.ui.{area}") is not None else "/ui"


def _next(value: str | None) -> str:
    target = local_path(value, "")
    return "" if target.startswith(("/login", "/logout", "/lang")) else target


@router.get("/", response_class=HTMLResponse)
async def front(request: Request) -> Response:
    """The user's start page, or the sign-in page."""
    principal = await current_principal(request)
    if principal is None:
        return redirect("/login")
    return redirect(_start_page(request, principal))


@router.get("/ui", response_class=HTMLResponse)
def start(request: Request, principal: Principal = require_page()) -> Response:  # noqa: B008
    """The general start page: the areas the user may open."""
    return render(request, "ui/home.html", principal)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> Response:
    principal = await current_principal(request)
    target = _next(request.query_params.get("next"))
    if principal is not None:
        return redirect(target or _start_page(request, principal))
    response = await login_page(request, next=target, username="", expired=request.query_params.get("expired") == "1")
    if request.cookies.get("pacs_session"):
        clear_session_cookie(response)  # a stale (expired or revoked) session
    return response


@router.post("/login", response_class=HTMLResponse, dependencies=[Depends(check_csrf)])
async def login_submit(request: Request, username: Annotated[str, Form(max_length=64)] = "",
                       password: Annotated[str, Form(max_length=256)] = "",
                       next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    target = _next(next)
    host = request.client.host if request.client else ""

    async def refused(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
        response = await login_page(request, status=status, next=target, username=username,
                                    error=translate(request, message), expired=False)
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    if not username or not password:
        return await refused(WRONG_PASSWORD, 200)
    try:
        user = await run_in_threadpool(password_login, context(request), request.app.state.login_guard, username,
                                       password, host=host, address=client_address(request),
                                       roles={role.value for role in PAGE_ROLES}, detail="web pages")
    except LoginRefused as exc:
        return await refused(TOO_MANY if exc.status == 429 else BUSY, exc.status,
                             {"Retry-After": str(exc.retry_after)})
    except WrongCredentials:
        return await refused(WRONG_PASSWORD, 200)
    except RoleWithoutAccess:
        return await refused(NO_PAGES, 403)
    token, _ttl = request.app.state.authenticator.issue_session_token(user)
    principal = await run_in_threadpool(request.app.state.authenticator.authenticate, token, client_address(request))
    response = redirect(target or _start_page(request, principal))
    set_session_cookie(request, response, token)
    response.delete_cookie(LOGIN_NONCE_COOKIE, path="/")
    return response


@router.post("/logout", dependencies=[Depends(check_csrf)])
async def logout(request: Request) -> Response:
    principal = await current_principal(request)
    response: Response | None = None
    if principal is not None:
        await run_in_threadpool(audit.record, context(request).sessions, action="auth.logout",
                                actor=principal.subject, role=principal.role.value,
                                source_address=client_address(request), detail="web pages")
        response = await end_session_page(request, principal)  # an OIDC user: on to the provider's sign-out
    response = response or redirect("/login", flash=SIGNED_OUT)
    clear_session_cookie(response)
    return response


@router.post("/lang", dependencies=[Depends(check_csrf)])
def choose_language(request: Request, lang: Annotated[str, Form(max_length=8)] = "",
                    next: Annotated[str, Form(max_length=2000)] = "") -> RedirectResponse:
    """Keep the chosen language for a year and go back to the page."""
    response = redirect(local_path(next, "/"))
    if lang in LANGUAGES:
        response.set_cookie(LANG_COOKIE, lang, max_age=LANG_MAX_AGE_S, path="/", httponly=True, samesite="lax",
                            secure=is_https(request))
    return response
