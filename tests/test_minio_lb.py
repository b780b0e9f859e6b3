"""The compose stack's object-store balancer (deploy/minio-lb.cfg) keeps the store working when a MinIO node stops.

HAProxy runs the shipped configuration in front of four "nodes", and the PACS's own S3 client writes and reads
through it while one node is taken away: every write it acknowledged is readable, and once the balancer has seen
the node down nothing fails at all.

No Docker here: the four nodes are TCP proxies (tests/support/fault_proxy.py) to the suite's SeaweedFS S3 server,
standing in for four MinIO nodes of one erasure set (any node serves every object); a cut proxy is a node whose
host went down (its connections reset, new ones refused). Three things of the configuration are adapted, each
asserted to be found: the listening address, the server addresses (no Docker DNS), and the health-check path
(SeaweedFS answers ``/healthz`` where MinIO answers ``/minio/health/live``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage import open_store
from storage.base import ObjectStore
from storage.errors import StorageError
from tests.support.fault_proxy import FaultProxy
from tests.support.net import free_port, port_open, wait_until
from tests.support.seaweed import SeaweedS3
from tests.support.tiers import starts_servers

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NODES = 4


def _adapted(cfg: str, port: int, nodes: list[int], stats: Path) -> str:
    """deploy/minio-lb.cfg for loopback: every substitution must find its text (the file under test changed
    otherwise, and this test must be looked at)."""

    def sub(old: str, new: str) -> None:
        nonlocal cfg
        assert cfg.count(old) == 1, f"deploy/minio-lb.cfg no longer has {old!r}"
        cfg = cfg.replace(old, new)

    sub("global\n", f"global\n    stats socket {stats} level admin\n")
    sub("resolvers docker\n    nameserver dns 127.0.0.11:53\n    hold valid 10s\n", "")
    sub(" resolvers docker init-addr last,libc,none", "")
    sub("bind *:9000", f"bind 127.0.0.1:{port}")
    sub("uri /minio/health/live", "uri /healthz")
    for number, node_port in enumerate(nodes, 1):
        sub(f"server minio{number} minio{number}:9000", f"server minio{number} 127.0.0.1:{node_port}")
    return cfg


@dataclass
class Balancer:
    port: int
    nodes: list[FaultProxy]
    stats: Path

    def servers(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of the backend's servers (``show stat``): status, total sessions…"""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows if row["pxname"] == "minio" and row["svname"] != "BACKEND"}

    def status(self, server: str) -> str:
        return self.servers()[server]["status"]


@pytest.fixture(scope="module")
@starts_servers
def balancer(s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    root = tmp_path_factory.mktemp("minio-lb")
    nodes = [FaultProxy("127.0.0.1", s3_server.s3_port).start() for _ in range(NODES)]
    lb = Balancer(free_port(), nodes, root / "stats.sock")
    config = root / "minio-lb.cfg"
    config.write_text(_adapted((DEPLOY / "minio-lb.cfg").read_text(), lb.port, [n.port for n in nodes], lb.stats))
    proc: subprocess.Popen[bytes] | None = None
    try:
        with (root / "haproxy.log").open("wb") as out:
            proc = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: port_open(lb.port) and os.path.exists(lb.stats), timeout=20, what="HAProxy")
        wait_until(lambda: all(row["status"] == "UP" for row in lb.servers().values()), timeout=20,
                   what="the four nodes healthy")
        yield lb
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for node in nodes:
            node.stop()


def _store(s3_server: SeaweedS3, lb: Balancer) -> ObjectStore:
    url = s3_server.url_for(f"pacs-{uuid.uuid4().hex[:12]}")
    # retries=0: the client does not try a failed request again itself, so what saves a write is the balancer
    return open_store(url.replace(s3_server.endpoint, f"127.0.0.1:{lb.port}") + "?retries=0")


def test_losing_one_node_behind_the_balancer_loses_no_acknowledged_object(s3_server: SeaweedS3,
                                                                          balancer: Balancer) -> None:
    store = _store(s3_server, balancer)
    acknowledged: dict[str, bytes] = {}
    failed: list[tuple[float, str]] = []  # (when, error) of writes that raised: cleanly failed, never acknowledged
    stop = threading.Event()

    def write() -> None:
        number = 0
        while not stop.is_set():
            key, body = f"objects/{number:05d}", os.urandom(4096)
            try:
                store.put(key, body)
            except StorageError as exc:
                failed.append((time.monotonic(), repr(exc)))
            else:
                acknowledged[key] = body
            number += 1

    writer = threading.Thread(target=write, name="lb-writer", daemon=True)
    writer.start()
    try:
        wait_until(lambda: len(acknowledged) >= 40, timeout=30, what="40 objects written through the balancer")
        sessions = {name: int(row["stot"]) for name, row in balancer.servers().items()}
        assert all(count > 0 for count in sessions.values()), f"the balancer did not use every node: {sessions}"
        balancer.nodes[1].cut()  # minio2's host goes down in the middle of the writes
        cut_at, before = time.monotonic(), len(acknowledged)
        wait_until(lambda: balancer.status("minio2").startswith("DOWN"), timeout=15,
                   what="the balancer's health check taking minio2 out")
        down_at = time.monotonic()
        wait_until(lambda: len(acknowledged) >= before + 40, timeout=30, what="40 more objects after the loss")
    finally:
        stop.set()
        writer.join(30)
    assert not writer.is_alive()
    # the loss is noticed within the configured check (inter 2 s, fall 2), and writes went on meanwhile
    assert down_at - cut_at < 8
    assert not [error for when, error in failed if when > down_at], failed[:2]
    # a write in flight on the lost node may fail (cleanly: an exception, as C-STORE answers a failure status);
    # the balancer retries the rest on another node
    assert len(failed) <= 2, f"{len(failed)} writes failed, e.g. {failed[:2]}"
    for key, body in acknowledged.items():
        assert store.get_bytes(key) == body, f"{key} acknowledged but not readable as written"
    assert {info.key for info in store.list("objects/")} >= set(acknowledged)
