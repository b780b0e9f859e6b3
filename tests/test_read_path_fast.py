"""The read path's fast lanes (issue 13) answer exactly as the long way, and keep the audit trail whole:

- the DICOMweb reads answered by ``viewer_api.dicomweb.fastpath`` (one thread-pool call: token, capability,
  route) give the same status, headers that matter, body and audit rows as the same app without it, for
  admins, other facilities, patients, missing or wrong tokens, bad UIDs, unacceptable media types and
  revalidation; every GET route of QIDO-RS and WADO-RS is taken by it;
- the read path's audit rows (written in one round trip, ``pipelined=True``) and
  durable rows written at the same time from several threads form one verifiable chain holding every row,
  with credentials redacted as in every other row;
- the read path's own PostgreSQL connections (autocommit, pinged only after a pause) replace a connection the
  server dropped, and close with the process's engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from starlette.routing import Match

from pacs import audit
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent
from pacs.query import sessions as read_path
from pacs.settings import Settings
from tests.support.concurrent import run_together
from tests.support.dicomweb_world import World, shared_world
from tests.support.net import wait_until
from tests.support.postgres import ADMIN_URL
from viewer_api.app import create_app
from viewer_api.dicomweb import qido, wado
from viewer_api.dicomweb.fastpath import DicomwebReads, read_routes

# -- the fast lane answers as FastAPI does ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["embedded"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    return shared_world(request, tmp_path_factory)  # the DICOMweb modules' shared world


def test_every_dicomweb_read_route_takes_the_fast_lane() -> None:
    routes = [r for r in [*qido.router.routes, *wado.router.routes]
              if isinstance(r, APIRoute) and "GET" in (r.methods or ())]
    taken = read_routes(routes)
    assert [t.route.path for t in taken] == [r.path for r in routes]
    assert {t.capability.value if t.capability else None for t in taken} == {"study.search", "study.read"}


def test_the_fast_lane_tries_the_route_every_route_in_order_would_find() -> None:
    """Only the routes with as many path segments as the request are tried: the first match is still the route
    that trying each one in order finds (a bulk data path takes any number of segments)."""
    routes = [r for r in [*qido.router.routes, *wado.router.routes] if isinstance(r, APIRoute)]
    lane = DicomwebReads(FastAPI(), routes)
    uid = "1.2.3"
    paths = [r.path.replace("{tag_path:path}", "00880200/0/7FE00010").replace("{frames}", "1,2")
             .replace("{resource}", "patients").replace("{study}", uid).replace("{series}", uid)
             .replace("{sop}", uid) for r in routes]
    paths += ["/dicom-web/studies/1.2/series/1.3/instances/1.4/bulkdata/00100010", "/dicom-web/studies/",
              "/dicom-web/studies/1.2/unknown/x", "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1/x/y"]
    for path in paths:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "path_params": {}}
        every = next((r.route.path for r in lane.routes if r.route.matches(scope)[0] is Match.FULL), None)
        tried = next((r.route.path for r in lane._candidates(path) if r.route.matches(scope)[0] is Match.FULL), None)
        assert tried == every, path
    assert sum(1 for path in paths if lane._candidates(path) and len(lane._candidates(path)) < len(lane.routes))


def _apps(world: World) -> tuple[FastAPI, FastAPI]:
    fast = create_app(world.server.ctx)
    slow = create_app(world.server.ctx)
    slow.user_middleware = [m for m in slow.user_middleware if m.cls is not DicomwebReads]
    assert len(slow.user_middleware) == len(fast.user_middleware) - 1
    return fast, slow


def _audit_total(world: World) -> int:
    with world.server.ctx.read_sessions() as session:
        return int(session.scalar(select(func.count(AuditEvent.id))) or 0)


def _last_rows(world: World, n: int) -> list[tuple[str, str, str, str, str]]:
    with world.server.ctx.read_sessions() as session:
        rows = session.execute(select(AuditEvent.action, AuditEvent.outcome, AuditEvent.actor,
                                      AuditEvent.study_instance_uid, AuditEvent.patient_id)
                               .order_by(AuditEvent.id.desc()).limit(n)).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


@pytest.mark.integration
def test_the_fast_lane_answers_and_audits_as_the_long_way(world: World) -> None:
    series = world.a1.series[0]
    sop = world.a1.sops[series][0]
    instance = f"/dicom-web/studies/{world.a1.study}/series/{series}/instances/{sop}"
    octets = {"Accept": 'multipart/related; type="application/octet-stream"'}
    jpeg = {"Accept": "image/jpeg"}
    json_ = {"Accept": "application/dicom+json"}
    cases: list[tuple[str | None, str, dict[str, str]]] = [
        (world.admin, "/dicom-web/studies?PatientID=PAT-A", json_),
        (world.admin, "/dicom-web/studies?PatientID=PAT-A&limit=1", json_),
        (world.admin, f"/dicom-web/studies/{world.a1.study}/series", json_),
        (world.admin, "/dicom-web/count/studies?PatientID=PAT-A", {}),
        (world.admin, "/dicom-web/nonsense", json_),  # 400 naming the resources
        (world.admin, "/dicom-web/studies", {"Accept": "image/png"}),  # 406
        (world.admin, f"{instance}/metadata", json_),
        (world.admin, f"/dicom-web/studies/{world.a1.study}/series/{series}/metadata", json_),
        (world.admin, f"{instance}/rendered", jpeg),
        (world.admin, f"{instance}/frames/1", octets),
        (world.admin, f"{instance}/frames/0", octets),  # 400
        (world.admin, f"{instance}/rendered", {"Accept": "text/html"}),  # 406
        (world.admin, "/dicom-web/studies/not-a-uid/metadata", json_),  # 400
        (world.admin, f"/dicom-web/studies/{world.a1.study}/series/{world.b1.series[0]}/metadata", json_),  # 404
        (world.facility_b, f"{instance}/rendered", jpeg),  # outside the scope: 404
        (world.facility_b, "/dicom-web/studies?PatientID=PAT-A", json_),  # nothing of PAT-A for HOSP-B
        (world.patient_a_no_images, f"{instance}/frames/1", octets),  # no study.read: 403
        (world.patient_a, "/dicom-web/studies", json_),  # a patient's own studies only
        (None, "/dicom-web/studies", json_),  # 401
        ("pacs_not-a-token", f"{instance}/metadata", json_),  # 401
        ("garbage", f"{instance}/frames/1", octets),  # 401
    ]
    fast, slow = _apps(world)
    with TestClient(fast, raise_server_exceptions=False) as f, TestClient(slow, raise_server_exceptions=False) as s:
        for token, path, headers in cases:
            sent = {**headers, **({"Authorization": f"Bearer {token}"} if token else {})}
            answers = []
            for client in (s, f):
                before = _audit_total(world)
                answer = client.get(path, headers=sent)
                written = _audit_total(world) - before
                answers.append((answer, written, _last_rows(world, written) if written else []))
            (long_way, long_rows, long_audit), (fast_way, fast_rows, fast_audit) = answers
            assert fast_way.status_code == long_way.status_code, (path, token, fast_way.text, long_way.text)
            for header in ("content-type", "x-total-count", "warning", "etag", "www-authenticate", "cache-control",
                           "content-security-policy", "x-content-type-options"):
                if header == "content-type" and long_way.headers.get(header, "").startswith("multipart/"):
                    assert fast_way.headers[header].split(";")[0] == "multipart/related"
                    continue
                assert fast_way.headers.get(header) == long_way.headers.get(header), (path, header)
            if long_way.headers.get("content-type", "").startswith("multipart/"):
                assert len(fast_way.content) == len(long_way.content), path
            else:
                assert fast_way.content == long_way.content, (path, token)
            # the same rows (a coalesced read is written once per app: each app has its own coalescer)
            assert (fast_rows, fast_audit) == (long_rows, long_audit), (path, token)
        # a 304 for a held tag, after the same checks
        tag = f.get(f"{instance}/frames/1", headers={**octets, "Authorization": f"Bearer {world.admin}"}
                    ).headers["etag"]
        held = {**octets, "Authorization": f"Bearer {world.admin}", "If-None-Match": tag}
        assert f.get(f"{instance}/frames/1", headers=held).status_code == 304
        assert s.get(f"{instance}/frames/1", headers=held).status_code == 304
        held_b = {**held, "Authorization": f"Bearer {world.facility_b}"}
        assert f.get(f"{instance}/frames/1", headers=held_b).status_code == 404
        # other methods and paths are not the fast lane's: FastAPI answers them
        assert f.post("/dicom-web/studies/1.2.3/metadata", headers=held).status_code == 405
        assert f.get("/dicom-web/studies/", headers=held).status_code == s.get("/dicom-web/studies/",
                                                                                headers=held).status_code


# -- the read path's audit rows keep one chain -----------------------------------------------------------


@pytest.mark.integration
def test_fast_and_durable_audit_rows_keep_one_chain_on_postgresql(fresh_pg_url: str, tmp_path: Path) -> None:
    ctx = AppContext.create(Settings(data_dir=tmp_path, database_url=fresh_pg_url))

    def writer(n: int) -> None:
        for i in range(40):
            # text JSON escapes (quotes, backslashes, control characters, non-ASCII): the database hashes
            # the same canonical text as entry_hash()
            audit.record(ctx.sessions, pipelined=n % 2 == 1, action="dicomweb.search", actor=f"token:t{n}",
                         role="admin", patient_id=f"P{n}", study_instance_uid=f"1.2.{n}.{i}",
                         source_address="127.0.0.1:5000",
                         detail=f"{n}/{i} GET /dicom-web/studies?access_token=secret{n} PatientName=Nguyễn^Văn"
                                f' "An" \\ \t\n\x7f \u2028 {"x" * (i * 50)}')

    try:
        migrate.upgrade(ctx.engine)
        run_together(writer, 6)
        checked, problems, last = audit.verify(ctx.read_sessions)
        assert (checked, problems) == (240, [])
        with ctx.read_sessions() as s:
            rows = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
        assert rows[-1].entry_hash == last and len({r.prev_hash for r in rows}) == 240  # one line, no fork
        assert sorted(r.detail.split(" ")[0] for r in rows) == sorted(f"{n}/{i}" for n in range(6) for i in range(40))
        assert all("secret" not in r.detail and r.outcome == "success" and r.at is not None for r in rows)
        assert {(r.actor, r.patient_id) for r in rows} == {(f"token:t{n}", f"P{n}") for n in range(6)}
        # a row written the fast way reads back through the same hash as append() gives it
        fast = next(r for r in rows if r.actor == "token:t1")
        assert audit.entry_hash(fast) == fast.entry_hash
    finally:
        ctx.close()


@pytest.mark.integration
def test_a_fast_audit_row_that_cannot_be_written_fails_the_read(fresh_pg_url: str, tmp_path: Path) -> None:
    """No table, no row: the writer raises (the route answers 503) instead of losing it."""
    ctx = AppContext.create(Settings(data_dir=tmp_path, database_url=fresh_pg_url))
    try:
        from pacs.errors import IndexUnavailable

        with pytest.raises(IndexUnavailable):
            audit.record(ctx.sessions, pipelined=True, action="dicomweb.search", actor="x")
        migrate.upgrade(ctx.engine)
        audit.record(ctx.sessions, pipelined=True, action="dicomweb.search", actor="x")  # the pool recovered
        assert audit.verify(ctx.read_sessions)[:2] == (1, [])
    finally:
        ctx.close()


# -- the read path's own connections ---------------------------------------------------------------------


@pytest.fixture()
def pg_ctx(fresh_pg_url: str, tmp_path: Path) -> Iterator[AppContext]:
    ctx = AppContext.create(Settings(data_dir=tmp_path, database_url=fresh_pg_url))
    try:
        yield ctx
    finally:
        ctx.close()


def _backend(ctx: AppContext) -> int:
    with read_path.single_statement(ctx.read_sessions) as session:
        return int(session.scalar(text("SELECT pg_backend_pid()")))


@pytest.mark.integration
def test_read_path_connections_are_replaced_when_the_server_dropped_them(pg_ctx: AppContext,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sibling = read_path.read_path_engine(pg_ctx.read_sessions.kw["bind"])
    assert sibling is not None and sibling is read_path.read_path_engine(pg_ctx.engine)  # one per engine
    with read_path.single_statement(pg_ctx.read_sessions) as session:  # autocommit: no transaction around
        driver = session.connection().connection.driver_connection
        assert driver is not None and driver.autocommit is True
    first = _backend(pg_ctx)
    assert _backend(pg_ctx) == first  # kept in the pool
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    monkeypatch.setattr(read_path, "IDLE_PING_S", 0.0)  # the connection has been idle long enough: pinged
    second = _backend(pg_ctx)
    assert second != first
    monkeypatch.setattr(read_path, "IDLE_PING_S", 3600.0)
    assert _backend(pg_ctx) == second
    pg_ctx.close()  # the read path's connections close with the process's engine

    def closed() -> bool:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (second,)).fetchone() == (0,)

    wait_until(closed, timeout=10, interval=0.1, what="the read path's connection to close")
