"""The radiologist's HTTP API against a live `pacs serve` (SPEC §6 stable paths): orders, reading list,
claims, the report lifecycle, refusals (JSON and audited), the PDF, key images, templates.

Two facilities: HOSP-A's study arrives from modality MODA, HOSP-B's from MODB. Tokens per role and facility.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs.db.models import AuditEvent
from pacs.reports.models import ReportVersion
from tests.support.facilities import FacilityArchive, json_error
from tests.support.net import wait_until
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

FINDINGS = "Không thấy tổn thương khu trú. Gan lách bình thường.\nKhông có dịch ổ bụng."
IMPRESSION = "Không thấy bất thường."
MARKUP = "<script>alert(1)</script> <b>đậm</b> **sao** & |^~\\"


class Archive(FacilityArchive):
    def __init__(self, server: EmbeddedPacs) -> None:
        super().__init__(server)
        self.study_a, self.sops_a = self.send_study("MODA", "PAT-A", "Nguyễn^Văn An", "ACC-A1")
        self.study_b, _ = self.send_study("MODB", "PAT-B", "BRAVO^BINH", "ACC-B1")
        self.add_tokens(("rad-a", "radiologist", "HOSP-A"), ("rad-a2", "radiologist", "HOSP-A"),
                        ("rad-b", "radiologist", "HOSP-B"), ("clin-a", "clinician", "HOSP-A"),
                        ("tech-a", "technologist", "HOSP-A"), ("tech-b", "technologist", "HOSP-B"),
                        ("emr", "emr", ""), ("admin", "admin", ""),
                        ("patient-a", "patient", "HOSP-A", {"patient_id": "PAT-A"}))

    def send_study(self, aet: str, patient_id: str, name: str, accession: str) -> tuple[str, list[str]]:
        study, series, sops = generate_uid(), generate_uid(), []
        for i in range(2):
            pixels = (np.arange(256, dtype=np.uint16) * (i + 1)).astype(np.uint16)
            ds = self.send_instance(aet, StudyInstanceUID=study, SeriesInstanceUID=series,
                                    SOPInstanceUID=generate_uid(), PatientID=patient_id, PatientName=name,
                                    AccessionNumber=accession, InstanceNumber=i + 1, StudyDate="20261205",
                                    StudyDescription="CT bụng", BitsAllocated=16, BitsStored=12, HighBit=11,
                                    PixelData=pixels.tobytes())
            sops.append(ds.SOPInstanceUID)
        return study, sops

    def failures(self, action: str) -> list[str]:
        with self.server.ctx.read_sessions() as session:
            return list(session.scalars(select(AuditEvent.actor).where(AuditEvent.action == action,
                                                                       AuditEvent.outcome == "failure")))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    with Archive.serving(tmp_path_factory.mktemp("reports-api")) as archive:
        yield archive


def test_report_lifecycle_over_http_with_every_refusal_audited(archive: Archive) -> None:
    study = archive.study_a
    with archive.http("rad-a") as rad_a, archive.http("rad-a2") as rad_a2, archive.http("rad-b") as rad_b, \
            archive.http("clin-a") as clin, archive.http("tech-a") as tech, archive.http("patient-a") as patient:
        listed = rad_a.get("/api/reading-list")
        assert listed.status_code == 200 and listed.headers["X-Total-Count"] == "1"
        item = listed.json()[0]
        assert (item["study_instance_uid"], item["priority"], item["claimed_by"]) == (study, "ROUTINE", None)
        assert item["patient_name"] == "Nguyễn^Văn An" and item["modalities"] == ["CT"]
        assert [i["study_instance_uid"] for i in rad_b.get("/api/reading-list").json()] == [archive.study_b]

        assert rad_a.post(f"/api/studies/{study}/claim").json()["claimed_by"] == "token:rad-a"
        json_error(rad_a2.post(f"/api/studies/{study}/claim"), 409)
        assert rad_a.get("/api/reading-list").json()[0]["claimed_by"] == "token:rad-a"
        json_error(rad_b.post(f"/api/studies/{study}/reports", json={"findings": "x", "impression": "y"}), 404)

        created = rad_a.post(f"/api/studies/{study}/reports", json={"findings": MARKUP, "impression": IMPRESSION,
                                                                    "language": "vi"})
        assert created.status_code == 201, created.text
        report = created.json()
        assert (report["status"], report["version"]) == ("draft", 1) and report["id"]
        rid = report["id"]
        assert created.headers["Location"] == f"/api/reports/{rid}"
        shown = rad_a.get(f"/api/reports/{rid}")
        assert shown.json()["findings"] == MARKUP  # markup is stored and returned as text
        assert shown.headers["content-type"].startswith("application/json")
        json_error(rad_a2.put(f"/api/reports/{rid}", json={"findings": "x", "impression": "y"}), 403)
        json_error(clin.get(f"/api/reports/{rid}"), 404)  # a draft is the radiologist's own
        json_error(tech.get(f"/api/reports/{rid}"), 403)  # technologists do not read reports
        assert rad_a.put(f"/api/reports/{rid}", json={"findings": FINDINGS, "impression": IMPRESSION}).json()[
            "findings"] == FINDINGS
        assert rad_a.post(f"/api/reports/{rid}/preliminary").json()["status"] == "preliminary"
        assert clin.get(f"/api/reports/{rid}").json()["status"] == "preliminary"
        json_error(patient.get(f"/api/reports/{rid}"), 404)  # a patient sees signed reports only
        json_error(clin.post(f"/api/reports/{rid}/sign"), 403)  # a clinician cannot sign

        signed = rad_a.post(f"/api/reports/{rid}/sign")
        assert signed.status_code == 200, signed.text
        assert signed.json()["status"] == "final" and signed.json()["versions"][0]["signed_by"] == "token:rad-a"
        assert rad_a.get("/api/reading-list").json() == []  # reported: off the list
        for attempt in (lambda: rad_a.put(f"/api/reports/{rid}", json={"findings": "x", "impression": "y"}),
                        lambda: rad_a.post(f"/api/reports/{rid}/sign"),
                        lambda: rad_a.post(f"/api/reports/{rid}/preliminary")):
            json_error(attempt(), 409)  # nobody changes a final version by any call
        json_error(clin.post(f"/api/reports/{rid}/amend", json={"reason": "x", "findings": "a", "impression": "b"}),
                   403)
        json_error(rad_a.post(f"/api/reports/{rid}/amend", json={"findings": "a", "impression": "b"}), 400)  # no reason

        amended = rad_a2.post(f"/api/reports/{rid}/amend", json={"reason": "Bổ sung kết luận", "findings": FINDINGS,
                                                                  "impression": "Gan to nhẹ."})
        assert amended.status_code == 200 and amended.json()["version"] == 2
        assert rad_a2.post(f"/api/reports/{rid}/sign").json()["status"] == "amended"
        seen = patient.get(f"/api/reports/{rid}").json()
        assert seen["status"] == "amended" and [v["status"] for v in seen["versions"]] == ["final", "amended"]
        assert seen["versions"][0]["findings"] == FINDINGS and seen["impression"] == "Gan to nhẹ."
        listed = patient.get(f"/api/studies/{study}/reports").json()
        assert [r["id"] for r in listed] == [rid]
        json_error(rad_b.get(f"/api/reports/{rid}"), 404)
        json_error(rad_b.get(f"/api/studies/{study}/reports"), 404)

    # API tokens act as "token:NAME"
    assert archive.failures("study.claim") == ["token:rad-a2"]
    assert set(archive.failures("report.create")) == {"token:rad-b"}
    assert {"token:rad-a2", "token:rad-a"} <= set(archive.failures("report.edit"))
    assert {"token:clin-a", "token:rad-b", "token:patient-a"} <= set(archive.failures("report.read"))
    with archive.server.ctx.read_sessions() as session:  # 403s are audited by the security layer
        denied = set(session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "access.denied")))
    assert {"token:tech-a", "token:clin-a"} <= denied


def test_signed_report_becomes_an_sr_in_the_study_and_a_pdf(archive: Archive, tmp_path: Path) -> None:
    study, _ = archive.send_study("MODA", "PAT-A2", "Trần^Thị Bích", "ACC-A2")
    with archive.http("rad-a") as rad, archive.http("clin-a") as clin:
        rid = rad.post(f"/api/studies/{study}/reports", json={"findings": FINDINGS, "impression": IMPRESSION,
                                                              "language": "vi"}).json()["id"]
        json_error(clin.get(f"/api/reports/{rid}/pdf"), 404)  # nothing published yet
        assert rad.post(f"/api/reports/{rid}/sign").status_code == 200

        def sr_stored() -> str:
            with archive.server.ctx.read_sessions() as session:
                return session.scalar(select(ReportVersion.sr_sop_instance_uid).where(
                    ReportVersion.report_fk == rid)) or ""

        wait_until(lambda: bool(sr_stored()), timeout=60, interval=0.3, what="the report's SR")
        found = clin.get(f"/dicom-web/studies/{study}/instances", params={"SOPInstanceUID": sr_stored()}).json()
        assert len(found) == 1 and found[0]["00080060"]["Value"] == ["SR"]

        pdf = clin.get(f"/api/reports/{rid}/pdf")
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        (tmp_path / "r.pdf").write_bytes(pdf.content)
        text = subprocess.run(["pdftotext", "-layout", str(tmp_path / "r.pdf"), "-"], capture_output=True,
                              text=True, timeout=60, check=True).stdout
        assert "Trần Thị Bích" in text
        assert "Không thấy tổn thương khu trú. Gan lách bình thường." in text
        assert IMPRESSION in text


def test_orders_api_scoped_by_facility(archive: Archive) -> None:
    body = {"patient": {"id": "PAT-O1", "name": "Lê^Thị Hoa", "birth_date": "1980-02-03", "sex": "F",
                        "issuer": "BV-A"},
            "modality": "CT", "procedure": "CT ngực có tiêm", "priority": "STAT", "reason": "Ho kéo dài",
            "referring_physician": "Phạm^Minh", "placer_order_number": "EMR-1"}
    with archive.http("tech-a") as tech_a, archive.http("tech-b") as tech_b, archive.http("clin-a") as clin, \
            archive.http("emr") as emr:
        created = tech_a.post("/api/orders", json=body)
        assert created.status_code == 201, created.text
        order = created.json()
        assert order["priority"] == "STAT" and order["facility"] == "HOSP-A" and order["state"] == "scheduled"
        assert order["patient"]["name"] == "Lê^Thị Hoa" and order["patient"]["birth_date"] == "19800203"
        accession = order["accession_number"]
        assert created.headers["Location"] == f"/api/orders/{accession}"
        assert tech_a.get(f"/api/orders/{accession}").json()["reason"] == "Ho kéo dài"
        json_error(tech_b.get(f"/api/orders/{accession}"), 404)
        assert accession not in {o["accession_number"] for o in tech_b.get("/api/orders").json()}
        assert accession in {o["accession_number"] for o in clin.get("/api/orders").json()}
        json_error(clin.post("/api/orders", json=body), 403)
        json_error(tech_a.post("/api/orders", json={**body, "facility": "HOSP-B"}), 400)
        json_error(tech_a.post("/api/orders", json={**body, "priority": "SOON"}), 400)
        json_error(tech_a.post("/api/orders", json={**body, "accession_number": accession}), 409)
        json_error(tech_a.post("/api/orders", json={"patient": {"id": "x"}}), 400)
        assert emr.post("/api/orders", json={**body, "facility": "HOSP-B"}).json()["facility"] == "HOSP-B"
        assert tech_a.post(f"/api/orders/{accession}/cancel").json()["state"] == "discontinued"
        json_error(tech_a.post(f"/api/orders/{accession}/cancel"), 409)


def test_key_images_are_stored_as_a_kos_in_the_study(archive: Archive) -> None:
    with archive.http("rad-a") as rad, archive.http("rad-b") as rad_b, archive.http("clin-a") as clin:
        json_error(rad.post(f"/api/studies/{archive.study_a}/key-images", json={"instances": [archive.study_b]}), 400)
        json_error(rad_b.post(f"/api/studies/{archive.study_a}/key-images", json={"instances": archive.sops_a}), 404)
        made = rad.post(f"/api/studies/{archive.study_a}/key-images", json={"instances": archive.sops_a[:1],
                                                                              "description": "Ảnh chính"})
        assert made.status_code == 201, made.text
        kos = made.json()["sop_instance_uid"]
        found = clin.get(f"/dicom-web/studies/{archive.study_a}/instances", params={"SOPInstanceUID": kos}).json()
        assert len(found) == 1 and found[0]["00080060"]["Value"] == ["KO"]
        listed = clin.get(f"/api/studies/{archive.study_a}/key-images").json()
        assert [k["sop_instance_uid"] for k in listed] == [kos]
        assert [i["sop_instance_uid"] for i in listed[0]["instances"]] == archive.sops_a[:1]


def test_templates_in_both_languages(archive: Archive) -> None:
    with archive.http("rad-a") as rad, archive.http("clin-a") as clin:
        vi = rad.get("/api/report-templates", params={"lang": "vi", "modality": "CT", "procedure": "CT ngực"}).json()
        en = rad.get("/api/report-templates", params={"lang": "en", "modality": "CT"}).json()
        assert vi[0]["id"] == "ct-chest" and "phổi" in vi[0]["findings"]
        assert {t["id"] for t in en} == {t["id"] for t in vi} and en[0]["language"] == "en"
        assert rad.get("/api/report-templates", params={"modality": "DX"}).json()[0]["id"] == "xr-chest"
        json_error(rad.get("/api/report-templates", params={"lang": "fr"}), 400)
        json_error(clin.get("/api/report-templates"), 403)
