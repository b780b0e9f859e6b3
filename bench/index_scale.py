"""The index at 10^7 instances (PostgreSQL): load time, size, and p50/p95 of the queries people run.

    python -m bench.index_scale [--instances 10000000] [--runs 30] [--keep] [--database-url URL [--load]]

Creates a database of its own on the local PostgreSQL server (127.0.0.1:5432, trust auth, as on the CI
machines; dropped at the end unless ``--keep``), brings it to the newest schema with the project's migrations
(:mod:`pacs.db.migrate`), and COPYs a synthetic province archive in (:mod:`bench.scale_data`: ~10 facilities,
~800,000 studies of ~400,000 patients for 10^7 instances, Vietnamese names with and without diacritics, ten
years of dates, reports, orders and claims). Secondary indexes and foreign keys are dropped for the load and
re-created afterwards from their own definitions (``pg_get_indexdef``/``pg_get_constraintdef``), so the schema
queried is exactly the migrations'; ``--load-with-indexes`` keeps them in place instead.

Then every query goes through the project's own code, in-process (no network):

- C-FIND (what ``dicom_scp.find_service`` does: :class:`pacs.query.engine.QueryEngine`, every match read) at
  study level by PatientID, AccessionNumber, StudyInstanceUID, one StudyDate, a full PatientName with and without
  diacritics; the series of a study; the instances of a series;
- QIDO-RS (what ``viewer_api.dicomweb.qido`` does: ``head(200)``, plus a count when the answer does not fit):
  a month of StudyDate, a name prefix with and without diacritics (``NGUYEN^VAN*``, ``Nguyễn^Văn*``), the
  instances of a study, and the study browser's first page (OHIF's ``limit=101`` without filters, and the day's
  studies: ``StudyDate`` = the last day);
- the radiologist's reading list (:func:`pacs.reports.reading_list.reading_list`, first page of 50);
- through the HTTP stack in-process (FastAPI's ``TestClient``: API token, audit row, JSON body):
  ``GET /dicom-web/studies`` by PatientID, by AccessionNumber, and OHIF's ``limit=101`` first page;

unscoped (an archive-wide principal, a registered AE) and as a technologist of one facility (the scope adds its
condition to the SQL). 30 runs per kind (``--runs``), each with another key picked from the loaded rows, after
two warm-up runs. Prints p50/p95/max per kind, and the plan (``EXPLAIN (ANALYZE, BUFFERS)``) of every kind whose
p95 exceeds 100 ms. Prints figures only: it never fails on time; it exits 1 only when an answer is wrong (an
exact key that does not find its study, a scoped answer that shows another facility's study).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bench.scale_data import FACILITY_CODES, TABLES, Totals, generate
from pacs.db import migrate
from pacs.db.engine import make_engine, make_read_session_factory
from pacs.query.attributes import Root
from pacs.query.engine import Query, QueryEngine, QueryResult
from pacs.reports.reading_list import ReadingFilters, reading_list
from pacs.security.principal import UNRESTRICTED, AccessScope, scope_for
from pacs.security.roles import Role

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
RETURN_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
               "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyInstanceUID")
SERIES_KEYS = ("Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances")
INSTANCE_KEYS = ("SOPClassUID", "InstanceNumber", "Rows", "Columns")
HEAD_ROWS = 200  # viewer_api.dicomweb.qido.HEAD_ROWS
SLOW_MS = 100.0


def create_bench_database(prefix: str) -> tuple[str, str]:
    """A new empty database on the local server: its name and SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_bench_database(name: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# -- loading ---------------------------------------------------------------------------------------------------

def _secondary_objects(cur: psycopg.Cursor, tables: list[str]) -> tuple[list[tuple[str, str, str]],
                                                                        list[tuple[str, str]]]:
    """(table, constraint, definition) of every constraint but the primary keys, and (index, definition) of every
    index that backs no constraint, on ``tables``: what the load drops and re-creates."""
    cur.execute("""SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid)
                   FROM pg_constraint c WHERE c.conrelid = ANY(%s::regclass[]) AND c.contype IN ('u', 'f')
                   ORDER BY c.contype DESC, c.conname""", (tables,))  # unique ('u') before foreign keys ('f')
    constraints = [(t, n, d) for t, n, d in cur.fetchall()]
    cur.execute("""SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i
                   WHERE i.indrelid = ANY(%s::regclass[]) AND NOT i.indisprimary
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
                   ORDER BY 1""", (tables,))
    indexes = [(n, d) for n, d in cur.fetchall()]
    return constraints, indexes


def _foreign_keys_to(cur: psycopg.Cursor, tables: list[str]) -> list[tuple[str, str, str]]:
    """Foreign keys of other tables that point at ``tables`` (they depend on the unique indexes dropped)."""
    cur.execute("""SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c
                   WHERE c.contype = 'f' AND c.confrelid = ANY(%s::regclass[])
                   AND NOT c.conrelid = ANY(%s::regclass[])""", (tables, tables))
    return [(t, n, d) for t, n, d in cur.fetchall()]


def load(url: str, instances: int, seed: int, with_indexes: bool, log: Callable[[str], None]) -> Totals:
    """Migrate and COPY the archive in; returns what was loaded."""
    t0 = time.monotonic()
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    log(f"migrated in {time.monotonic() - t0:.1f} s")
    tables = [t for t, _ in TABLES]
    totals = Totals()
    with psycopg.connect(_dsn(url)) as conn, conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
        cur.execute("SET maintenance_work_mem = '512MB'")
        constraints, indexes = _secondary_objects(cur, tables)
        outside = _foreign_keys_to(cur, tables)
        if not with_indexes:
            for table, name, _ in [*outside, *reversed(constraints)]:  # foreign keys first
                cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table),
                                                                                 sql.Identifier(name)))
            for name, _ in indexes:
                cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
            conn.commit()
        t1 = time.monotonic()
        next_report = t1 + 30
        for chunk in generate(instances, seed, totals=totals):
            for table, columns in TABLES:
                buf = chunk.buffers[table]
                if not chunk.rows[table]:
                    continue
                with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))) as copy:
                    copy.write(buf.getvalue())
            conn.commit()
            if time.monotonic() > next_report:
                next_report += 30
                done = totals.rows["instance"]
                log(f"  {done:,} instances ({done / instances:.0%}) in {time.monotonic() - t1:.0f} s")
        log(f"COPY of {totals.rows['instance']:,} instances: {time.monotonic() - t1:.1f} s")
        if not with_indexes:
            t2 = time.monotonic()
            for name, definition in indexes:
                t3 = time.monotonic()
                cur.execute(definition)
                conn.commit()
                log(f"  index {name}: {time.monotonic() - t3:.1f} s")
            for table, name, definition in [*constraints, *outside]:
                t3 = time.monotonic()
                cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
                    sql.Identifier(table), sql.Identifier(name)) + sql.SQL(definition))  # type: ignore[arg-type,unused-ignore]
                conn.commit()
                log(f"  constraint {name}: {time.monotonic() - t3:.1f} s")
            log(f"indexes and constraints re-created in {time.monotonic() - t2:.1f} s")
        for table in tables:
            if table != "study_claim":
                cur.execute(sql.SQL("SELECT setval(pg_get_serial_sequence({}, 'id'), "
                                    "(SELECT coalesce(max(id), 1) FROM {}))").format(sql.Literal(table),
                                                                                     sql.Identifier(table)))
        conn.commit()
        t4 = time.monotonic()
        conn.autocommit = True
        cur.execute("VACUUM (ANALYZE)")  # the visibility map too: index-only scans, as on a settled archive
        log(f"VACUUM ANALYZE: {time.monotonic() - t4:.1f} s")
    return totals


# -- measuring -------------------------------------------------------------------------------------------------

@dataclass
class Kind:
    label: str
    run: Callable[[int], int]  # run number -> rows returned (or the total, for the reading list)
    explain: Callable[[int], list[str]] | None = None  # the SQL statements of run n, for EXPLAIN


@dataclass
class Figures:
    label: str
    p50: float
    p95: float
    max: float
    rows: float  # median


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _sql(result: QueryResult, limit: int | None = None) -> list[str]:
    """The statement a transport runs (with QIDO's head limit), and for QIDO the count that follows it."""
    stmt = result.prepared.statement if limit is None else result.prepared.statement.limit(limit)
    statements = [stmt] if limit is None else [stmt, result.prepared.count_statement]
    return [str(s.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})).replace("%%", "%")
            for s in statements]


class Bench:
    def __init__(self, url: str, runs: int, seed: int) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessions: sessionmaker[Session] = make_read_session_factory(self.engine)
        self.query = QueryEngine(self.sessions)
        self.runs = runs
        self.rnd = random.Random(seed)
        self.failures: list[str] = []
        self.samples = self._samples()

    def _samples(self) -> dict[str, list[Any]]:
        """Keys picked from the loaded rows: random studies (with their patient, facility, first series) and days."""
        n = self.runs + 2
        with self.sessions() as s:
            max_id = int(s.execute(text("SELECT max(id) FROM study")).scalar_one())
            ids = self.rnd.sample(range(1, max_id + 1), min(max_id, max(4 * n, 200)))
            rows = s.execute(text(
                "SELECT st.id, st.study_instance_uid, st.accession_number, st.study_date, st.facility, p.patient_id,"
                " p.patient_name, (SELECT se.series_instance_uid FROM series se WHERE se.study_fk = st.id"
                " ORDER BY se.id DESC LIMIT 1) FROM study st JOIN patient p ON p.id = st.patient_fk"
                " WHERE st.id = ANY(:ids)"), {"ids": ids}).all()
            last_day = s.execute(text("SELECT max(study_date) FROM study")).scalar_one()
        picked = [tuple(r) for r in rows]
        self.rnd.shuffle(picked)
        return {"studies": picked, "last_day": [last_day], "names": [r[6] for r in picked]}

    def study(self, n: int) -> tuple[Any, ...]:
        rows = self.samples["studies"]
        return tuple(rows[n % len(rows)])

    # -- the two ways transports read a QueryResult
    def cfind(self, q: Query) -> int:
        return sum(1 for _ in self.query.search(q))

    def qido(self, q: Query) -> int:
        result = self.query.search(q)
        head = result.head(HEAD_ROWS)
        total = head.total if head.total is not None else result.count()
        return total

    def time(self, kind: Kind) -> Figures:
        samples, counts = [], []
        for n in range(self.runs + 2):
            t0 = time.perf_counter()
            count = kind.run(n)
            elapsed = (time.perf_counter() - t0) * 1000
            if n >= 2:  # the first two warm the caches
                samples.append(elapsed)
                counts.append(count)
        return Figures(kind.label, statistics.median(samples), _pct(samples, 95), max(samples),
                       statistics.median(counts))

    def explain(self, kind: Kind) -> str:
        if kind.explain is None:
            return "    (several statements: no single plan)"
        out = []
        with psycopg.connect(_dsn(self.url)) as conn:  # no bind parameters: '%' and ':' stay as they are
            for statement in kind.explain(0):
                lines = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement).fetchall()  # type: ignore[call-overload,unused-ignore]
                out += [f"    {line[0]}" for line in lines] + [""]
        return "\n".join(out)

    def check(self, ok: bool, what: str) -> None:
        if not ok and what not in self.failures:
            self.failures.append(what)


def _name_prefix(name: str, diacritics: bool) -> str:
    """``Nguyễn^Văn An`` -> ``Nguyễn^Văn*`` (or its folded ``NGUYEN^VAN*``)."""
    from pacs.text import fold
    family, _, rest = name.partition("^")
    value = f"{family}^{rest.split(' ')[0]}*"
    return value if diacritics else fold(value)


def kinds(b: Bench, scope: AccessScope, tag: str) -> list[Kind]:
    """The query kinds, each run with another key per run; ``scope`` is the asker's."""
    facility = next(iter(scope.facilities)) if scope.facilities else None

    def mine(n: int) -> tuple[Any, ...]:
        """A sampled study of the asker's facility when scoped (so exact keys find it)."""
        rows = b.samples["studies"]
        if facility is None:
            return b.study(n)
        own = [r for r in rows if r[4] == facility] or rows
        return tuple(own[n % len(own)])

    def study_q(filters: dict[str, str], limit: int | None = None) -> Query:
        return Query("STUDY", Root.STUDY_ROOT, filters, RETURN_KEYS, limit=limit, relational=True, scope=scope)

    def exact(label: str, key: str, column: int) -> Kind:
        def run(n: int) -> int:
            row = mine(n)
            q = study_q({key: str(row[column])})
            found = b.cfind(q)
            b.check(found >= 1, f"{tag}: {label} did not find its study")
            return found
        return Kind(f"C-FIND {label}", run, lambda n: _sql(b.query.search(study_q({key: str(mine(n)[column])}))))

    def day(n: int) -> str:
        return str(b.study(n)[3])

    def month(n: int) -> str:
        d = str(b.study(n)[3])
        return f"{d[:6]}01-{d[:6]}31"

    def name_at(n: int) -> str:
        names = b.samples["names"]
        return str(names[n % len(names)])

    def series_q(n: int) -> Query:
        return Query("SERIES", Root.STUDY_ROOT, {"StudyInstanceUID": str(mine(n)[1])}, SERIES_KEYS, scope=scope)

    def instances_q(n: int) -> Query:
        row = mine(n)
        return Query("IMAGE", Root.STUDY_ROOT, {"StudyInstanceUID": str(row[1]), "SeriesInstanceUID": str(row[7])},
                     INSTANCE_KEYS, scope=scope)

    def study_instances_q(n: int) -> Query:
        return Query("IMAGE", Root.STUDY_ROOT, {"StudyInstanceUID": str(mine(n)[1])}, INSTANCE_KEYS, relational=True,
                     scope=scope, limit=None)

    def first_page_q(_: int) -> Query:
        return study_q({}, limit=101)

    def last_day_q(_: int) -> Query:
        return study_q({"StudyDate": str(b.samples["last_day"][0])}, limit=101)

    def reading(_: int) -> int:
        with b.sessions() as s:
            items, total = reading_list(s, scope, ReadingFilters(), limit=50)
        b.check(not facility or all(i.facility == facility for i in items), f"{tag}: reading list out of scope")
        return total

    def qido_kind(label: str, make: Callable[[int], Query]) -> Kind:
        return Kind(f"QIDO {label}", lambda n: b.qido(make(n)),
                    lambda n: _sql(b.query.search(make(n)), HEAD_ROWS + 1))

    def cfind_kind(label: str, make: Callable[[int], Query]) -> Kind:
        return Kind(f"C-FIND {label}", lambda n: b.cfind(make(n)), lambda n: _sql(b.query.search(make(n))))

    def name_q(diacritics: bool) -> Callable[[int], Query]:
        return lambda n: study_q({"PatientName": _name_prefix(name_at(n), diacritics)}, limit=101)

    return [
        exact("PatientID", "PatientID", 5),
        exact("AccessionNumber", "AccessionNumber", 2),
        exact("StudyInstanceUID", "StudyInstanceUID", 1),
        cfind_kind("StudyDate one day", lambda n: study_q({"StudyDate": day(n)})),
        cfind_kind("PatientName full, no diacritics", lambda n: study_q({"PatientName": _full(name_at(n), False)})),
        cfind_kind("PatientName full, diacritics", lambda n: study_q({"PatientName": _full(name_at(n), True)})),
        cfind_kind("series of a study", series_q),
        cfind_kind("instances of a series", instances_q),
        qido_kind("instances of a study", study_instances_q),
        qido_kind("StudyDate one month (limit 101)", lambda n: study_q({"StudyDate": month(n)}, limit=101)),
        qido_kind("PatientName NGUYEN^VAN* (limit 101)", name_q(False)),
        qido_kind("PatientName Nguyễn^Văn* (limit 101)", name_q(True)),
        qido_kind("first page, no filter (limit 101)", first_page_q),
        qido_kind("first page, last day (limit 101)", last_day_q),
        Kind("reading list, first page (50)", reading),
    ]


def _full(name: str, diacritics: bool) -> str:
    from pacs.text import fold
    return name if diacritics else fold(name)


def measure(url: str, runs: int, seed: int, explain: bool, log: Callable[[str], None]) -> list[str]:
    """Time every kind unscoped and as one facility's technologist; returns the failures."""
    b = Bench(url, runs, seed)
    busiest = FACILITY_CODES[0]
    scopes = [("archive-wide", UNRESTRICTED), (f"technologist of {busiest}", scope_for(Role.TECHNOLOGIST, busiest))]
    slow: list[tuple[str, Kind]] = []
    for tag, scope in scopes:
        log(f"\n{tag}: {runs} runs per kind (+2 warm-up), ms")
        log(f"{'query':<44} {'p50':>8} {'p95':>8} {'max':>8} {'rows':>9}")
        for kind in kinds(b, scope, tag):
            f = b.time(kind)
            mark = "  *" if f.p95 > SLOW_MS else ""
            log(f"{f.label:<44} {f.p50:>8.1f} {f.p95:>8.1f} {f.max:>8.1f} {f.rows:>9.0f}{mark}")
            if f.p95 > SLOW_MS:
                slow.append((tag, kind))
    http(b, log)
    if explain:
        for tag, kind in slow:
            log(f"\nEXPLAIN (ANALYZE, BUFFERS) {kind.label} [{tag}]:")
            log(b.explain(kind))
    b.engine.dispose()
    return b.failures


def http(b: Bench, log: Callable[[str], None]) -> None:
    """The same searches through the HTTP stack, in-process (FastAPI's TestClient: routing, the API token, the
    audit row, the JSON body; no socket): QIDO-RS by PatientID and by AccessionNumber, and OHIF's first page."""
    import tempfile

    from fastapi.testclient import TestClient

    from pacs.context import AppContext
    from pacs.security.accounts import create_token
    from pacs.settings import Settings
    from viewer_api.app import create_app

    with tempfile.TemporaryDirectory(prefix="pacs-bench-scale-") as tmp:
        ctx = AppContext.create(Settings(data_dir=tmp, database_url=b.url))
        try:
            tokens = {}
            with ctx.sessions() as session, session.begin():
                for tag, role, facility in (("archive-wide radiologist", "radiologist", ""),
                                            (f"technologist of {FACILITY_CODES[0]}", "technologist",
                                             FACILITY_CODES[0])):
                    secret = create_token(session, f"bench-{uuid.uuid4().hex[:8]}", role, days=1,
                                          facility=facility).secret
                    tokens[tag] = {"Authorization": f"Bearer {secret}", "Accept": "application/dicom+json"}
            with TestClient(create_app(ctx)) as client:
                for tag, headers in tokens.items():
                    facility = FACILITY_CODES[0] if "technologist" in tag else ""
                    log(f"\nHTTP QIDO-RS in-process, {tag}: {b.runs} runs per kind (+2 warm-up), ms")
                    log(f"{'request':<44} {'p50':>8} {'p95':>8} {'max':>8} {'rows':>9}")
                    for kind in _http_kinds(b, client, headers, facility):
                        f = b.time(kind)
                        log(f"{f.label:<44} {f.p50:>8.1f} {f.p95:>8.1f} {f.max:>8.1f} {f.rows:>9.0f}")
        finally:
            ctx.close()


def _http_kinds(b: Bench, client: Any, headers: dict[str, str], facility: str) -> list[Kind]:
    rows = [r for r in b.samples["studies"] if not facility or r[4] == facility] or b.samples["studies"]

    def get(label: str, params: Callable[[int], dict[str, str]]) -> Kind:
        def run(n: int) -> int:
            response = client.get("/dicom-web/studies", params=params(n), headers=headers)
            b.check(response.status_code == 200, f"HTTP {response.status_code} for {label}")
            return len(response.json()) if response.status_code == 200 else 0
        return Kind(label, run)

    return [get("GET /studies?PatientID=", lambda n: {"PatientID": str(rows[n % len(rows)][5])}),
            get("GET /studies?AccessionNumber=", lambda n: {"AccessionNumber": str(rows[n % len(rows)][2])}),
            get("GET /studies?limit=101 (OHIF first page)", lambda n: {"limit": "101"})]


def _size(url: str) -> str:
    with psycopg.connect(_dsn(url)) as conn:
        row = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
        tables = conn.execute(
            "SELECT relname, pg_size_pretty(pg_table_size(oid)), pg_size_pretty(pg_indexes_size(oid)) FROM pg_class"
            " WHERE relname IN ('patient','study','series','instance','report') ORDER BY pg_total_relation_size(oid)"
            " DESC").fetchall()
    return f"{row[0] if row else '?'} (" + ", ".join(f"{t}: {d} + indexes {i}" for t, d, i in tables) + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10_000_000, help="instances to load (10^7)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per query kind (30)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--database-url", default="",
                        help="measure this already loaded database instead of creating and loading one")
    parser.add_argument("--load", action="store_true",
                        help="with --database-url: migrate and load that (empty) database first")
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    parser.add_argument("--load-with-indexes", action="store_true",
                        help="COPY with every index and foreign key in place (slower; measures ingest-like upkeep)")
    parser.add_argument("--no-explain", action="store_true", help="no EXPLAIN of the kinds slower than 100 ms")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    created = ""
    url = args.database_url
    if not url:
        created, url = create_bench_database("pacs_bench_scale")
    log(f"database {make_url(url).database}; {os.cpu_count()} CPUs; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    try:
        if created or args.load:
            t0 = time.monotonic()
            totals = load(url, args.instances, args.seed, args.load_with_indexes, log)
            log(f"loaded in {time.monotonic() - t0:.1f} s: " + ", ".join(f"{t} {n:,}" for t, n in totals.rows.items())
                + f"; studies by modality {totals.modalities}; {totals.waiting:,} waiting to be read")
        log(f"database size {_size(url)}")
        failures = measure(url, args.runs, args.seed, not args.no_explain, log)
    finally:
        if created and not args.keep:
            drop_bench_database(created)
        elif created:
            log(f"kept: {url}")
    for failure in failures:
        log(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
