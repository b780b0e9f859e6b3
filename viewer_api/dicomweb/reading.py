"""What the DICOMweb read routes (QIDO-RS, WADO-RS, WADO-URI) share: the base URL, Accept parsing, and
:func:`serve`, which resolves a target inside the asker's scope, builds the body and audits the request
once, success or failure; a body whose ``ETag`` the client already holds (``If-None-Match``) is answered
``304 Not Modified``, after the same checks and audit."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pacs.dicomweb.media import MediaRange, NotAcceptable, parse_accept
from pacs.dicomweb.resources import Target, resolve
from pacs.dicomweb.wado import Body, Unrenderable, Wado
from pacs.errors import PacsError
from pacs.imaging.cache import RenderedCache
from pacs.security.principal import Principal
from viewer_api.errors import ApiError
from viewer_api.security import audit_access, context
from viewer_api.urls import public_base

log = logging.getLogger("viewer_api")

DICOMWEB_ROOT = "dicom-web/"
# Rendered images of this process, keyed by the stored object's SHA-256 and the rendering: looked up only after
# the request was resolved inside the asker's scope (pacs.imaging.cache).
RENDERED_CACHE = RenderedCache()


def base_url(request: Request) -> str:
    """The absolute DICOMweb root of this request, ending with ``/`` (for Retrieve URL and Bulk Data URIs)."""
    return f"{public_base(request)}/{DICOMWEB_ROOT}"


def accept(request: Request, query_parameter: bool = False) -> list[MediaRange]:
    """The request's media ranges; with ``query_parameter`` the ``accept`` query parameter (PS3.18 8.3.3.1)
    wins over the header (an ``<img>`` cannot set headers)."""
    value = request.query_params.get("accept") if query_parameter else None
    return parse_accept(value or request.headers.get("accept"))


def wado(request: Request) -> Wado:
    ctx = context(request)
    return Wado(ctx.read_sessions, ctx.store, thumbnail_size=ctx.settings.thumbnail_size,
                assume_utf8_for_latin1=ctx.settings.assume_utf8_for_latin1, rendered_cache=RENDERED_CACHE)


def serve(request: Request, principal: Principal, action: str, study: str, series: str | None, sop: str | None,
          produce: Callable[[Wado, Target], Body]) -> Response:
    """Resolve ``study``/``series``/``sop`` for ``principal`` (404 outside its scope), build the response
    with ``produce`` and write one audit row naming the study and patient."""
    service = wado(request)
    target: Target | None = None
    try:
        target = resolve(service.sessions, principal.scope, study, series, sop)
        body = produce(service, target)
    except NotAcceptable as exc:
        _audit_failure(request, principal, action, study, target, str(exc))
        raise ApiError(406, "not_acceptable", str(exc)[:500]) from None
    except Unrenderable as exc:
        _audit_failure(request, principal, action, study, target, str(exc))
        raise ApiError(422, "cannot_render", str(exc)[:500]) from None
    except PacsError as exc:
        _audit_failure(request, principal, action, study, target, str(exc))
        raise
    audit_access(request, principal, action, study_instance_uid=target.study_uid, patient_id=target.patient_id)
    if _holds(request, body):
        return Response(status_code=304, headers=body.headers)
    return respond(body)


def _holds(request: Request, body: Body) -> bool:
    """Whether the client's ``If-None-Match`` names the body's ``ETag`` (only whole bodies carry one)."""
    tag = body.headers.get("ETag")
    wanted = request.headers.get("if-none-match")
    if not tag or not wanted or not isinstance(body.chunks, list):
        return False
    # weak comparison (RFC 9110 §8.8.3.2), as If-None-Match asks for
    return wanted.strip() == "*" or tag.removeprefix("W/") in (t.strip().removeprefix("W/") for t in wanted.split(","))


def respond(body: Body) -> Response:
    if isinstance(body.chunks, list):
        return Response(b"".join(body.chunks), media_type=body.content_type, headers=body.headers)
    return StreamingResponse(body.chunks, media_type=body.content_type, headers=body.headers)


def _audit_failure(request: Request, principal: Principal, action: str, study: str, target: Target | None,
                   reason: str) -> None:
    try:
        audit_access(request, principal, action, study_instance_uid=study[:64], outcome="failure",
                     patient_id=target.patient_id if target is not None else "", detail=reason[:300])
    except Exception as exc:  # auditing a refusal must not turn it into a 500
        log.error("audit write failed: %s", exc)
