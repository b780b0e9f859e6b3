"""The printed result slip and the report PDF's QR code (issue 14, must-show 5, the paper half).

Read back with tools nobody here wrote: poppler's ``pdftotext`` for the words (Vietnamese letters exact, in
both languages) and ``pdftoppm -r 150`` + zbar's ``zbarimg`` for the QR code (it must decode to the link).
Over HTTP (`pacs serve`): ``POST /api/studies/{study}/slip.pdf`` makes a link whose decoded URL opens
without credentials, and refuses what it must (401, 403, 404, 400) with nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs.db.models import AuditEvent
from pacs.errors import InvalidInput
from pacs.reports import lifecycle
from pacs.reports.document import ReportDocument
from pacs.reports.models import ReportVersion
from pacs.reports.pdf import render_report_pdf
from pacs.security.roles import Role
from pacs.sharing.content import signed_study_reports
from pacs.sharing.links import ShareScope, create_link
from pacs.sharing.models import ShareLink
from pacs.sharing.qr import qr_code
from pacs.sharing.slip import SLIP_LABELS, SlipContent, render_result_slip, slip_content
from tests.support.facilities import FacilityArchive, json_error
from tests.support.share_world import share_world
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

NAME_A = "Nguyễn Văn Ấn"
NAME_B = "Trần Thị Bích Ngọc"
FACILITY = "Bệnh viện Đa khoa Tỉnh Quảng Nam"
IMPRESSION = "Không thấy tổn thương khu trú. Đề nghị theo dõi sau 6 tháng."
URL = "https://pacs.benhvien.example/s/Ab0_-xYzAb0_-xYzAb0_-xYzAb0_-xYz"
EXPIRES = datetime(2027, 1, 5, 7, 0, tzinfo=UTC)  # 14:00 in Ho Chi Minh City


def pdf_text(pdf: bytes, tmp_path: Path, name: str = "doc.pdf") -> str:
    """The PDF's words (pdftotext), with runs of white space as one space: a caption may wrap anywhere."""
    path = tmp_path / name
    path.write_bytes(pdf)
    text = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    return " ".join(text.split())


def pdf_pages(pdf: bytes, tmp_path: Path) -> int:
    path = tmp_path / "pages.pdf"
    path.write_bytes(pdf)
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    return int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))  # type: ignore[union-attr]


def decode_qr(pdf: bytes, tmp_path: Path, name: str = "qr") -> list[str]:
    """The QR codes on the first page: rendered at 150 dpi (a phone photo of paper is about this sharp) and
    decoded by zbar."""
    path = tmp_path / f"{name}.pdf"
    path.write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "150", "-png", "-f", "1", "-l", "1", str(path), str(tmp_path / name)],
                   check=True, timeout=60)
    image = next(tmp_path.glob(f"{name}-*1.png"))
    found = subprocess.run(["zbarimg", "--nodbus", "--raw", "-q", str(image)], capture_output=True, text=True,
                           timeout=60)
    return [line for line in found.stdout.splitlines() if line]


def slip(**changes: object) -> SlipContent:
    content = SlipContent(
        facility_name=FACILITY, patient_name="Nguyễn^Văn Ấn", patient_id="PAT-0001", patient_birth_date="19600102",
        study_date="20261205", study_time="093000", study_description="CT bụng có tiêm thuốc cản quang",
        accession_number="ACC-A1", modalities=("CT",), url=URL, expires_at=EXPIRES,
        scope=ShareScope.REPORT_KEY_IMAGES, birth_date_check=True, impression=IMPRESSION)
    return dataclasses.replace(content, **changes)  # type: ignore[arg-type]


def report_doc(**changes: object) -> ReportDocument:
    doc = ReportDocument(
        report_id=7, version=1, status="final", findings="Gan lách bình thường.", impression=IMPRESSION,
        language="vi", author="lan", author_name="Lê Thị Lan", signed_by="lan", signed_by_name="Lê Thị Lan",
        signed_at=datetime(2026, 12, 5, 3, 0, tzinfo=UTC), amend_reason="", created_at=None,
        study_instance_uid="1.2.3", accession_number="ACC-B1", patient_id="PAT-B", issuer_of_patient_id="",
        patient_name="Trần^Thị Bích Ngọc", patient_birth_date="19851120", patient_sex="F", study_date="20261205",
        study_time="101500", study_description="CT ngực", modalities=("CT",), referring_physician_name="",
        procedure="CT ngực", facility="HOSP-A", facility_name=FACILITY)
    return dataclasses.replace(doc, **changes)  # type: ignore[arg-type]


# -- the slip and the report PDF, read back (no server) ------------------------------------------------------


@pytest.mark.parametrize("language", ["vi", "en"])
def test_slip_prints_the_patient_the_link_and_what_to_do(language: str, tmp_path: Path) -> None:
    pdf = render_result_slip(slip(), language=language)
    text = pdf_text(pdf, tmp_path)
    labels = SLIP_LABELS[language]
    assert pdf_pages(pdf, tmp_path) == 1
    for expected in (FACILITY, NAME_A, "PAT-0001", "02/01/1960", "05/12/2026 09:30", "CT bụng có tiêm thuốc cản quang",
                     "ACC-A1", URL, "05/01/2027 14:00 (UTC+07:00)", IMPRESSION, labels["title"],
                     labels["step_birth_date"], labels["scope_report+key-images"]):
        assert expected in text, (expected, text)
    if language == "vi":
        assert "Họ và tên: Nguyễn Văn Ấn" in text and "Bạn sẽ được hỏi ngày sinh của người bệnh" in text
        assert "Hết hạn: 05/01/2027 14:00 (UTC+07:00)" in text and "KẾT LUẬN" in text
    else:
        assert "Patient name: Nguyễn Văn Ấn" in text and "You will be asked for the patient's birth date" in text
        assert "Expires: 05/01/2027 14:00 (UTC+07:00)" in text and "IMPRESSION" in text
    assert decode_qr(pdf, tmp_path) == [URL]


def test_slip_without_birth_date_check_or_signed_report_says_so(tmp_path: Path) -> None:
    pdf = render_result_slip(slip(birth_date_check=False, impression="", scope=ShareScope.REPORT,
                                  patient_name="Trần^Thị Bích Ngọc"), language="vi")
    text = pdf_text(pdf, tmp_path)
    assert NAME_B in text and SLIP_LABELS["vi"]["no_report"] in text and SLIP_LABELS["vi"]["scope_report"] in text
    assert "ngày sinh của người bệnh" not in text
    assert decode_qr(pdf, tmp_path) == [URL]


def test_a_long_impression_is_cut_to_keep_one_page(tmp_path: Path) -> None:
    long = "\n".join(f"Dòng {i}: tổn thương dạng nốt ở thùy trên phổi phải, bờ đều, kích thước nhỏ." for i in range(80))
    pdf = render_result_slip(slip(impression=long, study_description="Mô tả rất dài " * 20), language="en")
    text = pdf_text(pdf, tmp_path)
    assert pdf_pages(pdf, tmp_path) == 1
    assert "Dòng 0:" in text and "Dòng 3:" in text and "Dòng 79:" not in text
    assert SLIP_LABELS["en"]["more_online"] in text and "Mô tả rất dài Mô tả" in text and "…" in text
    assert decode_qr(pdf, tmp_path) == [URL]


@pytest.mark.parametrize(("language", "caption", "expires"), [
    ("vi", "Quét mã để xem kết quả trực tuyến", "Hết hạn: 05/01/2027 14:00 (UTC+07:00)"),
    ("en", "Scan to see this result online", "Expires: 05/01/2027 14:00 (UTC+07:00)"),
], ids=["vi", "en"])
def test_report_pdf_carries_the_link_qr_code(language: str, caption: str, expires: str, tmp_path: Path) -> None:
    doc = report_doc()
    shared = render_report_pdf(doc, language=language, share_url=URL, share_expires_at=EXPIRES)
    text = pdf_text(shared, tmp_path)
    assert NAME_B in text and IMPRESSION in text and FACILITY in text
    assert caption in text and expires in text
    assert decode_qr(shared, tmp_path) == [URL]
    plain = render_report_pdf(doc, language=language)
    plain_words = pdf_text(plain, tmp_path, "plain.pdf")
    assert caption not in plain_words and NAME_B in plain_words
    assert decode_qr(plain, tmp_path, "plain") == []
    # without an expiry, only the caption
    assert expires not in pdf_text(render_report_pdf(doc, language=language, share_url=URL), tmp_path, "x.pdf")


def test_bad_input_is_refused() -> None:
    with pytest.raises(InvalidInput):
        render_result_slip(slip(), language="fr")
    with pytest.raises(InvalidInput):
        qr_code("")
    with pytest.raises(InvalidInput):
        qr_code("x" * 5000)
    assert qr_code(URL).error in ("Q", "H")


# -- over HTTP --------------------------------------------------------------------------------------------------


class Archive(FacilityArchive):
    def __init__(self, server: EmbeddedPacs) -> None:
        super().__init__(server)
        self.study_a = self.send_study("MODA", "PAT-A", "Nguyễn^Văn Ấn", "19600102", "ACC-A1")
        self.study_nodob = self.send_study("MODA", "PAT-N", "Trần^Thị Bích Ngọc", "", "ACC-A2")
        self.study_b = self.send_study("MODB", "PAT-B", "BRAVO^BINH", "19700101", "ACC-B1")
        self.add_tokens(("rad-a", "radiologist", "HOSP-A"), ("clin-a", "clinician", "HOSP-A"),
                        ("clin-b", "clinician", "HOSP-B"), ("tech-a", "technologist", "HOSP-A"),
                        ("emr", "emr", ""), ("patient-a", "patient", "HOSP-A", {"patient_id": "PAT-A"}))

    def send_study(self, aet: str, patient_id: str, name: str, birth_date: str, accession: str) -> str:
        return str(self.send_instance(aet, PatientID=patient_id, PatientName=name, PatientBirthDate=birth_date,
                                      AccessionNumber=accession, StudyDate="20261205", StudyTime="093000",
                                      StudyDescription="CT bụng").StudyInstanceUID)

    def links(self) -> int:
        with self.server.ctx.read_sessions() as session:
            return session.scalar(select(func.count()).select_from(ShareLink)) or 0

    def audit(self, action: str, outcome: str) -> list[AuditEvent]:
        with self.server.ctx.read_sessions() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                                 AuditEvent.outcome == outcome)))


@pytest.fixture(scope="module")
@starts_servers
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    with Archive.serving(tmp_path_factory.mktemp("slip"),
                         extra_env={"PACS_FACILITY_NAMES": json.dumps({"HOSP-A": FACILITY})}) as archive:
        yield archive


def test_slip_over_http_opens_the_report_without_login(archive: Archive, tmp_path: Path) -> None:
    study = archive.study_a
    with archive.http("rad-a") as rad, archive.http("clin-a") as clin, archive.http(None) as anonymous:
        assert rad.post(f"/api/studies/{study}/claim").status_code == 200
        draft = {"findings": "Gan lách bình thường.", "impression": IMPRESSION, "language": "vi"}
        rid = rad.post(f"/api/studies/{study}/reports", json=draft).json()["id"]
        assert rad.post(f"/api/reports/{rid}/sign").status_code == 200

        for language, asked in (("vi", "Bạn sẽ được hỏi ngày sinh của người bệnh"),
                                ("en", "You will be asked for the patient's birth date")):
            made = clin.post(f"/api/studies/{study}/slip.pdf",
                             json={"scope": "report", "expires_in_days": 10, "birth_date_check": True,
                                   "language": language})
            assert made.status_code == 200, made.text
            assert made.headers["content-type"] == "application/pdf"
            assert made.headers["content-disposition"].startswith("attachment;")
            assert "no-store" in made.headers["cache-control"]
            text = pdf_text(made.content, tmp_path, f"slip-{language}.pdf")
            assert NAME_A in text and FACILITY in text and IMPRESSION in text and asked in text
            urls = decode_qr(made.content, tmp_path, f"slip-{language}")
            assert len(urls) == 1 and re.fullmatch(re.escape(archive.server.http_url) + r"/s/[A-Za-z0-9_-]{32}",
                                                    urls[0]), urls
            assert urls[0] in text  # the link is printed too
            page = anonymous.get(urls[0])  # the link asks for the birth date first, then opens
            assert page.status_code == 200, page.text[:300]
            opened = anonymous.post(urls[0], data={"birth_date": "02/01/1960"}, follow_redirects=True)
            assert opened.status_code == 200 and NAME_A in opened.text and "Không thấy tổn thương khu trú" in \
                opened.text, opened.text[:500]

        made = rad.post(f"/api/studies/{study}/slip.pdf", json={})  # defaults: report, no birth date, vi
        assert made.status_code == 200, made.text
        [url] = decode_qr(made.content, tmp_path, "default")
        opened = anonymous.get(url)
        assert opened.status_code == 200 and NAME_A in opened.text and IMPRESSION in opened.text

    created = archive.audit("share.create", "success")
    slips = archive.audit("share.slip", "success")
    assert len(slips) == 3 and len(created) >= 3
    assert {e.actor for e in slips} == {"token:clin-a", "token:rad-a"}
    assert all(e.study_instance_uid == study and e.patient_id == "PAT-A" for e in slips)
    for event in slips + created:  # the token is never in the trail
        assert url.rsplit("/", 1)[1] not in event.detail


def test_slip_refusals(archive: Archive) -> None:
    study = archive.study_a
    path = f"/api/studies/{study}/slip.pdf"
    before = archive.links()
    with archive.http(None) as anonymous:
        json_error(anonymous.post(path, json={}), 401)
    for who in ("tech-a", "emr", "patient-a"):  # no share.create
        with archive.http(who) as client:
            json_error(client.post(path, json={}), 403)
    with archive.http("clin-b") as other, archive.http("clin-a") as clin:
        json_error(other.post(path, json={}), 404)  # another facility's study: not found, like an unknown one
        json_error(clin.post(f"/api/studies/{archive.study_b}/slip.pdf", json={}), 404)
        json_error(clin.post(f"/api/studies/{generate_uid()}/slip.pdf", json={}), 404)
        for body in ({"scope": "everything"}, {"expires_in_days": 0}, {"expires_in_days": 366},
                     {"expires_in_days": "soon"}, {"language": "fr"}, {"birth_date_check": "maybe"},
                     {"scope": "report", "extra": 1}, [1, 2]):
            response = clin.post(path, json=body)
            assert response.status_code in (400, 422), (body, response.status_code, response.text)
        response = clin.post(path, content=b"not json", headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), response.text
        # the patient has no birth date on record: a birth-date check cannot be made, nothing is stored
        json_error(clin.post(f"/api/studies/{archive.study_nodob}/slip.pdf", json={"birth_date_check": True}), 400)
    assert archive.links() == before  # nothing half-written
    refused = archive.audit("share.slip", "failure")
    assert {"token:clin-b", "token:clin-a"} <= {e.actor for e in refused}


def test_the_slip_prints_the_impression_the_share_page_shows(tmp_path: Path) -> None:
    """One rule for "the signed report" (pacs.sharing.content.signed_study_reports: the newest signed version of
    each report): an amendment whose signing time is earlier than the superseded version's (a clock set back,
    an imported report) is still what the slip prints, as the share page shows it."""
    with share_world(tmp_path) as world:
        rad = world.principal("rad-HOSP-A", Role.RADIOLOGIST, "HOSP-A")
        with world.ctx.sessions() as session, session.begin():
            [report] = lifecycle.study_reports(session, rad.scope, world.a.uid)
            lifecycle.amend(session, rad, report.id, "sửa kết luận", "Gan to nhẹ.", "Gan to nhẹ, theo dõi")
        with world.ctx.sessions() as session, session.begin():
            lifecycle.sign(session, rad, report.id)
            versions = session.scalars(select(ReportVersion).where(ReportVersion.report_fk == report.id)
                                       .order_by(ReportVersion.version)).all()
            assert [v.status for v in versions][-1] == "amended"
            versions[-1].signed_at = datetime(2020, 1, 1, tzinfo=UTC)  # earlier than the superseded version
        with world.ctx.sessions() as session, session.begin():
            link = create_link(session, rad, world.a.uid, scope=ShareScope.REPORT, expires_in_days=1,
                               birth_date_check=False, base_url="http://x")
            printed = slip_content(session, rad, world.a.uid, link, birth_date_check=False).impression
            shown = [r.impression for r in signed_study_reports(session, world.a.uid)]
    assert printed == "Gan to nhẹ, theo dõi" and shown == [printed]
