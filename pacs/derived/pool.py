"""The in-process pool (embedded mode): derived tasks run on a few threads of this process.

A transient failure (store, index or the render memory budget busy) is retried by this pool after a
backoff that follows the row's attempt count (1, 2, 4 … 256 s, as the Celery workers do), with the row
kept ``queued`` in the meantime; before, the row went straight back to ``pending`` and the relay's sweep
ran it again every ``PACS_OUTBOX_POLL_S``, so ten attempts were spent in under a minute of trouble.
If the process stops while a retry waits, the row is still ``queued`` and the next start publishes it
again (the relay's start-up sweep takes every unowned queued row in the embedded mode).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from pacs.context import AppContext
from pacs.derived.outcomes import TransientError
from pacs.derived.relay import mark_pending
from pacs.derived.runner import run_derived_task
from pacs.jobs import retry_delay

log = logging.getLogger(__name__)

RETRY_BASE_S = 1.0
RETRY_MAX_S = 256.0


class InProcessPublisher:
    """Runs task functions on a small thread pool inside this process; a :class:`~pacs.derived.relay.Publisher`."""

    holds_tasks = True

    def __init__(self, ctx: AppContext, workers: int) -> None:
        self._ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="pacs-worker")
        self._retries = DelayedRuns(self.publish)

    def publish(self, task_id: int) -> None:
        self._pool.submit(self._safe_run, task_id)

    def _safe_run(self, task_id: int) -> None:
        try:
            run_derived_task(self._ctx, task_id)
        except TransientError as exc:
            if exc.attempts <= 0:  # the index could not count the attempt: the sweep takes the row back
                log.warning("derived task %s will be retried by the sweep: %s", task_id, exc)
                mark_pending(self._ctx, [task_id])
                return
            delay = retry_delay(exc.attempts, base_s=RETRY_BASE_S, max_s=RETRY_MAX_S)
            log.warning("derived task %s: %s; retrying in %g s", task_id, exc, delay)
            self._retries.schedule(task_id, delay)
        except Exception:
            log.exception("derived task %s failed", task_id)

    def shutdown(self) -> None:
        self._retries.stop()
        self._pool.shutdown(wait=True, cancel_futures=False)


class DelayedRuns:
    """One thread that calls ``run(task_id)`` when each scheduled delay is over (a heap, not a timer per task:
    a store outage may put thousands of tasks in back-off at once)."""

    def __init__(self, run: Callable[[int], None]) -> None:
        self._run = run
        self._heap: list[tuple[float, int, int]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def schedule(self, task_id: int, delay_s: float) -> None:
        with self._cond:
            if self._stopped:
                return  # the row stays queued: the next start publishes it again
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._order), task_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pacs-worker-retries", daemon=True)
                self._thread.start()
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(timeout=self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, task_id = heapq.heappop(self._heap)
            try:
                self._run(task_id)
            except RuntimeError:  # the pool is shutting down: the row stays queued for the next start
                return
