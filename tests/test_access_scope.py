"""Access scopes in the query engine (pacs.security.access.study_condition): which studies a
facility user, a patient token or a share link can find, at every level, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from pacs.context import AppContext
from pacs.db import migrate
from pacs.ingest import Ingestor, IngestSource
from pacs.query.engine import Query, QueryEngine
from pacs.security.access import may_see_study, share_study
from pacs.security.principal import AccessScope, scope_for
from pacs.security.roles import Role
from pacs.settings import Settings
from tests.support.datasets import make_instance


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def archive(request: pytest.FixtureRequest, tmp_path):
    if request.param == "sqlite":
        settings = Settings(data_dir=tmp_path / "data")
    else:
        url = request.getfixturevalue("fresh_pg_url")
        settings = Settings(data_dir=tmp_path / "data", database_url=url)
    ctx = AppContext.create(settings)
    migrate.upgrade(ctx.engine)
    ingestor = Ingestor(ctx.sessions, ctx.store)
    studies: dict[str, str] = {}
    # Two facilities, one study each; patient PX has a study at each facility; one study with no facility.
    for name, facility, patient in (("a1", "A", "PX"), ("a2", "A", "PA"), ("b1", "B", "PX"), ("b2", "B", "PB"),
                                    ("none", "", "PN")):
        study = generate_uid()
        series = generate_uid()
        for n in range(2):
            outcome = ingestor.ingest(
                make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID=patient,
                              PatientName=f"NAME^{patient}", InstanceNumber=n + 1),
                IngestSource("stow", user="test", facility=facility))
            assert outcome.ok, outcome.message
        studies[name] = study
    yield ctx, studies
    ctx.close()


def _studies(ctx: AppContext, scope: AccessScope | None, level: str = "STUDY", **filters: str) -> set[str]:
    engine = QueryEngine(ctx.read_sessions)
    rows = engine.search(Query(level, filters={"StudyInstanceUID": "", **filters}, relational=True, scope=scope))
    return {r["StudyInstanceUID"] for r in rows}


def test_facility_user_finds_only_its_facility_at_every_level(archive) -> None:
    ctx, s = archive
    scope = scope_for(Role.RADIOLOGIST, "A")
    assert _studies(ctx, scope) == {s["a1"], s["a2"]}
    assert _studies(ctx, scope, "SERIES") == {s["a1"], s["a2"]}
    assert _studies(ctx, scope, "IMAGE") == {s["a1"], s["a2"]}
    assert _studies(ctx, scope, PatientName="*") == {s["a1"], s["a2"]}  # a wildcard does not widen it
    assert _studies(ctx, scope, PatientID="PB") == set()
    engine = QueryEngine(ctx.read_sessions)
    assert engine.count(Query("STUDY", relational=True, scope=scope)) == 2
    assert engine.count(Query("IMAGE", relational=True, scope=scope)) == 4
    patients = {r["PatientID"] for r in engine.search(Query("PATIENT", root="PATIENT_ROOT", filters={"PatientID": ""},
                                                            relational=True, scope=scope))}
    assert patients == {"PX", "PA"}  # PB and PN are not even listed as patients


def test_unrestricted_scope_sees_everything_including_unassigned_studies(archive) -> None:
    ctx, s = archive
    assert _studies(ctx, scope_for(Role.ADMIN, "")) == set(s.values())
    assert _studies(ctx, None) == set(s.values())


def test_sharing_a_study_makes_it_visible_to_the_other_facility_only(archive) -> None:
    ctx, s = archive
    with ctx.sessions() as session, session.begin():
        share_study(session, s["b1"], "A", "dr-b")
    assert _studies(ctx, scope_for(Role.CLINICIAN, "A")) == {s["a1"], s["a2"], s["b1"]}
    assert _studies(ctx, scope_for(Role.CLINICIAN, "C")) == set()
    with ctx.read_sessions() as session:
        assert may_see_study(session, scope_for(Role.CLINICIAN, "A"), s["b1"])
        assert not may_see_study(session, scope_for(Role.CLINICIAN, "A"), s["b2"])


def test_patient_scope_is_one_patient_record_of_one_facility(archive) -> None:
    """Issue 12, finding 5: PX of A and PX of B are two people; a patient scope names one record."""
    ctx, s = archive
    assert _studies(ctx, scope_for(Role.PATIENT, "A", "PX")) == {s["a1"]}
    assert _studies(ctx, scope_for(Role.PATIENT, "B", "PX")) == {s["b1"]}
    # no facility (the old "every facility"): nothing, not both PX
    assert _studies(ctx, scope_for(Role.PATIENT, "", "PX")) == set()
    assert _studies(ctx, scope_for(Role.PATIENT, "", "")) == set()  # a patient scope without a patient sees nothing
    assert _studies(ctx, scope_for(Role.PATIENT, "A", "PX"), PatientID="PB") == set()
    assert _studies(ctx, scope_for(Role.PATIENT, "A", "PX", "1.2.840.99")) == set()  # another issuer's PX
    with ctx.sessions() as session, session.begin():  # B's PX shared with A is still not A's PX
        share_study(session, s["b1"], "A", "dr-b")
    assert _studies(ctx, scope_for(Role.PATIENT, "A", "PX")) == {s["a1"]}
    with ctx.read_sessions() as session:
        assert not may_see_study(session, scope_for(Role.PATIENT, "A", "PX"), s["b1"])


def test_share_link_scope_is_exactly_its_study(archive) -> None:
    ctx, s = archive
    scope = AccessScope(study_uids=frozenset({s["a2"]}))
    assert _studies(ctx, scope) == {s["a2"]}
    assert _studies(ctx, scope, "IMAGE") == {s["a2"]}
    with ctx.read_sessions() as session:
        assert may_see_study(session, scope, s["a2"])
        assert not may_see_study(session, scope, s["a1"])
        assert not may_see_study(session, scope, "1.2.3.4.5.6.7.8.9")  # unknown UID: same answer as out of scope


def test_colliding_patient_ids_of_two_facilities_stay_two_patients(archive) -> None:
    """Hospital record numbers collide and modalities often send no issuer: facility B's patient must never
    lend its name or birth date to facility A's study, nor be findable through it."""
    ctx, _ = archive
    ingestor = Ingestor(ctx.sessions, ctx.store)
    studies = {}
    for facility, name, birth in (("B", "SECRET^BOB", "19500101"), ("A", "ALICE^AN", "19900202")):
        study = generate_uid()
        assert ingestor.ingest(make_instance(StudyInstanceUID=study, PatientID="123", PatientName=name,
                                             PatientBirthDate=birth),
                               IngestSource("stow", user="t", facility=facility)).ok
        studies[facility] = study
    engine = QueryEngine(ctx.read_sessions)
    scope_a = scope_for(Role.RADIOLOGIST, "A")
    rows = list(engine.search(Query("STUDY", filters={"StudyInstanceUID": studies["A"], "PatientName": "",
                                                      "PatientBirthDate": ""}, relational=True, scope=scope_a)))
    assert [(r["PatientName"], r["PatientBirthDate"]) for r in rows] == [("ALICE^AN", "19900202")]
    assert _studies(ctx, scope_a, PatientName="SECRET*") == set()
    assert _studies(ctx, scope_for(Role.RADIOLOGIST, "B"), PatientID="123") == {studies["B"]}
