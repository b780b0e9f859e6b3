"""The series handler (kind ``series-metadata``): the series' DICOM JSON document and representative thumbnails.

A series row is re-armed by every instance the series receives, so its handler debounces: it
defers while the series received an instance less than ``series_settle_s`` ago or while some
current instance's fragment is still to be built, and it checks that the instances did not
change while it built, in the same transaction that marks the row done (see
:func:`build_series_metadata`). A 500-slice CT is then assembled once or twice, not 500 times.
Once the images are in, the study is linked to the order it fulfils (:func:`pacs.ris.orders.link_study`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from pacs.context import AppContext
from pacs.db.models import DerivedTask, Instance, Series, Study
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.derived.outcomes import Completed, Deferred
from pacs.derived.seekable import SPOOL_BYTES, open_seekable
from pacs.dicomweb import metadata
from pacs.failpoints import failpoint
from pacs.imaging.render import RenderBusy, placeholder, thumbnail
from pacs.jobs import JobState, as_utc, utcnow
from pacs.ris.orders import link_study
from storage import ObjectNotFound, ObjectStore, StorageUnavailable
from storage.keys import instance_metadata_key, series_metadata_key, series_thumbnail_key, study_thumbnail_key

log = logging.getLogger(__name__)

#: States of an instance row whose fragment may still be (re)written: the series waits for it.
_IN_PROGRESS = (JobState.PENDING, JobState.QUEUED, JobState.RUNNING)


def build_series_metadata(ctx: AppContext, series_uid: str, _sha256: str) -> Completed | str:
    """The series' DICOM JSON document and its representative thumbnails; see the module docstring.

    The document is the JSON array of the current instances' fragments, ordered by Instance Number
    then SOP Instance UID, copied one after the other into a temporary file (never parsed). The
    series thumbnail is the middle instance's, the study thumbnail its first series' (by Series
    Number). Raises :class:`~pacs.derived.outcomes.Deferred` while the series is still arriving.
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
        crashes = session.scalar(select(DerivedTask.crashes).where(
            DerivedTask.kind == SERIES_METADATA_KIND, DerivedTask.subject_uid == series_uid, DerivedTask.sha256 == ""))
        first_series = session.scalar(select(Series.id).where(Series.study_fk == study_id,
                                                              Series.number_of_instances > 0)
                                      .order_by(Series.series_number.asc().nulls_last(), Series.id).limit(1))
    if not members:
        return "series has no instances"
    _require_settled(members, ctx.settings.series_settle_s)

    notes: list[str] = []
    doc_key = series_metadata_key(study_uid, series_uid)
    # typeshed's SpooledTemporaryFile is an IO[bytes], not the nominal BinaryIO: same methods, hence the ignores
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as out:
        writer = metadata.JsonArrayWriter(out)  # type: ignore[arg-type]
        for member in members:
            _add_fragment(ctx, writer, study_uid, series_uid, member, notes)
        length = writer.finish()
        out.seek(0)
        failpoint("derived.before_write")
        ctx.store.put(doc_key, out, length=length, content_type="application/dicom+json")  # type: ignore[arg-type]
    # a run of this row died before (a poison object's decode can kill the process): the document is built without
    # rendering again, so that one object never keeps its whole series from its metadata
    series_thumb = _representative_thumbnail(ctx, members, series_thumbnail_key(study_uid, series_uid), notes,
                                             render=not crashes)
    study_thumb = None
    if first_series == series_id:
        study_thumb = study_thumbnail_key(study_uid)
        _copy(ctx.store, series_thumb, study_thumb)

    failpoint("derived.after_write")
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
            series.thumbnail_key = series_thumb
        if study_thumb is not None:
            study.thumbnail_key = study_thumb
        if series is not None and series.modality not in ("SR", "KO", "PR"):
            # the images arrived: the order they fulfil follows (pacs.ris.orders.link_study)
            link_study(session, study.study_instance_uid, study.accession_number,
                       study.patient.patient_id if study.patient else "", series.modality, study.study_date,
                       study.facility)
        note = "; ".join(notes)[:2000]
        session.execute(update(DerivedTask).where(
            DerivedTask.kind == SERIES_METADATA_KIND, DerivedTask.subject_uid == series_uid, DerivedTask.sha256 == ""
        ).values(state=JobState.DONE, owner="", last_error=note))  # the claim counted the attempt
        failpoint("derived.before_done")  # the work is done, the row's "done" not committed yet
    log.info("series %s: metadata document of %d instance(s) built", series_uid, writer.count)
    return Completed(note)


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
        .outerjoin(DerivedTask, and_(DerivedTask.kind == INSTANCE_DERIVED_KIND,
                                     DerivedTask.subject_uid == Instance.sop_instance_uid,
                                     DerivedTask.sha256 == Instance.sha256))
        .where(Instance.series_fk == series_id)
        .order_by(Instance.instance_number.asc().nulls_last(), Instance.sop_instance_uid)
    )
    return [_Member(*row) for row in rows]


def _require_settled(members: list[_Member], settle_s: float) -> None:
    latest = max(filter(None, (as_utc(m.received_at) for m in members)))  # SQLite's are naive (in UTC)
    quiet_s = (utcnow() - latest).total_seconds()
    if quiet_s < settle_s:
        raise Deferred(f"the series received an instance {quiet_s:.1f}s ago")
    busy = sum(1 for m in members if m.task_state in _IN_PROGRESS)
    if busy:
        raise Deferred(f"{busy} instance(s) still being processed")


def _add_fragment(ctx: AppContext, writer: metadata.JsonArrayWriter, study_uid: str, series_uid: str,
                  member: _Member, notes: list[str]) -> None:
    key = instance_metadata_key(study_uid, series_uid, member.sop_uid)
    try:
        stored: bytes | None = ctx.store.get_bytes(key)  # a fragment is a few kB
    except ObjectNotFound:  # its instance task failed, or ran before fragments existed: make it here
        stored = None
    if stored is not None and not metadata.whole_fragment(stored):  # cut short by a power cut: made again
        log.warning("series %s: stored fragment %s is not a whole JSON object: made again", series_uid, key)
        stored = None
    if stored is None:
        try:
            with open_seekable(ctx.store, member.object_key) as fp:
                data = metadata.instance_metadata(fp, study_uid, series_uid, member.sop_uid,
                                                  assume_utf8_for_latin1=ctx.settings.assume_utf8_for_latin1)
        except StorageUnavailable:
            raise
        except Exception as exc:
            notes.append(f"{member.sop_uid} left out: {exc}"[:300])
            log.warning("series %s: instance %s left out of the metadata: %s", series_uid, member.sop_uid, exc)
            return
        ctx.store.put(key, data, length=len(data), content_type="application/dicom+json", durable=False)
        writer.add(data)
        return
    writer.add(stored)


def _representative_thumbnail(ctx: AppContext, members: list[_Member], target: str, notes: list[str], *,
                              render: bool = True) -> str:
    """The middle instance's thumbnail (or the nearest one's) as ``target``: copied when an instance task made one,
    else rendered here from the stored object — one decode per series, not one per instance (issue 13; an
    instance's own thumbnail is rendered when it is asked for, :mod:`pacs.dicomweb.wado`); a placeholder when
    none of the nearest renders."""
    middle = len(members) // 2
    nearest = sorted(range(len(members)), key=lambda i: abs(i - middle))
    for i in nearest:
        source = members[i].thumbnail_key
        if source and _copy(ctx.store, source, target):
            return target
    unrendered: list[str] = [] if render else ["not rendered after a crash in an earlier run"]
    for i in nearest[:_RENDER_TRIES if render else 0]:
        try:
            with open_seekable(ctx.store, members[i].object_key) as fp:
                image = thumbnail(metadata.read_dataset(fp), size=ctx.settings.thumbnail_size)
        except (RenderBusy, StorageUnavailable):  # transient: the row runs again (pacs.derived.runner)
            raise
        except Exception as exc:  # unrenderable pixel data (or none, an SR): try the next nearest instance
            log.info("series thumbnail: %s not rendered: %s", members[i].sop_uid, str(exc)[:200])
            unrendered.append(f"{members[i].sop_uid}: {exc}")
            continue
        break
    else:  # nothing to render (reports, waveforms, unreadable pixel data): a grey square, as the thumbnails show
        image = placeholder(ctx.settings.thumbnail_size, "no rendered image")
        notes.append(f"placeholder thumbnail: {'; '.join(unrendered)}"[:1000])
    ctx.store.put(target, image, length=len(image), content_type="image/jpeg")
    return target


#: Instances tried when rendering a series' representative thumbnail (a series of reports has no image).
_RENDER_TRIES = 3


def _copy(store: ObjectStore, source: str, target: str) -> bool:
    try:
        data = store.get_bytes(source)
    except ObjectNotFound:
        return False
    store.put(target, data, length=len(data), content_type="image/jpeg")
    return True
