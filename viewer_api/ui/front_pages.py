"""Opening a study in the OHIF viewer from the web pages: ``/ui/viewer/{study}`` and ``POST /ui/viewer-token``.

OHIF reads DICOMweb with a bearer token it finds in sessionStorage (:mod:`pacs.viewer.app_config`); a page
session lives in an HttpOnly cookie that no script can read. The hand-off bridges the two:

=====================================  ============  ==============================================================
route                                  capability    does
=====================================  ============  ==============================================================
``GET /ui/viewer/{study}``             study.read    404 unless the user may see the study as images (WADO-RS's
                                                     rule, :func:`pacs.viewer.handoff.viewable_study`); else a page
                                                     whose script (static/ui/viewer.js) fetches the token and opens
                                                     ``/ohif/viewer?StudyInstanceUIDs=…``
``GET /ui/viewer?next=/ohif/…``        study.read    the same for any viewer page (where OHIF sends a user whose
                                                     token ended: the pages' sign-in, then back)
``POST /ui/viewer-token``              study.read    CSRF-checked; ``{"token", "expires"}``: the session's token,
                                                     audited ``viewer.handoff``
=====================================  ============  ==============================================================
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.viewer import (
    BASE_PATH,
    CSRF_STORAGE_KEY,
    EXPIRY_STORAGE_KEY,
    LANG_STORAGE_KEY,
    ORIGIN_STORAGE_KEY,
    TOKEN_STORAGE_KEY,
)
from pacs.viewer.handoff import ohif_language, study_url, token_expiry_ms, viewable_study, viewer_path
from viewer_api.security import audit_access, audited, context
from viewer_api.ui.core import PAGE_HEADERS, check_csrf, page_language, render, require_page, session_token

router = APIRouter(include_in_schema=False)

READ = Capability.STUDY_READ
UID = Annotated[str, Path(max_length=64, pattern=r"^[0-9.]+$")]
ACTION = "viewer.handoff"


def _patient_of(request: Request, principal: Principal, study: str) -> str:
    """The study's Patient ID when ``principal`` may open it in the viewer; NotFound (the 404 page) otherwise,
    audited as a refused hand-off."""
    with audited(request, principal, ACTION, study), context(request).read_sessions() as session:
        return viewable_study(session, principal, study)


# The viewer's pages are cross-origin isolated (viewer_api.hardening); the hand-off page is too, so that going on
# to the viewer keeps the tab's browsing context (no switch of browsing context group on the way).
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def _page(request: Request, principal: Principal, target: str, study: str = "") -> Response:
    language = page_language(request)
    response = render(request, "ui/front/viewer.html", principal, target=target, study=study,
                      ohif_lang=ohif_language(language),
                      keys={"token": TOKEN_STORAGE_KEY, "expires": EXPIRY_STORAGE_KEY, "lang": LANG_STORAGE_KEY,
                            "csrf": CSRF_STORAGE_KEY, "origin": ORIGIN_STORAGE_KEY})
    response.headers.update(ISOLATION)
    return response


@router.get("/ui/viewer/{study}")
def open_study(study: UID, request: Request, principal: Annotated[Principal, require_page(READ)]) -> Response:
    """The hand-off page of one study: checks access, then its script opens the study in OHIF."""
    _patient_of(request, principal, study)
    return _page(request, principal, study_url(study), study)


@router.get("/ui/viewer")
def open_viewer(request: Request, principal: Annotated[Principal, require_page(READ)],
                next: Annotated[str, Query(max_length=2000)] = BASE_PATH) -> Response:
    """The hand-off to any viewer page (OHIF's study list by default): a new token after a new sign-in."""
    return _page(request, principal, viewer_path(next) or BASE_PATH)


class HandOff(BaseModel):
    study: str = Field(default="", max_length=64, pattern=r"^[0-9.]*$")


@router.post("/ui/viewer-token", dependencies=[Depends(check_csrf)])
async def viewer_token(request: Request, body: HandOff,
                       principal: Annotated[Principal, require_page(READ)]) -> JSONResponse:
    """The page session's own token, for the viewer to send as ``Authorization: Bearer``.

    Handing the session's token to a page script is acceptable here — and no separate token is minted —
    because it gives the script nothing the user's session does not already have: it is the same token, with
    the same expiry, revoked the same way (a changed password, a disabled account end both at once); only a
    same-origin script can read the answer (no CORS for ``/ui``, and the CSRF check refuses a cross-site
    request: a POST with this session's ``X-CSRF-Token``, which only our own pages carry); the answer is never
    cached (``no-store``). The cookie stays HttpOnly, so this audited endpoint is the one way a page script
    gets the token. The study (optional: the viewer's study list has none) is checked and named in the audit
    row."""
    patient = ""
    if body.study:
        patient = await run_in_threadpool(_patient_of, request, principal, body.study)
    token = session_token(request)
    await run_in_threadpool(audit_access, request, principal, ACTION, study_instance_uid=body.study,
                            patient_id=patient, detail="session token handed to the OHIF viewer")
    return JSONResponse({"token": token, "expires": token_expiry_ms(token)}, headers=PAGE_HEADERS)
