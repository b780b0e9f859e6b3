"""The share page in headless Chromium on a 360×640 phone screen (issue 14, must-show 1 and 5): the report with
its Vietnamese diacritics is visible, nothing scrolls sideways, the key images load, a screenshot is kept and is
not blank; in Vietnamese and English, with no serious axe-core violation, every control reached by the keyboard,
and no failed request or error status (issue 16). The birth-date form and the viewer hand-off work in a real
browser (the SameSite=Strict cookie, the script allowed by the page's CSP)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import Browser, Page, expect

from tests.support.browser import PageLog, chromium_browser
from tests.support.share_world import FACILITY_NAMES, IMPRESSION, PATIENT_A_SHOWN, ShareWorld, populate
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers
from tests.support.ui import assert_clean, assert_keyboard_reachable, axe

PHONE = {"width": 360, "height": 640}


@pytest.fixture(scope="module")
@starts_servers
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedPacs, ShareWorld]]:
    server = EmbeddedPacs(tmp_path_factory.mktemp("share-browser"),
                          {"PACS_FACILITY_NAMES": json.dumps(FACILITY_NAMES, ensure_ascii=False)})
    try:
        yield server, populate(server.ctx)
    finally:
        server.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium_browser() as chromium:
        yield chromium


def _link(served: tuple[EmbeddedPacs, ShareWorld], scope: str, **extra: object) -> str:
    server, world = served
    response = httpx.post(f"{server.http_url}/api/studies/{world.a.uid}/shares", json={"scope": scope, **extra},
                          headers={"Authorization": f"Bearer {world.tokens['rad-a']}"}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["url"]


def _phone(browser: Browser) -> tuple[Page, PageLog]:
    page = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True,
                               locale="vi-VN").new_page()  # a Vietnamese phone: Accept-Language vi
    log = PageLog()
    log.attach(page)
    return page, log


def _no_sideways_scroll(page: Page) -> None:
    width = page.evaluate("document.scrollingElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide on a {PHONE['width']} px screen"


@pytest.mark.parametrize("language, heading, impression_label", [("vi", "Kết quả chẩn đoán hình ảnh", "Kết luận"),
                                                                 ("en", "Imaging result", "Impression")])
def test_share_page_on_a_phone(served: tuple[EmbeddedPacs, ShareWorld], browser: Browser, tmp_path: Path,
                               language: str, heading: str, impression_label: str) -> None:
    url = _link(served, "report+key-images")
    page, log = _phone(browser)
    try:
        page.goto(f"{url}?lang={language}")
        expect(page.get_by_role("heading", name=heading)).to_be_visible()
        expect(page.locator("#patient-name")).to_have_text(PATIENT_A_SHOWN)
        expect(page.locator(".impression")).to_have_text(IMPRESSION)
        expect(page.get_by_role("heading", name=impression_label)).to_be_visible()
        expect(page.locator("#facility")).to_have_text("Bệnh viện Đa khoa Tỉnh")
        images = page.locator("section.images img")
        expect(images).to_have_count(2)
        for i in range(2):
            images.nth(i).scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=images.nth(i).element_handle())
        _no_sideways_scroll(page)
        assert page.evaluate("document.documentElement.lang") == language
        assert axe(page) == []  # serious or critical axe-core violations, on the phone's screen
        assert_keyboard_reachable(page)
        shot = tmp_path / f"share-page-{language}.png"
        page.screenshot(path=str(shot), full_page=True)
        picture = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
        assert picture.width == PHONE["width"] * 2  # device scale 2: no wider than the screen
        assert ImageStat.Stat(picture).stddev[0] > 20, "the screenshot is blank"
        assert len(picture.getcolors(maxcolors=1_000_000) or []) > 50
        print(f"\nshare page screenshot ({language}): {shot}")
        # the language switch goes to the other language
        other = "en" if language == "vi" else "vi"
        page.locator(f'nav.languages a[lang="{other}"]').click()
        page.wait_for_url(f"**?lang={other}")
        assert page.evaluate("document.documentElement.lang") == other
        assert axe(page) == []
        assert_clean(log)  # no failed request, no 4xx/5xx answer, no console or page error
    finally:
        page.context.close()


def test_birth_date_form_then_report_in_the_browser(served: tuple[EmbeddedPacs, ShareWorld], browser: Browser,
                                                    tmp_path: Path) -> None:
    url = _link(served, "report", birth_date_check=True)
    page, log = _phone(browser)
    try:
        page.goto(url)
        page.fill("#birth_date", "01/01/1990")
        page.click("#continue")
        expect(page.locator("#error")).to_contain_text("Còn 4 lần thử")
        _no_sideways_scroll(page)
        assert axe(page) == []
        assert_keyboard_reachable(page)
        page.fill("#birth_date", "15/04/1965")
        page.click("#continue")
        expect(page.locator(".impression")).to_have_text(IMPRESSION)
        expect(page.locator("#patient-name")).to_have_text(PATIENT_A_SHOWN)
        _no_sideways_scroll(page)
        page.screenshot(path=str(tmp_path / "share-after-birth-date.png"), full_page=True)
        with page.expect_download() as download:
            page.click("#pdf-1")
        assert Path(download.value.path()).read_bytes().startswith(b"%PDF")
        unexpected = [e for e in log.console_errors if "status of 403" not in e]  # the wrong date's answer
        assert unexpected == [] and log.page_errors == [], log.summary()
    finally:
        page.context.close()


def test_viewer_hand_off_keeps_the_session_for_the_viewer(served: tuple[EmbeddedPacs, ShareWorld],
                                                          browser: Browser) -> None:
    server, world = served
    url = _link(served, "study")
    page, log = _phone(browser)
    try:
        page.goto(url)
        page.click("#open-viewer")
        page.wait_for_url(f"**/ohif/viewer?StudyInstanceUIDs={world.a.uid}")
        token = page.evaluate("sessionStorage.getItem('pacs.ohif.token')")
        assert token and page.evaluate("Number(sessionStorage.getItem('pacs.ohif.expires'))") > 0
        assert log.page_errors == [], log.summary()
        response = httpx.get(f"{server.http_url}/dicom-web/studies/{world.a.uid}/metadata",
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code == 200
        assert httpx.get(f"{server.http_url}/dicom-web/studies/{world.b.uid}/metadata",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 404
    finally:
        page.context.close()
