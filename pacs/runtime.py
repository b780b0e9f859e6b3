"""Assembles a running pipeline for one process: context, outbox relay, ingest service."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from pacs.commitment.service import CommitmentReporter
from pacs.context import AppContext
from pacs.derived import lease
from pacs.derived.pool import InProcessPublisher
from pacs.derived.relay import OutboxRelay
from pacs.forwarding.delivery import ForwardDelivery
from pacs.hl7.listener import Hl7Listener
from pacs.hl7.outbound import Hl7Delivery
from pacs.ingest import Ingestor, TaskNotifier
from pacs.ingest.fragment_writer import drain_fragments, fragment_writer
from pacs.persons.identifiers import NationalIdPolicy
from pacs.polling import PollingLoop
from pacs.settings import Settings
from workers.publisher import make_publisher


@dataclass
class Pipeline:
    ctx: AppContext
    relay: OutboxRelay
    ingestor: Ingestor
    forwarder: ForwardDelivery | None = None  # embedded mode; `pacs worker` runs it when scaled
    commitment: CommitmentReporter | None = None  # storage commitment reports: every `pacs serve` / `pacs scp`
    hl7_delivery: Hl7Delivery | None = None  # ORU^R01 outbound queue: embedded mode (`pacs hl7 listen` when scaled)
    hl7_listener: Hl7Listener | None = None  # MLLP orders in: started by `pacs serve` (and `pacs hl7 listen`)
    retention: PollingLoop | None = None  # rejected instances past retention: embedded mode (`pacs worker` scaled)

    @classmethod
    def start(cls, settings: Settings) -> Pipeline:
        ctx = AppContext.create(settings)
        # registered before the relay's first sweep claims anything (pacs.derived.lease)
        lease.process_heartbeat(ctx, ctx.sessions, settings.task_lease_s)
        publisher = make_publisher(ctx)
        relay = OutboxRelay(ctx, publisher, poll_s=settings.outbox_poll_s,
                            requeue_after=timedelta(seconds=settings.task_requeue_s),
                            requeue_all_queued=settings.embedded_workers).start()
        ingestor = make_ingestor(ctx, notify=relay.notify)
        ctx.extras["publisher"] = publisher
        ctx.extras["outbox_relay"] = relay  # report signing nudges it (pacs.reports.service)
        ctx.extras["ingest_notify"] = relay.notify  # objects the archive makes itself (SR, KOS)
        forwarder = ForwardDelivery(ctx).start() if settings.embedded_workers else None
        commitment = _start_commitment_reporter(ctx)
        hl7_delivery = Hl7Delivery(ctx).start() if settings.embedded_workers else None
        if hl7_delivery is not None:
            ctx.extras["hl7_delivery"] = hl7_delivery  # report signing wakes it
        retention = _start_retention_sweeper(ctx) if settings.embedded_workers else None
        return cls(ctx, relay, ingestor, forwarder, commitment, hl7_delivery, retention=retention)

    def stop(self) -> None:
        if self.hl7_listener is not None:
            self.hl7_listener.stop()
        if self.retention is not None:
            self.retention.stop()
        if self.hl7_delivery is not None:
            self.hl7_delivery.stop()
        if self.commitment is not None:
            self.commitment.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        drain_fragments()  # the fragments of objects answered already (pacs.ingest.fragment_writer)
        self.relay.stop()
        publisher = self.ctx.extras.get("publisher")
        if isinstance(publisher, InProcessPublisher):
            publisher.shutdown()
        beat = self.ctx.extras.get("task_heartbeat")
        if isinstance(beat, lease.Heartbeat):
            beat.stop()  # rows still queued here go back to pending for the other processes
        self.ctx.close()

    def drain(self, task_ids: Iterable[int], *, on_progress: Callable[[int], None] | None = None,
              poll_s: float = 1.0, stop: threading.Event | None = None) -> set[int]:
        """Wait until the given derived tasks are done or failed; returns the ids still outstanding (only
        when ``stop`` was set). Pending ones — a series document deferred while its series arrived, a task
        that met a transient failure, a batch the relay could not claim — are published again meanwhile.
        In embedded mode this process's pool runs them; when scaled, the workers do.
        """
        remaining = set(task_ids)
        stop = stop or threading.Event()
        while remaining:
            with self.ctx.read_sessions() as session:
                remaining = lease.outstanding(session, remaining)
            if on_progress is not None:
                on_progress(len(remaining))
            if not remaining:
                break
            self.relay.sweep()
            if stop.wait(poll_s):
                break
        return remaining


def make_ingestor(ctx: AppContext, notify: TaskNotifier | None = None) -> Ingestor:
    """The process's ingest service, configured from its settings (C-STORE, STOW-RS and import share it)."""
    settings = ctx.settings
    return Ingestor(
        ctx.sessions,
        ctx.store,
        duplicate_policy=settings.duplicate_policy,
        max_object_bytes=settings.max_object_bytes,
        assume_utf8_for_latin1=settings.assume_utf8_for_latin1,
        notify=notify,
        read_sessions=ctx.read_sessions,
        max_inflated_bytes=settings.max_inflated_bytes,
        national_ids=NationalIdPolicy.from_settings(settings.national_id_issuers, settings.national_id_attribute),
        fragment_writer=fragment_writer(),  # fragments put after the answer (drained when the process stops)
    )


def _start_commitment_reporter(ctx: AppContext) -> CommitmentReporter:
    """Runs wherever the SCP does (it sends what the SCP accepted); several processes share the
    table safely. The N-ACTION handler finds it in ``ctx.extras`` to wake it."""
    from dicom_scp.commitment_service import send_event_report  # the DIMSE transport of the report

    reporter = CommitmentReporter(ctx, send_event_report).start()
    ctx.extras["commitment_reporter"] = reporter
    return reporter


def _start_retention_sweeper(ctx: AppContext) -> PollingLoop:
    """Deletes rejected instances past their retention (pacs.studies.retention); safe in several processes."""
    from pacs.studies.retention import RetentionSweeper

    return RetentionSweeper(ctx).start()
