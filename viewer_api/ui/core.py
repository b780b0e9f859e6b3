"""What every web page is built on: the session cookie, CSRF, the language, rendering and redirects.

- The session cookie (:data:`SESSION_COOKIE`) holds the same short-lived session token ``POST /api/auth/login``
  returns (``Authenticator.issue_session_token``); :func:`require_page` resolves it with the same
  :class:`~pacs.security.authenticate.Authenticator` as a bearer token, so expiry, a disabled user and a changed
  password end a page session exactly as they end an API session. Without a (valid) session a GET is sent to
  ``/login?next=…`` (``&expired=1`` when the cookie held an expired or revoked token); anything else gets 401.
- CSRF: every state-changing page route depends on :func:`check_csrf`: the form field ``csrf`` (or the header
  ``X-CSRF-Token``) must equal an HMAC of the session token under the archive's secret, and a cross-site
  ``Origin``/``Sec-Fetch-Site`` is refused. Before sign-in the token is an HMAC of a random nonce kept in its own
  cookie (double submit), so the sign-in and language forms cannot be posted from another site either.
- :func:`render` renders a template of ``viewer_api/templates`` (autoescape on) in the page's language with the
  headers of every page (:data:`PAGE_HEADERS`: a CSP without ``unsafe-inline``); :func:`redirect` answers 303 with
  an optional message shown once on the next page (a short-lived signed cookie).

Templates get: ``principal``, ``user`` (name, role label, facility), ``csrf_token``, ``csrf_field()``,
``language``, ``nav`` (the menu the principal's capabilities allow), ``path``, ``here`` (path and query),
``flashes``; the filters
``datetime``, ``date`` and ``number`` (localized, times in the reports' time zone).
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from babel.dates import format_date, format_datetime
from babel.numbers import format_decimal
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, pass_context
from jinja2.runtime import Context
from markupsafe import Markup, escape
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from pacs.i18n import LANGUAGES, choose_language, gettext, new_environment
from pacs.reports.document import REPORT_TIMEZONE
from pacs.security.access import Forbidden, authorize
from pacs.security.authenticate import AuthenticationError
from pacs.security.principal import Principal
from pacs.security.roles import Capability, Role
from viewer_api.public_pages import secret as archive_secret
from viewer_api.security import _audit_denied, authenticator, client_address, context

SESSION_COOKIE = "pacs_session"  # HttpOnly, SameSite=Lax, Secure when the request is https; Path=/
LANG_COOKIE = "pacs_lang"
FLASH_COOKIE = "pacs_flash"
LOGIN_NONCE_COOKIE = "pacs_login_nonce"  # the pre-session CSRF nonce (sign-in and language forms)
FLASH_MAX_AGE_S = 120
LANG_MAX_AGE_S = 365 * 24 * 3600

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
STATIC = Path(__file__).resolve().parent.parent / "static" / "ui"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "frame-src 'self'; form-action 'self'; frame-ancestors 'self'; object-src 'none'; base-uri 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Frame-Options": "SAMEORIGIN",
    "Referrer-Policy": "same-origin",
    "X-Robots-Tag": "noindex, nofollow",
}

# Roles that have web pages; EMR service accounts and patients have none (patients use share links).
PAGE_ROLES = frozenset({Role.ADMIN, Role.RADIOLOGIST, Role.TECHNOLOGIST, Role.CLINICIAN})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def N_(message: str) -> str:  # the gettext convention: Babel's extractor knows it
    """Mark ``message`` for translation without translating it (translated where it is shown)."""
    return message


ROLE_LABELS: dict[Role, str] = {
    Role.ADMIN: N_("Administrator"),
    Role.RADIOLOGIST: N_("Radiologist"),
    Role.TECHNOLOGIST: N_("Technologist"),
    Role.CLINICIAN: N_("Clinician"),
    Role.EMR: N_("EMR account"),
    Role.PATIENT: N_("Patient account"),
}

HOME_BY_ROLE: dict[Role, str] = {
    Role.ADMIN: "/ui/admin",
    Role.RADIOLOGIST: "/ui/reading",
    Role.TECHNOLOGIST: "/ui/worklist",
    Role.CLINICIAN: "/ui/studies",
}


@dataclass(frozen=True)
class NavItem:
    href: str
    label: str  # a message id
    capability: Capability


NAV: tuple[NavItem, ...] = (
    NavItem("/ui/reading", N_("Reading list"), Capability.REPORT_WRITE),
    NavItem("/ui/worklist", N_("Worklist"), Capability.ORDER_MANAGE),
    NavItem("/ui/studies", N_("Studies"), Capability.STUDY_SEARCH),
    NavItem("/ui/consults", N_("Consults"), Capability.CONSULT),
    NavItem("/ui/upload", N_("Upload"), Capability.STUDY_STORE),
    NavItem("/ui/admin", N_("Administration"), Capability.ADMIN),
)


# -- language --------------------------------------------------------------------------------------------------


def page_language(request: Request) -> str:
    """The language of a page: the user's choice (cookie), then ``?lang=``, then ``Accept-Language``, then
    Vietnamese."""
    chosen = request.cookies.get(LANG_COOKIE, "")
    if chosen in LANGUAGES:
        return chosen
    return choose_language(request.query_params.get("lang"), request.headers.get("accept-language"))


def translate(request: Request, message: str, **values: object) -> str:
    """``message`` (a message id) in the page's language."""
    return gettext(page_language(request), message, **values)


# -- signing ---------------------------------------------------------------------------------------------------


def _mac(key: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(key, f"{purpose}|{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _secret(request: Request) -> bytes:
    return archive_secret(context(request))


def is_https(request: Request) -> bool:
    """Whether the browser reached us over https (the scheme a trusted proxy forwarded, or the public URL)."""
    if request.url.scheme == "https":
        return True
    return str(context(request).settings.public_url or "").lower().startswith("https://")


def session_token(request: Request) -> str:
    return request.cookies.get(SESSION_COOKIE, "").strip()


def csrf_token(request: Request) -> str:
    """The CSRF token of this browser: bound to the session token, or before sign-in to the login nonce (a new
    nonce is made when there is none; :func:`render` sets its cookie)."""
    token = session_token(request)
    if token:
        return _mac(_secret(request), "ui.csrf", token)
    nonce = request.cookies.get(LOGIN_NONCE_COOKIE, "") or getattr(request.state, "new_login_nonce", "")
    if not nonce:
        nonce = request.state.new_login_nonce = secrets.token_urlsafe(24)
    return _mac(_secret(request), "ui.login-csrf", nonce)


def _expected_csrf_tokens(request: Request) -> list[str]:
    key = _secret(request)
    expected = []
    if token := session_token(request):
        # with a session only its own token: a login nonce planted by another site (a sibling subdomain's cookie)
        # must not pass for the victim's session
        return [_mac(key, "ui.csrf", token)]
    if nonce := request.cookies.get(LOGIN_NONCE_COOKIE, ""):
        expected.append(_mac(key, "ui.login-csrf", nonce))
    return expected


class CsrfRefused(Exception):
    """A state-changing page request without the right CSRF token or from another site: 403."""


def _cross_site(request: Request) -> bool:
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    own = {request.headers.get("host", "").lower()}
    if public := str(context(request).settings.public_url or ""):
        own.add(urlsplit(public).netloc.lower())
    return urlsplit(origin).netloc.lower() not in own or origin.lower() == "null"


async def check_csrf(request: Request) -> None:
    """Dependency of every state-changing page route: the ``csrf`` form field or ``X-CSRF-Token`` header must
    match this browser's token, and the request must not come from another site. 403 otherwise."""
    if request.method.upper() not in UNSAFE_METHODS:
        return
    if _cross_site(request):
        raise CsrfRefused("cross-site request")
    given = request.headers.get("x-csrf-token", "") or request.query_params.get("csrf", "")
    if not given:
        # a small urlencoded form only (RequestLimits bounds it): a multipart body (an upload) is never parsed
        # before the token is checked, so it carries the token in a header (the page's script) or in its form's
        # action URL (?csrf=, without script)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/x-www-form-urlencoded"):
            form = await request.form()
            value = form.get("csrf")
            given = value if isinstance(value, str) else ""
    if not given or not any(hmac.compare_digest(given, expected) for expected in _expected_csrf_tokens(request)):
        raise CsrfRefused("missing or wrong CSRF token")


# -- sessions --------------------------------------------------------------------------------------------------


class SignInRequired(Exception):
    """No valid session: a GET goes to the sign-in page, anything else gets 401."""

    def __init__(self, expired: bool) -> None:
        super().__init__("sign-in required")
        self.expired = expired


class PageForbidden(Exception):
    """The principal may not use this page: 403."""


async def current_principal(request: Request) -> Principal | None:
    """The principal of the session cookie, or None (no cookie, or an invalid/expired one: not audited)."""
    token = session_token(request)
    if not token:
        return None
    try:
        principal = await run_in_threadpool(authenticator(request).authenticate, token, client_address(request))
    except AuthenticationError:
        return None
    return principal if principal.role in PAGE_ROLES else None


def require_page(capability: Capability | None = None) -> Any:
    """A FastAPI dependency: the signed-in :class:`Principal` (a role with pages), allowed to ``capability``.

    No or expired session: GET → 303 to ``/login?next=<path>`` (``&expired=1``), otherwise 401. Lacking the
    capability: the 403 page. Refusals are audited like the API's (``auth.denied``, ``access.denied``)."""

    async def dependency(request: Request) -> Principal:
        address = client_address(request)
        token = session_token(request)
        if not token:
            await run_in_threadpool(_audit_denied, request, "", "", "auth.denied", "no session cookie", address)
            raise SignInRequired(expired=False)
        try:
            principal = await run_in_threadpool(authenticator(request).authenticate, token, address)
        except AuthenticationError as exc:
            await run_in_threadpool(_audit_denied, request, "", "", "auth.denied", str(exc), address)
            raise SignInRequired(expired=True) from None
        try:
            if principal.role not in PAGE_ROLES:
                raise Forbidden(f"role {principal.role.value} has no web pages")
            if capability is not None:
                authorize(principal, capability)
        except Forbidden as exc:
            await run_in_threadpool(_audit_denied, request, principal.subject, principal.role.value,
                                    "access.denied", str(exc), address)
            request.state.principal = principal
            raise PageForbidden(str(exc)) from None
        request.state.principal = principal
        return principal

    return Depends(dependency)


def set_session_cookie(request: Request, response: Any, token: str) -> None:
    """Store a session token in the browser: a browser-session cookie (the token's own expiry ends it, and the
    next page then says so)."""
    response.set_cookie(SESSION_COOKIE, token, path="/", httponly=True, samesite="lax", secure=is_https(request))


def clear_session_cookie(response: Any) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")


def home_of(principal: Principal) -> str:
    return HOME_BY_ROLE.get(principal.role, "/ui")


def local_path(target: str | None, default: str = "/") -> str:
    """``target`` when it is a path on this site (``/…``, not ``//host`` nor ``/\\host``), else ``default``: a
    ``next=`` parameter must never send a user to another site."""
    if not target or len(target) > 2000 or not target.startswith("/"):
        return default
    if target.startswith(("//", "/\\")) or any(ch in target for ch in "\\\r\n\t\x00"):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


def sign_in_url(request: Request, *, expired: bool = False) -> str:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    url = "/login?next=" + quote(local_path(here), safe="/")
    return url + "&expired=1" if expired else url


# -- rendering -------------------------------------------------------------------------------------------------

_CURRENT_CSRF: contextvars.ContextVar[str] = contextvars.ContextVar("ui_csrf_token", default="")


@pass_context
def _csrf_field(ctx: Context) -> Markup:
    token = ctx.get("csrf_token") or _CURRENT_CSRF.get()
    return Markup('<input type="hidden" name="csrf" value="%s">') % escape(token)


def _filters(language: str) -> dict[str, Any]:
    def local_datetime(value: datetime | None, form: str = "short") -> str:
        if value is None:
            return ""
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)  # the index keeps UTC
        return format_datetime(value.astimezone(REPORT_TIMEZONE), form, locale=language)

    def local_date(value: date | datetime | None, form: str = "medium") -> str:
        return "" if value is None else format_date(value, form, locale=language)

    def number(value: float | int | None) -> str:
        return "" if value is None else format_decimal(value, locale=language)

    return {"datetime": local_datetime, "date": local_date, "number": number}


@lru_cache(maxsize=len(LANGUAGES))
def ui_environment(language: str) -> Environment:
    """The pages' Jinja2 environment of ``language`` (templates under viewer_api/templates; built once)."""
    env = new_environment(TEMPLATES, language)
    env.globals["csrf_field"] = _csrf_field
    env.filters.update(_filters(language))
    return env


def nav_for(principal: Principal | None, path: str, language: str) -> list[dict[str, Any]]:
    """The menu of ``principal``: the areas its capabilities allow, labels translated, the current one marked."""
    if principal is None:
        return []
    return [{"href": item.href, "label": gettext(language, item.label),
             "current": path == item.href or path.startswith(item.href + "/")}
            for item in NAV if principal.can(item.capability)]


def _flash_payload(messages: list[tuple[str, dict[str, str]]]) -> str:
    raw = json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _read_flashes(request: Request) -> list[tuple[str, dict[str, str]]]:
    value = request.cookies.get(FLASH_COOKIE, "")
    payload, _, mac = value.partition(".")
    if not payload or not hmac.compare_digest(mac, _mac(_secret(request), "ui.flash", payload)):
        return []
    try:
        decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return [(str(m), {str(k): str(v) for k, v in dict(vs).items()}) for m, vs in decoded][:5]
    except (ValueError, TypeError):
        return []


def render(request: Request, template: str, principal: Principal | None, *, status: int = 200,
           **values: Any) -> HTMLResponse:
    """Render ``template`` (relative to viewer_api/templates, e.g. ``"ui/studies/list.html"``) as a page.

    Injected: ``principal``, ``user``, ``csrf_token``, ``language``, ``nav``, ``path``, ``flashes`` (the messages
    of the previous :func:`redirect`, shown once); ``values`` are passed as they are (autoescaped)."""
    language = page_language(request)
    token = csrf_token(request)
    flashes = _read_flashes(request)
    user = None
    if principal is not None:
        user = {"name": principal.subject, "role": gettext(language, ROLE_LABELS.get(principal.role, "")),
                "facility": principal.facility}
    shown = []
    for message, params in flashes:
        text = gettext(language, message)
        try:
            shown.append(text % params if params else text)
        except (KeyError, ValueError, TypeError):
            shown.append(text)
    page_values = {"principal": principal, "user": user, "csrf_token": token, "language": language,
                   "nav": nav_for(principal, request.url.path, language), "path": request.url.path,
                   "here": local_path(request.url.path + (f"?{request.url.query}" if request.url.query else "")),
                   "flashes": shown,
                   **values}
    reset = _CURRENT_CSRF.set(token)
    try:
        body = ui_environment(language).get_template(template).render(page_values)
    finally:
        _CURRENT_CSRF.reset(reset)
    response = HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)
    response.headers["Content-Language"] = language
    if nonce := getattr(request.state, "new_login_nonce", ""):
        response.set_cookie(LOGIN_NONCE_COOKIE, nonce, path="/", httponly=True, samesite="lax",
                            secure=is_https(request))
    if request.cookies.get(FLASH_COOKIE):
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


class _Redirect(RedirectResponse):
    """A 303 that carries a message for the next page: the cookie is signed when the response is sent (the
    archive's secret comes from the app in the ASGI scope, so :func:`redirect` needs no request)."""

    def __init__(self, url: str, messages: list[tuple[str, dict[str, str]]]) -> None:
        super().__init__(url, status_code=303, headers=PAGE_HEADERS)
        self._messages = messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._messages:
            payload = _flash_payload(self._messages)
            key = archive_secret(scope["app"].state.ctx)
            self.set_cookie(FLASH_COOKIE, f"{payload}.{_mac(key, 'ui.flash', payload)}", max_age=FLASH_MAX_AGE_S,
                            path="/", httponly=True, samesite="lax", secure=is_https(Request(scope)))
        await super().__call__(scope, receive, send)


def redirect(url: str, *, flash: str | None = None, flash_values: Mapping[str, object] | None = None
             ) -> RedirectResponse:
    """303 to ``url`` (a path on this site); ``flash`` — a message id (mark it with ``N_`` or ``_``), with
    ``%(name)s`` placeholders filled from ``flash_values`` — is shown once, translated, on the next page."""
    messages = [(flash, {k: str(v)[:200] for k, v in (flash_values or {}).items()})] if flash else []
    return _Redirect(local_path(url), messages)
