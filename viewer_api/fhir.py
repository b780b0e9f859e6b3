"""FHIR R4 for EMRs under ``/fhir`` (logic in :mod:`pacs.fhir`), and the EMR's per-study viewer URL.

==========================================  ================  ==================================================
route                                       capability        answers
==========================================  ================  ==================================================
``GET /fhir/metadata``                      any token         CapabilityStatement (no patient data; a token is
                                                              still asked for, like everywhere else)
``GET /fhir/ImagingStudy?…``                study.search      Bundle (searchset) of ImagingStudy
``GET /fhir/ImagingStudy/{id}``             study.read        ImagingStudy (id = the Study Instance UID)
``GET /fhir/Patient?identifier=…``          study.search      Bundle of Patient
``GET /fhir/Patient/{id}``                  study.read        Patient
``GET /fhir/DiagnosticReport[/{id}]``       report.read       501 OperationOutcome: reserved for the reports work
``GET /fhir/ServiceRequest[/{id}]``         study.search      501 OperationOutcome: reserved for the RIS work
``GET /viewer/studies/{StudyInstanceUID}``  none (public)     302 to ``/ohif/viewer?StudyInstanceUIDs=…``
==========================================  ================  ==================================================

Errors after authentication are FHIR ``OperationOutcome`` resources with the HTTP status (400 invalid
search, 404 unknown or out of scope, 501 not implemented, 503 index unavailable). 401 and 403 come from
the shared security layer and are the API's usual JSON ``{"code", "message"}``, like on every route.
Searches and reads are limited to the principal's scope (a study of another facility is 404, a search
never lists it) and each one is audited, naming the patient and study.

The viewer URL holds no patient data: it redirects to the OHIF viewer with the UID the EMR already
has, and the viewer then asks for the images with the user's own token. It does not say whether the
study exists.

The reserved DiagnosticReport / ServiceRequest routes and the catch-all for other resource types are
left out of the OpenAPI document until they are implemented.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse

from pacs.errors import IndexUnavailable, InvalidInput, NotFound
from pacs.fhir import resources
from pacs.fhir.search import Search, imaging_study_search, patient_search
from pacs.fhir.service import FhirService, Found, Page
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
        except InvalidInput as exc:
            return outcome(400, "invalid", str(exc)[:500])
        except (IndexUnavailable, StorageError) as exc:
            log.error("FHIR request failed: %s", exc)
            return outcome(503, "transient", "the index is unavailable; try again later")
        except ApiError as exc:
            return outcome(exc.status, "processing", exc.message)

    return wrapper


def _service(request: Request) -> FhirService:
    return FhirService(request.app.state.query_engine, context(request).read_sessions)


def _base(request: Request) -> str:
    return public_base(request)


def _strict(request: Request) -> bool:
    return "handling=strict" in request.headers.get("prefer", "").replace(" ", "").lower()


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
                 + (f" patients={','.join(patients)}" if patients else ""))


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
    search = imaging_study_search(list(request.query_params.multi_items()), strict=_strict(request))
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
    search = patient_search(list(request.query_params.multi_items()), strict=_strict(request))
    page = _service(request).search_patients(search, principal.scope)
    _audit_search(request, principal, "Patient", page, search)
    return _searchset(request, "Patient", search, page)


@fhir.get("/Patient/{patient_id}", summary="Read one Patient")
@fhir_errors
def read_patient(patient_id: str, request: Request,
                 principal: Principal = require(Capability.STUDY_READ)) -> JSONResponse:  # noqa: B008
    return _read(request, principal, "Patient", patient_id,
                 lambda: _service(request).read_patient(patient_id, principal.scope))


def _reserved(kind: str, issue: str) -> JSONResponse:
    return outcome(501, "not-supported", f"FHIR {kind} is not implemented yet ({issue} issue)")


@fhir.get("/DiagnosticReport", include_in_schema=False)
@fhir.get("/DiagnosticReport/{report_id}", include_in_schema=False)
def diagnostic_report(_: Principal = require(Capability.REPORT_READ)) -> JSONResponse:  # noqa: B008
    return _reserved("DiagnosticReport", "reports")


@fhir.get("/ServiceRequest", include_in_schema=False)
@fhir.get("/ServiceRequest/{request_id}", include_in_schema=False)
def service_request(_: Principal = require(Capability.STUDY_SEARCH)) -> JSONResponse:  # noqa: B008
    return _reserved("ServiceRequest", "RIS orders")


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
