"""The printable result slip (issue 14): what a patient takes home instead of film.

One A5 page: the facility's printed name, who and which study (patient name with its Vietnamese
letters exact, patient ID, birth date, study date and description, accession number, modality), the
share link's QR code large enough to scan from paper, the link as text, until when it opens, what to
do (and that the birth date will be asked when the link checks it), and the impression of the
study's signed report when there is one. Labelled in Vietnamese or English, printed with the DejaVu
fonts of the report PDF.

:func:`issue_result_slip` makes the share link and the slip in one transaction: a slip is never
printed for a link that was not stored, and a link is never stored for a slip that could not be made.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

from fpdf import FPDF
from fpdf.enums import Align, XPos, YPos
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs import audit
from pacs.context import AppContext
from pacs.db.models import Patient, Study
from pacs.errors import InvalidInput, NotFound
from pacs.jobs import as_utc
from pacs.reports import pdf as report_pdf
from pacs.reports.pdf import (
    FONT_FAMILY,
    display_name,
    font_dir,
    font_files,
    format_date,
    format_local_time,
    format_time,
    plain_text,
)
from pacs.reports.publish import facility_names
from pacs.security.access import study_condition
from pacs.security.principal import Principal
from pacs.sharing.content import signed_study_reports
from pacs.sharing.links import CreatedLink, ShareScope, create_link
from pacs.sharing.qr import place_qr

__all__ = ["SLIP_LABELS", "IssuedSlip", "SlipContent", "issue_result_slip", "render_result_slip", "slip_content"]

# The slip's own texts; the patient block reuses the report PDF's labels (pacs.reports.pdf.LABELS).
SLIP_LABELS: Mapping[str, Mapping[str, str]] = {
    "vi": {
        "title": "PHIẾU TRA CỨU KẾT QUẢ",
        "subtitle": "Chẩn đoán hình ảnh – không in phim",
        "study": "Nội dung chụp",
        "link": "Địa chỉ",
        "expires": "Hết hạn",
        "how": "Cách xem kết quả",
        "step_scan": "Mở camera của điện thoại và hướng vào mã QR, hoặc gõ địa chỉ dưới đây vào trình duyệt.",
        "step_birth_date": "Bạn sẽ được hỏi ngày sinh của người bệnh (ngày/tháng/năm).",
        "step_until": "Sau ngày hết hạn ghi dưới đây, xin liên hệ cơ sở y tế để được cấp phiếu mới.",
        "scope_report": "Liên kết cho xem kết quả chẩn đoán.",
        "scope_report+key-images": "Liên kết cho xem kết quả chẩn đoán và các ảnh chính.",
        "scope_study": "Liên kết mở kết quả và toàn bộ ảnh của lần chụp trong trình xem ảnh.",
        "private": "Xin giữ phiếu cẩn thận: ai có mã này đều xem được kết quả.",
        "impression": "KẾT LUẬN",
        "no_report": "Chưa có kết quả được bác sĩ ký; kết quả sẽ hiện trên trang khi bác sĩ ký.",
        "more_online": "(xem toàn văn trên trang kết quả)",
    },
    "en": {
        "title": "RESULT SLIP",
        "subtitle": "Diagnostic imaging – no film",
        "study": "Study",
        "link": "Address",
        "expires": "Expires",
        "how": "How to see your result",
        "step_scan": "Open your phone's camera and point it at the QR code, or type the address below into a "
                     "browser.",
        "step_birth_date": "You will be asked for the patient's birth date (day/month/year).",
        "step_until": "After the expiry date below, ask the facility for a new slip.",
        "scope_report": "The link shows the report.",
        "scope_report+key-images": "The link shows the report and the key images.",
        "scope_study": "The link opens the report and all images of the study in the viewer.",
        "private": "Keep this slip private: anyone with this code can see the result.",
        "impression": "IMPRESSION",
        "no_report": "No signed report yet; it will appear online once the radiologist signs it.",
        "more_online": "(full text online)",
    },
}

_A5 = (148.0, 210.0)  # mm (ISO 216; fpdf2 warns about its "A5" name, whose size changed in 2.8.5)
_MONO_FAMILY = "DejaVuSansMono"
_MONO_FILE = "DejaVuSansMono.ttf"
_MARGIN = 10.0
_QR_SIZE = 52.0  # mm with the quiet zone: ~1.2 mm per module for a share URL, read from arm's length
_LINE = 4.6


@dataclass(frozen=True)
class SlipContent:
    """Everything one slip prints (gathered by :func:`slip_content`)."""

    facility_name: str  # the printed name (settings.facility_names), else the facility code
    patient_name: str  # DICOM PN as stored, e.g. "Nguyễn^Văn Ấn"
    patient_id: str
    patient_birth_date: str  # YYYYMMDD or ""
    study_date: str  # YYYYMMDD or ""
    study_time: str
    study_description: str
    accession_number: str
    modalities: tuple[str, ...]
    url: str  # the share link, absolute
    expires_at: datetime
    scope: ShareScope
    birth_date_check: bool
    impression: str = ""  # the newest signed version's impression ("" when the study has no signed report)


@dataclass(frozen=True)
class IssuedSlip:
    link: CreatedLink
    content: SlipContent
    pdf: bytes


def issue_result_slip(ctx: AppContext, principal: Principal, study_instance_uid: str, *, scope: ShareScope,
                      expires_in_days: int, birth_date_check: bool, base_url: str, language: str) -> IssuedSlip:
    """A new share link of the study and its printed slip, stored and audited in one transaction.

    The caller needs ``share.create`` and must see the study (:func:`pacs.sharing.links.create_link`
    checks both: 403 / 404). Fonts and language are checked before the link is made.
    """
    labels = _labels(language)
    fonts = font_files()
    names = facility_names(ctx)
    with ctx.sessions() as session, session.begin():
        link = create_link(session, principal, study_instance_uid, scope=scope, expires_in_days=expires_in_days,
                           birth_date_check=birth_date_check, base_url=base_url)
        content = slip_content(session, principal, study_instance_uid, link, birth_date_check=birth_date_check,
                               facility_name=names)
        pdf = _render(content, labels, language, fonts)
        audit.append(session, action="share.slip", actor=principal.subject, role=principal.role.value,
                     source_address=principal.source_address, patient_id=content.patient_id,
                     study_instance_uid=study_instance_uid,
                     detail=f"link {link.id} scope {link.scope.value} language {language}")
    return IssuedSlip(link, content, pdf)


def slip_content(session: Session, principal: Principal, study_instance_uid: str, link: CreatedLink, *,
                 birth_date_check: bool, facility_name: Callable[[str], str | None] | None = None) -> SlipContent:
    """What the slip of ``link`` prints, from the study index and the study's signed reports."""
    row = session.execute(select(Study, Patient).join(Patient, Study.patient_fk == Patient.id).where(
        Study.study_instance_uid == study_instance_uid, study_condition(principal.scope))).one_or_none()
    if row is None:
        raise NotFound(f"no study {study_instance_uid}")
    study, patient = row
    modalities = tuple(m for m in (study.modalities_in_study or "").split("\\") if m and m not in ("SR", "KO"))
    return SlipContent(
        facility_name=(facility_name(study.facility) if facility_name else None) or study.facility,
        patient_name=patient.patient_name, patient_id=patient.patient_id,
        patient_birth_date=patient.patient_birth_date, study_date=study.study_date, study_time=study.study_time,
        study_description=study.study_description, accession_number=study.accession_number,
        modalities=modalities, url=link.url, expires_at=link.expires_at, scope=link.scope,
        birth_date_check=birth_date_check, impression=_signed_impression(session, study_instance_uid),
    )


def render_result_slip(content: SlipContent, *, language: str) -> bytes:
    """The slip as PDF bytes (one A5 page), labelled in Vietnamese (``"vi"``) or English (``"en"``)."""
    return _render(content, _labels(language), language, font_files())


# -- layout -------------------------------------------------------------------------------------------


def _render(content: SlipContent, labels: Mapping[str, str], language: str, fonts: Mapping[str, Path]) -> bytes:
    pdf = FPDF(orientation="P", unit="mm", format=_A5)
    pdf.alias_nb_pages(None)  # type: ignore[arg-type]  # "{nb}" in a study description stays literal
    for style, path in fonts.items():
        pdf.add_font(FONT_FAMILY, style, str(path))
    mono = font_dir() / _MONO_FILE
    url_family = FONT_FAMILY
    if mono.is_file():  # the token is easier to type from a fixed-width font (0/O, l/I/1)
        pdf.add_font(_MONO_FAMILY, "", str(mono))
        url_family = _MONO_FAMILY
    pdf.set_margins(_MARGIN, _MARGIN, _MARGIN)
    pdf.set_auto_page_break(False)  # one page: what does not fit is cut (the impression), never spilled
    pdf.set_title(f"{labels['title']} – {display_name(content.patient_name)}")
    pdf.set_creator("Filmless PACS")
    pdf.set_lang("vi-VN" if language == "vi" else "en-US")
    pdf.add_page()

    _header(pdf, content, labels)
    _patient_block(pdf, content, report_pdf.LABELS[language], labels)
    # the QR code at the left, what to do beside it; the link and its expiry under both, across the page
    top = pdf.get_y() + 1
    place_qr(pdf, content.url, x=pdf.l_margin - 2, y=top, size=_QR_SIZE)  # its quiet zone is white anyway
    beside = pdf.l_margin + _QR_SIZE + 1
    _instructions(pdf, content, labels, x=beside, y=top + 3)
    pdf.set_y(max(top + _QR_SIZE, pdf.get_y()) + 0.5)
    pdf.set_font(url_family, "", 8.5)
    pdf.multi_cell(0, 4, content.url, align=Align.C, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font(FONT_FAMILY, "B", 10)
    pdf.multi_cell(0, 5.5, f"{labels['expires']}: {format_local_time(content.expires_at)}", align=Align.C,
                   new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(1.5)
    _impression(pdf, content, labels)
    return bytes(pdf.output())


def _header(pdf: FPDF, content: SlipContent, labels: Mapping[str, str]) -> None:
    pdf.set_font(FONT_FAMILY, "B", 10.5)
    if content.facility_name:
        pdf.multi_cell(0, 5, plain_text(content.facility_name), align=Align.C, new_x=XPos.LMARGIN,
                       new_y=YPos.NEXT)
    pdf.set_font(FONT_FAMILY, "B", 14)
    pdf.cell(0, 7.5, labels["title"], align=Align.C, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font(FONT_FAMILY, "", 8.5)
    pdf.cell(0, 4, labels["subtitle"], align=Align.C, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.line(pdf.l_margin, pdf.get_y() + 1.5, pdf.w - pdf.r_margin, pdf.get_y() + 1.5)
    pdf.ln(3.5)


def _patient_block(pdf: FPDF, content: SlipContent, report_labels: Mapping[str, str],
                   labels: Mapping[str, str]) -> None:
    study_when = " ".join(p for p in (format_date(content.study_date), format_time(content.study_time)) if p)
    rows = [
        (report_labels["patient_name"], display_name(content.patient_name), True),
        (report_labels["patient_id"], content.patient_id, False),
        (report_labels["birth_date"], format_date(content.patient_birth_date), False),
        (report_labels["study_date"], study_when, False),
        (labels["study"], content.study_description, False),
        (report_labels["modality"], ", ".join(content.modalities), False),
        (report_labels["accession"], content.accession_number, False),
    ]
    pdf.set_font(FONT_FAMILY, "B", 9.5)
    label_width = max(pdf.get_string_width(f"{label}:") for label, _, _ in rows) + 3
    for label, value, strong in rows:
        pdf.set_font(FONT_FAMILY, "B", 9.5)
        pdf.cell(label_width, _LINE + 0.4, f"{label}:")
        pdf.set_font(FONT_FAMILY, "B" if strong else "", 11 if strong else 9.5)
        x = pdf.get_x()
        for line in _clip(pdf, plain_text(value).replace("\n", " ") or "–", pdf.w - pdf.r_margin - x, 2):
            pdf.set_x(x)
            pdf.cell(0, _LINE + 0.4, line, new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _instructions(pdf: FPDF, content: SlipContent, labels: Mapping[str, str], *, x: float, y: float) -> None:
    """What to do, as numbered steps in the column from ``x`` to the right margin, from ``y`` down."""
    width = pdf.w - pdf.r_margin - x
    pdf.set_xy(x, y)
    pdf.set_font(FONT_FAMILY, "B", 9.5)
    pdf.cell(width, 5, labels["how"], new_x=XPos.LEFT, new_y=YPos.NEXT)
    steps = [labels["step_scan"], labels[f"scope_{content.scope.value}"]]
    if content.birth_date_check:
        steps.append(labels["step_birth_date"])
    steps += [labels["step_until"], labels["private"]]
    pdf.set_font(FONT_FAMILY, "", 8.5)
    for number, step in enumerate(steps, start=1):
        pdf.set_x(x)
        pdf.cell(4.5, 4, f"{number}.")
        pdf.multi_cell(width - 4.5, 4, step, align=Align.L, new_x=XPos.LEFT, new_y=YPos.NEXT)


def _impression(pdf: FPDF, content: SlipContent, labels: Mapping[str, str]) -> None:
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.w - pdf.r_margin, pdf.get_y())
    pdf.ln(1.5)
    pdf.set_font(FONT_FAMILY, "B", 9.5)
    pdf.cell(0, 5, labels["impression"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    text = plain_text(content.impression).strip()
    if not text:
        pdf.set_font(FONT_FAMILY, "", 8.5)
        pdf.multi_cell(0, 4.2, labels["no_report"], align=Align.L, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        return
    pdf.set_font(FONT_FAMILY, "B", 9)
    lines = cast(list[str], pdf.multi_cell(0, 4.3, text, align=Align.L, dry_run=True, output="LINES"))
    room = int((pdf.h - _MARGIN - pdf.get_y()) // 4.3)
    cut = len(lines) > room  # one page: cut at a line, say where the rest is
    for line in lines[:max(room - 1, 0)] if cut else lines:
        pdf.cell(0, 4.3, line.rstrip(), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    if cut:
        pdf.set_font(FONT_FAMILY, "", 8.5)
        pdf.cell(0, 4.3, labels["more_online"], new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _clip(pdf: FPDF, text: str, width: float, most: int) -> list[str]:
    """``text`` wrapped to ``width`` in the current font, at most ``most`` lines (the last ends in "…" when cut)."""
    lines = [line.rstrip() for line in cast(list[str], pdf.multi_cell(width, _LINE, text, dry_run=True,
                                                                      output="LINES"))]
    if len(lines) <= most:
        return lines
    last = lines[most - 1]
    while last and pdf.get_string_width(f"{last}…") > width:
        last = last[:-1]
    return [*lines[:most - 1], f"{last.rstrip()}…"]


def _signed_impression(session: Session, study_instance_uid: str) -> str:
    """The impression the share page shows last (pacs.sharing.content.signed_study_reports: the newest signed
    version of each report), of the report whose shown version was signed most recently; "" when nothing is
    signed."""
    shown = signed_study_reports(session, study_instance_uid)
    if not shown:
        return ""
    newest = max(shown, key=lambda r: (r.signed_at is not None, as_utc(r.signed_at) or datetime.min, r.number))
    return unicodedata.normalize("NFC", newest.impression)


def _labels(language: str) -> Mapping[str, str]:
    if language not in SLIP_LABELS:
        raise InvalidInput(f"no slip texts for language {language[:8]!r} (have: {', '.join(SLIP_LABELS)})")
    return SLIP_LABELS[language]
