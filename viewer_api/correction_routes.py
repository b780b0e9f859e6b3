"""Correcting studies over HTTP (logic in :mod:`pacs.studies.corrections`): thin routes.

=================================================  ===============  ==========================================
route                                              capability       answers
=================================================  ===============  ==========================================
``PATCH /api/studies/{study}``                     study.correct    what changed: before, after, objects
``POST /api/studies/{study}/move``                 study.correct    the same, the study under another patient
``POST /api/series/{series}/move``                 study.correct    the series moved to another study
``GET /api/instances/{sop}/versions``              admin            every stored version of an instance
``GET /api/instances/{sop}/versions/{n}``          admin            one version, ``application/dicom``
=================================================  ===============  ==========================================

Scope: the study (both studies for a series move) must be the caller's own facility's — a study it only borrows
(a consult, a prior of another facility) or cannot see is a 404, as an unknown one. Invalid values are a 422
``{"code": "invalid_request", "message"}``; every refusal is audited by the core.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from pacs.errors import InvalidInput
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.studies import corrections
from viewer_api.errors import error_response
from viewer_api.security import context, require

router = APIRouter(tags=["study management"])

Uid = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9.]+$")]
CHUNK = 1024 * 1024


class PatientIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=400, description="DICOM PN form, e.g. Nguyễn^Văn^An")
    id: str | None = Field(None, max_length=128, description="Patient ID: a new one moves the study to that "
                           "patient record of its facility (created when new)")
    issuer: str | None = Field(None, max_length=128, description="Issuer of Patient ID ('' for none)")
    birth_date: str | None = Field(None, max_length=32, description="YYYYMMDD")
    sex: str | None = Field(None, max_length=8, description="M, F or O")


class CorrectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient: PatientIn | None = None
    accession_number: str | None = Field(None, max_length=64)
    description: str | None = Field(None, max_length=256, description="Study Description")
    reason: str = Field("", max_length=4096, description="why (required): written to the audit trail")


class PatientRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field("", max_length=128)
    issuer: str = Field("", max_length=128)


class MoveStudyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_patient: PatientRef
    reason: str = Field("", max_length=4096, description="why (required): written to the audit trail")


class MoveSeriesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_study: str = Field(..., min_length=1, max_length=64, description="Study Instance UID of the right study")
    reason: str = Field("", max_length=4096, description="why (required): written to the audit trail")


def _invalid(exc: InvalidInput) -> JSONResponse:
    return error_response(422, "invalid_request", str(exc)[:500])


@router.patch("/api/studies/{study}", summary="Correct a study's patient and study attributes (new versions of "
              "its objects; a new name, birth date or sex is corrected in all the patient's studies)")
async def correct(study: Uid, body: CorrectIn, request: Request,
                  principal: Principal = require(Capability.STUDY_CORRECT)) -> Any:  # noqa: B008
    p = body.patient or PatientIn()
    changes = corrections.StudyChanges(corrections.PatientChanges(p.name, p.id, p.issuer, p.birth_date, p.sex),
                                       body.accession_number, body.description)
    try:
        result = await run_in_threadpool(corrections.correct_study, context(request), principal, study, changes,
                                         body.reason)
    except InvalidInput as exc:
        return _invalid(exc)
    return result.as_json()


@router.post("/api/studies/{study}/move", summary="Move a study to another patient of its facility")
async def move_study(study: Uid, body: MoveStudyIn, request: Request,
                     principal: Principal = require(Capability.STUDY_CORRECT)) -> Any:  # noqa: B008
    try:
        result = await run_in_threadpool(corrections.move_study, context(request), principal, study,
                                         body.to_patient.id, body.to_patient.issuer, body.reason)
    except InvalidInput as exc:
        return _invalid(exc)
    return result.as_json()


@router.post("/api/series/{series}/move", summary="Move a series to another study of the same facility")
async def move_series(series: Uid, body: MoveSeriesIn, request: Request,
                      principal: Principal = require(Capability.STUDY_CORRECT)) -> Any:  # noqa: B008
    try:
        result = await run_in_threadpool(corrections.move_series, context(request), principal, series,
                                         body.to_study.strip(), body.reason)
    except InvalidInput as exc:
        return _invalid(exc)
    return result.as_json()


@router.get("/api/instances/{sop}/versions", summary="Every stored version of an instance (admins)")
async def versions(sop: Uid, request: Request,
                   principal: Principal = require(Capability.ADMIN)) -> list[dict[str, Any]]:  # noqa: B008
    found = await run_in_threadpool(corrections.list_versions, context(request), principal, sop)
    return [v.as_json() for v in found]


@router.get("/api/instances/{sop}/versions/{version}", summary="One stored version of an instance, as stored "
            "(application/dicom; admins)", response_class=StreamingResponse)
async def version(sop: Uid, version: Annotated[int, Path(ge=1, le=2**31 - 1)], request: Request,
                  principal: Principal = require(Capability.ADMIN)) -> StreamingResponse:  # noqa: B008
    ctx = context(request)
    found = await run_in_threadpool(corrections.read_version, ctx, principal, sop, version)
    stream = await run_in_threadpool(ctx.store.open, found.object_key)

    def chunks() -> Iterator[bytes]:
        with stream:
            while block := stream.read(CHUNK):
                yield block

    return StreamingResponse(chunks(), media_type="application/dicom",
                             headers={"Content-Length": str(found.size),
                                      "Content-Disposition": f'attachment; filename="{sop}.v{version}.dcm"'})
