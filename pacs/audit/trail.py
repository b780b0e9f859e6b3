"""The append-only, hash-chained audit trail (SPEC §7).

Every row carries ``prev_hash`` (the ``entry_hash`` of the row before it) and ``entry_hash``
(SHA-256 over its own fields and ``prev_hash``). Appending takes a chain lock held until the
writing transaction ends (PostgreSQL: a transaction-level advisory lock; SQLite: writers already
hold the database's write lock from ``BEGIN IMMEDIATE``), so ids and chain order agree. Changing,
removing or inserting a row anywhere but at the end breaks the chain at that row, and
:func:`verify` names it. There is no update or delete path in the code.

An attacker who can write the database can still rewrite the whole chain from some row onwards;
anchoring the latest hash outside the database (``pacs audit verify`` prints it) closes that.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Engine, Table, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.models import AuditEvent
from pacs.db.prepared import Prepared
from pacs.errors import IndexUnavailable
from pacs.security.redaction import redact_text

if TYPE_CHECKING:
    import psycopg

_CHAIN_LOCK_KEY = 0x5041435341554449  # "PACSAUDI"; any constant shared by every writer


@dataclass(frozen=True)
class AuditProblem:
    event_id: int
    reason: str


def append(
    session: Session,
    *,
    action: str,
    actor: str = "",
    role: str = "",
    outcome: str = "success",
    source_address: str = "",
    patient_id: str = "",
    study_instance_uid: str = "",
    detail: str = "",
) -> None:
    """Add one event to the chain inside the caller's transaction (call it last: the lock is held to commit).

    Credentials in the text (``?access_token=…``, a URL's password, a bearer token) are replaced by
    ``***`` before the row is hashed (:func:`pacs.security.redaction.redact_text`): the trail is
    append-only, so a secret written here could never be removed.

    Written with prebuilt statements on the session's connection (no ORM object, no flush): every received
    instance appends a row, and the ORM's unit of work cost several times the two statements (issue 13).
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(_LOCK_CHAIN)
    prev = _LAST_HASH.scalar(connection, {}) or ""
    fields = {"action": action, "actor": actor, "role": role, "outcome": outcome, "source_address": source_address,
              "patient_id": patient_id, "study_instance_uid": study_instance_uid, "detail": detail}
    values = dict(zip(_VALUES, _values(fields), strict=True))
    at = datetime.now(UTC)
    connection.execute(_INSERT, {**values, "at": at, "prev_hash": prev,
                                 "entry_hash": _hash(prev, at, [values[name] for name in _HASHED])})


def record(sessions: sessionmaker[Session], *, pipelined: bool = False, **fields: str) -> None:
    """Append one event in its own transaction (reads, logins, denials).

    ``pipelined=True`` (the read path's rows: searches, metadata, frames, rendered images) writes the row on
    PostgreSQL in one round trip on the read path's connections (:func:`_record_pipelined`) instead of six; it is
    committed as durably as any other row before the request is answered (an access that was served is never
    missing from the trail). Elsewhere (SQLite) it is the ordinary transaction.
    """
    if pipelined:
        from pacs.query.sessions import read_path_engine

        engine = read_path_engine(sessions.kw.get("bind"))
        if engine is not None:
            _record_pipelined(engine, fields)
            return
    with sessions() as session, session.begin():
        append(session, **fields)


_TABLE = AuditEvent.__tablename__
_VALUES = ("actor", "role", "source_address", "action", "outcome", "patient_id", "study_instance_uid", "detail")
_HASHED = _VALUES  # the fields entry_hash() covers after prev_hash and at, in this order
_event = cast(Table, AuditEvent.__table__).c
# prebuilt: ingest appends a row for every received object (issue 13)
_LOCK_CHAIN = select(func.pg_advisory_xact_lock(_CHAIN_LOCK_KEY))
_LAST_HASH = Prepared(select(_event.entry_hash).order_by(_event.id.desc()).limit(1))  # on the driver's cursor
_INSERT = insert(cast(Table, AuditEvent.__table__))
# One statement after the chain lock: the previous hash read in its own snapshot (taken after the lock was granted,
# so it sees every row committed before), the time, and the row's hash over exactly the canonical text of
# entry_hash(): '["<prev_hash>","<at, UTC, microseconds>",' followed by the rest of the fields as JSON (from Python).
_APPEND = (
    f"INSERT INTO {_TABLE} (at, {', '.join(_VALUES)}, prev_hash, entry_hash) "
    f"SELECT t.at, {', '.join(['%s'] * len(_VALUES))}, p.prev, "
    "encode(sha256(convert_to('[\"' || p.prev || '\",\"' "
    "|| to_char(t.at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '\",' || %s, 'UTF8')), 'hex') "
    "FROM (SELECT clock_timestamp() AS at) AS t, "
    f"(SELECT coalesce((SELECT entry_hash FROM {_TABLE} ORDER BY id DESC LIMIT 1), '') AS prev) AS p")


def _values(fields: dict[str, str]) -> list[str]:
    """A row's values as :func:`append` writes them: credentials redacted, lengths cut."""
    def field(name: str) -> str:
        return fields.get(name, "")

    return [redact_text(field("actor")[:256])[:128], field("role")[:32], field("source_address")[:64],
            field("action")[:64], fields.get("outcome", "success")[:16], field("patient_id")[:64],
            field("study_instance_uid")[:64], redact_text(field("detail")[:4000])[:2000]]


def _record_pipelined(engine: Engine, fields: dict[str, str]) -> None:
    """One row in one transaction and one round trip (psycopg's pipeline mode): ``BEGIN``, the chain lock, the
    insert (which reads the previous hash and hashes the row in the database, :data:`_APPEND`) and ``COMMIT``.
    The lock is taken in a statement of its own before the previous hash is read, as :func:`append` does;
    :func:`verify` checks these rows as any other."""
    if "action" not in fields:
        raise TypeError("an audit event needs an action")
    values = _values(fields)
    rest = json.dumps(values, ensure_ascii=False, separators=(",", ":"))[1:]  # '"actor",...,"detail"]'
    raw = engine.raw_connection()
    try:
        conn = cast("psycopg.Connection[Any]", raw.driver_connection)
        # plain statements on the autocommit connection, one Sync at the end (psycopg's conn.transaction() in
        # a pipeline syncs more often); on an error the connection is dropped, never reused half-way
        with conn.pipeline():
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHAIN_LOCK_KEY,))
            conn.execute(_APPEND, (*values, rest))
            conn.execute("COMMIT")
    except Exception as error:
        raw.invalidate()  # whatever state the connection is in, it does not go back to the pool
        raise IndexUnavailable(f"audit trail unavailable: {type(error).__name__}") from error
    finally:
        raw.close()


def entry_hash(event: AuditEvent) -> str:
    return _hash(event.prev_hash or "", event.at, [getattr(event, name) or "" for name in _HASHED])


def _hash(prev_hash: str, at: datetime | None, values: list[str]) -> str:
    """SHA-256 over the canonical text of a row: its previous hash, its time and :data:`_HASHED` in that order."""
    canonical = json.dumps([prev_hash, _timestamp(at), *values], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def verify(sessions: sessionmaker[Session], batch_size: int = 1000) -> tuple[int, list[AuditProblem], str]:
    """Walk the chain in id order; return (rows checked, problems, hash of the last row)."""
    problems: list[AuditProblem] = []
    previous = ""
    checked = 0
    for event in _events(sessions, batch_size):
        checked += 1
        if event.prev_hash != previous:
            problems.append(AuditProblem(event.id, "chain broken before this row (a row was removed or inserted)"))
        if entry_hash(event) != event.entry_hash:
            problems.append(AuditProblem(event.id, "row content does not match its hash (edited)"))
        previous = event.entry_hash
    return checked, problems, previous


def _events(sessions: sessionmaker[Session], batch_size: int) -> Iterator[AuditEvent]:
    last_id = 0
    while True:
        with sessions() as session:
            batch = list(session.scalars(
                select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch_size)))
        if not batch:
            return
        yield from batch
        last_id = batch[-1].id


def _timestamp(at: datetime | None) -> str:
    if at is None:
        return ""
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(timespec="microseconds")


class ReadCoalescer:
    """Decides whether a high-volume read needs its own audit row.

    A viewer opening a CT asks for hundreds of frames; one row per frame would be noise (and a
    database write per frame). The first successful read of a kind (frames, rendered images,
    thumbnails, bulk data) of one study by one principal is audited; repeats of the same kind
    within ``window_s`` are covered by that row, which says so. Failures are always audited.
    """

    def __init__(self, window_s: float, max_keys: int = 50_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._window, self._max_keys, self._clock = window_s, max_keys, clock
        self._seen: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def should_record(self, actor: str, action: str, study_instance_uid: str) -> bool:
        if self._window <= 0:
            return True
        key, now = (actor, action, study_instance_uid), self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self._window:
                return False
            if len(self._seen) >= self._max_keys:
                self._seen = {k: t for k, t in self._seen.items() if now - t < self._window}
                if len(self._seen) >= self._max_keys:
                    self._seen.clear()
            self._seen[key] = now
            return True

    def forget(self, actor: str, action: str, study_instance_uid: str) -> None:
        """The row :meth:`should_record` asked for could not be written: the next read must try again."""
        with self._lock:
            self._seen.pop((actor, action, study_instance_uid), None)
