"""The read path's shortcuts (issue 13) keep every check they skip a round trip for:

- an API token verified for the DICOMweb reads is trusted for at most ``API_TOKEN_CACHE_S`` (1 s): revoked by
  another process (``pacs token revoke``) it is refused by those routes after at most that long, at once by every
  other route, and at once by every route when the revocation is made in this process (the admin page); an expired
  token is never trusted; the memory is bounded;
- the WADO target statement prebuilt per access scope (PostgreSQL and SQLite) answers as the per-request statement
  does for every kind of scope and target, and compares an open consult's expiry with the time of each request,
  not with the time it was built (on SQLite such a scope's statement is built per request);
- the QIDO-RS statement prebuilt per query shape and scope answers as the statement built for each query does, is
  used only for exact values (wildcards, names, dates, lists are built per request), and every search is still
  audited.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from pacs import admin_actions
from pacs.consults.models import Consult
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent
from pacs.dicomweb import resources
from pacs.dicomweb.resources import resolve
from pacs.errors import NotFound
from pacs.ingest import Ingestor, IngestSource
from pacs.query.attributes import Level, supported_keywords
from pacs.query.engine import Head, Query, QueryEngine, QueryResult, prepare
from pacs.security.accounts import create_token, revoke_token
from pacs.security.models import ApiToken
from pacs.security.principal import UNRESTRICTED, AccessScope, Principal, scope_for
from pacs.security.roles import Role, capabilities_of
from pacs.security.token_cache import API_TOKEN_CACHE_S, VerifiedTokens
from pacs.settings import Settings
from tests.support.datasets import make_instance
from viewer_api.app import create_app

# -- the memory of verified tokens ---------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _principal(name: str = "viewer") -> Principal:
    return Principal(subject=f"token:{name}", role=Role.RADIOLOGIST, capabilities=capabilities_of(Role.RADIOLOGIST),
                     scope=scope_for(Role.RADIOLOGIST, "HOSP-A"), kind="token", facility="HOSP-A",
                     source_address="10.0.0.1", token_id=7)


def test_a_verified_token_is_trusted_for_at_most_the_bound_counted_from_before_its_lookup() -> None:
    clock = _Clock()
    tokens = VerifiedTokens(ttl_s=1.0, clock=clock)
    started = tokens.started()  # the lookup's statement is sent now
    clock.now += 0.3  # ... and answers 0.3 s later
    tokens.put("digest", _principal(), datetime.now(UTC) + timedelta(days=1), started)
    found = tokens.get("digest", "10.0.0.2")
    assert found is not None and found.subject == "token:viewer" and found.token_id == 7
    assert found.source_address == "10.0.0.2"  # this request's address, not the first one's
    assert found.scope == scope_for(Role.RADIOLOGIST, "HOSP-A")
    clock.now += 0.69
    assert tokens.get("digest", "10.0.0.2") is not None  # 0.99 s after the lookup began
    clock.now += 0.01
    assert tokens.get("digest", "10.0.0.2") is None  # 1 s: looked up again (a revocation is seen then)
    assert tokens.get("unknown", "10.0.0.2") is None


def test_an_expired_token_is_never_trusted_from_memory() -> None:
    tokens = VerifiedTokens(ttl_s=60.0, clock=_Clock())
    tokens.put("digest", _principal(), datetime.now(UTC) - timedelta(milliseconds=1), tokens.started())
    assert tokens.get("digest", "10.0.0.1") is None


def test_forgetting_wins_over_a_lookup_that_was_in_flight() -> None:
    tokens = VerifiedTokens(ttl_s=60.0, clock=_Clock())
    tokens.put("kept", _principal("kept"), datetime.now(UTC) + timedelta(days=1), tokens.started())
    in_flight = tokens.started()
    tokens.forget_all()  # a revocation in this process while a lookup (of the old state) was running
    tokens.put("late", _principal("late"), datetime.now(UTC) + timedelta(days=1), in_flight)
    assert tokens.get("kept", "") is None and tokens.get("late", "") is None
    tokens.put("late", _principal("late"), datetime.now(UTC) + timedelta(days=1), tokens.started())
    assert tokens.get("late", "") is not None  # a lookup begun after it is kept


def test_the_memory_is_bounded() -> None:
    clock = _Clock()
    tokens = VerifiedTokens(ttl_s=1.0, max_entries=3, clock=clock)
    future = datetime.now(UTC) + timedelta(days=1)
    for n in range(10):
        tokens.put(f"d{n}", _principal(f"t{n}"), future, tokens.started())
        assert len(tokens._entries) <= 3
    assert tokens.get("d9", "") is not None  # the newest is kept


# -- revocation through the application ---------------------------------------------------------------------


@pytest.fixture()
def pg_ctx(fresh_pg_url: str, tmp_path: Path) -> Iterator[AppContext]:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", database_url=fresh_pg_url))
    try:
        migrate.upgrade(ctx.engine)
        yield ctx
    finally:
        ctx.close()


def _denials(ctx: AppContext, path: str) -> int:
    with ctx.read_sessions() as session:
        rows = session.scalars(select(AuditEvent.detail).where(AuditEvent.action == "auth.denied"))
        return sum(1 for detail in rows if path in detail)


@pytest.mark.integration
def test_a_revoked_token_is_refused_by_the_dicomweb_reads_within_the_bound(pg_ctx: AppContext) -> None:
    with pg_ctx.sessions() as session, session.begin():
        elsewhere = create_token(session, "revoked-elsewhere", "radiologist", days=1, facility="HOSP-A")
        here = create_token(session, "revoked-here", "radiologist", days=1, facility="HOSP-A")
    admin = Principal(subject="admin", role=Role.ADMIN, capabilities=capabilities_of(Role.ADMIN))
    search = "/dicom-web/studies?PatientID=P1"
    with TestClient(create_app(pg_ctx)) as client:
        sent = {"Authorization": f"Bearer {elsewhere.secret}", "Accept": "application/dicom+json"}
        assert client.get(search, headers=sent).status_code == 200  # verified and remembered
        # revoked by another process (`pacs token revoke`): this one only sees it in the index
        with pg_ctx.sessions() as session, session.begin():
            revoke_token(session, elsewhere.id)
        assert client.get("/api/auth/me", headers=sent).status_code == 401  # other routes: at once
        time.sleep(API_TOKEN_CACHE_S)  # the bound, counted from before the (earlier) lookup
        refused = client.get(search, headers=sent)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert _denials(pg_ctx, "/dicom-web/studies") == 1  # the refusal is audited as before

        # revoked on the admin page of this process: refused at once, remembered or not
        mine = {"Authorization": f"Bearer {here.secret}", "Accept": "application/dicom+json"}
        assert client.get(search, headers=mine).status_code == 200
        admin_actions.revoke_token(pg_ctx, admin, here.id)
        assert client.get(search, headers=mine).status_code == 401


@pytest.mark.integration
def test_an_expired_token_is_refused_by_the_dicomweb_reads(pg_ctx: AppContext) -> None:
    with pg_ctx.sessions() as session, session.begin():
        token = create_token(session, "short-lived", "radiologist", days=1, facility="HOSP-A")
    sent = {"Authorization": f"Bearer {token.secret}", "Accept": "application/dicom+json"}
    with TestClient(create_app(pg_ctx)) as client:
        assert client.get("/dicom-web/studies", headers=sent).status_code == 200
        with pg_ctx.sessions() as session, session.begin():
            session.execute(update(ApiToken).where(ApiToken.id == token.id)
                            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        time.sleep(API_TOKEN_CACHE_S)
        assert client.get("/dicom-web/studies", headers=sent).status_code == 401


# -- the prebuilt WADO target statement ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def target_ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppContext]:
    """The index the WADO target statements run on: the embedded archive's SQLite, or PostgreSQL."""
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_ctx")
        return
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", database_url=""))
    try:
        migrate.upgrade(ctx.engine)
        yield ctx
    finally:
        ctx.close()


@pytest.fixture()
def archive(pg_ctx: AppContext) -> dict[str, tuple[str, str, str]]:
    return _two_facilities(pg_ctx)


@pytest.fixture()
def target_archive(target_ctx: AppContext) -> dict[str, tuple[str, str, str]]:
    return _two_facilities(target_ctx)


def _two_facilities(ctx: AppContext) -> dict[str, tuple[str, str, str]]:
    """Two facilities' studies: a1 of patient PX at A, b1 of patient PB at B, one instance each."""
    ingestor = Ingestor(ctx.sessions, ctx.store)
    made: dict[str, tuple[str, str, str]] = {}
    for name, facility, patient in (("a1", "A", "PX"), ("b1", "B", "PB")):
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                                                PatientID=patient, PatientName=f"NAME^{patient}"),
                                  IngestSource("stow", user="test", facility=facility))
        assert outcome.ok, outcome.message
        made[name] = (study, series, sop)
    return made


def _resolved(ctx: AppContext, scope: AccessScope, study: str, series: str | None = None,
              sop: str | None = None) -> tuple[str, str | None, str | None, str, str | None] | None:
    try:
        target = resolve(ctx.read_sessions, scope, study, series, sop)
    except NotFound:
        return None
    return (target.study_uid, target.series_uid, target.sop_uid, target.patient_id,
            target.instance.sop_uid if target.instance else None)


def _prebuilt(ctx: AppContext, scope: AccessScope, kind: tuple[str, bool]) -> resources.Compiled | None:
    return resources._PREBUILT.get((ctx.engine.dialect.name, scope, kind))


def test_the_prebuilt_target_statement_answers_within_each_scope(
        target_ctx: AppContext, target_archive: dict[str, tuple[str, str, str]]) -> None:
    pg_ctx, archive = target_ctx, target_archive
    (a_study, a_series, _), (b_study, b_series, b_sop) = archive["a1"], archive["b1"]
    visible = {  # scope -> the studies it sees
        "archive-wide": (UNRESTRICTED, {"a1", "b1"}),
        "facility A": (scope_for(Role.RADIOLOGIST, "A"), {"a1"}),
        "facility B": (scope_for(Role.CLINICIAN, "B"), {"b1"}),
        "patient PX of A": (scope_for(Role.PATIENT, "A", "PX"), {"a1"}),
        "patient PX of B": (scope_for(Role.PATIENT, "B", "PX"), set()),
        "a share link of b1": (AccessScope(study_uids=frozenset({b_study})), {"b1"}),
    }
    for why, (scope, sees) in visible.items():
        for name, (study, series, sop), patient in (("a1", archive["a1"], "PX"), ("b1", archive["b1"], "PB")):
            shown = name in sees
            assert _resolved(pg_ctx, scope, study) == ((study, None, None, patient, None) if shown else None), why
            assert _resolved(pg_ctx, scope, study, series) == ((study, series, None, patient, None) if shown
                                                               else None), why
            assert _resolved(pg_ctx, scope, study, series, sop) == ((study, series, sop, patient, sop) if shown
                                                                    else None), why
        # UIDs that do not belong together: 404 like an unknown study, whatever the scope
        assert _resolved(pg_ctx, scope, a_study, b_series) is None, why
        assert _resolved(pg_ctx, scope, a_study, a_series, b_sop) is None, why
        assert _resolved(pg_ctx, scope, a_study, b_series, b_sop) is None, why
        assert _resolved(pg_ctx, scope, generate_uid()) is None, why
        for kind in (("study", False), ("series", True), ("instance", True)):
            assert _prebuilt(pg_ctx, scope, kind) is not None, (why, kind)  # the prebuilt path answered


def test_the_prebuilt_target_statement_compares_a_consult_with_the_time_of_each_request(
        target_ctx: AppContext, target_archive: dict[str, tuple[str, str, str]]) -> None:
    pg_ctx, archive = target_ctx, target_archive
    a_study, a_series, a_sop = archive["a1"]
    scope = scope_for(Role.RADIOLOGIST, "B")  # a consulted facility's doctor
    built = datetime.now(UTC)
    assert _resolved(pg_ctx, scope, a_study, a_series, a_sop) is None  # built now, with "now" in it
    assert _prebuilt(pg_ctx, scope, ("instance", True)) is not None
    with pg_ctx.sessions() as session, session.begin():
        consult = Consult(study_instance_uid=a_study, patient_id="PX", study_facility="A", requested_by="dr.a",
                          requesting_facility="A", consulted_facility="B", question="?", state="open",
                          created_at=built, expires_at=built + timedelta(days=1))
        session.add(consult)
    assert _resolved(pg_ctx, scope, a_study, a_series, a_sop) is not None  # the open consult grants it
    # the consult expires after the statement was built and before the next request
    expiry = datetime.now(UTC)
    assert expiry > built
    with pg_ctx.sessions() as session, session.begin():
        session.execute(update(Consult).where(Consult.study_instance_uid == a_study).values(expires_at=expiry))
    while datetime.now(UTC) <= expiry:
        time.sleep(0.001)
    assert _resolved(pg_ctx, scope, a_study, a_series, a_sop) is None
    assert _resolved(pg_ctx, scope, a_study) is None


# -- the QIDO-RS statement prebuilt per query shape ----------------------------------------------------------


def _heads(ctx: AppContext, query: Query) -> tuple[Head, Head, bool]:
    """(the engine's head, the head of the statement built for this very query, whether a prebuilt shape ran)."""
    result = QueryEngine(ctx.read_sessions).search(query)
    built = QueryResult(prepare(query), ctx.read_sessions, 200)
    return result.head(200), built.head(200), result._shape is not None


@pytest.mark.integration
def test_the_prebuilt_search_answers_as_the_statement_built_for_each_query(
        pg_ctx: AppContext, archive: dict[str, tuple[str, str, str]]) -> None:
    (a_study, a_series, a_sop), (b_study, _, _) = archive["a1"], archive["b1"]
    scopes = {"archive-wide": UNRESTRICTED, "facility A": scope_for(Role.RADIOLOGIST, "A"),
              "facility B": scope_for(Role.CLINICIAN, "B"), "patient PX of A": scope_for(Role.PATIENT, "A", "PX"),
              "a share link of b1": AccessScope(study_uids=frozenset({b_study}))}
    every = {level: tuple(supported_keywords(level)) for level in (Level.STUDY, Level.SERIES, Level.IMAGE)}
    exact = [  # (level, filters): exact values, so each runs a prebuilt statement
        (Level.STUDY, {"PatientID": "PX"}), (Level.STUDY, {"PatientID": "PB"}), (Level.STUDY, {"PatientID": "NONE"}),
        (Level.STUDY, {"StudyInstanceUID": a_study}), (Level.STUDY, {"StudyInstanceUID": b_study, "PatientID": "PX"}),
        (Level.STUDY, {"PatientID": "PX", "AccessionNumber": ""}),
        (Level.SERIES, {"StudyInstanceUID": a_study}), (Level.SERIES, {"SeriesInstanceUID": a_series}),
        (Level.IMAGE, {"SOPInstanceUID": a_sop}), (Level.IMAGE, {"StudyInstanceUID": a_study, "PatientID": "PX"}),
    ]
    for why, scope in scopes.items():
        for level, filters in exact:
            query = Query(level, filters=filters, returns=every[level], limit=10_000, relational=True, scope=scope)
            prebuilt, built, shaped = _heads(pg_ctx, query)
            assert shaped, (why, filters)
            assert prebuilt == built, (why, filters)
    # the same shape with another value: the statement built once answers for the new value
    facility_a = scopes["facility A"]
    first = Query(Level.STUDY, filters={"PatientID": "PX"}, returns=every[Level.STUDY], limit=10_000,
                  relational=True, scope=facility_a)
    assert [r["StudyInstanceUID"] for r in _heads(pg_ctx, first)[0].rows] == [a_study]
    other = Query(Level.STUDY, filters={"PatientID": "PB"}, returns=every[Level.STUDY], limit=10_000,
                  relational=True, scope=facility_a)
    assert _heads(pg_ctx, other)[0].rows == []  # PB's study is at B: outside facility A's scope
    assert [r["StudyInstanceUID"] for r in _heads(pg_ctx, dataclasses.replace(
        other, scope=UNRESTRICTED))[0].rows] == [b_study]


@pytest.mark.integration
def test_a_search_that_is_not_on_exact_values_is_built_per_request(
        pg_ctx: AppContext, archive: dict[str, tuple[str, str, str]]) -> None:
    a_study = archive["a1"][0]
    for filters in ({"PatientID": "P*"}, {"PatientID": "P?"}, {"PatientName": "name^px"}, {"StudyDate": "2020-"},
                    {"StudyInstanceUID": f"{a_study}\\{archive['b1'][0]}"}, {"PatientID": " PX"},
                    {"ModalitiesInStudy": "OT"}, {"PatientID": "P\x01X"}):
        query = Query(Level.STUDY, filters=filters, limit=10_000, relational=True, scope=UNRESTRICTED)
        engine_head, built, shaped = _heads(pg_ctx, query)
        assert not shaped, filters
        assert engine_head == built, filters
    named = _heads(pg_ctx, Query(Level.STUDY, filters={"PatientName": "name^px"}, relational=True))[0]
    assert [r["StudyInstanceUID"] for r in named.rows] == [a_study]  # a name is still matched without case


@pytest.mark.integration
def test_every_prebuilt_search_over_http_is_answered_and_audited(
        pg_ctx: AppContext, archive: dict[str, tuple[str, str, str]]) -> None:
    with pg_ctx.sessions() as session, session.begin():
        token = create_token(session, "searcher", "radiologist", days=1, facility="A")
    sent = {"Authorization": f"Bearer {token.secret}", "Accept": "application/dicom+json"}

    def searches() -> int:
        with pg_ctx.read_sessions() as session:
            return len(session.scalars(select(AuditEvent.id).where(AuditEvent.action == "dicomweb.search")).all())

    with TestClient(create_app(pg_ctx)) as client:
        before = searches()
        for patient, found in (("PX", [archive["a1"][0]]), ("PB", []), ("PX", [archive["a1"][0]])):
            answer = client.get(f"/dicom-web/studies?PatientID={patient}", headers=sent)
            assert answer.status_code == 200
            assert [row["0020000D"]["Value"][0] for row in answer.json()] == found
            assert answer.headers["X-Total-Count"] == str(len(found))
        assert searches() == before + 3  # one committed row per search, each before its answer was read
