"""The OHIF viewer installed for the tests by the real command (`pacs viewer install-ohif`: npm pack from the
registry), once per version of pacs/viewer, in the working tree's cache (several test runs may share it)."""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from pathlib import Path

import pacs.viewer
from pacs.viewer import OHIF_VERSION
from pacs.viewer.install import installed_version
from tests.support.pacs_process import run_pacs

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = REPO / ".cache" / "ohif"


def viewer_code_digest() -> str:
    """Changes whenever pacs/viewer changes, so the cached install is never older than the code under test."""
    digest = hashlib.sha256()
    for path in sorted(Path(pacs.viewer.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def installed_ohif() -> Path:
    """The viewer's folder, installed now unless this code version's install is cached; npm's own cache makes
    the reinstall after a code change quick."""
    target = CACHE / f"{OHIF_VERSION}-{viewer_code_digest()}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(target) != OHIF_VERSION:
            for stale in CACHE.iterdir():
                if stale.is_dir() and stale != target:
                    shutil.rmtree(stale, ignore_errors=True)
            result = run_pacs(["viewer", "install-ohif", "--dir", str(target)],
                              {"PACS_DATA_DIR": str(CACHE / "data")}, timeout=1200)
            assert result.returncode == 0, f"install-ohif failed:\n{result.stdout}\n{result.stderr}"
            assert f"installed @ohif/app {OHIF_VERSION}" in result.stdout
    assert installed_version(target) == OHIF_VERSION
    return target
