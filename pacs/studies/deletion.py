"""Deleting studies and rejected instances: index rows, stored objects, derived products and pending work.

A deletion is a deliberate, audited act (SPEC §4), never half-visible. Its order is what keeps it safe:

1. **One index transaction** removes every row that names what goes (see :func:`_remove_study_rows` and
   :func:`remove_rejected_rows` for the list) and appends the audit row (``study.delete`` / ``instance.delete``:
   who, why, the counts, the patient and study). After the commit nothing points at the objects any more.
2. **Then the objects are deleted from the store**: every version (current, prior, rejected), rejection
   notes, correction markers, thumbnails and metadata documents. Each ``dicom/`` key got a tombstone
   (:mod:`pacs.studies.tombstones`) in the transaction of step 1; it is deleted holding that row's lock, after
   checking that no index row names it again, and marked gone. Ingest removes the tombstone of a key it indexes
   and, when it found one, puts its bytes again before it answers: a modality re-sending the same bytes (the
   same content-addressed key) at any moment of a deletion keeps its acknowledged object. A process that dies
   between the steps leaves pending tombstones (the retention sweep retries them) and unreferenced objects
   (``pacs check`` lists the ``dicom/`` ones as orphans, ``pacs check --repair`` collects them).

Lock order: the study rows first (``FOR UPDATE``, in id order), then the rows that hang on them — the order a
restore and ingest take too. A sweep or ``delete_rejected`` never removes a study row: an emptied study stays,
with its reports, consults, share links and orders (hidden from image queries), until an explicit study
deletion (or a confirmed study retention) removes it.

After a deletion the same SOP Instance UID can be received again: nothing of it remains in the index.

What stays on purpose: the audit trail (append-only), imaging orders (primary RIS data: their link to the
study is cleared, the order kept), performed procedure steps (what the modality reported), storage commitment
transactions (their result was decided when the images were there) and the reconciliation queue (held objects
are not filed into the study). A patient record left with no study goes, and with it a person (national
identifiers) that had no other record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, select, true, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacs import audit
from pacs.consults.models import Consult, ConsultAnswer
from pacs.context import AppContext
from pacs.db.models import DerivedTask, ForwardJob, Instance, InstanceVersion, Patient, Series, Study
from pacs.errors import InvalidInput, NotFound
from pacs.persons.models import Person, PersonIdentifier
from pacs.reconciliation.models import ReconciliationItem
from pacs.reports.models import Hl7Outbound, KeyImageSelection, Report, ReportVersion, StudyClaim
from pacs.ris.models import ImagingOrder
from pacs.security.access import authorize, owned_study_condition
from pacs.security.models import StudyShare
from pacs.security.principal import Principal
from pacs.security.roles import Capability
from pacs.sharing.models import ShareLink
from pacs.studies import tombstones
from pacs.studies.common import check_reason, chunks, refusals_audited
from pacs.studies.models import RejectedInstance, RejectionNote
from pacs.studies.tombstones import DeletedObject
from storage import StorageError
from storage.keys import (
    RECONCILIATION_PREFIX,
    correction_marker_prefix,
    instance_metadata_key,
    is_archived_uid,
    parse_instance_key,
    parse_reconciliation_key,
    series_metadata_key,
    series_thumbnail_key,
    study_thumbnail_key,
    thumbnail_key,
)

log = logging.getLogger(__name__)

# a tombstone left pending this long (a deletion that died, a store that refused) is retried by the sweep
PENDING_RETRY_AFTER = timedelta(hours=1)
# a gone tombstone is kept this long (an ingest that put the bytes before the deletion still finds it)
GONE_KEPT_FOR = timedelta(days=1)


@dataclass
class StoreCleanup:
    """The store keys a committed deletion freed, each with the UID that owns it (a SOP Instance UID, a Series
    or a Study Instance UID): a key is deleted only while its owner is absent from the index."""

    instance_keys: dict[str, str] = field(default_factory=dict)  # dicom/ key → SOP Instance UID
    derived_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # key → (level, uid)
    marker_sops: set[str] = field(default_factory=set)  # SOP instances whose correction markers go
    deleted: int = 0
    kept: list[str] = field(default_factory=list)  # keys whose owner came back (a re-send): not deleted
    failed: list[str] = field(default_factory=list)  # keys the store refused to delete (left for pacs check)

    def add_instance(self, key: str | None, sop_uid: str) -> None:
        if key:
            self.instance_keys[key] = sop_uid

    def add_markers(self, sop_uids: Iterable[str]) -> None:
        """The correction markers (``corrections/{sop}/``) of SOP instances that leave the index."""
        self.marker_sops.update(sop for sop in sop_uids if is_archived_uid(sop))

    def add_derived(self, key: str | None, level: str, uid: str) -> None:
        if key:
            self.derived_keys[key] = (level, uid)

    def add_instance_products(self, study_uid: str, series_uid: str, sop_uid: str) -> None:
        """The thumbnail and DICOM JSON fragment a derived task writes for an instance."""
        if all(is_archived_uid(u) for u in (study_uid, series_uid, sop_uid)):
            self.add_derived(thumbnail_key(study_uid, series_uid, sop_uid), "instance", sop_uid)
            self.add_derived(instance_metadata_key(study_uid, series_uid, sop_uid), "instance", sop_uid)

    def add_series_products(self, study_uid: str, series_uid: str) -> None:
        if is_archived_uid(study_uid) and is_archived_uid(series_uid):
            self.add_derived(series_thumbnail_key(study_uid, series_uid), "series", series_uid)
            self.add_derived(series_metadata_key(study_uid, series_uid), "series", series_uid)

    def add_study_products(self, study_uid: str) -> None:
        if is_archived_uid(study_uid):
            self.add_derived(study_thumbnail_key(study_uid), "study", study_uid)


@dataclass
class StudyDeletion:
    """What one study's deletion removed."""

    study_instance_uid: str
    patient_id: str = ""
    patient_name: str = ""
    facility: str = ""
    series: int = 0
    instances: int = 0
    prior_versions: int = 0
    rejected_instances: int = 0
    rejection_notes: int = 0
    reports: int = 0
    share_links: int = 0
    consults: int = 0
    patient_removed: bool = False
    objects_deleted: int = 0
    objects_kept: list[str] = field(default_factory=list)

    def counts(self) -> str:
        return (f"series={self.series} instances={self.instances} prior_versions={self.prior_versions} "
                f"rejected={self.rejected_instances} rejection_notes={self.rejection_notes} reports={self.reports} "
                f"share_links={self.share_links} consults={self.consults} "
                f"patient_removed={'yes' if self.patient_removed else 'no'}")

    def as_dict(self) -> dict[str, object]:
        return {"study_instance_uid": self.study_instance_uid, "patient_id": self.patient_id,
                "facility": self.facility, "series": self.series, "instances": self.instances,
                "prior_versions": self.prior_versions, "rejected_instances": self.rejected_instances,
                "rejection_notes": self.rejection_notes, "reports": self.reports, "share_links": self.share_links,
                "consults": self.consults, "patient_removed": self.patient_removed,
                "objects_deleted": self.objects_deleted}


@dataclass
class RejectedDeletion:
    """What deleting rejected instances removed, per study (an emptied series or study goes too)."""

    study_instance_uid: str
    patient_id: str = ""
    sop_instance_uids: list[str] = field(default_factory=list)
    reasons: set[str] = field(default_factory=set)
    prior_versions: int = 0
    rejection_notes: int = 0
    series_removed: list[str] = field(default_factory=list)
    study_emptied: bool = False  # no image left: the study row stays (reports, consults, links), hidden from queries

    def counts(self) -> str:
        return (f"instances={len(self.sop_instance_uids)} prior_versions={self.prior_versions} "
                f"rejection_notes={self.rejection_notes} series_removed={len(self.series_removed)} "
                f"study_emptied={'yes' if self.study_emptied else 'no'} "
                f"rejected_for={','.join(sorted(self.reasons))}")

    def as_dict(self) -> dict[str, object]:
        return {"study_instance_uid": self.study_instance_uid, "patient_id": self.patient_id,
                "sop_instance_uids": self.sop_instance_uids, "reasons": sorted(self.reasons),
                "prior_versions": self.prior_versions, "rejection_notes": self.rejection_notes,
                "series_removed": self.series_removed, "study_emptied": self.study_emptied}


# -- deleting a study --------------------------------------------------------------------------------------------

StudyCheck = Callable[[Session, Study], None]


def delete_study(ctx: AppContext, principal: Principal, study_uid: str, reason: str | None, *,
                 check: StudyCheck | None = None, policy: str = "") -> StudyDeletion:
    """Delete one study and everything that hangs on it (see the module docstring); audited as ``study.delete``.

    ``check`` runs inside the transaction with the locked study row and may refuse (raise a PacsError): the
    retention path uses it to delete only a study that is really due. ``policy`` is added to the audit row.
    Refusals (no capability, unknown or out-of-scope study: 404 alike, no reason, the check) are audited.
    """
    action = "study.delete"
    with refusals_audited(ctx, principal, action, study_uid, f"{policy} " if policy else ""):
        authorize(principal, Capability.STUDY_DELETE)
        why = check_reason(reason, "deletion")
        with ctx.sessions() as session, session.begin():
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid,
                                                        owned_study_condition(principal.scope))
                                    .with_for_update()).one_or_none()
            if study is None:
                raise NotFound(f"no study {study_uid}")
            if check is not None:
                check(session, study)
            cleanup = StoreCleanup()
            result = _remove_study_rows(session, study, cleanup)
            tombstones.add(session, cleanup.instance_keys)
            audit.append(session, action=action, actor=principal.subject, role=principal.role.value,
                         source_address=principal.source_address, patient_id=result.patient_id,
                         study_instance_uid=study_uid,
                         detail=f"reason={why!r} {policy + ' ' if policy else ''}{result.counts()} "
                                f"objects={len(cleanup.instance_keys)}")
    delete_objects(ctx, cleanup, study_prefixes=[study_uid])
    result.objects_deleted, result.objects_kept = cleanup.deleted, cleanup.kept
    log.info("deleted study %s (%s) by %s", study_uid, result.counts(), principal.subject)
    return result


def _remove_study_rows(session: Session, study: Study, cleanup: StoreCleanup) -> StudyDeletion:
    """Remove the study's rows and every row that names it, inside the caller's transaction; the freed keys go
    to ``cleanup``. The study row must be locked by the caller (ingest locks it too, so none lands meanwhile)."""
    uid = study.study_instance_uid
    patient = session.get(Patient, study.patient_fk)
    result = StudyDeletion(uid, patient_id=patient.patient_id if patient else "",
                           patient_name=patient.patient_name if patient else "", facility=study.facility)
    series_rows = session.execute(select(Series.id, Series.series_instance_uid)
                                  .where(Series.study_fk == study.id)).all()
    series_ids = [row[0] for row in series_rows]
    series_uids = [row[1] for row in series_rows]
    instances = session.execute(
        select(Instance.sop_instance_uid, Instance.object_key, Series.series_instance_uid)
        .join(Series, Series.id == Instance.series_fk).where(Series.study_fk == study.id)).all()
    rejected = session.execute(
        select(RejectedInstance.sop_instance_uid, RejectedInstance.object_key,
               RejectedInstance.series_instance_uid)
        .where(RejectedInstance.study_instance_uid == uid)).all()
    sops = [row[0] for row in instances] + [row[0] for row in rejected]
    for sop, key, series_uid in (*instances, *rejected):
        cleanup.add_instance(key, sop)
        cleanup.add_instance_products(uid, series_uid, sop)
    for series_uid in series_uids:
        cleanup.add_series_products(uid, series_uid)
    cleanup.add_study_products(uid)
    result.series, result.instances, result.rejected_instances = len(series_uids), len(instances), len(rejected)

    result.prior_versions = _remove_priors(session, sops, cleanup)
    cleanup.add_markers(sops)
    _remove_pending_work(session, sops, series_uids)
    for chunk in chunks(series_ids):
        session.execute(delete(Instance).where(Instance.series_fk.in_(chunk)))
    session.execute(delete(RejectedInstance).where(RejectedInstance.study_instance_uid == uid))
    result.rejection_notes = _remove_notes(session, RejectionNote.study_instance_uid == uid, cleanup)

    # what hangs on the study: reports (versions, HL7 messages), claims, key images, links, shares, consults
    report_ids = list(session.scalars(select(Report.id).where(Report.study_instance_uid == uid)))
    if report_ids:
        session.execute(delete(Hl7Outbound).where(Hl7Outbound.report_fk.in_(report_ids)))
        session.execute(delete(ReportVersion).where(ReportVersion.report_fk.in_(report_ids)))
        session.execute(delete(Report).where(Report.id.in_(report_ids)))
    result.reports = len(report_ids)
    session.execute(delete(StudyClaim).where(StudyClaim.study_instance_uid == uid))
    session.execute(delete(KeyImageSelection).where(KeyImageSelection.study_instance_uid == uid))
    result.share_links = len(session.scalars(select(ShareLink.id).where(ShareLink.study_fk == study.id)).all())
    session.execute(delete(ShareLink).where(ShareLink.study_fk == study.id))
    session.execute(delete(StudyShare).where(StudyShare.study_fk == study.id))
    consult_ids = list(session.scalars(select(Consult.id).where(Consult.study_instance_uid == uid)))
    if consult_ids:
        session.execute(delete(ConsultAnswer).where(ConsultAnswer.consult_fk.in_(consult_ids)))
        session.execute(delete(Consult).where(Consult.id.in_(consult_ids)))
    result.consults = len(consult_ids)
    session.execute(update(ImagingOrder).where(ImagingOrder.linked_study_instance_uid == uid)
                    .values(linked_study_instance_uid=""))

    session.execute(delete(Series).where(Series.study_fk == study.id))
    patient_fk = study.patient_fk
    session.delete(study)
    session.flush()
    if patient is not None and session.scalar(select(Study.id).where(Study.patient_fk == patient_fk)
                                              .limit(1)) is None:
        person_fk = patient.person_fk
        session.delete(patient)
        session.flush()
        result.patient_removed = True
        if person_fk is not None and session.scalar(select(Patient.id).where(Patient.person_fk == person_fk)
                                                    .limit(1)) is None:
            # the person's national identifiers named only this record: they go with it
            session.execute(delete(PersonIdentifier).where(PersonIdentifier.person_fk == person_fk))
            session.execute(delete(Person).where(Person.id == person_fk))
    session.flush()
    return result


def _remove_priors(session: Session, sops: Sequence[str], cleanup: StoreCleanup) -> int:
    count = 0
    for chunk in chunks(sops):
        rows = session.execute(delete(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(chunk))
                               .returning(InstanceVersion.sop_instance_uid, InstanceVersion.object_key)).all()
        for sop, key in rows:
            cleanup.add_instance(key, sop)
        count += len(rows)
    return count


def _remove_pending_work(session: Session, sops: Sequence[str], series_uids: Sequence[str]) -> None:
    """Derived tasks and forwarding jobs of what goes: nothing is built or sent for a deleted object."""
    for chunk in chunks([*sops, *series_uids]):
        session.execute(delete(DerivedTask).where(DerivedTask.subject_uid.in_(chunk)))
    for chunk in chunks(sops):
        session.execute(delete(ForwardJob).where(ForwardJob.sop_instance_uid.in_(chunk)))


def _remove_notes(session: Session, condition: ColumnElement[bool], cleanup: StoreCleanup) -> int:
    rows = session.execute(delete(RejectionNote).where(condition)
                           .returning(RejectionNote.sop_instance_uid, RejectionNote.object_key)).all()
    for sop, key in rows:
        cleanup.add_instance(key, sop)
        parsed = parse_instance_key(key)
        if parsed is not None:
            cleanup.add_instance_products(parsed[0], parsed[1], sop)
    return len(rows)


# -- deleting rejected instances ---------------------------------------------------------------------------------

def remove_rejected_rows(session: Session, condition: ColumnElement[bool],
                         cleanup: StoreCleanup) -> dict[str, RejectedDeletion]:
    """Delete the ``rejected_instance`` rows matching ``condition`` — conditional DELETEs … RETURNING, so of two
    processes deleting the same rows each row goes to exactly one — and what only they needed: their prior
    versions, pending work, derived products, correction markers, a rejection note none of whose instances is
    left, and a series left with nothing. The study row always stays (an emptied one keeps its reports, consults,
    share links and orders: only an explicit study deletion removes those). Locks the studies first, in id order
    (as restore and ingest do). Returns what went, per study (no audit row: the caller writes it)."""
    study_uids = sorted(set(session.scalars(select(RejectedInstance.study_instance_uid).where(condition))))
    if not study_uids:
        return {}
    _lock_studies(session, study_uids)
    rows: list[tuple[str, str, str, str, str, str]] = []
    for chunk in chunks(study_uids):
        rows += session.execute(delete(RejectedInstance).where(
            condition, RejectedInstance.study_instance_uid.in_(chunk)).returning(
            RejectedInstance.sop_instance_uid, RejectedInstance.series_instance_uid,
            RejectedInstance.study_instance_uid, RejectedInstance.object_key, RejectedInstance.reason,
            RejectedInstance.note_sop_instance_uid)).tuples().all()
    by_study: dict[str, RejectedDeletion] = {}
    for sop, series_uid, study_uid, key, reason, _note in rows:
        item = by_study.setdefault(study_uid, RejectedDeletion(study_uid))
        item.sop_instance_uids.append(sop)
        item.reasons.add(reason)
        cleanup.add_instance(key, sop)
        cleanup.add_instance_products(study_uid, series_uid, sop)
    if not rows:
        return by_study
    sops = [row[0] for row in rows]
    # a SOP Instance UID that is current again (never, while rejected; kept safe) keeps its prior versions
    current: set[str] = set()
    for chunk in chunks(sops):
        current.update(session.scalars(select(Instance.sop_instance_uid)
                                       .where(Instance.sop_instance_uid.in_(chunk))))
    gone = [sop for sop in sops if sop not in current]
    study_of = {row[0]: row[2] for row in rows}
    for chunk in chunks(gone):
        for sop, key in session.execute(delete(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(chunk))
                                        .returning(InstanceVersion.sop_instance_uid, InstanceVersion.object_key)):
            cleanup.add_instance(key, sop)
            by_study[study_of[sop]].prior_versions += 1
    cleanup.add_markers(gone)
    _remove_pending_work(session, gone, [])

    for note_uid, study_uid in sorted({(row[5], row[2]) for row in rows}):
        if session.scalar(select(RejectedInstance.id).where(RejectedInstance.note_sop_instance_uid == note_uid)
                          .limit(1)) is None:
            by_study[study_uid].rejection_notes += _remove_notes(
                session, RejectionNote.sop_instance_uid == note_uid, cleanup)

    for series_uid, study_uid in sorted({(row[1], row[2]) for row in rows}):
        series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).one_or_none()
        if series is None or _series_in_use(session, series):
            continue
        session.execute(delete(DerivedTask).where(DerivedTask.subject_uid == series_uid))
        session.delete(series)
        cleanup.add_series_products(study_uid, series_uid)
        by_study[study_uid].series_removed.append(series_uid)
    session.flush()
    for study_uid, item in by_study.items():
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
        if study is None:
            continue
        patient = session.get(Patient, study.patient_fk)
        item.patient_id = patient.patient_id if patient else ""
        if _study_empty(session, study):
            item.study_emptied = True
            if is_archived_uid(study_uid):  # its thumbnail showed images that are gone: it goes while none is back
                cleanup.add_derived(study_thumbnail_key(study_uid), "study-images", study_uid)
    tombstones.add(session, cleanup.instance_keys)
    return by_study


def _lock_studies(session: Session, study_uids: Sequence[str]) -> None:
    """``FOR UPDATE`` on the studies' rows in id order: every writer takes them in the same order (no deadlock)."""
    ids: list[int] = []
    for chunk in chunks(study_uids):
        ids += session.scalars(select(Study.id).where(Study.study_instance_uid.in_(chunk)))
    for id_chunk in chunks(sorted(ids)):
        session.scalars(select(Study.id).where(Study.id.in_(id_chunk)).order_by(Study.id).with_for_update()).all()


def _series_in_use(session: Session, series: Series) -> bool:
    return (session.scalar(select(Instance.id).where(Instance.series_fk == series.id).limit(1)) is not None
            or session.scalar(select(RejectedInstance.id).where(
                RejectedInstance.series_instance_uid == series.series_instance_uid).limit(1)) is not None)


def _study_empty(session: Session, study: Study) -> bool:
    """No series row left and no rejected instance waiting: no image of the study remains to show or restore."""
    return (session.scalar(select(Series.id).where(Series.study_fk == study.id).limit(1)) is None
            and session.scalar(select(RejectedInstance.id).where(
                RejectedInstance.study_instance_uid == study.study_instance_uid).limit(1)) is None)


def audit_rejected_deletion(session: Session, principal: Principal | None, deleted: Iterable[RejectedDeletion],
                            why: str) -> None:
    """One ``instance.delete`` row per study, in the deleting transaction (``principal`` None: the sweep)."""
    for item in deleted:
        audit.append(session, action="instance.delete",
                     actor=principal.subject if principal else "system:retention",
                     role=principal.role.value if principal else "system",
                     source_address=principal.source_address if principal else "",
                     patient_id=item.patient_id, study_instance_uid=item.study_instance_uid,
                     detail=f"reason={why!r} {item.counts()} sops={','.join(item.sop_instance_uids[:20])}"
                            + (" …" if len(item.sop_instance_uids) > 20 else ""))


def delete_rejected(ctx: AppContext, principal: Principal, sop_uids: Sequence[str],
                    reason: str | None) -> list[RejectedDeletion]:
    """Delete rejected instances now (an admin, before their retention ends); audited as ``instance.delete``.
    An instance that is not rejected, or whose study is outside the principal's facility, is a 404. The study
    row stays, even when emptied."""
    action = "instance.delete"
    first = sop_uids[0] if sop_uids else ""
    with refusals_audited(ctx, principal, action, "", f"sop={first} "):
        authorize(principal, Capability.STUDY_DELETE)
        why = check_reason(reason, "deletion")
        if not sop_uids:
            raise InvalidInput("name the rejected instances to delete")
        wanted = sorted(set(sop_uids))
        with ctx.sessions() as session, session.begin():
            owned = select(Study.study_instance_uid).where(owned_study_condition(principal.scope))
            condition = and_(RejectedInstance.sop_instance_uid.in_(wanted),
                             RejectedInstance.study_instance_uid.in_(owned) if not principal.scope.unrestricted
                             else true())
            found = set(session.scalars(select(RejectedInstance.sop_instance_uid).where(condition)))
            missing = [sop for sop in wanted if sop not in found]
            if missing:
                raise NotFound(f"no rejected instance {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            cleanup = StoreCleanup()
            deleted = remove_rejected_rows(session, condition, cleanup)
            audit_rejected_deletion(session, principal, deleted.values(), why)
    delete_objects(ctx, cleanup)
    return list(deleted.values())


# -- the store, after the commit ---------------------------------------------------------------------------------

#: TEST-ONLY: called with each ``dicom/`` key between its tombstone's claim and its deletion from the store (the
#: deletion tests pause here to re-send the object meanwhile). Never set in production.
before_object_delete: Callable[[str], None] | None = None


def delete_objects(ctx: AppContext, cleanup: StoreCleanup, *, study_prefixes: Sequence[str] = ()) -> StoreCleanup:
    """Delete the freed keys: each ``dicom/`` key under its tombstone's lock (:func:`delete_tombstoned`), the
    derived products and correction markers whose owner is still absent from the index; then, for a study that
    went whole, whatever derived product is left under its ``derived/`` folders. A store error leaves the key
    (pending tombstone, or unreferenced object for ``pacs check``), never fails the committed deletion."""
    for key, sop in cleanup.instance_keys.items():
        delete_tombstoned(ctx, cleanup, key, sop)
    by_level: dict[str, list[tuple[str, str]]] = {}
    for key, (level, uid) in cleanup.derived_keys.items():
        by_level.setdefault(level, []).append((key, uid))
    for level, items in by_level.items():
        for batch in chunks(items):
            present = _present(ctx, level, [uid for _key, uid in batch])
            for key, uid in batch:
                _delete_key(ctx, cleanup, key, keep=uid in present)
    for sops in chunks(sorted(cleanup.marker_sops)):
        present = _present(ctx, "instance", sops)
        for sop in sops:
            if sop in present:
                continue
            try:
                for info in list(ctx.store.list(correction_marker_prefix(sop))):
                    _delete_key(ctx, cleanup, info.key, keep=False)
            except StorageError as exc:
                log.warning("could not list the correction markers of %s after a deletion: %s", sop, exc)
    for study_uid in study_prefixes:
        if not is_archived_uid(study_uid) or _present(ctx, "study", [study_uid]):
            continue
        for prefix in (f"derived/thumbnails/{study_uid}/", f"derived/metadata/{study_uid}/"):
            try:
                for info in list(ctx.store.list(prefix)):
                    _delete_key(ctx, cleanup, info.key, keep=False)
            except StorageError as exc:
                log.warning("could not list %s after a deletion: %s", prefix, exc)
    return cleanup


def delete_tombstoned(ctx: AppContext, cleanup: StoreCleanup, key: str, sop_uid: str) -> None:
    """Delete one ``dicom/`` key in a short transaction holding its tombstone's row lock: no tombstone (an ingest
    of the same bytes took it: the object is that ingest's now) or an index row naming the key → kept; else
    deleted from the store and the tombstone marked gone. A store error rolls back (the tombstone stays pending:
    the retention sweep retries it)."""
    try:
        with ctx.sessions() as session, session.begin():
            row = session.scalars(select(DeletedObject).where(DeletedObject.object_key == key,
                                                              DeletedObject.state == tombstones.PENDING)
                                  .with_for_update()).one_or_none()
            if row is None:
                cleanup.kept.append(key)
                return
            if _names_key(session, key, sop_uid):
                session.delete(row)  # indexed again (not through ingest's normal path): the object is in use
                cleanup.kept.append(key)
                return
            if before_object_delete is not None:
                before_object_delete(key)
            existed = ctx.store.exists(key)
            ctx.store.delete(key)
            row.state = tombstones.GONE
        if existed:
            cleanup.deleted += 1
    except (StorageError, SQLAlchemyError) as exc:
        log.warning("could not delete %s (its tombstone stays pending, retried by the retention sweep): %s",
                    key, str(exc).splitlines()[0][:300])
        cleanup.failed.append(key)


def _names_key(session: Session, key: str, sop_uid: str) -> bool:
    """Whether an index row (current, prior, rejected version or rejection note) or a held object of the
    reconciliation queue (a ``reconciliation/`` key: a failed ingest's tombstone, pacs.ingest.service) names
    ``key``."""
    if key.startswith(RECONCILIATION_PREFIX):  # held objects are keyed by their SHA-256, which the queue indexes
        return session.scalar(select(ReconciliationItem.id).where(
            ReconciliationItem.sha256 == (parse_reconciliation_key(key) or ""),
            ReconciliationItem.object_key == key).limit(1)) is not None
    return any(session.scalar(select(model.id).where(model.sop_instance_uid == sop_uid, model.object_key == key)
                              .limit(1)) is not None
               for model in (Instance, InstanceVersion, RejectedInstance, RejectionNote))


def sweep_tombstones(ctx: AppContext, *, now: datetime | None = None, limit: int = 500) -> int:
    """The retention sweep's share: retry the objects of tombstones left pending (a deletion that died, a store
    that refused) and forget the gone ones older than a day. Returns how many objects it deleted."""
    moment = now or datetime.now(UTC)
    old_gone = (DeletedObject.state == tombstones.GONE, DeletedObject.created_at <= moment - GONE_KEPT_FOR)
    with ctx.read_sessions() as session:
        stale = list(session.scalars(select(DeletedObject.object_key).where(
            DeletedObject.state == tombstones.PENDING, DeletedObject.created_at <= moment - PENDING_RETRY_AFTER)
            .order_by(DeletedObject.id).limit(limit)))
        forget = session.scalar(select(DeletedObject.id).where(*old_gone).limit(1)) is not None
    cleanup = StoreCleanup()
    for key in stale:
        parsed = parse_instance_key(key)
        delete_tombstoned(ctx, cleanup, key, parsed[2] if parsed else "")
    if forget:  # a pass with nothing to forget takes no write lock
        with ctx.sessions() as session, session.begin():
            session.execute(delete(DeletedObject).where(*old_gone))
    return cleanup.deleted


def _delete_key(ctx: AppContext, cleanup: StoreCleanup, key: str, *, keep: bool) -> None:
    """A derived product or correction marker (not counted as an object; no tombstone: ingest never puts one)."""
    if keep:
        cleanup.kept.append(key)
        return
    try:
        ctx.store.delete(key)
    except StorageError as exc:
        log.warning("could not delete %s (left for pacs check): %s", key, exc)
        cleanup.failed.append(key)


def _present(ctx: AppContext, level: str, uids: Sequence[str]) -> set[str]:
    """Which of ``uids`` the index names again (a re-send after the commit): their keys are theirs now.
    ``study-images``: the studies with an image again."""
    wanted = sorted(set(uids))
    found: set[str] = set()
    with ctx.read_sessions() as session:
        if level == "instance":
            for model in (Instance, InstanceVersion, RejectedInstance, RejectionNote):
                found.update(session.scalars(select(model.sop_instance_uid)
                                             .where(model.sop_instance_uid.in_(wanted))))
        elif level == "series":
            found.update(session.scalars(select(Series.series_instance_uid)
                                         .where(Series.series_instance_uid.in_(wanted))))
        elif level == "study-images":
            found.update(session.scalars(select(Study.study_instance_uid)
                                         .where(Study.study_instance_uid.in_(wanted), Study.number_of_instances > 0)))
        else:
            found.update(session.scalars(select(Study.study_instance_uid)
                                         .where(Study.study_instance_uid.in_(wanted))))
    return found
