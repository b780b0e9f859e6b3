"""Ingest's work after the commit that nothing acknowledged waits for, done on one thread after the answer.

Once an object's index transaction has committed, the sender's success is due: what remains of a new instance
(putting its DICOM JSON fragment, made before the commit, under ``derived/metadata/``, checking that no newer version
overtook it, and waking the derived work that transaction armed) is not part of the ingest contract. Readers make a
missing fragment from the object, and the outbox relay publishes armed work on its next sweep, so a crash that loses
this work loses nothing (:mod:`pacs.ingest.service`, step 5). Done inline, it cost every C-STORE an object store put
(two fsyncs on the filesystem store), an index read and the wake-up on the path of its acknowledgement (issue 13);
here, the receiving thread answers and reads the sender's next object meanwhile.

The jobs run in the order submitted, on one thread. The queue is bounded by count and by bytes; a job that would
pass a bound runs at once on the submitting thread instead, as it did before (the sender then waits for it: a
receiver never holds more than the bounds, whatever the senders do). After :meth:`AfterCommit.close` every job runs
inline too.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_PENDING_JOBS = 256
MAX_PENDING_BYTES = 8 * 1024 * 1024


class AfterCommit:
    """A bounded FIFO of post-commit jobs run by one daemon thread (started on the first job)."""

    def __init__(self, *, max_jobs: int = MAX_PENDING_JOBS, max_bytes: int = MAX_PENDING_BYTES,
                 name: str = "ingest-after-commit") -> None:
        self._max_jobs = max_jobs
        self._max_bytes = max_bytes
        self._name = name
        self._jobs: deque[tuple[Callable[[], object], int]] = deque()
        self._pending_bytes = 0
        self._running = False  # a job taken off the queue is running
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object], size: int = 0) -> None:
        """Run ``job`` after the caller's answer, or now (on this thread) when over a bound or closed.
        ``size``: the bytes the job holds until it has run (counted against the byte bound)."""
        with self._cond:
            queued = not self._closed and len(self._jobs) < self._max_jobs \
                and self._pending_bytes + size <= self._max_bytes
            if queued:
                self._jobs.append((job, size))
                self._pending_bytes += size
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        if not queued:
            _run_job(job)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has run; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._running, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Run what is queued, then stop the thread; later jobs run inline. False if ``timeout`` passed first."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%d post-commit ingest job(s) still queued at shutdown (readers make missing fragments, "
                        "the outbox relay publishes armed work)", len(self._jobs))
            return False
        return True

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._jobs) + (1 if self._running else 0)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._running = False
                self._cond.notify_all()  # flush() waiters
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:  # closed and drained
                    return
                job, size = self._jobs.popleft()
                self._pending_bytes -= size
                self._running = True
            _run_job(job)


def _run_job(job: Callable[[], object]) -> None:
    try:
        job()
    except Exception:  # the jobs handle their own failures; a bug here must not stop the ones after it
        log.exception("post-commit ingest job failed")
