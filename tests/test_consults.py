"""Teleconsultation (issue 14, must-show 3) against a live `pacs serve`: facility B asks A about one of B's
studies; A's radiologist sees exactly that study while the consult is open (QIDO, WADO), answers (Vietnamese
text, and as a draft report); B is notified (unread counts); after close or expiry A sees nothing again; every
step is in the audit trail. An outside doctor answers through a share link of scope "study". Bad input gets
a clear 4xx. The grant's SQL condition is also checked on SQLite and PostgreSQL directly.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import event, select, update

from pacs.ae_scope import ae_scope
from pacs.aes import lookup
from pacs.consults import service
from pacs.consults.models import ANSWERED, CLOSED, OPEN, Consult, ConsultAnswer
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.engine import make_engine, make_session_factory
from pacs.db.models import AuditEvent, Patient, Study
from pacs.security.access import may_see_study
from pacs.security.principal import AccessScope, Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.settings import Settings
from tests.support.facilities import FacilityArchive, json_error
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

QUESTION = "Xin ý kiến chuyên gia: tổn thương giảm tỷ trọng ở gan phải, có phải u máu không?"
ANSWER = "Hình ảnh phù hợp u máu gan điển hình. Đề nghị chụp MRI gan có tiêm thuốc để khẳng định."
REPORT_ANSWER = "Kết luận: u máu gan phải, kích thước 2,5 cm. Không thấy tổn thương khác."
EXTERNAL_ANSWER = "Đồng ý với chẩn đoán u máu; theo dõi sau 6 tháng."
DOCTOR = "BS. Trần Thị Hà"


class Archive(FacilityArchive):
    """HOSP-A (the provincial hospital), HOSP-B (a district hospital) and HOSP-C; studies from MODA / MODB."""

    def __init__(self, server: EmbeddedPacs) -> None:
        super().__init__(server)
        self.study_a = self.send_study("MODA", "PAT-A", "LÊ^VĂN BA")
        self.study_b = self.send_study("MODB", "PAT-B", "Nguyễn^Thị Ánh")
        self.study_b2 = self.send_study("MODB", "PAT-B2", "PHẠM^VĂN CƯỜNG")
        self.add_tokens(("rad-a", "radiologist", "HOSP-A"), ("clin-a", "clinician", "HOSP-A"),
                        ("tech-a", "technologist", "HOSP-A"), ("rad-b", "radiologist", "HOSP-B"),
                        ("clin-b", "clinician", "HOSP-B"), ("rad-c", "radiologist", "HOSP-C"), ("admin", "admin", ""),
                        ("emr-a", "emr", "HOSP-A"))

    def send_study(self, aet: str, patient_id: str, name: str) -> tuple[str, str, str]:
        ds = self.send_instance(aet, PatientID=patient_id, PatientName=name, PatientBirthDate="19700304",
                                StudyDescription="CT bụng", BitsAllocated=16, BitsStored=12, HighBit=11,
                                PixelData=np.arange(256, dtype=np.uint16).tobytes())
        return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID

    def audit_rows(self, study: str, action_prefix: str = "consult.") -> list[AuditEvent]:
        with self.server.ctx.read_sessions() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.study_instance_uid == study,
                                                                 AuditEvent.action.startswith(action_prefix))
                                        .order_by(AuditEvent.id)))

    def refusals(self, action: str) -> list[tuple[str, str]]:
        with self.server.ctx.read_sessions() as session:
            return [(r.actor, r.detail) for r in session.scalars(select(AuditEvent).where(
                AuditEvent.action == action, AuditEvent.outcome == "failure"))]

    def set_expiry(self, consult_id: int, when: datetime) -> None:
        with self.server.ctx.sessions() as session, session.begin():
            session.execute(update(Consult).where(Consult.id == consult_id).values(expires_at=when))


@pytest.fixture(scope="module")
@starts_servers
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    with Archive.serving(tmp_path_factory.mktemp("consults")) as archive:
        yield archive


def _found(client: httpx.Client, params: dict[str, str] | None = None) -> set[str]:
    """Study Instance UIDs a QIDO-RS study search returns."""
    response = client.get("/dicom-web/studies", params=params or {})
    assert response.status_code == 200, response.text
    return {s["0020000D"]["Value"][0] for s in response.json()}


def _sees(client: httpx.Client, study: tuple[str, str, str]) -> bool:
    """Whether WADO-RS serves the study (metadata and the instance itself), checked both ways."""
    uid, series, sop = study
    metadata = client.get(f"/dicom-web/studies/{uid}/metadata")
    instance = client.get(f"/dicom-web/studies/{uid}/series/{series}/instances/{sop}",
                          headers={"Accept": "multipart/related; type=\"application/dicom\""})
    assert metadata.status_code in (200, 404) and instance.status_code in (200, 404), (metadata, instance)
    assert (metadata.status_code == 200) == (instance.status_code == 200)
    return metadata.status_code == 200


def test_consult_from_b_to_a_grants_exactly_that_study_while_open(archive: Archive) -> None:
    uid_b = archive.study_b[0]
    with archive.http("rad-a") as rad_a, archive.http("clin-a") as clin_a, archive.http("clin-b") as clin_b, \
            archive.http("rad-b") as rad_b:
        # before the request: A sees only its own study
        assert _found(rad_a) == {archive.study_a[0]}
        assert _found(rad_a, {"StudyInstanceUID": uid_b}) == set()
        assert not _sees(rad_a, archive.study_b)
        assert rad_a.get("/api/consults/unread").json() == {"inbox": 0, "sent": 0}

        made = clin_b.post(f"/api/studies/{uid_b}/consults", json={"to_facility": "HOSP-A", "question": QUESTION})
        assert made.status_code == 201, made.text
        consult = made.json()
        cid = consult["id"]
        assert made.headers["Location"] == f"/api/consults/{cid}"
        assert (consult["state"], consult["question"], consult["consulted_facility"], consult["side"]) == (
            OPEN, QUESTION, "HOSP-A", "requester")
        assert "url" not in consult
        expires = datetime.fromisoformat(consult["expires_at"])
        assert timedelta(days=13, hours=23) < expires - datetime.fromisoformat(consult["created_at"]) \
            <= timedelta(days=14)

        # during: A's people see exactly that study — not B's other study
        assert _found(rad_a) == {archive.study_a[0], uid_b}
        assert _found(rad_a, {"PatientName": "nguyen*"}) == {uid_b}
        assert _found(rad_a, {"StudyInstanceUID": archive.study_b2[0]}) == set()
        assert _sees(rad_a, archive.study_b) and not _sees(rad_a, archive.study_b2)
        assert _sees(clin_a, archive.study_b)
        # a borrowed study is not A's to hand out: no share link or result slip for it (like an unknown study)
        assert clin_a.post(f"/api/studies/{uid_b}/shares", json={"scope": "report"}).status_code == 404
        assert clin_a.post(f"/api/studies/{uid_b}/slip.pdf", json={"scope": "report"}).status_code == 404
        # nor work on A's reading list: the consult is in A's inbox, the study stays B's to report
        reading = rad_a.get("/api/reading-list")
        assert reading.status_code == 200 and uid_b not in {i["study_instance_uid"] for i in reading.json()}

        # A is notified; opening marks it read for A's side
        assert rad_a.get("/api/consults/unread").json() == {"inbox": 1, "sent": 0}
        inbox = rad_a.get("/api/consults", params={"box": "inbox"})
        assert inbox.status_code == 200 and inbox.headers["X-Total-Count"] == "1"
        item = inbox.json()[0]
        assert (item["id"], item["unread"], item["side"]) == (cid, True, "consultant")
        assert item["study"]["patient_name"] == "Nguyễn^Thị Ánh" and item["study"]["modalities"] == ["CT"]
        assert rad_a.get("/api/consults", params={"box": "sent"}).json() == []
        opened = rad_a.get(f"/api/consults/{cid}")
        assert opened.status_code == 200 and opened.json()["question"] == QUESTION
        assert rad_a.get("/api/consults/unread").json() == {"inbox": 0, "sent": 0}
        assert clin_a.get("/api/consults/unread").json()["inbox"] == 0  # read for the whole side

        # A answers: plain text, then a radiologist's answer that also starts a draft report
        answered = rad_a.post(f"/api/consults/{cid}/answers", json={"text": ANSWER})
        assert answered.status_code == 201, answered.text
        assert answered.json()["text"] == ANSWER and answered.json()["author_facility"] == "HOSP-A"
        assert answered.json()["consult"]["state"] == ANSWERED and answered.json()["report_id"] is None
        as_report = rad_a.post(f"/api/consults/{cid}/answers", json={"text": REPORT_ANSWER, "as_report": True})
        assert as_report.status_code == 201, as_report.text
        report_id = as_report.json()["report_id"]
        report = rad_a.get(f"/api/reports/{report_id}").json()
        assert (report["study_instance_uid"], report["status"], report["findings"]) == (uid_b, "draft",
                                                                                      REPORT_ANSWER)
        claim = rad_b.post(f"/api/studies/{uid_b}/claim")  # the consultant's draft leaves B's study unclaimed
        assert claim.status_code == 200 and claim.json()["claimed_by"] == "token:rad-b", claim.text
        assert rad_b.delete(f"/api/studies/{uid_b}/claim").status_code == 204
        json_error(clin_a.post(f"/api/consults/{cid}/answers", json={"text": "x", "as_report": True}), 403)
        json_error(clin_b.post(f"/api/consults/{cid}/answers", json={"text": "x"}), 403)  # the asking side

        # B is notified and reads the answers, exact
        assert clin_b.get("/api/consults/unread").json() == {"inbox": 0, "sent": 1}
        sent = clin_b.get("/api/consults", params={"box": "sent"}).json()
        assert [(c["id"], c["unread"], c["state"]) for c in sent] == [(cid, True, ANSWERED)]
        shown = clin_b.get(f"/api/consults/{cid}").json()
        assert [a["text"] for a in shown["answers"]] == [ANSWER, REPORT_ANSWER]
        assert shown["answers"][1]["report_id"] == report_id
        assert clin_b.get("/api/consults/unread").json() == {"inbox": 0, "sent": 0}
        kept = rad_b.get(f"/api/studies/{uid_b}/consults")
        assert kept.status_code == 200 and [a["text"] for a in kept.json()[0]["answers"]] == [ANSWER,
                                                                                            REPORT_ANSWER]

        # B closes: A loses the study at once, and is told
        closed = clin_b.post(f"/api/consults/{cid}/close")
        assert closed.status_code == 200 and closed.json()["state"] == CLOSED, closed.text
        assert _found(rad_a) == {archive.study_a[0]}
        assert not _sees(rad_a, archive.study_b)
        json_error(rad_a.get(f"/api/reports/{report_id}"), 404)
        json_error(rad_a.get(f"/api/studies/{uid_b}/consults"), 404)
        assert rad_a.get("/api/consults/unread").json() == {"inbox": 1, "sent": 0}
        still = rad_a.get(f"/api/consults/{cid}").json()  # A keeps its record of the exchange, not the patient
        assert still["state"] == CLOSED and still["study"] is None and len(still["answers"]) == 2
        assert "closed" in json_error(rad_a.post(f"/api/consults/{cid}/answers", json={"text": ANSWER}), 409)
        json_error(clin_b.post(f"/api/consults/{cid}/close"), 409)
        # the answers stay with the study for B
        assert len(rad_b.get(f"/api/studies/{uid_b}/consults").json()[0]["answers"]) == 2

    actions = [(r.action, r.actor, r.outcome) for r in archive.audit_rows(uid_b)]
    for expected in [("consult.request", "token:clin-b", "success"), ("consult.open", "token:rad-a", "success"),
                     ("consult.answer", "token:rad-a", "success"), ("consult.open", "token:clin-b", "success"),
                     ("consult.read", "token:rad-b", "success"), ("consult.close", "token:clin-b", "success")]:
        assert expected in actions, (expected, actions)
    refused = archive.refusals("consult.answer")  # refusals name the consult in the request path
    for actor in ("token:clin-a", "token:clin-b", "token:rad-a"):
        assert any(f"/api/consults/{cid}/answers" in detail for who, detail in refused if who == actor), refused
    reads = archive.audit_rows(uid_b, "dicomweb.")
    assert any(r.actor == "token:rad-a" and r.outcome == "success" for r in reads)  # A's reads are audited too
    with archive.server.ctx.read_sessions() as session:
        row = session.scalars(select(ConsultAnswer).where(ConsultAnswer.text == ANSWER)).one()
        assert (row.author, row.author_facility) == ("token:rad-a", "HOSP-A")


def test_consult_expires_and_access_ends_at_its_expiry(archive: Archive) -> None:
    uid_b = archive.study_b[0]
    with archive.http("rad-a") as rad_a, archive.http("rad-b") as rad_b:
        made = rad_b.post(f"/api/studies/{uid_b}/consults",
                          json={"to_facility": "HOSP-A", "question": QUESTION, "expires_in_days": 2})
        assert made.status_code == 201, made.text
        cid = made.json()["id"]
        assert _sees(rad_a, archive.study_b)
        archive.set_expiry(cid, datetime.now(UTC) - timedelta(seconds=1))
        assert not _sees(rad_a, archive.study_b)  # the grant compares the time itself: no sweep needed
        assert uid_b not in _found(rad_a)
        listed = rad_a.get("/api/consults", params={"box": "inbox", "state": "expired"}).json()
        assert [c["id"] for c in listed if c["id"] == cid] == [cid]
        assert "expired" in json_error(rad_a.post(f"/api/consults/{cid}/answers", json={"text": ANSWER}), 409)
        json_error(rad_b.post(f"/api/consults/{cid}/close"), 409)
        assert rad_b.get(f"/api/consults/{cid}").json()["state"] == "expired"
    expired = [r for r in archive.audit_rows(uid_b) if r.action == "consult.expire"]
    assert len(expired) == 1 and f"consult {cid} expired" in expired[0].detail and expired[0].actor == "system"


def test_bad_requests_get_clear_errors(archive: Archive) -> None:
    uid_b, uid_b2 = archive.study_b[0], archive.study_b2[0]
    with archive.http("rad-a") as rad_a, archive.http("clin-b") as clin_b, archive.http("tech-a") as tech_a, \
            archive.http("rad-c") as rad_c, archive.http("admin") as admin:
        # a study the requester may not see: 404, like an unknown one
        json_error(rad_a.post(f"/api/studies/{uid_b2}/consults", json={"to_facility": "HOSP-C", "question": "?"}), 404)
        json_error(rad_a.post(f"/api/studies/{generate_uid()}/consults",
                          json={"to_facility": "HOSP-C", "question": "?"}), 404)
        url = f"/api/studies/{uid_b}/consults"
        assert "empty" in json_error(clin_b.post(url, json={"to_facility": "HOSP-A", "question": "  "}), 400)
        assert "unknown facility" in json_error(clin_b.post(url, json={"to_facility": "HOSP-Z", "question": "?"}), 400)
        json_error(clin_b.post(url, json={"to_facility": "HOSP-B", "question": "?"}), 400)  # one's own
        json_error(clin_b.post(url, json={"question": "?"}), 400)  # nobody asked
        json_error(clin_b.post(url, json={"to_facility": "HOSP-A", "external": True, "question": "?"}), 400)
        json_error(clin_b.post(url, json={"to_facility": "HOSP-A", "question": "?", "expires_in_days": 91}), 400)
        json_error(clin_b.post(url, json={"to_facility": "HOSP-A", "question": "a\x00b"}), 400)
        json_error(tech_a.post(url, json={"to_facility": "HOSP-A", "question": "?"}), 403)  # no consult capability
        json_error(clin_b.get("/api/consults", params={"box": "outbox"}), 400)
        json_error(clin_b.get("/api/consults", params={"state": "pending"}), 400)
        json_error(clin_b.get("/api/consults/0"), 400)
        json_error(clin_b.get("/api/consults/999999"), 404)

        made = clin_b.post(url, json={"to_facility": "HOSP-A", "question": QUESTION})
        assert made.status_code == 201
        cid = made.json()["id"]
        # a third facility neither sees the consult nor the study
        json_error(rad_c.get(f"/api/consults/{cid}"), 404)
        json_error(rad_c.post(f"/api/consults/{cid}/close"), 404)
        assert rad_c.get("/api/consults", params={"box": "inbox"}).json() == []
        # the consulted side cannot pass the study on
        json_error(rad_a.post(url, json={"to_facility": "HOSP-C", "question": "?"}), 403)
        assert "empty" in json_error(rad_a.post(f"/api/consults/{cid}/answers", json={"text": ""}), 400)
        # an archive-wide admin oversees: opens and closes, answers nothing
        assert admin.get(f"/api/consults/{cid}").json()["side"] == "observer"
        json_error(admin.post(f"/api/consults/{cid}/answers", json={"text": "x"}), 403)
        assert admin.post(f"/api/consults/{cid}/close").json()["state"] == CLOSED
        assert not _sees(rad_a, archive.study_b)
    refused = [r.actor for r in archive.audit_rows(uid_b) if r.outcome == "failure"]
    assert {"token:clin-b", "token:rad-a"} <= set(refused)  # refusals are audited (403s by the security layer)


def test_outside_doctor_answers_through_a_share_link(archive: Archive) -> None:
    """A consult for a doctor without an account: the share link (scope "study") opens the study and its
    consult page; the answer posted there is stored with the link's id; closing revokes the link."""
    uid_b = archive.study_b[0]
    with archive.http("clin-b") as clin_b, archive.http("rad-a") as rad_a:
        made = clin_b.post(f"/api/studies/{uid_b}/consults",
                           json={"external": True, "question": QUESTION, "expires_in_days": 7})
        assert made.status_code == 201, made.text
        body = made.json()
        cid, link_id, url = body["id"], body["share_link_id"], body["url"]
        assert body["external"] and body["consulted_facility"] == "" and link_id
        assert url.startswith(f"{archive.server.http_url}/s/")
        token = url.rsplit("/", 1)[1]
        assert all(c["id"] != cid for c in rad_a.get("/api/consults").json())  # nobody's inbox: the link's
        patient_link = clin_b.post(f"/api/studies/{uid_b}/shares", json={"scope": "report"}).json()["url"]

    with archive.http(None) as browser:  # no account, no token
        study_page = browser.get(f"/s/{token}", params={"lang": "vi"})
        assert study_page.status_code == 200 and f"/s/{token}/consult" in study_page.text
        page = browser.get(f"/s/{token}/consult", params={"lang": "vi"})
        assert page.status_code == 200, page.text
        assert QUESTION in page.text and "Nguyễn^Thị Ánh" in page.text and "Yêu cầu hội chẩn" in page.text
        assert "<script" not in page.text and "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        english = browser.get(f"/s/{token}/consult", params={"lang": "en"})
        assert "Consultation request" in english.text and "Send the answer" in english.text
        form = {"name": DOCTOR, "text": EXTERNAL_ANSWER, "lang": "vi"}
        assert browser.post(f"/s/{token}/consult", data=form).status_code == 403  # no form token
        assert browser.post(f"/s/{token}/consult", data={**form, "csrf": "1." + "0" * 64}).status_code == 403
        empty = browser.post(f"/s/{token}/consult", data={**form, "text": " ", "csrf": _csrf(page.text)})
        assert empty.status_code == 400 and "Vui lòng viết ý kiến" in empty.text
        sent = browser.post(f"/s/{token}/consult", data={**form, "csrf": _csrf(page.text)}, follow_redirects=False)
        assert sent.status_code == 303 and sent.headers["location"] == f"/s/{token}/consult?lang=vi&sent=1"
        after = browser.get(sent.headers["location"])
        assert EXTERNAL_ANSWER in after.text and f"{DOCTOR} (via share link {link_id})" in after.text
        # a patient's link (not made for a consult) has no consult page
        assert browser.get(f"{patient_link}/consult").status_code == 404

    with archive.server.ctx.read_sessions() as session:
        row = session.scalars(select(ConsultAnswer).where(ConsultAnswer.consult_fk == cid)).one()
        assert (row.text, row.share_link_id, row.author) == (EXTERNAL_ANSWER, link_id,
                                                             f"{DOCTOR} (via share link {link_id})")
        trail = list(session.scalars(select(AuditEvent)))
    assert not [r.id for r in trail if token in f"{r.actor} {r.detail} {r.source_address}"]  # never in clear
    answers = [r for r in trail if r.action == "consult.answer" and r.actor == f"share:{link_id}"]
    assert len(answers) == 1 and f"share link {link_id}" in answers[0].detail
    assert any(r.action == "consult.open" and r.actor == f"share:{link_id}" for r in trail)

    with archive.http("clin-b") as clin_b:
        assert clin_b.get("/api/consults/unread").json()["sent"] >= 1
        shown = clin_b.get(f"/api/consults/{cid}").json()
        assert [(a["text"], a["share_link_id"]) for a in shown["answers"]] == [(EXTERNAL_ANSWER, link_id)]
        assert clin_b.post(f"/api/consults/{cid}/close").json()["state"] == CLOSED
    with archive.http(None) as browser:
        assert browser.get(f"/s/{token}/consult").status_code == 410  # closing revoked the link
        assert browser.get(f"/s/{token}").status_code == 410
    with archive.server.ctx.read_sessions() as session:
        assert any(r.action == "share.revoke" and f"link {link_id}" in r.detail
                   for r in session.scalars(select(AuditEvent).where(AuditEvent.study_instance_uid == uid_b)))


# -- the grant's SQL on both databases ----------------------------------------------------------------------


def _grant_world(url: str) -> None:
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        sessions = make_session_factory(engine)
        now = datetime.now(UTC)
        with sessions() as session, session.begin():
            patient = Patient(patient_id="P1", facility="HOSP-B", patient_name="Nguyễn^An")
            session.add(patient)
            session.flush()
            uids = [generate_uid() for _ in range(4)]
            session.add_all(Study(study_instance_uid=u, patient_fk=patient.id, facility="HOSP-B") for u in uids)
            for uid, state, expires in ((uids[0], OPEN, now + timedelta(days=1)),
                                        (uids[1], ANSWERED, now - timedelta(seconds=1)),
                                        (uids[2], CLOSED, now + timedelta(days=1))):
                session.add(Consult(study_instance_uid=uid, requested_by="b", consulted_facility="HOSP-A",
                                    requesting_facility="HOSP-B", question="?", state=state, created_at=now,
                                    expires_at=expires))
        a = AccessScope(facilities=frozenset({"HOSP-A"}), consult_grants=True)
        with sessions() as session:
            assert [may_see_study(session, a, u) for u in uids] == [True, False, False, False]
            # a scope without consult grants (an AE, a technologist, an EMR account) gets nothing of it
            assert may_see_study(session, AccessScope(facilities=frozenset({"HOSP-A"})), uids[0]) is False
            assert may_see_study(session, a, uids[0], borrowed=False) is False
            assert may_see_study(session, AccessScope(facilities=frozenset({"HOSP-C"})), uids[0]) is False
            assert may_see_study(session, AccessScope(facilities=frozenset()), uids[0]) is False
    finally:
        engine.dispose()


def test_grant_condition_on_sqlite(tmp_path: Path) -> None:
    """Open and before its expiry: granted; past expires_at (not yet swept) or closed: not; other facilities and
    the empty scope: never."""
    _grant_world(f"sqlite:///{tmp_path / 'g.sqlite3'}")


@pytest.mark.integration
def test_grant_condition_on_postgresql(fresh_pg_url: str) -> None:
    _grant_world(fresh_pg_url)


def test_expiry_sweeps_at_once_expire_and_audit_each_consult_once(tmp_path: Path) -> None:
    """Several sweeps at the same moment (requests of several workers): each due consult is expired and audited
    exactly once (a conditional UPDATE; SQLite has no row locks to serialise a SELECT … FOR UPDATE)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'e.sqlite3'}")
    try:
        migrate.upgrade(engine)
        sessions = make_session_factory(engine)
        now = datetime.now(UTC)
        with sessions() as session, session.begin():
            for _ in range(5):
                session.add(Consult(study_instance_uid=generate_uid(), requested_by="b", consulted_facility="HOSP-A",
                                    requesting_facility="HOSP-B", question="?", state=OPEN, created_at=now,
                                    expires_at=now - timedelta(minutes=1)))
        barrier = threading.Barrier(4)
        counts: list[int] = []

        def sweep() -> None:
            barrier.wait()
            with sessions() as session, session.begin():
                counts.append(service._expire_due(session, datetime.now(UTC)))

        threads = [threading.Thread(target=sweep) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(counts) == [0, 0, 0, 5]
        with sessions() as session:
            rows = [r.detail for r in session.scalars(select(AuditEvent).where(AuditEvent.action == "consult.expire"))]
            states = {c.state for c in session.scalars(select(Consult))}
            unread = {(c.events_for_requester, c.events_for_consultant) for c in session.scalars(select(Consult))}
        assert len(rows) == 5 and states == {"expired"} and unread == {(1, 1)}
    finally:
        engine.dispose()


def test_listing_consults_is_a_fixed_number_of_statements_and_names_its_patients(tmp_path: Path) -> None:
    """The inbox page is one query whatever its length (consult, study and patient joined, the scope in the
    join), and the trail gets one consult.list row per patient it shows."""
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    try:
        migrate.upgrade(ctx.engine)
        now = datetime.now(UTC)

        def add(count: int, patient_id: str) -> None:
            with ctx.sessions() as session, session.begin():
                patient = Patient(patient_id=patient_id, facility="HOSP-B", patient_name="Nguyễn^An")
                session.add(patient)
                session.flush()
                for _ in range(count):
                    uid = generate_uid()
                    session.add(Study(study_instance_uid=uid, patient_fk=patient.id, facility="HOSP-B"))
                    session.add(Consult(study_instance_uid=uid, patient_id=patient_id, requested_by="b",
                                        consulted_facility="HOSP-A", requesting_facility="HOSP-B", question="?",
                                        state=OPEN, created_at=now, expires_at=now + timedelta(days=1),
                                        closed_by="", events_for_requester=0, requester_seen=0,
                                        events_for_consultant=1, consultant_seen=0))

        rad = Principal("rad-a", Role.RADIOLOGIST, capabilities_of(Role.RADIOLOGIST),
                        scope_for(Role.RADIOLOGIST, "HOSP-A"), facility="HOSP-A")

        def selects() -> tuple[int, list[service.ConsultView]]:
            statements: list[str] = []

            def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
                statements.append(statement)

            event.listen(ctx.engine, "before_cursor_execute", count)
            try:
                views, total = service.list_consults(ctx, rad, box="inbox", limit=500, now=now)
            finally:
                event.remove(ctx.engine, "before_cursor_execute", count)
            assert total == len(views)
            return len([s for s in statements if s.lstrip().upper().startswith("SELECT")
                        and "audit_event" not in s]), views

        add(2, "P1")
        few, views = selects()
        add(30, "P2")
        many, views = selects()
        assert few == many, (few, many)
        assert len(views) == 32 and all(v.study is not None and v.side == "consultant" for v in views)
        with ctx.read_sessions() as session:
            rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "consult.list")
                                        .order_by(AuditEvent.id)))
        assert [r.patient_id for r in rows] == ["P1", "P1", "P2"]  # one row per patient shown, per listing
        assert rows[-1].actor == "rad-a" and rows[-1].detail.count(",") >= 29
    finally:
        ctx.close()


def test_consult_grant_is_for_its_doctors_only_and_changes_nothing(archive: Archive) -> None:
    """During a consult from B to A: A's technologist, A's EMR account and A's DICOM AE see nothing of the study;
    A's radiologist reads it but may not claim it, release it, mark key images or start a report of their own
    (404, like an unknown study) — only the answer ``as_report``, whose draft its author may then edit."""
    uid_b, _series, sop_b = archive.study_b
    with archive.http("rad-a") as rad_a, archive.http("tech-a") as tech_a, archive.http("emr-a") as emr_a, \
            archive.http("clin-b") as clin_b, archive.http("rad-b") as rad_b:
        made = clin_b.post(f"/api/studies/{uid_b}/consults", json={"to_facility": "HOSP-A", "question": QUESTION})
        assert made.status_code == 201, made.text
        cid = made.json()["id"]
        try:
            assert _sees(rad_a, archive.study_b)
            for other in (tech_a, emr_a):
                assert uid_b not in _found(other) and not _sees(other, archive.study_b)
            with archive.server.ctx.read_sessions() as session:
                moda = lookup(session, "MODA")
                assert moda is not None and moda.facility == "HOSP-A"
                scope = ae_scope(moda)
                assert scope.consult_grants is False and may_see_study(session, scope, uid_b) is False
            assert uid_b not in _c_find(archive, "MODA")  # the AE itself, over DICOM
            assert archive.study_a[0] in _c_find(archive, "MODA")

            # no writes on the borrowed study
            json_error(rad_a.post(f"/api/studies/{uid_b}/claim"), 404)
            json_error(rad_a.delete(f"/api/studies/{uid_b}/claim"), 404)
            json_error(rad_a.post(f"/api/studies/{uid_b}/key-images", json={"instances": [sop_b]}), 404)
            json_error(rad_a.post(f"/api/studies/{uid_b}/reports", json={"findings": ANSWER, "impression": "x"}), 404)
            assert rad_b.get(f"/api/studies/{uid_b}/key-images").json() == []
            # B's readers are not locked out
            claim = rad_b.post(f"/api/studies/{uid_b}/claim")
            assert claim.status_code == 200 and claim.json()["claimed_by"] == "token:rad-b", claim.text
            assert rad_b.delete(f"/api/studies/{uid_b}/claim").status_code == 204

            # the explicit exception: the answer as a report, and its author finishing that draft
            answered = rad_a.post(f"/api/consults/{cid}/answers", json={"text": REPORT_ANSWER, "as_report": True})
            assert answered.status_code == 201, answered.text
            report_id = answered.json()["report_id"]
            edited = rad_a.put(f"/api/reports/{report_id}", json={"findings": REPORT_ANSWER + " Đã sửa.",
                                                                   "impression": "U máu gan."})
            assert edited.status_code == 200, edited.text
            assert rad_b.post(f"/api/studies/{uid_b}/claim").status_code == 200  # still unclaimed for B
            assert rad_b.delete(f"/api/studies/{uid_b}/claim").status_code == 204
            # ... but never B's reports: A's radiologist cannot amend or sign what B wrote
            b_draft = rad_b.post(f"/api/studies/{uid_b}/reports", json={"findings": "B", "impression": "B"})
            assert b_draft.status_code == 201, b_draft.text
            json_error(rad_a.post(f"/api/reports/{b_draft.json()['id']}/sign"), 404)
            assert rad_b.delete(f"/api/studies/{uid_b}/claim").status_code == 204
        finally:
            assert clin_b.post(f"/api/consults/{cid}/close").status_code == 200
        json_error(rad_a.put(f"/api/reports/{report_id}", json={"findings": "x", "impression": "y"}), 404)

    # the inbox names its patients in the trail: one consult.list row per patient listed
    with archive.http("rad-a") as rad_a:
        listed = rad_a.get("/api/consults", params={"box": "inbox"}).json()
    named = {c["study"]["patient_id"] for c in listed if c["study"] is not None}
    with archive.server.ctx.read_sessions() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "consult.list",
                                                             AuditEvent.actor == "token:rad-a",
                                                             AuditEvent.patient_id != "")))
    assert named <= {r.patient_id for r in rows}


def _c_find(archive: Archive, aet: str) -> set[str]:
    """Study Instance UIDs a study-level C-FIND by ``aet`` (registered, calling from 127.0.0.1) matches."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.server.port, ae_title="PACS")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        found = set()
        for status, match in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            assert status
            if status.Status in (0xFF00, 0xFF01) and match is not None:
                found.add(str(match.StudyInstanceUID))
        return found
    finally:
        assoc.release()


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1)
