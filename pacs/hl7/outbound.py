"""The HL7 outbound queue: report results (ORU^R01) waiting for delivery over MLLP, and its sender.

:func:`enqueue_oru` is called in the transaction that signs (or makes preliminary) a report
version: one ``hl7_outbound`` row per configured destination, so a message is never lost when a
process dies after the commit. :class:`Hl7Delivery` drains the table the way
:class:`pacs.forwarding.delivery.ForwardDelivery` drains the forward queue: a short transaction
*claims* due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, SQLite's ``BEGIN IMMEDIATE``
serialising the same step) by pushing ``next_attempt_at`` a lease ahead; no transaction is open
while a message travels; each outcome is written in its own short transaction. A process that
dies mid-send leaves its rows to be taken again when the lease runs out: delivery is at least
once, and the receiver can recognise a repeat by its MSH-10 control id.

Versions of one report go out in order: a row is not claimed while an earlier row of the same
report for the same destination is still pending (an amendment never overtakes the final report
it corrects). A row that keeps failing ends ``failed`` after ``hl7_max_attempts`` and stops
holding the later ones back; ``pacs hl7 retry`` queues failed rows again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from pacs.context import AppContext
from pacs.db.dml import affected_rows
from pacs.errors import InvalidInput
from pacs.hl7.messages import Hl7Error, build_oru, parse_ack
from pacs.hl7.mllp import MllpError, parse_address, send_and_receive
from pacs.jobs import JobState, RetryPolicy, as_utc, utcnow
from pacs.polling import PollingLoop
from pacs.reports.document import ReportDocument
from pacs.reports.models import Hl7Outbound
from pacs.settings import Settings

log = logging.getLogger(__name__)

OUTBOUND_STATES = (JobState.PENDING, JobState.SENT, JobState.FAILED)


@dataclass(frozen=True)
class Hl7Destination:
    """An MLLP receiver of our ORU^R01 messages (a name from ``PACS_HL7_DESTINATIONS``)."""

    name: str
    host: str
    port: int
    receiving_application: str = ""  # MSH-5 (default: the destination's name)
    receiving_facility: str = ""  # MSH-6

    def __str__(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"


def destinations_from_settings(settings: Settings) -> dict[str, Hl7Destination]:
    """``hl7_destinations`` (name → "host:port") as destinations, with the receiving application/facility."""
    out = {}
    for name, address in settings.hl7_destinations.items():
        host, port = parse_address(address)
        out[name] = Hl7Destination(name, host, port, settings.hl7_receiving_application or name,
                                   settings.hl7_receiving_facility)
    return out


def control_id_for(report_id: int, version: int, destination: str) -> str:
    """MSH-10 of one report version's message to one destination: ``R{report}V{version}D{6 hex of the name}``.

    Stable (a resend after a crash carries the same id, so the receiver can drop the repeat), unique per
    destination, and within MSH-10's 20 characters for any realistic report id.
    """
    digest = hashlib.sha256(destination.encode("utf-8")).hexdigest()[:6].upper()
    return f"R{report_id}V{version}D{digest}"


def enqueue_oru(session: Session, doc: ReportDocument, destinations: dict[str, Hl7Destination]) -> list[Hl7Outbound]:
    """Queue the ORU^R01 of ``doc`` for every destination, in the caller's transaction.

    Idempotent: a destination that already has a row for this report version keeps it (its row is
    returned as it is). Raises :class:`InvalidInput` for a draft (drafts are never published).
    """
    if doc.status not in ("preliminary", "final", "amended"):
        raise InvalidInput(f"report {doc.report_id} version {doc.version} is {doc.status}: only preliminary, "
                           "final and amended versions are sent")
    rows = []
    for name in sorted(destinations):
        existing = _existing(session, name, doc)
        if existing is not None:
            rows.append(existing)
            continue
        rows.append(_insert(session, doc, destinations[name]))
    return rows


def _existing(session: Session, destination: str, doc: ReportDocument) -> Hl7Outbound | None:
    return session.scalars(select(Hl7Outbound).where(
        Hl7Outbound.destination == destination, Hl7Outbound.report_fk == doc.report_id,
        Hl7Outbound.report_version == doc.version)).one_or_none()


def _insert(session: Session, doc: ReportDocument, dest: Hl7Destination) -> Hl7Outbound:
    control_id = control_id_for(doc.report_id, doc.version, dest.name)
    row = Hl7Outbound(
        destination=dest.name, message_type="ORU^R01", message_control_id=control_id, report_fk=doc.report_id,
        report_version=doc.version, state=JobState.PENDING, attempts=0, next_attempt_at=utcnow(), ack_code="",
        last_error="", message=build_oru(doc, control_id=control_id, receiving_application=dest.receiving_application,
                                         receiving_facility=dest.receiving_facility),
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another transaction queued it meanwhile
        existing = _existing(session, dest.name, doc)
        if existing is None:
            raise
        return existing
    return row


# -- the sender ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hl7DeliveryConfig(RetryPolicy):
    poll_s: float = 2.0
    batch_size: int = 20
    lease_s: float = 120.0
    timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, s: Settings) -> Hl7DeliveryConfig:
        return cls(poll_s=s.hl7_poll_s, max_attempts=s.hl7_max_attempts, retry_base_s=s.hl7_retry_base_s,
                   retry_max_s=s.hl7_retry_max_s, lease_s=s.hl7_lease_s, timeout_s=s.hl7_timeout_s)


@dataclass(frozen=True)
class _Job:
    id: int
    destination: str
    control_id: str
    message: str
    attempts: int


class _Unreachable(Exception):
    """The destination could not be reached or gave no usable answer (not the message's fault)."""


class Hl7Delivery(PollingLoop):
    """The HL7 delivery loop (one thread). Any number of processes may run one against the same index."""

    what = "hl7 delivery"

    def __init__(self, ctx: AppContext, config: Hl7DeliveryConfig | None = None,
                 destinations: dict[str, Hl7Destination] | None = None) -> None:
        super().__init__("pacs-hl7-out")
        self._ctx = ctx
        self.config = config or Hl7DeliveryConfig.from_settings(ctx.settings)
        self.destinations = destinations if destinations is not None else destinations_from_settings(ctx.settings)
        self._down_until: dict[str, float] = {}  # destination → monotonic time; skipped until then

    def start(self) -> Hl7Delivery:
        super().start()
        log.info("hl7: outbound sender started (poll %ss, destinations: %s)", self.config.poll_s,
                 ", ".join(str(d) for d in self.destinations.values()) or "none configured")
        return self

    def run_once(self) -> bool:
        """One pass: claim due messages, send each; True when a full batch was claimed (more may wait)."""
        jobs = self._claim()
        by_destination: dict[str, list[_Job]] = {}
        for job in jobs:
            by_destination.setdefault(job.destination, []).append(job)
        for name, group in by_destination.items():
            self._deliver(name, group)
        return len(jobs) >= self.config.batch_size

    def _claim(self) -> list[_Job]:
        now = utcnow()
        skip = [name for name, until in self._down_until.items() if until > time.monotonic()]
        earlier = aliased(Hl7Outbound)
        blocked = exists().where(earlier.destination == Hl7Outbound.destination,
                                 earlier.report_fk == Hl7Outbound.report_fk, earlier.state == JobState.PENDING,
                                 earlier.id < Hl7Outbound.id)
        stmt = (select(Hl7Outbound.id, Hl7Outbound.destination, Hl7Outbound.message_control_id, Hl7Outbound.message,
                       Hl7Outbound.attempts)
                .where(Hl7Outbound.state == JobState.PENDING, Hl7Outbound.next_attempt_at <= now, ~blocked)
                .order_by(Hl7Outbound.next_attempt_at, Hl7Outbound.id).limit(self.config.batch_size)
                .with_for_update(skip_locked=True, of=Hl7Outbound))
        if skip:
            stmt = stmt.where(Hl7Outbound.destination.not_in(skip))
        with self._ctx.sessions() as session, session.begin():
            rows = session.execute(stmt).all()
            if rows:
                until = now + timedelta(seconds=self.config.lease_s)
                session.execute(update(Hl7Outbound).where(Hl7Outbound.id.in_([r.id for r in rows]),
                                                          Hl7Outbound.state == JobState.PENDING)
                                .values(next_attempt_at=until, lease_until=until))
        return [_Job(*r) for r in rows]

    def _deliver(self, name: str, jobs: list[_Job]) -> None:
        dest = self.destinations.get(name)
        for i, job in enumerate(jobs):
            if self._stop.is_set():
                self._release(jobs[i:], 0.0)
                return
            if dest is None:
                self._failed_attempt(job, f"destination {name!r} is not configured (PACS_HL7_DESTINATIONS)")
                continue
            try:
                ack_code, error = self._send(dest, job)
            except _Unreachable as exc:
                delay = self._failed_attempt(job, str(exc))
                log.warning("hl7: %s; %d message(s) wait %.1fs", exc, len(jobs) - i, delay)
                self._down_until[name] = time.monotonic() + delay
                self._release(jobs[i + 1:], delay)
                return
            except Exception as exc:  # a bug: counts as an attempt, so the row ends failed instead of looping
                log.exception("hl7: could not send message %s", job.control_id)
                self._failed_attempt(job, f"could not send: {exc}")
                continue
            if error:
                self._failed_attempt(job, error, ack_code)
            else:
                self._sent(job, ack_code)

    def _send(self, dest: Hl7Destination, job: _Job) -> tuple[str, str]:
        """(ACK code, error or "") for one message; raises :class:`_Unreachable` for network trouble."""
        cfg = self.config
        try:
            reply = send_and_receive(dest.host, dest.port, job.message.encode("utf-8"), cfg.timeout_s)
        except (OSError, MllpError) as exc:
            raise _Unreachable(f"{dest} is unreachable: {exc}") from exc
        try:
            ack = parse_ack(reply)
        except Hl7Error as exc:
            return "", f"{dest} answered something that is not an HL7 acknowledgement: {exc.message}"
        if ack.control_id != job.control_id:
            return ack.code, (f"{dest} acknowledged message {ack.control_id!r}, not {job.control_id!r}")
        if not ack.accepted:
            return ack.code, f"{dest} answered {ack.code or '(no code)'}" + (f": {ack.text}" if ack.text else "")
        return ack.code, ""

    def _sent(self, job: _Job, ack_code: str) -> None:
        with self._ctx.sessions() as session, session.begin():
            session.execute(update(Hl7Outbound).where(Hl7Outbound.id == job.id, Hl7Outbound.state == JobState.PENDING)
                            .values(state=JobState.SENT, ack_code=ack_code[:4], last_error="", lease_until=None,
                                    next_attempt_at=utcnow()))
        log.info("hl7: delivered %s to %s (%s)", job.control_id, job.destination, ack_code)

    def _failed_attempt(self, job: _Job, error: str, ack_code: str = "") -> float:
        """Attempts + 1 and a backoff, or ``failed`` at the last attempt; returns the wait."""
        attempts = job.attempts + 1
        values = self.config.after_failure(attempts, utcnow())
        if values.get("state") == JobState.FAILED:
            log.error("hl7: message %s to %s failed after %d attempts: %s", job.control_id, job.destination,
                      attempts, error)
        with self._ctx.sessions() as session, session.begin():
            session.execute(update(Hl7Outbound).where(Hl7Outbound.id == job.id, Hl7Outbound.state == JobState.PENDING)
                            .values(last_error=error[:2000], ack_code=ack_code[:4], lease_until=None, **values))
        return self.config.delay(attempts)

    def _release(self, jobs: list[_Job], delay_s: float) -> None:
        """Hand claimed rows back untried (no attempt counted), due again after ``delay_s``."""
        if not jobs:
            return
        with self._ctx.sessions() as session, session.begin():
            session.execute(update(Hl7Outbound).where(Hl7Outbound.id.in_([j.id for j in jobs]),
                                                      Hl7Outbound.state == JobState.PENDING)
                            .values(next_attempt_at=utcnow() + timedelta(seconds=delay_s), lease_until=None))


def wake_delivery(ctx: AppContext) -> None:
    """Nudge this process's delivery loop (if it runs one) after queueing messages."""
    delivery = ctx.extras.get("hl7_delivery")
    if isinstance(delivery, Hl7Delivery):
        delivery.wake()


# -- the queue, for `pacs hl7 outbound|retry` ---------------------------------------------------


@dataclass(frozen=True)
class OutboundRecord:
    id: int
    destination: str
    message_type: str
    message_control_id: str
    report_id: int | None
    report_version: int
    state: str
    attempts: int
    next_attempt_at: datetime | None
    ack_code: str
    last_error: str
    created_at: datetime | None
    updated_at: datetime | None


def list_outbound(session: Session, state: str | None = None, limit: int = 500) -> list[OutboundRecord]:
    """The queue, newest first, optionally only one state (pending, sent, failed)."""
    stmt = select(Hl7Outbound).order_by(Hl7Outbound.id.desc()).limit(limit)
    if state:
        if state not in OUTBOUND_STATES:
            raise InvalidInput(f"unknown state {state!r}: one of {', '.join(OUTBOUND_STATES)}")
        stmt = stmt.where(Hl7Outbound.state == state)
    return [OutboundRecord(r.id, r.destination, r.message_type, r.message_control_id, r.report_fk, r.report_version,
                           r.state, r.attempts, as_utc(r.next_attempt_at), r.ack_code, r.last_error,
                           as_utc(r.created_at), as_utc(r.updated_at))
            for r in session.scalars(stmt)]


def retry_failed(session: Session, ids: list[int] | None = None) -> int:
    """Failed messages (all, or those ``ids``) back to pending with a fresh attempt count; returns how many."""
    stmt = update(Hl7Outbound).where(Hl7Outbound.state == JobState.FAILED)
    if ids:
        stmt = stmt.where(Hl7Outbound.id.in_(ids))
    return affected_rows(session, stmt.values(state=JobState.PENDING, attempts=0, next_attempt_at=utcnow(),
                                              lease_until=None))
