"""Outbox rows for derived work (thumbnails, metadata fragments, series documents), written in the transaction
that indexes the instance.

Ingest (:mod:`pacs.ingest.service`) and ``pacs reindex`` (:mod:`pacs.maintenance.reindex`) arm the rows; a relay
publishes them and the workers run them (:mod:`pacs.derived.relay`, :mod:`pacs.derived.runner`).
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection, Table, and_, bindparam, func, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from pacs.db.models import DerivedTask, Instance, Series
from pacs.db.prepared import Prepared
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
          .values(state=JobState.PENDING, attempts=0, crashes=0, last_error="", updated_at=func.now()))
_MADE = (update(_task_t).where(_task.id == bindparam("task_id"))
         .values(state=JobState.DONE, last_error="", updated_at=func.now()))
_ADD = insert(_task_t)
# the rows of both subjects ingest arms (arm_ingested): each branch one lookup on the unique (kind, subject, sha256)
_ARMED_AT_INGEST = Prepared(  # on the driver's cursor (pacs.db.prepared)
    select(_task.id, _task.subject_uid, _task.sha256, _task.kind, _task.state)
    .where(or_(*(and_(_task.kind == kind, _task.subject_uid == bindparam(subject), _task.sha256 == sha)
                 for kinds, subject, sha in ((INSTANCE_TASKS, "sop", bindparam("sha")),
                                             (SERIES_TASKS, "series", literal("")))
                 for kind in kinds))))


def arm_derived_tasks(session: Session, subject_uid: str, sha256: str, kinds: tuple[str, ...], *,
                      newly_armed_only: bool = False, made: bool = False) -> list[int]:
    """Outbox rows for ``subject_uid`` (their ids); an existing row (content that was current before, or a
    series already known) is re-armed instead of adding a second one.

    ``newly_armed_only``: leave out the ids of rows that were already pending, queued or running. Ingest notifies
    the relay of the ids it gets, and a series row re-armed by each of its 500 instances needs publishing once:
    a queued or running row sees the new instances when it runs, and a pending one is published by the relay's
    sweep (saves the relay a claim transaction per received instance, issue 13).

    ``made``: the work is done already (:func:`record_fragment_made`): a new row is added, and a done or failed one
    recorded, as done instead of pending."""
    connection = session.connection()  # prebuilt Core statements, no ORM (issue 13)
    existing = {(subject_uid, sha256, kind): (task_id, state) for task_id, kind, state in connection.execute(
        _ARMED, {"subject": subject_uid, "sha": sha256, "kinds": list(kinds)})}
    return _arm(connection, existing, subject_uid, sha256, kinds, newly_armed_only=newly_armed_only, made=made)


def record_fragment_made(session: Session, sop_uid: str, sha256: str) -> None:
    """Ingest made this instance version's fragment itself (:mod:`pacs.ingest.fragment`): its instance row is
    recorded done (readers take the fragment as current) instead of armed. A row already pending or running for
    the same content is left to run: it writes the same fragment."""
    arm_derived_tasks(session, sop_uid, sha256, (INSTANCE_DERIVED_KIND,), made=True)


def arm_ingested(session: Session, sop_uid: str, sha256: str, series_uid: str, *, fragment_made: bool) -> list[int]:
    """Ingest's outbox rows for a new current version of an instance, read in one statement: the instance's
    (:func:`record_fragment_made` when ``fragment_made``, else armed) and its series' (armed, its id only when
    newly armed); the ids to hand to the relay."""
    connection = session.connection()
    existing = {(subject, sha, kind): (task_id, state) for task_id, subject, sha, kind, state in _ARMED_AT_INGEST.all(
        connection, {"sop": sop_uid, "sha": sha256, "series": series_uid})}
    tasks = _arm(connection, existing, sop_uid, sha256, INSTANCE_TASKS, made=fragment_made)
    return ([] if fragment_made else tasks) + _arm(connection, existing, series_uid, "", SERIES_TASKS,
                                                   newly_armed_only=True)


def _arm(connection: Connection, existing: dict[tuple[str, str, str], tuple[int, str]], subject_uid: str,
         sha256: str, kinds: tuple[str, ...], *, newly_armed_only: bool = False, made: bool = False) -> list[int]:
    """:func:`arm_derived_tasks` given the rows that exist (by subject, content and kind)."""
    ids = []
    for kind in kinds:
        found = existing.get((subject_uid, sha256, kind))
        if found is None:
            result = connection.execute(_ADD, {
                "kind": kind, "subject_uid": subject_uid, "sha256": sha256,
                "state": JobState.DONE if made else JobState.PENDING,
                "attempts": 0, "last_error": "", "owner": "", "crashes": 0})
            ids.append(int(result.inserted_primary_key[0]))  # type: ignore[index]  # one row inserted: never None
            continue
        task_id, state = found
        rearmed = state in (JobState.DONE, JobState.FAILED)
        if rearmed:  # pending or queued rows will run and see the new state
            connection.execute(_MADE if made else _REARM, {"task_id": task_id})
        if rearmed or not newly_armed_only:
            ids.append(task_id)
    return ids


def redo_newer_version(session: Session, sop_uid: str) -> None:
    """A version superseded while its derived objects were written (a worker's, or ingest's fragment put after its
    commit): those puts may have landed after the newer version's, so the newer version's instance row and its
    series row go back to pending (if done) and are written again."""
    row = session.execute(select(Instance.sha256, Series.series_instance_uid)
                          .join(Series, Series.id == Instance.series_fk)
                          .where(Instance.sop_instance_uid == sop_uid)).one_or_none()
    if row is None:
        return
    sha256, series_uid = row
    for kind, subject, sha in ((INSTANCE_DERIVED_KIND, sop_uid, sha256), (SERIES_METADATA_KIND, series_uid, "")):
        session.execute(update(DerivedTask).where(
            DerivedTask.kind == kind, DerivedTask.subject_uid == subject, DerivedTask.sha256 == sha,
            DerivedTask.state == JobState.DONE).values(state=JobState.PENDING))
