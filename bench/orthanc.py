"""Debian's Orthanc (``apt-get install orthanc``) on loopback, as a reference point for the ingest benchmark.

Each :class:`OrthancServer` gets its own storage folder and SQLite index under ``workdir``, free DICOM and
HTTP ports, no plugins, and ``TCP_NODELAY=1`` in its environment (DCMTK, which Orthanc's DICOM layer is
built on, keeps Nagle's algorithm on otherwise: ~40 ms per C-STORE response). Given ``postgresql_database``, its
index is that PostgreSQL database instead (Debian's ``orthanc-postgresql`` index plugin, the files still in the
storage folder): the reference issue 13 names for our scaled mode.

    server = OrthancServer(tmp / "orthanc").start()   # waits until C-ECHO and GET /system answer
    ... storescu -aec ORTHANC 127.0.0.1 server.dicom_port ...
    server.count_instances(); server.rss_bytes()
    server.stop()
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import psutil

from tests.support.dcmtk import dcmtk
from tests.support.net import free_port, wait_until

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")
AE_TITLE = "ORTHANC"
# Debian's orthanc-postgresql names its plugins with their version (libOrthancPostgreSQLIndex.so.4.0)
POSTGRESQL_PLUGIN_GLOB = "/usr/lib/orthanc/libOrthancPostgreSQLIndex.so*"
# The index plugin's connection pool: its default, 1 (one index transaction at a time), is also its fastest here:
# 4 parallel associations of 300 CT slices, 298 and 316 instances/s with 1 connection against 200 and 169 with 4
# (runs alternated; with 1 association no difference: 187/195 against 199/176)
POSTGRESQL_INDEX_CONNECTIONS = 1


def find_orthanc() -> str | None:
    """Path of the Orthanc executable ($ORTHANC_BIN, /usr/sbin/Orthanc, or on $PATH), or None."""
    for candidate in (ORTHANC_BIN, shutil.which("Orthanc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_postgresql_index_plugin() -> str | None:
    """Path of the PostgreSQL index plugin ($ORTHANC_POSTGRESQL_PLUGIN, else Debian's orthanc-postgresql), or None."""
    candidates = [os.environ.get("ORTHANC_POSTGRESQL_PLUGIN", ""), *sorted(glob.glob(POSTGRESQL_PLUGIN_GLOB))]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def postgresql_plugin_version() -> str:
    plugin = find_postgresql_index_plugin()
    if plugin is None:
        return "not installed"
    match = re.search(r"\.so\.(\d+(\.\d+)*)$", plugin)
    return match.group(1) if match else os.path.basename(plugin)


def orthanc_version() -> str:
    exe = find_orthanc()
    if exe is None:
        return "not installed"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else (out.strip().splitlines() or ["unknown"])[0]


class OrthancServer:
    """One Orthanc process with an empty store, owned by the benchmark."""

    def __init__(self, workdir: Path, startup_timeout: float = 60.0, postgresql_database: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.postgresql_database = postgresql_database
        self.startup_timeout = startup_timeout
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, object]:
        storage = self.workdir / "storage"
        return {
            "Name": "bench-orthanc",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": AE_TITLE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            **(self._postgresql_index() if self.postgresql_database else {}),
        }

    def _postgresql_index(self) -> dict[str, object]:
        """The index in ``postgresql_database`` on the local server (trust auth for ``postgres``), files on disk."""
        plugin = find_postgresql_index_plugin()
        if plugin is None:
            raise RuntimeError("Orthanc's PostgreSQL index plugin not found (apt-get install orthanc-postgresql), "
                               "or set ORTHANC_POSTGRESQL_PLUGIN")
        return {
            "Plugins": [plugin],
            "PostgreSQL": {
                "EnableIndex": True,
                "EnableStorage": False,
                "Host": "127.0.0.1",
                "Port": 5432,
                "Database": self.postgresql_database,
                "Username": "postgres",
                "Password": "",
                "Lock": False,
                "IndexConnectionsCount": POSTGRESQL_INDEX_CONNECTIONS,
            },
        }

    def start(self) -> OrthancServer:
        exe = find_orthanc()
        if exe is None:
            raise RuntimeError("Orthanc not found (apt-get install orthanc), or set ORTHANC_BIN")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([exe, str(self.config_path)], cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"}, start_new_session=True)
        log.close()
        try:
            wait_until(self._ready, timeout=self.startup_timeout, interval=0.3,
                       what=f"Orthanc on DICOM port {self.dicom_port} / HTTP port {self.http_port}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"Orthanc exited during startup:\n{self.log_tail()}")
        echo = subprocess.run([dcmtk("echoscu"), "-aet", "BENCH", "-aec", AE_TITLE, "127.0.0.1",
                               str(self.dicom_port)], capture_output=True, env={**os.environ, "TCP_NODELAY": "1"},
                              timeout=10)
        if echo.returncode != 0:
            return False
        try:
            return httpx.get(f"{self.base_url}/system", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def count_instances(self) -> int:
        response = httpx.get(f"{self.base_url}/statistics", timeout=30)
        response.raise_for_status()
        return int(response.json()["CountInstances"])

    def system(self) -> dict[str, object]:
        response = httpx.get(f"{self.base_url}/system", timeout=10)
        response.raise_for_status()
        return response.json()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.alive() and self.proc is not None else []

    def rss_bytes(self) -> int:
        if self.proc is None:
            return 0
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).memory_info().rss
        return 0

    def stop(self, timeout: float = 30) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no Orthanc log)"

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
