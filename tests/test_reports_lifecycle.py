"""The report lifecycle and the reading list (pacs.reports) on SQLite and PostgreSQL, with real ingest.

Two facilities; radiologists of each; orders that the images link to. What a radiologist relies on:
a draft only its author edits, signed text never changes, an amendment is a new version with a reason,
claims keep two radiologists off one study, the reading list is STAT first and scoped, and every change
is in the audit trail.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs import audit
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent, DerivedTask
from pacs.errors import Conflict, InvalidInput, NotFound
from pacs.ingest import Ingestor, IngestSource
from pacs.reports import lifecycle
from pacs.reports.reading_list import UNCLAIMED, ReadingFilters, reading_list
from pacs.ris.orders import NewOrder, create_order, get_order, link_study
from pacs.security.access import Forbidden, share_study
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.settings import Settings
from tests.support.datasets import make_instance


def principal(name: str, role: Role, facility: str = "") -> Principal:
    return Principal(subject=name, role=role, capabilities=capabilities_of(role), scope=scope_for(role, facility),
                     facility=facility, source_address="127.0.0.1:1")


RAD_A = principal("rad-a", Role.RADIOLOGIST, "A")
RAD_A2 = principal("rad-a2", Role.RADIOLOGIST, "A")
RAD_B = principal("rad-b", Role.RADIOLOGIST, "B")
CLIN_A = principal("clin-a", Role.CLINICIAN, "A")
ADMIN = principal("admin", Role.ADMIN)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def archive(request: pytest.FixtureRequest, tmp_path):
    if request.param == "sqlite":
        settings = Settings(data_dir=tmp_path / "data")
    else:
        settings = Settings(data_dir=tmp_path / "data", database_url=request.getfixturevalue("fresh_pg_url"))
    ctx = AppContext.create(settings)
    migrate.upgrade(ctx.engine)
    yield ctx, Ingestor(ctx.sessions, ctx.store)
    ctx.close()


def _study(ingestor: Ingestor, facility: str, patient: str, accession: str = "", modality: str = "CT",
           date: str = "20261201") -> str:
    study, series = generate_uid(), generate_uid()
    outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID=patient,
                                            PatientName="Nguyễn^Văn An", AccessionNumber=accession,
                                            Modality=modality, StudyDate=date),
                              IngestSource("stow", user="test", facility=facility))
    assert outcome.ok, outcome.message
    return study


def _order(ctx: AppContext, patient: str, accession: str, priority: str, facility: str = "A") -> None:
    with ctx.sessions() as session, session.begin():
        create_order(session, NewOrder(patient_id=patient, patient_name="Nguyễn^Văn An", modality="CT",
                                       station_ae_title="", start_date="20261201", start_time="",
                                       procedure_description="CT ngực", accession_number=accession,
                                       priority=priority, facility=facility, source="api"))


def _link(ctx: AppContext, study: str, accession: str, patient: str) -> None:
    with ctx.sessions() as session, session.begin():
        assert link_study(session, study, accession, patient, "CT", "20261201") is not None


def _in_tx(ctx: AppContext, fn, *args, **kwargs):
    with ctx.sessions() as session, session.begin():
        return fn(session, *args, **kwargs)


def test_lifecycle_draft_preliminary_final_amended_keeps_every_version(archive) -> None:
    ctx, ingestor = archive
    study = _study(ingestor, "A", "P1")
    draft = _in_tx(ctx, lifecycle.create_draft, RAD_A, study, "Gan <b>bình</b> thường.", "Không có gì.", "vi")
    assert (draft.status, draft.version) == ("draft", 1)
    edited = _in_tx(ctx, lifecycle.edit, RAD_A, draft.id, "Gan lách bình thường.\nKhông dịch.", "Bình thường.")
    assert edited.findings == "Gan lách bình thường.\nKhông dịch."
    with pytest.raises(Forbidden):  # another radiologist may not edit the author's draft
        _in_tx(ctx, lifecycle.edit, RAD_A2, draft.id, "x", "y")
    assert _in_tx(ctx, lifecycle.make_preliminary, RAD_A, draft.id).status == "preliminary"
    with pytest.raises(Forbidden):  # a clinician cannot sign
        _in_tx(ctx, lifecycle.sign, CLIN_A, draft.id)
    signed = _in_tx(ctx, lifecycle.sign, RAD_A, draft.id)
    assert signed.status == "final" and signed.current.signed_by == "rad-a" and signed.current.signed_at
    for attempt in (lambda s: lifecycle.edit(s, RAD_A, draft.id, "changed", "changed"),
                    lambda s: lifecycle.sign(s, RAD_A, draft.id),
                    lambda s: lifecycle.make_preliminary(s, RAD_A, draft.id)):
        with pytest.raises(Conflict):  # nobody changes a final version
            _in_tx(ctx, attempt)
    with pytest.raises(InvalidInput):
        _in_tx(ctx, lifecycle.amend, RAD_A, draft.id, "  ", "a", "b")
    amended = _in_tx(ctx, lifecycle.amend, RAD_A2, draft.id, "Sai bên", "Gan to nhẹ.", "Gan to.")
    assert (amended.status, amended.version) == ("final", 2)  # what was signed still counts
    with pytest.raises(Conflict):  # one amendment at a time
        _in_tx(ctx, lifecycle.amend, RAD_A, draft.id, "again", "a", "b")
    final = _in_tx(ctx, lifecycle.sign, RAD_A2, draft.id)
    assert final.status == "amended"
    assert [(v.version, v.status, v.findings) for v in final.versions] == [
        (1, "final", "Gan lách bình thường.\nKhông dịch."), (2, "amended", "Gan to nhẹ.")]
    assert final.versions[1].amend_reason == "Sai bên"
    with ctx.read_sessions() as session:
        tasks = session.scalars(select(DerivedTask.subject_uid).where(DerivedTask.kind == "report-sr")).all()
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.study_instance_uid == study,
                                                                  AuditEvent.action.like("report.%"))
                                  .order_by(AuditEvent.id)).all()
        doc = lifecycle.report_document(session, draft.id, 2)
    assert sorted(tasks) == [f"{draft.id}.1", f"{draft.id}.2"]  # one SR per signed version
    assert actions == ["report.create", "report.edit", "report.preliminary", "report.sign", "report.amend",
                       "report.sign"]
    assert (doc.status, doc.patient_name, doc.amend_reason, doc.signed_by) == (
        "amended", "Nguyễn^Văn An", "Sai bên", "rad-a2")
    assert audit.verify(ctx.read_sessions)[1] == []


def test_scope_claims_and_refusals(archive) -> None:
    ctx, ingestor = archive
    study_a = _study(ingestor, "A", "P1")
    with pytest.raises(NotFound):  # facility B cannot see, let alone report, A's study
        _in_tx(ctx, lifecycle.create_draft, RAD_B, study_a, "x", "y")
    with pytest.raises(NotFound):
        _in_tx(ctx, lifecycle.claim, RAD_B, study_a)
    _in_tx(ctx, lifecycle.claim, RAD_A, study_a)
    _in_tx(ctx, lifecycle.claim, RAD_A, study_a)  # claiming again is harmless
    with pytest.raises(Conflict):
        _in_tx(ctx, lifecycle.claim, RAD_A2, study_a)
    with pytest.raises(Conflict):  # nor can A2 start a report on A's claimed study
        _in_tx(ctx, lifecycle.create_draft, RAD_A2, study_a, "x", "y")
    with pytest.raises(Forbidden):  # only the holder (or an admin) releases
        _in_tx(ctx, lifecycle.release, RAD_A2, study_a)
    _in_tx(ctx, lifecycle.release, ADMIN, study_a)
    report = _in_tx(ctx, lifecycle.create_draft, RAD_A2, study_a, "x", "y")
    with ctx.sessions() as session, session.begin():  # shared with B: now B's radiologist can read it
        share_study(session, study_a, "B", "admin")
    with ctx.read_sessions() as session:
        assert lifecycle.get_report(session, RAD_B.scope, report.id).id == report.id
        with pytest.raises(NotFound):
            lifecycle.get_report(session, scope_for(Role.RADIOLOGIST, "C"), report.id)


def test_reading_list_is_stat_first_scoped_filtered_and_shows_priors(archive) -> None:
    ctx, ingestor = archive
    routine = _study(ingestor, "A", "P1", "ACC-R")
    stat = _study(ingestor, "A", "P2", "ACC-S")
    urgent = _study(ingestor, "A", "P3", "ACC-U", modality="MR", date="20261130")
    no_order = _study(ingestor, "A", "P1", "", date="20250101")  # a prior of P1's routine study
    other = _study(ingestor, "B", "P9")
    for accession, priority, study, patient in (("ACC-R", "ROUTINE", routine, "P1"), ("ACC-S", "STAT", stat, "P2"),
                                                ("ACC-U", "URGENT", urgent, "P3")):
        _order(ctx, patient, accession, priority)
        _link(ctx, study, accession, patient)
    with ctx.read_sessions() as session:
        assert get_order(session, "ACC-S").state == "in-progress"  # images arrived
        items, total = reading_list(session, RAD_A.scope)
    assert [i.study_instance_uid for i in items] == [stat, urgent, routine, no_order]
    assert total == 4 and [i.priority for i in items] == ["STAT", "URGENT", "ROUTINE", "ROUTINE"]
    assert other not in {i.study_instance_uid for i in items}  # facility B's study is not on A's list
    routine_item = items[2]
    assert [p.study_instance_uid for p in routine_item.priors] == [no_order]
    assert routine_item.procedure == "CT ngực" and routine_item.patient_name == "Nguyễn^Văn An"
    assert routine_item.waiting_s >= 0

    _in_tx(ctx, lifecycle.claim, RAD_A, stat)
    report = _in_tx(ctx, lifecycle.create_draft, RAD_A, urgent, "f", "i")
    with ctx.read_sessions() as session:
        def uids(**filters: str) -> list[str]:
            return [i.study_instance_uid for i in reading_list(session, RAD_A.scope, ReadingFilters(**filters))[0]]

        assert uids(modality="MR") == [urgent]
        assert uids(priority="stat") == [stat]
        assert uids(assigned="rad-a") == [stat, urgent]  # the draft claimed it for its author
        assert uids(assigned=UNCLAIMED) == [routine, no_order]
        assert uids(date_from="20261130", date_to="2026-11-30") == [urgent]
        assert uids(facility="B") == []
        with pytest.raises(InvalidInput):
            uids(priority="urgentest")
        page, total = reading_list(session, RAD_A.scope, limit=2, offset=1)
        assert [i.study_instance_uid for i in page] == [urgent, routine] and total == 4
        assert reading_list(session, RAD_A.scope)[0][1].report_status == "draft"
        admin_items, _ = reading_list(session, ADMIN.scope)
        assert other in {i.study_instance_uid for i in admin_items}
    _in_tx(ctx, lifecycle.sign, RAD_A, report.id)
    with ctx.read_sessions() as session:  # signed: off the list, and its claim released
        items, total = reading_list(session, RAD_A.scope)
        assert urgent not in {i.study_instance_uid for i in items} and total == 3
        later = datetime.now(UTC) + timedelta(hours=1)
        assert reading_list(session, RAD_A.scope, now=later)[0][0].waiting_s >= 3600
    with ctx.read_sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "study.claim")) == 1


def test_images_link_only_to_an_order_of_the_same_patient_and_facility(archive) -> None:
    ctx, ingestor = archive
    _order(ctx, "P1", "ACC-X", "STAT", facility="A")
    study = _study(ingestor, "A", "P1", "ACC-X")
    with ctx.sessions() as session, session.begin():
        # the same accession number typed at another hospital, or for another patient: not this order
        assert link_study(session, generate_uid(), "ACC-X", "P1", "CT", "20261201", "B") is None
        assert link_study(session, generate_uid(), "ACC-X", "P9", "CT", "20261201", "A") is None
        linked = link_study(session, study, "ACC-X", "P1", "CT", "20261201", "A")
        assert linked is not None and linked.linked_study_instance_uid == study and linked.state == "in-progress"


def test_reading_list_modality_filter_matches_one_of_several_modalities(archive) -> None:
    ctx, ingestor = archive
    study = _study(ingestor, "A", "P1", modality="MR")
    outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=generate_uid(),
                                            PatientID="P1", PatientName="Nguyễn^Văn An", Modality="CT",
                                            StudyDate="20261201"),
                              IngestSource("stow", user="test", facility="A"))
    assert outcome.ok
    ct_only = _study(ingestor, "A", "P2", modality="CTX")  # a longer code that merely starts with CT
    with ctx.read_sessions() as session:
        def uids(modality: str) -> list[str]:
            return [i.study_instance_uid for i in reading_list(session, RAD_A.scope,
                                                               ReadingFilters(modality=modality))[0]]

        assert uids("CT") == [study] and uids("MR") == [study] and uids("CTX") == [ct_only]


def test_a_signed_report_is_queued_only_for_the_emrs_of_its_facility(tmp_path) -> None:
    from pacs.reports import service
    from pacs.reports.models import Hl7Outbound

    settings = Settings(data_dir=tmp_path / "data", hl7_port=0,
                        hl7_destinations={"emr-a": "127.0.0.1:2575", "emr-b": "127.0.0.1:2576",
                                          "province": "127.0.0.1:2577"},
                        hl7_destination_facilities={"emr-a": ["A"], "emr-b": ["B"]})
    ctx = AppContext.create(settings)
    try:
        migrate.upgrade(ctx.engine)
        study = _study(Ingestor(ctx.sessions, ctx.store), "A", "P1")
        report = service.create_draft(ctx, RAD_A, study, "Gan lách bình thường.", "Bình thường.")
        service.sign(ctx, RAD_A, report.id)
        with ctx.read_sessions() as session:
            queued = sorted(session.scalars(select(Hl7Outbound.destination)))
        assert queued == ["emr-a", "province"]  # never hospital B's EMR
    finally:
        ctx.close()
