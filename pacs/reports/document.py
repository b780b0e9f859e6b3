"""One signed (or preliminary) report version as everything it becomes sees it: SR, PDF, HL7 ORU, FHIR.

Built by :func:`pacs.reports.lifecycle.report_document` from the report, its version, the study
index and the order; the builders (:mod:`pacs.reports.sr`, :mod:`pacs.reports.pdf`,
:mod:`pacs.hl7.messages`, :mod:`pacs.fhir.diagnostic_report`) take only this value, so the same
words and people appear in every output.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

# Times printed on (and written into) report documents are the facility's local time. Defined here, not with the
# PDF builder, so that pages and routes showing times do not load the PDF library (fpdf and fontTools, ~28 MB per
# process) until a PDF is made.
REPORT_TIMEZONE = ZoneInfo("Asia/Ho_Chi_Minh")


def display_name(pn: str) -> str:
    """A DICOM PN shown as "Family Given Middle" (first component group; ``Nguyễn^Văn An`` → ``Nguyễn Văn An``)."""
    alphabetic = pn.split("=", 1)[0]
    parts = [p.strip() for p in alphabetic.split("^")][:3]
    return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class ReportDocument:
    report_id: int
    version: int
    status: str  # preliminary, final, amended (a draft is never published)
    findings: str
    impression: str
    language: str  # "vi", "en" or ""
    author: str  # user name of the version's author
    author_name: str  # display name ("" when the account has none)
    signed_by: str  # user name of the signer ("" until signed)
    signed_by_name: str
    signed_at: datetime | None  # timezone-aware UTC
    amend_reason: str  # "" unless this version amends an earlier one
    created_at: datetime | None
    study_instance_uid: str
    accession_number: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str  # DICOM PN as stored, e.g. "Nguyễn^Văn An"
    patient_birth_date: str  # YYYYMMDD or ""
    patient_sex: str  # M, F, O or ""
    study_date: str  # YYYYMMDD or ""
    study_time: str
    study_description: str
    modalities: tuple[str, ...]
    referring_physician_name: str  # DICOM PN or ""
    procedure: str  # the order's requested procedure, else the study description
    facility: str  # facility code ("" = none)
    facility_name: str  # the name printed on the report header
    placer_order_number: str = ""
    sr_sop_instance_uid: str = ""  # the SR made for this version once signed
    sr_series_instance_uid: str = ""

    @property
    def signed(self) -> bool:
        return self.status in ("final", "amended")
