"""Metrics, health probes and logs without patient data (issue 17, must-show 4).

One stack for the module: `pacs serve` (its /metrics allowed to a foreign network only, so a scrape needs an ops
token) and `pacs scp` with its metrics port, both logging JSON at DEBUG, on PostgreSQL and Redis (the broker), each
behind a fault proxy, and a filesystem store. An ingest is scraped while DCMTK's storescu is held mid-association
(a FIFO among its files: no timing involved); the last tests take the index, the broker and the store away in turn
and give them back. The fast-tier tests at the end check the pieces in-process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from pacs import health, metrics
from pacs.db.models import Base, DerivedTask, ForwardJob
from pacs.logging_setup import JsonLinesFormatter
from pacs.metrics_port import allow_list_app
from pacs.security.accounts import create_token
from tests.support.datasets import make_dataset
from tests.support.dcmtk import dcmtk, dcmtk_env, findscu_datasets, storescu
from tests.support.fault_proxy import FaultProxy
from tests.support.http_api import bearer_client, wait_http
from tests.support.inprocess import register_ae
from tests.support.net import free_port, wait_until
from tests.support.stack import REDIS_URL, ScaledStack
from tests.support.tiers import starts_servers

# distinctive values: neither may appear in a log line
PATIENT_NAME = "QUYNHZYX^THAOWQV"
PATIENT_ID = "PIDZ-7741-QX"
STORED = {"source": "c-store", "outcome": "stored"}


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of a scrape (0 when absent: a labelled series appears with its first increment)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def write_study(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, PatientName=PATIENT_NAME,
                          PatientID=PATIENT_ID, PatientBirthDate="19610203", InstanceNumber=i + 1)
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def held_storescu(port: int, first: list[Path], rest: list[Path], gate: Path) -> subprocess.Popen[str]:
    """storescu sending ``first`` on one association, then held: the next file it opens is ``gate``, a FIFO, and
    opening a FIFO blocks until a writer opens it too (:func:`open_gate`). It then reads nothing there, skips it
    (``-nh``: not DICOM, go on) and sends ``rest`` on the same association. DCMTK 3.6's "checking input files"
    does not open the files, so the hold is at exactly that point of the association, whatever the timing."""
    os.mkfifo(gate)
    cmd = [dcmtk("storescu"), "-v", "-nh", "-aet", "STORESCU", "-aec", "PACS", "-xe", "127.0.0.1", str(port),
           *map(str, [*first, gate, *rest])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())


def open_gate(gate: Path) -> bool:
    """Let a :func:`held_storescu` go on; False while it has not reached the gate yet (no reader: ENXIO)."""
    try:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    os.close(fd)
    return True


# -- one stack: `pacs serve` and `pacs scp` on PostgreSQL (behind a fault proxy), Redis, a filesystem store --------

@dataclass
class World:
    stack: ScaledStack
    serve_dicom: int  # `pacs serve`'s DICOM port (its HTTP port is stack.http_url)
    scp_metrics: str  # `pacs scp`'s metrics port
    admin: str  # tokens, made in-process on the test's own connection (a `pacs token create` costs seconds)
    radiologist: str
    broker_proxy: FaultProxy  # between both processes and Redis (the index's is stack.db_proxy)
    objects: Path  # the filesystem store's root


def _token(stack: ScaledStack, role: str) -> str:
    with stack.ctx.sessions() as session, session.begin():
        return create_token(session, f"metrics-{role}", role, days=1).secret


@pytest.fixture(scope="module")
@starts_servers
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("metrics")
    redis_url = make_url(REDIS_URL)
    with ExitStack() as cleanup:
        broker_proxy = FaultProxy(redis_url.host or "127.0.0.1", redis_url.port or 6379).start()
        cleanup.callback(broker_proxy.stop)  # after the stack (which empties its queue through it) has closed
        broker_url = redis_url.set(host="127.0.0.1", port=broker_proxy.port).render_as_string(hide_password=False)
        stack = cleanup.enter_context(ScaledStack(
            root, f"file://{root / 'objects'}", broker_url=broker_url, db_proxy=True,
            extra_env={"PACS_LOG_FORMAT": "json", "PACS_LOG_LEVEL": "DEBUG"}))
        serve_dicom, metrics_port = free_port(), free_port()
        # both start at once (each takes seconds); `pacs serve` in the scaled mode: SCP, API, no workers
        serve = stack.start("serve", ["serve"], {"PACS_DICOM_PORT": str(serve_dicom), "PACS_HL7_PORT": "0",
                                                 # TEST-NET-1: the test's loopback is not in it
                                                 "PACS_METRICS_ALLOW": '["192.0.2.0/24"]'})
        scp = stack.start("scp", ["scp"], {"PACS_METRICS_PORT": str(metrics_port)})
        scp.wait_dicom(stack.port)
        serve.wait_dicom(serve_dicom)
        wait_http(stack.http_url)
        yield World(stack, serve_dicom, f"http://127.0.0.1:{metrics_port}/metrics", _token(stack, "admin"),
                    _token(stack, "radiologist"), broker_proxy, root / "objects")


@pytest.mark.integration
def test_metrics_count_ingest_associations_and_qido(world: World, tmp_path: Path) -> None:
    admin = bearer_client(world.stack.http_url, world.admin)

    def scrape() -> str:
        return admin.get("/metrics").text

    def moved(text: str, name: str, **labels: str) -> float:
        return sample(text, name, **labels) - sample(before, name, **labels)

    before = scrape()
    paths = write_study(tmp_path / "study", 5)
    gate = tmp_path / "gate.dcm"
    sender = held_storescu(world.serve_dicom, paths[:3], paths[3:], gate)
    gate_opened = False
    try:
        # scraped mid-ingest: three objects acknowledged, the sender held on its open association
        wait_until(lambda: moved(scrape(), "pacs_ingest_objects_total", **STORED) >= 3, timeout=30,
                   what="the first three objects stored")
        mid = scrape()
        assert sender.poll() is None, sender.communicate()[0][-2000:]
        assert moved(mid, "pacs_ingest_objects_total", **STORED) == 3
        assert moved(mid, "pacs_ingest_seconds_count", source="c-store") == 3
        assert sample(mid, "pacs_dicom_associations_open") == 1
        assert moved(mid, "pacs_dicom_associations_total", result="accepted") == 1
        wait_until(lambda: open_gate(gate), timeout=30, what="storescu at the gate")
        gate_opened = True
    finally:
        # once opened, the gate has no reader any more (storescu went on to the last files): only a sender never
        # let through (an assertion above failed) is opened now or, if not at the gate yet, killed
        if not gate_opened and sender.poll() is None and not open_gate(gate):
            sender.kill()
        try:
            output = sender.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            sender.kill()
            output = sender.communicate()[0]
    assert sender.returncode == 0 and output.count("Received Store Response (Success)") == 5, output[-3000:]

    # the association's close is counted when its connection closes, a moment after storescu exits
    wait_until(lambda: sample(scrape(), "pacs_dicom_associations_open") == 0, timeout=10, what="association closed")
    after = scrape()
    assert {name: moved(after, name, **labels) for name, labels in [
        ("pacs_ingest_objects_total", STORED),
        ("pacs_ingest_seconds_count", {"source": "c-store"}),
        ("pacs_dicom_associations_total", {"result": "accepted"}),
    ]} == {"pacs_ingest_objects_total": 5, "pacs_ingest_seconds_count": 5, "pacs_dicom_associations_total": 1}
    assert sample(after, "pacs_process_info", role="serve") == 1
    # the queues, read on PostgreSQL: no worker runs, so the series' derived work waits (the instances' fragments
    # were made at ingest: their rows are done)
    assert sample(after, "pacs_index_up") == 1
    assert sum(sample(after, "pacs_queue_jobs", queue="derived", state=s) for s in ("pending", "queued")) >= 1

    qido = admin.get("/dicom-web/studies", params={"PatientID": PATIENT_ID, "PatientName": "QUYNHZYX*"})
    assert qido.status_code == 200 and len(qido.json()) == 1, qido.text[:300]
    last = scrape()
    assert sample(last, "pacs_qido_seconds_count", level="studies") - sample(after, "pacs_qido_seconds_count",
                                                                             level="studies") == 1

    # a C-FIND by DCMTK's findscu (a registered querier): its latency is observed under its level
    register_ae(world.stack.ctx, "QUERYSCU", "127.0.0.1", 104, archive_wide=True)
    found = findscu_datasets(world.serve_dicom, tmp_path / "find",
                             ["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT_ID}", "StudyInstanceUID"])
    assert len(found) == 1
    final = scrape()
    assert sample(final, "pacs_dimse_find_seconds_count", level="STUDY") - sample(
        last, "pacs_dimse_find_seconds_count", level="STUDY") == 1
    assert sample(final, "pacs_dimse_find_seconds_bucket", level="STUDY", le="+Inf") >= 1
    assert sample(final, "pacs_index_errors_total", operation="c-find") == sample(
        before, "pacs_index_errors_total", operation="c-find")


@pytest.mark.integration
def test_metrics_need_an_allowed_address_or_an_ops_token(world: World) -> None:
    anonymous = httpx.get(f"{world.stack.http_url}/metrics", timeout=30)
    assert anonymous.status_code == 401, anonymous.text
    assert "pacs_ingest" not in anonymous.text
    radiologist = bearer_client(world.stack.http_url, world.radiologist)
    assert radiologist.get("/metrics").status_code == 403
    # `pacs scp`'s metrics port, default allow list (loopback): no token
    assert httpx.get(world.scp_metrics, timeout=10).status_code == 200


@pytest.mark.integration
def test_scp_metrics_port_counts_its_ingest(world: World, tmp_path: Path) -> None:
    before = httpx.get(world.scp_metrics, timeout=10).text
    assert sample(before, "pacs_process_info", role="scp") == 1
    result = storescu(world.stack.port, write_study(tmp_path / "study", 2))
    assert result.success, result.output[-2000:]
    after = httpx.get(world.scp_metrics, timeout=10).text
    stored = {"source": "c-store", "outcome": "stored"}
    assert sample(after, "pacs_ingest_objects_total", **stored) - sample(
        before, "pacs_ingest_objects_total", **stored) == 2


@pytest.mark.integration
def test_logs_are_json_lines_without_patient_data(world: World, tmp_path: Path) -> None:
    result = storescu(world.serve_dicom, write_study(tmp_path / "again", 1))
    assert result.success, result.output[-2000:]
    for name, role in (("serve", "serve"), ("scp", "scp")):
        log_text = (world.stack.root / f"{name}.log").read_text(errors="replace")
        records = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
        assert any(r["logger"] == "dicom_scp" and r["role"] == role for r in records), log_text[-2000:]
        assert all({"time", "level", "logger", "message", "role"} <= r.keys() for r in records)
        for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, "19610203"):
            assert secret not in log_text, f"{secret} is in {name}.log"


def ready_checks(world: World) -> tuple[int, dict[str, str]]:
    """`pacs serve`'s /health/ready: (status, checks); it answers within a few seconds whatever is down."""
    started = time.monotonic()
    answer = httpx.get(f"{world.stack.http_url}/health/ready", timeout=10)
    assert time.monotonic() - started < 4
    return answer.status_code, answer.json()["checks"]


def refused_ingest(world: World, folder: Path) -> None:
    """One object to `pacs scp` (scraped through its metrics port, which needs neither a token nor the index):
    answered with a failure status (not acknowledged, and not an association refused before any C-STORE)."""
    result = storescu(world.stack.port, write_study(folder, 1))
    assert result.status is not None and result.status & 0xF000 in (0xA000, 0xC000), result.output[-2000:]


def errors(world: World) -> tuple[float, float]:
    """`pacs scp`'s (store, index) ingest error counts."""
    text = httpx.get(world.scp_metrics, timeout=10).text
    return sample(text, "pacs_store_errors_total", operation="ingest"), sample(
        text, "pacs_index_errors_total", operation="ingest")


ALL_OK = {"index": "ok", "storage": "ok", "broker": "ok"}


@pytest.mark.integration
def test_ready_follows_the_index(world: World, tmp_path: Path) -> None:
    """The last tests take the index, the broker and the store away in turn (and give each back)."""
    url = world.stack.http_url
    assert httpx.get(f"{url}/health/live", timeout=10).json() == {"status": "ok"}
    assert ready_checks(world) == (200, ALL_OK)
    store_errors, index_errors = errors(world)

    proxy = world.stack.db_proxy
    assert proxy is not None
    proxy.cut()
    try:
        status, checks = ready_checks(world)
        assert status == 503 and checks["index"].startswith("unavailable"), checks
        assert checks["storage"] == "ok" and checks["broker"] == "ok"
        down = httpx.get(f"{url}/health/ready", timeout=10).json()
        assert down["code"] == "not_ready" and down["message"].startswith("index: unavailable"), down
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503  # the older name: the same answer
        started = time.monotonic()
        scraped = httpx.get(world.scp_metrics, timeout=10)  # an allowed address needs no token (nor the index)
        assert scraped.status_code == 200 and sample(scraped.text, "pacs_index_up") == 0
        assert time.monotonic() - started < 4
        # an ingest meanwhile is refused (the object cannot be indexed) and counted as an index error
        refused_ingest(world, tmp_path / "cut")
        assert errors(world) == (store_errors, index_errors + 1)
    finally:
        proxy.restore()
    wait_until(lambda: ready_checks(world)[0] == 200, timeout=20, interval=0.5, what="ready again")


@pytest.mark.integration
def test_ready_follows_the_broker(world: World) -> None:
    world.broker_proxy.cut()
    try:
        status, checks = ready_checks(world)
        assert status == 503 and checks["broker"].startswith("unavailable"), checks
        assert checks["index"] == "ok" and checks["storage"] == "ok"
    finally:
        world.broker_proxy.restore()
    wait_until(lambda: ready_checks(world) == (200, ALL_OK), timeout=20, interval=0.5, what="ready again")


@pytest.mark.integration
def test_ready_follows_the_store(world: World, tmp_path: Path) -> None:
    """The filesystem store's root gone (an unmounted volume): storage fails, and an ingest is counted as a
    store error. The store never recreates its root, so putting it back is the whole repair."""
    store_errors, index_errors = errors(world)
    away = world.objects.with_name("objects.unmounted")
    world.objects.rename(away)
    try:
        status, checks = ready_checks(world)
        assert status == 503 and checks["storage"].startswith("unavailable"), checks
        assert checks["index"] == "ok" and checks["broker"] == "ok"
        refused_ingest(world, tmp_path / "unmounted")
        assert errors(world) == (store_errors + 1, index_errors)
        assert not world.objects.exists()
    finally:
        away.rename(world.objects)
    assert ready_checks(world) == (200, ALL_OK)


# -- fast tier ----------------------------------------------------------------------------------------------

def test_json_formatter_one_line_per_record() -> None:
    formatter = JsonLinesFormatter()
    try:
        raise ValueError("two\nlines")
    except ValueError:
        record = logging.LogRecord("pacs.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here" and entry["level"] == "ERROR" and entry["logger"] == "pacs.x"
    assert "ValueError: two\nlines" in entry["exception"] and entry["role"] and entry["time"].endswith("+00:00")


def test_allow_list() -> None:
    allowed = metrics.parse_allow_list(["127.0.0.1", "::1", "10.1.0.0/16"])
    assert metrics.peer_allowed("127.0.0.1", allowed) and metrics.peer_allowed("10.1.200.3", allowed)
    assert metrics.peer_allowed("::ffff:10.1.0.9", allowed) and metrics.peer_allowed("::1", allowed)
    assert not metrics.peer_allowed("10.2.0.1", allowed) and not metrics.peer_allowed("testclient", allowed)
    with pytest.raises(ValueError, match="not an address"):
        metrics.parse_allow_list(["10.0.0.0/8", "evil.example"])

    app = allow_list_app(lambda environ, start: (start("200 OK", []), [b"ok"])[1], allowed)
    statuses: list[str] = []
    assert list(app({"REMOTE_ADDR": "10.1.0.1"}, lambda status, headers: statuses.append(status))) == [b"ok"]
    app({"REMOTE_ADDR": "192.0.2.1"}, lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK", "403 Forbidden"]


def _index(tmp_path: Path) -> sessionmaker[Any]:
    engine = create_engine(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    Base.metadata.create_all(engine)
    return sessionmaker(engine)


def test_queue_depths_count_unfinished_jobs_only(tmp_path: Path) -> None:
    sessions = _index(tmp_path)
    with sessions() as session, session.begin():
        for n, state in enumerate(["pending", "pending", "queued", "done", "done", "failed"]):
            session.add(DerivedTask(kind="thumbnail", subject_uid=f"1.2.{n}", sha256="", state=state))
        for n, (ae, state) in enumerate([("A", "pending"), ("A", "sent"), ("B", "pending"), ("C", "failed"),
                                         ("C", "pending"), ("C", "sent")]):
            session.add(ForwardJob(destination_ae=ae, sop_instance_uid=f"1.3.{n}", sha256="x", state=state))
    collector = metrics.QueueCollector(sessions)
    families = {f.name: f for f in collector.collect()}
    assert [s.value for s in families["pacs_index_up"].samples] == [1]
    depths = {(s.labels["queue"], s.labels["state"]): s.value for s in families["pacs_queue_jobs"].samples}
    assert depths[("derived", "pending")] == 2 and depths[("derived", "queued")] == 1
    assert depths[("derived", "failed")] == 1 and ("derived", "done") not in depths
    assert depths[("forward", "pending")] == 3 and depths[("forward", "failed")] == 1
    assert depths[("hl7", "pending")] == 0 and depths[("commitment", "failed")] == 0


def test_queue_depths_failing_or_hanging_index_scrapes_as_down() -> None:
    def broken() -> Any:
        raise OSError("connection refused")

    collector = metrics.QueueCollector(broken)  # type: ignore[arg-type]
    assert [f.name for f in collector.collect()] == ["pacs_index_up"]
    release = threading.Event()

    def hanging() -> Any:
        release.wait(10)
        raise OSError("late")

    collector = metrics.QueueCollector(hanging, timeout_s=0.3)  # type: ignore[arg-type]
    started = time.monotonic()
    families = list(collector.collect())
    assert families[0].samples[0].value == 0 and time.monotonic() - started < 1.5
    assert next(iter(collector.collect())).samples[0].value == 0  # the hung read is not started twice
    release.set()


def test_readiness_names_the_check_that_hangs() -> None:
    release = threading.Event()

    class HangingEngine:
        def connect(self) -> Any:
            release.wait(10)
            raise OSError("late")

    class Store:
        def ping(self) -> None:
            return None

    ctx: Any = SimpleNamespace(settings=SimpleNamespace(broker_url=""), engine=HangingEngine(), store=Store())
    started = time.monotonic()
    ok, checks = health.readiness(ctx, timeout_s=0.3, bounded=health.Bounded())
    assert time.monotonic() - started < 1.5
    assert not ok and checks["storage"] == "ok" and checks["index"].startswith("unavailable: no answer")
    release.set()
