"""Sign-in with the configured OIDC provider (issue 16): ``POST /login/oidc`` and ``GET /login/oidc/callback``.

The protocol is :mod:`pacs.security.oidc_login` (authorization code + PKCE, state and nonce, the ID token's
checks); these routes carry it: the pending login rides in a signed, ten-minute, HttpOnly, SameSite=Lax cookie
scoped to ``/login/oidc`` (so only the browser that pressed the button can finish the sign-in), and the session
cookie receives the provider's token that the archive's :class:`~pacs.security.authenticate.Authenticator`
accepts as a bearer token — the access token, or else the ID token — so roles and facility come from the
configured claims exactly as for API calls, and the session ends when that token expires.

Every outcome is audited as ``auth.login`` (detail "web pages (OIDC)"): a success names the principal
(``oidc:<sub>``, the actor of the session's later rows) and the user's ``preferred_username``; a failure names
``oidc:<sub>`` once the ID token is verified, else ``unverified:oidc``. The user sees the sign-in page with a short
translated message; the reason is in the audit row and the log.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from pacs import audit
from pacs.security.authenticate import AuthenticationError, Authenticator
from pacs.security.login_guard import UNVERIFIED_PREFIX
from pacs.security.oidc_login import (
    STATE_TTL_S,
    OidcLoginFailed,
    Provider,
    check_callback,
    display_name,
    provider_name,
    seal,
    session_candidates,
    start,
    unseal,
    validate_id_token,
)
from pacs.security.principal import Principal
from viewer_api.public_pages import secret as archive_secret
from viewer_api.security import authenticator, client_address, context
from viewer_api.ui.auth_pages import NO_PAGES
from viewer_api.ui.auth_pages import _next as next_target
from viewer_api.ui.core import (
    LOGIN_NONCE_COOKIE,
    N_,
    PAGE_HEADERS,
    PAGE_ROLES,
    check_csrf,
    is_https,
    redirect,
    set_session_cookie,
    translate,
)
from viewer_api.ui.oidc_common import CALLBACK_PATH, login_page, provider, redirect_uri

log = logging.getLogger("viewer_api")

router = APIRouter(include_in_schema=False)

STATE_COOKIE = "pacs_oidc_login"
STATE_COOKIE_PATH = "/login/oidc"
AUDIT_DETAIL = "web pages (OIDC)"
COOKIE_LIMIT = 3800  # browsers keep cookies up to ~4096 bytes (name and attributes included)

FAILED = N_("The sign-in with %(provider)s did not complete. Try again; if it keeps failing, tell the "
            "administrator.")
DENIED = N_("The sign-in was cancelled or refused at %(provider)s.")
UNAVAILABLE = N_("%(provider)s cannot be reached right now. Try again in a moment, or sign in with your "
                 "user name and password.")
NO_ROLE = N_("Your account at %(provider)s has no role or facility for this archive. Ask an administrator.")
MESSAGES = {"failed": FAILED, "denied": DENIED, "unavailable": UNAVAILABLE, "no_role": NO_ROLE}


def _provider(request: Request) -> Provider:
    found = provider(request)
    if found is None:
        raise HTTPException(404)  # the flow is off
    return found


@router.post("/login/oidc", dependencies=[Depends(check_csrf)])
async def oidc_start(request: Request, next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    """Send the browser to the provider, with a new pending login in the state cookie."""
    found = _provider(request)
    ctx = context(request)
    try:
        endpoints = await run_in_threadpool(found.endpoints)
    except OidcLoginFailed as exc:
        return await _refused(request, exc, next_target(next))
    login, url = start(ctx.settings, endpoints.authorization, redirect_uri(request), next_target(next))
    response = RedirectResponse(url, status_code=303, headers=PAGE_HEADERS)
    response.set_cookie(STATE_COOKIE, seal(login, archive_secret(ctx)), max_age=STATE_TTL_S, path=STATE_COOKIE_PATH,
                        httponly=True, samesite="lax", secure=is_https(request))
    return response


def _session(auth: Authenticator, tokens: dict[str, object], address: str) -> tuple[str, Principal]:
    """The first of the provider's tokens the Authenticator accepts as an OIDC bearer token (and a cookie holds)."""
    problems = []
    for token in session_candidates(tokens):
        if len(token) > COOKIE_LIMIT:
            problems.append(f"token of {len(token)} characters is too long for a cookie")
            continue
        try:
            principal = auth.authenticate(token, address)
        except AuthenticationError as exc:
            problems.append(str(exc))
            continue
        if principal.kind == "oidc":
            return token, principal
    raise OidcLoginFailed("no token of the provider is accepted by the archive: " + "; ".join(problems), "no_role")


def _complete(request: Request, found: Provider, cookie: str, params: dict[str, str], address: str
              ) -> tuple[str, Principal, str, str]:
    """(session token, principal, the page to go to, the user's name) of a callback, or :class:`OidcLoginFailed`
    (with ``actor`` set once the ID token is verified)."""
    ctx = context(request)
    login = unseal(cookie, archive_secret(ctx))
    code = check_callback(login, params)
    tokens = found.exchange(code, redirect_uri(request), login.verifier)
    claims = validate_id_token(str(tokens["id_token"]), ctx.settings, found.jwks, login.nonce)
    name = display_name(claims)
    try:
        token, principal = _session(authenticator(request), tokens, address)
    except OidcLoginFailed as exc:
        raise OidcLoginFailed(f"{exc.reason} (user {name})", exc.kind, f"oidc:{str(claims['sub'])[:100]}") from None
    if principal.role not in PAGE_ROLES:
        raise OidcLoginFailed(f"role {principal.role.value} has no web pages (user {name})", "no_pages",
                              principal.subject)
    return token, principal, login.next, name


async def _refused(request: Request, exc: OidcLoginFailed, target: str) -> Response:
    """The sign-in page with the message of ``exc`` (audited as a failed ``auth.login``)."""
    settings = context(request).settings
    actor = exc.actor or f"{UNVERIFIED_PREFIX}oidc"
    log.info("OIDC sign-in refused: %s", exc.reason)
    await run_in_threadpool(audit.record, context(request).sessions, action="auth.login", actor=actor,
                            outcome="failure", source_address=client_address(request),
                            detail=f"{AUDIT_DETAIL}: {exc.reason}"[:1000])
    if exc.kind == "no_pages":
        message = translate(request, NO_PAGES)
    else:
        message = translate(request, MESSAGES.get(exc.kind, FAILED), provider=provider_name(settings))
    status = 503 if exc.kind == "unavailable" else 403 if exc.kind in ("no_pages", "no_role") else 400
    response = await login_page(request, status=status, next=target, username="", error=message, expired=False)
    response.delete_cookie(STATE_COOKIE, path=STATE_COOKIE_PATH, httponly=True, samesite="lax")
    return response


@router.get(CALLBACK_PATH)
async def oidc_callback(request: Request) -> Response:
    """The provider's answer: check it, exchange the code, keep the accepted token as the page session."""
    found = _provider(request)
    address = client_address(request)
    params = {key: value for key, value in request.query_params.items() if len(value) <= 8192}
    try:
        token, principal, target, name = await run_in_threadpool(
            _complete, request, found, request.cookies.get(STATE_COOKIE, ""), params, address)
    except OidcLoginFailed as exc:
        return await _refused(request, exc, "")
    await run_in_threadpool(audit.record, context(request).sessions, action="auth.login", actor=principal.subject,
                            role=principal.role.value, source_address=address,
                            detail=f"{AUDIT_DETAIL}: {name}" if name else AUDIT_DETAIL)
    response = redirect(next_target(target) or "/")
    set_session_cookie(request, response, token)
    response.delete_cookie(STATE_COOKIE, path=STATE_COOKIE_PATH, httponly=True, samesite="lax")
    response.delete_cookie(LOGIN_NONCE_COOKIE, path="/")
    return response
