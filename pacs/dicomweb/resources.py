"""The studies, series and instances a WADO request names, inside the asker's access scope.

Every WADO-RS / WADO-URI request goes through :func:`resolve` first: the UIDs must be well formed
(400 otherwise), the study must exist *and* be inside the scope (:func:`pacs.security.access.may_see_study`),
and a series or instance in the path must belong to the study (and series) in the path. Each of these
failures is the same :class:`NotFound` (404), so a guessed UID tells nothing about other facilities' data.
All of that is one statement (the scope is a condition of it); for an instance it also reads the instance's
row, which the target carries (:func:`instance` then reads nothing more). On PostgreSQL that statement is built
and compiled once per access scope and kind of target, and run with the UIDs (and the time of the request) as
parameters on the read path's connections.

Instances are then listed in short read transactions, a page at a time (keyset on the row id), so a
long download never holds a transaction or a study's rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Select, String, bindparam, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.models import DerivedTask, Instance, Patient, Series, Study
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.errors import IndexUnavailable, InvalidInput, NotFound
from pacs.query.prebuilt import Compiled, compile_statement, fetch
from pacs.query.sessions import single_statement, single_statement_engine
from pacs.security.access import study_condition
from pacs.security.principal import AccessScope
from storage.keys import is_valid_uid

PAGE_SIZE = 200


@dataclass(frozen=True)
class Target:
    """A resolved WADO target: a study, optionally one of its series, optionally one of its instances."""

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    patient_id: str = ""  # for the audit trail
    instance: StoredInstance | None = field(default=None, compare=False, repr=False)  # read by resolve()


@dataclass(frozen=True)
class StoredInstance:
    """One current instance as WADO serves it."""

    id: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    object_key: str
    sha256: str
    number_of_frames: int | None
    thumbnail_key: str | None
    fragment_current: bool  # its worker-built DICOM JSON fragment is of this version


def check_uid(value: str, what: str) -> str:
    if not is_valid_uid(value):
        shown = value if len(value) <= 24 else value[:21] + "..."
        raise InvalidInput(f"invalid {what} {shown!r} (digits and dots, at most 64 characters)")
    return value


def resolve(sessions: sessionmaker[Session], scope: AccessScope, study_uid: str, series_uid: str | None = None,
            sop_uid: str | None = None) -> Target:
    """Check the UIDs, the scope and that the path's UIDs belong together; raises NotFound / InvalidInput."""
    check_uid(study_uid, "StudyInstanceUID")
    if series_uid is not None:
        check_uid(series_uid, "SeriesInstanceUID")
    if sop_uid is not None:
        check_uid(sop_uid, "SOPInstanceUID")
    what = "instance" if sop_uid else "series" if series_uid else "study"
    engine = single_statement_engine(sessions)  # PostgreSQL: the read path's; SQLite: the process's
    prebuilt = _prebuilt(engine, scope, (what, series_uid is not None))
    if prebuilt is not None:  # the statement built for this scope, run raw
        rows = fetch(engine, prebuilt, {"r_study": study_uid, "r_series": series_uid, "r_sop": sop_uid}, first=True)
        row = rows[0] if rows else None
    else:
        try:
            with single_statement(sessions) as session:
                row = session.execute(_resolve_statement(scope, what, study_uid, series_uid, sop_uid)).first()
        except SQLAlchemyError as exc:
            raise IndexUnavailable("index database unavailable") from exc
    if row is None:  # unknown, outside the scope, or not of the study (and series) in the path: all alike
        raise NotFound(f"no such {what}")
    if sop_uid is None:
        return Target(study_uid, series_uid, None, row[1] or "")
    values = list(row[:-1])
    values[-1] = bool(values[-1])  # fragment_current: SQLite answers an EXISTS with 0 or 1
    return Target(study_uid, series_uid, sop_uid, row[-1] or "", StoredInstance(*values))


def _resolve_statement(scope: AccessScope, what: str, study_uid: Any, series_uid: Any, sop_uid: Any) -> Select:
    """:func:`resolve`'s one statement for a target of kind ``what`` (the UIDs: values or bound parameters)."""
    if what == "instance":
        stmt = _instance_select(study_uid, series_uid, sop_uid).add_columns(Patient.patient_id)
    else:
        stmt = select(Study.id, Patient.patient_id).where(Study.study_instance_uid == study_uid)
        if what == "series":
            stmt = stmt.join(Series, Series.study_fk == Study.id).where(Series.series_instance_uid == series_uid,
                                                                        Series.number_of_instances > 0)
    # a study whose every instance was rejected or moved away has no images to retrieve: 404 like an unknown one
    return stmt.outerjoin(Patient, Patient.id == Study.patient_fk).where(study_condition(scope, hide_empty=True)
                                                                         ).limit(1)


# (database, scope, kind of target) -> the resolve statement compiled with the UIDs as parameters, and its other
# parameters (the scope's values). Built once per scope a process sees; a viewer's hundreds of requests then skip
# building, cache-keying and compiling it (and psycopg prepares it on the server after a few uses). On SQLite
# (the embedded archive) this was a fifth of the interpreter's time serving a frame (issue 13).
_PREBUILT: dict[tuple[str, AccessScope, tuple[str, bool]], Compiled | None] = {}
_PREBUILT_MAX = 512
_prebuilt_lock = threading.Lock()
_UNBUILT = object()


def _prebuilt(engine: Engine, scope: AccessScope, kind: tuple[str, bool]) -> Compiled | None:
    """``kind``: what the target is, and whether the path names a series. None: this scope's statement holds a
    time that is not "now" (it is then built per request)."""
    key = (engine.dialect.name, scope, kind)
    known = _PREBUILT.get(key, _UNBUILT)
    if known is not _UNBUILT:
        return known if isinstance(known, Compiled) else None
    what, with_series = kind
    study, series, sop = (bindparam(name, "", type_=String) for name in ("r_study", "r_series", "r_sop"))
    # consult_grant's "now" is set to the moment of each execution (pacs.query.prebuilt)
    found = compile_statement(engine, _resolve_statement(scope, what, study, series if with_series else None, sop))
    with _prebuilt_lock:
        if len(_PREBUILT) >= _PREBUILT_MAX:
            _PREBUILT.clear()
        _PREBUILT[key] = found
    return found


def _instances(target: Target) -> Select:
    return _instance_select(target.study_uid, target.series_uid, target.sop_uid)


def _instance_select(study_uid: Any, series_uid: Any, sop_uid: Any) -> Select:
    fragment_done = (select(DerivedTask.id).where(
        DerivedTask.kind == INSTANCE_DERIVED_KIND, DerivedTask.subject_uid == Instance.sop_instance_uid,
        DerivedTask.sha256 == Instance.sha256, DerivedTask.state == "done",
        ~DerivedTask.last_error.startswith("unreadable")).exists())
    stmt = (select(Instance.id, Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid,
                   Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.object_key, Instance.sha256,
                   Instance.number_of_frames, Instance.thumbnail_key, fragment_done.label("fragment_current"))
            .join(Series, Series.id == Instance.series_fk).join(Study, Study.id == Series.study_fk)
            .where(Study.study_instance_uid == study_uid))
    if series_uid is not None:
        stmt = stmt.where(Series.series_instance_uid == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_uid)
    return stmt


def iter_instances(sessions: sessionmaker[Session], target: Target, page_size: int = PAGE_SIZE
                   ) -> Iterator[StoredInstance]:
    """The target's current instances in row order, ``page_size`` per statement (each its own snapshot)."""
    last_id = 0
    while True:
        try:
            with single_statement(sessions) as session:
                rows = session.execute(_instances(target).where(Instance.id > last_id)
                                       .order_by(Instance.id).limit(page_size)).all()
        except SQLAlchemyError as exc:
            raise IndexUnavailable("index database unavailable") from exc
        for row in rows:
            yield StoredInstance(*row)
        if len(rows) < page_size:
            return
        last_id = rows[-1].id


def instance(sessions: sessionmaker[Session], target: Target) -> StoredInstance:
    """The one instance of an instance-level target (the row :func:`resolve` read, when it did)."""
    if target.instance is not None and target.instance.sop_uid == target.sop_uid:
        return target.instance
    found = next(iter_instances(sessions, target, page_size=1), None)
    if found is None:
        raise NotFound("no such instance")
    return found


def stored_syntaxes(sessions: sessionmaker[Session], target: Target) -> list[str]:
    """The distinct transfer syntaxes the target's instances are stored in (to answer 406 before streaming)."""
    try:
        with single_statement(sessions) as session:
            stmt = _instances(target).with_only_columns(Instance.transfer_syntax_uid).distinct()
            return sorted(session.scalars(stmt))
    except SQLAlchemyError as exc:
        raise IndexUnavailable("index database unavailable") from exc


@dataclass(frozen=True)
class SeriesDocument:
    """What the index says about one series' metadata document."""

    series_uid: str
    metadata_key: str | None
    current: bool  # its series task is done: the document holds every current instance, as current


def series_documents(sessions: sessionmaker[Session], target: Target) -> list[SeriesDocument]:
    """The target's series (ordered by Series Number) and whether their stored documents are current.

    A series task is re-armed in the same transaction that adds an instance to the series, so "done"
    read in one transaction with the key means the document describes exactly the current instances.
    """
    done = (select(DerivedTask.id).where(DerivedTask.kind == SERIES_METADATA_KIND,
                                          DerivedTask.subject_uid == Series.series_instance_uid,
                                          DerivedTask.sha256 == "", DerivedTask.state == "done").exists())
    stmt = (select(Series.series_instance_uid, Series.metadata_key, done)
            .join(Study, Study.id == Series.study_fk).where(Study.study_instance_uid == target.study_uid,
                                                            Series.number_of_instances > 0)  # rejected: hidden
            .order_by(Series.series_number.asc().nulls_last(), Series.id))
    if target.series_uid is not None:
        stmt = stmt.where(Series.series_instance_uid == target.series_uid)
    try:
        with single_statement(sessions) as session:
            return [SeriesDocument(uid, key, bool(key) and bool(current))
                    for uid, key, current in session.execute(stmt)]
    except SQLAlchemyError as exc:
        raise IndexUnavailable("index database unavailable") from exc


def series_members(sessions: sessionmaker[Session], study_uid: str, series_uid: str) -> list[StoredInstance]:
    """A series' current instances in document order (Instance Number, then SOP Instance UID), as the
    workers order them in the series document."""
    stmt = (_instances(Target(study_uid, series_uid))
            .order_by(Instance.instance_number.asc().nulls_last(), Instance.sop_instance_uid))
    try:
        with single_statement(sessions) as session:
            return [StoredInstance(*row) for row in session.execute(stmt)]
    except SQLAlchemyError as exc:
        raise IndexUnavailable("index database unavailable") from exc


def representative(sessions: sessionmaker[Session], target: Target) -> StoredInstance:
    """The instance that stands for a study or series in /rendered and /thumbnail: the middle instance of
    the (first, by Series Number) series, as the series and study thumbnails are chosen."""
    if target.sop_uid is not None:
        return instance(sessions, target)
    series_uid = target.series_uid
    if series_uid is None:
        documents = series_documents(sessions, target)
        if not documents:
            raise NotFound("the study has no series")
        series_uid = documents[0].series_uid
    members = series_members(sessions, target.study_uid, series_uid)
    if not members:
        raise NotFound("the series has no instances")
    return members[len(members) // 2]
