"""Sign-in with the configured OIDC provider on the web pages (issue 16).

A real `pacs serve` configured with a tiny real provider on loopback (tests/support/oidc_provider.py: discovery,
JWKS, authorization with immediate consent, a token endpoint that checks the client, the code, the redirect URI and
the PKCE verifier). One server, one provider, one Chromium for the module:

- the journey: the sign-in page shows "Sign in with …"; pressing it lands on the role's start page signed in as
  the provider's user with the role and facility of its claims; ``auth.login`` is audited with that user; the
  session token is the provider's access token (resolved by the same Authenticator as a bearer token); sign-out
  goes on to the provider's end-session endpoint and back to the sign-in page;
- refusals (HTTP, no browser): a callback with another state, an ID token with another nonce or signed by another
  key, a code whose PKCE verifier does not match (refused by the provider), the provider refusing consent, the
  token endpoint down, a role without pages: each gives the sign-in page with a translated message, no session,
  and a failed ``auth.login`` row; ``next`` to another site is ignored while a local ``next`` is honoured;
- in-process: the state cookie cannot be forged or reused after it expires.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import jwt
import pytest
from sqlalchemy import select

from pacs.db.models import AuditEvent
from pacs.security.oidc_login import OidcLoginFailed, PendingLogin, code_challenge, seal, unseal
from tests.support.oidc_provider import OidcProvider
from tests.support.tiers import starts_servers
from tests.support.ui import UiWorld, assert_clean, axe, screenshot, sign_out, ui_world_of

CLIENT_ID, CLIENT_SECRET, AUDIENCE = "pacs-web", "web-client-secret-0123456789", "filmless-pacs-api"
PROVIDER_NAME = "Province SSO"
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')
RADIOLOGIST = {"sub": "f3a1c2d4-rad", "preferred_username": "dr.nguyen", "roles": ["radiologist"],
               "facility": "HOSP-A"}


@pytest.fixture(scope="module")
@starts_servers
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UiWorld, OidcProvider]]:
    provider = OidcProvider(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE)
    env = {"PACS_OIDC_ISSUER": provider.issuer, "PACS_OIDC_AUDIENCE": AUDIENCE, "PACS_OIDC_JWKS_URL": provider.jwks_url,
           "PACS_OIDC_CLIENT_ID": CLIENT_ID, "PACS_OIDC_CLIENT_SECRET": CLIENT_SECRET,
           "PACS_OIDC_PROVIDER_NAME": PROVIDER_NAME}
    try:
        with ui_world_of(tmp_path_factory.mktemp("ui-oidc"), env) as ui:
            provider.redirect_uris.add(ui.base_url + "/login/oidc/callback")
            yield ui, provider
    finally:
        provider.close()


def _reset(provider: OidcProvider) -> None:
    provider.user, provider.deny, provider.tamper, provider.token_status = dict(RADIOLOGIST), False, "", 200


def _audit(ui: UiWorld, actor: str) -> list[AuditEvent]:
    with ui.server.ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == "auth.login",
                                                             AuditEvent.actor == actor)))


def test_sign_in_with_the_provider_lands_on_the_roles_start_page(world: tuple[UiWorld, OidcProvider]) -> None:
    ui, provider = world
    _reset(provider)
    with ui.browser_page("en") as (page, log):
        page.goto(ui.base_url + "/login")
        button = page.locator("#sign-in-oidc")
        assert button.inner_text().strip() == f"Sign in with {PROVIDER_NAME}"
        screenshot(page, ui.screenshots / "oidc-sign-in-en.png", "Or use your organisation's account:")
        assert axe(page) == []
        with page.expect_navigation(url=re.compile(r"/ui/reading")):
            button.click()
        assert urlsplit(page.url).path == "/ui/reading", page.content()[:2000]  # the radiologist's start page
        header = page.locator("header").inner_text()
        assert "oidc:f3a1c2d4-rad" in header and "Radiologist" in header and "HOSP-A" in header, header
        screenshot(page, ui.screenshots / "oidc-reading-en.png", "Reading list", "Sign out")
        session = next(c["value"] for c in page.context.cookies() if c["name"] == "pacs_session")
        claims = jwt.decode(session, options={"verify_signature": False})
        assert claims["aud"] == AUDIENCE and claims["sub"] == "f3a1c2d4-rad"  # the access token, not a copy
        assert not [c for c in page.context.cookies() if c["name"] == "pacs_oidc_login"]  # used up

        sign_out(page)  # on to the provider's end-session endpoint, and back to the sign-in page
        page.wait_for_url(re.compile(r"/login$"))
        assert "logout" in provider.events
        page.goto(ui.base_url + "/ui/reading")
        assert urlsplit(page.url).path == "/login"  # the session is gone
        assert_clean(log)
    rows = _audit(ui, "oidc:f3a1c2d4-rad")
    assert any(r.outcome == "success" and r.role == "radiologist" and "dr.nguyen" in r.detail for r in rows), rows

    with ui.browser_page("vi") as (page, log):
        page.goto(ui.base_url + "/login")
        assert page.locator("#sign-in-oidc").inner_text().strip() == f"Đăng nhập bằng {PROVIDER_NAME}"
        assert_clean(log)


# -- refusals, over HTTP -------------------------------------------------------------------------------------------


def _start(ui: UiWorld, client: httpx.Client, next_path: str = "") -> str:
    """Press "Sign in with …" (the sign-in page's form): the provider's authorization URL."""
    page = client.get("/login")
    match = CSRF_FIELD.search(page.text)
    assert match and "/login/oidc" in page.text, page.text[:1500]
    answer = client.post("/login/oidc", data={"csrf": match.group(1), "next": next_path})
    assert answer.status_code == 303, answer.text[:1500]
    location = answer.headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert urlsplit(location).path == "/authorize" and query["response_type"] == ["code"]
    assert query["client_id"] == [CLIENT_ID] and query["code_challenge_method"] == ["S256"]
    assert query["redirect_uri"] == [ui.base_url + "/login/oidc/callback"] and "openid" in query["scope"][0]
    return location


def _at_provider(authorization_url: str) -> str:
    """What the provider answers a browser (immediate consent): the callback URL with code and state."""
    answer = httpx.get(authorization_url, follow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


def _client(ui: UiWorld) -> httpx.Client:
    return httpx.Client(base_url=ui.base_url, follow_redirects=False, timeout=30, headers={"Accept-Language": "en"})


def _refused(client: httpx.Client, callback: str, message: str) -> None:
    """The callback gives the sign-in page with ``message`` and leaves no session."""
    answer = client.get(callback)
    assert answer.status_code in (400, 403, 503), (answer.status_code, answer.text[:1000])
    assert message in answer.text and 'id="sign-in-oidc"' in answer.text, answer.text[:2000]
    assert not client.cookies.get("pacs_session")
    assert client.get("/ui/reading").status_code == 303  # still signed out


def test_a_complete_flow_over_http_honours_only_a_local_next(world: tuple[UiWorld, OidcProvider]) -> None:
    ui, provider = world
    _reset(provider)
    for asked, landed in (("//evil.example.test/phish", "/"), ("https://evil.example.test/", "/"),
                          ("/ui/studies?modality=CT", "/ui/studies?modality=CT")):
        with _client(ui) as client:
            answer = client.get(_at_provider(_start(ui, client, asked)))
            assert answer.status_code == 303 and answer.headers["location"] == landed, (asked, answer.text[:500])
            assert client.cookies.get("pacs_session")
            assert client.get("/ui/studies").status_code == 200  # the session works


def test_refusals_give_the_sign_in_page_with_a_message_and_no_session(world: tuple[UiWorld, OidcProvider]) -> None:
    ui, provider = world
    _reset(provider)
    failed = f"The sign-in with {PROVIDER_NAME} did not complete"

    with _client(ui) as client:  # a callback with another state (e.g. a link made by an attacker)
        callback = _with_query(_at_provider(_start(ui, client)), state="forged-state")
        _refused(client, callback, failed)
    with _client(ui) as client:  # no sign-in started in this browser: no state cookie
        callback = _at_provider(_start(ui, client))
        client.cookies.clear()
        _refused(client, callback, failed)
    for tamper in ("nonce", "signature"):  # an ID token that is not the answer to this sign-in
        provider.tamper = tamper
        with _client(ui) as client:
            _refused(client, _at_provider(_start(ui, client)), failed)
    provider.tamper = ""
    with _client(ui) as client:  # another PKCE challenge injected: the archive's verifier no longer matches
        url = _start(ui, client)
        spoofed = _with_query(url, code_challenge=code_challenge("an-attackers-verifier-" + "x" * 30))
        _refused(client, _at_provider(spoofed), failed)
    assert "token refused: PKCE verification failed" in provider.events
    provider.deny = True
    with _client(ui) as client:  # the user (or the provider) says no
        _refused(client, _at_provider(_start(ui, client)), f"The sign-in was cancelled or refused at {PROVIDER_NAME}")
    provider.deny, provider.token_status = False, 503
    with _client(ui) as client:
        _refused(client, _at_provider(_start(ui, client)), f"{PROVIDER_NAME} cannot be reached right now")
    provider.token_status = 200
    provider.user = {**RADIOLOGIST, "sub": "no-role-user", "roles": ["superuser"]}
    with _client(ui) as client:  # a valid user without a role the archive knows
        _refused(client, _at_provider(_start(ui, client)), "has no role or facility for this archive")
    provider.user = {**RADIOLOGIST, "sub": "emr-user", "roles": ["emr"]}
    with _client(ui) as client:
        _refused(client, _at_provider(_start(ui, client)), "This account cannot use the web pages")

    unverified = _audit(ui, "unverified:oidc")
    for reason in ("state mismatch", "state cookie missing", "nonce", "invalid ID token", "refused the code",
                   "access_denied", "token endpoint answered 503"):
        assert any(r.outcome == "failure" and reason in r.detail for r in unverified), (reason, unverified)
    assert any(r.outcome == "failure" for r in _audit(ui, "oidc:no-role-user"))
    assert any(r.outcome == "failure" and "no web pages" in r.detail for r in _audit(ui, "oidc:emr-user"))


def test_the_state_cookie_cannot_be_forged_or_outlive_its_minutes() -> None:
    login = PendingLogin(state="s", nonce="n", verifier="v" * 43, next="/ui")
    secret = b"k" * 48
    assert unseal(seal(login, secret), secret) == login
    with pytest.raises(OidcLoginFailed, match="invalid state cookie"):
        unseal(seal(login, b"another-secret" * 4), secret)
    with pytest.raises(OidcLoginFailed, match="invalid state cookie"):
        unseal(seal(replace(login, next="//evil"), secret)[:-4] + "AAAA", secret)
    expired = jwt.encode({"aud": "filmless-pacs-oidc-login", "st": "s", "nn": "n", "cv": "v", "exp": 1},
                         hashlib.sha256(b"oidc-login-state|" + secret).digest(), algorithm="HS256")
    with pytest.raises(OidcLoginFailed, match="expired"):
        unseal(expired, secret)
    rfc7636_appendix_b = ("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
    assert code_challenge(rfc7636_appendix_b[0]) == rfc7636_appendix_b[1]
