"""The crash drill's machinery, shared by its short form (tests/test_crash_drills.py) and its long form
(``python -m bench.crash_drill``).

A *round* arms one failpoint (:mod:`pacs.failpoints`) in the process that passes it (`pacs serve`
in the embedded stack; `pacs scp` for ingest points and `pacs worker` for derived points in the
scaled one), sends a small batch with a pynetdicom C-STORE SCU that records, per instance, whether it
was ACKNOWLEDGED (status 0x0000), and waits for the process to SIGKILL itself there. An *outage round*
takes a server away instead (the S3 server, PostgreSQL or Redis cut by a
:class:`~tests.support.fault_proxy.FaultProxy`: connections reset, then refused) while a batch is sent.

Every acknowledged instance is then retrieved by C-GET, from whichever process life is up next, and
compared by SHA-256 with the dataset bytes that were sent: *missing* and *different* must stay 0.
At the end (:meth:`Drill.finish`) every process is restarted without failpoints, everything
acknowledged in every round is retrieved again, derived work must complete, and ``pacs check``
(and ``pacs check --repair`` when the build has it) reports index rows without objects (must be 0),
orphan objects and temporary files.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bench.generate_ct import write_ct_series
from pacs.aes import add_ae
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import DerivedTask, Instance, Series
from pacs.failpoints import ENV_VAR, FAILPOINTS
from pacs.settings import Settings
from tests.support.datasets import dataset_bytes
from tests.support.fault_proxy import FaultProxy
from tests.support.net import free_port, port_open, wait_until
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.postgres import create_database, drop_database
from tests.support.seaweed import SeaweedS3
from tests.support.stack import embedded_env

INGEST_FAILPOINTS = tuple(f for f in FAILPOINTS if f.startswith("ingest."))
DERIVED_FAILPOINTS = tuple(f for f in FAILPOINTS if f.startswith("derived."))
OUTAGES = ("s3-down", "database-down", "broker-down")

SENDER_AE = "DRILL"  # registered with store and retrieve rights, for one facility
FACILITY = "DRILL-HOSPITAL"
SUCCESS = 0x0000
#: The drill's own kills are not a poison object: a task it kills again and again while recovering
#: (PACS_TASK_MAX_CRASHES, 3 by default) must not end `failed`.
DRILL_SETTINGS = {"PACS_TASK_MAX_CRASHES": "1000"}


# -- what is sent, what is acknowledged, what comes back ------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A few small CT slices of a study of their own, each in a series of its own (derived work is one task per
    series: every armed hit count of a derived failpoint is reached by one batch), with the SHA-256 of each
    one's dataset bytes."""

    study_uid: str
    files: tuple[Path, ...]
    sha256: dict[str, str]  # SOP Instance UID -> SHA-256 of the dataset bytes on the wire

    @classmethod
    def make(cls, folder: Path, slices: int, size: int = 32) -> Batch:
        patient_id, study_uid = f"DRILL-{uuid.uuid4().hex[:6]}", generate_uid()
        files = [f for n in range(slices) for f in write_ct_series(folder / f"series-{n}", slices=1, size=size,
                                                                    patient_id=patient_id, study_uid=study_uid)]
        sha = {}
        for path in files:
            data = path.read_bytes()
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            sha[sop] = hashlib.sha256(dataset_bytes(data)).hexdigest()
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        return cls(study, tuple(files), sha)

    def sop_of(self, path: Path) -> str:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@dataclass
class Sent:
    """What a sender was told, per instance: the status, or None when no response came."""

    statuses: dict[str, int | None] = field(default_factory=dict)
    note: str = ""

    @property
    def acknowledged(self) -> list[str]:
        return [sop for sop, status in self.statuses.items() if status == SUCCESS]


def send_batch(port: int, batch: Batch, only: set[str] | None = None, aet: str = SENDER_AE) -> Sent:
    """One association; each file's dataset bytes sent exactly as on disk (Explicit VR LE)."""
    sent = Sent()
    files = [(batch.sop_of(p), p) for p in batch.files]
    files = [(sop, p) for sop, p in files if only is None or sop in only]
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
        if not assoc.is_established:
            sent.note = "association not established"
            sent.statuses = {sop: None for sop, _ in files}
            return sent
        try:
            for sop, path in files:
                sent.statuses[sop] = None
                if not assoc.is_established or assoc.is_aborted:
                    continue  # no association left: never sent, never acknowledged
                try:
                    status = assoc.send_c_store(path)
                except Exception as exc:  # the server died under us: no response is no acknowledgement
                    sent.note = f"{type(exc).__name__}: {exc}"[:200]
                    assoc.abort()
                    continue
                if status and "Status" in status:
                    sent.statuses[sop] = int(status.Status)
                else:  # no response (the server died): the association is gone, do not wait on it
                    assoc.abort()
        finally:
            with contextlib.suppress(Exception):
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return sent


def c_get_study(port: int, study_uid: str, aet: str = SENDER_AE) -> dict[str, str] | None:
    """SOP Instance UID -> SHA-256 of the dataset bytes C-GET delivers; None if the retrieve failed."""
    received: dict[str, str] = {}

    def on_store(event: evt.Event) -> int:
        data = event.request.DataSet.getvalue()  # the dataset bytes as they came off the wire
        received[str(event.request.AffectedSOPInstanceUID)] = hashlib.sha256(data).hexdigest()
        return SUCCESS

    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except Exception:
        return None
    if not assoc.is_established:
        return None
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            final = status
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            assoc.release() if assoc.is_established else assoc.abort()
    if final is None or "Status" not in final or int(final.Status) not in (SUCCESS, 0xB000):
        return None
    return received


# -- the stacks -----------------------------------------------------------------------------------


class Stack:
    """What a drill needs of a running archive; see :class:`EmbeddedStack` and :class:`ScaledStack`."""

    mode: str
    port: int
    env: dict[str, str]
    ctx: AppContext  # the drill's own view of the index and the store (not through any proxy)
    root: Path
    s3: SeaweedS3 | None = None
    s3_proxy: FaultProxy | None = None
    db_proxy: FaultProxy | None = None
    broker_proxy: FaultProxy | None = None

    def __init__(self) -> None:
        self.lives = 0
        self.armed: dict[str, str] = {}  # role -> failpoints its current process life armed

    def process_for(self, failpoint: str) -> str:
        """"ingest" or "derived": which of the stack's processes passes ``failpoint``."""
        return "ingest" if failpoint.startswith("ingest.") else "derived"

    def start(self, role: str, failpoints: str = "") -> PacsProcess:
        raise NotImplementedError

    def alive(self, role: str) -> bool:
        raise NotImplementedError

    def proc(self, role: str) -> PacsProcess | None:
        raise NotImplementedError

    def ensure_running(self, except_role: str | None = None) -> None:
        """(Re)start without failpoints every process that is down or armed, but ``except_role``."""
        for role in self.roles():
            if role != except_role and (not self.alive(role) or self.armed.get(role)):
                self.start(role)

    def roles(self) -> tuple[str, ...]:
        raise NotImplementedError

    def ready(self, role: str, timeout: float = 90) -> bool:
        """Wait until the process of ``role`` serves (True) or has died (False)."""
        raise NotImplementedError

    def register_sender(self) -> None:
        with self.ctx.sessions() as session, session.begin():
            add_ae(session, SENDER_AE, "127.0.0.1", 11112, description="crash drill", facility=FACILITY)

    def close(self) -> None:
        for role in self.roles():
            proc = self.proc(role)
            if proc is not None:
                proc.stop()
        self.ctx.close()

    def _life(self, args: list[str], name: str, failpoints: str) -> PacsProcess:
        self.lives += 1
        self.armed["derived" if name == "worker" else "ingest"] = failpoints
        env = {**self.env, ENV_VAR: failpoints} if failpoints else dict(self.env)
        return PacsProcess(args, env, self.root / "logs" / f"{self.lives:03d}-{name}.log").start()


def _dicom_ready(proc: PacsProcess, port: int, timeout: float) -> bool:
    from tests.support.pacs_process import dicom_echo

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        # a connect refused costs next to nothing (an echo's association ~10 ms of CPU): poll the port every 50 ms,
        # echo once it listens; a process life's start is seen within 50 ms
        if port_open(port) and dicom_echo(port):
            return True
        time.sleep(0.05)
    raise TimeoutError(f"pacs {proc.args} not ready after {timeout}s:\n{proc.log_tail()}")


class EmbeddedStack(Stack):
    """`pacs serve`: SQLite, the filesystem store, in-process workers: one process for every failpoint."""

    mode = "embedded"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.env = {**embedded_env(root / "data"), "PACS_SERIES_SETTLE_S": "0.5", "PACS_LOG_LEVEL": "WARNING",
                    **DRILL_SETTINGS}
        self.port = int(self.env["PACS_DICOM_PORT"])
        self.serve: PacsProcess | None = None
        self.start("ingest")
        if not self.ready("ingest"):
            raise RuntimeError(f"pacs serve did not start:\n{self.serve.log_tail() if self.serve else ''}")
        self.ctx = AppContext.create(Settings(data_dir=root / "data"))
        self.register_sender()

    def roles(self) -> tuple[str, ...]:
        return ("ingest",)

    def process_for(self, failpoint: str) -> str:
        return "ingest"

    def proc(self, role: str) -> PacsProcess | None:
        return self.serve

    def alive(self, role: str) -> bool:
        return self.serve is not None and self.serve.alive()

    def start(self, role: str, failpoints: str = "") -> PacsProcess:
        if self.serve is not None:
            self.serve.stop(signal.SIGKILL)
        self.serve = self._life(["serve"], "serve", failpoints)
        return self.serve

    def ready(self, role: str, timeout: float = 90) -> bool:
        assert self.serve is not None
        return _dicom_ready(self.serve, self.port, timeout)


class ScaledStack(Stack):
    """`pacs scp` + `pacs worker` (Celery, Redis) on PostgreSQL and the S3 server; the store, the index and
    the broker are reached through fault proxies the drill can cut (cutting the S3 server's proxy is, to the
    processes, the server gone: it takes ~0.1 s where stopping and restarting SeaweedFS took 4-9 s)."""

    mode = "scaled"

    def __init__(self, root: Path, s3: SeaweedS3, redis_url: str = "redis://127.0.0.1:6379/13") -> None:
        super().__init__()
        self.root = root
        self.s3 = s3
        self.db_name, db_url = create_database()
        url = make_url(db_url)
        self.db_proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432).start()
        redis = make_url(redis_url)
        self.broker_proxy = FaultProxy(redis.host or "127.0.0.1", redis.port or 6379).start()
        self.s3_proxy = FaultProxy("127.0.0.1", s3.s3_port).start()
        storage_url = s3.url_for(f"pacs-drill-{uuid.uuid4().hex[:10]}")  # the drill's own view: direct
        proxied_storage_url = storage_url.replace(f"@{s3.endpoint}/", f"@127.0.0.1:{self.s3_proxy.port}/", 1)
        assert proxied_storage_url != storage_url
        self.env = {
            "PACS_DATA_DIR": str(root / "data"),
            "PACS_DATABASE_URL": url.set(host="127.0.0.1", port=self.db_proxy.port)
            .render_as_string(hide_password=False),
            "PACS_STORAGE_URL": proxied_storage_url,
            "PACS_BROKER_URL": f"redis://127.0.0.1:{self.broker_proxy.port}/{redis.database or 0}",
            "PACS_TASK_QUEUE": f"pacs-drill-{uuid.uuid4().hex[:8]}",  # no other stack consumes our tasks
            "PACS_DICOM_PORT": str(free_port()),
            "PACS_OUTBOX_POLL_S": "0.5",
            "PACS_TASK_REQUEUE_S": "5",  # a killed worker's message comes back (Redis visibility) this soon
            "PACS_SERIES_SETTLE_S": "0.5",
            "PACS_LOG_LEVEL": "WARNING",
            **DRILL_SETTINGS,
        }
        self.port = int(self.env["PACS_DICOM_PORT"])
        self.ctx = AppContext.create(Settings(database_url=db_url, storage_url=storage_url))
        migrate.upgrade(self.ctx.engine)  # what `pacs db upgrade` does, without starting one more process
        self.register_sender()
        self.scp: PacsProcess | None = None
        self.worker: PacsProcess | None = None
        self.start("derived")
        self.start("ingest")
        if not self.ready("ingest"):
            raise RuntimeError(f"pacs scp did not start:\n{self.scp.log_tail() if self.scp else ''}")

    def roles(self) -> tuple[str, ...]:
        return ("ingest", "derived")

    def proc(self, role: str) -> PacsProcess | None:
        return self.scp if role == "ingest" else self.worker

    def alive(self, role: str) -> bool:
        proc = self.proc(role)
        return proc is not None and proc.alive()

    def start(self, role: str, failpoints: str = "") -> PacsProcess:
        old = self.proc(role)
        if old is not None:
            old.stop(signal.SIGKILL)
        if role == "ingest":
            self.scp = self._life(["scp"], "scp", failpoints)
            return self.scp
        self.worker = self._life(["worker", "--concurrency", "1"], "worker", failpoints)
        return self.worker

    def ready(self, role: str, timeout: float = 90) -> bool:
        proc = self.proc(role)
        assert proc is not None
        if role == "ingest":
            return _dicom_ready(proc, self.port, timeout)
        return proc.alive()  # a worker serves once it is up; it needs no readiness probe

    def close(self) -> None:
        try:
            super().close()
        finally:
            assert self.db_proxy is not None and self.broker_proxy is not None and self.s3_proxy is not None
            self.db_proxy.stop()
            self.broker_proxy.stop()
            self.s3_proxy.stop()
            drop_database(self.db_name)


# -- rounds ---------------------------------------------------------------------------------------


@dataclass
class Round:
    mode: str
    kind: str  # a failpoint name, or one of OUTAGES
    nth: int = 0
    study_uid: str = ""
    acknowledged: dict[str, str] = field(default_factory=dict)  # SOP -> SHA-256 sent
    refused_while_down: int = 0  # outage rounds: failures the senders got while the server was away
    retrieved_while_down: int = 0  # broker-down: acknowledged instances C-GET delivered during the outage
    killed: bool = False  # the process died at the armed failpoint (FAILPOINT line in its log)
    verified: bool = False
    missing: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0


@dataclass
class Finish:
    """What the end of a drill found, after every process was restarted without failpoints."""

    rounds: list[Round]
    missing: list[str]  # acknowledged, not delivered (or delivered different) by C-GET at the end
    different: list[str]
    derived_not_done: int  # derived rows of acknowledged instances not done (or a series without its thumbnail)
    derived_failed: int
    check: dict[str, object]  # `pacs check --json` before the repair
    check_exit: int
    index_rows_without_object: int  # errors of `pacs check`: missing, size, corrupt, unreadable
    orphans: int  # warnings of `pacs check` before the repair
    temp_files: int
    repair_available: bool = False  # this build's `pacs check` has --repair
    repair_exit: int | None = None  # `pacs check --repair` (its check and its repair in one run)
    removed: int = 0  # orphans and temporary files `pacs check --repair` removed
    kept: int = 0  # what it left (younger than its grace period)
    seconds: float = 0.0
    failed_errors: list[str] = field(default_factory=list)  # kind, subject, attempts and error of failed rows


class Drill:
    """Runs rounds on one stack and keeps what every sender was told."""

    def __init__(self, stack: Stack, workdir: Path, slices: int = 4, size: int = 32) -> None:
        self.stack = stack
        self.workdir = workdir
        self.slices = slices
        self.size = size
        self.rounds: list[Round] = []
        self.batches: dict[str, Batch] = {}  # study UID -> batch

    def _batch(self) -> Batch:
        batch = Batch.make(self.workdir / f"batch-{len(self.batches):04d}", self.slices, self.size)
        self.batches[batch.study_uid] = batch
        return batch

    # A round ------------------------------------------------------------------------------------

    def kill_round(self, failpoint: str, nth: int, death_timeout: float = 90) -> Round:
        """Arm ``failpoint`` (the ``nth`` hit kills), send a batch, wait for the process to die there."""
        stack = self.stack
        role = stack.process_for(failpoint)
        rnd = Round(stack.mode, failpoint, nth)
        self.rounds.append(rnd)
        started = time.monotonic()
        stack.ensure_running(except_role=role)
        proc = stack.start(role, f"{failpoint}={nth}")
        up = stack.alive("ingest") and stack.ready("ingest")
        if up:
            self.verify_pending()  # what earlier rounds acknowledged, from the processes up now
        if up and stack.alive("ingest"):
            batch = self._batch()
            rnd.study_uid = batch.study_uid
            sent = send_batch(stack.port, batch)
            rnd.acknowledged = {sop: batch.sha256[sop] for sop in sent.acknowledged}
            rnd.note = sent.note
        else:
            rnd.note = "died while starting (recovering earlier work)"
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not proc.alive(), timeout=death_timeout, interval=0.1,
                       what=f"{failpoint}={nth} to kill {proc.args[0]}")
        rnd.killed = not proc.alive() and f"FAILPOINT {failpoint} hit {nth}:" in _read(proc.log_path)
        if proc.alive():
            proc.stop(signal.SIGKILL)
            rnd.note += "; the failpoint was never reached"
        rnd.seconds = round(time.monotonic() - started, 1)
        return rnd

    def outage_round(self, outage: str) -> Round:
        """Take a server away while a batch is sent; give it back; resend what was not acknowledged."""
        stack = self.stack
        rnd = Round(stack.mode, outage)
        self.rounds.append(rnd)
        started = time.monotonic()
        stack.ensure_running()
        assert stack.ready("ingest")
        self.verify_pending()
        batch = self._batch()
        rnd.study_uid = batch.study_uid
        with self._outage(outage):
            sent = send_batch(stack.port, batch)
            rnd.acknowledged = {sop: batch.sha256[sop] for sop in sent.acknowledged}
            rnd.refused_while_down = len(batch.sha256) - len(rnd.acknowledged)
            told = sorted({f"0x{s:04X}" if s is not None else "no response" for s in sent.statuses.values()})
            rnd.note = f"while down: {', '.join(told)}"
            if outage == "broker-down" and self._verify(rnd):  # the images are there while the broker is away
                rnd.retrieved_while_down = len(set(rnd.acknowledged) - set(rnd.missing) - set(rnd.different))
        stack.ensure_running()

        def resend() -> bool:
            missing = set(batch.sha256) - set(rnd.acknowledged)
            if missing:
                again = send_batch(stack.port, batch, only=missing)
                rnd.acknowledged.update({sop: batch.sha256[sop] for sop in again.acknowledged})
            return set(rnd.acknowledged) == set(batch.sha256)

        wait_until(resend, timeout=120, interval=0.5, what=f"every instance acknowledged after {outage}")
        rnd.verified = False  # what was resent is retrieved by the next verification
        rnd.seconds = round(time.monotonic() - started, 1)
        return rnd

    @contextlib.contextmanager
    def _outage(self, outage: str) -> Iterator[None]:
        stack = self.stack
        if outage == "s3-down" and stack.s3_proxy is None:  # a stack whose store is reached directly
            assert stack.s3 is not None
            stack.s3.stop()
            try:
                yield
            finally:
                stack.s3.start()
            return
        proxy = {"s3-down": stack.s3_proxy, "database-down": stack.db_proxy}.get(outage, stack.broker_proxy)
        assert proxy is not None
        proxy.cut()
        try:
            yield
        finally:
            proxy.restore()

    # Verification -------------------------------------------------------------------------------

    def verify_pending(self) -> None:
        """C-GET each round's study not verified yet, if the SCP is up (a life that dies while it answers
        leaves the rest to the next one)."""
        if not self.stack.alive("ingest"):
            return
        for rnd in self.rounds:
            if not rnd.verified and rnd.study_uid and rnd.acknowledged and not self._verify(rnd):
                return

    def _verify(self, rnd: Round) -> bool:
        got = c_get_study(self.stack.port, rnd.study_uid)
        if got is None:
            return False
        rnd.missing = sorted(sop for sop in rnd.acknowledged if sop not in got)
        rnd.different = sorted(sop for sop, sha in rnd.acknowledged.items() if sop in got and got[sop] != sha)
        rnd.verified = True
        return True

    # The end ------------------------------------------------------------------------------------

    def finish(self, derived_timeout: float = 120, repair: bool = True) -> Finish:
        """Restart what is down or armed, C-GET everything acknowledged again, wait for derived work,
        then `pacs check` and (when the build has it) `pacs check --repair --grace-minutes 1`, after
        which everything acknowledged must still be retrievable."""
        started = time.monotonic()
        stack = self.stack
        for role in stack.roles():
            if stack.armed.get(role) or not stack.alive(role):
                stack.start(role)
        if not stack.ready("ingest"):
            raise RuntimeError(f"no clean start after the drill:\n{stack.proc('ingest').log_tail()}")  # type: ignore[union-attr]
        self._reverify()
        acknowledged = [sop for rnd in self.rounds for sop in rnd.acknowledged]
        with contextlib.suppress(TimeoutError):  # reported (derived_not_done), not raised
            wait_until(lambda: self._derived_states(acknowledged)[0] == 0, timeout=derived_timeout, interval=0.5,
                       what="derived work of every acknowledged instance")
        not_done, failed = self._derived_states(acknowledged)
        failed_errors = self._failed_errors() if failed else []
        available = repair and has_repair()
        args = ["check", "--repair", "--grace-minutes", "1", "--json"] if available else ["check", "--json"]
        check_exit, check = _pacs_json(args, stack.env)  # with --repair: the check before it, and what it did
        counts = _counts(check)
        done = Finish(
            rounds=self.rounds, missing=[], different=[], derived_not_done=not_done, derived_failed=failed,
            check=check, check_exit=check_exit, index_rows_without_object=_errors(counts),
            orphans=counts.get("orphan", 0), temp_files=counts.get("temporary", 0), repair_available=available,
            failed_errors=failed_errors)
        if available:
            done.repair_exit = check_exit
            report = check.get("repair", {})
            if isinstance(report, dict):
                done.removed = len(report.get("removed_orphans", [])) + len(report.get("removed_temporary", []))
                done.kept = len(report.get("kept", []))
            self._reverify()  # the repair must not have taken anything acknowledged
        done.missing = [s for r in self.rounds for s in r.missing]
        done.different = [s for r in self.rounds for s in r.different]
        done.seconds = round(time.monotonic() - started, 1)
        return done

    def _reverify(self) -> None:
        for rnd in self.rounds:
            rnd.verified = False
        wait_until(self._verify_all, timeout=60, interval=0.5, what="C-GET of every acknowledged study")

    def _verify_all(self) -> bool:
        return all(rnd.verified or not rnd.acknowledged or self._verify(rnd) for rnd in self.rounds)

    def _failed_errors(self) -> list[str]:
        with self.stack.ctx.read_sessions() as session:
            rows = session.execute(select(DerivedTask.kind, DerivedTask.subject_uid, DerivedTask.attempts,
                                          DerivedTask.last_error).where(DerivedTask.state == "failed")).all()
        return [f"{kind} {subject[-12:]} attempts={attempts}: {error[:300]}" for kind, subject, attempts, error in rows]

    def _derived_states(self, sops: list[str]) -> tuple[int, int]:
        """(not yet done, failed) among the thumbnail rows of ``sops`` and the series rows of their series."""
        with self.stack.ctx.read_sessions() as session:
            series = [s for s in session.scalars(select(Instance.series_fk).where(Instance.sop_instance_uid.in_(sops))
                                                 .distinct())]
            thumbs = dict(session.execute(
                select(DerivedTask.state, func.count()).where(DerivedTask.kind == "thumbnail",
                                                              DerivedTask.subject_uid.in_(sops))
                .group_by(DerivedTask.state)).all())
            series_uids = list(session.scalars(select(Series.series_instance_uid).where(Series.id.in_(series))))
            series_rows = dict(session.execute(
                select(DerivedTask.state, func.count()).where(DerivedTask.kind == "series-metadata",
                                                              DerivedTask.subject_uid.in_(series_uids))
                .group_by(DerivedTask.state)).all())
            # one thumbnail per series (pacs.derived.series); an instance's is rendered when asked for
            no_thumbnail = session.scalar(select(func.count()).select_from(Series).where(
                Series.id.in_(series), Series.thumbnail_key.is_(None))) or 0
        expected = len(set(sops)) + len(series_uids)
        done = thumbs.get("done", 0) + series_rows.get("done", 0)
        failed = thumbs.get("failed", 0) + series_rows.get("failed", 0)
        return expected - done - failed + no_thumbnail, failed


def has_repair() -> bool:
    """Does this build's `pacs check` have ``--repair`` (E2 of issue 12)?"""
    from pacs.cli.maintenance import check_command

    return "repair" in inspect.signature(check_command).parameters


def _pacs_json(args: list[str], env: dict[str, str]) -> tuple[int, dict[str, object]]:
    result = run_pacs(args, env)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        data = {"unparsed": result.stdout[-2000:], "stderr": result.stderr[-2000:]}
    return result.returncode, data if isinstance(data, dict) else {"value": data}


def _counts(check: dict[str, object]) -> dict[str, int]:
    counts = check.get("counts", {})
    return {str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else {}


def _errors(counts: dict[str, int]) -> int:
    """Index rows whose object is not as indexed: what must never happen."""
    return sum(counts.get(k, 0) for k in ("missing", "size", "corrupt", "unreadable"))


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tally(finishes: list[Finish]) -> list[dict[str, object]]:
    """One row per (mode, round kind): rounds, killed there, acknowledged, missing, different."""
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for finish in finishes:
        for rnd in finish.rounds:
            row = rows.setdefault((rnd.mode, rnd.kind), {"mode": rnd.mode, "kind": rnd.kind, "rounds": 0,
                                                         "killed": 0, "acknowledged": 0, "missing": 0,
                                                         "different": 0, "seconds": 0.0})
            row["rounds"] = int(row["rounds"]) + 1  # type: ignore[call-overload]
            row["killed"] = int(row["killed"]) + int(rnd.killed)  # type: ignore[call-overload]
            row["acknowledged"] = int(row["acknowledged"]) + len(rnd.acknowledged)  # type: ignore[call-overload]
            row["missing"] = int(row["missing"]) + len(rnd.missing)  # type: ignore[call-overload]
            row["different"] = int(row["different"]) + len(rnd.different)  # type: ignore[call-overload]
            row["seconds"] = round(float(row["seconds"]) + rnd.seconds, 1)  # type: ignore[arg-type]
    order = {kind: i for i, kind in enumerate((*FAILPOINTS, *OUTAGES))}
    return sorted(rows.values(), key=lambda r: (str(r["mode"]), order.get(str(r["kind"]), 99)))


def report(finishes: list[Finish]) -> str:
    """The drill's printed report: per failpoint, then what each stack's end found."""
    lines = [f"{'mode':9} {'round':27} {'rounds':>6} {'killed':>6} {'acked':>6} {'missing':>7} {'different':>9} "
             f"{'seconds':>7}"]
    for row in tally(finishes):
        lines.append(f"{row['mode']!s:9} {row['kind']!s:27} {row['rounds']:>6} {row['killed']:>6} "
                     f"{row['acknowledged']:>6} {row['missing']:>7} {row['different']:>9} {row['seconds']:>7}")
    for finish in finishes:
        mode = finish.rounds[0].mode if finish.rounds else "-"
        repair = (f"repair removed {finish.removed}, kept {finish.kept}, "
                  f"everything acknowledged retrieved after it" if finish.repair_available
                  else "pacs check --repair: not in this build")
        lines.append(f"{mode}: index rows without object {finish.index_rows_without_object}, orphans "
                     f"{finish.orphans}, temporary files {finish.temp_files}, derived not done "
                     f"{finish.derived_not_done}, failed {finish.derived_failed}; {repair}; end {finish.seconds} s")
        lines += [f"  failed: {error}" for error in finish.failed_errors]
    return "\n".join(lines)
