"""The index transaction's per-object statements (issue 13), end to end on SQLite and PostgreSQL: what the one-
statement snapshot reads decides as the separate reads did, nothing about a study is remembered between two
objects, every stored object has its chained audit row, and the outbox rows are armed once per version."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from pacs import audit
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent, DerivedTask, Instance, Series, Study
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.ingest import Ingestor, IngestSource, IngestStatus
from pacs.ingest.index_writer import index_instance
from pacs.ingest.parsing import parse_received
from pacs.jobs import JobState
from pacs.reports.models import StudyClaim
from pacs.settings import Settings
from tests.support.datasets import make_instance


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[AppContext, Ingestor]]:
    url = "" if request.param == "sqlite" else request.getfixturevalue("fresh_pg_url")
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", database_url=url))
    migrate.upgrade(ctx.engine)
    yield ctx, Ingestor(ctx.sessions, ctx.store, read_sessions=ctx.read_sessions)
    ctx.close()


def test_a_studys_owner_changed_between_two_objects_of_one_series_is_read_again(archive) -> None:
    """The second object of a series is decided on the study as it is now, not as the first object found it."""
    ctx, ingestor = archive
    study, series = generate_uid(), generate_uid()
    sender = IngestSource("dimse", calling_ae="CT_A", facility="A")
    first = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P1"), sender)
    assert first.status is IngestStatus.STORED, first.message
    with ctx.sessions() as session, session.begin():  # e.g. the study moved to facility B meanwhile
        session.execute(update(Study).where(Study.study_instance_uid == study).values(facility="B"))
    second = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P1"), sender)
    assert second.status is IngestStatus.HELD
    with ctx.read_sessions() as session:
        assert session.scalar(select(Study.number_of_instances).where(Study.study_instance_uid == study)) == 1


def test_a_provisional_study_someone_claimed_for_reading_is_not_claimed_by_an_exam(archive) -> None:
    """Read in the same statement as the owner: a reading claim makes a provisional study an ordinary one."""
    ctx, ingestor = archive
    study = generate_uid()
    rogue = IngestSource("dimse", calling_ae="ROGUE", trusted=False)
    assert ingestor.ingest(make_instance(StudyInstanceUID=study, PatientID="P1"), rogue).ok
    with ctx.sessions() as session, session.begin():
        session.add(StudyClaim(study_instance_uid=study, claimed_by="token:rad"))
    outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, PatientID="P1"),
                              IngestSource("dimse", calling_ae="MODA", facility="A"))
    assert outcome.status is IngestStatus.STORED  # added to the study (no facility), not claimed
    with ctx.read_sessions() as session:
        assert session.execute(select(Study.provisional, Study.number_of_instances)
                               .where(Study.study_instance_uid == study)).one() == (True, 2)


def test_every_stored_object_has_its_chained_audit_row_and_the_chain_verifies(archive) -> None:
    ctx, ingestor = archive
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    sender = IngestSource("dimse", calling_ae="CT_A", address="10.0.0.7")
    for sop in sops:
        assert ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                             PatientID="P1"), sender).ok
    with ctx.read_sessions() as session:
        rows = session.execute(select(AuditEvent.actor, AuditEvent.role, AuditEvent.source_address,
                                      AuditEvent.patient_id, AuditEvent.study_instance_uid, AuditEvent.detail)
                               .where(AuditEvent.action == "instance.store").order_by(AuditEvent.id)).all()
    assert [row[:5] for row in rows] == [("CT_A", "modality", "10.0.0.7", "P1", study)] * 3
    assert [row.detail.split()[1] for row in rows] == [f"sop={sop}" for sop in sops]
    checked, problems, _last = audit.verify(ctx.sessions)
    assert (checked, problems) == (3, [])


def test_outbox_rows_are_one_per_version_and_one_per_series(archive) -> None:
    """A new instance's row is recorded done (its fragment made at ingest); its series' row is armed once and
    handed to the relay only when newly armed; a new version of an instance gets a row of its own, pending."""
    ctx, ingestor = archive
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    sender = IngestSource("dimse", calling_ae="CT_A")
    first = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                          PatientID="P1"), sender)
    second = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P1"), sender)
    newer = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                          PatientID="P1", PatientName="CHANGED^NAME"), sender)
    assert (first.status, second.status, newer.status) == (IngestStatus.STORED, IngestStatus.STORED,
                                                          IngestStatus.NEW_VERSION)
    with ctx.read_sessions() as session:
        tasks = session.execute(select(DerivedTask.id, DerivedTask.kind, DerivedTask.subject_uid, DerivedTask.sha256,
                                       DerivedTask.state).order_by(DerivedTask.id)).all()
    series_rows = [t for t in tasks if t.kind == SERIES_METADATA_KIND]
    assert [(t.subject_uid, t.sha256) for t in series_rows] == [(series, "")]
    assert first.derived_task_ids == (series_rows[0].id,)
    assert second.derived_task_ids == ()  # the series row was still pending: the relay's sweep publishes it
    mine = [(t.sha256, t.state) for t in tasks if t.kind == INSTANCE_DERIVED_KIND and t.subject_uid == sop]
    assert mine == [(first.sha256, JobState.DONE), (newer.sha256, JobState.PENDING)]
    assert set(newer.derived_task_ids) == {t.id for t in tasks if t.sha256 == newer.sha256}


def test_an_object_naming_a_series_of_another_study_still_gets_its_study_row(archive) -> None:
    """index_instance without the policy (pacs reindex): the object's study is created as before when its series
    is known under another study; a series known under its own study needs no study lookup."""
    ctx, ingestor = archive
    study, other, series = generate_uid(), generate_uid(), generate_uid()
    assert ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID="P1"),
                           IngestSource("import")).ok
    stray = parse_received(make_instance(StudyInstanceUID=other, SeriesInstanceUID=series, PatientID="P1"),
                           max_bytes=1 << 24)
    with ctx.sessions() as session, session.begin():
        index_instance(session, stray, object_key="k", sha256="0" * 64, received_at=datetime.now(UTC), source="import",
                       source_ae="", source_address="", replaces=None)
    with ctx.read_sessions() as session:
        counts = dict(session.execute(select(Study.study_instance_uid, Study.number_of_instances)).all())
        series_study = session.scalar(select(Study.study_instance_uid).join(Series, Series.study_fk == Study.id)
                                      .where(Series.series_instance_uid == series))
        placed = session.scalar(select(func.count()).select_from(Instance).where(Instance.series_fk == Series.id,
                                                                                 Series.series_instance_uid == series))
    assert counts == {study: 2, other: 0}
    assert (series_study, placed) == (study, 2)


def test_the_snapshot_rows_fields_follow_its_columns() -> None:
    """The ownership snapshot is read on the driver's cursor as a plain tuple: its named fields must name the
    statement's columns in order (pacs.ingest.ownership)."""
    from pacs.ingest import ownership

    assert ownership._Row._fields == tuple(column.name for column in ownership._SNAPSHOT.selected_columns)
