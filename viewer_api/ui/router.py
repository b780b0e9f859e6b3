"""All web pages on one router, their static files, and their error pages.

``router`` includes the ``router`` of each area module that exists. The areas are written and land
independently (issue 16): a module of the fixed list that is not there yet is skipped — only a
``ModuleNotFoundError`` for exactly that module; any other import error is a bug and raises.

:func:`install` (called by viewer_api.app after viewer_api.errors.install) makes the errors of page URLs HTML pages
in the user's language — sign-in redirects, 401/403/404/…, CSRF refusals — and leaves every other path's JSON
errors as they are.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pacs.errors import Conflict, IndexUnavailable, InvalidInput, NotFound, PacsError
from pacs.security.access import Forbidden
from pacs.security.authenticate import AuthenticationError
from viewer_api.ui import core
from viewer_api.ui.core import N_

log = logging.getLogger("viewer_api")

AREAS = ("auth_pages", "oidc_pages", "studies_pages", "reading_pages", "tech_pages", "admin_pages", "front_pages")

router = APIRouter(include_in_schema=False)
loaded_areas: list[str] = []
for _area in AREAS:
    _name = f"viewer_api.ui.{_area}"
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name != _name:
            raise
        continue
    router.include_router(_module.router)
    loaded_areas.append(_area)

STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2"}
STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@router.get("/ui-static/{name}")
def ui_static(name: Annotated[str, PathParam(max_length=64)]) -> Response:
    """The pages' stylesheet and scripts (viewer_api/static/ui; no sub-folders)."""
    path = core.STATIC / name
    media_type = STATIC_TYPES.get(path.suffix)
    if not STATIC_NAME.match(name) or ".." in name or media_type is None or not path.is_file():
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(path.read_bytes(), media_type=media_type, headers={"Cache-Control": "no-cache"})


# -- error pages -----------------------------------------------------------------------------------------------

PAGE_PREFIXES = ("/ui/", "/login", "/logout", "/lang")


def is_page_path(path: str) -> bool:
    return path in ("/", "/ui") or path.startswith(PAGE_PREFIXES)


ERROR_TITLES = {
    400: N_("The request could not be used"),
    401: N_("Please sign in"),
    403: N_("You may not open this page"),
    404: N_("Page not found"),
    405: N_("This action is not available here"),
    409: N_("This could not be done now"),
    413: N_("The request is too large"),
    429: N_("Too many attempts"),
    500: N_("Something went wrong"),
    503: N_("The archive is busy or unavailable"),
}
ERROR_MESSAGES = {
    400: N_("Some of the values sent were not valid. Go back, check them and try again."),
    401: N_("Your session has ended. Sign in again to continue."),
    403: N_("Your account does not have access to this page. Ask an administrator if you need it."),
    404: N_("There is no such page, or you do not have access to what it shows."),
    405: N_("Go back and use the page's own buttons."),
    409: N_("Someone else changed this at the same time, or it is in a state that does not allow it. "
            "Reload the page and try again."),
    413: N_("The request is too large."),
    429: N_("Wait a minute and try again."),
    500: N_("The error was logged. Try again; if it happens again, tell the administrator."),
    503: N_("Try again in a moment. If it persists, tell the administrator."),
}
CSRF_MESSAGE = N_("The form was out of date or did not come from this site. Reload the page and try again.")


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def error_page(request: Request, status: int, message: str | None = None, *,
               headers: dict[str, str] | None = None) -> Response:
    """The error page of ``status`` (JSON ``{"code", "message"}`` for a page script's fetch)."""
    shown = status if status in ERROR_TITLES else (500 if status >= 500 else 400)
    text = core.translate(request, message or ERROR_MESSAGES[shown])
    if _wants_json(request):
        return JSONResponse({"code": str(status), "message": text}, status_code=status,
                            headers={**core.PAGE_HEADERS, **(headers or {})})
    principal = getattr(request.state, "principal", None)
    response = core.render(request, "ui/error.html", principal, status=status, status_code=status,
                           title=core.translate(request, ERROR_TITLES[shown]), message=text)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    expired = isinstance(exc, core.SignInRequired) and exc.expired
    if request.method in ("GET", "HEAD") and not _wants_json(request):
        response: Response = core.redirect(core.sign_in_url(request, expired=expired))
    else:
        response = error_page(request, 401)
    if expired:
        core.clear_session_cookie(response)
    return response


async def _forbidden(request: Request, exc: Exception) -> Response:
    return error_page(request, 403)


async def _csrf(request: Request, exc: Exception) -> Response:
    log.info("CSRF refused on %s %s: %s", request.method, request.url.path, exc)
    return error_page(request, 403, CSRF_MESSAGE)


Handler = Callable[[Request, Any], Awaitable[Response] | Response]

_PACS_STATUS: list[tuple[type[Exception], int]] = [
    (AuthenticationError, 401), (Forbidden, 403), (NotFound, 404), (Conflict, 409), (InvalidInput, 400),
    (IndexUnavailable, 503)]


def _page_status(exc: Exception) -> int:
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code
    if isinstance(exc, RequestValidationError):
        return 400
    for kind, status in _PACS_STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def _html_on_pages(previous: Handler | None) -> Handler:
    """A handler that answers page URLs with an error page and hands every other path to ``previous``."""

    async def handler(request: Request, exc: Exception) -> Response:
        if is_page_path(request.url.path) or previous is None:
            status = _page_status(exc)
            if status >= 500 and not isinstance(exc, StarletteHTTPException):
                log.error("error on page %s %s: %r", request.method, request.url.path, exc)
            headers = getattr(exc, "headers", None) if status == 429 else None
            return error_page(request, status, headers=headers)
        result = previous(request, exc)
        return await result if isinstance(result, Awaitable) else result

    return handler


def install(app: FastAPI) -> None:
    """The pages' exception handlers (after viewer_api.errors.install: wraps its handlers for page URLs)."""
    app.add_exception_handler(core.SignInRequired, _sign_in_required)
    app.add_exception_handler(core.PageForbidden, _forbidden)
    app.add_exception_handler(core.CsrfRefused, _csrf)
    for kind in (PacsError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, _html_on_pages(app.exception_handlers.get(kind)))
