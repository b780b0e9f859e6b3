"""Derived work as operators see it (``pacs tasks``): counts by state, the failed rows, and retrying them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, String, and_, cast, func, or_, select, update
from sqlalchemy.orm import Session

from pacs.db.dml import affected_rows
from pacs.db.models import DerivedTask, Instance, Series, Study
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.jobs import JobState

if TYPE_CHECKING:
    from pacs.security.principal import AccessScope


@dataclass(frozen=True)
class FailedTask:
    id: int
    kind: str
    subject_uid: str
    attempts: int
    last_error: str
    updated_at: datetime


def counts(session: Session) -> dict[str, dict[str, int]]:
    """{kind: {state: count}}."""
    out: dict[str, dict[str, int]] = {}
    for kind, state, n in session.execute(
        select(DerivedTask.kind, DerivedTask.state, func.count()).group_by(DerivedTask.kind, DerivedTask.state)
    ):
        out.setdefault(kind, {})[state] = n
    return out


def _of_scope(scope: AccessScope) -> ColumnElement[bool]:
    """Tasks whose subject belongs to a study the scope owns, by the kind of subject: a thumbnail names an
    instance, a series document a series, a report SR ``{report id}.{version}``. A task names UIDs and its error,
    which an administrator of another facility has no business seeing."""
    from pacs.reports.lifecycle import REPORT_SR_KIND
    from pacs.reports.models import Report
    from pacs.security.access import study_condition

    own = study_condition(scope, borrowed=False)
    instance = (select(Instance.id).join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .where(Instance.sop_instance_uid == DerivedTask.subject_uid, own).exists())
    series = (select(Series.id).join(Study, Series.study_fk == Study.id)
              .where(Series.series_instance_uid == DerivedTask.subject_uid, own).exists())
    report = (select(Report.id).join(Study, Study.study_instance_uid == Report.study_instance_uid)
              .where(DerivedTask.subject_uid.startswith(cast(Report.id, String) + "."), own).exists())
    return or_(and_(DerivedTask.kind == INSTANCE_DERIVED_KIND, instance),
               and_(DerivedTask.kind == SERIES_METADATA_KIND, series),
               and_(DerivedTask.kind == REPORT_SR_KIND, report))


def failed(session: Session, limit: int = 1000, scope: AccessScope | None = None) -> list[FailedTask]:
    """The newest failed tasks; with a restricted ``scope``, only those of its own facility's studies."""
    stmt = select(DerivedTask).where(DerivedTask.state == JobState.FAILED)
    if scope is not None and not scope.unrestricted:
        stmt = stmt.where(_of_scope(scope))
    rows = session.scalars(stmt.order_by(DerivedTask.updated_at.desc()).limit(limit))
    return [FailedTask(r.id, r.kind, r.subject_uid, r.attempts, r.last_error, r.updated_at) for r in rows]


def retry(session: Session, ids: list[int] | None = None, scope: AccessScope | None = None) -> int:
    """Put failed rows (all, or those in ``ids``; with a restricted ``scope`` only its own facility's) back to
    pending; the outbox relay publishes them."""
    stmt = update(DerivedTask).where(DerivedTask.state == JobState.FAILED)
    if ids is not None:
        stmt = stmt.where(DerivedTask.id.in_(ids))
    if scope is not None and not scope.unrestricted:
        stmt = stmt.where(_of_scope(scope))
    return affected_rows(session, stmt.values(state=JobState.PENDING, attempts=0, last_error=""))
