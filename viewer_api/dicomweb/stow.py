"""STOW-RS routes (PS3.18 10.5): ``POST /dicom-web/studies`` and ``POST /dicom-web/studies/{study}``.

The body (``multipart/related; type="application/dicom"``, or one bare ``application/dicom`` instance) is
read as a stream into a spool (:mod:`pacs.dicomweb.stow`); only a complete, well-formed body is then
stored, part by part, through the ingest service C-STORE uses. A body over ``PACS_MAX_REQUEST_BYTES`` is
refused with 413 by :class:`viewer_api.hardening.RequestLimits` (at once when Content-Length says so,
otherwise as soon as the stream passes the limit) and stores nothing; so does a body that is malformed
(400) or not received within ``PACS_HTTP_REQUEST_TIMEOUT_S`` (408).
"""

from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pacs.dicomweb.media import NotAcceptable, parse_accept, require_json
from pacs.dicomweb.multipart_reader import MultipartReader
from pacs.dicomweb.stow import DICOM, DICOM_JSON, PartSpool, StowService
from pacs.ingest import IngestSource
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from storage.keys import is_valid_uid
from viewer_api.errors import ApiError
from viewer_api.security import audit_access, client_address, context, require
from viewer_api.urls import public_base

log = logging.getLogger("viewer_api")
router = APIRouter(prefix="/dicom-web", tags=["DICOMweb STOW-RS"])

_BODY = {"requestBody": {"required": True, "description": "DICOM PS3.10 files, one per part", "content": {
    'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}},
    DICOM: {"schema": {"type": "string", "format": "binary"}}}}}
_RESPONSES: dict[int | str, dict] = {
    200: {"description": "All instances stored (Store Instances Response Module, DICOM JSON)"},
    202: {"description": "Some instances stored; the Failed SOP Sequence names the others and why"},
    400: {"description": "Malformed multipart body or study UID; nothing stored"},
    406: {"description": "Accept excludes application/dicom+json"},
    408: {"description": "The body did not arrive within PACS_HTTP_REQUEST_TIMEOUT_S; nothing stored"},
    409: {"description": "No instance stored; the Failed SOP Sequence says why for each"},
    413: {"description": "Body over PACS_MAX_REQUEST_BYTES; nothing stored"},
    415: {"description": "Not multipart/related; type=\"application/dicom\" nor application/dicom"},
}


@router.post("/studies", summary="Store instances (STOW-RS)", openapi_extra=_BODY, responses=_RESPONSES)
async def store_instances(request: Request,
                          principal: Principal = require(Capability.STUDY_STORE)) -> Response:  # noqa: B008
    return await _store(request, principal, None)


@router.post("/studies/{study}", summary="Store instances of one study (STOW-RS)", openapi_extra=_BODY,
             responses=_RESPONSES)
async def store_study_instances(study: str, request: Request,
                                principal: Principal = require(Capability.STUDY_STORE)) -> Response:  # noqa: B008
    if not is_valid_uid(study):
        raise ApiError(400, "invalid_request", f"invalid StudyInstanceUID {study[:70]!r} in the URL")
    return await _store(request, principal, study)


async def _store(request: Request, principal: Principal, study: str | None) -> Response:
    ctx = context(request)
    settings = ctx.settings
    spool = PartSpool(settings.max_object_bytes)
    try:
        try:
            _check_accept(request)
            boundary = _boundary(request.headers.get("content-type", ""))
            await _receive(request, spool, boundary, settings.http_request_timeout_s)
            if not spool.parts:
                raise ApiError(400, "invalid_request", "the multipart body holds no instance")
        except Exception as exc:  # refused before anything was stored (413 from RequestLimits included)
            await run_in_threadpool(_audit, request, principal, study or "", "failure",
                                    f"refused: {type(exc).__name__}: {exc}"[:300])
            raise
        source = IngestSource("stow", user=principal.subject, role=principal.role.value,
                              address=principal.source_address or client_address(request),
                              facility=principal.facility)
        service = StowService(request.app.state.ingestor, ctx.read_sessions,
                              max_object_bytes=settings.max_object_bytes,
                              max_inflated_bytes=settings.max_inflated_bytes,
                              assume_utf8_for_latin1=settings.assume_utf8_for_latin1)
        result = await run_in_threadpool(service.store, spool, source, study)
    finally:
        spool.close()
    outcome = "success" if not result.failed else "partial" if result.stored else "failure"
    studies = result.studies
    await run_in_threadpool(_audit, request, principal, study or (studies[0] if len(studies) == 1 else ""),
                            outcome, result.summary())
    root = f"{public_base(request)}/dicom-web"
    return JSONResponse(result.response(root), status_code=result.http_status, media_type=DICOM_JSON)


def _audit(request: Request, principal: Principal, study: str, outcome: str, detail: str) -> None:
    """The request's summary row. Each stored instance already has its own row, written in the ingest's
    transaction, so a failure here is logged and does not turn a stored request into an error."""
    try:
        audit_access(request, principal, "stow", study_instance_uid=study, outcome=outcome, detail=detail)
    except Exception as exc:
        log.error("STOW-RS audit summary not written: %s", str(exc).splitlines()[0][:200] if str(exc) else exc)


def _check_accept(request: Request) -> None:
    try:
        require_json(parse_accept(request.headers.get("accept")))
    except NotAcceptable as exc:
        raise ApiError(406, "not_acceptable", f"STOW-RS answers {DICOM_JSON} (XML is not offered)") from exc


def _boundary(content_type: str) -> str | None:
    """The multipart boundary, or None for a single ``application/dicom`` body; 415 for anything else."""
    ranges = parse_accept(content_type) if content_type.strip() else []
    media = ranges[0] if ranges else None
    if media is not None and media.media_type == DICOM:
        return None
    if media is None or media.media_type != "multipart/related":
        shown = content_type.split(";", 1)[0].strip()[:60] or "none"
        raise ApiError(415, "unsupported_media_type", f'STOW-RS takes multipart/related; type="{DICOM}" '
                       f"(or one {DICOM} instance), not {shown}")
    part_type = media.params.get("type", DICOM).lower()
    if part_type != DICOM:
        raise ApiError(415, "unsupported_media_type", f"multipart/related of {part_type[:60]} is not supported: "
                       f"send DICOM PS3.10 files as {DICOM} parts (metadata + bulk data STOW is not offered)")
    boundary = media.params.get("boundary", "")
    if not boundary:
        raise ApiError(400, "invalid_request", "multipart/related without a boundary parameter")
    return boundary


async def _receive(request: Request, spool: PartSpool, boundary: str | None, timeout_s: float) -> None:
    """Stream the body into the spool; raises MultipartError (400), ApiError (408) or the RequestLimits
    middleware's BodyTooLarge (413)."""
    reader = MultipartReader(boundary, spool) if boundary is not None else None
    if reader is None:
        spool.begin_part({"content-type": DICOM})
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                if reader is not None:
                    reader.feed(chunk)
                elif chunk:
                    spool.part_data(chunk)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s") from None
    if reader is not None:
        reader.close()
    else:
        spool.end_part()
        if spool.parts[0].size == 0:
            spool.parts.clear()
