"""The one door in: every transport (C-STORE, STOW-RS, `pacs import`) archives objects through here.

Order of writes (nothing acknowledged is ever lost, nothing half-written is ever visible):

1. Parse and validate the received bytes (pure; a refusal here writes nothing).
2. Look up the SOP Instance UID in the index. Identical content (same SHA-256) is an
   idempotent success and writes nothing. Different content follows the duplicate policy.
   Read with it: the order whose Study Instance UID the object carries, and the study's owner
   (facility, patient). If :func:`pacs.security.ingest_policy.decide` says *hold* (a sender that
   may not write that study, a patient that is not the study's), the object goes to the
   reconciliation queue instead: put under ``reconciliation/{sha256}.dcm``, then one transaction
   adds the queue row and the audit event (:mod:`pacs.reconciliation`); steps 3-5 do not happen.
3. Put the bytes, unchanged, in the object store under a content-addressed key
   (``dicom/{study}/{series}/{sop}/{sha256}.dcm``), durable when ``put`` returns. A prior
   version has another key, so nothing is ever overwritten. Store down → failure, nothing indexed.
4. One index transaction: the policy decided again with the rows locked (a *hold* now rolls back,
   removes the object of step 3 when this call created it and holds it as in step 2; a *claim*
   first moves a provisional study's objects to the reconciliation queue: copied under
   ``reconciliation/`` before their rows are removed, their ``dicom/`` objects deleted after commit),
   patient/study/series/instance rows, the prior version (if any), the queue row a person's
   resolution marks (:mod:`pacs.reconciliation`), the outbox rows for derived work, the forward jobs
   of matching rules, and the audit event.
   Only after this commit is success reported. If the commit fails, the object written in step 3
   is removed again when this call created it (it stays invisible either way: queries read the
   index, and ``pacs check`` lists unreferenced objects).
5. After commit, the outbox rows are handed to the publisher without waiting on the broker.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit, reconciliation
from pacs.db.models import DerivedTask, ForwardJob, Instance, InstanceVersion, Patient, Series, Study
from pacs.dicom_object import (
    DEFAULT_MAX_INFLATED_BYTES,
    ObjectRejected,
    ReceivedObject,
    RejectReason,
    parse_received,
)
from pacs.errors import PacsError
from pacs.failpoints import failpoint
from pacs.forwarding.rules import queue_forwards
from pacs.index_writer import index_instance
from pacs.reconciliation_models import UNTRUSTED_FIRST
from pacs.reports.models import KeyImageSelection, Report, StudyClaim
from pacs.ris.models import ImagingOrder
from pacs.security import ingest_policy
from pacs.security.models import StudyShare
from pacs.settings import DuplicatePolicy
from storage import ObjectStore, StorageError
from storage.keys import instance_key, reconciliation_key

log = logging.getLogger(__name__)

INSTANCE_TASKS = ("thumbnail",)  # armed for each new current content of an instance
SERIES_TASKS = ("series-metadata",)  # armed for the instance's series (one row per series, re-armed)


class IngestStatus(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical content was already stored: idempotent success
    NEW_VERSION = "new-version"  # replaced a different object with the same SOP Instance UID
    KEPT_EXISTING = "kept-existing"  # policy keep-existing: acknowledged, the stored one stays
    HELD = "held"  # stored in the reconciliation queue, not filed (pacs.reconciliation); acknowledged
    REJECTED = "rejected"  # the object cannot be archived; see reason
    STORAGE_UNAVAILABLE = "storage-unavailable"
    INDEX_UNAVAILABLE = "index-unavailable"


_OK = {IngestStatus.STORED, IngestStatus.DUPLICATE, IngestStatus.NEW_VERSION, IngestStatus.KEPT_EXISTING,
       IngestStatus.HELD}


@dataclass(frozen=True)
class IngestSource:
    """Where an object came from: the transport and the peer."""

    transport: str  # dimse, stow, import
    calling_ae: str = ""
    address: str = ""
    user: str = ""
    role: str = ""  # the principal's role for STOW-RS (pacs.security)
    facility: str = ""  # the facility a new study belongs to; "" = unrestricted (pacs.security.ingest_policy)
    trusted: bool = True  # False for an unregistered DICOM peer: may not change what others stored
    impersonating: bool = False  # a registered AE's title from a peer that failed its identity check
    resolution: reconciliation.Resolution | None = None  # a person filing a held object (pacs.reconciliation)


@dataclass(frozen=True)
class IngestOutcome:
    status: IngestStatus
    message: str = ""
    reason: RejectReason | None = None
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    sha256: str = ""
    derived_task_ids: tuple[int, ...] = ()
    series_instance_uid: str = ""
    # HELD: the sender may read the study and is told it was held (a warning status); False for any other
    # sender, who gets exactly what a stored object gets (pacs.security.ingest_policy)
    warn: bool = False

    @property
    def ok(self) -> bool:
        return self.status in _OK


TaskNotifier = Callable[[Iterable[int]], None]


class Ingestor:
    """Archives received objects; one per process, shared by all transports and threads."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: ObjectStore,
        *,
        duplicate_policy: DuplicatePolicy = DuplicatePolicy.VERSION,
        max_object_bytes: int = 1024**3,
        assume_utf8_for_latin1: bool = True,
        notify: TaskNotifier | None = None,
        read_sessions: sessionmaker[Session] | None = None,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    ) -> None:
        self._sessions = sessions
        self._read_sessions = read_sessions or sessions
        self._store = store
        self._policy = duplicate_policy
        self._max_bytes = max_object_bytes
        self._max_inflated = max_inflated_bytes
        self._utf8 = assume_utf8_for_latin1
        self._notify = notify

    def ingest(
        self,
        data: bytes,
        source: IngestSource,
        *,
        expected_sop_instance_uid: str | None = None,
        expected_sop_class_uid: str | None = None,
    ) -> IngestOutcome:
        """Archive one object; never raises for bad input or unavailable servers."""
        try:
            obj = parse_received(
                data,
                max_bytes=self._max_bytes,
                assume_utf8_for_latin1=self._utf8,
                expected_sop_instance_uid=expected_sop_instance_uid,
                expected_sop_class_uid=expected_sop_class_uid,
                max_inflated_bytes=self._max_inflated,
            )
        except ObjectRejected as exc:
            log.warning("refused object from %s: %s", _who(source), exc.message)
            return IngestOutcome(IngestStatus.REJECTED, exc.message, reason=exc.reason,
                                 sop_instance_uid=expected_sop_instance_uid or "")
        sha256 = hashlib.sha256(obj.data).hexdigest()
        failpoint("ingest.after_receive")
        try:
            outcome = self._archive(obj, sha256, source)
        except IntegrityError:
            # A concurrent sender committed the same SOP instance first: decide again against it.
            log.info("concurrent store of %s; re-checking", obj.sop_instance_uid)
            try:
                outcome = self._archive(obj, sha256, source)
            except SQLAlchemyError as exc:
                outcome = self._index_failed(obj, sha256, exc)
        if outcome.ok and outcome.derived_task_ids and self._notify is not None:
            self._notify(outcome.derived_task_ids)
        failpoint("ingest.before_response")
        return outcome

    def _archive(self, obj: ReceivedObject, sha256: str, source: IngestSource) -> IngestOutcome:
        ids = {"sop_instance_uid": obj.sop_instance_uid, "sop_class_uid": obj.sop_class_uid,
               "study_instance_uid": obj.study_instance_uid, "sha256": sha256,
               "series_instance_uid": obj.series_instance_uid}
        try:
            with self._read_sessions() as session:
                current = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == obj.sop_instance_uid)
                ).one_or_none()
                current_sha = current.sha256 if current is not None else None
                early = _decide(session, obj, current, source) if current_sha != sha256 else None
        except SQLAlchemyError as exc:
            return self._index_failed(obj, sha256, exc, stored=False)

        if current_sha == sha256:
            return self._duplicate(obj, sha256, current.object_key, source, ids)  # type: ignore[union-attr]
        if current_sha is not None and self._policy is DuplicatePolicy.REJECT:
            return IngestOutcome(IngestStatus.REJECTED, "a different object with this SOP Instance UID "
                                 "is already stored", reason=RejectReason.MISMATCH, **ids)
        if current_sha is not None and self._policy is DuplicatePolicy.KEEP_EXISTING:
            self._audit_only(obj, source, "instance.duplicate-discarded", sha256)
            return IngestOutcome(IngestStatus.KEPT_EXISTING, "a different object with this SOP Instance "
                                 "UID is already stored; kept the stored one", **ids)
        if early is not None and early.verdict is ingest_policy.Verdict.HOLD:
            return self._hold(obj, sha256, source, early, ids)

        key = instance_key(obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid, sha256)
        try:
            existed = self._store.exists(key)
            self._store.put(key, obj.data, length=len(obj.data), content_type="application/dicom")
        except StorageError as exc:
            log.error("object store failed for %s: %s", obj.sop_instance_uid, exc)
            return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200],
                                 **ids)
        failpoint("ingest.after_object_write")

        now = datetime.now(UTC)
        evicted: list[str] = []
        try:
            with self._sessions() as session, session.begin():
                replaces = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == obj.sop_instance_uid).with_for_update()
                ).one_or_none()
                if replaces is not None and replaces.sha256 == sha256:
                    return IngestOutcome(IngestStatus.DUPLICATE, "identical object already stored", **ids)
                if (replaces is None) != (current_sha is None):
                    raise IntegrityError("instance changed concurrently", None, Exception())
                decision = _decide(session, obj, replaces, source)
                if decision.verdict is ingest_policy.Verdict.REFUSE:
                    raise _Refused(decision.message)
                if decision.verdict is ingest_policy.Verdict.HOLD:
                    raise _Held(decision)
                if decision.verdict is ingest_policy.Verdict.CLAIM:
                    evicted = self._claim(session, obj, source, decision)
                    if replaces is not None and replaces.object_key in evicted:
                        replaces = None  # moved to the queue with the rest of the provisional study
                index_instance(session, obj, object_key=key, sha256=sha256, received_at=now,
                               source=source.transport, source_ae=source.calling_ae,
                               source_address=source.address, replaces=replaces, facility=decision.facility,
                               provisional=decision.provisional, study_patient=_order_patient(session, obj, source))
                if source.resolution is not None:
                    try:
                        reconciliation.mark_resolved(session, source.resolution, obj.study_instance_uid)
                    except PacsError as exc:
                        raise _Refused(str(exc)) from exc
                tasks = arm_derived_tasks(session, obj.sop_instance_uid, sha256, INSTANCE_TASKS)
                tasks += arm_derived_tasks(session, obj.series_instance_uid, "", SERIES_TASKS)
                queue_forwards(session, obj, source, sha256)
                session.flush()
                _audit(session, obj, source, "instance.store" if replaces is None else "instance.store-new-version",
                       f"sha256={sha256}" + (f" replaces={replaces.sha256 if replaces else ''}"))
                task_ids = tuple(t.id for t in tasks)
        except IntegrityError:
            raise
        except _Held as held:  # decided again under the locks: hold it after all
            if not existed:
                self._discard(key)
            return self._hold(obj, sha256, source, held.decision, ids)
        except _StoreFailed as exc:
            if not existed:
                self._discard(key)
            return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200],
                                 **ids)
        except _Refused as exc:
            if not existed:
                self._discard(key)
            log.warning("refused object %s from %s: %s", obj.sop_instance_uid, _who(source), exc)
            return IngestOutcome(IngestStatus.REJECTED, str(exc), reason=RejectReason.MISMATCH, **ids)
        except SQLAlchemyError as exc:
            if not existed:
                self._discard(key)
            return self._index_failed(obj, sha256, exc)
        failpoint("ingest.after_index_commit")
        for old in evicted:  # the claimed study's objects, now held under reconciliation/
            if old != key:  # the same content re-sent by the claiming sender is now its own object
                self._discard(old)
        status = IngestStatus.STORED if current_sha is None or decision.verdict is ingest_policy.Verdict.CLAIM \
            else IngestStatus.NEW_VERSION
        return IngestOutcome(status, "", derived_task_ids=task_ids, **ids)

    def _duplicate(self, obj: ReceivedObject, sha256: str, key: str, source: IngestSource,
                   ids: dict[str, str]) -> IngestOutcome:
        """Identical content is already indexed. If its object went missing from the store (a lost
        disk, a bad restore), the bytes just received are exactly the missing ones: write them back."""
        try:
            if self._store.exists(key):
                return IngestOutcome(IngestStatus.DUPLICATE, "identical object already stored", **ids)
            self._store.put(key, obj.data, length=len(obj.data), content_type="application/dicom")
        except StorageError as exc:
            log.error("object store failed for %s: %s", obj.sop_instance_uid, exc)
            return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200], **ids)
        log.warning("object %s was missing from the store; restored from a re-send by %s", key, _who(source))
        self._audit_only(obj, source, "instance.object-restored", sha256)
        return IngestOutcome(IngestStatus.DUPLICATE, "identical object already indexed; missing object restored",
                             **ids)

    def _audit_only(self, obj: ReceivedObject, source: IngestSource, action: str, sha256: str) -> None:
        try:
            with self._sessions() as session, session.begin():
                _audit(session, obj, source, action, f"sha256={sha256}")
        except SQLAlchemyError as exc:
            log.error("audit write failed: %s", exc)

    def _hold(self, obj: ReceivedObject, sha256: str, source: IngestSource, decision: ingest_policy.Decision,
              ids: dict[str, str]) -> IngestOutcome:
        """Step 2's other branch: keep the object, as received, in the reconciliation queue."""
        if source.resolution is not None:  # a person's resolution is never held again: it is refused
            return IngestOutcome(IngestStatus.REJECTED, ingest_policy.REFUSAL, reason=RejectReason.MISMATCH, **ids)
        key = reconciliation_key(sha256)
        try:
            existed = self._store.exists(key)
            self._store.put(key, obj.data, length=len(obj.data), content_type="application/dicom")
        except StorageError as exc:
            log.error("object store failed for held %s: %s", obj.sop_instance_uid, exc)
            return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200], **ids)
        try:
            with self._sessions() as session, session.begin():
                row, created = reconciliation.hold(session, reconciliation.HeldObject.received(obj, source),
                                                   decision, key=key, sha256=sha256)
                if created:
                    _audit(session, obj, source, "instance.hold", f"sha256={sha256} held={row.id} "
                           f"queue={decision.facility or '-'} reason={decision.reason}")
        except SQLAlchemyError as exc:
            if not existed:
                self._discard(key)
            return self._index_failed(obj, sha256, exc)
        log.warning("held object %s from %s for reconciliation (%s, queue %s)", obj.sop_instance_uid, _who(source),
                    decision.reason, decision.facility or "-")
        return IngestOutcome(IngestStatus.HELD, decision.message if decision.warn else "", warn=decision.warn, **ids)

    def _claim(self, session: Session, obj: ReceivedObject, source: IngestSource,
               decision: ingest_policy.Decision) -> list[str]:
        """Rule 3 of :mod:`pacs.security.ingest_policy`: a trusted exam claims a provisional study. Each object
        of it (current and prior versions) is copied under ``reconciliation/`` and queued for the claiming
        facility, then its rows (and the study's) are removed, so the trusted object creates the study afresh.
        Returns the ``dicom/`` keys to delete after commit."""
        study = session.scalars(select(Study).where(Study.study_instance_uid == obj.study_instance_uid)
                                .with_for_update()).one()
        patient = session.get(Patient, study.patient_fk)
        series = {s.id: s for s in session.scalars(select(Series).where(Series.study_fk == study.id))}
        instances = list(session.scalars(select(Instance).where(Instance.series_fk.in_(list(series)))))
        sops = [i.sop_instance_uid for i in instances]
        versions = list(session.scalars(select(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(sops))))
        by_sop = {i.sop_instance_uid: i for i in instances}
        queue = ingest_policy.Decision(
            ingest_policy.Verdict.HOLD, facility=decision.facility, reason=UNTRUSTED_FIRST,
            expected=ingest_policy.Owner(decision.facility, obj.patient["patient_id"],
                                         obj.patient["issuer_of_patient_id"]),
            message=f"sent by an unregistered peer before a trusted exam ({_who(source)}) claimed this study UID")
        entries = [(i, i.object_key, i.sha256, i.size, i.source_ae, i.source_address) for i in instances]
        entries += [(by_sop[v.sop_instance_uid], v.object_key, v.sha256, v.size, v.source_ae, "") for v in versions]
        moved: list[str] = []
        for inst, key, sha, size, ae, address in entries:
            held_key = reconciliation_key(sha)
            try:
                if not self._store.exists(held_key):
                    data = self._store.get_bytes(key)
                    self._store.put(held_key, data, length=len(data), content_type="application/dicom")
            except StorageError as exc:
                raise _StoreFailed(str(exc)) from exc
            held = reconciliation.HeldObject(
                obj.study_instance_uid, series[inst.series_fk].series_instance_uid, inst.sop_instance_uid,
                inst.sop_class_uid, patient.patient_id if patient else "",
                patient.issuer_of_patient_id if patient else "", patient.patient_name if patient else "", size,
                inst.source, ae, address)
            reconciliation.hold(session, held, queue, key=held_key, sha256=sha)
            moved.append(key)
        subjects = sops + [s.series_instance_uid for s in series.values()]
        session.execute(delete(DerivedTask).where(DerivedTask.subject_uid.in_(subjects)))
        session.execute(delete(ForwardJob).where(ForwardJob.sop_instance_uid.in_(sops)))
        session.execute(delete(InstanceVersion).where(InstanceVersion.sop_instance_uid.in_(sops)))
        session.execute(delete(Instance).where(Instance.sop_instance_uid.in_(sops)))
        session.execute(delete(Series).where(Series.study_fk == study.id))
        session.execute(delete(StudyShare).where(StudyShare.study_fk == study.id))
        session.execute(delete(Study).where(Study.id == study.id))
        session.expunge_all()  # the rows above are gone; nothing stale may be flushed again
        log.warning("study %s: provisional (unregistered sender) claimed by %s; %d object(s) moved to "
                    "reconciliation", obj.study_instance_uid, _who(source), len(moved))
        return moved

    def _discard(self, key: str) -> None:
        try:
            self._store.delete(key)
        except StorageError as exc:
            log.error("could not remove unindexed object %s (pacs check will list it): %s", key, exc)

    @staticmethod
    def _index_failed(obj: ReceivedObject, sha256: str, exc: Exception, stored: bool = True) -> IngestOutcome:
        log.error("index unavailable for %s: %s", obj.sop_instance_uid, str(exc).splitlines()[0][:300])
        return IngestOutcome(IngestStatus.INDEX_UNAVAILABLE, "index database unavailable",
                             sop_instance_uid=obj.sop_instance_uid, sop_class_uid=obj.sop_class_uid,
                             study_instance_uid=obj.study_instance_uid, sha256=sha256)


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
        elif task.state in ("done", "failed"):  # pending or queued rows will run and see the new state
            task.state, task.attempts, task.last_error = "pending", 0, ""
        tasks.append(task)
    return tasks


def _audit(session: Session, obj: ReceivedObject, source: IngestSource, action: str, detail: str) -> None:
    """The ingest's audit row, appended last in its transaction (the audit chain lock is held to commit)."""
    audit.append(
        session,
        actor=source.user or source.calling_ae,
        role=source.role or ("modality" if source.transport == "dimse" else ""),
        source_address=source.address,
        action=action,
        patient_id=obj.patient["patient_id"],
        study_instance_uid=obj.study_instance_uid,
        detail=f"transport={source.transport} sop={obj.sop_instance_uid} {detail}",
    )


class _Refused(Exception):
    """The sender may not change what the index holds for these UIDs (pacs.security.ingest_policy)."""


class _Held(Exception):
    """Decided under the locks: the object is held for reconciliation after all."""

    def __init__(self, decision: ingest_policy.Decision) -> None:
        super().__init__(decision.message)
        self.decision = decision


class _StoreFailed(Exception):
    """The object store failed while a claimed study's objects were moved to the queue."""


def _decide(session: Session, obj: ReceivedObject, replaces: Instance | None,
            source: IngestSource) -> ingest_policy.Decision:
    """The policy's decision for ``obj`` against what the index (and the RIS) hold now."""
    existing = _existing(session, obj, replaces)
    resolution = source.resolution
    # an impostor of a registered title is never "the AE that sent the current version" (AE spoofing)
    sender = ingest_policy.Sender(source.facility, source.trusted, "" if source.impersonating else source.calling_ae,
                                  resolving=resolution is not None and resolution.action == reconciliation.FILE)
    patient_id, issuer = obj.patient["patient_id"], obj.patient["issuer_of_patient_id"]
    decision = ingest_policy.decide(existing, obj.study_instance_uid, sender, patient_id, issuer,
                                    new_version=replaces is not None)
    accession = obj.study.get("accession_number", "").strip()
    if decision.verdict is ingest_policy.Verdict.FILE and existing.order is None and existing.study_owner is None \
            and source.trusted and not source.facility and accession:
        # an unrestricted sender's new study with an order's accession number and patient: the order's facility
        order = session.execute(select(ImagingOrder.facility, ImagingOrder.patient_id,
                                       ImagingOrder.issuer_of_patient_id)
                                .where(ImagingOrder.accession_number == accession[:16])).one_or_none()
        if order is not None and ingest_policy.same_patient(ingest_policy.Owner(*order), patient_id, issuer):
            decision = replace(decision, facility=order[0])
    return decision


def _existing(session: Session, obj: ReceivedObject, replaces: Instance | None) -> ingest_policy.Existing:
    study = session.execute(select(Study.facility, Study.provisional, Patient.patient_id,
                                   Patient.issuer_of_patient_id).join(Patient, Patient.id == Study.patient_fk)
                            .where(Study.study_instance_uid == obj.study_instance_uid)).one_or_none()
    order = session.execute(select(ImagingOrder.facility, ImagingOrder.patient_id, ImagingOrder.issuer_of_patient_id)
                            .where(ImagingOrder.study_instance_uid == obj.study_instance_uid)).one_or_none()
    series_study = session.scalar(select(Study.study_instance_uid).join(Series, Series.study_fk == Study.id)
                                  .where(Series.series_instance_uid == obj.series_instance_uid))
    instance_study = None
    if replaces is not None:
        instance_study = session.execute(select(Study.study_instance_uid, Study.facility)
                                         .join(Series, Series.study_fk == Study.id)
                                         .where(Series.id == replaces.series_fk)).one_or_none()
    return ingest_policy.Existing(
        study_facility=study[0] if study else None, series_study_uid=series_study,
        instance_study_uid=instance_study[0] if instance_study else None,
        instance_study_facility=instance_study[1] if instance_study else None,
        instance_source_ae=replaces.source_ae if replaces is not None else None,
        order=ingest_policy.Owner(*order) if order else None,
        study_owner=ingest_policy.Owner(study[0], study[2], study[3]) if study else None,
        study_provisional=bool(study[1]) and not _has_reading(session, obj.study_instance_uid) if study else False)


def _has_reading(session: Session, study_uid: str) -> bool:
    """Someone has read the study (a report, key images or a claim): it is no longer provisional, since a
    claim would move its images away from the report written on them."""
    return any(session.scalar(select(model.id).where(model.study_instance_uid == study_uid).limit(1)) is not None
               for model in (Report, KeyImageSelection, StudyClaim))


def _order_patient(session: Session, obj: ReceivedObject, source: IngestSource) -> dict[str, str] | None:
    """A held object filed as it is into an order's study not created yet: the study is created under the
    order's patient, not the object's (an order pins its study's patient)."""
    if source.resolution is None or source.resolution.action != reconciliation.FILE:
        return None
    order = session.scalars(select(ImagingOrder).where(
        ImagingOrder.study_instance_uid == obj.study_instance_uid)).one_or_none()
    if order is None:
        return None
    return {"patient_id": order.patient_id, "issuer_of_patient_id": order.issuer_of_patient_id,
            "patient_name": order.patient_name, "patient_name_search": order.patient_name_search,
            "patient_birth_date": order.patient_birth_date, "patient_sex": order.patient_sex}


def _who(source: IngestSource) -> str:
    return f"{source.transport}:{source.calling_ae or source.user or '-'}@{source.address or '-'}"
