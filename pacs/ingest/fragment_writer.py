"""Puts new instances' DICOM JSON fragments after the sender's answer, on one thread of the process (issue 13).

A new instance's fragment (:mod:`pacs.ingest.fragment`) is put after the index commit that recorded it done, and
its version checked afterwards (``Ingestor._put_fragment``). Nothing the sender is answered about depends on it:
the object is durable and indexed before, and a fragment that is missing, cut short or late is already handled
(readers make it again from the object; a fragment put after a newer version's re-arms that version's work; one
put after the instance's deletion is deleted again). So the C-STORE (or STOW-RS) answer need not wait for it: on
one association the next object then arrives while the fragment is written. One association of 300 CT slices
(256², this 2-core VM, runs alternated with the tree before): scaled (S3 + PostgreSQL) 64.0 → 77.2 instances/s
(medians of 6; the S3 PUT and the version check were on the answer's path); embedded 169 → 177 (medians of 14,
inside this VM's noise: the put is a small local file there).

The queue is bounded: when it is full, the caller puts the fragment itself (as before), so a burst never holds more
than ``CAPACITY`` fragments (a few KB each) in memory. A job holds the fragment's bytes and the UIDs, never the
received object. The process drains it when it stops (:func:`drain_fragments`, and at interpreter exit); a process
killed before that loses the queued fragments, which readers make again.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("pacs.ingest")

CAPACITY = 256
DRAIN_S = 10.0  # at shutdown; what is still queued after it is made again when read

Job = Callable[[], None]


class FragmentWriter:
    """A bounded queue of fragment puts and the one daemon thread that runs them, started on first use (in a forked
    child too: the receiving processes of `pacs serve` are forked, and a child has none of its parent's threads)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._forked()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """A new, empty writer: at creation, and in a forked child (whose copies of the parent's queue and lock may
        hold the parent's jobs, or be held by one of the parent's threads that the child does not have)."""
        self._lock = threading.Lock()
        self._pid = -1
        self._queue: queue.Queue[Job] = queue.Queue(self._capacity)

    def submit(self, job: Job) -> None:
        """Run ``job`` on the writer's thread; when its queue is full, here and now."""
        self._started()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            job()

    def drain(self, timeout: float = DRAIN_S) -> bool:
        """Wait until every submitted job has run (at most ``timeout`` seconds); whether they all have."""
        if self._pid != os.getpid():
            return True  # nothing submitted in this process
        deadline = time.monotonic() + timeout
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d fragment put(s) still queued at shutdown: made again when read",
                                self._queue.unfinished_tasks)
                    return False
                done.wait(left)
        return True

    def _started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            threading.Thread(target=self._run, args=(self._queue,), name="pacs-fragments", daemon=True).start()
            self._pid = os.getpid()

    @staticmethod
    def _run(jobs: queue.Queue[Job]) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            except Exception:  # a job logs its own failures; this thread must outlive any of them
                log.exception("fragment put failed")
            finally:
                jobs.task_done()


_WRITER = FragmentWriter()
atexit.register(_WRITER.drain)


def fragment_writer() -> FragmentWriter:
    """The process's writer, shared by its ingest services."""
    return _WRITER


def drain_fragments(timeout: float = DRAIN_S) -> bool:
    """Wait for the process's queued fragment puts (a process stopping)."""
    return _WRITER.drain(timeout)
