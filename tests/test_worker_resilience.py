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
from pacs.db.models import DerivedTask, Instance
from tests.support.dcmtk import storescu
from tests.support.net import wait_until
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.redis_server import RedisServer
from tests.support.seaweed import SeaweedS3
from tests.support.stack import RABBITMQ_URL, ScaledStack

pytestmark = pytest.mark.integration


def _send_ct(stack: ScaledStack, tmp: Path, slices: int, size: int = 128) -> list[str]:
    files = write_ct_series(tmp, slices=slices, size=size)
    result = storescu(stack.port, files, "-xe")
    assert result.status == 0 and result.returncode == 0, result.output[-1500:]
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def _thumbnail_states(stack: ScaledStack, sops: list[str]) -> dict[str, int]:
    with stack.ctx.sessions() as s:
        rows = s.execute(select(DerivedTask.state, func.count()).where(
            DerivedTask.kind == "thumbnail", DerivedTask.subject_uid.in_(sops)).group_by(DerivedTask.state))
        return dict(rows.all())


def _all_thumbnails_done(stack: ScaledStack, sops: list[str]) -> bool:
    return _thumbnail_states(stack, sops).get("done", 0) == len(sops)


@contextmanager
def scaled_stack(root: Path, broker_url: str, s3: SeaweedS3, **settings: str) -> Iterator[ScaledStack]:
    """`pacs scp` on PostgreSQL, the S3 server and ``broker_url``; each test starts its workers."""
    with ScaledStack(root, s3.url_for(f"pacs-{uuid.uuid4().hex[:10]}"), broker_url=broker_url,
                     extra_env={"PACS_OUTBOX_POLL_S": "0.5", **settings}) as stack:
        stack.start_scp()
        yield stack


def _assert_each_thumbnail_made_once(stack: ScaledStack, sops: list[str]) -> None:
    with stack.ctx.sessions() as s:
        rows = s.execute(select(DerivedTask.subject_uid, DerivedTask.state).where(
            DerivedTask.kind == "thumbnail", DerivedTask.subject_uid.in_(sops))).all()
        keys = list(s.scalars(select(Instance.thumbnail_key).where(Instance.sop_instance_uid.in_(sops))))
    assert sorted(r.subject_uid for r in rows) == sorted(sops)  # one outbox row per instance
    assert {r.state for r in rows} == {"done"}
    assert len(keys) == len(sops) and all(keys) and len(set(keys)) == len(sops)
    assert all(stack.ctx.store.exists(k) for k in keys)


def test_worker_killed_mid_batch_then_restarted(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """SIGKILL the worker while it works through a study; a new worker finishes every thumbnail."""
    with scaled_stack(tmp_path, RABBITMQ_URL, s3_server) as stack:
        # the study is in before the worker starts: a quick worker kept pace with the sender and was done before
        # the test could kill it (a flake of a clean run on an idle machine)
        sops = _send_ct(stack, tmp_path / "ct", slices=60, size=256)
        worker = stack.start_worker(concurrency=1)
        wait_until(lambda: _thumbnail_states(stack, sops).get("done", 0) >= 3, timeout=60, what="first thumbnails")
        assert worker.proc is not None
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(timeout=10)
        done_at_kill = _thumbnail_states(stack, sops).get("done", 0)
        assert done_at_kill < len(sops), "the worker finished before it could be killed; use a larger study"
        stack.start_worker(concurrency=2)
        wait_until(lambda: _all_thumbnails_done(stack, sops), timeout=180, what="all thumbnails after restart")
        _assert_each_thumbnail_made_once(stack, sops)


def test_broker_outage_delays_derived_work_and_never_loses_it(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """Redis stopped while a study arrives: every C-STORE succeeds; after Redis is back, every
    thumbnail appears, each made once."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        with scaled_stack(tmp_path, redis.url, s3_server) as stack:
            stack.start_worker(concurrency=2)
            warmup = _send_ct(stack, tmp_path / "warm", slices=3, size=64)
            wait_until(lambda: _all_thumbnails_done(stack, warmup), timeout=60, what="warm-up thumbnails")
            redis.stop()
            sops = _send_ct(stack, tmp_path / "ct", slices=20, size=64)  # asserts every C-STORE succeeded
            assert _thumbnail_states(stack, sops).get("done", 0) == 0
            redis.start()
            # Celery reconnects with growing intervals after losing its broker: allow for that.
            wait_until(lambda: _all_thumbnails_done(stack, sops), timeout=240, what="thumbnails after outage")
            _assert_each_thumbnail_made_once(stack, sops)
            with stack.ctx.sessions() as s:
                attempts = set(s.scalars(select(DerivedTask.attempts).where(
                    DerivedTask.kind == "thumbnail", DerivedTask.subject_uid.in_(sops))))
            assert attempts == {1}  # each ran exactly once
    finally:
        redis.stop()


def test_failed_tasks_are_listed_and_retried(tmp_path: Path, s3_server: SeaweedS3) -> None:
    """The store is down while the worker runs: tasks fail after the configured attempts, show up in
    `pacs tasks failed`, and `pacs tasks retry` completes them once the store is back."""
    with scaled_stack(tmp_path, RABBITMQ_URL, s3_server, PACS_TASK_MAX_ATTEMPTS="2") as stack:
        sops = _send_ct(stack, tmp_path / "ct", slices=4, size=64)
        s3_server.stop()
        try:
            stack.start_worker(concurrency=2)
            wait_until(lambda: _thumbnail_states(stack, sops).get("failed", 0) == len(sops), timeout=90,
                       what="tasks to fail")
            listed = json.loads(run_pacs(["tasks", "failed", "--json"], stack.env).stdout)
            thumbnails = [t for t in listed if t["kind"] == "thumbnail"]
            assert sorted(t["subject_uid"] for t in thumbnails) == sorted(sops)
            assert all(t["attempts"] == 2 and "gave up" in t["last_error"] for t in thumbnails)
        finally:
            s3_server.start()
        retried = run_pacs(["tasks", "retry"], stack.env)  # a process: the command an operator runs
        assert retried.returncode == 0, retried.stderr
        # The series-level task may fail after the listing above; every failed task is retried.
        assert int(retried.stdout.split()[0]) >= len(thumbnails)
        wait_until(lambda: _all_thumbnails_done(stack, sops), timeout=90, what="retried thumbnails")
        assert json.loads(invoke_pacs(["tasks", "failed", "--json"], stack.env).stdout) == []
