"""Derived work after a crash: a dead owner's tasks come back in seconds, a live one is not robbed, and a
poison object ends ``failed`` instead of a start-up loop (issue 12, "Reliability" and finding 1).

The processes are killed where E1's failpoints put them (``PACS_TEST_FAILPOINTS``, :mod:`pacs.failpoints`):
``derived.before_write`` SIGKILLs a process in the middle of a thumbnail task, exactly as a decompression
bomb or the OOM killer would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import DerivedTask, Series, TaskOwner
from pacs.derived import lease
from pacs.derived.kinds import SERIES_METADATA_KIND
from pacs.ingest import Ingestor, IngestSource
from pacs.settings import Settings
from tests.support.datasets import make_instance
from tests.support.net import wait_until
from tests.support.pacs_process import PacsProcess, dicom_echo
from tests.support.stack import EmbeddedPacs, embedded_env

pytestmark = pytest.mark.integration


def _tasks(ctx: AppContext, kind: str = "thumbnail") -> list[DerivedTask]:
    with ctx.sessions() as s:
        return list(s.scalars(select(DerivedTask).where(DerivedTask.kind == kind)))


def test_tasks_of_a_killed_import_are_redone_within_seconds_by_the_running_server(tmp_path: Path) -> None:
    """The drill's case: `pacs import` killed -9 while `pacs serve` runs on the same archive. Before, its
    thumbnails waited PACS_TASK_REQUEUE_S (612 s measured); now the server sees the owner is dead at once."""
    server = EmbeddedPacs(tmp_path / "serve", {"PACS_TASK_REQUEUE_S": "600"})
    try:
        files = write_ct_series(tmp_path / "ct", slices=12, size=64)
        env = {**server.env, "PACS_IN_PROCESS_WORKERS": "1", "PACS_TEST_FAILPOINTS": "derived.before_write=1"}
        importer = PacsProcess(["import", str(files[0].parent)], env, tmp_path / "import.log").start()
        assert importer.proc is not None
        importer.proc.wait(timeout=120)
        died_at = time.monotonic()
        log = importer.log_tail()
        assert importer.proc.returncode == -9 and "FAILPOINT derived.before_write hit 1" in log, log

        def all_done() -> bool:
            with server.ctx.sessions() as s:
                series = set(s.scalars(select(Series.series_instance_uid)))
            tasks = _tasks(server.ctx, SERIES_METADATA_KIND)
            return bool(series) and {t.subject_uid for t in tasks if t.state == "done"} == series

        wait_until(all_done, timeout=90, interval=0.2, what="the killed import's series work")  # not 600 s
        recovered_s = time.monotonic() - died_at
        crashed = [t for t in _tasks(server.ctx, SERIES_METADATA_KIND) if t.crashes]
        # the series document and thumbnail in flight when the import died counted the crash and the attempt it used
        assert [(t.crashes, t.attempts, t.state) for t in crashed] == [(1, 2, "done")]
        print(f"series work of the killed import redone {recovered_s:.1f} s after its death")
        with server.ctx.sessions() as s:
            owners = list(s.scalars(select(TaskOwner.pid)))
        assert importer.proc.pid not in owners  # the dead owner's registration is gone too
    finally:
        server.close()


def test_a_poison_object_ends_failed_after_the_allowed_crashes_and_the_server_stays_up(tmp_path: Path) -> None:
    """An object whose derived work kills the process (its series' thumbnail is rendered from it): each start used
    to run it again (a crash loop). Now the task in flight counts a crash, and at PACS_TASK_MAX_CRASHES it is
    failed with a clear error."""
    data = tmp_path / "data"
    ctx = AppContext.create(Settings(data_dir=data))
    try:
        migrate.upgrade(ctx.engine)
        sop, series_uid = "1.2.826.0.1.3680043.8.498.424242", "1.2.826.0.1.3680043.8.498.4242"
        assert Ingestor(ctx.sessions, ctx.store).ingest(make_instance(SOPInstanceUID=sop, SeriesInstanceUID=series_uid),
                                                        IngestSource("import")).ok
        # every series build kills its process: the poison. One worker thread, so that no other task is in flight
        # at the kill: every task running in a process that dies counts the crash.
        env = {**embedded_env(data), "PACS_TASK_MAX_CRASHES": "2", "PACS_IN_PROCESS_WORKERS": "1",
               "PACS_TEST_FAILPOINTS": "derived.before_write=1"}
        port = int(env["PACS_DICOM_PORT"])
        for start in (1, 2):  # the first run dies in the task; the second takes it back (crash 1) and dies again
            serve = PacsProcess(["serve"], env, tmp_path / f"serve{start}.log").start()
            assert serve.proc is not None
            serve.proc.wait(timeout=120)
            assert "FAILPOINT derived.before_write" in serve.log_tail(), serve.log_tail()
        serve = PacsProcess(["serve"], env, tmp_path / "serve3.log").start()
        try:
            serve.wait_dicom(port)  # the third start takes it back for the second time: failed, not run

            def failed() -> DerivedTask | None:
                task = next(t for t in _tasks(ctx, SERIES_METADATA_KIND) if t.subject_uid == series_uid)
                return task if task.state == "failed" else None

            wait_until(lambda: failed() is not None, timeout=60, what="the poison task to be failed")
            task = failed()
            assert task is not None and task.crashes == 2 and task.attempts == 2
            assert task.last_error == f"worker died 2 times while building {SERIES_METADATA_KIND} of {series_uid}"
            assert serve.alive() and dicom_echo(port)  # the server keeps answering
            assert "FAILPOINT" not in serve.log_tail()
        finally:
            serve.stop()
    finally:
        ctx.close()


# -- the lease rules themselves, on a real index and real processes --------------------------------------------


@pytest.fixture()
def index(tmp_path: Path) -> Iterator[AppContext]:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    migrate.upgrade(ctx.engine)
    yield ctx
    ctx.close()


def _running_row(ctx: AppContext, owner: lease.Owner, heartbeat_at: datetime) -> int:
    with ctx.sessions() as s, s.begin():
        s.add(TaskOwner(id=owner.id, host=owner.host, pid=owner.pid, started=owner.started,
                        heartbeat_at=heartbeat_at))
        task = DerivedTask(kind="thumbnail", subject_uid=f"1.2.3.{owner.pid}", sha256="ab", state="running",
                           owner=owner.id, attempts=1)
        s.add(task)
        s.flush()
        return task.id


def _state(ctx: AppContext, task_id: int) -> tuple[str, int, str]:
    with ctx.sessions() as s:
        task = s.get(DerivedTask, task_id)
        assert task is not None
        return task.state, task.crashes, task.owner


def test_a_live_slow_owner_is_not_robbed_and_its_death_is_seen_at_once(index: AppContext) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        here = lease.this_process()
        started = lease._proc_start(child.pid)
        assert started is not None
        owner = lease.Owner(here.host, child.pid, started)
        task_id = _running_row(index, owner, datetime.now(UTC))
        kwargs = {"lease_s": 30.0, "max_crashes": 3}
        assert lease.reclaim(index.sessions, **kwargs).requeued == []  # alive: left alone
        assert lease.claim(index.sessions, task_id, **kwargs).state == "busy"  # a duplicate message
        assert _state(index, task_id) == ("running", 0, owner.id)
        child.kill()
        child.wait()
        # its heartbeat is still fresh, but on this host its death is certain: taken back at once
        assert lease.reclaim(index.sessions, **kwargs).requeued == [task_id]
        assert _state(index, task_id) == ("pending", 1, "")
    finally:
        child.kill()
        child.wait()


def test_an_owner_on_another_host_is_judged_by_its_heartbeat(index: AppContext) -> None:
    fresh = _running_row(index, lease.Owner("other-host#1", 4242, "100"), datetime.now(UTC))
    silent = _running_row(index, lease.Owner("other-host#1", 4343, "100"),
                          datetime.now(UTC) - timedelta(seconds=31))
    reclaimed = lease.reclaim(index.sessions, lease_s=30.0, max_crashes=1)
    assert (reclaimed.requeued, reclaimed.failed) == ([], [silent])  # max_crashes=1: failed at the first death
    assert _state(index, fresh)[0] == "running"
    state, crashes, _ = _state(index, silent)
    assert (state, crashes) == ("failed", 1)
    # a redelivered message for the silent owner's row goes through the same accounting in claim()
    other = _running_row(index, lease.Owner("other-host#1", 4444, "100"),
                         datetime.now(UTC) - timedelta(hours=1))
    claimed = lease.claim(index.sessions, other, lease_s=30.0, max_crashes=3)
    assert claimed.state == "running" and _state(index, other) == ("running", 1, lease.this_process().id)
    lease.forget(other)
