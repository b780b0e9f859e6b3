"""Running DCMTK's command-line peers the way a modality would, and reading what they were told."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from tests.support.net import free_port, listens, wait_until

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


def echoscu(port: int, aec: str = "PACS", aet: str = "ECHOSCU",
            host: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aet", aet, "-aec", aec, host, str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=30)


def findscu_datasets(port: int, out: Path, keys: list[str], aet: str = "QUERYSCU",
                     aec: str = "PACS") -> list[pydicom.Dataset]:
    """A Study Root C-FIND by DCMTK's findscu (``-k`` keys); the responses it wrote to ``out`` (created), in order.
    It must succeed."""
    out.mkdir(parents=True)
    cmd = [dcmtk("findscu"), "-S", "-aet", aet, "-aec", aec, "-X", "-od", str(out)]
    for key in keys:
        cmd += ["-k", key]
    proc = subprocess.run([*cmd, "127.0.0.1", str(port)], capture_output=True, env=dcmtk_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def storescu(port: int, files: list[Path], ts_option: str = "-xe", aec: str = "PACS", aet: str = "STORESCU",
             extra: tuple[str, ...] = (), host: str = "127.0.0.1") -> StoreResult:
    """Send ``files`` on one association; returns the status of the last response received."""
    cmd = [dcmtk("storescu"), "-d", "-nh", "-aet", aet, "-aec", aec, ts_option, *extra, host, str(port),
           *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=600)
    output = proc.stdout + proc.stderr
    statuses = _STATUS_RE.findall(output)
    status = int(statuses[-1], 16) if statuses else None
    comments = _COMMENT_RE.findall(output)
    return StoreResult(proc.returncode, status, comments[-1].strip() if comments else "", output)


_SENDING_RE = re.compile(r"^I: Sending file: (.*)$", re.MULTILINE)
_IGNORED_RE = re.compile(r"^W: .* in file: (.*), ignoring file$", re.MULTILINE)
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2")
_MAX_CONTEXTS = 127  # 128 presentation contexts per association (PS3.8 9.3.2.2), one left for Verification


def _association_profile(files: list[Path], folder: Path) -> Path:
    """A storescu configuration file (DCMTK's asconfig.txt format) whose profile ``Batch`` proposes, for each SOP
    class among ``files``, one presentation context per transfer syntax the files of that class are in, and one
    with the uncompressed syntaxes: every file can go in its own syntax, as ``-x?`` options do for one file."""
    syntaxes: dict[str, set[str]] = {}
    for path in files:
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True)
            sop_class, syntax = str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)
        except Exception:  # storescu will not send what it cannot read either
            continue
        syntaxes.setdefault(sop_class, set()).add(syntax)
    names = {ts: f"TS{i}" for i, ts in enumerate(sorted({ts for group in syntaxes.values() for ts in group}))}
    lines = ["[[TransferSyntaxes]]"]
    for ts, name in names.items():
        lines += [f"[{name}]", f"TransferSyntax1 = {ts}"]
    lines += ["[Uncompressed]", *(f"TransferSyntax{i} = {ts}" for i, ts in enumerate(_UNCOMPRESSED, start=1))]
    contexts = [f"{sop_class}\\{names[ts]}" for sop_class in sorted(syntaxes) for ts in sorted(syntaxes[sop_class])]
    contexts += [f"{sop_class}\\Uncompressed" for sop_class in sorted(syntaxes)]
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts: send these files in smaller batches")
    lines += ["[[PresentationContexts]]", "[Batch]", "PresentationContext1 = 1.2.840.10008.1.1\\Uncompressed"]
    lines += [f"PresentationContext{i} = {cx}" for i, cx in enumerate(contexts, start=2)]
    lines += ["[[Profiles]]", "[Batch]", "PresentationContexts = Batch"]
    path = folder / "storescu.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


def _results_per_file(output: str, returncode: int) -> dict[str, StoreResult]:
    """Cut storescu's ``-d`` output at each ``Sending file:`` line: the status and Error Comment in a file's part
    are the answer to that file."""
    results = {}
    starts = list(_SENDING_RE.finditer(output))
    for n, match in enumerate(starts):
        part = output[match.start():starts[n + 1].start() if n + 1 < len(starts) else len(output)]
        statuses = _STATUS_RE.findall(part)
        comments = _COMMENT_RE.findall(part)
        results[match.group(1).strip()] = StoreResult(returncode, int(statuses[0], 16) if statuses else None,
                                                      comments[0].strip() if comments else "", part)
    return results


def storescu_each(port: int, files: list[Path], aec: str = "PACS", aet: str = "STORESCU") -> list[StoreResult]:
    """Send every file in its own transfer syntax on one storescu association (not one storescu per file) and
    return one result per file, in order: ``status`` None when the file was not sent (storescu could not read
    or convert it). Should the association end early, the files not yet sent go on a new one."""
    results: dict[str, StoreResult] = {}
    pending = list(files)
    with tempfile.TemporaryDirectory(prefix="storescu-") as folder:
        while pending:
            profile = _association_profile(pending, Path(folder))
            cmd = [dcmtk("storescu"), "-d", "-nh", "-xf", str(profile), "Batch", "-aet", aet, "-aec", aec,
                   "127.0.0.1", str(port), *map(str, pending)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=600)
            output = proc.stdout + proc.stderr
            attempted = _results_per_file(output, proc.returncode)
            if not attempted:
                break
            results.update(attempted)
            last = max(i for i, p in enumerate(pending) if str(p) in attempted)
            skipped = set(_IGNORED_RE.findall(output))  # storescu could not read them: never sent
            pending = [p for p in pending[last + 1:] if str(p) not in skipped]
    none = StoreResult(0, None, "", "")
    return [results.get(str(p), none) for p in files]


class ReferenceStoreSCP:
    """DCMTK's storescp in bit-preserving mode: records exactly the dataset bytes a sender put on the wire.

    Files are named after their SOP Instance UID (a resend replaces the file) unless ``unique_names``: then each
    received object gets a file of its own, and :meth:`received_in_order` lists them in the order they came.
    """

    def __init__(self, out_dir: Path, port: int, aet: str = "REFSCP", unique_names: bool = False) -> None:
        self.out_dir, self.port, self.aet = out_dir, port, aet
        self.unique_names = unique_names
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = False

    def start(self, timeout: float = 30.0) -> ReferenceStoreSCP:
        """Start storescp and return once it listens itself; should another process have taken the port in the
        meantime (storescp then exits: address in use), start again: on a new port the first time (read
        :attr:`port` after), on the same one when restarted (peers were told that port)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        naming = "+uf" if self.unique_names else "-uf"
        for attempt in range(3):
            if attempt and self._started:
                time.sleep(1.0)
            elif attempt:
                self.port = free_port()
            log_path = self.out_dir.parent / f"storescp-{self.port}.log"
            with log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [dcmtk("storescp"), "+B", "+xa", "-aet", self.aet, "-od", str(self.out_dir), naming,
                     str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
            self._wait_listening(self.proc, timeout)
            if self.proc.poll() is None:
                self._started = True
                return self
        raise RuntimeError(f"storescp could not listen: {log_path.read_text(errors='replace')[-2000:]}")

    def _wait_listening(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        wait_until(lambda: proc.poll() is not None or listens(proc.pid, self.port), timeout=timeout,
                   interval=0.05, what=f"storescp listening on {self.port}")

    def status(self) -> str:
        """For a failing test's message: is storescp still running, and the end of its log."""
        state = "not started" if self.proc is None else (
            "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}")
        log = self.out_dir.parent / f"storescp-{self.port}.log"
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        return f"storescp on port {self.port}: {state}; log: {tail}"

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def received_in_order(self) -> list[Path]:
        """With ``unique_names``: storescp names each file ``MODALITY.X.<new UID>``, and the last component of the
        UIDs it generates is a counter, so it sorts the files in the order they were received."""
        assert self.unique_names, "only unique names keep every object and their order"
        return sorted(self.received(), key=lambda p: int(p.name.rsplit(".", 1)[1]))

    def clear(self) -> None:
        for p in self.received():
            p.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
