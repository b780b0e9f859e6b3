"""Deleting studies and rejected instances: index rows, stored objects, derived products and pending work.

A deletion is a deliberate, audited act (SPEC §4), never half-visible. Its order is what keeps it safe:

1. **One index transaction** removes every row that names what goes (see :func:`_remove_study_rows` and
   :func:`_remove_rejected_rows` for the list) and appends the audit row (``study.delete`` / ``instance.delete``:
   who, why, the counts, the patient and study). After the commit nothing points at the objects any more.
2. **Then the objects are deleted from the store**: every version (current, prior, rejected), rejection
   notes, thumbnails and metadata documents. A process that dies between the two leaves only unreferenced
   objects: ``pacs check`` lists the ``dicom/`` ones as orphans and ``pacs check --repair`` collects them after
   its grace period. The reverse — an index row pointing at a deleted object — never happens: each key is
   deleted only when, checked immediately before, no index row names its owner again (a re-send of the same
   SOP Instance UID in that moment keeps its object; the same narrow window ``pacs check --repair`` documents
   remains on S3 between that check and the delete).

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
from typing import TypeVar

from sqlalchemy import ColumnElement, and_, delete, false, select, true, update
from sqlalchemy.orm import Session

from pacs import audit
from pacs.consults.models import Consult, ConsultAnswer
from pacs.context import AppContext
from pacs.db.models import DerivedTask, ForwardJob, Instance, InstanceVersion, Patient, Series, Study
from pacs.errors import InvalidInput, NotFound, PacsError
from pacs.persons.models import Person, PersonIdentifier
from pacs.reports.models import Hl7Outbound, KeyImageSelection, Report, ReportVersion, StudyClaim
from pacs.ris.models import ImagingOrder
from pacs.security.access import Forbidden, authorize
from pacs.security.models import StudyShare
from pacs.security.principal import AccessScope, Principal
from pacs.security.roles import Capability
from pacs.sharing.models import ShareLink
from pacs.studies.models import RejectedInstance, RejectionNote
from storage import StorageError
from storage.keys import (
    instance_metadata_key,
    is_archived_uid,
    parse_instance_key,
    series_metadata_key,
    series_thumbnail_key,
    study_thumbnail_key,
    thumbnail_key,
)

log = logging.getLogger(__name__)

MAX_REASON = 1024
_CHUNK = 500  # UIDs per IN list


@dataclass
class StoreCleanup:
    """The store keys a committed deletion freed, each with the UID that owns it (a SOP Instance UID, a Series
    or a Study Instance UID): a key is deleted only while its owner is absent from the index."""

    instance_keys: dict[str, str] = field(default_factory=dict)  # dicom/ key → SOP Instance UID
    derived_keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # key → (level, uid)
    deleted: int = 0
    kept: list[str] = field(default_factory=list)  # keys whose owner came back (a re-send): not deleted
    failed: list[str] = field(default_factory=list)  # keys the store refused to delete (left for pacs check)

    def add_instance(self, key: str | None, sop_uid: str) -> None:
        if key:
            self.instance_keys[key] = sop_uid

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
    study_removed: StudyDeletion | None = None

    def counts(self) -> str:
        text = (f"instances={len(self.sop_instance_uids)} prior_versions={self.prior_versions} "
                f"rejection_notes={self.rejection_notes} series_removed={len(self.series_removed)} "
                f"rejected_for={','.join(sorted(self.reasons))}")
        if self.study_removed is not None:
            text += f" study_removed=yes ({self.study_removed.counts()})"
        return text

    def as_dict(self) -> dict[str, object]:
        return {"study_instance_uid": self.study_instance_uid, "patient_id": self.patient_id,
                "sop_instance_uids": self.sop_instance_uids, "reasons": sorted(self.reasons),
                "prior_versions": self.prior_versions, "rejection_notes": self.rejection_notes,
                "series_removed": self.series_removed, "study_removed": self.study_removed is not None}


# -- who may delete what ---------------------------------------------------------------------------------------

def owned_condition(scope: AccessScope) -> ColumnElement[bool]:
    """The studies a principal may delete: its own facility's (never one it only borrows through a share, a
    consult or a person's priors), every study for an archive-wide principal, none for a patient or a link."""
    if scope.patient is not None or scope.patient_ids is not None or scope.study_uids is not None:
        return false()
    if scope.facilities is None:
        return true()
    return Study.facility.in_(sorted(scope.facilities))


def check_reason(reason: str | None) -> str:
    text = (reason or "").strip()
    if not text:
        raise InvalidInput("say why (reason): a deletion is written to the audit trail with its reason")
    if len(text) > MAX_REASON:
        raise InvalidInput(f"the reason is longer than {MAX_REASON} characters")
    return text


def audit_refusal(ctx: AppContext, principal: Principal, action: str, exc: Exception, *,
                  study_instance_uid: str = "", detail: str = "") -> None:
    """Every refused deletion is in the audit trail (issue 15, must-show 5), whatever the transport."""
    try:
        audit.record(ctx.sessions, action=action, actor=principal.subject, role=principal.role.value,
                     outcome="failure", source_address=principal.source_address,
                     study_instance_uid=study_instance_uid[:64],
                     detail=f"{detail} {type(exc).__name__}: {str(exc)[:300]}".strip())
    except Exception as audit_exc:  # the refusal stands even if the trail cannot be written now
        log.error("audit write failed for a refused %s: %s", action, audit_exc)


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
    try:
        authorize(principal, Capability.STUDY_DELETE)
        why = check_reason(reason)
        with ctx.sessions() as session, session.begin():
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid,
                                                        owned_condition(principal.scope))
                                    .with_for_update()).one_or_none()
            if study is None:
                raise NotFound(f"no study {study_uid}")
            if check is not None:
                check(session, study)
            cleanup = StoreCleanup()
            result = _remove_study_rows(session, study, cleanup)
            audit.append(session, action=action, actor=principal.subject, role=principal.role.value,
                         source_address=principal.source_address, patient_id=result.patient_id,
                         study_instance_uid=study_uid,
                         detail=f"reason={why!r} {policy + ' ' if policy else ''}{result.counts()} "
                                f"objects={len(cleanup.instance_keys)}")
    except (PacsError, Forbidden) as exc:
        audit_refusal(ctx, principal, action, exc, study_instance_uid=study_uid, detail=policy)
        raise
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
    _remove_pending_work(session, sops, series_uids)
    for chunk in _chunks(series_ids):
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
    for chunk in _chunks(sops):
        rows = session.execute(delete(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(chunk))
                               .returning(InstanceVersion.sop_instance_uid, InstanceVersion.object_key)).all()
        for sop, key in rows:
            cleanup.add_instance(key, sop)
        count += len(rows)
    return count


def _remove_pending_work(session: Session, sops: Sequence[str], series_uids: Sequence[str]) -> None:
    """Derived tasks and forwarding jobs of what goes: nothing is built or sent for a deleted object."""
    for chunk in _chunks([*sops, *series_uids]):
        session.execute(delete(DerivedTask).where(DerivedTask.subject_uid.in_(chunk)))
    for chunk in _chunks(sops):
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
    """Delete the ``rejected_instance`` rows matching ``condition`` — one conditional DELETE … RETURNING, so of
    two processes deleting the same rows each row goes to exactly one — and what only they needed: their prior
    versions, pending work, derived products, a rejection note none of whose instances is left, and a series or
    study left with nothing. Returns what went, per study (no audit row: the caller writes it)."""
    rows = session.execute(delete(RejectedInstance).where(condition).returning(
        RejectedInstance.sop_instance_uid, RejectedInstance.series_instance_uid,
        RejectedInstance.study_instance_uid, RejectedInstance.object_key, RejectedInstance.reason,
        RejectedInstance.note_sop_instance_uid)).all()
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
    for chunk in _chunks(sops):
        current.update(session.scalars(select(Instance.sop_instance_uid)
                                       .where(Instance.sop_instance_uid.in_(chunk))))
    gone = [sop for sop in sops if sop not in current]
    study_of = {row[0]: row[2] for row in rows}
    for chunk in _chunks(gone):
        for sop, key in session.execute(delete(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(chunk))
                                        .returning(InstanceVersion.sop_instance_uid, InstanceVersion.object_key)):
            cleanup.add_instance(key, sop)
            by_study[study_of[sop]].prior_versions += 1
    _remove_pending_work(session, gone, [])

    for note_uid, study_uid in {(row[5], row[2]) for row in rows}:
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
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)
                                .with_for_update()).one_or_none()
        if study is None:
            continue
        patient = session.get(Patient, study.patient_fk)
        item.patient_id = patient.patient_id if patient else ""
        if _study_empty(session, study):
            item.study_removed = _remove_study_rows(session, study, cleanup)
    return by_study


def _series_in_use(session: Session, series: Series) -> bool:
    return (session.scalar(select(Instance.id).where(Instance.series_fk == series.id).limit(1)) is not None
            or session.scalar(select(RejectedInstance.id).where(
                RejectedInstance.series_instance_uid == series.series_instance_uid).limit(1)) is not None)


def _study_empty(session: Session, study: Study) -> bool:
    """No series row left and no rejected instance waiting: nothing of the study remains to show or restore."""
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
    An instance that is not rejected, or whose study is outside the principal's facility, is a 404."""
    action = "instance.delete"
    first = sop_uids[0] if sop_uids else ""
    try:
        authorize(principal, Capability.STUDY_DELETE)
        why = check_reason(reason)
        if not sop_uids:
            raise InvalidInput("name the rejected instances to delete")
        wanted = sorted(set(sop_uids))
        with ctx.sessions() as session, session.begin():
            owned = select(Study.study_instance_uid).where(owned_condition(principal.scope))
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
    except (PacsError, Forbidden) as exc:
        audit_refusal(ctx, principal, action, exc, detail=f"sop={first}")
        raise
    delete_objects(ctx, cleanup, study_prefixes=[s.study_instance_uid for s in deleted.values()
                                                 if s.study_removed is not None])
    return list(deleted.values())


# -- the store, after the commit ---------------------------------------------------------------------------------

def delete_objects(ctx: AppContext, cleanup: StoreCleanup, *, study_prefixes: Sequence[str] = ()) -> StoreCleanup:
    """Delete the freed keys whose owner is still absent from the index, a batch at a time; then, for a study
    that went whole, whatever derived product is left under its ``derived/`` folders. A store error leaves the
    key for ``pacs check`` (an unreferenced object), never fails the deletion that was committed."""
    instance_items = list(cleanup.instance_keys.items())
    for batch in _chunks(instance_items):
        present = _present(ctx, "instance", [sop for _key, sop in batch])
        for key, sop in batch:
            _delete_key(ctx, cleanup, key, keep=sop in present)
    by_level: dict[str, list[tuple[str, str]]] = {}
    for key, (level, uid) in cleanup.derived_keys.items():
        by_level.setdefault(level, []).append((key, uid))
    for level, items in by_level.items():
        for batch in _chunks(items):
            present = _present(ctx, level, [uid for _key, uid in batch])
            for key, uid in batch:
                _delete_key(ctx, cleanup, key, keep=uid in present, count=False)
    for study_uid in study_prefixes:
        if not is_archived_uid(study_uid) or _present(ctx, "study", [study_uid]):
            continue
        for prefix in (f"derived/thumbnails/{study_uid}/", f"derived/metadata/{study_uid}/"):
            try:
                for info in list(ctx.store.list(prefix)):
                    _delete_key(ctx, cleanup, info.key, keep=False, count=False)
            except StorageError as exc:
                log.warning("could not list %s after a deletion: %s", prefix, exc)
    return cleanup


def _delete_key(ctx: AppContext, cleanup: StoreCleanup, key: str, *, keep: bool, count: bool = True) -> None:
    if keep:
        cleanup.kept.append(key)
        return
    try:
        if count and ctx.store.exists(key):
            cleanup.deleted += 1
        ctx.store.delete(key)
    except StorageError as exc:
        log.warning("could not delete %s (left for pacs check): %s", key, exc)
        cleanup.failed.append(key)


def _present(ctx: AppContext, level: str, uids: Sequence[str]) -> set[str]:
    """Which of ``uids`` the index names again (a re-send after the commit): their keys are theirs now."""
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
        else:
            found.update(session.scalars(select(Study.study_instance_uid)
                                         .where(Study.study_instance_uid.in_(wanted))))
    return found


T = TypeVar("T")


def _chunks(items: Sequence[T], size: int = _CHUNK) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
