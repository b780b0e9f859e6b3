"""HTTP hardening that applies to every route: body size limit and security headers (ASGI middleware)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Pages of the OHIF viewer need cross-origin isolation for SharedArrayBuffer (volume rendering).
ISOLATED_PREFIXES = ("/ohif",)
# FastAPI's interactive documentation runs scripts: no restrictive CSP there (it shows no patient data).
DOCS_PREFIXES = ("/docs", "/redoc")


class BodyTooLarge(Exception):
    pass


# Only STOW-RS takes large bodies; every other route (login, JSON) is parsed in memory: keep it small.
UPLOAD_PREFIX = "/dicom-web/studies"
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
        return [*common, (b"cross-origin-opener-policy", b"same-origin"),
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
