"""Run a prebuilt Core SELECT on the driver's cursor: the ingest path's lookups (issue 13).

SQLAlchemy's execution of a cached Core statement (execution context, result metadata, row processors) costs
five to seven times the database's work for the index lookups every received object runs (measured: ~190 µs
against ~26 µs for the one-row snapshot of :mod:`pacs.ingest.ownership` on SQLite). :class:`Prepared` compiles the
statement once per dialect and runs it on the DBAPI cursor of the caller's connection, inside whatever transaction
that connection is in. Only for SELECTs whose result columns need no type conversion (integers, strings, and
booleans read with ``bool()``: SQLite returns them as integers); a driver error is raised as SQLAlchemy's
(:class:`sqlalchemy.exc.DBAPIError` and its subclasses), as :meth:`Connection.execute` would, and a connection
the database dropped is invalidated (``connection_invalidated`` on the error) instead of going back to the pool.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError


class Prepared:
    """A SELECT compiled once per dialect, run on the driver's cursor of a :class:`Connection`."""

    def __init__(self, statement: Select[Any]) -> None:
        self._statement = statement
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def all(self, connection: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows, as the driver returns them."""
        sql, positions, literals = self._for(connection.dialect)
        values = {**literals, **params}
        bound: Any = tuple(values[name] for name in positions) if positions is not None else values
        dbapi_connection = connection.connection  # the pool's proxy: the connection's transaction, if any
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql, bound)
            return list(cursor.fetchall())
        except connection.dialect.loaded_dbapi.Error as error:
            # as Connection.execute would: a connection the database dropped is not given back to the pool
            lost = connection.dialect.is_disconnect(error, dbapi_connection, cursor)
            if lost:
                connection.invalidate(error)
            raise DBAPIError.instance(sql, bound, error, connection.dialect.loaded_dbapi.Error,
                                      dialect=connection.dialect, connection_invalidated=lost) from error
        finally:
            cursor.close()

    def one_or_none(self, connection: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        rows = self.all(connection, params)
        if len(rows) > 1:
            raise RuntimeError("a prepared lookup on a unique key returned several rows")
        return rows[0] if rows else None

    def scalar(self, connection: Connection, params: Mapping[str, Any]) -> Any:
        row = self.one_or_none(connection, params)
        return row[0] if row is not None else None

    def _for(self, dialect: Dialect) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        found = self._compiled.get(dialect.name)
        if found is None:
            with self._lock:
                compiled = self._statement.compile(dialect=dialect)
                positions = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
                literals = {name: value for name, value in compiled.params.items() if value is not None}
                found = self._compiled[dialect.name] = (compiled.string, positions, literals)
        return found
