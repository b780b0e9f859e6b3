"""The embedded mode's in-process pool: a transient failure is retried after a backoff that follows the
row's attempts, not every sweep interval (ten attempts spent in under a minute of a busy store)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import DerivedTask
from pacs.derived import pool, runner
from pacs.derived.pool import DelayedRuns, InProcessPublisher
from pacs.jobs import JobState
from pacs.settings import Settings
from storage import StorageUnavailable


def test_delayed_runs_come_due_in_order_and_stop_drops_the_rest() -> None:
    ran: list[tuple[int, float]] = []
    done = threading.Event()
    start = time.monotonic()

    def run(task_id: int) -> None:
        ran.append((task_id, time.monotonic() - start))
        if len(ran) == 2:
            done.set()

    runs = DelayedRuns(run)
    runs.schedule(2, 0.3)
    runs.schedule(1, 0.1)
    runs.schedule(3, 30)
    assert done.wait(5)
    assert [task for task, _ in ran] == [1, 2] and ran[0][1] >= 0.1 and ran[1][1] >= 0.3
    assert runs.pending() == 1
    runs.stop()
    assert runs.pending() == 0
    runs.schedule(4, 0)  # after stop: ignored (the row stays queued for the next start)
    assert runs.pending() == 0


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[AppContext]:
    context = AppContext.create(Settings(data_dir=tmp_path / "data", task_max_attempts=10))
    migrate.upgrade(context.engine)
    yield context
    context.close()


def _run_in_pool(ctx: AppContext, kind: str, calls: list[float], until: int) -> DerivedTask:
    """Queue one task of ``kind``, publish it to an in-process pool, wait until its handler ran ``until`` times
    (and a little more, for the row's last write), and return the row as the pool left it."""
    with ctx.sessions() as session, session.begin():
        task = DerivedTask(kind=kind, subject_uid="1.2.3", sha256="", state=JobState.QUEUED)
        session.add(task)
        session.flush()
        task_id = task.id
    publisher = InProcessPublisher(ctx, workers=1)
    try:
        publisher.publish(task_id)
        deadline = time.monotonic() + 10
        while len(calls) < until and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        publisher.shutdown()
    with ctx.sessions() as session:
        row = session.scalars(select(DerivedTask).where(DerivedTask.id == task_id)).one()
        session.expunge(row)
        return row


def test_a_transient_failure_is_retried_with_backoff_until_it_succeeds(ctx: AppContext,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[float] = []

    def flaky(_ctx: AppContext, _uid: str, _sha: str) -> str:
        runs.append(time.monotonic())
        if len(runs) < 4:
            raise StorageUnavailable("store down")
        return ""

    monkeypatch.setitem(runner.HANDLERS, "flaky", flaky)
    monkeypatch.setattr(pool, "RETRY_BASE_S", 0.2)
    row = _run_in_pool(ctx, "flaky", runs, until=4)
    assert (row.state, row.attempts) == (JobState.DONE, 4)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps  # 1×, 2×, 4× the base


def test_a_task_that_keeps_failing_ends_failed_after_its_attempts(ctx: AppContext,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def broken(_ctx: AppContext, _uid: str, _sha: str) -> str:
        calls.append(time.monotonic())
        raise StorageUnavailable("store down")

    monkeypatch.setitem(runner.HANDLERS, "broken", broken)
    monkeypatch.setattr(pool, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(pool, "RETRY_MAX_S", 0.05)
    row = _run_in_pool(ctx, "broken", calls, until=10)
    assert (row.state, row.attempts, len(calls)) == (JobState.FAILED, 10, 10)
    assert "gave up after 10 attempts" in row.last_error
