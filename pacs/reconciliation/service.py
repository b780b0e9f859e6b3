"""The reconciliation queue: objects received and kept, but not filed into the study they name.

:mod:`pacs.security.filing_rules` decides when an object is *held*: its sender may not write the study
(another facility, an unregistered peer), its Patient ID / issuer is not the study's (or the order's)
patient, or it was an unregistered peer's object in a study a trusted exam then claimed. A held object is
invisible: it is in no index table that C-FIND, QIDO-RS, WADO, FHIR or the reading list read.

Order of writes when an object is held (:meth:`pacs.ingest.Ingestor.ingest` calls :func:`hold`):

1. The bytes, unchanged, are put under ``reconciliation/{sha256}.dcm`` (content-addressed; durable when
   ``put`` returns). Store down → failure status, nothing recorded.
2. One transaction: the queue row (the same content already pending in the same queue adds no second row)
   and the audit event. Only after this commit is success reported; if it fails, the object written in
   step 1 is removed again when this call created it.

When a trusted exam claims a provisional study (:func:`pacs.ingest.claim.claim_provisional_study`), inside the ingest's
index transaction: each of the study's objects is copied under ``reconciliation/`` (durable before the row
that names it), its queue row added, then the study's rows removed; after the commit its ``dicom/``
objects are deleted. A failed commit leaves only unreferenced copies under ``reconciliation/`` (harmless:
nothing reads that prefix but this queue); a crash after the commit leaves ``dicom/`` objects without
rows, which ``pacs check`` lists as orphans.

Resolution (``POST /api/reconciliation/{id}/resolve``; admins and technologists of the queue's facility;
a reason is required and every action is audited with who and why):

- ``file``: file it into the study it names, as received. It goes through the one ingest function,
  which marks the row filed and writes the audit event in its own index transaction (so an object is
  never both filed and pending); the held copy is removed after that commit.
- ``separate``: file it as a study of its own: a copy with a new Study Instance UID (given, to gather
  several objects of one mis-sent exam, or generated) and a Series Instance UID derived from it, through
  the same ingest function, for the queue's facility; the object as received stays held, for the record.
- ``discard``: the row is marked discarded (and audited) in one transaction; then the held copy is removed
  unless another pending row names the same content.

Queue rows are primary data like orders (``pacs reindex`` walks ``dicom/`` only).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs import audit
from pacs.errors import Conflict, IndexUnavailable, InvalidInput, NotFound
from pacs.jobs import utcnow
from pacs.reconciliation.models import DISCARDED, FILED, PENDING, SEPARATED, STATES, ReconciliationItem
from storage import ObjectStore, StorageError, StorageUnavailable
from storage.keys import is_valid_uid

if TYPE_CHECKING:
    from pacs.ingest import Ingestor, IngestSource
    from pacs.ingest.parsing import ReceivedObject
    from pacs.security.filing_rules import Decision

log = logging.getLogger(__name__)

FILE = "file"
SEPARATE = "separate"
DISCARD = "discard"
ACTIONS = (FILE, SEPARATE, DISCARD)
_STATE_OF = {FILE: FILED, SEPARATE: SEPARATED, DISCARD: DISCARDED}


@dataclass(frozen=True)
class Resolution:
    """A person's decision about one held object, carried through the ingest (file, separate)."""

    item_id: int
    action: str
    reason: str
    actor: str
    role: str = ""
    address: str = ""


@dataclass(frozen=True)
class HeldItem:
    id: int
    state: str
    facility: str
    reason: str
    detail: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    expected_patient_id: str
    expected_issuer_of_patient_id: str
    sha256: str
    size: int
    transport: str
    source_ae: str
    source_address: str
    source_user: str
    source_facility: str
    source_trusted: bool
    received_at: datetime
    resolved_at: datetime | None
    resolved_by: str
    resolution_note: str
    resolved_study_instance_uid: str
    object_key: str


# -- holding (called by pacs.ingest inside its own flow) ---------------------------------------------------


@dataclass(frozen=True)
class HeldObject:
    """What the queue row records about an object: its UIDs, its patient, and who sent it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    size: int
    transport: str
    source_ae: str = ""
    source_address: str = ""
    source_user: str = ""
    source_facility: str = ""
    source_trusted: bool = False

    @classmethod
    def received(cls, obj: ReceivedObject, source: IngestSource) -> HeldObject:
        return cls(obj.study_instance_uid, obj.series_instance_uid, obj.sop_instance_uid, obj.sop_class_uid,
                   obj.patient["patient_id"], obj.patient["issuer_of_patient_id"], obj.patient["patient_name"],
                   len(obj.data), source.transport, source.calling_ae, source.address, source.user, source.facility,
                   source.trusted)


def hold(session: Session, held: HeldObject, decision: Decision, *, key: str,
         sha256: str) -> tuple[ReconciliationItem, bool]:
    """Add the queue row for a held object (inside the caller's transaction); ``(row, created)``.

    The same content already pending in the same queue is not added twice (a modality re-sending)."""
    existing = session.scalars(select(ReconciliationItem).where(
        ReconciliationItem.sha256 == sha256, ReconciliationItem.facility == decision.facility[:64],
        ReconciliationItem.state == PENDING).limit(1)).one_or_none()
    if existing is not None:
        return existing, False
    expected = decision.expected
    row = ReconciliationItem(
        state=PENDING, facility=decision.facility[:64], reason=decision.reason, detail=decision.message[:2000],
        study_instance_uid=held.study_instance_uid, series_instance_uid=held.series_instance_uid,
        sop_instance_uid=held.sop_instance_uid, sop_class_uid=held.sop_class_uid,
        patient_id=held.patient_id[:64], issuer_of_patient_id=held.issuer_of_patient_id[:64],
        patient_name=held.patient_name[:324],
        expected_patient_id=(expected.patient_id if expected else "")[:64],
        expected_issuer_of_patient_id=(expected.issuer_of_patient_id if expected else "")[:64],
        object_key=key, sha256=sha256, size=held.size, transport=held.transport[:16],
        source_ae=held.source_ae[:16], source_address=held.source_address[:64], source_user=held.source_user[:128],
        source_facility=held.source_facility[:64], source_trusted=held.source_trusted,
        received_at=utcnow(), resolved_by="", resolution_note="", resolved_study_instance_uid="")
    session.add(row)
    session.flush()
    return row, True


def mark_resolved(session: Session, resolution: Resolution, study_instance_uid: str) -> ReconciliationItem:
    """Mark a pending row resolved and audit who and why (inside the caller's transaction: for ``file`` and
    ``separate`` the ingest's, so filing and leaving the queue commit together). Raises Conflict when the row
    is no longer pending."""
    row = session.scalars(select(ReconciliationItem).where(ReconciliationItem.id == resolution.item_id)
                          .with_for_update()).one_or_none()
    if row is None:
        raise NotFound(f"no held object {resolution.item_id}")
    if row.state != PENDING:
        raise Conflict(f"held object {resolution.item_id} is already {row.state}")
    row.state = _STATE_OF[resolution.action]
    row.resolved_at = utcnow()
    row.resolved_by = resolution.actor[:128]
    row.resolution_note = resolution.reason[:2000]
    row.resolved_study_instance_uid = study_instance_uid if resolution.action != DISCARD else ""
    session.flush()
    audit.append(session, action=f"reconciliation.{resolution.action}", actor=resolution.actor,
                 role=resolution.role, source_address=resolution.address, patient_id=row.patient_id,
                 study_instance_uid=row.study_instance_uid,
                 detail=(f"held object {row.id} ({row.reason}) sop={row.sop_instance_uid} sha256={row.sha256}"
                         + (f" -> study {study_instance_uid}" if resolution.action == SEPARATE else "")
                         + f" reason: {resolution.reason}"))
    return row


# -- reading the queue ---------------------------------------------------------------------------------


def list_items(session: Session, facilities: frozenset[str] | None, state: str | None = PENDING,
               limit: int = 100, offset: int = 0) -> list[HeldItem]:
    """The queue rows of ``facilities`` (None: every queue), oldest first."""
    if state is not None and state not in STATES:
        raise InvalidInput(f"unknown state {state[:20]!r}: one of {', '.join(STATES)}")
    stmt = select(ReconciliationItem).order_by(ReconciliationItem.id).limit(limit).offset(offset)
    if facilities is not None:
        stmt = stmt.where(ReconciliationItem.facility.in_(sorted(facilities)))
    if state is not None:
        stmt = stmt.where(ReconciliationItem.state == state)
    return [_record(r) for r in session.scalars(stmt)]


def get_item(session: Session, item_id: int, facilities: frozenset[str] | None) -> HeldItem:
    """One row, if it is in one of ``facilities``' queues (NotFound otherwise, the same as a missing id)."""
    row = session.get(ReconciliationItem, item_id)
    if row is None or (facilities is not None and row.facility not in facilities):
        raise NotFound(f"no held object {item_id}")
    return _record(row)


# -- resolving -----------------------------------------------------------------------------------------


def resolve(sessions: sessionmaker[Session], store: ObjectStore, ingestor: Ingestor, item_id: int, action: str,
            *, reason: str, actor: str, role: str, address: str, facilities: frozenset[str] | None,
            study_instance_uid: str = "") -> HeldItem:
    """Apply ``action`` to a pending held object in one of ``facilities``' queues; returns the row after it.

    Raises NotFound (not in scope), Conflict (not pending, or the ingest refused), InvalidInput,
    IndexUnavailable or a StorageError."""
    from pacs.ingest import IngestSource, IngestStatus  # pacs.ingest imports this module

    if action not in ACTIONS:
        raise InvalidInput(f"unknown action {action[:20]!r}: one of {', '.join(ACTIONS)}")
    reason = reason.strip()
    if not reason:
        raise InvalidInput("say why (reason): it is written to the audit trail")
    if study_instance_uid and (action != SEPARATE or not is_valid_uid(study_instance_uid)):
        raise InvalidInput("study_instance_uid: a valid UID, and only with the action separate")
    try:
        with sessions() as session:
            item = get_item(session, item_id, facilities)
    except SQLAlchemyError as exc:
        raise IndexUnavailable("index database unavailable") from exc
    if item.state != PENDING:
        raise Conflict(f"held object {item_id} is already {item.state}")
    resolution = Resolution(item_id, action, reason, actor, role, address)
    if action == DISCARD:
        _discard(sessions, store, item, resolution)
    else:
        data = _read(store, item.object_key)
        target = item.study_instance_uid
        if action == SEPARATE:
            target = study_instance_uid or generate_uid(prefix=None)
            data = _as_new_study(data, target)
        source = IngestSource("reconcile", user=actor, role=role, address=address, facility=item.facility,
                              trusted=True, resolution=resolution)
        outcome = ingestor.ingest(data, source)
        if outcome.status is IngestStatus.DUPLICATE:  # already filed with this content: only leave the queue
            _mark(sessions, resolution, target)
        elif outcome.status is IngestStatus.STORAGE_UNAVAILABLE:
            raise StorageUnavailable(outcome.message)
        elif outcome.status is IngestStatus.INDEX_UNAVAILABLE:
            raise IndexUnavailable(outcome.message)
        elif not outcome.ok or outcome.status is IngestStatus.HELD:
            raise Conflict(f"cannot {action} held object {item_id}: {outcome.message or 'refused'}")
        if action == FILE:
            _remove_copy(sessions, store, item)
    with sessions() as session:
        return get_item(session, item_id, None)


def _discard(sessions: sessionmaker[Session], store: ObjectStore, item: HeldItem, resolution: Resolution) -> None:
    _mark(sessions, resolution, "")
    _remove_copy(sessions, store, item)


def _mark(sessions: sessionmaker[Session], resolution: Resolution, study_instance_uid: str) -> None:
    try:
        with sessions() as session, session.begin():
            mark_resolved(session, resolution, study_instance_uid)
    except SQLAlchemyError as exc:
        raise IndexUnavailable("index database unavailable") from exc


def _remove_copy(sessions: sessionmaker[Session], store: ObjectStore, item: HeldItem) -> None:
    """Remove the held copy once no pending or separated row names it (best effort: a copy left behind is
    harmless, it is outside ``dicom/``)."""
    try:
        with sessions() as session:
            still = session.scalar(select(ReconciliationItem.id).where(
                ReconciliationItem.object_key == item.object_key,
                ReconciliationItem.state.in_((PENDING, SEPARATED))).limit(1))
        if still is None:
            store.delete(item.object_key)
    except (SQLAlchemyError, StorageError) as exc:
        log.warning("held copy %s not removed: %s", item.object_key, str(exc).splitlines()[0][:200])


def _read(store: ObjectStore, key: str) -> bytes:
    return store.get_bytes(key)  # a StorageError reaches the transport (HTTP 503)


def _as_new_study(data: bytes, study_instance_uid: str) -> bytes:
    """A copy of a PS3.10 file with a new Study Instance UID and a Series Instance UID derived from it and the
    old one (so objects of one series stay one series); everything else, pixel data included, unchanged."""
    try:
        ds = dcmread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise Conflict(f"held object cannot be re-identified: {exc}"[:200]) from exc
    digest = hashlib.sha256(f"{study_instance_uid}\x1f{ds.SeriesInstanceUID}".encode()).digest()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = f"2.25.{int.from_bytes(digest[:16], 'big')}"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _record(row: ReconciliationItem) -> HeldItem:
    return HeldItem(
        id=row.id, state=row.state, facility=row.facility, reason=row.reason, detail=row.detail,
        study_instance_uid=row.study_instance_uid, series_instance_uid=row.series_instance_uid,
        sop_instance_uid=row.sop_instance_uid, sop_class_uid=row.sop_class_uid, patient_id=row.patient_id,
        issuer_of_patient_id=row.issuer_of_patient_id, patient_name=row.patient_name,
        expected_patient_id=row.expected_patient_id, expected_issuer_of_patient_id=row.expected_issuer_of_patient_id,
        sha256=row.sha256, size=row.size, transport=row.transport, source_ae=row.source_ae,
        source_address=row.source_address, source_user=row.source_user, source_facility=row.source_facility,
        source_trusted=row.source_trusted, received_at=row.received_at, resolved_at=row.resolved_at,
        resolved_by=row.resolved_by, resolution_note=row.resolution_note,
        resolved_study_instance_uid=row.resolved_study_instance_uid, object_key=row.object_key)
