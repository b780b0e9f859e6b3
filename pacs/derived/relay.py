"""The outbox relay: moves derived-task rows from ``pending`` to ``queued`` by publishing them, off the ingest path.

Ingest hands committed row ids to :class:`OutboxRelay` and returns at once; the relay's
own thread publishes them. Rows the relay could not publish (broker down) stay
``pending`` and are picked up by its periodic sweep. The sweep also takes back the rows of
dead processes at once (:func:`pacs.derived.lease.reclaim`: a row queued in a dead process's
pool, or running in a dead worker), and publishes again rows handed to a broker long ago
whose task never ran (the message was lost with a restarted broker). Tasks are
idempotent, so publishing twice costs work, never correctness.

What a row is published *to* is a :class:`Publisher`: the in-process pool (:mod:`pacs.derived.pool`,
embedded mode) or a Celery broker (:mod:`workers.publisher`, scaled mode).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from pacs.context import AppContext
from pacs.db.models import DerivedTask
from pacs.derived import lease
from pacs.jobs import JobState, utcnow

log = logging.getLogger(__name__)

BATCH = 500  # outbox rows claimed in one transaction


class Publisher(Protocol):
    #: True when published rows wait in this process (its pool): they stay owned by it until they run.
    holds_tasks: bool

    def publish(self, task_id: int) -> None:
        """Hand one outbox row to whatever runs it; raise if that is not possible now."""


def mark_pending(ctx: AppContext, task_ids: list[int]) -> None:
    """Rows handed out but not run (publisher down, transient failure): back to the sweep."""
    try:
        with ctx.sessions() as session, session.begin():
            session.execute(update(DerivedTask)
                            .where(DerivedTask.id.in_(task_ids), DerivedTask.state == JobState.QUEUED)
                            .values(state=JobState.PENDING, owner=""))
    except SQLAlchemyError:
        pass


class OutboxRelay:
    """Moves outbox rows from ``pending`` to ``queued`` by publishing them, off the ingest path."""

    def __init__(self, ctx: AppContext, publisher: Publisher, *, poll_s: float = 5.0,
                 requeue_after: timedelta = timedelta(minutes=10), requeue_all_queued: bool = False) -> None:
        self._ctx = ctx
        self._publisher = publisher
        self._poll_s = poll_s
        self._requeue_after = requeue_after
        self._requeue_all_queued = requeue_all_queued  # in-process: unowned queued rows died with a previous run
        self._lease_s = ctx.settings.task_lease_s
        self._max_crashes = ctx.settings.task_max_crashes
        self._inbox: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._backoff_until = 0.0
        self._thread = threading.Thread(target=self._loop, name="pacs-outbox", daemon=True)

    def start(self) -> OutboxRelay:
        self._thread.start()
        return self

    def notify(self, task_ids: Iterable[int]) -> None:
        """Called by ingest after commit; never blocks."""
        for task_id in task_ids:
            self._inbox.put(task_id)

    def stop(self, timeout: float = 60) -> None:
        """Publish what was notified so far, then stop (rows not published stay pending)."""
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        self.sweep(startup=True)
        next_sweep = time.monotonic() + self._poll_s
        stopping = False
        while not stopping:
            batch, stopping = self._next_batch(timeout=max(next_sweep - time.monotonic(), 0.01))
            if batch and time.monotonic() >= self._backoff_until and not self._publish(batch):
                self._backoff_until = time.monotonic() + self._poll_s  # rows stay pending for the sweep
            # also under continuous traffic; once stopping, the rest of the inbox is published first (leaving
            # here before the sentinel left notified rows pending when a `pacs import` exited)
            if not stopping and not self._stop.is_set() and time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + self._poll_s

    def _next_batch(self, timeout: float) -> tuple[list[int], bool]:
        """Ids waiting in the inbox (up to BATCH), and whether the stop sentinel was reached."""
        batch: list[int] = []
        try:
            item = self._inbox.get(timeout=timeout)
            while item is not None:
                batch.append(item)
                if len(batch) >= BATCH:
                    break
                item = self._inbox.get_nowait()
        except queue.Empty:
            return batch, False
        return batch, item is None

    def sweep(self, startup: bool = False) -> int:
        """Take back dead processes' rows, then publish every pending row and the broker's rows that look
        lost; returns how many were published."""
        try:
            lease.reclaim(self._ctx.sessions, lease_s=self._lease_s, max_crashes=self._max_crashes)
        except SQLAlchemyError as exc:
            log.warning("outbox sweep: index unavailable: %s", str(exc).splitlines()[0])
            return 0
        cutoff = utcnow() - self._requeue_after
        stale_queued = (DerivedTask.state == JobState.QUEUED) & (DerivedTask.owner == "")  # handed to a broker
        if not (startup and self._requeue_all_queued):
            stale_queued = stale_queued & (DerivedTask.updated_at < cutoff)
        try:
            with self._ctx.read_sessions() as session:
                ids = list(session.scalars(
                    select(DerivedTask.id).where(or_(DerivedTask.state == JobState.PENDING, stale_queued))
                    .order_by(DerivedTask.id).limit(10_000)
                ))
        except SQLAlchemyError as exc:
            log.warning("outbox sweep: index unavailable: %s", str(exc).splitlines()[0])
            return 0
        published = 0
        for i in range(0, len(ids), BATCH):
            chunk = ids[i:i + BATCH]
            if self._stop.is_set() or not self._publish(chunk, states=(JobState.PENDING, JobState.QUEUED)):
                break
            published += len(chunk)
        if published:
            log.info("outbox sweep published %d derived task(s)", published)
        return published

    def _publish(self, task_ids: list[int], states: tuple[JobState, ...] = (JobState.PENDING,)) -> bool:
        """Claim the rows still in ``states`` in one transaction, then hand each to the publisher.

        The claimed rows name this process as owner while it publishes them, so that if it dies before a
        message is sent they are taken back at once; rows sent to a broker are then left unowned.
        """
        me = lease.this_process().id
        try:
            lease.process_heartbeat(self._ctx, self._ctx.sessions, self._lease_s)
            with self._ctx.sessions() as session, session.begin():
                claimed = list(session.scalars(
                    update(DerivedTask).where(DerivedTask.id.in_(task_ids), DerivedTask.state.in_(states))
                    .values(state=JobState.QUEUED, owner=me).returning(DerivedTask.id)
                ))
        except SQLAlchemyError as exc:
            log.warning("outbox: index unavailable, will retry: %s", str(exc).splitlines()[0])
            return False
        for i, task_id in enumerate(claimed):
            try:
                self._publisher.publish(task_id)
            except Exception as exc:
                log.warning("outbox: could not publish %d task(s) (will retry): %s", len(claimed) - i, exc)
                mark_pending(self._ctx, claimed[i:])
                return False
        if claimed and not self._publisher.holds_tasks:
            try:
                with self._ctx.sessions() as session, session.begin():
                    session.execute(update(DerivedTask).where(DerivedTask.id.in_(claimed), DerivedTask.owner == me,
                                                              DerivedTask.state == JobState.QUEUED).values(owner=""))
            except SQLAlchemyError as exc:  # our heartbeat keeps them; after we stop they are taken back
                log.warning("outbox: could not hand published rows to the broker: %s", str(exc).splitlines()[0])
        return True
