"""Deleting studies and rejected instances, and retention (issue 15), against a live `pacs serve`.

One server for the module, with two facilities (tests.support.facilities: MODA sends HOSP-A's studies, MODB
HOSP-B's), a retention sweep every second, rejected-for-patient-safety instances deleted at the next sweep and
HOSP-A's studies kept 10 years. What a user relies on:

- an admin's explicit delete removes the study everywhere (QIDO-RS, C-FIND, FHIR, WADO-RS), its objects and
  derived products from the store, its reports and share links (the link's URL stops working), audited with the
  reason; `pacs check` stays clean and the same SOP Instance UID can be stored again;
- must-show 5: a clinician, technologist or radiologist cannot delete (403), an admin of facility B cannot delete
  A's study (404, like an unknown study), and every refusal is in the audit trail;
- must-show 3's tail: a rejected series is deleted by the sweep after its reason's retention (objects gone,
  `pacs check` clean) and its SOP Instance UIDs can be stored again with DCMTK's storescu; a study the sweep
  empties keeps its row and its signed report (only an admin's explicit deletion removes a study);
- SPEC §4: a modality re-sending the same bytes while their object is being deleted gets Success only with the
  object in the store (tombstones, pacs.studies.tombstones);
- study retention: due studies are listed (audited) and only the confirmed ones that are really due are deleted.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from pacs.cli.common import cli_principal
from pacs.db.models import AuditEvent, Instance, InstanceVersion, Study
from pacs.reports.models import Report
from pacs.settings import REJECTION_RETENTION_DEFAULTS, Settings
from pacs.sharing.models import ShareLink
from pacs.studies import deletion
from pacs.studies.models import REASON_CODES, RejectedInstance, RejectionNote
from pacs.studies.tombstones import DeletedObject
from storage import StorageUnavailable
from tests.support.datasets import to_bytes
from tests.support.dcmtk import dcmtk, dcmtk_env, storescu
from tests.support.facilities import FacilityArchive, json_error
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.seaweed import SeaweedS3
from tests.support.senders import send_dataset
from tests.support.stack import scaled_api

pytestmark = pytest.mark.integration

SERVER_ENV = {
    "PACS_RETENTION_SWEEP_S": "1",
    "PACS_REJECTION_RETENTION_DAYS": json.dumps({"patient-safety": 0, "quality": 30}),
    "PACS_STUDY_RETENTION_YEARS": json.dumps({"HOSP-A": 10, "*": 0}),
}


class Archive(FacilityArchive):
    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self.add_tokens(("admin", "admin", ""), ("admin-b", "admin", "HOSP-B"), ("admin-a", "admin", "HOSP-A"),
                        ("clin-a", "clinician", "HOSP-A"), ("tech-a", "technologist", "HOSP-A"),
                        ("rad-a", "radiologist", "HOSP-A"))

    def send_study(self, aet: str, patient_id: str, *, series: int = 1, per_series: int = 2,
                   **attrs: Any) -> list[Dataset]:
        study_uid = generate_uid()
        sent = []
        for s in range(series):
            series_uid = generate_uid()
            for i in range(per_series):
                sent.append(self.send_instance(aet, PatientID=patient_id, PatientName=f"{patient_id}^TEST",
                                               StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                                               SeriesNumber=s + 1, InstanceNumber=i + 1, **attrs))
        return sent


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    with Archive.serving(tmp_path_factory.mktemp("deletion"), extra_env=SERVER_ENV) as world:
        yield world


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def keys_under(archive: Archive, *prefixes: str) -> list[str]:
    return [info.key for prefix in prefixes for info in archive.server.ctx.store.list(prefix)]


def study_keys(archive: Archive, study_uid: str) -> list[str]:
    return keys_under(archive, f"dicom/{study_uid}/", f"derived/thumbnails/{study_uid}/",
                      f"derived/thumbnails/{study_uid}.jpg", f"derived/metadata/{study_uid}/")


def audit_rows(archive: Archive, action: str, study_uid: str = "", outcome: str | None = None) -> list[AuditEvent]:
    with archive.server.ctx.read_sessions() as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        if study_uid:
            query = query.where(AuditEvent.study_instance_uid == study_uid)
        if outcome:
            query = query.where(AuditEvent.outcome == outcome)
        return list(session.scalars(query.order_by(AuditEvent.id)))


def pacs_check(archive: Archive) -> dict[str, Any]:
    """`pacs check --json` on the server's own environment: no error, and no orphan either (in-process: the
    command's code on the same index and store; tests/test_check_repair.py runs `pacs check` as a process)."""
    result = invoke_pacs(["check", "--json"], archive.server.env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["errors"] == 0 and summary["counts"].get("orphan", 0) == 0, summary
    return summary


def findscu_study(archive: Archive, study_uid: str) -> str:
    """C-FIND at STUDY level from the registered modality (archive-wide query rights are not needed: its own
    facility's study)."""
    import subprocess

    proc = subprocess.run([dcmtk("findscu"), "-S", "-aet", "MODA", "-aec", "PACS", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", f"StudyInstanceUID={study_uid}", "-k", "PatientID", "127.0.0.1",
                           str(archive.server.port)], capture_output=True, text=True, timeout=60, env=dcmtk_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    return proc.stdout + proc.stderr


def qido_studies(archive: Archive, who: str, study_uid: str) -> list[Any]:
    with archive.http(who) as client:
        response = client.get("/dicom-web/studies", params={"StudyInstanceUID": study_uid})
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 and response.content else []


def store_again(archive: Archive, tmp: Path, datasets: list[Dataset]) -> None:
    """Send the same objects again with DCMTK's storescu: the deleted SOP Instance UIDs are accepted."""
    files = []
    for ds in datasets:
        path = tmp / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_bytes(ds))
        files.append(path)
    result = storescu(archive.server.port, files, aet="MODA")
    assert result.returncode == 0 and result.status == 0, result.output[-3000:]


# -- explicit delete ---------------------------------------------------------------------------------------------

def test_admin_deletes_a_study_everywhere_and_it_can_be_stored_again(archive: Archive, tmp_path: Path) -> None:
    sent = archive.send_study("MODA", "DEL-1", series=2)
    study = str(sent[0].StudyInstanceUID)
    # what hangs on the study: a report (draft) and a share link to it
    with archive.http("rad-a") as rad:
        report = rad.post(f"/api/studies/{study}/reports", json={"findings": "Bình thường", "impression": "OK"})
        assert report.status_code == 201, report.text
        link = rad.post(f"/api/studies/{study}/shares", json={"scope": "study"})
        assert link.status_code == 201, link.text
    share_path = "/s/" + link.json()["url"].split("/s/", 1)[1]
    # derived objects to be deleted with it: each series' thumbnail (and document), each instance's fragment
    thumbnails = [f"derived/thumbnails/{study}/{uid}.jpg" for uid in {str(ds.SeriesInstanceUID) for ds in sent}]
    wait_for("series thumbnails", lambda: len(keys_under(archive, *thumbnails)) == len(thumbnails))
    assert len(keys_under(archive, f"derived/metadata/{study}/")) >= len(sent)
    with archive.http(None) as anonymous:
        assert anonymous.get(share_path).status_code == 200
    assert qido_studies(archive, "clin-a", study)

    with archive.http("admin") as admin:
        response = admin.request("DELETE", f"/api/studies/{study}", json={"reason": "sent to the wrong archive"})
        assert response.status_code == 204, response.text
        # gone from every path
        assert qido_studies(archive, "admin", study) == []
        assert admin.get(f"/dicom-web/studies/{study}").status_code == 404
        assert admin.get(f"/dicom-web/studies/{study}/metadata").status_code == 404
        assert admin.get(f"/fhir/ImagingStudy/{study}").status_code == 404
        assert admin.get(f"/api/reports/{report.json()['id']}").status_code == 404
        assert admin.get(f"/api/studies/{study}/reports").status_code in (200, 404)
        # deleting it again: it is unknown now
        json_error(admin.request("DELETE", f"/api/studies/{study}", params={"reason": "again"}), 404)
    assert str(study) not in findscu_study(archive, study)
    with archive.http(None) as anonymous:
        assert anonymous.get(share_path).status_code in (404, 410)
    assert study_keys(archive, study) == []  # every version, thumbnails, metadata
    with archive.server.ctx.read_sessions() as session:
        assert session.scalar(select(Study.id).where(Study.study_instance_uid == study)) is None
        assert session.scalar(select(Report.id).where(Report.study_instance_uid == study)) is None
        assert session.scalar(select(ShareLink.id).where(ShareLink.id == link.json()["id"])) is None
    [row] = audit_rows(archive, "study.delete", study, "success")
    assert row.actor == "token:admin" and "sent to the wrong archive" in row.detail and "instances=4" in row.detail
    assert row.patient_id == "DEL-1"
    pacs_check(archive)

    store_again(archive, tmp_path, sent[:1])
    [found] = qido_studies(archive, "clin-a", study)
    assert found["00201208"]["Value"] == [1]  # NumberOfStudyRelatedInstances: the one sent again


def test_delete_keeps_other_studies_and_prior_versions_go_too(archive: Archive) -> None:
    kept = archive.send_study("MODA", "DEL-2")
    doomed = archive.send_study("MODA", "DEL-2")  # the same patient: the patient row stays for the other study
    first = doomed[0]
    archive.send_instance("MODA", StudyInstanceUID=first.StudyInstanceUID, SeriesInstanceUID=first.SeriesInstanceUID,
                          SOPInstanceUID=first.SOPInstanceUID, PatientID="DEL-2", PatientName="DEL-2^TEST",
                          InstanceNumber=9)  # other content, same SOP Instance UID: a second version
    sop = str(doomed[0].SOPInstanceUID)
    with archive.server.ctx.read_sessions() as session:
        assert session.scalar(select(InstanceVersion.id).where(InstanceVersion.sop_instance_uid == sop))
    study = str(doomed[0].StudyInstanceUID)
    _reject(archive, "rad-a", study, "quality", instances=[str(doomed[1].SOPInstanceUID)])  # rejected, kept 30 days
    with archive.http("admin-a") as admin:
        assert admin.request("DELETE", f"/api/studies/{study}", params={"reason": "duplicate"}).status_code == 204
    with archive.server.ctx.read_sessions() as session:
        assert session.scalar(select(InstanceVersion.id).where(InstanceVersion.sop_instance_uid == sop)) is None
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop)) is None
        assert session.scalar(select(RejectedInstance.id).where(RejectedInstance.study_instance_uid == study)) is None
        assert session.scalar(select(RejectionNote.id).where(RejectionNote.study_instance_uid == study)) is None
    assert keys_under(archive, f"dicom/{study}/") == []
    assert len(qido_studies(archive, "clin-a", str(kept[0].StudyInstanceUID))) == 1


def test_who_may_not_delete_is_refused_and_every_refusal_is_audited(archive: Archive) -> None:
    """Must-show 5: clinician, technologist, radiologist 403; an admin of facility B 404 on A's study, like an
    unknown study; no reason 400. Nothing is deleted, and each refusal has its audit row."""
    study = str(archive.send_study("MODA", "DEL-3")[0].StudyInstanceUID)
    before = len(audit_rows(archive, "access.denied", outcome="failure"))
    for who in ("clin-a", "tech-a", "rad-a"):
        with archive.http(who) as client:
            json_error(client.request("DELETE", f"/api/studies/{study}", params={"reason": "no"}), 403)
            json_error(client.get("/api/retention/due"), 403)
    denied = audit_rows(archive, "access.denied", outcome="failure")
    assert len(denied) >= before + 3
    assert {r.actor for r in denied} >= {"token:clin-a", "token:tech-a", "token:rad-a"}
    unknown = generate_uid()
    with archive.http("admin-b") as admin_b:
        message = json_error(admin_b.request("DELETE", f"/api/studies/{study}", params={"reason": "mine?"}), 404)
        assert json_error(admin_b.request("DELETE", f"/api/studies/{unknown}", params={"reason": "x"}), 404) \
            == message.replace(study, unknown)  # the same answer: another facility's study tells nothing
    with archive.http("admin") as admin:
        json_error(admin.request("DELETE", f"/api/studies/{study}"), 400)  # no reason
        json_error(admin.request("DELETE", f"/api/studies/{study}", json={"reason": "  "}), 400)
    refused = audit_rows(archive, "study.delete", study, "failure")
    assert [r.actor for r in refused] == ["token:admin-b", "token:admin", "token:admin"]
    assert audit_rows(archive, "study.delete", unknown, "failure")[0].actor == "token:admin-b"
    assert len(qido_studies(archive, "clin-a", study)) == 1  # still there


def test_cli_delete_asks_for_confirmation(archive: Archive) -> None:
    study = str(archive.send_study("MODA", "DEL-4")[0].StudyInstanceUID)
    # the prompt in-process (invoke_pacs: the same command code; the command runs as a process just below)
    answer_no = invoke_pacs(["study", "delete", study, "--reason", "test"], archive.server.env, input="n\n")
    assert answer_no.returncode == 1 and len(qido_studies(archive, "clin-a", study)) == 1
    done = run_pacs(["study", "delete", study, "--reason", "patient asked", "--yes", "--json"], archive.server.env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["instances"] == 2
    assert qido_studies(archive, "clin-a", study) == []
    [row] = audit_rows(archive, "study.delete", study, "success")
    assert row.actor.startswith("os:") and "patient asked" in row.detail
    unknown = invoke_pacs(["study", "delete", generate_uid(), "--reason", "x", "--yes"], archive.server.env)
    assert unknown.returncode == 1 and "no study" in unknown.stderr
    swept = invoke_pacs(["retention", "sweep", "--json"], archive.server.env)  # nothing due: the server swept already
    assert swept.returncode == 0 and json.loads(swept.stdout)["instances"] == 0, swept.stderr


# -- rejected instances ------------------------------------------------------------------------------------------

def _reject(archive: Archive, who: str, study: str, reason: str, **lists: list[str]) -> dict[str, Any]:
    with archive.http(who) as client:
        response = client.post(f"/api/studies/{study}/reject", json={"reason": reason, **lists})
    assert response.status_code == 200, response.text
    return response.json()


def test_rejected_series_is_deleted_after_its_retention_and_can_be_stored_again(archive: Archive,
                                                                                 tmp_path: Path) -> None:
    """Must-show 3's tail: patient-safety is kept 0 days here, so the next sweep deletes the rejected series: its
    objects leave the store, `pacs check` is clean, and the same SOP Instance UIDs are stored again."""
    sent = archive.send_study("MODA", "DEL-5", series=2)
    study, series = str(sent[0].StudyInstanceUID), str(sent[0].SeriesInstanceUID)
    rejected = [ds for ds in sent if ds.SeriesInstanceUID == series]
    wait_for("the series thumbnail", lambda: keys_under(archive, f"derived/thumbnails/{study}/{series}.jpg") != [])
    assert len(keys_under(archive, f"derived/metadata/{study}/{series}/")) == 2  # the instances' fragments
    _reject(archive, "tech-a", study, "patient-safety", series=[series])

    def swept() -> bool:  # the rows go in one transaction, the objects right after its commit
        with archive.server.ctx.read_sessions() as session:
            rows = session.scalar(select(RejectedInstance.id)
                                  .where(RejectedInstance.study_instance_uid == study).limit(1))
        return rows is None and keys_under(archive, f"dicom/{study}/{series}/", f"derived/thumbnails/{study}/{series}",
                                           f"derived/metadata/{study}/{series}") == []
    wait_for("the retention sweep", swept)
    others = {str(ds.SOPInstanceUID) for ds in sent if ds.SeriesInstanceUID != series}
    left = keys_under(archive, f"dicom/{study}/")  # the other series' objects; the rejection note went too
    assert len(left) == 2 and {key.split("/")[3] for key in left} == others, left
    with archive.server.ctx.read_sessions() as session:  # the note went with the last instance it rejected
        assert session.scalar(select(RejectionNote.id).where(RejectionNote.study_instance_uid == study)) is None
    rows = audit_rows(archive, "instance.delete", study, "success")
    assert rows and rows[-1].actor == "system:retention" and "instances=2" in rows[-1].detail
    pacs_check(archive)
    with archive.http("clin-a") as client:
        assert len(client.get(f"/dicom-web/studies/{study}/series").json()) == 1

    store_again(archive, tmp_path, rejected)
    with archive.http("clin-a") as client:
        found = client.get(f"/dicom-web/studies/{study}/series/{series}/instances").json()
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(str(ds.SOPInstanceUID) for ds in rejected)


def test_a_study_rejected_whole_keeps_its_row_and_report_after_its_retention(archive: Archive,
                                                                              tmp_path: Path) -> None:
    """The sweep deletes the rejected images and their series, never the study: its signed report stays readable
    (an admin's explicit deletion is the only way a report goes); the study is hidden from image queries, and
    the same UIDs sent again fill it again."""
    sent = archive.send_study("MODA", "DEL-7")
    study = str(sent[0].StudyInstanceUID)
    with archive.http("rad-a") as rad:
        report = rad.post(f"/api/studies/{study}/reports", json={"findings": "x", "impression": "y"})
        assert report.status_code == 201, report.text
        signed = rad.post(f"/api/reports/{report.json()['id']}/sign", json={})
        assert signed.status_code in (200, 201), signed.text

    def instances() -> int | None:
        with archive.server.ctx.read_sessions() as session:
            return session.scalar(select(Study.number_of_instances).where(Study.study_instance_uid == study))
    wait_for("the signed report's SR", lambda: instances() == 3)
    _reject(archive, "tech-a", study, "patient-safety")  # the images and the SR

    def swept() -> bool:
        with archive.server.ctx.read_sessions() as session:
            row = session.scalar(select(RejectedInstance.id).where(RejectedInstance.study_instance_uid == study)
                                 .limit(1))
        return row is None and keys_under(archive, f"dicom/{study}/") == []
    wait_for("the retention sweep", swept)
    assert instances() == 0
    with archive.server.ctx.read_sessions() as session:
        assert session.scalar(select(Report.id).where(Report.study_instance_uid == study)) is not None
        assert session.scalar(select(RejectionNote.id).where(RejectionNote.study_instance_uid == study)) is None
    assert qido_studies(archive, "clin-a", study) == []  # no image: hidden from image queries
    with archive.http("rad-a") as rad:
        kept = rad.get(f"/api/reports/{report.json()['id']}")
        assert kept.status_code == 200, kept.text
    [row] = audit_rows(archive, "instance.delete", study, "success")
    assert "study_emptied=yes" in row.detail and "instances=3" in row.detail
    pacs_check(archive)
    store_again(archive, tmp_path, sent)
    [found] = qido_studies(archive, "clin-a", study)
    assert found["00201208"]["Value"] == [2]


def resend_while_deleting(server: Any, aet: str, patient_id: str) -> None:
    """Delete a one-image study in this process while the server receives the same bytes again: the deletion
    pauses between claiming the object's tombstone and deleting it from the store, the re-send arrives then
    (its put is the same content-addressed key; its index transaction waits on the tombstone row), and must end
    with Success only with its object in the store."""
    world = Archive(server) if not isinstance(server, Archive) else server
    [ds] = world.send_study(aet, patient_id, per_series=1)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    with world.server.ctx.read_sessions() as session:
        key = session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop))
    assert key
    resent: dict[str, Any] = {}

    def send_again() -> None:
        resent["status"] = send_dataset(world.server.port, ds, ExplicitVRLittleEndian, aet=aet).status

    sender = threading.Thread(target=send_again)

    def pause(deleting: str) -> None:
        if deleting == key:
            sender.start()
            time.sleep(2.5)  # the re-send is received, put and waiting on the tombstone row (or still on its way)

    deletion.before_object_delete = pause
    try:
        done = deletion.delete_study(world.server.ctx, cli_principal(), study, "test: re-sent while deleting")
    finally:
        deletion.before_object_delete = None
    sender.join(120)
    assert resent.get("status") == 0, resent
    assert done.instances == 1
    with world.server.ctx.read_sessions() as session:
        assert session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop)) == key
        assert session.scalar(select(DeletedObject.id).where(DeletedObject.object_key == key)) is None
    assert world.server.ctx.store.exists(key), "acknowledged, but its object is gone"
    assert len(qido_studies(world, "clin-a", study)) == 1
    pacs_check(world)


def test_a_resend_while_its_object_is_deleted_keeps_its_object(archive: Archive) -> None:
    resend_while_deleting(archive, "MODA", "DEL-9")


def test_a_deletion_after_a_resend_keeps_the_resent_object(archive: Archive) -> None:
    """The other order: the re-send is indexed after the deletion committed, before it deletes the objects (it
    takes the tombstone): the deletion leaves the object alone."""
    [ds] = archive.send_study("MODA", "DEL-10", per_series=1)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    with archive.server.ctx.read_sessions() as session:
        key = session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop))
    real_delete_objects = deletion.delete_objects

    def resend_first(ctx: Any, cleanup: deletion.StoreCleanup, **kwargs: Any) -> deletion.StoreCleanup:
        assert send_dataset(archive.server.port, ds, ExplicitVRLittleEndian, aet="MODA").status == 0
        return real_delete_objects(ctx, cleanup, **kwargs)

    deletion.delete_objects = resend_first
    try:
        done = deletion.delete_study(archive.server.ctx, cli_principal(), study, "test: re-sent before the claim")
    finally:
        deletion.delete_objects = real_delete_objects
    assert done.objects_kept and key in done.objects_kept and done.objects_deleted == 0
    assert key and archive.server.ctx.store.exists(key)
    assert len(qido_studies(archive, "clin-a", study)) == 1
    pacs_check(archive)


def test_an_object_the_store_would_not_delete_is_retried_by_the_sweep(archive: Archive) -> None:
    """The store refuses while a study is deleted: the deletion stands (index rows gone), its object's tombstone
    stays pending and the retention sweep deletes it an hour later; gone tombstones are forgotten after a day."""
    [ds] = archive.send_study("MODA", "DEL-11", per_series=1)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    with archive.server.ctx.read_sessions() as session:
        key = session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop))
    assert key

    def store_down(deleting: str) -> None:
        raise StorageUnavailable("test: the store is down")

    deletion.before_object_delete = store_down
    try:
        done = deletion.delete_study(archive.server.ctx, cli_principal(), study, "test: store down")
    finally:
        deletion.before_object_delete = None
    assert done.instances == 1 and done.objects_deleted == 0 and qido_studies(archive, "clin-a", study) == []
    assert archive.server.ctx.store.exists(key)

    def tombstone() -> str | None:
        with archive.server.ctx.read_sessions() as session:
            return session.scalar(select(DeletedObject.state).where(DeletedObject.object_key == key))
    assert tombstone() == "pending"
    now = datetime.now(UTC)
    assert deletion.sweep_tombstones(archive.server.ctx, now=now) == 0  # not yet: the deletion may still be at it
    assert deletion.sweep_tombstones(archive.server.ctx, now=now + timedelta(hours=2)) == 1
    assert not archive.server.ctx.store.exists(key) and tombstone() == "gone"
    deletion.sweep_tombstones(archive.server.ctx, now=now + timedelta(days=2))
    assert tombstone() is None
    pacs_check(archive)


def test_admin_deletes_a_rejected_instance_before_its_retention(archive: Archive) -> None:
    sent = archive.send_study("MODA", "DEL-6")
    study, sop = str(sent[0].StudyInstanceUID), str(sent[0].SOPInstanceUID)
    _reject(archive, "rad-a", study, "quality", instances=[sop])  # kept 30 days: the sweep leaves it
    time.sleep(2.5)
    with archive.server.ctx.read_sessions() as session:
        key = session.scalar(select(RejectedInstance.object_key).where(RejectedInstance.sop_instance_uid == sop))
    assert key and archive.server.ctx.store.exists(key)
    with archive.http("tech-a") as tech:
        json_error(tech.request("DELETE", f"/api/rejected/{sop}", params={"reason": "x"}), 403)
    with archive.http("admin-b") as admin_b:
        json_error(admin_b.request("DELETE", f"/api/rejected/{sop}", params={"reason": "x"}), 404)
    with archive.http("admin-a") as admin:
        assert admin.request("DELETE", f"/api/rejected/{sop}", json={"reason": "blurred"}).status_code == 204
        json_error(admin.request("DELETE", f"/api/rejected/{sop}", json={"reason": "again"}), 404)
    assert not archive.server.ctx.store.exists(key)
    assert len(qido_studies(archive, "clin-a", study)) == 1  # the other instance stays
    [row] = audit_rows(archive, "instance.delete", study, "success")
    assert row.actor == "token:admin-a" and "blurred" in row.detail


# -- study retention ---------------------------------------------------------------------------------------------

def test_study_retention_lists_what_is_due_and_deletes_only_confirmed_due_studies(archive: Archive) -> None:
    old_a = str(archive.send_study("MODA", "RET-A", StudyDate="19990101")[0].StudyInstanceUID)
    new_a = str(archive.send_study("MODA", "RET-A2")[0].StudyInstanceUID)
    old_b = str(archive.send_study("MODB", "RET-B", StudyDate="19990101")[0].StudyInstanceUID)  # kept forever
    with archive.http("admin") as admin:
        due = admin.get("/api/retention/due")
        assert due.status_code == 200, due.text
        body = due.json()
        assert [s["study_instance_uid"] for s in body["studies"]] == [old_a] and body["total"] == 1
        [item] = body["studies"]
        assert item["patient"]["id"] == "RET-A" and item["facility"] == "HOSP-A" and item["instances"] == 2
        assert item["study_date"] == "19990101" and item["retention_years"] == 10
        assert admin.get("/api/retention/due", params={"facility": "HOSP-B"}).json()["studies"] == []
        assert admin.get("/api/retention/due", params={"limit": 0}).status_code in (400, 422)
    with archive.http("admin-b") as admin_b:  # HOSP-B's admin sees none of HOSP-A's due studies
        assert admin_b.get("/api/retention/due").json() == {"total": 0, "limit": 100, "offset": 0, "studies": []}
    assert any(old_a in r.detail and r.actor == "token:admin" for r in audit_rows(archive, "retention.list"))

    cli = run_pacs(["retention", "due", "--json"], archive.server.env)
    assert cli.returncode == 0, cli.stderr
    assert [s["study_instance_uid"] for s in json.loads(cli.stdout)["studies"]] == [old_a]

    with archive.http("admin") as admin:
        response = admin.post("/api/retention/delete", json={"studies": [old_a, new_a, old_b],
                                                             "reason": "retention policy"})
        assert response.status_code == 200, response.text
        result = response.json()
    assert [d["study_instance_uid"] for d in result["deleted"]] == [old_a]
    assert sorted(r["study_instance_uid"] for r in result["refused"]) == sorted([new_a, old_b])
    assert all("not due" in r["message"] for r in result["refused"])
    assert qido_studies(archive, "admin", old_a) == []
    assert len(qido_studies(archive, "admin", new_a)) == 1 and len(qido_studies(archive, "admin", old_b)) == 1
    assert keys_under(archive, f"dicom/{old_a}/") == []
    assert "policy=retention" in audit_rows(archive, "study.delete", old_a, "success")[0].detail
    assert audit_rows(archive, "study.delete", new_a, "failure") and audit_rows(archive, "study.delete", old_b,
                                                                                "failure")


# -- the scaled configuration: PostgreSQL, S3, `pacs scp` + `pacs api` + `pacs worker` (which runs the sweep) -----

def test_scaled_sweep_and_delete_on_postgresql_and_s3(tmp_path_factory: pytest.TempPathFactory,
                                                      s3_server: SeaweedS3) -> None:
    root = tmp_path_factory.mktemp("deletion-scaled")
    with scaled_api(root, s3_server, extra_env=SERVER_ENV) as server:
        world = Archive(server)
        sent = world.send_study("MODA", "SC-DEL", series=2)
        study, series = str(sent[0].StudyInstanceUID), str(sent[0].SeriesInstanceUID)
        _reject(world, "tech-a", study, "patient-safety", series=[series])

        def swept() -> bool:  # by `pacs worker`'s sweep: rows, then the objects in S3
            with server.ctx.read_sessions() as session:
                rows = session.scalar(select(RejectedInstance.id).where(RejectedInstance.study_instance_uid == study)
                                      .limit(1))
            return rows is None and keys_under(world, f"dicom/{study}/{series}/") == []
        wait_for("the worker's retention sweep", swept)
        store_again(world, root, [ds for ds in sent if ds.SeriesInstanceUID == series])

        other = str(world.send_study("MODA", "SC-DEL2")[0].StudyInstanceUID)
        with world.http("admin") as admin:
            assert admin.request("DELETE", f"/api/studies/{other}", params={"reason": "test"}).status_code == 204
            assert admin.get(f"/dicom-web/studies/{other}").status_code == 404
        assert keys_under(world, f"dicom/{other}/") == []
        assert len(qido_studies(world, "clin-a", study)) == 1
        pacs_check(world)
        resend_while_deleting(world, "MODA", "SC-DEL3")  # the tombstone's row lock on PostgreSQL, S3


def test_retention_settings_name_every_rejection_reason_and_refuse_unknown_ones() -> None:
    assert set(REJECTION_RETENTION_DEFAULTS) == set(REASON_CODES)
    assert Settings(rejection_retention_days={"quality": 7}).rejection_retention_days == {
        **REJECTION_RETENTION_DEFAULTS, "quality": 7}
    for bad in ({"qualiti": 1}, {"quality": -2}):
        with pytest.raises(ValueError, match="rejection_retention_days"):
            Settings(rejection_retention_days=bad)
    with pytest.raises(ValueError, match="study_retention_years"):
        Settings(study_retention_years={"HOSP-A": -1})
