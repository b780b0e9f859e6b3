"""FHIR R4 DiagnosticReport: the published versions of a radiology report (SPEC §6), for EMRs.

**Id.** ``r{report id}`` (``r12`` for report 12 of ``/api/reports/12``): the report's primary key, which is
primary data (never rebuilt by ``pacs reindex``), so the id is stable; the ``r`` keeps it from being taken for
an accession or order number. Only the canonical spelling (no leading zeros) names a report.

**Versions.** ``meta.versionId`` is the report version number (1 = the first report, 2… = amendments).
Version 1 moves preliminary → final in place, so version 1 read before signing had status ``preliminary``
and reads ``final`` afterwards with the same versionId; a final or amended version never changes again.
``_history`` lists the published versions newest first; ``_history/{n}`` reads one.

**Who sees what.** A draft is never published: a report with only a draft does not exist here (404, absent
from searches). Clinicians, EMRs and other report readers see preliminary, final and amended versions;
a patient token (or a share link) sees final and amended versions only, of its own studies. A read answers
the newest version the caller may see. Everything is limited to the caller's study scope
(:func:`pacs.security.access.study_condition`): another facility's report is 404, like an unknown one.

**Content** (from :class:`pacs.reports.document.ReportDocument`, the same words as the SR, PDF and HL7 ORU):

=====================  =====================================================================================
``status``             the version's: ``preliminary``, ``final`` or ``amended``
``category``           LOINC ``LP29684-5`` "Radiology" and v2-0074 ``RAD``
``code``               LOINC ``18748-4`` "Diagnostic imaging study"; ``text`` = the order's procedure, else
                       the study description
``subject``            ``Patient/{id}``, the id of the Patient resource (:mod:`pacs.fhir.ids`)
``imagingStudy``       ``ImagingStudy/{Study Instance UID}``
``basedOn``            ``ServiceRequest/{id}`` of the study's order, when there is one
``identifier``         the accession number (type ACSN); the SR of a signed version (``urn:dicom:uid``)
``effectiveDateTime``  the study date (no time: the index holds no time zone)
``issued``             when the version was signed (a preliminary version: when it was made preliminary)
``performer``          the signer (a preliminary version: its author), display only
``resultsInterpreter`` the version's author, display only
``conclusion``         the impression
``presentedForm``      the PDF (``url`` = ``{base}/api/reports/{id}/pdf?version={n}``, needs a token with
                       report.read) and the findings as ``text/plain`` (``data``, base64 UTF-8)
``extension``          the study's viewer URL (:data:`pacs.fhir.resources.VIEWER_URL_EXTENSION`)
=====================  =====================================================================================
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from pacs.db.models import Patient, Study
from pacs.errors import NotFound
from pacs.fhir.ids import PatientRef, patient_fhir_id
from pacs.fhir.resources import (
    accession_identifier,
    compact,
    fhir_date,
    fhir_instant,
    viewer_extension,
    viewer_url,
)
from pacs.fhir.search import (
    DICOM_UID_SYSTEM,
    IMAGING_REPORT_CODE,
    LOINC,
    RADIOLOGY_CATEGORY,
    V2_0074,
    Search,
)
from pacs.fhir.service_request import service_request_fhir_id
from pacs.reports.document import ReportDocument
from pacs.reports.lifecycle import VersionView, get_report, report_document
from pacs.reports.models import AMENDED, FINAL, PRELIMINARY, Report, ReportVersion
from pacs.ris.orders import order_for_study
from pacs.security.access import study_condition
from pacs.security.principal import AccessScope, Principal
from pacs.security.roles import Role

_ID_RE = re.compile(r"^r([1-9][0-9]{0,17})$")
SIGNED_ONLY = (FINAL, AMENDED)
READER_STATES = (PRELIMINARY, FINAL, AMENDED)
_RESOLVE_LIMIT = 1000
_TITLES = {"vi": ("Kết quả chẩn đoán hình ảnh", "Mô tả"), "en": ("Radiology report", "Findings")}


def report_fhir_id(report_id: int) -> str:
    return f"r{report_id}"


def report_id_from_fhir(fhir_id: str) -> int | None:
    """The report a DiagnosticReport id names; None for an id we never made."""
    match = _ID_RE.match(fhir_id)
    return int(match.group(1)) if match else None


def published_states(principal: Principal) -> tuple[str, ...]:
    """The version states ``principal`` may read through FHIR (never a draft)."""
    scope = principal.scope
    if principal.role is Role.PATIENT or scope.patient_ids is not None or scope.study_uids is not None:
        return SIGNED_ONLY
    return READER_STATES


# -- the resource (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportLinks:
    """What the resource needs besides the report document: ids of other resources, URLs and times."""

    public_base: str  # the server's public base URL (no trailing slash)
    subject_id: str  # the Patient resource id
    service_request_id: str = ""  # the order's ServiceRequest id ("" = no order)
    issued: datetime | None = None  # when this version was published
    last_updated: datetime | None = None  # the version's last change


def diagnostic_report(doc: ReportDocument, links: ReportLinks) -> dict[str, Any]:
    """One report version as a DiagnosticReport (see the module docstring for the mapping)."""
    fhir_id = report_fhir_id(doc.report_id)
    interpreter = doc.author_name or doc.author
    performer = (doc.signed_by_name or doc.signed_by) if doc.signed else interpreter
    identifiers = [accession_identifier(doc.accession_number)] if doc.accession_number else []
    if doc.sr_sop_instance_uid:
        identifiers.append({"use": "secondary", "system": DICOM_UID_SYSTEM,
                            "value": f"urn:oid:{doc.sr_sop_instance_uid}"})
    return compact({
        "resourceType": "DiagnosticReport",
        "id": fhir_id,
        "meta": compact({"versionId": str(doc.version), "lastUpdated": fhir_instant(links.last_updated)}),
        "language": doc.language,
        "extension": viewer_extension(viewer_url(links.public_base, doc.study_instance_uid)),
        "identifier": identifiers,
        "basedOn": [{"reference": f"ServiceRequest/{links.service_request_id}"}] if links.service_request_id else [],
        "status": doc.status,
        "category": [{"coding": [{"system": LOINC, "code": RADIOLOGY_CATEGORY, "display": "Radiology"},
                                 {"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": IMAGING_REPORT_CODE, "display": "Diagnostic imaging study"}],
                 "text": doc.procedure or doc.study_description or "Diagnostic imaging study"},
        "subject": {"reference": f"Patient/{links.subject_id}"},
        "effectiveDateTime": fhir_date(doc.study_date),
        "issued": fhir_instant(links.issued),
        "performer": [{"type": "Practitioner", "display": performer}] if performer else [],
        "resultsInterpreter": [{"type": "Practitioner", "display": interpreter}] if interpreter else [],
        "imagingStudy": [{"reference": f"ImagingStudy/{doc.study_instance_uid}"}],
        "conclusion": doc.impression.strip(),
        "presentedForm": _presented_forms(doc, links.public_base, links.issued),
    })


def _presented_forms(doc: ReportDocument, public_base: str, issued: datetime | None) -> list[dict[str, Any]]:
    report_title, findings_title = _TITLES.get(doc.language, _TITLES["en"])
    label = f"{report_title} {doc.accession_number or report_fhir_id(doc.report_id)} (v{doc.version}, {doc.status})"
    forms = [compact({"contentType": "application/pdf", "language": doc.language,
                      "url": f"{public_base}/api/reports/{doc.report_id}/pdf?version={doc.version}",
                      "title": label, "creation": fhir_instant(issued)})]
    if doc.findings.strip():
        forms.append(compact({"contentType": "text/plain; charset=utf-8", "language": doc.language,
                              "data": base64.b64encode(doc.findings.encode("utf-8")).decode("ascii"),
                              "title": findings_title}))
    return forms


# -- reads and searches (inside the caller's scope) --------------------------------------------------


@dataclass(frozen=True)
class PublishedReport:
    resource: dict[str, Any]
    patient_id: str
    study_instance_uid: str


def read_versions(session: Session, scope: AccessScope, states: tuple[str, ...], report_id: int,
                  public_base: str, newest_only: bool = False) -> list[PublishedReport]:
    """The versions of a report the caller may read (in ``states``), oldest first, or only the newest of
    them; NotFound when there is none (an unknown report, one outside the scope, or one with nothing
    published for this caller)."""
    view = get_report(session, scope, report_id)
    versions = [v for v in view.versions if v.status in states]
    if not versions:
        raise NotFound(f"no DiagnosticReport {report_fhir_id(report_id)}")
    if newest_only:
        versions = versions[-1:]
    subject = _subject(session, view.study_instance_uid)
    order = order_for_study(session, view.study_instance_uid)
    sr_id = service_request_fhir_id(order.accession_number) if order is not None else ""
    out = []
    for version in versions:
        doc = report_document(session, report_id, version.version)
        subject_id = patient_fhir_id(*subject) if subject else patient_fhir_id(doc.patient_id,
                                                                               doc.issuer_of_patient_id)
        links = ReportLinks(public_base, subject_id, sr_id, issued=_issued(version),
                            last_updated=_last_updated(version))
        out.append(PublishedReport(diagnostic_report(doc, links), doc.patient_id, view.study_instance_uid))
    return out


def search_reports(session: Session, scope: AccessScope, states: tuple[str, ...], search: Search,
                   public_base: str) -> tuple[list[PublishedReport], int]:
    """One page of the reports matching ``search`` (newest report first) and the number of matches."""
    if search.matches_nothing:
        return [], 0
    conditions = _conditions(session, search, states)
    if conditions is None:
        return [], 0
    stmt = (select(Report.id).join(Study, Study.study_instance_uid == Report.study_instance_uid)
            .outerjoin(Patient, Patient.id == Study.patient_fk).where(study_condition(scope), *conditions))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    if not search.count:
        return [], total
    ids = session.scalars(stmt.order_by(Report.id.desc()).limit(search.count).offset(search.offset)).all()
    return [read_versions(session, scope, states, report_id, public_base, newest_only=True)[0]
            for report_id in ids], total


def _conditions(session: Session, search: Search, states: tuple[str, ...]) -> list[ColumnElement[bool]] | None:
    """SQL conditions for the search; None when it can match nothing."""
    newest = _newest_published(states)
    conditions: list[ColumnElement[bool]] = [newest.is_not(None)]
    filters = search.filters
    if "PatientID" in filters:
        conditions.append(Patient.patient_id.in_(filters["PatientID"].split("\\")))
    if "IssuerOfPatientID" in filters:
        conditions.append(Patient.issuer_of_patient_id == filters["IssuerOfPatientID"])
    if search.patient_ref is not None:
        identity = resolve_patient(session, search.patient_ref)
        if identity is None:
            return None
        conditions += [Patient.patient_id == identity[0], Patient.issuer_of_patient_id == identity[1]]
    if "StudyInstanceUID" in filters:
        conditions.append(Report.study_instance_uid.in_(filters["StudyInstanceUID"].split("\\")))
    if "AccessionNumber" in filters:
        accessions = filters["AccessionNumber"].split("\\")
        conditions.append(or_(Study.accession_number.in_(accessions), Report.accession_number.in_(accessions)))
    if "StudyDate" in filters:
        conditions.append(_study_date(filters["StudyDate"]))
    if search.statuses is not None:
        conditions.append(exists().where(ReportVersion.report_fk == Report.id, ReportVersion.version == newest,
                                         ReportVersion.status.in_(sorted(search.statuses))))
    if search.ids is not None:
        report_ids = [i for i in (report_id_from_fhir(v) for v in search.ids) if i is not None]
        if not report_ids:
            return None
        conditions.append(Report.id.in_(report_ids))
    return conditions


def _newest_published(states: tuple[str, ...]) -> Any:
    """The number of a report's newest version in ``states`` (NULL when none), correlated to ``Report``."""
    return (select(func.max(ReportVersion.version))
            .where(ReportVersion.report_fk == Report.id, ReportVersion.status.in_(states))
            .correlate(Report).scalar_subquery())


def _study_date(value: str) -> ColumnElement[bool]:
    """A DICOM date or range (``YYYYMMDD``, ``A-B``, ``A-``, ``-B``) from the search as SQL on StudyDate."""
    low, dash, high = value.partition("-")
    if not dash:
        return Study.study_date == low
    parts = [Study.study_date != ""]
    if low:
        parts.append(Study.study_date >= low)
    if high:
        parts.append(Study.study_date <= high)
    return and_(*parts)


def resolve_patient(session: Session, ref: PatientRef) -> tuple[str, str] | None:
    """The (Patient ID, issuer) a Patient id names, or None. A long id names a Patient ID prefix and a
    digest: the candidates sharing the prefix are checked against it (see :mod:`pacs.fhir.ids`)."""
    if ref.exact:
        return ref.patient_id, ref.issuer
    rows = session.execute(select(Patient.patient_id, Patient.issuer_of_patient_id).where(
        Patient.patient_id.startswith(ref.patient_id, autoescape=True)).distinct().limit(_RESOLVE_LIMIT))
    return next(((p, i) for p, i in rows if ref.matches(p, i)), None)


def _subject(session: Session, study_instance_uid: str) -> tuple[str, str] | None:
    row = session.execute(select(Patient.patient_id, Patient.issuer_of_patient_id).join(
        Study, Study.patient_fk == Patient.id).where(Study.study_instance_uid == study_instance_uid)).first()
    return (row[0], row[1] or "") if row is not None else None


def _issued(version: VersionView) -> datetime | None:
    return version.signed_at if version.status in SIGNED_ONLY else (version.preliminary_at or version.updated_at)


def _last_updated(version: VersionView) -> datetime | None:
    """When the version last changed: a signed version never changes after signing (recording its SR's
    UID later touches the row, not the report); an unsigned one when it was last edited or published."""
    if version.status in SIGNED_ONLY and version.signed_at:
        return version.signed_at
    times = [t for t in (version.preliminary_at, version.updated_at, version.created_at) if t]
    return max(times) if times else None

