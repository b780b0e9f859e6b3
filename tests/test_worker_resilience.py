"""Derived work survives what hospitals' servers go through: a killed worker, a broker outage,
a store that is down while the worker runs. Real processes, real brokers (RabbitMQ, Redis)."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from bench.generate_ct import write_ct_series
from pacs.db.models import DerivedTask, Series
from pacs.derived.kinds import SERIES_METADATA_KIND
from tests.support.dcmtk import storescu
from tests.support.net import wait_until
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedS3
from tests.support.stack import RABBITMQ_URL, ScaledStack

pytestmark = pytest.mark.integration


def _send_series(stack: ScaledStack, tmp: Path, count: int, slices: int, size: int = 128) -> list[str]:
    """``count`` CT series of ``slices`` each, sent in one association; their Series Instance UIDs.

    Derived work is one task per series (its DICOM JSON document and thumbnail): the instances' fragments are
    made at ingest (pacs.ingest.fragment), so a test of the workers needs series, not slices."""
    files = [f for n in range(count) for f in write_ct_series(tmp / f"s{n}", slices=slices, size=size)]
    result = storescu(stack.port, files, "-xe")
    assert result.status == 0 and result.returncode == 0, result.output[-1500:]
    return list(dict.fromkeys(str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files))


def _series_states(stack: ScaledStack, series: list[str]) -> dict[str, int]:
    with stack.ctx.sessions() as s:
        rows = s.execute(select(DerivedTask.state, func.count()).where(
            DerivedTask.kind == SERIES_METADATA_KIND, DerivedTask.subject_uid.in_(series)).group_by(DerivedTask.state))
        return dict(rows.all())


def _all_series_done(stack: ScaledStack, series: list[str]) -> bool:
    return _series_states(stack, series).get("done", 0) == len(series)


@contextmanager
def scaled_stack(root: Path, broker_url: str, s3: SeaweedS3, **settings: str) -> Iterator[ScaledStack]:
    """`pacs scp` on PostgreSQL, the S3 server and ``broker_url``; each test starts its workers."""
    with ScaledStack(root, s3.url_for(f"pacs-{uuid.uuid4().hex[:10]}"), broker_url=broker_url,
                     extra_env={"PACS_OUTBOX_POLL_S": "0.5", **settings}) as stack:
        stack.start_scp()
        yield stack


def _assert_each_series_made_once(stack: ScaledStack, series: list[str]) -> None:
    with stack.ctx.sessions() as s:
        rows = s.execute(select(DerivedTask.subject_uid, DerivedTask.state).where(
            DerivedTask.kind == SERIES_METADATA_KIND, DerivedTask.subject_uid.in_(series))).all()
        keys = s.execute(select(Series.thumbnail_key, Series.metadata_key)
                         .where(Series.series_instance_uid.in_(series))).all()
    assert sorted(r.subject_uid for r in rows) == sorted(series)  # one outbox row per series
    assert {r.state for r in rows} == {"done"}
    thumbnails = [k.thumbnail_key for k in keys]
    assert len(keys) == len(series) and all(thumbnails) and len(set(thumbnails)) == len(series)
    assert all(stack.ctx.store.exists(k) for row in keys for k in row)


def test_worker_killed_mid_batch_then_restarted(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """SIGKILL the worker while it works through a day's series; a new worker finishes every one."""
    with scaled_stack(tmp_path, RABBITMQ_URL, s3_server) as stack:
        # the series are in before the worker starts: a quick worker kept pace with the sender and was done before
        # the test could kill it (a flake of a clean run on an idle machine)
        series = _send_series(stack, tmp_path / "ct", count=40, slices=2, size=256)
        worker = stack.start_worker(concurrency=1)
        wait_until(lambda: _series_states(stack, series).get("done", 0) >= 3, timeout=60, interval=0.05,
                   what="first series")
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(timeout=10)
        done_at_kill = _series_states(stack, series).get("done", 0)
        assert done_at_kill < len(series), "the worker finished before it could be killed; send more series"
        stack.start_worker(concurrency=2)
        wait_until(lambda: _all_series_done(stack, series), timeout=180, what="all series after restart")
        _assert_each_series_made_once(stack, series)


def test_broker_outage_delays_derived_work_and_never_loses_it(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """Redis stopped while studies arrive: every C-STORE succeeds; after Redis is back, every series'
    document and thumbnail appear, each made once."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        with scaled_stack(tmp_path, redis.url, s3_server) as stack:
            stack.start_worker(concurrency=2)
            warmup = _send_series(stack, tmp_path / "warm", count=1, slices=3, size=64)
            wait_until(lambda: _all_series_done(stack, warmup), timeout=60, what="warm-up series")
            redis.stop()
            series = _send_series(stack, tmp_path / "ct", count=6, slices=3, size=64)  # every C-STORE succeeded
            assert _series_states(stack, series).get("done", 0) == 0
            redis.start()
            # Celery reconnects with growing intervals after losing its broker: allow for that.
            wait_until(lambda: _all_series_done(stack, series), timeout=240, what="series after outage")
            _assert_each_series_made_once(stack, series)
            with stack.ctx.sessions() as s:
                attempts = set(s.scalars(select(DerivedTask.attempts).where(
                    DerivedTask.kind == SERIES_METADATA_KIND, DerivedTask.subject_uid.in_(series))))
            assert attempts == {1}  # each ran exactly once (waiting for a series to settle is not an attempt)
    finally:
        redis.stop()


def test_failed_tasks_are_listed_and_retried(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """The store is down while the worker runs: tasks fail after the configured attempts, show up in
    `pacs tasks failed`, and `pacs tasks retry` completes them once the store is back."""
    with scaled_stack(tmp_path, RABBITMQ_URL, s3_server, PACS_TASK_MAX_ATTEMPTS="2") as stack:
        series = _send_series(stack, tmp_path / "ct", count=3, slices=2, size=64)
        s3_server.stop()
        try:
            stack.start_worker(concurrency=2)
            wait_until(lambda: _series_states(stack, series).get("failed", 0) == len(series), timeout=90,
                       what="tasks to fail")
            listed = json.loads(run_pacs(["tasks", "failed", "--json"], stack.env).stdout)
            failed = [t for t in listed if t["kind"] == SERIES_METADATA_KIND]
            assert sorted(t["subject_uid"] for t in failed) == sorted(series)
            assert all(t["attempts"] == 2 and "gave up" in t["last_error"] for t in failed)
        finally:
            s3_server.start()
        retried = run_pacs(["tasks", "retry"], stack.env)  # a process: the command an operator runs
        assert retried.returncode == 0, retried.stderr
        assert int(retried.stdout.split()[0]) == len(failed)
        wait_until(lambda: _all_series_done(stack, series), timeout=90, what="retried series")
        _assert_each_series_made_once(stack, series)
        assert json.loads(invoke_pacs(["tasks", "failed", "--json"], stack.env).stdout) == []

