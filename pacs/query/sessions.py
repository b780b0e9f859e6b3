"""Sessions for the read path's single statements, with the fewest round trips to the index.

A request that reads the index with one statement (a search that fits one answer, resolving a WADO target)
needs no transaction around it: one statement sees one snapshot on its own. On PostgreSQL the session's
connection then runs in autocommit, which saves the ``BEGIN`` before the statement and the ``ROLLBACK``
when the session closes: two round trips of the four a short read otherwise costs (with the pool's ping).
The isolation level goes back to the engine's default when the connection returns to the pool. SQLite
sessions are left as they are (their transactions are begun by the engine's own ``BEGIN`` hook, and a
round trip there is a function call).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker


@contextmanager
def single_statement(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session for one read statement (several would each see their own snapshot)."""
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session
