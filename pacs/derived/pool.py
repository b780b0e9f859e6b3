"""The in-process pool (embedded mode): derived tasks run on a few threads of this process."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from pacs.context import AppContext
from pacs.derived.outcomes import TransientError
from pacs.derived.relay import mark_pending
from pacs.derived.runner import run_derived_task

log = logging.getLogger(__name__)


class InProcessPublisher:
    """Runs task functions on a small thread pool inside this process; a :class:`~pacs.derived.relay.Publisher`."""

    holds_tasks = True

    def __init__(self, ctx: AppContext, workers: int) -> None:
        self._ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="pacs-worker")

    def publish(self, task_id: int) -> None:
        self._pool.submit(self._safe_run, task_id)

    def _safe_run(self, task_id: int) -> None:
        try:
            run_derived_task(self._ctx, task_id)
        except TransientError as exc:
            log.warning("derived task %s will be retried by the sweep: %s", task_id, exc)
            mark_pending(self._ctx, [task_id])
        except Exception:
            log.exception("derived task %s failed", task_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
