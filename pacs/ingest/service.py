"""The one ingest function: every transport (C-STORE, STOW-RS, `pacs import`) archives objects through here.

Order of writes (nothing acknowledged is ever lost, nothing half-written is ever visible):

1. Parse and validate the received bytes (pure; a refusal here writes nothing).
2. Look up the SOP Instance UID in the index. Identical content (same SHA-256) is an
   idempotent success and writes nothing. Different content follows the duplicate policy.
   Read with it, in the same statement (:func:`pacs.ingest.ownership.snapshot`, on a read-only connection):
   whether it was rejected (IOCM), the order whose Study Instance UID the object carries, and the study's owner
   (facility, patient). If :func:`pacs.security.filing_rules.decide` says *hold*
   (a sender that may not write that study, a patient that is not the study's), the object goes to the
   reconciliation queue instead: put under ``reconciliation/{sha256}.dcm``, then one transaction
   adds the queue row and the audit event (:mod:`pacs.reconciliation`); steps 3-5 do not happen.
3. Put the bytes, unchanged, in the object store under a content-addressed key
   (``dicom/{study}/{series}/{sop}/{sha256}.dcm``), durable when ``put`` returns. A prior
   version has another key, so nothing is ever overwritten. Store down → failure, nothing indexed.
4. One index transaction: the policy decided again with the rows locked, on what is read now (never on what
   step 2 or an earlier object read; SQLite: one statement under the write lock; PostgreSQL: the current
   version's row lock, then that statement) (a *hold* now rolls back,
   removes the object of step 3 when this call created it and holds it as in step 2; a *claim*
   first moves a provisional study's objects to the reconciliation queue, :mod:`pacs.ingest.claim`: copied
   under ``reconciliation/`` before their rows are removed, their ``dicom/`` objects deleted after commit),
   patient/study/series/instance rows, the prior version (if any), the queue row a person's
   resolution marks (:mod:`pacs.reconciliation`), the outbox rows for derived work, the forward jobs
   of matching rules, and the audit event. A new instance's statements are prebuilt Core statements run on the
   session's connection (the ORM only for the rare paths: a new version, a claim, a correction, a resolution).
   Only after this commit is success reported. If the commit fails, the object written in step 3 is not
   removed at once, even when this call created it: its key is content-addressed, so another ingest of the very
   same bytes may have put it too and committed (or be about to). It gets a pending tombstone instead
   (:func:`Ingestor._discard_later`); the retention sweep removes it an hour later unless an index row names it by
   then, and an ingest of those bytes meanwhile takes the tombstone and puts them again after its commit. It stays
   invisible either way: queries read the index, and ``pacs check`` lists unreferenced objects.
5. After commit, a new instance's DICOM JSON fragment (made from the parsed dataset, its outbox row recorded done
   in step 4; :mod:`pacs.ingest.fragment`) is put under ``derived/metadata/`` without forcing it to disk (readers
   make it again from the object when a power cut left it missing or cut short) — by the process's fragment
   writer after the answer, where the ingest service has one (:mod:`pacs.ingest.fragment_writer`; the runtime's
   does) — and the outbox rows are handed to the publisher without waiting on the broker.
"""


from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from typing import TypedDict, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import pacs.studies.rejection as rejection
from pacs import audit, metrics
from pacs.db.models import Instance
from pacs.db.prepared import Prepared
from pacs.derived.outbox import arm_ingested, redo_newer_version
from pacs.errors import PacsError
from pacs.failpoints import failpoint
from pacs.forwarding.rules import queue_forwards
from pacs.ingest.claim import ClaimStoreFailed, claim_provisional_study
from pacs.ingest.fragment import make_fragment
from pacs.ingest.fragment_writer import FragmentWriter
from pacs.ingest.index_writer import index_instance
from pacs.ingest.outcome import IngestOutcome, IngestStatus
from pacs.ingest.ownership import Snapshot, decide, order_patient, snapshot
from pacs.ingest.parsing import (
    DEFAULT_MAX_INFLATED_BYTES,
    ObjectRejected,
    ReceivedObject,
    RejectReason,
    parse_received,
)
from pacs.ingest.source import IngestSource, who
from pacs.persons.identifiers import NationalIdPolicy
from pacs.query.sessions import single_statement_engine
from pacs.reconciliation import service as reconciliation
from pacs.security import filing_rules
from pacs.settings import DuplicatePolicy
from pacs.studies import tombstones
from storage import ObjectStore, StorageError
from storage.keys import instance_key, instance_metadata_key, reconciliation_key

log = logging.getLogger(__name__)


TaskNotifier = Callable[[Iterable[int]], None]


# Prebuilt with a bound parameter (every received object runs them; see pacs.ingest.index_writer)
_instance = cast(Table, Instance.__table__).c
_CURRENT_VERSION_LOCKED = select(_instance.id).where(_instance.sop_instance_uid == bindparam("sop")).with_for_update()
_CURRENT_SHA = Prepared(select(_instance.sha256).where(_instance.sop_instance_uid == bindparam("sop")))


class _ObjectIds(TypedDict):
    """What every outcome for one received object names (spread into :class:`IngestOutcome`)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    sha256: str
    series_instance_uid: str


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
        national_ids: NationalIdPolicy | None = None,
        fragment_writer: FragmentWriter | None = None,
    ) -> None:
        # where new instances' fragments are put after the answer (pacs.ingest.fragment_writer); None: before it
        self._fragments = fragment_writer
        self._national_ids = national_ids  # link records to persons by national IDs (pacs.persons); None: off
        self._sessions = sessions
        # the per-object reads (step 2, the fragment's version check) are single statements without an ORM session
        # (nothing there needs one, and its machinery cost more than the reads, issue 13), on the read path's pool
        # where there is one (PostgreSQL: autocommit, no ping round trip per checkout)
        self._read_engine = single_statement_engine(read_sessions or sessions)
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
        started = time.perf_counter()
        outcome = self._ingest(data, source, expected_sop_instance_uid, expected_sop_class_uid)
        metrics.ingest_observed(source.transport, outcome.status, time.perf_counter() - started)
        if outcome.status is IngestStatus.STORAGE_UNAVAILABLE:
            metrics.store_error("ingest")
        elif outcome.status is IngestStatus.INDEX_UNAVAILABLE:
            metrics.index_error("ingest")
        return outcome

    def _ingest(self, data: bytes, source: IngestSource, expected_sop_instance_uid: str | None,
                expected_sop_class_uid: str | None) -> IngestOutcome:
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
            log.warning("refused object from %s: %s", who(source), exc.message)
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
        note = rejection.note_content(obj)
        if note is not None:  # an IOCM rejection note: applied, never indexed as an instance (pacs.studies.rejection)
            return rejection.ingest_rejection_note(self._sessions, self._store, obj, sha256, source, note)
        ids = _ObjectIds(sop_instance_uid=obj.sop_instance_uid, sop_class_uid=obj.sop_class_uid,
                         study_instance_uid=obj.study_instance_uid, sha256=sha256,
                         series_instance_uid=obj.series_instance_uid)
        try:
            # on a connection of the read-only pool (no ORM session: nothing here needs one, issue 13)
            with self._read_engine.connect() as connection:
                known = snapshot(connection, obj)  # one statement: the current version, its rejection, the owners
                current = known.current
                current_sha = current.sha256 if current is not None else None
                # a new SOP instance only: was it rejected (IOCM)?
                rejected = current is None and known.rejected
                early = decide(connection, obj, current, source, known) if current_sha != sha256 else None
        except SQLAlchemyError as exc:
            return self._index_failed(obj, sha256, exc, stored=False)

        if source.correction is not None and current is None:  # deleted or rejected while it was being corrected
            return IngestOutcome(IngestStatus.REJECTED, "the corrected object is no longer in the archive",
                                 reason=RejectReason.MISMATCH, **ids)
        if rejected:
            self._audit_only(obj, source, "instance.rejected-resend", sha256)
            return IngestOutcome(IngestStatus.PREVIOUSLY_REJECTED, "subsequent occurrence of a rejected object: "
                                 "restore it instead of sending it again", **ids)
        if current is not None and current_sha == sha256:
            return self._duplicate(obj, sha256, current.object_key, source, ids)
        correcting = source.correction is not None  # a correction is a new version whatever the duplicate policy
        if current_sha is not None and self._policy is DuplicatePolicy.REJECT and not correcting:
            return IngestOutcome(IngestStatus.REJECTED, "a different object with this SOP Instance UID "
                                 "is already stored", reason=RejectReason.MISMATCH, **ids)
        if current_sha is not None and self._policy is DuplicatePolicy.KEEP_EXISTING and not correcting:
            self._audit_only(obj, source, "instance.duplicate-discarded", sha256)
            return IngestOutcome(IngestStatus.KEPT_EXISTING, "a different object with this SOP Instance "
                                 "UID is already stored; kept the stored one", **ids)
        if early is not None and early.verdict is filing_rules.Verdict.HOLD:
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
        # a new instance's fragment, put after the commit: its row then needs no derived work (pacs.ingest.fragment)
        fragment = make_fragment(obj, assume_utf8_for_latin1=self._utf8) if current_sha is None else None

        def undo() -> None:  # the transaction did not commit: nothing this call wrote stays (an hour later)
            # a key there before the put is never tombstoned: no index row may name it now (an index restored from
            # an older backup), and then it is what `pacs reindex` recovers the instance from
            if not existed:
                self._discard_later(key)

        now = datetime.now(UTC)
        evicted: list[str] = []
        tombstoned = False
        try:
            with self._sessions() as session, session.begin():
                connection = session.connection()  # the hot path's statements run on it (Core, no ORM)
                under_lock: Snapshot | None = None
                if connection.dialect.name == "sqlite":
                    # the transaction holds the database's write lock (BEGIN IMMEDIATE): one statement reads it all
                    under_lock = snapshot(connection, obj)
                    locked = under_lock.current.id if under_lock.current is not None else None
                else:  # the current version's row lock first; the policy's reads after it (decide)
                    locked = connection.scalar(_CURRENT_VERSION_LOCKED, {"sop": obj.sop_instance_uid})
                # a new version (rare) updates the current row through the ORM; a new instance needs no object
                replaces = None if locked is None else session.get_one(Instance, locked, populate_existing=True)
                if replaces is not None and replaces.sha256 == sha256:
                    return IngestOutcome(IngestStatus.DUPLICATE, "identical object already stored", **ids)
                if (replaces is None) != (current_sha is None):
                    raise IntegrityError("instance changed concurrently", None, Exception())
                decision = decide(connection, obj, replaces, source, under_lock)
                if decision.verdict is filing_rules.Verdict.REFUSE:
                    raise _Refused(decision.message)
                if decision.verdict is filing_rules.Verdict.HOLD:
                    raise _Held(decision)
                if decision.verdict is filing_rules.Verdict.CLAIM:
                    evicted = claim_provisional_study(session, self._store, obj, source, decision)
                    if replaces is not None and replaces.object_key in evicted:
                        replaces = None  # moved to the queue with the rest of the provisional study
                index_instance(session, obj, object_key=key, sha256=sha256, received_at=now,
                               source=source.transport, source_ae=source.calling_ae,
                               source_address=source.address, replaces=replaces, facility=decision.facility,
                               provisional=decision.provisional, study_patient=order_patient(session, obj, source),
                               national_ids=self._national_ids, correction=source.correction)
                if source.resolution is not None:
                    try:
                        reconciliation.mark_resolved(session, source.resolution, obj.study_instance_uid)
                    except PacsError as exc:
                        raise _Refused(str(exc)) from exc
                # a deletion's tombstone of this very key: its object may be (about to be) deleted, so it is put
                # again after the commit (pacs.studies.tombstones; waits while a deletion holds the row)
                tombstoned = tombstones.clear(session, key)
                # the instance's outbox row (recorded done when its fragment was made here) and its series'
                tasks = arm_ingested(session, obj.sop_instance_uid, sha256, obj.series_instance_uid,
                                     fragment_made=fragment is not None)
                queue_forwards(session, obj, source, sha256)
                session.flush()
                _audit(session, obj, source, "instance.store" if replaces is None else "instance.store-new-version",
                       f"sha256={sha256}" + (f" replaces={replaces.sha256 if replaces else ''}"))
                task_ids = tuple(tasks)
        except IntegrityError:
            raise
        except _Held as held:  # decided again under the locks: hold it after all
            undo()
            return self._hold(obj, sha256, source, held.decision, ids)
        except ClaimStoreFailed as exc:
            undo()
            return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200],
                                 **ids)
        except _Refused as exc:
            undo()
            log.warning("refused object %s from %s: %s", obj.sop_instance_uid, who(source), exc)
            return IngestOutcome(IngestStatus.REJECTED, str(exc), reason=RejectReason.MISMATCH, **ids)
        except SQLAlchemyError as exc:
            undo()
            return self._index_failed(obj, sha256, exc)
        failpoint("ingest.after_index_commit")
        if fragment is not None:
            put = partial(self._put_fragment, obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid,
                          fragment, sha256)  # the UIDs and the fragment only: a queued job never holds the object
            if self._fragments is not None:
                self._fragments.submit(put)
            else:
                put()
        if tombstoned:
            failed = self._put_again(obj, key)
            if failed is not None:
                return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, failed, **ids)
        for old in evicted:  # the claimed study's objects, now held under reconciliation/
            if old != key:  # the same content re-sent by the claiming sender is now its own object
                self._discard(old)
        status = IngestStatus.STORED if current_sha is None or decision.verdict is filing_rules.Verdict.CLAIM \
            else IngestStatus.NEW_VERSION
        return IngestOutcome(status, "", derived_task_ids=task_ids, **ids)

    def _put_fragment(self, study_uid: str, series_uid: str, sop_uid: str, fragment: bytes, sha256: str) -> None:
        """Put a new instance's DICOM JSON fragment (pacs.ingest.fragment), after the commit that recorded its row
        done (and, with a fragment writer, after the answer). Put only now, a fragment is never of content that did
        not commit. Missing (a crash before the put, a store that refused it), readers make it from the object
        (:mod:`pacs.dicomweb.documents`, :mod:`pacs.derived.series`). Put late (a newer version committed meanwhile,
        its fragment maybe written already by a worker): the newer version's work is armed again, as a worker
        superseded does. Put after the instance was deleted: deleted again."""
        key = instance_metadata_key(study_uid, series_uid, sop_uid)
        try:
            # not forced to disk: made again from the object when a power cut leaves it missing or cut short
            self._store.put(key, fragment, length=len(fragment), content_type="application/dicom+json",
                            durable=False)
        except StorageError as exc:
            log.warning("fragment of %s not put (made again when it is read): %s", sop_uid, exc)
            return
        try:
            # read on the read-only pool (no write lock: SQLite's BEGIN IMMEDIATE would queue behind every other
            # ingest); a newer version committed after this read puts its own fragment after its commit, after ours
            with self._read_engine.connect() as connection:
                current = _CURRENT_SHA.scalar(connection, {"sop": sop_uid})
            if current is not None and current != sha256:
                with self._sessions() as session, session.begin():
                    redo_newer_version(session, sop_uid)
        except SQLAlchemyError as exc:  # the index went away after our commit: readers check the version
            log.warning("could not check the version of %s's fragment: %s", sop_uid, exc)
            return
        if current is None:  # deleted meanwhile: its derived objects went with it, so this one goes too
            self._discard(key)

    def _put_again(self, obj: ReceivedObject, key: str) -> str | None:
        """Put the bytes again under ``key``, which a deletion tombstoned (the same content-addressed key: the same
        bytes); the failure's message, or None."""
        try:
            self._store.put(key, obj.data, length=len(obj.data), content_type="application/dicom")
        except StorageError as exc:
            log.error("INDEXED BUT MAYBE MISSING: %s (%s) was deleted by a deletion while it was re-sent, and "
                      "putting it again failed: %s; pacs check lists it, the sender's retry restores it",
                      key, obj.sop_instance_uid, exc)
            return f"object store unavailable: {exc}"[:200]
        log.info("re-sent object %s put again after a deletion of the same key", key)
        return None

    def _duplicate(self, obj: ReceivedObject, sha256: str, key: str, source: IngestSource,
                   ids: _ObjectIds) -> IngestOutcome:
        """Identical content is already indexed. If its object went missing from the store (a lost
        disk, a bad restore), the bytes just received are exactly the missing ones: write them back."""
        try:
            if self._store.exists(key):
                return IngestOutcome(IngestStatus.DUPLICATE, "identical object already stored", **ids)
            self._store.put(key, obj.data, length=len(obj.data), content_type="application/dicom")
        except StorageError as exc:
            log.error("object store failed for %s: %s", obj.sop_instance_uid, exc)
            return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, f"object store unavailable: {exc}"[:200], **ids)
        log.warning("object %s was missing from the store; restored from a re-send by %s", key, who(source))
        self._audit_only(obj, source, "instance.object-restored", sha256)
        return IngestOutcome(IngestStatus.DUPLICATE, "identical object already indexed; missing object restored",
                             **ids)

    def _audit_only(self, obj: ReceivedObject, source: IngestSource, action: str, sha256: str) -> None:
        try:
            with self._sessions() as session, session.begin():
                _audit(session, obj, source, action, f"sha256={sha256}")
        except SQLAlchemyError as exc:
            log.error("audit write failed: %s", exc)

    def _hold(self, obj: ReceivedObject, sha256: str, source: IngestSource, decision: filing_rules.Decision,
              ids: _ObjectIds) -> IngestOutcome:
        """Step 2's other branch: keep the object, as received, in the reconciliation queue."""
        if source.resolution is not None:  # a person's resolution is never held again: it is refused
            return IngestOutcome(IngestStatus.REJECTED, filing_rules.REFUSAL, reason=RejectReason.MISMATCH, **ids)
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
                # the same bytes held before by an ingest that failed: its tombstone is ours to take (as in step 4)
                tombstoned = tombstones.clear(session, key)
                if created:
                    _audit(session, obj, source, "instance.hold", f"sha256={sha256} held={row.id} "
                           f"queue={decision.facility or '-'} reason={decision.reason}")
        except SQLAlchemyError as exc:
            if not existed:
                self._discard_later(key)  # another hold of these bytes may share the key
            return self._index_failed(obj, sha256, exc)
        if tombstoned:
            failed = self._put_again(obj, key)
            if failed is not None:
                return IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE, failed, **ids)
        log.warning("held object %s from %s for reconciliation (%s, queue %s)", obj.sop_instance_uid, who(source),
                    decision.reason, decision.facility or "-")
        return IngestOutcome(IngestStatus.HELD, decision.message if decision.warn else "", warn=decision.warn, **ids)

    def _discard_later(self, key: str) -> None:
        """Leave ``key`` (an object this call put under ``dicom/`` or ``reconciliation/``, whose transaction did not
        commit) to the retention sweep with a pending tombstone, rather than delete it now.

        Another ingest of the same bytes puts the same key (content-addressed). Deleting now lost its object when
        that ingest committed between this one's put and its failure: a modality that gave up on an association
        stuck behind the index's lock and sent the object again on another. With the tombstone, an ingest that
        commits before the sweep takes it (:func:`pacs.studies.tombstones.clear`: the bytes are put again after
        its commit), and the sweep keeps an object an index row names (:func:`pacs.studies.deletion.
        delete_tombstoned`). The index unreachable, the object stays where it is: ``pacs check`` lists it."""
        try:
            with self._sessions() as session, session.begin():
                tombstones.add(session, [key])
        except SQLAlchemyError as exc:
            log.warning("%s left in the store for pacs check (no tombstone, the index is unavailable): %s",
                        key, str(exc).splitlines()[0][:300])

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
    """The sender may not change what the index holds for these UIDs (pacs.security.filing_rules)."""


class _Held(Exception):
    """Decided under the locks: the object is held for reconciliation after all."""

    def __init__(self, decision: filing_rules.Decision) -> None:
        super().__init__(decision.message)
        self.decision = decision
