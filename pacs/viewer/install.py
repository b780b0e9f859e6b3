"""``pacs viewer install-ohif``: the pinned OHIF build, checked, moved under ``/ohif/``, configured, swapped in whole.

Order: fetch (or take) the tarball and check its integrity; extract ``package/dist/`` into a staging folder next
to the target; rewrite its root-absolute paths (:mod:`pacs.viewer.rebase`); write our app-config.js and sign-in
page; gzip the large text and wasm files once (served to browsers that accept gzip); write the marker file;
then swap the staging folder in for the old install. A failure at any step leaves the old install as it was.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from pacs.viewer import (
    BASE_PATH,
    MARKER_FILE,
    OHIF_INTEGRITY,
    OHIF_PACKAGE,
    OHIF_VERSION,
    ViewerInstallError,
)
from pacs.viewer.app_config import render_app_config
from pacs.viewer.fetch import npm_pack, verify_tarball
from pacs.viewer.login_page import login_files
from pacs.viewer.rebase import rebase

DIST_PREFIX = "package/dist/"
MAX_EXTRACTED_BYTES = 2 * 1024**3  # the 3.13 dist is ~200 MB; anything far larger is not that package
# Hosting files of OHIF's own deployments (Netlify, `serve`), and the demo configuration ours replaces.
DROPPED = ("_headers", "_redirects", "serve.json", "app-config.js")
PRECOMPRESS_SUFFIXES = frozenset({".js", ".mjs", ".css", ".json", ".html", ".svg", ".wasm"})
PRECOMPRESS_MIN_BYTES = 1024
# ONNX Runtime (112 MB, 8 s to compress) serves only OHIF's optional AI tools: sent as is when they are used.
PRECOMPRESS_SKIP = frozenset({"ort"})


@dataclass(frozen=True)
class InstallResult:
    target: Path
    version: str
    files: int
    total_bytes: int
    references_rewritten: int


def install_ohif(target: Path, tarball: Path | None = None, npm: str | None = None,
                 progress: Callable[[str], None] = lambda _: None) -> InstallResult:
    """Install the pinned OHIF viewer into ``target`` (replacing an earlier install made by this function)."""
    target = target.absolute()
    _check_replaceable(target)
    try:
        return _install(target, tarball, npm, progress)
    except OSError as exc:  # permissions, a full disk: say where, without a traceback
        raise ViewerInstallError(f"cannot install the viewer into {target}: {exc}") from exc


def _install(target: Path, tarball: Path | None, npm: str | None, progress: Callable[[str], None]) -> InstallResult:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-install-") as tmp:
        work = Path(tmp)
        if tarball is None:
            progress(f"downloading {OHIF_PACKAGE}@{OHIF_VERSION} with npm pack")
            tarball = npm_pack(work / "download", npm)
        progress(f"checking {tarball.name}")
        verify_tarball(tarball)
        site = work / "site"
        progress("extracting dist/")
        extract_dist(tarball, site)
        progress(f"moving the app under {BASE_PATH}")
        try:
            report = rebase(site, BASE_PATH)
        except ValueError as exc:
            raise ViewerInstallError(f"{OHIF_PACKAGE}@{OHIF_VERSION}: {exc}") from exc
        for name in DROPPED:
            (site / name).unlink(missing_ok=True)
        (site / "app-config.js").write_text(render_app_config(), encoding="utf-8")
        for name, text in login_files().items():
            (site / name).write_text(text, encoding="utf-8")
        progress("compressing")
        precompress(site)
        files = [p for p in site.rglob("*") if p.is_file() and p.suffix != ".gz"]
        total_bytes = sum(p.stat().st_size for p in files)
        marker = {"package": OHIF_PACKAGE, "version": OHIF_VERSION, "integrity": OHIF_INTEGRITY,
                  "base_path": BASE_PATH, "installed_at": datetime.now(UTC).isoformat(timespec="seconds")}
        (site / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _swap(site, target, work / "previous")
    return InstallResult(target, OHIF_VERSION, len(files), total_bytes, sum(report.files_changed.values()))


def installed_version(target: Path) -> str | None:
    """The OHIF version installed in ``target``, or None when it holds no complete install."""
    try:
        marker = json.loads((target / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker.get("version") if (target / "index.html").is_file() else None


def extract_dist(tarball: Path, dest: Path) -> None:
    """Extract the package's ``dist/`` folder (regular files only, no path leaving ``dest``)."""
    dest.mkdir(parents=True)
    total = 0
    found = False
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if not member.name.startswith(DIST_PREFIX) or member.isdir():
                    continue
                relative = PurePosixPath(member.name[len(DIST_PREFIX):])
                if not member.isfile() or relative.is_absolute() or ".." in relative.parts or not relative.parts:
                    raise ViewerInstallError(f"refusing tarball entry {member.name!r} (not a plain file inside dist/)")
                total += member.size
                if total > MAX_EXTRACTED_BYTES:
                    raise ViewerInstallError(f"dist/ is larger than {MAX_EXTRACTED_BYTES} bytes: not the OHIF package")
                path = dest.joinpath(*relative.parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has a stream
                with source, path.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                found = True
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ViewerInstallError(f"cannot extract {tarball}: {exc}") from exc
    if not found or not (dest / "index.html").is_file():
        raise ViewerInstallError(f"{tarball} has no {DIST_PREFIX}index.html: not a built OHIF app")


def precompress(site: Path) -> None:
    """Write ``name.gz`` next to each large compressible file (the main bundle shrinks from 17 MB to ~4 MB)."""
    for path in list(site.rglob("*")):
        if (path.is_file() and path.suffix in PRECOMPRESS_SUFFIXES and path.stat().st_size >= PRECOMPRESS_MIN_BYTES
                and path.relative_to(site).parts[0] not in PRECOMPRESS_SKIP):
            with path.open("rb") as src, gzip.GzipFile(path.with_name(path.name + ".gz"), "wb",
                                                       compresslevel=6, mtime=0) as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _check_replaceable(target: Path) -> None:
    """Refuse to replace a folder that is neither empty nor an earlier install (a mistyped PACS_OHIF_DIR)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ViewerInstallError(f"{target} exists and is not a folder")
    if (target / MARKER_FILE).is_file() or not any(target.iterdir()):
        return
    raise ViewerInstallError(f"{target} exists and is not an OHIF install made by this command: remove it or "
                             "set PACS_OHIF_DIR to another folder")


def _swap(site: Path, target: Path, previous: Path) -> None:
    """Put the new install in place by renaming (the staging folder is a sibling of the target, on the same
    filesystem), so the server never sees a half-written viewer."""
    try:
        if target.exists():
            target.rename(previous)  # removed with the temporary folder
    except OSError as exc:
        raise ViewerInstallError(f"cannot replace {target}: {exc} (is it a mount point? PACS_OHIF_DIR must be a "
                                 "folder inside a volume, not the volume itself)") from exc
    try:
        site.rename(target)
    except OSError:
        if previous.exists():
            previous.rename(target)
        raise
