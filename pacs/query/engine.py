"""The one query engine behind C-FIND and QIDO-RS, independent of any transport.

A :class:`Query` names a level, an information model (root), the keys to match (DICOM keyword
-> value string as received, PS3.4 C.2.2.2) and the keys to return. :meth:`QueryEngine.search`
checks it against the model at once (so a transport can answer with a failure status before
sending anything) and returns a :class:`QueryResult`: iterating it streams ``{keyword: value}``
dicts from the database in batches; ``count()`` counts the same matches; ``head(n)`` reads at most
``n`` of them with one plain statement and knows their total without counting when they are all
there (what a search with a few matches needs: one round trip instead of a count, a cursor and its
fetches). On PostgreSQL, ``head`` of a query whose keys are matched on exact values (a Patient ID, an Accession
Number, a UID) or not at all runs a statement compiled once per query shape and access scope
(:mod:`pacs.query.prebuilt`): a viewer's searches differ only in those values.

Rules (PS3.4 C.4.1.2, C.2.2.1):

- a key is matched at its own level and at every level below (patient keys at study level...);
- a keyword the index does not know at the level (or at all) is not matched and is returned
  with no value (``None``), as PS3.4 asks for unsupported keys;
- hierarchical search: each level above the query level must be pinned by its unique key with
  a single value (Patient Root: PatientID, then StudyInstanceUID, then SeriesInstanceUID;
  Study Root: StudyInstanceUID, SeriesInstanceUID). Relational queries are an optional
  feature of C-FIND that we do not offer: they fail with :class:`IdentifierError`. QIDO-RS
  searches series and instances across studies, so it sets ``relational=True``;
- every response carries the unique key of the query level and those of the levels above.

Values come from the network: they are bound as SQL parameters, never spliced into SQL text.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Engine, Select, and_, exists, func, or_, select
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker

from pacs.db.models import Patient, Series, Study
from pacs.errors import IndexUnavailable, InvalidInput
from pacs.query import matching
from pacs.query.attributes import (
    INTEGER_VRS,
    MODELS,
    PARENT_JOINS,
    PATIENT_TOTALS,
    UNIQUE_KEYS,
    Attribute,
    Level,
    Matching,
    Root,
    attribute_at,
    scoped_patient_total,
)
from pacs.query.prebuilt import Compiled, compile_statement, fetch
from pacs.query.sessions import read_path_engine, single_statement
from pacs.security.access import study_condition
from pacs.security.principal import AccessScope
from pacs.text import fold

Value = str | int | None
Row = dict[str, Value]


class QueryError(InvalidInput):
    """The query cannot be run; the message says why (for an Error Comment or an HTTP 400)."""


class IdentifierError(QueryError):
    """The query does not fit the information model: unknown level, missing hierarchical keys.

    C-FIND answers 0xA900 (Identifier does not match SOP Class).
    """


class MatchValueError(QueryError):
    """A key's value cannot be matched: malformed range, oversized list, not a number...

    C-FIND answers with a 0xC000-range failure (unable to process).
    """


@dataclass(frozen=True)
class Query:
    level: Level | str
    root: Root | str = Root.STUDY_ROOT
    filters: Mapping[str, str] = field(default_factory=dict)  # keyword -> value as received ('' = universal)
    returns: Collection[str] = ()  # keywords to return besides the filter keys and the unique keys
    limit: int | None = None
    offset: int = 0
    relational: bool = False  # allow levels above without their unique keys (QIDO-RS, not C-FIND)
    scope: AccessScope | None = None  # the studies the asker may see (pacs.security); None = all


@dataclass(frozen=True)
class PreparedQuery:
    """A checked query: the SQL to list and count its matches, and the keys each row carries."""

    level: Level
    root: Root
    keys: tuple[str, ...]  # every keyword of a response row, in response order
    statement: Select  # rows, ordered, limited
    count_statement: Select  # the number of matches, without limit/offset
    columns: tuple[str, ...]  # the keys read from SQL; the others in ``keys`` are always None
    limit: int | None = None  # the query's limit and offset (``statement`` applies them)
    offset: int = 0


def prepare(query: Query) -> PreparedQuery:
    """Check ``query`` against the model and build its SQL; raises :class:`QueryError`. Pure."""
    level, root = _level_and_root(query)
    if (query.limit is not None and query.limit < 0) or query.offset < 0:
        raise QueryError("limit and offset must not be negative")
    hierarchy = root.levels[: root.levels.index(level) + 1]
    if not query.relational:
        _check_hierarchical_keys(query.filters, level, hierarchy[:-1])

    unique = [UNIQUE_KEYS[lv] for lv in hierarchy]
    keys = list(dict.fromkeys([*unique, *query.filters, *query.returns]))
    known = {k: a for k in keys if (a := attribute_at(k, level)) is not None}

    conditions: list[ColumnElement[bool]] = []
    matched = [level]  # the levels the conditions read: all a count needs to join
    ranged = False  # a date range from a day on: its matches lie together, late in arrival (id) order
    for keyword, value in query.filters.items():
        attr = known.get(keyword)
        if attr is None or attr.matching is Matching.RETURN_ONLY:
            continue  # PS3.4: unsupported keys are not matched; counts are return keys only
        cond = _condition(attr, value)
        if cond is not None:
            conditions.append(cond)
            matched.append(attr.level)
            ranged = ranged or (attr.vr == "DA" and "-" in value and not value.strip(" ").startswith("-"))

    top = min((a.level for a in known.values()), key=lambda lv: lv.depth, default=level)
    totals: dict[str, ColumnElement] = {}
    if query.scope is not None and not query.scope.unrestricted:
        scoped = study_condition(query.scope, hide_empty=True)  # images: an emptied study is not listed
        if level is Level.PATIENT:
            # a patient is matched only through a study in scope, and counted only with those studies
            conditions.append(exists().where(Study.patient_fk == Patient.id, scoped))
        else:
            top = min(top, Level.STUDY, key=lambda lv: lv.depth)  # join up to the study row
            conditions.append(scoped)
            matched.append(Level.STUDY)
        totals = {k: scoped_patient_total(k, study_condition(query.scope, hide_empty=True))
                  for k in known if k in PATIENT_TOTALS}
    else:  # a study or series whose every instance was rejected is hidden (pacs.studies.rejection)
        current = Study.number_of_instances > 0
        if level is Level.PATIENT:
            conditions.append(exists().where(Study.patient_fk == Patient.id, current))
        elif level is Level.STUDY:
            conditions.append(current)
        totals = {k: scoped_patient_total(k, current) for k in known if k in PATIENT_TOTALS}
    if level is Level.SERIES:
        conditions.append(Series.number_of_instances > 0)
    from_clause = _from_clause(level, top)
    base = MODELS[level]
    columns = [totals.get(k, a.column).label(k) for k, a in known.items()]
    # Rows come in id order. Dates follow arrival order, so a date range's matches lie together, while
    # PostgreSQL assumes them spread over the table: for a page of a month it walks the primary key from the
    # oldest study and filters (at 10^7 instances 420,000 rows for March 2022: 540 ms). "id + 0" is the same
    # order without that index, so the range's own index finds the matches and they are sorted (27 ms). A range
    # with no lower bound ("-20170101") matches the oldest studies, which the primary key finds first: as before.
    statement = select(*columns).select_from(from_clause).where(*conditions).order_by(
        base.id + 0 if ranged else base.id)
    if query.offset:
        statement = statement.offset(query.offset)
    if query.limit is not None:
        statement = statement.limit(query.limit)
    # The count joins only the tables its conditions read: each row has exactly one parent (inner joins along
    # NOT NULL foreign keys), so the join a return key needs (patient names on a study list) changes no count,
    # and leaving it out spares a lookup per match (the study browser's first page counts every study).
    count_from = _from_clause(level, min(matched, key=lambda lv: lv.depth))
    count_statement = select(func.count(base.id)).select_from(count_from).where(*conditions)
    return PreparedQuery(level, root, tuple(keys), statement, count_statement, tuple(known), query.limit,
                         query.offset)


@dataclass(frozen=True)
class Head:
    """The first rows of a result (:meth:`QueryResult.head`)."""

    rows: list[Row]
    complete: bool  # ``rows`` is every row the query returns (within its limit and offset)
    total: int | None  # every match, ignoring limit and offset; None when only a count can tell


class QueryResult:
    """The matches of one query. Iterate once to stream them; ``count()`` at any time."""

    def __init__(self, prepared: PreparedQuery | None, sessions: sessionmaker[Session], batch_size: int,
                 query: Query | None = None, shape: _Shape | None = None) -> None:
        """``prepared``, or (a query of a prebuilt ``shape``) the ``query``, prepared only when a count or the
        stream needs its statements."""
        self._prepared = prepared
        self._query = query
        self._shape = shape
        self._sessions = sessions
        self._batch_size = batch_size

    @property
    def prepared(self) -> PreparedQuery:
        if self._prepared is None:
            assert self._query is not None
            self._prepared = prepare(self._query)
        return self._prepared

    @property
    def keys(self) -> tuple[str, ...]:
        return self._shape.keys if self._shape is not None else self.prepared.keys

    def __iter__(self) -> Iterator[Row]:
        """Rows streamed from the database (a server-side cursor on PostgreSQL), ``batch_size`` at a time.

        The session stays open while the iterator is alive: close it (``.close()`` on the
        generator, or let it go) when a consumer stops early.
        """
        statement = self.prepared.statement.execution_options(yield_per=self._batch_size)
        with _index_errors(), self._sessions() as session:
            for mapping in session.execute(statement).mappings():
                yield self._row(mapping)

    def count(self) -> int:
        with _index_errors(), self._sessions() as session:
            return int(session.scalar(self.prepared.count_statement) or 0)

    def head(self, size: int) -> Head:
        """At most ``size`` rows, read with one plain statement (no server-side cursor).

        ``complete`` when they are all the rows the query returns; the total of matches is then known
        without a count, unless the query's limit cut the answer or its offset lies past the last match.
        """
        if self._shape is not None:
            limit, offset = self._shape.limit, self._shape.offset
        else:
            limit, offset = self.prepared.limit, self.prepared.offset
        fetch_rows = size + 1 if limit is None else min(limit, size + 1)
        rows = self._prebuilt_head(fetch_rows)
        if rows is None:
            with _index_errors(), single_statement(self._sessions) as session:
                mappings = session.execute(self.prepared.statement.limit(fetch_rows)).mappings().all()
            rows = [self._row(m) for m in mappings]
        if len(rows) > size:  # more than asked for: a cursor over all of them (and a count) will tell
            return Head(rows[:size], False, None)
        if len(rows) < fetch_rows and (rows or not offset):
            return Head(rows, True, offset + len(rows))  # the last match is among them
        return Head(rows, True, None)  # cut by the limit, or an offset past every match: count them

    def _prebuilt_head(self, fetch_rows: int) -> list[Row] | None:
        """The first ``fetch_rows`` rows by the statement compiled for this query's shape (None: not prebuilt)."""
        shape, query = self._shape, self._query
        if shape is None or query is None:
            return None
        head = shape.head(fetch_rows)
        if head is None:
            return None
        values = {name: query.filters[keyword] for name, keyword in head.slots}
        columns, keys = shape.columns, shape.keys
        rows = []
        for raw in fetch(shape.engine, head.compiled, values):
            row: Row = {k: _plain(v) for k, v in zip(columns, raw, strict=True)}
            rows.append({k: row.get(k) for k in keys})
        return rows

    def _row(self, mapping: Any) -> Row:
        row: Row = {k: _plain(mapping[k]) for k in self.prepared.columns}
        return {k: row.get(k) for k in self.prepared.keys}


class QueryEngine:
    """Runs queries against the index. One per process; thread-safe (a session per call)."""

    def __init__(self, sessions: sessionmaker[Session], batch_size: int = 200) -> None:
        self._sessions = sessions  # read-only sessions (AppContext.read_sessions) are enough
        self._batch_size = batch_size

    def search(self, query: Query) -> QueryResult:
        """Check ``query`` (raising :class:`QueryError` now) and return its lazily run result."""
        shape = _shape_of(query, self._sessions)
        if shape is not None:  # checked when the shape was first built: the same checks, the same outcome
            return QueryResult(None, self._sessions, self._batch_size, query, shape)
        return QueryResult(prepare(query), self._sessions, self._batch_size)

    def count(self, query: Query) -> int:
        return self.search(query).count()


# -- statements prebuilt per query shape (PostgreSQL) -----------------------------------------------
#
# A query's shape is everything but the values of its keys: level, model, scope, limit, offset, returned keys,
# and for each key whether it is matched on one plain value (exact matching, C.2.2.2.1) or not at all. A key of
# default matching whose value has no wildcard, list separator, range, padding or control character is matched
# with ``column = value`` whatever the value is, so the statement of one such query, compiled with placeholder
# values, serves every query of the shape with the real values bound in their place. Any other query (names,
# wildcards, dates, lists, numbers) is built per request as before.

_PLACEHOLDER = "\x1fpacs-key-{}\x1f"  # a plain value no client can send (control characters are not plain)
_PLAIN_EXCLUDED = frozenset("*?\\")
_SHAPES_MAX = 512
_shapes: dict[tuple[Any, ...], _Shape | None] = {}
_shapes_lock = threading.Lock()
_UNBUILT = object()


@dataclass
class _Shape:
    """A query shape: its keys, the columns read, and its head statements (per number of rows fetched)."""

    query: Query  # the shape's query, with placeholder values
    placeholders: dict[str, str]  # keyword -> its placeholder value
    keys: tuple[str, ...]
    columns: tuple[str, ...]
    limit: int | None
    offset: int
    engine: Engine
    heads: dict[int, _Head | None] = field(default_factory=dict)

    def head(self, fetch_rows: int) -> _Head | None:
        known = self.heads.get(fetch_rows, _UNBUILT)
        if known is _UNBUILT:
            known = _compiled_head(self, fetch_rows)
            with _shapes_lock:
                self.heads[fetch_rows] = known
        return known if isinstance(known, _Head) else None


@dataclass(frozen=True)
class _Head:
    compiled: Compiled
    slots: tuple[tuple[str, str], ...]  # (parameter name, keyword whose value it takes)


def _compiled_head(shape: _Shape, fetch_rows: int) -> _Head | None:
    """The shape's statement for its first ``fetch_rows`` rows, when each placeholder is bound as it is (so any
    plain value can take its place) and nowhere else (not in a pattern, not folded); else None."""
    compiled = compile_statement(shape.engine, prepare(shape.query).statement.limit(fetch_rows))
    if compiled is None:
        return None
    slots = tuple((name, keyword) for keyword, placeholder in shape.placeholders.items()
                  for name, bound in compiled.params.items() if bound == placeholder)
    if {keyword for _, keyword in slots} != set(shape.placeholders):
        return None  # a value that is not a parameter of its own (none today): built per request
    named = {name for name, _ in slots}
    if any(isinstance(value, str) and "\x1f" in value and name not in named for name, value in compiled.params.items()):
        return None
    return _Head(compiled, slots)


def _plain(value: Any) -> Value:
    if value is None or isinstance(value, int | str):
        return value
    return int(value) if isinstance(value, Decimal) else str(value)


def _is_plain(value: str) -> bool:
    return (bool(value) and value.strip(" \x00") == value and value != "*"
            and not any(c in _PLAIN_EXCLUDED or c < " " for c in value))


def _shape_of(query: Query, sessions: sessionmaker[Session]) -> _Shape | None:
    """The prebuilt shape of ``query`` (PostgreSQL, exact values only), else None."""
    if (query.limit is not None and query.limit < 0) or query.offset < 0:
        return None
    try:
        level = Level(str(query.level).strip().upper())
    except ValueError:
        return None
    kinds: list[tuple[str, str | None]] = []
    for keyword, value in query.filters.items():
        value = value or ""
        if value in ("", "*"):
            kinds.append((keyword, value))  # not matched (universal)
            continue
        attr = attribute_at(keyword, level)
        if (attr is None or attr.matching is not Matching.DEFAULT or attr.vr in matching.RANGE_VRS
                or attr.vr in INTEGER_VRS or not _is_plain(value)):
            return None
        kinds.append((keyword, None))
    key = (str(query.level), str(query.root), query.scope, tuple(kinds), tuple(query.returns), query.limit,
           query.offset, query.relational)
    known = _shapes.get(key, _UNBUILT)
    if known is _UNBUILT:
        known = _build_shape(query, kinds, sessions)
        with _shapes_lock:
            if len(_shapes) >= _SHAPES_MAX:
                _shapes.clear()
            _shapes[key] = known
    return known if isinstance(known, _Shape) else None


def _build_shape(query: Query, kinds: list[tuple[str, str | None]], sessions: sessionmaker[Session]
                 ) -> _Shape | None:
    engine = read_path_engine(sessions.kw.get("bind"))
    if engine is None:
        return None
    placeholders = {keyword: _PLACEHOLDER.format(i) for i, (keyword, universal) in enumerate(kinds)
                    if universal is None}
    filters = {keyword: placeholders.get(keyword, universal or "") for keyword, universal in kinds}
    shaped = Query(query.level, query.root, filters, tuple(query.returns), limit=query.limit, offset=query.offset,
                   relational=query.relational, scope=query.scope)
    try:
        prepared = prepare(shaped)
    except QueryError:
        return None  # refused: prepare() says why to the caller, per request
    return _Shape(shaped, placeholders, prepared.keys, prepared.columns, prepared.limit, prepared.offset, engine)


# -- building blocks ------------------------------------------------------------------------------

def _level_and_root(query: Query) -> tuple[Level, Root]:
    try:
        level = Level(str(query.level).strip().upper())
    except ValueError:
        raise IdentifierError(f"unknown query level {str(query.level)[:20]!r}") from None
    try:
        root = Root(str(query.root).strip().upper())
    except ValueError:
        raise IdentifierError(f"unknown information model {str(query.root)[:20]!r}") from None
    if level not in root.levels:
        raise IdentifierError(f"level {level} is not part of the {root.name.replace('_', ' ').title()} model")
    return level, root


def _check_hierarchical_keys(filters: Mapping[str, str], level: Level, above: tuple[Level, ...]) -> None:
    """PS3.4 C.4.1.3.1.1: the unique key of each level above the query level, with a single value.

    (The message fits an Error Comment's 64 characters.)
    """
    for lv in above:
        keyword = UNIQUE_KEYS[lv]
        value = (filters.get(keyword) or "").strip(" \x00")
        if matching.is_universal(value) or "\\" in value or any(w in value for w in matching.WILDCARDS):
            raise IdentifierError(f"{level} level needs one {keyword} (no relational queries)")


def _from_clause(level: Level, top: Level) -> Any:
    """The query level's table joined up to ``top`` (inner joins along the foreign keys)."""
    clause: Any = MODELS[level].__table__
    current = level
    while current.depth > top.depth:
        child_fk, parent_pk = PARENT_JOINS[current]
        parent = Level(list(Level)[current.depth - 1])
        clause = clause.join(MODELS[parent].__table__, child_fk == parent_pk)
        current = parent
    return clause


def _condition(attr: Attribute, raw: str) -> ColumnElement[bool] | None:
    """The SQL condition for one key (None: universal matching)."""
    value = (raw or "").strip(" \x00")
    if matching.is_universal(value):
        return None
    try:
        if attr.matching is Matching.MULTI_VALUED:
            return _modalities_in_study(attr, value)
        if attr.vr == "UI":
            return matching.condition(attr.column, value, "UI")  # handles UID lists and their bound
        values = [v.strip(" ") for v in value.split("\\")]
        if len(values) > matching.MAX_VALUE_LIST:
            raise matching.InvalidMatchValue(f"list of {len(values)} values exceeds {matching.MAX_VALUE_LIST}")
        parts = [c for v in values if v and (c := _single(attr, v)) is not None]
        if len(parts) < len([v for v in values if v]):
            return None  # one of the values is universal ('*'): the key matches everything
        return parts[0] if len(parts) == 1 else or_(*parts)
    except matching.InvalidMatchValue as exc:
        raise MatchValueError(f"{attr.keyword}: {exc}") from None


def _single(attr: Attribute, value: str) -> ColumnElement[bool] | None:
    if matching.is_universal(value):
        return None
    if attr.matching is Matching.PERSON_NAME:
        return matching.person_name(attr.matched_on, value)
    if attr.matching is Matching.FOLDED:
        return matching.condition(attr.matched_on, fold(value), attr.vr)
    if attr.vr in INTEGER_VRS:
        try:
            return attr.column == int(value)
        except ValueError:
            raise matching.InvalidMatchValue(f"not an integer: {value[:20]!r}") from None
    cond = matching.condition(attr.column, value, attr.vr)
    if cond is not None and attr.vr in matching.RANGE_VRS and "-" in value:
        cond = and_(cond, attr.column != "")  # an open range does not match a missing date (C.2.2.2.5)
    return cond


def _modalities_in_study(attr: Attribute, value: str) -> ColumnElement[bool]:
    """matching.multi_valued on Study.modalities_in_study, plus an equivalent index-backed test.

    multi_valued's LIKE '%\\CT\\%' cannot use an index; the EXISTS on the series' own modality
    (ix_series_modality) says the same thing and lets the database start from the series that
    have the modality instead of scanning every study.
    """
    wanted = [v.strip(" ") for v in value.split("\\") if v.strip(" ")]
    if not wanted:
        raise matching.InvalidMatchValue(f"no modality in {value[:20]!r}")
    if len(wanted) > matching.MAX_UID_LIST:
        raise matching.InvalidMatchValue(f"list of {len(wanted)} values exceeds {matching.MAX_UID_LIST}")
    series = aliased(Series)  # the outer query may select from series itself
    has_series = exists().where(series.study_fk == Study.id, series.modality.in_(wanted))
    return and_(matching.multi_valued(attr.column, "\\".join(wanted)), has_series)


class _index_errors:
    """Turn a lost or unreachable database into IndexUnavailable, a driver-rejected value into MatchValueError."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, OperationalError | InterfaceError):
            raise IndexUnavailable("index database unavailable") from exc
        if isinstance(exc, DataError):
            raise MatchValueError(f"value refused by the database: {str(exc.orig)[:100]}") from exc
