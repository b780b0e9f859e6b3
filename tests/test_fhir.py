"""FHIR R4 for EMRs (issue 6) against a real `pacs serve`: ImagingStudy search by patient identifier, date
range and accession; ImagingStudy and Patient reads; another facility's token sees nothing; the reserved
DiagnosticReport / ServiceRequest routes; the per-study viewer URL; the audit rows. Studies are loaded with
STOW-RS by technologists of two facilities. Pure parts (ids, search parameters) are tested first."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs.db.models import AuditEvent
from pacs.fhir.ids import decode_patient_id, patient_fhir_id
from pacs.fhir.search import SearchError, date_interval, imaging_study_search, parse_token
from pacs.security.accounts import create_token
from tests.support.datasets import make_dataset, to_bytes
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

BOUNDARY = "fhir-test"
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


# -- pure: ids and search parameters -----------------------------------------------------------------


@pytest.mark.parametrize(("patient_id", "issuer"), [
    ("FHIR-A1", "1.2.3.4"), ("P 001/ä", ""), ("", ""), ("Nguyễn-Văn-An-0123456789", "BV-CHO-RAY"),
    ("X" * 64, ""), ("12345", "2.16.840.1.113883.3.72.5.9.1.2.16.840.1.113883.3.72.5.9.1")])
def test_patient_ids_are_valid_fhir_ids_and_name_their_patient(patient_id: str, issuer: str) -> None:
    fhir_id = patient_fhir_id(patient_id, issuer)
    assert 1 <= len(fhir_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in fhir_id)
    assert fhir_id == patient_fhir_id(patient_id, issuer)  # stable
    ref = decode_patient_id(fhir_id)
    assert ref is not None and ref.matches(patient_id, issuer)
    assert not ref.matches(patient_id + "0", issuer) and not ref.matches(patient_id, issuer + "9")
    if len((patient_id + issuer).encode()) < 40:
        assert ref.exact and (ref.patient_id, ref.issuer) == (patient_id, issuer)


def test_ids_we_never_made_name_nothing() -> None:
    for fhir_id in ("", "x1", "p!!", "pA", "h" + "A" * 10, "p" + "A" * 70, "../etc"):
        assert decode_patient_id(fhir_id) is None, fhir_id


def test_date_parameters_become_day_intervals() -> None:
    assert date_interval("2024") == (date(2024, 1, 1), date(2024, 12, 31))
    assert date_interval("eq2024-02") == (date(2024, 2, 1), date(2024, 2, 29))
    assert date_interval("ge2024-03-05") == (date(2024, 3, 5), None)
    assert date_interval("gt2024-03-05") == (date(2024, 3, 6), None)
    assert date_interval("lt2024-03") == (None, date(2024, 2, 29))
    assert date_interval("le2024-03-05T10:00:00+07:00") == (None, date(2024, 3, 5))
    assert imaging_study_search([("date", "ge2024-03-01"), ("date", "le2024-03-31")]).filters == {
        "StudyDate": "20240301-20240331"}
    assert imaging_study_search([("started", "2024-03-05")]).filters == {"StudyDate": "20240305"}
    assert imaging_study_search([("date", "gt2024-05-01"), ("date", "lt2024-04-01")]).matches_nothing
    for bad in ("2024-13", "ne2024", "sa2024-01-01", "24-01-01", "2024-02-30"):
        with pytest.raises(SearchError):
            date_interval(bad)


def test_token_parameters_and_their_refusals() -> None:
    assert parse_token("urn:oid:1.2|P\\|1") == parse_token("urn:oid:1.2|P\\|1")
    assert (parse_token("a|b").system, parse_token("|b").system, parse_token("b").system) == ("a", "", None)
    search = imaging_study_search([("patient.identifier", "urn:oid:1.2.3|P1,urn:oid:1.2.3|P2"),
                                   ("identifier", "ACC1")])
    assert search.filters == {"PatientID": "P1\\P2", "IssuerOfPatientID": "1.2.3", "AccessionNumber": "ACC1"}
    assert imaging_study_search([("identifier", "urn:dicom:uid|urn:oid:1.2.3")]).filters == {
        "StudyInstanceUID": "1.2.3"}
    assert imaging_study_search([("PatientName", "*")]).filters == {}  # unknown: ignored (lenient)
    for params in ([("patient.identifier", "P*")], [("identifier", "A?")], [("identifier", "urn:oid:1.2.x")],
                   [("identifier", "ACC1,urn:oid:1.2.3")], [("identifier", "A"), ("identifier", "B")],
                   [("identifier:exact", "A")], [("patient.name", "X")], [("_count", "-1")],
                   [("patient.identifier", "a|P1,b|P2")]):
        with pytest.raises(SearchError):
            imaging_study_search(params)
    with pytest.raises(SearchError, match="unknown search parameter"):
        imaging_study_search([("PatientName", "*")], strict=True)


# -- the archive ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyInfo:
    uid: str
    patient_id: str
    accession: str
    study_date: str
    datasets: list[Dataset]


@dataclass(frozen=True)
class World:
    pacs: EmbeddedPacs
    studies: dict[str, StudyInfo]  # A1, A2, A3 at HOSP-A; B1 at HOSP-B
    clinician_a: str
    clinician_b: str
    emr: str


def _study(key: str, patient_id: str, issuer: str, name: str, study_date: str, accession: str,
           series: list[tuple[str, str, int]]) -> StudyInfo:
    uid = generate_uid()
    datasets = []
    for number, (modality, sop_class, count) in enumerate(series, start=1):
        series_uid = generate_uid()
        for i in range(count):
            datasets.append(make_dataset(
                StudyInstanceUID=uid, SeriesInstanceUID=series_uid, SeriesNumber=number, InstanceNumber=i + 1,
                Modality=modality, SOPClassUID=sop_class, PatientID=patient_id, IssuerOfPatientID=issuer,
                PatientName=name, PatientSex="M", PatientBirthDate="19800102", StudyDate=study_date,
                AccessionNumber=accession, StudyDescription=f"study {key}", BodyPartExamined="CHEST"))
    return StudyInfo(uid, patient_id, accession, study_date, datasets)


def _stow(pacs: EmbeddedPacs, token: str, datasets: list[Dataset]) -> None:
    body = b"".join(f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(ds)
                    for ds in datasets) + f"\r\n--{BOUNDARY}--\r\n".encode()
    response = httpx.post(f"{pacs.http_url}/dicom-web/studies", content=body, timeout=120,
                          headers={"Authorization": f"Bearer {token}",
                                   "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
    assert response.status_code == 200, response.text[:500]


def api_token(pacs: EmbeddedPacs, role: str, name: str, facility: str = "") -> str:
    """An API token made with the accounts service `pacs token create` uses, on the server's own index
    (faster than a CLI process per token)."""
    with pacs.ctx.sessions() as session, session.begin():
        return create_token(session, name, role, days=1, facility=facility).secret


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("fhir"))
    try:
        studies = {
            "A1": _study("A1", "FHIR-A1", "1.2.3.4", "NGUYỄN^VĂN AN", "20240305", "ACC-A1",
                         [("CT", CT, 3), ("CT", CT, 1)]),
            "A2": _study("A2", "FHIR-A1", "1.2.3.4", "NGUYỄN^VĂN AN", "20240420", "ACC-A2", [("MR", MR, 2)]),
            "A3": _study("A3", "FHIR-A2", "", "TRẦN^THỊ BÌNH", "20231201", "ACC-A3", [("CT", CT, 1)]),
            # hospital B holds a study of the same patient (same identifier), and only that one
            "B1": _study("B1", "FHIR-A1", "1.2.3.4", "NGUYỄN^VĂN AN", "20240310", "ACC-B1", [("CT", CT, 1)]),
        }
        tech_a = api_token(pacs, "technologist", "fhir-tech-a", "HOSP-A")
        tech_b = api_token(pacs, "technologist", "fhir-tech-b", "HOSP-B")
        for key, info in studies.items():
            _stow(pacs, tech_b if key.startswith("B") else tech_a, info.datasets)
        yield World(pacs, studies, api_token(pacs, "clinician", "fhir-clin-a", "HOSP-A"),
                    api_token(pacs, "clinician", "fhir-clin-b", "HOSP-B"), api_token(pacs, "emr", "fhir-emr"))
    finally:
        pacs.close()


def fhir_get(world: World, path: str, token: str | None, params: dict | list | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{world.pacs.http_url}/fhir/{path}", params=params, headers=headers, timeout=60)


def search(world: World, token: str, params: dict | list) -> tuple[int, list[dict]]:
    response = fhir_get(world, "ImagingStudy", token, params)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle["total"], [e["resource"] for e in bundle.get("entry", [])]


def uids(resources: list[dict]) -> set[str]:
    return {r["id"] for r in resources}


def _check_imaging_study(world: World, resource: dict, info: StudyInfo) -> None:
    assert resource["resourceType"] == "ImagingStudy" and resource["id"] == info.uid
    assert resource["status"] == "available"
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{info.uid}", "use": "official"} in resource["identifier"]
    acsn = [i for i in resource["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
    assert [i["value"] for i in acsn] == [info.accession]
    assert resource["started"] == f"{info.study_date[:4]}-{info.study_date[4:6]}-{info.study_date[6:]}"
    assert resource["subject"] == {"reference": f"Patient/{patient_fhir_id(info.patient_id, _issuer(info))}"}
    assert resource["numberOfInstances"] == len(info.datasets)
    series = {ds.SeriesInstanceUID for ds in info.datasets}
    assert resource["numberOfSeries"] == len(series) == len(resource["series"])
    assert {m["code"] for m in resource["modality"]} == {ds.Modality for ds in info.datasets}
    sent = {(ds.SeriesInstanceUID, ds.SOPInstanceUID, f"urn:oid:{ds.SOPClassUID}", ds.InstanceNumber)
            for ds in info.datasets}
    got = {(s["uid"], i["uid"], i["sopClass"]["code"], i["number"]) for s in resource["series"] for i in s["instance"]}
    assert got == sent
    assert all(s["modality"]["system"] == "http://dicom.nema.org/resources/ontology/DCM" for s in resource["series"])
    (reference,) = resource["endpoint"]
    endpoint = next(c for c in resource["contained"] if f"#{c['id']}" == reference["reference"])
    assert endpoint["resourceType"] == "Endpoint" and endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"] == f"{world.pacs.http_url}/dicom-web"


def _issuer(info: StudyInfo) -> str:
    return str(info.datasets[0].get("IssuerOfPatientID", ""))


# -- searches -------------------------------------------------------------------------------------------


def test_search_by_patient_identifier(world: World) -> None:
    a1, a2 = world.studies["A1"], world.studies["A2"]
    total, found = search(world, world.clinician_a, {"patient.identifier": "FHIR-A1"})
    assert total == 2 and uids(found) == {a1.uid, a2.uid}
    for resource in found:
        _check_imaging_study(world, resource, a1 if resource["id"] == a1.uid else a2)
    assert uids(search(world, world.clinician_a, {"patient.identifier": "urn:oid:1.2.3.4|FHIR-A1"})[1]) == {
        a1.uid, a2.uid}
    assert search(world, world.clinician_a, {"patient.identifier": "urn:oid:9.9|FHIR-A1"})[0] == 0
    assert uids(search(world, world.clinician_a, {"subject:Patient.identifier": "FHIR-A2"})[1]) == {
        world.studies["A3"].uid}
    patient_ref = f"Patient/{patient_fhir_id('FHIR-A1', '1.2.3.4')}"
    assert uids(search(world, world.clinician_a, {"patient": patient_ref})[1]) == {a1.uid, a2.uid}
    # the EMR's service account (no facility) sees the patient's studies of both hospitals
    assert uids(search(world, world.emr, {"patient.identifier": "FHIR-A1"})[1]) == {
        a1.uid, a2.uid, world.studies["B1"].uid}
    # the DICOMweb endpoint the resource names serves the study
    metadata = httpx.get(f"{world.pacs.http_url}/dicom-web/studies/{a1.uid}/series", timeout=60,
                         headers={"Authorization": f"Bearer {world.clinician_a}"})
    assert metadata.status_code == 200 and len(metadata.json()) == 2


def test_search_by_date_range(world: World) -> None:
    s = world.studies
    token = world.clinician_a
    assert uids(search(world, token, [("date", "ge2024-03-01"), ("date", "le2024-03-31")])[1]) == {s["A1"].uid}
    assert uids(search(world, token, {"started": "2024-04"})[1]) == {s["A2"].uid}
    assert uids(search(world, token, {"date": "lt2024-01-01"})[1]) == {s["A3"].uid}
    assert uids(search(world, token, {"date": "gt2024-03-05"})[1]) == {s["A2"].uid}
    assert uids(search(world, token, [("date", "eq2024"), ("patient.identifier", "FHIR-A1")])[1]) == {
        s["A1"].uid, s["A2"].uid}
    assert search(world, token, [("date", "ge2024-05-01"), ("date", "le2024-04-01")])[0] == 0
    response = fhir_get(world, "ImagingStudy", token, {"date": "2024-13-01"})
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "invalid"
    assert "2024-13-01" in outcome["issue"][0]["diagnostics"]


def test_search_by_accession(world: World) -> None:
    s = world.studies
    token = world.clinician_a
    assert uids(search(world, token, {"identifier": "ACC-A1"})[1]) == {s["A1"].uid}
    assert uids(search(world, token, {"identifier": "ACC-A1,ACC-A3"})[1]) == {s["A1"].uid, s["A3"].uid}
    assert uids(search(world, token, {"identifier": f"urn:dicom:uid|urn:oid:{s['A2'].uid}"})[1]) == {s["A2"].uid}
    of_type = "http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|ACC-A2"
    assert uids(search(world, token, {"identifier:of-type": of_type})[1]) == {s["A2"].uid}
    assert search(world, token, {"identifier": "ACC-B1"})[0] == 0  # hospital B's accession: not for A
    response = fhir_get(world, "ImagingStudy", token, {"identifier": "ACC-*"})
    assert response.status_code == 400 and "exactly" in response.json()["issue"][0]["diagnostics"]


def test_paging_with_count_and_next_links(world: World) -> None:
    response = fhir_get(world, "ImagingStudy", world.clinician_a, {"patient.identifier": "FHIR-A1", "_count": "1"})
    bundle = response.json()
    assert bundle["total"] == 2 and len(bundle["entry"]) == 1
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert set(links) == {"self", "next"}
    query = parse_qs(urlsplit(links["next"]).query)
    assert query["_offset"] == ["1"] and query["patient.identifier"] == ["FHIR-A1"]
    second = httpx.get(links["next"], headers={"Authorization": f"Bearer {world.clinician_a}"}, timeout=60).json()
    assert len(second["entry"]) == 1 and second["entry"][0]["resource"]["id"] != bundle["entry"][0]["resource"]["id"]
    assert {link["relation"] for link in second["link"]} == {"self", "previous"}


# -- reads ----------------------------------------------------------------------------------------------


def test_read_imaging_study_and_patient(world: World) -> None:
    a1 = world.studies["A1"]
    response = fhir_get(world, f"ImagingStudy/{a1.uid}", world.clinician_a)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/fhir+json")
    _check_imaging_study(world, response.json(), a1)
    patient_id = response.json()["subject"]["reference"].split("/", 1)[1]
    patient = fhir_get(world, f"Patient/{patient_id}", world.clinician_a).json()
    assert patient["resourceType"] == "Patient" and patient["id"] == patient_id
    assert patient["identifier"] == [{"use": "usual", "type": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
        "system": "urn:oid:1.2.3.4", "value": "FHIR-A1"}]
    assert patient["name"] == [{"text": "NGUYỄN VĂN AN", "family": "NGUYỄN", "given": ["VĂN AN"]}]
    assert (patient["gender"], patient["birthDate"]) == ("male", "1980-01-02")
    bundle = fhir_get(world, "Patient", world.clinician_a, {"identifier": "FHIR-A1"}).json()
    assert bundle["total"] == 1 and bundle["entry"][0]["resource"] == patient
    assert bundle["entry"][0]["fullUrl"] == f"{world.pacs.http_url}/fhir/Patient/{patient_id}"
    no_issuer = fhir_get(world, "Patient", world.clinician_a, {"identifier": "FHIR-A2"}).json()["entry"][0]["resource"]
    assert no_issuer["identifier"][0]["value"] == "FHIR-A2" and "system" not in no_issuer["identifier"][0]
    assert fhir_get(world, f"Patient/{no_issuer['id']}", world.clinician_a).json() == no_issuer
    for path in (f"ImagingStudy/{generate_uid()}", "ImagingStudy/1.2.x", "Patient/pNOTAPATIENT",
                 f"Patient/{patient_fhir_id('NOBODY')}"):
        response = fhir_get(world, path, world.clinician_a)
        assert response.status_code == 404, path
        assert response.json()["resourceType"] == "OperationOutcome"


def test_another_facility_sees_nothing_of_hospital_a(world: World) -> None:
    a1, a3, b1 = world.studies["A1"], world.studies["A3"], world.studies["B1"]
    token = world.clinician_b
    for path in (f"ImagingStudy/{a1.uid}", f"Patient/{patient_fhir_id('FHIR-A2')}"):
        response = fhir_get(world, path, token)
        assert response.status_code == 404 and response.json()["issue"][0]["code"] == "not-found", path
    assert uids(search(world, token, {"patient.identifier": "FHIR-A1"})[1]) == {b1.uid}
    assert uids(search(world, token, {})[1]) == {b1.uid}
    for params in ({"identifier": "ACC-A1"}, {"identifier": f"urn:oid:{a1.uid}"}, {"date": "2024-03-05"},
                   {"patient.identifier": "FHIR-A2"}, {"_id": a3.uid}):
        total, found = search(world, token, params)
        assert (total, found) == (0, []), params
    patients = fhir_get(world, "Patient", token, {"identifier": "FHIR-A2"}).json()
    assert patients["total"] == 0 and "TRẦN" not in str(patients)
    # an empty result repeats nothing of the search (no links): the same answer as for a patient nobody has
    for params in ({"patient.identifier": "FHIR-A2"}, {"patient.identifier": "NOBODY"}):
        response = fhir_get(world, "ImagingStudy", token, params)
        assert response.json() == {"resourceType": "Bundle", "type": "searchset", "total": 0}


# -- reserved resources, metadata, viewer URL, audit -------------------------------------------------


def test_diagnostic_report_and_service_request_need_a_token_and_answer_fhir(world: World) -> None:
    """Once reserved (501), now served: the details are in tests/test_fhir_reports.py."""
    for path, status in (("DiagnosticReport", 200), (f"DiagnosticReport/{world.studies['A1'].uid}", 404),
                         ("ServiceRequest", 200), ("ServiceRequest/1", 404)):
        response = fhir_get(world, path, None)
        assert response.status_code == 401, path
        response = fhir_get(world, path, world.emr)
        assert response.status_code == status, path
        assert response.json()["resourceType"] == ("Bundle" if status == 200 else "OperationOutcome"), path
    assert fhir_get(world, "metadata", None).status_code == 401
    statement = fhir_get(world, "metadata", world.emr).json()
    assert statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
    assert {r["type"] for r in statement["rest"][0]["resource"]} == {"ImagingStudy", "Patient", "DiagnosticReport",
                                                                     "ServiceRequest"}
    assert fhir_get(world, "Observation", world.emr).status_code == 404


def test_viewer_url_redirects_to_ohif_without_patient_data(world: World) -> None:
    a1 = world.studies["A1"]
    response = httpx.get(f"{world.pacs.http_url}/viewer/studies/{a1.uid}", timeout=30)
    assert response.status_code == 302
    assert response.headers["location"] == f"/ohif/viewer?StudyInstanceUIDs={a1.uid}"
    assert "FHIR-A1" not in response.text and "NGUY" not in response.text
    assert httpx.get(f"{world.pacs.http_url}/viewer/studies/1.2.x", timeout=30).status_code == 400


def test_each_fhir_request_is_audited_with_patient_and_study(world: World) -> None:
    a1 = world.studies["A1"]
    with world.pacs.ctx.sessions() as session:
        last = session.scalar(select(AuditEvent.id).order_by(AuditEvent.id.desc()).limit(1)) or 0
    fhir_get(world, f"ImagingStudy/{a1.uid}", world.clinician_a)
    search(world, world.clinician_a, {"patient.identifier": "FHIR-A1"})
    fhir_get(world, f"ImagingStudy/{a1.uid}", world.clinician_b)
    with world.pacs.ctx.sessions() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.id > last).order_by(AuditEvent.id)).all()
    rows = [(e.action, e.actor, e.outcome, e.patient_id, e.study_instance_uid) for e in events]
    assert rows == [
        ("fhir.read", "token:fhir-clin-a", "success", "FHIR-A1", a1.uid),
        ("fhir.search", "token:fhir-clin-a", "success", "FHIR-A1", ""),
        ("fhir.read", "token:fhir-clin-b", "failure", "", ""),
    ]
    assert "total=2" in events[1].detail and a1.uid in events[1].detail
