"""WADO-URI (PS3.18 9): ``GET /wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…``.

- ``contentType``: ``application/dicom`` (the object, one Part-10 file, not multipart), ``image/jpeg``
  (default) or ``image/png`` (a rendered frame); a comma-separated list is tried in order;
- ``transferSyntax`` (with ``application/dicom``): the syntax wanted; default Explicit VR Little Endian,
  the stored one sends the object as it is, ``*`` too;
- ``frameNumber`` (1-based), ``rows``, ``columns``, ``windowCenter``, ``windowWidth``, ``region``,
  ``imageQuality``: the rendering (see :mod:`pacs.dicomweb.rendering`);
- ``anonymize=yes`` is refused (400): de-identification is not offered, and identified data must never be
  sent to a client that asked for de-identified data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pacs.dicomweb.media import DICOM, NotAcceptable, parse_accept
from pacs.dicomweb.rendering import RenderParams, parse_wado_uri
from pacs.dicomweb.resources import check_uid
from pacs.errors import InvalidInput

_IMAGES = ("image/jpeg", "image/png")


@dataclass(frozen=True)
class WadoUriRequest:
    study_uid: str
    series_uid: str
    sop_uid: str
    content_type: str  # application/dicom, image/jpeg or image/png
    transfer_syntax: str | None
    frame: int  # 1-based
    render: RenderParams


def parse_request(params: Mapping[str, str]) -> WadoUriRequest:
    """Check a WADO-URI query; InvalidInput (400) or NotAcceptable (406) saying what is wrong."""
    request_type = params.get("requestType")
    if request_type != "WADO":
        raise InvalidInput("requestType=WADO is required")
    uids = []
    for name, what in (("studyUID", "studyUID"), ("seriesUID", "seriesUID"), ("objectUID", "objectUID")):
        value = params.get(name)
        if not value:
            raise InvalidInput(f"{name} is required")
        uids.append(check_uid(value, what))
    if (params.get("anonymize") or "").strip().lower() == "yes":
        raise InvalidInput("anonymize=yes is not supported: this archive does not de-identify objects")
    content_type = _content_type(params.get("contentType"))
    syntax = params.get("transferSyntax")
    if syntax is not None:
        syntax = syntax.strip()
        if content_type != DICOM:
            raise InvalidInput("transferSyntax applies to contentType=application/dicom only")
        if syntax != "*":
            check_uid(syntax, "transferSyntax")
    frame_text = params.get("frameNumber")
    frame = 1
    if frame_text is not None:
        if not re.match(r"^[0-9]{1,9}$", frame_text.strip()) or int(frame_text) < 1:
            raise InvalidInput(f"frameNumber must be a positive integer, got {frame_text[:20]!r}")
        frame = int(frame_text)
    render = parse_wado_uri(params) if content_type != DICOM else RenderParams()
    return WadoUriRequest(uids[0], uids[1], uids[2], content_type, syntax, frame, render)


def _content_type(value: str | None) -> str:
    if not value:
        return "image/jpeg"
    for r in parse_accept(value):
        if r.media_type in (DICOM, *_IMAGES):
            return r.media_type
        if r.media_type in ("image/*", "*/*"):
            return "image/jpeg"
    raise NotAcceptable(f"contentType {value[:60]!r} is not offered: application/dicom, image/jpeg or image/png")
