"""One engine per process, sessions passed explicitly."""

from __future__ import annotations

import sqlite3

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from pacs.db.sqlite_writers import WriterGate

READ_ONLY_OPTION = "pacs_read_only"
SQLITE_BUSY_TIMEOUT_S = 30.0


def make_engine(url: str) -> Engine:
    """Create the process's engine; SQLite gets WAL and a busy timeout for concurrent associations."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
            # Let SQLAlchemy, not the driver, open transactions (see _sqlite_begin).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            # PS3.4 matching is case-sensitive (PN is matched on folded columns); SQLite's LIKE is not by default.
            cur.execute("PRAGMA case_sensitive_like=ON")
            cur.close()

        writers = WriterGate(SQLITE_BUSY_TIMEOUT_S)  # this process's writers queue on a lock (pacs.db.sqlite_writers)
        writers.install(engine.dialect)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers take the write lock up front (BEGIN IMMEDIATE): concurrent associations then
            # wait on busy_timeout instead of failing with "database is locked" on lock upgrade.
            # Read-only sessions (see make_read_session_factory) must not queue behind writers.
            if conn.get_execution_options().get(READ_ONLY_OPTION, False):
                conn.exec_driver_sql("BEGIN")
            else:
                writers.begin(conn.connection.dbapi_connection, lambda: conn.exec_driver_sql("BEGIN IMMEDIATE"))

        return engine
    return create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_pre_ping=True,
        pool_timeout=10,
        # jit=off: the archive's statements are short index lookups, but a facility-scoped count (shares, consults,
        # linked priors) is estimated expensive enough for PostgreSQL to JIT-compile it, which cost ~1 s per
        # count at 100,000 studies (bench/ui_browser.py) for a query that runs in ~50 ms
        connect_args={"connect_timeout": 5, "options": "-c jit=off"} if url.startswith("postgresql") else {},
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for queries that write nothing: on SQLite they read a WAL snapshot without the write lock."""
    return sessionmaker(engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False)
