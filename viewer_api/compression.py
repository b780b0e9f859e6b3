"""gzip for text answers and uncompressed frames (pure ASGI): DICOM JSON of QIDO-RS and ``/metadata``, FHIR and
API JSON, the pages, and WADO-RS frames sent as raw pixel data.

A viewer opening a study reads the series metadata (for a 300-slice CT about 0.6 MB of ``application/dicom+json``)
and then raw frames (512 KB each for a 512×512 16-bit CT stored uncompressed) before its first image; over a
10 Mbit/s link that is a second and a half, gzip makes the JSON a twentieth and uncompressed CT pixels about half
(Orthanc gzips both too). Starlette's GZipMiddleware would also compress what must stay as it is, so this one
decides by media type:

- compressed: ``application/dicom+json``, ``application/json``, ``application/fhir+json``, other ``+json``/
  ``+xml`` types, ``text/*``, JavaScript and SVG (zlib level 6); and ``multipart/related; type=
  "application/octet-stream"`` — WADO-RS frames and bulk data as raw bytes (level 1: fast, and most of the gain);
  when the answer is a 200 of at least ``MIN_BYTES`` and the client accepts gzip (``Accept-Encoding``; ``gzip;q=0``
  refuses);
- never: images (JPEG, PNG, and frames in a compressed syntax: ``type="image/jls"``, ``image/jp2``, ...),
  ``multipart/related; type="application/dicom"`` (WADO-RS instances: DICOM objects as stored), ``application/
  dicom``, octet streams, an answer that already has a ``Content-Encoding`` (OHIF's precompressed files,
  viewer_api.ohif), a 206, a HEAD.

Every answer of a compressible type gets ``Vary: Accept-Encoding`` (a cache must not give the gzip body to a client
that did not ask for it). A streamed answer is compressed as it streams (the first body message decides: one of
``MIN_BYTES`` or more, or more to come); an ETag is made weak (``W/``), since the bytes differ from the identity
representation's.
"""

from __future__ import annotations

import zlib

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs.viewer.site import accepts_gzip

MIN_BYTES = 1024
LEVEL = 6  # zlib's default, for text: DICOM JSON shrinks ~20x; level 1 saves little time for a larger body
BINARY_LEVEL = 1  # raw pixel data: a few ms per 512 KB frame, most of what level 6 would save
TEXT_TYPES = frozenset({"application/json", "application/dicom+json", "application/fhir+json", "application/xml",
                        "application/javascript", "text/javascript", "image/svg+xml", "application/manifest+json"})


def compressible(content_type: str) -> bool:
    """Whether answers of ``content_type`` are worth gzip (text, JSON, XML, JavaScript, SVG, raw frames)."""
    return level_for(content_type) is not None


def level_for(content_type: str) -> int | None:
    """The zlib level for answers of ``content_type``, or None: not compressed."""
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media == "text/html":  # pages carry the session's CSRF token beside reflected input: no BREACH oracle
        return None
    if media in TEXT_TYPES or media.startswith("text/") or media.endswith("+json") or media.endswith("+xml"):
        return LEVEL
    if media == "multipart/related" and _parameter(params, "type") == "application/octet-stream":
        return BINARY_LEVEL
    return None


def _parameter(params: str, name: str) -> str:
    for item in params.split(";"):
        key, _, value = item.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"').lower()
    return ""


class GzipText:
    """ASGI middleware: gzip for text and JSON answers a client accepts it for (see the module's docstring)."""

    def __init__(self, app: ASGIApp, minimum_size: int = MIN_BYTES) -> None:
        self.app, self.minimum_size = app, minimum_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wants = scope.get("method") != "HEAD" and accepts_gzip(Headers(scope=scope).get("accept-encoding", ""))
        await self.app(scope, receive, _Responder(send, wants, self.minimum_size))


class _Responder:
    """The ``send`` of one request: holds the start message until the first body message shows the size."""

    def __init__(self, send: Send, wants_gzip: bool, minimum_size: int) -> None:
        self.send, self.wants_gzip, self.minimum_size = send, wants_gzip, minimum_size
        self.level = LEVEL
        self.start: Message | None = None
        self.compressor: zlib._Compress | None = None
        self.passthrough = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = MutableHeaders(raw=list(message.get("headers") or []))
            level = level_for(headers.get("content-type", ""))
            if level is None:
                self.passthrough = True
                await self.send(message)
                return
            headers.add_vary_header("Accept-Encoding")
            message["headers"] = headers.raw
            if (not self.wants_gzip or message.get("status", 200) != 200 or "content-encoding" in headers):
                self.passthrough = True
                await self.send(message)
                return
            self.start = message  # decided by the first body message
            self.level = level
            return
        if kind != "http.response.body" or self.passthrough:
            await self.send(message)
            return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.start is not None:  # the first body message
            start, self.start = self.start, None
            if not more and len(body) < self.minimum_size:
                self.passthrough = True
                await self.send(start)
                await self.send(message)
                return
            headers = MutableHeaders(raw=start["headers"])
            headers["Content-Encoding"] = "gzip"
            if "content-length" in headers:
                del headers["content-length"]
            etag = headers.get("etag")
            if etag and not etag.startswith("W/"):
                headers["ETag"] = f"W/{etag}"
            self.compressor = zlib.compressobj(self.level, zlib.DEFLATED, 31)  # 31: the gzip container
            if not more:
                data = self.compressor.compress(body) + self.compressor.flush()
                headers["Content-Length"] = str(len(data))
                start["headers"] = headers.raw
                await self.send(start)
                await self.send({"type": "http.response.body", "body": data})
                return
            start["headers"] = headers.raw
            await self.send(start)
        assert self.compressor is not None
        data = self.compressor.compress(body)
        if not more:
            data += self.compressor.flush()
        elif data:
            data += self.compressor.flush(zlib.Z_SYNC_FLUSH)  # a streamed answer's parts reach the client as made
        if data or not more:
            await self.send({"type": "http.response.body", "body": data, "more_body": more})
