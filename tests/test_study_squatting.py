"""Study-UID squatting (issue 12 finding 4) against a live `pacs serve` with two facilities.

The attack: the worklist discloses scheduled Study Instance UIDs; whoever sent one first owned the study.
A sender of facility B pre-sent an object with A's scheduled UID and A's real exam was refused (0xA900);
sent first by an unregistered AE, A's images were filed under the attacker's patient, invisible to A; and
STOW-RS answered 409 or 200 depending on whether the other facility's study existed.

Now (pacs.security.filing_rules, pacs.reconciliation): an order pins its study's facility and patient; what
a sender may not file is stored and held in the study's facility's reconciliation queue, acknowledged with
the answer a new study gets (0x0000 / 200) unless the sender may read the study (then 0xB000 with a reason);
admins and technologists of that facility resolve it over HTTP, audited.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from pacs.db.models import AuditEvent
from tests.support.datasets import make_dataset, to_bytes
from tests.support.inprocess import register_ae
from tests.support.senders import SendResult, send_dataset
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

HELD_WARNING = 0xB000


@dataclass
class Site:
    pacs: EmbeddedPacs
    tech_a: str
    admin_a: str
    tech_b: str
    radiologist_a: str

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.pacs.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def send(self, aet: str, study: str, patient_id: str, **attrs: object) -> tuple[SendResult, str]:
        ds = make_dataset(StudyInstanceUID=study, PatientID=patient_id, PatientName=f"NAME^{patient_id}",
                          **attrs)
        return send_dataset(self.pacs.port, ds, ExplicitVRLittleEndian, aet=aet), str(ds.SOPInstanceUID)

    def order(self, patient_id: str) -> str:
        """A's order for ``patient_id``; its Study Instance UID (what the worklist discloses)."""
        with self.client(self.tech_a) as http:
            response = http.post("/api/orders", json={"patient": {"id": patient_id, "name": f"NAME^{patient_id}"},
                                                      "modality": "CT", "procedure": "CT HEAD"})
        assert response.status_code == 201, response.text
        return response.json()["study_instance_uid"]

    def instances(self, token: str, study: str) -> dict[str, str]:
        """SOP Instance UID -> Patient ID of what ``token`` finds in ``study`` (QIDO-RS)."""
        with self.client(token) as http:
            response = http.get("/dicom-web/instances", params={"StudyInstanceUID": study,
                                                                "includefield": "00100020"})
        assert response.status_code in (200, 204), response.text
        rows = response.json() if response.status_code == 200 else []
        return {r["00080018"]["Value"][0]: r["00100020"]["Value"][0] for r in rows}

    def queue(self, token: str, state: str = "pending") -> dict[str, dict]:
        """SOP Instance UID -> held item, of the caller's reconciliation queue."""
        with self.client(token) as http:
            response = http.get("/api/reconciliation", params={"state": state})
        assert response.status_code == 200, response.text
        return {i["sop_instance_uid"]: i for i in response.json()}

    def resolve(self, token: str, item_id: int, **body: str) -> httpx.Response:
        with self.client(token) as http:
            return http.post(f"/api/reconciliation/{item_id}/resolve", json=body)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("squatting"))
    try:
        for aet, facility in (("MODA", "HOSP-A"), ("MODB", "HOSP-B")):
            register_ae(pacs.ctx, aet, "127.0.0.1", 104, facility=facility)
        yield Site(pacs, pacs.token("technologist", name="tech-a", facility="HOSP-A"),
                   pacs.token("admin", name="admin-a", facility="HOSP-A"),
                   pacs.token("technologist", name="tech-b", facility="HOSP-B"),
                   pacs.token("radiologist", name="rad-a", facility="HOSP-A"))
    finally:
        pacs.close()


def test_another_facility_pre_sending_a_scheduled_uid_does_not_take_the_study(site: Site) -> None:
    study = site.order("PAT-A1")
    squat, squat_sop = site.send("MODB", study, "EVIL-B")
    fresh, _ = site.send("MODB", generate_uid(), "EVIL-B")
    assert squat == fresh == SendResult(0, "")  # the answer a new study gets: nothing tells B the UID is taken
    real = [site.send("MODA", study, "PAT-A1") for _ in range(2)]
    assert [r for r, _ in real] == [SendResult(0, "")] * 2  # before: 0xA900, A's exam refused
    assert site.instances(site.tech_a, study) == {sop: "PAT-A1" for _, sop in real}  # filed under A's order
    assert site.instances(site.tech_b, study) == {}
    with site.client(site.admin_a) as http:  # the squatter's object is nowhere to be read
        assert http.get(f"/dicom-web/studies/{study}/series/x/instances/{squat_sop}").status_code in (400, 404)
        assert squat_sop not in http.get(f"/dicom-web/studies/{study}/metadata").text
    held = site.queue(site.tech_a)[squat_sop]
    assert (held["reason"], held["facility"], held["patient"]["id"], held["sender"]["ae_title"],
            held["expected_patient"]["id"]) == ("sender", "HOSP-A", "EVIL-B", "MODB", "PAT-A1")
    # B's technologist does not see A's queue (not even by id); a radiologist has no queue at all
    assert squat_sop not in site.queue(site.tech_b)
    with site.client(site.tech_b) as http:
        assert http.get(f"/api/reconciliation/{held['id']}").status_code == 404
    with site.client(site.radiologist_a) as http:
        assert http.get("/api/reconciliation").status_code == 403


def test_an_unregistered_sender_first_does_not_take_the_study(site: Site) -> None:
    study = site.order("PAT-A2")
    rogue, rogue_sop = site.send("ROGUE", study, "EVIL-X")
    assert rogue == SendResult(0, "")
    real, real_sop = site.send("MODA", study, "PAT-A2")
    assert real == SendResult(0, "")
    assert site.instances(site.tech_a, study) == {real_sop: "PAT-A2"}  # before: filed under EVIL-X, invisible
    held = site.queue(site.tech_a)[rogue_sop]
    assert (held["reason"], held["sender"]["registered"]) == ("sender", False)


def test_a_study_an_unregistered_sender_created_is_claimed_by_the_trusted_exam(site: Site) -> None:
    """No order: the UID was guessed (modalities derive UIDs from the clock). The trusted exam wins; the
    unregistered peer's objects move to A's queue and out of the study."""
    study = generate_uid()
    rogue = [site.send("ROGUE", study, "EVIL-Y", SeriesInstanceUID="1.2.3.999") for _ in range(2)]
    assert [r for r, _ in rogue] == [SendResult(0, "")] * 2
    real, real_sop = site.send("MODA", study, "PAT-A3")
    assert real == SendResult(0, "")
    assert site.instances(site.tech_a, study) == {real_sop: "PAT-A3"}
    with site.client(site.admin_a) as http:
        study_json = http.get("/dicom-web/studies", params={"StudyInstanceUID": study}).json()
    assert [s["00100020"]["Value"][0] for s in study_json] == ["PAT-A3"]
    queue = site.queue(site.tech_a)
    assert {queue[sop]["reason"] for _, sop in rogue} == {"untrusted-first"}
    keys = [o.key for o in site.pacs.ctx.store.list(f"dicom/{study}/")]
    assert len(keys) == 1 and real_sop in keys[0]  # the rogue's objects now live under reconciliation/ only
    for _, sop in rogue:
        assert site.pacs.ctx.store.exists(f"reconciliation/{queue[sop]['sha256']}.dcm")


def test_resolving_held_objects_is_scoped_and_audited(site: Site) -> None:
    study = site.order("PAT-A4")
    first, first_sop = site.send("MODA", study, "PAT-A4")
    assert first == SendResult(0, "")
    typos = [site.send("MODA", study, "PAT-TYPO", SeriesInstanceUID="1.2.3.4444") for _ in range(3)]
    for result, _ in typos:  # A's own modality may read the study: it is told, with a warning (a success)
        assert result.status == HELD_WARNING and "held for reconciliation" in result.error_comment, result
    assert site.instances(site.tech_a, study) == {first_sop: "PAT-A4"}  # never filed under another patient
    queue = site.queue(site.tech_a)
    file_it, separate_it, discard_it = (queue[sop] for _, sop in typos)
    assert {i["reason"] for i in (file_it, separate_it, discard_it)} == {"patient"}

    # out of scope: B's technologist gets 404 (as for a missing id); a reason and a known action are required
    assert site.resolve(site.tech_b, file_it["id"], action="discard", reason="mine").status_code == 404
    assert site.resolve(site.tech_a, file_it["id"], action="file", reason="").status_code == 400
    assert site.resolve(site.tech_a, file_it["id"], action="merge", reason="x").status_code == 400

    filed = site.resolve(site.tech_a, file_it["id"], action="file", reason="typo at the console, same patient")
    assert filed.status_code == 200 and filed.json()["state"] == "filed", filed.text
    # filed into the study under the study's patient (the object's bytes stay as received)
    assert site.instances(site.tech_a, study) == {first_sop: "PAT-A4", file_it["sop_instance_uid"]: "PAT-A4"}

    separated = site.resolve(site.admin_a, separate_it["id"], action="separate", reason="another patient's image")
    assert separated.status_code == 200 and separated.json()["state"] == "separated", separated.text
    new_study = separated.json()["resolved"]["study_instance_uid"]
    assert new_study and new_study != study
    assert site.instances(site.tech_a, new_study) == {separate_it["sop_instance_uid"]: "PAT-TYPO"}
    assert site.instances(site.tech_b, new_study) == {}

    discarded = site.resolve(site.tech_a, discard_it["id"], action="discard", reason="test shot")
    assert discarded.status_code == 200 and discarded.json()["state"] == "discarded", discarded.text
    assert not site.pacs.ctx.store.exists(f"reconciliation/{discard_it['sha256']}.dcm")
    again = site.resolve(site.tech_a, discard_it["id"], action="file", reason="changed my mind")
    assert again.status_code == 409, again.text
    assert set(site.queue(site.tech_a, "all")) >= {i["sop_instance_uid"] for i in (file_it, separate_it, discard_it)}

    with site.pacs.ctx.read_sessions() as session:
        rows = session.execute(select(AuditEvent.action, AuditEvent.actor, AuditEvent.detail)
                               .where(AuditEvent.action.like("reconciliation.%"),
                                      AuditEvent.study_instance_uid == study, AuditEvent.outcome == "success")
                               ).all()
    audited = {(action, actor, detail.rsplit("reason: ", 1)[-1]) for action, actor, detail in rows}
    assert audited >= {("reconciliation.file", "token:tech-a", "typo at the console, same patient"),
                       ("reconciliation.separate", "token:admin-a", "another patient's image"),
                       ("reconciliation.discard", "token:tech-a", "test shot")}


def test_stow_answers_the_same_whether_or_not_the_other_facilitys_study_exists(site: Site) -> None:
    taken = site.order("PAT-A5")
    assert site.send("MODA", taken, "PAT-A5")[0] == SendResult(0, "")
    answers = []
    for study, in_url in ((taken, True), (generate_uid(), True), (taken, False), (generate_uid(), False)):
        ds = make_dataset(StudyInstanceUID=study, PatientID="EVIL-B")
        with site.client(site.tech_b) as http:
            response = http.post(f"/dicom-web/studies/{study}" if in_url else "/dicom-web/studies",
                                 content=to_bytes(ds), headers={"Content-Type": "application/dicom",
                                                                "Accept": "application/dicom+json"})
        text = response.text
        for uid, name in ((study, "STUDY"), (str(ds.SeriesInstanceUID), "SERIES"), (str(ds.SOPInstanceUID), "SOP")):
            text = text.replace(uid, name)
        answers.append((response.status_code, re.sub(r"\s+", "", text), dict(response.headers).get("content-type")))
    assert answers[0] == answers[1] and answers[2] == answers[3], answers  # before: 409 for A's study, 200 else
    assert answers[0][0] == 200
    # A's own technologist may read the study: told (202, Warning Reason B000 on the instance), not refused
    with site.client(site.tech_a) as http:
        response = http.post(f"/dicom-web/studies/{taken}", content=to_bytes(make_dataset(
            StudyInstanceUID=taken, PatientID="PAT-TYPO")), headers={"Content-Type": "application/dicom"})
    assert response.status_code == 202, response.text
    [item] = response.json()["00081199"]["Value"]
    assert item["00081196"]["Value"] == [HELD_WARNING] and "00081198" not in response.json()
    assert site.instances(site.tech_a, taken) == {next(iter(site.instances(site.tech_a, taken))): "PAT-A5"}
