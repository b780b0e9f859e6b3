"""What an opened share link shows: the study's heading, its signed report text, the report as PDF and the key
images as phone-sized JPEGs.

Only signed text is shown (the newest final or amended version of each report): a draft or a preliminary
version never reaches a patient. Everything is read inside the link's principal's scope (its one study), and
key images are addressed by their position in the study's key-image selections, so no URL of a share page ever
carries a UID.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs.consults.models import Consult
from pacs.context import AppContext
from pacs.db.models import Instance, Patient, Series, Study
from pacs.dicomweb.media import parse_accept
from pacs.dicomweb.rendering import RenderParams
from pacs.dicomweb.resources import resolve
from pacs.dicomweb.wado import Wado
from pacs.errors import NotFound
from pacs.imaging.cache import RenderedCache
from pacs.reports.document import display_name
from pacs.reports.lifecycle import report_document
from pacs.reports.models import SIGNED_STATES, KeyImageSelection, Report, ReportVersion
from pacs.reports.publish import facility_names
from pacs.security.access import may_see_study
from pacs.sharing.links import OpenedLink, ShareScope
from pacs.sharing.models import CONSULT

__all__ = ["SHARE_IMAGE_CACHE", "SharePage", "ShownReport", "key_image_jpeg", "key_image_refs", "page_content",
           "report_pdf", "shows_images", "signed_reports",
           "signed_study_reports"]

# Phone-sized key images: fitted in this box, never enlarged; cached by the stored object's hash and these
# parameters, so opening the page again does not decode again.
IMAGE_BOX = (800, 800)
IMAGE_QUALITY = 80
SHARE_IMAGE_CACHE = RenderedCache(max_bytes=32 * 1024 * 1024)
MAX_KEY_IMAGES = 50


@dataclass(frozen=True)
class ShownReport:
    number: int  # 1-based position on the page (``report.pdf?n=``)
    report_id: int
    version: int
    status: str  # final or amended
    findings: str
    impression: str
    signed_by: str  # the signer's display name (else user name)
    signed_at: datetime | None
    amend_reason: str


@dataclass(frozen=True)
class SharePage:
    facility_name: str
    patient_name: str  # "Nguyễn Văn Ấn" (the PN's first component group, components joined by spaces)
    study_date: str  # YYYYMMDD or ""
    study_description: str
    modalities: tuple[str, ...]
    reports: tuple[ShownReport, ...]
    key_images: int  # how many /images/{n}.jpg there are (0 unless the scope shows images)
    consult_question: str = ""  # a consult link's question (pacs.consults), "" otherwise


def shows_images(opened: OpenedLink) -> bool:
    return opened.scope in (ShareScope.REPORT_KEY_IMAGES, ShareScope.STUDY)


def page_content(session: Session, opened: OpenedLink) -> SharePage:
    study = _study(session, opened)
    patient = session.get(Patient, study.patient_fk) if study.patient_fk is not None else None
    modalities = tuple(m for m in (study.modalities_in_study or "").split("\\") if m and m not in ("SR", "KO"))
    return SharePage(facility_name=opened.facility_name, patient_name=display_name(patient.patient_name)
                     if patient else "", study_date=study.study_date or "",
                     study_description=study.study_description or "", modalities=modalities,
                     reports=tuple(signed_reports(session, opened)),
                     key_images=len(key_image_refs(session, opened)) if shows_images(opened) else 0,
                     consult_question=_consult_question(session, opened))


def _consult_question(session: Session, opened: OpenedLink) -> str:
    """The question of the consult a "consult" link was made for (only a consult on this link's study)."""
    if opened.purpose != CONSULT or opened.consult_id is None:
        return ""
    consult = session.get(Consult, opened.consult_id)
    return consult.question if consult is not None and consult.study_instance_uid == opened.study_instance_uid \
        else ""


def signed_reports(session: Session, opened: OpenedLink) -> list[ShownReport]:
    """The newest signed version of each of the link's study's reports, oldest report first."""
    return signed_study_reports(session, opened.study_instance_uid)


def signed_study_reports(session: Session, study_instance_uid: str) -> list[ShownReport]:
    """The newest signed (final or amended) version of each of a study's reports, oldest report first: the one
    rule for what a patient is shown, on the share page, its PDF and the printed result slip
    (pacs.sharing.slip). The caller checks that the study may be seen."""
    rows = session.execute(
        select(Report.id, ReportVersion).join(ReportVersion, ReportVersion.report_fk == Report.id)
        .where(Report.study_instance_uid == study_instance_uid, ReportVersion.status.in_(SIGNED_STATES))
        .order_by(Report.id, ReportVersion.version)).all()
    newest: dict[int, ReportVersion] = {}
    for report_id, version in rows:
        newest[report_id] = version  # ordered by version: the last one wins
    return [ShownReport(i + 1, report_id, v.version, v.status, v.findings, v.impression,
                        v.signed_by_name or v.signed_by, v.signed_at, v.amend_reason)
            for i, (report_id, v) in enumerate(newest.items())]


def report_pdf(ctx: AppContext, opened: OpenedLink, number: int, *, language: str, share_url: str
               ) -> tuple[bytes, str]:
    """The PDF of the ``number``-th report shown on the page, and a file name; NotFound when there is none.
    The link's QR code is printed on it (``share_url``, pacs.reports.pdf)."""
    with ctx.read_sessions() as session:
        shown = signed_reports(session, opened)
        chosen = next((r for r in shown if r.number == number), None)
        if chosen is None:
            raise NotFound("no signed report")
        doc = report_document(session, chosen.report_id, chosen.version, facility_name=facility_names(ctx))
    from pacs.reports.pdf import render_report_pdf  # fpdf loads when a PDF is made (pacs.reports.document)

    pdf = render_report_pdf(doc, language=language, share_url=share_url, share_expires_at=opened.expires_at)
    return pdf, f"report-{chosen.report_id}-v{chosen.version}.pdf"


def key_image_refs(session: Session, opened: OpenedLink) -> list[tuple[str, str]]:
    """(series UID, SOP UID) of the study's key images, in the order they were marked, without repeats."""
    if not may_see_study(session, opened.principal.scope, opened.study_instance_uid):
        raise NotFound("no study")
    refs: dict[str, tuple[str, str]] = {}
    for instances_json in session.scalars(select(KeyImageSelection.instances_json).where(
            KeyImageSelection.study_instance_uid == opened.study_instance_uid).order_by(KeyImageSelection.id)):
        for series_uid, sop_uid in json.loads(instances_json):
            refs.setdefault(str(sop_uid), (str(series_uid), str(sop_uid)))
    # only instances stored in this study (a selection naming another study's image shows nothing of it, and
    # the numbering has no hole for it); the rendering path checks the same again (pacs.dicomweb.resources)
    present = {(series_uid, sop_uid) for series_uid, sop_uid in session.execute(
        select(Series.series_instance_uid, Instance.sop_instance_uid).join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .where(Study.study_instance_uid == opened.study_instance_uid,
               Instance.sop_instance_uid.in_(list(refs)[:10 * MAX_KEY_IMAGES])))}
    return [ref for ref in refs.values() if ref in present][:MAX_KEY_IMAGES]


def key_image_jpeg(ctx: AppContext, opened: OpenedLink, number: int) -> bytes:
    """The ``number``-th key image (1-based) as a JPEG fitted in :data:`IMAGE_BOX`, through the archive's one
    bounded rendering path (pacs.dicomweb.wado, pacs.imaging); NotFound when the scope shows no images or there
    is no such image. Raises the renderer's errors (Unrenderable, RenderBusy) for the caller to answer."""
    if not shows_images(opened):
        raise NotFound("this link shows no images")
    with ctx.read_sessions() as session:
        refs = key_image_refs(session, opened)
    if not 1 <= number <= len(refs):
        raise NotFound(f"no key image {number}")
    series_uid, sop_uid = refs[number - 1]
    target = resolve(ctx.read_sessions, opened.principal.scope, opened.study_instance_uid, series_uid, sop_uid)
    wado = Wado(ctx.read_sessions, ctx.store, rendered_cache=SHARE_IMAGE_CACHE)
    params = RenderParams(viewport=IMAGE_BOX, enlarge=False, quality=IMAGE_QUALITY)
    body = wado.rendered(target, None, params, parse_accept("image/jpeg"))
    return b"".join(body.chunks)


def _study(session: Session, opened: OpenedLink) -> Study:
    study = session.scalars(select(Study).where(Study.study_instance_uid == opened.study_instance_uid,
                                                )).one_or_none()
    if study is None or not may_see_study(session, opened.principal.scope, opened.study_instance_uid):
        raise NotFound("no study")
    return study
