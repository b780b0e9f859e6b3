"""Getting the pinned OHIF package: ``npm pack`` from the registry, or a tarball the operator brings, checked
against the registry's integrity hash either way."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from pacs.viewer import OHIF_INTEGRITY, OHIF_PACKAGE, OHIF_VERSION, ViewerInstallError

NPM_TIMEOUT_S = 900.0


def npm_pack(dest: Path, npm: str | None = None, timeout: float = NPM_TIMEOUT_S) -> Path:
    """Download the pinned ``@ohif/app`` tarball into ``dest`` with ``npm pack`` (npm's cache, proxy and
    registry settings apply); returns its path."""
    npm = npm or shutil.which("npm")
    if not npm:
        raise ViewerInstallError("npm not found: install Node.js and npm, or fetch "
                                 f"{OHIF_PACKAGE}@{OHIF_VERSION} on another machine (`npm pack "
                                 f"{OHIF_PACKAGE}@{OHIF_VERSION}`) and use --from-tarball")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--ignore-scripts", "--json", "--pack-destination",
           str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=dest)
    except subprocess.TimeoutExpired as exc:
        raise ViewerInstallError(f"`npm pack` did not finish within {timeout:.0f} s (registry unreachable?)") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ViewerInstallError(f"`npm pack {OHIF_PACKAGE}@{OHIF_VERSION}` failed (exit {proc.returncode}): "
                                 + " | ".join(tail))
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError) as exc:
        raise ViewerInstallError(f"unexpected output from `npm pack --json`: {proc.stdout[:300]!r}") from exc
    # npm names scoped tarballs "ohif-app-3.13.2.tgz"; older versions printed "@ohif/app-…" in the JSON.
    path = dest / Path(filename.replace("@", "").replace("/", "-")).name
    if not path.is_file():
        raise ViewerInstallError(f"`npm pack` reported {filename} but {path} does not exist")
    return path


def integrity_of(path: Path) -> str:
    """The npm-style Subresource Integrity string (sha512, base64) of a file."""
    digest = hashlib.sha512()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def verify_tarball(path: Path) -> None:
    """Refuse anything but the exact tarball the npm registry publishes for the pinned version."""
    if not path.is_file():
        raise ViewerInstallError(f"tarball not found: {path}")
    found = integrity_of(path)
    if found != OHIF_INTEGRITY:
        raise ViewerInstallError(f"{path} is not the published {OHIF_PACKAGE}@{OHIF_VERSION} tarball "
                                 f"(integrity {found[:30]}…, expected {OHIF_INTEGRITY[:30]}…)")
