"""Runs the delivery loops inside `pacs worker` (scaled mode), one each per worker node: forwarding
(C-STORE to other DICOM nodes) and the HL7 ORU^R01 queue (signed reports to EMRs); and the retention sweep
(rejected instances past their retention, pacs.studies.retention).

``worker_ready`` is sent once, in the worker's main process, after the prefork pool has started;
``worker_shutdown`` likewise. Pool processes (forked from the main one) never run the loop. The
loop uses its own engine, not :func:`workers.celery_app.worker_context`, and that engine's
pooled connections are dropped in every later fork (a pool process replaced by Celery) without
being closed, so parent and child never share a database socket.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from pacs.context import AppContext
from pacs.settings import Settings

log = logging.getLogger(__name__)

_running: dict[str, Any] = {}


@worker_ready.connect
def start_forwarding(**_: Any) -> None:
    from pacs.forwarding.delivery import ForwardDelivery
    from pacs.hl7.outbound import Hl7Delivery

    if "delivery" in _running:
        return
    ctx = AppContext.create(Settings())
    os.register_at_fork(after_in_child=lambda: ctx.engine.dispose(close=False))
    _running["ctx"] = ctx
    _start_metrics(ctx)
    _running["delivery"] = ForwardDelivery(ctx).start()
    _running["hl7_delivery"] = Hl7Delivery(ctx).start()  # leased rows: safe beside `pacs hl7 listen`
    from pacs.studies.retention import RetentionSweeper

    _running["retention"] = RetentionSweeper(ctx).start()  # each expired row is deleted by one process only


def _start_metrics(ctx: AppContext) -> None:
    """The worker's metrics port (PACS_METRICS_PORT; 0 = off), in the main process: queue depths from the index
    and the process's own figures. Derived tasks run in the forked pool processes, whose counters are not
    gathered (no prometheus multiprocess mode): their progress shows as ``pacs_queue_jobs{queue="derived"}``."""
    from pacs import metrics
    from pacs.metrics_port import start_metrics_port

    metrics.install(ctx, "worker")
    server = start_metrics_port(ctx.settings)
    if server is not None:
        _running["metrics_port"] = server


@worker_shutdown.connect
def stop_forwarding(**_: Any) -> None:
    for name in ("retention", "hl7_delivery", "delivery"):
        loop = _running.pop(name, None)
        if loop is not None:
            loop.stop()
    server = _running.pop("metrics_port", None)
    if server is not None:
        server.shutdown()
    ctx = _running.pop("ctx", None)
    if ctx is not None:
        ctx.close()
