"""SQLite write transactions of one process queued on a lock, not on SQLite's busy handler.

SQLite has one writer at a time. A connection whose ``BEGIN IMMEDIATE`` finds the write lock taken waits in SQLite's
busy handler, which *sleeps* between attempts: 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms, then 100 ms until the
busy timeout, so a waiter sleeps on past the moment the lock is free. With four associations storing into the
embedded archive, the threads waiting for it spent ~40 ms per transaction in ``BEGIN IMMEDIATE`` (14.5 s for 361
transactions while 300 CT slices arrived over 4 associations, a loaded 2-core machine: issue 13).

:class:`WriterGate` takes a process-wide lock before ``BEGIN IMMEDIATE`` and gives it back once that transaction has
committed or rolled back (or its connection closed), so the next writer of this process starts the moment the
previous one is done. Nothing about the transactions changes: the gate orders this process's writers, SQLite still
arbitrates between processes (``pacs`` commands run beside ``pacs serve``, receiving processes) with its busy
timeout. A writer that cannot have the gate within the busy timeout (a write transaction nested in another on one
thread, which SQLite itself would refuse after that timeout) goes on without it and meets SQLite's handling as
before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Dialect


class WriterGate:
    """One write transaction at a time among the connections of one SQLite engine in this process."""

    def __init__(self, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._owner: int | None = None  # id() of the DBAPI connection whose write transaction holds the gate

    def begin(self, dbapi_connection: Any, begin: Callable[[], object]) -> None:
        """Run ``begin`` (the connection's ``BEGIN IMMEDIATE``) holding the gate, kept until :meth:`end`."""
        held = self._lock.acquire(timeout=self._timeout_s)
        if held:
            self._owner = id(_raw(dbapi_connection))
        try:
            begin()
        except BaseException:
            self.end(dbapi_connection)
            raise

    def end(self, dbapi_connection: Any) -> None:
        """The transaction of ``dbapi_connection`` ended (or it never began): give the gate back if it holds it."""
        if self._owner is not None and self._owner == id(_raw(dbapi_connection)):
            self._owner = None
            self._lock.release()

    def install(self, dialect: Dialect) -> None:
        """Give the gate back after the dialect's commit, rollback and close of a connection (these are where a
        transaction ends, including the pool's rollback of a connection returned in one)."""
        for name in ("do_commit", "do_rollback", "do_close", "do_terminate"):
            setattr(dialect, name, self._then_end(getattr(dialect, name)))

    def _then_end(self, method: Callable[[Any], None]) -> Callable[[Any], None]:
        def ended(dbapi_connection: Any) -> None:
            try:
                method(dbapi_connection)
            finally:
                self.end(dbapi_connection)

        return ended


def _raw(connection: Any) -> Any:
    """The driver's connection behind a pool proxy (the pool's reset passes its proxy), or the connection itself."""
    return getattr(connection, "dbapi_connection", None) or connection
