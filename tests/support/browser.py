"""Headless Chromium (Debian's, never a downloaded one) driven by Playwright, with a log of what went wrong.

The browser is /usr/bin/chromium from apt (scripts/bootstrap.sh --test); `playwright install` is never run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class PageLog:
    """What a page did: every request, the ones that failed or got an error status, and console messages."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, url, headers
    failed: list[str] = field(default_factory=list)
    error_statuses: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._request)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def _request(self, request: Request) -> None:
        self.requests.append((request.method, request.url, request.headers))

    def _failed(self, request: Request) -> None:
        self.failed.append(f"{request.method} {request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.error_statuses.append(f"{response.status} {response.request.method} {response.url}")

    def _console(self, message: ConsoleMessage) -> None:
        text = f"{message.type}: {message.text}"
        self.console.append(text)
        if message.type == "error":
            self.console_errors.append(text)

    def summary(self) -> str:
        return "\n".join(["failed requests:", *self.failed, "error statuses:", *self.error_statuses,
                          "page errors:", *self.page_errors, "console (last 40):", *self.console[-40:]])


@contextmanager
def chromium_browser() -> Iterator[Browser]:
    """A headless Chromium browser."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap.sh --test)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
