"""Who holds a derived task, and whether that process still lives: owners, heartbeats, claims, recovery.

A ``derived_task`` row (:class:`pacs.db.models.DerivedTask`) moves through these states:

* ``pending`` — waiting for an outbox relay to publish it (:mod:`pacs.derived.relay`);
* ``queued`` — published: to a broker (``owner`` empty: the broker holds the message, and a lost message is
  published again after ``PACS_TASK_REQUEUE_S``), or to the in-process pool of the process named in ``owner``;
* ``running`` — claimed by the process named in ``owner`` (:func:`claim`). The claim counts an attempt
  *before* the work starts, so a task in flight when its process dies has used one;
* ``done`` / ``failed``.

Every process that holds rows (``pacs serve``, ``pacs scp``, ``pacs import``, each Celery pool process)
registers a :class:`~pacs.db.models.TaskOwner` row — host, pid, process start time — and beats in it every
third of ``PACS_TASK_LEASE_S`` (:class:`Heartbeat`). The relay's sweep, every ``PACS_OUTBOX_POLL_S``, calls
:func:`reclaim`:

* an owner is dead when its heartbeat is older than the lease, when it is not registered at all, or — on the
  same host and PID namespace, where its pid means something — when its process is gone, a zombie, or another
  process that reuses the pid (another start time). A live owner is never robbed, however slow its work;
* a dead owner's ``queued`` rows go back to ``pending`` (they never started: no attempt, no crash);
* its ``running`` rows count a crash and go back to ``pending`` — or, at ``PACS_TASK_MAX_CRASHES``, end
  ``failed`` with "worker died N times while building …": a poison object (one that kills whatever decodes
  it) ends failed instead of killing each new process at start-up. Which of the tasks running in a dead
  process killed it cannot be known: each counts the crash, so a task that happened to run beside a poison
  object in that many crashes is failed too (``pacs tasks retry`` runs it again).

A broker that redelivers the message of a killed worker reaches :func:`claim` first; the claim does the
same accounting for a ``running`` row of a dead owner, and refuses one of a live owner (``busy``).

Clocks: heartbeats are written and compared in the database's time (``now()``), so hosts whose clocks
disagree do not take each other for dead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.dml import affected_rows
from pacs.db.models import DerivedTask, TaskOwner
from pacs.jobs import JobState, as_utc

log = logging.getLogger(__name__)

HELD = (JobState.QUEUED, JobState.RUNNING)  # states in which a row may name an owner

# This process's bookkeeping: rows it is running now, and rows it could not hand back (the index was down)
# that its heartbeat hands back when the index returns.
_running: set[int] = set()
_unreleased: set[int] = set()
_local = threading.Lock()


# -- who we are, and whether another process lives ----------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """A process as the task table names it."""

    host: str
    pid: int
    started: str

    @property
    def id(self) -> str:
        return f"{self.host}/{self.pid}/{self.started}"[:160]


@cache
def _host() -> str:
    """The host name, plus the PID namespace where ``/proc`` shows it: two containers sharing a host name
    (host networking) have different PID namespaces, so neither judges the other's pids."""
    name = socket.gethostname()[:100] or "localhost"
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return name
    return f"{name}#{namespace.strip('pid:[]')}"


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) from ``/proc``; None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):  # killed but not yet reaped by its parent: dead
        return None
    return fields[19]  # field 22 of the whole line


_HAS_PROC = Path("/proc/self/stat").exists()
_this: Owner | None = None


def this_process() -> Owner:
    """This process (computed again after a fork: a Celery pool process is an owner of its own)."""
    global _this
    pid = os.getpid()
    if _this is None or _this.pid != pid:
        started = (_proc_start(pid) if _HAS_PROC else None) or f"t{int(time.time())}"
        _this = Owner(_host(), pid, started)
    return _this


def known_dead(host: str, pid: int, started: str) -> bool:
    """Whether the owner is certainly dead: only decidable on our own host (and PID namespace)."""
    if host != _host():
        return False
    if _HAS_PROC:
        return _proc_start(pid) != started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _db_now(session: Session) -> datetime:
    return _utc(session.scalar(select(func.now())))


def _utc(value: datetime | str | None) -> datetime:
    if isinstance(value, str):  # SQLite's CURRENT_TIMESTAMP, when a driver hands it back raw
        value = datetime.fromisoformat(value)
    return as_utc(value) or datetime(1970, 1, 1, tzinfo=UTC)


# -- the heartbeat ----------------------------------------------------------------------------------------------


#: When this process last failed to beat (time.monotonic()): while the index was unreachable for us it was
#: for the other owners too, so their stale heartbeats prove nothing until a whole lease has passed since.
_last_beat_failure: float = float("-inf")


def _beat_failed() -> None:
    global _last_beat_failure
    _last_beat_failure = time.monotonic()


def heartbeats_are_evidence(lease_s: float) -> bool:
    """May a stale heartbeat count as a dead owner? Not within one lease of our own index outage (after a
    database restart every heartbeat is stale, yet every owner is alive)."""
    return time.monotonic() - _last_beat_failure >= lease_s


class Heartbeat:
    """Registers this process as a task owner and keeps its heartbeat fresh from a daemon thread."""

    def __init__(self, sessions: sessionmaker[Session], lease_s: float) -> None:
        self._sessions = sessions
        self.lease_s = lease_s
        self.owner = this_process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pacs-task-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Register now (a claim must never precede the registration), then beat in the background."""
        try:
            self.beat()
        except SQLAlchemyError as exc:  # the index is down: the thread registers when it is back
            _beat_failed()
            log.warning("task heartbeat: index unavailable: %s", str(exc).splitlines()[0])
        self._thread.start()
        return self

    def beat(self) -> None:
        with _local:
            unreleased = sorted(_unreleased - _running)
        with self._sessions() as session, session.begin():
            found = affected_rows(session, update(TaskOwner).where(TaskOwner.id == self.owner.id)
                                  .values(heartbeat_at=func.now()))
            if not found:  # first beat, or another process took us for dead and removed us
                session.add(TaskOwner(id=self.owner.id, host=self.owner.host, pid=self.owner.pid,
                                      started=self.owner.started, heartbeat_at=func.now()))
            if unreleased:
                session.execute(update(DerivedTask).where(DerivedTask.id.in_(unreleased),
                                                          DerivedTask.owner == self.owner.id,
                                                          DerivedTask.state == JobState.RUNNING)
                                .values(state=JobState.PENDING, owner=""))
        with _local:
            _unreleased.difference_update(unreleased)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.beat()
            except SQLAlchemyError as exc:
                _beat_failed()
                log.warning("task heartbeat: index unavailable: %s", str(exc).splitlines()[0])

    def stop(self) -> None:
        """A clean exit: rows still queued here go back to ``pending`` for the other processes, and the
        owner row goes (rows still running, if a task outlived the shutdown, are then reclaimed at once)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            with self._sessions() as session, session.begin():
                session.execute(update(DerivedTask).where(DerivedTask.owner == self.owner.id,
                                                          DerivedTask.state == JobState.QUEUED)
                                .values(state=JobState.PENDING, owner=""))
                session.execute(delete(TaskOwner).where(TaskOwner.id == self.owner.id))
        except SQLAlchemyError as exc:
            log.warning("task heartbeat: could not deregister (the lease runs out instead): %s",
                        str(exc).splitlines()[0])


class _HasExtras(Protocol):
    extras: dict[str, object]


_start_lock = threading.Lock()


def process_heartbeat(holder: _HasExtras, sessions: sessionmaker[Session], lease_s: float) -> Heartbeat:
    """This process's heartbeat, started on first use (kept in ``holder.extras``; again after a fork)."""
    with _start_lock:
        beat = holder.extras.get("task_heartbeat")
        if not isinstance(beat, Heartbeat) or beat.owner != this_process():
            beat = Heartbeat(sessions, lease_s).start()
            holder.extras["task_heartbeat"] = beat
        return beat


# -- claiming and finishing a task ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """What :func:`claim` found: ``running`` (ours now), ``busy`` (a live owner runs it), ``done``,
    ``failed`` or ``missing``."""

    state: str
    kind: str = ""
    subject_uid: str = ""
    sha256: str = ""


def _owner_dead(session: Session, owner_id: str, lease_s: float, now: datetime) -> bool:
    row = session.get(TaskOwner, owner_id)
    if row is None:
        return True
    return _utc(row.heartbeat_at) < now - timedelta(seconds=lease_s) or known_dead(row.host, row.pid, row.started)


def crash_message(crashes: int, kind: str, subject_uid: str) -> str:
    return f"worker died {crashes} time{'s' if crashes != 1 else ''} while building {kind} of {subject_uid}"


def claim(sessions: sessionmaker[Session], task_id: int, *, lease_s: float, max_crashes: int) -> Claim:
    """Take the row for this process and count the attempt, before any work; see the module docstring."""
    me = this_process().id
    with _local:
        if task_id in _running:  # a duplicate message: this process runs it now
            return Claim("busy")
        _running.add(task_id)
    try:
        found = _claim(sessions, task_id, me, lease_s, max_crashes)
    except BaseException:
        forget(task_id)
        raise
    if found.state != JobState.RUNNING:
        forget(task_id)
    return found


def forget(task_id: int) -> None:
    """This process no longer runs the row (it finished it, or the handler marked it done itself)."""
    with _local:
        _running.discard(task_id)


def _claim(sessions: sessionmaker[Session], task_id: int, me: str, lease_s: float, max_crashes: int) -> Claim:
    with sessions() as session, session.begin():
        task = session.scalars(select(DerivedTask).where(DerivedTask.id == task_id).with_for_update()).one_or_none()
        if task is None:
            return Claim("missing")
        if task.state in (JobState.DONE, JobState.FAILED):
            return Claim(task.state)
        if task.state == JobState.RUNNING and task.owner and task.owner != me:  # ours: left by a failed hand-back
            if not _owner_dead(session, task.owner, lease_s, _db_now(session)):
                return Claim("busy")
            task.crashes += 1
            task.last_error = crash_message(task.crashes, task.kind, task.subject_uid)
            log.warning("derived task %s: %s (owner %s)", task_id, task.last_error, task.owner)
            if task.crashes >= max_crashes:
                task.state, task.owner = JobState.FAILED, ""
                return Claim(JobState.FAILED)
        task.state, task.owner = JobState.RUNNING, me
        task.attempts += 1
        return Claim(JobState.RUNNING, task.kind, task.subject_uid, task.sha256)


def finish(sessions: sessionmaker[Session], task_id: int, state: JobState, error: str, *, undo_attempt: bool = False,
           only_if_not_done: bool = False) -> int:
    """Leave the row in ``state`` (done, failed, pending, queued) with no owner; returns its attempts.

    ``undo_attempt``: the run was not an attempt after all (the handler deferred: more input is expected).
    If the index is down, the row is left to this process's heartbeat to hand back, and the error raised.
    """
    try:
        with sessions() as session, session.begin():
            task = session.get(DerivedTask, task_id)
            if task is None or (only_if_not_done and task.state == JobState.DONE):
                return 0
            task.state, task.owner, task.last_error = state, "", error[:2000]
            if undo_attempt and task.attempts > 0:
                task.attempts -= 1
            return task.attempts
    except SQLAlchemyError:
        with _local:
            _unreleased.add(task_id)
        raise
    finally:
        forget(task_id)


# -- recovery ----------------------------------------------------------------------------------------------------


@dataclass
class Reclaimed:
    requeued: list[int]  # back to pending
    failed: list[int]  # crashed too often


def reclaim(sessions: sessionmaker[Session], *, lease_s: float, max_crashes: int) -> Reclaimed:
    """Give the rows of dead owners back (queued: to pending; running: a crash, then pending or failed)."""
    me = this_process().id
    result = Reclaimed([], [])
    with sessions() as session:
        now = _db_now(session)
        cutoff = now - timedelta(seconds=lease_s)
        owners = {row.id: row for row in session.scalars(select(TaskOwner))}
        holders = set(session.scalars(select(DerivedTask.owner).distinct()
                                      .where(DerivedTask.state.in_(HELD), DerivedTask.owner != "")))
    trust = heartbeats_are_evidence(lease_s)

    def is_dead(row: TaskOwner | None) -> bool:
        if row is None:  # no registration (removed as dead, or never made): only a heartbeat we trust says so
            return trust
        if known_dead(row.host, row.pid, row.started):
            return True
        return trust and _utc(row.heartbeat_at) < cutoff

    dead = {o for o in holders - {me} if is_dead(owners.get(o))}
    gone = [o for o, row in owners.items() if o != me and o not in holders and is_dead(row)]
    if not dead and not gone:
        return result
    with sessions() as session, session.begin():
        for owner in sorted(dead):
            result.requeued += session.scalars(
                update(DerivedTask).where(DerivedTask.owner == owner, DerivedTask.state == JobState.QUEUED)
                .values(state=JobState.PENDING, owner="").returning(DerivedTask.id)).all()
            running = session.scalars(select(DerivedTask).where(DerivedTask.owner == owner,
                                                                DerivedTask.state == JobState.RUNNING)).all()
            for task in running:
                task.crashes += 1
                task.last_error = crash_message(task.crashes, task.kind, task.subject_uid)
                task.owner = ""
                if task.crashes >= max_crashes:
                    task.state = JobState.FAILED
                    result.failed.append(task.id)
                    log.error("derived task %s failed: %s (owner %s)", task.id, task.last_error, owner)
                else:
                    task.state = JobState.PENDING
                    result.requeued.append(task.id)
                    log.warning("derived task %s: %s (owner %s); running it again", task.id, task.last_error,
                                owner)
        session.execute(delete(TaskOwner).where(TaskOwner.id.in_(sorted(dead | set(gone)))))
    if result.requeued:
        log.info("took back %d derived task(s) from %d dead owner(s)", len(result.requeued), len(dead))
    return result


def outstanding(session: Session, ids: set[int] | None = None, chunk: int = 500) -> set[int]:
    """The rows (of ``ids``, or all) not yet done or failed."""
    busy = DerivedTask.state.in_((JobState.PENDING, *HELD))
    if ids is None:
        return set(session.scalars(select(DerivedTask.id).where(busy)))
    wanted = sorted(ids)
    found: set[int] = set()
    for i in range(0, len(wanted), chunk):
        found.update(session.scalars(select(DerivedTask.id).where(busy, DerivedTask.id.in_(wanted[i:i + chunk]))))
    return found
