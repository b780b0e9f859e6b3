"""Issue 12, findings 5, 6, 9, 10 and the failed-login actor of 11, each attacked against a live `pacs serve`.

Two hospitals send a patient with the same local ID (SHARED1), as hospital record numbers do:

- 5: a patient token without a facility is refused by the CLI (exit 1, the message says why); with HOSP-A it
  finds, reads and renders only A's SHARED1 — B's study of "SHARED1" answers 404 like an unknown UID; a
  facility whose patient has an issuer needs --issuer (exit 1 otherwise);
- 6: HOSP-A's administrator reads the audit trail (list and FHIR AuditEvent export): not one row about
  B's study or about the ambiguous SHARED1; A's rows and their own are there; the chain check is 403 for
  them; the archive-wide administrator still sees B's rows;
- 9: 30 parallel wrong passwords for one user from one address: at most the limit (10) is verified
  (counted from the audit rows the server writes for each verified attempt), the rest get 429 (or 503
  when the argon2 slots are busy), peak memory grows by far less than 30 argon2 verifications (64 MiB
  each) would take, and even the right password then gets 429;
- 10: a bearer request carrying ``?access_token=SECRET`` leaves no SECRET in the audit trail or the log
  (it reads ``access_token=***``); `pacs config show` masks ``?password=`` and a JWKS URL's userinfo;
- 11: a failed login is audited as ``unverified:<name>`` (control characters replaced), never as the user.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from pacs.db.models import AuditEvent
from pacs.security.redaction import RedactingLogFilter
from tests.support.datasets import make_dataset
from tests.support.inprocess import new_user, register_ae
from tests.support.pacs_process import invoke_pacs
from tests.support.senders import send_dataset
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

SHARED = "SHARED1"
ISSUED = "ISS-7"  # a patient HOSP-A records with an issuer
ISSUER = "1.2.840.99.7"
PASSWORD = "the right long password"
LIMIT = 10  # PACS_LOGIN_ATTEMPTS_PER_MINUTE (the default)
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class World:
    pacs: EmbeddedPacs
    study_a: str
    study_b: str
    series_b: str
    sop_b: str
    study_issued: str  # HOSP-A's


def _send(pacs: EmbeddedPacs, aet: str, patient_id: str, name: str, **extra: str) -> tuple[str, str, str]:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop,
                      PatientID=patient_id, PatientName=name, Modality="CT", SOPClassUID=CT, **extra)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    result = send_dataset(pacs.port, ds, ExplicitVRLittleEndian, aet=aet)
    assert result.status == 0, result
    return study, series, sop


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("findings"), {"PACS_LOG_LEVEL": "DEBUG"})
    try:
        for aet, facility in (("MODA", "HOSP-A"), ("MODB", "HOSP-B")):
            register_ae(pacs.ctx, aet, "127.0.0.1", 104, facility=facility)
        study_a, _, _ = _send(pacs, "MODA", SHARED, "ALPHA^ANNA")
        study_b, series_b, sop_b = _send(pacs, "MODB", SHARED, "BRAVO^BINH")
        study_issued, _, _ = _send(pacs, "MODA", ISSUED, "ISSUED^IVY", IssuerOfPatientID=ISSUER)
        yield World(pacs, study_a, study_b, series_b, sop_b, study_issued)
    finally:
        pacs.close()


def _get(world: World, token: str, path: str, **params: object) -> httpx.Response:
    return httpx.get(f"{world.pacs.http_url}{path}", params=params, headers={"Authorization": f"Bearer {token}"},
                     timeout=60)


def _audit_rows(world: World) -> list[AuditEvent]:
    with world.pacs.ctx.read_sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


# -- finding 5 -------------------------------------------------------------------------------------------


def test_a_patient_token_is_bound_to_one_facilitys_patient(world: World) -> None:
    # `pacs token create` in-process (its logic; tests/test_audit.py runs it as a process)
    refused = invoke_pacs(["token", "create", "p-any", "--role", "patient", "--patient-id", SHARED, "--images",
                           "--json"], world.pacs.env)
    assert refused.returncode == 1 and "--facility" in refused.stderr, refused.stderr  # no token at all
    assert "p-any" not in invoke_pacs(["token", "list", "--json"], world.pacs.env).stdout

    token = world.pacs.token("patient", name="p-a", facility="HOSP-A", patient_id=SHARED, images=True)
    found = _get(world, token, "/dicom-web/studies", includefield="PatientName")
    assert found.status_code == 200, found.text
    assert [(s["0020000D"]["Value"][0], s["00100010"]["Value"][0]["Alphabetic"]) for s in found.json()] == [
        (world.study_a, "ALPHA^ANNA")]  # never BRAVO^BINH, B's patient of the same local ID
    by_uid = _get(world, token, "/dicom-web/studies", StudyInstanceUID=world.study_b)
    assert by_uid.status_code == 204 or by_uid.json() == [], by_uid.text
    assert _get(world, token, f"/dicom-web/studies/{world.study_a}/metadata").status_code == 200
    for path in (f"/dicom-web/studies/{world.study_b}/metadata", f"/dicom-web/studies/{world.study_b}",
                 f"/dicom-web/studies/{world.study_b}/series/{world.series_b}/instances/{world.sop_b}/rendered"):
        assert _get(world, token, path).status_code == 404, path  # images of B's SHARED1 neither

    # HOSP-A records ISS-7 with an issuer: the token must say which record (exit 1 naming the issuer)
    no_issuer = invoke_pacs(["token", "create", "p-iss", "--role", "patient", "--facility", "HOSP-A",
                             "--patient-id", ISSUED], world.pacs.env)
    assert no_issuer.returncode == 1 and ISSUER in no_issuer.stderr and "--issuer" in no_issuer.stderr
    issued = world.pacs.token("patient", name="p-iss", facility="HOSP-A", patient_id=ISSUED, issuer=ISSUER,
                              images=True)
    assert len(_get(world, issued, "/dicom-web/studies").json()) == 1


# -- finding 6 -------------------------------------------------------------------------------------------


def test_a_facility_admin_reads_only_its_facilitys_audit_rows(world: World) -> None:
    reader_b = world.pacs.token("radiologist", name="rad-b", facility="HOSP-B")
    reader_a = world.pacs.token("radiologist", name="rad-a", facility="HOSP-A")
    for token, study in ((reader_b, world.study_b), (reader_a, world.study_a)):  # rows about each hospital
        assert _get(world, token, f"/dicom-web/studies/{study}/metadata").status_code == 200
    assert _get(world, reader_b, "/dicom-web/studies", PatientID=SHARED).status_code == 200
    admin_a = world.pacs.token("admin", name="admin-a", facility="HOSP-A")
    admin_all = world.pacs.token("admin", name="admin-all")

    listed = _get(world, admin_a, "/api/audit", limit=1000)
    assert listed.status_code == 200, listed.text
    rows = listed.json()
    assert int(listed.headers["X-Total-Count"]) == len(rows)
    assert world.study_a in {r["study_instance_uid"] for r in rows}  # A's own rows are there
    for row in rows:  # and nothing about B: its study, B's readers, the ambiguous SHARED1 without a study
        assert row["study_instance_uid"] in ("", world.study_a, world.study_issued), row
        assert row["study_instance_uid"] or row["actor"] == "token:admin-a", row
    fhir = _get(world, admin_a, "/api/audit/fhir", limit=1000)
    assert fhir.status_code == 200 and fhir.json()["total"] >= len(rows) + 1  # + its own read of the list
    assert world.study_b not in fhir.text and "token:rad-b" not in fhir.text
    assert _get(world, admin_a, "/api/audit", study=world.study_b).json() == []
    assert _get(world, admin_a, "/api/audit/verify").status_code == 403  # the chain spans every facility

    everything = _get(world, admin_all, "/api/audit", limit=1000).json()  # the archive-wide admin sees B's rows
    assert world.study_b in {r["study_instance_uid"] for r in everything}
    assert "token:rad-b" in {r["actor"] for r in everything}
    assert world.study_b in _get(world, admin_all, "/api/audit/fhir", limit=1000).text
    assert _get(world, admin_all, "/api/audit/verify").json()["intact"] is True


# -- findings 9 and 11 -----------------------------------------------------------------------------------


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process has ever had (bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _add_user(world: World, name: str) -> None:
    new_user(world.pacs.ctx, name, PASSWORD, "radiologist", facility="HOSP-A")


def test_parallel_wrong_logins_are_counted_before_hashing(world: World) -> None:
    _add_user(world, "victim")
    assert world.pacs.proc.proc is not None
    pid = world.pacs.proc.proc.pid
    peak_before = _peak_rss(pid)

    def attempt(i: int) -> int:
        return httpx.post(f"{world.pacs.http_url}/api/auth/login",
                          json={"username": "victim", "password": f"wrong password {i}"}, timeout=120).status_code

    with ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(attempt, range(30)))
    growth = _peak_rss(pid) - peak_before
    print(f"30 parallel wrong logins: {sorted(codes)}; peak RSS growth {growth / 2**20:.0f} MiB")
    evaluated = [r for r in _audit_rows(world) if r.actor == "unverified:victim"
                 and r.detail == "wrong user name or password"]
    assert codes.count(401) == len(evaluated) <= LIMIT  # verified: the limit at most
    assert set(codes) <= {401, 429, 503} and codes.count(429) >= 30 - LIMIT - codes.count(503)
    assert growth < 200 * 2**20  # 30 verifications at once would take 30 × 64 MiB
    right = httpx.post(f"{world.pacs.http_url}/api/auth/login", json={"username": "victim", "password": PASSWORD},
                       timeout=60)
    assert right.status_code == (429 if codes.count(401) == LIMIT else 200)
    assert not [r for r in _audit_rows(world) if r.actor == "victim" and r.outcome == "failure"]


def test_a_failed_login_names_an_unverified_claim(world: World) -> None:
    _add_user(world, "dr.real")
    wrong = httpx.post(f"{world.pacs.http_url}/api/auth/login",
                       json={"username": "dr.real\x1b[2J", "password": "not the password"}, timeout=60)
    assert wrong.status_code == 401
    ok = httpx.post(f"{world.pacs.http_url}/api/auth/login", json={"username": "dr.real", "password": PASSWORD},
                    timeout=60)
    assert ok.status_code == 200
    logins = [(r.actor, r.role, r.outcome) for r in _audit_rows(world) if r.action == "auth.login"
              and "dr.real" in r.actor]
    assert logins == [("unverified:dr.real?[2J", "", "failure"), ("dr.real", "radiologist", "success")]


# -- finding 10 ------------------------------------------------------------------------------------------


def test_credentials_in_query_strings_reach_neither_audit_nor_log(world: World) -> None:
    secret = "SECRETVALUE" + generate_uid()[-12:].replace(".", "")
    admin = world.pacs.token("admin", name="admin-redact")
    with_token = _get(world, admin, "/dicom-web/studies", access_token=secret, limit=1)
    assert with_token.status_code == 400  # QIDO-RS refuses an unknown parameter (and audits the refusal)
    metadata = httpx.get(f"{world.pacs.http_url}/dicom-web/studies/{world.study_a}/metadata",
                         params={"token": secret, "X-Amz-Signature": secret, "password": secret},
                         headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    assert metadata.status_code == 200, metadata.text
    anonymous = httpx.get(f"{world.pacs.http_url}/dicom-web/studies", params={"access_token": secret}, timeout=30)
    assert anonymous.status_code == 401
    rows = _audit_rows(world)
    assert not [r for r in rows if secret in (r.detail + r.actor)]
    assert any("token=***" in r.detail and "Signature=***" in r.detail for r in rows)  # redacted, not dropped
    assert secret not in world.pacs.proc.log_path.read_text(errors="replace")
    # the same rule on the access log line format uvicorn writes
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", f"/x?access_token={secret}&limit=1", "1.1", 200), None)
    assert RedactingLogFilter().filter(record) and secret not in record.getMessage()


def test_config_show_masks_query_passwords_and_jwks_userinfo(tmp_path: Path) -> None:
    env = {"PACS_DATA_DIR": str(tmp_path / "data"), "PACS_OIDC_ISSUER": "https://idp.example/realms/p",
           "PACS_OIDC_AUDIENCE": "pacs", "PACS_OIDC_JWKS_URL": "https://svc:jwks-pass@idp.example/certs?key=k3y",
           "PACS_DATABASE_URL": "postgresql+psycopg://pacs@db/pacs?password=hunter2",
           "PACS_BROKER_URL": "amqp://guest:brokerpw@mq:5672//"}
    shown = invoke_pacs(["config", "show"], env)  # in-process; tests/test_cli.py runs `config show` as a process
    assert shown.returncode == 0, shown.stderr
    for secret in ("hunter2", "jwks-pass", "svc", "k3y", "brokerpw"):
        assert secret not in shown.stdout, secret
    config = json.loads(shown.stdout)
    assert config["database_url"] == "postgresql+psycopg://pacs@db/pacs?password=***"
    assert config["oidc_jwks_url"] == "https://***@idp.example/certs?key=***"
    assert config["broker_url"] == "amqp://guest:***@mq:5672//"
