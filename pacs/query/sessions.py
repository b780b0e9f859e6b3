"""Sessions for the read path's single statements, with the fewest round trips to the index.

A request that reads the index with one statement (a search that fits one answer, resolving a WADO target,
looking up the bearer token) needs no transaction around it: one statement sees one snapshot on its own. On
PostgreSQL these run on the *read path's* connections (:func:`read_path_engine`): a small pool of its own
beside the process's engine, in autocommit (no ``BEGIN`` before the statement, no ``ROLLBACK`` after it), and
checked for life only when a connection comes out of the pool after a pause (the process's engine pings
on every checkout: a round trip per request). Under a steady load a request then costs one round trip per
statement. SQLite sessions are left as they are (their transactions are begun by the engine's own ``BEGIN``
hook, and a round trip there is a function call).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

# A connection idle for longer than this is pinged when it is checked out (a dead one is replaced at once).
IDLE_PING_S = 2.0
POOL_SIZE, MAX_OVERFLOW = 5, 10

_siblings: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_makers: weakref.WeakKeyDictionary[Engine, sessionmaker[Session]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _main_engine(bind: Any) -> Engine | None:
    engine = getattr(bind, "_proxied", bind)  # an OptionEngine (execution options) wraps the process's engine
    return engine if isinstance(engine, Engine) else None


def read_path_engine(bind: Any) -> Engine | None:
    """The read path's engine beside ``bind``'s (PostgreSQL only, else None): the same database, autocommit,
    at most ``POOL_SIZE + MAX_OVERFLOW`` connections, pinged only after ``IDLE_PING_S`` idle. It is disposed
    with the process's engine."""
    engine = _main_engine(bind)
    if engine is None or engine.dialect.name != "postgresql":
        return None
    with _lock:
        sibling = _siblings.get(engine)
        if sibling is None:
            sibling = _siblings[engine] = _create_sibling(engine)
            event.listen(engine, "engine_disposed", lambda _engine: sibling.dispose())
        return sibling


def _create_sibling(engine: Engine) -> Engine:
    sibling = create_engine(
        engine.url.render_as_string(hide_password=False), pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW,
        pool_timeout=10, pool_pre_ping=False, isolation_level="AUTOCOMMIT",
        # as the process's engine (pacs.db.engine): no JIT for short index lookups
        connect_args={"connect_timeout": 5, "options": "-c jit=off"})

    @event.listens_for(sibling, "checkin")
    def _returned(_dbapi: Any, record: Any) -> None:
        record.info["pacs_idle_since"] = time.monotonic()

    @event.listens_for(sibling, "checkout")
    def _taken(dbapi: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("pacs_idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            dbapi.cursor().execute("SELECT 1")
        except Exception as error:  # the pool replaces the connection and tries again
            raise exc.DisconnectionError(f"read-path connection lost while idle: {error}") from error

    return sibling


def single_statement_engine(sessions: sessionmaker[Session]) -> Engine:
    """The engine for single read statements run without a session (ingest's per-object lookups): the read
    path's (:func:`read_path_engine`: autocommit, no ping per checkout) on PostgreSQL, else ``sessions``' own."""
    bind = sessions.kw.get("bind")
    engine = read_path_engine(bind) or _main_engine(bind)
    if engine is None:
        raise TypeError("sessions bound to no engine")
    return engine


def read_path_sessions(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions on the read path's engine for ``sessions``' database (``sessions`` itself on SQLite). Only for
    reads: every statement commits on its own."""
    bind = sessions.kw.get("bind")
    sibling = read_path_engine(bind)
    if sibling is None:
        return sessions
    with _lock:
        maker = _makers.get(sibling)
        if maker is None:
            maker = _makers[sibling] = sessionmaker(sibling, expire_on_commit=False)
        return maker


@contextmanager
def single_statement(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session for one read statement (several would each see their own snapshot)."""
    with read_path_sessions(sessions)() as session:
        yield session
