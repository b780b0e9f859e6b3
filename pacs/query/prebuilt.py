"""Statements compiled once and run raw on the read path's connections (PostgreSQL; SQLite for a few).

A viewer sends the same few statements by the hundred, differing only in a UID or a Patient ID. Building such a
statement with SQLAlchemy, walking its cache key and running it through the ORM costs more CPU than PostgreSQL
spends answering it. :func:`compile_statement` turns a statement into its PostgreSQL text and the values of its
parameters once; :func:`fetch` then runs that text with the values of one request on a raw connection of the read
path's pool (autocommit, :mod:`pacs.query.sessions`), where psycopg prepares it on the server after a few uses.

The values are still bound parameters, never spliced into the text. A statement's only time, "now" of an open
consult's expiry (:data:`pacs.consults.grants.NOW_PARAM`), is set at each execution; a statement holding any other
time is not prebuilt (None), and its caller builds it per request as before. On SQLite (positional parameters) the
values go through the column types' bind processors as SQLAlchemy's own execution does (a time as the text
SQLAlchemy stores times in, a boolean as 0 or 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Select
from sqlalchemy.exc import SQLAlchemyError

from pacs.consults.grants import NOW_PARAM
from pacs.errors import IndexUnavailable


@dataclass(frozen=True)
class Compiled:
    sql: str
    params: dict[str, Any]  # every parameter's value as compiled (the caller's are replaced at each run)
    clock: tuple[str, ...]  # parameters that hold "now"
    positions: tuple[str, ...] | None = None  # a positional dialect's (SQLite's) parameter names in order
    processors: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)  # SQLite: the types' bind processors


def compile_statement(engine: Engine, statement: Select) -> Compiled | None:
    """``statement`` as the engine's SQL text and parameters; None when it holds a time other than "now"."""
    compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
    params = dict(compiled.params)
    clock = tuple(name for name in params if name.startswith(NOW_PARAM))
    if any(isinstance(value, datetime) and name not in clock for name, value in params.items()):
        return None
    if not compiled.positional:
        return Compiled(str(compiled), params, clock)
    processors = {name: proc for name, proc in compiled._bind_processors.items() if callable(proc)}
    return Compiled(str(compiled), params, clock, tuple(compiled.positiontup or ()), processors)


def fetch(engine: Engine, compiled: Compiled, values: Mapping[str, Any], *, first: bool = False
          ) -> list[Sequence[Any]]:
    """The rows of ``compiled`` run with ``values`` for its named parameters (only the first with ``first``).

    :class:`~pacs.errors.IndexUnavailable` when the database cannot answer; a connection that failed is dropped,
    never returned to the pool half-way."""
    params = {**compiled.params, **values}
    if compiled.clock:
        now = datetime.now(UTC)
        params.update((name, now) for name in compiled.clock)
    bound: Any = params
    if compiled.positions is not None:
        processors = compiled.processors
        bound = tuple(processors[name](params[name]) if name in processors and params[name] is not None
                      else params[name] for name in compiled.positions)
    try:
        raw = engine.raw_connection()
    except SQLAlchemyError as exc:
        raise IndexUnavailable("index database unavailable") from exc
    try:
        cursor = raw.cursor()
        cursor.execute(compiled.sql, bound)
        rows: list[Sequence[Any]]
        if first:
            row = cursor.fetchone()
            rows = [] if row is None else [row]
        else:
            rows = list(cursor.fetchall())
        cursor.close()
    except Exception as exc:
        raw.invalidate()  # whatever state it is in, the connection does not go back to the pool
        raise IndexUnavailable("index database unavailable") from exc
    finally:
        raw.close()
    return rows
