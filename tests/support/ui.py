"""What the web pages' browser tests share (tests/test_ui_*.py): an archive with an account of each role, a browser
page at 1366×768 in a chosen language, signing in through the sign-in page, axe-core and the page log check.

One server and one browser per module::

    from tests.support.ui import UiWorld, assert_clean, axe, sign_in, ui_world  # noqa: F401 (ui_world: fixture)

    def test_journey(ui_world: UiWorld) -> None:
        server, users, base_url = ui_world
        with ui_world.browser_page("vi") as (page, log):
            sign_in(page, base_url, *users["radiologist"])
            ...
            assert axe(page) == []
            assert_clean(log)

``users`` maps a role to (user name, password): ``admin`` (every facility), ``radiologist``, ``technologist``,
``clinician`` of facility HOSP-A, ``radiologist_b``, ``technologist_b``, ``clinician_b`` of HOSP-B, and ``emr`` (an
EMR service account, which has no pages). axe-core comes from npm (scripts/bootstrap.sh --test puts it in
.cache/axe); it is loaded into the page as a same-origin script served by the test (the pages' CSP allows no
inline script, and the check must not switch the CSP off).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route

from pacs.security.models import User
from pacs.security.passwords import hash_password
from tests.support.browser import PageLog, chromium_browser
from tests.support.stack import EmbeddedPacs
from tests.support.tiers import starts_servers

ROOT = Path(__file__).resolve().parents[2]
AXE_VERSION = "4.10.2"  # pinned in scripts/bootstrap.sh too
AXE_DIR = ROOT / ".cache" / "axe"
AXE_FILE = AXE_DIR / "node_modules" / "axe-core" / "axe.min.js"
AXE_URL_PATH = "/ui-static/__test-axe-core.js"  # answered by the test (page.route), never by the server
SCREEN = {"width": 1366, "height": 768}
PHONE = {"width": 360, "height": 640}
PASSWORD = "correct-horse-battery-staple-42"
FACILITY_A, FACILITY_B = "HOSP-A", "HOSP-B"
# role key → (user name, role, facility, full name)
ACCOUNTS: dict[str, tuple[str, str, str, str]] = {
    "admin": ("ui_admin", "admin", "", "Quản Trị"),
    "radiologist": ("rad_a", "radiologist", FACILITY_A, "BS. Lê Minh Tâm"),
    "technologist": ("tech_a", "technologist", FACILITY_A, "KTV. Phạm Thu Hà"),
    "clinician": ("clin_a", "clinician", FACILITY_A, "BS. Đỗ Quang Huy"),
    "radiologist_b": ("rad_b", "radiologist", FACILITY_B, "BS. Trần Bảo"),
    "technologist_b": ("tech_b", "technologist", FACILITY_B, "KTV. Vũ Lan"),
    "clinician_b": ("clin_b", "clinician", FACILITY_B, "BS. Hoàng Yến"),
    "emr": ("emr_gateway", "emr", "", ""),
}


@dataclass
class UiWorld:
    """A running `pacs serve` with an account of each role, and a headless Chromium."""

    server: EmbeddedPacs
    users: dict[str, tuple[str, str]]
    base_url: str
    browser: Browser
    screenshots: Path  # a folder for the module's screenshots

    def __iter__(self) -> Iterator[Any]:  # server, users, base_url = ui_world
        return iter((self.server, self.users, self.base_url))

    @contextmanager
    def browser_page(self, lang: str = "vi", *, viewport: dict[str, int] | None = None
                     ) -> Iterator[tuple[Page, PageLog]]:
        """A fresh browser context (no cookies) whose browser asks for ``lang`` first, at 1366×768 unless told."""
        with browser_page(self.browser, lang, viewport=viewport) as opened:
            yield opened


@contextmanager
def browser_page(browser: Browser, lang: str = "vi", *, viewport: dict[str, int] | None = None
                 ) -> Iterator[tuple[Page, PageLog]]:
    """A page of a fresh context of ``browser`` with ``Accept-Language: lang`` and its :class:`PageLog`."""
    other = "en" if lang == "vi" else "vi"
    context = browser.new_context(viewport=viewport or SCREEN, locale="vi-VN" if lang == "vi" else "en-US",
                                  extra_http_headers={"Accept-Language": f"{lang},{other};q=0.5"})
    try:
        page = context.new_page()
        log = PageLog()
        log.attach(page)
        yield page, log
    finally:
        context.close()


def make_accounts(server: EmbeddedPacs, password: str = PASSWORD) -> dict[str, tuple[str, str]]:
    """The accounts of :data:`ACCOUNTS`, made in-process on the server's own index (one argon2 hash for all: a
    hash costs a noticeable fraction of a second on a busy CI machine)."""
    digest = hash_password(password)
    with server.ctx.sessions.begin() as session:
        for username, role, facility, full_name in ACCOUNTS.values():
            session.add(User(username=username, password_hash=digest, role=role, facility=facility,
                             full_name=full_name, active=True))
    return {key: (username, password) for key, (username, *_rest) in ACCOUNTS.items()}


@contextmanager
def ui_world_of(root: Path, extra_env: dict[str, str] | None = None) -> Iterator[UiWorld]:
    """A :class:`UiWorld` on folder ``root`` (for a module that needs its own settings; else the fixture)."""
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedPacs(root, extra_env))
        users = make_accounts(server)
        browser = stack.enter_context(chromium_browser())
        shots = root / "screenshots"
        shots.mkdir(exist_ok=True)
        yield UiWorld(server, users, server.http_url, browser, shots)


@pytest.fixture(scope="module")
@starts_servers
def ui_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiWorld]:
    """One archive and one browser for the module (import this fixture into the test module)."""
    with ui_world_of(tmp_path_factory.mktemp("ui")) as world:
        yield world


# -- journeys --------------------------------------------------------------------------------------------------


def sign_in(page: Page, base_url: str, username: str, password: str, *, expect_success: bool = True,
            start: str = "/") -> None:
    """Sign in through the sign-in page only: open ``start`` (``/``: the front door sends a visitor to the
    sign-in page; a page URL: sign-in comes back to it), fill the form, press the button. Afterwards the page is
    the user's start page or ``start`` (or the sign-in page again with its message, when ``expect_success`` is
    False)."""
    page.goto(base_url.rstrip("/") + start)
    page.locator("#username").fill(username)
    page.locator("#password").fill(password)
    with page.expect_navigation():
        page.locator("#sign-in").click()
    if expect_success:
        assert urlsplit(page.url).path != "/login", f"sign-in of {username} failed:\n{page.content()[:2000]}"


def sign_out(page: Page) -> None:
    with page.expect_navigation():
        page.locator("form[action='/logout'] button[type=submit]").click()


def choose_language(page: Page, lang: str) -> None:
    """Switch the language with the header's form (as a user would)."""
    page.locator("#lang-select").select_option(lang)
    with page.expect_navigation():
        page.locator("form[action='/lang'] button[type=submit]").click()


def screenshot(page: Page, path: Path, *expected: str) -> Path:
    """A full-page screenshot of ``page`` at ``path``, checked: a real PNG of some size, and each of ``expected``
    in the page's visible text."""
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, f"{path} is not a real screenshot"
    text = page.locator("body").inner_text()
    missing = [word for word in expected if word not in text]
    assert not missing, f"not on the page of {path.name}: {missing}\n{text[:1500]}"
    return path


# -- checks ----------------------------------------------------------------------------------------------------


def axe_source() -> str:
    """axe-core's browser build (npm, pinned): installed by scripts/bootstrap.sh --test, or fetched here the same
    way when missing."""
    if not AXE_FILE.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("axe-core is missing and npm is not installed: run scripts/bootstrap.sh --test")
        subprocess.run([npm, "install", "--prefix", str(AXE_DIR), "--no-save", "--no-package-lock",
                        "--ignore-scripts", "--no-audit", "--no-fund", f"axe-core@{AXE_VERSION}"],
                       check=True, capture_output=True, timeout=300)
    return AXE_FILE.read_text(encoding="utf-8")


def axe(page: Page, impacts: Sequence[str] = ("serious", "critical"), *,
        disable_rules: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The axe-core violations of ``page`` with one of ``impacts``, each as
    ``{"id", "impact", "help", "nodes": [target selectors…]}`` (an empty list: the page passes)."""
    source = axe_source()
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(page.url))

    def serve(route: Route) -> None:
        route.fulfill(status=200, content_type="text/javascript", body=source)

    page.route(origin + AXE_URL_PATH, serve)
    try:
        if not page.evaluate("() => typeof window.axe !== 'undefined'"):
            page.add_script_tag(url=origin + AXE_URL_PATH)
    finally:
        page.unroute(origin + AXE_URL_PATH, serve)
    options: dict[str, Any] = {"resultTypes": ["violations"]}
    if disable_rules:
        options["rules"] = {rule: {"enabled": False} for rule in disable_rules}
    result = page.evaluate("(options) => axe.run(document, options)", options)
    return [{"id": v["id"], "impact": v.get("impact"), "help": v.get("help"),
             "nodes": [", ".join(map(str, n.get("target", []))) for n in v.get("nodes", [])][:5]}
            for v in result["violations"] if v.get("impact") in impacts]


axe_violations = axe


def assert_clean(log: PageLog, *, allow_statuses: Sequence[str] = ()) -> None:
    """No failed request, no 4xx/5xx answer (but those whose ``"<status> <METHOD> <url>"`` contains one of
    ``allow_statuses``), no console error, no uncaught page error."""
    statuses = [s for s in log.error_statuses if not any(a in s for a in allow_statuses)]
    failed = [f for f in log.failed if "net::ERR_ABORTED" not in f]  # a fetch cut short by leaving the page
    problems = failed + statuses + log.console_errors + log.page_errors
    assert not problems, "the page log is not clean:\n" + log.summary()


# What a keyboard user must reach on a page: each visible, enabled element of these (a tabindex below 0 and the
# hidden inputs excepted); one stop per radio group. Frames are passed through but not required (their document is
# another page's).
_KEYBOARD_WALK = r"""() => {
  const SELECTOR = 'a[href], area[href], button, input, select, textarea, summary, iframe, [tabindex], '
                 + '[contenteditable="true"]';
  const wanted = (el) => {
    if (el.tagName === 'IFRAME' || el.closest('[inert]') || el.matches(':disabled, input[type=hidden]')) return false;
    const tabindex = el.getAttribute('tabindex');
    if (tabindex !== null && tabindex.trim() !== '' && parseInt(tabindex, 10) < 0) return false;
    if (el.tagName === 'SUMMARY' && !(el.parentElement && el.parentElement.tagName === 'DETAILS'
                                      && el.parentElement.querySelector(':scope > summary') === el)) return false;
    return el.checkVisibility({checkVisibilityCSS: true});
  };
  const describe = (el) => {
    if (el.type === 'radio' && el.name) {
      return `radio group ${el.name}` + (el.form && el.form.id ? ` of #${el.form.id}` : '');
    }
    const text = (el.getAttribute('aria-label') || el.innerText || el.value || el.getAttribute('title') || '')
      .replace(/\s+/g, ' ').trim().slice(0, 40);
    return el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') + (el.name ? `[name=${el.name}]` : '')
      + (el.getAttribute('href') ? `[href=${el.getAttribute('href')}]` : '') + (text ? ` "${text}"` : '');
  };
  const keys = () => {
    const seen = new Map(), out = new Map();
    for (const el of document.querySelectorAll(SELECTOR)) {
      if (!wanted(el)) continue;
      const d = describe(el);
      if (d.startsWith('radio group ') && seen.has(d)) { out.set(el, d); continue; }
      const n = (seen.get(d) || 0) + 1;
      seen.set(d, n);
      out.set(el, n > 1 ? `${d} (${n})` : d);
    }
    return out;
  };
  // the walk starts at the top of the page, as after loading it
  document.body.setAttribute('tabindex', '-1');
  document.body.focus({preventScroll: true});
  document.body.removeAttribute('tabindex');
  window.scrollTo(0, 0);
  window.__keyboardWalk = [];
  window.__keyboardWalkListener = (event) => {
    const el = event.target;
    if (!(el instanceof Element)) return;
    const key = keys().get(el) || `${describe(el)} (not expected)`;
    const style = getComputedStyle(el);
    const outline = style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0;
    const shadow = style.boxShadow !== 'none';
    const r = el.getBoundingClientRect();
    window.__keyboardWalk.push({
      key, frame: el.tagName === 'IFRAME', focusVisible: el.matches(':focus-visible'), indicator: outline || shadow,
      onPage: r.width > 2 && r.height > 2 && r.right + window.scrollX > 0 && r.bottom + window.scrollY > 0,
    });
  };
  document.addEventListener('focusin', window.__keyboardWalkListener, true);
  return [...new Set(keys().values())];
}"""


def assert_keyboard_reachable(page: Page) -> None:
    """Tab through ``page`` with the keyboard only, from its top: every visible, enabled interactive element (links,
    buttons, form fields, summaries, ``tabindex`` ≥ 0) receives the focus in turn, each focused element shows it (an
    outline or a box-shadow while it matches ``:focus-visible``) and none is pushed off the page while focused."""
    expected: list[str] = page.evaluate(_KEYBOARD_WALK)
    limit = 2 * len(expected) + 10  # room for a frame's own stops and scrollable regions the browser adds
    presses, walk = 0, []
    try:
        while presses < limit:
            missing = set(expected) - {w["key"] for w in walk}
            if not missing:
                break
            for _ in range(min(len(missing), limit - presses)):
                page.keyboard.press("Tab")
                presses += 1
            walk = page.evaluate("() => window.__keyboardWalk")
    finally:
        page.evaluate("() => document.removeEventListener('focusin', window.__keyboardWalkListener, true)")
    reached = {w["key"] for w in walk}
    unreached = [key for key in expected if key not in reached]
    unseen = sorted({w["key"] for w in walk if not w["frame"] and not (w["focusVisible"] and w["indicator"])})
    off_page = sorted({w["key"] for w in walk if not w["frame"] and not w["onPage"]})
    assert not (unreached or unseen or off_page), (
        f"keyboard walk of {page.url} ({presses} Tab presses, {len(expected)} stops expected):\n"
        f"never focused: {unreached}\nfocus not visible: {unseen}\nfocused off the page: {off_page}")
