"""HTTP hardening that applies to every route: trusted hosts, body size limit and security headers (ASGI
middleware). Connection-level limits (header timeout, per-client cap) are in ``viewer_api.http_server``."""

from __future__ import annotations

import functools
import ipaddress
import json
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Pages of the OHIF viewer need cross-origin isolation for SharedArrayBuffer (volume rendering).
ISOLATED_PREFIXES = ("/ohif",)
# FastAPI's interactive documentation runs scripts: no restrictive CSP there (it shows no patient data).
DOCS_PREFIXES = ("/docs", "/redoc")


class BodyTooLarge(Exception):
    pass


# Only STOW-RS and the file/zip upload (pacs.studies.upload) take large bodies; every other route (login,
# JSON) is parsed in memory: keep it small.
UPLOAD_PREFIX = ("/dicom-web/studies", "/api/studies/upload", "/ui/upload")
SMALL_BODY_BYTES = 64 * 1024


class RequestLimits:
    """Refuse a request body over the limit with 413: at once from Content-Length, or as soon as a
    chunked body passes it (the route reading it gets an exception and writes nothing). The limit is
    ``max_bytes`` for STOW-RS uploads and ``small_bytes`` for every other request."""

    def __init__(self, app: ASGIApp, max_bytes: int, small_bytes: int = SMALL_BODY_BYTES) -> None:
        self.app, self.upload_bytes, self.small_bytes = app, max_bytes, min(small_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and str(scope.get("path", "")).startswith(UPLOAD_PREFIX)
        limit = self.upload_bytes if upload else self.small_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _json(send, 400, "invalid_request", "invalid Content-Length")
                return
            if declared > limit:
                await _json(send, 413, "payload_too_large",
                            f"request body of {declared} bytes exceeds the limit of {limit}")
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await _json(send, 413, "payload_too_large", str(exc))


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        isolated = path.startswith(ISOLATED_PREFIXES)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[tuple[bytes, bytes]] = list(message.get("headers") or [])
                present = {k.lower() for k, _ in headers}
                for name, value in _headers(isolated, path.startswith(DOCS_PREFIXES)):
                    if name not in present:
                        headers.append((name, value))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _headers(isolated: bool, docs: bool = False) -> list[tuple[bytes, bytes]]:
    common = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-resource-policy", b"same-site"),
    ]
    if isolated:
        # the radiologist's report editor shows the viewer in a frame of its own page (viewer_api.ui.reading_pages)
        common[2] = (b"x-frame-options", b"SAMEORIGIN")
        return [*common, (b"content-security-policy", b"frame-ancestors 'self'"),
                (b"cross-origin-opener-policy", b"same-origin"),
                (b"cross-origin-embedder-policy", b"require-corp")]
    if docs:
        return common
    return [*common, (b"cache-control", b"no-store"),
            (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")]


async def _json(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


WILDCARD_BINDS = ("", "0.0.0.0", "::")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class TrustedHosts:
    """Answer only requests whose ``Host`` names this server; others get 400 before any route runs.

    Absolute URLs (Retrieve URL, BulkDataURI, FHIR links) are built from the ``Host`` of the request
    when ``PACS_PUBLIC_URL`` is unset (``viewer_api.urls``): a forged ``Host`` would point a viewer,
    and the token it sends along, at the attacker's server. Trusted are the names in ``allowed``
    (``*.example.org`` also matches its subdomains; ``*`` turns the check off), and always the address
    the connection arrived at (``scope["server"]``: the server's own, whatever the client says).
    A request without ``Host`` (HTTP/1.0) gets URLs from that address too, so it passes.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        names = {_host_only(name) for name in allowed if name.strip()}
        self.any = "*" in names
        self.exact = {n for n in names if not n.startswith("*.")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".example.org"

    def allows(self, host_header: str, server: Any) -> bool:
        host = _host_only(host_header)
        if self.any or host in self.exact or (self.suffixes and host.endswith(self.suffixes)):
            return True
        return bool(server) and host == _host_only(str(server[0]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope.get("headers") or [] if k == b"host"), None)
        if host is not None and not self.allows(host.decode("latin-1"), scope.get("server")):
            await _json(send, 400, "untrusted_host", "the Host header does not name this server "
                        "(PACS_TRUSTED_HOSTS, PACS_PUBLIC_URL)")
            return
        await self.app(scope, receive, send)


def trusted_host_names(configured: Iterable[str], public_url: str, http_host: str) -> list[str]:
    """The names the HTTP API answers to: configured ones, the public URL's host, the bound address (unless
    a wildcard), loopback, and this machine's host name."""
    names = [*configured, *LOCAL_NAMES]
    if public_url:
        names.append(urlsplit(public_url).hostname or "")
    if http_host.strip() not in WILDCARD_BINDS:
        names.append(http_host)
    names.append(socket.gethostname())  # no DNS look-up at start-up: the FQDN goes in PACS_TRUSTED_HOSTS
    return [n for n in names if n]


@functools.lru_cache(maxsize=256)  # every request's Host is checked; a client sends the same one each time
def _host_only(value: str) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'; 'host.' -> 'host'."""
    text = value.strip().lower()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.rstrip(".")
