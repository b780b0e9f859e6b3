"""The OHIF viewer on our DICOMweb (issue 6 must-show 4).

`pacs viewer install-ohif` installs the pinned OHIF build (fetched by npm from the registry, once per change of
pacs/viewer, into .cache/); a real `pacs serve` serves it under /ohif/ next to its DICOMweb; headless Chromium
(Debian's, driven by Playwright) signs in on our page, sees the study list from our QIDO-RS, opens a 20-slice
CT and renders it from our WADO-RS, every DICOMweb request carrying the user's bearer token.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect

import pacs.viewer
from bench.generate_ct import write_ct_series
from pacs.viewer import MARKER_FILE, OHIF_VERSION
from tests.support.browser import PageLog, chromium_browser
from tests.support.dcmtk import storescu
from tests.support.http_api import bearer_client
from tests.support.inprocess import new_user
from tests.support.net import wait_until
from tests.support.ohif import installed_ohif
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

PATIENT_NAME = "Trần^Thị Bích"
PATIENT_SHOWN = "Trần, Thị Bích"  # how OHIF's study list writes a PN
PATIENT_ID = "VN-0042"
SLICES = 20
USER, PASSWORD = "reader1", "correct-horse-battery-7"
# Variance of the viewport's grey levels: a black canvas is ~0; the CT phantom at W400/L40 is in the thousands.
MIN_VARIANCE = 200.0


@pytest.fixture(scope="session")
def ohif_dir() -> Path:
    return installed_ohif()


@pytest.fixture(scope="module")
def server(ohif_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("ohif"), {"PACS_OHIF_DIR": str(ohif_dir)})
    try:
        yield pacs
    finally:
        pacs.close()


@pytest.fixture(scope="module")
def ct_study(server: EmbeddedPacs) -> dict[str, str]:
    """A 20-slice CT sent by DCMTK storescu, indexed and with its series metadata served by WADO-RS."""
    files = write_ct_series(server.root / "ct", slices=SLICES, size=256, patient_name=PATIENT_NAME,
                            patient_id=PATIENT_ID)
    sent = storescu(server.port, files)
    assert sent.success, sent.output[-2000:]
    study = _read_uid(files[0], "StudyInstanceUID")
    series = _read_uid(files[0], "SeriesInstanceUID")
    with bearer_client(server.http_url, server.token("radiologist")) as client:
        def complete() -> bool:
            response = client.get(f"/dicom-web/studies/{study}/series/{series}/metadata")
            return response.status_code == 200 and len(response.json()) == SLICES

        wait_until(complete, timeout=90, interval=0.5, what="the CT's series metadata on WADO-RS")
    return {"study": study, "series": series}


@pytest.fixture(scope="module")
def user(server: EmbeddedPacs) -> str:
    new_user(server.ctx, USER, PASSWORD, "radiologist")
    return USER


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium_browser() as chromium:
        yield chromium


def _read_uid(path: Path, keyword: str) -> str:
    import pydicom

    return str(getattr(pydicom.dcmread(path, stop_before_pixels=True), keyword))


def _grey(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def _new_page(browser: Browser) -> tuple[BrowserContext, Page, PageLog]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(90_000)
    log = PageLog()
    log.attach(page)
    return context, page, log


# -- the browser: sign in, study list, viewer (must-show 4) ------------------------------------------------------


def test_signed_in_user_sees_the_study_list_and_the_ct_rendered(
        server: EmbeddedPacs, ct_study: dict[str, str], user: str, browser: Browser,
        tmp_path: Path) -> None:
    context, page, log = _new_page(browser)
    try:
        # Without a token the viewer does not start: it sends the user to our sign-in page.
        page.goto(f"{server.http_url}/ohif/")
        page.wait_for_url(re.compile(r"/ohif/login\.html\?next=%2Fohif%2F$"))
        page.fill("#username", user)
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_url(f"{server.http_url}/ohif/")
        token = page.evaluate("sessionStorage.getItem('pacs.ohif.token')")
        assert token, "the sign-in page kept no token"

        # The study list comes from our QIDO-RS.
        expect(page.get_by_text(PATIENT_SHOWN).first).to_be_visible(timeout=90_000)
        assert page.get_by_role("button", name="Confirm and hide").count() == 0  # no "investigational use" notice
        page.get_by_text(PATIENT_SHOWN).first.click()
        launch = page.get_by_role("button", name="Basic Viewer")
        expect(launch).to_be_visible()
        page.wait_for_load_state("networkidle")  # the study's thumbnail, before leaving the list
        launch.click()
        page.wait_for_url(re.compile(rf"/ohif/viewer\?StudyInstanceUIDs={re.escape(ct_study['study'])}"))

        # The CT renders: every slice is in the stack and the viewport shows the phantom, not a blank canvas.
        viewport = page.locator("canvas.cornerstone-canvas").first
        expect(viewport).to_be_visible(timeout=90_000)
        expect(page.get_by_text(f"(1/{SLICES})").first).to_be_visible(timeout=90_000)
        skip_tour = page.get_by_text("Skip all")
        if skip_tour.is_visible():
            skip_tour.click()
        shot: dict[str, np.ndarray] = {}

        def rendered() -> bool:
            shot["grey"] = _grey(viewport.screenshot())
            return float(shot["grey"].var()) > MIN_VARIANCE

        wait_until(rendered, timeout=90, interval=1.0, what="a non-blank CT image in the OHIF viewport")
        grey = shot["grey"]
        screenshot = tmp_path / "ohif-viewer.png"
        page.screenshot(path=str(screenshot))
        print(f"\nOHIF viewer screenshot: {screenshot}")
        size = viewport.bounding_box()
        assert size is not None
        blank = _grey(_blank_canvas_screenshot(page, int(size["width"]), int(size["height"])))
        assert float(blank.var()) < 1.0 < MIN_VARIANCE < float(grey.var()), (blank.var(), grey.var())
        h, w = grey.shape
        centre = grey[h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5].mean()
        assert 80 < centre < 180, f"soft tissue (40 HU) at W400/L40 should be mid-grey, got {centre}"
        assert grey.max() > 240 and grey.min() < 15, "bone (700 HU) white and air black"
        assert page.evaluate("crossOriginIsolated") is True  # COOP/COEP from viewer_api.hardening

        # Every DICOMweb request carried the user's token; nothing failed; the console stayed clean.
        dicomweb = [(url, headers) for _, url, headers in log.requests if "/dicom-web/" in url]
        assert any("/dicom-web/studies?" in url for url, _ in dicomweb), "no QIDO-RS study search"
        assert any(url.endswith("/metadata") for url, _ in dicomweb), "no WADO-RS metadata"
        assert any("/frames/" in url for url, _ in dicomweb), "no WADO-RS frames"
        unauthenticated = [url for url, headers in dicomweb if headers.get("authorization") != f"Bearer {token}"]
        assert unauthenticated == []
        assert _unexplained(log.failed, server.http_url, ct_study) == [], log.summary()
        assert log.error_statuses == [], log.summary()
        assert log.page_errors == [], log.summary()
        assert log.console_errors == [], log.summary()
    finally:
        context.close()


def _unexplained(failed: list[str], base: str, study: dict[str, str]) -> list[str]:
    """Failed requests but the one OHIF cancels itself: the study list's preview panel fetches the selected
    study's series thumbnail and aborts that fetch (an AbortController in the cleanup of its useSeriesFetch
    hook) when the user leaves the list; if it was still in flight, Chrome reports it as net::ERR_ABORTED.
    No response was refused: error statuses are checked separately."""
    preview = (f"GET {base}/dicom-web/studies/{study['study']}/series/{study['series']}/thumbnail"
               "?viewport=256%2C256: net::ERR_ABORTED")
    return [f for f in failed if f != preview]


def _blank_canvas_screenshot(page: Page, width: int, height: int) -> bytes:
    """A screenshot of an empty canvas of the viewport's size, taken the same way (the 'blank' reference)."""
    page.evaluate("""([w, h]) => {
        const c = document.createElement('canvas');
        c.id = 'blank-reference'; c.width = w; c.height = h;
        c.style.cssText = 'position:fixed;left:0;top:0;z-index:99999;background:#000';
        document.body.appendChild(c);
    }""", [width, height])
    try:
        return page.locator("#blank-reference").screenshot()
    finally:
        page.evaluate("document.getElementById('blank-reference').remove()")


def test_sign_in_refuses_bad_credentials_and_accepts_an_api_token(
        server: EmbeddedPacs, ct_study: dict[str, str], user: str, browser: Browser) -> None:
    api_token = server.token("clinician")
    context, page, log = _new_page(browser)
    try:
        # `next` pointing off the viewer (an open redirect) is ignored: the user lands on the study list.
        page.goto(f"{server.http_url}/ohif/login.html?next={quote('https://evil.example/phish', safe='')}")
        page.fill("#username", user)
        page.fill("#password", "not-the-password")
        page.click("#sign-in")
        expect(page.locator("#message")).to_have_text("Wrong user name or password.")
        page.locator("summary").click()
        page.fill("#token", "pacs_not_a_real_token")
        page.click("#use-token")
        expect(page.locator("#message")).to_have_text("This token is not valid (wrong, expired or revoked).")
        assert page.evaluate("sessionStorage.getItem('pacs.ohif.token')") is None
        assert sorted(s.split()[0] for s in log.error_statuses) == ["401", "401"], log.error_statuses

        page.fill("#token", api_token)
        with page.expect_response(lambda r: "/dicom-web/studies?" in r.url) as searched:
            page.click("#use-token")
        assert page.url == f"{server.http_url}/ohif/"
        search = searched.value
        assert search.status == 200
        assert search.request.headers.get("authorization") == f"Bearer {api_token}"
        expect(page.get_by_text(PATIENT_SHOWN).first).to_be_visible(timeout=90_000)

        # The list's patient filter is a QIDO-RS search. (OHIF also filters the rows it gets with a plain,
        # accent-sensitive substring test, so "tran" finds Trần on our server and is then hidden by OHIF.)
        patient_filter = page.locator("input").first  # the Patient column's filter box
        with page.expect_response(lambda r: "PatientName=*trần*" in unquote(r.url)) as filtered:
            patient_filter.fill("trần")
        assert filtered.value.status == 200 and len(filtered.value.json()) == 1
        expect(page.get_by_text(PATIENT_SHOWN).first).to_be_visible()
        with page.expect_response(lambda r: "PatientName=*nguyen*" in r.url) as filtered:
            patient_filter.fill("nguyen")
        assert filtered.value.status == 200 and filtered.value.json() == []
        expect(page.get_by_text("No studies available")).to_be_visible()

        # Signing out forgets the token: the viewer sends the user back to the sign-in page.
        page.goto(f"{server.http_url}/ohif/login.html?logout")
        expect(page.locator("#message")).to_have_text("Signed out.")
        page.goto(f"{server.http_url}/ohif/viewer?StudyInstanceUIDs={ct_study['study']}")
        page.wait_for_url(re.compile(r"/ohif/login\.html\?next=%2Fohif%2Fviewer%3FStudyInstanceUIDs%3D"))
    finally:
        context.close()


# -- serving the static files --------------------------------------------------------------------------------


def test_static_files_routes_and_missing_assets(server: EmbeddedPacs, ohif_dir: Path) -> None:
    base = f"{server.http_url}/ohif"
    with httpx.Client(timeout=60) as client:
        index = client.get(f"{base}/viewer", params={"StudyInstanceUIDs": "1.2.3"})  # an app route: index.html
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert 'window.PUBLIC_URL="/ohif/"' in index.text and 'src="/ohif/app-config.js"' in index.text
        assert index.headers["cross-origin-embedder-policy"] == "require-corp"
        assert index.headers["cross-origin-opener-policy"] == "same-origin"
        assert index.headers["cache-control"] == "no-cache"

        wasm = next(p.name for p in ohif_dir.glob("*.wasm"))
        response = client.get(f"{base}/{wasm}", headers={"Accept-Encoding": "gzip"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/wasm"
        assert response.headers["content-encoding"] == "gzip" and response.content == (ohif_dir / wasm).read_bytes()
        assert "immutable" in response.headers["cache-control"]
        raw = client.get(f"{base}/{wasm}", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in raw.headers and int(raw.headers["content-length"]) == len(raw.content)

        config = client.get(f"{base}/app-config.js")
        assert config.headers["content-type"].startswith("text/javascript")
        assert "userAuthenticationService" in config.text and "/dicom-web" in config.text
        assert client.get(f"{base}/manifest.json").headers["content-type"] == "application/json"
        assert client.get(f"{base}/login.html").headers["content-type"].startswith("text/html")

        for missing in ("/missing.bundle.js", "/assets/nothing.png"):  # a missing asset is a 404, not the app page
            response = client.get(base + missing)
            assert response.status_code == 404 and response.json()["code"] == "not_found", missing
        for escape in ("/..%2f..%2fdata%2findex.sqlite3", "/%2e%2e/%2e%2e/etc/passwd", "/.hidden"):
            response = client.get(base + escape)
            assert response.status_code == 404, escape
        redirect = client.get(base, params={"a": "1"})
        assert redirect.status_code == 308 and redirect.headers["location"] == "/ohif/?a=1"


def test_viewer_not_installed_answers_404_with_the_install_command(tmp_path: Path) -> None:
    """The route's answer, in-process (the API app on a migrated index: no `pacs serve` just for one 404)."""
    from fastapi.testclient import TestClient

    from pacs.context import AppContext
    from pacs.db import migrate
    from pacs.settings import Settings
    from viewer_api.app import create_app

    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", ohif_dir=tmp_path / "no-viewer"))
    try:
        migrate.upgrade(ctx.engine)
        with TestClient(create_app(ctx)) as client:
            response = client.get("/ohif/viewer")
    finally:
        ctx.close()
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == "viewer_not_installed" and "pacs viewer install-ohif" in body["message"]


# -- the install command's refusals ----------------------------------------------------------------------------


def test_install_refuses_a_tarball_that_is_not_the_published_one(tmp_path: Path) -> None:
    fake = tmp_path / "ohif-app-3.13.2.tgz"
    with tarfile.open(fake, "w:gz") as tar:
        data = b"<!doctype html><script>alert(1)</script>"
        info = tarfile.TarInfo("package/dist/index.html")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "ohif"
    result = run_pacs(["viewer", "install-ohif", "--from-tarball", str(fake), "--dir", str(target)],
                      {"PACS_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 1
    assert "is not the published @ohif/app@3.13.2 tarball" in " ".join(result.stderr.split())
    assert not target.exists()


def test_install_refuses_to_replace_a_folder_it_did_not_make(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "index.sqlite3").write_bytes(b"precious")
    result = invoke_pacs(["viewer", "install-ohif", "--from-tarball", str(tmp_path / "none.tgz"), "--dir",
                          str(target)], {"PACS_DATA_DIR": str(tmp_path / "data")})  # in-process: a process above
    assert result.returncode == 1
    assert "is not an OHIF install made by this command" in " ".join(result.stderr.split())
    assert (target / "index.sqlite3").read_bytes() == b"precious"
    assert not (target / MARKER_FILE).exists()


def test_installed_viewer_records_what_it_is(ohif_dir: Path) -> None:
    marker = json.loads((ohif_dir / MARKER_FILE).read_text())
    assert marker["package"] == "@ohif/app" and marker["version"] == OHIF_VERSION
    assert marker["integrity"] == pacs.viewer.OHIF_INTEGRITY and marker["base_path"] == "/ohif/"
    assert not (ohif_dir / "_redirects").exists() and (ohif_dir / "login.html").is_file()


# -- a signed report's SR in the viewer (reports must-show 1) --------------------------------------------------------


def test_signed_report_sr_opens_in_the_viewer(
        server: EmbeddedPacs, ct_study: dict[str, str], user: str, browser: Browser, tmp_path: Path) -> None:
    study = ct_study["study"]
    with bearer_client(server.http_url, server.token("radiologist")) as client:
        created = client.post(f"/api/studies/{study}/reports", json={
            "findings": "Không thấy tổn thương khu trú.\nGan lách bình thường.", "impression": "Bình thường.",
            "language": "vi"})
        assert created.status_code == 201, created.text
        assert client.post(f"/api/reports/{created.json()['id']}/sign").status_code == 200

        def sr_indexed() -> bool:
            found = client.get(f"/dicom-web/studies/{study}/series", params={"Modality": "SR"})
            return found.status_code == 200 and len(found.json()) == 1

        wait_until(sr_indexed, timeout=90, interval=0.5, what="the report's SR in the study")
    context, page, log = _new_page(browser)
    try:
        page.goto(f"{server.http_url}/ohif/login.html?next=" + quote(f"/ohif/viewer?StudyInstanceUIDs={study}"))
        page.fill("#username", user)
        page.fill("#password", PASSWORD)
        page.click("#sign-in")
        page.wait_for_url(re.compile(rf"/ohif/viewer\?StudyInstanceUIDs={re.escape(study)}"))
        expect(page.locator("canvas.cornerstone-canvas").first).to_be_visible(timeout=90_000)
        for notice in ("Confirm and hide", "Skip all"):
            button = page.get_by_text(notice)
            if button.count() and button.first.is_visible():
                button.first.click()
        sr_thumbnail = page.locator("[data-cy='study-browser-thumbnail']", has_text="SR").first
        if not sr_thumbnail.count():
            sr_thumbnail = page.get_by_text("SR", exact=True).first
        expect(sr_thumbnail).to_be_visible(timeout=90_000)
        sr_thumbnail.dblclick()
        # OHIF's SR viewport shows the report's content tree: the signed text, diacritics exact
        expect(page.get_by_text("Gan lách bình thường.").first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Bình thường.", exact=True).first).to_be_visible()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(tmp_path / "ohif-sr.png"))
        print(f"\nOHIF SR screenshot: {tmp_path / 'ohif-sr.png'}")
        sr_requests = [url for _, url, _ in log.requests if "/dicom-web/" in url and "/series/" in url]
        assert sr_requests, "the viewer fetched nothing of the SR series"
        assert log.error_statuses == [], log.summary()
        assert log.page_errors == [], log.summary()
        assert log.console_errors == [], log.summary()
    finally:
        context.close()
