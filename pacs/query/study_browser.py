"""The study browser's queries: one page of studies newest first, their total, and what a study page shows.

The search conditions are QIDO-RS's own: the form's fields become QIDO search parameters
(:func:`pacs.dicomweb.qido.parse_search`, with ``fuzzymatching=true`` so ``nguyen van an`` finds
"Nguyễn^Văn^An"), and :func:`pacs.query.engine.prepare` turns them into the WHERE clause C-FIND and QIDO-RS
use, the asker's access scope included (:func:`pacs.security.access.study_condition`, emptied studies hidden).
What QIDO cannot give in the same round trip — the newest report's status, the facility code, whether a
pre-built thumbnail exists, a filter on the facility, a newest-first order — is added here.

A page costs four short statements: the page's study ids (newest study date first, then newest arrival: a
backward walk of the study-date index with an incremental sort, stopping after ``offset + limit`` rows), the total
and the newest id in one count (index-only on the partial ``ix_study_listed*`` indexes when unscoped), the page's
rows with their patients, and their reports' statuses (JIT compilation is off for the whole engine: pacs.db.engine).
``bench/ui_browser.py`` measures the first page at 100,000 studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from pacs.db.models import Patient, Series, Study
from pacs.dicomweb.qido import parse_search
from pacs.errors import InvalidInput
from pacs.persons.scope import same_person_records
from pacs.query.engine import prepare
from pacs.reports.models import DRAFT, PRELIMINARY, SIGNED_STATES, Report
from pacs.security.access import study_condition
from pacs.security.principal import AccessScope, Principal
from pacs.security.roles import Capability, Role

PAGE_SIZE = 50
MAX_OFFSET = 1_000_000
MAX_PRIORS = 20
NO_REPORT = "none"


@dataclass(frozen=True)
class BrowserFilters:
    """The study browser's search form (each field optional; all given ones apply together)."""

    patient_name: str = ""  # without diacritics or case ("nguyen van an"), prefixes of each name part
    patient_id: str = ""  # exact, or with * and ? wildcards
    accession_number: str = ""
    date_from: str = ""  # study date, YYYYMMDD or YYYY-MM-DD
    date_to: str = ""
    modality: str = ""  # one modality (CT, MR, CR…)
    facility: str = ""  # a facility code: narrows the asker's scope, never widens it

    def is_empty(self) -> bool:
        return not any((self.patient_name.strip(), self.patient_id.strip(), self.accession_number.strip(),
                        self.date_from.strip(), self.date_to.strip(), self.modality.strip(), self.facility.strip()))


@dataclass(frozen=True)
class StudyRow:
    id: int
    study_instance_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    modalities: tuple[str, ...]
    description: str
    number_of_series: int
    number_of_instances: int
    facility: str
    institution_name: str
    report_status: str  # none / draft / preliminary / final / amended, as the asker may know it
    has_thumbnail: bool


@dataclass(frozen=True)
class BrowserPage:
    rows: list[StudyRow]
    total: int
    offset: int
    limit: int
    latest: int  # the newest matching study's id (the "new studies" poll counts those after it)


@dataclass(frozen=True)
class SeriesRow:
    series_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    body_part: str
    number_of_instances: int
    has_thumbnail: bool


@dataclass(frozen=True)
class StudyDetail:
    """The study page's header: the study, its patient record and facility."""

    study: StudyRow
    patient_fk: int
    referring_physician_name: str
    study_id: str
    series: list[SeriesRow]


@dataclass(frozen=True)
class PriorRow:
    study_instance_uid: str
    study_date: str
    modalities: tuple[str, ...]
    description: str
    facility: str
    report_status: str


# -- the list -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    """The form's search as SQL: QIDO-RS's WHERE clause and the FROM it needs (the study table, joined to the
    patient only when a condition reads it: the count of every study is then an index-only scan)."""

    where: ColumnElement[bool]
    source: Any


def search(scope: AccessScope, filters: BrowserFilters) -> Search:
    """QIDO-RS's conditions for the form's fields within ``scope`` (raises InvalidInput for a bad value)."""
    params: list[tuple[str, str]] = []
    if name := filters.patient_name.strip():
        params += [("PatientName", name), ("fuzzymatching", "true")]
    if patient_id := filters.patient_id.strip():
        params.append(("PatientID", patient_id))
    if accession := filters.accession_number.strip():
        params.append(("AccessionNumber", accession))
    low, high = _date(filters.date_from, "from"), _date(filters.date_to, "to")
    if low or high:
        if low and high and low > high:
            raise InvalidInput("the first date is after the last date")
        params.append(("StudyDate", f"{low}-{high}"))
    if modality := filters.modality.strip().upper():
        if not modality.isalnum() or len(modality) > 16:
            raise InvalidInput(f"invalid modality {filters.modality[:20]!r}")
        params.append(("ModalitiesInStudy", modality))
    counted = prepare(parse_search("studies", params, scope=scope).query).count_statement
    where = counted.whereclause
    assert where is not None  # a study search always has its scope (or the hidden-emptied-studies) condition
    if facility := filters.facility.strip():
        where = where & (Study.facility == facility)
    return Search(where, counted.get_final_froms()[0])


def browse(session: Session, principal: Principal, filters: BrowserFilters, *, limit: int = PAGE_SIZE,
           offset: int = 0) -> BrowserPage:
    """One page of the studies ``principal`` may see that match ``filters``, newest first, and their total."""
    if not 1 <= limit <= 500 or not 0 <= offset <= MAX_OFFSET:
        raise InvalidInput("limit must be 1-500 and offset 0-1000000")
    found = search(principal.scope, filters)
    ids = list(session.scalars(page_statement(found, limit, offset)))
    total, latest = session.execute(count_statement(found)).one()
    return BrowserPage(study_rows(session, principal, ids), int(total or 0), offset, limit, int(latest or 0))


def count_newer(session: Session, principal: Principal, filters: BrowserFilters, since: int) -> tuple[int, int]:
    """How many matching studies arrived after study id ``since``, and the newest matching id."""
    found = search(principal.scope, filters)
    count, latest = session.execute(count_statement(Search(found.where & (Study.id > since), found.source))).one()
    return int(count or 0), int(latest or since)


def study_rows(session: Session, principal: Principal, ids: list[int]) -> list[StudyRow]:
    """The rows of these study ids, in this order (no scope check: the ids come from a scoped query)."""
    if not ids:
        return []
    found = {r.id: r for r in session.execute(_row_columns().where(Study.id.in_(ids)))}
    statuses = report_statuses(session, [found[i].study_instance_uid for i in ids if i in found])
    return [_study_row(found[i], visible_report_status(principal, statuses.get(found[i].study_instance_uid, "")))
            for i in ids if i in found]


def report_statuses(session: Session, uids: list[str]) -> dict[str, str]:
    """The status of each study's newest report (a study with several keeps the newest one's)."""
    if not uids:
        return {}
    out: dict[str, str] = {}
    for uid, status in session.execute(select(Report.study_instance_uid, Report.status)
                                       .where(Report.study_instance_uid.in_(uids)).order_by(Report.id)):
        out[uid] = status
    return out


def visible_report_status(principal: Principal, status: str) -> str:
    """A report's status as ``principal`` may know it, by the reports API's rule (viewer_api.reports): writers
    see drafts, other readers preliminary and signed reports, patients signed ones; without ``report.read``
    nothing."""
    if not status:
        return NO_REPORT
    if principal.can(Capability.REPORT_WRITE):
        return status
    if not principal.can(Capability.REPORT_READ) or status == DRAFT:
        return NO_REPORT
    if principal.role is Role.PATIENT and status == PRELIMINARY:
        return NO_REPORT
    return status if status in (PRELIMINARY, *SIGNED_STATES) else NO_REPORT


# -- one study ------------------------------------------------------------------------------------------------


def study_detail(session: Session, principal: Principal, study_instance_uid: str) -> StudyDetail | None:
    """The study with its current series, or None when it is unknown or outside the scope (the same answer).

    The scope is :func:`study_condition` with borrowed studies (a consult's, a person's priors) and emptied
    studies (their reports still count), as the reports API reads them."""
    row = session.execute(_row_columns().add_columns(Study.patient_fk, Study.referring_physician_name,
                                                     Study.study_id)
                          .where(Study.study_instance_uid == study_instance_uid,
                                 study_condition(principal.scope)).limit(1)).first()
    if row is None:
        return None
    status = report_statuses(session, [study_instance_uid]).get(study_instance_uid, "")
    series = [SeriesRow(s.series_instance_uid, s.modality, s.series_number, s.series_description,
                        s.body_part_examined, s.number_of_instances, bool(s.thumbnail_key))
              for s in session.execute(
                  select(Series.series_instance_uid, Series.modality, Series.series_number,
                         Series.series_description, Series.body_part_examined, Series.number_of_instances,
                         Series.thumbnail_key)
                  .where(Series.study_fk == row.id, Series.number_of_instances > 0)
                  .order_by(Series.series_number.is_(None), Series.series_number, Series.id))]
    return StudyDetail(_study_row(row, visible_report_status(principal, status)), row.patient_fk,
                       row.referring_physician_name, row.study_id, series)


def prior_studies(session: Session, principal: Principal, patient_fk: int, exclude: str) -> list[PriorRow]:
    """The other studies of the same person the principal may see, newest first: with the priors rule
    (:mod:`pacs.persons.scope`) every record of the person, else the same patient record."""
    scope = principal.scope
    records = same_person_records(session, [patient_fk])[patient_fk] if scope.linked_priors else {patient_fk}
    rows = session.execute(
        select(Study.study_instance_uid, Study.study_date, Study.modalities_in_study, Study.study_description,
               Study.facility)
        .where(Study.patient_fk.in_(sorted(records)), Study.study_instance_uid != exclude,
               study_condition(scope, hide_empty=True))
        .order_by(Study.study_date.desc(), Study.id.desc()).limit(MAX_PRIORS)).all()
    statuses = report_statuses(session, [r.study_instance_uid for r in rows])
    return [PriorRow(r.study_instance_uid, r.study_date, _modalities(r.modalities_in_study), r.study_description,
                     r.facility, visible_report_status(principal, statuses.get(r.study_instance_uid, "")))
            for r in rows]


# -- helpers ------------------------------------------------------------------------------------------------------


def page_statement(found: Search, limit: int, offset: int = 0) -> Select[int]:
    """The ids of one page: newest study date first (an index walk on the study date), then newest arrival."""
    return (select(Study.id).select_from(found.source).where(found.where)
            .order_by(Study.study_date.desc(), Study.id.desc()).limit(limit).offset(offset))


def count_statement(found: Search) -> Select[int, int]:
    """The number of matches and the newest one's id (what the "new studies" poll counts from), in one walk."""
    return select(func.count(Study.id), func.max(Study.id)).select_from(found.source).where(found.where)


def _row_columns() -> Any:
    return (select(Study.id, Study.study_instance_uid, Patient.patient_name, Patient.patient_id,
                   Patient.patient_birth_date, Patient.patient_sex, Study.study_date, Study.study_time,
                   Study.accession_number, Study.modalities_in_study, Study.study_description,
                   Study.number_of_series, Study.number_of_instances, Study.facility, Study.institution_name,
                   Study.thumbnail_key)
            .join(Patient, Patient.id == Study.patient_fk))


def _study_row(r: Any, status: str) -> StudyRow:
    return StudyRow(
        id=r.id, study_instance_uid=r.study_instance_uid, patient_name=r.patient_name or "",
        patient_id=r.patient_id or "", patient_birth_date=r.patient_birth_date or "",
        patient_sex=r.patient_sex or "", study_date=r.study_date or "", study_time=r.study_time or "",
        accession_number=r.accession_number or "", modalities=_modalities(r.modalities_in_study),
        description=r.study_description or "", number_of_series=r.number_of_series or 0,
        number_of_instances=r.number_of_instances or 0, facility=r.facility or "",
        institution_name=r.institution_name or "", report_status=status, has_thumbnail=bool(r.thumbnail_key))


def _modalities(value: str | None) -> tuple[str, ...]:
    return tuple(m for m in (value or "").split("\\") if m)


def _date(value: str, label: str) -> str:
    cleaned = value.strip().replace("-", "").replace("/", "")
    if not cleaned:
        return ""
    try:
        if len(cleaned) != 8 or not cleaned.isascii() or not cleaned.isdigit():
            raise ValueError(cleaned)
        date(int(cleaned[:4]), int(cleaned[4:6]), int(cleaned[6:8]))
    except ValueError:
        raise InvalidInput(f"invalid date ({label}) {value[:20]!r}: YYYY-MM-DD") from None
    return cleaned
