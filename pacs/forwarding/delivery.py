"""The sender: drains each destination's forward queue with C-STORE, and the queue's admin views.

The queue is the ``forward_job`` table, so it survives restarts and several processes can
drain it. A pass of :class:`ForwardDelivery` asks which registered AEs have due jobs (pending,
``next_attempt_at`` reached), then per destination *claims* a batch and sends it over one
association.

Claiming is a lease, not a held lock: in one short transaction the batch is selected (``FOR
UPDATE SKIP LOCKED`` on PostgreSQL, so concurrent processes take disjoint batches; SQLite's
``BEGIN IMMEDIATE`` serializes the same step) and its ``next_attempt_at`` is pushed ``lease_s``
ahead. No transaction stays open while bytes travel, so a slow destination never holds locks
that ingest waits on. Results are written as they come (grouped about once a second); the lease
is renewed for long batches; a graceful stop hands unsent jobs back at once. A process that dies
mid-batch leaves its jobs to be taken again when the lease runs out: delivery is at least once,
and C-STORE of the same instance twice is harmless for a receiving archive.

Objects are sent as stored, never decoded or re-encoded: each is proposed with its own SOP
class and stored transfer syntax, and pynetdicom streams the dataset from a file (a filesystem
store's own file, or a temporary copy of an S3 object, one at a time).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs.context import AppContext
from pacs.db.dml import affected_rows
from pacs.db.models import ApplicationEntity, ForwardJob, Instance
from pacs.dimse_responses import keeper_for, rejection_of
from pacs.dimse_status import STORAGE_WARNINGS, SUCCESS
from pacs.jobs import JobState, RetryPolicy, as_utc, utcnow
from pacs.polling import PollingLoop
from pacs.settings import Settings
from storage import ObjectNotFound, ObjectStore, StorageError
from storage.base import CHUNK_SIZE
from storage.filesystem import FilesystemStore

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts in one A-ASSOCIATE-RQ (odd IDs 1..255)
_FLUSH_EVERY_S = 1.0


@dataclass(frozen=True)
class DeliveryConfig(RetryPolicy):
    calling_ae: str = "PACS"
    poll_s: float = 2.0
    batch_size: int = 50
    lease_s: float = 600.0
    network_timeout_s: float = 60.0
    max_pdu: int = 262_144

    @classmethod
    def from_settings(cls, s: Settings) -> DeliveryConfig:
        return cls(calling_ae=s.ae_title, poll_s=s.forward_poll_s, batch_size=s.forward_batch_size,
                   max_attempts=s.forward_max_attempts, retry_base_s=s.forward_retry_base_s,
                   retry_max_s=s.forward_retry_max_s, lease_s=s.forward_lease_s,
                   network_timeout_s=s.network_timeout_s, max_pdu=s.max_pdu_size)


def is_delivered(status: int) -> bool:
    """Success, or a Storage warning (coercion, elements discarded, SOP class mismatch): it was stored."""
    return status == SUCCESS or STORAGE_WARNINGS[0] <= status <= STORAGE_WARNINGS[1]


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class _Job:
    id: int
    sop_instance_uid: str
    sha256: str
    attempts: int


@dataclass(frozen=True)
class _Stored:
    object_key: str
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class _Results:
    """Outcomes not yet written to the index."""

    sent: list[int] = field(default_factory=list)
    retry: list[tuple[_Job, str]] = field(default_factory=list)  # attempts + 1, backoff (or failed at max)
    give_up: list[tuple[_Job, str]] = field(default_factory=list)  # failed now: retrying cannot help
    release: list[int] = field(default_factory=list)  # not tried: due again after a short wait

    def flush(self, sessions: sessionmaker[Session], cfg: DeliveryConfig) -> None:
        if not (self.sent or self.retry or self.give_up or self.release):
            return
        now = utcnow()
        pending = ForwardJob.state == JobState.PENDING
        with sessions() as session, session.begin():
            if self.sent:
                session.execute(update(ForwardJob).where(ForwardJob.id.in_(self.sent), pending)
                                .values(state=JobState.SENT, last_error="", next_attempt_at=now))
            for job, error in self.retry:
                session.execute(update(ForwardJob).where(ForwardJob.id == job.id, pending)
                                .values(last_error=error[:2000], **cfg.after_failure(job.attempts + 1, now)))
            for job, error in self.give_up:
                session.execute(update(ForwardJob).where(ForwardJob.id == job.id, pending)
                                .values(state=JobState.FAILED, attempts=job.attempts + 1, last_error=error[:2000]))
            if self.release:
                session.execute(update(ForwardJob).where(ForwardJob.id.in_(self.release), pending)
                                .values(next_attempt_at=now + timedelta(seconds=min(cfg.retry_base_s, cfg.poll_s))))
        self.sent, self.retry, self.give_up, self.release = [], [], [], []


def tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations we request: no Nagle delay on small PDUs."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ForwardDelivery(PollingLoop):
    """The delivery loop (one thread). Any number of processes may run one against the same index."""

    what = "forwarding"

    def __init__(self, ctx: AppContext, config: DeliveryConfig | None = None) -> None:
        super().__init__("pacs-forward")
        self._ctx = ctx
        self.config = config or DeliveryConfig.from_settings(ctx.settings)
        self._down_until: dict[str, float] = {}  # destination → monotonic time; skip it until then
        # Send each dataset from its file as it is, in chunks: no decode/re-encode, no whole object in
        # memory. Process-wide, and only affects send_c_store() given a path (datasets are unaffected).
        _config.STORE_SEND_CHUNKED_DATASET = True

    def start(self) -> ForwardDelivery:
        super().start()
        log.info("forwarding: delivery loop started (poll %ss, batch %d)", self.config.poll_s,
                 self.config.batch_size)
        return self

    def run_once(self) -> bool:
        """One pass over the destinations with due jobs; True when a full batch was sent (more may wait)."""
        busy = False
        for dest in self._due_destinations():
            if self._stop.is_set():
                break
            if self._down_until.get(dest.ae_title, 0.0) > time.monotonic():
                continue
            jobs = self._claim(dest)
            if jobs:
                self._deliver(dest, jobs)
                busy = busy or len(jobs) >= self.config.batch_size
        return busy

    def _due_destinations(self) -> list[Destination]:
        now = utcnow()
        due = exists().where(ForwardJob.destination_ae == ApplicationEntity.ae_title,
                             ForwardJob.state == JobState.PENDING,
                             ForwardJob.next_attempt_at <= now)
        with self._ctx.sessions() as session:
            rows = session.execute(select(ApplicationEntity.ae_title, ApplicationEntity.host, ApplicationEntity.port)
                                   .where(due).order_by(ApplicationEntity.ae_title)).all()
        return [Destination(*r) for r in rows if r.host and 1 <= r.port <= 65535]

    def _claim(self, dest: Destination) -> list[_Job]:
        now = utcnow()
        with self._ctx.sessions() as session, session.begin():
            rows = session.execute(
                select(ForwardJob.id, ForwardJob.sop_instance_uid, ForwardJob.sha256, ForwardJob.attempts)
                .where(ForwardJob.destination_ae == dest.ae_title, ForwardJob.state == JobState.PENDING,
                       ForwardJob.next_attempt_at <= now)
                .order_by(ForwardJob.next_attempt_at, ForwardJob.id)
                .limit(min(self.config.batch_size, MAX_CONTEXTS))
                .with_for_update(skip_locked=True)  # rendered on PostgreSQL; SQLite serializes on BEGIN IMMEDIATE
            ).all()
            if rows:
                self._extend(session, [r.id for r in rows])
        return [_Job(*r) for r in rows]

    def _extend(self, session: Session, ids: list[int]) -> None:
        until = utcnow() + timedelta(seconds=self.config.lease_s)
        session.execute(update(ForwardJob).where(ForwardJob.id.in_(ids), ForwardJob.state == JobState.PENDING)
                        .values(next_attempt_at=until))

    def _resolve(self, jobs: list[_Job], results: _Results) -> list[tuple[_Job, _Stored]]:
        """The stored object of each job; jobs whose version is gone or superseded are failed now."""
        with self._ctx.sessions() as session:
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.sha256, Instance.object_key, Instance.sop_class_uid,
                       Instance.transfer_syntax_uid)
                .where(Instance.sop_instance_uid.in_({j.sop_instance_uid for j in jobs}))).all()
        current = {r.sop_instance_uid: r for r in rows}
        out = []
        for job in jobs:
            row = current.get(job.sop_instance_uid)
            if row is None:
                results.give_up.append((job, "instance is no longer in the archive"))
            elif row.sha256 != job.sha256:
                # Sending an old version after the new one would leave the destination with the old one.
                results.give_up.append((job, f"superseded by a newer version (sha256 {row.sha256[:12]}…)"))
            else:
                out.append((job, _Stored(row.object_key, row.sop_class_uid, row.transfer_syntax_uid)))
        return out

    def _deliver(self, dest: Destination, jobs: list[_Job]) -> None:
        cfg = self.config
        results = _Results()
        try:
            batch = self._resolve(jobs, results)
            if batch:
                self._send(dest, batch, results)
        except BaseException:
            decided = _decided(results)
            results.release += [j.id for j in jobs if j.id not in decided]  # due again soon, not after the lease
            raise
        finally:
            results.flush(self._ctx.sessions, cfg)

    def _send(self, dest: Destination, batch: list[tuple[_Job, _Stored]], results: _Results) -> None:
        cfg = self.config
        ae = AE(ae_title=cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = cfg.network_timeout_s
        ae.connection_timeout = min(cfg.network_timeout_s, 10.0)
        for pair in dict.fromkeys((s.sop_class_uid, s.transfer_syntax_uid) for _, s in batch):
            ae.add_requested_context(pair[0], [pair[1]])
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=cfg.max_pdu,
                             evt_handlers=[(evt.EVT_CONN_OPEN, tcp_nodelay)])
        if not assoc.is_established:
            if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
                # It answered, but takes none of these objects as stored: counts against them, not the destination.
                results.retry += [(job, _no_context(dest, s)) for job, s in batch]
                return
            why = "rejected the association" if rejection_of(assoc) else "is unreachable"
            self._destination_down(dest, batch, results, f"{dest} {why}")
            return
        sent = 0
        next_flush = time.monotonic() + _FLUSH_EVERY_S
        renew_at = time.monotonic() + cfg.lease_s / 2
        try:
            for i, (job, stored) in enumerate(batch):
                if self._stop.is_set():
                    results.release += [j.id for j, _ in batch[i:]]
                    break
                try:
                    status = self._send_one(assoc, stored)
                except ObjectNotFound:
                    results.give_up.append((job, f"object {stored.object_key} is missing from the store"))
                    continue
                except StorageError as exc:  # our store is down: not the destination's fault, no attempt counted
                    log.warning("forwarding to %s paused: object store unavailable: %s", dest, exc)
                    results.release += [j.id for j, _ in batch[i:]]
                    break
                except ValueError:  # no accepted presentation context for this object
                    results.retry.append((job, _no_context(dest, stored)))
                    continue
                except Exception as exc:  # e.g. an unreadable file meta: counts as an attempt, so it ends failed
                    log.exception("forwarding: could not send %s", stored.object_key)
                    results.retry.append((job, f"could not send: {exc}"))
                    continue
                if status is None:
                    self._destination_down(dest, batch[i:], results, f"association with {dest} aborted")
                    break
                code = int(status.Status)
                if is_delivered(code):
                    results.sent.append(job.id)
                    sent += 1
                else:
                    comment = str(status.get("ErrorComment", "")).strip()
                    results.retry.append((job, f"C-STORE status 0x{code:04X}" + (f": {comment}" if comment else "")))
                now = time.monotonic()
                if now >= next_flush:
                    results.flush(self._ctx.sessions, cfg)
                    next_flush = now + _FLUSH_EVERY_S
                if now >= renew_at and i + 1 < len(batch):
                    with self._ctx.sessions() as session, session.begin():
                        self._extend(session, [j.id for j, _ in batch[i + 1:]])
                    renew_at = now + cfg.lease_s / 2
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("forwarding: sent %d of %d object(s) to %s", sent, len(batch), dest)

    def _send_one(self, assoc: Association, stored: _Stored) -> Dataset | None:
        """C-STORE one stored object from a file; None when the association broke (no response)."""
        with local_file(self._ctx.store, stored.object_key) as path:
            try:
                with keeper_for(assoc).sending():
                    status = assoc.send_c_store(path)
            except (RuntimeError, OSError) as exc:  # association no longer established / socket gone
                log.warning("forwarding: C-STORE failed: %s", exc)
                return None
        if not status or "Status" not in status:
            return None
        return status

    def _destination_down(self, dest: Destination, batch: list[tuple[_Job, _Stored]], results: _Results,
                          error: str) -> None:
        """The whole rest of the batch waits; this process also leaves the destination alone meanwhile."""
        log.warning("forwarding: %s; %d object(s) will be retried", error, len(batch))
        results.retry += [(job, error) for job, _ in batch]
        wait = min(self.config.delay(job.attempts + 1) for job, _ in batch)
        self._down_until[dest.ae_title] = time.monotonic() + wait


@contextlib.contextmanager
def local_file(store: ObjectStore, key: str) -> Iterator[Path]:
    """A file holding the stored object, for pynetdicom to stream as it is: the filesystem store's
    own file, else a temporary copy (streamed from S3, deleted on exit)."""
    if isinstance(store, FilesystemStore):
        path = store.root.joinpath(*key.split("/"))
        if not path.is_file():
            raise ObjectNotFound(key)
        yield path
        return
    with tempfile.NamedTemporaryFile(prefix="pacs-send-", suffix=".dcm") as tmp:
        with store.open(key) as src:
            shutil.copyfileobj(src, tmp, CHUNK_SIZE)
        tmp.flush()
        yield Path(tmp.name)


def _no_context(dest: Destination, stored: _Stored) -> str:
    return (f"{dest} accepted no presentation context for SOP class {stored.sop_class_uid} in transfer syntax "
            f"{stored.transfer_syntax_uid} (objects are sent as stored, never transcoded)")


def _decided(results: _Results) -> set[int]:
    return {*results.sent, *(j.id for j, _ in results.retry), *(j.id for j, _ in results.give_up), *results.release}


# -- the queue, for `pacs forward queue|retry` ------------------------------------------------------


@dataclass(frozen=True)
class QueueStats:
    destination_ae: str
    pending: int
    sent: int
    failed: int
    oldest_pending: datetime | None  # when the oldest pending job was queued
    next_attempt_at: datetime | None
    last_error: str  # the latest error of a pending or failed job


def queue_stats(session: Session) -> list[QueueStats]:
    rows = session.execute(
        select(ForwardJob.destination_ae, ForwardJob.state, func.count(), func.min(ForwardJob.created_at),
               func.min(ForwardJob.next_attempt_at))
        .group_by(ForwardJob.destination_ae, ForwardJob.state)).all()
    by_dest: dict[str, dict[str, tuple[int, datetime | None, datetime | None]]] = {}
    for dest, state, count, oldest, next_at in rows:
        by_dest.setdefault(dest, {})[state] = (count, as_utc(oldest), as_utc(next_at))
    out = []
    for dest in sorted(by_dest):
        states = by_dest[dest]
        pending = states.get(JobState.PENDING, (0, None, None))
        last_error = session.scalar(
            select(ForwardJob.last_error).where(ForwardJob.destination_ae == dest,
                                                ForwardJob.state.in_((JobState.PENDING, JobState.FAILED)),
                                                ForwardJob.last_error != "")
            .order_by(ForwardJob.updated_at.desc(), ForwardJob.id.desc()).limit(1)) or ""
        out.append(QueueStats(dest, pending[0], states.get(JobState.SENT, (0,))[0],
                              states.get(JobState.FAILED, (0,))[0], pending[1], pending[2], last_error))
    return out


def retry_failed(session: Session, destination_ae: str | None = None) -> int:
    """Failed jobs back to pending with a fresh attempt count; returns how many."""
    stmt = update(ForwardJob).where(ForwardJob.state == JobState.FAILED)
    if destination_ae:
        stmt = stmt.where(ForwardJob.destination_ae == destination_ae)
    return affected_rows(session, stmt.values(state=JobState.PENDING, attempts=0, next_attempt_at=utcnow()))
