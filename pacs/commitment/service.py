"""Storage Commitment (PS3.4 Annex J): which requested instances are durably stored, and the report queue.

*Durably stored* means what ingest means by success (``pacs/ingest/service.py``): the instance is in the
index with the requested SOP class **and** its object is in the store. The object check is
existence plus size (``store.size``: a ``stat`` or an S3 HEAD), compared with the size the
index recorded. The content is not re-hashed: ingest computed the SHA-256 over the exact bytes
before ``put`` returned (durable and atomic), so re-reading every byte of a study per request
would cost a full download of it to guard against silent corruption of the store, which is
``pacs check``'s job; the size check catches what can plausibly happen between ingest and the
request (a missing or truncated object).

Only instances of studies inside the requesting AE's scope count (:mod:`pacs.ae_scope`: its facility's
studies and those shared with it, every study for an archive-wide AE): any other instance is reported
failed with *No such object instance* (0x0112), exactly like one that is not archived, so a commitment
request tells nothing about other facilities' studies.

Each request is a row of ``storage_commitment`` (:mod:`pacs.commitment.models`), written when
the N-ACTION is accepted. :class:`CommitmentReporter` (one thread per ``pacs serve`` /
``pacs scp`` process) claims due rows one at a time, decides the result once and keeps it in the row, and
sends the N-EVENT-REPORT through a transport-specific ``send`` function (DIMSE:
``dicom_scp.commitment_service.send_event_report``), retrying with backoff until the requester
takes it. Claiming is the lease of ``pacs/forwarding/delivery.py``: ``FOR UPDATE SKIP LOCKED``
on PostgreSQL (``BEGIN IMMEDIATE`` serializes it on SQLite) and ``next_attempt_at`` pushed
``lease_s`` ahead, so several processes never report the same transaction at once, and one that
dies mid-report leaves it to the others when the lease runs out (at least once delivery).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.ae_scope import ae_scope
from pacs.aes import lookup
from pacs.commitment.models import FAILED, PENDING, REPORTED, StorageCommitment
from pacs.context import AppContext
from pacs.db.models import ApplicationEntity, Instance, Series, Study
from pacs.dimse_status import CLASS_INSTANCE_CONFLICT, NO_SUCH_SOP_INSTANCE, PROCESSING_FAILURE
from pacs.forwarding.delivery import Destination
from pacs.jobs import retry_delay, utcnow
from pacs.polling import PollingLoop
from pacs.security.access import study_condition
from pacs.security.principal import AccessScope
from pacs.settings import Settings
from pacs.studies.models import RejectionNote
from pacs.studies.rejection_notes import KEY_OBJECT_SELECTION
from storage import ObjectNotFound, ObjectStore, StorageError

log = logging.getLogger(__name__)

# Failure Reason (0008,1197) values (PS3.4 J.3.3.1.1), from the one table in pacs.dimse_status:
# PROCESSING_FAILURE: the archive cannot vouch for the object right now (store unreachable, object damaged);
# NO_SUCH_SOP_INSTANCE: not in the archive (or outside the requester's scope);
# CLASS_INSTANCE_CONFLICT: in the archive, but with another SOP class.

_IN_CHUNK = 500  # SOP Instance UIDs per IN (...) query
_CHECK_THREADS = 8  # concurrent store.size calls (S3 HEAD round trips) per evaluation


@dataclass(frozen=True)
class SopRef:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class FailedRef:
    sop_class_uid: str
    sop_instance_uid: str
    reason: int


@dataclass(frozen=True)
class CommitmentResult:
    """The answer to one request: what is durably stored, and why the rest is not."""

    success: tuple[SopRef, ...]
    failed: tuple[FailedRef, ...]

    @property
    def event_type(self) -> int:
        """N-EVENT-REPORT Event Type ID: 1 all committed, 2 some failures exist."""
        return 2 if self.failed else 1

    def to_json(self) -> str:
        return json.dumps({"success": [[r.sop_class_uid, r.sop_instance_uid] for r in self.success],
                           "failed": [[f.sop_class_uid, f.sop_instance_uid, f.reason] for f in self.failed]})

    @classmethod
    def from_json(cls, text: str) -> CommitmentResult:
        data = json.loads(text)
        return cls(tuple(SopRef(c, i) for c, i in data["success"]),
                   tuple(FailedRef(c, i, int(r)) for c, i, r in data["failed"]))


def unique_refs(refs: Iterable[SopRef]) -> list[SopRef]:
    """The refs without repeats, in request order (a pair listed twice is answered once)."""
    return list(dict.fromkeys(refs))


def refs_to_json(refs: Sequence[SopRef]) -> str:
    return json.dumps([[r.sop_class_uid, r.sop_instance_uid] for r in refs])


def refs_from_json(text: str) -> list[SopRef]:
    return [SopRef(c, i) for c, i in json.loads(text)]


# -- deciding what is durably stored -----------------------------------------------------------


@dataclass(frozen=True)
class _Indexed:
    sop_class_uid: str
    object_key: str
    size: int


def evaluate(sessions: sessionmaker[Session], store: ObjectStore, refs: Sequence[SopRef], *,
             scope: AccessScope) -> CommitmentResult:
    """Decide each ref; an instance outside ``scope`` is not archived as far as the requester can tell.

    Raises ``SQLAlchemyError`` when the index cannot be read (the caller retries later); an
    unreachable store is a per-instance Processing failure (0x0110).
    """
    refs = unique_refs(refs)
    indexed = _lookup(sessions, {r.sop_instance_uid for r in refs}, scope)
    checks = _check_objects(store, {row.object_key: row.size for row in indexed.values()})
    success: list[SopRef] = []
    failed: list[FailedRef] = []
    for ref in refs:
        row = indexed.get(ref.sop_instance_uid)
        if row is None:
            reason: int | None = NO_SUCH_SOP_INSTANCE
        elif row.sop_class_uid != ref.sop_class_uid:
            reason = CLASS_INSTANCE_CONFLICT
        else:
            reason = checks[row.object_key]
        if reason is None:
            success.append(ref)
        else:
            failed.append(FailedRef(ref.sop_class_uid, ref.sop_instance_uid, reason))
    return CommitmentResult(tuple(success), tuple(failed))


def _lookup(sessions: sessionmaker[Session], uids: set[str], scope: AccessScope) -> dict[str, _Indexed]:
    ordered = sorted(uids)
    out: dict[str, _Indexed] = {}
    columns = select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.object_key, Instance.size)
    if not scope.unrestricted:
        columns = (columns.join(Series, Instance.series_fk == Series.id).join(Study, Series.study_fk == Study.id)
                   .where(study_condition(scope)))
    # a stored IOCM rejection note (indexed in rejection_note, never in instance) is stored like any object: the
    # modality that sent it may ask for its commitment
    notes = select(RejectionNote.sop_instance_uid, RejectionNote.object_key, RejectionNote.size)
    if not scope.unrestricted:
        notes = notes.join(Study, Study.study_instance_uid == RejectionNote.study_instance_uid).where(
            study_condition(scope))
    with sessions() as session:
        for start in range(0, len(ordered), _IN_CHUNK):
            part = ordered[start:start + _IN_CHUNK]
            rows = session.execute(columns.where(Instance.sop_instance_uid.in_(part))).all()
            out.update({r.sop_instance_uid: _Indexed(r.sop_class_uid, r.object_key, r.size) for r in rows})
            for note in session.execute(notes.where(RejectionNote.sop_instance_uid.in_(part))):
                out.setdefault(note.sop_instance_uid, _Indexed(KEY_OBJECT_SELECTION, note.object_key, note.size))
    return out


def _check_objects(store: ObjectStore, expected: dict[str, int]) -> dict[str, int | None]:
    """Object key → None when the object is there with the indexed size, else a Failure Reason.

    Once the store is found unreachable the remaining keys are not tried (each try could wait
    for a network timeout); they fail with 0x0110 like the first.
    """
    down = threading.Event()

    def check(key: str) -> int | None:
        if down.is_set():
            return PROCESSING_FAILURE
        try:
            size = store.size(key)
        except ObjectNotFound:
            log.error("storage commitment: %s is indexed but missing from the store (run pacs check)", key)
            return PROCESSING_FAILURE
        except StorageError as exc:
            if not down.is_set():
                log.warning("storage commitment: object store unavailable: %s", exc)
            down.set()
            return PROCESSING_FAILURE
        if size != expected[key]:
            log.error("storage commitment: %s has %d bytes, the index says %d (run pacs check)", key, size,
                      expected[key])
            return PROCESSING_FAILURE
        return None

    keys = list(expected)
    if len(keys) <= 4:
        return {key: check(key) for key in keys}
    with ThreadPoolExecutor(_CHECK_THREADS, thread_name_prefix="pacs-commit-check") as pool:
        return dict(zip(keys, pool.map(check, keys), strict=True))


# -- the request table --------------------------------------------------------------------------


class Recorded(StrEnum):
    PENDING = "pending"  # new, or the same request again (re-armed): a report will be sent
    UNREGISTERED = "unregistered"  # recorded as failed: no address to send the report to
    CONFLICT = "conflict"  # this Transaction UID already names another request: nothing written


def registered_destination(session: Session, ae_title: str) -> Destination | None:
    """Where to send ``ae_title``'s reports: its registered host and port, if it has usable ones."""
    row = session.execute(select(ApplicationEntity.host, ApplicationEntity.port)
                          .where(ApplicationEntity.ae_title == ae_title)).one_or_none()
    if row is None or not row.host or not 1 <= row.port <= 65535:
        return None
    return Destination(ae_title, row.host, row.port)


def _not_registered(ae_title: str) -> str:
    return (f"requesting AE {ae_title!r} is not registered with a host and port (pacs ae add {ae_title or 'TITLE'} "
            "HOST PORT): there is no address to send the N-EVENT-REPORT to")


def record_request(sessions: sessionmaker[Session], transaction_uid: str, requesting_ae: str,
                   refs: Sequence[SopRef], requesting_address: str = "") -> Recorded:
    """Write the request (one transaction) so that the report survives a restart.

    The same Transaction UID again from the same AE with the same refs (a requester that
    did not get our N-ACTION response and asked again) re-arms it: decided afresh and reported
    again. With other content it is a conflict. An unregistered requester is recorded as
    ``failed`` with the reason, for the operator to see.
    """
    refs_json = refs_to_json(unique_refs(refs))
    for _ in range(2):  # a concurrent insert of the same UID: look again at what it wrote
        try:
            with sessions() as session, session.begin():
                registered = registered_destination(session, requesting_ae) is not None
                state, error = (PENDING, "") if registered else (FAILED, _not_registered(requesting_ae))
                row = session.scalars(select(StorageCommitment)
                                      .where(StorageCommitment.transaction_uid == transaction_uid)
                                      .with_for_update()).one_or_none()
                if row is not None and (row.requesting_ae != requesting_ae or row.requested_refs != refs_json):
                    return Recorded.CONFLICT
                if row is None:
                    row = StorageCommitment(transaction_uid=transaction_uid, requesting_ae=requesting_ae,
                                            requested_refs=refs_json)
                    session.add(row)
                row.requesting_address = requesting_address[:64]
                row.result, row.state, row.attempts, row.last_error = None, state, 0, error
                row.next_attempt_at, row.reported_at = utcnow(), None
            return Recorded.PENDING if registered else Recorded.UNREGISTERED
        except IntegrityError:
            continue
    return Recorded.CONFLICT


# -- the reporter -------------------------------------------------------------------------------


class ReportNotDelivered(Exception):
    """The requester did not take the report (unreachable, refused, failure status); try again later."""


@dataclass(frozen=True)
class CommitmentConfig:
    calling_ae: str = "PACS"
    poll_s: float = 2.0
    batch_size: int = 20  # reports per pass before the loop looks at its stop flag and wake-ups again
    max_attempts: int = 40  # with the default backoff: about 6 hours of trying
    retry_base_s: float = 10.0
    retry_max_s: float = 600.0
    lease_s: float = 600.0  # longer than deciding and sending one report can take (see from_settings)
    network_timeout_s: float = 60.0
    max_pdu: int = 262_144

    @classmethod
    def from_settings(cls, s: Settings) -> CommitmentConfig:
        """The ``PACS_COMMITMENT_*`` settings plus our AE title and network limits."""
        network = s.network_timeout_s
        return cls(calling_ae=s.ae_title, poll_s=s.commitment_poll_s, max_attempts=s.commitment_max_attempts,
                   retry_base_s=s.commitment_retry_base_s, retry_max_s=s.commitment_retry_max_s,
                   # two associations at most (with and without role selection), each up to connect (10 s)
                   # + ACSE + DIMSE + release timeouts, plus time to decide the result
                   lease_s=max(s.commitment_lease_s, 2 * (10 + 3 * network) + 120),
                   network_timeout_s=network, max_pdu=s.max_pdu_size)


#: Sends one report: (config, requester, Transaction UID, result); raises ReportNotDelivered.
ReportSender = Callable[[CommitmentConfig, Destination, str, CommitmentResult], None]


@dataclass(frozen=True)
class _Claimed:
    id: int
    transaction_uid: str
    requesting_ae: str
    requested_refs: str
    result: str | None
    attempts: int


class CommitmentReporter(PollingLoop):
    """The report loop (one thread); any number of processes may run one against the same index."""

    what = "storage commitment"

    def __init__(self, ctx: AppContext, send: ReportSender, config: CommitmentConfig | None = None) -> None:
        super().__init__("pacs-commitment")
        self._ctx = ctx
        self._send = send
        self.config = config or CommitmentConfig.from_settings(ctx.settings)

    def start(self) -> CommitmentReporter:
        super().start()
        log.info("storage commitment: report loop started (poll %ss)", self.config.poll_s)
        return self

    def run_once(self) -> bool:
        """Report due requests, claimed one at a time (so the lease covers only the one being sent);
        True when ``batch_size`` were handled and more may wait."""
        for _ in range(self.config.batch_size):
            if self._stop.is_set():
                return False
            job = self._claim()
            if job is None:
                return False
            try:
                self._process(job)
            except BaseException:
                self._release(job.id)  # due again now, not after the lease
                raise
        return True

    def _claim(self) -> _Claimed | None:
        now = utcnow()
        with self._ctx.sessions() as session, session.begin():
            row = session.execute(
                select(StorageCommitment.id, StorageCommitment.transaction_uid, StorageCommitment.requesting_ae,
                       StorageCommitment.requested_refs, StorageCommitment.result, StorageCommitment.attempts)
                .where(StorageCommitment.state == PENDING, StorageCommitment.next_attempt_at <= now)
                .order_by(StorageCommitment.next_attempt_at, StorageCommitment.id)
                .limit(1)
                .with_for_update(skip_locked=True)  # PostgreSQL; SQLite serializes on BEGIN IMMEDIATE
            ).one_or_none()
            if row is not None:
                session.execute(update(StorageCommitment).where(StorageCommitment.id == row.id)
                                .values(next_attempt_at=now + timedelta(seconds=self.config.lease_s)))
        return _Claimed(*row) if row is not None else None

    def _process(self, job: _Claimed) -> None:
        if job.result is None:
            with self._ctx.read_sessions() as session:
                scope = ae_scope(lookup(session, job.requesting_ae))  # an AE removed since sees nothing
            result = evaluate(self._ctx.read_sessions, self._ctx.store, refs_from_json(job.requested_refs),
                              scope=scope)
            self._update(job, result=result.to_json())  # decided once: every retry sends the same report
        else:
            result = CommitmentResult.from_json(job.result)
        with self._ctx.read_sessions() as session:
            dest = registered_destination(session, job.requesting_ae)
        if dest is None:
            log.warning("storage commitment %s: %s", job.transaction_uid, _not_registered(job.requesting_ae))
            self._update(job, state=FAILED, attempts=job.attempts + 1, last_error=_not_registered(job.requesting_ae))
            return
        try:
            self._send(self.config, dest, job.transaction_uid, result)
        except Exception as exc:  # ReportNotDelivered, or a bug: either way counted, so it cannot loop hot
            if not isinstance(exc, ReportNotDelivered):
                log.exception("storage commitment %s: sending the report failed", job.transaction_uid)
            self._retry(job, dest, str(exc) or type(exc).__name__)
            return
        self._update(job, state=REPORTED, attempts=job.attempts + 1, last_error="", reported_at=utcnow())
        log.info("storage commitment %s reported to %s: %d committed, %d failed", job.transaction_uid, dest,
                 len(result.success), len(result.failed))

    def _retry(self, job: _Claimed, dest: Destination, error: str) -> None:
        attempts = job.attempts + 1
        if attempts >= self.config.max_attempts:
            log.error("storage commitment %s: giving up after %d attempts: %s", job.transaction_uid, attempts, error)
            self._update(job, state=FAILED, attempts=attempts, last_error=error[:2000])
            return
        wait = retry_delay(attempts, self.config.retry_base_s, self.config.retry_max_s)
        log.warning("storage commitment %s: report to %s not delivered (attempt %d, next in %gs): %s",
                    job.transaction_uid, dest, attempts, wait, error)
        self._update(job, attempts=attempts, last_error=error[:2000],
                     next_attempt_at=utcnow() + timedelta(seconds=wait))

    def _update(self, job: _Claimed, **values: object) -> None:
        with self._ctx.sessions() as session, session.begin():
            session.execute(update(StorageCommitment)
                            .where(StorageCommitment.id == job.id, StorageCommitment.state == PENDING)
                            .values(**values))

    def _release(self, job_id: int) -> None:
        try:
            with self._ctx.sessions() as session, session.begin():
                session.execute(update(StorageCommitment)
                                .where(StorageCommitment.id == job_id, StorageCommitment.state == PENDING)
                                .values(next_attempt_at=utcnow()))
        except SQLAlchemyError as exc:
            log.warning("storage commitment: could not hand back request %d (due after the lease): %s", job_id,
                        str(exc).splitlines()[0][:200])
