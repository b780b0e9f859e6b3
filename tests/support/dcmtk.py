"""Running DCMTK's command-line peers the way a modality would, and reading what they were told."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

# pynetdicom installs its own echoscu/storescu/... into the virtualenv's bin folder, ahead of
# DCMTK's on PATH: always call DCMTK's by absolute path.
DCMTK_BIN = Path(os.environ.get("DCMTK_BIN", "/usr/bin"))


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        raise FileNotFoundError(f"DCMTK's {tool} not found in {DCMTK_BIN} (apt-get install dcmtk)")
    return str(path)


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

_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")
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
    return subprocess.run([dcmtk("echoscu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=30)


def storescu(port: int, files: list[Path], ts_option: str = "-xe", aec: str = "PACS", aet: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> StoreResult:
    """Send ``files`` on one association; returns the status of the last response received."""
    cmd = [dcmtk("storescu"), "-d", "-nh", "-aet", aet, "-aec", aec, ts_option, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=600)
    output = proc.stdout + proc.stderr
    statuses = _STATUS_RE.findall(output)
    status = int(statuses[-1], 16) if statuses else None
    comments = _COMMENT_RE.findall(output)
    return StoreResult(proc.returncode, status, comments[-1].strip() if comments else "", output)


class ReferenceStoreSCP:
    """DCMTK's storescp in bit-preserving mode: records exactly the dataset bytes a sender put on the wire."""

    def __init__(self, out_dir: Path, port: int, aet: str = "REFSCP") -> None:
        self.out_dir, self.port, self.aet = out_dir, port, aet
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ReferenceStoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = (self.out_dir.parent / f"storescp-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "+B", "+xa", "-aet", self.aet, "-od", str(self.out_dir), "-uf", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
        return self

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def clear(self) -> None:
        for p in self.received():
            p.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
