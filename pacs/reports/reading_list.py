"""The radiologist's reading list: studies with images and no signed report, most urgent first.

Queries over the index (study, patient), the order its images arrived for (linked by
:func:`pacs.ris.orders.link_study`), and the claim; the caller's access scope is the same SQL
condition every other read uses (:func:`pacs.security.access.study_condition`). Sorted by the
order's priority (STAT, URGENT, ROUTINE; a study with no order counts as ROUTINE), then by how long
it has waited. Patient, order, prior studies and the state of an unsigned report are looked up for
the page only; ``bench/reading_list.py`` measures it at 100,000 waiting studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TypeVarTuple

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from pacs.db.models import Patient, Study
from pacs.errors import InvalidInput
from pacs.persons.scope import same_person_records
from pacs.reports.models import SIGNED_STATES, Report, StudyClaim
from pacs.ris.models import PRIORITIES, PRIORITY_RANK, ROUTINE, ImagingOrder
from pacs.security.access import study_condition
from pacs.security.principal import AccessScope

MAX_LIMIT = 500
MAX_PRIORS = 5
UNCLAIMED = "-"  # ``assigned=-``: only studies nobody has claimed

_Columns = TypeVarTuple("_Columns")


@dataclass(frozen=True)
class ReadingFilters:
    modality: str = ""
    facility: str = ""
    priority: str = ""
    date_from: str = ""  # YYYYMMDD, study date
    date_to: str = ""
    assigned: str = ""  # a user name, or "-" for unclaimed


@dataclass(frozen=True)
class PriorStudy:
    study_instance_uid: str
    study_date: str
    modalities: str
    description: str
    report_status: str  # "" when it has no report
    facility: str = ""  # the facility the prior belongs to (a person's priors come from several: pacs.persons)


@dataclass(frozen=True)
class ReadingItem:
    study_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    facility: str
    accession_number: str
    study_date: str
    study_description: str
    modalities: str
    number_of_instances: int
    procedure: str
    priority: str
    received_at: datetime | None
    waiting_s: int
    claimed_by: str
    claimed_at: datetime | None
    report_status: str  # draft / preliminary when an unsigned report exists, else ""
    priors: tuple[PriorStudy, ...]


def reading_list(session: Session, scope: AccessScope, filters: ReadingFilters = ReadingFilters(), *,
                 limit: int = 50, offset: int = 0, now: datetime | None = None) -> tuple[list[ReadingItem], int]:
    """One page of the list and the total number of studies waiting (same filters and scope).

    The page is merged from two short ordered walks instead of sorting every waiting study: the few
    studies whose order is STAT or URGENT (through the order table), then the routine ones in arrival
    order (an index walk on ``study.created_at`` that stops after ``offset + limit`` rows).
    """
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise InvalidInput(f"limit must be 1-{MAX_LIMIT} and offset ≥ 0")
    conditions = _conditions(scope, filters)
    total = _count(session, conditions, filters)
    want = offset + limit
    wanted_rank = PRIORITY_RANK[_priority(filters.priority)] if filters.priority else None
    picked: list[tuple[int, int]] = []  # (study id, rank)
    if wanted_rank is None or wanted_rank < PRIORITY_RANK[ROUTINE]:
        urgent = (select(Study.id, ImagingOrder.priority_rank)
                  .join(ImagingOrder, ImagingOrder.linked_study_instance_uid == Study.study_instance_uid)
                  .where(ImagingOrder.priority_rank < PRIORITY_RANK[ROUTINE], *conditions))
        if wanted_rank is not None:
            urgent = urgent.where(ImagingOrder.priority_rank == wanted_rank)
        urgent = _claim_filter(urgent, filters)
        seen: set[int] = set()
        for study_id, rank in session.execute(urgent.order_by(ImagingOrder.priority_rank, Study.created_at,
                                                              Study.id).limit(want)):
            if study_id not in seen:
                seen.add(study_id)
                picked.append((study_id, rank))
    if len(picked) < want and (wanted_rank is None or wanted_rank == PRIORITY_RANK[ROUTINE]):
        routine = _claim_filter(select(Study.id).where(~_urgent_order(), *conditions), filters)
        picked += [(study_id, PRIORITY_RANK[ROUTINE]) for study_id in session.scalars(
            routine.order_by(Study.created_at, Study.id).limit(want - len(picked)))]
    page_ids = [study_id for study_id, _ in picked[offset:want]]
    return _items(session, scope, page_ids, now or datetime.now(UTC)), total


def _count(session: Session, conditions: list[ColumnElement[bool]], filters: ReadingFilters) -> int:
    """The total, joining only what the filters need (the order for a priority, the claim for an assignee)."""
    stmt = select(func.count(Study.id)).where(*conditions)
    if filters.priority:
        rank = PRIORITY_RANK[_priority(filters.priority)]
        stmt = stmt.where(_urgent_order(rank) if rank < PRIORITY_RANK[ROUTINE] else ~_urgent_order())
    return session.scalar(_claim_filter(stmt, filters)) or 0


def _urgent_order(rank: int | None = None) -> ColumnElement[bool]:
    """The study fulfils a STAT or URGENT order (or exactly ``rank``)."""
    condition = (ImagingOrder.priority_rank == rank if rank is not None
                 else ImagingOrder.priority_rank < PRIORITY_RANK[ROUTINE])
    return exists().where(ImagingOrder.linked_study_instance_uid == Study.study_instance_uid, condition)


def _claim_filter(stmt: Select[*_Columns], filters: ReadingFilters) -> Select[*_Columns]:
    if filters.assigned == UNCLAIMED:
        return stmt.where(~exists().where(StudyClaim.study_instance_uid == Study.study_instance_uid))
    if filters.assigned:
        return stmt.where(exists().where(StudyClaim.study_instance_uid == Study.study_instance_uid,
                                         StudyClaim.claimed_by == filters.assigned.strip()))
    return stmt


def _items(session: Session, scope: AccessScope, study_ids: list[int], now: datetime) -> list[ReadingItem]:
    """The page's rows with patient, order and claim, in the page's order."""
    if not study_ids:
        return []
    rows = {r.id: r for r in session.execute(
        select(Study.id, Study.study_instance_uid, Study.patient_fk, Patient.patient_id, Patient.patient_name,
               Patient.patient_birth_date, Patient.patient_sex, Study.facility, Study.accession_number,
               Study.study_date, Study.study_description, Study.modalities_in_study, Study.number_of_instances,
               Study.created_at, StudyClaim.claimed_by, StudyClaim.claimed_at)
        .join(Patient, Patient.id == Study.patient_fk)
        .outerjoin(StudyClaim, StudyClaim.study_instance_uid == Study.study_instance_uid)
        .where(Study.id.in_(study_ids)))}
    uids = [rows[i].study_instance_uid for i in study_ids if i in rows]
    orders: dict[str, tuple[int, str, str]] = {}
    for uid, rank, priority, procedure in session.execute(
            select(ImagingOrder.linked_study_instance_uid, ImagingOrder.priority_rank, ImagingOrder.priority,
                   ImagingOrder.requested_procedure_description)
            .where(ImagingOrder.linked_study_instance_uid.in_(uids)).order_by(ImagingOrder.id)):
        if uid not in orders or rank < orders[uid][0]:
            orders[uid] = (rank, priority, procedure)
    unsigned = _unsigned_status(session, uids)
    priors = _priors(session, scope, {rows[i].patient_fk for i in study_ids if i in rows})
    items = []
    for study_id in study_ids:
        r = rows.get(study_id)
        if r is None:
            continue
        received = _utc(r.created_at)
        _, priority, procedure = orders.get(r.study_instance_uid, (0, ROUTINE, ""))
        items.append(ReadingItem(
            study_instance_uid=r.study_instance_uid, patient_id=r.patient_id, patient_name=r.patient_name,
            patient_birth_date=r.patient_birth_date, patient_sex=r.patient_sex, facility=r.facility,
            accession_number=r.accession_number, study_date=r.study_date, study_description=r.study_description,
            modalities=r.modalities_in_study, number_of_instances=r.number_of_instances,
            procedure=procedure or r.study_description, priority=priority,
            received_at=received, waiting_s=max(0, int((now - received).total_seconds())) if received else 0,
            claimed_by=r.claimed_by or "", claimed_at=_utc(r.claimed_at),
            report_status=unsigned.get(r.study_instance_uid, ""),
            priors=tuple(p for p in priors.get(r.patient_fk, ()) if p.study_instance_uid != r.study_instance_uid
                         )[:MAX_PRIORS],
        ))
    return items


def _conditions(scope: AccessScope, filters: ReadingFilters) -> list[ColumnElement[bool]]:
    """Conditions on the study alone: has images, no signed report, in scope, the simple filters."""
    signed = exists().where(Report.study_instance_uid == Study.study_instance_uid,
                            Report.status.in_(SIGNED_STATES))
    # other facilities' studies seen as a person's priors are shown as priors, and a study under an open consult
    # is the consult's (its inbox), never work to read here: the facility's own and shared studies only
    conditions = [Study.number_of_instances > 0, ~signed, study_condition(scope, borrowed=False)]
    if filters.modality:
        modality = filters.modality.strip().upper()
        if not modality.isalnum() or len(modality) > 16:
            raise InvalidInput(f"invalid modality {filters.modality!r}")
        # a multi-valued column, values joined by backslashes (a literal one: "!" is the LIKE escape here)
        conditions.append(or_(Study.modalities_in_study == modality,
                              Study.modalities_in_study.like(f"{modality}\\%", escape="!"),
                              Study.modalities_in_study.like(f"%\\{modality}", escape="!"),
                              Study.modalities_in_study.like(f"%\\{modality}\\%", escape="!")))
    if filters.facility:
        conditions.append(Study.facility == filters.facility.strip())
    if filters.priority:
        _priority(filters.priority)
    if filters.date_from:
        conditions.append(and_(Study.study_date != "", Study.study_date >= _date(filters.date_from)))
    if filters.date_to:
        conditions.append(and_(Study.study_date != "", Study.study_date <= _date(filters.date_to)))
    return conditions


def _priority(value: str) -> str:
    priority = value.strip().upper()
    if priority not in PRIORITIES:
        raise InvalidInput(f"invalid priority {value!r}: one of {', '.join(PRIORITIES)}")
    return priority


def _unsigned_status(session: Session, uids: list[str]) -> dict[str, str]:
    if not uids:
        return {}
    out: dict[str, str] = {}
    for uid, status in session.execute(select(Report.study_instance_uid, Report.status).where(
            Report.study_instance_uid.in_(uids)).order_by(Report.id)):
        out[uid] = status
    return out


def _priors(session: Session, scope: AccessScope, patient_fks: set[int]) -> dict[int, list[PriorStudy]]:
    """Other studies of the same patients (newest first), within the caller's scope: with the priors rule
    (pacs.persons.scope), the studies of every record of the patient's person, each with its facility."""
    if not patient_fks:
        return {}
    records = same_person_records(session, patient_fks) if scope.linked_priors else {p: {p} for p in patient_fks}
    wanted = sorted(set().union(*records.values()))
    signed = (select(Report.status).where(Report.study_instance_uid == Study.study_instance_uid)
              .order_by(Report.id.desc()).limit(1).scalar_subquery())
    found: dict[int, list[PriorStudy]] = {}
    for r in session.execute(select(Study.patient_fk, Study.study_instance_uid, Study.study_date,
                                    Study.modalities_in_study, Study.study_description, signed.label("status"),
                                    Study.facility)
                             .where(Study.patient_fk.in_(wanted), study_condition(scope, hide_empty=True))
                             .order_by(Study.study_date.desc(), Study.id.desc())):
        found.setdefault(r.patient_fk, []).append(PriorStudy(r.study_instance_uid, r.study_date,
                                                             r.modalities_in_study, r.study_description,
                                                             r.status or "", r.facility))
    out: dict[int, list[PriorStudy]] = {}
    for pk, linked in records.items():
        merged = [p for record in linked for p in found.get(record, [])]
        out[pk] = sorted(merged, key=lambda p: p.study_date, reverse=True)
    return out


def _date(value: str) -> str:
    cleaned = value.strip().replace("-", "")
    try:
        date(int(cleaned[:4]), int(cleaned[4:6]), int(cleaned[6:8]))
    except ValueError as exc:
        raise InvalidInput(f"invalid date {value!r}: YYYYMMDD or YYYY-MM-DD") from exc
    if len(cleaned) != 8:
        raise InvalidInput(f"invalid date {value!r}: YYYYMMDD or YYYY-MM-DD")
    return cleaned


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
