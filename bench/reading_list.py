"""The radiologist's reading list at 100,000 unreported studies (PostgreSQL): p50/p95 per query shape.

    python -m bench.reading_list [--database-url URL] [--studies 120000] [--signed 20000] [--repeats 30]

Loads a synthetic archive with COPY (``bench.bulk_index``: Vietnamese names, five years of dates, CT/MR/CR/US/DX),
then adds what a RIS has: orders (STAT/URGENT/ROUTINE) linked to a third of the studies, two facilities,
signed reports for ``--signed`` studies (so ``studies - signed`` wait on the list), drafts and claims. Each query
shape is timed through :func:`pacs.reports.reading_list.reading_list` — the function behind
``GET /api/reading-list`` — and its answer checked (sorted STAT first, scope respected, total right).
Prints figures only; never fails on time. Without ``--database-url`` it creates (and drops) a database on the
local PostgreSQL server (127.0.0.1:5432, trust auth, as on the CI machines).
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
import uuid
from collections.abc import Callable

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from bench.bulk_index import ROOT, load
from pacs.db.engine import make_engine, make_read_session_factory
from pacs.reports.reading_list import UNCLAIMED, ReadingFilters, ReadingItem, reading_list
from pacs.ris.models import PRIORITY_RANK
from pacs.security.principal import AccessScope

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def add_ris_rows(url: str, studies: int, signed: int, seed: int = 5) -> dict[str, int]:
    """Facilities, orders, signed reports, drafts and claims on top of the bulk-loaded studies."""
    rnd = random.Random(seed)
    counts = {"orders": 0, "signed": 0, "drafts": 0, "claims": 0}
    with psycopg.connect(_dsn(url)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE study SET facility = CASE WHEN id % 2 = 0 THEN 'HOSP-A' ELSE 'HOSP-B' END")
        orders, reports, versions, claims = io.StringIO(), io.StringIO(), io.StringIO(), io.StringIO()
        signed_ids = set(rnd.sample(range(1, studies + 1), signed))
        report_id = 0
        for s in range(1, studies + 1):
            uid = f"{ROOT}.1.{s}"
            if s % 3 == 0:
                priority = rnd.choices(["STAT", "URGENT", "ROUTINE"], weights=[2, 8, 90])[0]
                counts["orders"] += 1
                orders.write(f"ACC{s:08d}\t2.25.{uuid.uuid4().int}\tPID\tNAME\tNAME\t\t\tRP{s}\tCT {s}\tSPS{s}\t\t"
                             f"20260101\t080000\tCT\t\t\t\tin-progress\t{priority}\t{PRIORITY_RANK[priority]}\t\t"
                             f"{'HOSP-A' if s % 2 == 0 else 'HOSP-B'}\t\t\tbench\t{uid}\n")
            status = "final" if s in signed_ids else ("draft" if s % 50 == 0 else "")
            if status:
                report_id += 1
                counts["signed" if status == "final" else "drafts"] += 1
                reports.write(f"{report_id}\t{uid}\tPID\t\tACC{s:08d}\t{status}\t1\tbench\n")
                versions.write(f"{report_id}\t1\t{status}\tfindings\timpression\tvi\tbench\tbench\t\t\\N\tbench\t\t\n")
            if status != "final" and s % 40 == 0:
                counts["claims"] += 1
                claims.write(f"{uid}\trad-{s % 7}\n")
        for table, columns, buf in (
            ("imaging_order", ["accession_number", "study_instance_uid", "patient_id", "patient_name",
                               "patient_name_search", "patient_birth_date", "patient_sex", "requested_procedure_id",
                               "requested_procedure_description", "scheduled_procedure_step_id",
                               "scheduled_station_ae_title", "scheduled_start_date", "scheduled_start_time",
                               "modality", "scheduled_performing_physician_name",
                               "scheduled_performing_physician_name_search", "referring_physician_name", "state",
                               "priority", "priority_rank", "reason", "facility", "issuer_of_patient_id",
                               "placer_order_number", "source", "linked_study_instance_uid"], orders),
            ("report", ["id", "study_instance_uid", "patient_id", "facility", "accession_number", "status",
                        "current_version", "created_by"], reports),
            ("report_version", ["report_fk", "version", "status", "findings", "impression", "language", "author",
                                "author_name", "amend_reason", "preliminary_at", "signed_by", "signed_by_name",
                                "sr_sop_instance_uid"], versions),
            ("study_claim", ["study_instance_uid", "claimed_by"], claims),
        ):
            buf.seek(0)
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                copy.write(buf.read())
        cur.execute("SELECT setval(pg_get_serial_sequence('report', 'id'), (SELECT max(id) FROM report))")
        conn.commit()
        cur.execute("ANALYZE")
    return counts


def _check(items: list[ReadingItem], total: int, facility: str | None) -> None:
    ranks = [PRIORITY_RANK[i.priority] for i in items]
    if ranks != sorted(ranks):
        raise AssertionError("reading list is not sorted by priority")
    if facility and any(i.facility != facility for i in items):
        raise AssertionError("reading list leaked another facility's study")
    if items and total < len(items):
        raise AssertionError("total smaller than the page")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--studies", type=int, default=120_000)
    parser.add_argument("--signed", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    created = ""
    url = args.database_url
    if not url:
        created = f"pacs_bench_rl_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(created)))
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{created}"
    try:
        t0 = time.monotonic()
        load(url, args.studies, 1, 1)
        counts = add_ris_rows(url, args.studies, args.signed)
        print(f"loaded {args.studies} studies ({args.studies - args.signed} unreported), {counts} "
              f"in {time.monotonic() - t0:.1f} s")
        engine = make_engine(url)
        sessions = make_read_session_factory(engine)
        everyone = AccessScope()
        hosp_a = AccessScope(facilities=frozenset({"HOSP-A"}))
        shapes: list[tuple[str, AccessScope, ReadingFilters, int, str | None]] = [
            ("first page (50), unrestricted", everyone, ReadingFilters(), 0, None),
            ("first page, one facility", hosp_a, ReadingFilters(), 0, "HOSP-A"),
            ("modality CT, one facility", hosp_a, ReadingFilters(modality="CT"), 0, "HOSP-A"),
            ("priority STAT", everyone, ReadingFilters(priority="STAT"), 0, None),
            ("assigned to one radiologist", everyone, ReadingFilters(assigned="rad-3"), 0, None),
            ("unclaimed, date range 1 month", hosp_a,
             ReadingFilters(assigned=UNCLAIMED, date_from="20240101", date_to="20240131"), 0, "HOSP-A"),
            ("page 21 (offset 1000)", everyone, ReadingFilters(), 1000, None),
        ]
        print(f"{'query':<36} {'total':>8} {'p50 ms':>8} {'p95 ms':>8}")
        for label, scope, filters, offset, facility in shapes:
            samples, total = _time(sessions, lambda session, s=scope, f=filters, o=offset: reading_list(
                session, s, f, limit=50, offset=o), args.repeats, facility)
            print(f"{label:<36} {total:>8} {_pct(samples, 50):>8.1f} {_pct(samples, 95):>8.1f}")
        engine.dispose()
    finally:
        if created:
            with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(created)))


def _time(sessions: Callable, run: Callable, repeats: int, facility: str | None) -> tuple[list[float], int]:  # type: ignore[type-arg]
    samples, total = [], 0
    for n in range(repeats + 2):
        with sessions() as session:
            t0 = time.perf_counter()
            items, total = run(session)
            elapsed = time.perf_counter() - t0
        _check(items, total, facility)
        if n >= 2:  # the first two warm the caches
            samples.append(elapsed * 1000)
    return samples, total


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if q != 50 else statistics.median(values)


if __name__ == "__main__":
    main()
