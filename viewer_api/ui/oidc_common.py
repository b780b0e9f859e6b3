"""What the sign-in page and sign-out need to know about OIDC sign-in (the flow itself: viewer_api.ui.oidc_pages).

- :func:`provider`: the app's one :class:`~pacs.security.oidc_login.Provider`, or None when the browser flow is
  off (no ``oidc_issuer`` + ``oidc_client_id``);
- :func:`login_page`: the sign-in page, with the "Sign in with …" button when the flow is on. Its CSP lets the
  page's forms lead to the provider's authorization endpoint: browsers apply ``form-action`` to the redirects
  that follow a form post too, so ``POST /login/oidc`` → 303 to the provider needs that origin allowed (on this
  page only);
- :func:`end_session_page`: after an OIDC user signs out here, a page that moves on to the provider's
  end-session endpoint (a ``Refresh`` header and a link, not a redirect of the sign-out form, for the same
  ``form-action`` reason: the sign-out form is on every page).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from pacs.security.oidc_login import Endpoints, OidcLoginFailed, Provider, browser_flow_enabled, provider_name
from pacs.security.principal import Principal
from viewer_api.security import context
from viewer_api.ui.core import CSP, render
from viewer_api.urls import public_base

log = logging.getLogger("viewer_api")

CALLBACK_PATH = "/login/oidc/callback"


def provider(request: Request) -> Provider | None:
    ctx = context(request)
    if not browser_flow_enabled(ctx.settings):
        return None
    found = ctx.extras.get("oidc_provider")
    if not isinstance(found, Provider):
        found = ctx.extras["oidc_provider"] = Provider(ctx.settings)
    return found


def redirect_uri(request: Request) -> str:
    """The callback URL registered at the provider: ``{public URL}/login/oidc/callback``."""
    return public_base(request) + CALLBACK_PATH


async def endpoints(request: Request) -> Endpoints | None:
    """The provider's endpoints (None when the flow is off or they are unknown: the provider is unreachable)."""
    found = provider(request)
    if found is None:
        return None
    try:
        return await run_in_threadpool(found.endpoints)
    except OidcLoginFailed as exc:
        log.warning("OIDC sign-in unavailable: %s", exc.reason)
        return None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else ""


async def login_page(request: Request, *, status: int = 200, **values: Any) -> HTMLResponse:
    """The sign-in page (``values``: next, username, error, expired) with the OIDC button when the flow is on."""
    settings = context(request).settings
    enabled = browser_flow_enabled(settings)
    response = render(request, "ui/login.html", None, status=status,
                      oidc_provider=provider_name(settings) if enabled else "", **values)
    found = await endpoints(request) if enabled else None
    if found is not None and (origin := _origin(found.authorization)):
        response.headers["Content-Security-Policy"] = CSP.replace("form-action 'self'",
                                                                  f"form-action 'self' {origin}")
    return response


async def end_session_page(request: Request, principal: Principal) -> HTMLResponse | None:
    """For a principal signed in through the provider, the page that takes the browser on to the provider's
    end-session endpoint (OIDC RP-Initiated Logout: ``client_id`` and ``post_logout_redirect_uri`` =
    ``{public URL}/login``); None otherwise."""
    if principal.kind != "oidc":
        return None
    found = await endpoints(request)
    if found is None or not found.end_session:
        return None
    settings = context(request).settings
    query = urlencode({"client_id": settings.oidc_client_id,
                       "post_logout_redirect_uri": public_base(request) + "/login"})
    url = found.end_session + ("&" if urlsplit(found.end_session).query else "?") + query
    response = render(request, "ui/oidc_signed_out.html", None, provider=provider_name(settings), end_session=url)
    response.headers["Refresh"] = f"0; url={url}"
    return response
