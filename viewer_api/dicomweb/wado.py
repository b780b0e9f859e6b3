"""WADO-RS (PS3.18 10.4) under /dicom-web: instances, metadata, frames, bulk data, rendered images and
thumbnails. Every route needs ``study.read``; a study outside the asker's scope, or a series or instance
that is not in the study (and series) of the path, is 404. The logic is in :mod:`pacs.dicomweb.wado`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from pacs.dicomweb.rendering import parse_rendered
from pacs.dicomweb.resources import Target
from pacs.dicomweb.wado import Body, Wado, parse_frame_list
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.dicomweb.reading import accept, base_url, serve
from viewer_api.security import require

router = APIRouter(prefix="/dicom-web", tags=["WADO-RS"])

READ = Capability.STUDY_READ
# OpenAPI "content" of each response: media type -> (empty) media type object
_MULTIPART: dict[str, dict[str, object]] = {"multipart/related": {}}
_JSON: dict[str, dict[str, object]] = {"application/dicom+json": {}}
_IMAGE: dict[str, dict[str, object]] = {"image/jpeg": {}, "image/png": {}}
_STUDY = "/studies/{study}"
_SERIES = "/studies/{study}/series/{series}"
_INSTANCE = "/studies/{study}/series/{series}/instances/{sop}"


# -- instances --------------------------------------------------------------------------------------

def _retrieve(request: Request, principal: Principal, study: str, series: str | None, sop: str | None) -> Response:
    return serve(request, principal, "dicomweb.retrieve", study, series, sop,
                 lambda wado, target: wado.retrieve(target, accept(request)))


@router.get(_STUDY, summary="Retrieve a study", responses={200: {"content": _MULTIPART}})
def retrieve_study(request: Request, study: str, principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _retrieve(request, principal, study, None, None)


@router.get(_SERIES, summary="Retrieve a series", responses={200: {"content": _MULTIPART}})
def retrieve_series(request: Request, study: str, series: str,
                    principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _retrieve(request, principal, study, series, None)


@router.get(_INSTANCE, summary="Retrieve an instance", responses={200: {"content": _MULTIPART}})
def retrieve_instance(request: Request, study: str, series: str, sop: str,
                      principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _retrieve(request, principal, study, series, sop)


# -- metadata ---------------------------------------------------------------------------------------

def _metadata(request: Request, principal: Principal, study: str, series: str | None, sop: str | None) -> Response:
    return serve(request, principal, "dicomweb.metadata", study, series, sop,
                 lambda wado, target: wado.metadata(target, accept(request), base_url(request)))


@router.get(f"{_STUDY}/metadata", summary="Metadata of a study", responses={200: {"content": _JSON}})
def study_metadata(request: Request, study: str, principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _metadata(request, principal, study, None, None)


@router.get(f"{_SERIES}/metadata", summary="Metadata of a series", responses={200: {"content": _JSON}})
def series_metadata(request: Request, study: str, series: str,
                    principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _metadata(request, principal, study, series, None)


@router.get(f"{_INSTANCE}/metadata", summary="Metadata of an instance", responses={200: {"content": _JSON}})
def instance_metadata(request: Request, study: str, series: str, sop: str,
                      principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _metadata(request, principal, study, series, sop)


# -- frames and bulk data ---------------------------------------------------------------------------

@router.get(f"{_INSTANCE}/frames/{{frames}}", summary="Frames of an instance (1-based, comma-separated)",
            responses={200: {"content": _MULTIPART}})
def instance_frames(request: Request, study: str, series: str, sop: str, frames: str,
                    principal: Principal = require(READ)) -> Response:  # noqa: B008
    return serve(request, principal, "dicomweb.frames", study, series, sop,
                 lambda wado, target: wado.frames(target, parse_frame_list(frames), accept(request)))


@router.get(f"{_INSTANCE}/bulkdata/{{tag_path:path}}", summary="A bulk data value (metadata BulkDataURI)",
            responses={200: {"content": _MULTIPART}})
def instance_bulkdata(request: Request, study: str, series: str, sop: str, tag_path: str,
                      principal: Principal = require(READ)) -> Response:  # noqa: B008
    return serve(request, principal, "dicomweb.bulkdata", study, series, sop,
                 lambda wado, target: wado.bulkdata(target, tag_path, accept(request)))


# -- rendered ---------------------------------------------------------------------------------------

def _rendered(request: Request, principal: Principal, study: str, series: str | None, sop: str | None,
              frames: str | None = None) -> Response:
    return serve(request, principal, "dicomweb.rendered", study, series, sop,
                 lambda wado, target: wado.rendered(
                     target, parse_frame_list(frames) if frames is not None else None,
                     parse_rendered(request.query_params), accept(request, query_parameter=True)))


@router.get(f"{_STUDY}/rendered", summary="A study rendered (its representative instance)",
            responses={200: {"content": _IMAGE}})
def study_rendered(request: Request, study: str, principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _rendered(request, principal, study, None, None)


@router.get(f"{_SERIES}/rendered", summary="A series rendered (its middle instance)",
            responses={200: {"content": _IMAGE}})
def series_rendered(request: Request, study: str, series: str,
                    principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _rendered(request, principal, study, series, None)


@router.get(f"{_INSTANCE}/rendered", summary="An instance rendered (its first frame)",
            responses={200: {"content": _IMAGE}})
def instance_rendered(request: Request, study: str, series: str, sop: str,
                      principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _rendered(request, principal, study, series, sop)


@router.get(f"{_INSTANCE}/frames/{{frames}}/rendered", summary="Frames rendered (several: multipart/related)",
            responses={200: {"content": _IMAGE}})
def frames_rendered(request: Request, study: str, series: str, sop: str, frames: str,
                    principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _rendered(request, principal, study, series, sop, frames)


# -- thumbnails -------------------------------------------------------------------------------------

def _thumbnail(request: Request, principal: Principal, study: str, series: str | None, sop: str | None,
               frames: str | None = None) -> Response:
    def produce(wado: Wado, target: Target) -> Body:
        params = parse_rendered(request.query_params)
        ranges = accept(request, query_parameter=True)
        if frames is not None:  # a frame's thumbnail: that frame rendered small
            numbers = parse_frame_list(frames)
            return wado.rendered(target, numbers[:1], params.thumbnail_of(wado.thumbnail_size), ranges)
        return wado.thumbnail(target, params, ranges)

    return serve(request, principal, "dicomweb.thumbnail", study, series, sop, produce)


@router.get(f"{_STUDY}/thumbnail", summary="Thumbnail of a study", responses={200: {"content": _IMAGE}})
def study_thumbnail(request: Request, study: str, principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _thumbnail(request, principal, study, None, None)


@router.get(f"{_SERIES}/thumbnail", summary="Thumbnail of a series", responses={200: {"content": _IMAGE}})
def series_thumbnail(request: Request, study: str, series: str,
                     principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _thumbnail(request, principal, study, series, None)


@router.get(f"{_INSTANCE}/thumbnail", summary="Thumbnail of an instance", responses={200: {"content": _IMAGE}})
def instance_thumbnail(request: Request, study: str, series: str, sop: str,
                       principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _thumbnail(request, principal, study, series, sop)


@router.get(f"{_INSTANCE}/frames/{{frames}}/thumbnail", summary="Thumbnail of a frame",
            responses={200: {"content": _IMAGE}})
def frame_thumbnail(request: Request, study: str, series: str, sop: str, frames: str,
                    principal: Principal = require(READ)) -> Response:  # noqa: B008
    return _thumbnail(request, principal, study, series, sop, frames)
