"""Rejecting and restoring instances (issue 15, must-show 3 and 5; IHE IOCM): a live `pacs serve`, real DCMTK
findscu/movescu/getscu/storescu, dciodvfy.

- a rejected series is gone at once from QIDO-RS (study, series, instance levels), C-FIND, WADO-RS/URI, the series
  metadata, FHIR ImagingStudy and C-MOVE/C-GET; its rejection note is stored and valid (dciodvfy), listed for an
  admin; a re-send of a rejected instance is refused with 0xA771; a restore brings it all back and deletes the note;
- a whole study rejected by a radiologist (quality) is gone from QIDO-RS, C-FIND, FHIR and the reading list;
- a registered modality's rejection note sent with storescu rejects too (and storage commitment counts the note as
  stored); another facility's modality and an unregistered peer (even for the images it sent itself) are refused;
- a rejection note sent over STOW-RS is held to the sending account's rights: an EMR account, a radiologist with a
  patient-safety title and another facility's technologist are refused (0xA900, audited, nothing rejected); the
  study's facility's technologist rejects;
- a study with a signed report whose images are all rejected is gone from QIDO-RS, C-FIND and FHIR ImagingStudy,
  but its report and the report's PDF still answer for its facility's clinician;
- a partly restored rejection is kept by a new note (the old one deleted); `pacs reindex` on a copy of the index
  ends with the same rejections, and `pacs check` sees rejected objects and notes as referenced;
- refusals (clinician, radiologist with patient-safety, another facility even when the study is shared with it,
  unknown study, unknown series) write nothing and are audited.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs.ae_scope import ae_scope
from pacs.aes import add_ae, lookup
from pacs.commitment.service import SopRef, evaluate
from pacs.db import migrate
from pacs.db.engine import make_engine, make_session_factory
from pacs.db.models import AuditEvent, Instance, Series, Study
from pacs.maintenance.check import ProblemKind, check
from pacs.maintenance.reindex import reindex
from pacs.reports.models import ReportVersion
from pacs.security.access import share_study
from pacs.studies.models import RejectedInstance, RejectionNote
from tests.support.datasets import to_bytes
from tests.support.dcmtk import ReferenceStoreSCP, dcmtk, dcmtk_env, findscu_datasets, storescu
from tests.support.facilities import FacilityArchive, json_error
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.seaweed import SeaweedS3
from tests.support.stack import EmbeddedPacs, scaled_api

pytestmark = pytest.mark.integration

QUALITY_TITLE = Code("113001", "DCM", "Rejected for Quality Reasons")
PATIENT_SAFETY_TITLE = Code("113037", "DCM", "Rejected for Patient Safety Reasons")
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


class Archive(FacilityArchive):
    def __init__(self, server: EmbeddedPacs, root: Path) -> None:
        super().__init__(server)
        self.root = root
        self.add_tokens(("tech-a", "technologist", "HOSP-A"), ("tech-b", "technologist", "HOSP-B"),
                        ("rad-a", "radiologist", "HOSP-A"), ("clin-a", "clinician", "HOSP-A"),
                        ("emr-a", "emr", "HOSP-A"), ("admin", "admin", ""))
        self.dest = ReferenceStoreSCP(root / "dest", free_port(), "DESTSCP").start()
        with server.ctx.sessions() as session, session.begin():
            for title, port in (("QUERYSCU", 104), ("MOVESCU", 104), ("GETSCU", 104), ("DESTSCP", self.dest.port)):
                add_ae(session, title, "127.0.0.1", port, archive_wide=True)
        # s1: a kept CT series and an MR series to reject
        self.s1, self.kept, self.bad = generate_uid(), generate_uid(), generate_uid()
        self.kept_sops = [self.send_instance("MODA", PatientID="REJ-1", StudyInstanceUID=self.s1,
                                             SeriesInstanceUID=self.kept, InstanceNumber=n).SOPInstanceUID
                          for n in (1, 2)]
        self.bad_ds = [self.send_instance("MODA", PatientID="REJ-1", StudyInstanceUID=self.s1, Modality="MR",
                                          SeriesInstanceUID=self.bad, SeriesNumber=2, InstanceNumber=n)
                       for n in (1, 2)]
        self.bad_sops = [ds.SOPInstanceUID for ds in self.bad_ds]
        # s2: a study a radiologist rejects whole
        self.s2 = self.send_instance("MODA", PatientID="REJ-2").StudyInstanceUID
        # s3: a modality rejects one of its own images
        self.s3 = generate_uid()
        self.s3_ds = [self.send_instance("MODA", PatientID="REJ-3", StudyInstanceUID=self.s3, InstanceNumber=n)
                      for n in (1, 2)]
        # s4: three instances, two rejected, one of them restored
        self.s4, self.s4_series = generate_uid(), generate_uid()
        self.s4_sops = [self.send_instance("MODA", PatientID="REJ-4", StudyInstanceUID=self.s4,
                                           SeriesInstanceUID=self.s4_series, InstanceNumber=n).SOPInstanceUID
                        for n in (1, 2, 3)]

        # s5: rejected and restored with the command line
        self.s5 = generate_uid()
        self.s5_sops = [self.send_instance("MODA", PatientID="REJ-5", StudyInstanceUID=self.s5,
                                           InstanceNumber=n).SOPInstanceUID for n in (1, 2)]
        # s6: an unregistered peer's study (of no facility); s7: rejection notes over STOW-RS; s8: a reported study
        self.s6_ds = self.send_instance("LOOSE", PatientID="REJ-6")
        self.s7 = generate_uid()
        self.s7_ds = [self.send_instance("MODA", PatientID="REJ-7", StudyInstanceUID=self.s7, InstanceNumber=n)
                      for n in (1, 2)]
        self.s8 = self.send_instance("MODA", PatientID="REJ-8").StudyInstanceUID

    def call(self, method: str, who: str, path: str, **kw: Any) -> Any:
        with self.http(who) as client:
            return client.request(method, path, **kw)

    def qido(self, path: str, **params: str) -> list[dict[str, Any]]:
        found = self.call("GET", "admin", f"/dicom-web/{path}", params=params)
        assert found.status_code in (200, 204), found.text
        return found.json() if found.status_code == 200 else []

    def audit_count(self, action: str, outcome: str) -> int:
        with self.server.ctx.read_sessions() as session:
            return session.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.action == action, AuditEvent.outcome == outcome)) or 0

    def note_row(self, uid: str) -> RejectionNote | None:
        with self.server.ctx.read_sessions() as session:
            return session.scalars(select(RejectionNote).where(RejectionNote.sop_instance_uid == uid)).one_or_none()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("rejection")
    server = EmbeddedPacs(root)
    archive = None
    try:
        archive = Archive(server, root)
        yield archive
    finally:
        if archive is not None:
            archive.dest.stop()
        server.close()


def uid_values(rows: list[dict[str, Any]], tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in rows if r.get(tag, {}).get("Value")}


def findscu(archive: Archive, keys: list[str]) -> list[Dataset]:
    return findscu_datasets(archive.server.port, archive.root / f"rsp-{uuid.uuid4().hex[:8]}", keys)


def movescu(archive: Archive, study_uid: str) -> set[str]:
    archive.dest.clear()
    proc = subprocess.run([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aec", "PACS", "-aem", "DESTSCP",
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                           "127.0.0.1", str(archive.server.port)], capture_output=True, env=dcmtk_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archive.dest.received()}


def getscu(archive: Archive, study_uid: str, series_uid: str) -> set[str]:
    out = archive.root / f"get-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    subprocess.run([dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", "PACS", "-od", str(out),
                    "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
                    "-k", f"SeriesInstanceUID={series_uid}", "127.0.0.1", str(archive.server.port)],
                   capture_output=True, env=dcmtk_env(), timeout=120)
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def modality_note(path: Path, rejected: Dataset, unknown: bool = False, title: Code = QUALITY_TITLE) -> Path:
    """A modality's own IOCM rejection note (highdicom directly, not the archive's builder); ``unknown``: it also
    names an instance the archive never received."""
    evidence = [copy.deepcopy(rejected)]
    if unknown:
        evidence.append(copy.deepcopy(rejected))
        evidence[1].SOPInstanceUID = generate_uid()
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "StudyTime", "AccessionNumber",
                    "ReferringPhysicianName"):  # Type 2 attributes highdicom reads unguarded
        for ds in evidence:
            setattr(ds, keyword, ds.get(keyword, ""))
    note = KeyObjectSelectionDocument(
        evidence=evidence, content=KeyObjectSelection(document_title=title, referenced_objects=evidence),
        series_instance_uid=generate_uid(), series_number=99, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="Modality")
    note.save_as(path, enforce_file_format=True)
    return path


# -- must-show 3: a series rejected is gone everywhere at once, and comes back ------------------------------------


def test_reject_series_hides_it_everywhere_and_restore_brings_it_back(archive: Archive, tmp_path: Path) -> None:
    s1, bad = archive.s1, archive.bad
    assert movescu(archive, s1) == {*archive.kept_sops, *archive.bad_sops}
    answer = archive.call("POST", "tech-a", f"/api/studies/{s1}/reject", json={"reason": "quality", "series": [bad]})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert sorted(result["rejected"]) == sorted(archive.bad_sops) and result["reason"] == "quality"
    note_uid = result["note_sop_instance_uid"]

    # QIDO-RS at every level
    studies = archive.qido("studies", StudyInstanceUID=s1, includefield="NumberOfStudyRelatedSeries")
    assert len(studies) == 1
    assert studies[0]["00201206"]["Value"] == [1] and studies[0]["00080061"]["Value"] == ["CT"]
    assert uid_values(archive.qido(f"studies/{s1}/series"), "0020000E") == {archive.kept}
    assert uid_values(archive.qido(f"studies/{s1}/instances"), "00080018") == set(archive.kept_sops)
    assert not archive.qido("instances", SOPInstanceUID=archive.bad_sops[0])
    # C-FIND (DCMTK findscu) at series level
    found = findscu(archive, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s1}", "SeriesInstanceUID"])
    assert {str(ds.SeriesInstanceUID) for ds in found} == {archive.kept}
    # WADO-RS, WADO-URI, series metadata: 404; the study metadata lists only the kept instances
    gone = archive.bad_sops[0]
    json_error(archive.call("GET", "admin", f"/dicom-web/studies/{s1}/series/{bad}/instances/{gone}"), 404)
    assert archive.call("GET", "admin", "/wado", params={"requestType": "WADO", "studyUID": s1, "seriesUID": bad,
                                                          "objectUID": gone}).status_code == 404
    assert archive.call("GET", "admin", f"/dicom-web/studies/{s1}/series/{bad}/metadata").status_code == 404
    metadata = archive.call("GET", "admin", f"/dicom-web/studies/{s1}/metadata")
    assert metadata.status_code == 200, metadata.text
    assert uid_values(metadata.json(), "00080018") == set(archive.kept_sops)
    # FHIR ImagingStudy
    fhir = archive.call("GET", "admin", f"/fhir/ImagingStudy/{s1}")
    assert fhir.status_code == 200, fhir.text
    assert fhir.json()["numberOfSeries"] == 1 and fhir.json()["numberOfInstances"] == 2
    # C-MOVE and C-GET send nothing of it
    assert movescu(archive, s1) == set(archive.kept_sops)
    assert getscu(archive, s1, bad) == set()
    assert getscu(archive, s1, archive.kept) == set(archive.kept_sops)

    # the note is stored, valid, and the admin sees what it rejected
    note = archive.note_row(note_uid)
    assert note is not None and note.reason == "quality" and note.study_instance_uid == s1
    path = tmp_path / "note.dcm"
    path.write_bytes(archive.server.ctx.store.get_bytes(note.object_key))
    assert not dciodvfy_errors(path)
    stored = pydicom.dcmread(path)
    assert stored.ConceptNameCodeSequence[0].CodeValue == "113001" and stored.StudyInstanceUID == s1
    listed = archive.call("GET", "admin", "/api/rejected", params={"study": s1})
    assert listed.status_code == 200, listed.text
    assert {(i["sop_instance_uid"], i["series_instance_uid"], i["reason"], i["rejected_by"], i["note_sop_instance_uid"])
            for i in listed.json()} == {(sop, bad, "quality", "token:tech-a", note_uid) for sop in archive.bad_sops}
    assert all(i["rejected_at"] for i in listed.json())
    assert not archive.call("GET", "tech-b", "/api/rejected", params={"study": s1}).json()  # scope applies

    # a re-send of a rejected instance is refused (0xA771), not archived again
    resend = archive.bad_ds[0]
    resend_path = tmp_path / "resend.dcm"
    resend.save_as(resend_path, enforce_file_format=True)
    sent = storescu(archive.server.port, [resend_path], aet="MODA")
    assert sent.status == 0xA771, sent.output[-2000:]
    assert "0xa771" in sent.output.lower() and sent.error_comment
    boundary = "rejection-test"
    body = (f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(archive.bad_ds[1])
            + f"\r\n--{boundary}--\r\n".encode())
    stow = archive.call("POST", "tech-a", "/dicom-web/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    assert stow.status_code == 409, stow.text
    [failed] = stow.json()["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [archive.bad_sops[1]] and failed["00081197"]["Value"] == [0xA771]
    assert not archive.qido("instances", SOPInstanceUID=gone)

    # restore: back everywhere, the note deleted from the store and the index
    restored = archive.call("POST", "tech-a", f"/api/studies/{s1}/restore", json={"series": [bad]})
    assert restored.status_code == 200, restored.text
    assert sorted(restored.json()["restored"]) == sorted(archive.bad_sops)
    assert restored.json()["notes_deleted"] == [note_uid] and restored.json()["notes_created"] == []
    assert uid_values(archive.qido(f"studies/{s1}/series"), "0020000E") == {archive.kept, bad}
    studies = archive.qido("studies", StudyInstanceUID=s1)
    assert set(studies[0]["00080061"]["Value"]) == {"CT", "MR"}
    wado = archive.call("GET", "admin", f"/dicom-web/studies/{s1}/series/{bad}/instances/{gone}",
                        headers={"Accept": "multipart/related; type=\"application/dicom\""})
    assert wado.status_code == 200
    assert movescu(archive, s1) == {*archive.kept_sops, *archive.bad_sops}
    assert archive.note_row(note_uid) is None
    assert not archive.server.ctx.store.exists(note.object_key)
    assert archive.audit_count("instance.reject", "success") >= 1
    assert archive.audit_count("instance.restore", "success") >= 1


def test_whole_study_rejected_by_a_radiologist_is_gone_from_lists(archive: Archive) -> None:
    s2 = archive.s2
    reading = archive.call("GET", "rad-a", "/api/reading-list", params={"limit": 500})
    assert s2 in {i["study_instance_uid"] for i in reading.json()}
    answer = archive.call("POST", "rad-a", f"/api/studies/{s2}/reject", json={"reason": "quality"})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["rejected"]) == 1

    assert not archive.qido("studies", StudyInstanceUID=s2)
    assert not findscu(archive, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={s2}"])
    assert not findscu(archive, ["QueryRetrieveLevel=STUDY", "PatientID=REJ-2", "StudyInstanceUID"])
    fhir = archive.call("GET", "admin", f"/fhir/ImagingStudy/{s2}")
    assert fhir.status_code == 404 and fhir.json()["resourceType"] == "OperationOutcome"
    reading = archive.call("GET", "rad-a", "/api/reading-list", params={"limit": 500})
    assert s2 not in {i["study_instance_uid"] for i in reading.json()}
    json_error(archive.call("GET", "admin", f"/dicom-web/studies/{s2}/metadata"), 404)

    restored = archive.call("POST", "rad-a", f"/api/studies/{s2}/restore")
    assert restored.status_code == 200, restored.text
    assert len(restored.json()["restored"]) == 1
    assert len(archive.qido("studies", StudyInstanceUID=s2)) == 1
    assert archive.call("GET", "admin", f"/fhir/ImagingStudy/{s2}").status_code == 200


def test_a_modalitys_rejection_note_over_storescu(archive: Archive, tmp_path: Path) -> None:
    first, second = archive.s3_ds
    # another facility's modality may not reject HOSP-A's images: refused, nothing rejected
    foreign = storescu(archive.server.port, [modality_note(tmp_path / "foreign.dcm", second)], aet="MODB")
    assert foreign.status == 0xA900, foreign.output[-2000:]
    # an unregistered peer never rejects: neither another sender's images...
    stranger = storescu(archive.server.port, [modality_note(tmp_path / "stranger.dcm", second)], aet="NOBODY")
    assert stranger.status == 0xA900, stranger.output[-2000:]
    # ...nor even the images it sent itself (its AE title proves nothing: anyone could claim it)
    loose = storescu(archive.server.port, [modality_note(tmp_path / "loose.dcm", archive.s6_ds)], aet="LOOSE")
    assert loose.status == 0xA900, loose.output[-2000:]
    assert "not registered" in (loose.error_comment or "")
    assert uid_values(archive.qido("instances", StudyInstanceUID=archive.s6_ds.StudyInstanceUID),
                      "00080018") == {archive.s6_ds.SOPInstanceUID}
    # the registered modality of the study's facility rejects its image
    own = storescu(archive.server.port, [modality_note(tmp_path / "own.dcm", first, unknown=True)], aet="MODA")
    assert own.status == 0x0000, own.output[-2000:]
    assert uid_values(archive.qido(f"studies/{archive.s3}/instances"), "00080018") == {second.SOPInstanceUID}
    with archive.server.ctx.read_sessions() as session:
        rows = list(session.scalars(select(RejectedInstance).where(RejectedInstance.study_instance_uid == archive.s3)))
        moda_scope = ae_scope(lookup(session, "MODA"))
        modb_scope = ae_scope(lookup(session, "MODB"))
    assert [(r.sop_instance_uid, r.reason, r.rejected_by) for r in rows] == [(first.SOPInstanceUID, "quality", "MODA")]
    # the note itself never shows as an instance; the instance it names that the archive never had is audited
    note_uid = rows[0].note_sop_instance_uid
    assert not archive.qido("instances", SOPInstanceUID=note_uid)
    with archive.server.ctx.read_sessions() as session:
        applied = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.reject",
                                                           AuditEvent.study_instance_uid == archive.s3)).all()
    assert [(e.outcome, e.actor) for e in applied] == [("failure", "MODB"), ("failure", "NOBODY"), ("success", "MODA")]
    assert "count=1" in applied[2].detail and "ignored=1" in applied[2].detail
    assert archive.audit_count("instance.reject", "failure") >= 3
    # storage commitment: the modality's note is stored (for it; another facility's AE is told nothing)
    ctx = archive.server.ctx
    committed = evaluate(ctx.read_sessions, ctx.store, [SopRef(KOS, note_uid)], scope=moda_scope)
    assert committed.success == (SopRef(KOS, note_uid),) and not committed.failed
    assert [f.reason for f in evaluate(ctx.read_sessions, ctx.store, [SopRef(KOS, note_uid)],
                                       scope=modb_scope).failed] == [0x0112]


def stow(archive: Archive, who: str, note: Path) -> Any:
    boundary = "note-boundary"
    body = (f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + note.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    return archive.call("POST", who, "/dicom-web/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})


def test_a_rejection_note_over_stow_needs_the_senders_right_to_reject(archive: Archive, tmp_path: Path) -> None:
    first, second = archive.s7_ds
    failures = archive.audit_count("instance.reject", "failure")
    for who, title in (("emr-a", QUALITY_TITLE), ("rad-a", PATIENT_SAFETY_TITLE), ("tech-b", QUALITY_TITLE)):
        answer = stow(archive, who, modality_note(tmp_path / f"{who}.dcm", first, title=title))
        assert answer.status_code == 409, (who, answer.text)
        [failed] = answer.json()["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [0xA900], who
    assert archive.audit_count("instance.reject", "failure") == failures + 3
    with archive.server.ctx.read_sessions() as session:
        refused = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "instance.reject", AuditEvent.outcome == "failure",
            AuditEvent.actor.in_(["token:emr-a", "token:rad-a", "token:tech-b"]),
            AuditEvent.study_instance_uid == archive.s7)).all()
        assert {e.actor for e in refused} == {"token:emr-a", "token:rad-a", "token:tech-b"}
        assert any("may not reject" in e.detail for e in refused if e.actor == "token:emr-a")
        assert session.scalar(select(func.count()).select_from(RejectedInstance).where(
            RejectedInstance.study_instance_uid == archive.s7)) == 0
        assert session.scalar(select(func.count()).select_from(RejectionNote).where(
            RejectionNote.study_instance_uid == archive.s7)) == 0
    assert uid_values(archive.qido(f"studies/{archive.s7}/instances"), "00080018") == {
        first.SOPInstanceUID, second.SOPInstanceUID}

    applied = stow(archive, "tech-a", modality_note(tmp_path / "tech-a.dcm", first))
    assert applied.status_code == 200, applied.text
    assert uid_values(archive.qido(f"studies/{archive.s7}/instances"), "00080018") == {second.SOPInstanceUID}
    listed = archive.call("GET", "admin", "/api/rejected", params={"study": archive.s7}).json()
    assert [(i["sop_instance_uid"], i["rejected_by"]) for i in listed] == [(first.SOPInstanceUID, "token:tech-a")]


def test_a_reported_study_with_every_image_rejected_keeps_its_report(archive: Archive) -> None:
    s8 = archive.s8
    with archive.http("rad-a") as rad:
        rid = rad.post(f"/api/studies/{s8}/reports", json={"findings": "Không có bất thường.",
                                                           "impression": "Bình thường", "language": "vi"}).json()["id"]
        assert rad.post(f"/api/reports/{rid}/sign").status_code == 200

    def sr_stored() -> bool:
        with archive.server.ctx.read_sessions() as session:
            return bool(session.scalar(select(ReportVersion.sr_sop_instance_uid).where(ReportVersion.report_fk == rid)))

    wait_until(sr_stored, timeout=60, interval=0.3, what="the report's SR")  # the SR is one of the study's objects
    answer = archive.call("POST", "tech-a", f"/api/studies/{s8}/reject", json={"reason": "quality"})
    assert answer.status_code == 200 and len(answer.json()["rejected"]) == 2, answer.text
    with archive.server.ctx.read_sessions() as session:
        assert session.scalar(select(Study.number_of_instances).where(Study.study_instance_uid == s8)) == 0

    # gone wherever the study is listed as images
    assert not archive.qido("studies", StudyInstanceUID=s8)
    assert not archive.qido("studies", PatientID="REJ-8")
    assert not findscu(archive, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={s8}"])
    assert not findscu(archive, ["QueryRetrieveLevel=PATIENT", "PatientID=REJ-8"])
    assert archive.call("GET", "clin-a", f"/fhir/ImagingStudy/{s8}").status_code == 404
    json_error(archive.call("GET", "clin-a", f"/dicom-web/studies/{s8}/metadata"), 404)
    # its signed report still reaches the facility's clinician, with its PDF
    with archive.http("clin-a") as clin:
        reports = clin.get(f"/api/studies/{s8}/reports")
        assert reports.status_code == 200, reports.text
        assert [r["id"] for r in reports.json()] == [rid]
        pdf = clin.get(f"/api/reports/{rid}/pdf")
        assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
        assert pdf.content.startswith(b"%PDF")


def test_partial_restore_keeps_a_new_note_and_reindex_and_check_agree(archive: Archive, tmp_path: Path) -> None:
    a, b, c = archive.s4_sops
    answer = archive.call("POST", "tech-a", f"/api/studies/{archive.s4}/reject",
                          json={"reason": "patient-safety", "instances": [a, b]})
    assert answer.status_code == 200, answer.text
    old_note = answer.json()["note_sop_instance_uid"]
    old_key = archive.note_row(old_note).object_key  # type: ignore[union-attr]
    restored = archive.call("POST", "tech-a", f"/api/studies/{archive.s4}/restore", json={"instances": [a]})
    assert restored.status_code == 200, restored.text
    assert restored.json()["restored"] == [a] and restored.json()["notes_deleted"] == [old_note]
    [new_note] = restored.json()["notes_created"]
    assert archive.note_row(old_note) is None and not archive.server.ctx.store.exists(old_key)
    listed = archive.call("GET", "admin", "/api/rejected", params={"study": archive.s4, "reason": "patient-safety"})
    assert [(i["sop_instance_uid"], i["note_sop_instance_uid"]) for i in listed.json()] == [(b, new_note)]
    assert uid_values(archive.qido(f"studies/{archive.s4}/instances"), "00080018") == {a, c}

    # pacs check: rejected objects and notes are referenced, not orphans
    summary = check(archive.server.ctx.read_sessions, archive.server.ctx.store)
    assert summary.ok, summary.errors
    assert not [p for p in summary.problems if p.kind is ProblemKind.ORPHAN]

    # pacs reindex into an empty copy of the index ends with the same rejections
    engine = make_engine(f"sqlite:///{tmp_path / 'rebuilt.sqlite3'}")
    migrate.upgrade(engine)
    rebuilt = make_session_factory(engine)
    result = reindex(rebuilt, archive.server.ctx.store)
    assert result.complete and result.rejection_notes >= 1
    with archive.server.ctx.read_sessions() as live, rebuilt() as copy:
        def rejections(session: Any) -> set[tuple[str, str, str]]:
            return {(r.sop_instance_uid, r.reason, r.note_sop_instance_uid)
                    for r in session.scalars(select(RejectedInstance))}

        def notes(session: Any) -> set[str]:
            return set(session.scalars(select(RejectionNote.sop_instance_uid)))

        assert rejections(copy) == rejections(live) and notes(copy) == notes(live)
        assert b in {r[0] for r in rejections(copy)}
        assert copy.scalar(select(Instance.id).where(Instance.sop_instance_uid == b)) is None
        assert copy.scalar(select(Instance.id).where(Instance.sop_instance_uid.in_(notes(copy)))) is None
        counts = copy.execute(select(Study.number_of_instances, Series.number_of_instances)
                              .join(Series, Series.study_fk == Study.id)
                              .where(Study.study_instance_uid == archive.s4)).one()
        assert tuple(counts) == (2, 2)
    engine.dispose()


def test_command_line_reject_list_restore(archive: Archive) -> None:
    """`pacs study reject` as a process; `study rejected` and `study restore` in-process (the same commands)."""
    s5, (first, second) = archive.s5, archive.s5_sops
    env = archive.server.env
    done = run_pacs(["study", "reject", s5, "--reason", "incorrect-worklist-entry", "--instance", first, "--json"],
                    env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rejected"] == [first]
    listed = invoke_pacs(["study", "rejected", "--study", s5, "--json"], env)
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["sop_instance_uid"] == first and row["reason"] == "incorrect-worklist-entry"
    assert row["rejected_by"].startswith("os:")
    assert uid_values(archive.qido(f"studies/{s5}/instances"), "00080018") == {second}
    unknown = invoke_pacs(["study", "reject", s5, "--reason", "quality", "--series", generate_uid()], env)
    assert unknown.returncode == 1 and "not current series" in unknown.stderr
    restored = invoke_pacs(["study", "restore", s5, "--json"], env)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["restored"] == [first]
    assert uid_values(archive.qido(f"studies/{s5}/instances"), "00080018") == {first, second}


# -- must-show 5: refusals write nothing and are audited ----------------------------------------------------------


def test_refusals_write_nothing_and_are_audited(archive: Archive) -> None:
    s1 = archive.s1
    failures, denied = archive.audit_count("instance.reject", "failure"), archive.audit_count("access.denied",
                                                                                               "failure")
    before = uid_values(archive.qido(f"studies/{s1}/instances"), "00080018")
    with archive.server.ctx.sessions() as session, session.begin():  # HOSP-B sees s1 now, but it is not HOSP-B's
        share_study(session, s1, "HOSP-B", shared_by="test")
    assert archive.qido("studies", StudyInstanceUID=s1)
    json_error(archive.call("POST", "clin-a", f"/api/studies/{s1}/reject", json={"reason": "quality"}), 403)
    json_error(archive.call("POST", "rad-a", f"/api/studies/{s1}/reject", json={"reason": "patient-safety"}), 403)
    json_error(archive.call("POST", "tech-b", f"/api/studies/{s1}/reject", json={"reason": "quality"}), 404)
    json_error(archive.call("POST", "tech-a", f"/api/studies/{generate_uid()}/reject",
                            json={"reason": "quality"}), 404)
    message = json_error(archive.call("POST", "tech-a", f"/api/studies/{s1}/reject",
                                      json={"reason": "quality", "series": [archive.kept, generate_uid()]}), 400)
    assert "not current series" in message
    json_error(archive.call("POST", "tech-a", f"/api/studies/{s1}/reject", json={"reason": "bored"}), 400)
    json_error(archive.call("POST", "tech-a", f"/api/studies/{s1}/restore", json={"series": [archive.kept]}), 400)
    json_error(archive.call("POST", "tech-b", f"/api/studies/{s1}/restore"), 404)
    assert uid_values(archive.qido(f"studies/{s1}/instances"), "00080018") == before
    assert archive.audit_count("instance.reject", "failure") == failures + 5
    assert archive.audit_count("instance.restore", "failure") >= 2
    assert archive.audit_count("access.denied", "failure") == denied + 1


# -- the scaled configuration: PostgreSQL, S3, `pacs scp` + `pacs api` + `pacs worker` -----------------------------


def test_scaled_reject_resend_and_restore(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedS3) -> None:
    root = tmp_path_factory.mktemp("rejection-scaled")
    with scaled_api(root, s3_server) as server:
        world = FacilityArchive(server)  # type: ignore[arg-type]
        world.add_tokens(("tech-a", "technologist", "HOSP-A"), ("admin", "admin", ""))
        study, bad = generate_uid(), generate_uid()
        kept = world.send_instance("MODA", PatientID="SC-1", StudyInstanceUID=study)
        rejected = [world.send_instance("MODA", PatientID="SC-1", StudyInstanceUID=study, SeriesInstanceUID=bad,
                                        Modality="MR", InstanceNumber=n) for n in (1, 2)]

        def series() -> set[str]:
            with world.http("admin") as client:
                found = client.get(f"/dicom-web/studies/{study}/series")
            return uid_values(found.json(), "0020000E") if found.status_code == 200 else set()

        with world.http("tech-a") as client:
            answer = client.post(f"/api/studies/{study}/reject", json={"reason": "incorrect-worklist-entry",
                                                                       "series": [bad]})
        assert answer.status_code == 200, answer.text
        assert sorted(answer.json()["rejected"]) == sorted(ds.SOPInstanceUID for ds in rejected)
        assert series() == {kept.SeriesInstanceUID}
        path = root / "resend.dcm"
        rejected[0].save_as(path, enforce_file_format=True)
        sent = storescu(server.port, [path], aet="MODA")
        assert sent.status == 0xA771, sent.output[-2000:]
        with world.http("admin") as client:
            listed = client.get("/api/rejected", params={"study": study}).json()
        assert {i["reason"] for i in listed} == {"incorrect-worklist-entry"} and len(listed) == 2
        with world.http("tech-a") as client:
            restored = client.post(f"/api/studies/{study}/restore", json={})
        assert restored.status_code == 200, restored.text
        assert series() == {kept.SeriesInstanceUID, bad}
