"""Derived work as operators see it (``pacs tasks``): counts by state, the failed rows, and retrying them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pacs.db.dml import affected_rows
from pacs.db.models import DerivedTask
from pacs.jobs import JobState


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


def failed(session: Session, limit: int = 1000) -> list[FailedTask]:
    rows = session.scalars(select(DerivedTask).where(DerivedTask.state == JobState.FAILED)
                           .order_by(DerivedTask.updated_at.desc()).limit(limit))
    return [FailedTask(r.id, r.kind, r.subject_uid, r.attempts, r.last_error, r.updated_at) for r in rows]


def retry(session: Session, ids: list[int] | None = None) -> int:
    """Put failed rows (all, or those in ``ids``) back to pending; the outbox relay publishes them."""
    stmt = update(DerivedTask).where(DerivedTask.state == JobState.FAILED)
    if ids is not None:
        stmt = stmt.where(DerivedTask.id.in_(ids))
    return affected_rows(session, stmt.values(state=JobState.PENDING, attempts=0, last_error=""))
