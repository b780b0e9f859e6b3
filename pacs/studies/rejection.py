"""Reject and restore instances (IHE IOCM): the rejection note is the record, the index follows it.

A rejection is a stored rejection note (:mod:`pacs.studies.rejection_notes`), ours or a sender's. Every note
enters through the one ingest function: :func:`reject` builds one and hands it to
:func:`pacs.runtime.make_ingestor`; ingest recognises a note (:func:`note_content`) and calls
:func:`ingest_rejection_note` instead of indexing it as an instance. :func:`apply_note` then does, in ONE index
transaction with the study row locked: the ``rejection_note`` row; each referenced instance of the note's study
moved from ``instance`` to ``rejected_instance`` (its row as JSON, for :func:`restore`); series and study
counts and Modalities in Study lowered; series documents and thumbnails cleared and re-armed; pending forward
jobs and derived tasks of the rejected instances cancelled; the audit event. Since the rows leave
``instance``, every instance-level path stops finding them at once; a series or study left with no instance is
hidden by its count from the paths that list images (QIDO-RS and C-FIND, FHIR ImagingStudy, WADO, the
reading list: ``hide_empty`` of :func:`pacs.security.access.study_condition`); its reports, share links and
consults stay.

Who may reject: over HTTP and the CLI, ``Capability.STUDY_REJECT`` (radiologists only for ``quality``) on a
study the principal may change (:func:`pacs.security.access.owned_study_condition`: its own facility's, never one
only shared with it). A rejection note *sent* in is held to the same rules (:func:`sender_refusal`,
:func:`_study_refusal`): over STOW-RS or an upload, the sending account's role must hold ``STUDY_REJECT``
(radiologists: ``quality`` only) and the study must be one it may change; over DICOM, only a registered AE
(passing its host check) and only for studies of its facility (any study when archive-wide). An unregistered
peer never rejects anything: its AE title proves nothing. A refused note is audited and changes nothing (the
sender gets 0xA900 with the reason).

The store stays the truth for ``pacs reindex``: the notes present in the store are the active rejections. A
restore therefore deletes a note whose instances are all restored and replaces a partly restored one by a new
note covering the rest (stored first; the old one is deleted after the restore commits).

Limits: a re-send racing a rejection of the same SOP instance (read before the rejection commits) is indexed
again; rejecting it again fixes it. A crash between a restore's commit and the deletion of its old note leaves
that note in the store (``pacs check`` lists it as an orphan; ``pacs reindex`` would re-apply it).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import ColumnElement, Table, bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit
from pacs.aes import lookup as lookup_ae
from pacs.context import AppContext
from pacs.db.models import DerivedTask, ForwardJob, Instance, Patient, Series, Study
from pacs.derived.outbox import INSTANCE_TASKS, SERIES_TASKS, arm_derived_tasks
from pacs.errors import Conflict, InvalidInput, NotFound, PacsError
from pacs.ingest.outcome import IngestOutcome, IngestStatus
from pacs.ingest.parsing import ReceivedObject, RejectReason
from pacs.ingest.source import IngestSource
from pacs.jobs import JobState
from pacs.security import filing_rules
from pacs.security.access import Forbidden, authorize, owned_study_condition
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import ROLE_CAPABILITIES, Capability, Role
from pacs.studies.common import chunks, refusals_audited
from pacs.studies.models import QUALITY, REASON_CODES, RejectedInstance, RejectionNote
from pacs.studies.rejection_notes import Reference, RejectionNoteContent, build_rejection_note, read_rejection_note
from storage import ObjectStore, StorageError, StorageUnavailable
from storage.keys import instance_key

log = logging.getLogger(__name__)

MAX_LISTED = 5000  # rows of one list_rejected answer
# transports on which an account (a principal with a role and a facility) sends objects: a rejection note sent
# this way is held to that account's rights, like POST /api/studies/{study}/reject
ACCOUNT_TRANSPORTS = frozenset({"stow", "upload"})
_SNAPSHOT_SKIP = frozenset({"id", "series_fk"})


@dataclass(frozen=True)
class RejectionResult:
    study_instance_uid: str
    reason: str
    note_sop_instance_uid: str
    rejected: list[str]  # SOP Instance UIDs


@dataclass(frozen=True)
class RestoreResult:
    study_instance_uid: str
    restored: list[str]  # SOP Instance UIDs
    notes_deleted: list[str]  # rejection notes removed (all their instances restored, or replaced)
    notes_created: list[str]  # replacement notes covering what stays rejected


@dataclass(frozen=True)
class RejectedItem:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    facility: str
    reason: str
    note_sop_instance_uid: str
    rejected_at: datetime
    rejected_by: str
    object_key: str
    size: int


@dataclass(frozen=True)
class AppliedNote:
    rejected: list[str]  # moved out of ``instance`` now
    already: list[str]  # were rejected already (now under this note)
    ignored: list[str]  # referenced, but not an instance of the note's study
    task_ids: tuple[int, ...]


class NoteRefused(PacsError):
    """A rejection note that may not (or cannot) be applied; nothing was written."""


# -- the ingest side ---------------------------------------------------------------------------------


def note_content(obj: ReceivedObject) -> RejectionNoteContent | None:
    """What ``obj`` rejects when it is a rejection note (cheap for anything else: a SOP class test)."""
    return read_rejection_note(obj.dataset, obj.sop_class_uid) if obj.dataset is not None else None


def is_rejected(session: Session, sop_instance_uid: str) -> bool:
    """Whether the SOP instance is rejected and not deleted (one lookup on a unique index)."""
    return session.scalar(_REJECTED, {"sop": sop_instance_uid}) is not None


# prebuilt on the table: ingest asks it for every new SOP instance (pacs.ingest.service)
_REJECTED = select(cast(Table, RejectedInstance.__table__).c.id).where(
    cast(Table, RejectedInstance.__table__).c.sop_instance_uid == bindparam("sop"))


def ingest_rejection_note(sessions: sessionmaker[Session], store: ObjectStore, obj: ReceivedObject, sha256: str,
                          source: IngestSource, note: RejectionNoteContent) -> IngestOutcome:
    """Store a received rejection note like any object and apply it (ingest's order of writes: store, then one
    index transaction; the object is removed again when the transaction does not commit)."""
    def outcome(status: IngestStatus, message: str = "", reason: RejectReason | None = None,
                task_ids: tuple[int, ...] = ()) -> IngestOutcome:
        return IngestOutcome(status, message, reason=reason, sop_instance_uid=obj.sop_instance_uid,
                             sop_class_uid=obj.sop_class_uid, study_instance_uid=obj.study_instance_uid,
                             sha256=sha256, series_instance_uid=obj.series_instance_uid, derived_task_ids=task_ids)

    refusal = sender_refusal(source, note.reason)
    if refusal is not None:  # refused before anything is stored
        log.warning("refused rejection note %s from %s: %s", obj.sop_instance_uid, source.calling_ae or source.user,
                    refusal)
        _audit_refusal(sessions, source, obj.study_instance_uid, f"note={obj.sop_instance_uid} {refusal}")
        return outcome(IngestStatus.REJECTED, refusal, reason=RejectReason.MISMATCH)
    try:
        with sessions() as session:
            known = session.scalar(select(RejectionNote.sha256).where(
                RejectionNote.sop_instance_uid == obj.sop_instance_uid))
    except SQLAlchemyError:
        return outcome(IngestStatus.INDEX_UNAVAILABLE, "index database unavailable")
    if known is not None:
        if known == sha256:
            return outcome(IngestStatus.DUPLICATE, "identical rejection note already applied")
        return outcome(IngestStatus.REJECTED, "a different rejection note with this SOP Instance UID is "
                             "already stored", reason=RejectReason.MISMATCH)
    key = instance_key(obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid, sha256)
    try:
        existed = store.exists(key)
        store.put(key, obj.data, length=len(obj.data), content_type="application/dicom")
    except StorageError as exc:
        return outcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200])
    try:
        with sessions() as session, session.begin():
            applied = apply_note(session, study_uid=obj.study_instance_uid, note_sop_uid=obj.sop_instance_uid,
                                 content=note, object_key=key, sha256=sha256, size=len(obj.data), source=source)
    except NoteRefused as exc:
        _discard(store, key, existed)
        log.warning("refused rejection note %s from %s: %s", obj.sop_instance_uid, source.calling_ae or source.user,
                    exc)
        _audit_refusal(sessions, source, obj.study_instance_uid, f"note={obj.sop_instance_uid} {exc}")
        return outcome(IngestStatus.REJECTED, str(exc), reason=RejectReason.MISMATCH)
    except IntegrityError:  # the same note applied concurrently
        _discard(store, key, existed)
        return outcome(IngestStatus.DUPLICATE, "rejection note applied concurrently")
    except SQLAlchemyError as exc:
        _discard(store, key, existed)
        log.error("index unavailable for rejection note %s: %s", obj.sop_instance_uid, str(exc).splitlines()[0])
        return outcome(IngestStatus.INDEX_UNAVAILABLE, "index database unavailable")
    log.info("rejection note %s (%s): %d rejected, %d already, %d ignored", obj.sop_instance_uid, note.reason,
             len(applied.rejected), len(applied.already), len(applied.ignored))
    return outcome(IngestStatus.STORED, task_ids=applied.task_ids)


def apply_note(session: Session, *, study_uid: str, note_sop_uid: str, content: RejectionNoteContent,
               object_key: str, sha256: str, size: int, source: IngestSource | None) -> AppliedNote:
    """Apply one rejection note inside the caller's transaction (see the module docstring).

    ``source`` None: ``pacs reindex`` re-applying a stored note (no sender check). Raises :class:`NoteRefused`
    when the sender may not reject in this study or the note names no instance of it.
    """
    if source is not None and (refusal := sender_refusal(source, content.reason)) is not None:
        raise NoteRefused(refusal)
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid).with_for_update()
                            ).one_or_none()
    wanted = list(dict.fromkeys(r.sop_instance_uid for r in content.references
                                if r.study_instance_uid in (study_uid, "")))
    ignored = [r.sop_instance_uid for r in content.references if r.study_instance_uid not in (study_uid, "")]
    if study is None:
        raise NoteRefused(f"the rejection note references no stored instance of study {study_uid}")
    if source is not None and (refusal := _study_refusal(session, study, source)) is not None:
        raise NoteRefused(refusal)
    found: list[tuple[Instance, Series]] = []
    already: list[RejectedInstance] = []
    for part in chunks(wanted):
        for instance, series in session.execute(
                select(Instance, Series).join(Series, Series.id == Instance.series_fk)
                .where(Series.study_fk == study.id, Instance.sop_instance_uid.in_(part))):
            found.append((instance, series))
        already += session.scalars(select(RejectedInstance).where(
            RejectedInstance.study_instance_uid == study_uid, RejectedInstance.sop_instance_uid.in_(part)))
    if not found and not already:
        raise NoteRefused(f"the rejection note references no stored instance of study {study_uid}")
    matched = {i.sop_instance_uid for i, _ in found} | {r.sop_instance_uid for r in already}
    ignored += [uid for uid in wanted if uid not in matched]
    actor = (source.user or source.calling_ae) if source is not None else "reindex"
    session.add(RejectionNote(sop_instance_uid=note_sop_uid, study_instance_uid=study_uid, reason=content.reason,
                              object_key=object_key, sha256=sha256, size=size,
                              source=(source.transport if source is not None else "reindex")[:16],
                              created_by=actor[:128]))
    for row in already:  # the latest note is the one that holds them
        row.note_sop_instance_uid, row.reason = note_sop_uid, content.reason
    series_by_id: dict[int, Series] = {}
    removed: dict[int, int] = {}
    rejected: list[str] = []
    for instance, series in found:
        session.add(RejectedInstance(
            sop_instance_uid=instance.sop_instance_uid, series_instance_uid=series.series_instance_uid,
            study_instance_uid=study_uid, facility=study.facility, reason=content.reason,
            note_sop_instance_uid=note_sop_uid, object_key=instance.object_key, sha256=instance.sha256,
            size=instance.size, snapshot=_snapshot(instance), rejected_by=actor[:128]))
        series_by_id[series.id] = series
        removed[series.id] = removed.get(series.id, 0) + 1
        rejected.append(instance.sop_instance_uid)
        session.delete(instance)
    session.flush()
    tasks = _recount(session, study, series_by_id, removed, sign=-1)
    if rejected:
        _cancel_work(session, rejected)
    audit.append(session, action="instance.reject",
                 actor=actor, role=(source.role or ("modality" if source.transport == "dimse" else ""))
                 if source is not None else "operator",
                 source_address=source.address if source is not None else "",
                 patient_id=_patient_id(session, study), study_instance_uid=study_uid,
                 detail=(f"reason={content.reason} note={note_sop_uid} count={len(rejected)} "
                         f"already={len(already)} ignored={len(ignored)}"
                         + (f" transport={source.transport}" if source is not None else "")
                         + (f" ignored_uids={','.join(ignored[:20])}" if ignored else "")))
    return AppliedNote(rejected, [r.sop_instance_uid for r in already], ignored,
                       tuple(tasks))


def sender_refusal(source: IngestSource, reason: str) -> str | None:
    """Why this sender may not send a rejection note for ``reason`` at all (whatever the study), or None.

    An account (STOW-RS, upload) needs ``Capability.STUDY_REJECT`` by its role, a radiologist the quality reason;
    a DICOM peer must be a registered AE that passed its host check: an unregistered peer's AE title proves nothing,
    so it could name any sender's objects as its own. Other transports are the archive's own (the reject
    operation, which checked the principal already; a local import by the operator)."""
    if source.resolution is not None or source.correction is not None:
        return "refused: a rejection note is not filed from the reconciliation queue or by a correction"
    if source.transport == "dimse":
        if source.impersonating:
            return (f"refused: AE {source.calling_ae} failed its identity check (host); "
                    "it may not reject instances")
        if not source.trusted:
            return (f"refused: AE {source.calling_ae or '(none)'} is not registered; only a registered AE may "
                    "send rejection notes (pacs ae add)")
        return None
    if source.transport in ACCOUNT_TRANSPORTS:
        role = next((r for r in Role if r.value == source.role), None)
        if role is None or Capability.STUDY_REJECT not in ROLE_CAPABILITIES[role]:
            return (f"refused: role {source.role or '(none)'} may not reject instances "
                    f"(a rejection note needs the {Capability.STUDY_REJECT.value} capability)")
        if role is Role.RADIOLOGIST and reason != QUALITY:
            return "refused: a radiologist may reject for quality reasons only"
        return None
    return None if source.trusted else filing_rules.REFUSAL


def _study_refusal(session: Session, study: Study, source: IngestSource) -> str | None:
    """Why the sender may not change ``study``, or None: an account only a study it may change
    (:func:`owned_study_condition` of its facility), a registered AE only its facility's studies (every study when
    archive-wide), the archive's own transports the study they were given."""
    if source.transport == "dimse":
        record = lookup_ae(session, source.calling_ae)
        if record is not None and (record.archive_wide or record.facility == study.facility):
            return None
        return (f"refused: AE {source.calling_ae} may reject only instances of its own facility's studies "
                f"(study {study.study_instance_uid} is not one)")
    if source.transport in ACCOUNT_TRANSPORTS:
        role = next((r for r in Role if r.value == source.role), Role.PATIENT)
        owned = session.scalar(select(Study.id).where(
            Study.id == study.id, owned_study_condition(scope_for(role, source.facility))))
        # worded like an unknown study: an account learns nothing about studies it may not change
        return None if owned is not None else \
            f"the rejection note references no stored instance of study {study.study_instance_uid}"
    return None if source.facility in ("", study.facility) else filing_rules.REFUSAL


def _recount(session: Session, study: Study, series_by_id: dict[int, Series], delta: dict[int, int],
             sign: int) -> list[int]:
    """Counts, Modalities in Study, series documents and thumbnails after instances left (-1) or came back (+1)."""
    tasks: list[int] = []
    total = 0
    for series_id, n in delta.items():
        series = series_by_id[series_id]
        before = series.number_of_instances
        series.number_of_instances = max(0, before + sign * n)
        total += n
        if before > 0 and series.number_of_instances == 0:
            study.number_of_series = max(0, study.number_of_series - 1)
        elif before == 0 and series.number_of_instances > 0:
            study.number_of_series += 1
        series.metadata_key = None  # the document lists other instances now; served live until rebuilt
        series.thumbnail_key = None
        if series.number_of_instances > 0:
            tasks += arm_derived_tasks(session, series.series_instance_uid, "", SERIES_TASKS)
    if delta:
        study.number_of_instances = max(0, study.number_of_instances + sign * total)
        # the study thumbnail is its first series' with instances (pacs.derived.series): when that series is among
        # the changed ones, or another one is first now, the thumbnail is cleared and rebuilt with the first series
        first_before = _first_series(session, study.id, include=set(delta) if sign < 0 else set())
        session.flush()
        first_now = _first_series(session, study.id)
        if first_before in delta or first_now in delta or first_before != first_now:
            study.thumbnail_key = None
            if first_now is not None and first_now not in delta:
                tasks += arm_derived_tasks(session, series_by_id[first_now].series_instance_uid
                                           if first_now in series_by_id else
                                           session.get_one(Series, first_now).series_instance_uid, "", SERIES_TASKS)
        modalities = session.scalars(select(Series.modality).where(
            Series.study_fk == study.id, Series.number_of_instances > 0).order_by(Series.id))
        study.modalities_in_study = "\\".join(dict.fromkeys(m for m in modalities if m))[:128]
    return tasks


def _first_series(session: Session, study_id: int, include: set[int] | None = None) -> int | None:
    """The study's first series with instances, by Series Number (``include``: also these, emptied just now)."""
    has_instances: ColumnElement[bool] = Series.number_of_instances > 0
    if include:
        has_instances = or_(has_instances, Series.id.in_(sorted(include)))
    return session.scalar(select(Series.id).where(Series.study_fk == study_id, has_instances)
                          .order_by(Series.series_number.asc().nulls_last(), Series.id).limit(1))


def _cancel_work(session: Session, sop_uids: list[str]) -> None:
    """Pending forward jobs and derived tasks of rejected instances will not run."""
    for part in chunks(sop_uids):
        session.execute(update(ForwardJob).where(ForwardJob.sop_instance_uid.in_(part),
                                                 ForwardJob.state == JobState.PENDING)
                        .values(state=JobState.FAILED, last_error="cancelled: the instance was rejected"))
        session.execute(update(DerivedTask).where(DerivedTask.subject_uid.in_(part),
                                                  DerivedTask.state.in_((JobState.PENDING, JobState.QUEUED)))
                        .values(state=JobState.DONE, last_error="cancelled: the instance was rejected"))


def _snapshot(instance: Instance) -> str:
    values: dict[str, object] = {}
    for column in Instance.__table__.columns:
        if column.key in _SNAPSHOT_SKIP:
            continue
        value = getattr(instance, column.key)
        values[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return json.dumps(values)


def _from_snapshot(snapshot: str, series_fk: int) -> Instance:
    values = json.loads(snapshot)
    if isinstance(values.get("received_at"), str):
        values["received_at"] = datetime.fromisoformat(values["received_at"])
    known = {c.key for c in Instance.__table__.columns} - _SNAPSHOT_SKIP
    return Instance(series_fk=series_fk, **{k: v for k, v in values.items() if k in known})


def _patient_id(session: Session, study: Study) -> str:
    return session.scalar(select(Patient.patient_id).where(Patient.id == study.patient_fk)) or ""


def _discard(store: ObjectStore, key: str, existed: bool) -> None:
    if existed:
        return
    try:
        store.delete(key)
    except StorageError as exc:
        log.error("could not remove unapplied rejection note %s (pacs check will list it): %s", key, exc)


def _audit_refusal(sessions: sessionmaker[Session], source: IngestSource, study_uid: str, detail: str) -> None:
    try:
        with sessions() as session, session.begin():
            audit.append(session, action="instance.reject", outcome="failure", actor=source.user or source.calling_ae,
                         role=source.role or ("modality" if source.transport == "dimse" else ""),
                         source_address=source.address, study_instance_uid=study_uid,
                         detail=f"transport={source.transport} {detail}"[:2000])
    except SQLAlchemyError as exc:
        log.error("audit write failed: %s", exc)


# -- reject, restore, list (HTTP and CLI) ------------------------------------------------------------


def _may_change(session: Session, principal: Principal, study_uid: str) -> bool:
    """The study exists and is one the principal may change (never one only shared with or lent to it)."""
    return session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid,
                                                 owned_study_condition(principal.scope))) is not None


def _unique(values: Sequence[str] | None) -> list[str]:
    return list(dict.fromkeys(v.strip() for v in values or () if v and v.strip()))


def reject(ctx: AppContext, principal: Principal, study_uid: str, reason: str, *,
           series: Sequence[str] | None = None, instances: Sequence[str] | None = None) -> RejectionResult:
    """Reject the whole study, or the listed series and instances of it (both lists: their union)."""
    with refusals_audited(ctx, principal, "instance.reject", study_uid):
        authorize(principal, Capability.STUDY_REJECT)
        if reason not in REASON_CODES:
            raise InvalidInput(f"unknown rejection reason {reason!r}: one of {', '.join(REASON_CODES)}")
        if principal.role is Role.RADIOLOGIST and reason != QUALITY:
            raise Forbidden("a radiologist may reject for quality reasons only")
        series_uids, sop_uids = _unique(series), _unique(instances)
        with ctx.read_sessions() as session:
            if not _may_change(session, principal, study_uid):
                raise NotFound(f"no study {study_uid}")
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.object_key,
                       Series.series_instance_uid)
                .join(Series, Series.id == Instance.series_fk).join(Study, Study.id == Series.study_fk)
                .where(Study.study_instance_uid == study_uid).order_by(Series.id, Instance.id)).all()
            facility = session.scalar(select(Study.facility).where(Study.study_instance_uid == study_uid)) or ""
            fallback = _index_header(session, study_uid)
        unknown_series = sorted(set(series_uids) - {r.series_instance_uid for r in rows})
        unknown_sops = sorted(set(sop_uids) - {r.sop_instance_uid for r in rows})
        if unknown_series or unknown_sops:
            raise InvalidInput("not current series/instances of this study: "
                               + ", ".join([*unknown_series, *unknown_sops][:5]))
        if series_uids or sop_uids:
            rows = [r for r in rows if r.series_instance_uid in series_uids or r.sop_instance_uid in sop_uids]
        if not rows:
            raise InvalidInput(f"study {study_uid} has no instance to reject")
        references = [Reference(study_uid, r.series_instance_uid, r.sop_instance_uid, r.sop_class_uid)
                      for r in rows]
        note_uid = _store_note(ctx, principal, study_uid, facility, reason, references,
                               header_keys=[r.object_key for r in rows[:3]], fallback=fallback)
        with ctx.read_sessions() as session:
            rejected = list(session.scalars(select(RejectedInstance.sop_instance_uid).where(
                RejectedInstance.note_sop_instance_uid == note_uid).order_by(RejectedInstance.id)))
    return RejectionResult(study_uid, reason, note_uid, rejected)


def restore(ctx: AppContext, principal: Principal, study_uid: str, *, series: Sequence[str] | None = None,
            instances: Sequence[str] | None = None) -> RestoreResult:
    """Bring rejected (not deleted) instances back: the whole study's, or those of the listed series/instances."""
    with refusals_audited(ctx, principal, "instance.restore", study_uid):
        authorize(principal, Capability.STUDY_REJECT)
        series_uids, sop_uids = _unique(series), _unique(instances)
        with ctx.read_sessions() as session:
            if not _may_change(session, principal, study_uid):
                raise NotFound(f"no study {study_uid}")
            rows = list(session.scalars(select(RejectedInstance).where(
                RejectedInstance.study_instance_uid == study_uid).order_by(RejectedInstance.id)))
            facility = session.scalar(select(Study.facility).where(Study.study_instance_uid == study_uid)) or ""
            fallback = _index_header(session, study_uid)
            note_keys = dict(session.execute(select(RejectionNote.sop_instance_uid, RejectionNote.object_key)
                                             .where(RejectionNote.study_instance_uid == study_uid)).all())
        unknown_series = sorted(set(series_uids) - {r.series_instance_uid for r in rows})
        unknown_sops = sorted(set(sop_uids) - {r.sop_instance_uid for r in rows})
        if unknown_series or unknown_sops:
            raise InvalidInput("not rejected series/instances of this study: "
                               + ", ".join([*unknown_series, *unknown_sops][:5]))
        chosen = [r for r in rows if not (series_uids or sop_uids)
                  or r.series_instance_uid in series_uids or r.sop_instance_uid in sop_uids]
        if not chosen:
            raise InvalidInput(f"study {study_uid} has no rejected instance to restore")
        if principal.role is Role.RADIOLOGIST and any(r.reason != QUALITY for r in chosen):
            raise Forbidden("a radiologist may restore only what was rejected for quality reasons")
        chosen_uids = {r.sop_instance_uid for r in chosen}
        created: list[str] = []
        for note_uid in dict.fromkeys(r.note_sop_instance_uid for r in chosen):
            rest = [r for r in rows if r.note_sop_instance_uid == note_uid and r.sop_instance_uid not in chosen_uids]
            if rest:  # the store keeps one note per active rejection: a new note for what stays rejected
                references = [Reference(study_uid, r.series_instance_uid, r.sop_instance_uid,
                                        str(json.loads(r.snapshot).get("sop_class_uid", ""))) for r in rest]
                created.append(_store_note(ctx, principal, study_uid, facility, rest[0].reason, references,
                                           header_keys=[r.object_key for r in rest[:3]], fallback=fallback))
        with ctx.sessions() as session, session.begin():
            restored, emptied, task_ids = _put_back(session, principal, study_uid, sorted(chosen_uids))
        _notify(ctx, task_ids)
    for note_uid in emptied:
        key = note_keys.get(note_uid)
        if key is None:
            continue
        try:
            ctx.store.delete(key)
        except StorageError as exc:
            log.error("could not delete restored rejection note %s (pacs check lists it): %s", key, exc)
    return RestoreResult(study_uid, restored, emptied, created)


def _put_back(session: Session, principal: Principal, study_uid: str,
              sop_uids: list[str]) -> tuple[list[str], list[str], tuple[int, ...]]:
    """One transaction: the rows back from their snapshots, counts, tasks, emptied notes removed, audit."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid).with_for_update()).one()
    rows: list[RejectedInstance] = []
    for part in chunks(sop_uids):
        rows += session.scalars(select(RejectedInstance).where(
            RejectedInstance.study_instance_uid == study_uid, RejectedInstance.sop_instance_uid.in_(part)))
    if not rows:
        raise Conflict("nothing to restore any more (restored or deleted meanwhile)")
    series_rows: dict[str, Series] = {}
    for series_part in chunks(sorted({r.series_instance_uid for r in rows})):
        series_rows.update((s.series_instance_uid, s) for s in session.scalars(select(Series).where(
            Series.study_fk == study.id, Series.series_instance_uid.in_(series_part))))
    series_by_id: dict[int, Series] = {}
    added: dict[int, int] = {}
    tasks: list[int] = []
    notes = {r.note_sop_instance_uid for r in rows}
    restored: list[str] = []
    for row in rows:
        series = series_rows.get(row.series_instance_uid)
        if series is None:  # corrections refuse to move a series with rejected instances: only a guard
            raise Conflict(f"series {row.series_instance_uid} is no longer in study {study_uid} (moved to another "
                           "study or deleted since the rejection); nothing was restored")
        instance = _from_snapshot(row.snapshot, series.id)
        session.add(instance)
        if instance.thumbnail_key is None:
            tasks += arm_derived_tasks(session, instance.sop_instance_uid, instance.sha256, INSTANCE_TASKS)
        series_by_id[series.id] = series
        added[series.id] = added.get(series.id, 0) + 1
        restored.append(row.sop_instance_uid)
        session.delete(row)
    session.flush()
    tasks += _recount(session, study, series_by_id, added, sign=+1)
    still: set[str] = set()
    for note_part in chunks(sorted(notes)):
        still.update(session.scalars(select(RejectedInstance.note_sop_instance_uid).where(
            RejectedInstance.note_sop_instance_uid.in_(note_part))))
    emptied = sorted(notes - still)
    for note_part in chunks(emptied):
        for note in session.scalars(select(RejectionNote).where(RejectionNote.sop_instance_uid.in_(note_part))):
            session.delete(note)
    audit.append(session, action="instance.restore", actor=principal.subject, role=principal.role.value,
                 source_address=principal.source_address, patient_id=_patient_id(session, study),
                 study_instance_uid=study_uid,
                 detail=f"count={len(restored)} notes_deleted={','.join(emptied)}"[:2000])
    return restored, emptied, tuple(tasks)


def list_rejected(session: Session, principal: Principal, *, study_uid: str | None = None,
                  reason: str | None = None, limit: int = MAX_LISTED) -> list[RejectedItem]:
    """Rejected (not deleted) instances the principal may see, newest first. The caller audits the read."""
    authorize(principal, Capability.STUDY_REJECT)
    if reason and reason not in REASON_CODES:
        raise InvalidInput(f"unknown rejection reason {reason!r}: one of {', '.join(REASON_CODES)}")
    stmt = (select(RejectedInstance)
            .join(Study, Study.study_instance_uid == RejectedInstance.study_instance_uid)
            .where(owned_study_condition(principal.scope)))
    if study_uid:
        stmt = stmt.where(RejectedInstance.study_instance_uid == study_uid)
    if reason:
        stmt = stmt.where(RejectedInstance.reason == reason)
    rows = session.scalars(stmt.order_by(RejectedInstance.rejected_at.desc(), RejectedInstance.id.desc())
                           .limit(max(1, min(limit, MAX_LISTED))))
    return [RejectedItem(r.sop_instance_uid, r.series_instance_uid, r.study_instance_uid, r.facility, r.reason,
                         r.note_sop_instance_uid, r.rejected_at, r.rejected_by, r.object_key, r.size) for r in rows]


def _index_header(session: Session, study_uid: str) -> Dataset:
    """The study's patient and study attributes from the index (when no stored object can be read)."""
    ds = Dataset()
    found = session.execute(select(Study, Patient).join(Patient, Patient.id == Study.patient_fk)
                            .where(Study.study_instance_uid == study_uid)).one_or_none()
    ds.StudyInstanceUID = study_uid
    if found is not None:
        study, patient = found
        ds.PatientName, ds.PatientID = patient.patient_name, patient.patient_id
        ds.PatientBirthDate, ds.PatientSex = patient.patient_birth_date, patient.patient_sex
        ds.StudyDate, ds.StudyTime, ds.StudyID = study.study_date, study.study_time, study.study_id
        ds.AccessionNumber = study.accession_number
    return ds


def _store_note(ctx: AppContext, principal: Principal, study_uid: str, facility: str, reason: str,
                references: list[Reference], *, header_keys: list[str], fallback: Dataset) -> str:
    """Build a rejection note and store it through the one ingest function; its SOP Instance UID."""
    from pacs.reports.publish import read_evidence
    from pacs.runtime import make_ingestor

    headers = [h for h in read_evidence(ctx, header_keys[:1]) if str(h.get("StudyInstanceUID", "")) == study_uid]
    note_uid = generate_uid()
    dataset = build_rejection_note(headers[0] if headers else fallback, references, reason,
                                   series_instance_uid=generate_uid(), sop_instance_uid=note_uid)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    publisher = ctx.extras.get("ingest_notify")
    source = IngestSource(transport="rejection", user=principal.subject, role=principal.role.value,
                          address=principal.source_address, facility=facility)
    outcome = make_ingestor(ctx, notify=publisher if callable(publisher) else None).ingest(buffer.getvalue(), source)
    if outcome.status in (IngestStatus.STORAGE_UNAVAILABLE, IngestStatus.INDEX_UNAVAILABLE):
        raise StorageUnavailable(outcome.message)
    if not outcome.ok:
        raise Conflict(f"the rejection could not be applied: {outcome.message}")
    return note_uid


def _notify(ctx: AppContext, task_ids: tuple[int, ...]) -> None:
    publisher = ctx.extras.get("ingest_notify")
    if task_ids and callable(publisher):
        try:
            publisher(task_ids)
        except Exception as exc:  # the relay publishes pending rows later anyway
            log.warning("could not hand derived tasks to the publisher: %s", exc)
