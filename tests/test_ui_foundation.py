"""The web pages' foundation (issue 16): sign-in, sign-out, language, sessions, CSRF, CSP, errors, accessibility.

Against a real `pacs serve` (tests/support/ui.py: one server, one Chromium for the module):

- the sign-in journey through the form in Vietnamese (the browser asks for vi) and, after switching with the
  header's language form, in English; the start page's screenshot shows the user and their menu; axe-core finds
  no serious or critical violation on the sign-in and start pages; Tab reaches the user name, password, sign-in
  button and the language switch; sign-out shows its message once;
- a wrong password gives the translated message; an EMR account is refused with a clear message (audited);
- pages need a session (GET → 303 to the sign-in page with ``next``); an expired token, a changed password or a
  disabled user sends the browser to the sign-in page saying the session ended;
- CSRF: sign-out and sign-in without the form token (or from another site) are refused with 403;
- ``next`` never leads to another site; the CSP of every page has no ``unsafe-inline``; a user name with
  ``<script>`` is shown as text; page URLs get HTML error pages, API URLs keep their JSON errors.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from sqlalchemy import select

from pacs.db.models import AuditEvent
from pacs.security.accounts import create_user, set_active, set_password
from pacs.security.authenticate import SESSION_AUDIENCE, SESSION_ISSUER, load_or_create_secret, password_fingerprint
from pacs.security.login_guard import unverified_actor
from pacs.security.models import User
from tests.support.ui import (
    PASSWORD,
    UiWorld,
    assert_clean,
    assert_keyboard_reachable,
    axe,
    choose_language,
    screenshot,
    sign_in,
    sign_out,
    ui_world,
)

pytestmark = pytest.mark.integration
__all__ = ["ui_world"]  # the module's fixture

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def _client(world: UiWorld, lang: str = "en") -> httpx.Client:
    return httpx.Client(base_url=world.base_url, follow_redirects=False, timeout=30,
                        headers={"Accept-Language": lang})


def _csrf(html: str) -> str:
    match = CSRF_FIELD.search(html)
    assert match, html[:1500]
    return match.group(1)


@contextmanager
def _signed_in(world: UiWorld, role: str = "radiologist") -> Iterator[tuple[httpx.Client, str]]:
    """An HTTP client with a page session of ``role`` (through the form) and the session's CSRF token."""
    with _client(world) as client:
        token = _csrf(client.get("/login").text)
        username, password = world.users[role]
        answer = client.post("/login", data={"username": username, "password": password, "csrf": token,
                                             "next": "/ui"})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui", answer.text[:1000]
        page = client.get("/ui")
        assert page.status_code == 200
        yield client, _csrf(page.text)


def _audit(world: UiWorld, action: str, actor: str) -> list[AuditEvent]:
    with world.server.ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                             AuditEvent.actor == actor)))


def test_sign_in_journey_in_vietnamese_then_english(ui_world: UiWorld) -> None:
    username, password = ui_world.users["radiologist"]
    with ui_world.browser_page("vi") as (page, log):
        page.goto(ui_world.base_url + "/ui")  # a page needs a session: the browser lands on the sign-in page
        assert urlsplit(page.url).path == "/login" and parse_qs(urlsplit(page.url).query)["next"] == ["/ui"]
        assert page.locator("html").get_attribute("lang") == "vi"
        assert page.locator("h1").inner_text() == "Đăng nhập"
        assert page.get_by_label("Tên đăng nhập").is_visible() and page.get_by_label("Mật khẩu").is_visible()
        assert axe(page) == []

        # the keyboard reaches the form and the language switch, and shows where it is
        assert_keyboard_reachable(page)
        # (the walk itself fails a field whose focus cannot be seen, and a button that a Tab trap keeps out of reach)
        page.evaluate("""() => {
          Object.assign(document.getElementById('username').style, {outline: 'none', boxShadow: 'none'});
          document.getElementById('password').addEventListener('keydown', (e) => {
            if (e.key === 'Tab') e.preventDefault(); });
        }""")
        with pytest.raises(AssertionError) as failed:
            assert_keyboard_reachable(page)
        assert re.search(r"never focused: \[.*button#sign-in", str(failed.value)), failed.value
        assert re.search(r"focus not visible: \['input#username", str(failed.value)), failed.value
        page.reload()

        page.locator("#username").fill(username)
        page.locator("#password").fill(password)
        with page.expect_navigation():
            page.keyboard.press("Enter")  # the form submits from the keyboard too
        assert urlsplit(page.url).path == "/ui", page.content()[:3000]  # back where the user was going
        header = page.locator("header").inner_text()
        assert "rad_a" in header and "Bác sĩ chẩn đoán hình ảnh" in header and "HOSP-A" in header
        assert "Danh sách đọc" in page.locator("nav").inner_text()
        assert "Quản trị" not in page.locator("nav").inner_text()  # the menu follows the role's capabilities
        screenshot(page, ui_world.screenshots / "home-vi.png", "Xin chào, rad_a", "Danh sách đọc", "Đăng xuất")
        assert axe(page) == []
        assert_keyboard_reachable(page)

        choose_language(page, "en")
        assert urlsplit(page.url).path == "/ui"
        assert page.locator("html").get_attribute("lang") == "en"
        screenshot(page, ui_world.screenshots / "home-en.png", "Welcome, rad_a", "Reading list", "Sign out")
        assert axe(page) == []

        sign_out(page)
        assert urlsplit(page.url).path == "/login"
        assert page.locator(".flashes").inner_text().strip() == "You have signed out."  # in the chosen language
        page.reload()
        assert page.locator(".flashes").inner_text().strip() == ""  # shown once
        page.goto(ui_world.base_url + "/ui")
        assert urlsplit(page.url).path == "/login"  # the session is gone
        assert_clean(log)
    assert _audit(ui_world, "auth.logout", username)
    assert any(e.outcome == "success" and "web pages" in e.detail for e in _audit(ui_world, "auth.login", username))


def test_wrong_password_and_accounts_without_pages(ui_world: UiWorld) -> None:
    username, _ = ui_world.users["clinician"]
    with ui_world.browser_page("en") as (page, _log):
        sign_in(page, ui_world.base_url, username, "not-the-password", expect_success=False, start="/ui")
        assert urlsplit(page.url).path == "/login"
        assert page.locator("html").get_attribute("lang") == "en"
        assert page.get_by_role("alert").inner_text() == "Wrong user name or password."
        assert page.locator("#username").input_value() == username  # kept; the password is not
        assert page.locator("#password").input_value() == ""
        assert axe(page) == []

        emr, emr_password = ui_world.users["emr"]
        sign_in(page, ui_world.base_url, emr, emr_password, expect_success=False, start="/ui")
        assert "This account cannot use the web pages" in page.get_by_role("alert").inner_text()
        assert all(c["name"] != "pacs_session" for c in page.context.cookies(ui_world.base_url))
    refused = _audit(ui_world, "auth.login", emr)
    assert refused and refused[-1].outcome == "failure" and "cannot sign in here" in refused[-1].detail
    assert any(e.outcome == "failure" for e in _audit(ui_world, "auth.login", unverified_actor(username)))

    with _client(ui_world, "vi") as client:
        token = _csrf(client.get("/login").text)
        answer = client.post("/login", data={"username": username, "password": "nope", "csrf": token})
        assert "Sai tên đăng nhập hoặc mật khẩu." in answer.text and 'lang="vi"' in answer.text


def test_pages_need_a_session(ui_world: UiWorld) -> None:
    with _client(ui_world) as client:
        front = client.get("/")
        assert front.status_code == 303 and front.headers["location"] == "/login"
        for path in ("/ui", "/ui/studies", "/ui/admin?x=1"):
            answer = client.get(path)
            if answer.status_code == 404:  # that area's pages are not installed in this checkout
                continue
            assert answer.status_code == 303, (path, answer.status_code)
            location = urlsplit(answer.headers["location"])
            assert location.path == "/login" and parse_qs(location.query)["next"] == [path]
        assert client.post("/ui", data={}).status_code in (401, 403, 405)
        # JSON callers (page scripts) get 401, not a redirect
        assert client.get("/ui", headers={"Accept": "application/json"}).status_code == 401


def test_home_by_role(ui_world: UiWorld) -> None:
    homes = {"admin": "/ui/admin", "radiologist": "/ui/reading", "technologist": "/ui/worklist",
             "clinician": "/ui/studies"}
    for role, home in homes.items():
        with _signed_in(ui_world, role) as (client, _token):
            location = client.get("/").headers["location"]
            assert location in (home, "/ui"), (role, location)  # /ui while that area is not installed
            signed_in_login = client.get("/login?next=/ui")
            assert signed_in_login.status_code == 303 and signed_in_login.headers["location"] == "/ui"
            if role == "clinician" and importlib.util.find_spec("viewer_api.ui.admin_pages") is not None:
                refused = client.get("/ui/admin")  # a page the role may not use: the 403 page, audited
                assert refused.status_code == 403 and "You may not open this page" in refused.text
                assert "unsafe-inline" not in refused.headers["content-security-policy"]
                denied = _audit(ui_world, "access.denied", ui_world.users["clinician"][0])
                assert any("/ui/admin" in event.detail for event in denied)


def _forged_session(world: UiWorld, username: str, *, expired: bool) -> str:
    secret = load_or_create_secret(world.server.ctx.settings)
    with world.server.ctx.sessions() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        uid, fingerprint = user.id, password_fingerprint(user.password_hash)
    now = datetime.now(UTC)
    issued = now - timedelta(hours=3) if expired else now
    return jwt.encode({"iss": SESSION_ISSUER, "aud": SESSION_AUDIENCE, "sub": username, "uid": uid,
                       "pwd": fingerprint, "iat": issued, "exp": issued + timedelta(hours=1)}, secret,
                      algorithm="HS256")


def test_expired_and_revoked_sessions_go_back_to_sign_in(ui_world: UiWorld) -> None:
    with ui_world.server.ctx.sessions.begin() as session:
        create_user(session, "rad_expiry", PASSWORD, "radiologist", facility="HOSP-A")
    expired = _forged_session(ui_world, "rad_expiry", expired=True)
    valid = _forged_session(ui_world, "rad_expiry", expired=False)
    with _client(ui_world) as client:
        client.cookies.set("pacs_session", valid)
        assert client.get("/ui").status_code == 200  # the forged-but-valid token works: the check below is fair
        client.cookies.set("pacs_session", expired)
        answer = client.get("/ui?q=1")
        assert answer.status_code == 303
        location = urlsplit(answer.headers["location"])
        assert location.path == "/login" and parse_qs(location.query) == {"next": ["/ui?q=1"], "expired": ["1"]}
        assert 'pacs_session=""' in answer.headers.get("set-cookie", "")  # the stale cookie is dropped

    with ui_world.browser_page("vi") as (page, _log):
        page.context.add_cookies([{"name": "pacs_session", "value": expired, "url": ui_world.base_url}])
        page.goto(ui_world.base_url + "/ui")
        assert urlsplit(page.url).path == "/login"
        assert "Phiên làm việc đã hết hạn" in page.get_by_role("alert").inner_text()
        assert axe(page) == []

    # a password change and a disabled account end a session at once, as they end an API session
    with _client(ui_world) as client:
        client.cookies.set("pacs_session", valid)
        with ui_world.server.ctx.sessions.begin() as session:
            set_password(session, "rad_expiry", PASSWORD + "-new")
        answer = client.get("/ui")
        assert answer.status_code == 303 and "expired=1" in answer.headers["location"]
    valid = _forged_session(ui_world, "rad_expiry", expired=False)
    with _client(ui_world) as client:
        client.cookies.set("pacs_session", valid)
        assert client.get("/ui").status_code == 200
        with ui_world.server.ctx.sessions.begin() as session:
            set_active(session, "rad_expiry", False)
        assert "expired=1" in client.get("/ui").headers["location"]


def test_csrf_is_required_for_every_form(ui_world: UiWorld) -> None:
    with _signed_in(ui_world) as (client, token):
        for data in ({}, {"csrf": "forged"}, {"csrf": token[:-2] + "xx"}):
            refused = client.post("/logout", data=data)
            assert refused.status_code == 403, data
            assert "text/html" in refused.headers["content-type"]
        assert client.get("/ui").status_code == 200  # still signed in
        # the right token from another site's page is refused too
        cross = client.post("/logout", data={"csrf": token}, headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert client.post("/lang", data={"lang": "vi", "next": "/ui"}).status_code == 403
        assert client.post("/lang", headers={"X-CSRF-Token": token}, data={"lang": "vi", "next": "/ui"}
                           ).status_code == 303  # the header works for page scripts
        answer = client.post("/logout", data={"csrf": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/login"
        assert client.get("/ui").status_code == 303

    # login CSRF: the sign-in form needs the token bound to this browser's nonce cookie
    username, password = ui_world.users["clinician"]
    with _client(ui_world) as attacker, _client(ui_world) as victim, _client(ui_world) as fresh:
        attacker_token = _csrf(attacker.get("/login").text)
        victim.get("/login")  # the victim has a nonce of its own
        for client, data in ((victim, {"csrf": attacker_token}), (victim, {}), (fresh, {"csrf": attacker_token})):
            refused = client.post("/login", data={"username": username, "password": password, **data})
            assert refused.status_code == 403 and "pacs_session" not in refused.headers.get("set-cookie", "")
        cross = attacker.post("/login", data={"username": username, "password": password, "csrf": attacker_token},
                              headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403


def test_next_never_leaves_the_site(ui_world: UiWorld) -> None:
    """``next`` (after sign-in, on the sign-in page when already signed in, after a language change) is followed
    only when it is a path of this site."""
    username, password = ui_world.users["clinician"]
    hostile = ("//evil.example", "https://evil.example/x", "/\\evil.example", "http:evil.example",
               "javascript:alert(1)", "//evil.example/%2e%2e", " //evil.example", "/\t/evil.example")
    with _client(ui_world) as client:
        token = _csrf(client.get("/login", params={"next": hostile[0]}).text)
        answer = client.post("/login", data={"username": username, "password": password, "csrf": token,
                                             "next": hostile[0]})
        assert answer.status_code == 303 and answer.headers["location"] in ("/ui", "/ui/studies")
        token = _csrf(client.get("/ui").text)
        for target in hostile:
            for location in (client.get("/login", params={"next": target}).headers["location"],
                             client.post("/lang", data={"lang": "en", "next": target, "csrf": token}
                                         ).headers["location"]):
                assert location.startswith("/") and not location.startswith(("//", "/\\")), (target, location)
                assert "evil" not in location, (target, location)
        # a path of this site is followed
        assert client.get("/login", params={"next": "/ui?x=1"}).headers["location"] == "/ui?x=1"
        assert client.post("/lang", data={"lang": "en", "next": "/ui", "csrf": token}).headers["location"] == "/ui"


def test_security_headers_escaping_and_error_pages(ui_world: UiWorld) -> None:
    with ui_world.server.ctx.sessions.begin() as session:
        create_user(session, "<script>alert(1)</script>", PASSWORD, "clinician", facility="<b>HOSP-A</b>")
    with _client(ui_world) as client:
        for path in ("/", "/login", "/ui", "/ui/no-such-page", "/ui-static/ui.css"):
            answer = client.get(path)
            csp = answer.headers.get("content-security-policy", "")
            if path == "/ui-static/ui.css":
                assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/css")
                continue
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, (path, csp)
            assert "script-src 'self'" in csp and "object-src 'none'" in csp, (path, csp)
        missing = client.get("/ui/no-such-page")
        assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
        assert "Page not found" in missing.text
        api = client.get("/api/no-such-route")
        assert api.status_code == 404 and api.json()["code"] == "not_found"  # the API keeps its JSON errors
        assert client.get("/ui-static/../app.py").status_code == 404

    with ui_world.browser_page("en") as (page, log):
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        sign_in(page, ui_world.base_url, "<script>alert(1)</script>", PASSWORD, start="/ui")
        assert "Welcome, <script>alert(1)</script>" in page.locator("h1").inner_text()
        assert "<b>HOSP-A</b>" in page.locator("header").inner_text()
        assert page.locator("main script").count() == 0 and dialogs == []
        assert_clean(log)
