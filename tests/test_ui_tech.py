"""The technologist's pages and the study-management pages (issue 16, viewer_api/ui/tech_pages.py), in a browser.

One `pacs serve` and one Chromium for the module (tests/support/ui.py). The technologist's journey starts at the
sign-in page and follows links only: upload a zip, a DICOM file and a text file through the drop zone's file input
(per-file results), find today's order on the worklist with its MPPS state and its images, open the study's
completeness (3 received against 4 announced by MPPS: 1 missing), correct the patient name to a Vietnamese name with
a reason — then the new name is what QIDO-RS answers and the audit trail has the ``study.correct`` row. The same
pages in Vietnamese; a technologist of another facility gets 404 on the study's pages by URL, a clinician no manage
buttons and 403; a post without the CSRF token is refused; an admin rejects and restores a series, sends the study
to a real C-STORE SCP with progress, and deletes it after a confirmation. axe-core finds no serious violation; no
console error, failed request or error status during the journeys; 1366×768. The tests run in file order: each one
builds on the study the journey uploaded and corrected (the last one deletes it).
"""

from __future__ import annotations

import io
import json
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt

from pacs.aes import add_ae
from pacs.audit.search import make_filter, search
from pacs.i18n import gettext
from pacs.ris.mpps import create_step, set_step
from pacs.ris.orders import NewOrder, create_order
from pacs.security import accounts
from tests.support.datasets import make_instance
from tests.support.net import free_port
from tests.support.stack import EmbeddedPacs
from tests.support.ui import (  # noqa: F401 (ui_world: fixture)
    UiWorld,
    assert_clean,
    assert_keyboard_reachable,
    axe,
    choose_language,
    screenshot,
    sign_in,
    ui_world,
)

pytestmark = pytest.mark.integration

NEW_NAME = "Nguyễn^Văn^An"


@dataclass
class World:
    ui: UiWorld
    accession: str
    study_uid: str
    series_uid: str
    upload_dir: Path

    @property
    def url(self) -> str:
        return self.ui.base_url

    def user(self, key: str) -> tuple[str, str]:
        return self.ui.users[key]


def _mpps(pacs: EmbeddedPacs, accession: str, study_uid: str, series_uid: str, sops: list[str]) -> None:
    """A modality's MPPS, through the archive's MPPS service: started, then completed announcing ``sops``."""
    step_uid = generate_uid()
    created = Dataset()
    created.PerformedProcedureStepStatus = "IN PROGRESS"
    created.Modality = "OT"
    created.PatientID = "TECH-001"
    item = Dataset()
    item.AccessionNumber = accession
    item.StudyInstanceUID = study_uid
    created.ScheduledStepAttributesSequence = [item]
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.SeriesDescription = "Ngực thẳng"
    refs = []
    for sop in sops:
        ref = Dataset()
        ref.ReferencedSOPClassUID = SecondaryCaptureImageStorage
        ref.ReferencedSOPInstanceUID = sop
        refs.append(ref)
    series.ReferencedImageSequence = refs
    done.PerformedSeriesSequence = [series]
    with pacs.ctx.sessions() as session, session.begin():
        create_step(session, step_uid, created, "MODALITY_A")
    with pacs.ctx.sessions() as session, session.begin():
        set_step(session, step_uid, done)


@pytest.fixture(scope="module")
def world(ui_world: UiWorld, tmp_path_factory: pytest.TempPathFactory) -> World:  # noqa: F811
    """Today's order of HOSP-A, the files a technologist will upload for it, and the modality's MPPS announcing
    four objects of which three are in the upload."""
    pacs = ui_world.server
    with pacs.ctx.sessions() as session, session.begin():
        order = create_order(session, NewOrder(
            patient_id="TECH-001", patient_name="TRAN^THI^BINH", modality="OT", station_ae_title="",
            start_date="", start_time="", procedure_description="Chest X-ray", facility="HOSP-A",
            patient_sex="F", patient_birth_date="19800102", source="api"))
    series_uid = generate_uid()
    sops = [generate_uid() for _ in range(4)]
    common = {"StudyInstanceUID": order.study_instance_uid, "SeriesInstanceUID": series_uid,
              "AccessionNumber": order.accession_number, "PatientID": "TECH-001",
              "PatientName": "TRAN^THI^BINH", "PatientSex": "F", "PatientBirthDate": "19800102"}
    upload_dir = tmp_path_factory.mktemp("upload")
    with zipfile.ZipFile(upload_dir / "chest.zip", "w") as archive:
        for number, sop in enumerate(sops[:2], start=1):
            archive.writestr(f"IMG{number}.dcm", make_instance(SOPInstanceUID=sop, InstanceNumber=number, **common))
    (upload_dir / "img3.dcm").write_bytes(make_instance(SOPInstanceUID=sops[2], InstanceNumber=3, **common))
    (upload_dir / "notes.txt").write_bytes(b"not a DICOM file")
    _mpps(pacs, order.accession_number, order.study_instance_uid, series_uid, sops)  # sops[3] never arrives
    return World(ui_world, order.accession_number, order.study_instance_uid, series_uid, upload_dir)


def _qido(world: World, token: str, query: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{world.url}/dicom-web/studies?{query}",
                                     headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else []


def _token(world: World, role: str, facility: str) -> str:
    with world.ui.server.ctx.sessions() as session, session.begin():
        return accounts.create_token(session, f"ui-tech-{role}", role, days=1, facility=facility).secret


def _to_worklist(page: Page) -> None:
    """The technologist's start page is the worklist; from anywhere else, the menu."""
    if not page.url.endswith("/ui/worklist"):
        with page.expect_navigation():
            page.locator("nav a[href='/ui/worklist']").click()


def test_technologist_journey(world: World) -> None:
    with world.ui.browser_page("en") as (page, log):
        sign_in(page, world.url, *world.user("technologist"))
        _to_worklist(page)
        row = page.locator(f"tr[data-accession='{world.accession}']")
        expect(row).to_contain_text("TRAN THI BINH")
        expect(row).to_contain_text("MPPS completed")
        expect(row).to_contain_text("No images yet")
        assert_keyboard_reachable(page)

        # upload through the drop zone's labelled file input (the page's script posts the files as they are chosen)
        page.locator("nav a[href='/ui/upload']").click()
        expect(page.locator("h1")).to_have_text("Upload DICOM files")
        page.get_by_label("Choose DICOM files or zips, or drop them here").set_input_files(
            [world.upload_dir / "chest.zip", world.upload_dir / "img3.dcm", world.upload_dir / "notes.txt"])
        status = page.locator("#upload-status")
        expect(status).to_contain_text("4 file(s): 3 stored, 0 already here, 1 refused", timeout=60_000)
        expect(page.locator("#upload-results tbody tr")).to_have_count(4)
        expect(page.locator("#upload-results")).to_contain_text("IMG1.dcm")
        expect(page.locator("#upload-results tr.status-refused")).to_contain_text("notes.txt")
        assert axe(page) == []
        assert_keyboard_reachable(page)
        # without the page's script: a plain form post gets the result page; its CSRF token is in the form's
        # action URL (a multipart body is never parsed before the token is checked)
        action = page.locator("#upload-form").get_attribute("action") or ""
        assert action.startswith("/ui/upload?csrf="), action
        body_only = page.request.post(world.url + "/ui/upload", multipart={
            "csrf": page.locator("meta[name=csrf-token]").get_attribute("content") or "",
            "files": {"name": "img3.dcm", "mimeType": "application/dicom",
                      "buffer": (world.upload_dir / "img3.dcm").read_bytes()}})
        assert body_only.status == 403, "a token only inside a multipart body is not read"
        plain = page.request.post(world.url + action, multipart={
            "files": {"name": "img3.dcm", "mimeType": "application/dicom",
                      "buffer": (world.upload_dir / "img3.dcm").read_bytes()}})
        assert plain.status == 200 and "1 file(s): 0 stored, 1 already here, 0 refused" in plain.text()

        # the worklist: the order now has its images (linked when the series' derived task ran)
        _to_worklist(page)
        link = page.locator(f"tr[data-accession='{world.accession}'] a", has_text="Completeness")
        for _ in range(60):
            if link.count():
                break
            page.wait_for_timeout(250)
            page.reload()
        assert axe(page) == []
        link.click()
        expect(page.locator("h1")).to_contain_text("Study completeness")
        expect(page.locator("#completeness-state")).to_contain_text("1 missing")
        cells = page.locator(f"tr[data-series='{world.series_uid}'] td.num")
        expect(cells.nth(0)).to_have_text("3")  # received
        expect(cells.nth(2)).to_have_text("4")  # announced by MPPS
        assert axe(page) == []
        assert_keyboard_reachable(page)

        # correct the patient name, with a reason
        page.get_by_role("link", name="Correct patient data").click()
        expect(page.locator("h1")).to_contain_text("Correct patient data:")  # the new page, not the old one
        assert axe(page) == []
        assert_keyboard_reachable(page)
        page.get_by_label("Patient name").fill(NEW_NAME)
        page.get_by_role("button", name="Save the correction").click()  # no reason: the browser refuses (required)
        assert page.url.endswith("/correct")
        page.get_by_label("Reason for the correction (required)").fill("Tên nhập sai ở máy chụp")
        with page.expect_navigation():
            page.get_by_role("button", name="Save the correction").click()
        expect(page.locator(".flashes")).to_contain_text("3 object(s) rewritten")
        screenshot(page, world.ui.screenshots / "tech-correct-en.png", "Nguyễn Văn An", "3 object(s) rewritten")

        # the manage page: what the technologist's role allows; the zip downloads through the session
        page.get_by_role("link", name="Manage study").click()
        expect(page.locator("#download-study")).to_be_visible()
        expect(page.locator("#reject-form")).to_be_visible()
        assert page.locator("#delete-form").count() == 0  # admins only
        assert axe(page) == []
        assert_keyboard_reachable(page)
        response = page.request.get(world.url + f"/ui/studies/{world.study_uid}/archive.zip")
        assert response.status == 200 and response.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(response.body())) as archive:
            assert "DICOMDIR" in archive.namelist() and len(archive.namelist()) == 4

        # a form post without the CSRF token is refused, and changes nothing
        refused = page.request.post(world.url + f"/ui/studies/{world.study_uid}/correct",
                                    form={"name": "EVIL^NAME", "reason": "csrf"})
        assert refused.status == 403
        assert_clean(log, allow_statuses=[f"403 POST {world.url}/ui/studies/{world.study_uid}/correct"])

    # the correction as the API sees it: QIDO-RS and the audit trail
    token = _token(world, "technologist", "HOSP-A")
    found = _qido(world, token, f"StudyInstanceUID={world.study_uid}")
    assert found and found[0]["00100010"]["Value"][0]["Alphabetic"] == NEW_NAME
    with world.ui.server.ctx.read_sessions() as session:
        rows = search(session, make_filter(action="study.correct", study=world.study_uid))
    assert any(r["outcome"] == "success" and r["actor"] == world.user("technologist")[0]
               and "Tên nhập sai" in r["detail"] for r in rows), rows
    assert not any("EVIL" in r["detail"] for r in rows)


def test_pages_in_vietnamese(world: World) -> None:
    with world.ui.browser_page("en") as (page, log):
        sign_in(page, world.url, *world.user("technologist"))
        choose_language(page, "vi")
        _to_worklist(page)
        expect(page.locator("h1")).to_have_text(gettext("vi", "Worklist"))
        expect(page.locator(f"tr[data-accession='{world.accession}']")).to_contain_text("MPPS đã hoàn thành")
        page.locator(f"tr[data-accession='{world.accession}'] a", has_text="Độ đầy đủ").click()
        expect(page.locator("#completeness-state")).to_contain_text("Thiếu 1")
        screenshot(page, world.ui.screenshots / "tech-completeness-vi.png", "Độ đầy đủ của ca chụp", "Nguyễn Văn An")
        page.get_by_role("link", name="Quản lý ca chụp").click()
        expect(page.locator("h2#h-reject")).to_have_text("Loại bỏ")
        expect(page.locator("#reject-reason")).to_contain_text("An toàn người bệnh")
        assert axe(page) == []
        page.locator("nav a[href='/ui/upload']").click()
        expect(page.locator("h1")).to_have_text("Tải lên tệp DICOM")
        assert axe(page) == []
        assert_clean(log)


def test_other_facility_and_clinician(world: World) -> None:
    with world.ui.browser_page("en") as (page, _log):
        sign_in(page, world.url, *world.user("technologist_b"))
        for suffix in ("correct", "manage", "completeness", "archive.zip"):
            response = page.request.get(world.url + f"/ui/studies/{world.study_uid}/{suffix}")
            assert response.status == 404, (suffix, response.status)
        page.goto(world.url + "/ui/worklist")
        expect(page.locator("h1")).to_have_text("Worklist")
        assert world.accession not in page.content()  # another facility's order
    with world.ui.browser_page("en") as (page, _log):
        sign_in(page, world.url, *world.user("clinician"))
        page.goto(world.url + f"/ui/studies/{world.study_uid}/completeness")
        expect(page.locator("h1")).to_contain_text("Study completeness")
        assert page.get_by_role("link", name="Manage study").count() == 0
        assert page.get_by_role("link", name="Correct patient data").count() == 0
        for suffix in ("manage", "correct"):
            response = page.request.get(world.url + f"/ui/studies/{world.study_uid}/{suffix}")
            assert response.status == 403, (suffix, response.status)


def test_admin_rejects_restores_sends_and_deletes(world: World) -> None:
    """The manage page's actions, each through the same service as the API: reject a series and restore it, send
    the study to a registered peer (a real C-STORE SCP) with progress, and delete it after a confirmation step."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    peer = AE(ae_title="PEER_A")
    peer.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        with world.ui.server.ctx.sessions() as session, session.begin():
            add_ae(session, "PEER_A", "127.0.0.1", port, "Ward viewer", facility="HOSP-A")
        with world.ui.browser_page("en") as (page, log):
            sign_in(page, world.url, *world.user("admin"))
            page.goto(world.url + f"/ui/studies/{world.study_uid}/manage")
            page.locator("#reject-form").get_by_role("checkbox").first.check()
            page.get_by_label("Reason", exact=True).select_option("quality")
            page.locator("#reject-form button[type=submit]").click()
            expect(page.locator(".flashes")).to_contain_text("3 instance(s) rejected.")
            expect(page.locator("#restore-form")).to_contain_text("3 object(s) of series")
            page.locator("#restore-form button[type=submit]").click()
            expect(page.locator(".flashes")).to_contain_text("3 instance(s) restored.")

            page.get_by_label("Destination").select_option("PEER_A")
            page.locator("#send-form button[type=submit]").click()
            expect(page.locator(".flashes")).to_contain_text("3 instance(s) queued for PEER_A.")
            expect(page.locator("#send-progress")).to_contain_text("PEER_A: 3 sent, 0 waiting, 0 failed",
                                                                   timeout=20_000)
            assert len(set(received)) == 3
            assert axe(page) == []
            assert_keyboard_reachable(page)  # the administrator's manage page: send and delete too

            page.locator("#delete-reason").fill("Ca chụp thử nghiệm")
            page.locator("#delete-form button[type=submit]").click()
            expect(page.locator("h1")).to_have_text("Delete the study?")
            expect(page.locator("#delete-reason")).to_have_value("Ca chụp thử nghiệm")
            assert axe(page) == []
            assert_keyboard_reachable(page)
            page.locator("#delete-confirm-form button[type=submit]").click()
            expect(page.locator(".flashes")).to_contain_text("The study was deleted.")
            assert page.request.get(world.url + f"/ui/studies/{world.study_uid}/manage").status == 404
            assert_clean(log, allow_statuses=[f"404 GET {world.url}/ui/studies/{world.study_uid}/manage"])
        with world.ui.server.ctx.read_sessions() as session:
            rows = search(session, make_filter(actor=world.user("admin")[0], study=world.study_uid))
        actions = {r["action"] for r in rows if r["outcome"] == "success"}
        assert {"instance.reject", "instance.restore", "study.send", "study.delete"} <= actions, actions
    finally:
        server.shutdown()
