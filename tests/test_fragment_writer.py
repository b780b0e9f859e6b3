"""New instances' fragments put after the answer (pacs.ingest.fragment_writer, issue 13).

What the sender relies on is unchanged: the answer comes once the object is durable and indexed. What readers rely
on: the fragment arrives right after, of the answered content; put after a newer version committed, that version's
work is armed again; put after the instance was deleted, it is deleted again; a full queue puts it before the
answer instead; a process stopping waits for what is queued.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacs.db import migrate
from pacs.db.engine import make_engine, make_session_factory
from pacs.db.models import DerivedTask, Instance
from pacs.derived.kinds import INSTANCE_DERIVED_KIND
from pacs.ingest import Ingestor, IngestSource, IngestStatus
from pacs.ingest.fragment_writer import FragmentWriter
from pacs.jobs import JobState
from storage.filesystem import FilesystemStore
from storage.keys import instance_metadata_key
from tests.support.datasets import make_dataset, to_bytes

SOURCE = IngestSource("dimse", calling_ae="MODALITY1", address="127.0.0.1:5000")


class HeldFragments(FilesystemStore):
    """A filesystem store whose fragment puts wait until ``release`` is set (the writer's thread is slow)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.waiting = threading.Event()

    def put(self, key: str, data: Any, length: int | None = None, content_type: str = "application/octet-stream",
            *, durable: bool = True) -> None:
        if key.startswith("derived/metadata/"):
            self.waiting.set()
            assert self.release.wait(30), "the test never released the fragment put"
        super().put(key, data, length, content_type, durable=durable)


@pytest.fixture()
def archive(tmp_path: Path) -> Iterator[tuple[sessionmaker[Session], HeldFragments]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate.upgrade(engine)
    yield make_session_factory(engine), HeldFragments(tmp_path / "objects")
    engine.dispose()


def _fragment_key(ds: Any) -> str:
    return instance_metadata_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_the_answer_does_not_wait_for_the_fragment(archive: tuple[sessionmaker[Session], HeldFragments]) -> None:
    sessions, store = archive
    writer = FragmentWriter()
    ds = make_dataset(PatientID="FRAG-1")
    outcome = Ingestor(sessions, store, fragment_writer=writer).ingest(to_bytes(ds), SOURCE)
    assert outcome.status is IngestStatus.STORED  # answered while the fragment's put is held
    assert store.waiting.wait(10) and not store.exists(_fragment_key(ds))
    with sessions() as session:  # the object and its row are there before the answer, as ever
        key = session.scalars(select(Instance.object_key)).one()
    assert store.exists(key)
    store.release.set()
    assert writer.drain(10)
    fragment = json.loads(store.get_bytes(_fragment_key(ds)))
    assert fragment["00080018"]["Value"] == [ds.SOPInstanceUID] and fragment["00100020"]["Value"] == ["FRAG-1"]


def test_without_a_writer_the_fragment_is_there_before_the_answer(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    migrate.upgrade(engine)
    store = FilesystemStore(tmp_path / "objects")
    ds = make_dataset()
    assert Ingestor(make_session_factory(engine), store).ingest(to_bytes(ds), SOURCE).status is IngestStatus.STORED
    assert store.exists(_fragment_key(ds))
    engine.dispose()


def test_a_fragment_put_after_the_instance_was_deleted_is_deleted_again(
    archive: tuple[sessionmaker[Session], HeldFragments]
) -> None:
    sessions, store = archive
    writer = FragmentWriter()
    ds = make_dataset()
    assert Ingestor(sessions, store, fragment_writer=writer).ingest(to_bytes(ds), SOURCE).status is IngestStatus.STORED
    assert store.waiting.wait(10)
    with sessions() as session, session.begin():  # a deletion's index commit, while the put is held
        session.execute(delete(Instance))
    store.release.set()
    assert writer.drain(10)
    assert not store.exists(_fragment_key(ds))


def test_a_fragment_put_after_a_newer_version_arms_that_version_again(
    archive: tuple[sessionmaker[Session], HeldFragments]
) -> None:
    sessions, store = archive
    writer = FragmentWriter()
    ingestor = Ingestor(sessions, store, fragment_writer=writer)
    first = make_dataset(PatientID="V1")
    assert ingestor.ingest(to_bytes(first), SOURCE).status is IngestStatus.STORED
    assert store.waiting.wait(10)
    second = make_dataset(PatientID="V1", SOPInstanceUID=first.SOPInstanceUID, StudyInstanceUID=first.StudyInstanceUID,
                          SeriesInstanceUID=first.SeriesInstanceUID, SeriesDescription="corrected")
    newer = Ingestor(sessions, store).ingest(to_bytes(second), SOURCE)  # no writer: its own work is armed
    assert newer.status is IngestStatus.NEW_VERSION
    done = (DerivedTask.kind == INSTANCE_DERIVED_KIND, DerivedTask.subject_uid == first.SOPInstanceUID,
            DerivedTask.sha256 == newer.sha256)
    with sessions() as session, session.begin():  # a worker wrote the newer version's fragment already
        session.execute(update(DerivedTask).where(*done).values(state=JobState.DONE))
    store.release.set()  # then the first version's fragment lands over it
    assert writer.drain(10)
    with sessions() as session:
        assert session.scalar(select(DerivedTask.state).where(*done)) == JobState.PENDING  # written again


def test_a_full_queue_puts_the_fragment_before_the_answer(
    archive: tuple[sessionmaker[Session], HeldFragments]
) -> None:
    sessions, store = archive
    writer = FragmentWriter(capacity=1)
    ingestor = Ingestor(sessions, store, fragment_writer=writer)
    held = make_dataset()
    assert ingestor.ingest(to_bytes(held), SOURCE).status is IngestStatus.STORED
    assert store.waiting.wait(10)  # the writer's thread is busy with it: the queue is empty again
    queued = make_dataset(StudyInstanceUID=held.StudyInstanceUID, SeriesInstanceUID=held.SeriesInstanceUID)
    assert ingestor.ingest(to_bytes(queued), SOURCE).status is IngestStatus.STORED  # queued: the queue is full now
    inline = make_dataset(StudyInstanceUID=held.StudyInstanceUID, SeriesInstanceUID=held.SeriesInstanceUID)
    answered = threading.Event()

    def third() -> None:
        assert ingestor.ingest(to_bytes(inline), SOURCE).status is IngestStatus.STORED
        answered.set()

    sender = threading.Thread(target=third)
    sender.start()
    assert not answered.wait(0.5)  # its fragment is put by the sender itself, held like the others
    store.release.set()
    sender.join(10)
    assert answered.is_set() and store.exists(_fragment_key(inline))
    assert writer.drain(10)
    assert all(store.exists(_fragment_key(ds)) for ds in (held, queued, inline))


def test_the_writer_outlives_a_failing_job_and_drain_waits_for_the_queue() -> None:
    writer = FragmentWriter()
    ran: list[str] = []
    gate = threading.Event()

    def failing() -> None:
        raise RuntimeError("a store that went away")

    writer.submit(failing)
    writer.submit(lambda: (gate.wait(10), ran.append("slow")))
    writer.submit(lambda: ran.append("last"))
    assert not writer.drain(0.2)  # still queued: says so
    gate.set()
    assert writer.drain(10) and ran == ["slow", "last"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_process_gets_a_writer_thread_of_its_own(tmp_path: Path) -> None:
    """The receiving processes are forked from `pacs serve`: a writer used before the fork has no thread in the
    child, which must start its own (and drain it) rather than queue into a queue nobody reads."""
    writer = FragmentWriter()
    writer.submit(lambda: None)
    assert writer.drain(10)
    marker = tmp_path / "child"
    pid = os.fork()
    if pid == 0:  # the child: exit without running the parent's test machinery
        code = 1
        try:
            writer.submit(lambda: marker.write_text("put"))
            code = 0 if writer.drain(10) and marker.read_text() == "put" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
