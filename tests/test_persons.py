"""One person, one record (issue 14, point 4): records of two hospitals that share a national identifier are one
person's history to an allowed clinician; the same name and birth date with different national identifiers stay
two people. Objects are stored through the real ingest service (the process's own ``make_ingestor``) on SQLite and
PostgreSQL; QIDO-RS, FHIR and the reading list are asked over the real HTTP app with API tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import event, select
from typer.testing import CliRunner

from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent, Patient
from pacs.dicomweb.qido import parse_search
from pacs.ingest import IngestSource
from pacs.ingest.parsing import parse_received
from pacs.persons.identifiers import NationalIdPolicy, normalise_value
from pacs.persons.models import Person, PersonIdentifier
from pacs.query.engine import QueryEngine
from pacs.query.sessions import read_path_engine
from pacs.runtime import make_ingestor
from pacs.security.accounts import create_token
from pacs.security.principal import AccessScope
from pacs.settings import Settings
from tests.support.datasets import make_instance

NATIONAL = ["CCCD", "BHXH"]
CCCD_LAN = "001170001234"
NAME, BIRTH = "Nguyễn^Thị Lan", "19700101"


def _other_ids(*pairs: tuple[str, str]) -> list[Dataset]:
    items = []
    for system, value in pairs:
        item = Dataset()
        item.PatientID = value
        item.IssuerOfPatientID = system
        items.append(item)
    return items


@dataclass
class Archive:
    ctx: AppContext
    root: Path

    def send(self, facility: str, patient_id: str, issuer: str, institution: str, *national: tuple[str, str],
             name: str = NAME, birth: str = BIRTH, study: str = "", **extra: Any) -> str:
        study = study or generate_uid()
        attrs: dict[str, Any] = {"StudyInstanceUID": study, "PatientID": patient_id, "IssuerOfPatientID": issuer,
                                 "PatientName": name, "PatientBirthDate": birth, "InstitutionName": institution,
                                 "Modality": "CT", "StudyDescription": "CT ngực", **extra}
        if national:
            attrs["OtherPatientIDsSequence"] = _other_ids(*national)
        outcome = make_ingestor(self.ctx).ingest(make_instance(**attrs),
                                                 IngestSource("stow", user="modality", facility=facility))
        assert outcome.ok, outcome.message
        return study

    def record(self, facility: str, patient_id: str) -> Patient:
        with self.ctx.read_sessions() as session:
            return session.scalars(select(Patient).where(Patient.facility == facility,
                                                         Patient.patient_id == patient_id)).one()

    def token(self, name: str, role: str, facility: str, **extra: Any) -> dict[str, str]:
        with self.ctx.sessions() as session, session.begin():
            secret = create_token(session, name, role, days=1, facility=facility, **extra).secret
        return {"Authorization": f"Bearer {secret}"}

    def audit(self, action: str) -> list[AuditEvent]:
        with self.ctx.read_sessions() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                        .order_by(AuditEvent.id)))


def _archive(request: pytest.FixtureRequest, tmp_path: Path, **settings: Any) -> Iterator[Archive]:
    url = request.getfixturevalue("fresh_pg_url") if request.param == "postgresql" else ""
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", database_url=url, **settings))
    try:
        migrate.upgrade(ctx.engine)
        yield Archive(ctx, tmp_path)
    finally:
        ctx.close()


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    yield from _archive(request, tmp_path, national_id_issuers=NATIONAL,
                        national_id_attribute="BHXH:InsurancePlanIdentification")


@pytest.fixture(params=["sqlite"])
def archive_no_priors(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    yield from _archive(request, tmp_path, national_id_issuers=NATIONAL, priors_across_facilities=[])


@dataclass
class Province:
    """Hospital A (the province) and B (a district centre): one woman with records at both, under different
    Patient IDs, and another woman at B with the same name and birth date but her own citizen ID."""

    a: Archive
    study_a: str
    study_b: str
    study_twin: str


def _province(archive: Archive) -> Province:
    study_a = archive.send("HOSP-A", "BVA-0001", "BV-TINH", "Bệnh viện Đa khoa Tỉnh", ("CCCD", "001 170 001 234"))
    study_b = archive.send("HOSP-B", "TTYT-77", "TTYT-HUYEN", "Trung tâm Y tế huyện",
                           ("CCCD", CCCD_LAN), ("BHXH", "dn 4010 1234 5678"), StudyDate="20240105")
    study_twin = archive.send("HOSP-B", "TTYT-78", "TTYT-HUYEN", "Trung tâm Y tế huyện", ("CCCD", "009170009999"))
    return Province(archive, study_a, study_b, study_twin)


# -- linking -----------------------------------------------------------------------------------------------

def test_records_sharing_a_national_identifier_are_one_person(archive: Archive) -> None:
    _province(archive)
    lan_a, lan_b = archive.record("HOSP-A", "BVA-0001"), archive.record("HOSP-B", "TTYT-77")
    twin = archive.record("HOSP-B", "TTYT-78")
    assert lan_a.person_fk is not None and lan_a.person_fk == lan_b.person_fk
    # same name and birth date, another citizen ID: another person
    assert twin.person_fk is not None and twin.person_fk != lan_a.person_fk
    assert (twin.patient_name, twin.patient_birth_date) == (lan_a.patient_name, lan_a.patient_birth_date)
    with archive.ctx.read_sessions() as session:
        held = sorted((system, value) for system, value in session.execute(
            select(PersonIdentifier.system, PersonIdentifier.value)
            .where(PersonIdentifier.person_fk == lan_a.person_fk)))
    assert held == [("BHXH", "DN401012345678"), ("CCCD", CCCD_LAN)]  # spaces gone, leading zeros kept
    # the same name and birth date without any national identifier links nobody
    archive.send("HOSP-B", "TTYT-79", "TTYT-HUYEN", "Trung tâm Y tế huyện")
    assert archive.record("HOSP-B", "TTYT-79").person_fk is None


def test_national_identifier_in_the_patient_id_or_a_configured_attribute(archive: Archive) -> None:
    archive.send("HOSP-A", CCCD_LAN, "cccd", "Bệnh viện Đa khoa Tỉnh")  # the Patient ID itself, issuer any case
    archive.send("HOSP-B", "TTYT-5", "", "", InsurancePlanIdentification="DN4010 1234 5678")
    archive.send("HOSP-B", "TTYT-6", "", "", ("BHXH", "DN401012345678"), ("CCCD", CCCD_LAN))
    first, second, both = (archive.record("HOSP-A", CCCD_LAN), archive.record("HOSP-B", "TTYT-5"),
                           archive.record("HOSP-B", "TTYT-6"))
    # TTYT-6 carries both: the two persons it points at are a conflict, not merged
    assert first.person_fk is not None and second.person_fk is not None and first.person_fk != second.person_fk
    assert both.person_fk is None
    conflicts = archive.audit("person.conflict")
    assert len(conflicts) == 1 and "TTYT-6" in conflicts[0].detail and conflicts[0].outcome == "warning"
    assert CCCD_LAN not in conflicts[0].detail  # national IDs are masked in the trail


def test_a_conflict_is_audited_once_and_left_for_a_human(archive: Archive) -> None:
    _province(archive)
    lan = archive.record("HOSP-A", "BVA-0001").person_fk
    twin = archive.record("HOSP-B", "TTYT-78").person_fk
    # a later object of Lan's record at A names the twin's citizen ID too: never merged automatically
    for _ in range(2):
        archive.send("HOSP-A", "BVA-0001", "BV-TINH", "Bệnh viện Đa khoa Tỉnh", ("CCCD", "009170009999"))
    assert archive.record("HOSP-A", "BVA-0001").person_fk == lan
    assert archive.record("HOSP-B", "TTYT-78").person_fk == twin
    assert len(archive.audit("person.conflict")) == 1  # the second object changes nothing: no second row


def test_a_conflict_of_a_record_without_person_is_audited_once(archive: Archive) -> None:
    archive.send("HOSP-A", CCCD_LAN, "CCCD", "Bệnh viện Đa khoa Tỉnh")
    archive.send("HOSP-B", "TTYT-5", "", "", ("BHXH", "DN401012345678"))
    study = generate_uid()
    for _ in range(3):  # three instances of one study of a record naming both persons' identifiers
        archive.send("HOSP-B", "TTYT-6", "", "", ("BHXH", "DN401012345678"), ("CCCD", CCCD_LAN), study=study)
    assert archive.record("HOSP-B", "TTYT-6").person_fk is None
    assert len(archive.audit("person.conflict")) == 1  # not one row (and log line) per instance


def test_a_national_id_with_another_birth_date_links_nobody(archive: Archive) -> None:
    """A forged (or mistyped) national ID: a sender at HOSP-C names Lan's citizen ID for a patient born on another
    day. A person.conflict for a human, never a link: HOSP-C's clinicians do not see Lan's studies."""
    from viewer_api.app import create_app

    p = _province(archive)
    lan = archive.record("HOSP-A", "BVA-0001").person_fk
    forged = archive.send("HOSP-C", "PK-1", "PK", "Phòng khám tư", ("CCCD", CCCD_LAN), birth="19910512")
    record = archive.record("HOSP-C", "PK-1")
    assert record.person_fk is None and record.national_ids == f"CCCD:{CCCD_LAN}"
    assert archive.record("HOSP-B", "TTYT-77").person_fk == lan  # Lan is still one person, alone
    conflicts = archive.audit("person.conflict")
    assert len(conflicts) == 1 and conflicts[0].outcome == "warning", [c.detail for c in conflicts]
    assert "HOSP-C/PK-1" in conflicts[0].detail and "birth date differs" in conflicts[0].detail
    assert CCCD_LAN not in conflicts[0].detail  # masked in the trail
    assert not [r for r in archive.audit("person.link") if "PK-1" in r.detail]
    with TestClient(create_app(archive.ctx)) as client:
        assert set(_qido(client, archive.token("clin-c", "clinician", "HOSP-C"))) == {forged}
        assert forged not in _qido(client, archive.token("clin-a", "clinician", "HOSP-A"))
        assert set(_qido(client, archive.token("clin-a2", "clinician", "HOSP-A"))) == {p.study_a, p.study_b}


def test_a_national_id_with_another_sex_links_nobody_unknown_values_veto_nothing(archive: Archive) -> None:
    _province(archive)
    lan = archive.record("HOSP-A", "BVA-0001").person_fk
    archive.send("HOSP-A", "BVA-0001", "BV-TINH", "Bệnh viện Đa khoa Tỉnh", PatientSex="F")  # Lan's sex, now known
    archive.send("HOSP-C", "PK-3", "PK", "Phòng khám tư", ("CCCD", CCCD_LAN), PatientSex="M")
    archive.send("HOSP-D", "X-1", "X", "Trạm y tế xã", ("CCCD", CCCD_LAN), birth="", PatientSex="O")
    assert archive.record("HOSP-C", "PK-3").person_fk is None  # M against Lan's F
    assert archive.record("HOSP-D", "X-1").person_fk == lan  # no birth date and sex "O" contradict nothing
    conflicts = [r.detail for r in archive.audit("person.conflict")]
    assert len(conflicts) == 1 and "HOSP-C/PK-3" in conflicts[0] and "sex differs" in conflicts[0], conflicts


def test_linking_costs_nothing_when_no_national_identifier_changes(archive: Archive) -> None:
    _province(archive)
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    plain, known = generate_uid(), generate_uid()
    archive.send("HOSP-A", "BVA-0002", "BV-TINH", "Bệnh viện Đa khoa Tỉnh", study=plain)
    event.listen(archive.ctx.engine, "before_cursor_execute", count)
    try:
        archive.send("HOSP-A", "BVA-0002", "BV-TINH", "Bệnh viện Đa khoa Tỉnh", study=plain)  # no national ID
        archive.send("HOSP-A", "BVA-0001", "BV-TINH", "Bệnh viện Đa khoa Tỉnh", ("CCCD", CCCD_LAN),
                     study=known)  # a known one, on a new study of the same record
    finally:
        event.remove(archive.ctx.engine, "before_cursor_execute", count)
    person_tables = re.compile(r"\b(from|into|update|join)\s+person", re.IGNORECASE)
    assert not [s for s in statements if person_tables.search(s)], statements
    assert any("INSERT INTO instance" in s for s in statements)  # the objects were stored


def test_ingest_takes_the_identifiers_from_the_dataset_it_parsed(archive: Archive,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Linking reads the national IDs from the Dataset ingest already built (pacs.ingest.parsing), never parses
    the object's bytes a second time."""
    import pacs.persons.identifiers as identifiers

    def parsed_again(*args: Any, **kwargs: Any) -> Dataset:
        raise AssertionError("the object's header was parsed a second time")

    monkeypatch.setattr(identifiers, "dcmread", parsed_again)
    data = make_instance(PatientID="BVA-7", OtherPatientIDsSequence=_other_ids(("CCCD", CCCD_LAN)))
    obj = parse_received(data, max_bytes=10_000_000)
    policy = NationalIdPolicy.from_settings(NATIONAL)
    assert policy is not None and obj.dataset is not None
    assert policy.from_dataset(obj.dataset) == (("CCCD", CCCD_LAN),)
    archive.send("HOSP-A", "BVA-0001", "BV-TINH", "Bệnh viện Đa khoa Tỉnh", ("CCCD", CCCD_LAN))
    archive.send("HOSP-B", "TTYT-77", "TTYT-HUYEN", "Trung tâm Y tế huyện", ("CCCD", CCCD_LAN))
    person = archive.record("HOSP-A", "BVA-0001").person_fk
    assert person is not None and archive.record("HOSP-B", "TTYT-77").person_fk == person


def test_policy_normalises_and_refuses_bad_settings() -> None:
    assert normalise_value(" 001 170\t001234 ") == CCCD_LAN
    assert NationalIdPolicy.from_settings([]) is None  # the feature is off by default
    with pytest.raises(ValueError, match="not one of"):
        Settings(national_id_issuers=["CCCD"], national_id_attribute="BHXH:InsurancePlanIdentification")
    with pytest.raises(ValueError, match="patients never"):
        Settings(priors_across_facilities=["clinician", "patient"])
    with pytest.raises(ValueError, match="unknown role"):
        Settings(priors_across_facilities=["doctor"])


# -- who sees the priors -----------------------------------------------------------------------------------

def _qido(client: TestClient, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    response = client.get("/dicom-web/studies", headers=headers)
    assert response.status_code in (200, 204), response.text
    rows = response.json() if response.status_code == 200 else []
    return {r["0020000D"]["Value"][0]: r for r in rows}


def _fhir(client: TestClient, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    response = client.get("/fhir/ImagingStudy", headers=headers)
    assert response.status_code == 200, response.text
    studies = [e["resource"] for e in response.json().get("entry", [])]
    return {s["identifier"][0]["value"].removeprefix("urn:oid:"): s for s in studies}


def test_an_allowed_clinician_sees_the_other_hospitals_record_labelled(archive: Archive) -> None:
    from viewer_api.app import create_app

    p = _province(archive)
    clin_a = archive.token("clin-a", "clinician", "HOSP-A")
    tech_a = archive.token("tech-a", "technologist", "HOSP-A")
    patient_a = archive.token("lan", "patient", "HOSP-A", patient_id="BVA-0001", issuer="BV-TINH", images=True)
    with TestClient(create_app(archive.ctx)) as client:
        seen = _qido(client, clin_a)
        assert set(seen) == {p.study_a, p.study_b}  # not the twin's study: another person
        prior = seen[p.study_b]
        assert prior["00100021"]["Value"] == ["TTYT-HUYEN"]  # Issuer of Patient ID: B's record
        assert prior["00080080"]["Value"] == ["Trung tâm Y tế huyện"]  # Institution Name, as stored
        assert prior["00100020"]["Value"] == ["TTYT-77"]
        assert seen[p.study_a]["00080080"]["Value"] == ["Bệnh viện Đa khoa Tỉnh"]

        fhir = _fhir(client, clin_a)
        assert set(fhir) == {p.study_a, p.study_b}
        assert fhir[p.study_b]["location"] == {"display": "Trung tâm Y tế huyện"}

        # a technologist (not in priors_across_facilities) and the patient herself: their own facility only
        assert set(_qido(client, tech_a)) == {p.study_a}
        assert set(_fhir(client, tech_a)) == {p.study_a}
        assert set(_qido(client, patient_a)) == {p.study_a}
        # a prior is a study like any other to read: WADO metadata opens for the clinician, not the technologist
        assert client.get(f"/dicom-web/studies/{p.study_b}/metadata", headers=clin_a).status_code == 200
        assert client.get(f"/dicom-web/studies/{p.study_b}/metadata", headers=tech_a).status_code == 404
        # ... but not A's to hand out: no share link to B's study for A's clinician (like an unknown study)
        assert client.post(f"/api/studies/{p.study_b}/shares", headers=clin_a, json={"scope": "report"}).status_code \
            == 404
        assert client.post(f"/api/studies/{p.study_a}/shares", headers=clin_a, json={"scope": "report"}).status_code \
            == 201
        # B's clinician sees A's study the same way; B's twin record opens nothing at A
        clin_b = archive.token("clin-b", "clinician", "HOSP-B")
        assert set(_qido(client, clin_b)) == {p.study_a, p.study_b, p.study_twin}


def test_the_reading_list_shows_priors_of_the_person_with_their_facility(archive: Archive) -> None:
    from viewer_api.app import create_app

    p = _province(archive)
    rad_a = archive.token("rad-a", "radiologist", "HOSP-A")
    with TestClient(create_app(archive.ctx)) as client:
        response = client.get("/api/reading-list", headers=rad_a)
        assert response.status_code == 200, response.text
        items = {i["study_instance_uid"]: i for i in response.json()}
        assert set(items) == {p.study_a}  # B's study is a prior to look at, not work for A's radiologists
        priors = items[p.study_a]["priors"]
        assert [(x["study_instance_uid"], x["facility"]) for x in priors] == [(p.study_b, "HOSP-B")]
        # a prior is read-only: A's radiologist can open it, not claim it nor report on it
        assert client.get(f"/dicom-web/studies/{p.study_b}/metadata", headers=rad_a).status_code == 200
        assert client.post(f"/api/studies/{p.study_b}/claim", headers=rad_a).status_code == 404
        draft = client.post(f"/api/studies/{p.study_b}/reports", headers=rad_a,
                            json={"findings": "Không thấy bất thường.", "impression": "Bình thường."})
        assert draft.status_code == 404, draft.text
        assert client.post(f"/api/studies/{p.study_a}/claim", headers=rad_a).status_code in (200, 201)


def test_with_the_setting_empty_nobody_sees_priors(archive_no_priors: Archive) -> None:
    from viewer_api.app import create_app

    p = _province(archive_no_priors)
    assert archive_no_priors.record("HOSP-A", "BVA-0001").person_fk == \
        archive_no_priors.record("HOSP-B", "TTYT-77").person_fk  # still one person: only visibility is off
    with TestClient(create_app(archive_no_priors.ctx)) as client:
        for name, role in (("clin-a", "clinician"), ("rad-a", "radiologist")):
            headers = archive_no_priors.token(name, role, "HOSP-A")
            assert set(_qido(client, headers)) == {p.study_a}
            assert set(_fhir(client, headers)) == {p.study_a}
        response = client.get("/api/reading-list", headers=archive_no_priors.token("rad-a2", "radiologist", "HOSP-A"))
        assert response.json()[0]["priors"] == []


def test_a_third_facility_and_an_emr_account_see_no_priors(archive: Archive) -> None:
    """A clinician of a facility with no study of the person sees none of the person's studies (the rule starts
    from a study visible to the facility); an EMR account under the default setting (radiologist, clinician)
    sees its own facility's studies only."""
    from viewer_api.app import create_app

    p = _province(archive)
    archive.send("HOSP-C", "PK-9", "PK", "Phòng khám tư", name="Lê^Văn Tám", birth="19800101")  # C's own patient
    with TestClient(create_app(archive.ctx)) as client:
        clin_c = archive.token("clin-c", "clinician", "HOSP-C")
        seen_c = _qido(client, clin_c)
        assert len(seen_c) == 1 and not {p.study_a, p.study_b, p.study_twin} & set(seen_c)
        assert client.get(f"/dicom-web/studies/{p.study_b}/metadata", headers=clin_c).status_code == 404
        emr_a = archive.token("emr-a", "emr", "HOSP-A")
        assert set(_qido(client, emr_a)) == {p.study_a}
        assert set(_fhir(client, emr_a)) == {p.study_a}
        assert client.get(f"/dicom-web/studies/{p.study_b}/metadata", headers=emr_a).status_code == 404


def test_qido_with_priors_is_still_one_statement_per_page(archive: Archive) -> None:
    p = _province(archive)
    scope = AccessScope(facilities=frozenset({"HOSP-A"}), linked_priors=True)
    search = parse_search("studies", [], scope=scope)
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    # the searches run on the read path's own connections on PostgreSQL (pacs.query.sessions): count on both
    engines = [e for e in (archive.ctx.engine, read_path_engine(archive.ctx.engine)) if e is not None]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", count)
    try:
        head = QueryEngine(archive.ctx.read_sessions).search(search.query).head(100)
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)
    assert {r["StudyInstanceUID"] for r in head.rows} == {p.study_a, p.study_b}
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1, statements


# -- the command line --------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite"])
def cli_archive(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[Archive]:
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PACS_NATIONAL_ID_ISSUERS", '["CCCD", "BHXH"]')
    yield from _archive(request, tmp_path, national_id_issuers=NATIONAL)


def _pacs(*args: str) -> str:
    from pacs.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _pacs_fails(*args: str) -> str:
    from pacs.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    return result.output


def test_cli_link_unlink_merge_are_audited(cli_archive: Archive) -> None:
    archive = cli_archive
    _province(archive)
    archive.send("HOSP-A", "BVA-0002", "BV-TINH", "Bệnh viện Đa khoa Tỉnh")  # no national ID
    lan = archive.record("HOSP-A", "BVA-0001").person_fk
    shown = _pacs("patient", "show", "HOSP-A", "BVA-0001")
    assert f"person {lan}" in shown and "TTYT-77" in shown and "HOSP-B" in shown and CCCD_LAN in shown

    out = _pacs("patient", "link", "HOSP-A", "BVA-0001", "HOSP-A", "BVA-0002", "--reason", "same patient, paper ID")
    assert f"person {lan}" in out
    assert archive.record("HOSP-A", "BVA-0002").person_fk == lan
    link_row = archive.audit("person.link")[-1]
    assert link_row.actor.startswith("os:") and "BVA-0002" in link_row.detail and "paper ID" in link_row.detail

    _pacs("patient", "unlink", "HOSP-A", "BVA-0002", "--reason", "wrong patient")
    alone = archive.record("HOSP-A", "BVA-0002").person_fk
    assert alone is not None and alone != lan
    assert "wrong patient" in archive.audit("person.unlink")[-1].detail
    # a new object of the unlinked record (no new identifier) does not link it back
    archive.send("HOSP-A", "BVA-0002", "BV-TINH", "Bệnh viện Đa khoa Tỉnh")
    assert archive.record("HOSP-A", "BVA-0002").person_fk == alone

    twin = archive.record("HOSP-B", "TTYT-78").person_fk
    assert twin is not None
    refused = _pacs_fails("patient", "merge", str(lan), str(twin), "--reason", "test")
    assert "different national identifiers" in refused and "CCCD" in refused
    assert archive.audit("person.merge") == []
    _pacs("patient", "merge", str(lan), str(alone), "--reason", "same woman: ward register checked")
    assert archive.record("HOSP-A", "BVA-0002").person_fk == lan
    merge_row = archive.audit("person.merge")[-1]
    assert merge_row.actor.startswith("os:") and "ward register" in merge_row.detail
    with archive.ctx.read_sessions() as session:
        assert session.get(Person, alone) is None
    _pacs("patient", "merge", str(lan), str(twin), "--reason", "registry confirmed one woman", "--force")
    assert archive.record("HOSP-B", "TTYT-78").person_fk == lan
    assert "(forced)" in archive.audit("person.merge")[-1].detail
    assert _pacs_fails("patient", "show", "HOSP-C", "NOPE").strip()
    assert len(archive.audit("person.read")) == 1
