"""A report version as a printable A4 PDF (fpdf2, DejaVu Sans for Vietnamese).

The report's words are plain text: they are laid out with ``multi_cell`` without markdown, and
fpdf2's page-count alias (``{nb}``) is switched off, so nothing a radiologist types is ever read as
markup. The total page count in the footer comes from a first layout pass instead.

Everything printed comes from the :class:`~pacs.reports.document.ReportDocument`; the PDF's
creation date is the version's signing time, so rendering the same version twice gives the same
bytes.

Given a share link (``share_url``), the first page's header carries the link's QR code at its right,
with a caption and the link's expiry, so a printed report opens online too (issue 14); the rest of
the layout is the same.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fpdf import FPDF, FontFace
from fpdf.enums import Align, XPos, YPos

from pacs.errors import PacsError
from pacs.reports.document import REPORT_TIMEZONE, ReportDocument, display_name
from pacs.sharing.qr import place_qr

__all__ = [
    "DEFAULT_FONT_DIR",
    "FONT_DIR_ENV",
    "FONT_FAMILY",
    "LABELS",
    "REPORT_TIMEZONE",
    "ReportFontMissing",
    "display_name",
    "font_dir",
    "font_files",
    "format_date",
    "format_local_time",
    "format_time",
    "plain_text",
    "render_report_pdf",
]

FONT_DIR_ENV = "PACS_REPORT_FONT_DIR"
DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian's fonts-dejavu-core
FONT_FAMILY = "DejaVuSans"
_FONT_FILES = {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf"}


class ReportFontMissing(PacsError):
    """The TrueType font the report PDF embeds is not installed where it is looked for."""


LABELS: Mapping[str, Mapping[str, str]] = {
    "vi": {
        "title": "KẾT QUẢ CHẨN ĐOÁN HÌNH ẢNH",
        "patient_name": "Họ và tên",
        "patient_id": "Mã bệnh nhân",
        "birth_date": "Ngày sinh",
        "sex": "Giới tính",
        "sex_M": "Nam",
        "sex_F": "Nữ",
        "sex_O": "Khác",
        "procedure": "Kỹ thuật chụp",
        "modality": "Thiết bị",
        "study_date": "Ngày chụp",
        "accession": "Số phiếu chụp",
        "referring": "Bác sĩ chỉ định",
        "findings": "KẾT QUẢ",
        "impression": "KẾT LUẬN",
        "amended": "ĐÃ SỬA ĐỔI / AMENDED",
        "amend_reason": "Lý do sửa đổi",
        "preliminary": "SƠ BỘ / PRELIMINARY",
        "preliminary_note": "Kết quả sơ bộ, chưa được bác sĩ ký duyệt.",
        "signed_by": "Bác sĩ ký kết quả",
        "signed_at": "Thời gian ký",
        "reported_by": "Bác sĩ đọc kết quả",
        "report": "Mã kết quả",
        "version": "phiên bản",
        "page": "Trang {page}/{pages}",
        "share_caption": "Quét mã để xem kết quả trực tuyến",
        "share_expires": "Hết hạn",
    },
    "en": {
        "title": "DIAGNOSTIC IMAGING REPORT",
        "patient_name": "Patient name",
        "patient_id": "Patient ID",
        "birth_date": "Date of birth",
        "sex": "Sex",
        "sex_M": "Male",
        "sex_F": "Female",
        "sex_O": "Other",
        "procedure": "Procedure",
        "modality": "Modality",
        "study_date": "Study date",
        "accession": "Accession number",
        "referring": "Referring physician",
        "findings": "FINDINGS",
        "impression": "IMPRESSION",
        "amended": "AMENDED",
        "amend_reason": "Reason for amendment",
        "preliminary": "PRELIMINARY",
        "preliminary_note": "Preliminary result, not yet signed by the radiologist.",
        "signed_by": "Signed by",
        "signed_at": "Signed at",
        "reported_by": "Reported by",
        "report": "Report",
        "version": "version",
        "page": "Page {page} of {pages}",
        "share_caption": "Scan to see this result online",
        "share_expires": "Expires",
    },
}

_MARGIN = 15.0
_LINE = 5.5
_BANNER_FILL = (255, 236, 204)
_PRELIMINARY_COLOUR = (180, 30, 30)
_QR_SIZE = 28.0  # mm, quiet zone included: ~0.6 mm per module for a share URL, easy for a phone on paper
_QR_GAP = 1.0


@dataclass(frozen=True)
class _ShareMark:
    url: str
    expires_at: datetime | None


def font_dir() -> Path:
    """Where the DejaVu fonts are read from: ``$PACS_REPORT_FONT_DIR``, else Debian's folder."""
    configured = os.environ.get(FONT_DIR_ENV, "").strip()
    return Path(configured) if configured else DEFAULT_FONT_DIR


def render_report_pdf(doc: ReportDocument, *, language: str = "vi", share_url: str | None = None,
                      share_expires_at: datetime | None = None) -> bytes:
    """The report version as PDF bytes, labelled in Vietnamese (``"vi"``) or English (``"en"``).

    With ``share_url`` (a share link of the study), the first page also carries the link's QR code, a
    caption saying what it is for and, given ``share_expires_at``, until when it opens.
    """
    if language not in LABELS:
        raise ValueError(f"no report labels for language {language!r} (have: {', '.join(LABELS)})")
    share = _ShareMark(share_url, share_expires_at) if share_url else None
    fonts = font_files()
    first = _layout(doc, LABELS[language], language, fonts, total_pages=None, share=share)
    final = _layout(doc, LABELS[language], language, fonts, total_pages=first.page, share=share)
    return bytes(final.output())


class _ReportPDF(FPDF):
    """A4 pages with the facility header, the preliminary mark and a numbered footer on every page."""

    def __init__(self, doc: ReportDocument, labels: Mapping[str, str], total_pages: int | None,
                 share: _ShareMark | None = None) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.report = doc
        self.labels = labels
        self.total_pages = total_pages
        self.share = share
        self.alias_nb_pages(None)  # type: ignore[arg-type]  # "{nb}" in report text must stay literal

    def header(self) -> None:
        # On the first page of a shared report the link's QR code stands at the right; the titles keep
        # the same room at the left, so they stay centred on the page.
        top = self.get_y()
        inset, bottom = 0.0, top
        if self.share is not None and self.page_no() == 1:
            inset, bottom = _QR_SIZE + _QR_GAP, _share_mark(self, self.share, self.labels, top)
            self.set_xy(self.l_margin + inset, top)
        width = self.epw - 2 * inset
        self.set_font(FONT_FAMILY, "B", 11)
        if self.report.facility_name:
            self.multi_cell(width, 5.5, plain_text(self.report.facility_name), align=Align.C,
                            new_x=XPos.LEFT, new_y=YPos.NEXT)
        self.set_font(FONT_FAMILY, "B", 15)
        self.cell(width, 9, self.labels["title"], align=Align.C, new_x=XPos.LEFT, new_y=YPos.NEXT)
        if self.report.status == "preliminary":
            self.set_text_color(*_PRELIMINARY_COLOUR)
            self.set_font(FONT_FAMILY, "B", 12)
            self.cell(width, 7, self.labels["preliminary"], align=Align.C, new_x=XPos.LEFT, new_y=YPos.NEXT)
            self.set_text_color(0, 0, 0)
        self.set_y(max(self.get_y(), bottom))
        self.line(self.l_margin, self.get_y() + 1, self.w - self.r_margin, self.get_y() + 1)
        self.ln(4)

    def footer(self) -> None:
        self.set_y(-13)
        self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
        self.set_font(FONT_FAMILY, "", 8)
        doc = self.report
        ident = f"{self.labels['report']} {doc.report_id}, {self.labels['version']} {doc.version}"
        self.cell(0, 6, ident, align=Align.L)
        self.set_x(self.l_margin)
        page = self.labels["page"].format(page=self.page_no(), pages=self.total_pages or "?")
        self.cell(0, 6, page, align=Align.R)


def _layout(doc: ReportDocument, labels: Mapping[str, str], language: str, fonts: Mapping[str, Path],
            total_pages: int | None, share: _ShareMark | None = None) -> _ReportPDF:
    pdf = _ReportPDF(doc, labels, total_pages, share)
    for style, path in fonts.items():
        pdf.add_font(FONT_FAMILY, style, str(path))
    pdf.set_margins(_MARGIN, 12, _MARGIN)
    pdf.set_auto_page_break(True, margin=18)
    _metadata(pdf, doc, labels, language)
    pdf.add_page()
    if doc.status == "amended":
        _amended_banner(pdf, doc, labels)
    _patient_block(pdf, doc, labels)
    _section(pdf, labels["findings"], doc.findings, bold_body=False)
    _section(pdf, labels["impression"], doc.impression, bold_body=True)
    _signature(pdf, doc, labels)
    return pdf


def _metadata(pdf: FPDF, doc: ReportDocument, labels: Mapping[str, str], language: str) -> None:
    pdf.set_title(f"{labels['title']} – {labels['report']} {doc.report_id}, {labels['version']} {doc.version}")
    pdf.set_author(_signer(doc))
    pdf.set_subject(plain_text(doc.procedure or doc.study_description))
    pdf.set_creator("Filmless PACS")
    pdf.set_lang("vi-VN" if language == "vi" else "en-US")
    moment = doc.signed_at or doc.created_at
    if moment is not None:
        pdf.set_creation_date(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def _amended_banner(pdf: FPDF, doc: ReportDocument, labels: Mapping[str, str]) -> None:
    pdf.set_fill_color(*_BANNER_FILL)
    pdf.set_font(FONT_FAMILY, "B", 11)
    pdf.multi_cell(0, 7, labels["amended"], fill=True, align=Align.L, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    if doc.amend_reason.strip():
        pdf.set_font(FONT_FAMILY, "", 10)
        pdf.multi_cell(0, _LINE, f"{labels['amend_reason']}: {plain_text(doc.amend_reason)}", fill=True,
                       align=Align.L, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_fill_color(255, 255, 255)  # fpdf2 tables fill their cells with the current fill colour
    pdf.ln(3)


def _patient_block(pdf: FPDF, doc: ReportDocument, labels: Mapping[str, str]) -> None:
    sex = labels.get(f"sex_{doc.patient_sex}", doc.patient_sex)
    study_when = " ".join(p for p in (format_date(doc.study_date), format_time(doc.study_time)) if p)
    rows = [
        (labels["patient_name"], display_name(doc.patient_name), labels["patient_id"], doc.patient_id),
        (labels["birth_date"], format_date(doc.patient_birth_date), labels["sex"], sex),
        (labels["modality"], ", ".join(doc.modalities), labels["study_date"], study_when),
        (labels["accession"], doc.accession_number, labels["referring"], display_name(doc.referring_physician_name)),
    ]
    label_face = FontFace(emphasis="BOLD")
    pdf.set_font(FONT_FAMILY, "B", 10)
    # Label columns as wide as their longest label, so labels never wrap; values share the rest.
    left = max(pdf.get_string_width(f"{row[0]}:") for row in [*rows, (labels["procedure"],)]) + 3
    right = max(pdf.get_string_width(f"{row[2]}:") for row in rows) + 3
    value = (pdf.epw - left - right) / 2
    pdf.set_font(FONT_FAMILY, "", 10)
    with pdf.table(col_widths=(left, value, right, value), borders_layout="NONE", first_row_as_headings=False,
                   text_align="LEFT", line_height=_LINE, padding=(0.6, 1)) as table:
        for label_a, value_a, label_b, value_b in rows:
            row = table.row()
            row.cell(f"{label_a}:", style=label_face)
            row.cell(plain_text(value_a))
            row.cell(f"{label_b}:", style=label_face)
            row.cell(plain_text(value_b))
        row = table.row()
        row.cell(f"{labels['procedure']}:", style=label_face)
        row.cell(plain_text(doc.procedure or doc.study_description), colspan=3)
    pdf.ln(2)
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.w - pdf.r_margin, pdf.get_y())
    pdf.ln(3)


def _share_mark(pdf: FPDF, share: _ShareMark, labels: Mapping[str, str], top: float) -> float:
    """The QR code at the right margin from ``top`` down and its caption under it; returns the bottom."""
    x = pdf.w - pdf.r_margin - _QR_SIZE
    place_qr(pdf, share.url, x=x, y=top, size=_QR_SIZE)
    caption = labels["share_caption"]
    if share.expires_at is not None:
        caption += f"\n{labels['share_expires']}: {format_local_time(share.expires_at)}"
    pdf.set_font(FONT_FAMILY, "", 6.5)
    pdf.set_xy(x - 1, top + _QR_SIZE)
    pdf.multi_cell(_QR_SIZE + 2, 2.9, caption, align=Align.C, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    return pdf.get_y()


def _section(pdf: FPDF, heading: str, text: str, *, bold_body: bool) -> None:
    pdf.set_font(FONT_FAMILY, "B", 12)
    pdf.cell(0, 8, heading, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font(FONT_FAMILY, "B" if bold_body else "", 10.5)
    pdf.multi_cell(0, _LINE, plain_text(text), align=Align.L, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(4)


def _signature(pdf: FPDF, doc: ReportDocument, labels: Mapping[str, str]) -> None:
    needed = 4 * _LINE + 8
    if pdf.get_y() + needed > pdf.page_break_trigger:
        pdf.add_page()
    x = pdf.w / 2
    width = pdf.w - pdf.r_margin - x
    pdf.set_font(FONT_FAMILY, "", 10)
    lines: list[tuple[str, str]] = []
    if doc.signed:
        if doc.signed_at is not None:
            lines.append(("", f"{labels['signed_at']}: {format_local_time(doc.signed_at)}"))
        lines.append(("", f"{labels['signed_by']}:"))
    else:
        lines.append(("", labels["preliminary_note"]))
        lines.append(("", f"{labels['reported_by']}:"))
    lines.append(("B", _signer(doc)))
    for style, text in lines:
        pdf.set_font(FONT_FAMILY, style, 11 if style else 10)
        pdf.set_x(x)
        pdf.multi_cell(width, _LINE + 0.5, plain_text(text), align=Align.C, new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _signer(doc: ReportDocument) -> str:
    if doc.signed:
        return doc.signed_by_name or doc.signed_by
    return doc.author_name or doc.author


def font_files() -> dict[str, Path]:
    folder = font_dir()
    files = {style: folder / name for style, name in _FONT_FILES.items()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ReportFontMissing(
            f"the report PDF needs DejaVu Sans: {', '.join(missing)} not found "
            f"(install Debian's fonts-dejavu-core or set {FONT_DIR_ENV} to a folder holding "
            f"{' and '.join(_FONT_FILES.values())})"
        )
    return files


def plain_text(text: str) -> str:
    """Report text as it is laid out: NFC (DejaVu has the precomposed Vietnamese letters), Unix line
    breaks, tabs as spaces, and no other control characters."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    return "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) != "Cc")


def format_date(value: str) -> str:
    """YYYYMMDD as DD/MM/YYYY; anything else as stored."""
    value = value.strip()
    try:
        return datetime.strptime(value, "%Y%m%d").strftime("%d/%m/%Y") if len(value) == 8 else value
    except ValueError:
        return value


def format_time(value: str) -> str:
    """DICOM TM (HHMMSS.frac or HH:MM:SS) as HH:MM; anything else as stored."""
    digits = value.strip().replace(":", "").split(".", 1)[0]
    if len(digits) >= 4 and digits[:4].isdigit():
        return f"{digits[:2]}:{digits[2:4]}"
    return value.strip()


def format_local_time(moment: datetime) -> str:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    local = aware.astimezone(REPORT_TIMEZONE)
    offset = local.strftime("%z")
    return f"{local.strftime('%d/%m/%Y %H:%M')} (UTC{offset[:3]}:{offset[3:]})"
