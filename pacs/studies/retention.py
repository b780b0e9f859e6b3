"""Retention: rejected instances deleted after their per-reason retention, and studies due under a facility's policy.

- **Rejected instances** (``PACS_REJECTION_RETENTION_DAYS``, days per IOCM reason): :func:`sweep_rejected`
  deletes those whose ``rejected_at`` plus their reason's retention has passed, a batch per transaction, through
  :func:`pacs.studies.deletion.remove_rejected_rows` (a conditional DELETE … RETURNING: two processes sweeping
  at once delete each row once). :class:`RetentionSweeper` runs it every ``PACS_RETENTION_SWEEP_S`` in the
  embedded ``pacs serve`` and in ``pacs worker``; ``pacs retention sweep`` runs it now. It never removes a study
  row: a study it empties stays with its reports, consults, share links and orders (hidden from image queries);
  only an explicit deletion (or a confirmed study retention, below) removes a study. The same pass retries
  tombstoned objects left pending and forgets gone tombstones after a day (:mod:`pacs.studies.tombstones`).
- **Studies** (``PACS_STUDY_RETENTION_YEARS``, years per facility, ``*`` for the others): a study is due when
  its study date (or, without one, the day it was received) is older than its facility's retention. Nothing is
  deleted by itself: :func:`list_due` shows what is due (audited: it shows patient data), and
  :func:`delete_due` deletes the studies an admin confirms, each checked again to be due inside its deletion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import ColumnElement, and_, false, func, or_, select, true
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacs import audit
from pacs.context import AppContext
from pacs.db.models import Patient, Study
from pacs.errors import InvalidInput, PacsError
from pacs.polling import PollingLoop
from pacs.security.access import authorize, owned_study_condition
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.settings import Settings
from pacs.studies import deletion
from pacs.studies.common import check_reason, refusals_audited
from pacs.studies.models import RejectedInstance

log = logging.getLogger(__name__)

SWEEP_BATCH = 200
ANY_FACILITY = "*"


# -- rejected instances past their retention -----------------------------------------------------------------

@dataclass
class SweepResult:
    deleted: list[deletion.RejectedDeletion] = field(default_factory=list)
    objects_deleted: int = 0

    @property
    def instances(self) -> int:
        return sum(len(item.sop_instance_uids) for item in self.deleted)


def expired_condition(settings: Settings, now: datetime) -> ColumnElement[bool]:
    """Rejected instances whose reason's retention has passed at ``now`` (-1: never by the sweep)."""
    parts = [and_(RejectedInstance.reason == reason, RejectedInstance.rejected_at <= now - timedelta(days=days))
             for reason, days in sorted(settings.rejection_retention_days.items()) if days >= 0]
    return or_(*parts) if parts else false()


def sweep_rejected(ctx: AppContext, *, now: datetime | None = None, batch_size: int = SWEEP_BATCH,
                   max_batches: int | None = None) -> SweepResult:
    """Delete every rejected instance past its retention, ``batch_size`` rows per transaction (each audited as
    ``instance.delete`` by ``system:retention``, one row per study), the objects after each commit."""
    result = SweepResult()
    batches = 0
    while max_batches is None or batches < max_batches:
        moment = now or datetime.now(UTC)
        expired = expired_condition(ctx.settings, moment)
        cleanup = deletion.StoreCleanup()
        with ctx.read_sessions() as session:  # a pass with nothing due takes no write lock
            ids = list(session.scalars(select(RejectedInstance.id).where(expired)
                                       .order_by(RejectedInstance.rejected_at, RejectedInstance.id)
                                       .limit(batch_size)))
        if not ids:
            break
        with ctx.sessions() as session, session.begin():
            # conditional: a row restored or deleted by another process meanwhile is simply not returned
            deleted = deletion.remove_rejected_rows(session, and_(RejectedInstance.id.in_(ids), expired), cleanup)
            deletion.audit_rejected_deletion(session, None, deleted.values(), "retention expired")
        deletion.delete_objects(ctx, cleanup)
        result.deleted.extend(deleted.values())
        result.objects_deleted += cleanup.deleted
        batches += 1
        if len(ids) < batch_size:
            break
    try:
        result.objects_deleted += deletion.sweep_tombstones(ctx, now=now)
    except SQLAlchemyError as exc:  # the next pass tries again
        log.warning("retention: could not sweep the tombstones of deleted objects: %s", str(exc).splitlines()[0])
    if result.deleted:
        log.info("retention: deleted %d rejected instance(s) of %d stud(ies)", result.instances, len(result.deleted))
    return result


@dataclass(frozen=True)
class SweeperConfig:
    poll_s: float


class RetentionSweeper(PollingLoop):
    """Runs :func:`sweep_rejected` every ``PACS_RETENTION_SWEEP_S`` (at once when started). Several processes
    may run one against the same index: each row is deleted by exactly one of them."""

    what = "retention sweep"

    def __init__(self, ctx: AppContext) -> None:
        super().__init__("pacs-retention")
        self._ctx = ctx
        self.config = SweeperConfig(poll_s=ctx.settings.retention_sweep_s)

    def run_once(self) -> bool:
        result = sweep_rejected(self._ctx, max_batches=1)
        return result.instances >= SWEEP_BATCH  # a full batch: more may be due, go on at once

    def start(self) -> RetentionSweeper:
        super().start()
        log.info("retention: sweeping rejected instances every %gs", self.config.poll_s)
        return self


# -- studies due under their facility's retention ----------------------------------------------------------------

def _years_ago(today: date, years: int) -> date:
    try:
        return today.replace(year=today.year - years)
    except ValueError:  # 29 February
        return today.replace(year=today.year - years, day=28)


def due_condition(settings: Settings, today: date) -> ColumnElement[bool]:
    """Studies past their facility's retention on ``today``: study date (YYYYMMDD) before the cut-off, or no study
    date and received before it. Facilities with 0 years (and all when nothing is configured) are never due."""
    policy = settings.study_retention_years
    named = [name for name in policy if name != ANY_FACILITY]
    parts: list[ColumnElement[bool]] = []

    def older_than(years: int) -> ColumnElement[bool]:
        cutoff = _years_ago(today, years)
        received_cutoff = datetime(cutoff.year, cutoff.month, cutoff.day, tzinfo=UTC)
        return or_(and_(Study.study_date != "", Study.study_date < cutoff.strftime("%Y%m%d")),
                   and_(Study.study_date == "", Study.created_at < received_cutoff))

    for name in named:
        if policy[name] > 0:
            parts.append(and_(Study.facility == name, older_than(policy[name])))
    default = policy.get(ANY_FACILITY, 0)
    if default > 0:
        parts.append(and_(Study.facility.not_in(named) if named else true(),
                          older_than(default)))
    return or_(*parts) if parts else false()


def years_for(settings: Settings, facility: str) -> int:
    """The retention (years, 0: forever) of ``facility``'s studies."""
    policy = settings.study_retention_years
    if facility != ANY_FACILITY and facility in policy:
        return policy[facility]
    return policy.get(ANY_FACILITY, 0)


@dataclass(frozen=True)
class DueStudy:
    study_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    facility: str
    study_date: str
    received_at: datetime | None
    accession_number: str
    description: str
    modalities: str
    series: int
    instances: int
    rejected: int
    retention_years: int

    def as_dict(self) -> dict[str, object]:
        return {"study_instance_uid": self.study_instance_uid,
                "patient": {"id": self.patient_id, "name": self.patient_name, "birth_date": self.patient_birth_date},
                "facility": self.facility, "study_date": self.study_date,
                "received_at": self.received_at.isoformat() if self.received_at else None,
                "accession_number": self.accession_number, "description": self.description,
                "modalities": [m for m in self.modalities.split("\\") if m], "series": self.series,
                "instances": self.instances, "rejected_instances": self.rejected,
                "retention_years": self.retention_years}


@dataclass(frozen=True)
class DuePage:
    total: int
    items: list[DueStudy]


def list_due(ctx: AppContext, principal: Principal, *, facility: str | None = None, limit: int = 100,
             offset: int = 0, today: date | None = None) -> DuePage:
    """Studies due under the retention policy that ``principal`` may delete, oldest first; audited
    (``retention.list``: it shows patient data)."""
    action = "retention.list"
    with refusals_audited(ctx, principal, action):
        authorize(principal, Capability.STUDY_DELETE)
        if not 1 <= limit <= 1000 or offset < 0:
            raise InvalidInput("limit is 1-1000 and offset 0 or more")
        today = today or datetime.now(UTC).date()
        condition = and_(due_condition(ctx.settings, today), owned_study_condition(principal.scope))
        if facility:
            condition = and_(condition, Study.facility == facility)
        rejected = (select(func.count(RejectedInstance.id))
                    .where(RejectedInstance.study_instance_uid == Study.study_instance_uid).scalar_subquery())
        with ctx.read_sessions() as session:
            total = session.scalar(select(func.count(Study.id)).where(condition)) or 0
            rows = session.execute(
                select(Study, Patient, rejected).join(Patient, Patient.id == Study.patient_fk).where(condition)
                .order_by(Study.study_date, Study.created_at, Study.id).limit(limit).offset(offset)).all()
            items = [DueStudy(s.study_instance_uid, p.patient_id, p.patient_name, p.patient_birth_date, s.facility,
                              s.study_date, s.created_at, s.accession_number, s.study_description,
                              s.modalities_in_study, s.number_of_series, s.number_of_instances, n or 0,
                              years_for(ctx.settings, s.facility))
                     for s, p, n in rows]
    audit.record(ctx.sessions, action=action, actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address,
                 detail=f"{len(items)} of {total} due stud(ies) listed (facility={facility or 'all'} offset={offset})"
                        + (f": {','.join(i.study_instance_uid for i in items[:20])}" if items else ""))
    return DuePage(total, items)


@dataclass
class DueDeletion:
    deleted: list[deletion.StudyDeletion] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (study uid, why)


def delete_due(ctx: AppContext, principal: Principal, study_uids: list[str], reason: str | None, *,
               today: date | None = None) -> DueDeletion:
    """Delete the confirmed studies that are really due (each checked again inside its own deletion); the others
    are refused and listed with why. Each deletion and each refusal is audited (``study.delete``)."""
    with refusals_audited(ctx, principal, "study.delete", "", "policy=retention "):
        authorize(principal, Capability.STUDY_DELETE)
        why = check_reason(reason, "deletion")
        if not study_uids:
            raise InvalidInput("name the studies to delete (studies)")
        if len(study_uids) > 1000:
            raise InvalidInput("at most 1000 studies per request")
    today = today or datetime.now(UTC).date()
    due = due_condition(ctx.settings, today)

    def still_due(session: Session, study: Study) -> None:
        if session.scalar(select(Study.id).where(Study.id == study.id, due)) is None:
            years = years_for(ctx.settings, study.facility)
            raise InvalidInput(f"study {study.study_instance_uid} is not due for deletion (facility "
                               f"{study.facility or '-'}: {f'{years} years' if years else 'kept forever'})")

    result = DueDeletion()
    for uid in dict.fromkeys(study_uids):
        try:
            done = deletion.delete_study(ctx, principal, uid, why, check=still_due, policy="policy=retention")
        except PacsError as exc:
            result.refused.append((uid, str(exc)))
            continue
        result.deleted.append(done)
    return result
