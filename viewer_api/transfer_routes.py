"""Moving studies in and out over HTTP (pacs.studies: archive_zip, upload, send): thin routes.

=================================================  ============  ===============================================
route                                              capability    answers
=================================================  ============  ===============================================
``GET /api/studies/{study}/archive.zip``           study.export  the study as a zip with a DICOMDIR (streamed)
``GET /api/studies/{study}/series/{s}/archive.zip`` study.export  one series, the same way
``POST /api/studies/upload``                       study.store   per-file results of a zip / files upload
``POST /api/studies/{study}/send``                 study.send    202 ``{"queued": n}``: queued for a DICOM peer
``GET /api/studies/{study}/send``                  study.send    pending / sent / failed per destination
=================================================  ============  ===============================================

An unknown study and one outside the caller's scope are both 404. Every refusal the core makes is audited
(:func:`viewer_api.security.audited`); a missing capability is audited by ``require``.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from pacs.dicomweb.media import parse_accept
from pacs.dicomweb.multipart_reader import MultipartReader
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies import archive_zip, send, upload
from viewer_api.errors import ApiError
from viewer_api.security import audit_access, audited, client_address, context, require

log = logging.getLogger("viewer_api")
router = APIRouter(tags=["study management"])
_WRITE_BATCH = 1024 * 1024  # bytes of an upload body collected before a worker thread writes them to disk

_ZIP_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "A zip: DICOMDIR at the root, the objects as stored under DICOM/ (streamed, chunked)",
          "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
    404: {"description": "Unknown study or series, or outside the caller's scope"},
}


@router.get("/api/studies/{study}/archive.zip", summary="Download a study as a zip with a DICOMDIR",
            response_class=StreamingResponse, responses=_ZIP_RESPONSE)
async def study_archive(study: str, request: Request,
                        principal: Principal = require(Capability.STUDY_EXPORT)) -> StreamingResponse:  # noqa: B008
    return await _archive(request, principal, study, None)


@router.get("/api/studies/{study}/series/{series}/archive.zip", summary="Download a series as a zip with a "
            "DICOMDIR", response_class=StreamingResponse, responses=_ZIP_RESPONSE)
async def series_archive(study: str, series: str, request: Request,
                         principal: Principal = require(Capability.STUDY_EXPORT)) -> StreamingResponse:  # noqa: B008
    return await _archive(request, principal, study, series)


async def _archive(request: Request, principal: Principal, study: str, series: str | None) -> StreamingResponse:
    return await exported_zip(request, principal, study, series)


async def exported_zip(request: Request, principal: Principal, study: str, series: str | None) -> StreamingResponse:
    """The study's (or series') zip, planned (checked and audited ``study.export``) before the first byte is sent;
    a :class:`~pacs.errors.PacsError` of the plan reaches the caller (the API's and the pages' own answers)."""
    ctx = context(request)
    principal = _with_address(request, principal)

    def plan() -> archive_zip.ExportPlan:
        with audited(request, principal, "study.export", study):
            return archive_zip.plan_export(ctx, principal, study, series_instance_uid=series)

    made = await run_in_threadpool(plan)
    return StreamingResponse(archive_zip.zip_stream(ctx.store, made), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="{made.filename}"',
                                      "Cache-Control": "no-store"})


# -- upload ----------------------------------------------------------------------------------------------------

_UPLOAD_BODY = {"requestBody": {"required": True, "description": "A zip of DICOM files, one DICOM file, or a form "
                                "with one or more files (DICOM files or zips)", "content": {
    "application/zip": {"schema": {"type": "string", "format": "binary"}},
    "application/dicom": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


@router.post("/api/studies/upload", summary="Upload DICOM files or zips (stored as STOW-RS stores)",
             openapi_extra=_UPLOAD_BODY, responses={
                 200: {"description": "Per-file results (stored / duplicate / refused with reason) and totals"},
                 400: {"description": "A corrupt zip, a zip over the upload limits, or no file: nothing stored"},
                 413: {"description": "Body over PACS_MAX_REQUEST_BYTES: nothing stored"},
                 415: {"description": "Not application/zip, application/dicom or multipart/form-data"}})
async def upload_files(request: Request,
                       principal: Principal = require(Capability.STUDY_STORE)) -> JSONResponse:  # noqa: B008
    ctx = context(request)
    principal = _with_address(request, principal)
    files = upload.UploadFiles(ctx.settings.upload_max_files)
    try:
        try:
            await _receive_upload(request, files, ctx.settings.http_request_timeout_s)
            result = await run_in_threadpool(upload.store_upload, ctx, request.app.state.ingestor, principal,
                                             files, address=principal.source_address)
        except Exception as exc:  # refused (400, 408, 413, 415): nothing stored; audited like every refusal
            await run_in_threadpool(_audit_refusal, request, principal, exc)
            raise
    finally:
        files.close()
    return JSONResponse(result.as_json())


def _audit_refusal(request: Request, principal: Principal, exc: Exception) -> None:
    try:
        audit_access(request, principal, "study.upload", outcome="failure",
                     detail=f"refused: {type(exc).__name__}: {exc}"[:300])
    except Exception as error:  # the refusal itself must reach the client
        log.error("upload refusal not audited: %s", error)


async def _receive_upload(request: Request, files: upload.UploadFiles, timeout_s: float) -> None:
    content_type = request.headers.get("content-type", "")
    ranges = parse_accept(content_type) if content_type.strip() else []
    media = ranges[0] if ranges else None
    kind = media.media_type if media is not None else ""
    reader: MultipartReader | None = None
    if kind == "multipart/form-data":
        boundary = media.params.get("boundary", "") if media is not None else ""
        if not boundary:
            raise ApiError(400, "invalid_request", "multipart/form-data without a boundary parameter")
        reader = MultipartReader(boundary, files)
    elif kind in upload.ZIP_TYPES:
        files.begin_file("upload.zip", kind)
    elif kind == "application/dicom":
        files.begin_file("upload.dcm")
    else:
        raise ApiError(415, "unsupported_media_type", "send application/zip, application/dicom or "
                       f"multipart/form-data, not {content_type.split(';', 1)[0].strip()[:60] or 'nothing'}")
    write = reader.feed if reader is not None else files.part_data
    pending = bytearray()  # the body is written to the parts' files in a worker thread, never on the event loop
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                pending += chunk
                if len(pending) >= _WRITE_BATCH:
                    await run_in_threadpool(write, bytes(pending))
                    pending.clear()
            if pending:
                await run_in_threadpool(write, bytes(pending))
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"the request body did not arrive within {timeout_s:g} s") from None
    if reader is not None:
        await run_in_threadpool(reader.close)
    await run_in_threadpool(files.end_part)


# -- send ------------------------------------------------------------------------------------------------------


class SendRequest(BaseModel):
    destination: str = Field(min_length=1, max_length=16, description="a registered AE title")
    series: list[str] | None = Field(default=None, max_length=send.MAX_SERIES,
                                     description="Series Instance UIDs (default: the whole study)")


@router.post("/api/studies/{study}/send", status_code=202, summary="Send a study (or series) to a registered "
             "DICOM peer (C-STORE through the forwarding queue)")
def send_study(study: str, body: SendRequest, request: Request,
               principal: Principal = require(Capability.STUDY_SEND)) -> dict[str, Any]:  # noqa: B008
    ctx = context(request)
    principal = _with_address(request, principal)
    with audited(request, principal, "study.send", study):
        queued = send.queue_send(ctx, principal, study, body.destination, series=body.series)
    return {"queued": queued.queued, "destination": queued.destination, "study_instance_uid": study,
            "progress": f"/api/studies/{study}/send?destination={queued.destination}"}


@router.get("/api/studies/{study}/send", summary="Progress of sending a study: pending / sent / failed per "
            "destination")
def send_status(study: str, request: Request, destination: str | None = Query(None, max_length=16),
                series: list[str] | None = Query(None),  # noqa: B008
                principal: Principal = require(Capability.STUDY_SEND)) -> dict[str, Any]:  # noqa: B008
    with audited(request, principal, "study.send-progress", study), context(request).read_sessions() as session:
        progress = send.send_progress(session, principal, study, destination=destination, series=series)
    out: dict[str, Any] = {"study_instance_uid": study, "total": progress.total, "destinations": [
        {"destination": d.destination, "pending": d.pending, "sent": d.sent, "failed": d.failed,
         "last_error": d.last_error} for d in progress.destinations]}
    if destination is not None:
        mine = progress.of(destination.strip())
        out.update(destination=mine.destination, pending=mine.pending, sent=mine.sent, failed=mine.failed,
                   done=mine.pending == 0 and mine.sent + mine.failed > 0)
    return out


def _with_address(request: Request, principal: Principal) -> Principal:
    """The principal with the client's address, for the audit rows the core writes."""
    if principal.source_address:
        return principal
    from dataclasses import replace

    return replace(principal, source_address=client_address(request))
