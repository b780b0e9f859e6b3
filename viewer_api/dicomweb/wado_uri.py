"""WADO-URI (PS3.18 9) at /wado: one object, or one frame rendered. Same rules as WADO-RS: ``study.read``,
404 outside the asker's scope, one audit row per request. The logic is in :mod:`pacs.dicomweb.wado_uri`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from pacs.dicomweb.media import DICOM, MediaRange, NotAcceptable
from pacs.dicomweb.resources import Target
from pacs.dicomweb.wado import Body, Wado
from pacs.dicomweb.wado_uri import WadoUriRequest, parse_request
from pacs.errors import InvalidInput
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from viewer_api.dicomweb.reading import serve
from viewer_api.errors import ApiError
from viewer_api.security import audit_access, require

router = APIRouter(tags=["WADO-URI"])

ACTION = "wado-uri.retrieve"


@router.get("/wado", summary="WADO-URI: an object (application/dicom) or a rendered frame (image/jpeg, image/png)",
            responses={200: {"content": {"application/dicom": {}, "image/jpeg": {}, "image/png": {}}}})
def wado_uri(request: Request, principal: Principal = require(Capability.STUDY_READ)) -> Response:  # noqa: B008
    params = request.query_params
    try:
        wanted = parse_request(params)
    except (InvalidInput, NotAcceptable) as exc:
        audit_access(request, principal, ACTION, study_instance_uid=(params.get("studyUID") or "")[:64],
                     outcome="failure", detail=str(exc)[:300])
        if isinstance(exc, NotAcceptable):
            raise ApiError(406, "not_acceptable", str(exc)) from None
        raise

    def produce(wado: Wado, target: Target) -> Body:
        return _produce(wado, target, wanted)

    return serve(request, principal, ACTION, wanted.study_uid, wanted.series_uid, wanted.sop_uid, produce)


def _produce(wado: Wado, target: Target, wanted: WadoUriRequest) -> Body:
    if wanted.content_type == DICOM:
        return wado.retrieve_single(target, wanted.transfer_syntax)
    return wado.rendered(target, [wanted.frame], wanted.render, [MediaRange(wanted.content_type)])
