"""The one ingest service, against both configurations: SQLite + filesystem, PostgreSQL + real S3.

Faults are injected at each step of the order of writes (see pacs.ingest) to show that a
failure is reported as such and leaves nothing half-written.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacs.db import migrate
from pacs.db.engine import make_engine, make_session_factory
from pacs.db.models import AuditEvent, DerivedTask, Instance, InstanceVersion, Patient, Series, Study
from pacs.ingest import Ingestor, IngestSource, IngestStatus
from pacs.ingest import service as ingest_service
from pacs.ingest.parsing import RejectReason
from pacs.settings import DuplicatePolicy
from pacs.studies import tombstones
from pacs.studies.deletion import sweep_tombstones
from pacs.studies.tombstones import DeletedObject
from storage import ObjectStore, StorageUnavailable, open_store
from storage.keys import instance_key
from tests.support.datasets import make_dataset, make_instance, to_bytes

SOURCE = IngestSource("dimse", calling_ae="MODALITY1", address="127.0.0.1:5000")


@dataclass
class Backend:
    name: str
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore

    def ingestor(self, **kw) -> Ingestor:
        return Ingestor(self.sessions, self.store, **kw)

    def count(self, model: type) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(model)) or 0

    def objects(self, prefix: str = "dicom/") -> list[str]:
        return [o.key for o in self.store.list(prefix)]


@pytest.fixture(params=["embedded", pytest.param("scaled", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        url, store_url = f"sqlite:///{tmp_path / 'index.sqlite3'}", f"file://{tmp_path / 'objects'}"
    else:
        url, store_url = request.getfixturevalue("fresh_pg_url"), request.getfixturevalue("s3_url")
    engine = make_engine(url)
    migrate.upgrade(engine)
    yield Backend(request.param, engine, make_session_factory(engine), open_store(store_url))
    engine.dispose()


def test_store_then_identical_resend_is_one_instance(backend: Backend) -> None:
    data = make_instance()
    ingestor = backend.ingestor()
    first = ingestor.ingest(data, SOURCE)
    again = ingestor.ingest(data, SOURCE)
    assert first.status is IngestStatus.STORED and again.status is IngestStatus.DUPLICATE
    assert backend.count(Instance) == 1 and backend.count(InstanceVersion) == 0
    assert len(backend.objects()) == 1
    with backend.sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert backend.store.get_bytes(inst.object_key) == data  # exactly the bytes received
        assert inst.sha256 == first.sha256 and inst.size == len(data) and inst.source_ae == "MODALITY1"
        study = s.scalars(select(Study)).one()
        assert (study.number_of_instances, study.number_of_series, study.modalities_in_study) == (1, 1, "OT")
        kinds = sorted(s.scalars(select(DerivedTask.kind)))
        assert kinds == ["series-metadata", "thumbnail"]  # armed once, not twice


def test_resend_restores_an_object_missing_from_the_store(backend: Backend) -> None:
    """An indexed object lost from the store (bad disk, partial restore) is written back by a re-send."""
    data = make_instance()
    ingestor = backend.ingestor()
    ingestor.ingest(data, SOURCE)
    with backend.sessions() as s:
        key = s.scalars(select(Instance.object_key)).one()
    backend.store.delete(key)
    outcome = ingestor.ingest(data, SOURCE)
    assert outcome.status is IngestStatus.DUPLICATE and "restored" in outcome.message
    assert backend.store.get_bytes(key) == data
    with backend.sessions() as s:
        assert "instance.object-restored" in set(s.scalars(select(AuditEvent.action)))


def test_changed_content_keeps_both_versions(backend: Backend) -> None:
    ds = make_dataset()
    old = to_bytes(ds)
    ds.PatientName = "CORRECTED^NAME"
    new = to_bytes(ds)
    ingestor = backend.ingestor()
    assert ingestor.ingest(old, SOURCE).status is IngestStatus.STORED
    outcome = ingestor.ingest(new, SOURCE)
    assert outcome.status is IngestStatus.NEW_VERSION
    with backend.sessions() as s:
        current = s.scalars(select(Instance)).one()
        prior = s.scalars(select(InstanceVersion)).one()
        assert (current.version, prior.version) == (2, 1)
        assert backend.store.get_bytes(current.object_key) == new
        assert backend.store.get_bytes(prior.object_key) == old  # the old one stays retrievable
        assert s.scalars(select(Study)).one().number_of_instances == 1
        actions = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
        assert actions == ["instance.store", "instance.store-new-version"]
    assert len(backend.objects()) == 2


def test_previous_content_sent_again_becomes_current_again(backend: Backend) -> None:
    """A, then B, then A again (a modality resending an old copy): A is current, B is kept as prior."""
    ds = make_dataset()
    a = to_bytes(ds)
    ds.PatientName = "B^VERSION"
    b = to_bytes(ds)
    ingestor = backend.ingestor()
    statuses = [ingestor.ingest(x, SOURCE).status for x in (a, b, a)]
    assert statuses == [IngestStatus.STORED, IngestStatus.NEW_VERSION, IngestStatus.NEW_VERSION]
    with backend.sessions() as s:
        current = s.scalars(select(Instance)).one()
        assert backend.store.get_bytes(current.object_key) == a and current.version == 3
        assert s.scalar(select(func.count()).select_from(InstanceVersion)) == 2
        tasks = list(s.scalars(select(DerivedTask).where(DerivedTask.kind == "thumbnail")))
        assert len(tasks) == 2 and {t.state for t in tasks} == {"pending"}  # A re-armed, not duplicated
    assert len(backend.objects()) == 2  # content-addressed: A is stored once


@pytest.mark.parametrize(("policy", "status"), [(DuplicatePolicy.REJECT, IngestStatus.REJECTED),
                                                (DuplicatePolicy.KEEP_EXISTING, IngestStatus.KEPT_EXISTING)])
def test_other_duplicate_policies_keep_the_stored_object(backend: Backend, policy: DuplicatePolicy,
                                                         status: IngestStatus) -> None:
    ds = make_dataset()
    old = to_bytes(ds)
    ds.PatientName = "OTHER"
    ingestor = backend.ingestor(duplicate_policy=policy)
    ingestor.ingest(old, SOURCE)
    assert ingestor.ingest(to_bytes(ds), SOURCE).status is status
    with backend.sessions() as s:
        assert backend.store.get_bytes(s.scalars(select(Instance)).one().object_key) == old
    assert len(backend.objects()) == 1 and backend.count(InstanceVersion) == 0


@pytest.mark.parametrize("data", [
    make_instance(SOPInstanceUID="../../etc"),
    make_instance(StudyInstanceUID="1.2.3.abc"),
    make_instance()[:-50],
    b"<html>not dicom</html>" * 10,
], ids=["path-uid", "letters-uid", "truncated", "not-dicom"])
def test_bad_input_is_refused_and_writes_nothing(backend: Backend, data: bytes) -> None:
    outcome = backend.ingestor().ingest(data, SOURCE)
    assert outcome.status is IngestStatus.REJECTED and outcome.message
    assert backend.objects("") == [] and backend.count(Instance) == 0 and backend.count(Patient) == 0


class _FailingPuts:
    """Wraps a real store; every put fails as an unreachable server would (fault injection)."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def put(self, *args, **kwargs) -> None:
        raise StorageUnavailable("injected: object store unreachable")


def test_store_failure_is_reported_and_nothing_indexed(backend: Backend) -> None:
    ingestor = Ingestor(backend.sessions, _FailingPuts(backend.store))  # type: ignore[arg-type]
    outcome = ingestor.ingest(make_instance(), SOURCE)
    assert outcome.status is IngestStatus.STORAGE_UNAVAILABLE and not outcome.ok
    assert backend.count(Instance) == 0 and backend.count(Study) == 0 and backend.count(DerivedTask) == 0


class _FailCommits:
    """A ``before_commit`` listener failing the next ``times`` commits of a session factory (from when armed)."""

    def __init__(self, sessions: sessionmaker[Session], times: int = 1, armed: bool = True) -> None:
        self.sessions, self.left, self.armed = sessions, times, armed

    def __call__(self, session: Session) -> None:
        if self.armed and self.left > 0:
            self.left -= 1
            raise OperationalError("COMMIT", {}, Exception("injected: connection to the index lost"))

    def __enter__(self) -> _FailCommits:
        event.listen(self.sessions, "before_commit", self)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.sessions, "before_commit", self)


def _sweep(backend: Backend, hours: float) -> int:
    """The retention sweep's tombstone pass, ``hours`` from now."""
    ctx = SimpleNamespace(sessions=backend.sessions, read_sessions=backend.sessions, store=backend.store)
    return sweep_tombstones(ctx, now=datetime.now(UTC) + timedelta(hours=hours))  # type: ignore[arg-type]


def _pending_tombstones(backend: Backend) -> list[str]:
    with backend.sessions() as s:
        return list(s.scalars(select(DeletedObject.object_key).where(DeletedObject.state == tombstones.PENDING)))


def test_index_failure_at_commit_is_reported_and_the_object_removed_by_the_sweep(backend: Backend) -> None:
    with _FailCommits(backend.sessions):
        outcome = backend.ingestor().ingest(make_instance(), SOURCE)
    assert outcome.status is IngestStatus.INDEX_UNAVAILABLE
    assert backend.count(Instance) == 0 and backend.count(Study) == 0
    # the object written before the failed commit is left to the retention sweep, with a pending tombstone
    (key,) = backend.objects()
    assert _pending_tombstones(backend) == [key]
    assert _sweep(backend, hours=0.5) == 0  # not before an hour: another ingest of these bytes may still commit
    assert _sweep(backend, hours=2) == 1
    assert backend.objects() == [] and _pending_tombstones(backend) == []


def test_index_failure_leaves_the_object_that_another_ingest_of_the_same_bytes_committed(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A modality gives up on an association stuck behind the index and sends the object again on another: both
    ingests put the same content-addressed key; the second commits and is acknowledged, then the first fails. The
    first used to delete the key it had created, under the acknowledged instance."""
    data = make_instance()
    ingestor = backend.ingestor()
    failing = _FailCommits(backend.sessions, armed=False)
    second: list[IngestStatus] = []
    calls: list[int] = []
    real_fragment = ingest_service.make_fragment

    def fragment_then_the_resend(obj, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:  # the first ingest has put the object and not begun its transaction yet
            second.append(ingestor.ingest(data, SOURCE).status)  # (its own fragment: the second call)
            failing.armed = True  # the first ingest's commit fails
        return real_fragment(obj, **kwargs)

    monkeypatch.setattr(ingest_service, "make_fragment", fragment_then_the_resend)
    with failing:
        first = ingestor.ingest(data, SOURCE)
    assert second == [IngestStatus.STORED] and first.status is IngestStatus.INDEX_UNAVAILABLE
    with backend.sessions() as s:
        key = s.scalars(select(Instance.object_key)).one()
    assert backend.store.get_bytes(key) == data  # the acknowledged instance's object is there
    assert _sweep(backend, hours=2) == 0  # and stays: an index row names it
    assert backend.store.get_bytes(key) == data and _pending_tombstones(backend) == []


def test_index_failure_never_removes_an_object_that_was_already_there(backend: Backend) -> None:
    """A resend of a stored object whose index commit fails must not delete the stored bytes."""
    data = make_instance()
    ingestor = backend.ingestor()
    stored = ingestor.ingest(data, SOURCE)
    with backend.sessions() as s, s.begin():  # index lost this row (e.g. restored from an old backup)
        s.query(DerivedTask).delete()
        s.query(Instance).delete()

    with _FailCommits(backend.sessions):  # the index transaction's commit fails, later ones do not
        assert ingestor.ingest(data, SOURCE).status is IngestStatus.INDEX_UNAVAILABLE
    key = instance_key(stored.study_instance_uid, _series_of(backend), stored.sop_instance_uid, stored.sha256)
    assert backend.store.get_bytes(key) == data
    # nor later: no index row names it now, and it is what `pacs reindex` would recover the instance from
    assert _pending_tombstones(backend) == [] and _sweep(backend, hours=2) == 0
    assert backend.store.get_bytes(key) == data


def _series_of(backend: Backend) -> str:
    with backend.sessions() as s:
        return s.scalars(select(Series.series_instance_uid)).one()


def test_concurrent_associations_sending_one_study(backend: Backend) -> None:
    """Eight senders, one new study, two series: counts and rows come out exact."""
    study, series = make_dataset().StudyInstanceUID, [make_dataset().SeriesInstanceUID for _ in range(2)]
    payloads = [make_instance(StudyInstanceUID=study, SeriesInstanceUID=series[i % 2], InstanceNumber=i,
                              Modality=("CT", "MR")[i % 2]) for i in range(40)]
    ingestor = backend.ingestor()
    outcomes = []

    def send(chunk: list[bytes]) -> None:
        for data in chunk:
            outcomes.append(ingestor.ingest(data, SOURCE))
            outcomes.append(ingestor.ingest(data, SOURCE))  # every object twice

    threads = [threading.Thread(target=send, args=(payloads[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.ok for o in outcomes), [o.message for o in outcomes if not o.ok]
    with backend.sessions() as s:
        row = s.scalars(select(Study)).one()
        assert (row.number_of_instances, row.number_of_series) == (40, 2)
        assert sorted(row.modalities_in_study.split("\\")) == ["CT", "MR"]
        assert sorted(s.scalars(select(Series.number_of_instances))) == [20, 20]
        assert s.scalar(select(func.count()).select_from(Patient)) == 1
    assert backend.count(Instance) == 40 and len(backend.objects()) == 40


def test_rejection_reason_names_the_problem(backend: Backend) -> None:
    outcome = backend.ingestor().ingest(make_instance(SeriesInstanceUID="1.2.840.x"), SOURCE)
    assert outcome.reason is RejectReason.INVALID_UID
    assert "SeriesInstanceUID" in outcome.message
