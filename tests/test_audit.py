"""The audit trail (SPEC §7): what is recorded, its hash chain, its search API and its FHIR export.

- A scripted session against a real `pacs serve` (logins, DCMTK findscu and movescu, QIDO-RS, WADO-RS,
  STOW-RS, a refused and an unauthenticated request, `pacs ae add`) leaves exactly its own events in the
  trail, each with its actor, role, action, outcome, patient and study; worklist, MPPS, C-GET and DIMSE
  refusals are audited too, one row per request.
- Tampering (a row edited or removed with SQL, on SQLite and on PostgreSQL) makes `pacs audit verify`
  exit 1 naming the row; concurrent writers on PostgreSQL keep one chain.
- `GET /api/audit` filters, pages and counts; `/api/audit/fhir` and `pacs audit export --fhir` give FHIR
  R4 AuditEvents with the fields R4 requires; only administrators may read, and each read is audited.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select, text

from dicom_scp import audit as dimse_audit_glue
from pacs import audit
from pacs.audit import fhir_export as audit_fhir
from pacs.audit import search as audit_search
from pacs.cli.common import operator
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent
from pacs.errors import InvalidInput
from pacs.security.accounts import create_token
from pacs.settings import Settings
from tests.support.concurrent import run_together
from tests.support.datasets import make_dataset, to_bytes
from tests.support.dcmtk import ReferenceStoreSCP, dcmtk, dcmtk_env, storescu
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.stack import EmbeddedPacs

OP = f"os:{operator()}"  # who the CLI audits as (the same account runs the tests' `pacs` commands)
FHIR_INSTANT = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)"
                          r"(\.\d{1,9})?(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))$")
Row = tuple[str, str, str, str, str, str]  # action, actor, role, outcome, patient, study


def _rows(ctx: AppContext, after: int = 0, upto: int | None = None) -> list[AuditEvent]:
    with ctx.read_sessions() as s:
        stmt = select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id)
        if upto is not None:
            stmt = stmt.where(AuditEvent.id <= upto)
        return list(s.scalars(stmt))


def _key(e: AuditEvent | dict[str, Any]) -> Row:
    get = e.get if isinstance(e, dict) else lambda k: getattr(e, k)
    return (get("action"), get("actor"), get("role"), get("outcome"), get("patient_id"), get("study_instance_uid"))


def _last_id(ctx: AppContext) -> int:
    with ctx.read_sessions() as s:
        return int(s.scalar(select(AuditEvent.id).order_by(AuditEvent.id.desc()).limit(1)) or 0)


# -- FHIR R4 AuditEvent: what the specification requires -------------------------------------------


def check_audit_event(resource: dict[str, Any]) -> None:
    """The R4 AuditEvent rules our resources must meet (cardinalities, value sets, formats)."""
    assert resource["resourceType"] == "AuditEvent"
    assert resource["id"] and re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", resource["id"])
    kind = resource["type"]  # Coding 1..1
    assert kind["system"] == audit_fhir.DCM and kind["code"] in audit_fhir.DCM_CODES and kind["display"]
    for coding in resource.get("subtype", []):
        assert coding["system"] and coding["code"]
    assert resource.get("action") in ("C", "R", "U", "D", "E")
    assert FHIR_INSTANT.match(resource["recorded"]), resource["recorded"]
    assert resource.get("outcome") in ("0", "4", "8", "12")
    agents = resource["agent"]  # 1..*
    assert agents and all(isinstance(a["requestor"], bool) for a in agents)
    assert sum(a["requestor"] for a in agents) == 1
    for agent in agents:
        assert agent.get("who", {}).get("display") or agent.get("name")
        if "network" in agent:
            assert agent["network"]["address"] and agent["network"]["type"] in ("1", "2", "3", "4", "5")
    source = resource["source"]  # 1..1, observer 1..1
    assert source["observer"].get("display") or source["observer"].get("reference")
    for entity in resource.get("entity", []):
        assert not ("name" in entity and "query" in entity)  # sev-1
        if "query" in entity:
            base64.b64decode(entity["query"], validate=True)
        for detail in entity.get("detail", []):
            assert detail["type"] and "valueString" in detail


def check_bundle(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    resources = []
    for entry in bundle.get("entry", []):
        assert entry["fullUrl"].startswith("urn:uuid:") and entry["search"]["mode"] == "match"
        uuid.UUID(entry["fullUrl"][9:])
        check_audit_event(entry["resource"])
        resources.append(entry["resource"])
    assert bundle["total"] >= len(resources)
    return resources


# -- the FHIR mapping, pure ----------------------------------------------------------------------------


def test_dicom_audit_codes_carry_their_standard_meanings() -> None:
    """Every DCM code we emit is the one PS3.16 defines (pydicom ships the code dictionary)."""
    standard = {getattr(codes.DCM, name).value: getattr(codes.DCM, name).meaning for name in codes.DCM.dir()}
    for code, meaning in audit_fhir.DCM_CODES.items():
        assert standard[code] == meaning, code


@pytest.mark.parametrize(("action", "detail", "type_code", "subtype_code", "verb"), [
    ("auth.login", "", "110114", "110122", "E"),
    ("auth.denied", "", "110114", None, "E"),
    ("access.denied", "", "110113", "110132", "E"),
    ("dimse.association-rejected", "", "110113", "110126", "E"),
    ("dimse.c-find", "", "110112", None, "E"),
    ("dimse.worklist-find", "", "110112", None, "E"),
    ("dicomweb.search", "", "110112", None, "E"),
    ("dicomweb.count", "", "110112", None, "E"),
    ("dimse.c-move", "", "110104", None, "R"),
    ("dimse.c-get", "", "110104", None, "R"),
    ("dicomweb.retrieve", "", "110104", None, "R"),
    ("wado-uri.retrieve", "", "110104", None, "R"),
    ("dicomweb.metadata", "", "110103", None, "R"),
    ("dicomweb.rendered", "", "110103", None, "R"),
    ("instance.store", "transport=dimse sop=1.2", "110104", None, "C"),
    ("instance.store", "transport=import sop=1.2", "110107", None, "C"),
    ("stow", "", "110104", None, "C"),
    ("dimse.mpps-create", "", "110111", None, "C"),
    ("dimse.mpps-set", "", "110111", None, "U"),
    ("config.ae-add", "", "110113", "110128", "C"),
    ("config.ae-remove", "", "110113", "110128", "D"),
    ("config.user-password", "", "110113", "110137", "U"),
    ("config.token-revoke", "", "110113", "110137", "D"),
    ("config.initial-admin", "", "110113", "110137", "C"),
    ("study.share", "", "110113", "110135", "U"),
    ("audit.read", "", "110101", None, "R"),
    ("reindex", "", "110100", None, "E"),
])
def test_actions_map_to_dicom_event_ids_and_action_codes(action: str, detail: str, type_code: str,
                                                         subtype_code: str | None, verb: str) -> None:
    assert audit_fhir.classify(action, detail) == audit_fhir.Kind(type_code, subtype_code, verb)


def _row(**fields: Any) -> dict[str, Any]:
    base = {"id": 7, "at": "2026-11-28T09:30:00.123456Z", "actor": "", "role": "", "source_address": "",
            "action": "", "outcome": "success", "patient_id": "", "study_instance_uid": "", "detail": "",
            "entry_hash": "ab" * 32}
    return {**base, **fields}


def test_audit_event_resources_name_who_what_and_where() -> None:
    observer = audit_fhir.Observer("PACS")
    move = audit_fhir.audit_event(_row(action="dimse.c-move", actor="MOVESCU", role="ae", outcome="warning",
                                       source_address="10.0.0.5:4242", patient_id="P1", study_instance_uid="1.2.3",
                                       detail="level=STUDY destination=DEST@10.0.0.9:104 keys=[StudyInstanceUID="
                                              "1.2.3] completed=1 failed=1"), observer)
    check_audit_event(move)
    assert move["outcome"] == "4" and move["outcomeDesc"].startswith("level=STUDY")
    requestor, archive, destination = move["agent"]
    assert requestor == {"type": {"coding": [{"system": audit_fhir.DCM, "code": "110150", "display": "Application"}]},
                         "who": {"display": "MOVESCU"}, "name": "MOVESCU", "requestor": True, "altId": "MOVESCU",
                         "role": [{"text": "ae"}], "network": {"address": "10.0.0.5", "type": "2"}}
    assert (archive["who"], archive["requestor"]) == ({"display": "PACS"}, False)
    assert destination["type"]["code"] == "110152" and destination["who"] == {"display": "DEST"}
    assert destination["network"] == {"address": "10.0.0.9", "type": "2"}
    assert move["source"]["observer"] == {"display": "PACS"}
    patient, study = move["entity"]
    assert patient["what"] == {"identifier": {"value": "P1"}} and patient["role"]["code"] == "1"
    assert study["what"]["identifier"]["value"] == "1.2.3"
    assert study["what"]["identifier"]["type"]["coding"][0]["code"] == "110180"
    assert patient["detail"] == [{"type": "detail", "valueString": move["outcomeDesc"]}]
    assert move["extension"] == [{"url": audit_fhir.HASH_EXTENSION, "valueString": "ab" * 32}]

    find = audit_fhir.audit_event(_row(action="dimse.c-find", actor="FINDSCU", role="ae",
                                       detail="level=STUDY keys=[PatientName=NGUYỄN*] matches=0"), observer)
    check_audit_event(find)
    [query] = find["entity"]
    assert query["role"]["code"] == "24" and base64.b64decode(query["query"]).decode() == "PatientName=NGUYỄN*"
    assert "outcomeDesc" not in find and find["outcome"] == "0"

    login = audit_fhir.audit_event(_row(action="auth.login", actor="lan", outcome="failure",
                                        source_address="cli", detail="wrong user name or password"), observer)
    check_audit_event(login)
    assert login["outcome"] == "8" and "network" not in login["agent"][0]
    assert login["agent"][0]["type"]["coding"][0]["code"] == "110150"  # no role: not known to be a person
    user = audit_fhir.audit_event(_row(action="dicomweb.retrieve", actor="lan", role="radiologist",
                                       source_address="[::1]:5000"), observer)
    assert user["agent"][0]["type"]["coding"][0]["code"] == "humanuser"
    assert user["agent"][0]["network"] == {"address": "::1", "type": "2"}
    assert "entity" not in user  # nothing named and no detail


# -- filter validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "named"), [
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-13-01"}, "until"),
    ({"since": "2026-11-29", "until": "2026-11-28"}, "since is after until"),
    ({"study": "1.2.abc"}, "study"),
    ({"outcome": "SUCCESS; DROP TABLE"}, "outcome"),
    ({"actor": "x" * 129}, "actor"),
    ({"patient_id": "a\x00b"}, "patient_id"),
])
def test_bad_filters_are_refused_naming_the_parameter(params: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(named)):
        audit_search.make_filter(**params)


def test_filter_values_are_read_as_documented() -> None:
    flt = audit_search.make_filter(action="dimse.", since="2026-11-28T16:00:00+07:00", until="2026-11-28")
    assert (flt.action, flt.action_prefix) == ("dimse.", True)
    assert flt.since == datetime(2026, 11, 28, 9, tzinfo=UTC)
    assert flt.until == datetime(2026, 11, 29, tzinfo=UTC) - timedelta(microseconds=1)  # the whole day
    assert audit_search.make_filter(action="config.*").action == "config."
    assert audit_search.make_filter(action="dimse.c-find").action_prefix is False
    assert audit_search.make_filter(since="2026-11-28T09:00:00").since == datetime(2026, 11, 28, 9, tzinfo=UTC)
    with pytest.raises(InvalidInput, match="limit"):
        audit_search.check_page(1001, 0)


# -- DIMSE rows: the association-rejection hook (bound in dicom_scp.association_checks) -------------------


def test_a_rejected_association_is_audited_and_auditing_never_raises(tmp_path: Path) -> None:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    try:
        migrate.upgrade(ctx.engine)
        contexts = [SimpleNamespace(abstract_syntax=str(StudyRootQueryRetrieveInformationModelFind)),
                    SimpleNamespace(abstract_syntax=str(StudyRootQueryRetrieveInformationModelMove))]
        assoc = SimpleNamespace(requestor=SimpleNamespace(
            address="10.1.2.3", port=40001,
            primitive=SimpleNamespace(presentation_context_definition_list=contexts)))
        dimse_audit_glue.association_rejected(ctx, assoc, "INTRUDER", "calling AE title not recognized", (1, 1, 3))
        [row] = _rows(ctx)
        assert _key(row) == ("dimse.association-rejected", "INTRUDER", "ae", "failure", "", "")
        assert row.source_address == "10.1.2.3:40001"
        assert row.detail == "services=query,retrieve reject=1/1/3 reason=calling AE title not recognized"
        ctx.engine.dispose()
        broken = AppContext.create(Settings(data_dir=tmp_path / "data",
                                            database_url=f"sqlite:///{tmp_path / 'missing' / 'x.db'}"))
        dimse_audit_glue.association_rejected(broken, assoc, "INTRUDER", "no", (1, 1, 3))  # logged, not raised
        broken.close()
    finally:
        ctx.close()


# -- (b) tampering is detected and named --------------------------------------------------------------


@dataclass
class TrailDb:
    ctx: AppContext
    env: dict[str, str]


@pytest.fixture(params=["sqlite", "postgresql"])
def trail_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TrailDb]:
    env = {"PACS_DATA_DIR": str(tmp_path / "data")}
    if request.param == "postgresql":
        env["PACS_DATABASE_URL"] = request.getfixturevalue("fresh_pg_url")
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", database_url=env.get("PACS_DATABASE_URL", "")))
    try:
        migrate.upgrade(ctx.engine)
        yield TrailDb(ctx, env)
    finally:
        ctx.close()


def _verify(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`pacs audit verify` in-process (its logic; the session test below runs it as a process)."""
    return invoke_pacs(["audit", "verify"], env)


@pytest.mark.integration
def test_verify_names_an_edited_row_and_a_removed_row(trail_db: TrailDb) -> None:
    ctx, env = trail_db.ctx, trail_db.env
    for i in range(8):
        audit.record(ctx.sessions, action="dicomweb.retrieve", actor=f"user{i}", role="radiologist",
                     patient_id=f"P{i}", study_instance_uid=f"1.2.{i}", detail=f"request {i}")
    ids = [r.id for r in _rows(ctx)]
    intact = _verify(env)
    assert intact.returncode == 0 and "intact: 8 rows" in intact.stdout, intact.stdout + intact.stderr

    edited = ids[3]
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE audit_event SET detail = 'nothing to see' WHERE id = :id"), {"id": edited})
    broken = _verify(env)
    assert broken.returncode == 1
    assert f"audit row {edited}: row content does not match its hash (edited)" in broken.stderr
    assert "1 problem(s) in 8 rows" in broken.stderr  # only that row: its successor still links to its hash
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE audit_event SET detail = 'request 3' WHERE id = :id"), {"id": edited})
    assert _verify(env).returncode == 0  # the original content verifies again

    removed = ids[5]
    with ctx.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_event WHERE id = :id"), {"id": removed})
    gap = _verify(env)
    assert gap.returncode == 1
    assert f"audit row {ids[6]}: chain broken before this row (a row was removed or inserted)" in gap.stderr
    assert "1 problem(s) in 7 rows" in gap.stderr


# -- (c) concurrent writers keep one chain --------------------------------------------------------------------


@pytest.mark.integration
def test_concurrent_writers_keep_one_chain_on_postgresql(fresh_pg_url: str, tmp_path: Path) -> None:
    ctx = AppContext.create(Settings(data_dir=tmp_path, database_url=fresh_pg_url))

    def writer(n: int) -> None:
        for i in range(50):
            audit.record(ctx.sessions, action="dimse.c-find", actor=f"AE{n}", role="ae", detail=f"{n}/{i}")

    try:
        migrate.upgrade(ctx.engine)
        run_together(writer, 4)
        checked, problems, last = audit.verify(ctx.read_sessions)
        assert (checked, problems) == (200, [])
        rows = _rows(ctx)
        assert len({r.prev_hash for r in rows}) == 200 and rows[-1].entry_hash == last  # one line, no fork
        assert sorted(r.detail for r in rows) == sorted(f"{n}/{i}" for n in range(4) for i in range(50))
    finally:
        ctx.close()


# -- (d) the HTTP API and the CLI on a known trail -----------------------------------------------------------


@dataclass
class Api:
    client: TestClient
    ctx: AppContext
    env: dict[str, str]
    admin: str
    clinician: str
    seeded: list[dict[str, Any]] = field(default_factory=list)

    def get(self, path: str, token: str | None = None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.client.get(path, params=params, headers=headers)


SEED: list[Row] = [
    ("dimse.c-find", "FINDSCU", "ae", "success", "P1", "1.2.1"),
    ("dimse.c-move", "MOVESCU", "ae", "warning", "P1", "1.2.1"),
    ("auth.login", "alice", "radiologist", "success", "", ""),
    ("auth.login", "alice", "", "failure", "", ""),
    ("dicomweb.search", "bob", "clinician", "success", "P2", ""),
    ("config.ae-add", "os:it", "operator", "success", "", ""),
    ("dimse.c-get", "GETSCU", "ae", "failure", "P2", "1.2.2"),
    ("stow", "dr", "radiologist", "partial", "", "1.2.2"),
]


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    from viewer_api.app import create_app

    settings = Settings(data_dir=tmp_path / "data")
    ctx = AppContext.create(settings)
    try:
        migrate.upgrade(ctx.engine)
        with ctx.sessions() as s, s.begin():  # tokens made directly: the trail holds only the seeded rows
            admin = create_token(s, "auditor", "admin", days=1).secret
            clinician = create_token(s, "ward", "clinician", days=1).secret
        for action, actor, role, outcome, patient, study in SEED:
            audit.record(ctx.sessions, action=action, actor=actor, role=role, outcome=outcome, patient_id=patient,
                         study_instance_uid=study, source_address="10.0.0.1:1000",
                         detail="level=STUDY keys=[PatientID=P1]" if action == "dimse.c-find" else f"{action} row")
        with TestClient(create_app(ctx)) as client:
            api = Api(client, ctx, {"PACS_DATA_DIR": str(tmp_path / "data")}, admin, clinician)
            api.seeded = [audit_search.as_dict(e) for e in _rows(ctx)]
            yield api
    finally:
        ctx.close()


def _ids(api: Api, response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    seeded = {r["id"]: i + 1 for i, r in enumerate(api.seeded)}  # seed position (1-based) by row id
    return [seeded.get(r["id"], -r["id"]) for r in response.json()]


@pytest.mark.integration
def test_api_filters_pages_and_counts(api: Api) -> None:
    at = [r["at"] for r in api.seeded]
    cases: list[tuple[dict[str, Any], list[int]]] = [
        ({"action": "dimse."}, [1, 2, 7]),
        ({"action": "dimse.*"}, [1, 2, 7]),
        ({"action": "dimse.c-find"}, [1]),
        ({"action": "dimse"}, []),  # exact unless it ends in '.' or '*'
        ({"actor": "alice"}, [3, 4]),
        ({"outcome": "failure"}, [4, 7]),
        ({"outcome": "partial"}, [8]),
        ({"patient_id": "P2"}, [5, 7]),
        ({"study": "1.2.2"}, [7, 8]),
        ({"actor": "alice", "outcome": "success"}, [3]),
        ({"since": at[1], "until": at[4]}, [2, 3, 4, 5]),
        ({"since": (datetime.now(UTC) + timedelta(days=1)).date().isoformat()}, []),
        ({"action": "dimse.", "limit": 2, "offset": 1}, [2, 7]),
    ]
    for params, expected in cases:
        response = api.get("/api/audit", api.admin, **params)
        assert _ids(api, response) == expected, params
        total = len(expected) + (1 if "limit" in params else 0)
        assert response.headers["X-Total-Count"] == str(total), params
    everything = api.get("/api/audit", api.admin, until=datetime.now(UTC).date().isoformat(), limit=1000)
    assert _ids(api, everything)[:8] == list(range(1, 9))
    assert [_key(r) for r in everything.json()[:8]] == SEED
    first = everything.json()[0]
    assert first["source_address"] == "10.0.0.1:1000" and first["detail"] == "level=STUDY keys=[PatientID=P1]"
    assert first["at"].endswith("Z") and len(first["entry_hash"]) == 64

    reads = [r for r in _rows(api.ctx) if r.action == "audit.read"]  # each read was audited, after the read
    assert len(reads) == len(cases) + 1
    assert _key(reads[0]) == ("audit.read", "token:auditor", "admin", "success", "", "")
    assert reads[0].detail == "GET /api/audit?action=dimse. list rows=3 total=3"


@pytest.mark.integration
def test_api_refuses_bad_parameters_with_json_errors(api: Api) -> None:
    for params, named in [({"limit": 1001}, "limit"), ({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
                          ({"since": "last week"}, "since"), ({"study": "1.2.x"}, "study"),
                          ({"action": "a" * 66}, "action")]:
        response = api.get("/api/audit", api.admin, **params)
        assert response.status_code == 400, (params, response.text)
        body = response.json()
        assert body["code"] == "invalid_request" and named in body["message"], (params, body)


@pytest.mark.integration
def test_only_administrators_read_the_trail(api: Api) -> None:
    before = _last_id(api.ctx)
    for path in ("/api/audit", "/api/audit/verify", "/api/audit/fhir"):
        denied = api.get(path, api.clinician)
        assert denied.status_code == 403 and denied.json()["code"] == "forbidden", path
        anonymous = api.get(path, None, since="not even a date")  # authentication comes before the 400
        assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthenticated", path
    refusals = [_key(r) for r in _rows(api.ctx, after=before)]
    assert refusals == [("access.denied", "token:ward", "clinician", "failure", "", ""),
                        ("auth.denied", "", "", "failure", "", "")] * 3


@pytest.mark.integration
def test_api_verify_and_fhir_bundle(api: Api) -> None:
    verify = api.get("/api/audit/verify", api.admin)
    assert verify.status_code == 200
    assert verify.json() == {"intact": True, "rows": 8, "problems": [], "last_hash": api.seeded[-1]["entry_hash"]}

    response = api.get("/api/audit/fhir", api.admin, action="dimse.")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    resources = check_bundle(bundle)
    assert bundle["total"] == 3 and response.headers["X-Total-Count"] == "3"
    assert bundle["link"][0]["relation"] == "self" and "action=dimse." in bundle["link"][0]["url"]
    find, move, get = resources
    assert [r["id"] for r in resources] == [str(api.seeded[i]["id"]) for i in (0, 1, 6)]
    assert (find["type"]["code"], find["action"], find["outcome"]) == ("110112", "E", "0")
    assert (move["type"]["code"], move["action"], move["outcome"]) == ("110104", "R", "4")
    assert get["outcome"] == "8" and get["outcomeDesc"] == "dimse.c-get row"
    assert find["recorded"] == api.seeded[0]["at"]
    assert find["agent"][0]["who"] == {"display": "FINDSCU"} and find["agent"][0]["requestor"] is True
    assert find["agent"][0]["network"] == {"address": "10.0.0.1", "type": "2"}
    assert find["source"]["observer"] == {"display": "PACS"}
    assert [e["what"]["identifier"]["value"] for e in find["entity"][:2]] == ["P1", "1.2.1"]
    assert find["entity"][2]["role"]["code"] == "24"
    limited = api.get("/api/audit/fhir", api.admin, action="dimse.", limit=1, offset=2).json()
    assert limited["total"] == 3 and [e["resource"]["id"] for e in limited["entry"]] == [get["id"]]
    reads = [r.detail for r in _rows(api.ctx) if r.action == "audit.read"]
    assert reads == ["GET /api/audit/verify verify rows=8 problems=0",
                     "GET /api/audit/fhir?action=dimse. fhir rows=3 total=3",
                     "GET /api/audit/fhir?action=dimse.&limit=1&offset=2 fhir rows=1 total=3"]


@pytest.mark.integration
def test_cli_lists_and_exports_fhir(api: Api, tmp_path: Path) -> None:
    listed = run_pacs(["audit", "list", "--action", "dimse.", "--json"], api.env)
    assert listed.returncode == 0, listed.stderr
    assert [_key(r) for r in json.loads(listed.stdout)] == [SEED[0], SEED[1], SEED[6]]
    table = invoke_pacs(["audit", "list", "--actor", "alice"], api.env)  # in-process: the command's logic
    assert table.returncode == 0 and "auth.login" in table.stdout and "2 of 2 event(s)" in table.stderr

    out = tmp_path / "audit.fhir.json"
    exported = run_pacs(["audit", "export", "--fhir", str(out), "--patient-id", "P2"], api.env)
    assert exported.returncode == 0, exported.stderr
    assert "2 audit event(s) exported" in exported.stderr
    resources = check_bundle(json.loads(out.read_text()))
    assert [r["id"] for r in resources] == [str(api.seeded[i]["id"]) for i in (4, 6)]
    everything = invoke_pacs(["audit", "export", "--fhir", "-"], api.env)
    assert everything.returncode == 0
    assert {r["id"] for r in check_bundle(json.loads(everything.stdout))} >= {str(r["id"]) for r in api.seeded}

    bad = invoke_pacs(["audit", "list", "--since", "soon"], api.env)
    assert bad.returncode == 2 and "since" in bad.stderr
    unwritable = invoke_pacs(["audit", "export", "--fhir", str(tmp_path / "no" / "such" / "dir" / "x.json")],
                             api.env)
    assert unwritable.returncode == 1 and "cannot write" in unwritable.stderr
    reads = [r for r in _rows(api.ctx) if r.action == "audit.read"]
    assert [_key(r)[:4] for r in reads] == [("audit.read", OP, "operator", "success")] * 4
    assert [r.source_address for r in reads] == ["cli"] * 4
    assert reads[2].detail == "cli export fhir rows=2 patient_id=P2"


# -- (a) a scripted session against `pacs serve` leaves exactly its events -----------------------------------


PASSWORD = "correct horse battery"
P1, P2 = "P-AUD-1", "P-AUD-2"
NAME_1 = "NGUYỄN^AUDIT"


@dataclass
class Session:
    pacs: EmbeddedPacs
    dest: ReferenceStoreSCP
    study_a: str
    study_b: str
    admin: str
    expected: list[Row]
    end_id: int
    moved: int
    ports: dict[str, int] = field(default_factory=dict)


def _pacs_cli(pacs: EmbeddedPacs, *args: str, input: str | None = None) -> str:
    """A `pacs` command in-process (tests.support.pacs_process.invoke_pacs: the same command code and audit rows
    without a new interpreter each; these commands run as processes in tests/test_cli.py); its stdout."""
    result = invoke_pacs(list(args), pacs.env, input=input)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _multipart(*parts: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _run_session(pacs: EmbeddedPacs, root: Path) -> Session:
    expected: list[Row] = [("config.initial-admin", "system", "system", "success", "", "")]
    dest = ReferenceStoreSCP(root / "dest", free_port(), aet="DESTSCP").start()
    dest_port = dest.port
    # setup: peers, credentials and the data, each audited as it is made
    for title, port in (("FINDSCU", free_port()), ("MOVESCU", free_port()), ("DESTSCP", dest_port)):
        _pacs_cli(pacs, "ae", "add", title, "127.0.0.1", str(port), "--archive-wide")
        expected.append(("config.ae-add", OP, "operator", "success", "", ""))
    _pacs_cli(pacs, "user", "add", "dr.lan", "--role", "radiologist", "--password-stdin", input=PASSWORD + "\n")
    expected.append(("config.user-add", OP, "operator", "success", "", ""))
    # `pacs token create` itself (the CLI writes these audit rows; pacs.token() makes tokens in-process)
    admin, clinician = (json.loads(_pacs_cli(pacs, "token", "create", f"audit-{role}", "--role", role, "--days", "1",
                                             "--json"))["token"] for role in ("admin", "clinician"))
    expected += [("config.token-create", OP, "operator", "success", "", "")] * 2
    first = make_dataset(PatientID=P1, PatientName=NAME_1)
    study_a = first.StudyInstanceUID
    files = []
    for i, ds in enumerate([first, make_dataset(PatientID=P1, PatientName=NAME_1, StudyInstanceUID=study_a,
                                                SeriesInstanceUID=first.SeriesInstanceUID, InstanceNumber=2),
                            make_dataset(PatientID=P2, PatientName="AUDIT^TWO")]):
        path = root / f"in{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    study_b = pydicom.dcmread(files[2]).StudyInstanceUID
    stored = storescu(pacs.port, files, aet="MODALITY1")
    assert stored.success, stored.output[-2000:]
    expected += [("instance.store", "MODALITY1", "modality", "success", P1, study_a)] * 2
    expected.append(("instance.store", "MODALITY1", "modality", "success", P2, study_b))

    # the session
    with httpx.Client(base_url=pacs.http_url, timeout=60) as http:
        login = http.post("/api/auth/login", json={"username": "dr.lan", "password": PASSWORD})
        assert login.status_code == 200, login.text
        session_token = login.json()["access_token"]
        expected.append(("auth.login", "dr.lan", "radiologist", "success", "", ""))
        wrong = http.post("/api/auth/login", json={"username": "dr.lan", "password": "not the password"})
        assert wrong.status_code == 401
        expected.append(("auth.login", "unverified:dr.lan", "", "failure", "", ""))  # a claim, not a user

        found = subprocess.run([dcmtk("findscu"), "-v", "-S", "-aet", "FINDSCU", "-aec", "PACS",
                                "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={P1}", "-k", "StudyInstanceUID",
                                "127.0.0.1", str(pacs.port)], capture_output=True, text=True, env=dcmtk_env(),
                               timeout=120)
        assert found.returncode == 0 and study_a in found.stdout + found.stderr, found.stderr[-2000:]
        expected += [("ae.new-address", "FINDSCU", "ae", "success", "", ""),  # first call from 127.0.0.1
                     ("dimse.c-find", "FINDSCU", "ae", "success", P1, study_a)]
        moved = subprocess.run([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aec", "PACS", "-aem", "DESTSCP",
                                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_a}",
                                "127.0.0.1", str(pacs.port)], capture_output=True, text=True, env=dcmtk_env(),
                               timeout=120)
        assert moved.returncode == 0, moved.stderr[-2000:]
        wait_until(lambda: len(dest.received()) == 2, timeout=30, what="the moved study at DESTSCP")
        expected += [("ae.new-address", "MOVESCU", "ae", "success", "", ""),
                     ("dimse.c-move", "MOVESCU", "ae", "success", P1, study_a)]

        user = {"Authorization": f"Bearer {session_token}"}
        qido = http.get("/dicom-web/studies", params={"PatientID": P1}, headers=user)
        assert qido.status_code == 200 and len(qido.json()) == 1, qido.text
        expected.append(("dicomweb.search", "dr.lan", "radiologist", "success", P1, study_a))  # what it returned
        wado = http.get(f"/dicom-web/studies/{study_a}",
                        headers={**user, "Accept": 'multipart/related; type="application/dicom"'})
        assert wado.status_code == 200 and wado.content.count(b"DICM") == 2, wado.text[:300]
        expected.append(("dicomweb.retrieve", "dr.lan", "radiologist", "success", P1, study_a))
        body, content_type = _multipart(to_bytes(make_dataset(PatientID=P1, PatientName=NAME_1,
                                                              StudyInstanceUID=study_a)))
        stow = http.post("/dicom-web/studies", content=body,
                         headers={**user, "Content-Type": content_type, "Accept": "application/dicom+json"})
        assert stow.status_code == 200, stow.text
        expected += [("instance.store", "dr.lan", "radiologist", "success", P1, study_a),
                     ("stow", "dr.lan", "radiologist", "success", "", study_a)]

        refused = http.post("/dicom-web/studies", content=body,
                            headers={"Authorization": f"Bearer {clinician}", "Content-Type": content_type})
        assert refused.status_code == 403, refused.text
        expected.append(("access.denied", "token:audit-clinician", "clinician", "failure", "", ""))
        anonymous = http.get("/dicom-web/studies", params={"PatientID": P1})
        assert anonymous.status_code == 401
        expected.append(("auth.denied", "", "", "failure", "", ""))

    _pacs_cli(pacs, "ae", "add", "NEWMOD", "127.0.0.1", str(free_port()), "--archive-wide")
    expected.append(("config.ae-add", OP, "operator", "success", "", ""))
    return Session(pacs, dest, study_a, study_b, admin, expected, _last_id(pacs.ctx), moved=2,
                   ports={"dest": dest_port})


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    root = tmp_path_factory.mktemp("audit-session")
    pacs = EmbeddedPacs(root)
    dest: ReferenceStoreSCP | None = None
    try:
        scripted = _run_session(pacs, root)
        dest = scripted.dest
        yield scripted
    finally:
        if dest is not None:
            dest.stop()
        pacs.close()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_trail_holds_exactly_the_sessions_events(session: Session) -> None:
    rows = _rows(session.pacs.ctx, upto=session.end_id)
    assert [_key(r) for r in rows] == session.expected
    by_action = {r.action: r for r in rows}  # the last of each action
    find, move = by_action["dimse.c-find"], by_action["dimse.c-move"]
    assert find.detail.startswith(f"model=STUDY_ROOT level=STUDY keys=[PatientID={P1}] returns=1 matches=1")
    assert find.detail.endswith("status=0x0000")
    assert (f"destination=DESTSCP@127.0.0.1:{session.ports['dest']} keys=[StudyInstanceUID={session.study_a}] "
            "planned=2 completed=2 failed=0 warning=0 remaining=0 status=0x0000") in move.detail
    for row in rows:
        if row.action.startswith(("dimse.", "instance.", "auth.", "access.", "dicomweb.", "stow")):
            assert re.fullmatch(r"127\.0\.0\.1:\d+", row.source_address), (row.action, row.source_address)
        elif row.action.startswith("config.") and row.actor != "system":
            assert row.source_address == "cli"
    failed_login = rows[[_key(r) for r in rows].index(("auth.login", "unverified:dr.lan", "", "failure", "", ""))]
    assert failed_login.detail == "wrong user name or password"
    assert rows[-1].detail.startswith("ae=NEWMOD ")
    keys = [_key(r) for r in rows]
    stowed = rows[keys.index(("instance.store", "dr.lan", "radiologist", "success", P1, session.study_a))]
    sent = rows[keys.index(("instance.store", "MODALITY1", "modality", "success", P2, session.study_b))]
    assert "transport=stow" in stowed.detail and "transport=dimse" in sent.detail
    assert len(session.dest.received()) == session.moved
    verified = run_pacs(["audit", "verify"], session.pacs.env)
    assert verified.returncode == 0 and "audit trail intact" in verified.stdout, verified.stdout + verified.stderr


@pytest.mark.integration
def test_the_sessions_trail_reads_back_through_the_api_as_fhir(session: Session) -> None:
    pacs = session.pacs
    with httpx.Client(base_url=pacs.http_url, timeout=60,
                      headers={"Authorization": f"Bearer {session.admin}"}) as http:
        listed = http.get("/api/audit", params={"action": "dimse.", "until": datetime.now(UTC).isoformat()})
        assert listed.status_code == 200
        dimse = [r for r in listed.json() if r["id"] <= session.end_id]
        assert [_key(r) for r in dimse] == [e for e in session.expected if e[0].startswith("dimse.")]
        by_study = http.get("/api/audit", params={"study": session.study_b, "limit": 1000})
        assert [_key(r) for r in by_study.json() if r["id"] <= session.end_id] == \
            [e for e in session.expected if e[5] == session.study_b]
        fhir = http.get("/api/audit/fhir", params={"limit": 1000})
        assert fhir.status_code == 200
    resources = check_bundle(fhir.json())
    mine = {int(r["id"]): r for r in resources if int(r["id"]) <= session.end_id}
    assert len(mine) == len(session.expected)
    kinds = {}
    for row in _rows(pacs.ctx, upto=session.end_id):
        resource = mine[row.id]
        kinds[row.action] = (resource["type"]["code"], resource["action"], resource["outcome"])
        assert resource["agent"][0]["who"]["display"] == (row.actor or "unknown")
        assert resource["source"]["observer"] == {"display": "PACS"}
        named = {e["what"]["identifier"]["value"] for e in resource.get("entity", []) if "what" in e}
        assert {v for v in (row.patient_id, row.study_instance_uid) if v} <= named
    assert kinds["dimse.c-find"] == ("110112", "E", "0")
    assert kinds["dimse.c-move"] == ("110104", "R", "0")
    assert kinds["auth.login"] == ("110114", "E", "8")  # the last login failed
    assert kinds["access.denied"] == ("110113", "E", "8")
    assert kinds["instance.store"] == ("110104", "C", "0")
    assert kinds["dicomweb.search"] == ("110112", "E", "0")
    assert kinds["config.ae-add"][0] == "110113"


def _find(port: int, aet: str, identifier: Dataset) -> list[int]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established
    try:
        responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        return [status.Status for status, _ in responses]
    finally:
        assoc.release()


@pytest.mark.integration
def test_worklist_mpps_get_and_refusals_are_audited_once_per_request(session: Session) -> None:
    pacs = session.pacs
    for title in ("CT01", "GETSCU"):
        _pacs_cli(pacs, "ae", "add", title, "127.0.0.1", str(free_port()), "--archive-wide")
    order = invoke_pacs(["order", "add", "--patient-id", P1, "--patient-name", "AUDIT^ONE", "--modality", "CT",
                      "--station-ae", "CT01", "--date", "20261128", "--time", "0900", "--procedure", "CT CHEST",
                      "--json"], pacs.env)
    assert order.returncode == 0, order.stderr
    ordered = json.loads(order.stdout)
    before = _last_id(pacs.ctx)

    query = Dataset()
    query.PatientID = ""
    query.StudyInstanceUID = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = "CT01"
    sps.Modality = ""
    query.ScheduledProcedureStepSequence = Sequence([sps])
    modality = AE(ae_title="CT01")
    modality.add_requested_context(ModalityWorklistInformationFind)
    modality.add_requested_context(ModalityPerformedProcedureStep)
    assoc = modality.associate("127.0.0.1", pacs.port, ae_title="PACS")
    assert assoc.is_established
    step_uid = generate_uid()
    try:
        statuses = [s.Status for s, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)]
        assert statuses == [0xFF00, 0x0000]
        create = Dataset()
        create.PatientID = P1
        item = Dataset()
        item.AccessionNumber = ordered["accession_number"]
        item.StudyInstanceUID = ordered["study_instance_uid"]
        create.ScheduledStepAttributesSequence = Sequence([item])
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        create.Modality = "CT"
        status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0x0000
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, step_uid)
        assert status.Status == 0x0000
        status, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0112
    finally:
        assoc.release()

    retriever = AE(ae_title="GETSCU")
    retriever.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    retriever.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    retriever.add_requested_context("1.2.840.10008.5.1.4.1.1.7")
    got: list[str] = []
    assoc = retriever.associate("127.0.0.1", pacs.port, ae_title="PACS",
                                ext_neg=[build_role("1.2.840.10008.5.1.4.1.1.7", scp_role=True)],
                                evt_handlers=[(evt.EVT_C_STORE,
                                               lambda e: got.append(e.request.AffectedSOPInstanceUID) or 0x0000)])
    assert assoc.is_established
    try:
        wanted = Dataset()
        wanted.QueryRetrieveLevel = "STUDY"
        wanted.StudyInstanceUID = session.study_b
        final = list(assoc.send_c_get(wanted, StudyRootQueryRetrieveInformationModelGet))[-1][0]
        assert final.Status == 0x0000 and len(got) == 1
        nowhere = list(assoc.send_c_move(wanted, "NOWHERE", StudyRootQueryRetrieveInformationModelMove))[-1][0]
        assert nowhere.Status == 0xA801
    finally:
        assoc.release()
    no_level = Dataset()
    no_level.PatientID = P1
    assert _find(pacs.port, "FINDSCU", no_level)[-1] == 0xA900
    # UTF-8 under a Latin-1 label (what many modalities send): auditing must not change how it is read
    latin1 = subprocess.run([dcmtk("findscu"), "-v", "-S", "-aet", "FINDSCU", "-aec", "PACS",
                             "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 100",
                             "-k", "PatientName=NGUYỄN*", "-k", "StudyInstanceUID", "127.0.0.1", str(pacs.port)],
                            capture_output=True, env=dcmtk_env(), timeout=120)
    assert latin1.returncode == 0 and session.study_a.encode() in latin1.stdout + latin1.stderr

    rows = _rows(pacs.ctx, after=before)
    # a title's first call from an address is an alert row of its own (tests/test_ae_spoofing.py): once each
    sightings = [r for r in rows if _key(r)[0] == "ae.new-address"]
    assert sorted(_key(r)[1] for r in sightings) == ["CT01", "GETSCU"]
    rows = [r for r in rows if r not in sightings]
    study = ordered["study_instance_uid"]
    assert [_key(r) for r in rows] == [
        ("dimse.worklist-find", "CT01", "modality", "success", P1, study),
        ("dimse.mpps-create", "CT01", "modality", "success", P1, study),
        ("dimse.mpps-set", "CT01", "modality", "success", P1, study),
        ("dimse.mpps-set", "CT01", "modality", "failure", "", ""),
        ("dimse.c-get", "GETSCU", "ae", "success", P2, session.study_b),
        ("dimse.c-move", "GETSCU", "ae", "failure", P2, session.study_b),
        ("dimse.c-find", "FINDSCU", "ae", "failure", P1, ""),
        ("dimse.c-find", "FINDSCU", "ae", "success", P1, session.study_a),
    ]
    mwl, create_row, set_row, unknown, get_row, move_row, bad_find, by_name = rows
    assert "model=MWL" in mwl.detail and "ScheduledStationAETitle=CT01" in mwl.detail and "matches=1" in mwl.detail
    assert f"sop={step_uid}" in create_row.detail and "step_status=IN_PROGRESS" in create_row.detail
    assert f"accession={ordered['accession_number']}" in create_row.detail
    assert "step_status=COMPLETED" in set_row.detail and set_row.detail.endswith("status=0x0000")
    assert "status=0x0112" in unknown.detail and "error=no performed procedure step" in unknown.detail
    assert "planned=1 completed=1 failed=0" in get_row.detail
    assert "destination=NOWHERE " in move_row.detail and "status=0xA801" in move_row.detail
    assert "planned=" not in move_row.detail
    assert "status=0xA900" in bad_find.detail and "error=no QueryRetrieveLevel" in bad_find.detail
    assert "keys=[PatientName=NGUYỄN*] returns=1 matches=1" in by_name.detail
