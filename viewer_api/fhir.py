"""FHIR R4 for EMRs under ``/fhir`` (logic in :mod:`pacs.fhir`), and the EMR's per-study viewer URL.

================================================  ==============  ============================================
route                                             capability      answers
================================================  ==============  ============================================
``GET /fhir/metadata``                            any token       CapabilityStatement (no patient data; a
                                                                  token is still asked for, like everywhere)
``GET /fhir/ImagingStudy?…``                      study.search    Bundle (searchset) of ImagingStudy
``GET /fhir/ImagingStudy/{id}``                   study.read      ImagingStudy (id = the Study Instance UID)
``GET /fhir/Patient?identifier=…``                study.search    Bundle of Patient
``GET /fhir/Patient/{id}``                        study.read      Patient
``GET /fhir/DiagnosticReport?…``                  report.read     Bundle of DiagnosticReport (newest visible
                                                                  version of each report)
``GET /fhir/DiagnosticReport/{id}``               report.read     DiagnosticReport (id = ``r{report id}``)
``GET /fhir/DiagnosticReport/{id}/_history``      report.read     Bundle (history), newest version first
``GET /fhir/DiagnosticReport/{id}/_history/{n}``  report.read     one version (vread)
``GET /fhir/ServiceRequest?…``                    study.search    Bundle of ServiceRequest (orders)
``GET /fhir/ServiceRequest/{id}``                 study.search    ServiceRequest (id = the accession number)
``POST /fhir/ServiceRequest``                     order.manage    201 ServiceRequest + Location: a new order
``GET /viewer/studies/{StudyInstanceUID}``        none (public)   302 to ``/ohif/viewer?StudyInstanceUIDs=…``
================================================  ==============  ============================================

Errors after authentication are FHIR ``OperationOutcome`` resources with the HTTP status (400 invalid
search or resource, 404 unknown or out of scope, 409 duplicate order, 415 a body that is not JSON, 503
index unavailable). 401 and 403 come from the shared security layer and are the API's usual JSON
``{"code", "message"}``, like on every route. Searches and reads are limited to the principal's scope (a
study, report or order of another facility is 404, a search never lists it) and each one is audited,
naming the patient and study; an order created is audited (``order.create``) in the transaction that
creates it, a refused one too.

Searches are strict: an unknown parameter is 400 unless the request has ``Prefer: handling=lenient``
(see :mod:`pacs.fhir.search`).

The viewer URL holds no patient data: it redirects to the OHIF viewer with the UID the EMR already
has, and the viewer then asks for the images with the user's own token. It does not say whether the
study exists.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from pacs.errors import Conflict, IndexUnavailable, InvalidInput, NotFound, PacsError
from pacs.fhir import resources
from pacs.fhir.search import (
    Search,
    SearchError,
    diagnostic_report_search,
    imaging_study_search,
    patient_search,
    service_request_search,
)
from pacs.fhir.service import FhirService, Found, Page
from pacs.security.access import Forbidden
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from storage import StorageError
from storage.keys import is_valid_uid
from viewer_api.errors import ApiError
from viewer_api.security import audit_access, context, require
from viewer_api.urls import public_base

log = logging.getLogger("viewer_api")

fhir = APIRouter(prefix="/fhir", tags=["FHIR R4"])
viewer = APIRouter(tags=["EMR viewer link"])
router = APIRouter()


def fhir_json(content: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(content, status_code=status, media_type=resources.FHIR_JSON)


def outcome(status: int, code: str, message: str) -> JSONResponse:
    return fhir_json(resources.operation_outcome(code, message), status)


def fhir_errors(route: Callable[..., JSONResponse]) -> Callable[..., JSONResponse]:
    """Errors raised by a FHIR route become OperationOutcome responses (authentication has already passed)."""

    @functools.wraps(route)
    def wrapper(*args: Any, **kwargs: Any) -> JSONResponse:
        try:
            return route(*args, **kwargs)
        except NotFound as exc:
            return outcome(404, "not-found", str(exc))
        except SearchError as exc:
            return outcome(400, exc.code, str(exc)[:800])
        except InvalidInput as exc:
            return outcome(400, "invalid", str(exc)[:500])
        except Conflict as exc:
            return outcome(409, "duplicate", str(exc)[:500])
        except Forbidden as exc:
            return outcome(403, "forbidden", str(exc)[:500])
        except (IndexUnavailable, StorageError) as exc:
            log.error("FHIR request failed: %s", exc)
            return outcome(503, "transient", "the index is unavailable; try again later")
        except ApiError as exc:
            return outcome(exc.status, "processing", exc.message)

    return wrapper


def _service(request: Request) -> FhirService:
    ctx = context(request)
    return FhirService(request.app.state.query_engine, ctx.read_sessions, _base(request), ctx.sessions)


def _base(request: Request) -> str:
    return public_base(request)


def _strict(request: Request) -> bool:
    """Searches are strict unless the client prefers lenient handling (``Prefer: handling=lenient``; the
    preference may share the header with others, ``return=minimal, handling=lenient``)."""
    preferences = [p.strip().replace(" ", "").lower() for header in request.headers.getlist("prefer")
                   for p in header.replace(";", ",").split(",")]
    return "handling=lenient" not in preferences


def _params(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _searchset(request: Request, kind: str, search: Search, page: Page) -> JSONResponse:
    """The searchset Bundle. Its links repeat the search, so an empty page has none: a search for another
    facility's patient answers exactly like one for a patient that does not exist, and shows nothing."""
    base = f"{_base(request)}/fhir"

    def link(offset: int) -> str:
        return f"{base}/{kind}?" + urlencode([*search.applied, ("_count", search.count), ("_offset", offset)])

    links: dict[str, str] = {}
    if page.resources or (search.count == 0 and page.total):
        links["self"] = link(search.offset)
    if search.count and search.offset + search.count < page.total:
        links["next"] = link(search.offset + search.count)
    if search.offset and search.count and page.total:
        links["previous"] = link(max(search.offset - search.count, 0))
    return fhir_json(resources.bundle(page.resources, page.total, base, links))


def _audit_search(request: Request, principal: Principal, kind: str, page: Page, search: Search) -> None:
    studies = sorted({s for s, _ in page.subjects if s})
    patients = sorted({p for _, p in page.subjects if p})
    searched = search.filters.get("PatientID", "")
    if not searched or "\\" in searched:
        searched = patients[0] if len(patients) == 1 else ""
    audit_access(request, principal, "fhir.search",
                 study_instance_uid=studies[0] if len(studies) == 1 else "", patient_id=searched,
                 detail=f"{kind} total={page.total} returned={len(page.resources)}"
                 + (f" studies={','.join(studies)}" if studies else "")
                 + (f" patients={','.join(patients)}" if patients else "")
                 + (f" ignored={','.join(search.ignored)}" if search.ignored else ""))


def _read(request: Request, principal: Principal, what: str, fhir_id: str, load: Callable[[], Found]) -> JSONResponse:
    try:
        found = load()
    except NotFound:
        audit_access(request, principal, "fhir.read", outcome="failure",
                     detail=f"{what}/{fhir_id[:64]} not found or outside the scope")
        raise
    audit_access(request, principal, "fhir.read", study_instance_uid=found.study_instance_uid,
                 patient_id=found.patient_id, detail=f"{what}/{fhir_id[:64]}")
    return fhir_json(found.resource)


# -- routes ------------------------------------------------------------------------------------------


@fhir.get("/metadata", summary="FHIR CapabilityStatement (no patient data)")
@fhir_errors
def capability_statement(request: Request, _: Principal = require(None)) -> JSONResponse:  # noqa: B008
    return fhir_json(resources.capability_statement(f"{_base(request)}/fhir"))


@fhir.get("/ImagingStudy", summary="Search ImagingStudy (patient identifier, date, accession, modality)")
@fhir_errors
def search_imaging_studies(request: Request,
                           principal: Principal = require(Capability.STUDY_SEARCH)) -> JSONResponse:  # noqa: B008
    search = imaging_study_search(_params(request), strict=_strict(request))
    page = _service(request).search_studies(search, principal.scope, f"{_base(request)}/dicom-web")
    _audit_search(request, principal, "ImagingStudy", page, search)
    return _searchset(request, "ImagingStudy", search, page)


@fhir.get("/ImagingStudy/{study_id}", summary="Read one ImagingStudy (id = Study Instance UID)")
@fhir_errors
def read_imaging_study(study_id: str, request: Request,
                       principal: Principal = require(Capability.STUDY_READ)) -> JSONResponse:  # noqa: B008
    return _read(request, principal, "ImagingStudy", study_id, lambda: _service(request).read_study(
        study_id, principal.scope, f"{_base(request)}/dicom-web"))


@fhir.get("/Patient", summary="Search Patient by identifier")
@fhir_errors
def search_patients(request: Request,
                    principal: Principal = require(Capability.STUDY_SEARCH)) -> JSONResponse:  # noqa: B008
    search = patient_search(_params(request), strict=_strict(request))
    page = _service(request).search_patients(search, principal.scope)
    _audit_search(request, principal, "Patient", page, search)
    return _searchset(request, "Patient", search, page)


@fhir.get("/Patient/{patient_id}", summary="Read one Patient")
@fhir_errors
def read_patient(patient_id: str, request: Request,
                 principal: Principal = require(Capability.STUDY_READ)) -> JSONResponse:  # noqa: B008
    return _read(request, principal, "Patient", patient_id,
                 lambda: _service(request).read_patient(patient_id, principal.scope))


@fhir.get("/DiagnosticReport", summary="Search DiagnosticReport (patient identifier, study, status, date)")
@fhir_errors
def search_diagnostic_reports(request: Request,
                              principal: Principal = require(Capability.REPORT_READ)) -> JSONResponse:  # noqa: B008
    search = diagnostic_report_search(_params(request), strict=_strict(request))
    page = _service(request).search_reports(search, principal)
    _audit_search(request, principal, "DiagnosticReport", page, search)
    return _searchset(request, "DiagnosticReport", search, page)


@fhir.get("/DiagnosticReport/{report_id}", summary="Read a DiagnosticReport (the newest version you may see)")
@fhir_errors
def read_diagnostic_report(report_id: str, request: Request,
                           principal: Principal = require(Capability.REPORT_READ)) -> JSONResponse:  # noqa: B008
    return _read(request, principal, "DiagnosticReport", report_id,
                 lambda: _service(request).read_report(report_id, principal))


@fhir.get("/DiagnosticReport/{report_id}/_history", summary="A DiagnosticReport's published versions")
@fhir_errors
def diagnostic_report_history(report_id: str, request: Request,
                              principal: Principal = require(Capability.REPORT_READ)) -> JSONResponse:  # noqa: B008
    return _read(request, principal, "DiagnosticReport", f"{report_id[:24]}/_history",
                 lambda: _service(request).report_history(report_id, principal)[1])


@fhir.get("/DiagnosticReport/{report_id}/_history/{version}", summary="One version of a DiagnosticReport")
@fhir_errors
def vread_diagnostic_report(report_id: str, version: str, request: Request,
                            principal: Principal = require(Capability.REPORT_READ)) -> JSONResponse:  # noqa: B008
    return _read(request, principal, "DiagnosticReport", f"{report_id[:24]}/_history/{version[:12]}",
                 lambda: _service(request).read_report(report_id, principal, version))


@fhir.get("/ServiceRequest", summary="Search ServiceRequest (imaging orders) by patient, identifier, status")
@fhir_errors
def search_service_requests(request: Request,
                            principal: Principal = require(Capability.STUDY_SEARCH)) -> JSONResponse:  # noqa: B008
    search = service_request_search(_params(request), strict=_strict(request))
    page = _service(request).search_service_requests(search, principal.scope)
    _audit_search(request, principal, "ServiceRequest", page, search)
    return _searchset(request, "ServiceRequest", search, page)


@fhir.get("/ServiceRequest/{request_id}", summary="Read a ServiceRequest (id = the accession number)")
@fhir_errors
def read_service_request(request_id: str, request: Request,
                         principal: Principal = require(Capability.STUDY_SEARCH)) -> JSONResponse:  # noqa: B008
    return _read(request, principal, "ServiceRequest", request_id,
                 lambda: _service(request).read_service_request(request_id, principal.scope))


@fhir.post("/ServiceRequest", status_code=201, summary="Place an imaging order (it joins the Modality Worklist)",
           openapi_extra={"requestBody": {"required": True, "content": {resources.FHIR_JSON: {
               "schema": {"type": "object", "description": "a FHIR R4 ServiceRequest"}}}}})
async def create_service_request(request: Request,
                                 principal: Principal = require(Capability.ORDER_MANAGE)) -> JSONResponse:  # noqa: B008
    body = await request.body()
    return await run_in_threadpool(_create_service_request, request, principal, body)


@fhir_errors
def _create_service_request(request: Request, principal: Principal, body: bytes) -> JSONResponse:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    try:
        if media_type not in ("application/fhir+json", "application/json"):
            raise _Unsupported(f"send the ServiceRequest as {resources.FHIR_JSON}, not {media_type[:60] or 'nothing'}")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"the body is not JSON ({exc.__class__.__name__}: {str(exc)[:100]})") from None
        found = _service(request).create_service_request(payload, principal,
                                                         detail=f"{request.method} {request.url.path}")
    except (PacsError, _Unsupported) as exc:
        audit_access(request, principal, "order.create", outcome="failure",
                     detail=f"FHIR ServiceRequest refused: {type(exc).__name__}: {str(exc)[:300]}")
        if isinstance(exc, _Unsupported):
            return outcome(415, "not-supported", str(exc))
        raise
    location = f"{_base(request)}/fhir/ServiceRequest/{found.resource['id']}"
    response = fhir_json(found.resource, 201)
    response.headers["Location"] = location
    return response


class _Unsupported(Exception):
    """A request body in a format this server does not read (HTTP 415)."""


@fhir.get("/{resource_type}", include_in_schema=False)
@fhir.get("/{resource_type}/{resource_id}", include_in_schema=False)
def unsupported_resource(resource_type: str, _: Principal = require(None)) -> JSONResponse:  # noqa: B008
    return outcome(404, "not-supported", f"resource type {resource_type[:40]!r} is not served here "
                   "(see /fhir/metadata)")


@viewer.get("/viewer/studies/{study}", status_code=302, response_class=RedirectResponse,
            summary="Open a study in the viewer (stable URL for EMRs; public, shows no patient data)")
def open_study_in_viewer(study: str) -> RedirectResponse:
    if not is_valid_uid(study):
        raise ApiError(400, "invalid_request", "the study UID is digits and dots, at most 64 characters")
    return RedirectResponse(f"/ohif/viewer?StudyInstanceUIDs={study}", status_code=302)


router.include_router(fhir)
router.include_router(viewer)
