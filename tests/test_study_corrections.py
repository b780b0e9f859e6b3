"""Correcting studies (issue 15, must-show 1 and 2): a live `pacs serve`, real DCMTK findscu/movescu/storescp.

- a Vietnamese name typed without its diacritics is corrected: QIDO-RS (with and without diacritics), C-FIND and
  FHIR show the new name, a C-MOVE delivers objects carrying it (the patient's other study too), the prior
  versions stay readable by an admin with the old name, and the audit row has before and after;
- a series sent under the wrong patient moves to the right patient's study: it leaves the wrong study and appears
  in the right one in QIDO-RS, C-FIND and the series metadata, and its thumbnail is rebuilt;
- refusals (role, facility, unknown study, no reason, a bad birth date) change nothing and are audited; a
  facility a study is only shared with cannot correct or move it; a study (or the patient's other study, or the
  series) with rejected instances is refused until they are restored; a correction waits for another one a few
  seconds at most (409); a corrected version of an object no longer archived is refused by ingest;
- an interrupted correction is finished by running it again; a study moves to another patient; the CLI corrects
  accession and description; a forwarding rule sends the corrected version; `pacs reindex` applies our corrections,
  never an Original Attributes item a sender forged.
Must-show 1 runs on the scaled stack too (PostgreSQL, S3, Celery).
"""

from __future__ import annotations

import io
import json
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs.aes import add_ae
from pacs.db.models import AuditEvent, InstanceVersion
from tests.support.datasets import make_instance
from tests.support.dcmtk import ReferenceStoreSCP, dcmtk, dcmtk_env, findscu_datasets
from tests.support.facilities import FacilityArchive, json_error
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import run_pacs
from tests.support.seaweed import SeaweedS3
from tests.support.stack import EmbeddedPacs, RunningArchive, scaled_api
from tests.support.tiers import starts_servers

pytestmark = pytest.mark.integration

OLD_NAME, NEW_NAME = "NGUYEN^VAN^AN", "Nguyễn^Văn^Ấn"
INSTITUTION = "Clinique Müller"  # Latin-1: must survive the re-labelling as UTF-8


class Archive(FacilityArchive):
    def __init__(self, server: EmbeddedPacs, root: Path) -> None:
        super().__init__(server)
        self.add_tokens(("tech-a", "technologist", "HOSP-A"), ("tech-b", "technologist", "HOSP-B"),
                        ("clin-a", "clinician", "HOSP-A"), ("admin", "admin", ""))
        self.dest = ReferenceStoreSCP(root / "dest", free_port(), "DESTSCP").start()
        with server.ctx.sessions() as session, session.begin():
            for title, port in (("QUERYSCU", 104), ("MOVESCU", 104), ("DESTSCP", self.dest.port)):
                add_ae(session, title, "127.0.0.1", port, archive_wide=True)
        # the patient whose name was typed without diacritics at the modality: two studies
        self.vn_study, self.vn_series = generate_uid(), generate_uid()
        self.vn_sops = [self.send_instance("MODA", SpecificCharacterSet="ISO_IR 100", PatientName=OLD_NAME,
                                           PatientID="VN-15", PatientBirthDate="19800101", PatientSex="M",
                                           InstitutionName=INSTITUTION, StudyInstanceUID=self.vn_study,
                                           SeriesInstanceUID=self.vn_series, InstanceNumber=n).SOPInstanceUID
                        for n in (1, 2)]
        self.vn_prior = self.send_instance("MODA", SpecificCharacterSet="ISO_IR 100", PatientName=OLD_NAME,
                                           PatientID="VN-15", StudyDate="20250101").StudyInstanceUID
        # a series sent under the wrong patient's study, and the right patient's study
        self.right = self.send_instance("MODA", PatientName="TRAN^THI^BINH", PatientID="R-1",
                                        AccessionNumber="ACC-R", StudyDescription="CT bụng").StudyInstanceUID
        self.wrong = generate_uid()
        self.kept = self.send_instance("MODA", PatientName="LE^VAN^CUONG", PatientID="W-1",
                                       StudyInstanceUID=self.wrong).SeriesInstanceUID
        self.moved = generate_uid()
        self.moved_sops = [self.send_instance("MODA", PatientName="LE^VAN^CUONG", PatientID="W-1", Modality="MR",
                                              StudyInstanceUID=self.wrong, SeriesInstanceUID=self.moved,
                                              InstanceNumber=n).SOPInstanceUID for n in (1, 2)]
        self.b_study = self.send_instance("MODB", PatientID="B-1").StudyInstanceUID

    def get(self, who: str, path: str, **kw: Any) -> Any:
        with self.http(who) as client:
            return client.get(path, **kw)

    def patch(self, who: str, path: str, body: dict[str, Any]) -> Any:
        with self.http(who) as client:
            return client.patch(path, json=body)

    def post(self, who: str, path: str, body: dict[str, Any]) -> Any:
        with self.http(who) as client:
            return client.post(path, json=body)

    def audit_rows(self, action: str, outcome: str | None = None) -> list[AuditEvent]:
        with self.server.ctx.read_sessions() as session:
            query = select(AuditEvent).where(AuditEvent.action == action)
            if outcome:
                query = query.where(AuditEvent.outcome == outcome)
            return list(session.scalars(query.order_by(AuditEvent.id)))

    def versions_kept(self) -> int:
        with self.server.ctx.read_sessions() as session:
            return session.scalar(select(func.count()).select_from(InstanceVersion)) or 0


@contextmanager
def _archive(root: Path, server: RunningArchive) -> Iterator[Archive]:
    archive = None
    try:
        archive = Archive(server, root)  # type: ignore[arg-type]  # a ScaledStack has the same face
        yield archive
    finally:
        if archive is not None:
            archive.dest.stop()
        server.close()


@pytest.fixture(scope="module")
@starts_servers
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("corrections")
    with _archive(root, EmbeddedPacs(root)) as archive:
        yield archive


@pytest.fixture(scope="module")
@starts_servers
def scaled(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedS3) -> Iterator[Archive]:
    """`pacs api` + `pacs scp` + `pacs worker` on PostgreSQL, the S3 server and Redis."""
    root = tmp_path_factory.mktemp("corrections-scaled")
    with _archive(root, scaled_api(root, s3_server)) as archive:
        yield archive


def findscu(archive: Archive, tmp: Path, keys: list[str]) -> list[pydicom.Dataset]:
    return findscu_datasets(archive.server.port, tmp / f"rsp-{uuid.uuid4().hex[:8]}", keys)


def movescu(archive: Archive, study_uid: str) -> list[pydicom.Dataset]:
    archive.dest.clear()
    proc = subprocess.run([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aec", "PACS", "-aem", "DESTSCP",
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                           "127.0.0.1", str(archive.server.port)], capture_output=True, env=dcmtk_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return [pydicom.dcmread(p) for p in archive.dest.received()]


def qido_names(archive: Archive, name: str) -> dict[str, str]:
    found = archive.get("clin-a", "/dicom-web/studies", params={"PatientName": name})
    assert found.status_code == 200, found.text
    return {s["0020000D"]["Value"][0]: s["00100010"]["Value"][0]["Alphabetic"] for s in found.json()}


# -- must-show 1: a Vietnamese name corrected everywhere ---------------------------------------------------------


def test_correct_vietnamese_name_everywhere(archive: Archive, tmp_path: Path) -> None:
    _correct_vietnamese_name(archive, tmp_path)


def test_correct_vietnamese_name_scaled(scaled: Archive, tmp_path: Path) -> None:
    """The same on PostgreSQL, S3 and Celery: the API process ingests the corrected versions, the SCP serves them."""
    _correct_vietnamese_name(scaled, tmp_path)


def test_a_waiting_correction_is_refused_across_processes(scaled: Archive) -> None:
    """PostgreSQL: while another process holds the correction lock, the API refuses (409, try again) after a few
    seconds instead of tying up a request thread."""
    from sqlalchemy import text

    from pacs.studies import corrections

    lock = {"key": corrections._ADVISORY_KEY}
    with scaled.server.ctx.sessions() as session:
        engine = session.get_bind()
    with engine.connect() as connection:  # type: ignore[union-attr]
        connection.execute(text("SELECT pg_advisory_lock(:key)"), lock)
        connection.commit()
        try:
            answer = scaled.patch("tech-a", f"/api/studies/{scaled.right}", {"description": "x", "reason": "busy"})
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), lock)
            connection.commit()
    assert "another correction is running" in json_error(answer, 409)
    assert scaled.audit_rows("study.correct", "failure")[-1].detail.startswith("Conflict")


def _correct_vietnamese_name(archive: Archive, tmp_path: Path) -> None:
    original = {sop: _stored(archive, sop) for sop in archive.vn_sops}
    answer = archive.patch("tech-a", f"/api/studies/{archive.vn_study}",
                           {"patient": {"name": NEW_NAME}, "reason": "name typed without diacritics at the CT"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["before"]["patient"]["name"] == OLD_NAME and result["after"]["patient"]["name"] == NEW_NAME
    # a name is the patient's: the patient's other study at the facility is corrected too
    assert result["objects_rewritten"] == 3 and set(result["studies"]) == {archive.vn_study, archive.vn_prior}

    # QIDO-RS, with and without the diacritics
    for query in (NEW_NAME, "nguyen^van^an", "Nguyễn*"):
        names = qido_names(archive, query)
        assert names.get(archive.vn_study) == NEW_NAME and names.get(archive.vn_prior) == NEW_NAME, query
    # DCMTK findscu
    found = findscu(archive, tmp_path, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={archive.vn_study}",
                                        "PatientName", "SpecificCharacterSet"])
    assert [str(r.PatientName) for r in found] == [NEW_NAME]
    # FHIR: the study's patient carries the new name
    study = archive.get("clin-a", f"/fhir/ImagingStudy/{archive.vn_study}")
    assert study.status_code == 200, study.text
    patient = archive.get("clin-a", f"/fhir/{study.json()['subject']['reference']}")
    assert patient.status_code == 200 and patient.json()["name"][0]["family"] == "Nguyễn", patient.text

    # C-MOVE delivers the corrected objects, pixel data and the other texts untouched
    moved = {str(ds.SOPInstanceUID): ds for ds in movescu(archive, archive.vn_study)}
    assert sorted(moved) == sorted(archive.vn_sops)
    for sop, ds in moved.items():
        before = pydicom.dcmread(io.BytesIO(original[sop]))
        assert str(ds.PatientName) == NEW_NAME and ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.InstitutionName == INSTITUTION and ds.PixelData == before.PixelData
        assert ds.PatientID == "VN-15" and ds.PatientBirthDate == "19800101"
        change = ds.OriginalAttributesSequence[-1]  # the object says what was corrected (PS3.3 C.12.1.1.9)
        assert change.ReasonForTheAttributeModification == "CORRECT"
        assert str(change.ModifiedAttributesSequence[0].PatientName) == OLD_NAME
    assert [str(ds.PatientName) for ds in movescu(archive, archive.vn_prior)] == [NEW_NAME]
    # so does the study's zip (embedded: files; scaled: streamed from the S3 server), with its DICOMDIR
    zipped = archive.get("clin-a", f"/api/studies/{archive.vn_study}/archive.zip")
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip", zipped.text
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as bundle:
        dicomdir = pydicom.dcmread(io.BytesIO(bundle.read("DICOMDIR")))
        leaves = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
        files = [pydicom.dcmread(io.BytesIO(bundle.read("/".join(r.ReferencedFileID)))) for r in leaves]
    assert sorted(str(ds.SOPInstanceUID) for ds in files) == sorted(archive.vn_sops)
    assert {str(ds.PatientName) for ds in files} == {NEW_NAME}
    patient_record = next(r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT")
    assert str(patient_record.PatientName) == NEW_NAME

    # the prior versions, for an admin only, still carry the old name
    sop = archive.vn_sops[0]
    listed = archive.get("admin", f"/api/instances/{sop}/versions")
    assert listed.status_code == 200, listed.text
    assert [(v["version"], v["current"]) for v in listed.json()] == [(1, False), (2, True)]
    prior = archive.get("admin", f"/api/instances/{sop}/versions/1")
    assert prior.status_code == 200 and prior.headers["content-type"] == "application/dicom"
    assert prior.content == original[sop] and str(pydicom.dcmread(io.BytesIO(prior.content)).PatientName) == OLD_NAME
    assert archive.get("tech-a", f"/api/instances/{sop}/versions").status_code == 403
    assert archive.get("admin", f"/api/instances/{sop}/versions/9").status_code == 404
    assert archive.audit_rows("instance.version-read", "success")

    # the audit row: who, why, before and after
    (row,) = archive.audit_rows("study.correct", "success")
    detail = json.loads(row.detail)
    assert row.actor == "token:tech-a" and row.study_instance_uid == archive.vn_study
    assert detail["reason"] == "name typed without diacritics at the CT"
    assert detail["before"]["patient"]["name"] == OLD_NAME and detail["after"]["patient"]["name"] == NEW_NAME

    # the same correction again changes nothing (a finished or an interrupted one is finished by running it again)
    kept = archive.versions_kept()
    again = archive.patch("tech-a", f"/api/studies/{archive.vn_study}",
                          {"patient": {"name": NEW_NAME}, "reason": "again"})
    assert again.status_code == 200 and again.json()["objects_rewritten"] == 0
    assert again.json()["objects_unchanged"] == 3 and archive.versions_kept() == kept


def _stored(archive: Archive, sop: str) -> bytes:
    from pacs.db.models import Instance

    with archive.server.ctx.read_sessions() as session:
        key = session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop))
    assert key
    return archive.server.ctx.store.get_bytes(key)


# -- must-show 2: a series moved to the right patient's study ----------------------------------------------------


def test_move_series_to_the_right_patients_study(archive: Archive, tmp_path: Path) -> None:
    answer = archive.post("tech-a", f"/api/series/{archive.moved}/move",
                          {"to_study": archive.right, "reason": "MR series sent under the wrong patient"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["objects_rewritten"] == 2

    def series_of(study: str) -> set[str]:
        found = archive.get("clin-a", f"/dicom-web/studies/{study}/series")
        assert found.status_code in (200, 204), found.text
        return {s["0020000E"]["Value"][0] for s in (found.json() if found.status_code == 200 else [])}

    assert series_of(archive.wrong) == {archive.kept}
    left = archive.get("clin-a", "/dicom-web/studies", params={"StudyInstanceUID": archive.wrong}).json()
    assert left[0]["00080061"]["Value"] == ["CT"] and left[0]["00201206"]["Value"] == [1]
    assert series_of(archive.right) >= {archive.moved}
    studies = archive.get("clin-a", "/dicom-web/studies", params={"StudyInstanceUID": archive.right}).json()
    assert studies[0]["00201206"]["Value"] == [2] and studies[0]["00201208"]["Value"] == [3]
    assert "MR" in studies[0]["00080061"]["Value"]
    # C-FIND at series level
    found = findscu(archive, tmp_path, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={archive.right}",
                                        "SeriesInstanceUID"])
    assert archive.moved in {str(r.SeriesInstanceUID) for r in found}

    # the series metadata and thumbnail are rebuilt for the right study
    def metadata_moved() -> bool:
        got = archive.get("clin-a", f"/dicom-web/studies/{archive.right}/series/{archive.moved}/metadata")
        return got.status_code == 200 and all(
            item["0020000D"]["Value"] == [archive.right] and item["00100010"]["Value"][0]["Alphabetic"]
            == "TRAN^THI^BINH" and item["00080050"]["Value"] == ["ACC-R"] for item in got.json())

    wait_until(metadata_moved, timeout=60, what="the moved series' metadata")
    wait_until(lambda: archive.get("clin-a", f"/dicom-web/studies/{archive.right}/series/{archive.moved}/thumbnail",
                                   headers={"Accept": "image/jpeg"}).status_code == 200,
               timeout=60, what="the moved series' thumbnail")
    moved = {str(ds.SOPInstanceUID): ds for ds in movescu(archive, archive.right)}
    assert set(archive.moved_sops) <= set(moved)
    assert {str(moved[s].PatientID) for s in archive.moved_sops} == {"R-1"}
    (row,) = archive.audit_rows("series.move", "success")
    detail = json.loads(row.detail)
    assert detail["before"]["study_instance_uid"] == archive.wrong and detail["after"]["study_instance_uid"] == \
        archive.right


# -- refusals --------------------------------------------------------------------------------------------------


def test_refusals_change_nothing_and_are_audited(archive: Archive) -> None:
    kept = archive.versions_kept()
    failures = len(archive.audit_rows("study.correct", "failure"))
    path = f"/api/studies/{archive.right}"
    body = {"patient": {"birth_date": "19700101"}, "reason": "typo"}
    denied = len(archive.audit_rows("access.denied"))
    refused = archive.patch("clin-a", path, body)
    assert refused.status_code == 403 and refused.json()["code"]
    assert len(archive.audit_rows("access.denied")) == denied + 1

    for who, target, change, status in (
            ("tech-b", path, body, 404),  # another facility's study: as if unknown
            ("tech-a", f"/api/studies/{generate_uid()}", body, 404),
            ("tech-a", path, {"patient": {"birth_date": "19700101"}}, 422),  # no reason
            ("tech-a", path, {"patient": {"birth_date": "1970-01-01"}, "reason": "typo"}, 422),
            ("tech-a", path, {"patient": {"sex": "X"}, "reason": "typo"}, 422),
            ("tech-a", path, {"reason": "nothing"}, 422)):
        answer = archive.patch(who, target, change)
        assert answer.status_code == status, (who, change, answer.text)
        assert set(answer.json()) == {"code", "message"} and answer.json()["message"]
    assert len(archive.audit_rows("study.correct", "failure")) == failures + 6

    # a series moves only within its facility
    across = archive.post("admin", f"/api/series/{archive.kept}/move", {"to_study": archive.b_study,
                                                                        "reason": "wrong hospital"})
    assert across.status_code == 422 and "facility" in across.json()["message"]
    assert archive.post("tech-b", f"/api/series/{archive.kept}/move",
                        {"to_study": archive.b_study, "reason": "x"}).status_code == 404
    assert len(archive.audit_rows("series.move", "failure")) == 2
    assert archive.versions_kept() == kept


def test_a_shared_study_is_not_the_borrowers_to_change(archive: Archive) -> None:
    """HOSP-B sees a study of HOSP-A shared with it, but may neither correct it nor move series out of or into it."""
    from pacs.security.access import share_study

    series, study = generate_uid(), generate_uid()
    archive.send_instance("MODA", PatientID="SH-1", PatientName="LY^AN", StudyInstanceUID=study,
                          SeriesInstanceUID=series)
    b_series = archive.send_instance("MODB", PatientID="SH-B").SeriesInstanceUID
    with archive.server.ctx.sessions() as session, session.begin():
        share_study(session, study, "HOSP-B", "test")
    seen = archive.get("tech-b", "/dicom-web/studies", params={"StudyInstanceUID": study})
    assert seen.status_code == 200 and len(seen.json()) == 1  # the share works: B reads the study
    kept = archive.versions_kept()
    json_error(archive.patch("tech-b", f"/api/studies/{study}", {"patient": {"name": "Lý^An"}, "reason": "x"}), 404)
    json_error(archive.post("tech-b", f"/api/series/{series}/move", {"to_study": archive.b_study, "reason": "x"}),
               404)
    json_error(archive.post("tech-b", f"/api/series/{b_series}/move", {"to_study": study, "reason": "x"}), 404)
    json_error(archive.post("tech-b", f"/api/studies/{study}/move", {"to_patient": {"id": "B-1"}, "reason": "x"}),
               404)
    assert archive.versions_kept() == kept
    assert qido_names(archive, "LY^AN") == {study: "LY^AN"}


def test_refused_while_rejected_instances_are_kept(archive: Archive) -> None:
    """Rejected instances are out of the index a correction goes through: restored, they would bring the old
    patient back (or miss their moved series). Refused (409) until they are restored or deleted."""
    study, series = generate_uid(), generate_uid()
    sops = [archive.send_instance("MODA", PatientID="RJ-1", PatientName="HO^AN", StudyInstanceUID=study,
                                  SeriesInstanceUID=series, InstanceNumber=n).SOPInstanceUID for n in (1, 2)]
    other = archive.send_instance("MODA", PatientID="RJ-1", PatientName="HO^AN").StudyInstanceUID
    target = archive.send_instance("MODA", PatientID="RJ-2", PatientName="HO^BINH").StudyInstanceUID
    rejected = archive.post("tech-a", f"/api/studies/{study}/reject", {"reason": "quality", "instances": [sops[0]]})
    assert rejected.status_code == 200, rejected.text
    kept = archive.versions_kept()
    for answer in (
            archive.patch("tech-a", f"/api/studies/{study}", {"accession_number": "ACC-RJ", "reason": "r"}),
            # a patient-level change of the other study rewrites this one too
            archive.patch("tech-a", f"/api/studies/{other}", {"patient": {"name": "Hồ^An"}, "reason": "r"}),
            archive.post("tech-a", f"/api/series/{series}/move", {"to_study": target, "reason": "r"}),
            archive.post("tech-a", f"/api/studies/{study}/move", {"to_patient": {"id": "RJ-2"}, "reason": "r"})):
        assert "restore or delete the rejected instances" in json_error(answer, 409)
    assert archive.versions_kept() == kept
    assert len(archive.audit_rows("series.move", "failure")) >= 1
    restored = archive.post("tech-a", f"/api/studies/{study}/restore", {"instances": [sops[0]]})
    assert restored.status_code == 200, restored.text
    answer = archive.patch("tech-a", f"/api/studies/{other}", {"patient": {"name": "Hồ^An"}, "reason": "r"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["objects_rewritten"] == 3  # both studies, the restored instance too


def test_a_waiting_correction_is_refused_after_a_few_seconds(archive: Archive,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Another correction holding the lock: this one is refused (Conflict, try again), not left waiting."""
    from pacs.cli.common import cli_principal
    from pacs.errors import Conflict
    from pacs.studies import corrections

    monkeypatch.setattr(corrections, "LOCK_WAIT_SECONDS", 0.3)
    kept = archive.versions_kept()
    with corrections._LOCK, pytest.raises(Conflict, match="another correction is running"):
        corrections.correct_study(archive.server.ctx, cli_principal(), archive.right,
                                  corrections.StudyChanges(description="x"), "busy")
    assert archive.versions_kept() == kept


def test_a_corrected_version_of_a_deleted_object_is_refused(archive: Archive) -> None:
    """A correction racing a deletion: ingest refuses the corrected copy of an object the archive no longer has
    (it would bring the deleted study back)."""
    from pacs.db.models import Instance, Study
    from pacs.ingest.outcome import IngestStatus
    from pacs.ingest.source import Correction, IngestSource
    from pacs.studies import corrections

    study = generate_uid()
    data = make_instance(PatientID="GONE-1", StudyInstanceUID=study)
    source = IngestSource(transport="correction", calling_ae="MODA", facility="HOSP-A",
                          correction=Correction(study, "test"))
    outcome = corrections._ingestor(archive.server.ctx).ingest(data, source)
    assert outcome.status is IngestStatus.REJECTED and "no longer in the archive" in outcome.message
    with archive.server.ctx.read_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Study).where(Study.study_instance_uid == study)) == 0
        assert session.scalar(select(func.count()).select_from(Instance)
                              .where(Instance.sop_instance_uid == outcome.sop_instance_uid)) == 0
    assert not list(archive.server.ctx.store.list(f"dicom/{study}/"))


# -- an interrupted correction ---------------------------------------------------------------------------------


def test_interrupted_correction_is_finished_by_running_it_again(archive: Archive) -> None:
    """A correction stopped between two objects (a crash, a lost connection) leaves each object either in its old
    or in its corrected version, the index consistent with both; running it again corrects only what is left."""
    from pacs.cli.common import cli_principal
    from pacs.studies import corrections

    study = generate_uid()
    for n in (1, 2):
        archive.send_instance("MODA", PatientID="INT-1", PatientName="PHAM^MINH", StudyInstanceUID=study,
                              InstanceNumber=n)
    changes = corrections.StudyChanges(corrections.PatientChanges(name="Phạm^Minh^Châu", sex="F"))

    def crash(done: int, total: int) -> None:
        raise _Crash

    with pytest.raises(_Crash):  # the test's own process, on the same index and store as the server
        corrections.correct_study(archive.server.ctx, cli_principal(), study, changes, "typo", progress=crash)
    names = qido_names(archive, "PHAM^MINH*")
    assert names.get(study) == "Phạm^Minh^Châu"  # the patient record took the new name with the first object
    answer = archive.patch("tech-a", f"/api/studies/{study}",
                           {"patient": {"name": "Phạm^Minh^Châu", "sex": "F"}, "reason": "finish it"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["objects_rewritten"], answer.json()["objects_unchanged"]) == (1, 1)


class _Crash(Exception):
    pass


# -- a study moved to another patient; the command line ------------------------------------------------------------


def test_move_study_to_another_patient(archive: Archive) -> None:
    study = archive.send_instance("MODA", PatientID="MV-1", PatientName="VO^AN").StudyInstanceUID
    archive.send_instance("MODA", PatientID="MV-2", PatientName="Võ^Thị^Hoa", PatientBirthDate="19900505")
    missing = archive.post("tech-a", f"/api/studies/{study}/move",
                           {"to_patient": {"id": "NO-SUCH"}, "reason": "wrong patient"})
    assert missing.status_code == 404 and "NO-SUCH" in missing.json()["message"]
    answer = archive.post("tech-a", f"/api/studies/{study}/move", {"to_patient": {"id": "MV-2"},
                                                                    "reason": "wrong patient chosen"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["after"]["patient"] == {"name": "Võ^Thị^Hoa", "id": "MV-2", "issuer": "",
                                                  "birth_date": "19900505", "sex": ""}
    found = archive.get("clin-a", "/dicom-web/studies", params={"PatientID": "MV-2"}).json()
    assert study in {s["0020000D"]["Value"][0] for s in found} and len(found) == 2
    assert archive.get("clin-a", "/dicom-web/studies", params={"PatientID": "MV-1"}).status_code in (200, 204)
    (ds,) = movescu(archive, study)
    assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate) == ("MV-2", "Võ^Thị^Hoa", "19900505")


def test_cli_corrects_accession_and_description(archive: Archive) -> None:
    study = archive.send_instance("MODA", PatientID="CLI-1", AccessionNumber="WRONG",
                                  StudyDescription="CT").StudyInstanceUID
    done = run_pacs(["study", "correct", study, "--accession", "ACC-77", "--description", "CT ngực có cản quang",
                     "--reason", "worklist entry of another exam", "--json"], archive.server.env)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["objects_rewritten"] == 1 and result["after"]["accession_number"] == "ACC-77"
    found = archive.get("clin-a", "/dicom-web/studies", params={"AccessionNumber": "ACC-77",
                                                                "includefield": "StudyDescription"}).json()
    assert [(s["0020000D"]["Value"][0], s["00081030"]["Value"][0]) for s in found] == [(study,
                                                                                      "CT ngực có cản quang")]
    row = archive.audit_rows("study.correct")[-1]
    assert (row.outcome, row.study_instance_uid) == ("success", study) and row.actor.startswith("os:")


def test_forwarding_rules_send_the_corrected_version(archive: Archive, tmp_path: Path) -> None:
    """A rule (by sending modality and modality) that forwarded the original forwards the corrected version too."""
    from pacs.forwarding.rules import add_rule, remove_rule

    peer = ReferenceStoreSCP(tmp_path / "fwd", free_port(), "FWDSCP").start()

    def forwarded_names() -> list[str]:
        try:
            return [str(pydicom.dcmread(p).PatientName) for p in peer.received()]
        except Exception:  # a file still being written
            return []

    try:
        with archive.server.ctx.sessions() as session, session.begin():
            add_ae(session, "FWDSCP", "127.0.0.1", peer.port, archive_wide=True)
            add_rule(session, "us-to-fwd", "FWDSCP", source_ae="MODA", modality="US")
        study = archive.send_instance("MODA", Modality="US", PatientID="FW-1",
                                      PatientName="DO^HUNG").StudyInstanceUID
        wait_until(lambda: forwarded_names() == ["DO^HUNG"], timeout=30, what="the original forwarded")
        answer = archive.patch("tech-a", f"/api/studies/{study}", {"patient": {"name": "Đỗ^Hùng"},
                                                                    "reason": "diacritics"})
        assert answer.status_code == 200, answer.text
        wait_until(lambda: forwarded_names() == ["Đỗ^Hùng"], timeout=30, what="the corrected version forwarded")
    finally:
        with archive.server.ctx.sessions() as session, session.begin():
            remove_rule(session, "us-to-fwd")
        peer.stop()


# -- pacs reindex: the index rebuilt from the store alone keeps corrections and moves ---------------------------


def test_reindex_rebuilds_corrected_names_and_moved_series(archive: Archive, tmp_path: Path) -> None:
    from pacs.db.engine import make_engine, make_session_factory
    from pacs.db.migrate import upgrade
    from pacs.db.models import Patient, Series, Study
    from pacs.maintenance.reindex import reindex

    corrected = archive.send_instance("MODA", PatientName="PHAM^VAN^XUAN", PatientID="RX-1",
                                      AccessionNumber="ACC-X1").StudyInstanceUID
    target = archive.send_instance("MODA", PatientName="DO^THI^YEN", PatientID="RY-1").StudyInstanceUID
    wrong = generate_uid()
    archive.send_instance("MODA", PatientName="VU^VAN^DUNG", PatientID="RZ-1", StudyInstanceUID=wrong)
    moved = archive.send_instance("MODA", PatientName="VU^VAN^DUNG", PatientID="RZ-1", StudyInstanceUID=wrong,
                                  Modality="MR").SeriesInstanceUID
    answer = archive.patch("tech-a", f"/api/studies/{corrected}",
                           {"patient": {"name": "Phạm^Văn^Xuân"}, "accession_number": "ACC-X2",
                            "reason": "tên gõ sai ở máy chụp"})
    assert answer.status_code == 200, answer.text
    answer = archive.post("tech-a", f"/api/series/{moved}/move", {"to_study": target, "reason": "wrong patient"})
    assert answer.status_code == 200, answer.text
    # a sender's object claiming to be our correction (an Original Attributes item naming our AE title) with
    # another name: ingest kept the first-seen name, and so must the rebuilt index (no correction marker)
    forged = Dataset()
    forged.AttributeModificationDateTime = "20260101120000"
    forged.ModifyingSystem = archive.server.ctx.settings.ae_title
    forged.SourceOfPreviousValues = ""
    forged.ReasonForTheAttributeModification = "CORRECT"
    old = Dataset()
    old.PatientName = "TRUONG^AN"
    forged.ModifiedAttributesSequence = Sequence([old])
    first = archive.send_instance("MODA", PatientName="TRUONG^AN", PatientID="RF-1").StudyInstanceUID
    archive.send_instance("MODA", PatientName="KE^GIA^MAO", PatientID="RF-1", StudyInstanceUID=first,
                          OriginalAttributesSequence=Sequence([forged]))

    engine = make_engine(f"sqlite:///{tmp_path / 'rebuilt.sqlite3'}")
    upgrade(engine)
    rebuilt = make_session_factory(engine)
    result = reindex(rebuilt, archive.server.ctx.store)
    assert result.complete, result

    def state(session: Any) -> tuple[str, str, str]:
        name, accession = session.execute(
            select(Patient.patient_name, Study.accession_number).join(Study, Study.patient_fk == Patient.id)
            .where(Study.study_instance_uid == corrected)).one()
        home = session.scalar(select(Study.study_instance_uid).join(Series, Series.study_fk == Study.id)
                              .where(Series.series_instance_uid == moved))
        return name, accession, home

    def forged_name(session: Any) -> str:
        return str(session.scalar(select(Patient.patient_name).where(Patient.patient_id == "RF-1")))

    with archive.server.ctx.read_sessions() as live, rebuilt() as copy:
        assert state(live) == ("Phạm^Văn^Xuân", "ACC-X2", target)
        assert state(copy) == state(live)  # not the first-seen name, accession and study of the first versions
        assert forged_name(live) == forged_name(copy) == "TRUONG^AN"
    engine.dispose()
