"""The study browser, the study page and the consult inbox (issue 16, viewer_api/ui/studies_pages.py) in a browser, on a
1366×768 screen.

One `pacs serve` and one Chromium for the module; the studies arrive by real C-STORE from two registered modalities
(MODA files into HOSP-A, MODB into HOSP-B). The clinician's journey starts at the sign-in page and follows the pages
only, in English and in Vietnamese: search ``nguyen van an`` (stored as ``Nguyễn^Văn^An``), open the study from the
results, read its final report (signed in-process through pacs.reports), see the person's prior study; the page is
screenshotted and checked; the patient's page lists both studies with the signed impression; a share link is made
(link and QR shown). A study stored while the browser page is open appears after the page's poll without a reload. A
clinician of HOSP-B gets the 404 page on HOSP-A's study page and thumbnail by URL, until HOSP-A asks HOSP-B for a
consult through the study page's form: the consult is in B's inbox, B answers it, A reads the answer and closes it,
and B's 404 is back. A patient name ``<script>…`` is shown as text on the list and the study page. axe-core: no
serious violation; no console error, failed request or error status.
The browser's query itself (pacs.query.study_browser) is also checked in-process on SQLite: diacritic-free names,
scope and facility filter, report status as each role may know it, paging, the "new studies" count, bad input.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Locator, Page, ViewportSize, expect
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs.db.models import AuditEvent
from pacs.reports import service
from pacs.security import accounts
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from tests.support.browser import PageLog, chromium_browser
from tests.support.facilities import FacilityArchive
from tests.support.ui import assert_clean, assert_keyboard_reachable, axe, screenshot, sign_in

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple 16"
SCREEN: ViewportSize = {"width": 1366, "height": 768}
USERS = {"clin_a": ("clinician", "HOSP-A"), "clin_b": ("clinician", "HOSP-B"), "rad_a": ("radiologist", "HOSP-A")}
FINDINGS = "Phổi hai bên sáng đều, không thấy tổn thương khu trú. Bóng tim không to."
IMPRESSION = "Không thấy bất thường trên phim CT lồng ngực."
SCRIPT_NAME = "<script>alert(1)</script>^Hacker"  # no "=": a PN's component group separator
QUESTION = "Xin ý kiến: nốt mờ thuỳ trên phổi phải có cần sinh thiết không?"
ANSWER = "Nốt vôi hoá lành tính, không cần sinh thiết; theo dõi sau 12 tháng."


class Archive(FacilityArchive):
    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self.an = self.study("MODA", "AN-001", "Nguyễn^Văn^An", "20261205", "CT ngực")
        self.an_prior = self.study("MODA", "AN-001", "Nguyễn^Văn^An", "20240310", "X-quang ngực thẳng")
        self.binh = self.study("MODA", "BI-002", "Trần^Thị^Bình", "20261204", "Siêu âm bụng")
        self.script = self.study("MODA", "XS-003", SCRIPT_NAME, "20261203", "CT sọ não")
        self.b_study = self.study("MODB", "BB-004", "Lê^Văn^Cường", "20261206", "CT bụng")
        with server.ctx.sessions() as session, session.begin():
            for name, (role, facility) in USERS.items():
                accounts.create_user(session, name, PASSWORD, role, facility=facility)
        radiologist = Principal("rad_a", Role.RADIOLOGIST, capabilities_of(Role.RADIOLOGIST),
                                scope_for(Role.RADIOLOGIST, "HOSP-A"), facility="HOSP-A")
        draft = service.create_draft(server.ctx, radiologist, self.an, FINDINGS, IMPRESSION, "vi")
        service.sign(server.ctx, radiologist, draft.id)

    def study(self, aet: str, patient_id: str, name: str, date: str, description: str) -> str:
        return str(self.send_instance(aet, PatientID=patient_id, PatientName=name, PatientBirthDate="19680512",
                                      StudyDate=date, StudyDescription=description, StudyInstanceUID=generate_uid(),
                                      AccessionNumber=f"ACC{patient_id[-3:]}{date[-4:]}").StudyInstanceUID)


@dataclass
class World:
    archive: Archive
    browser: Browser

    @property
    def url(self) -> str:
        return self.archive.server.http_url


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Archive.serving(tmp_path_factory.mktemp("ui-studies")) as archive, chromium_browser() as browser:
        yield World(archive, browser)


def _context(world: World, language: str) -> BrowserContext:
    return world.browser.new_context(viewport=SCREEN, locale="vi-VN" if language == "vi" else "en-US",
                                     extra_http_headers={"Accept-Language": language})


def _sign_in(page: Page, world: World, username: str) -> None:
    sign_in(page, world.url, username, PASSWORD)  # through the sign-in page only (tests.support.ui)


def _axe(page: Page) -> list[dict[str, Any]]:
    """Serious and critical axe-core violations of the page."""
    return axe(page)


def _loaded(image: Locator) -> None:
    """The image arrived and decoded (lazy images load when shown: wait for it)."""
    image.scroll_into_view_if_needed()
    expect(image).to_have_js_property("complete", True)
    assert image.evaluate("img => img.naturalWidth") > 0


def _rows(page: Page) -> list[str]:
    return [str(r.get_attribute("data-study")) for r in page.locator("#study-list tbody tr").all()]


TEXTS = {
    "en": {"priors": "Other studies of this person", "share": "Share link made"},
    "vi": {"priors": "Các ca chụp khác của người này", "share": "Đã tạo liên kết chia sẻ"},
}


@pytest.mark.parametrize("language", ["en", "vi"])
def test_clinician_finds_a_patient_and_reads_the_report(world: World, language: str, tmp_path: Path) -> None:
    archive = world.archive
    log = PageLog()
    with _context(world, language) as context:
        page = context.new_page()
        log.attach(page)
        _sign_in(page, world, "clin_a")
        assert page.url.endswith("/ui/studies"), page.url  # the clinician's home
        assert page.locator("html").get_attribute("lang") == language
        # the facility's studies, newest first; HOSP-B's is not there
        assert _rows(page) == [archive.an, archive.binh, archive.script, archive.an_prior]
        assert not _axe(page), _axe(page)
        if language == "en":  # (the keyboard walk once: the language changes no element)
            assert_keyboard_reachable(page)

        page.locator("#search-name").fill("nguyen van an")
        page.locator("form.study-search button[type=submit]").click()
        expect(page.locator("#study-list tbody tr")).to_have_count(2)
        assert _rows(page) == [archive.an, archive.an_prior]
        first = page.locator(f"#study-list tr[data-study='{archive.an}']")
        expect(first).to_contain_text("Nguyễn Văn An")
        expect(first).to_contain_text("CT ngực")
        expect(first.locator("img")).to_have_attribute("src", f"/ui/studies/{archive.an}/thumbnail.jpg")
        _loaded(first.locator("img"))

        first.locator("a.study-link").click()
        page.wait_for_load_state("load")
        assert page.url.endswith(f"/ui/studies/{archive.an}"), page.url
        expect(page.locator("h1")).to_have_text("Nguyễn Văn An")
        report = page.locator("section.report")
        expect(report).to_contain_text(FINDINGS)
        expect(report).to_contain_text(IMPRESSION)
        expect(report.locator(".status-final").first).to_be_visible()
        priors = page.locator("section.priors")
        expect(priors).to_contain_text(TEXTS[language]["priors"])
        expect(priors.locator(f"a[href='/ui/studies/{archive.an_prior}']")).to_have_count(1)
        expect(page.locator("#open-viewer")).to_have_attribute("href", f"/ui/viewer/{archive.an}")
        # a clinician may export but not manage: the zip link, no button to a page that would refuse them
        expect(page.locator("#download-study")).to_have_attribute("href", f"/ui/studies/{archive.an}/archive.zip")
        expect(page.locator(f"a[href='/ui/studies/{archive.an}/manage']")).to_have_count(0)
        _loaded(page.locator(".series-grid img").first)
        assert not _axe(page), _axe(page)
        if language == "en":
            assert_keyboard_reachable(page)
        screenshot(page, tmp_path / f"clinician-{language}.png", "Nguyễn Văn An", "AN-001", FINDINGS, IMPRESSION,
                   TEXTS[language]["priors"])

        if language == "en":
            # the patient's page: every study of the person with its signed report
            page.locator(f"a[href='/ui/patients/{archive.an}']").click()
            page.wait_for_load_state("load")
            expect(page.locator("h1")).to_have_text("Nguyễn Văn An")
            expect(page.locator("article.patient-study")).to_have_count(2)
            expect(page.locator("article.patient-study").first).to_contain_text(IMPRESSION)
            assert not _axe(page), _axe(page)
            assert_keyboard_reachable(page)
            page.go_back()
            # a share link for the patient: shown once, with its QR code
            page.locator("#share-panel summary").click()
            page.locator("#share-panel button[type=submit]").click()
            page.wait_for_load_state("load")
            expect(page.locator("h1")).to_have_text(TEXTS[language]["share"])
            assert re.fullmatch(r"https?://[^/]+/s/\S+", page.locator("#share-url").input_value())
            _loaded(page.locator("img.qr"))
            assert not _axe(page), _axe(page)
            assert_keyboard_reachable(page)
    assert_clean(log)
    # audited as QIDO-RS audits a search (the patient shown), and the study page and its thumbnails as reads
    with archive.server.ctx.read_sessions() as session:
        rows = session.execute(select(AuditEvent.action, AuditEvent.patient_id, AuditEvent.study_instance_uid)
                               .where(AuditEvent.actor == "clin_a")).all()
    assert ("study.search", "AN-001", "") in rows, rows
    assert ("study.view", "AN-001", archive.an) in rows
    assert ("report.read", "AN-001", archive.an) in rows
    assert ("dicomweb.thumbnail", "AN-001", archive.an) in rows


def test_a_new_study_appears_without_a_reload(world: World) -> None:
    log = PageLog()
    with _context(world, "en") as context:
        page = context.new_page()
        log.attach(page)
        _sign_in(page, world, "clin_a")
        page.goto(world.url + "/ui/studies?poll=2")  # the page's own poll, every 2 s instead of 10
        before = _rows(page)
        banner = page.locator("#new-studies-banner")
        expect(banner).to_be_hidden()
        new = world.archive.study("MODA", "NW-005", "Phạm^Minh^Tuấn", "20261207", "X-quang ngực")
        expect(banner).to_be_visible(timeout=15_000)
        expect(page.locator("#new-studies-count")).to_have_text("1")
        assert _rows(page) == before  # nothing reloaded
        page.locator("#new-studies-show").click()
        page.wait_for_load_state("load")
        assert _rows(page)[0] == new
    assert_clean(log)


def test_script_in_a_patient_name_is_text(world: World) -> None:
    archive = world.archive
    dialogs: list[str] = []
    with _context(world, "en") as context:
        page = context.new_page()
        def dialog(d: Dialog) -> None:
            dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)
        _sign_in(page, world, "clin_a")
        row = page.locator(f"#study-list tr[data-study='{archive.script}']")
        expect(row.locator("a.study-link")).to_have_text("<script>alert(1)</script> Hacker")
        assert "&lt;script&gt;alert(1)&lt;/script&gt; Hacker" in page.content()
        assert "<script>alert" not in page.content()
        row.locator("a.study-link").click()
        page.wait_for_load_state("load")
        expect(page.locator("h1")).to_have_text("<script>alert(1)</script> Hacker")
        assert "<script>alert" not in page.content()
    assert dialogs == []


def test_another_facility_gets_404_until_asked_for_a_consult(world: World) -> None:
    archive = world.archive
    study_url = f"{world.url}/ui/studies/{archive.an}"
    with _context(world, "en") as b_context, _context(world, "en") as a_context:
        b = b_context.new_page()
        _sign_in(b, world, "clin_b")
        assert _rows(b) == [archive.b_study]  # HOSP-B's own study only
        response = b.goto(study_url)
        assert response is not None and response.status == 404
        expect(b.locator("h1")).not_to_contain_text("Nguyễn")
        assert "Nguyễn" not in b.content()
        thumb = b.request.get(f"{study_url}/thumbnail.jpg")
        assert thumb.status == 404

        # HOSP-A asks HOSP-B from the study page
        a = a_context.new_page()
        a_log = PageLog()
        a_log.attach(a)
        _sign_in(a, world, "clin_a")
        a.locator(f"#study-list tr[data-study='{archive.an}'] a.study-link").click()
        a.locator("#consult-panel summary").click()
        a.locator("#consult-question").fill(QUESTION)
        a.locator("#consult-facility").fill("HOSP-B")
        a.locator("#consult-panel button[type=submit]").click()
        a.wait_for_load_state("load")
        assert re.search(r"/ui/consults/\d+$", a.url), a.url
        consult_url = a.url

        # B finds it in its inbox, opens the study, answers
        b.goto(world.url + "/ui/consults")
        inbox = b.locator("#consult-list tbody tr")
        expect(inbox).to_have_count(1)
        expect(inbox.first).to_contain_text("Nguyễn Văn An")
        assert not _axe(b), _axe(b)
        assert_keyboard_reachable(b)
        inbox.first.locator("a").first.click()
        b.wait_for_load_state("load")
        expect(b.locator("main")).to_contain_text(QUESTION)
        assert b.goto(study_url).status == 200  # type: ignore[union-attr]  # the consult's grant
        b.go_back()
        b.locator("#answer-text").fill(ANSWER)
        b.locator("form[action$='/answer'] button[type=submit]").click()
        b.wait_for_load_state("load")
        expect(b.locator("section[aria-labelledby='answers-heading']")).to_contain_text(ANSWER)
        assert not _axe(b), _axe(b)
        assert_keyboard_reachable(b)

        # A reads the answer and closes the consult: B's 404 is back
        a.goto(consult_url)
        expect(a.locator("main")).to_contain_text(ANSWER)
        a.locator("form[action$='/close'] button[type=submit]").click()
        a.wait_for_load_state("load")
        assert b.goto(study_url).status == 404  # type: ignore[union-attr]
        assert_clean(a_log)


# -- the browser's query, in-process on SQLite (pacs.query.study_browser) -------------------------------------------


@dataclass
class Index:
    ctx: Any
    studies: dict[str, str]


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Index]:
    from pacs.context import AppContext
    from pacs.db import migrate
    from pacs.ingest import Ingestor, IngestSource
    from pacs.settings import Settings
    from tests.support.datasets import make_instance

    ctx = AppContext.create(Settings(data_dir=tmp_path_factory.mktemp("study-browser") / "data"))
    migrate.upgrade(ctx.engine)
    ingestor = Ingestor(ctx.sessions, ctx.store)
    studies: dict[str, str] = {}
    for key, facility, patient, name, date, modality in (
            ("an", "A", "P1", "Nguyễn^Văn^An", "20261201", "CT"),
            ("an_old", "A", "P1", "NGUYEN^VAN^AN", "20200101", "CR"),
            ("binh", "A", "P2", "Trần^Thị^Bình", "20261202", "US"),
            ("b", "B", "P3", "Nguyễn^Văn^Anh", "20261203", "CT")):
        studies[key] = generate_uid()
        outcome = ingestor.ingest(make_instance(StudyInstanceUID=studies[key], PatientID=patient, PatientName=name,
                                                StudyDate=date, Modality=modality),
                                  IngestSource("stow", user="t", facility=facility))
        assert outcome.ok, outcome.message
    radiologist = Principal("rad", Role.RADIOLOGIST, capabilities_of(Role.RADIOLOGIST), scope_for(
        Role.RADIOLOGIST, "A"), facility="A")
    service.create_draft(ctx, radiologist, studies["binh"], "nháp", "", "vi")  # a draft: hidden from clinicians
    final = service.create_draft(ctx, radiologist, studies["an"], "Bình thường.", "", "vi")
    with ctx.sessions() as session, session.begin():
        from pacs.reports import lifecycle

        lifecycle.sign(session, radiologist, final.id)
    yield Index(ctx, studies)
    ctx.close()


def _principal(role: Role, facility: str) -> Principal:
    return Principal(f"{role.value}-{facility}", role, capabilities_of(role), scope_for(role, facility),
                     facility=facility)


def test_browser_query_matches_qido_and_respects_scope(index: Index) -> None:
    from pacs.errors import InvalidInput
    from pacs.query import study_browser as sb

    s = index.studies
    clinician_a, admin = _principal(Role.CLINICIAN, "A"), _principal(Role.ADMIN, "")
    with index.ctx.read_sessions() as session:
        page = sb.browse(session, clinician_a, sb.BrowserFilters())
        assert [r.study_instance_uid for r in page.rows] == [s["binh"], s["an"], s["an_old"]]  # newest first, A only
        assert page.total == 3
        statuses = {r.study_instance_uid: r.report_status for r in page.rows}
        assert statuses == {s["binh"]: "none", s["an"]: "final", s["an_old"]: "none"}  # the draft is not shown
        radiologist = sb.browse(session, _principal(Role.RADIOLOGIST, "A"), sb.BrowserFilters())
        assert {r.study_instance_uid: r.report_status for r in radiologist.rows}[s["binh"]] == "draft"
        # without diacritics, with them, upper-case: the same two studies; "Anh" of B never
        for name in ("nguyen van an", "Nguyễn Văn An", "NGUYEN^VAN^AN", "nguyen"):
            found = sb.browse(session, clinician_a, sb.BrowserFilters(patient_name=name))
            assert [r.study_instance_uid for r in found.rows] == [s["an"], s["an_old"]], name
        assert sb.browse(session, admin, sb.BrowserFilters(patient_name="nguyen van an")).total == 3  # + B's "Anh"
        assert [r.study_instance_uid for r in sb.browse(session, admin, sb.BrowserFilters(facility="B")).rows] == [
            s["b"]]
        assert sb.browse(session, clinician_a, sb.BrowserFilters(facility="B")).total == 0  # narrows, never widens
        dated = sb.browse(session, admin, sb.BrowserFilters(date_from="2026-12-01", date_to="2026-12-02",
                                                            modality="ct"))
        assert [r.study_instance_uid for r in dated.rows] == [s["an"]]
        assert sb.browse(session, admin, sb.BrowserFilters(), limit=2, offset=2).total == 4
        assert len(sb.browse(session, admin, sb.BrowserFilters(), limit=2, offset=2).rows) == 2
        assert sb.count_newer(session, clinician_a, sb.BrowserFilters(), page.latest) == (0, page.latest)
        assert sb.count_newer(session, admin, sb.BrowserFilters(), 0)[0] == 4
        assert sb.study_detail(session, _principal(Role.CLINICIAN, "B"), s["an"]) is None  # another facility's
        detail = sb.study_detail(session, clinician_a, s["an"])
        assert detail is not None and detail.study.patient_name == "Nguyễn^Văn^An" and len(detail.series) == 1
        priors = sb.prior_studies(session, clinician_a, detail.patient_fk, s["an"])
        assert [p.study_instance_uid for p in priors] == [s["an_old"]]
        for bad in (sb.BrowserFilters(date_from="2026-13-40"), sb.BrowserFilters(modality="C T"),
                    sb.BrowserFilters(date_from="2026-12-02", date_to="2026-12-01")):
            with pytest.raises(InvalidInput):
                sb.browse(session, clinician_a, bad)
