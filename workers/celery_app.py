"""The Celery application. Start workers with ``pacs worker`` (it reads the same PACS_* settings)."""

from __future__ import annotations

import logging
from functools import cache

from celery import Celery, Task

from pacs import failpoints  # noqa: F401  (a bad PACS_TEST_FAILPOINTS stops `pacs worker` at start)
from pacs.context import AppContext
from pacs.jobs import retry_delay
from pacs.settings import Settings
from workers.publisher import TASK_NAME

log = logging.getLogger(__name__)


def make_celery(broker_url: str, visibility_timeout_s: float = 600.0, queue: str = "pacs-derived") -> Celery:
    if broker_url.startswith(("redis://", "rediss://")):
        from workers import kombu_redis_fix

        kombu_redis_fix.install()
    app = Celery("pacs", broker=broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        # Redis: an unacknowledged message (its worker died) is delivered again after this long.
        broker_transport_options={"visibility_timeout": int(visibility_timeout_s), "max_retries": 1},
        task_default_queue=queue,
    )
    return app


@cache
def worker_context() -> AppContext:
    """One context per worker process, built from the environment like every entry point."""
    return AppContext.create(Settings())


settings = Settings()
app = make_celery(settings.broker_url or "memory://", settings.task_requeue_s, settings.task_queue)


@app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None, soft_time_limit=300, time_limit=360)
def run_derived(self: Task, task_id: int) -> str:
    """One derived task (:func:`pacs.derived.runner.run_derived_task`); transient failures retry with backoff."""
    from pacs.derived.outcomes import TransientError
    from pacs.derived.runner import run_derived_task

    try:
        return run_derived_task(worker_context(), task_id)
    except TransientError as exc:
        # 1 s, 2 s, 4 s … 256 s after the row's attempts (several messages of one task may be in flight)
        delay = int(retry_delay(max(exc.attempts, self.request.retries + 1), base_s=1, max_s=256))
        log.warning("derived task %s: %s; retrying in %ss", task_id, exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc


import workers.forwarding  # noqa: E402, F401  (the forwarding delivery loop, started on worker_ready)
