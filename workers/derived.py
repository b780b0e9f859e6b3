"""The task functions themselves: thin, idempotent, keyed by an outbox row id.

The same functions run in a Celery worker (scaled mode) and in the in-process pool
(embedded mode). A transient failure (store or index unavailable) raises
:class:`TransientError` so the caller retries; anything else is recorded on the row.
A handler that cannot do its work *yet* raises :class:`Deferred`: the row goes back to
``pending`` without counting an attempt, and the outbox relay's sweep publishes it again.

Kinds (armed by :mod:`pacs.ingest`): ``thumbnail``, per instance version, makes its thumbnail
*and* its DICOM JSON fragment from one read of the stored object (the kind keeps its first name
so that rows already in outboxes still run); ``series-metadata``, per series, assembles the
series' DICOM JSON document and copies the representative series and study thumbnails, and links
the study to the order it fulfils (:func:`pacs.ris.orders.link_study`). ``report-sr`` (armed by
:func:`pacs.reports.lifecycle.sign`), per signed report version, builds and stores its DICOM SR.

A series row is re-armed by every instance the series receives, so its handler debounces: it
defers while the series received an instance less than ``series_settle_s`` ago or while some
current instance's fragment is still to be built, and it checks that the instances did not
change while it built, in the same transaction that marks the row done (see
:func:`build_series_metadata`). A 500-slice CT is then assembled once or twice, not 500 times.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from sqlalchemy import and_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacs import metadata, task_lease
from pacs.context import AppContext
from pacs.db.models import DerivedTask, Instance, Series, Study
from pacs.failpoints import failpoint
from pacs.imaging.render import RenderBusy, RenderError, placeholder, thumbnail
from pacs.reports.lifecycle import REPORT_SR_KIND  # the SR of a signed report version
from pacs.ris.orders import link_study
from storage import ObjectNotFound, ObjectStore, StorageUnavailable
from storage.keys import (
    instance_metadata_key,
    series_metadata_key,
    series_thumbnail_key,
    study_thumbnail_key,
    thumbnail_key,
)

log = logging.getLogger(__name__)


INSTANCE_KIND = "thumbnail"  # pacs.ingest.INSTANCE_TASKS
SERIES_KIND = "series-metadata"  # pacs.ingest.SERIES_TASKS

#: Objects read from a store that cannot seek (S3) are copied to a temporary file, in memory up to this size.
_SPOOL_BYTES = 32 * 1024 * 1024


class TransientError(Exception):
    """A dependency is down; the task should run again later."""


class Deferred(Exception):
    """The work cannot be done yet (more input is expected): retry later, not a failure."""


@dataclass(frozen=True)
class Completed:
    """A handler's result when it marked its row done itself, atomically with its last check."""

    note: str = ""


def run_derived_task(ctx: AppContext, task_id: int) -> str:
    """Run one outbox row's work; returns the row's final state (``busy``: a live process runs it).

    The row is claimed first (:func:`pacs.task_lease.claim`): that counts the attempt before the work starts,
    so a task in flight when this process dies has used one, and a poison object ends ``failed``.
    """
    settings = ctx.settings
    try:
        task_lease.process_heartbeat(ctx, ctx.sessions, settings.task_lease_s)
        claimed = task_lease.claim(ctx.sessions, task_id, lease_s=settings.task_lease_s,
                                   max_crashes=settings.task_max_crashes)
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    if claimed.state != "running":
        return claimed.state
    kind, subject_uid, sha256 = claimed.kind, claimed.subject_uid, claimed.sha256
    handler = _HANDLERS.get(kind)
    if handler is None:
        return _finish(ctx, task_id, "failed", f"unknown task kind {kind!r}")
    try:
        error = handler(ctx, subject_uid, sha256)
    except Deferred as exc:
        return _defer(ctx, task_id, str(exc))
    except (StorageUnavailable, SQLAlchemyError, RenderBusy) as exc:
        attempts = _record_attempt(ctx, task_id, str(exc))
        if attempts >= settings.task_max_attempts:
            log.error("derived task %s (%s %s) failed after %d attempts: %s", task_id, kind, subject_uid,
                      attempts, exc)
            return _finish(ctx, task_id, "failed", f"gave up after {attempts} attempts: {exc}")
        raise TransientError(str(exc)) from exc
    except Exception as exc:  # a bug or an unexpected input: recorded for `pacs tasks failed`, not retried
        log.exception("derived task %s (%s %s) failed", task_id, kind, subject_uid)
        return _finish(ctx, task_id, "failed", f"{type(exc).__name__}: {exc}"[:2000])
    if isinstance(error, Completed):
        task_lease.forget(task_id)  # the handler marked its row done itself
        return "done"
    failpoint("derived.before_done")
    return _finish(ctx, task_id, "done", error or "")


def build_instance_derived(ctx: AppContext, sop_uid: str, sha256: str) -> str | None:
    """Thumbnail and DICOM JSON fragment of one instance version, from one read of its stored object.

    The object is parsed once with its long values deferred: the fragment never touches the pixel
    data, and the thumbnail then reads just the pixel data from the same (local, seekable) copy.
    Returns a note when a placeholder thumbnail was used or no fragment could be made.
    """
    with ctx.read_sessions() as session:
        row = session.execute(
            select(Instance.object_key, Instance.sha256, Series.series_instance_uid, Study.study_instance_uid)
            .join(Series, Series.id == Instance.series_fk)
            .join(Study, Study.id == Series.study_fk)
            .where(Instance.sop_instance_uid == sop_uid)
        ).one_or_none()
    if row is None:
        return "instance no longer indexed"
    object_key, current_sha, series_uid, study_uid = row
    if current_sha != sha256:
        return "superseded by a newer version"
    size = ctx.settings.thumbnail_size
    fragment: bytes | None = None
    image: bytes | None = None
    note = ""
    with _open_seekable(ctx.store, object_key) as fp:
        try:
            ds = metadata.read_dataset(fp)
            fragment = metadata.encode_json(metadata.instance_json(
                ds, study_uid, series_uid, sop_uid, assume_utf8_for_latin1=ctx.settings.assume_utf8_for_latin1))
            image = thumbnail(ds, size=size)
        except RenderBusy:  # the decode budget was taken for too long: retried later, never a placeholder
            raise
        except (RenderError, Exception) as exc:  # unreadable pixel data must not kill a worker
            note = f"placeholder: {exc}"[:500] if fragment else f"unreadable: {exc}"[:500]
            log.warning("thumbnail for %s uses a placeholder: %s", sop_uid, exc)
    if image is None:
        image = placeholder(size, note)
    key = thumbnail_key(study_uid, series_uid, sop_uid)
    failpoint("derived.before_write")
    ctx.store.put(key, image, length=len(image), content_type="image/jpeg")
    if fragment is not None:
        ctx.store.put(instance_metadata_key(study_uid, series_uid, sop_uid), fragment, length=len(fragment),
                      content_type="application/dicom+json")
    failpoint("derived.after_write")
    with ctx.sessions() as session, session.begin():
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_uid).with_for_update()
        ).one_or_none()
        if instance is not None and instance.sha256 == sha256:
            instance.thumbnail_key = key
        elif instance is not None:
            _redo_newer_version(session, instance)
    return note or None


def build_series_metadata(ctx: AppContext, series_uid: str, _sha256: str) -> Completed | str:
    """The series' DICOM JSON document and its representative thumbnails; see the module docstring.

    The document is the JSON array of the current instances' fragments, ordered by Instance Number
    then SOP Instance UID, copied one after the other into a temporary file (never parsed). The
    series thumbnail is the middle instance's, the study thumbnail its first series' (by Series
    Number). Raises :class:`Deferred` while the series is still arriving.
    """
    with ctx.read_sessions() as session:
        found = session.execute(
            select(Series.id, Study.id, Study.study_instance_uid).join(Study, Study.id == Series.study_fk)
            .where(Series.series_instance_uid == series_uid)
        ).one_or_none()
        if found is None:
            return "series no longer indexed"
        series_id, study_id, study_uid = found
        members = _series_members(session, series_id)
        first_series = session.scalar(select(Series.id).where(Series.study_fk == study_id)
                                      .order_by(Series.series_number.asc().nulls_last(), Series.id).limit(1))
    if not members:
        return "series has no instances"
    _require_settled(members, ctx.settings.series_settle_s)

    notes: list[str] = []
    doc_key = series_metadata_key(study_uid, series_uid)
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as out:
        writer = metadata.JsonArrayWriter(out)  # type: ignore[arg-type]
        for member in members:
            _add_fragment(ctx, writer, study_uid, series_uid, member, notes)
        length = writer.finish()
        out.seek(0)
        ctx.store.put(doc_key, out, length=length, content_type="application/dicom+json")  # type: ignore[arg-type]
    series_thumb = _representative_thumbnail(ctx.store, members, series_thumbnail_key(study_uid, series_uid))
    study_thumb = None
    if series_thumb is not None and first_series == series_id:
        study_thumb = study_thumbnail_key(study_uid)
        _copy(ctx.store, series_thumb, study_thumb)

    with ctx.sessions() as session, session.begin():
        # Ingest holds this lock from before it adds an instance until after it re-arms this row, so
        # no instance can slip in between this check and marking the row done.
        study = session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one()
        now = [(m.sop_uid, m.sha256) for m in _series_members(session, series_id)]
        if now != [(m.sop_uid, m.sha256) for m in members]:
            raise Deferred("instances changed while the document was built")
        series = session.get(Series, series_id)
        if series is not None:
            series.metadata_key = doc_key
            series.thumbnail_key = series_thumb or series.thumbnail_key
        if study_thumb is not None:
            study.thumbnail_key = study_thumb
        if series is not None and series.modality not in ("SR", "KO", "PR"):
            # the images arrived: the order they fulfil follows (pacs.ris.orders.link_study)
            link_study(session, study.study_instance_uid, study.accession_number,
                       study.patient.patient_id if study.patient else "", series.modality, study.study_date,
                       study.facility)
        note = "; ".join(notes)[:2000]
        session.execute(update(DerivedTask).where(
            DerivedTask.kind == SERIES_KIND, DerivedTask.subject_uid == series_uid, DerivedTask.sha256 == ""
        ).values(state="done", owner="", last_error=note))  # the claim counted the attempt
    log.info("series %s: metadata document of %d instance(s) built", series_uid, writer.count)
    return Completed(note)


def _build_report_sr(ctx: AppContext, subject_uid: str, sha256: str) -> str | None:
    from pacs.reports.publish import build_report_sr_task

    return build_report_sr_task(ctx, subject_uid, sha256)


Handler = Callable[[AppContext, str, str], "str | Completed | None"]
_HANDLERS: dict[str, Handler] = {INSTANCE_KIND: build_instance_derived, SERIES_KIND: build_series_metadata,
                                 REPORT_SR_KIND: _build_report_sr}


@dataclass(frozen=True)
class _Member:
    """One current instance of a series, as the series handler sees it."""

    sop_uid: str
    sha256: str
    object_key: str
    thumbnail_key: str | None
    received_at: datetime
    task_state: str | None  # of its instance-level row for this version


def _series_members(session: Session, series_id: int) -> list[_Member]:
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.sha256, Instance.object_key, Instance.thumbnail_key,
               Instance.received_at, DerivedTask.state)
        .outerjoin(DerivedTask, and_(DerivedTask.kind == INSTANCE_KIND,
                                     DerivedTask.subject_uid == Instance.sop_instance_uid,
                                     DerivedTask.sha256 == Instance.sha256))
        .where(Instance.series_fk == series_id)
        .order_by(Instance.instance_number.asc().nulls_last(), Instance.sop_instance_uid)
    )
    return [_Member(*row) for row in rows]


def _require_settled(members: list[_Member], settle_s: float) -> None:
    latest = max(m.received_at if m.received_at.tzinfo else m.received_at.replace(tzinfo=UTC) for m in members)
    quiet_s = (datetime.now(UTC) - latest).total_seconds()
    if quiet_s < settle_s:
        raise Deferred(f"the series received an instance {quiet_s:.1f}s ago")
    busy = sum(1 for m in members if m.task_state in ("pending", "queued", "running"))
    if busy:
        raise Deferred(f"{busy} instance(s) still being processed")


def _add_fragment(ctx: AppContext, writer: metadata.JsonArrayWriter, study_uid: str, series_uid: str,
                  member: _Member, notes: list[str]) -> None:
    key = instance_metadata_key(study_uid, series_uid, member.sop_uid)
    try:
        stream = ctx.store.open(key)
    except ObjectNotFound:  # its instance task failed, or ran before fragments existed: make it here
        try:
            with _open_seekable(ctx.store, member.object_key) as fp:
                data = metadata.instance_metadata(fp, study_uid, series_uid, member.sop_uid,
                                                  assume_utf8_for_latin1=ctx.settings.assume_utf8_for_latin1)
        except StorageUnavailable:
            raise
        except Exception as exc:
            notes.append(f"{member.sop_uid} left out: {exc}"[:300])
            log.warning("series %s: instance %s left out of the metadata: %s", series_uid, member.sop_uid, exc)
            return
        ctx.store.put(key, data, length=len(data), content_type="application/dicom+json")
        writer.add(data)
        return
    with stream:
        writer.add(stream)


def _representative_thumbnail(store: ObjectStore, members: list[_Member], target: str) -> str | None:
    """Copy the middle instance's thumbnail (or the nearest one that has one) to ``target``."""
    middle = len(members) // 2
    for i in sorted(range(len(members)), key=lambda i: abs(i - middle)):
        source = members[i].thumbnail_key
        if source and _copy(store, source, target):
            return target
    return None


def _copy(store: ObjectStore, source: str, target: str) -> bool:
    try:
        data = store.get_bytes(source)
    except ObjectNotFound:
        return False
    store.put(target, data, length=len(data), content_type="image/jpeg")
    return True


def _redo_newer_version(session: Session, instance: Instance) -> None:
    """We were superseded while working, so our puts may have landed after the newer version's:
    put its instance row (and its series row) back to pending so that they are written again."""
    series = session.get(Series, instance.series_fk)
    for kind, subject, sha in ((INSTANCE_KIND, instance.sop_instance_uid, instance.sha256),
                               (SERIES_KIND, series.series_instance_uid if series else "", "")):
        session.execute(update(DerivedTask).where(
            DerivedTask.kind == kind, DerivedTask.subject_uid == subject, DerivedTask.sha256 == sha,
            DerivedTask.state == "done").values(state="pending"))


@contextmanager
def _open_seekable(store: ObjectStore, key: str) -> Iterator[BinaryIO]:
    """The stored object as a seekable stream: pydicom seeks back to read deferred values."""
    with ExitStack() as stack:
        stream = stack.enter_context(store.open(key))
        if not stream.seekable():
            spool = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES))
            shutil.copyfileobj(stream, spool, 1024 * 1024)
            stream.close()  # release the connection before the caller works on the copy
            spool.seek(0)
            stream = spool  # type: ignore[assignment]
        yield stream


def _finish(ctx: AppContext, task_id: int, state: str, error: str) -> str:
    """The row's final state, without owner (its claim counted the attempt)."""
    try:
        task_lease.finish(ctx.sessions, task_id, state, error)
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    return state


def _record_attempt(ctx: AppContext, task_id: int, error: str) -> int:
    """A transient failure: the row goes back to ``queued`` for the retry (the in-process pool's caller
    makes it ``pending``); returns the attempts so far (0 if the index is down too)."""
    try:
        return task_lease.finish(ctx.sessions, task_id, "queued", error)
    except SQLAlchemyError:
        log.warning("could not record attempt of derived task %s", task_id)
        return 0


def _defer(ctx: AppContext, task_id: int, reason: str) -> str:
    """Back to pending without counting an attempt; the relay's sweep publishes it again."""
    try:
        task_lease.finish(ctx.sessions, task_id, "pending", f"deferred: {reason}", undo_attempt=True,
                          only_if_not_done=True)
    except SQLAlchemyError as exc:
        raise TransientError(f"index unavailable: {exc}") from exc
    return "deferred"
