"""The radiologist's pages (issue 16, viewer_api/ui/reading_pages.py) in a browser, on a 1366×768 screen.

One `pacs serve` and one Chromium for the module. The journey starts at the sign-in page and follows the pages only:
the reading list shows the STAT study first (though the routine one waited longer) with its waiting time; claim it,
open the editor (the OHIF split view is an iframe of /ui/viewer/{study}), pick a template, write Vietnamese
findings, see the autosave, make it preliminary, sign it (confirming), amend it with a reason (a draft, signed),
amend it again ("amend and sign"), mark a key image; the version history shows the three versions, and the JSON API
(a token made in-process) returns the final text with its exact diacritics. In Vietnamese: the list refreshes
itself without a reload and keeps the focus (the page's clock run forward), claim and release, and a service
refusal (another radiologist's claim) is shown as a translated message. A post without the CSRF token is refused;
a radiologist of another facility gets 404 on the editor's URL. axe-core: no serious violation; no console error,
failed request or error status during the journeys.

The viewer page itself (/ui/viewer/{study}, OHIF) is another module's (tests/test_ohif.py and the viewer page's
tests): here the browser answers it with a stub page, so the editor's frame and second window are tested without
loading OHIF.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Page, Route, expect
from pydicom.uid import generate_uid

from pacs.ingest import Ingestor, IngestSource
from pacs.ris.orders import NewOrder, create_order, link_study
from pacs.security import accounts
from tests.support.browser import PageLog
from tests.support.datasets import make_dataset, to_bytes
from tests.support.stack import EmbeddedPacs
from tests.support.ui import (  # noqa: F401 (ui_world: fixture)
    SCREEN,
    UiWorld,
    assert_clean,
    assert_keyboard_reachable,
    axe,
    screenshot,
    sign_in,
    ui_world,
)

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
FINDINGS = "Không thấy tổn thương khu trú. Phổi hai bên sáng đều."
IMPRESSION = "Không thấy bất thường trên phim CT lồng ngực."  # the template's
IMPRESSION_EDITED = IMPRESSION + " Đề nghị đối chiếu lâm sàng."
AMENDED = "Không thấy tổn thương khu trú. Phổi hai bên sáng đều. Bổ sung: nốt vôi hoá nhỏ thuỳ trên phổi phải."
AMENDED_AGAIN = "Nốt vôi hoá 3 mm thuỳ trên phổi phải, lành tính; không cần theo dõi thêm."
VIEWER_STUB = "<!doctype html><html lang='en'><title>Viewer</title><main><p>viewer stub</p></main></html>"


@dataclass
class Study:
    uid: str
    series: str
    sops: list[str]


@dataclass
class World:
    ui: UiWorld
    stat: Study  # STAT order, arrived last
    routine: Study  # no order (routine), arrived first
    other: Study  # routine, claimed by rad_a2 (the refusal in the Vietnamese test)

    @property
    def pacs(self) -> EmbeddedPacs:
        return self.ui.server

    @property
    def url(self) -> str:
        return self.ui.base_url


def _study(pacs: EmbeddedPacs, patient_id: str, name: str, accession: str, description: str,
           images: int = 2) -> Study:
    """A CT study of facility HOSP-A, stored through the archive's ingest (in process, same index and store)."""
    uid, series = generate_uid(), generate_uid()
    ingestor = Ingestor(pacs.ctx.sessions, pacs.ctx.store)
    sops = []
    for number in range(1, images + 1):
        pixels = (np.add.outer(np.arange(32), np.arange(32)) * number * 32 % 4096).astype(np.uint16)
        ds = make_dataset(StudyInstanceUID=uid, SeriesInstanceUID=series, SOPInstanceUID=generate_uid(),
                          PatientID=patient_id, PatientName=name, Modality="CT", SOPClassUID=CT,
                          AccessionNumber=accession, InstanceNumber=number, SeriesNumber=1, StudyDate="20261207",
                          StudyDescription=description, Rows=32, Columns=32, BitsAllocated=16, BitsStored=12,
                          HighBit=11, PixelData=pixels.tobytes())
        ds.file_meta.MediaStorageSOPClassUID = CT
        outcome = ingestor.ingest(to_bytes(ds), IngestSource("import", facility="HOSP-A"))
        assert outcome.ok, outcome.message
        sops.append(ds.SOPInstanceUID)
    return Study(uid, series, sops)


@pytest.fixture(scope="module")
def world(ui_world: UiWorld) -> World:  # noqa: F811 (the imported fixture)
    pacs = ui_world.server
    routine = _study(pacs, "RD-002", "Trần^Thị Bích", "", "CT bụng")
    other = _study(pacs, "RD-003", "Lê^Văn Cường", "", "CT sọ não", images=1)
    with pacs.ctx.sessions() as session, session.begin():
        order = create_order(session, NewOrder(
            patient_id="RD-001", patient_name="Nguyễn^Văn An", modality="CT", station_ae_title="",
            start_date="", start_time="", procedure_description="CT ngực", priority="STAT",
            facility="HOSP-A", source="api"))
    stat = _study(pacs, "RD-001", "Nguyễn^Văn An", order.accession_number, "CT ngực")
    with pacs.ctx.sessions() as session, session.begin():  # what the series' derived task does, now
        assert link_study(session, stat.uid, order.accession_number, "RD-001", "CT", "20261207", "HOSP-A")
    return World(ui_world, stat, routine, other)


@contextmanager
def _page(world: World, language: str) -> Iterator[tuple[Page, PageLog]]:
    """A fresh browser page in ``language`` whose viewer pages (/ui/viewer/…) are answered by a stub."""
    def viewer_stub(route: Route) -> None:
        route.fulfill(status=200, content_type="text/html; charset=utf-8", body=VIEWER_STUB)

    with world.ui.browser_page(language) as (page, log):
        page.context.route(re.compile(r".*/ui/viewer/.*"), viewer_stub)
        yield page, log


def _sign_in(page: Page, world: World, role: str) -> None:
    sign_in(page, world.url, *world.ui.users[role])  # from the front door, through the sign-in page


def _clean_but(log: PageLog, refusal: str) -> None:
    """Nothing went wrong, but for the one ``refusal`` (status, method and URL) the test asked for: that response,
    and the browser's console line about it."""
    assert [s for s in log.error_statuses if s == refusal] == [refusal], log.summary()
    status = refusal.split(" ")[0]
    log.console_errors[:] = [c for c in log.console_errors if f"status of {status} " not in c]
    assert_clean(log, allow_statuses=(refusal,))


def _api(world: World, path: str) -> Any:
    with world.pacs.ctx.sessions() as session, session.begin():
        token = accounts.create_token(session, f"ui-reading-{generate_uid()[-8:]}", "radiologist", days=1,
                                      facility="HOSP-A").secret
    request = urllib.request.Request(world.url + path, headers={"Authorization": f"Bearer {token}",
                                                                "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_radiologist_journey(world: World) -> None:
    confirmations: list[str] = []
    with _page(world, "en") as (page, log):
        page.on("dialog", lambda d: (confirmations.append(d.message), d.accept()))
        _sign_in(page, world, "radiologist")
        assert page.url.endswith("/ui/reading"), page.url
        expect(page.locator("h1")).to_have_text("Reading list")
        rows = page.locator("#reading-rows tr[data-study]")
        expect(rows).to_have_count(3)
        # STAT first, though the routine studies waited longer; waiting time in minutes
        assert rows.nth(0).get_attribute("data-study") == world.stat.uid
        expect(rows.nth(0)).to_contain_text("STAT")
        expect(rows.nth(0)).to_contain_text("Nguyễn Văn An")
        expect(rows.nth(1)).to_contain_text("Trần Thị Bích")
        assert re.search(r"\b\d+ min\b", rows.nth(0).inner_text()), rows.nth(0).inner_text()
        assert not axe(page), axe(page)
        assert_keyboard_reachable(page)

        # claim the STAT study, then open it
        page.locator(f"#claim-{_css(world.stat.uid)}").click()
        expect(page.locator(".flashes")).to_contain_text("Study claimed")
        stat_row = page.locator(f"#reading-rows tr[data-study='{world.stat.uid}']")
        expect(stat_row).to_contain_text("you")
        page.locator(f"#open-{_css(world.stat.uid)}").click()
        expect(page.locator("h1")).to_contain_text("Nguyễn Văn An")
        frame = page.locator("#viewer-frame")
        assert frame.get_attribute("src") == f"/ui/viewer/{world.stat.uid}"
        expect(page.frame_locator("#viewer-frame").locator("p")).to_have_text("viewer stub")

        # a template, then the radiologist's own Vietnamese text; the autosave creates the draft
        page.wait_for_load_state("load")  # the page's script (autosave, shortcuts) runs from here on
        page.get_by_label("Template", exact=True).select_option(label="CT lồng ngực")
        page.get_by_role("button", name="Insert the template").click()
        expect(page.get_by_label("Findings", exact=True)).to_have_value(re.compile("^Nhu mô phổi hai bên"))
        expect(page.get_by_label("Impression", exact=True)).to_have_value(IMPRESSION)
        expect(page.get_by_label("Report language")).to_have_value("vi")
        page.get_by_label("Findings", exact=True).fill(FINDINGS)
        expect(page.locator("#save-status")).to_contain_text(re.compile(r"Draft saved at \d\d:\d\d"),
                                                             timeout=10_000)
        # Ctrl+S saves at once (before the autosave's pause is over)
        page.get_by_label("Impression", exact=True).fill(IMPRESSION_EDITED)
        with page.expect_response(lambda r: r.request.method == "PUT" and r.url.endswith("/draft")) as saved:
            page.keyboard.press("Control+s")
        assert saved.value.ok and saved.value.json()["status"] == "draft"
        assert not axe(page), axe(page)
        assert_keyboard_reachable(page)  # the editor of a draft: templates, text, buttons

        page.get_by_role("button", name="Preliminary").click()
        expect(page.locator(".flashes")).to_contain_text("The report is preliminary")
        expect(page.locator("#report-heading")).to_contain_text("Preliminary")
        expect(page.get_by_label("Findings", exact=True)).to_have_value(FINDINGS)
        # sign with the keyboard: Ctrl+Enter asks for confirmation first
        page.wait_for_load_state("load")
        page.get_by_label("Impression", exact=True).focus()
        page.keyboard.press("Control+Enter")
        expect(page.locator(".flashes")).to_contain_text("The report is signed")
        assert confirmations and confirmations[-1].startswith("Sign this report?")
        expect(page.locator("#report-heading")).to_contain_text("Final")
        expect(page.get_by_label("Findings", exact=True)).to_have_attribute("readonly", "")

        # amend with a reason: a draft version, then signed from the editor
        page.get_by_label("Reason for amendment").fill("Bổ sung mô tả nốt vôi hoá")
        page.get_by_label("New findings").fill(AMENDED)
        page.get_by_role("button", name="Amend as a draft").click()
        expect(page.locator(".flashes")).to_contain_text("The amendment is a draft")
        expect(page.locator("#report-heading")).to_contain_text("Draft")
        expect(page.get_by_label("Findings", exact=True)).to_have_value(AMENDED)
        page.wait_for_load_state("load")
        page.get_by_role("button", name="Sign", exact=True).click()
        expect(page.locator(".flashes")).to_contain_text("The report is signed")
        expect(page.locator("#report-heading")).to_contain_text("Amended")
        # and again, in one step
        page.get_by_label("Reason for amendment").fill("Kết luận rõ hơn")
        page.get_by_label("New findings").fill(AMENDED_AGAIN)
        page.wait_for_load_state("load")
        page.get_by_role("button", name="Amend and sign").click()
        expect(page.locator(".flashes")).to_contain_text("The amendment is signed")
        assert confirmations[-1].startswith("Sign the amended report?")
        history = page.locator("#version-history li.version")
        expect(history).to_have_count(3)
        expect(history.nth(0)).to_contain_text("Version 3")
        expect(history.nth(0)).to_contain_text("Amended")
        expect(history.nth(0)).to_contain_text("Kết luận rõ hơn")
        expect(history.nth(2)).to_contain_text("Final")
        expect(history.nth(2)).to_contain_text("rad_a")

        # a key image, ticked beside its thumbnail
        thumbnail = page.locator(".key-image-picker img").first
        thumbnail.scroll_into_view_if_needed()
        expect(thumbnail).to_have_js_property("complete", True)
        assert thumbnail.evaluate("img => img.naturalWidth") > 0
        page.get_by_label("Series 1, image 1").check()
        page.get_by_role("button", name="Mark as key images").click()
        expect(page.locator(".flashes")).to_contain_text("1 key image(s) marked.")
        expect(page.locator(".key-image-list")).to_contain_text("1 image(s) marked by rad_a")
        assert not axe(page), axe(page)
        assert_keyboard_reachable(page)  # the editor of a signed report: amendment, history, key images
        page.locator("#version-history details").first.locator("summary").click()
        shot = screenshot(page, world.ui.screenshots / "reading-editor.png", "Nguyễn Văn An", "Version 3",
                          AMENDED_AGAIN, "Kết luận rõ hơn", "1 image(s) marked by rad_a")
        _not_blank(shot)

        # the second window: the viewer opens in a named window, and the frame gives way
        page.wait_for_load_state("load")
        with page.expect_popup() as popup:
            page.get_by_role("button", name="Open the images in a second window").click()
        viewer = popup.value
        viewer.wait_for_load_state()
        assert viewer.url.endswith(f"/ui/viewer/{world.stat.uid}")
        assert viewer.evaluate("window.name") == "pacs-reading-viewer"
        expect(page.locator("#viewer-frame")).to_be_hidden()
        page.get_by_role("button", name="Show the images here again").click()
        expect(page.locator("#viewer-frame")).to_be_visible()
        viewer.close()

        # reported: off the reading list
        page.get_by_role("link", name="Back to the reading list").click()
        expect(page.locator(f"#reading-rows tr[data-study='{world.stat.uid}']")).to_have_count(0)

        # CSRF: a form post and an autosave without the token are refused, and change nothing
        refused = page.request.post(world.url + f"/ui/reading/{world.routine.uid}/claim", form={"x": "1"})
        assert refused.status == 403
        refused = page.request.put(world.url + f"/ui/reading/{world.routine.uid}/draft",
                                   data={"findings": "x", "impression": "y"})
        assert refused.status == 403
    assert_clean(log)

    # the signed text as the JSON API returns it, with its exact diacritics
    reports = _api(world, f"/api/studies/{world.stat.uid}/reports")
    assert len(reports) == 1
    report = _api(world, f"/api/reports/{reports[0]['id']}")
    assert report["status"] == "amended" and report["version"] == 3 and report["language"] == "vi"
    assert [v["status"] for v in report["versions"]] == ["final", "amended", "amended"]
    assert report["versions"][0]["findings"] == FINDINGS and report["versions"][0]["impression"] == IMPRESSION_EDITED
    assert report["versions"][1]["findings"] == AMENDED and report["versions"][1]["amend_reason"] == \
        "Bổ sung mô tả nốt vôi hoá"
    assert report["findings"] == AMENDED_AGAIN
    assert {v["signed_by"] for v in report["versions"]} == {"rad_a"}
    assert report["versions"][0]["preliminary_at"] is not None
    assert _api(world, f"/api/studies/{world.stat.uid}/key-images")[0]["instances"][0]["sop_instance_uid"] == \
        world.stat.sops[0]
    assert _api(world, "/api/reading-list?assigned=-") and all(
        i["study_instance_uid"] != world.stat.uid for i in _api(world, "/api/reading-list"))


def _not_blank(shot: Path) -> None:
    """The screenshot is a real picture of the page: large, and not one flat colour."""
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as picture:
        assert picture.size[0] == SCREEN["width"] and picture.size[1] >= SCREEN["height"]
        assert max(ImageStat.Stat(picture.convert("L")).stddev) > 20


def _css(uid: str) -> str:
    """A UID as a CSS id selector part (its dots escaped)."""
    return uid.replace(".", "\\.")


def test_reading_pages_in_vietnamese(world: World) -> None:
    with world.pacs.ctx.sessions() as session, session.begin():  # another radiologist has this one
        from pacs.reports import lifecycle
        from pacs.security.principal import Principal, scope_for
        from pacs.security.roles import Role, capabilities_of
        other = Principal(subject="rad_a2", role=Role.RADIOLOGIST, capabilities=capabilities_of(Role.RADIOLOGIST),
                          scope=scope_for(Role.RADIOLOGIST, "HOSP-A"), facility="HOSP-A")
        lifecycle.claim(session, other, world.other.uid)
    with _page(world, "vi") as (page, log):
        page.clock.install()
        _sign_in(page, world, "radiologist")
        expect(page.locator("h1")).to_have_text("Danh sách đọc")
        expect(page.locator("#reading-list thead")).to_contain_text("Thời gian chờ")
        routine = f"#reading-rows tr[data-study='{world.routine.uid}']"
        expect(page.locator(routine)).to_contain_text("Trần Thị Bích")
        expect(page.locator(f"#reading-rows tr[data-study='{world.other.uid}']")).to_contain_text("rad_a2")
        # claim and release
        page.locator(f"#claim-{_css(world.routine.uid)}").click()
        expect(page.locator(".flashes")).to_contain_text("Đã nhận đọc ca chụp")
        expect(page.locator(routine)).to_contain_text("bạn")
        page.locator(f"#release-{_css(world.routine.uid)}").click()
        expect(page.locator(".flashes")).to_contain_text("Đã trả lại ca chụp")
        # a study arrives: the list shows it at the next refresh, without a reload, and the focus stays put
        page.wait_for_load_state("load")
        page.locator(f"#claim-{_css(world.routine.uid)}").focus()
        newcomer = _study(world.pacs, "RD-004", "Phạm^Thị Dung", "", "X-quang ngực", images=1)
        page.clock.run_for(16_000)
        expect(page.locator(f"#reading-rows tr[data-study='{newcomer.uid}']")).to_contain_text("Phạm Thị Dung")
        expect(page.locator("#reading-status")).to_contain_text(
            re.compile(r"Đã cập nhật danh sách. Số ca chờ đọc: \d+\."))
        assert page.evaluate("document.activeElement.id") == f"claim-{world.routine.uid}"
        screenshot(page, world.ui.screenshots / "reading-list-vi.png", "Danh sách đọc", "Phạm Thị Dung", "Thường quy")
        # the editor in Vietnamese; a refusal of the services is a translated message, not JSON
        page.locator(f"#open-{_css(world.other.uid)}").click()
        expect(page.get_by_label("Mô tả", exact=True)).to_be_editable()
        expect(page.get_by_label("Kết luận", exact=True)).to_be_visible()
        page.get_by_label("Mô tả", exact=True).fill("Nhu mô não bình thường.")
        page.get_by_role("button", name="Lưu nháp").click()
        expect(page.locator("#reading-error")).to_have_text(
            "Ca chụp này do rad_a2 nhận đọc: hãy đề nghị họ trả lại trước.")
        expect(page.get_by_label("Mô tả", exact=True)).to_have_value("Nhu mô não bình thường.")  # nothing lost
        assert not axe(page), axe(page)
        _clean_but(log, f"409 POST {world.url}/ui/reading/{world.other.uid}")


def test_another_facility_gets_404(world: World) -> None:
    with _page(world, "en") as (page, _log):
        _sign_in(page, world, "radiologist_b")
        assert world.routine.uid not in page.content()  # not on B's reading list
        for path in (f"/ui/reading/{world.routine.uid}",
                     f"/ui/reading/{world.routine.uid}/thumbnails/{world.routine.series}/{world.routine.sops[0]}"):
            response = page.request.get(world.url + path)
            assert response.status == 404, (path, response.status)
        page.goto(world.url + f"/ui/reading/{world.routine.uid}")
        expect(page.locator("[role=alert]")).to_have_text("Not found, or not in your facility.")
        claimed = page.request.post(world.url + f"/ui/reading/{world.routine.uid}/claim",
                                    form={"csrf": page.locator("meta[name=csrf-token]").get_attribute("content")},
                                    max_redirects=0)
        assert claimed.status == 303  # refused with a message on the list, nothing claimed:
    reading = _api(world, "/api/reading-list")
    assert next(i for i in reading if i["study_instance_uid"] == world.routine.uid)["claimed_by"] is None
