"""Query/retrieve benchmark: C-FIND latency at 10^6 indexed instances (ours), C-FIND side by side with Debian's
Orthanc, and C-GET of a CT series from both, on loopback.

    python -m bench.query [--studies 20000] [--repeats 3] [--skip-orthanc] [--get-slices 500]

1. C-FIND at 10^6 indexed instances, ours only: a fresh PostgreSQL database filled by ``bench.bulk_index.load``
   (studies × series × instances, 20000 × 5 × 10 by default), ``pacs scp`` on it, one pynetdicom association
   (Study Root FIND) reused for every query; each C-FIND is timed from the request to the final status, all
   pending responses read. Every answer is checked against SQL on the same database.
2. C-FIND, ours and Orthanc: a small archive (400 studies × 1 series × 5 instances of 16×16 pixels by default,
   Vietnamese names, ISO_IR 192) sent with DCMTK's storescu to both; the same query kinds, the two systems
   alternated per repeat; match sets checked against the generated archive.
3. C-GET of a CT series (bench.generate_ct, 500 slices of 512×512 by default) with DCMTK's getscu at SERIES level
   from both, alternated: MB/s, every instance received, the server's peak resident memory.

Timings are reported, never judged: the exit status is 1 only when the software failed (a query that returned
wrong matches or a failure status, a retrieve that did not deliver every instance, a server that did not start or
died), 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from rich.table import Table
from sqlalchemy.engine import make_url

from bench.bulk_index import FAMILY, GIVEN, MIDDLE, MODALITIES, ROOT, load
from bench.environment import environment_table
from bench.ingest import (
    _NOISE,
    ORTHANC_ERRORS,
    OUR_ERRORS,
    RssSampler,
    _version,
    err,
    new_error_lines,
    out,
    send,
    study_files,
    tree_cpu_s,
    tree_rss,
)
from bench.orthanc import AE_TITLE as ORTHANC_AET
from bench.orthanc import OrthancServer, find_orthanc, orthanc_version
from pacs.text import fold
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.net import free_port
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.postgres import create_database, drop_database

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
CALLING_AE = "BENCHSCU"  # registered with `pacs ae add` in ours, in DicomModalities in Orthanc
OUR_AET = "PACS"
OURS, ORTHANC = "ours", "Orthanc"
GET_TIMEOUT_S = 1800  # a stall guard only
SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)

# Study-level query kinds: (key, label). The values come from the loaded data.
KINDS: list[tuple[str, str]] = [
    ("patient_id", "PatientID"),
    ("name_ascii", "PatientName NGUYEN^VAN AN"),  # a full name, folded: no diacritics
    ("name_vi", "PatientName Nguyễn^Văn An"),  # the same, as stored: with diacritics
    ("name_prefix", "PatientName TRAN*"),  # a family name (folded) and '*'
    ("date", "StudyDate 1 day"),
    ("week_ct", "StudyDate 7 days + CT"),  # a range and ModalitiesInStudy=CT
    ("accession", "AccessionNumber"),
    ("uid", "StudyInstanceUID"),
]
KINDS_NOTE = ("Study Root C-FIND at STUDY level, one association reused; each query timed from the C-FIND-RQ to the "
              "final response, every pending response read. Kinds: PatientID, AccessionNumber, StudyInstanceUID: "
              "exact; PatientName: a full name without diacritics ('NGUYEN^VAN AN') and the same with them "
              "('Nguyễn^Văn An'), a family name without diacritics and '*' ('TRAN*', 'NGUYEN*', ...); StudyDate: "
              "one day, and a 7-day range with ModalitiesInStudy=CT. Values picked from the loaded studies; "
              "the same 14 return keys asked every time. One query of each kind first, not counted (warm-up).")
# Side by side also a family name with its diacritics and '*': both systems must find the same studies, so that
# the wildcard's cost compares like for like (Orthanc finds nothing for most 'TRAN*'-style values).
SIDE_KINDS = [*KINDS[:4], ("name_prefix_vi", "PatientName Trần*"), *KINDS[4:]]
LABELS = dict(SIDE_KINDS)
# What a study browser asks for: the same return keys for every query and both systems.
RETURN_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
               "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyInstanceUID")


class Failure(Exception):
    """The software under test failed (not a slow result): makes the exit status 1."""


# -- the data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRow:
    """One study as the loader wrote it: the truth the answers are checked against."""

    n: int  # the s in the UIDs ROOT.1.{s}, ROOT.2.{s}.{k}, ROOT.3.{s}.{k}.{i}
    uid: str
    accession: str
    study_date: str  # YYYYMMDD
    patient_id: str
    patient_name: str  # as stored, with diacritics
    modality: str
    series: int
    instances: int


@dataclass(frozen=True)
class Query:
    kind: str
    keys: tuple[tuple[str, str], ...]  # the matching keys; every other return key is universal (empty)

    @property
    def value(self) -> str:
        return " ".join(v for _, v in self.keys)

    def identifier(self) -> Dataset:
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in RETURN_KEYS:
            setattr(ds, keyword, "")
        for keyword, value in self.keys:
            setattr(ds, keyword, value)
        return ds


def _plus_days(yyyymmdd: str, days: int) -> str:
    return (datetime.strptime(yyyymmdd, "%Y%m%d").date() + timedelta(days=days)).strftime("%Y%m%d")


def make_queries(rows: list[StudyRow], per_kind: int, seed: int) -> dict[str, list[Query]]:
    """``per_kind`` queries of each kind, with values taken from ``rows`` (studies that exist)."""
    rnd = random.Random(seed)
    picked = rnd.sample(rows, min(per_kind, len(rows)))
    ct_rows = [r for r in rows if r.modality == "CT"] or rows
    ct_picked = rnd.sample(ct_rows, min(per_kind, len(ct_rows)))
    families = sorted({fold(r.patient_name.split("^")[0]) for r in rows})
    prefixes = [fold(f) for f in FAMILY if fold(f) in families] or families
    rnd.shuffle(prefixes)  # then cycled: every family prefix before any comes twice
    stored_families = [f for f in FAMILY if any(r.patient_name.startswith(f"{f}^") for r in rows)]
    rnd.shuffle(stored_families)
    return {
        "patient_id": [Query("patient_id", (("PatientID", r.patient_id),)) for r in picked],
        "name_ascii": [Query("name_ascii", (("PatientName", fold(r.patient_name)),)) for r in picked],
        "name_vi": [Query("name_vi", (("PatientName", r.patient_name),)) for r in picked],
        "name_prefix": [Query("name_prefix", (("PatientName", f"{prefixes[i % len(prefixes)]}*"),))
                        for i in range(len(picked))],
        "name_prefix_vi": [Query("name_prefix_vi", (("PatientName", f"{stored_families[i % len(stored_families)]}*"),))
                           for i in range(len(picked))],
        "date": [Query("date", (("StudyDate", r.study_date),)) for r in picked],
        "week_ct": [Query("week_ct", (("StudyDate", f"{r.study_date}-{_plus_days(r.study_date, 6)}"),
                                      ("ModalitiesInStudy", "CT"))) for r in ct_picked],
        "accession": [Query("accession", (("AccessionNumber", r.accession),)) for r in picked],
        "uid": [Query("uid", (("StudyInstanceUID", r.uid),)) for r in picked],
    }


def expected_matches(rows: list[StudyRow], query: Query, *, accent_sensitive: bool = False) -> set[str]:
    """The StudyInstanceUIDs a study-level query must match in ``rows``.

    PatientName: ours folds case and diacritics (SPEC §4: "Nguyễn" finds "Nguyen" and the reverse);
    ``accent_sensitive`` gives Orthanc's default instead (case-insensitive, accents significant).
    """

    def name_key(name: str) -> str:
        return name.upper() if accent_sensitive else fold(name)

    result = set()
    for row in rows:
        ok = True
        for keyword, value in query.keys:
            if keyword == "PatientID":
                ok = row.patient_id == value
            elif keyword == "PatientName" and value.endswith("*"):
                ok = name_key(row.patient_name).startswith(name_key(value[:-1]))
            elif keyword == "PatientName":
                ok = name_key(row.patient_name) == name_key(value)
            elif keyword == "StudyDate" and "-" in value:
                low, high = value.split("-")
                ok = low <= row.study_date <= high
            elif keyword == "StudyDate":
                ok = row.study_date == value
            elif keyword == "ModalitiesInStudy":
                ok = row.modality == value
            elif keyword == "AccessionNumber":
                ok = row.accession == value
            elif keyword == "StudyInstanceUID":
                ok = row.uid == value
            else:
                raise ValueError(keyword)
            if not ok:
                break
        if ok:
            result.add(row.uid)
    return result


def small_archive(studies: int, instances: int, seed: int = 11) -> list[StudyRow]:
    """The studies of the side-by-side archive: like bench.bulk_index's, one series per study."""
    rnd = random.Random(seed)
    patients = [(f"PID{p:07d}", f"{rnd.choice(FAMILY)}^{rnd.choice(MIDDLE)} {rnd.choice(GIVEN)}")
                for p in range(1, max(studies // 2, 1) + 1)]
    rows = []
    for s in range(1, studies + 1):
        pid, name = rnd.choice(patients)
        when = date(2021, 1, 1) + timedelta(days=rnd.randrange(5 * 365))
        rows.append(StudyRow(s, f"{ROOT}.1.{s}", f"ACC{s:08d}", f"{when:%Y%m%d}", pid, name,
                             rnd.choice(MODALITIES), 1, instances))
    return rows


SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}


def small_archive_files(rows: list[StudyRow], instances: int, seed: int = 11) -> list[Path]:
    """The archive's files (16×16 pixels, ISO_IR 192), written once under bench/out/find-* and reused."""
    folder = OUT_DIR / f"find-{len(rows)}x{instances}-s{seed}"
    marker = folder / ".complete"
    if not marker.exists():
        tmp = OUT_DIR / f".find-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        err.print(f"writing {len(rows) * instances} small instances into {folder} ...")
        pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16).tobytes()
        for row in rows:
            for i in range(1, instances + 1):
                ds = Dataset()
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.SOPClassUID = SOP_CLASSES[row.modality]
                ds.SOPInstanceUID = f"{ROOT}.3.{row.n}.1.{i}"
                ds.StudyInstanceUID = row.uid
                ds.SeriesInstanceUID = f"{ROOT}.2.{row.n}.1"
                ds.PatientName = row.patient_name
                ds.PatientID = row.patient_id
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "O"
                ds.StudyDate = ds.SeriesDate = ds.ContentDate = row.study_date
                ds.StudyTime = ds.SeriesTime = "101500"
                ds.AccessionNumber = row.accession
                ds.StudyID = str(row.n)
                ds.StudyDescription = f"{row.modality} study"
                ds.ReferringPhysicianName = ""
                ds.InstitutionName = "Benh vien Tinh"
                ds.Modality = row.modality
                ds.SeriesNumber = 1
                ds.InstanceNumber = i
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.Rows = ds.Columns = 16
                ds.BitsAllocated = ds.BitsStored = 16
                ds.HighBit = 15
                ds.PixelRepresentation = 0
                ds.PixelData = pixels
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(tmp / f"S{row.n:06d}-{i:03d}.dcm", enforce_file_format=True)
        (tmp / ".complete").write_text(datetime.now().isoformat())
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    files = sorted(folder.glob("S*.dcm"))
    if len(files) != len(rows) * instances:
        raise SystemExit(f"{folder} holds {len(files)} files, expected {len(rows) * instances}: delete it and rerun")
    return files


# -- C-FIND client -----------------------------------------------------------------------------------


@dataclass
class FindResult:
    elapsed_s: float
    uids: list[str]
    identifiers: list[Dataset]
    status: int


class _RaceWatch(logging.Handler):
    """Counts pynetdicom's "Received unexpected C-FIND service message": its reactor thread took a response
    meant for the caller (pynetdicom issue #875), which would look like a wrong answer from the server."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "unexpected" in record.getMessage():
            self.count += 1


_RACE_WATCH = _RaceWatch()
logging.getLogger("pynetdicom").addHandler(_RACE_WATCH)


class FindClient:
    """One Study Root C-FIND association, reused for every query; TCP_NODELAY on (pynetdicom leaves Nagle on)."""

    def __init__(self, port: int, aec: str, aet: str = CALLING_AE) -> None:
        ae = AE(ae_title=aet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.acse_timeout = ae.network_timeout = 300
        ae.dimse_timeout = 120
        self.aec = aec
        self.assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        if not self.assoc.is_established:
            why = "rejected" if self.assoc.is_rejected else "aborted" if self.assoc.is_aborted else "not established"
            raise Failure(f"C-FIND association {aet} -> {aec} on port {port} {why}")
        if not any(cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
                   for cx in self.assoc.accepted_contexts):
            self.assoc.release()
            raise Failure(f"{aec} on port {port} accepted no Study Root C-FIND presentation context")
        sock = getattr(getattr(self.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def find(self, query: Query) -> FindResult:
        identifier = query.identifier()
        idents: list[Dataset] = []
        final: int | None = None
        races = _RACE_WATCH.count
        start = time.perf_counter()
        for status, ident in self.assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if not status or "Status" not in status:
                raise Failure(f"{self.aec}: no C-FIND response for {query.kind} {query.value!r} (connection lost "
                              "or timed out)")
            if status.Status in PENDING:
                idents.append(ident)
            else:
                final = int(status.Status)
        elapsed = time.perf_counter() - start
        # pynetdicom race (issue #875): send_c_find pauses the reactor thread by clearing a checkpoint and then
        # waiting for ``_is_paused``, which still reads True from before the last response if the reactor has
        # not run since; the reactor then wakes and takes the next response off the queue. Marking it unpaused
        # here (the checkpoint is set, so it cannot block) makes the next send_c_find wait for a real pause.
        self.assoc._is_paused = False
        if _RACE_WATCH.count != races:
            raise Failure(f"client-side pynetdicom race (not the server's fault) during {query.kind} "
                          f"{query.value!r}: a response was taken by pynetdicom's reactor thread")
        if final is None:
            raise Failure(f"{self.aec}: C-FIND for {query.kind} {query.value!r} ended without a final status")
        uids = [str(getattr(i, "StudyInstanceUID", "")) if i is not None else "" for i in idents]
        return FindResult(elapsed, uids, idents, final)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def __enter__(self) -> FindClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class Samples:
    """Latencies (s) and match counts of one (system, kind)."""

    times: list[float] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)
    cpu_s: float = 0.0  # server CPU (user + system) over all of them; psutil's 10 ms ticks make one query's useless

    @property
    def cpu_ms_per_query(self) -> str:
        return f"{self.cpu_s * 1000 / len(self.times):.1f}" if self.times else "-"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..1)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds == seconds else "-"


# -- the systems -------------------------------------------------------------------------------------


class QueryOrthanc(OrthancServer):
    """Orthanc that lets CALLING_AE query (C-FIND) and retrieve (C-GET), registered in DicomModalities, and
    answers in UTF-8."""

    def config(self) -> dict[str, object]:
        cfg = super().config()
        cfg["DefaultEncoding"] = "Utf8"  # Latin1 by default: C-FIND answers would lose Vietnamese letters
        cfg["DicomModalities"] = {
            "bench": {"AET": CALLING_AE, "Host": "127.0.0.1", "Port": free_port(), "AllowEcho": True,
                      "AllowFind": True, "AllowMove": True, "AllowGet": True, "AllowStore": True},
        }
        return cfg


@dataclass
class Running:
    """A started system: where to talk to it, which process to measure, its log."""

    name: str
    port: int
    aec: str
    pid: int
    log_path: Path
    log_pattern: re.Pattern[str]
    count: Callable[[], int]
    alive: Callable[[], bool]
    backlog: Callable[[], int] = lambda: 0  # derived work still to do (ours: pending/queued derived tasks)
    log_offset: int = 0

    def new_log_lines(self) -> list[str]:
        lines, self.log_offset = new_error_lines(self.log_path, self.log_offset, self.log_pattern)
        return lines


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _backlog(url: str) -> Callable[[], int]:
    def backlog() -> int:
        try:
            with psycopg.connect(_dsn(url)) as conn:
                row = conn.execute("SELECT count(*) FROM derived_task WHERE state IN ('pending', 'queued')").fetchone()
                return int(row[0]) if row else 0
        except psycopg.Error:
            return 0

    return backlog


def _count_rows(url: str) -> Callable[[], int]:
    def count() -> int:
        with psycopg.connect(_dsn(url)) as conn:
            row = conn.execute("SELECT count(*) FROM instance").fetchone()
            return int(row[0]) if row else 0

    return count


@contextlib.contextmanager
def ours(run_dir: Path, database_url: str | None, keep: bool) -> Iterator[Running]:
    """`pacs scp` on PostgreSQL (a fresh database unless given one) with file storage, no broker, after
    `pacs ae add BENCHSCU` so that the association policy lets the bench query and retrieve."""
    db_name = None
    if database_url is None:
        db_name, database_url = create_database()
    port = free_port()
    env = {
        "PACS_DATA_DIR": str(run_dir / "data"),
        "PACS_DATABASE_URL": database_url,
        "PACS_STORAGE_URL": f"file://{(run_dir / 'objects').resolve()}",
        "PACS_BROKER_URL": "",
        "PACS_DICOM_PORT": str(port),
        "PACS_AE_TITLE": OUR_AET,
    }
    scp = PacsProcess(["scp"], env, run_dir / "scp.log")
    try:
        for cmd in (["db", "upgrade"], ["ae", "add", CALLING_AE, "127.0.0.1", str(free_port()), "--archive-wide"]):
            done = run_pacs(cmd, env)
            if done.returncode != 0:
                raise Failure(f"pacs {' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        scp.start()
        scp.wait_dicom(port, timeout=120)
        assert scp.proc is not None
        yield Running(OURS, port, OUR_AET, scp.proc.pid, scp.log_path, OUR_ERRORS, _count_rows(database_url),
                      scp.alive, _backlog(database_url))
    finally:
        scp.stop()
        if db_name is not None and not keep:
            drop_database(db_name)
        if not keep:
            shutil.rmtree(run_dir / "objects", ignore_errors=True)
            shutil.rmtree(run_dir / "data", ignore_errors=True)


@contextlib.contextmanager
def orthanc(run_dir: Path, keep: bool) -> Iterator[Running]:
    server = QueryOrthanc(run_dir / "orthanc").start()
    try:
        assert server.proc is not None
        yield Running(ORTHANC, server.dicom_port, ORTHANC_AET, server.proc.pid, server.log_path, ORTHANC_ERRORS,
                      server.count_instances, server.alive)
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(run_dir / "orthanc" / "storage", ignore_errors=True)


def wait_quiet(system: Running, timeout: float = 300, window: float = 1.0, busy: float = 0.05) -> float:
    """Wait until the server has no derived work left (ours runs it in-process: thumbnails, and series metadata
    once a series has settled, seconds after its last instance) and its process tree has used under ``busy`` of a
    CPU over two ``window``s in a row; returns the seconds waited."""
    start = time.monotonic()
    while system.backlog() and time.monotonic() - start < timeout:
        time.sleep(0.5)
    last = tree_cpu_s(system.pid)
    quiet = 0
    while time.monotonic() - start < timeout:
        time.sleep(window)
        now = tree_cpu_s(system.pid)
        quiet = quiet + 1 if now - last < busy * window else 0
        last = now
        if quiet >= 2:
            break
    else:
        err.print(f"[yellow]{system.name} still busy after {timeout:.0f} s: measuring anyway[/yellow]")
    return time.monotonic() - start


def load_over_dicom(system: Running, files: list[Path], log_dir: Path, parallel: int = 2) -> float:
    """storescu ``files`` into ``system`` (each must be stored); returns the seconds the send took."""
    expected = system.count() + len(files)
    sent = send(system.port, system.aec, files, parallel, log_dir)
    if any(rc != 0 for rc in sent.returncodes) or sent.successes != len(files):
        raise Failure(f"{system.name}: storescu stored {sent.successes}/{len(files)} (exit codes "
                      f"{sent.returncodes}):\n{sent.output_tail}")
    stored = system.count()
    if stored != expected:
        raise Failure(f"{system.name}: index holds {stored} instances after the send, expected {expected}")
    return sent.elapsed_s


# -- 1. C-FIND at 10^6 indexed instances (ours) -------------------------------------------------------


def sample_rows(url: str, studies: int, n: int, seed: int) -> list[StudyRow]:
    ids = random.Random(seed).sample(range(1, studies + 1), min(studies, n))
    with psycopg.connect(_dsn(url)) as conn:
        rows = conn.execute(
            "SELECT s.id, s.study_instance_uid, s.accession_number, s.study_date, p.patient_id, p.patient_name,"
            " s.modalities_in_study, s.number_of_series, s.number_of_instances"
            " FROM study s JOIN patient p ON p.id = s.patient_fk WHERE s.id = ANY(%s) ORDER BY s.id", (ids,)
        ).fetchall()
    return [StudyRow(*r) for r in rows]


def sql_expected(conn: psycopg.Connection, query: Query) -> set[str]:
    """The StudyInstanceUIDs ``query`` must match, from the index it runs on (bulk_index writes the truth)."""
    where, params = [], []
    for keyword, value in query.keys:
        if keyword == "PatientID":
            where.append("p.patient_id = %s")
            params.append(value)
        elif keyword == "PatientName" and value.endswith("*"):
            where.append("p.patient_name_search LIKE %s")
            params.append(fold(value[:-1]) + "%")
        elif keyword == "PatientName":
            where.append("p.patient_name_search = %s")
            params.append(fold(value))
        elif keyword == "StudyDate" and "-" in value:
            where.append("s.study_date BETWEEN %s AND %s")
            params += value.split("-")
        elif keyword == "StudyDate":
            where.append("s.study_date = %s")
            params.append(value)
        elif keyword == "ModalitiesInStudy":
            where.append("EXISTS (SELECT 1 FROM series r WHERE r.study_fk = s.id AND r.modality = %s)")
            params.append(value)
        elif keyword == "AccessionNumber":
            where.append("s.accession_number = %s")
            params.append(value)
        elif keyword == "StudyInstanceUID":
            where.append("s.study_instance_uid = %s")
            params.append(value)
    sql = ("SELECT s.study_instance_uid FROM study s JOIN patient p ON p.id = s.patient_fk WHERE "
           + " AND ".join(where))
    return {r[0] for r in conn.execute(sql, params).fetchall()}


def check_answer(result: FindResult, query: Query, expected: set[str], rows_by_uid: dict[str, StudyRow]) -> str:
    """'' when the answer is right, else what is wrong."""
    if result.status != SUCCESS:
        return f"final status 0x{result.status:04X}"
    got = set(result.uids)
    if len(result.uids) != len(got):
        return f"{len(result.uids) - len(got)} duplicate matches"
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        return (f"{len(got)} matches, expected {len(expected)} (missing {len(missing)} e.g. {missing[:2]}, "
                f"unexpected {len(extra)} e.g. {extra[:2]})")
    if query.kind in ("uid", "accession") and result.identifiers:
        ident, row = result.identifiers[0], rows_by_uid.get(result.uids[0])
        if row is not None:
            want = {"AccessionNumber": row.accession, "PatientID": row.patient_id, "StudyDate": row.study_date,
                    "ModalitiesInStudy": row.modality, "NumberOfStudyRelatedSeries": str(row.series),
                    "NumberOfStudyRelatedInstances": str(row.instances), "PatientName": row.patient_name}
            for keyword, value in want.items():
                have = str(getattr(ident, keyword, "") or "").strip()
                if have != value:
                    return f"{keyword} returned {have!r}, expected {value!r}"
    return ""


def run_queries(client: FindClient, queries: dict[str, list[Query]], samples: dict[str, Samples],
                check: Callable[[Query, FindResult], str], problems: list[str], who: str, server_pid: int) -> None:
    """One pass: the kinds interleaved (query i of every kind, then i + 1 ...)."""
    rounds = max(len(v) for v in queries.values())
    for i in range(rounds):
        for kind in queries:
            if i >= len(queries[kind]):
                continue
            query = queries[kind][i]
            cpu = tree_cpu_s(server_pid)
            result = client.find(query)
            samples[kind].cpu_s += tree_cpu_s(server_pid) - cpu
            samples[kind].times.append(result.elapsed_s)
            samples[kind].matches.append(len(result.uids))
            wrong = check(query, result)
            if wrong:
                problems.append(f"{who}: {LABELS[kind]} {query.value!r}: {wrong}")


def load_indexed(args: argparse.Namespace, url: str) -> tuple[
        int, float, dict[str, list[Query]], dict[str, StudyRow], dict[Query, set[str]]]:
    """Bulk-load the synthetic archive into ``url`` and prepare the queries with their answers from SQL:
    (instances, load seconds, queries by kind, sampled rows by study UID, expected study UIDs by query).
    Shared by the C-FIND and the QIDO-RS benchmarks, so both ask the same questions of the same data."""
    err.print(f"[1] loading {args.studies} studies × {args.series} series × {args.instances} instances "
              "into PostgreSQL ...")
    t0 = time.monotonic()
    n = load(url, args.studies, args.series, args.instances)
    load_s = time.monotonic() - t0
    with psycopg.connect(_dsn(url)) as conn:
        size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
    err.print(f"[1] {n} instances indexed in {load_s:.1f} s (database {size[0] if size else '?'})")
    rows = sample_rows(url, args.studies, max(args.queries * 10, 200), args.seed)
    queries = {kind: qs for kind, qs in make_queries(rows, args.queries, args.seed).items() if kind in dict(KINDS)}
    with psycopg.connect(_dsn(url)) as conn:
        expected = {q: sql_expected(conn, q) for qs in queries.values() for q in qs}
    return n, load_s, queries, {r.uid: r for r in rows}, expected


def bench_indexed(args: argparse.Namespace, work: Path, problems: list[str]) -> None:
    db_name, url = create_database()
    try:
        n, load_s, queries, rows_by_uid, expected = load_indexed(args, url)
        samples = {kind: Samples() for kind, _ in KINDS}
        bad: list[str] = []
        with ours(work / "indexed", url, args.keep) as system:
            system.log_offset = system.log_path.stat().st_size
            idle_rss = tree_rss(system.pid)
            with FindClient(system.port, system.aec) as client, RssSampler({"scp": system.pid}) as sampler:
                warm = {kind: qs[-1:] for kind, qs in queries.items()}  # one of each, not counted
                run_queries(client, warm, {k: Samples() for k, _ in KINDS},
                            lambda q, r: check_answer(r, q, expected[q], rows_by_uid), bad, "ours", system.pid)
                for rep in range(1, args.passes + 1):
                    t = time.monotonic()
                    run_queries(client, queries, samples, lambda q, r: check_answer(r, q, expected[q], rows_by_uid),
                                bad, "ours", system.pid)
                    err.print(f"[1] pass {rep}/{args.passes}: {sum(len(q) for q in queries.values())} queries "
                              f"in {time.monotonic() - t:.1f} s")
            if not system.alive():
                problems.append("ours (indexed): pacs scp died")
            log_lines = system.new_log_lines()
        problems += [f"[1] {b}" for b in bad]
        table = Table(title=f"1. C-FIND latency at {n:,} indexed instances — ours only (pacs scp on PostgreSQL, "
                            f"{args.studies:,} studies × {args.series} series × {args.instances} instances; "
                            f"{args.queries} values × {args.passes} pass(es) per kind)")
        for col, justify in (("query kind", "left"), ("queries", "right"), ("p50 ms", "right"), ("p95 ms", "right"),
                             ("max ms", "right"), ("median matches", "right"), ("min–max matches", "right"),
                             ("server CPU ms/query", "right"), ("answers right", "right")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for kind, label in KINDS:
            s = samples[kind]
            wrong = sum(1 for b in bad if f": {label} " in b)
            table.add_row(label, str(len(s.times)), _ms(percentile(s.times, 0.5)), _ms(percentile(s.times, 0.95)),
                          _ms(max(s.times, default=float("nan"))),
                          f"{statistics.median(s.matches):g}" if s.matches else "-",
                          f"{min(s.matches)}–{max(s.matches)}" if s.matches else "-", s.cpu_ms_per_query,
                          f"{len(s.times) - wrong}/{len(s.times)}")
        out.print(table)
        out.print(f"   {KINDS_NOTE}", markup=False)
        out.print(f"   load {load_s:.0f} s (COPY); scp RSS idle {idle_rss / 1e6:.0f} MB, peak during the queries "
                  f"{sampler.peak['scp'] / 1e6:.0f} MB; answers checked against SQL on the same database")
        print_log_lines("1. ours (indexed)", log_lines)
    except (Failure, RuntimeError, TimeoutError) as exc:
        problems.append(f"[1] {type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            drop_database(db_name)


# -- 2. C-FIND side by side ------------------------------------------------------------------------


def bench_side_by_side(args: argparse.Namespace, systems: list[Running], rows: list[StudyRow],
                       problems: list[str]) -> None:
    queries = make_queries(rows, args.queries, args.seed)
    rows_by_uid = {r.uid: r for r in rows}
    folded = {q: expected_matches(rows, q) for qs in queries.values() for q in qs}
    accented = {q: expected_matches(rows, q, accent_sensitive=True) for qs in queries.values() for q in qs}
    samples = {(s.name, kind): Samples() for s in systems for kind, _ in SIDE_KINDS}
    counts: dict[tuple[str, Query], int] = {}
    bad: list[str] = []
    notes: list[str] = []

    def checker(system: str) -> Callable[[Query, FindResult], str]:
        def check(query: Query, result: FindResult) -> str:
            counts[system, query] = len(result.uids)
            if system == OURS:
                return check_answer(result, query, folded[query], rows_by_uid)
            wrong = check_answer(result, query, folded[query], rows_by_uid)
            if wrong and folded[query] != accented[query] and not check_answer(result, query, accented[query], {}):
                notes.append(query.kind)  # Orthanc's accent-sensitive PatientName matching: reported, not failed
                return ""
            return wrong

        return check

    for s in systems:
        s.log_offset = s.log_path.stat().st_size if s.log_path.exists() else 0
    for rep in range(1, args.repeats + 1):
        shift = (rep - 1) % len(systems)
        for system in systems[shift:] + systems[:shift]:
            t = time.monotonic()
            try:
                with FindClient(system.port, system.aec) as client:
                    warm = {kind: qs[-1:] for kind, qs in queries.items()}
                    run_queries(client, warm, {k: Samples() for k, _ in SIDE_KINDS}, checker(system.name), bad,
                                system.name, system.pid)
                    per_kind = {kind: samples[system.name, kind] for kind, _ in SIDE_KINDS}
                    run_queries(client, queries, per_kind, checker(system.name), bad, system.name, system.pid)
            except Failure as exc:
                bad.append(str(exc))
            err.print(f"[2] repeat {rep}/{args.repeats} {system.name}: {time.monotonic() - t:.1f} s")
    problems += [f"[2] {b}" for b in dict.fromkeys(bad)]
    names = [s.name for s in systems]
    table = Table(title=f"2. C-FIND side by side: {len(rows)} studies × 1 series × {rows[0].instances} instances "
                        f"({len(rows) * rows[0].instances} instances) loaded over DICOM into each; {args.queries} "
                        f"values × {args.repeats} repeats per kind and system, systems alternated; latency in ms")
    both = " / ".join(names)
    table.add_column("query kind")
    table.add_column(f"median matches ({both})", justify="right")
    for name in names:
        table.add_column(f"{name} p50 / p95", justify="right")
    if ORTHANC in names and OURS in names:
        table.add_column("ours ÷ Orthanc p50 (> 1: we are slower)", justify="right")
    table.add_column(f"server CPU ms/query ({both})", justify="right")
    table.add_column("same match count", justify="right")
    for kind, label in SIDE_KINDS:
        cells = [label, " / ".join(f"{statistics.median(samples[n, kind].matches):g}" if samples[n, kind].matches
                                   else "-" for n in names)]
        for name in names:
            t = samples[name, kind].times
            cells.append(f"{_ms(percentile(t, 0.5))} / {_ms(percentile(t, 0.95))}")
        if ORTHANC in names and OURS in names:
            a, b = samples[OURS, kind].times, samples[ORTHANC, kind].times
            ratio = f"{statistics.median(a) / statistics.median(b):.2f}" if a and b else "-"
            cells.append(ratio + (" †" if any(folded[q] != accented[q] for q in queries[kind]) else ""))
        cells.append(" / ".join(samples[name, kind].cpu_ms_per_query for name in names))
        qs = queries[kind]
        if len(names) == 2:
            same = sum(1 for q in qs if counts.get((names[0], q)) == counts.get((names[1], q)))
            cells.append(f"{same}/{len(qs)}")
        else:
            cells.append("-")
        table.add_row(*cells)
    out.print(table)
    out.print(f"   {KINDS_NOTE} Side by side also 'Trần*' (a family name with its diacritics and '*'), which "
              "both systems must answer alike. Server CPU: user + system of the server process during the queries of a "
              "kind, divided by their number. †: the two systems return different match counts for some values of "
              "this kind (below), so the ratio compares unequal work.", markup=False)
    for kind in dict.fromkeys(notes):
        qs = [q for q in queries[kind] if folded[q] != accented[q]]
        example = qs[0] if qs else queries[kind][0]
        ours_n = counts.get((OURS, example), len(folded[example]))
        out.print(f"   {LABELS[kind]}: Orthanc's matching is accent-sensitive (its default) and ours folds "
                  f"diacritics (SPEC §4), so the counts differ on {len(qs)}/{len(queries[kind])} values, e.g. "
                  f"{example.value!r}: ours {ours_n}, Orthanc {counts.get((ORTHANC, example), '?')} — a feature, "
                  "not a failure", markup=False)
    for s in systems:
        if not s.alive():
            problems.append(f"[2] {s.name} died during the queries")
        print_log_lines(f"2. {s.name}", s.new_log_lines())


# -- 3. C-GET --------------------------------------------------------------------------------------


@dataclass
class GetRun:
    system: str
    repeat: int
    elapsed_s: float = 0.0
    received: int = 0
    total_bytes: int = 0
    idle_rss: int = 0
    peak_rss: int = 0
    cpu_s: float = 0.0  # the server's user + system CPU during the get
    problem: str = ""

    @property
    def mb_s(self) -> float:
        return self.total_bytes / 1e6 / self.elapsed_s if self.elapsed_s else 0.0


_FINAL_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")


def getscu(system: Running, study_uid: str, series_uid: str, sops: set[str], dest: Path, repeat: int) -> GetRun:
    run = GetRun(system.name, repeat)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    cmd = [dcmtk("getscu"), "-v", "-S", "-aet", CALLING_AE, "-aec", system.aec, "-od", str(dest),
           "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
           "-k", f"SeriesInstanceUID={series_uid}", "127.0.0.1", str(system.port)]
    run.idle_rss = tree_rss(system.pid)
    cpu = tree_cpu_s(system.pid)
    log = dest.parent / f"getscu-{system.name}-{repeat}.log"
    with RssSampler({system.name: system.pid}) as sampler, log.open("wb") as fh:
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dcmtk_env(), timeout=GET_TIMEOUT_S)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
        run.elapsed_s = time.perf_counter() - start
    run.cpu_s = tree_cpu_s(system.pid) - cpu
    run.peak_rss = sampler.peak[system.name]
    files = [p for p in dest.iterdir() if p.is_file()]
    run.received = len(files)
    run.total_bytes = sum(p.stat().st_size for p in files)
    got = {str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for p in files}
    text = log.read_text(errors="replace")
    statuses = _FINAL_STATUS.findall(text)
    if rc != 0:
        run.problem = f"getscu exit code {rc}"
    elif got != sops:
        run.problem = (f"received {len(got)} distinct instances of {len(sops)} ({len(sops - got)} missing, "
                       f"{len(got - sops)} unexpected)")
    elif statuses and int(statuses[-1], 16) != SUCCESS:
        run.problem = f"final C-GET status 0x{statuses[-1]}"
    if run.problem:
        run.problem += ": " + " | ".join(text.splitlines()[-6:])
    shutil.rmtree(dest, ignore_errors=True)
    return run


def bench_get(args: argparse.Namespace, systems: list[Running], work: Path, problems: list[str]) -> None:
    ct = study_files(args.get_slices, args.get_size)
    header = dcmread(ct[0], stop_before_pixels=True)
    study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    sops = {str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for p in ct}
    sent_bytes = sum(p.stat().st_size for p in ct)
    for system in systems:
        try:
            s = load_over_dicom(system, ct, work / f"storescu-ct-{system.name}")
            waited = wait_quiet(system)
            err.print(f"[3] {system.name}: {len(ct)} CT slices stored in {s:.1f} s, idle after {waited:.0f} s more")
        except Failure as exc:
            problems.append(f"[3] {exc}")
            return
    for s in systems:
        s.log_offset = s.log_path.stat().st_size if s.log_path.exists() else 0
    runs: list[GetRun] = []
    for rep in range(1, args.repeats + 1):
        shift = (rep - 1) % len(systems)
        for system in systems[shift:] + systems[:shift]:
            time.sleep(1.0)
            run = getscu(system, study_uid, series_uid, sops, work / "get" / f"r{rep}-{system.name}", rep)
            runs.append(run)
            err.print(f"[3] repeat {rep}/{args.repeats} {system.name}: {run.received} files in {run.elapsed_s:.2f} s, "
                      f"{run.mb_s:.1f} MB/s, server CPU {run.cpu_s:.1f} s, peak RSS {run.peak_rss / 1e6:.0f} MB "
                      f"{run.problem}")
            if run.problem:
                problems.append(f"[3] {system.name} C-GET run {rep}: {run.problem}")
    table = Table(title=f"3. C-GET of one CT series ({len(ct)} slices {args.get_size}×{args.get_size}, "
                        f"{sent_bytes / 1e6:.1f} MB) with DCMTK getscu, SERIES level, Study Root, loopback; "
                        f"{args.repeats} repeats alternated; ours: pacs scp, PostgreSQL + file:// storage")
    for col, justify in (("system", "left"), ("MB/s (median)", "right"), ("min–max MB/s", "right"),
                         ("s (median)", "right"), ("server CPU s (median)", "right"),
                         ("instances received", "right"), ("idle → peak RSS MB", "right"),
                         ("runs ok", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    medians = {}
    for system in systems:
        mine = [r for r in runs if r.system == system.name]
        good = [r for r in mine if not r.problem]
        if good:
            medians[system.name] = statistics.median(r.mb_s for r in good)
        table.add_row(system.name, f"{medians[system.name]:.1f}" if good else "FAILED",
                      f"{min(r.mb_s for r in good):.1f}–{max(r.mb_s for r in good):.1f}" if good else "-",
                      f"{statistics.median(r.elapsed_s for r in good):.2f}" if good else "-",
                      f"{statistics.median(r.cpu_s for r in good):.1f}" if good else "-",
                      ", ".join(f"{r.received}" for r in mine) + f" of {len(ct)}",
                      f"{max(r.idle_rss for r in mine) / 1e6:.0f} → {max(r.peak_rss for r in mine) / 1e6:.0f}",
                      f"{len(good)}/{len(mine)}")
    out.print(table)
    if OURS in medians and ORTHANC in medians:
        out.print(f"   ours ÷ Orthanc (median MB/s; > 1 means we are faster): "
                  f"{medians[OURS] / medians[ORTHANC]:.2f}")
    for s in systems:
        if not s.alive():
            problems.append(f"[3] {s.name} died during the retrieves")
        print_log_lines(f"3. {s.name}", s.new_log_lines())


# -- report ------------------------------------------------------------------------------------------


def print_log_lines(phase: str, lines: list[str]) -> None:
    """Warning/error lines a server logged during a phase, grouped by message (UIDs, times masked)."""
    if not lines:
        out.print(f"   {phase}: no warning or error lines in the server log")
        return
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(_NOISE.sub("…", line), []).append(line)
    out.print(f"   {phase}: {len(lines)} warning/error line(s) in the server log:")
    for _, same in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:10]:
        out.print(f"     {len(same)}× {same[0][:300]}", markup=False)


def print_environment(args: argparse.Namespace) -> None:
    table = environment_table()
    table.add_row("DCMTK (getscu)", _version([dcmtk("getscu"), "--version"], r"v(\d+\.\d+\.\d+)"))
    table.add_row("Orthanc", "skipped" if args.skip_orthanc else orthanc_version())
    table.add_row("ours", "pacs scp, PostgreSQL index (fresh database), file:// storage, no broker (derived work "
                          "in-process); BENCHSCU registered with `pacs ae add`")
    table.add_row("Orthanc setup", "Debian package defaults, SQLite index, file storage, no plugins; BENCHSCU in "
                                   "DicomModalities (AllowFind/AllowGet); DefaultEncoding Utf8; TCP_NODELAY=1")
    table.add_row("SCU", "C-FIND: pynetdicom, TCP_NODELAY set on its socket; C-STORE/C-GET: DCMTK with TCP_NODELAY=1")
    out.print(table)


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20_000, help="[1] studies in the bulk index (default 20000)")
    parser.add_argument("--series", type=int, default=5, help="[1] series per study (default 5)")
    parser.add_argument("--instances", type=int, default=10, help="[1] instances per series (default 10)")
    parser.add_argument("--queries", type=int, default=30, help="[1, 2] query values per kind (default 30)")
    parser.add_argument("--passes", type=int, default=1, help="[1] passes over the queries (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="[2, 3] repeats per system, alternated (default 3)")
    parser.add_argument("--find-studies", type=int, default=400, help="[2] studies loaded over DICOM (default 400)")
    parser.add_argument("--find-instances", type=int, default=5, help="[2] instances per study (default 5)")
    parser.add_argument("--get-slices", type=int, default=500, help="[3] CT slices in the series (default 500)")
    parser.add_argument("--get-size", type=int, default=512, help="[3] rows = columns of each slice (default 512)")
    parser.add_argument("--seed", type=int, default=3, help="picks the query values (default 3)")
    parser.add_argument("--skip-indexed", action="store_true", help="leave out table 1 (10^6 instances)")
    parser.add_argument("--skip-find", action="store_true", help="leave out table 2")
    parser.add_argument("--skip-get", action="store_true", help="leave out table 3")
    parser.add_argument("--skip-orthanc", action="store_true", help="leave out Debian's Orthanc (tables 2 and 3)")
    parser.add_argument("--skip-ours", action="store_true",
                        help="leave ours out of tables 2 and 3 (to check the Orthanc side alone)")
    parser.add_argument("--keep", action="store_true", help="keep the databases and stored objects")
    args = parser.parse_args(argv)
    if min(args.studies, args.series, args.instances, args.queries, args.passes, args.repeats, args.find_studies,
           args.find_instances, args.get_slices) < 1 or args.get_size < 16:
        parser.error("counts must be >= 1 and --get-size >= 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_orthanc and find_orthanc() is None:
        err.print("[yellow]Orthanc is not installed (apt-get install orthanc): running without it[/yellow]")
        args.skip_orthanc = True
    print_environment(args)
    work = OUT_DIR / f"query-{datetime.now():%Y%m%d-%H%M%S}"
    work.mkdir(parents=True)
    err.print(f"logs under {work}")
    problems: list[str] = []
    started = time.monotonic()

    if not args.skip_indexed:
        bench_indexed(args, work, problems)

    names = ([] if args.skip_ours else [OURS]) + ([] if args.skip_orthanc else [ORTHANC])
    if names and not (args.skip_find and args.skip_get):
        rows = small_archive(args.find_studies, args.find_instances)
        files = small_archive_files(rows, args.find_instances)
        with contextlib.ExitStack() as stack:
            systems: list[Running] = []
            try:
                for name in names:
                    if name == OURS:
                        systems.append(stack.enter_context(ours(work / "ours", None, args.keep)))
                    else:
                        systems.append(stack.enter_context(orthanc(work, args.keep)))
                if not args.skip_find:
                    for system in systems:
                        s = load_over_dicom(system, files, work / f"storescu-find-{system.name}")
                        waited = wait_quiet(system)
                        err.print(f"[2] {system.name}: {len(files)} instances stored in {s:.1f} s "
                                  f"({len(files) / s:.0f}/s), idle after {waited:.0f} s more")
                    bench_side_by_side(args, systems, rows, problems)
                if not args.skip_get:
                    bench_get(args, systems, work, problems)
            except (Failure, RuntimeError, TimeoutError) as exc:
                problems.append(f"{type(exc).__name__}: {exc}")

    out.print(f"total {time.monotonic() - started:.0f} s; logs: {work}")
    if problems:
        out.print(f"[red]{len(problems)} failure(s) of the software:[/red]")
        for p in problems[:40]:
            out.print(f"  {p}", markup=False)
        if len(problems) > 40:
            out.print(f"  ... and {len(problems) - 40} more")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
