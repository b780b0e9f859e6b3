"""Study completeness: the instances the index holds per series against what the modality announced by MPPS.

A modality that sends MPPS lists, when it completes (or discontinues) a step, every series it made and, in each
series' Referenced Image Sequence (and Referenced Non-Image Composite SOP Instance Sequence), every object
(:mod:`pacs.ris.mpps` keeps the count per series in ``performed_series`` and the whole N-SET as DICOM JSON).
A technologist compares that with what arrived: per series, received (current instances in the index), rejected
(received, then rejected by a person: not missing), announced, and which SOP Instance UIDs are missing.

The steps of a study: those whose Study Instance UID is the study's (the worklist handed it to the modality),
those of the order the study was linked to (:func:`pacs.ris.orders.link_study`), and those that name one of the
study's series. Visibility is the reader's (:func:`pacs.security.access.study_condition`): an unknown study and
one outside the principal's scope are both :class:`NotFound`. The caller audits the read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from pacs.db.models import Instance, Patient, Series, Study
from pacs.errors import NotFound
from pacs.ris.models import STEP_IN_PROGRESS, ImagingOrder, PerformedProcedureStep, PerformedSeries
from pacs.security.access import owned_study_condition, study_condition
from pacs.security.principal import Principal
from pacs.studies.common import chunks
from pacs.studies.models import RejectedInstance

COMPLETE = "complete"
MISSING = "missing"
NO_MPPS = "no-mpps"
IN_PROGRESS = "in-progress"  # the modality has not finished: what it announced so far may grow
MAX_LISTED_MISSING = 50  # missing SOP Instance UIDs listed per series (the count is always exact)

_PERFORMED_SERIES = "00400340"
_SERIES_UID = "0020000E"
_REFERENCED = ("00081140", "00400220")  # Referenced Image Sequence, Referenced Non-Image Composite SOP Instance Seq.
_REFERENCED_SOP = "00081155"


@dataclass(frozen=True)
class StudyHeader:
    """The study as a page shows it above its series."""

    study_instance_uid: str
    patient_name: str
    patient_id: str
    issuer_of_patient_id: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    study_date: str
    study_description: str
    modalities: str
    facility: str
    number_of_instances: int


@dataclass(frozen=True)
class SeriesCompleteness:
    series_instance_uid: str
    series_number: int | None
    modality: str
    description: str
    received: int  # current instances in the index
    rejected: int  # received, then rejected (IOCM), not deleted
    announced: int | None  # None: no MPPS names this series
    missing_uids: tuple[str, ...] = ()  # at most MAX_LISTED_MISSING of them

    @property
    def missing(self) -> int:
        if self.announced is None:
            return 0
        return max(self.announced - self.received - self.rejected, 0)

    @property
    def state(self) -> str:
        if self.announced is None:
            return NO_MPPS
        return MISSING if self.missing else COMPLETE


@dataclass(frozen=True)
class StepSummary:
    sop_instance_uid: str
    state: str
    station: str
    modality: str
    start: str
    end: str


@dataclass(frozen=True)
class StudyCompleteness:
    header: StudyHeader
    series: list[SeriesCompleteness] = field(default_factory=list)
    steps: list[StepSummary] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.series)

    @property
    def state(self) -> str:
        """no-mpps, in-progress (a step still running), missing (N objects short) or complete."""
        if not self.steps:
            return NO_MPPS
        if any(s.state == STEP_IN_PROGRESS for s in self.steps):
            return IN_PROGRESS
        return MISSING if self.missing else COMPLETE


def study_header(session: Session, principal: Principal, study_uid: str, *, owned: bool = False) -> StudyHeader:
    """The study's patient and study attributes; NotFound when unknown or outside the principal's scope
    (``owned``: only a study the principal may change, :func:`owned_study_condition`)."""
    condition = owned_study_condition(principal.scope) if owned else study_condition(principal.scope)
    row = session.execute(select(Study, Patient).join(Patient, Patient.id == Study.patient_fk)
                          .where(Study.study_instance_uid == study_uid, condition)).one_or_none()
    if row is None:
        raise NotFound(f"no study {study_uid}")
    study, patient = row
    return StudyHeader(study.study_instance_uid, patient.patient_name, patient.patient_id,
                       patient.issuer_of_patient_id, patient.patient_birth_date, patient.patient_sex,
                       study.accession_number, study.study_date, study.study_description, study.modalities_in_study,
                       study.facility, study.number_of_instances)


def study_completeness(session: Session, principal: Principal, study_uid: str, *,
                       owned: bool = False) -> StudyCompleteness:
    """Per series: received, rejected and announced instances, with the missing UIDs (see the module docstring)."""
    header = study_header(session, principal, study_uid, owned=owned)
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    series_rows = session.execute(
        select(Series.id, Series.series_instance_uid, Series.series_number, Series.modality,
               Series.series_description).where(Series.study_fk == study_id)).all()
    received = dict(session.execute(select(Instance.series_fk, func.count()).where(
        Instance.series_fk.in_([r.id for r in series_rows] or [-1])).group_by(Instance.series_fk)).all())
    rejected = dict(session.execute(select(RejectedInstance.series_instance_uid, func.count()).where(
        RejectedInstance.study_instance_uid == study_uid).group_by(RejectedInstance.series_instance_uid)).all())
    series_uids = [r.series_instance_uid for r in series_rows]
    steps = _steps(session, study_uid, series_uids)
    announced, described = _announced(session, [s.id for s in steps])
    referenced = _referenced(steps)
    out: list[SeriesCompleteness] = []
    known = set()
    for r in sorted(series_rows, key=lambda r: (r.series_number is None, r.series_number or 0, r.id)):
        known.add(r.series_instance_uid)
        out.append(SeriesCompleteness(
            r.series_instance_uid, r.series_number, r.modality,
            r.series_description or described.get(r.series_instance_uid, ""), received.get(r.id, 0),
            rejected.get(r.series_instance_uid, 0), announced.get(r.series_instance_uid),
            _missing_uids(session, referenced.get(r.series_instance_uid, ()))))
    for uid in sorted(set(announced) - known):  # announced by the modality, not one object of it arrived
        out.append(SeriesCompleteness(uid, None, "", described.get(uid, ""), 0, rejected.get(uid, 0),
                                      announced[uid], _missing_uids(session, referenced.get(uid, ()))))
    summaries = [StepSummary(s.sop_instance_uid, s.state, s.performed_station_ae_title, s.modality,
                             f"{s.start_date} {s.start_time}".strip(), f"{s.end_date} {s.end_time}".strip())
                 for s in steps]
    return StudyCompleteness(header, out, summaries)


def _steps(session: Session, study_uid: str, series_uids: list[str]) -> list[PerformedProcedureStep]:
    linked_orders = select(ImagingOrder.id).where(ImagingOrder.linked_study_instance_uid == study_uid)
    conditions = [PerformedProcedureStep.study_instance_uid == study_uid,
                  PerformedProcedureStep.order_fk.in_(linked_orders)]
    for part in chunks(series_uids):
        conditions.append(PerformedProcedureStep.id.in_(
            select(PerformedSeries.step_fk).where(PerformedSeries.series_instance_uid.in_(part))))
    return list(session.scalars(select(PerformedProcedureStep).where(or_(*conditions))
                                .order_by(PerformedProcedureStep.id)))


def _announced(session: Session, step_ids: list[int]) -> tuple[dict[str, int], dict[str, str]]:
    """Objects announced per series (the largest count when several steps name one series), and descriptions."""
    counts: dict[str, int] = {}
    described: dict[str, str] = {}
    if not step_ids:
        return counts, described
    for uid, images, description in session.execute(
            select(PerformedSeries.series_instance_uid, PerformedSeries.number_of_images,
                   PerformedSeries.series_description).where(PerformedSeries.step_fk.in_(step_ids))):
        counts[uid] = max(counts.get(uid, 0), images)
        described.setdefault(uid, description)
    return counts, described


def _referenced(steps: list[PerformedProcedureStep]) -> dict[str, tuple[str, ...]]:
    """SOP Instance UIDs each series' announcement references: from the last N-SET that carried a Performed
    Series Sequence (an N-SET replaces the sequence), else the N-CREATE."""
    out: dict[str, set[str]] = {}
    for step in steps:
        sequence = _last_performed_series(step)
        for item in sequence:
            uid = _first(item.get(_SERIES_UID))
            if not uid:
                continue
            for tag in _REFERENCED:
                for ref in (item.get(tag) or {}).get("Value") or []:
                    sop = _first(ref.get(_REFERENCED_SOP)) if isinstance(ref, dict) else ""
                    if sop:
                        out.setdefault(uid, set()).add(sop)
    return {uid: tuple(sorted(sops)) for uid, sops in out.items()}


def _last_performed_series(step: PerformedProcedureStep) -> list[dict[str, Any]]:
    try:
        sets = json.loads(step.n_set_json or "[]")
        created = json.loads(step.n_create_json or "{}")
    except ValueError:
        return []
    for attributes in [*reversed(sets if isinstance(sets, list) else []), created]:
        if isinstance(attributes, dict) and _PERFORMED_SERIES in attributes:
            value = (attributes[_PERFORMED_SERIES] or {}).get("Value") or []
            return [item for item in value if isinstance(item, dict)]
    return []


def _first(element: Any) -> str:
    values = (element or {}).get("Value") if isinstance(element, dict) else None
    return str(values[0]).strip() if values else ""


def _missing_uids(session: Session, referenced: tuple[str, ...]) -> tuple[str, ...]:
    if not referenced:
        return ()
    present: set[str] = set()
    for part in chunks(list(referenced)):
        present.update(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(part))))
        present.update(session.scalars(select(RejectedInstance.sop_instance_uid)
                                       .where(RejectedInstance.sop_instance_uid.in_(part))))
    return tuple(uid for uid in referenced if uid not in present)[:MAX_LISTED_MISSING]
