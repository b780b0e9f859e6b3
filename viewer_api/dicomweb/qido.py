"""QIDO-RS (PS3.18 10.6) under /dicom-web, and the match counts under /dicom-web/count.

Every search answers ``application/dicom+json`` with ``X-Total-Count`` (all matches, whatever
``limit``/``offset`` say); no match is ``200 []`` (what dicomweb-client and OHIF both read; PS3.18
CP-2473 moves the standard from 204 to 200 too). ``/dicom-web/count/<search path>`` takes the same
parameters and answers ``{"count": N}``. A study (and series) in the path is checked as WADO-RS checks it:
outside the asker's scope, unknown, or a series not of that study is 404. The logic is in
:mod:`pacs.dicomweb.qido`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pacs import metrics
from pacs.dicomweb.media import NotAcceptable, require_json
from pacs.dicomweb.qido import Search, parse_search
from pacs.dicomweb.qido_json import json_array
from pacs.dicomweb.resources import resolve
from pacs.errors import PacsError
from pacs.query.engine import QueryEngine, QueryResult
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.dicomweb.reading import accept, base_url
from viewer_api.errors import ApiError
from viewer_api.security import audit_access, context, require

router = APIRouter(prefix="/dicom-web", tags=["QIDO-RS"])

# A search returning at most this many rows is answered from one statement (no count, no cursor) in one body;
# more are streamed from a server-side cursor after a count.
HEAD_ROWS = 200

SEARCH = Capability.STUDY_SEARCH
_JSON: dict[str, dict[str, object]] = {"application/dicom+json": {}}  # OpenAPI "content" of the responses


def _prepare(request: Request, principal: Principal, action: str, resource: str, study: str | None,
             series: str | None) -> tuple[Search, QueryResult, str]:
    """The checked search, its lazily run result, and the patient to audit. A study (and series) in the
    path must be visible to the asker and belong together, as for WADO: 404 otherwise."""
    try:
        search = parse_search(resource, request.query_params.multi_items(), scope=principal.scope,
                              study_uid=study, series_uid=series)
        patient = ""
        if study is not None:
            patient = resolve(context(request).read_sessions, principal.scope, study, series).patient_id
        engine: QueryEngine = request.app.state.query_engine
        return search, engine.search(search.query), patient or _patient(search)
    except PacsError as exc:
        audit_access(request, principal, action, study_instance_uid=(study or "")[:64],
                     outcome="failure", detail=str(exc)[:300])
        raise


def _patient(search: Search) -> str:
    value = str(search.query.filters.get("PatientID") or "")
    return value if value and not any(c in value for c in "*?\\") else ""


def _search(request: Request, principal: Principal, resource: str, study: str | None = None,
            series: str | None = None) -> Response:
    """A search, timed for ``pacs_qido_seconds`` (to the answer's first byte: a streamed answer's rows are the
    client's pace) by its level."""
    started = time.perf_counter()
    try:
        return _answer(request, principal, resource, study, series)
    finally:
        metrics.qido_observed(resource, time.perf_counter() - started)


def _answer(request: Request, principal: Principal, resource: str, study: str | None,
            series: str | None) -> Response:
    try:
        require_json(accept(request))
    except NotAcceptable as exc:
        raise ApiError(406, "not_acceptable", str(exc)) from None
    search, result, patient = _prepare(request, principal, "dicomweb.search", resource, study, series)
    try:
        head = result.head(HEAD_ROWS)
        total = head.total if head.total is not None else result.count()
    except PacsError as exc:
        audit_access(request, principal, "dicomweb.search", study_instance_uid=(study or "")[:64],
                     outcome="failure", detail=str(exc)[:300])
        raise
    headers = _headers(request, search, total)
    if head.complete:  # every row at hand: one body with a Content-Length, audited before it is sent
        body = b"".join(json_array(head.rows, search.keys, search.level, base_url(request)))
        _audit_disclosed(request, principal, head.rows, total, study or "", patient)
        return Response(body, media_type="application/dicom+json", headers=headers)
    rows = _audited_rows(request, principal, result, total, study or "", patient)
    return StreamingResponse(json_array(rows, search.keys, search.level, base_url(request)),
                             media_type="application/dicom+json", headers=headers)


def _headers(request: Request, search: Search, total: int) -> dict[str, str]:
    """``X-Total-Count``, and a ``Warning`` naming ignored parameters and the results left for another page."""
    shown = max(0, min(search.limit, total - search.offset))
    warnings = list(search.warnings)
    if (remaining := total - search.offset - shown) > 0:
        warnings.append(f"There are {remaining} additional results that can be requested")
    headers = {"X-Total-Count": str(total)}
    if warnings:
        agent = request.url.netloc or "pacs"
        text = ", ".join(f'299 {agent}: "{w}"' for w in warnings)
        # parameter names come from the client: keep the header printable ASCII
        headers["Warning"] = "".join(c if " " <= c <= "~" else "?" for c in text)[:2000]
    return headers


def _audited_rows(request: Request, principal: Principal, rows: Iterable[dict], total: int, study: str,
                  patient: str) -> Iterator[dict]:
    """Pass the rows through, then audit what was actually disclosed, even when the client stops reading
    half-way."""
    seen: list[dict] = []
    try:
        for row in rows:
            seen.append({"StudyInstanceUID": row.get("StudyInstanceUID"), "PatientID": row.get("PatientID")})
            yield row
    finally:
        _audit_disclosed(request, principal, seen, total, study, patient)


def _audit_disclosed(request: Request, principal: Principal, rows: Iterable[dict], total: int, study: str,
                     patient: str) -> None:
    """One audit row for a search: the studies and patients in the response (named when there is one,
    counted and listed in the detail otherwise)."""
    studies: dict[str, None] = {}
    patients: dict[str, None] = {}
    for row in rows:
        studies[str(row.get("StudyInstanceUID") or "")] = None
        if row.get("PatientID"):
            patients[str(row["PatientID"])] = None
    studies.pop("", None)
    named_study = study or (next(iter(studies)) if len(studies) == 1 else "")
    named_patient = patient or (next(iter(patients)) if len(patients) == 1 else "")
    detail = (f"{total} match(es); returned studies={len(studies)} [{','.join(list(studies)[:20])}] "
              f"patients={len(patients)} [{','.join(list(patients)[:20])}]")
    audit_access(request, principal, "dicomweb.search", study_instance_uid=named_study[:64],
                 patient_id=named_patient[:64], detail=detail[:1500])


def _count(request: Request, principal: Principal, resource: str, study: str | None = None,
           series: str | None = None) -> JSONResponse:
    _, result, patient = _prepare(request, principal, "dicomweb.count", resource, study, series)
    total = result.count()
    audit_access(request, principal, "dicomweb.count", study_instance_uid=study or "", patient_id=patient,
                 detail=f"{total} match(es)")
    return JSONResponse({"count": total}, headers={"X-Total-Count": str(total)})


# -- searches ---------------------------------------------------------------------------------------

@router.get("/studies", summary="Search for studies", responses={200: {"content": _JSON}})
def search_studies(request: Request, principal: Principal = require(SEARCH)) -> Response:  # noqa: B008
    return _search(request, principal, "studies")


@router.get("/series", summary="Search for series in all studies", responses={200: {"content": _JSON}})
def search_series(request: Request, principal: Principal = require(SEARCH)) -> Response:  # noqa: B008
    return _search(request, principal, "series")


@router.get("/studies/{study}/series", summary="Search for series of a study", responses={200: {"content": _JSON}})
def search_study_series(request: Request, study: str,
                        principal: Principal = require(SEARCH)) -> Response:  # noqa: B008
    return _search(request, principal, "series", study)


@router.get("/instances", summary="Search for instances in all studies", responses={200: {"content": _JSON}})
def search_instances(request: Request, principal: Principal = require(SEARCH)) -> Response:  # noqa: B008
    return _search(request, principal, "instances")


@router.get("/studies/{study}/instances", summary="Search for instances of a study",
            responses={200: {"content": _JSON}})
def search_study_instances(request: Request, study: str,
                           principal: Principal = require(SEARCH)) -> Response:  # noqa: B008
    return _search(request, principal, "instances", study)


@router.get("/studies/{study}/series/{series}/instances", summary="Search for instances of a series",
            responses={200: {"content": _JSON}})
def search_series_instances(request: Request, study: str, series: str,
                            principal: Principal = require(SEARCH)) -> Response:  # noqa: B008
    return _search(request, principal, "instances", study, series)


# -- counts: /count + the search path, same parameters -----------------------------------------------

@router.get("/count/studies", summary="Count matching studies")
def count_studies(request: Request, principal: Principal = require(SEARCH)) -> JSONResponse:  # noqa: B008
    return _count(request, principal, "studies")


@router.get("/count/series", summary="Count matching series in all studies")
def count_series(request: Request, principal: Principal = require(SEARCH)) -> JSONResponse:  # noqa: B008
    return _count(request, principal, "series")


@router.get("/count/studies/{study}/series", summary="Count matching series of a study")
def count_study_series(request: Request, study: str,
                       principal: Principal = require(SEARCH)) -> JSONResponse:  # noqa: B008
    return _count(request, principal, "series", study)


@router.get("/count/instances", summary="Count matching instances in all studies")
def count_instances(request: Request, principal: Principal = require(SEARCH)) -> JSONResponse:  # noqa: B008
    return _count(request, principal, "instances")


@router.get("/count/studies/{study}/instances", summary="Count matching instances of a study")
def count_study_instances(request: Request, study: str,
                          principal: Principal = require(SEARCH)) -> JSONResponse:  # noqa: B008
    return _count(request, principal, "instances", study)


@router.get("/count/studies/{study}/series/{series}/instances", summary="Count matching instances of a series")
def count_series_instances(request: Request, study: str, series: str,
                           principal: Principal = require(SEARCH)) -> JSONResponse:  # noqa: B008
    return _count(request, principal, "instances", study, series)


# -- anything else at the search level: 400 naming the resources (declared last: the routes above win) ------

@router.get("/count/{resource}", summary="Count: an unknown search resource is refused (400)")
def count_unknown(request: Request, resource: str,
                  principal: Principal = require(SEARCH)) -> JSONResponse:  # noqa: B008
    return _count(request, principal, resource)


@router.get("/{resource}", summary="Search: an unknown search resource is refused (400)")
def search_unknown(request: Request, resource: str,
                   principal: Principal = require(SEARCH)) -> Response:  # noqa: B008
    return _search(request, principal, resource)
