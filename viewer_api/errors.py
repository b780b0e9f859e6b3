"""Every error is JSON ``{"code": …, "message": …}`` with the right status; no stack trace reaches a client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pacs import metrics
from pacs.dicomweb.media import NotAcceptable
from pacs.errors import Conflict, IndexUnavailable, InvalidInput, NotFound, PacsError
from pacs.security.access import Forbidden
from pacs.security.authenticate import AuthenticationError
from storage import StorageError

log = logging.getLogger("viewer_api")

_STATUS: list[tuple[type[Exception], int, str]] = [
    (AuthenticationError, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (NotAcceptable, 406, "not_acceptable"),
    (InvalidInput, 400, "invalid_request"),
    (IndexUnavailable, 503, "index_unavailable"),
    (StorageError, 503, "storage_unavailable"),
]


class ApiError(Exception):
    """An error a route raises with its own status and code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(PacsError)
    async def _pacs_error(_: Request, exc: PacsError) -> JSONResponse:
        if isinstance(exc, IndexUnavailable):
            metrics.index_error("http")
        for kind, status, code in _STATUS:
            if isinstance(exc, kind):
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return error_response(status, code, str(exc)[:500], headers)
        log.error("unhandled pacs error: %r", exc)
        return error_response(500, "internal_error", "internal error")

    @app.exception_handler(StorageError)
    async def _storage_error(_: Request, exc: StorageError) -> JSONResponse:
        metrics.store_error("http")
        log.error("object store error: %s", exc)
        return error_response(503, "storage_unavailable", "object store unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                             for e in exc.errors()[:5])
        return error_response(400, "invalid_request", problems[:500] or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                406: "not_acceptable", 413: "payload_too_large", 415: "unsupported_media_type"}.get(
                    exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail)[:500], getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")
