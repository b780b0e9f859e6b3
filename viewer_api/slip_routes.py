"""The printable result slip: ``POST /api/studies/{study}/slip.pdf`` (issue 14).

Makes a new share link of the study (the same rules as ``POST /api/studies/{study}/shares``:
capability ``share.create``, a study the caller sees, 404 otherwise) and answers the one-page A5
slip with the link's QR code, as a PDF download that no cache keeps. The link and the slip are made
in one transaction (pacs.sharing.slip.issue_result_slip) and audited (``share.create``,
``share.slip``); refusals are audited too.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.sharing.links import MAX_DAYS, MIN_DAYS, ShareScope, lifetime_days
from viewer_api.security import audited, context, require
from viewer_api.urls import public_base

router = APIRouter(prefix="/api", tags=["share links"])


class SlipRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["report", "report+key-images", "study"] = Field(
        default="report", description="what the link opens: the report, the report and key images, or the "
        "whole study in the viewer (for a doctor)")
    expires_in_days: int | None = Field(default=None, ge=MIN_DAYS, le=MAX_DAYS,
                                        description="the link's lifetime (default PACS_SHARE_LINK_DEFAULT_DAYS)")
    birth_date_check: bool = Field(default=False, description="the link asks for the patient's birth date")
    language: Literal["vi", "en"] = Field(default="vi", description="the slip's language")


@router.post("/studies/{study}/slip.pdf", summary="A printable result slip: a new share link and its QR code",
             response_class=Response, responses={200: {"content": {"application/pdf": {}}}})
def result_slip(study: str, body: SlipRequest, request: Request,
                principal: Principal = require(Capability.SHARE_CREATE)) -> Response:  # noqa: B008
    from pacs.sharing.slip import issue_result_slip  # fpdf loads when a slip is made (pacs.reports.document)

    ctx = context(request)
    days = lifetime_days(body.expires_in_days, ctx.settings)
    with audited(request, principal, "share.slip", study):
        pdf = issue_result_slip(ctx, principal, study, scope=ShareScope(body.scope), expires_in_days=days,
                                birth_date_check=body.birth_date_check, base_url=public_base(request),
                                language=body.language).pdf
    return Response(pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'attachment; filename="result-slip-{body.language}.pdf"',
        "Cache-Control": "no-store"})
