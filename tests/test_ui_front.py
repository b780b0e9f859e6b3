"""The front door, the hand-off to OHIF, offline /docs and `pacs demo` (issue 16, helper U5).

One real `pacs serve` with the OHIF viewer installed (the cached install of tests/test_ohif.py) and one Chromium:

- `pacs demo --facility HOSP-A` loads its three studies through the real ingest: QIDO-RS finds them with the
  names' exact diacritics, each with its order and the CT with a signed Vietnamese report; a second run adds
  nothing;
- ``/`` without a session is the sign-in page; ``/docs`` and ``/redoc`` render with no request leaving the server;
- a clinician signed in through the sign-in page opens ``/ui/viewer/{study}`` and lands in OHIF on that study:
  no "investigational use" banner, no tour, the patient's name and ID in the viewport's corner, OHIF in
  Vietnamese, every DICOMweb request carrying the handed-off token; the viewer's sign-out button ends the page
  session too;
- another facility's user gets 404 for the page and for the token; the token endpoint refuses a POST without the
  CSRF token (403) and audits each hand-off.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from pacs.db.models import AuditEvent
from pacs.demo import demo_studies
from tests.support.ohif import installed_ohif
from tests.support.pacs_process import run_pacs
from tests.support.ui import UiWorld, assert_clean, sign_in, ui_world_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ohif_dir() -> Path:
    return installed_ohif()


FACILITY = "HOSP-A"  # the facility of tests/support/ui.py's A users
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
STUDIES = {s.key: s for s in demo_studies((FACILITY, FACILITY))}
CT = STUDIES["ct-chest"]


@pytest.fixture(scope="module")
def world(ohif_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiWorld]:
    with ui_world_of(tmp_path_factory.mktemp("ui-front"), {"PACS_OHIF_DIR": str(ohif_dir)}) as opened:
        yield opened


@pytest.fixture(scope="module")
def demo(world: UiWorld) -> str:
    """`pacs demo` run for real against the server's data (the same ingest as `pacs import`); its output."""
    result = run_pacs(["demo", "--facility", FACILITY], world.server.env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _client(world: UiWorld) -> httpx.Client:
    return httpx.Client(base_url=world.base_url, follow_redirects=False, timeout=30,
                        headers={"Accept-Language": "vi"})


@contextmanager
def _signed_in(world: UiWorld, role: str) -> Iterator[tuple[httpx.Client, str]]:
    """An HTTP client with a page session of ``role`` (through the sign-in form) and its CSRF token."""
    with _client(world) as client:
        form = CSRF_FIELD.search(client.get("/login").text)
        assert form
        username, password = world.users[role]
        answer = client.post("/login", data={"username": username, "password": password, "csrf": form.group(1),
                                             "next": "/ui"})
        assert answer.status_code == 303, answer.text[:1000]
        meta = CSRF_META.search(client.get("/ui").text)
        assert meta
        yield client, meta.group(1)


# -- the front door and the offline documentation ----------------------------------------------------------------


def test_front_door_without_a_session_is_the_sign_in_page(world: UiWorld) -> None:
    with _client(world) as client:
        front = client.get("/")
        assert front.status_code == 303 and front.headers["location"] == "/login"
        viewer = client.get("/ui/viewer/1.2.3")
        assert viewer.status_code == 303 and viewer.headers["location"] == "/login?next=/ui/viewer/1.2.3"
        assert client.post("/ui/viewer-token", json={}).status_code in (401, 403)
    with world.browser_page("vi") as (page, log):
        page.goto(world.base_url + "/")
        assert urlsplit(page.url).path == "/login"
        expect(page.locator("#username")).to_be_visible()
        assert_clean(log)


def test_docs_render_without_any_request_leaving_the_server(world: UiWorld) -> None:
    with world.browser_page("en") as (page, log):
        page.goto(world.base_url + "/docs")
        expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)
        assert page.locator(".opblock").count() > 20  # the operations list, from /openapi.json
        outside = [url for _, url, _ in log.requests
                   if not url.startswith(world.base_url) and not url.startswith(("data:", "blob:"))]
        assert outside == [], outside
        assert any("/docs/static/swagger-ui-bundle.js" in url for _, url, _ in log.requests)
        assert log.failed == [] and log.error_statuses == [], log.summary()
    with _client(world) as client:  # ReDoc: its page names only this server's script, which is there
        redoc = client.get("/redoc")
        scripts = re.findall(r'<script src="([^"]+)"', redoc.text)
        assert scripts == ["/docs/static/redoc.standalone.js"] and "fonts.googleapis" not in redoc.text
        assert client.get(scripts[0]).status_code == 200


# -- pacs demo ---------------------------------------------------------------------------------------------------


def test_demo_loads_its_studies_once_with_exact_names(world: UiWorld, demo: str) -> None:
    with _signed_in(world, "clinician") as (client, csrf):
        token = client.post("/ui/viewer-token", json={}, headers={"X-CSRF-Token": csrf}).json()["token"]
        found = client.get("/dicom-web/studies", params={"PatientID": "DEMO-*", "includefield": "00321060"},
                           headers={"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"})
    assert found.status_code == 200, found.text
    names = {row["00100020"]["Value"][0]: row["00100010"]["Value"][0]["Alphabetic"] for row in found.json()}
    assert names == {"DEMO-0001": "Nguyễn^Văn An", "DEMO-0002": "Trần^Thị Bích", "DEMO-0003": "Lê^Hoàng Phúc"}
    accessions = sorted(row["00080050"]["Value"][0] for row in found.json())
    assert accessions == ["DEMO-CT-0001", "DEMO-US-0003", "DEMO-XR-0002"]
    assert "20 image(s) stored" in demo and "report signed by BS. Phạm Minh Đức (demo)" in demo
    with world.server.ctx.read_sessions() as session:
        from pacs.reports.models import Report
        from pacs.ris.models import ImagingOrder

        orders = [(o.accession_number, o.linked_study_instance_uid) for o in session.scalars(
            select(ImagingOrder).where(ImagingOrder.accession_number.like("DEMO-%")))]
        reports = [(r.status, r.versions[-1].language, r.versions[-1].impression) for r in session.scalars(
            select(Report).where(Report.study_instance_uid == CT.study_uid))]
    assert sorted(accession for accession, _ in orders) == accessions
    assert {study for _, study in orders} == {s.study_uid for s in STUDIES.values()}
    assert [status_and_language for *status_and_language, _ in reports] == [["final", "vi"]]
    assert "Chưa phát hiện bất thường" in reports[0][2]

    again = run_pacs(["demo", "--facility", FACILITY], world.server.env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 image(s) stored, 20 already there; order present; its report was already there" in again.stdout


# -- the hand-off to OHIF ------------------------------------------------------------------------------------------


def test_a_signed_in_user_opens_the_study_in_ohif_in_vietnamese(world: UiWorld, demo: str) -> None:
    username, password = world.users["clinician"]
    with world.browser_page("vi") as (page, log):
        page.set_default_timeout(60_000)
        sign_in(page, world.base_url, username, password)
        page.goto(f"{world.base_url}/ui/viewer/{CT.study_uid}")
        page.wait_for_url(re.compile(rf"/ohif/viewer\?StudyInstanceUIDs={re.escape(CT.study_uid)}$"))
        # OHIF loads its 5 MB of JavaScript before the first image: a loaded 2-core machine takes more than expect's
        # default 5 s (tests/test_ohif.py waits as long)
        expect(page.locator("canvas.cornerstone-canvas").first).to_be_visible(timeout=90_000)
        corner = page.locator(".overlay-item")  # the viewport's corners: name and ID lead the top left one
        expect(corner.first).to_have_text("Nguyễn, Văn An")
        expect(corner.nth(1)).to_have_text("DEMO-0001")
        expect(page.locator("#pacs-sign-out")).to_have_text("Đăng xuất")
        assert page.evaluate("localStorage.getItem('i18nextLng')") == "vi"
        assert page.get_by_text("Confirm and hide").count() == 0  # no "investigational use" banner
        assert page.get_by_text("Skip all").count() == 0  # no guided tour
        page.screenshot(path=str(world.screenshots / "ohif-handoff.png"))

        token = page.evaluate("sessionStorage.getItem('pacs.ohif.token')")
        dicomweb = [headers for _, url, headers in log.requests if "/dicom-web/" in url]
        assert dicomweb and all(h.get("authorization") == f"Bearer {token}" for h in dicomweb)
        assert log.error_statuses == [] and log.page_errors == [], log.summary()

        # The viewer's sign-out button ends the page session too.
        page.locator("#pacs-sign-out").click()
        page.wait_for_url(re.compile(r"/login$"))
        assert page.evaluate("sessionStorage.getItem('pacs.ohif.token')") is None
        page.goto(world.base_url + "/ui/studies")
        assert urlsplit(page.url).path == "/login"

    with world.server.ctx.read_sessions() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "viewer.handoff",
                                                        AuditEvent.actor == username)).all()
    assert any(r.study_instance_uid == CT.study_uid and r.patient_id == CT.patient_id and r.outcome == "success"
               for r in rows)


def test_another_facility_gets_404_and_the_token_needs_csrf(world: UiWorld, demo: str) -> None:
    with _signed_in(world, "clinician_b") as (other, other_csrf):
        assert other.get(f"/ui/viewer/{CT.study_uid}").status_code == 404
        refused = other.post("/ui/viewer-token", json={"study": CT.study_uid}, headers={"X-CSRF-Token": other_csrf})
        assert refused.status_code == 404
    with _signed_in(world, "clinician") as (own, csrf):
        page = own.get(f"/ui/viewer/{CT.study_uid}")
        assert page.status_code == 200 and 'src="/ui-static/viewer.js"' in page.text
        assert "unsafe-inline" not in page.headers["content-security-policy"]
        assert own.post("/ui/viewer-token", json={"study": CT.study_uid}).status_code == 403  # no CSRF token
        assert own.post("/ui/viewer-token", json={"study": CT.study_uid},
                        headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"}).status_code == 403
        handed = own.post("/ui/viewer-token", json={"study": CT.study_uid}, headers={"X-CSRF-Token": csrf})
        assert handed.status_code == 200 and handed.headers["cache-control"] == "no-store"
        assert handed.json()["token"] == own.cookies["pacs_session"] and handed.json()["expires"] > 0
        # where OHIF sends a user whose token ended: only viewer pages of this site
        back = own.get("/ui/viewer", params={"next": "https://evil.example/ohif/"})
        assert back.status_code == 200 and 'data-target="/ohif/"' in back.text
        back = own.get("/ui/viewer", params={"next": f"/ohif/viewer?StudyInstanceUIDs={CT.study_uid}"})
        assert f'data-target="/ohif/viewer?StudyInstanceUIDs={quote(CT.study_uid)}"' in back.text
