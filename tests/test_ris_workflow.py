"""The radiology workflow from outside only (issue: reports, must-show 1 and 3), embedded and scaled.

An EMR sends ORM^O01 over MLLP → a modality (pynetdicom) finds the order on the worklist and reports MPPS
in progress → DCMTK storescu sends the images → the study is on the reading list with the order's priority →
radiologist A claims it (B's claim is refused), drafts, signs, later amends with a reason and signs again →
the EMR's MLLP receiver gets two ORU^R01 (final, then corrected) → FHIR DiagnosticReport by patient
identifier is ``amended`` with its final version in ``_history`` (every resource validated with
``fhir.resources``) → DCMTK findscu finds the SR in the study, dciodvfy has no error for it and its text is
the signed text → the PDF (pdftotext) has the Vietnamese name and findings exactly.

Faults: the EMR's endpoint down → the ORU waits and arrives once it is back; ``pacs serve`` killed right after
signing → after the restart the SR, the FHIR resource and the ORU each appear exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind
from sqlalchemy import func, select

from bench.generate_ct import write_ct_series
from pacs.aes import add_ae
from pacs.db.models import Instance, Series, Study
from pacs.reports.models import Hl7Outbound, ReportVersion
from pacs.reports.sr import report_text_from_sr
from pacs.ris.orders import get_order
from pacs.security.accounts import create_token
from tests.support.dcmtk import dcmtk, dcmtk_env, storescu
from tests.support.hl7_peers import EmrReceiver, send_mllp
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import PacsProcess
from tests.support.stack import EmbeddedPacs, ScaledStack, scaled_api

pytestmark = pytest.mark.integration

FINDINGS = "Không thấy tổn thương khu trú. Gan lách bình thường.\nPhổi hai bên sáng đều."
IMPRESSION = "Chưa thấy bất thường trên phim CT."
AMENDED = "Nốt mờ 4 mm thùy trên phổi phải, cần theo dõi."


class Ris:
    """The archive under test, the EMR's receiver, and tokens of two radiologists and a clinician."""

    def __init__(self, server: EmbeddedPacs | ScaledStack, emr: EmrReceiver, hl7_port: int) -> None:
        self.server, self.emr, self.hl7_port = server, emr, hl7_port
        with server.ctx.sessions() as session, session.begin():
            add_ae(session, "CT01", "127.0.0.1", 104, facility="HOSP-A")
            add_ae(session, "FINDSCU", "127.0.0.1", 104, facility="HOSP-A")
            self.tokens = {name: create_token(session, name, role, days=1, facility="HOSP-A").secret
                           for name, role in (("rad-a", "radiologist"), ("rad-b", "radiologist"),
                                              ("clin", "clinician"))}

    def http(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.http_url, timeout=60,
                            headers={"Authorization": f"Bearer {self.tokens[who]}"})


def _hl7_env(emr_port: int, hl7_port: int) -> dict[str, str]:
    return {"PACS_HL7_PORT": str(hl7_port), "PACS_HL7_DESTINATIONS": json.dumps({"emr": f"127.0.0.1:{emr_port}"}),
            "PACS_HL7_POLL_S": "0.5", "PACS_HL7_RETRY_BASE_S": "0.5", "PACS_HL7_RETRY_MAX_S": "2",
            # a message a killed process had claimed waits out its lease before the next process takes it
            "PACS_HL7_LEASE_S": "5",
            "PACS_FACILITY_NAMES": json.dumps({"HOSP-A": "Bệnh viện Đa khoa Tỉnh"})}


@pytest.fixture(scope="module", params=["embedded", "scaled"])
def ris(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ris]:
    emr = EmrReceiver().start()
    hl7_port = free_port()
    root = tmp_path_factory.mktemp(f"ris-{request.param}")
    env = _hl7_env(emr.port, hl7_port)
    listener: PacsProcess | None = None
    if request.param == "scaled":
        server: EmbeddedPacs | ScaledStack = scaled_api(root, request.getfixturevalue("s3_server"), extra_env=env)
        listener = PacsProcess(["hl7", "listen"], server.env, root / "hl7.log").start()  # orders in, ORU out
        wait_until(lambda: _port_open(hl7_port), timeout=60, interval=0.3, what="pacs hl7 listen")
    else:
        server = EmbeddedPacs(root, env)
    try:
        yield Ris(server, emr, hl7_port)
    finally:
        if listener is not None:
            listener.stop()
        server.close()
        emr.stop()


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _orm(accession: str, patient_id: str, placer: str) -> str:
    now = datetime.now().strftime("%Y%m%d%H%M%S")
    return "\r".join([
        f"MSH|^~\\&|EMR|HOSP-A|PACS|RAD|{now}||ORM^O01|{uuid.uuid4().hex[:20]}|P|2.5.1|||||VNM|UNICODE UTF-8",
        f"PID|1||{patient_id}^^^BV-A||Nguyễn^Văn An||19800115|M",
        f"ORC|NW|{placer}|{accession}||||^^^^^S||{now}|||BS001^Phạm^Minh",
        f"OBR|1|{placer}|{accession}|CTNGUC^CT ngực không tiêm|||{now}||||||||BS001^Phạm^Minh|||||||||CT||||||"
        "||||Ho kéo dài 3 tuần",
    ])


def _worklist(port: int, accession: str) -> list[Dataset]:
    query = Dataset()
    query.PatientName = query.PatientID = query.StudyInstanceUID = query.RequestedProcedureDescription = ""
    query.AccessionNumber = accession
    step = Dataset()
    step.Modality = step.ScheduledStationAETitle = step.ScheduledProcedureStepStartDate = ""
    query.ScheduledProcedureStepSequence = Sequence([step])
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established
    try:
        return [identifier for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind)
                if status and status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()


def _mpps_in_progress(port: int, item: Dataset) -> int:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID = item.PatientName, item.PatientID
    scheduled = Dataset()
    scheduled.AccessionNumber = item.AccessionNumber
    scheduled.StudyInstanceUID = item.StudyInstanceUID
    scheduled.RequestedProcedureID = scheduled.ScheduledProcedureStepID = ""
    ds.ScheduledStepAttributesSequence = Sequence([scheduled])
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate = datetime.now().strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = "090000"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = Sequence()
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, pydicom.uid.generate_uid())
        return int(status.Status)
    finally:
        assoc.release()


def _acquire(ris: Ris, tmp: Path, accession: str, patient_id: str) -> str:
    """Order over HL7 → worklist → MPPS → images by storescu; returns the Study Instance UID."""
    ack = send_mllp(ris.hl7_port, _orm(accession, patient_id, f"EMR-{accession}"))
    assert str(ack.segment("MSA")[1]) == "AA", str(ack)
    items = _worklist(ris.server.port, accession)
    assert len(items) == 1 and str(items[0].PatientName) == "Nguyễn^Văn An"
    item = items[0]
    assert _mpps_in_progress(ris.server.port, item) == 0
    with ris.server.ctx.read_sessions() as session:
        order = get_order(session, accession)
    assert (order.state, order.priority, order.source, order.facility) == ("in-progress", "STAT", "hl7", "HOSP-A")
    files = write_ct_series(tmp / accession, slices=4, size=64, patient_name=str(item.PatientName),
                            patient_id=str(item.PatientID), study_uid=str(item.StudyInstanceUID),
                            accession_number=accession)
    sent = storescu(ris.server.port, files, aet="CT01")
    assert sent.success, sent.output[-2000:]
    return str(item.StudyInstanceUID)


def _sr_uid(ris: Ris, report_id: int, version: int) -> str:
    with ris.server.ctx.read_sessions() as session:
        return session.scalar(select(ReportVersion.sr_sop_instance_uid).where(
            ReportVersion.report_fk == report_id, ReportVersion.version == version)) or ""


def _stored(ris: Ris, sop_uid: str) -> bytes:
    with ris.server.ctx.read_sessions() as session:
        key = session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop_uid))
    assert key, f"{sop_uid} is not indexed"
    return ris.server.ctx.store.get_bytes(key)


def _findscu_series(ris: Ris, tmp: Path, study: str) -> list[Dataset]:
    out = tmp / f"find-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    cmd = [dcmtk("findscu"), "-S", "-aet", "FINDSCU", "-aec", "PACS", "-X", "-od", str(out),
           "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}", "-k", "SeriesInstanceUID",
           "-k", "Modality", "127.0.0.1", str(ris.server.port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_order_to_amended_report_from_outside(ris: Ris, tmp_path: Path) -> None:
    accession = f"W{uuid.uuid4().hex[:8].upper()}"
    patient_id = f"PW-{accession}"
    study = _acquire(ris, tmp_path, accession, patient_id)

    with ris.http("rad-a") as rad_a, ris.http("rad-b") as rad_b, ris.http("clin") as clin:
        def listed() -> dict | None:
            return next((i for i in rad_a.get("/api/reading-list").json() if i["study_instance_uid"] == study), None)

        wait_until(lambda: (listed() or {}).get("number_of_instances") == 4 and listed()["priority"] == "STAT",
                   timeout=90, interval=0.5, what="the study on the reading list with its order's priority")
        assert listed()["procedure"] == "CT ngực không tiêm"
        assert rad_a.post(f"/api/studies/{study}/claim").status_code == 200
        refused = rad_b.post(f"/api/studies/{study}/claim")
        assert refused.status_code == 409 and refused.json()["code"] == "conflict"

        rid = rad_a.post(f"/api/studies/{study}/reports", json={"findings": FINDINGS, "impression": IMPRESSION,
                                                                "language": "vi"}).json()["id"]
        assert rad_a.post(f"/api/reports/{rid}/sign").json()["status"] == "final"
        wait_until(lambda: bool(_sr_uid(ris, rid, 1)), timeout=90, interval=0.5, what="the final report's SR")
        amended = rad_a.post(f"/api/reports/{rid}/amend", json={"reason": "Bổ sung nốt phổi", "findings": AMENDED,
                                                                "impression": IMPRESSION})
        assert amended.status_code == 200, amended.text
        assert rad_a.post(f"/api/reports/{rid}/sign").json()["status"] == "amended"

        # HL7: two ORU^R01, final then corrected, both acknowledged
        wait_until(lambda: len(_orus(ris, accession)) >= 2, timeout=90, interval=0.5, what="two ORU^R01")
        orus = _orus(ris, accession)
        assert len(orus) == 2
        assert [str(m.segment("OBR")[25]) for m in orus] == ["F", "C"]
        assert str(orus[0].segment("PID")[3][0][0]) == patient_id
        texts = ["\n".join(str(obx[5]) for obx in m.segments("OBX")) for m in orus]
        assert "Gan lách bình thường." in texts[0] and "Nốt mờ 4 mm" in texts[1]
        wait_until(lambda: _outbound_states(ris, rid) == ["sent", "sent"], timeout=30, interval=0.3,
                   what="both ORU rows acknowledged")

        # FHIR for the EMR
        bundle = clin.get("/fhir/DiagnosticReport", params={"patient.identifier": patient_id})
        assert bundle.status_code == 200, bundle.text
        parsed = Bundle.model_validate(bundle.json())
        assert len(parsed.entry) == 1
        resource = bundle.json()["entry"][0]["resource"]
        DiagnosticReport.model_validate(resource)
        assert resource["status"] == "amended" and resource["conclusion"] == IMPRESSION
        history = clin.get(f"/fhir/DiagnosticReport/{resource['id']}/_history")
        Bundle.model_validate(history.json())
        statuses = [e["resource"]["status"] for e in history.json()["entry"]]
        assert sorted(statuses) == ["amended", "final"]

        # the SR in the study: C-FIND, dciodvfy, text
        wait_until(lambda: bool(_sr_uid(ris, rid, 2)), timeout=90, interval=0.5, what="the amended report's SR")
        series = _findscu_series(ris, tmp_path, study)
        assert sorted(str(s.Modality) for s in series) == ["CT", "SR"]
        for version, text in ((1, FINDINGS), (2, AMENDED)):
            sr_bytes = _stored(ris, _sr_uid(ris, rid, version))
            path = tmp_path / f"sr{version}.dcm"
            path.write_bytes(sr_bytes)
            check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert not errors, check.stdout + check.stderr
            assert report_text_from_sr(pydicom.dcmread(path)) == (text, IMPRESSION)

        # the PDF
        pdf = clin.get(f"/api/reports/{rid}/pdf")
        assert pdf.status_code == 200
        (tmp_path / "report.pdf").write_bytes(pdf.content)
        text = subprocess.run(["pdftotext", "-layout", str(tmp_path / "report.pdf"), "-"], capture_output=True,
                              text=True, timeout=60, check=True).stdout
        assert "Nguyễn Văn An" in text and "Nốt mờ 4 mm thùy trên phổi phải, cần theo dõi." in text
        assert "Bệnh viện Đa khoa Tỉnh" in text


def _orus(ris: Ris, accession: str) -> list:
    return [m for m in ris.emr.of_type("ORU") if str(m.segment("OBR")[3][0][0]) == accession
            or accession in str(m.segment("OBR")[3])]


def _outbound_states(ris: Ris, report_id: int) -> list[str]:
    with ris.server.ctx.read_sessions() as session:
        return list(session.scalars(select(Hl7Outbound.state).where(Hl7Outbound.report_fk == report_id)
                                    .order_by(Hl7Outbound.report_version)))


@pytest.fixture(scope="module")
def embedded_ris(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ris]:
    """A `pacs serve` of its own: the crash drill kills it."""
    emr = EmrReceiver().start()
    hl7_port = free_port()
    server = EmbeddedPacs(tmp_path_factory.mktemp("ris-crash"), _hl7_env(emr.port, hl7_port))
    ris = Ris(server, emr, hl7_port)
    try:
        yield ris
    finally:
        server.close()
        ris.emr.stop()


def test_emr_down_then_back_and_a_crash_right_after_signing(embedded_ris: Ris, tmp_path: Path) -> None:
    ris = embedded_ris
    assert isinstance(ris.server, EmbeddedPacs)
    accession = f"F{uuid.uuid4().hex[:8].upper()}"
    study = _acquire(ris, tmp_path, accession, f"PF-{accession}")
    wait_until(lambda: _has_images(ris, study), timeout=90, interval=0.5, what="the images indexed")

    ris.emr.stop()  # the EMR's endpoint is down
    with ris.http("rad-a") as rad:
        rid = rad.post(f"/api/studies/{study}/reports", json={"findings": FINDINGS, "impression": IMPRESSION}).json()[
            "id"]
        assert rad.post(f"/api/reports/{rid}/sign").status_code == 200
    ris.server.proc.proc.send_signal(signal.SIGKILL)  # killed right after signing
    ris.server.proc.proc.wait(timeout=30)
    ris.server.restart()

    wait_until(lambda: _attempts(ris, rid) >= 1, timeout=60, interval=0.5, what="a failed ORU attempt")
    assert _outbound_states(ris, rid) == ["pending"] and _orus(ris, accession) == []
    ris.emr = EmrReceiver(port=ris.emr.port).start()  # back
    wait_until(lambda: _outbound_states(ris, rid) == ["sent"], timeout=60, interval=0.5, what="the ORU delivered")
    wait_until(lambda: bool(_sr_uid(ris, rid, 1)), timeout=60, interval=0.5, what="the SR after the restart")
    assert len(_orus(ris, accession)) == 1
    with ris.server.ctx.read_sessions() as session:
        srs = session.scalar(select(func.count(Instance.id)).join(Series, Series.id == Instance.series_fk)
                             .join(Study, Study.id == Series.study_fk)
                             .where(Study.study_instance_uid == study, Series.modality == "SR"))
    assert srs == 1
    with ris.http("clin") as clin:
        found = clin.get("/fhir/DiagnosticReport", params={"patient.identifier": f"PF-{accession}"}).json()
    assert len(found["entry"]) == 1 and found["entry"][0]["resource"]["status"] == "final"


def _has_images(ris: Ris, study: str) -> bool:
    with ris.server.ctx.read_sessions() as session:
        return (session.scalar(select(Study.number_of_instances).where(Study.study_instance_uid == study)) or 0) == 4


def _attempts(ris: Ris, report_id: int) -> int:
    with ris.server.ctx.read_sessions() as session:
        return session.scalar(select(func.max(Hl7Outbound.attempts)).where(Hl7Outbound.report_fk == report_id)) or 0
