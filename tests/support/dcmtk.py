"""Running DCMTK's command-line peers the way a modality would, and reading what they were told."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# storescu option that proposes a file's own transfer syntax (plus uncompressed fallbacks).
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}

_STATUS_RE = re.compile(r"Received Store Response.*?\(([^)]*)\)")
_HEX_RE = re.compile(r"0x([0-9A-Fa-f]{4})")
_COMMENT_RE = re.compile(r"\(0000,0902\)\s+LO\s+\[([^\]]*)\]")


def dcmtk_env() -> dict[str, str]:
    """DCMTK keeps Nagle's algorithm on unless told (SPEC §9): ~40 ms per C-STORE otherwise."""
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class StoreResult:
    returncode: int
    status: int | None  # None: no response was received (association refused, file unreadable)
    error_comment: str
    output: str

    @property
    def success(self) -> bool:
        return self.status == 0


def echoscu(port: int, aec: str = "PACS", aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=30)


def storescu(port: int, files: list[Path], ts_option: str = "-xe", aec: str = "PACS", aet: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> StoreResult:
    """Send ``files`` on one association; returns the status of the last response received."""
    cmd = ["storescu", "-d", "-nh", "-aet", aet, "-aec", aec, ts_option, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=600)
    output = proc.stdout + proc.stderr
    status = None
    statuses = _STATUS_RE.findall(output)
    if statuses:
        hexes = _HEX_RE.findall(statuses[-1])
        status = int(hexes[0], 16) if hexes else (0 if "Success" in statuses[-1] else None)
    comments = _COMMENT_RE.findall(output)
    return StoreResult(proc.returncode, status, comments[-1].strip() if comments else "", output)
