"""Several DICOM receiving processes on one port (issue 13: `pacs serve` with ``PACS_DICOM_PROCESSES=2``).

One `pacs serve` for the module, two receiving processes on its DICOM port (one listening socket they all accept
from), small association limits (12 in all, 8 per address, none reserved) so they can be filled from the test:

- concurrent storescu associations are spread over both processes (each process's C-STOREs are
  counted in ``pacs_dicom_receiver_objects_total{receiver}`` on the parent's /metrics), every instance is
  indexed, and its thumbnail made once;
- the rest runs once, in the parent: one task owner (the derived-work pool) in the index, the HTTP port bound
  by the parent only, a storage-commitment request sent to either process answered with one N-EVENT-REPORT;
- the association limits hold across the processes (8 associations from one address held in both of them: a
  9th is rejected whichever process takes it; 12 in all: a 13th from a third address is rejected);
- a receiving process that is killed is started again, and the port keeps working;
- SIGTERM: an association open at that moment still stores, new connections are refused, the command exits 0
  and no receiving process is left;
- a receiving process that cannot start (a TLS key that is not there) is not restarted: the supervisor gives
  up and ``pacs serve`` exits non-zero, leaving no process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from pacs.commitment.service import SopRef
from pacs.db.models import DerivedTask, Instance, Series, Study, TaskOwner
from pacs.dimse_responses import rejection_of
from pacs.receiving_processes import ReceivingProcesses
from pacs.settings import Settings
from pacs.shared_limits import SharedLimits
from tests.support.commitment_modality import Modality
from tests.support.datasets import make_dataset
from tests.support.dcmtk import storescu
from tests.support.inprocess import register_ae
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import PACS
from tests.support.stack import EmbeddedPacs, embedded_env

pytestmark = pytest.mark.integration

MAX_ASSOCIATIONS = 12
PER_PEER = 8
SENDERS = 16  # storescu associations, 8 at a time: all on one process by chance is 2 in 2^16
FILES_PER_SENDER = 4
LOCAL_LIMIT = (2, 3, 2)  # A-ASSOCIATE-RJ: rejected-transient, local limit exceeded


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    server = EmbeddedPacs(tmp_path_factory.mktemp("processes"), {
        "PACS_DICOM_PROCESSES": "2",
        "PACS_MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
        "PACS_MAX_ASSOCIATIONS_PER_PEER": str(PER_PEER),
        "PACS_DICOM_RESERVED_ASSOCIATIONS": "0",
        "PACS_DICOM_DRAIN_S": "20",
        # held associations stay open while the limit test works (the suite's default closes them idle after 3 s,
        # which on a loaded machine freed a slot in the middle of the test)
        "PACS_NETWORK_TIMEOUT_S": "60",
        "PACS_METRICS_ALLOW": '["127.0.0.1"]',
        "PACS_LOG_LEVEL": "INFO"})
    try:
        yield server
    finally:
        server.close()


def receivers(pacs: EmbeddedPacs) -> list[psutil.Process]:
    """The receiving processes of the module's `pacs serve`: forked (its command line) or spawned (started again);
    not multiprocessing's resource tracker."""
    assert pacs.proc.proc is not None
    parent = psutil.Process(pacs.proc.proc.pid)
    found = []
    for child in parent.children():
        with contextlib.suppress(psutil.Error):
            cmdline = child.cmdline()
            if cmdline == parent.cmdline() or any("spawn_main" in part for part in cmdline):
                found.append(child)
    return found


def listening_sockets(proc: psutil.Process) -> dict[int, set[int]]:
    """Listening port -> the inodes of the process's sockets listening on it (one shared socket: one inode)."""
    ports: dict[int, set[int]] = {}
    for c in proc.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN:
            ports.setdefault(c.laddr.port, set()).add(os.stat(f"/proc/{proc.pid}/fd/{c.fd}").st_ino)
    return ports


def scrape(pacs: EmbeddedPacs) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{pacs.http_url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


def write_files(folder: Path, study: str, series: str, n: int, first: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=first + k)
        path = folder / f"{first + k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def instances_of(pacs: EmbeddedPacs, study: str) -> list[str]:
    with pacs.ctx.read_sessions() as session:
        return list(session.scalars(select(Instance.sop_instance_uid).join(Series).join(Study)
                                    .where(Study.study_instance_uid == study)))


def associate(port: int, aet: str = "HOLDER", source: str = "127.0.0.1") -> Association:
    ae = AE(ae_title=aet)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="PACS", bind_address=(source, 0))


def holder_of(pacs: EmbeddedPacs, assoc: Association) -> int:
    """The pid of the receiving process that holds this association's connection (0: none found)."""
    local_port = assoc.dul.socket.socket.getsockname()[1]  # type: ignore[union-attr]
    for proc in receivers(pacs):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == pacs.port and conn.raddr and conn.raddr.port == local_port:
                    return proc.pid
    return 0


def test_both_processes_receive_and_every_instance_is_indexed_once(pacs: EmbeddedPacs, tmp_path: Path) -> None:
    assert len(receivers(pacs)) == 2
    before = scrape(pacs)
    study = generate_uid()
    batches = [write_files(tmp_path / f"s{i}", study, generate_uid(), FILES_PER_SENDER, 1)
               for i in range(SENDERS)]
    with ThreadPoolExecutor(PER_PEER) as pool:
        results = list(pool.map(lambda files: storescu(pacs.port, files), batches))
    assert all(r.success for r in results), [r.output[-1500:] for r in results if not r.success]
    total = SENDERS * FILES_PER_SENDER

    after = scrape(pacs)
    per_receiver = {n: after.get(("pacs_dicom_receiver_objects_total", (("receiver", n),)), 0.0)
                    - before.get(("pacs_dicom_receiver_objects_total", (("receiver", n),)), 0.0) for n in ("1", "2")}
    assert per_receiver["1"] > 0 and per_receiver["2"] > 0, per_receiver  # both processes received
    assert sum(per_receiver.values()) == total
    stored = ("pacs_ingest_objects_total", (("outcome", "stored"), ("source", "c-store")))
    assert after[stored] - before.get(stored, 0.0) == total  # the children's counts reach the parent's /metrics

    assert len(instances_of(pacs, study)) == total

    def derived_settled() -> bool:
        with pacs.ctx.read_sessions() as session:
            return not session.scalar(select(func.count()).select_from(DerivedTask)
                                      .where(DerivedTask.state.in_(("pending", "queued", "running"))))

    wait_until(derived_settled, timeout=120, what="derived work done")
    instances = set(instances_of(pacs, study))
    with pacs.ctx.read_sessions() as session:
        thumbnails = session.execute(select(DerivedTask.subject_uid, DerivedTask.state, DerivedTask.attempts)
                                     .where(DerivedTask.kind == "thumbnail",
                                            DerivedTask.subject_uid.in_(instances))).all()
    assert sorted(uid for uid, _, _ in thumbnails) == sorted(instances)  # one thumbnail task per instance
    assert {state for _, state, _ in thumbnails} == {"done"}
    assert max(attempts for _, _, attempts in thumbnails) <= 1  # none run twice


def test_the_rest_runs_once_in_the_parent(pacs: EmbeddedPacs, tmp_path: Path) -> None:
    assert pacs.proc.proc is not None
    parent = psutil.Process(pacs.proc.proc.pid)
    children = receivers(pacs)
    http_port = int(pacs.http_url.rsplit(":", 1)[1])

    in_parent = listening_sockets(parent)
    assert http_port in in_parent
    for child in children:
        # DICOM only, no HTTP, no HL7 there; on the one socket the parent made and keeps (never accepting from it)
        # so that a receiving process started again finds the connections that waited meanwhile
        assert listening_sockets(child) == {pacs.port: in_parent[pacs.port]}
    assert len(in_parent[pacs.port]) == 1
    with pacs.ctx.read_sessions() as session:
        owners = set(session.scalars(select(TaskOwner.pid)))
    assert owners == {parent.pid}  # one derived-work pool (its heartbeat row), the parent's

    # storage commitment: the request reaches a receiving process, the one report comes from the parent
    modality = Modality().listen()
    try:
        register_ae(pacs.ctx, modality.ae_title, "127.0.0.1", modality.port, archive_wide=True)
        study, series = generate_uid(), generate_uid()
        files = write_files(tmp_path / "commit", study, series, 2, 1)
        assert storescu(pacs.port, files).success
        uids = instances_of(pacs, study)
        transactions = [modality.commit(pacs.port, [SopRef(SecondaryCaptureImageStorage, uid) for uid in uids])
                        for _ in range(4)]  # four associations: both processes get some with 15 in 16
        for transaction in transactions:
            event_type, info = modality.wait_report(transaction, timeout=30)
            assert event_type == 1 and len(info.ReferencedSOPSequence) == 2
        time.sleep(3)  # a second reporter would have sent its copy by now (it polls every 2 s)
        assert all(len(modality.reports_for(t)) == 1 for t in transactions)
    finally:
        modality.stop_listening()


def test_association_limits_hold_across_processes(pacs: EmbeddedPacs) -> None:
    held: list[Association] = []
    try:
        # 8 from one address, in both processes (reconnected until the kernel put some in each)
        for _ in range(40):
            while len(held) < PER_PEER:
                assoc = associate(pacs.port)
                assert assoc.is_established
                held.append(assoc)
            holders = {holder_of(pacs, a) for a in held}
            if len(holders - {0}) == 2:
                break
            held.pop(0).release()
        holders = {holder_of(pacs, a) for a in held}
        assert len(holders - {0}) == 2, holders
        for _ in range(6):  # whichever process takes it: the address has its 8
            assert all(a.is_established for a in held)
            assert rejection_of(associate(pacs.port)) == LOCAL_LIMIT, "a 9th association from one address"
        # 4 more from another address: 12 in all; a 13th from a third address is rejected
        for _ in range(MAX_ASSOCIATIONS - PER_PEER):
            assoc = associate(pacs.port, source="127.0.0.2")
            assert assoc.is_established
            held.append(assoc)
        for _ in range(6):
            assert rejection_of(associate(pacs.port, source="127.0.0.3")) == LOCAL_LIMIT, "a 13th association"
    finally:
        for assoc in held:
            assoc.release()
    wait_until(lambda: _associates(pacs.port, "127.0.0.3"), timeout=10, what="a slot free again once released")


def _associates(port: int, source: str) -> bool:
    assoc = associate(port, source=source)
    established = assoc.is_established
    if established:
        assoc.release()
    return established


def test_a_killed_receiving_process_is_started_again(pacs: EmbeddedPacs, tmp_path: Path) -> None:
    before = {p.pid for p in receivers(pacs)}
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = {p.pid for p in receivers(pacs)}
        return len(now) == 2 and victim not in now

    wait_until(replaced, timeout=120, interval=0.5, what="the receiving process started again")
    # the new one (spawned: a fresh interpreter) was handed the parent's listening socket and accepts from it
    (new,) = [p for p in receivers(pacs) if p.pid not in before]
    assert pacs.proc.proc is not None

    def accepting_on_the_shared_socket() -> bool:
        shared = listening_sockets(psutil.Process(pacs.proc.proc.pid))[pacs.port]
        return listening_sockets(new) == {pacs.port: shared}

    wait_until(accepting_on_the_shared_socket, timeout=60, interval=0.5, what="the new process on the shared socket")
    files = write_files(tmp_path / "after", generate_uid(), generate_uid(), 2, 1)
    wait_until(lambda: all(storescu(pacs.port, files).success for _ in range(8)), timeout=120, interval=1,
               what="stores after the restart")
    assert pacs.proc.alive()


def test_sigterm_drains_open_associations_and_leaves_no_process(pacs: EmbeddedPacs) -> None:
    assert pacs.proc.proc is not None
    children = receivers(pacs)
    assoc = associate(pacs.port, aet="INFLIGHT")
    assert assoc.is_established
    os.killpg(pacs.proc.proc.pid, signal.SIGTERM)  # as systemd and the test harness do: the whole group

    def refused() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", pacs.port), 1):
            return False
        return True

    wait_until(refused, timeout=30, what="the DICOM port closed for new connections")
    status = assoc.send_c_store(make_dataset(PatientID="INFLIGHT"))  # the open association still works
    assert status and status.Status == 0
    assoc.release()
    assert pacs.proc.proc.wait(timeout=60) == 0
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, f"{child.pid} left over"


def test_sigterm_drains_open_associations_with_one_process(tmp_path: Path) -> None:
    """No receiving processes (1, the default on a 1-core host): the same shutdown. SIGTERM used to end `pacs serve`
    with status 143 once uvicorn had stopped, cutting the associations in flight and never stopping the workers."""
    server = EmbeddedPacs(tmp_path, {"PACS_DICOM_DRAIN_S": "20", "PACS_DICOM_PROCESSES": "1"})
    try:
        assert server.proc.proc is not None
        assoc = associate(server.port, aet="INFLIGHT")
        assert assoc.is_established
        os.killpg(server.proc.proc.pid, signal.SIGTERM)

        def refused() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port), 1):
                return False
            return True

        wait_until(refused, timeout=30, what="the DICOM port closed for new connections")
        ds = make_dataset(PatientID="INFLIGHT1")
        status = assoc.send_c_store(ds)  # the open association still works, and what it stored is kept
        assert status and status.Status == 0
        assoc.release()
        assert server.proc.proc.wait(timeout=60) == 0, server.proc.log_tail()
        with server.ctx.read_sessions() as session:
            assert session.scalar(select(func.count()).select_from(Instance)
                                  .where(Instance.sop_instance_uid == ds.SOPInstanceUID)) == 1
    finally:
        server.close()


def test_a_process_that_keeps_dying_is_given_up(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", dicom_host="127.0.0.1", dicom_port=free_port(),
                        dicom_tls_port=free_port(), tls_cert_file=tmp_path / "missing.pem",
                        tls_key_file=tmp_path / "missing.key")
    fatal: list[str] = []
    supervisor = ReceivingProcesses(settings, 1, role="serve", on_fatal=fatal.append).start()
    try:
        with pytest.raises(RuntimeError, match="could not start"):
            supervisor.wait_ready(timeout=180)
        assert fatal and "not restarted" in fatal[0]
        assert supervisor.pids() == []
    finally:
        supervisor.stop()


def test_serve_exits_non_zero_when_its_receiving_processes_keep_dying(tmp_path: Path) -> None:
    """`pacs serve` itself: the same failure ends the command with a non-zero status (no process left)."""
    env = {**os.environ, **embedded_env(tmp_path / "data"), "PACS_DICOM_PROCESSES": "2",
           "PACS_DICOM_TLS_PORT": str(free_port()), "PACS_TLS_CERT_FILE": str(tmp_path / "missing.pem"),
           "PACS_TLS_KEY_FILE": str(tmp_path / "missing.key")}
    proc = subprocess.Popen([PACS, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode not in (0, None), output.decode(errors="replace")[-3000:]
    assert b"not restarted" in output


def _hold_the_limits_lock(limits: SharedLimits) -> None:
    """A receiving process killed inside the shared lock (what SIGKILL or the OOM killer can do)."""
    with limits.locked():
        limits.insert(1, 7)
        time.sleep(120)


@pytest.mark.integration
def test_a_lock_left_by_a_killed_receiving_process_is_freed_by_the_supervisor() -> None:
    ctx = multiprocessing.get_context("spawn")
    limits = SharedLimits(16, ctx)
    holder = ctx.Process(target=_hold_the_limits_lock, args=(limits,))
    holder.start()
    try:
        deadline = time.monotonic() + 60
        while not any(pid == holder.pid for _, pid, *_ in limits.rows()) and time.monotonic() < deadline:
            time.sleep(0.05)  # read without the lock: the holder's row shows it is inside
        assert holder.pid is not None and any(pid == holder.pid for _, pid, *_ in limits.rows())
    finally:
        holder.kill()
        holder.join(timeout=10)
    with pytest.raises(TimeoutError), limits.locked():  # what every other process meets: the dead holder's lock
        pass
    assert limits.purge(holder.pid) == 1  # freed once, the dead process's row dropped
    with limits.locked(), limits.locked():  # usable again, and re-entered within a thread
        assert limits.rows() == []
