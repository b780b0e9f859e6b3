"""FHIR R4 DiagnosticReport and ServiceRequest for EMRs, and strict search parameters, against a real
`pacs serve` (SQLite and PostgreSQL).

Two hospitals: studies arrive by STOW-RS from technologists of each; radiologists write reports through
the report lifecycle (draft → preliminary → final → amended) and orders are placed through the order
service or by POSTing a ServiceRequest. Every resource and Bundle that comes back is validated with the
``fhir.resources`` R4B models.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs.context import AppContext
from pacs.db.models import AuditEvent
from pacs.fhir.diagnostic_report import report_fhir_id, report_id_from_fhir
from pacs.fhir.ids import patient_fhir_id
from pacs.fhir.resources import VIEWER_URL_EXTENSION
from pacs.fhir.search import SearchError, diagnostic_report_search, service_request_search
from pacs.fhir.service_request import accession_from_fhir, service_request_fhir_id
from pacs.reports import lifecycle
from pacs.ris.orders import NewOrder, create_order, get_order
from pacs.security.accounts import create_token, create_user
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.settings import Settings
from tests.support.datasets import make_dataset, to_bytes
from tests.support.net import wait_until
from tests.support.postgres import create_database, drop_database
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

BOUNDARY = "fhir-reports"
CT = "1.2.840.10008.5.1.4.1.1.2"
ISSUER = "1.2.3.4"
P1 = "FR-P1"
MODELS = {"Bundle": Bundle, "DiagnosticReport": DiagnosticReport, "ServiceRequest": ServiceRequest,
          "OperationOutcome": OperationOutcome, "CapabilityStatement": CapabilityStatement,
          "ImagingStudy": ImagingStudy, "Patient": Patient}


# -- pure: ids and search parameters -------------------------------------------------------------------


def test_report_and_order_ids_are_stable_and_name_only_what_we_made() -> None:
    assert report_fhir_id(12) == "r12" and report_id_from_fhir("r12") == 12
    for bad in ("12", "r012", "r", "r-1", "R12", "r1x", "r" + "9" * 19):
        assert report_id_from_fhir(bad) is None, bad
    for accession in ("240101000123", "ACC-A1.2", "ACC 1/2", "a", "X" * 16, "Ä?"):
        fhir_id = service_request_fhir_id(accession)
        assert 1 <= len(fhir_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-.") for c in fhir_id)
        assert accession_from_fhir(fhir_id) == accession, accession
    assert service_request_fhir_id("ACC-A1") == "ACC-A1" and service_request_fhir_id("ACC 1").startswith("h.")
    for bad in ("h." + "zz" * 16, "h." + "0" * 32, "h." + "41" * 17, "x" * 17, "a/b", ""):
        assert accession_from_fhir(bad) is None, bad


def test_report_and_order_search_parameters() -> None:
    search = diagnostic_report_search([("patient.identifier", "urn:oid:1.2|P1"), ("status", "final,amended"),
                                       ("study", "ImagingStudy/1.2.3"), ("date", "ge2024-01-01")])
    assert search.filters == {"PatientID": "P1", "IssuerOfPatientID": "1.2", "StudyInstanceUID": "1.2.3",
                              "StudyDate": "20240101-"}
    assert search.statuses == {"final", "amended"}
    assert diagnostic_report_search([("status", "cancelled")]).matches_nothing  # valid, but no report has it
    assert diagnostic_report_search([("category", "http://loinc.org|LP29684-5")]).matches_nothing is False
    assert diagnostic_report_search([("code", "http://loinc.org|11111-1")]).matches_nothing
    assert diagnostic_report_search([("_summary", "count"), ("_count", "5")]).count == 0
    orders = service_request_search([("identifier", "EMR-1,ACC-2"), ("status", "active")])
    assert orders.filters == {"OrderIdentifier": "EMR-1\\ACC-2"} and orders.statuses == {"active"}
    for params in ([("status", "bogus")], [("study", "Patient/1")], [("imaging-study", "1.2.x")],
                   [("_format", "xml")], [("_summary", "true")], [("identifier:exact", "A")]):
        with pytest.raises(SearchError):
            diagnostic_report_search(params, strict=False)
    with pytest.raises(SearchError, match="'patient_id'") as caught:
        diagnostic_report_search([("patient_id", "P1")], strict=True)
    assert caught.value.code == "not-supported"
    lenient = service_request_search([("patient_id", "P1")], strict=False)
    assert lenient.filters == {} and lenient.ignored == ["patient_id"] and lenient.applied == []


# -- the world -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    pacs: EmbeddedPacs
    ctx: AppContext  # the test's own view of the server's index (SQLite or PostgreSQL)
    studies: dict[str, str]  # key -> Study Instance UID
    reports: dict[str, int]  # key -> report id
    tokens: dict[str, str]  # who -> bearer token

    @property
    def url(self) -> str:
        return self.pacs.http_url


def _principal(name: str, role: Role, facility: str) -> Principal:
    return Principal(subject=name, role=role, capabilities=capabilities_of(role), scope=scope_for(role, facility),
                     facility=facility, source_address="127.0.0.1:1")


RAD_A = _principal("fr-rad-a", Role.RADIOLOGIST, "HOSP-A")
RAD_A2 = _principal("fr-rad-a2", Role.RADIOLOGIST, "HOSP-A")
RAD_B = _principal("fr-rad-b", Role.RADIOLOGIST, "HOSP-B")

# (key, facility, patient id, name, study date, accession)
STUDIES = [
    ("A1", "HOSP-A", P1, "NGUYỄN^VĂN AN", "20240305", "FR-ACC-A1"),  # final, then amended
    ("A2", "HOSP-A", P1, "NGUYỄN^VĂN AN", "20240310", "FR-ACC-A2"),  # a draft only
    ("A3", "HOSP-A", P1, "NGUYỄN^VĂN AN", "20240315", "FR-ACC-A3"),  # preliminary
    ("A4", "HOSP-A", "FR-P2", "TRẦN^THỊ BÌNH", "20240320", "FR-ACC-A4"),  # another patient, final
    ("A5", "HOSP-A", P1, "NGUYỄN^VĂN AN", "20240325", "FR-ACC-A5"),  # final, amendment still a draft
    ("B1", "HOSP-B", P1, "NGUYỄN^VĂN AN", "20240401", "FR-ACC-B1"),  # hospital B's, final
]
TEXT = {
    "v1": ("Phổi hai bên sáng, không thấy tổn thương khu trú.", "Không thấy bất thường trên CT ngực."),
    "v2": ("Nốt mờ 6 mm thùy trên phổi phải, bờ đều.", "Nốt phổi phải 6 mm, đề nghị theo dõi sau 6 tháng."),
}


def _stow(pacs: EmbeddedPacs, token: str, key: str, patient: str, name: str, day: str, accession: str) -> str:
    uid, series = generate_uid(), generate_uid()
    datasets = [make_dataset(StudyInstanceUID=uid, SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=i + 1,
                             Modality="CT", SOPClassUID=CT, PatientID=patient, IssuerOfPatientID=ISSUER,
                             PatientName=name, PatientSex="M", PatientBirthDate="19800102", StudyDate=day,
                             StudyTime="093000", AccessionNumber=accession, StudyDescription=f"CT ngực {key}")
                for i in range(2)]
    body = b"".join(f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(ds)
                    for ds in datasets) + f"\r\n--{BOUNDARY}--\r\n".encode()
    response = httpx.post(f"{pacs.http_url}/dicom-web/studies", content=body, timeout=120, headers={
        "Authorization": f"Bearer {token}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'})
    assert response.status_code == 200, response.text[:500]
    return uid


def _tx(ctx: AppContext, fn: Any, *args: Any, **kwargs: Any) -> Any:
    with ctx.sessions() as session, session.begin():
        return fn(session, *args, **kwargs)


def _reports(ctx: AppContext, studies: dict[str, str]) -> dict[str, int]:
    """The report of each study, brought to the state its comment in STUDIES says."""
    ids = {}
    for key in ("A1", "A2", "A3", "A4", "A5", "B1"):
        rad = RAD_B if key == "B1" else RAD_A
        ids[key] = _tx(ctx, lifecycle.create_draft, rad, studies[key], *TEXT["v1"], "vi").id
        if key == "A2":
            continue
        _tx(ctx, lifecycle.make_preliminary, rad, ids[key])
        if key == "A3":
            continue
        _tx(ctx, lifecycle.sign, rad, ids[key])
    _tx(ctx, lifecycle.amend, RAD_A2, ids["A1"], "Bổ sung nốt phổi", *TEXT["v2"])
    _tx(ctx, lifecycle.sign, RAD_A2, ids["A1"])
    _tx(ctx, lifecycle.amend, RAD_A2, ids["A5"], "Đang sửa", "bản nháp", "bản nháp")  # stays a draft
    return ids


def _token(ctx: AppContext, name: str, role: str, facility: str = "", patient_id: str = "", issuer: str = "") -> str:
    with ctx.sessions() as session, session.begin():
        return create_token(session, name, role, days=1, facility=facility, patient_id=patient_id,
                            issuer=issuer).secret


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root: Path = tmp_path_factory.mktemp(f"fhir-reports-{request.param}")
    database = create_database() if request.param == "postgresql" else None
    extra = {"PACS_DATABASE_URL": database[1]} if database else {}
    pacs = EmbeddedPacs(root, extra)
    ctx = AppContext.create(Settings(data_dir=root / "data", database_url=database[1])) if database else pacs.ctx
    try:
        with ctx.sessions() as session, session.begin():
            for user, full_name in (("fr-rad-a", "BS. Phạm Thị Hoa"), ("fr-rad-a2", "BS. Đỗ Minh Quân"),
                                    ("fr-rad-b", "BS. Lý Thanh")):
                create_user(session, user, "correct-horse-battery-staple-42", "radiologist", full_name=full_name,
                            facility="HOSP-B" if user.endswith("-b") else "HOSP-A")
        tokens = {"tech_a": _token(ctx, "fr-tech-a", "technologist", "HOSP-A"),
                  "tech_b": _token(ctx, "fr-tech-b", "technologist", "HOSP-B"),
                  "clinician_a": _token(ctx, "fr-clin-a", "clinician", "HOSP-A"),
                  "clinician_b": _token(ctx, "fr-clin-b", "clinician", "HOSP-B"),
                  "emr": _token(ctx, "fr-emr", "emr"),
                  "patient": _token(ctx, "fr-patient-1", "patient", "HOSP-A", patient_id=P1, issuer=ISSUER)}
        # the order of study A1 exists before its images (the EMR ordered it)
        _tx(ctx, create_order, NewOrder(
            patient_id=P1, patient_name="NGUYỄN^VĂN AN", modality="CT", station_ae_title="", start_date="20240305",
            start_time="0900", procedure_description="CT ngực có cản quang", accession_number="FR-ACC-A1",
            priority="URGENT", facility="HOSP-A", issuer_of_patient_id=ISSUER, placer_order_number="EMR-A1",
            source="api"))
        studies = {key: _stow(pacs, tokens["tech_b" if facility == "HOSP-B" else "tech_a"], key, patient, name, day,
                              accession)
                   for key, facility, patient, name, day, accession in STUDIES}

        def linked() -> bool:  # the worker links the images to their order once the series has settled
            with ctx.read_sessions() as session:
                return get_order(session, "FR-ACC-A1").linked_study_instance_uid == studies["A1"]

        wait_until(linked, timeout=60, interval=0.3, what="study A1 linked to its order")
        yield World(pacs, ctx, studies, _reports(ctx, studies), tokens)
    finally:
        if database:
            ctx.close()
        pacs.close()
        if database:
            drop_database(database[0])


# -- helpers -------------------------------------------------------------------------------------------------


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """Validate a resource (a Bundle: and each entry's resource) with the R4B models; return it."""
    MODELS[resource["resourceType"]].model_validate(resource)
    for entry in resource.get("entry", []) if resource["resourceType"] == "Bundle" else []:
        valid(entry["resource"])
    return resource


def get(world: World, path: str, who: str | None, params: Any = None,
        headers: dict[str, str] | None = None) -> httpx.Response:
    auth = {"Authorization": f"Bearer {world.tokens[who]}"} if who else {}
    return httpx.get(f"{world.url}/fhir/{path}", params=params, headers={**auth, **(headers or {})}, timeout=60)


def fhir_ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text[:800]
    assert response.headers["content-type"].startswith("application/fhir+json")
    return valid(response.json())


def fhir_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:800]
    outcome = valid(response.json())
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome["issue"][0]


def entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])]


def report_ids(bundle: dict[str, Any]) -> set[str]:
    return {r["id"] for r in entries(bundle)}


def rid(world: World, key: str) -> str:
    return report_fhir_id(world.reports[key])


def stable(resource: dict[str, Any]) -> dict[str, Any]:
    """A DiagnosticReport without the identifier of its DICOM SR, which the workers add when they have
    stored it (at any moment during a test)."""
    return {**resource, "identifier": [i for i in resource.get("identifier", []) if i.get("system") != "urn:dicom:uid"]}


def attachment(resource: dict[str, Any], content_type: str) -> dict[str, Any]:
    (found,) = [a for a in resource["presentedForm"] if a["contentType"].startswith(content_type)]
    return found


def findings(resource: dict[str, Any]) -> str:
    return base64.b64decode(attachment(resource, "text/plain")["data"]).decode("utf-8")


# -- DiagnosticReport -----------------------------------------------------------------------------------------


def test_search_by_patient_identifier_returns_the_amended_report(world: World) -> None:
    bundle = fhir_ok(get(world, "DiagnosticReport", "clinician_a", {"patient.identifier": f"urn:oid:{ISSUER}|{P1}"}))
    # A2 (a draft) is not published; B1 is hospital B's; A4 is another patient's
    assert bundle["total"] == 3 and report_ids(bundle) == {rid(world, "A1"), rid(world, "A3"), rid(world, "A5")}
    by_id = {r["id"]: r for r in entries(bundle)}
    a1, uid = by_id[rid(world, "A1")], world.studies["A1"]
    assert a1["status"] == "amended" and a1["meta"]["versionId"] == "2"
    assert a1["conclusion"] == TEXT["v2"][1] and findings(a1) == TEXT["v2"][0]
    assert a1["language"] == "vi"
    pdf = attachment(a1, "application/pdf")
    assert pdf["url"] == f"{world.url}/api/reports/{world.reports['A1']}/pdf?version=2"
    assert pdf["language"] == "vi" and "FR-ACC-A1" in pdf["title"]
    assert a1["subject"] == {"reference": f"Patient/{patient_fhir_id(P1, ISSUER)}"}
    assert a1["imagingStudy"] == [{"reference": f"ImagingStudy/{uid}"}]
    assert a1["basedOn"] == [{"reference": "ServiceRequest/FR-ACC-A1"}]
    assert {"system": "http://loinc.org", "code": "LP29684-5", "display": "Radiology"} in a1["category"][0]["coding"]
    assert a1["code"]["coding"][0]["code"] == "18748-4" and a1["code"]["text"] == "CT ngực có cản quang"
    assert [i["value"] for i in a1["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"] \
        == ["FR-ACC-A1"]
    assert a1["effectiveDateTime"] == "2024-03-05" and a1["issued"].endswith("Z")
    assert a1["performer"] == [{"type": "Practitioner", "display": "BS. Đỗ Minh Quân"}]
    assert a1["resultsInterpreter"] == [{"type": "Practitioner", "display": "BS. Đỗ Minh Quân"}]
    assert a1["extension"] == [{"url": VIEWER_URL_EXTENSION, "valueUrl": f"{world.url}/viewer/studies/{uid}"}]
    # the preliminary report: issued when made preliminary, performed (so far) by its author
    a3 = by_id[rid(world, "A3")]
    assert a3["status"] == "preliminary" and a3["performer"][0]["display"] == "BS. Phạm Thị Hoa"
    # the report whose amendment is still a draft shows its signed version
    a5 = by_id[rid(world, "A5")]
    assert (a5["status"], a5["meta"]["versionId"], a5["conclusion"]) == ("final", "1", TEXT["v1"][1])
    # the references resolve: Patient, ImagingStudy (with the same viewer link), ServiceRequest
    patient = fhir_ok(get(world, a1["subject"]["reference"], "clinician_a"))
    assert patient["identifier"][0]["value"] == P1
    study = fhir_ok(get(world, f"ImagingStudy/{uid}", "clinician_a"))
    assert study["extension"] == a1["extension"]
    order = fhir_ok(get(world, "ServiceRequest/FR-ACC-A1", "clinician_a"))
    assert order["status"] == "active" and order["priority"] == "urgent"
    # the EMR's service account (no facility) also sees hospital B's report; the search by reference too
    emr = fhir_ok(get(world, "DiagnosticReport", "emr", {"patient": f"Patient/{patient_fhir_id(P1, ISSUER)}"}))
    assert report_ids(emr) == {rid(world, k) for k in ("A1", "A3", "A5", "B1")}
    assert stable(fhir_ok(get(world, f"DiagnosticReport/{rid(world, 'A1')}", "clinician_a"))) == stable(a1)


def test_history_holds_the_final_and_the_amended_versions(world: World) -> None:
    history = fhir_ok(get(world, f"DiagnosticReport/{rid(world, 'A1')}/_history", "clinician_a"))
    assert history["type"] == "history" and history["total"] == 2
    newest, first = entries(history)
    assert (newest["meta"]["versionId"], newest["status"], findings(newest)) == ("2", "amended", TEXT["v2"][0])
    assert (first["meta"]["versionId"], first["status"], findings(first)) == ("1", "final", TEXT["v1"][0])
    assert first["conclusion"] == TEXT["v1"][1] and first["performer"][0]["display"] == "BS. Phạm Thị Hoa"
    assert attachment(first, "application/pdf")["url"].endswith("?version=1")
    assert [e["response"]["location"] for e in history["entry"]] == [
        f"DiagnosticReport/{rid(world, 'A1')}/_history/2", f"DiagnosticReport/{rid(world, 'A1')}/_history/1"]
    vread = fhir_ok(get(world, f"DiagnosticReport/{rid(world, 'A1')}/_history/1", "clinician_a"))
    assert stable(vread) == stable(first)
    for version in ("3", "0", "x"):
        fhir_error(get(world, f"DiagnosticReport/{rid(world, 'A1')}/_history/{version}", "clinician_a"), 404)
    # an amendment still in draft is not a version yet
    a5 = fhir_ok(get(world, f"DiagnosticReport/{rid(world, 'A5')}/_history", "clinician_a"))
    assert [(r["meta"]["versionId"], r["status"]) for r in entries(a5)] == [("1", "final")]


def test_drafts_are_invisible(world: World) -> None:
    a2 = rid(world, "A2")
    for who in ("clinician_a", "emr"):
        for path in (f"DiagnosticReport/{a2}", f"DiagnosticReport/{a2}/_history", f"DiagnosticReport/{a2}/_history/1"):
            assert fhir_error(get(world, path, who), 404)["code"] == "not-found"
        for params in ({"study": world.studies["A2"]}, {"imaging-study": f"ImagingStudy/{world.studies['A2']}"},
                       {"_id": a2}, {"identifier": "FR-ACC-A2"}):
            assert fhir_ok(get(world, "DiagnosticReport", who, params))["total"] == 0, params
    # ... while the same searches find a published report
    assert report_ids(fhir_ok(get(world, "DiagnosticReport", "clinician_a",
                                  {"imaging-study": f"ImagingStudy/{world.studies['A1']}"}))) == {rid(world, "A1")}
    assert report_ids(fhir_ok(get(world, "DiagnosticReport", "clinician_a", {"identifier": "FR-ACC-A3"}))) == {
        rid(world, "A3")}


def test_status_and_date_searches(world: World) -> None:
    def found(params: dict[str, str]) -> set[str]:
        return report_ids(fhir_ok(get(world, "DiagnosticReport", "clinician_a", params)))

    assert found({"status": "preliminary"}) == {rid(world, "A3")}
    assert found({"status": "final,amended", "patient.identifier": P1}) == {rid(world, "A1"), rid(world, "A5")}
    assert found({"status": "cancelled"}) == set()
    assert found({"date": "2024-03-05"}) == {rid(world, "A1")}
    assert found({"date": "ge2024-03-15", "category": "http://loinc.org|LP29684-5"}) == {
        rid(world, "A3"), rid(world, "A4"), rid(world, "A5")}
    fhir_error(get(world, "DiagnosticReport", "clinician_a", {"status": "signed"}), 400)
    # paging: newest report first, next link
    page = fhir_ok(get(world, "DiagnosticReport", "clinician_a", {"_count": "2"}))
    assert page["total"] == 4 and len(page["entry"]) == 2
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert parse_qs(urlsplit(links["next"]).query)["_offset"] == ["2"]
    rest = fhir_ok(httpx.get(links["next"], headers={"Authorization": f"Bearer {world.tokens['clinician_a']}"},
                             timeout=60))
    assert report_ids(page) | report_ids(rest) == {rid(world, k) for k in ("A1", "A3", "A4", "A5")}
    counted = fhir_ok(get(world, "DiagnosticReport", "clinician_a", {"_summary": "count"}))
    assert counted["total"] == 4 and "entry" not in counted


def test_patient_token_sees_only_its_own_signed_reports(world: World) -> None:
    bundle = fhir_ok(get(world, "DiagnosticReport", "patient", {}))
    # its own final / amended reports; not A3 (preliminary), A2 (draft), A4 (another patient), nor B1: a patient
    # token is bound to one facility's patient record (issue 12, finding 5)
    assert report_ids(bundle) == {rid(world, k) for k in ("A1", "A5")}
    assert fhir_ok(get(world, f"DiagnosticReport/{rid(world, 'A1')}", "patient"))["status"] == "amended"
    assert len(entries(fhir_ok(get(world, f"DiagnosticReport/{rid(world, 'A1')}/_history", "patient")))) == 2
    for key in ("A2", "A3", "A4", "B1"):
        fhir_error(get(world, f"DiagnosticReport/{rid(world, key)}", "patient"), 404)
    assert fhir_ok(get(world, "DiagnosticReport", "patient", {"patient.identifier": "FR-P2"}))["total"] == 0
    assert fhir_ok(get(world, "DiagnosticReport", "patient", {"_id": rid(world, "A4")}))["total"] == 0
    assert get(world, "ServiceRequest", "patient").status_code == 403  # no study.search without --images


def test_another_facility_gets_404_and_empty_searches(world: World) -> None:
    a1 = rid(world, "A1")
    for path in (f"DiagnosticReport/{a1}", f"DiagnosticReport/{a1}/_history", f"DiagnosticReport/{a1}/_history/2",
                 "ServiceRequest/FR-ACC-A1"):
        assert fhir_error(get(world, path, "clinician_b"), 404)["code"] == "not-found", path
    assert report_ids(fhir_ok(get(world, "DiagnosticReport", "clinician_b", {"patient.identifier": P1}))) == {
        rid(world, "B1")}
    for params in ({"_id": a1}, {"study": world.studies["A1"]}, {"identifier": "FR-ACC-A1"}):
        response = get(world, "DiagnosticReport", "clinician_b", params)
        assert fhir_ok(response) == {"resourceType": "Bundle", "type": "searchset", "total": 0}, params
    assert fhir_ok(get(world, "ServiceRequest", "clinician_b", {"identifier": "EMR-A1"}))["total"] == 0
    fhir_error(get(world, "DiagnosticReport/12", "clinician_a"), 404)  # not an id we make


def test_reads_and_searches_are_audited(world: World) -> None:
    with world.ctx.sessions() as session:
        last = session.scalar(select(AuditEvent.id).order_by(AuditEvent.id.desc()).limit(1)) or 0
    fhir_ok(get(world, f"DiagnosticReport/{rid(world, 'A1')}", "clinician_a"))
    fhir_ok(get(world, "DiagnosticReport", "clinician_a", {"patient.identifier": P1}))
    get(world, f"DiagnosticReport/{rid(world, 'A1')}", "clinician_b")
    with world.ctx.sessions() as session:
        rows = session.execute(select(AuditEvent.action, AuditEvent.actor, AuditEvent.outcome, AuditEvent.patient_id,
                                      AuditEvent.study_instance_uid).where(AuditEvent.id > last,
                                                                           AuditEvent.action.like("fhir.%"))
                               .order_by(AuditEvent.id)).all()
    assert [tuple(r) for r in rows] == [
        ("fhir.read", "token:fr-clin-a", "success", P1, world.studies["A1"]),
        ("fhir.search", "token:fr-clin-a", "success", P1, ""),
        ("fhir.read", "token:fr-clin-b", "failure", "", ""),
    ]


# -- strict search parameters ---------------------------------------------------------------------------------


def test_unknown_search_parameters_are_refused_unless_lenient(world: World) -> None:
    for kind in ("ImagingStudy", "Patient", "DiagnosticReport", "ServiceRequest"):
        issue = fhir_error(get(world, kind, "emr", {"patient_id": P1}), 400)
        assert issue["code"] == "not-supported" and "'patient_id'" in issue["diagnostics"], kind
        lenient = fhir_ok(get(world, kind, "emr", {"patient_id": P1, "_count": "1"},
                              {"Prefer": "return=representation, handling=lenient"}))
        assert lenient["total"] >= 1, kind
        self_link = next(link["url"] for link in lenient["link"] if link["relation"] == "self")
        assert "patient_id" not in self_link, kind
    # lenient ignores the unknown name only: an unsupported modifier on a known one is refused either way
    issue = fhir_error(get(world, "DiagnosticReport", "emr", {"identifier:exact": "X"},
                           {"Prefer": "handling=lenient"}), 400)
    assert "identifier:exact" in issue["diagnostics"]
    assert fhir_error(get(world, "ImagingStudy", "emr", {"patient_id": P1}, {"Prefer": "handling=strict"}), 400)
    assert fhir_error(get(world, "DiagnosticReport", "emr", {"_format": "xml"}), 400)["code"] == "not-supported"
    assert fhir_ok(get(world, "DiagnosticReport", "emr", {"_format": "json", "_pretty": "true"}))["total"] == 5


def test_capability_statement_lists_the_new_resources(world: World) -> None:
    statement = fhir_ok(get(world, "metadata", "emr"))
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {i["code"] for i in resources["DiagnosticReport"]["interaction"]} == {
        "read", "vread", "history-instance", "search-type"}
    assert {i["code"] for i in resources["ServiceRequest"]["interaction"]} == {"read", "search-type", "create"}
    assert {"patient.identifier", "study", "status", "_count", "_summary"} <= {
        p["name"] for p in resources["DiagnosticReport"]["searchParam"]}
    assert "handling=lenient" in statement["rest"][0]["documentation"]


# -- ServiceRequest ---------------------------------------------------------------------------------------------


def post(world: World, who: str, body: Any, content_type: str = "application/fhir+json") -> httpx.Response:
    import json

    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode("utf-8")
    return httpx.post(f"{world.url}/fhir/ServiceRequest", content=content, timeout=60, headers={
        "Authorization": f"Bearer {world.tokens[who]}", "Content-Type": content_type})


def order_body(accession: str = "", placer: str = "EMR-ORD-77", **changes: Any) -> dict[str, Any]:
    identifiers = [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                         "code": "PLAC"}]}, "system": "urn:oid:9.9.9", "value": placer}]
    if accession:
        identifiers.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                 "code": "ACSN"}]}, "value": accession})
    body = {
        "resourceType": "ServiceRequest",
        "contained": [{"resourceType": "Patient", "id": "pat",
                       "identifier": [{"system": f"urn:oid:{ISSUER}", "value": "FR-P9"}],
                       "name": [{"family": "Nguyễn", "given": ["Thị", "Minh Khai"]}],
                       "gender": "female", "birthDate": "1990-07-15"}],
        "identifier": identifiers,
        "status": "active", "intent": "order", "priority": "stat",
        "category": [{"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]}],
        "code": {"text": "CT ngực không cản quang"},
        "subject": {"reference": "#pat"},
        "occurrenceDateTime": "2026-12-01T09:30:00+07:00",
        "requester": {"display": "BS. Lê Văn Cường"},
        "reasonCode": [{"text": "Ho kéo dài 3 tuần"}],
    }
    body.update(changes)
    return body


def test_create_service_request_places_the_order(world: World) -> None:
    response = post(world, "tech_a", order_body("FR-NEW-1"))
    assert response.status_code == 201, response.text[:800]
    created = valid(response.json())
    assert created["id"] == "FR-NEW-1" and created["status"] == "active"
    assert response.headers["location"] == f"{world.url}/fhir/ServiceRequest/FR-NEW-1"
    with world.ctx.sessions() as session:
        order = get_order(session, "FR-NEW-1")
    when = datetime.fromisoformat("2026-12-01T09:30:00+07:00").astimezone()  # the server's local time
    assert (order.patient_id, order.issuer_of_patient_id, order.patient_name) == ("FR-P9", ISSUER,
                                                                                  "Nguyễn^Thị Minh Khai")
    assert (order.patient_birth_date, order.patient_sex) == ("19900715", "F")
    assert (order.requested_procedure_description, order.modality, order.priority) == (
        "CT ngực không cản quang", "CT", "STAT")
    assert (order.reason, order.referring_physician_name) == ("Ho kéo dài 3 tuần", "BS. Lê Văn Cường")
    assert (order.scheduled_start_date, order.scheduled_start_time) == (when.strftime("%Y%m%d"),
                                                                        when.strftime("%H%M%S"))
    assert (order.facility, order.placer_order_number, order.source, order.state) == (
        "HOSP-A", "EMR-ORD-77", "fhir", "scheduled")
    # read back and found by either identifier and by patient
    read = fhir_ok(get(world, "ServiceRequest/FR-NEW-1", "clinician_a"))
    assert read == created
    assert read["subject"]["display"] == "Nguyễn Thị Minh Khai" and read["priority"] == "stat"
    assert read["subject"]["reference"] == f"Patient/{patient_fhir_id('FR-P9', ISSUER)}"
    for params in ({"identifier": "EMR-ORD-77"}, {"identifier": "FR-NEW-1"},
                   {"patient.identifier": f"urn:oid:{ISSUER}|FR-P9"}, {"_id": "FR-NEW-1"},
                   {"identifier:of-type": "http://terminology.hl7.org/CodeSystem/v2-0203|PLAC|EMR-ORD-77"},
                   {"identifier": "EMR-ORD-77", "status": "active"}):
        assert [r["id"] for r in entries(fhir_ok(get(world, "ServiceRequest", "clinician_a", params)))] == [
            "FR-NEW-1"], params
    assert fhir_ok(get(world, "ServiceRequest", "clinician_a", {"identifier": "EMR-ORD-77",
                                                                "status": "completed"}))["total"] == 0
    assert fhir_ok(get(world, "ServiceRequest", "clinician_b", {"identifier": "EMR-ORD-77"}))["total"] == 0
    with world.ctx.sessions() as session:
        audited = session.scalars(select(AuditEvent).where(AuditEvent.action == "order.create",
                                                           AuditEvent.patient_id == "FR-P9")).all()
    assert [(e.actor, e.outcome) for e in audited] == [("token:fr-tech-a", "success")]
    # a retried POST (same placer order number) orders nothing twice; an accession in use is a conflict
    assert fhir_error(post(world, "tech_a", order_body("FR-NEW-2")), 409)["code"] == "duplicate"
    assert fhir_error(post(world, "tech_a", order_body("FR-NEW-1", placer="EMR-ORD-78")), 409)["code"] == "duplicate"


def test_create_with_an_inline_subject_and_a_performer_facility(world: World) -> None:
    body = order_body(placer="EMR-ORD-90", contained=None,
                      subject={"identifier": {"system": "urn:oid:5.6.7", "value": "FR-P10"},
                               "display": "TRẦN^THỊ BÌNH"},
                      category=None, code={"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                       "code": "MR", "display": "Magnetic Resonance"}]},
                      priority=None, occurrenceDateTime="2026-12-02",
                      performer=[{"type": "Organization", "display": "HOSP-B"}])
    body = {k: v for k, v in body.items() if v is not None}
    response = post(world, "emr", body)  # the EMR's account has no facility: the performer names it
    assert response.status_code == 201, response.text[:800]
    created = valid(response.json())
    with world.ctx.sessions() as session:
        order = get_order(session, accession_from_fhir(created["id"]) or "")
    assert (order.patient_id, order.issuer_of_patient_id, order.patient_name) == ("FR-P10", "5.6.7", "TRẦN^THỊ BÌNH")
    assert (order.modality, order.requested_procedure_description, order.priority) == (
        "MR", "Magnetic Resonance", "ROUTINE")
    assert (order.facility, order.scheduled_start_date, order.source) == ("HOSP-B", "20261202", "fhir")
    assert len(order.accession_number) == 12  # generated
    assert fhir_ok(get(world, f"ServiceRequest/{created['id']}", "clinician_b"))["id"] == created["id"]
    fhir_error(get(world, f"ServiceRequest/{created['id']}", "clinician_a"), 404)
    # a facility's account always orders for its own facility, whatever the performer says
    without_identifiers = {k: v for k, v in body.items() if k != "identifier"}
    response = post(world, "tech_a", without_identifiers)
    assert response.status_code == 201, response.text[:800]
    with world.ctx.sessions() as session:
        assert get_order(session, accession_from_fhir(response.json()["id"]) or "").facility == "HOSP-A"


def test_invalid_service_requests_are_refused(world: World) -> None:
    good = order_body(placer="EMR-BAD")
    cases: list[tuple[Any, int]] = [
        (b"{not json", 400), (b"[1, 2]", 400), ({"resourceType": "Patient"}, 400),
        ({**good, "unknownElement": 1}, 400), ({**good, "status": "draft"}, 400), ({**good, "intent": "plan"}, 400),
        ({k: v for k, v in good.items() if k != "subject"}, 400),
        ({**good, "subject": {"reference": "Patient/123"}}, 400),
        ({**good, "subject": {"reference": "#nobody"}}, 400),
        ({**good, "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]}}, 400),
        ({**good, "priority": "whenever"}, 400),
        ({**good, "occurrenceDateTime": "2026-12"}, 400),
        ({**good, "identifier": [{"type": {"coding": [{"code": "ACSN"}]}, "value": "A\\B"}]}, 400),
    ]
    for body, status in cases:
        issue = fhir_error(post(world, "tech_a", body), status)
        assert issue["code"] == "invalid", body
    assert fhir_error(post(world, "tech_a", good, content_type="text/plain"), 415)["code"] == "not-supported"
    # a clinician may read orders but not place them: the security layer's 403
    response = post(world, "clinician_a", good)
    assert response.status_code == 403 and response.json()["code"] == "forbidden"
    with world.ctx.sessions() as session:
        assert session.scalar(select(AuditEvent.id).where(AuditEvent.action == "order.create",
                                                          AuditEvent.outcome == "failure")) is not None
