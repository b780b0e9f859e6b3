"""Ingest's post-commit work after the answer (pacs.ingest.after_commit): in order, bounded, drained at shutdown,
and with an Ingestor: the fragment put before its series' work is woken, nothing of the object held."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import delete

from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import Instance
from pacs.ingest import Ingestor, IngestSource
from pacs.ingest.after_commit import AfterCommit
from pacs.settings import Settings
from storage.keys import instance_metadata_key
from tests.support.datasets import make_dataset, to_bytes

SOURCE = IngestSource("dimse", calling_ae="MOD", address="127.0.0.1:5000")


def test_jobs_run_in_the_order_submitted_on_one_other_thread() -> None:
    queue = AfterCommit()
    ran: list[tuple[int, str]] = []
    def job(i: int) -> None:
        ran.append((i, threading.current_thread().name))

    for i in range(50):
        queue.submit(partial(job, i), size=10)
    assert queue.flush(10)
    assert [i for i, _ in ran] == list(range(50))
    assert {name for _, name in ran} == {"ingest-after-commit"}
    assert queue.pending == 0
    assert queue.close(10)


def test_a_job_over_a_bound_runs_at_once_on_the_caller_s_thread() -> None:
    queue = AfterCommit(max_jobs=1, max_bytes=100)
    started, release = threading.Event(), threading.Event()
    where: dict[str, str] = {}

    def hold() -> None:
        started.set()
        release.wait(10)

    queue.submit(hold)
    assert started.wait(10)  # the thread is busy with it: the queue itself is empty
    queue.submit(lambda: where.setdefault("queued", threading.current_thread().name), size=60)
    queue.submit(lambda: where.setdefault("bytes", threading.current_thread().name), size=60)  # 120 > 100 bytes
    assert where == {"bytes": threading.current_thread().name}
    queue.submit(lambda: where.setdefault("count", threading.current_thread().name))  # 1 job queued already
    assert where["count"] == threading.current_thread().name
    release.set()
    assert queue.flush(10)
    assert where["queued"] == "ingest-after-commit"
    queue.close(10)


def test_close_runs_what_is_queued_then_every_later_job_inline() -> None:
    queue = AfterCommit()
    gate = threading.Event()
    ran: list[str] = []
    queue.submit(gate.wait)
    queue.submit(lambda: ran.append("queued"))
    closer = threading.Thread(target=queue.close, args=(10,))
    closer.start()
    gate.set()
    closer.join(10)
    assert ran == ["queued"]
    queue.submit(lambda: ran.append(threading.current_thread().name))
    assert ran == ["queued", threading.current_thread().name]


def test_a_failing_job_is_logged_and_the_next_ones_still_run(caplog: pytest.LogCaptureFixture) -> None:
    queue = AfterCommit()
    ran: list[int] = []

    def fail() -> None:
        raise RuntimeError("boom")

    queue.submit(fail)
    queue.submit(lambda: ran.append(1))
    assert queue.flush(10)
    assert ran == [1]
    assert "post-commit ingest job failed" in caplog.text
    queue.close(10)


@pytest.fixture()
def local(tmp_path: Path) -> Iterator[AppContext]:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    migrate.upgrade(ctx.engine)
    yield ctx
    ctx.close()


def test_ingest_answers_then_puts_the_fragment_before_waking_the_derived_work(local: AppContext) -> None:
    """The woken derived work (the series document) must find the instance's fragment: it is put first."""
    seen_at_wake: list[bool] = []
    ds = make_dataset()
    key = instance_metadata_key(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))

    def notify(task_ids: Iterable[int]) -> None:
        assert list(task_ids)
        seen_at_wake.append(local.store.exists(key))

    ingestor = Ingestor(local.sessions, local.store, notify=notify, after_commit=AfterCommit())
    outcome = ingestor.ingest(to_bytes(ds), SOURCE)
    assert outcome.ok
    assert ingestor.flush(10)
    assert seen_at_wake == [True]
    assert b'"00080018"' in local.store.get_bytes(key)  # the instance's own DICOM JSON
    ingestor.close()
    # closed: step 5 inline again, done when ingest returns
    second = make_dataset()  # another study: its series' work is woken too
    assert ingestor.ingest(to_bytes(second), SOURCE).ok
    assert local.store.exists(instance_metadata_key(str(second.StudyInstanceUID), str(second.SeriesInstanceUID),
                                                    str(second.SOPInstanceUID)))
    assert seen_at_wake == [True, True]


def test_a_queued_fragment_of_an_instance_deleted_meanwhile_is_not_left_behind(local: AppContext) -> None:
    """The version check after the put still runs on the queue's thread: a fragment whose instance is gone goes."""
    gate = threading.Event()
    queue = AfterCommit()
    ingestor = Ingestor(local.sessions, local.store, after_commit=queue)
    queue.submit(gate.wait)  # the fragment's put waits behind this
    ds = make_dataset()
    assert ingestor.ingest(to_bytes(ds), SOURCE).ok
    with local.sessions() as session, session.begin():
        session.execute(delete(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID)))
    gate.set()
    assert ingestor.flush(10)
    assert not local.store.exists(instance_metadata_key(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                                        str(ds.SOPInstanceUID)))
    ingestor.close()
