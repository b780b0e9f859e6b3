"""Share links (issue 14, must-show 1 and 2): made, listed and revoked over the API; opened without login at
/s/{token}; expiry, revocation, the birth-date check and its lock; scopes; a link for study A never shows study B;
guessing is throttled; the token is in no log line and no audit row.

The app runs in process (TestClient) on a real SQLite database and file store; each test talks from its own
client address, so the per-address throttle of one test never answers another's requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import delete, event, select, update

from pacs.consults.service import request_consult
from pacs.db.models import AuditEvent
from pacs.errors import InvalidInput, NotFound
from pacs.ingest import Ingestor, IngestSource
from pacs.reports import lifecycle
from pacs.reports.models import KeyImageSelection
from pacs.security.access import Forbidden
from pacs.security.redaction import RedactingLogFilter
from pacs.security.roles import Role
from pacs.sharing import content
from pacs.sharing.links import (
    BirthDateRequired,
    LinkGone,
    LinkNotFound,
    ShareScope,
    WrongBirthDate,
    check_birth_date_cookie,
    create_link,
    hash_token,
    list_links,
    normalize_birth_date,
    open_link,
    revoke_link,
)
from pacs.sharing.models import ShareLink
from pacs.sharing.throttle import ShareThrottle, Throttled
from tests.support.datasets import make_dataset, to_bytes
from tests.support.share_world import FINDINGS, IMPRESSION, PATIENT_A_SHOWN, ShareWorld, share_world
from viewer_api.app import create_app


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShareWorld]:
    with share_world(tmp_path_factory.mktemp("share")) as made:
        yield made


_address = iter(range(1, 250))


@pytest.fixture()
def client(world: ShareWorld) -> Iterator[TestClient]:
    """A client from an address of its own (the throttle counts per address)."""
    with TestClient(create_app(world.ctx), client=(f"10.1.0.{next(_address)}", 40000),
                    follow_redirects=False) as made:
        yield made


def _auth(world: ShareWorld, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.tokens[who]}"}


def _make(client: TestClient, world: ShareWorld, scope: str = "report", who: str = "rad-a", **extra: object
          ) -> tuple[int, str]:
    """A new link to study A: (id, path /s/{token})."""
    response = client.post(f"/api/studies/{world.a.uid}/shares", json={"scope": scope, **extra},
                           headers=_auth(world, who))
    assert response.status_code == 201, response.text
    body = response.json()
    return body["id"], "/s/" + body["url"].split("/s/", 1)[1]


def _listed(client: TestClient, world: ShareWorld, link_id: int, who: str = "rad-a") -> dict | None:
    response = client.get("/api/shares", headers=_auth(world, who))
    assert response.status_code == 200, response.text
    return next((link for link in response.json() if link["id"] == link_id), None)


def _b_markers(world: ShareWorld) -> list[str]:
    return [world.b.uid, world.b.series, *world.b.sops, world.b.patient_id, "Trần", "Bích", "Phổi B"]


# -- the API --------------------------------------------------------------------------------------------


def test_create_list_and_revoke_over_the_api(world: ShareWorld, client: TestClient) -> None:
    created = client.post(f"/api/studies/{world.a.uid}/shares", json={"scope": "report", "expires_in_days": 7},
                          headers=_auth(world, "clin-a"))
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) >= {"id", "url", "expires_at"} and body["scope"] == "report"
    token = body["url"].split("/s/", 1)[1]
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", token)  # 192 random bits
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(days=6, hours=23) < expires - datetime.now(UTC) <= timedelta(days=7)
    with world.ctx.read_sessions() as session:
        row = session.get(ShareLink, body["id"])
        assert row is not None and row.token_sha256 == hash_token(token) and token not in row.token_sha256

    # refusals: no capability, another facility's study, bad scope / expiry, no token at all
    assert client.post(f"/api/studies/{world.a.uid}/shares", json={"scope": "report"},
                       headers=_auth(world, "tech-a")).status_code == 403
    assert client.post(f"/api/studies/{world.a.uid}/shares", json={"scope": "report"},
                       headers=_auth(world, "rad-b")).status_code == 404
    for bad in ({"scope": "everything"}, {"scope": "report", "expires_in_days": 0},
                {"scope": "report", "expires_in_days": 366}, {}):
        response = client.post(f"/api/studies/{world.a.uid}/shares", json=bad, headers=_auth(world, "rad-a"))
        assert response.status_code == 400 and set(response.json()) == {"code", "message"}, (bad, response.text)
    assert client.post(f"/api/studies/{world.a.uid}/shares", json={"scope": "report"}).status_code == 401
    assert client.get("/api/shares").status_code == 401

    # listed for the creator's facility (and admins), never with the token; not for another facility
    listed = _listed(client, world, body["id"])
    assert listed is not None and listed["state"] == "active" and listed["created_by"] == "token:clin-a"
    assert listed["open_count"] == 0 and listed["failed_attempts"] == 0
    assert token not in client.get("/api/shares", headers=_auth(world, "rad-a")).text
    assert _listed(client, world, body["id"], "admin") is not None
    assert _listed(client, world, body["id"], "rad-b") is None

    # revocation: not by another facility (404), by a colleague of the creator's facility (204)
    assert client.delete(f"/api/shares/{body['id']}", headers=_auth(world, "rad-b")).status_code == 404
    assert client.delete(f"/api/shares/{body['id']}", headers=_auth(world, "tech-a")).status_code == 403
    assert client.delete(f"/api/shares/{body['id']}", headers=_auth(world, "rad-a2")).status_code == 204
    listed = _listed(client, world, body["id"])
    assert listed is not None and listed["state"] == "revoked" and listed["revoked_by"] == "token:rad-a2"
    assert client.get(f"/s/{token}").status_code == 410
    assert client.delete("/api/shares/99999", headers=_auth(world, "rad-a")).status_code == 404


def test_service_level_rules(world: ShareWorld) -> None:
    """create_link/list_links/revoke_link/open_link directly: capability, scope, expiry bounds, the lock."""
    rad_a = world.principal("rad-a", Role.RADIOLOGIST, "HOSP-A")
    tech_a = world.principal("tech-a", Role.TECHNOLOGIST, "HOSP-A")
    rad_b = world.principal("rad-b", Role.RADIOLOGIST, "HOSP-B")
    throttle = ShareThrottle(1000)
    with world.ctx.sessions() as session, session.begin():
        with pytest.raises(Forbidden):
            create_link(session, tech_a, world.a.uid, scope=ShareScope.REPORT, expires_in_days=1,
                        birth_date_check=False, base_url="https://pacs.example")
        with pytest.raises(NotFound):
            create_link(session, rad_b, world.a.uid, scope=ShareScope.REPORT, expires_in_days=1,
                        birth_date_check=False, base_url="https://pacs.example")
        with pytest.raises(InvalidInput):
            create_link(session, rad_a, world.a.uid, scope=ShareScope.REPORT, expires_in_days=400,
                        birth_date_check=False, base_url="https://pacs.example")
        made = create_link(session, rad_a, world.a.uid, scope=ShareScope.REPORT, expires_in_days=30,
                           birth_date_check=True, base_url="https://pacs.example/")
    assert made.url == f"https://pacs.example/s/{made.token}"
    settings = world.ctx.settings
    with world.ctx.sessions() as session:
        with pytest.raises(BirthDateRequired):
            open_link(session, made.token, address="10.2.0.1", settings=settings, throttle=throttle)
        with pytest.raises(WrongBirthDate) as wrong:
            open_link(session, made.token, address="10.2.0.1", birth_date="01/01/1990", settings=settings,
                      throttle=throttle)
        assert wrong.value.remaining == settings.share_link_max_failures - 1
        opened = open_link(session, made.token, address="10.2.0.1", birth_date="1965-04-15", settings=settings,
                           throttle=throttle)
        assert opened.study_instance_uid == world.a.uid and opened.facility_name == "Bệnh viện Đa khoa Tỉnh"
        assert opened.principal.scope.study_uids == frozenset({world.a.uid})
        with pytest.raises(LinkNotFound):
            open_link(session, "x" * 32, address="10.2.0.1", settings=settings, throttle=throttle)
    with world.ctx.read_sessions() as session:
        info = next(i for i in list_links(session, rad_a) if i.id == made.id)
        # the wrong date stays counted (the right one only gives its own attempt back): no reset
        assert info.failed_attempts == 1 and info.open_count == 1
        assert all(i.created_by_facility == "HOSP-B" for i in list_links(session, rad_b))
    with world.ctx.sessions() as session, session.begin():
        assert revoke_link(session, rad_a, made.id).state == "revoked"
    with world.ctx.sessions() as session, pytest.raises(LinkGone):
        open_link(session, made.token, address="10.2.0.1", birth_date="15/04/1965", settings=settings,
                  throttle=throttle)
    assert normalize_birth_date("15.04.1965") == normalize_birth_date("19650415") == "19650415"
    assert normalize_birth_date("31/02/1965") is None and normalize_birth_date("1965") is None


# -- opening --------------------------------------------------------------------------------------------


def test_a_link_opens_the_report_without_login(world: ShareWorld, client: TestClient) -> None:
    link_id, path = _make(client, world, "report")
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for shown in (PATIENT_A_SHOWN, IMPRESSION, FINDINGS.split("\n")[0], "Bệnh viện Đa khoa Tỉnh", "CT bụng",
                  "05/12/2026", "Tải kết quả (PDF)"):
        assert shown in text, shown
    assert 'lang="vi"' in text and "<script" not in text
    headers = page.headers
    assert headers["cache-control"] == "no-store" and headers["referrer-policy"] == "no-referrer"
    assert "noindex" in headers["x-robots-tag"]
    csp = headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    english = client.get(path, params={"lang": "en"})
    assert english.status_code == 200 and "Impression" in english.text and 'lang="en"' in english.text
    assert IMPRESSION in english.text  # the report's own words are never translated
    assert "Download the report" in client.get(path, headers={"Accept-Language": "en-GB,en;q=0.9"}).text
    assert "Tải kết quả" in client.get(path, headers={"Accept-Language": "fr-FR"}).text  # default vi
    css = client.get("/share-static/share.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")

    pdf = client.get(f"{path}/report.pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    words = subprocess.run(["pdftotext", "-", "-"], input=pdf.content, capture_output=True, check=True).stdout
    assert "Nguyễn" in words.decode("utf-8") and IMPRESSION in " ".join(words.decode("utf-8").split())
    assert client.get(f"{path}/report.pdf", params={"n": 2}).status_code == 404

    # scope "report": no images, no viewer
    assert client.get(f"{path}/images/1.jpg").status_code == 404
    assert client.get(f"{path}/viewer").status_code == 404
    assert "/images/" not in text and "/viewer" not in text
    listed = _listed(client, world, link_id)
    assert listed is not None and listed["open_count"] == 4 and listed["last_opened_at"]  # the page, 4 times


def test_expired_revoked_and_unknown_links(world: ShareWorld, client: TestClient) -> None:
    link_id, path = _make(client, world, "report", expires_in_days=1)
    assert client.get(path).status_code == 200
    with world.ctx.sessions() as session, session.begin():
        session.execute(update(ShareLink).where(ShareLink.id == link_id)
                        .values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    gone = client.get(path)
    assert gone.status_code == 410 and "Liên kết này đã hết hạn." in gone.text
    assert gone.headers["content-type"].startswith("text/html") and PATIENT_A_SHOWN not in gone.text
    assert "This link has expired." in client.get(path, params={"lang": "en"}).text
    for sub in ("/report.pdf", "/images/1.jpg", "/viewer"):
        assert client.get(path + sub).status_code == 410
    assert _listed(client, world, link_id)["state"] == "expired"  # type: ignore[index]

    revoked_id, revoked = _make(client, world, "report+key-images")
    assert client.delete(f"/api/shares/{revoked_id}", headers=_auth(world, "rad-a")).status_code == 204
    page = client.get(revoked)
    assert page.status_code == 410 and "thu hồi" in page.text
    assert client.get(revoked + "/images/1.jpg").status_code == 410

    for unknown in ("/s/" + secrets.token_urlsafe(24), "/s/short", "/s/" + "a" * 5000, "/s/%00%2e%2e",
                    "/s/" + secrets.token_urlsafe(24) + "/images/1.jpg"):
        response = client.get(unknown)
        assert response.status_code == 404, unknown
        assert "Không tìm thấy liên kết" in response.text


def test_birth_date_check_wrong_refused_five_lock_right_opens(world: ShareWorld, client: TestClient) -> None:
    link_id, path = _make(client, world, "report", birth_date_check=True)
    form = client.get(path)
    assert form.status_code == 200 and 'name="birth_date"' in form.text
    assert PATIENT_A_SHOWN not in form.text and IMPRESSION not in form.text and "Bệnh viện" not in form.text
    redirect = client.get(f"{path}/report.pdf")  # sub-routes need the confirmed date too
    assert redirect.status_code == 303 and redirect.headers["location"].startswith(path)
    assert client.post(path, data={"birth_date": "not a date"}).status_code == 400
    for attempt in range(1, 5):
        wrong = client.post(path, data={"birth_date": f"0{attempt}/01/1990"})
        assert wrong.status_code == 403 and f"Còn {5 - attempt} lần thử" in wrong.text
        assert PATIENT_A_SHOWN not in wrong.text
        assert _listed(client, world, link_id)["failed_attempts"] == attempt  # type: ignore[index]
    locked = client.post(path, data={"birth_date": "05/01/1990", "lang": "en"})
    assert locked.status_code == 423 and "locked" in locked.text
    listed = _listed(client, world, link_id)
    assert listed is not None and listed["state"] == "locked" and listed["locked_at"]
    assert listed["failed_attempts"] == 5
    assert client.post(path, data={"birth_date": "15/04/1965"}).status_code == 423  # the right date: still locked
    assert client.get(path).status_code == 423

    _, fresh = _make(client, world, "report", birth_date_check=True)
    confirmed = client.post(fresh, data={"birth_date": "15/04/1965"})
    assert confirmed.status_code == 303
    cookie = confirmed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert f"Path={fresh}" in cookie
    page = client.get(fresh)
    assert page.status_code == 200 and PATIENT_A_SHOWN in page.text and IMPRESSION in page.text
    assert client.get(f"{fresh}/report.pdf").status_code == 200
    with TestClient(create_app(world.ctx), client=("10.1.1.1", 1), follow_redirects=False) as other:
        assert 'name="birth_date"' in other.get(fresh).text  # another browser must answer again
        other.cookies.set("pacs_share", "9999999999.forged", path=fresh)
        assert 'name="birth_date"' in other.get(fresh).text


def test_key_images_scope_shows_phone_sized_jpegs_cached(world: ShareWorld, client: TestClient) -> None:
    _, path = _make(client, world, "report+key-images")
    page = client.get(path)
    assert page.status_code == 200
    sources = re.findall(r'<img src="([^"]+)"', page.text)
    assert sources == [f"{path}/images/1.jpg", f"{path}/images/2.jpg"]  # the token and an index, nothing else
    first = client.get(sources[0])
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "JPEG" and max(image.size) <= 800
    cached = len(content.SHARE_IMAGE_CACHE)
    again = client.get(sources[0])
    assert again.content == first.content and len(content.SHARE_IMAGE_CACHE) == cached  # served from the cache
    assert client.get(sources[1]).status_code == 200
    for missing in ("/images/3.jpg", "/images/0.jpg", "/images/x.jpg", "/viewer"):
        assert client.get(path + missing).status_code == 404, missing


def test_study_scope_opens_the_viewer_for_that_study_only(world: ShareWorld, client: TestClient) -> None:
    link_id, path = _make(client, world, "study")
    page = client.get(path)
    assert page.status_code == 200 and f'href="{path}/viewer"' in page.text
    handoff = client.get(f"{path}/viewer")
    assert handoff.status_code == 200 and '<script src="/share-static/viewer.js">' in handoff.text
    assert "unsafe-inline" not in handoff.headers["content-security-policy"]
    session_token = re.search(r'data-token="([^"]+)"', handoff.text).group(1)  # type: ignore[union-attr]
    assert f"/ohif/viewer?StudyInstanceUIDs={world.a.uid}" in handoff.text
    assert 'data-token-key="pacs.ohif.token"' in handoff.text
    assert client.get("/share-static/viewer.js").status_code == 200
    claims = jwt.decode(session_token, options={"verify_signature": False})
    assert claims["sub"] == f"share:{link_id}" and claims["exp"] - time.time() <= 1800 + 5

    bearer = {"Authorization": f"Bearer {session_token}"}
    studies = client.get("/dicom-web/studies", headers=bearer)
    assert studies.status_code == 200 and world.a.uid in studies.text and world.b.uid not in studies.text
    searched = client.get("/dicom-web/studies", params={"StudyInstanceUID": world.b.uid}, headers=bearer)
    assert searched.status_code in (200, 204) and world.b.uid not in searched.text
    assert client.get("/dicom-web/studies", params={"PatientName": "*"}, headers=bearer).text.count(
        world.b.uid) == 0
    assert client.get(f"/dicom-web/studies/{world.a.uid}/metadata", headers=bearer).status_code == 200
    assert client.get(f"/dicom-web/studies/{world.b.uid}/metadata", headers=bearer).status_code == 404
    assert client.get(f"/dicom-web/studies/{world.b.uid}/series/{world.b.series}/instances/{world.b.sops[0]}",
                      headers=bearer).status_code == 404
    assert client.get(f"/api/studies/{world.b.uid}/reports", headers=bearer).status_code == 404
    assert client.post(f"/api/studies/{world.a.uid}/shares", json={"scope": "report"},
                       headers=bearer).status_code == 403  # a link cannot make links

    assert client.delete(f"/api/shares/{link_id}", headers=_auth(world, "rad-a")).status_code == 204
    assert client.get(f"/dicom-web/studies/{world.a.uid}/metadata", headers=bearer).status_code == 401
    assert client.get(f"{path}/viewer").status_code == 410


def test_a_link_for_study_a_never_reveals_study_b(world: ShareWorld, client: TestClient) -> None:
    """Every response a link of each scope gives (pages, PDF text, images, viewer hand-off, DICOMweb with its
    viewer session, including searches for B) carries nothing of study B."""
    markers = _b_markers(world)
    bodies: list[str] = []
    for scope in ("report", "report+key-images", "study"):
        _, path = _make(client, world, scope)
        for sub in ("", "?lang=en", "/report.pdf", "/images/1.jpg", "/images/2.jpg", "/viewer"):
            response = client.get(path + sub)
            if response.headers.get("content-type") == "application/pdf":
                bodies.append(subprocess.run(["pdftotext", "-", "-"], input=response.content, capture_output=True,
                                             check=True).stdout.decode("utf-8"))
            else:
                bodies.append(response.content.decode("utf-8", "replace"))
            bodies.append(str(response.headers))
        if scope == "study":
            token = re.search(r'data-token="([^"]+)"', client.get(f"{path}/viewer").text).group(1)  # type: ignore[union-attr]
            bearer = {"Authorization": f"Bearer {token}"}
            for url, params in (("/dicom-web/studies", {"PatientName": "*"}), ("/dicom-web/studies",
                                                                               {"PatientID": world.b.patient_id}),
                                ("/dicom-web/studies", {"includefield": "all"}),
                                (f"/dicom-web/studies/{world.a.uid}/series", {}),
                                (f"/dicom-web/studies/{world.b.uid}/series", {}),
                                (f"/dicom-web/studies/{world.b.uid}/metadata", {}),
                                ("/wado", {"requestType": "WADO", "studyUID": world.b.uid,
                                           "seriesUID": world.b.series, "objectUID": world.b.sops[0]}),
                                (f"/api/studies/{world.b.uid}/reports", {}),
                                ("/fhir/ImagingStudy", {"patient.identifier": world.b.patient_id})):
                response = client.get(url, params=params, headers=bearer)
                assert response.status_code < 500, (url, response.status_code)
                if response.status_code < 300:  # an error may echo the UID the request named: no leak
                    bodies.append(response.text)
                else:
                    assert response.status_code in (400, 403, 404), (url, response.status_code)
    everything = "\n".join(bodies)
    assert PATIENT_A_SHOWN in everything  # not vacuous
    leaked = [m for m in markers if m in everything]
    assert leaked == []


# -- guessing, logs and the audit trail -----------------------------------------------------------------


def test_ten_thousand_random_tokens_get_no_200_and_are_throttled(world: ShareWorld) -> None:
    """One address guesses 10,000 tokens (over HTTP, in process): the first failures get 404, then 429 without
    any database work; each failure and the first refusal of a minute are audited, none with a token."""
    limit = world.ctx.settings.share_open_failures_per_minute
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    with world.ctx.read_sessions() as session:
        audit_rows_before = max(session.scalars(select(AuditEvent.id)), default=0)
    app = create_app(world.ctx)
    statuses: list[int] = []

    async def guess() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("10.9.9.9", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as guesser:
            for i in range(10_000):
                if i == limit + 1:  # the throttle holds now: watch the database for a while
                    event.listen(world.ctx.engine, "before_cursor_execute", count)
                elif i == limit + 501:
                    event.remove(world.ctx.engine, "before_cursor_execute", count)
                statuses.append((await guesser.get(f"/s/{secrets.token_urlsafe(24)}")).status_code)
            return await guesser.get(f"/s/{secrets.token_urlsafe(24)}")

    started = time.monotonic()
    throttled = asyncio.run(guess())
    elapsed = time.monotonic() - started
    windows = int(elapsed // 60) + 1  # the limit is per sliding minute: a slow machine gets a new allowance
    assert 200 not in statuses and set(statuses) == {404, 429}
    assert statuses[:limit] == [404] * limit and statuses[limit] == 429
    assert limit <= statuses.count(404) <= limit * windows
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert "Quá nhiều lần thử" in throttled.text
    assert statements == []  # a throttled request does no database work
    with world.ctx.read_sessions() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.id > audit_rows_before)))
    assert 1 <= len(rows) - statuses.count(404) <= windows  # each failure, then one row per minute of refusals
    assert {r.actor for r in rows} == {"share:unknown"} and {r.outcome for r in rows} == {"failure"}
    assert elapsed < 120, f"{elapsed:.1f} s"
    with TestClient(app, client=("10.9.9.10", 1)) as neighbour:  # another address is not held back
        assert neighbour.get(f"/s/{secrets.token_urlsafe(24)}").status_code == 404


def test_the_throttle_also_counts_wrong_birth_dates(world: ShareWorld) -> None:
    throttle = ShareThrottle(3)
    rad_a = world.principal("rad-a", Role.RADIOLOGIST, "HOSP-A")
    with world.ctx.sessions() as session, session.begin():
        links = [create_link(session, rad_a, world.a.uid, scope=ShareScope.REPORT, expires_in_days=1,
                             birth_date_check=True, base_url="http://x") for _ in range(3)]
    with world.ctx.sessions() as session:
        for made in links:  # one wrong date on each of three links: the address has used up its failures
            with pytest.raises(WrongBirthDate):
                open_link(session, made.token, address="10.3.0.1", birth_date="01/01/2000",
                          settings=world.ctx.settings, throttle=throttle)
        with pytest.raises(Throttled):
            open_link(session, links[0].token, address="10.3.0.1", birth_date="15/04/1965",
                      settings=world.ctx.settings, throttle=throttle)
        assert open_link(session, links[0].token, address="10.3.0.2", birth_date="15/04/1965",
                         settings=world.ctx.settings, throttle=throttle).study_instance_uid == world.a.uid


def test_tokens_are_never_logged_or_audited_in_clear(world: ShareWorld, client: TestClient,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tokens: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for scope, check in (("report", False), ("study", True)):
            link_id, path = _make(client, world, scope, birth_date_check=check)
            tokens.append(path.rsplit("/", 1)[1])
            client.post(path, data={"birth_date": "01/01/1999"})
            client.post(path, data={"birth_date": "15/04/1965"})
            for sub in ("", "/report.pdf", "/images/1.jpg", "/viewer"):
                client.get(path + sub)
            client.delete(f"/api/shares/{link_id}", headers=_auth(world, "rad-a"))
            client.get(path)
    logged = caplog.text
    with world.ctx.read_sessions() as session:
        trail = "\n".join(" ".join((e.actor, e.role, e.action, e.outcome, e.source_address, e.patient_id,
                                    e.study_instance_uid, e.detail)) for e in session.scalars(select(AuditEvent)))
    for token in tokens:
        assert token not in logged and token not in trail
        assert hash_token(token) not in trail
    assert "share.open" in trail and "share.viewer" in trail and "share.pdf" in trail and "share.revoke" in trail

    # uvicorn's access log line goes through the redacting filter: /s/<token> prints as /s/<redacted>
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("10.0.0.1:5000", "GET", f"/s/{tokens[0]}/images/1.jpg?lang=vi", "1.1", 200), None)
    assert RedactingLogFilter().filter(record)
    line = record.getMessage()
    assert tokens[0] not in line and "/s/<redacted>/images/1.jpg?lang=vi" in line


def test_share_routes_are_public_and_documented(world: ShareWorld, client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/s/{token}", "/s/{token}/report.pdf", "/s/{token}/images/{n}.jpg", "/s/{token}/viewer",
                 "/api/studies/{study}/shares", "/api/shares", "/api/shares/{link_id}"):
        assert path in paths, path
    assert "security" not in paths["/s/{token}"]["get"]
    assert paths["/api/shares"]["get"]["security"] == [{"bearer": ["share.create"]}]


def test_a_consult_link_shows_the_question_and_links_the_consult_page(world: ShareWorld,
                                                                       client: TestClient) -> None:
    rad_a = world.principal("rad-a", Role.RADIOLOGIST, "HOSP-A")
    made = request_consult(world.ctx, rad_a, world.a.uid, question="Xin ý kiến: tổn thương gan hạ phân thùy VI?",
                           external=True, base_url="http://testserver")
    assert made.link_url is not None
    path = "/s/" + made.link_url.split("/s/", 1)[1]
    page = client.get(path)
    assert page.status_code == 200, page.text
    assert "Xin ý kiến: tổn thương gan hạ phân thùy VI?" in page.text and "Yêu cầu hội chẩn" in page.text
    assert f'href="{path}/consult?lang=vi"' in page.text and f'href="{path}/viewer"' in page.text
    listed = [link for link in client.get("/api/shares", headers=_auth(world, "rad-a")).json()
              if link["purpose"] == "consult"]
    assert [(link["scope"], link["consult_id"]) for link in listed] == [("study", made.consult.id)]


def test_only_signed_text_is_shown_never_a_draft(world: ShareWorld, client: TestClient) -> None:
    """A study whose only report is a draft says "no report yet"; an amendment in draft leaves the signed
    version on the page, and its signed amendment replaces it."""
    rad = world.principal("rad-c", Role.RADIOLOGIST, "HOSP-A")
    ds = make_dataset(PatientName="Lê^Văn Cường", PatientID="PAT-C", PatientBirthDate="19800101")
    assert Ingestor(world.ctx.sessions, world.ctx.store).ingest(to_bytes(ds), IngestSource("import",
                                                                                            facility="HOSP-A")).ok
    with world.ctx.sessions() as session, session.begin():
        report = lifecycle.create_draft(session, rad, ds.StudyInstanceUID, "Bản nháp chưa ký", "Nháp", "vi")
    made = client.post(f"/api/studies/{ds.StudyInstanceUID}/shares", json={"scope": "report"},
                       headers=_auth(world, "rad-a"))
    assert made.status_code == 201, made.text
    path = "/s/" + made.json()["url"].split("/s/", 1)[1]
    page = client.get(path)
    assert page.status_code == 200 and "Chưa có kết quả" in page.text and "Lê Văn Cường" in page.text
    assert "Bản nháp" not in page.text and "Nháp" not in page.text
    assert client.get(f"{path}/report.pdf").status_code == 404
    assert "No report yet" in client.get(path, params={"lang": "en"}).text

    with world.ctx.sessions() as session, session.begin():
        lifecycle.sign(session, rad, report.id)
    with world.ctx.sessions() as session, session.begin():
        lifecycle.amend(session, rad, report.id, "sai chính tả", "Đã sửa nhưng chưa ký", "Sửa")
    page = client.get(path)
    assert "Bản nháp chưa ký" in page.text and "Đã sửa nhưng chưa ký" not in page.text
    with world.ctx.sessions() as session, session.begin():
        lifecycle.sign(session, rad, report.id)
    page = client.get(path)
    assert "Đã sửa nhưng chưa ký" in page.text and "Bản nháp chưa ký" not in page.text
    assert "Kết quả đã sửa đổi" in page.text and "sai chính tả" in page.text


# -- the security review's cases ------------------------------------------------------------------------


def test_parallel_wrong_birth_dates_lock_at_the_limit_and_nothing_opens_after(world: ShareWorld) -> None:
    """Ten wrong dates posted at once compare at most ``limit`` of them (the attempt is reserved before the
    comparison): the link ends locked with failed_attempts == limit, and a burst after the limit that holds the
    right date gets no success."""
    limit = world.ctx.settings.share_link_max_failures
    app = create_app(world.ctx)
    with TestClient(app, client=("10.4.0.1", 1), follow_redirects=False) as maker:
        link_id, path = _make(maker, world, "report", birth_date_check=True)

    async def burst(dates: list[str]) -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("10.4.0.2", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as guesser:
            answers = await asyncio.gather(*(guesser.post(path, data={"birth_date": d}) for d in dates))
        return [a.status_code for a in answers]

    wrong = asyncio.run(burst([f"{day:02d}/01/1990" for day in range(1, 11)]))
    # exactly ``limit`` dates were compared (limit - 1 answered "tries left", one locked it); the rest refused
    assert sorted(wrong) == [403] * (limit - 1) + [423] * (10 - limit + 1), wrong
    with world.ctx.read_sessions() as session:
        row = session.get(ShareLink, link_id)
        assert row is not None and row.failed_attempts == limit and row.locked_at is not None
    after = asyncio.run(burst(["01/02/1990", "15/04/1965", "02/02/1990", "15/04/1965"]))
    assert after == [423] * 4  # the right date included: no success after the limit
    with world.ctx.read_sessions() as session:
        row = session.get(ShareLink, link_id)
        assert row is not None and row.failed_attempts == limit and row.open_count == 0


def test_a_right_date_cookie_or_sub_route_never_resets_the_count(world: ShareWorld, client: TestClient) -> None:
    link_id, path = _make(client, world, "report", birth_date_check=True)
    for day in (1, 2):
        assert client.post(path, data={"birth_date": f"0{day}/01/1990"}).status_code == 403
    assert _listed(client, world, link_id)["failed_attempts"] == 2  # type: ignore[index]
    assert client.post(path, data={"birth_date": "15/04/1965"}).status_code == 303  # gives its own attempt back
    assert _listed(client, world, link_id)["failed_attempts"] == 2  # type: ignore[index]
    for sub in ("", "/report.pdf", ""):  # opens with the cookie, and a sub-route
        assert client.get(path + sub).status_code == 200
    listed = _listed(client, world, link_id)
    assert listed is not None and listed["failed_attempts"] == 2 and listed["open_count"] == 2
    client.cookies.clear()  # another browser, without the cookie
    for day in (3, 4, 5):  # the wrong dates left: the attacker's count was never wiped
        client.post(path, data={"birth_date": f"0{day}/01/1990"})
    assert _listed(client, world, link_id)["state"] == "locked"  # type: ignore[index]


def test_throttle_key_ipv4_ipv6_64_and_no_port() -> None:
    key = ShareThrottle.key
    assert key("192.0.2.7") == "192.0.2.7" and key("192.0.2.7") != key("192.0.2.8")
    assert key("2001:db8:1:2::1") == key("2001:db8:1:2:ffff:ffff:ffff:fffe") == "2001:db8:1:2::/64"
    assert key("2001:db8:1:2::1") != key("2001:db8:1:3::1")
    assert key("::ffff:192.0.2.7") == "192.0.2.7" and key("[2001:db8::1]") == key("2001:db8::2")
    assert key("::1") == "::/64" and key("testclient") == "testclient"


def test_a_burst_over_many_ports_and_ipv6_addresses_is_throttled(world: ShareWorld) -> None:
    """Every request comes from a new port (and, for IPv6, a new address of one /64): still one budget."""
    limit = world.ctx.settings.share_open_failures_per_minute
    app = create_app(world.ctx)

    async def guesses(hosts: list[str]) -> list[int]:
        statuses = []
        for i, host in enumerate(hosts):
            transport = httpx.ASGITransport(app=app, client=(host, 40000 + i))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as guesser:
                statuses.append((await guesser.get(f"/s/{secrets.token_urlsafe(24)}")).status_code)
        return statuses

    for hosts in (["10.5.0.1"] * (limit + 5), ["2001:db8:5:5::1"] * (limit + 5),
                  [f"2001:db8:5:6::{i:x}" for i in range(1, limit + 6)]):
        statuses = asyncio.run(guesses(hosts))
        assert statuses[:limit] == [404] * limit and set(statuses[limit:]) == {429}, (hosts[0], statuses)


def test_the_throttle_prunes_only_expired_counters() -> None:
    now = [0.0]
    throttle = ShareThrottle(2, window_s=60, clock=lambda: now[0])
    throttle.failed("10.6.0.1")
    throttle.failed("10.6.0.1")
    for i in range(10_050):  # more hosts than the pruning threshold, all live
        throttle.failed(f"10.7.{i // 250}.{i % 250}")
    with pytest.raises(Throttled):  # a live counter survives pruning
        throttle.check("10.6.0.1")
    assert throttle.tracked() == 10_051
    now[0] = 61.0
    for i in range(10_000):
        throttle.failed(f"10.8.{i // 250}.{i % 250}")
    assert throttle.tracked() <= 10_001  # the expired ones went: memory stays bounded
    throttle.check("10.6.0.1")  # expired: allowed again


def test_crafted_digits_in_cookie_form_token_or_image_number_are_refused_not_500(world: ShareWorld,
                                                                                 client: TestClient) -> None:
    """Digits that str.isdigit() takes but int() refuses ("²", the Arabic-Indic "١"): a 4xx or the form,
    never a 500."""
    for value in ("²²²²²²²²²².abc", "١١١١١١١١١١.abc", "9999999999²", ""):
        assert check_birth_date_cookie(b"k", "t" * 32, value) is False
    _, path = _make(client, world, "report+key-images", birth_date_check=True)
    crafted = [(b"cookie", "pacs_share=²²²²²²²²²².abc".encode("latin-1"))]  # a browser may send any byte
    for sub in ("", "/report.pdf", "/images/1.jpg"):
        response = client.get(path + sub, headers=crafted)
        assert response.status_code in (200, 303) and 'name="birth_date"' in (
            response.text if response.status_code == 200 else 'name="birth_date"'), (sub, response.status_code)
    _, open_path = _make(client, world, "report+key-images")
    for number in ("²", "١", "1²"):
        assert client.get(f"{open_path}/images/{number}.jpg").status_code == 404, number

    rad_a = world.principal("rad-a", Role.RADIOLOGIST, "HOSP-A")
    made = request_consult(world.ctx, rad_a, world.a.uid, question="Ý kiến?", external=True,
                           base_url="http://testserver")
    assert made.link_url is not None
    consult = "/s/" + made.link_url.split("/s/", 1)[1] + "/consult"
    assert client.get(consult).status_code == 200
    for csrf in ("²²²²²²²²²².abc", "١٧٠٠٠٠٠٠٠٠.abc", "²", "١"):
        response = client.post(consult, data={"name": "BS Hùng", "text": "Đồng ý", "csrf": csrf})
        assert response.status_code == 403, (csrf, response.status_code)


def test_a_hundred_opens_of_a_revoked_link_write_a_few_audit_rows_then_429(world: ShareWorld) -> None:
    limit = world.ctx.settings.share_open_failures_per_minute
    with TestClient(create_app(world.ctx), client=("10.9.1.1", 1), follow_redirects=False) as opener:
        link_id, path = _make(opener, world, "report")
        assert opener.delete(f"/api/shares/{link_id}", headers=_auth(world, "rad-a")).status_code == 204
        with world.ctx.read_sessions() as session:
            before = max(session.scalars(select(AuditEvent.id)), default=0)
        statuses = [opener.get(path + ("" if i % 3 else "/report.pdf")).status_code for i in range(100)]
    assert statuses[:limit] == [410] * limit and set(statuses[limit:]) == {429}
    with world.ctx.read_sessions() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.id > before)))
    assert 2 <= len(rows) <= 4, [(r.action, r.detail) for r in rows]  # the link's row per kind, the refusal
    assert any(f"link {link_id}: revoked" in r.detail for r in rows)
    assert any("throttled" in r.detail for r in rows)


def test_a_study_scope_link_gives_nothing_of_the_same_patients_other_study(world: ShareWorld,
                                                                          client: TestClient) -> None:
    """The realistic leak: the same patient's OTHER study at the same facility (OHIF looks studies up by
    PatientID). A study-scope viewer session gets nothing of it over QIDO, WADO, metadata or FHIR."""
    other_series = generate_uid()
    other = make_dataset(StudyInstanceUID=generate_uid(), SeriesInstanceUID=other_series,
                         SOPInstanceUID=generate_uid(), PatientID=world.a.patient_id, PatientName=world.a.patient_name,
                         PatientBirthDate="19650415", AccessionNumber="ACC-OTHER-A", StudyDescription="MRI sọ não")
    assert Ingestor(world.ctx.sessions, world.ctx.store).ingest(
        to_bytes(other), IngestSource("import", facility="HOSP-A")).ok
    markers = [other.StudyInstanceUID, other_series, other.SOPInstanceUID, "ACC-OTHER-A", "MRI sọ não"]
    _, path = _make(client, world, "study")
    token = re.search(r'data-token="([^"]+)"', client.get(f"{path}/viewer").text).group(1)  # type: ignore[union-attr]
    bearer = {"Authorization": f"Bearer {token}"}
    bodies: list[str] = []
    for url, params in (("/dicom-web/studies", {"PatientID": world.a.patient_id}),
                        ("/dicom-web/studies", {"PatientID": world.a.patient_id, "includefield": "all"}),
                        ("/dicom-web/studies", {"PatientName": "Nguy*"}),
                        ("/dicom-web/series", {"PatientID": world.a.patient_id}),
                        ("/dicom-web/instances", {"PatientID": world.a.patient_id}),
                        (f"/dicom-web/studies/{other.StudyInstanceUID}/metadata", {}),
                        (f"/dicom-web/studies/{other.StudyInstanceUID}/series", {}),
                        (f"/dicom-web/studies/{other.StudyInstanceUID}/series/{other_series}/instances/"
                         f"{other.SOPInstanceUID}", {}),
                        ("/wado", {"requestType": "WADO", "studyUID": other.StudyInstanceUID,
                                   "seriesUID": other_series, "objectUID": other.SOPInstanceUID}),
                        ("/fhir/ImagingStudy", {"patient.identifier": world.a.patient_id}),
                        (f"/fhir/ImagingStudy/{other.StudyInstanceUID}", {}),
                        ("/fhir/DiagnosticReport", {"patient.identifier": world.a.patient_id}),
                        (f"/api/studies/{other.StudyInstanceUID}/reports", {})):
        response = client.get(url, params=params, headers=bearer)
        assert response.status_code < 500, (url, response.status_code)
        if response.status_code < 300:
            bodies.append(response.text)
        else:
            assert response.status_code in (400, 403, 404), (url, response.status_code)
    everything = "\n".join(bodies)
    assert world.a.uid in everything  # not vacuous: the link's own study is found by PatientID
    assert [m for m in markers if m in everything] == []


def test_a_key_image_selection_naming_another_studys_image_serves_nothing_of_it(world: ShareWorld,
                                                                                client: TestClient) -> None:
    """A selection row of study A that names an instance of study B (inserted directly: the API refuses to
    make one) is not shown: the page keeps its two images and no number serves B's pixels."""
    with world.ctx.sessions() as session, session.begin():
        bogus = KeyImageSelection(study_instance_uid=world.a.uid, kos_sop_instance_uid=generate_uid(),
                                  kos_series_instance_uid=generate_uid(),
                                  instances_json=json.dumps([[world.b.series, world.b.sops[0]],
                                                             [world.a.series, world.b.sops[0]]]))
        session.add(bogus)
    try:
        _, path = _make(client, world, "report+key-images")
        page = client.get(path)
        assert page.status_code == 200
        assert re.findall(r'<img src="([^"]+)"', page.text) == [f"{path}/images/1.jpg", f"{path}/images/2.jpg"]
        b_image = client.get(f"/s/{path.rsplit('/', 1)[1]}/images/3.jpg")
        assert b_image.status_code == 404 and b_image.headers["content-type"].startswith("text/html")
        for n in (1, 2):
            assert client.get(f"{path}/images/{n}.jpg").headers["content-type"] == "image/jpeg"
    finally:
        with world.ctx.sessions() as session, session.begin():
            session.execute(delete(KeyImageSelection).where(KeyImageSelection.id == bogus.id))
