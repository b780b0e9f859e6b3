"""The study browser's first page at 100,000 studies in PostgreSQL (issue 16, must-show 5): under 1 s.

    python -m bench.ui_browser [--studies 100000] [--runs 11] [--keep] [--database-url URL [--load]] [--explain]

Creates a database of its own on the local PostgreSQL server (127.0.0.1:5432, trust auth; dropped at the end unless
``--keep``), migrates it and COPYs a synthetic province archive in with :func:`bench.index_scale.load` (the same
loader and data as the index-scale bench: ~10 facilities, Vietnamese names, ten years of dates, reports), sized for
``--studies`` studies. Then it serves the real FastAPI app with uvicorn on a loopback port (a thread of this
process; requests go through a socket), signs in through the sign-in page (``GET /login``, ``POST /login`` with
its CSRF token: the session cookie), and times ``GET /ui/studies`` — the whole page: session check, search,
count, audit row, template — for:

- an archive-wide administrator's first page (every study, newest first);
- a clinician of the largest facility (the scope's SQL condition);
- the clinician's search by a name without diacritics (``nguyen van an``), and one month of study dates.

Prints the median, p90 and max of ``--runs`` requests per kind after two warm-up requests, and with ``--explain``
the plans of the browser's statements. It exits 1 when a page is not 200 or the first page's median is 1 s or
more (the issue's bound).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import psycopg
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

from bench.index_scale import _dsn, create_bench_database, drop_bench_database, load
from bench.scale_data import FACILITY_CODES, MEAN_INSTANCES_PER_STUDY

BOUND_S = 1.0
PASSWORD = "bench-password-123"
_RUN = uuid.uuid4().hex[:6]  # users of this run (a kept database is measured again with new ones)
ADMIN, CLINICIAN = f"bench-admin-{_RUN}", f"bench-clinician-{_RUN}"


def _log(line: str) -> None:
    print(line, flush=True)


@contextmanager
def serving(url: str, data_dir: str) -> Iterator[tuple[str, object]]:
    """The app on a loopback port (uvicorn in a thread), with a clinician and an administrator; yields the base URL
    and the app context."""
    import uvicorn

    from pacs.context import AppContext
    from pacs.security.accounts import create_user
    from pacs.settings import Settings
    from tests.support.net import free_port
    from viewer_api.app import create_app

    ctx = AppContext.create(Settings(data_dir=data_dir, database_url=url, audit_coalesce_s=0))
    with ctx.sessions() as session, session.begin():
        create_user(session, ADMIN, PASSWORD, "admin")
        create_user(session, CLINICIAN, PASSWORD, "clinician", facility=FACILITY_CODES[0])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", ctx
    finally:
        server.should_exit = True
        thread.join(10)
        ctx.close()


def sign_in(base: str, username: str) -> httpx.Client:
    """A client holding a session cookie, got through the sign-in page as a browser gets it."""
    client = httpx.Client(base_url=base, timeout=60)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert page.status_code == 200 and token, f"sign-in page: {page.status_code}"
    answer = client.post("/login", data={"username": username, "password": PASSWORD, "csrf": token.group(1),
                                         "next": "/ui/studies"}, follow_redirects=False)
    assert answer.status_code == 303 and "pacs_session" in client.cookies, f"sign-in: {answer.status_code}"
    return client


def timed(client: httpx.Client, params: dict[str, str], runs: int) -> tuple[list[float], int, str]:
    """Seconds per request (after two warm-up requests), the status and the page's result line."""
    samples: list[float] = []
    status, line = 0, ""
    for n in range(runs + 2):
        t0 = time.perf_counter()
        response = client.get("/ui/studies", params=params)
        body = response.text
        elapsed = time.perf_counter() - t0
        status = response.status_code
        if n >= 2:
            samples.append(elapsed)
        found = re.search(r'id="result-count">\s*([^<]*?)\s*</p>', body)
        line = found.group(1) if found else ""
    return samples, status, line


def explain(url: str, facility: str) -> None:
    """The plans of the browser's statements for the first page (archive-wide and one facility)."""
    from pacs.db.engine import make_engine
    from pacs.query import study_browser
    from pacs.security.principal import UNRESTRICTED, Principal, scope_for
    from pacs.security.roles import Role, capabilities_of

    engine = make_engine(url)
    for label, scope in (("archive-wide", UNRESTRICTED), (f"clinician of {facility}", scope_for(
            Role.CLINICIAN, facility, linked_priors=True))):
        principal = Principal("bench", Role.CLINICIAN, capabilities_of(Role.CLINICIAN), scope)
        found = study_browser.search(principal.scope, study_browser.BrowserFilters())
        statements = [study_browser.page_statement(found, study_browser.PAGE_SIZE),
                      study_browser.count_statement(found)]
        with psycopg.connect(_dsn(url)) as conn:
            for statement in statements:
                text = str(statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
                _log(f"\nEXPLAIN ({label}):\n{text}")
                conn.execute("SET jit = off")  # as pacs.query.study_browser does
                for row in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + text.replace("%%", "%")):  # type: ignore[call-overload,unused-ignore]
                    _log(f"    {row[0]}")
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000, help="studies to load (100,000)")
    parser.add_argument("--runs", type=int, default=11, help="timed requests per kind (at least 5; 11)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--database-url", default="", help="measure this already loaded database")
    parser.add_argument("--load", action="store_true", help="with --database-url: migrate and load it first")
    parser.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    parser.add_argument("--explain", action="store_true", help="print the plans of the browser's statements")
    args = parser.parse_args(argv)
    runs = max(5, args.runs)

    created = ""
    url = args.database_url
    if not url:
        created, url = create_bench_database("pacs_bench_ui")
    _log(f"database {make_url(url).database}; {os.cpu_count()} CPUs; load average "
         f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    failures: list[str] = []
    try:
        if created or args.load:
            t0 = time.monotonic()
            # a few more instances than the mean asks for, so that the generator's mix makes at least --studies
            totals = load(url, int(args.studies * MEAN_INSTANCES_PER_STUDY * 1.03), args.seed, False, _log)
            _log(f"loaded in {time.monotonic() - t0:.1f} s: " +
                 ", ".join(f"{t} {n:,}" for t, n in totals.rows.items()))
        with psycopg.connect(_dsn(url)) as conn:
            row = conn.execute("SELECT count(*) FROM study").fetchone()
            _log(f"{row[0] if row else 0:,} studies in the index")
        if args.explain:
            explain(url, FACILITY_CODES[0])
        with tempfile.TemporaryDirectory(prefix="pacs-bench-ui-") as tmp, serving(url, tmp) as (base, _ctx):
            admin, clinician = sign_in(base, ADMIN), sign_in(base, CLINICIAN)
            kinds: list[tuple[str, httpx.Client, dict[str, str], Callable[[float], bool]]] = [
                ("first page, administrator (archive-wide)", admin, {}, lambda m: m < BOUND_S),
                (f"first page, clinician of {FACILITY_CODES[0]}", clinician, {}, lambda m: m < BOUND_S),
                ("clinician: name 'nguyen van an'", clinician, {"name": "nguyen van an"}, lambda m: True),
                ("clinician: one month of dates", clinician, {"date_from": "2026-10-01", "date_to": "2026-10-31"},
                 lambda m: True),
            ]
            _log(f"\nGET /ui/studies over HTTP (uvicorn on loopback), {runs} requests per kind after 2 warm-up, ms")
            _log(f"{'kind':<46} {'median':>8} {'p90':>8} {'max':>8}  result")
            for label, client, params, ok in kinds:
                samples, status, line = timed(client, params, runs)
                median = statistics.median(samples)
                p90 = sorted(samples)[min(len(samples) - 1, round(0.9 * (len(samples) - 1)))]
                _log(f"{label:<46} {median * 1000:>8.1f} {p90 * 1000:>8.1f} {max(samples) * 1000:>8.1f}  {line}")
                if status != 200:
                    failures.append(f"{label}: HTTP {status}")
                elif not ok(median):
                    failures.append(f"{label}: median {median * 1000:.0f} ms is not under {BOUND_S * 1000:.0f} ms")
            admin.close()
            clinician.close()
    finally:
        if created and not args.keep:
            drop_bench_database(created)
        elif created:
            _log(f"kept: {url}")
    for failure in failures:
        _log(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
