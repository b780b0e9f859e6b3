"""Outbox rows for derived work (thumbnails, metadata fragments, series documents), written in the transaction
that indexes the instance.

Ingest (:mod:`pacs.ingest.service`) and ``pacs reindex`` (:mod:`pacs.maintenance.reindex`) arm the rows; a relay
publishes them and the workers run them (:mod:`pacs.derived.relay`, :mod:`pacs.derived.runner`).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from pacs.db.models import DerivedTask
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.jobs import JobState

INSTANCE_TASKS = (INSTANCE_DERIVED_KIND,)  # armed for each new current content of an instance
SERIES_TASKS = (SERIES_METADATA_KIND,)  # armed for the instance's series (one row per series, re-armed)


_task_t = cast(Table, DerivedTask.__table__)
_task = _task_t.c
# prebuilt on the table: ingest arms rows for every object it indexes (issue 13)
_ARMED = (select(_task.id, _task.kind, _task.state)
          .where(_task.subject_uid == bindparam("subject"), _task.sha256 == bindparam("sha"),
                 _task.kind.in_(bindparam("kinds", expanding=True))))
_REARM = (update(_task_t).where(_task.id == bindparam("task_id"))
          .values(state=JobState.PENDING, attempts=0, last_error="", updated_at=func.now()))
_ADD = insert(_task_t)


def arm_derived_tasks(session: Session, subject_uid: str, sha256: str, kinds: tuple[str, ...]) -> list[int]:
    """Outbox rows for ``subject_uid`` (their ids); an existing row (content that was current before, or a
    series already known) is re-armed instead of adding a second one."""
    existing = {kind: (task_id, state) for task_id, kind, state in session.execute(
        _ARMED, {"subject": subject_uid, "sha": sha256, "kinds": list(kinds)})}
    ids = []
    for kind in kinds:
        found = existing.get(kind)
        if found is None:
            result = cast(CursorResult[Any], session.execute(_ADD, {
                "kind": kind, "subject_uid": subject_uid, "sha256": sha256, "state": JobState.PENDING,
                "attempts": 0, "last_error": "", "owner": "", "crashes": 0}))
            ids.append(int(result.inserted_primary_key[0]))  # type: ignore[index]  # one row inserted: never None
            continue
        task_id, state = found
        if state in (JobState.DONE, JobState.FAILED):  # pending or queued rows will run and see the new state
            session.execute(_REARM, {"task_id": task_id})
        ids.append(task_id)
    return ids
