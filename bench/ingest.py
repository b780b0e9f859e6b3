"""Ingest benchmark: a CT study sent with DCMTK's storescu to our embedded and scaled configurations and to
Debian's Orthanc (its SQLite index, and with the scaled runs its PostgreSQL index), on loopback, from an empty
archive each time.

    python -m bench.ingest [--slices 500] [--size 512] [--repeats 3] [--parallel 4] [--one-image 30]
                           [--skip-scaled] [--skip-orthanc] [--keep]

Prints instances/s, MB/s (10^6 bytes of DICOM files per second), the servers' peak resident memory and
CPU time, and our rate divided by Orthanc's. Timings are reported, never judged: the exit status is 0 when
every run stored every instance, 1 when the software failed (an instance not stored, a server that did not
start or crashed, a storescu that reported a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
from minio import Minio
from minio.deleteobjects import DeleteObject
from rich.console import Console
from rich.table import Table

from bench.environment import environment_table
from bench.generate_ct import write_ct_series
from bench.orthanc import (
    OrthancServer,
    find_orthanc,
    find_postgresql_index_plugin,
    orthanc_version,
    postgresql_plugin_version,
)
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.stack import embedded_env

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
BROKER_URL = os.environ.get("PACS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
SEND_TIMEOUT_S = 3600  # a stall guard only: a send that takes an hour is a hang, not a slow result

EMBEDDED, SCALED, ORTHANC, ORTHANC_PG = "ours embedded", "ours scaled", "Orthanc", "Orthanc PostgreSQL"
# ours ÷ which Orthanc: each of our modes against Orthanc's default (SQLite index), and the scaled one also against
# Orthanc with its PostgreSQL index (issue 13's reference for the scaled mode)
COMPARED = ((EMBEDDED, ORTHANC), (SCALED, ORTHANC), (SCALED, ORTHANC_PG))

_WIDTH = max(shutil.get_terminal_size((160, 24)).columns, 150)
out = Console(width=_WIDTH)
err = Console(stderr=True, width=_WIDTH)


# -- the study ---------------------------------------------------------------------------------------


def study_files(slices: int, size: int) -> list[Path]:
    """The CT study under bench/out/ct-<slices>-<size>, generated once and reused."""
    folder = OUT_DIR / f"ct-{slices}-{size}"
    marker = folder / ".complete"
    if not marker.exists():
        tmp = OUT_DIR / f".ct-{slices}-{size}-{uuid.uuid4().hex[:8]}"
        err.print(f"generating {slices} slices of {size}×{size} into {folder} ...")
        write_ct_series(tmp, slices, size)
        (tmp / ".complete").write_text(datetime.now().isoformat())
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    files = sorted(folder.glob("CT*.dcm"))
    if len(files) != slices:
        raise SystemExit(f"{folder} holds {len(files)} files, expected {slices}: delete it and run again")
    return files


# -- measuring ---------------------------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss(pid: int) -> int:
    return sum(process_rss(pid))


def process_rss(pid: int) -> list[int]:
    """The resident memory of each process of the tree (a Celery worker's pool children are processes of theirs)."""
    sizes = []
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            sizes.append(proc.memory_info().rss)
    return sizes


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for proc in _tree(pid):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


class RssSampler:
    """Samples the resident memory of named process trees every ``interval`` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.largest: dict[str, int] = dict.fromkeys(pids, 0)  # the peak of the tree's largest single process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            sizes = process_rss(pid)
            self.peak[name] = max(self.peak[name], sum(sizes))
            self.largest[name] = max(self.largest[name], *sizes, 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class SendResult:
    elapsed_s: float
    returncodes: list[int]
    responses: int  # C-STORE responses storescu logged
    successes: int  # of them, with status Success
    output_tail: str


_RESPONSE_RE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


ONE_IMAGE = 0  # the ``parallel`` of the mode in which every file goes on an association of its own


def _storescu(index: int, port: int, aec: str, files: list[Path], log_path: Path,
              env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        cmd = [dcmtk("storescu"), "-v", "-aet", f"BENCH{index}", "-aec", aec, "-xe", "127.0.0.1", str(port),
               *map(str, files)]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_all(procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(port: int, aec: str, files: list[Path], parallel: int, log_dir: Path) -> SendResult:
    """Run ``parallel`` DCMTK storescu processes, each on one association with its share of ``files``; with
    ``parallel == ONE_IMAGE``, one storescu per file, one after the other (how a CR/DX room or an ultrasound
    cart sends: an association per image).

    The clock runs from the launch of the first until the exit of the last.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dcmtk_env()
    start = time.perf_counter()
    deadline = start + SEND_TIMEOUT_S
    procs: list[subprocess.Popen[bytes]] = []
    if parallel == ONE_IMAGE:
        logs = [log_dir / f"storescu-{i + 1}.log" for i in range(len(files))]
        for i, file in enumerate(files):
            procs.append(_storescu(1, port, aec, [file], logs[i], env))
            _wait_all(procs[-1:], deadline)
    else:
        n = max(1, min(parallel, len(files)))
        chunk = -(-len(files) // n)
        # contiguous shares (each association sends consecutive slices); never an empty one
        shares = [share for i in range(n) if (share := files[i * chunk:(i + 1) * chunk])]
        logs = [log_dir / f"storescu-{i + 1}.log" for i in range(len(shares))]
        procs = [_storescu(i + 1, port, aec, share, logs[i], env) for i, share in enumerate(shares)]
        _wait_all(procs, deadline)
    elapsed = time.perf_counter() - start
    responses = successes = 0
    tails = []
    for log in logs:
        text = log.read_text(errors="replace")
        for match in _RESPONSE_RE.finditer(text):
            responses += 1
            successes += match.group(1) == "Success"
        tails.append("\n".join(text.splitlines()[-8:]))
    return SendResult(elapsed, [p.returncode for p in procs], responses, successes, "\n".join(tails))


def new_error_lines(log_path: Path, offset: int, pattern: re.Pattern[str]) -> tuple[list[str], int]:
    """Lines matching ``pattern`` written to ``log_path`` after byte ``offset``; and the new offset."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return [], offset
    lines = [line for line in data.decode(errors="replace").splitlines() if pattern.search(line)]
    return lines, offset + len(data)


OUR_ERRORS = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception")
ORTHANC_ERRORS = re.compile(r"^E\d{4} ")


# -- the systems under test --------------------------------------------------------------------------


@dataclass
class Server:
    """A started system with an empty archive: where to send, what to measure, how to count and clean up."""

    port: int
    aec: str
    pids: dict[str, int]
    count: Callable[[], int]
    logs: dict[str, tuple[Path, re.Pattern[str]]]
    cleanup: Callable[[], None]


def _count_ours(settings_kwargs: dict[str, object]) -> Callable[[], int]:
    def count() -> int:
        from sqlalchemy import func, select

        from pacs.context import AppContext
        from pacs.db.models import Instance
        from pacs.settings import Settings

        ctx = AppContext.create(Settings(**settings_kwargs))
        try:
            with ctx.sessions() as session:
                return session.scalar(select(func.count()).select_from(Instance)) or 0
        finally:
            ctx.close()

    return count


@contextlib.contextmanager
def embedded_server(run_dir: Path, keep: bool) -> Iterator[Server]:
    data_dir = run_dir / "data"
    env = embedded_env(data_dir)
    port = int(env["PACS_DICOM_PORT"])
    serve = PacsProcess(["serve"], env, run_dir / "serve.log").start()
    try:
        serve.wait_dicom(port)
        assert serve.proc is not None
        yield Server(port, "PACS", {"serve": serve.proc.pid},
                     _count_ours({"data_dir": data_dir, "database_url": "", "storage_url": "", "broker_url": ""}),
                     {"serve": (serve.log_path, OUR_ERRORS)}, lambda: None)
    finally:
        serve.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


class ScaledInfra:
    """What the scaled runs share: one SeaweedFS S3 server (a new bucket per run) and Redis db 8."""

    def __init__(self, workdir: Path) -> None:
        from tests.support.seaweed import SeaweedS3

        self.s3 = SeaweedS3(workdir)

    def start(self) -> ScaledInfra:
        self.s3.start()
        return self

    def stop(self) -> None:
        self.s3.stop()

    def minio(self) -> Minio:
        return Minio(self.s3.endpoint, access_key=self.s3.access_key, secret_key=self.s3.secret_key, secure=False)

    def new_bucket(self) -> str:
        """An empty bucket whose SeaweedFS collection already has its volumes (as a bucket in use would)."""
        import io

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        client = self.minio()
        client.make_bucket(bucket)
        client.put_object(bucket, "warmup", io.BytesIO(b"x"), 1)
        client.remove_object(bucket, "warmup")
        return bucket

    def drop_bucket(self, bucket: str) -> None:
        client = self.minio()
        with contextlib.suppress(Exception):
            names = [obj.object_name for obj in client.list_objects(bucket, recursive=True)]
            for _ in client.remove_objects(bucket, (DeleteObject(n) for n in names)):
                pass
            client.remove_bucket(bucket)


def _wait_celery_ready(worker: PacsProcess, timeout: float = 120) -> None:
    def ready() -> bool:
        if not worker.alive():
            raise RuntimeError(f"pacs worker exited early:\n{worker.log_tail()}")
        return bool(re.search(r"celery@\S+ ready", worker.log_path.read_text(errors="replace")))

    wait_until(ready, timeout=timeout, interval=0.3, what="pacs worker (celery) ready")


@contextlib.contextmanager
def scaled_server(run_dir: Path, infra: ScaledInfra, keep: bool) -> Iterator[Server]:
    import redis

    from tests.support.postgres import create_database, drop_database

    db_name, db_url = create_database()
    bucket = infra.new_bucket()
    redis.Redis.from_url(BROKER_URL).flushdb()
    env = {
        "PACS_DATA_DIR": str(run_dir / "data"),
        "PACS_DATABASE_URL": db_url,
        "PACS_STORAGE_URL": infra.s3.url_for(bucket),
        "PACS_BROKER_URL": BROKER_URL,
        "PACS_DICOM_PORT": str(free_port()),
    }
    port = int(env["PACS_DICOM_PORT"])
    procs: list[PacsProcess] = []
    try:
        upgrade = run_pacs(["db", "upgrade"], env)
        if upgrade.returncode != 0:
            raise RuntimeError(f"pacs db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
        worker = PacsProcess(["worker", "--concurrency", "1"], env, run_dir / "worker.log").start()
        procs.append(worker)
        scp = PacsProcess(["scp"], env, run_dir / "scp.log").start()
        procs.append(scp)
        _wait_celery_ready(worker)
        scp.wait_dicom(port)
        assert scp.proc is not None and worker.proc is not None
        yield Server(port, "PACS", {"scp": scp.proc.pid, "worker": worker.proc.pid},
                     _count_ours({"database_url": db_url, "storage_url": env["PACS_STORAGE_URL"],
                                  "broker_url": BROKER_URL, "data_dir": run_dir / "data"}),
                     {"scp": (scp.log_path, OUR_ERRORS), "worker": (worker.log_path, OUR_ERRORS)}, lambda: None)
    finally:
        for proc in reversed(procs):
            proc.stop()
        if not keep:
            drop_database(db_name)
            infra.drop_bucket(bucket)
            shutil.rmtree(run_dir / "data", ignore_errors=True)


@contextlib.contextmanager
def orthanc_server(run_dir: Path, keep: bool, *, postgresql: bool = False) -> Iterator[Server]:
    """Orthanc with its SQLite index, or with ``postgresql`` its index in a new database of the local PostgreSQL."""
    from tests.support.postgres import create_database, drop_database

    db_name = create_database()[0] if postgresql else None
    server = OrthancServer(run_dir / "orthanc", postgresql_database=db_name)
    try:
        server.start()
        assert server.proc is not None
        yield Server(server.dicom_port, "ORTHANC", {"Orthanc": server.proc.pid}, server.count_instances,
                     {"Orthanc": (server.log_path, ORTHANC_ERRORS)}, lambda: None)
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(run_dir / "orthanc" / "storage", ignore_errors=True)
            if db_name is not None:
                drop_database(db_name)


# -- one run -----------------------------------------------------------------------------------------


@dataclass
class RunResult:
    system: str
    mode: str
    repeat: int
    instances: int
    total_bytes: int
    elapsed_s: float = 0.0
    idle_rss: dict[str, int] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_process_rss: dict[str, int] = field(default_factory=dict)  # of the largest single process of each tree
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds (user + system) during the send
    cpu_settled: float = 0.0  # all processes' CPU seconds from the send's start until they fell idle after it

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())
    stored: int = -1
    problems: list[str] = field(default_factory=list)  # software failures: make the exit status 1
    log_errors: list[str] = field(default_factory=list)  # error lines in server logs during the run

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def rate(self) -> float:
        return self.instances / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def mb_s(self) -> float:
        return self.total_bytes / 1e6 / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def cpu_ms_per_instance(self) -> float:
        """Server CPU (every process of the system, derived work included) per instance sent."""
        return self.cpu_s * 1000 / self.instances if self.instances else 0.0

    @property
    def settled_cpu_ms_per_instance(self) -> float:
        """Server CPU per instance including the derived work that ran after the last acknowledgement."""
        return self.cpu_settled * 1000 / self.instances if self.instances else 0.0

    @property
    def wall_ms_per_instance(self) -> float:
        return self.elapsed_s * 1000 / self.instances if self.instances else 0.0


def _wait_idle(pids: dict[str, int], quiet_cpu_s: float = 0.03, window_s: float = 1.0,
               timeout_s: float = 300.0) -> None:
    """Until the processes together use less than ``quiet_cpu_s`` of CPU in ``window_s`` (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    last = sum(tree_cpu_s(pid) for pid in pids.values())
    while time.monotonic() < deadline:
        time.sleep(window_s)
        now = sum(tree_cpu_s(pid) for pid in pids.values())
        if now - last < quiet_cpu_s:
            return
        last = now


def run_once(system: str, mode: str, parallel: int, repeat: int, files: list[Path], total_bytes: int,
             work: Path, infra: ScaledInfra | None, keep: bool) -> RunResult:
    kind = "1image" if parallel == ONE_IMAGE else "1assoc" if parallel == 1 else f"{parallel}par"
    slug = f"r{repeat}-{system.split()[-1].lower()}-{kind}"
    run_dir = work / slug
    run_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(system, mode, repeat, len(files), total_bytes)
    if system == EMBEDDED:
        starter = embedded_server(run_dir, keep)
    elif system == SCALED:
        assert infra is not None
        starter = scaled_server(run_dir, infra, keep)
    else:
        starter = orthanc_server(run_dir, keep, postgresql=system == ORTHANC_PG)
    try:
        with starter as server:
            time.sleep(1.0)  # let start-up work (imports, schema checks, first connections) finish
            # `pacs serve` answers on its DICOM port before it has built its HTTP app (~4 s of CPU on the 2-core
            # machine): measured from here, a run would count that too (most of a one-image association's figure)
            _wait_idle(server.pids)
            offsets = {name: path.stat().st_size if path.exists() else 0 for name, (path, _) in server.logs.items()}
            result.idle_rss = {name: tree_rss(pid) for name, pid in server.pids.items()}
            cpu_before = {name: tree_cpu_s(pid) for name, pid in server.pids.items()}
            with RssSampler(server.pids) as sampler:
                sent = send(server.port, server.aec, files, parallel, run_dir / "storescu")
            result.cpu = {name: tree_cpu_s(pid) - cpu_before[name] for name, pid in server.pids.items()}
            _wait_idle(server.pids)  # derived work (thumbnails, metadata) queued during the send runs to its end
            result.cpu_settled = sum(tree_cpu_s(pid) - cpu_before[name] for name, pid in server.pids.items())
            result.peak_rss = sampler.peak
            result.peak_process_rss = sampler.largest
            result.elapsed_s = sent.elapsed_s
            if any(rc != 0 for rc in sent.returncodes):
                result.problems.append(f"storescu exit codes {sent.returncodes}:\n{sent.output_tail}")
            if sent.successes != len(files):
                result.problems.append(f"storescu logged {sent.successes} Success responses of {sent.responses} "
                                       f"for {len(files)} files")
            # The C-STORE response comes after the index commit, so the count is final now; a short grace
            # period only tells "late" apart from "lost" in the report.
            result.stored = server.count()
            if result.stored != len(files):
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: server.count() == len(files), timeout=10, interval=0.5)
                late = server.count()
                result.problems.append(f"index holds {result.stored} instances right after the send "
                                       f"({late} after 10 s), expected {len(files)}")
                result.stored = late
            for pid_name, pid in server.pids.items():
                if not psutil.pid_exists(pid):
                    result.problems.append(f"{pid_name} (pid {pid}) died during the run")
            for name, (path, pattern) in server.logs.items():
                lines, _ = new_error_lines(path, offsets[name], pattern)
                result.log_errors += [f"{name}: {line}" for line in lines]
    except Exception as exc:  # a server that does not start, a crash: a failure of the software, reported
        result.problems.append(f"{type(exc).__name__}: {exc}")
    return result


# -- report ------------------------------------------------------------------------------------------


def _version(cmd: list[str], pattern: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        text = proc.stdout + proc.stderr
    except (OSError, subprocess.SubprocessError):
        return "not found"
    match = re.search(pattern, text)
    return match.group(1) if match else "unknown"


def print_environment(args: argparse.Namespace, files: list[Path], total_bytes: int) -> None:
    table = environment_table()
    table.add_row("DCMTK (storescu)", _version([dcmtk("storescu"), "--version"], r"v(\d+\.\d+\.\d+)"))
    table.add_row("Orthanc", orthanc_version() + (f" (PostgreSQL index plugin {postgresql_plugin_version()}, "
                                                  "its index on the local PostgreSQL, files on disk)"
                                                  if args.orthanc_postgresql else ""))
    if not args.skip_scaled:
        from tests.support.seaweed import find_weed

        weed = find_weed()
        table.add_row("SeaweedFS", _version([weed, "version"], r"version\s+\S+\s+(\S+)") if weed else "not found")
    table.add_row("study", f"{len(files)} CT slices {args.size}×{args.size}, Explicit VR LE, "
                           f"{total_bytes / 1e6:.1f} MB in all ({total_bytes / len(files) / 1e6:.3f} MB per file)")
    modes = ["1 association", *([f"{args.parallel} in parallel"] if args.parallel > 1 else []),
             *([f"{min(args.one_image, len(files))} × 1 image (a storescu each)"] if args.one_image > 0 else [])]
    table.add_row("runs", f"{args.repeats} repeat(s) × modes ({', '.join(modes)}) × systems, "
                          "alternated, each from an empty archive")
    table.add_row("DICOM receiving processes", os.environ.get("PACS_DICOM_PROCESSES") or "the archive's default")
    out.print(table)


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def _largest_part(name: str, runs: list[RunResult]) -> str:
    """" (largest process N)" when the tree's peak is of several processes (a Celery worker and its pool)."""
    largest = max(r.peak_process_rss.get(name, 0) for r in runs)
    tree = max(r.peak_rss.get(name, 0) for r in runs)
    return f" (largest process {_mb(largest)})" if 0 < largest < tree else ""


def print_results(results: list[RunResult], systems: list[str], modes: list[str]) -> None:
    table = Table(title="Ingest over DIMSE C-STORE (DCMTK storescu, loopback): medians over runs")
    for col, justify in (("system", "left"), ("mode", "left"), ("instances/s", "right"), ("MB/s", "right"),
                         ("min–max inst/s", "right"), ("server CPU s", "right"), ("CPU ms/inst", "right"),
                         ("… incl. derived", "right"), ("wall ms/inst", "right"), ("idle RSS MB", "right"),
                         ("peak RSS MB", "right"), ("runs ok", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    medians: dict[tuple[str, str], float] = {}
    cpu_medians: dict[tuple[str, str], float] = {}
    settled_medians: dict[tuple[str, str], float] = {}
    wall_medians: dict[tuple[str, str], float] = {}
    for system in systems:
        for mode in modes:
            runs = [r for r in results if r.system == system and r.mode == mode]
            good = [r for r in runs if r.ok]
            if not runs:
                continue
            if good:
                rate = statistics.median(r.rate for r in good)
                medians[system, mode] = rate
                mb = statistics.median(r.mb_s for r in good)
                spread = f"{min(r.rate for r in good):.1f}–{max(r.rate for r in good):.1f}"
                cpu = " + ".join(f"{name} {statistics.median(r.cpu.get(name, 0.0) for r in good):.1f}"
                                 for name in dict.fromkeys(n for r in good for n in r.cpu))
                cpu_medians[system, mode] = statistics.median(r.cpu_ms_per_instance for r in good)
                settled_medians[system, mode] = statistics.median(r.settled_cpu_ms_per_instance for r in good)
                wall_medians[system, mode] = statistics.median(r.wall_ms_per_instance for r in good)
            else:
                rate = mb = 0.0
                spread = cpu = "-"
            per_instance = [f"{d[system, mode]:.1f}" if (system, mode) in d else "-"
                            for d in (cpu_medians, settled_medians, wall_medians)]
            names = list(dict.fromkeys(name for r in runs for name in r.peak_rss))
            peak = " + ".join(f"{name} {_mb(max(r.peak_rss.get(name, 0) for r in runs))}"
                              + _largest_part(name, runs) for name in names)
            idle = " + ".join(f"{name} {_mb(max(r.idle_rss.get(name, 0) for r in runs))}" for name in names)
            table.add_row(system, mode, f"{rate:.1f}" if good else "FAILED", f"{mb:.1f}" if good else "-", spread,
                          cpu, *per_instance, idle or "-", peak or "-", f"{len(good)}/{len(runs)}")
    out.print(table)

    pairs = [(mine, theirs) for mine, theirs in COMPARED if mine in systems and theirs in systems]
    if pairs:
        ratios = Table(title="Ours ÷ Orthanc, medians: instances/s (> 1: we are faster); server CPU and wall "
                             "per instance (< 1: we use less)")
        ratios.add_column("mode")
        ratios.add_column("figure")
        for mine, theirs in pairs:
            ratios.add_column(f"{mine} ÷ {theirs}", justify="right")
        for mode in modes:
            for figure, table_of in (("instances/s", medians), ("CPU ms/inst", cpu_medians),
                                     ("… incl. derived", settled_medians), ("wall ms/inst", wall_medians)):
                cells = []
                for mine, theirs in pairs:
                    value, base = table_of.get((mine, mode)), table_of.get((theirs, mode))
                    cells.append(f"{value / base:.2f}" if base and value else "-")
                ratios.add_row(mode, figure, *cells)
        out.print(ratios)

    runs_table = Table(title="Every run (in the order run)")
    for col in ("#", "system", "mode", "s", "inst/s", "MB/s", "server CPU s", "stored", "status"):
        runs_table.add_column(col, justify="left" if col in ("system", "mode", "status") else "right")
    for r in results:
        runs_table.add_row(str(r.repeat), r.system, r.mode, f"{r.elapsed_s:.2f}", f"{r.rate:.1f}", f"{r.mb_s:.1f}",
                           " + ".join(f"{k} {v:.1f}" for k, v in r.cpu.items()) or "-", str(r.stored),
                           "ok" if r.ok else "FAILED")
    out.print(runs_table)


_NOISE = re.compile(r"\d{4}-\d\d-\d\d[ T][\d:,.]+|\b\d+(\.\d+){3,}\b|\[[0-9a-f-]{36}\]|\b\d+(\.\d+)?s\b"
                    r"|\b\d{4} \d\d:\d\d:\d\d\.\d+")


def print_log_summary(results: list[RunResult]) -> None:
    """Warning and error lines the servers logged during the sends, grouped by message (UIDs, times masked)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in results:
        for line in r.log_errors:
            groups.setdefault((r.system, _NOISE.sub("…", line)), []).append(line)
    if not groups:
        out.print("no warning or error lines in the server logs during the sends")
        return
    table = Table(title="Warning/error lines in server logs during the sends (grouped)")
    table.add_column("system")
    table.add_column("count", justify="right")
    table.add_column("example", overflow="fold")
    for (system, _), lines in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        table.add_row(system, str(len(lines)), lines[0][:400])
    out.print(table)


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=500, help="CT slices in the study (default 500)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system and mode (default 3)")
    parser.add_argument("--parallel", type=int, default=4, help="storescu processes in the parallel mode (default 4)")
    parser.add_argument("--one-image", type=int, default=30,
                        help="files sent one association each, one after the other (default 30; 0 leaves the mode out)")
    parser.add_argument("--skip-scaled", action="store_true", help="leave out scp + worker on PostgreSQL/S3/Redis")
    parser.add_argument("--skip-orthanc", action="store_true", help="leave out Debian's Orthanc")
    parser.add_argument("--skip-orthanc-postgresql", action="store_true",
                        help="leave out Orthanc with its PostgreSQL index (run only with the scaled mode and Orthanc)")
    parser.add_argument("--keep", action="store_true", help="keep each run's archive (data, database, bucket)")
    parser.add_argument("--dicom-processes", type=int, default=None, metavar="N",
                        help="DICOM receiving processes of `pacs serve` / `pacs scp` (PACS_DICOM_PROCESSES; "
                        "default: the environment's, else the archive's default)")
    args = parser.parse_args(argv)
    if args.slices < 1 or args.size < 16 or args.repeats < 1 or args.parallel < 1:
        parser.error("--slices, --repeats and --parallel must be >= 1 and --size >= 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dicom_processes is not None:  # every `pacs` process the bench starts inherits it
        os.environ["PACS_DICOM_PROCESSES"] = str(args.dicom_processes)
    if not args.skip_orthanc and find_orthanc() is None:
        err.print("[yellow]Orthanc is not installed (apt-get install orthanc): running without it[/yellow]")
        args.skip_orthanc = True
    args.orthanc_postgresql = not (args.skip_orthanc or args.skip_scaled or args.skip_orthanc_postgresql)
    if args.orthanc_postgresql and find_postgresql_index_plugin() is None:
        err.print("[yellow]Orthanc's PostgreSQL index plugin is not installed (apt-get install orthanc-postgresql): "
                  "running without it[/yellow]")
        args.orthanc_postgresql = False
    files = study_files(args.slices, args.size)
    total_bytes = sum(f.stat().st_size for f in files)
    print_environment(args, files, total_bytes)

    systems = [EMBEDDED] + ([] if args.skip_scaled else [SCALED]) + ([] if args.skip_orthanc else [ORTHANC]) \
        + ([ORTHANC_PG] if args.orthanc_postgresql else [])
    modes = [(1, "1 association")]
    if args.parallel > 1:
        modes.append((args.parallel, f"{args.parallel} in parallel"))
    if args.one_image > 0:
        modes.append((ONE_IMAGE, f"{min(args.one_image, len(files))} × 1 image"))
    work = OUT_DIR / f"work-{datetime.now():%Y%m%d-%H%M%S}"
    work.mkdir(parents=True)
    err.print(f"logs under {work}")

    infra = ScaledInfra(work / "seaweed").start() if SCALED in systems else None
    results: list[RunResult] = []
    try:
        for repeat in range(1, args.repeats + 1):
            for m, (parallel, mode) in enumerate(modes):
                # Rotate who goes first so that no system always follows the same neighbour.
                shift = (repeat - 1 + m) % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    sent = files[:args.one_image] if parallel == ONE_IMAGE else files
                    size = sum(f.stat().st_size for f in sent)
                    r = run_once(system, mode, parallel, repeat, sent, size, work, infra, args.keep)
                    results.append(r)
                    status = "ok" if r.ok else "[red]FAILED[/red]"
                    peak = ", ".join(f"{k} {_mb(v)} MB" for k, v in r.peak_rss.items())
                    err.print(f"[{repeat}/{args.repeats}] {system:18} {mode:14} {r.elapsed_s:7.2f} s "
                              f"{r.rate:7.1f} inst/s {r.mb_s:6.1f} MB/s  cpu {r.cpu_s:5.1f} s  peak {peak}  {status}")
                    for problem in r.problems:
                        err.print(f"    [red]{problem}[/red]")
    finally:
        if infra is not None:
            infra.stop()

    print_results(results, systems, [mode for _, mode in modes])
    print_log_summary(results)
    failed = [r for r in results if not r.ok]
    if failed:
        out.print(f"[red]{len(failed)} run(s) failed:[/red]")
        for r in failed:
            for problem in r.problems:
                out.print(f"  {r.system} / {r.mode} / run {r.repeat}: {problem}", markup=False)
        return 1
    out.print(f"logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
