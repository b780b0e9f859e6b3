"""DICOMweb benchmark: QIDO-RS study searches at 10^6 indexed instances (ours), QIDO-RS side by side with Debian's
Orthanc and its DICOMweb plugin, and WADO-RS of a CT series from both, on loopback.

    python -m bench.dicomweb [--quick] [--studies 20000] [--slices 500] [--repeats 3] [--skip-orthanc]

1. QIDO-RS at 10^6 indexed instances, ours only: a fresh PostgreSQL database filled by ``bench.bulk_index.load``
   (20000 studies × 5 series × 10 instances, COPY), ``pacs api`` on it, an admin API token from ``pacs token
   create``; ``GET /dicom-web/studies?...`` with the query kinds of ``bench.query`` (PatientID, PatientName with
   and without diacritics, a family name and ``*``, StudyDate one day, a 7-day range + ModalitiesInStudy,
   AccessionNumber, StudyInstanceUID), one keep-alive connection, each request timed from sending it to the last
   byte of the answer. Every answer is checked against SQL on the same database.
2. QIDO-RS side by side: Orthanc cannot be loaded to 10^6 instances in reasonable time, so both systems get the
   small archive of ``bench.query`` (400 studies × 5 instances of 16×16 pixels) over DICOM with DCMTK's storescu;
   the same kinds, the systems alternated per repeat; answers checked against the generated archive.
3. WADO-RS of a CT series (``bench.generate_ct``, 500 slices of 512×512 by default) stored with storescu into both:
   series retrieve (``multipart/related; type="application/dicom"`` with ``transfer-syntax=*`` and without, with
   curl into /dev/null: MB/s of response body), ``/metadata`` (the first call after a server start, and warm),
   ``/rendered`` JPEGs (each frame's first view timed per request with 1 client, frames/s with 1 and 4 concurrent
   clients, the same frames viewed again) and WADO-RS frames (``/frames/1`` as stored, timed per request). Each
   repeat restarts both servers first and the systems alternate.
4. Issue 13's read-path goals side by side: QIDO-RS ``PatientID`` p50, ``/rendered`` and WADO-RS frame medians
   (ours ÷ Orthanc at most 1), series ``/metadata`` p50 (at most 0.1); reported, never judged.

Ours is ``pacs serve`` on a fresh PostgreSQL database with file storage (DICOM, HTTP and in-process workers in one
process) for tables 2 and 3, ``pacs api`` for table 1. Orthanc is Debian's 1.10 with the orthanc-dicomweb plugin.
Timings are reported, never judged: the exit status is 1 only when the software failed (a wrong answer, an HTTP
error, a retrieve that did not deliver every instance, a server that did not start or died), 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import httpx
from pydicom import dcmread
from rich.table import Table

from bench.environment import environment_table
from bench.ingest import (
    ORTHANC_ERRORS,
    OUR_ERRORS,
    RssSampler,
    _version,
    err,
    out,
    study_files,
    tree_cpu_s,
    tree_rss,
)
from bench.orthanc import AE_TITLE as ORTHANC_AET
from bench.orthanc import OrthancServer, find_orthanc, orthanc_version
from bench.query import (
    KINDS,
    SIDE_KINDS,
    Failure,
    Query,
    Running,
    StudyRow,
    _backlog,
    _count_rows,
    _ms,
    expected_matches,
    load_indexed,
    load_over_dicom,
    make_queries,
    percentile,
    print_log_lines,
    small_archive,
    small_archive_files,
    wait_quiet,
)
from tests.support.dcmtk import dcmtk
from tests.support.http_api import wait_http
from tests.support.net import free_port
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.postgres import create_database, drop_database

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
ROOT = "/dicom-web"
OURS, ORTHANC = "ours", "Orthanc"
OUR_AET = "PACS"
HTTP_TIMEOUT_S = 600.0  # a stall guard only
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
RETRIEVES = (("stored", ACCEPT_AS_STORED, "transfer-syntax=*"), ("default", ACCEPT_DEFAULT, "default (no syntax)"))
LABELS = dict(SIDE_KINDS)
# The 14 return keys of bench.query's C-FIND: QIDO's default study attributes hold all but StudyDescription.
INCLUDE = ("includefield", "StudyDescription")
# Compression off for both: Orthanc gzips JSON for a client that accepts it (httpx asks by default), ours does not.
NO_GZIP = {"Accept-Encoding": "identity"}
QIDO_NOTE = ("GET /dicom-web/studies?<key>=<value>&includefield=StudyDescription on one keep-alive connection "
             "(wildcards and '^' unencoded, spaces and non-ASCII letters percent-encoded as UTF-8), timed from "
             "sending the request to the last byte of the answer (JSON parsed after); no limit (every match in one "
             "answer). Kinds as bench.query's C-FIND: PatientID, AccessionNumber, StudyInstanceUID exact; "
             "PatientName a full name without diacritics ('NGUYEN^VAN AN'), the same with them ('Nguyễn^Văn An'), a "
             "family name without diacritics and '*' ('TRAN*'); StudyDate one day, and a 7-day range with "
             "ModalitiesInStudy=CT. One request of each kind first, not counted.")
ORTHANC_RAW = "*?^,-"  # left unencoded in QIDO-RS query strings (see query_string)
DICOMWEB_PLUGIN = os.environ.get("ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


# -- Orthanc with its DICOMweb plugin -----------------------------------------------------------------


def find_dicomweb_plugin() -> str | None:
    """The orthanc-dicomweb plugin (``$ORTHANC_DICOMWEB_PLUGIN`` or the Debian package's paths), or None."""
    for candidate in (DICOMWEB_PLUGIN, *sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))):
        if os.path.isfile(candidate):
            return candidate
    return None


def dicomweb_plugin_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "orthanc-dicomweb"], capture_output=True,
                              text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    plugin = find_dicomweb_plugin()
    match = re.search(r"\.so\.([\d.]+)$", os.path.realpath(plugin)) if plugin else None
    return match.group(1) if match else ("unknown" if plugin else "not installed")


class DicomwebOrthanc(OrthancServer):
    """Orthanc with the DICOMweb plugin at /dicom-web/, answering in UTF-8, QIDO-RS matching case-insensitive
    (the plugin's default is case-sensitive; C-FIND and ours ignore case)."""

    def __init__(self, workdir: Path, plugin: str) -> None:
        super().__init__(workdir)
        self.plugin = plugin

    def config(self) -> dict[str, object]:
        cfg = super().config()
        cfg["Plugins"] = [self.plugin]
        cfg["DefaultEncoding"] = "Utf8"
        cfg["DicomWeb"] = {"Enable": True, "Root": f"{ROOT}/", "EnableWado": False, "QidoCaseSensitive": False}
        return cfg


# -- the systems -------------------------------------------------------------------------------------


@dataclass
class System(Running):
    """A started system with its HTTP side: base URL, the headers every request carries, how to restart it."""

    http_url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    restart: Callable[[], None] = lambda: None


def _token(env: dict[str, str]) -> str:
    done = run_pacs(["token", "create", "bench-dicomweb", "--role", "admin", "--days", "1", "--json"], env)
    if done.returncode != 0:
        raise Failure(f"pacs token create failed:\n{done.stdout}{done.stderr}")
    return str(json.loads(done.stdout)["token"])


def _start(proc: PacsProcess, http_url: str, dicom_port: int | None) -> None:
    proc.start()
    if dicom_port is not None:
        proc.wait_dicom(dicom_port, timeout=120)
    try:
        wait_http(http_url, timeout=120)
    except TimeoutError as exc:
        raise Failure(f"pacs {proc.args[0]}: {exc}\n{proc.log_tail(30)}") from None


@contextlib.contextmanager
def ours_serve(run_dir: Path, keep: bool) -> Iterator[System]:
    """`pacs serve` on a fresh PostgreSQL database with file storage and in-process workers."""
    db_name, url = create_database()
    dicom_port, http_port = free_port(), free_port()
    env = {
        "PACS_DATA_DIR": str(run_dir / "data"),
        "PACS_DATABASE_URL": url,
        "PACS_STORAGE_URL": f"file://{(run_dir / 'objects').resolve()}",
        "PACS_BROKER_URL": "",
        "PACS_DICOM_PORT": str(dicom_port),
        "PACS_HTTP_PORT": str(http_port),
        "PACS_HL7_PORT": "0",  # no HL7 listener: nothing here sends orders
        "PACS_AE_TITLE": OUR_AET,
    }
    http_url = f"http://127.0.0.1:{http_port}"
    serve = PacsProcess(["serve"], env, run_dir / "serve.log")
    try:
        _start(serve, http_url, dicom_port)
        assert serve.proc is not None
        system = System(OURS, dicom_port, OUR_AET, serve.proc.pid, serve.log_path, OUR_ERRORS, _count_rows(url),
                        serve.alive, _backlog(url), http_url=http_url,
                        headers={"Authorization": f"Bearer {_token(env)}"})

        def restart() -> None:
            serve.stop()
            _start(serve, http_url, dicom_port)
            assert serve.proc is not None
            system.pid = serve.proc.pid

        system.restart = restart
        yield system
    finally:
        serve.stop()
        if not keep:
            drop_database(db_name)
            shutil.rmtree(run_dir / "objects", ignore_errors=True)
            shutil.rmtree(run_dir / "data", ignore_errors=True)


@contextlib.contextmanager
def ours_api(run_dir: Path, database_url: str) -> Iterator[System]:
    """`pacs api` on an existing (bulk-loaded) database; no broker, file storage (QIDO needs no objects)."""
    http_port = free_port()
    env = {
        "PACS_DATA_DIR": str(run_dir / "data"),
        "PACS_DATABASE_URL": database_url,
        "PACS_STORAGE_URL": f"file://{(run_dir / 'objects').resolve()}",
        "PACS_BROKER_URL": "",
        "PACS_HTTP_PORT": str(http_port),
    }
    http_url = f"http://127.0.0.1:{http_port}"
    api = PacsProcess(["api"], env, run_dir / "api.log")
    try:
        _start(api, http_url, None)
        assert api.proc is not None
        yield System(OURS, 0, "", api.proc.pid, api.log_path, OUR_ERRORS, _count_rows(database_url), api.alive,
                     _backlog(database_url), http_url=http_url, headers={"Authorization": f"Bearer {_token(env)}"})
    finally:
        api.stop()
        shutil.rmtree(run_dir / "data", ignore_errors=True)


@contextlib.contextmanager
def orthanc(run_dir: Path, plugin: str, keep: bool) -> Iterator[System]:
    server = DicomwebOrthanc(run_dir / "orthanc", plugin).start()
    try:
        assert server.proc is not None
        system = System(ORTHANC, server.dicom_port, ORTHANC_AET, server.proc.pid, server.log_path, ORTHANC_ERRORS,
                        server.count_instances, server.alive, http_url=server.base_url)

        def restart() -> None:
            server.stop()
            server.start()
            assert server.proc is not None
            system.pid = server.proc.pid

        system.restart = restart
        yield system
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(run_dir / "orthanc" / "storage", ignore_errors=True)


class Http:
    """One keep-alive HTTP connection to a system's DICOMweb root."""

    def __init__(self, system: System) -> None:
        self.client = httpx.Client(base_url=system.http_url + ROOT, headers={**system.headers, **NO_GZIP},
                                   timeout=HTTP_TIMEOUT_S)

    def get(self, path: str, params: list[tuple[str, str]] | None = None,
            accept: str | None = None) -> tuple[float, httpx.Response]:
        """(seconds from sending the request to the last byte of the body, the response)."""
        headers = {"Accept": accept} if accept else None
        start = time.perf_counter()
        response = self.client.get(path, params=params, headers=headers)
        return time.perf_counter() - start, response

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _http_error(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.headers.get('content-type', '')}: {response.text[:200]!r}"


# -- QIDO-RS -------------------------------------------------------------------------------------------


@dataclass
class QidoResult:
    elapsed_s: float
    uids: list[str]
    items: list[dict[str, object]]
    error: str = ""  # an HTTP error or an unreadable body


@dataclass
class Samples:
    """Latencies (s), match counts and server CPU of one (system, kind)."""

    times: list[float] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)
    cpu_s: float = 0.0  # over all of them: psutil's 10 ms ticks make one request's meaningless

    @property
    def cpu_ms_per_query(self) -> str:
        return f"{self.cpu_s * 1000 / len(self.times):.1f}" if self.times else "-"


def json_value(item: dict[str, object], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON dataset as text ('' when absent); a person name's Alphabetic."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not values:
        return ""
    value = values[0]
    if isinstance(value, dict):
        return str(value.get("Alphabetic", ""))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def query_string(params: list[tuple[str, str]]) -> str:
    """``key=value&...`` with the DICOM matching characters (``* ? ^ , -``) left as they are and everything else
    percent-encoded (spaces, non-ASCII letters as UTF-8).

    Orthanc 1.10.1 with DICOMweb plugin 1.7 does not percent-decode QIDO-RS arguments (``PatientName=PHAN%2A`` finds
    nothing where ``PHAN*`` finds the Phan family), so the wildcards and the name separator go unencoded for both
    systems; a space or a non-ASCII letter cannot, and Orthanc then finds nothing (reported, not failed)."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=ORTHANC_RAW)}" for k, v in params)


def orthanc_cannot_match(value: str) -> bool:
    """True when Orthanc 1.10.1's QIDO-RS cannot match ``value``: it must be percent-encoded (see query_string)."""
    return any(ch == " " or ord(ch) > 127 for ch in value)


def qido(http: Http, query: Query) -> QidoResult:
    elapsed, response = http.get("/studies?" + query_string([*query.keys, INCLUDE]),
                                 accept="application/dicom+json")
    if response.status_code == 204:
        return QidoResult(elapsed, [], [])
    if response.status_code != 200:
        return QidoResult(elapsed, [], [], _http_error(response))
    try:
        items = json.loads(response.content)
    except ValueError as exc:
        return QidoResult(elapsed, [], [], f"body is not JSON ({exc}): {response.text[:120]!r}")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        return QidoResult(elapsed, [], [], f"body is not a JSON array of datasets: {response.text[:120]!r}")
    return QidoResult(elapsed, [json_value(i, "0020000D") for i in items], items)


def check_qido(result: QidoResult, query: Query, expected: set[str], rows_by_uid: dict[str, StudyRow]) -> str:
    """'' when the answer is right, else what is wrong (bench.query.check_answer for DICOM JSON)."""
    if result.error:
        return result.error
    got = set(result.uids)
    if len(result.uids) != len(got):
        return f"{len(result.uids) - len(got)} duplicate matches"
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        return (f"{len(got)} matches, expected {len(expected)} (missing {len(missing)} e.g. {missing[:2]}, "
                f"unexpected {len(extra)} e.g. {extra[:2]})")
    if query.kind in ("uid", "accession") and result.items:
        row = rows_by_uid.get(result.uids[0])
        if row is not None:
            want = {"00080050": ("AccessionNumber", row.accession), "00100020": ("PatientID", row.patient_id),
                    "00080020": ("StudyDate", row.study_date), "00080061": ("ModalitiesInStudy", row.modality),
                    "00201206": ("NumberOfStudyRelatedSeries", str(row.series)),
                    "00201208": ("NumberOfStudyRelatedInstances", str(row.instances)),
                    "00100010": ("PatientName", row.patient_name)}
            for tag, (keyword, value) in want.items():
                have = json_value(result.items[0], tag).strip()
                if have != value:
                    return f"{keyword} returned {have!r}, expected {value!r}"
    return ""


def run_qido(http: Http, queries: dict[str, list[Query]], samples: dict[str, Samples],
             check: Callable[[Query, QidoResult], str], bad: list[str], who: str, pid: Callable[[], int]) -> None:
    """One pass: the kinds interleaved (request i of every kind, then i + 1 ...)."""
    for i in range(max(len(v) for v in queries.values())):
        for kind, qs in queries.items():
            if i >= len(qs):
                continue
            query = qs[i]
            cpu = tree_cpu_s(pid())
            result = qido(http, query)
            samples[kind].cpu_s += tree_cpu_s(pid()) - cpu
            samples[kind].times.append(result.elapsed_s)
            samples[kind].matches.append(len(result.uids))
            wrong = check(query, result)
            if wrong:
                bad.append(f"{who}: {LABELS[kind]} {query.value!r}: {wrong}")


# -- the report ------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What the final Markdown summary holds, filled in as the phases run."""

    environment: list[tuple[str, str]] = field(default_factory=list)
    indexed: list[str] = field(default_factory=list)
    indexed_title: str = ""
    side: list[str] = field(default_factory=list)
    side_title: str = ""
    side_notes: list[str] = field(default_factory=list)
    wado: list[str] = field(default_factory=list)
    wado_title: str = ""
    notes: list[str] = field(default_factory=list)
    goal_qido: dict[str, float] = field(default_factory=dict)  # system -> p50 s of QIDO-RS PatientID (table 2)
    goal_wado: dict[str, dict[str, float]] = field(default_factory=dict)  # system -> measure -> median s (table 3)


def _table(title: str, columns: list[tuple[str, str]]) -> Table:
    table = Table(title=title)
    for name, justify in columns:
        table.add_column(name, justify=justify)
    return table


# -- 1. QIDO-RS at 10^6 indexed instances (ours) -----------------------------------------------------


def bench_indexed(args: argparse.Namespace, work: Path, problems: list[str], report: Report) -> None:
    db_name, url = create_database()
    try:
        n, load_s, queries, rows_by_uid, expected = load_indexed(args, url)
        samples = {kind: Samples() for kind, _ in KINDS}
        bad: list[str] = []

        def check(q: Query, r: QidoResult) -> str:
            return check_qido(r, q, expected[q], rows_by_uid)

        with ours_api(work / "indexed", url) as system:
            system.log_offset = system.log_path.stat().st_size
            idle_rss = tree_rss(system.pid)
            with Http(system) as http, RssSampler({"api": system.pid}) as sampler:
                warm = {kind: qs[-1:] for kind, qs in queries.items()}
                run_qido(http, warm, {k: Samples() for k, _ in KINDS}, check, bad, "ours", lambda: system.pid)
                for rep in range(1, args.passes + 1):
                    t = time.monotonic()
                    run_qido(http, queries, samples, check, bad, "ours", lambda: system.pid)
                    err.print(f"[1] pass {rep}/{args.passes}: {sum(len(q) for q in queries.values())} requests "
                              f"in {time.monotonic() - t:.1f} s")
            if not system.alive():
                problems.append("[1] ours: pacs api died")
            log_lines = system.new_log_lines()
        bad = list(dict.fromkeys(bad))
        problems += [f"[1] {b}" for b in bad]
        title = (f"1. QIDO-RS study search at {n:,} indexed instances — ours only (pacs api on PostgreSQL, "
                 f"{args.studies:,} studies × {args.series} series × {args.instances} instances; {args.queries} "
                 f"values × {args.passes} pass(es) per kind)")
        table = _table(title, [("query kind", "left"), ("requests", "right"), ("p50 ms", "right"),
                               ("p95 ms", "right"), ("max ms", "right"), ("median matches", "right"),
                               ("min–max matches", "right"), ("server CPU ms/request", "right"),
                               ("answers right", "right")])
        report.indexed_title = (f"QIDO-RS at {n:,} indexed instances, ours only (`pacs api`, PostgreSQL; "
                                f"{args.queries} values × {args.passes} pass per kind)")
        for kind, label in KINDS:
            s = samples[kind]
            wrong = sum(1 for b in bad if f": {label} " in b)
            p50, p95 = _ms(percentile(s.times, 0.5)), _ms(percentile(s.times, 0.95))
            matches = f"{statistics.median(s.matches):g}" if s.matches else "-"
            table.add_row(label, str(len(s.times)), p50, p95, _ms(max(s.times, default=float("nan"))), matches,
                          f"{min(s.matches)}–{max(s.matches)}" if s.matches else "-", s.cpu_ms_per_query,
                          f"{len(s.times) - wrong}/{len(s.times)}")
            report.indexed.append(f"| {_md(label)} | {p50} | {p95} | {matches} | {s.cpu_ms_per_query} |")
        out.print(table)
        out.print(f"   {QIDO_NOTE}", markup=False)
        out.print(f"   load {load_s:.0f} s (COPY); pacs api RSS idle {idle_rss / 1e6:.0f} MB, peak during the "
                  f"requests {sampler.peak['api'] / 1e6:.0f} MB; answers checked against SQL on the same database")
        print_log_lines("1. ours (pacs api)", log_lines)
    except (Failure, RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
        problems.append(f"[1] {type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            drop_database(db_name)


def _md(text: str) -> str:
    """A label as Markdown: the query value in code font so that '*' and '^' survive."""
    head, _, value = text.partition(" ")
    return f"{head} `{value}`" if head == "PatientName" and value else text


# -- 2. QIDO-RS side by side -----------------------------------------------------------------------------


def bench_side_by_side(args: argparse.Namespace, systems: list[System], rows: list[StudyRow],
                       problems: list[str], report: Report) -> None:
    queries = make_queries(rows, args.queries, args.seed)
    rows_by_uid = {r.uid: r for r in rows}
    folded = {q: expected_matches(rows, q) for qs in queries.values() for q in qs}
    accented = {q: expected_matches(rows, q, accent_sensitive=True) for qs in queries.values() for q in qs}
    samples = {(s.name, kind): Samples() for s in systems for kind, _ in SIDE_KINDS}
    counts: dict[tuple[str, Query], int] = {}
    bad: list[str] = []
    notes: list[str] = []  # kinds where Orthanc's accent-sensitive matching found other studies than ours
    unmatchable: set[Query] = set()  # values Orthanc's QIDO-RS cannot match (not decoded): it found nothing

    def checker(system: str) -> Callable[[Query, QidoResult], str]:
        def check(query: Query, result: QidoResult) -> str:
            counts[system, query] = len(result.uids)
            wrong = check_qido(result, query, folded[query], rows_by_uid)
            if not wrong or system != ORTHANC or result.error:
                return wrong
            if orthanc_cannot_match(query.value) and not result.uids:
                unmatchable.add(query)  # Orthanc's limitation: reported, not failed
                return ""
            if folded[query] != accented[query] and not check_qido(result, query, accented[query], {}):
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
            with Http(system) as http:
                try:
                    warm = {kind: qs[-1:] for kind, qs in queries.items()}
                    run_qido(http, warm, {k: Samples() for k, _ in SIDE_KINDS}, checker(system.name), bad,
                             system.name, lambda s=system: s.pid)
                    per_kind = {kind: samples[system.name, kind] for kind, _ in SIDE_KINDS}
                    run_qido(http, queries, per_kind, checker(system.name), bad, system.name,
                             lambda s=system: s.pid)
                except httpx.HTTPError as exc:
                    bad.append(f"{system.name}: {type(exc).__name__}: {exc}")
            err.print(f"[2] repeat {rep}/{args.repeats} {system.name}: {time.monotonic() - t:.1f} s")
    problems += [f"[2] {b}" for b in dict.fromkeys(bad)]
    names = [s.name for s in systems]
    both = " / ".join(names)
    n_instances = len(rows) * rows[0].instances
    title = (f"2. QIDO-RS side by side: {len(rows)} studies × 1 series × {rows[0].instances} instances "
             f"({n_instances} instances) loaded over DICOM into each; {args.queries} values × {args.repeats} "
             "repeats per kind and system, systems alternated; latency in ms")
    columns = [("query kind", "left"), (f"median matches ({both})", "right")]
    columns += [(f"{name} p50 / p95", "right") for name in names]
    compare = OURS in names and ORTHANC in names
    if compare:
        columns.append(("ours ÷ Orthanc p50 (> 1: we are slower)", "right"))
    columns += [(f"server CPU ms/request ({both})", "right"), ("same match count", "right")]
    table = _table(title, columns)
    report.side_title = (f"QIDO-RS side by side at {n_instances:,} instances ({len(rows)} studies; both loaded "
                         f"over DICOM; {args.queries} values × {args.repeats} repeats per kind)")
    for kind, label in SIDE_KINDS:
        matches = " / ".join(f"{statistics.median(samples[n, kind].matches):g}" if samples[n, kind].matches
                             else "-" for n in names)
        cells = [label, matches]
        pcts = {}
        for name in names:
            t = samples[name, kind].times
            pcts[name] = f"{_ms(percentile(t, 0.5))} / {_ms(percentile(t, 0.95))}"
            cells.append(pcts[name])
        ratio = "-"
        if compare:
            a, b = samples[OURS, kind].times, samples[ORTHANC, kind].times
            ratio = f"{statistics.median(a) / statistics.median(b):.2f}" if a and b else "-"
            if any(folded[q] != accented[q] or q in unmatchable for q in queries[kind]):
                ratio += " †"
            cells.append(ratio)
        cells.append(" / ".join(samples[name, kind].cpu_ms_per_query for name in names))
        qs = queries[kind]
        same = (f"{sum(1 for q in qs if counts.get((names[0], q)) == counts.get((names[1], q)))}/{len(qs)}"
                if len(names) == 2 else "-")
        cells.append(same)
        table.add_row(*cells)
        report.side.append(f"| {_md(label)} | {matches} | {pcts.get(OURS, '-')} | {pcts.get(ORTHANC, '-')} | "
                           f"{ratio} |")
        if kind == "patient_id":
            report.goal_qido = {name: percentile(samples[name, kind].times, 0.5) for name in names}
    out.print(table)
    out.print(f"   {QIDO_NOTE} Side by side also 'Trần*' (a family name with its diacritics and '*'), which both "
              "systems must answer alike. Server CPU: user + system of the server process over the requests of a "
              "kind, divided by their number. †: the two systems return different match counts for some values "
              "of this kind (below), so the ratio compares unequal work.", markup=False)
    for kind, label in SIDE_KINDS:
        qs = [q for q in queries[kind] if q in unmatchable]
        if qs:
            line = (f"{label}: Orthanc found nothing for {len(qs)}/{len(queries[kind])} values (e.g. "
                    f"{qs[0].value!r}, ours {counts.get((OURS, qs[0]), len(folded[qs[0]]))}): Orthanc 1.10.1 with "
                    "DICOMweb 1.7 does not percent-decode QIDO-RS arguments, so a name with a space or a non-ASCII "
                    "letter never matches")
            out.print(f"   {line} — Orthanc's limitation, not counted as a failure", markup=False)
            report.side_notes.append(line)
    for kind in dict.fromkeys(notes):
        qs = [q for q in queries[kind] if folded[q] != accented[q] and q not in unmatchable]
        example = qs[0] if qs else queries[kind][0]
        line = (f"{LABELS[kind]}: Orthanc's matching is accent-sensitive and ours folds diacritics (SPEC §4), so "
                f"the counts differ on {len(qs)}/{len(queries[kind])} values, e.g. {example.value!r}: ours "
                f"{counts.get((OURS, example), len(folded[example]))}, Orthanc {counts.get((ORTHANC, example), '?')}")
        out.print(f"   {line} — a feature, not a failure", markup=False)
        report.side_notes.append(line)
    for s in systems:
        if not s.alive():
            problems.append(f"[2] {s.name} died during the searches")
        print_log_lines(f"2. {s.name}", s.new_log_lines())


# -- 3. WADO-RS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtSeries:
    study_uid: str
    series_uid: str
    sops: tuple[str, ...]  # in instance-number order
    file_bytes: int

    @property
    def path(self) -> str:
        return f"/studies/{self.study_uid}/series/{self.series_uid}"


@dataclass
class WadoRun:
    """One system's measurements in one repeat."""

    system: str
    repeat: int
    metadata_first_s: float = float("nan")
    metadata_warm_s: list[float] = field(default_factory=list)
    metadata_cpu_s: float = 0.0  # server CPU over the warm calls
    retrieve_s: dict[str, float] = field(default_factory=dict)  # per form ("stored", "default")
    retrieve_bytes: dict[str, int] = field(default_factory=dict)
    retrieve_cpu_s: dict[str, float] = field(default_factory=dict)
    retrieve_peak_rss: int = 0
    idle_rss: int = 0
    rendered_fps: dict[int, float] = field(default_factory=dict)  # per number of concurrent clients
    rendered_cpu_ms: dict[int, float] = field(default_factory=dict)  # server CPU per frame
    rendered_bytes: list[int] = field(default_factory=list)
    rendered_first_s: list[float] = field(default_factory=list)  # 1 client, each frame's first view after a start
    rendered_repeat_s: list[float] = field(default_factory=list)  # 1 client, the same frames viewed again
    frame_s: list[float] = field(default_factory=list)  # WADO-RS /frames/1, 1 client, as stored
    problems: list[str] = field(default_factory=list)

    def mb_s(self, form: str) -> float:
        s = self.retrieve_s.get(form)
        return self.retrieve_bytes[form] / 1e6 / s if s else float("nan")


def ct_series(files: list[Path]) -> CtSeries:
    headers = [dcmread(p, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                                                   "SOPInstanceUID", "InstanceNumber"])
               for p in files]
    headers.sort(key=lambda ds: int(ds.InstanceNumber))
    return CtSeries(str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID),
                    tuple(str(ds.SOPInstanceUID) for ds in headers), sum(p.stat().st_size for p in files))


def curl_get(url: str, accept: str, headers: dict[str, str]) -> tuple[int, int, float, str]:
    """GET ``url`` with curl, the body into /dev/null: (status, body bytes, seconds, content type).

    The headers (the bearer token among them) go through stdin, not the command line."""
    header_text = "".join(f"{k}: {v}\n" for k, v in {**headers, **NO_GZIP, "Accept": accept}.items())
    cmd = ["curl", "-sS", "-o", "/dev/null", "-H", "@-", "--max-time", str(int(HTTP_TIMEOUT_S)),
           "-w", "%{http_code} %{size_download} %{time_total} %{content_type}", url]
    done = subprocess.run(cmd, input=header_text, capture_output=True, text=True, timeout=HTTP_TIMEOUT_S + 30)
    parts = done.stdout.split(" ", 3)
    if done.returncode != 0 or len(parts) < 3:
        raise Failure(f"curl {url} exit {done.returncode}: {done.stderr.strip()[:300]}")
    return int(parts[0]), int(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else ""


def multipart_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body: (headers with lower-case names, payload)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError(f"no boundary in {content_type!r}")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without a blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").strip().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload[:-2] if payload.endswith(b"\r\n") else payload))
    return parts


def verify_retrieve(http: Http, ct: CtSeries, accept: str, form: str) -> str:
    """Read one retrieve fully (not timed): every instance once, as DICOM, Explicit VR LE when asked by default.
    Returns '' or what is wrong."""
    _, response = http.get(ct.path, accept=accept)
    if response.status_code != 200:
        return _http_error(response)
    try:
        parts = multipart_parts(response.headers.get("content-type", ""), response.content)
        got, syntaxes = [], set()
        for headers, payload in parts:
            if not headers.get("content-type", "").lower().startswith("application/dicom"):
                return f"a part of type {headers.get('content-type')!r}"
            ds = dcmread(io.BytesIO(payload), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            got.append(str(ds.SOPInstanceUID))
            syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    except Exception as exc:  # any unreadable body is the server's failure, reported
        return f"unreadable multipart body: {type(exc).__name__}: {exc}"
    if sorted(got) != sorted(ct.sops):
        return f"{len(got)} parts ({len(set(got))} distinct instances) for {len(ct.sops)} instances"
    if form == "default" and syntaxes != {EXPLICIT_LE}:
        return f"transfer syntaxes {sorted(syntaxes)} for a request without one (PS3.18: Explicit VR LE)"
    return ""


def check_metadata(response: httpx.Response, ct: CtSeries) -> str:
    if response.status_code != 200:
        return _http_error(response)
    try:
        items = json.loads(response.content)
        got = sorted(json_value(i, "00080018") for i in items)
    except (ValueError, AttributeError, TypeError) as exc:
        return f"unreadable metadata: {type(exc).__name__}: {exc}"
    if got != sorted(ct.sops):
        return f"metadata of {len(got)} instances for {len(ct.sops)}"
    return ""


def render_many(system: System, ct: CtSeries, sops: list[str], clients: int,
                latencies: list[float] | None = None) -> tuple[float, list[int], list[str]]:
    """GET .../rendered (Accept image/jpeg) for every SOP in ``sops``, spread over ``clients`` threads each with
    its own connection; returns (wall seconds, JPEG sizes, problems). Each request's latency is appended to
    ``latencies`` when given."""
    shares = [sops[i::clients] for i in range(clients)]
    sizes: list[int] = []
    wrong: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(share: list[str]) -> None:
        with Http(system) as http:
            barrier.wait()
            for sop in share:
                try:
                    elapsed, r = http.get(f"{ct.path}/instances/{sop}/rendered", accept="image/jpeg")
                except httpx.HTTPError as exc:
                    with lock:
                        wrong.append(f"rendered {sop}: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if r.status_code != 200 or not r.content.startswith(b"\xff\xd8"):
                        wrong.append(f"rendered {sop}: {_http_error(r)}")
                    else:
                        sizes.append(len(r.content))
                        if latencies is not None:
                            latencies.append(elapsed)

    threads = [threading.Thread(target=worker, args=(share,), daemon=True) for share in shares]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sizes, wrong


FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"'  # the study is stored uncompressed: as stored


@dataclass(frozen=True)
class ReadSets:
    """Which instances each read measure uses: disjoint where the series is large enough, so that no measure
    reads what an earlier one has just read (a server's caches would then measure the cache, not the read)."""

    warm_up: str
    rendered: list[str]  # 1 client, then the same again (the repeat view)
    rendered_4: list[str]  # 4 clients
    frames: list[str]


def read_sets(ct: CtSeries, n: int, seed: int) -> ReadSets:
    order = list(ct.sops)
    random.Random(seed).shuffle(order)
    n = min(n, len(order))

    def take(start: int) -> list[str]:
        return [order[(start + i) % len(order)] for i in range(n)]

    return ReadSets(order[0], take(1), take(1 + n), take(1 + 2 * n))


def check_frame(response: httpx.Response, frame_bytes: int) -> str:
    """'' when ``response`` is a multipart/related body of one part holding the frame's bytes."""
    if response.status_code != 200:
        return _http_error(response)
    try:
        parts = multipart_parts(response.headers.get("content-type", ""), response.content)
    except ValueError as exc:
        return f"unreadable multipart body: {exc}"
    if len(parts) != 1 or len(parts[0][1]) != frame_bytes:
        return f"{len(parts)} part(s) of {[len(p) for _, p in parts][:3]} bytes for one frame of {frame_bytes} bytes"
    return ""


def measure_wado(system: System, ct: CtSeries, args: argparse.Namespace, repeat: int, verify: bool) -> WadoRun:
    """One system's turn in one repeat, right after its restart: /metadata first and warm, the two series
    retrieves, /rendered with 1 client (each frame's first view, timed per request), 4 clients (other frames),
    the 1-client frames viewed again, and WADO-RS frames (yet other instances) one at a time."""
    run = WadoRun(system.name, repeat)
    sets = read_sets(ct, args.rendered, args.seed)
    rendered = sets.rendered
    with Http(system) as http:
        run.metadata_first_s, r = http.get(f"{ct.path}/metadata", accept="application/dicom+json")
        if wrong := check_metadata(r, ct):
            run.problems.append(f"metadata (first call): {wrong}")
        cpu = tree_cpu_s(system.pid)
        for _ in range(args.metadata_repeats):
            elapsed, r = http.get(f"{ct.path}/metadata", accept="application/dicom+json")
            run.metadata_warm_s.append(elapsed)
            if wrong := check_metadata(r, ct):
                run.problems.append(f"metadata: {wrong}")
                break
        run.metadata_cpu_s = tree_cpu_s(system.pid) - cpu
    run.idle_rss = tree_rss(system.pid)
    forms = RETRIEVES[(repeat - 1) % 2:] + RETRIEVES[:(repeat - 1) % 2]  # which form goes first alternates
    with RssSampler({system.name: system.pid}) as sampler:
        for form, accept, _ in forms:
            time.sleep(0.5)
            cpu = tree_cpu_s(system.pid)
            status, size, seconds, ctype = curl_get(system.http_url + ROOT + ct.path, accept, system.headers)
            run.retrieve_cpu_s[form] = tree_cpu_s(system.pid) - cpu
            if status != 200 or not ctype.lower().startswith("multipart/related"):
                run.problems.append(f"series retrieve ({form}): HTTP {status} {ctype}")
            elif size < ct.file_bytes:
                run.problems.append(f"series retrieve ({form}): {size} bytes of body for {ct.file_bytes} bytes of "
                                    "stored instances")
            else:
                run.retrieve_s[form], run.retrieve_bytes[form] = seconds, size
    run.retrieve_peak_rss = sampler.peak[system.name]
    if verify:
        with Http(system) as http:
            for form, accept, _ in RETRIEVES:
                if wrong := verify_retrieve(http, ct, accept, form):
                    run.problems.append(f"series retrieve ({form}), read fully: {wrong}")
    _, _, warm_wrong = render_many(system, ct, [sets.warm_up], 1)  # first render after a start: not counted
    run.problems += warm_wrong
    for clients, sops in ((1, rendered), (4, sets.rendered_4)):
        time.sleep(0.5)
        cpu = tree_cpu_s(system.pid)
        seconds, sizes, wrong = render_many(system, ct, sops, clients, run.rendered_first_s if clients == 1 else None)
        run.rendered_cpu_ms[clients] = (tree_cpu_s(system.pid) - cpu) * 1000 / max(len(sops), 1)
        if wrong:
            run.problems += wrong[:3] + ([f"... {len(wrong) - 3} more rendered failures"] if len(wrong) > 3 else [])
        else:
            run.rendered_fps[clients] = len(sops) / seconds
            run.rendered_bytes += sizes
    time.sleep(0.5)
    _, _, wrong = render_many(system, ct, rendered, 1, run.rendered_repeat_s)
    run.problems += wrong[:3]
    time.sleep(0.5)
    frame_bytes = args.size * args.size * 2  # bench.generate_ct: 16-bit, one sample
    with Http(system) as http:
        for sop in sets.frames:
            elapsed, r = http.get(f"{ct.path}/instances/{sop}/frames/1", accept=FRAME_ACCEPT)
            if wrong_frame := check_frame(r, frame_bytes):
                run.problems.append(f"frame of {sop}: {wrong_frame}")
                break
            run.frame_s.append(elapsed)
    if not system.alive():
        run.problems.append(f"{system.name} died during the WADO-RS requests")
    return run


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value == value else "-"


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if ours == ours and theirs == theirs and theirs else "-"


def bench_wado(args: argparse.Namespace, systems: list[System], work: Path, problems: list[str],
               report: Report) -> None:
    files = study_files(args.slices, args.size)
    ct = ct_series(files)
    for system in systems:
        s = load_over_dicom(system, files, work / f"storescu-ct-{system.name}")
        waited = wait_quiet(system)
        err.print(f"[3] {system.name}: {len(files)} CT slices stored in {s:.1f} s, idle after {waited:.0f} s more")
    for s in systems:
        s.log_offset = s.log_path.stat().st_size if s.log_path.exists() else 0
    runs: list[WadoRun] = []
    for rep in range(1, args.repeats + 1):
        shift = (rep - 1) % len(systems)
        for system in systems[shift:] + systems[:shift]:
            t = time.monotonic()
            try:
                system.restart()
                wait_quiet(system, timeout=120)
                run = measure_wado(system, ct, args, rep, verify=rep == 1)
            except (Failure, RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
                run = WadoRun(system.name, rep, problems=[f"{type(exc).__name__}: {exc}"])
            runs.append(run)
            err.print(f"[3] repeat {rep}/{args.repeats} {system.name} ({time.monotonic() - t:.0f} s): metadata first "
                      f"{_ms(run.metadata_first_s)} ms, warm p50 {_ms(percentile(run.metadata_warm_s, 0.5))} ms; "
                      f"retrieve {_f(run.mb_s('stored'))} / {_f(run.mb_s('default'))} MB/s; rendered "
                      f"{_f(run.rendered_fps.get(1, float('nan')))} / {_f(run.rendered_fps.get(4, float('nan')))} "
                      f"frames/s {'; '.join(run.problems)[:400]}")
            problems += [f"[3] {system.name} repeat {rep}: {p}" for p in run.problems]
    names = [s.name for s in systems]
    per = {name: [r for r in runs if r.system == name] for name in names}

    def med(name: str, pick: Callable[[WadoRun], float]) -> float:
        return _median([pick(r) for r in per[name]])

    def warm(name: str, q: float) -> float:
        return percentile([t for r in per[name] for t in r.metadata_warm_s], q)

    rendered_n = min(args.rendered, len(ct.sops))
    report.goal_wado = {n: {"rendered": med(n, lambda r: _median(r.rendered_first_s)),
                            "frame": med(n, lambda r: _median(r.frame_s)),
                            "metadata": warm(n, 0.5)} for n in names}
    nan = float("nan")
    # (label, text per system, value per system for the ratio or None, True when higher is better)
    rows: list[tuple[str, dict[str, str], dict[str, float] | None, bool]] = []
    for form, _, label in RETRIEVES:
        mb = {n: med(n, lambda r, f=form: r.mb_s(f)) for n in names}
        rows.append((f"series retrieve, {label}: MB/s", {n: _f(v) for n, v in mb.items()}, mb, True))
        rows.append(("  same: s / server CPU s (medians)",
                     {n: f"{_f(med(n, lambda r, f=form: r.retrieve_s.get(f, nan)), 2)} / "
                         f"{_f(med(n, lambda r, f=form: r.retrieve_cpu_s.get(f, nan)), 2)}" for n in names},
                     None, False))
    rows.append(("series retrieve: idle → peak RSS MB",
                 {n: f"{max((r.idle_rss for r in per[n]), default=0) / 1e6:.0f} → "
                     f"{max((r.retrieve_peak_rss for r in per[n]), default=0) / 1e6:.0f}" for n in names}, None, False))
    first = {n: med(n, lambda r: r.metadata_first_s) for n in names}
    rows.append(("/metadata first call after a start: ms (median)", {n: _ms(v) for n, v in first.items()}, first,
                 False))
    for q, name in ((0.5, "p50"), (0.95, "p95")):
        warm_q = {n: warm(n, q) for n in names}
        rows.append((f"/metadata warm: {name} ms", {n: _ms(v) for n, v in warm_q.items()}, warm_q, False))
    rows.append(("  same: server CPU ms/request",
                 {n: _f(1000 * sum(r.metadata_cpu_s for r in per[n])
                        / max(sum(len(r.metadata_warm_s) for r in per[n]), 1)) for n in names}, None, False))
    for clients in (1, 4):
        fps = {n: med(n, lambda r, c=clients: r.rendered_fps.get(c, nan)) for n in names}
        rows.append((f"/rendered JPEG, {clients} client{'s' if clients > 1 else ''}: frames/s",
                     {n: _f(v) for n, v in fps.items()}, fps, True))
        rows.append(("  same: server CPU ms/frame",
                     {n: _f(med(n, lambda r, c=clients: r.rendered_cpu_ms.get(c, nan))) for n in names}, None, False))
    for label, pick in (("/rendered one frame, 1 client, first view: median ms", lambda r: r.rendered_first_s),
                        ("/rendered the same frames viewed again: median ms", lambda r: r.rendered_repeat_s),
                        ("WADO-RS frame (/frames/1, as stored), 1 client: median ms", lambda r: r.frame_s)):
        latency = {n: med(n, lambda r, p=pick: _median(p(r))) for n in names}
        rows.append((label, {n: _ms(v) for n, v in latency.items()}, latency, False))
    rows.append(("/rendered: median JPEG bytes",
                 {n: _f(_median([float(b) for r in per[n] for b in r.rendered_bytes]), 0) for n in names}, None,
                 False))
    compare = OURS in names and ORTHANC in names
    title = (f"3. WADO-RS of one CT series ({len(ct.sops)} slices {args.size}×{args.size}, Explicit VR LE, "
             f"{ct.file_bytes / 1e6:.1f} MB stored), loopback; {args.repeats} repeat(s), each after restarting "
             "both servers, systems alternated; medians over repeats")
    columns = [("measure", "left")] + [(name, "right") for name in names]
    if compare:
        columns.append(("ours ÷ Orthanc", "right"))
    table = _table(title, columns)
    report.wado_title = (f"WADO-RS, one CT series of {len(ct.sops)} slices {args.size}×{args.size} "
                         f"({ct.file_bytes / 1e6:.1f} MB, Explicit VR LE); {args.repeats} repeats; /rendered over "
                         f"{rendered_n} instances")
    for label, texts, values, higher_is_better in rows:
        cells = [label] + [texts[n] for n in names]
        ratio = ""
        if compare and values is not None:
            r = _ratio(values[OURS], values[ORTHANC])
            ratio = "" if r == "-" else f"{r} ({'> 1: faster' if higher_is_better else '> 1: slower'})"
        if compare:
            cells.append(ratio)
        table.add_row(*cells)
        if not label.startswith("  "):
            report.wado.append("| " + " | ".join(cells) + " |")
    out.print(table)
    out.print("   Series retrieve: GET /dicom-web/studies/{s}/series/{se} with curl (body into /dev/null, "
              f"Accept-Encoding identity), Accept '{ACCEPT_AS_STORED}' (as stored) and '{ACCEPT_DEFAULT}' (PS3.18: "
              "Explicit VR LE); the study is stored in Explicit VR LE, so both forms carry the same bytes and the "
              "difference is the server's conversion path. MB/s: 10^6 bytes of response body per second of curl's "
              "time_total; the form that goes first alternates between repeats. Repeat 1 also reads each form fully "
              "(not timed) and checks every instance came once. "
              f"/metadata: the first call after the restart, then {args.metadata_repeats} warm calls per repeat "
              f"(p50/p95 over all). /rendered: Accept image/jpeg, default size and quality, {rendered_n} instances "
              "picked at random (fixed seed), one connection per client, each request timed from sending it to the "
              "last byte; 4 clients render other instances than 1 client; then the 1-client instances again (a "
              f"server's cache of rendered frames shows there); the first render after a start not counted. WADO-RS "
              f"frame: GET .../frames/1 with Accept '{FRAME_ACCEPT}' (as stored: Explicit VR LE), {rendered_n} yet "
              "other instances, one connection. Latencies: the median of each repeat, then the median over repeats.",
              markup=False)
    for s in systems:
        if not s.alive():
            problems.append(f"[3] {s.name} died during the WADO-RS requests")
        print_log_lines(f"3. {s.name}", s.new_log_lines())


# -- environment, summary ----------------------------------------------------------------------------


def print_environment(args: argparse.Namespace, report: Report) -> None:
    table = environment_table()
    curl = _version(["curl", "--version"], r"curl (\S+)")
    storescu = _version([dcmtk("storescu"), "--version"], r"v(\d+\.\d+\.\d+)")
    table.add_row("DCMTK (storescu) / curl", f"{storescu} / {curl}")
    table.add_row("Orthanc", "skipped" if args.skip_orthanc
                  else f"{orthanc_version()} + DICOMweb plugin {dicomweb_plugin_version()}")
    table.add_row("ours", "1: pacs api on a bulk-loaded PostgreSQL database; 2–3: pacs serve on a fresh PostgreSQL "
                          "database, file:// storage, in-process workers; admin API token (Authorization: Bearer), "
                          "every request audited")
    table.add_row("Orthanc setup", "Debian defaults (SQLite index, file storage, no authentication), DICOMweb plugin "
                                   "at /dicom-web/, QidoCaseSensitive false, DefaultEncoding Utf8, TCP_NODELAY=1")
    table.add_row("clients", "QIDO, /metadata, /rendered: httpx (keep-alive, TCP_NODELAY); series retrieve: curl; "
                             "storescu with TCP_NODELAY=1; Accept-Encoding identity everywhere")
    table.add_row("mode", "quick" if args.quick else "full")
    out.print(table)
    report.environment = [(str(row[0]), str(row[1])) for row in _rows(table)]


def _rows(table: Table) -> list[tuple[object, object]]:
    cols = [list(c.cells) for c in table.columns]
    return list(zip(cols[0], cols[1], strict=False)) if len(cols) >= 2 else []


# Issue 13's read-path goals: (label, where the figure comes from, the ratio ours ÷ Orthanc must not exceed)
GOALS = (("QIDO-RS `/studies?PatientID=`: p50 ms", "qido", 1.0),
         ("`/rendered` one CT frame (first view): median ms", "rendered", 1.0),
         ("WADO-RS frame (`/frames/1`): median ms", "frame", 1.0),
         ("series `/metadata` (warm): p50 ms", "metadata", 0.1))


def goal_rows(report: Report) -> list[tuple[str, float, float, float, float]]:
    """(label, ours s, Orthanc s, ratio, the ratio the goal allows) for each goal both systems were measured on."""
    rows = []
    for label, key, limit in GOALS:
        if key == "qido":
            ours, theirs = report.goal_qido.get(OURS), report.goal_qido.get(ORTHANC)
        else:
            ours, theirs = (report.goal_wado.get(n, {}).get(key) for n in (OURS, ORTHANC))
        if ours is not None and theirs is not None and ours == ours and theirs == theirs and theirs > 0:
            rows.append((label, ours, theirs, ours / theirs, limit))
    return rows


def print_goals(report: Report) -> list[str]:
    """The issue's read-path goals side by side (reported, never judged: timings decide no exit status); returns
    the Markdown lines."""
    rows = goal_rows(report)
    if not rows:
        return []
    table = _table("Read path: issue 13's goals (latency ours ÷ Orthanc; the goal is the ratio at most this)",
                   [("measure", "left"), ("ours ms", "right"), ("Orthanc ms", "right"), ("ours ÷ Orthanc", "right"),
                    ("goal", "right"), ("met", "right")])
    lines = ["", "**Read path: issue 13's goals (latency ours ÷ Orthanc)**", "",
             "| measure | ours ms | Orthanc ms | ours ÷ Orthanc | goal | met |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, ours, theirs, ratio, limit in rows:
        met = "yes" if ratio <= limit else "no"
        cells = [label, _ms(ours), _ms(theirs), f"{ratio:.2f}", f"≤ {limit:g}", met]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    out.print(table)
    return lines


def print_markdown(report: Report, names: list[str], elapsed_s: float, problems: list[str],
                   goals: list[str] | None = None) -> None:
    """The summary as Markdown, to paste into a note."""
    lines = ["", "```markdown", "### DICOMweb benchmark (`python -m bench.dicomweb`)", ""]
    lines += [f"- {k}: {v}" for k, v in report.environment]
    outcome = f"{len(problems)} failure(s) of the software" if problems else "every answer right"
    lines.append(f"- total {elapsed_s / 60:.1f} min; {outcome}")
    lines.append("- figures are noisy: a 2-core machine shared with other test runs; ratios and medians matter more")
    if report.indexed:
        lines += ["", f"**{report.indexed_title}**", "",
                  "| query kind | p50 ms | p95 ms | median matches | server CPU ms/request |",
                  "| --- | ---: | ---: | ---: | ---: |", *report.indexed]
    if report.side:
        lines += ["", f"**{report.side_title}**", "",
                  "| query kind | median matches (ours / Orthanc) | ours p50 / p95 ms | Orthanc p50 / p95 ms | "
                  "ours ÷ Orthanc p50 (> 1: slower) |", "| --- | ---: | ---: | ---: | ---: |", *report.side]
        lines += ["", "† unequal work:", *[f"- {note}" for note in report.side_notes]]
    if report.wado:
        header = "| measure | " + " | ".join(names) + " |" + (" ours ÷ Orthanc |" if len(names) == 2 else "")
        lines += ["", f"**{report.wado_title}**", "", header,
                  "| --- |" + " ---: |" * (len(names) + (1 if len(names) == 2 else 0)), *report.wado]
    lines += goals or []
    if report.notes:
        lines += ["", *[f"- {n}" for n in report.notes]]
    lines.append("```")
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dicomweb", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 20000 instances indexed, 50 slices, 10 values per kind, 3 repeats")
    parser.add_argument("--studies", type=int, help="[1] studies in the bulk index (default 20000; quick 400)")
    parser.add_argument("--series", type=int, default=5, help="[1] series per study (default 5)")
    parser.add_argument("--instances", type=int, default=10, help="[1] instances per series (default 10)")
    parser.add_argument("--queries", type=int, help="[1, 2] values per query kind (default 30; quick 10)")
    parser.add_argument("--passes", type=int, default=1, help="[1] passes over the queries (default 1)")
    parser.add_argument("--repeats", type=int, help="[2, 3] repeats per system, alternated (default 3; quick 3)")
    parser.add_argument("--find-studies", type=int, help="[2] studies loaded over DICOM (default 400; quick 100)")
    parser.add_argument("--find-instances", type=int, default=5, help="[2] instances per study (default 5)")
    parser.add_argument("--slices", type=int, help="[3] CT slices in the series (default 500; quick 50)")
    parser.add_argument("--size", type=int, default=512, help="[3] rows = columns of each slice (default 512)")
    parser.add_argument("--metadata-repeats", type=int, help="[3] warm /metadata calls per repeat (default 20; "
                                                              "quick 5)")
    parser.add_argument("--rendered", type=int, help="[3] instances per read measure: rendered with 1 client, with 4, "
                                                      "frames (default 100; quick 15)")
    parser.add_argument("--seed", type=int, default=3, help="picks the query values (default 3)")
    parser.add_argument("--skip-indexed", action="store_true", help="leave out table 1 (10^6 instances)")
    parser.add_argument("--skip-qido", action="store_true", help="leave out table 2")
    parser.add_argument("--skip-wado", action="store_true", help="leave out table 3")
    parser.add_argument("--skip-orthanc", action="store_true", help="leave out Orthanc (tables 2 and 3)")
    parser.add_argument("--skip-ours", action="store_true", help="leave ours out of tables 2 and 3")
    parser.add_argument("--keep", action="store_true", help="keep the databases and stored objects")
    args = parser.parse_args(argv)
    quick = {"studies": 400, "queries": 10, "repeats": 3, "find_studies": 100, "slices": 50, "metadata_repeats": 5,
             "rendered": 15}
    full = {"studies": 20_000, "queries": 30, "repeats": 3, "find_studies": 400, "slices": 500,
            "metadata_repeats": 20, "rendered": 100}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.studies, args.series, args.instances, args.queries, args.passes, args.repeats, args.find_studies,
           args.find_instances, args.slices, args.metadata_repeats, args.rendered) < 1 or args.size < 16:
        parser.error("counts must be >= 1 and --size >= 16")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plugin = find_dicomweb_plugin()
    if not args.skip_orthanc and (find_orthanc() is None or plugin is None):
        err.print("[yellow]Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc "
                  "orthanc-dicomweb): running without it[/yellow]")
        args.skip_orthanc = True
    report = Report()
    print_environment(args, report)
    work = OUT_DIR / f"dicomweb-{datetime.now():%Y%m%d-%H%M%S}"
    work.mkdir(parents=True)
    err.print(f"logs under {work}")
    problems: list[str] = []
    started = time.monotonic()

    if not args.skip_indexed:
        bench_indexed(args, work, problems, report)

    names = ([] if args.skip_ours else [OURS]) + ([] if args.skip_orthanc else [ORTHANC])
    if names and not (args.skip_qido and args.skip_wado):
        with contextlib.ExitStack() as stack:
            systems: list[System] = []
            try:
                for name in names:
                    if name == OURS:
                        systems.append(stack.enter_context(ours_serve(work / "ours", args.keep)))
                    else:
                        assert plugin is not None
                        systems.append(stack.enter_context(orthanc(work, plugin, args.keep)))
                if not args.skip_qido:
                    rows = small_archive(args.find_studies, args.find_instances)
                    files = small_archive_files(rows, args.find_instances)
                    for system in systems:
                        s = load_over_dicom(system, files, work / f"storescu-find-{system.name}")
                        waited = wait_quiet(system)
                        err.print(f"[2] {system.name}: {len(files)} instances stored in {s:.1f} s "
                                  f"({len(files) / s:.0f}/s), idle after {waited:.0f} s more")
                    bench_side_by_side(args, systems, rows, problems, report)
                if not args.skip_wado:
                    bench_wado(args, systems, work, problems, report)
            except (Failure, RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
                problems.append(f"{type(exc).__name__}: {exc}")

    elapsed = time.monotonic() - started
    load_now = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report.notes.append(f"load average at the end: {load_now}")
    out.print(f"total {elapsed:.0f} s; load average now {load_now}; logs: {work}")
    print_markdown(report, names, elapsed, problems, print_goals(report))
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
