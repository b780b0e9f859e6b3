"""Assembles a running pipeline for one process: context, outbox relay, ingest service."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pacs.commitment import CommitmentReporter
from pacs.context import AppContext
from pacs.forwarding.delivery import ForwardDelivery
from pacs.hl7.listener import Hl7Listener
from pacs.hl7.outbound import Hl7Delivery
from pacs.ingest import Ingestor, TaskNotifier
from pacs.settings import Settings
from workers.publisher import InProcessPublisher, OutboxRelay, make_publisher


@dataclass
class Pipeline:
    ctx: AppContext
    relay: OutboxRelay
    ingestor: Ingestor
    forwarder: ForwardDelivery | None = None  # embedded mode; `pacs worker` runs it when scaled
    commitment: CommitmentReporter | None = None  # storage commitment reports: every `pacs serve` / `pacs scp`
    hl7_delivery: Hl7Delivery | None = None  # ORU^R01 outbound queue: embedded mode (`pacs hl7 listen` when scaled)
    hl7_listener: Hl7Listener | None = None  # MLLP orders in: started by `pacs serve` (and `pacs hl7 listen`)

    @classmethod
    def start(cls, settings: Settings) -> Pipeline:
        ctx = AppContext.create(settings)
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
        return cls(ctx, relay, ingestor, forwarder, commitment, hl7_delivery)

    def stop(self) -> None:
        if self.hl7_listener is not None:
            self.hl7_listener.stop()
        if self.hl7_delivery is not None:
            self.hl7_delivery.stop()
        if self.commitment is not None:
            self.commitment.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        self.relay.stop()
        publisher = self.ctx.extras.get("publisher")
        if isinstance(publisher, InProcessPublisher):
            publisher.shutdown()
        self.ctx.close()


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
    )


def _start_commitment_reporter(ctx: AppContext) -> CommitmentReporter:
    """Runs wherever the SCP does (it sends what the SCP accepted); several processes share the
    table safely. The N-ACTION handler finds it in ``ctx.extras`` to wake it."""
    from dicom_scp.commitment_service import send_event_report  # the DIMSE transport of the report

    reporter = CommitmentReporter(ctx, send_event_report).start()
    ctx.extras["commitment_reporter"] = reporter
    return reporter
