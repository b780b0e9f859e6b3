"""Publishing derived tasks to Celery (scaled mode), and the choice between Celery and the in-process pool.

The outbox relay (:mod:`pacs.derived.relay`) decides *which* rows to publish; this module only sends each
row's id to the broker as a message for the task :data:`TASK_NAME` (:func:`workers.celery_app.run_derived`).
"""

from __future__ import annotations

from pacs.context import AppContext
from pacs.derived.pool import InProcessPublisher
from pacs.derived.relay import Publisher

#: The Celery task's registered name. Never renamed: messages already in brokers, and workers started from
#: older configurations, know it by this name.
TASK_NAME = "pacs.derived.run"


class CeleryPublisher:
    """Sends task messages to the broker; fails fast when the broker is down."""

    holds_tasks = False

    def __init__(self, broker_url: str, queue: str) -> None:
        from workers.celery_app import make_celery

        self._app = make_celery(broker_url, queue=queue)
        self._queue = queue

    def publish(self, task_id: int) -> None:
        self._app.send_task(TASK_NAME, args=[task_id], queue=self._queue, retry=False)


def make_publisher(ctx: AppContext) -> Publisher:
    """The in-process pool in the embedded mode (no broker configured), else the broker."""
    if ctx.settings.embedded_workers:
        return InProcessPublisher(ctx, ctx.settings.in_process_workers)
    return CeleryPublisher(ctx.settings.broker_url, ctx.settings.task_queue)
