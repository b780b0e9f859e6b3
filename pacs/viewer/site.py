"""Which file of the installed viewer answers a request under ``/ohif/``, with its media type and caching.

OHIF is a single-page app: its routes (``/ohif/``, ``/ohif/viewer?StudyInstanceUIDs=…``) are answered with
index.html and the app routes in the browser. A missing *asset* (a name with a file extension such as ``.js``)
is a 404, never index.html, so a broken chunk fails loudly instead of being parsed as HTML.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pacs.viewer import MARKER_FILE

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
    ".onnx": "application/octet-stream",
}
# A request for a missing file with one of these endings is a missing asset (404), not an app route.
ASSET_SUFFIXES = frozenset(MEDIA_TYPES) | {".gz", ".jpg", ".jpeg", ".gif", ".webp", ".eot"}
# Content-hashed names (chunks, wasm, fonts) never change under the same name.
HASHED_NAME = re.compile(r"(?:^|\.)[0-9a-f]{16}\.(?:js|css|wasm|woff2?)$")
# Written by the installer, not by OHIF's build: read again on every load.
MUTABLE = frozenset({"index.html", "app-config.js", "login.html", "login.js", "login.css", MARKER_FILE})


@dataclass(frozen=True)
class SiteFile:
    path: Path  # the bytes to send: the file itself, or its precompressed .gz sibling
    media_type: str
    gzip: bool
    cache_control: str
    compressible: bool  # the answer varies with Accept-Encoding


class ViewerSite:
    """The installed viewer in ``root`` (``PACS_OHIF_DIR``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def installed(self) -> bool:
        return (self.root / MARKER_FILE).is_file() and (self.root / "index.html").is_file()

    def resolve(self, request_path: str, accept_gzip: bool) -> SiteFile | None:
        """The file answering ``request_path`` (relative to /ohif/), index.html for app routes, or None for a
        missing asset or a path that tries to leave the folder."""
        parts = PurePosixPath(request_path).parts if request_path.strip("/") else ()
        if any(p in ("..", ".") or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
            return None
        relative = "/".join(parts) or "index.html"
        candidate = self.root / relative
        root = self.root.resolve()
        if candidate.is_file() and candidate.resolve().is_relative_to(root):
            return self._file(candidate, relative, accept_gzip)
        if PurePosixPath(relative).suffix.lower() in ASSET_SUFFIXES:
            return None
        return self._file(self.root / "index.html", "index.html", accept_gzip)

    def _file(self, path: Path, relative: str, accept_gzip: bool) -> SiteFile:
        suffix = path.suffix.lower()
        media_type = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        compressed = path.with_name(path.name + ".gz")
        compressible = compressed.is_file()
        use_gzip = accept_gzip and compressible
        if relative in MUTABLE:
            cache = "no-cache"
        elif HASHED_NAME.search(path.name):
            cache = "public, max-age=31536000, immutable"
        else:
            cache = "public, max-age=3600"
        return SiteFile(compressed if use_gzip else path, media_type, use_gzip, cache, compressible)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (``gzip;q=0`` refuses it)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and _q(q[2:]) == 0)
    return False


def _q(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 1.0
