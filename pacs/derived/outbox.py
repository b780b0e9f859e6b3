"""Outbox rows for derived work (thumbnails, metadata fragments, series documents), written in the transaction
that indexes the instance.

Ingest (:mod:`pacs.ingest.service`) and ``pacs reindex`` (:mod:`pacs.maintenance.reindex`) arm the rows; a relay
publishes them and the workers run them (:mod:`pacs.derived.relay`, :mod:`pacs.derived.runner`).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs.db.models import DerivedTask
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.jobs import JobState

INSTANCE_TASKS = (INSTANCE_DERIVED_KIND,)  # armed for each new current content of an instance
SERIES_TASKS = (SERIES_METADATA_KIND,)  # armed for the instance's series (one row per series, re-armed)


def arm_derived_tasks(session: Session, subject_uid: str, sha256: str, kinds: tuple[str, ...]) -> list[DerivedTask]:
    """Outbox rows for ``subject_uid``; an existing row (content that was current before, or a
    series already known) is re-armed instead of adding a second one."""
    existing = {t.kind: t for t in session.scalars(
        select(DerivedTask).where(DerivedTask.subject_uid == subject_uid, DerivedTask.sha256 == sha256,
                                  DerivedTask.kind.in_(kinds)))}
    tasks = []
    for kind in kinds:
        task = existing.get(kind)
        if task is None:
            task = DerivedTask(kind=kind, subject_uid=subject_uid, sha256=sha256)
            session.add(task)
        elif task.state in (JobState.DONE, JobState.FAILED):  # pending or queued rows will run and see the new state
            task.state, task.attempts, task.last_error = JobState.PENDING, 0, ""
        tasks.append(task)
    return tasks
