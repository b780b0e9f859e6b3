"""The one door in: every transport (C-STORE, STOW-RS, `pacs import`) archives objects through here.

Order of writes (nothing acknowledged is ever lost, nothing half-written is ever visible):

1. Parse and validate the received bytes (pure; a refusal here writes nothing).
2. Look up the SOP Instance UID in the index. Identical content (same SHA-256) is an
   idempotent success and writes nothing. Different content follows the duplicate policy.
3. Put the bytes, unchanged, in the object store under a content-addressed key
   (``dicom/{study}/{series}/{sop}/{sha256}.dcm``), durable when ``put`` returns. A prior
   version has another key, so nothing is ever overwritten. Store down → failure, nothing indexed.
4. One index transaction: patient/study/series/instance rows, the prior version (if any),
   the outbox rows for derived work, the forward jobs of matching rules, and the audit event.
   Only after this commit is success reported. If the commit fails, the object written in step 3
   is removed again when this call created it (it stays invisible either way: queries read the
   index, and ``pacs check`` lists unreferenced objects).
5. After commit, the outbox rows are handed to the publisher without waiting on the broker.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit
from pacs.db.models import DerivedTask, Instance, Series, Study
from pacs.dicom_object import (
    DEFAULT_MAX_INFLATED_BYTES,
    ObjectRejected,
    ReceivedObject,
    RejectReason,
    parse_received,
)
from pacs.forwarding.rules import queue_forwards
from pacs.index_writer import index_instance
from pacs.security import ingest_policy
from pacs.settings import DuplicatePolicy
from storage import ObjectStore, StorageError
from storage.keys import instance_key

log = logging.getLogger(__name__)

INSTANCE_TASKS = ("thumbnail",)  # armed for each new current content of an instance
SERIES_TASKS = ("series-metadata",)  # armed for the instance's series (one row per series, re-armed)


class IngestStatus(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical content was already stored: idempotent success
    NEW_VERSION = "new-version"  # replaced a different object with the same SOP Instance UID
    KEPT_EXISTING = "kept-existing"  # policy keep-existing: acknowledged, the stored one stays
    REJECTED = "rejected"  # the object cannot be archived; see reason
    STORAGE_UNAVAILABLE = "storage-unavailable"
    INDEX_UNAVAILABLE = "index-unavailable"


_OK = {IngestStatus.STORED, IngestStatus.DUPLICATE, IngestStatus.NEW_VERSION, IngestStatus.KEPT_EXISTING}


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
        return outcome

    def _archive(self, obj: ReceivedObject, sha256: str, source: IngestSource) -> IngestOutcome:
        ids = {"sop_instance_uid": obj.sop_instance_uid, "sop_class_uid": obj.sop_class_uid,
               "study_instance_uid": obj.study_instance_uid, "sha256": sha256}
        try:
            with self._read_sessions() as session:
                current = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == obj.sop_instance_uid)
                ).one_or_none()
                current_sha = current.sha256 if current is not None else None
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

        key = instance_key(obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid, sha256)
        try:
            existed = self._store.exists(key)
            self._store.put(key, obj.data, length=len(obj.data), content_type="application/dicom")
        except StorageError as exc:
            log.error("object store failed for %s: %s", obj.sop_instance_uid, exc)
            return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200],
                                 **ids)

        now = datetime.now(UTC)
        try:
            with self._sessions() as session, session.begin():
                replaces = session.scalars(
                    select(Instance).where(Instance.sop_instance_uid == obj.sop_instance_uid).with_for_update()
                ).one_or_none()
                if replaces is not None and replaces.sha256 == sha256:
                    return IngestOutcome(IngestStatus.DUPLICATE, "identical object already stored", **ids)
                if (replaces is None) != (current_sha is None):
                    raise IntegrityError("instance changed concurrently", None, Exception())
                refused = ingest_policy.refusal(_existing(session, obj, replaces), obj.study_instance_uid,
                                                source.facility, source.trusted, new_version=replaces is not None,
                                                sender_ae=source.calling_ae)
                if refused is not None:
                    raise _Refused(refused)
                index_instance(session, obj, object_key=key, sha256=sha256, received_at=now,
                               source=source.transport, source_ae=source.calling_ae,
                               source_address=source.address, replaces=replaces, facility=source.facility)
                tasks = arm_derived_tasks(session, obj.sop_instance_uid, sha256, INSTANCE_TASKS)
                tasks += arm_derived_tasks(session, obj.series_instance_uid, "", SERIES_TASKS)
                queue_forwards(session, obj, source, sha256)
                session.flush()
                _audit(session, obj, source, "instance.store" if replaces is None else "instance.store-new-version",
                       f"sha256={sha256}" + (f" replaces={replaces.sha256 if replaces else ''}"))
                task_ids = tuple(t.id for t in tasks)
        except IntegrityError:
            raise
        except _Refused as exc:
            if not existed:
                self._discard(key)
            log.warning("refused object %s from %s: %s", obj.sop_instance_uid, _who(source), exc)
            return IngestOutcome(IngestStatus.REJECTED, str(exc), reason=RejectReason.MISMATCH, **ids)
        except SQLAlchemyError as exc:
            if not existed:
                self._discard(key)
            return self._index_failed(obj, sha256, exc)
        status = IngestStatus.STORED if current_sha is None else IngestStatus.NEW_VERSION
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


def _existing(session: Session, obj: ReceivedObject, replaces: Instance | None) -> ingest_policy.Existing:
    study_facility = session.scalar(select(Study.facility).where(Study.study_instance_uid == obj.study_instance_uid))
    series_study = session.scalar(select(Study.study_instance_uid).join(Series, Series.study_fk == Study.id)
                                  .where(Series.series_instance_uid == obj.series_instance_uid))
    instance_study = None
    if replaces is not None:
        instance_study = session.execute(select(Study.study_instance_uid, Study.facility)
                                         .join(Series, Series.study_fk == Study.id)
                                         .where(Series.id == replaces.series_fk)).one_or_none()
    return ingest_policy.Existing(
        study_facility=study_facility, series_study_uid=series_study,
        instance_study_uid=instance_study[0] if instance_study else None,
        instance_study_facility=instance_study[1] if instance_study else None,
        instance_source_ae=replaces.source_ae if replaces is not None else None)


def _who(source: IngestSource) -> str:
    return f"{source.transport}:{source.calling_ae or source.user or '-'}@{source.address or '-'}"
