"""Every web page (``/ui…``) × every role and facility, in process (issue 16 must-show 4: "role and facility rules
hold in the UI exactly as in the API").

tests/test_route_matrix.py walks the OpenAPI document, where no page is (the page routers are
``include_in_schema=False``). This module walks the app's own routes instead (``fastapi.routing.iter_route_contexts``
over ``app.routes``): a page added tomorrow is in the matrix the day it is added, and the module fails until
:data:`PAGES` classifies it —

- the capability the page declares (its :func:`viewer_api.ui.core.require_page` dependency) must be the one listed,
  and the API operation listed for it (the route of the JSON API that serves the same thing) must admit exactly the
  same roles (its ``bearer`` scope in the OpenAPI document); a page without an API counterpart says why;
- GET, each subject (no session; radiologist, technologist, clinician and administrator of facility HOSP-A and of
  HOSP-B; an archive-wide administrator; an EMR account's session and a patient token in the cookie, roles without
  pages): no session → 303 to ``/login?next=…`` (401 for a JSON caller); a role without the capability → 403; a
  page that names facility HOSP-A's study (or its series, instance, consult) → 404 for HOSP-B's users, 200 for
  HOSP-A's users holding the capability; no answer to a HOSP-B user ever holds HOSP-A's patient's name, ID or
  accession number;
- POST/PUT: without a CSRF token (missing, forged, another session's, or the right one from another site) → 403;
  with a valid token but without the capability (or, for configuration changes, as an administrator of one
  facility) → 403; HOSP-B on HOSP-A's study or consult → 404 (or back to a page that refuses it); after all of
  them the index holds exactly what it held (every table but the audit trail).

The literal case of the issue — a radiologist of HOSP-B, signed in through the real sign-in form, opens HOSP-A's
study page by URL — is its own test. One SQLite archive and one app for the module; sessions are issued the way
the sign-in form issues them (``Authenticator.issue_session_token``), one through the form itself.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from httpx import Response
from pydicom.uid import UID, generate_uid
from sqlalchemy import MetaData, select, update

from pacs.consults import service as consults
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import AuditEvent, DerivedTask
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.ingest import Ingestor, IngestSource
from pacs.reports import lifecycle
from pacs.ris.orders import NewOrder, create_order
from pacs.security.accounts import create_token
from pacs.security.models import User
from pacs.security.passwords import hash_password
from pacs.security.principal import Principal, scope_for
from pacs.security.roles import ROLE_CAPABILITIES, Capability, Role, capabilities_of
from pacs.settings import Settings
from tests.support.datasets import make_dataset, to_bytes
from tests.support.inprocess import register_ae
from viewer_api.app import create_app
from viewer_api.ui.core import PAGE_ROLES

A, B, C = "HOSP-A", "HOSP-B", "HOSP-C"
PASSWORD = "route-matrix-password-16"
CT = UID("1.2.840.10008.5.1.4.1.1.2")
# facility HOSP-A's patient: every marker below must stay out of every answer to a HOSP-B user
A_NAME, A_SHOWN, A_ID, A_ACCESSION = "Phạm^Alphonse Duy", "Alphonse", "PID-ALPHA-77", "ACC-ALPHA-77"
B_NAME, B_ID, B_ACCESSION = "Trần^Bravo Bình", "PID-BRAVO-88", "ACC-BRAVO-88"
CSRF_REFUSED = "did not come from this site"  # router.CSRF_MESSAGE
ROLE_REFUSED = "does not have access to this page"  # router.ERROR_MESSAGES[403]


# -- the classification of every /ui route ----------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """What one page route needs and does. ``capability``: what it must declare (None: any role with pages);
    ``api``: ``"METHOD /path"`` of the JSON API serving the same thing (it must admit the same roles), or None
    with ``why``; ``archive_wide``: an administrator of one facility is refused (403); ``target``: the URL names
    facility HOSP-A's ``study`` or ``consult`` (404 for HOSP-B); ``values``: query (GET) or form (POST) values a
    user allowed to act would send; ``body``: ``form``, ``json`` or ``multipart``; ``ok``: the status for a
    user allowed to see it; ``refused_to``: for a POST whose refusal sends the browser back to a page (303), the
    page it goes to must be a 404 or say ``refused_to``."""

    capability: Capability | None
    api: str | None
    why: str = ""
    archive_wide: bool = False
    target: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    body: str = "form"
    ok: int = 200
    refused_to: str = ""
    public: bool = False


S, R, W = Capability.STUDY_SEARCH, Capability.STUDY_READ, Capability.REPORT_WRITE
NO_API = "configuration and operations pages: their other way in is the `pacs` command line, not the HTTP API"
NOT_FOUND_FLASH = "Not found, or not in your facility."  # reading_pages._BY_KIND[NotFound]
PAGES: dict[tuple[str, str], Page] = {
    ("GET", "/ui-static/{name}"): Page(None, None, "the pages' stylesheet and scripts: no data, no session",
                                      public=True, values={"name": "ui.css"}),
    ("GET", "/ui"): Page(None, None, "the start page: links to the areas the role may open"),
    # the study browser, the study page, the patient page (viewer_api.ui.studies_pages)
    ("GET", "/ui/studies"): Page(S, "GET /dicom-web/studies"),
    ("GET", "/ui/studies/updates"): Page(S, "GET /dicom-web/count/studies"),
    ("GET", "/ui/studies/{study}"): Page(S, "GET /dicom-web/studies", target="study"),
    ("GET", "/ui/patients/{study}"): Page(S, "GET /dicom-web/studies", target="study"),
    ("GET", "/ui/studies/{study}/thumbnail.jpg"): Page(R, "GET /dicom-web/studies/{study}/thumbnail", target="study"),
    ("GET", "/ui/studies/{study}/series/{series}/thumbnail.jpg"): Page(
        R, "GET /dicom-web/studies/{study}/series/{series}/thumbnail", target="study"),
    ("POST", "/ui/studies/{study}/share"): Page(
        Capability.SHARE_CREATE, "POST /api/studies/{study}/shares", target="study",
        values={"scope": "report", "expires_in_days": "7"},
        refused_to="This study cannot be shared or asked about from your facility."),
    ("POST", "/ui/studies/{study}/consult"): Page(
        Capability.CONSULT, "POST /api/studies/{study}/consults", target="study",
        values={"question": "Ý kiến?", "to_facility": C},
        refused_to="This study cannot be shared or asked about from your facility."),
    ("GET", "/ui/consults"): Page(Capability.CONSULT, "GET /api/consults"),
    ("GET", "/ui/consults/{consult_id}"): Page(Capability.CONSULT, "GET /api/consults/{consult_id}", target="consult"),
    ("POST", "/ui/consults/{consult_id}/answer"): Page(
        Capability.CONSULT, "POST /api/consults/{consult_id}/answers", target="consult", values={"text": "Trả lời."}),
    ("POST", "/ui/consults/{consult_id}/close"): Page(
        Capability.CONSULT, "POST /api/consults/{consult_id}/close", target="consult"),
    # the radiologist's pages (viewer_api.ui.reading_pages)
    ("GET", "/ui/reading"): Page(W, "GET /api/reading-list"),
    ("GET", "/ui/reading/rows"): Page(W, "GET /api/reading-list"),
    ("POST", "/ui/reading/{study}/claim"): Page(W, "POST /api/studies/{study}/claim", target="study",
                                                refused_to=NOT_FOUND_FLASH),
    ("POST", "/ui/reading/{study}/release"): Page(W, "DELETE /api/studies/{study}/claim", target="study",
                                                  refused_to=NOT_FOUND_FLASH),
    ("GET", "/ui/reading/{study}"): Page(W, "POST /api/studies/{study}/reports", target="study"),
    ("POST", "/ui/reading/{study}"): Page(W, "POST /api/studies/{study}/reports", target="study",
                                          values={"action": "save", "findings": "Bình thường.", "impression": "BT"}),
    ("PUT", "/ui/reading/{study}/draft"): Page(W, "PUT /api/reports/{report_id}", target="study", body="json",
                                               values={"findings": "Bình thường.", "impression": "BT"}),
    ("POST", "/ui/reading/{study}/amend"): Page(W, "POST /api/reports/{report_id}/amend", target="study",
                                                values={"reason": "sửa", "findings": "Sửa.", "impression": "BT"}),
    ("POST", "/ui/reading/{study}/key-images"): Page(W, "POST /api/studies/{study}/key-images", target="study",
                                                     values={"sop": "{sop}"}),
    ("GET", "/ui/reading/{study}/thumbnails/{series}/{sop}"): Page(
        R, "GET /dicom-web/studies/{study}/series/{series}/instances/{sop}/thumbnail", target="study"),
    # the technologist's and study-management pages (viewer_api.ui.tech_pages)
    ("GET", "/ui/worklist"): Page(S, "GET /api/orders"),
    ("GET", "/ui/worklist/table"): Page(S, "GET /api/orders"),
    ("GET", "/ui/studies/{study}/completeness"): Page(R, "GET /dicom-web/studies/{study}/metadata", target="study"),
    ("GET", "/ui/studies/{study}/correct"): Page(Capability.STUDY_CORRECT, "PATCH /api/studies/{study}",
                                                 target="study"),
    ("POST", "/ui/studies/{study}/correct"): Page(Capability.STUDY_CORRECT, "PATCH /api/studies/{study}",
                                                  target="study", values={"name": "Khác^Tên", "reason": "sai tên"}),
    ("GET", "/ui/studies/{study}/manage"): Page(Capability.STUDY_REJECT, "GET /api/rejected", target="study"),
    ("GET", "/ui/studies/{study}/archive.zip"): Page(Capability.STUDY_EXPORT, "GET /api/studies/{study}/archive.zip",
                                                     target="study"),
    ("GET", "/ui/studies/{study}/series/{series}/archive.zip"): Page(
        Capability.STUDY_EXPORT, "GET /api/studies/{study}/series/{series}/archive.zip", target="study"),
    ("POST", "/ui/studies/{study}/send"): Page(Capability.STUDY_SEND, "POST /api/studies/{study}/send",
                                               target="study", values={"destination": "PEER_ALL"}),
    ("GET", "/ui/studies/{study}/send-progress"): Page(Capability.STUDY_SEND, "GET /api/studies/{study}/send",
                                                       target="study", values={"destination": "PEER_ALL"}),
    ("POST", "/ui/studies/{study}/reject"): Page(Capability.STUDY_REJECT, "POST /api/studies/{study}/reject",
                                                 target="study", values={"reason": "quality"}),
    ("POST", "/ui/studies/{study}/restore"): Page(Capability.STUDY_REJECT, "POST /api/studies/{study}/restore",
                                                  target="study"),
    ("POST", "/ui/studies/{study}/delete"): Page(Capability.STUDY_DELETE, "DELETE /api/studies/{study}",
                                                 target="study", values={"reason": "trùng", "confirm": "yes"}),
    ("GET", "/ui/upload"): Page(Capability.STUDY_STORE, "POST /api/studies/upload"),
    ("POST", "/ui/upload"): Page(Capability.STUDY_STORE, "POST /api/studies/upload", body="multipart"),
    # the viewer hand-off (viewer_api.ui.front_pages)
    ("GET", "/ui/viewer/{study}"): Page(R, "GET /dicom-web/studies/{study}/metadata", target="study"),
    ("GET", "/ui/viewer"): Page(R, "GET /dicom-web/studies/{study}/metadata"),
    ("POST", "/ui/viewer-token"): Page(R, "GET /dicom-web/studies/{study}/metadata", target="study", body="json",
                                       values={"study": "{study}"}),
    # administration (viewer_api.ui.admin_pages, admin_ops_pages): changes are for an archive-wide administrator
    ("GET", "/ui/admin"): Page(Capability.ADMIN, None, NO_API),
    ("GET", "/ui/admin/health"): Page(Capability.ADMIN, None, NO_API),
    ("GET", "/ui/admin/aes"): Page(Capability.ADMIN, None, NO_API),
    ("POST", "/ui/admin/aes"): Page(Capability.ADMIN, None, NO_API, archive_wide=True, values={
        "title": "NEW_AE", "host": "127.0.0.1", "port": "104", "allow_store": "true", "check_host": "true"}),
    ("GET", "/ui/admin/aes/edit"): Page(Capability.ADMIN, None, NO_API, values={"title": "PEER_A"}),
    ("POST", "/ui/admin/aes/identity"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                             values={"title": "PEER_A", "tls_subject": "CN=peer"}),
    ("GET", "/ui/admin/aes/remove"): Page(Capability.ADMIN, None, NO_API, values={"title": "PEER_A"}),
    ("POST", "/ui/admin/aes/remove"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                           values={"title": "PEER_A"}),
    ("GET", "/ui/admin/users"): Page(Capability.ADMIN, None, NO_API, archive_wide=True),
    ("POST", "/ui/admin/users"): Page(Capability.ADMIN, None, NO_API, archive_wide=True, values={
        "username": "new_user", "role": "clinician", "facility": B, "generate": "true"}),
    ("POST", "/ui/admin/users/active"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                             values={"username": "rad_a", "active": "false"}),
    ("GET", "/ui/admin/users/password"): Page(Capability.ADMIN, None, NO_API, values={"username": "rad_a"}),
    ("POST", "/ui/admin/users/password"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                               values={"username": "rad_a", "generate": "true"}),
    ("GET", "/ui/admin/tokens"): Page(Capability.ADMIN, None, NO_API, archive_wide=True),
    ("POST", "/ui/admin/tokens"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                       values={"name": "new-token", "role": "emr", "days": "1"}),
    ("POST", "/ui/admin/tokens/revoke"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                              values={"token_id": "{token_id}"}),
    ("GET", "/ui/admin/storage"): Page(Capability.ADMIN, None, NO_API),
    ("GET", "/ui/admin/retention"): Page(Capability.ADMIN, "GET /api/retention/due"),
    ("GET", "/ui/admin/forwarding"): Page(Capability.ADMIN, None, NO_API),
    ("POST", "/ui/admin/forwarding/rules"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                                 values={"name": "all-to-peer", "destination_ae": "PEER_ALL"}),
    ("POST", "/ui/admin/forwarding/rules/remove"): Page(Capability.ADMIN, None, NO_API, archive_wide=True,
                                                        values={"name": "rule-a"}),
    ("POST", "/ui/admin/forwarding/retry"): Page(Capability.ADMIN, None, NO_API, archive_wide=True),
    ("GET", "/ui/admin/tasks"): Page(Capability.ADMIN, None, NO_API),
    ("POST", "/ui/admin/tasks/retry"): Page(Capability.ADMIN, None, NO_API, archive_wide=True),
    ("GET", "/ui/admin/audit"): Page(Capability.AUDIT_READ, "GET /api/audit"),
    ("POST", "/ui/admin/audit/verify"): Page(Capability.AUDIT_READ, "GET /api/audit/verify", archive_wide=True),
}


# -- the world ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    key: str
    role: Role | None  # None: no session
    facility: str
    cookie: str = ""  # the pacs_session cookie's value
    csrf: str = ""  # this session's CSRF token (read from a page, as the browser's forms carry it)

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset() if self.role is None else capabilities_of(self.role)

    @property
    def has_pages(self) -> bool:
        return self.role in PAGE_ROLES


@dataclass
class World:
    ctx: AppContext
    app: FastAPI
    client: TestClient
    ids: dict[str, str]  # path parameter → HOSP-A's value (study, series, sop, consult_id, …)
    b_study: str
    subjects: dict[str, Subject]
    tables: MetaData
    openapi: dict[str, Any]


# key → (user name, role, facility); the EMR account has no pages (its session is refused everywhere)
ACCOUNTS = {
    "radiologist_a": ("rad_a", Role.RADIOLOGIST, A), "technologist_a": ("tech_a", Role.TECHNOLOGIST, A),
    "clinician_a": ("clin_a", Role.CLINICIAN, A), "admin_a": ("admin_a", Role.ADMIN, A),
    "radiologist_b": ("rad_b", Role.RADIOLOGIST, B), "technologist_b": ("tech_b", Role.TECHNOLOGIST, B),
    "clinician_b": ("clin_b", Role.CLINICIAN, B), "admin_b": ("admin_b", Role.ADMIN, B),
    "archive_admin": ("archive_admin", Role.ADMIN, ""), "emr": ("emr_gateway", Role.EMR, ""),
}


def _ingest(ctx: AppContext, facility: str, study: str, series: str, patient_id: str, name: str, accession: str,
            images: int) -> list[str]:
    ingestor = Ingestor(ctx.sessions, ctx.store)
    sops = []
    for i in range(images):
        pixels = (np.add.outer(np.arange(32), np.arange(32)) * (i + 3) % 4096).astype(np.uint16)
        ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=generate_uid(),
                          PatientID=patient_id, PatientName=name, PatientBirthDate="19700101", Modality="CT",
                          SOPClassUID=CT, InstanceNumber=i + 1, StudyDate=f"{date.today():%Y%m%d}",
                          AccessionNumber=accession, StudyDescription="CT ngực", Rows=32, Columns=32,
                          BitsAllocated=16, BitsStored=12, HighBit=11, PixelData=pixels.tobytes())
        ds.file_meta.MediaStorageSOPClassUID = CT
        outcome = ingestor.ingest(to_bytes(ds), IngestSource("import", facility=facility))
        assert outcome.ok, outcome.message
        sops.append(str(ds.SOPInstanceUID))
    return sops


def _principal(name: str, role: Role, facility: str) -> Principal:
    return Principal(name, role, capabilities_of(role), scope_for(role, facility), facility=facility)


def _populate(ctx: AppContext) -> tuple[dict[str, str], str]:
    """HOSP-A's study (ordered today, two CT images, a signed report, a consult asked of HOSP-C) and HOSP-B's,
    two registered peers, a forwarding rule, and the accounts of :data:`ACCOUNTS`."""
    ids: dict[str, str] = {}
    with ctx.sessions() as session, session.begin():
        for accession, patient_id, name, facility in ((A_ACCESSION, A_ID, A_NAME, A),
                                                      (B_ACCESSION, B_ID, B_NAME, B)):
            order = create_order(session, NewOrder(
                patient_id=patient_id, patient_name=name, modality="CT", station_ae_title="", start_date="",
                start_time="", procedure_description="CT ngực", accession_number=accession, facility=facility,
                source="api"))
            ids[facility] = order.study_instance_uid
    a_study, b_study = ids.pop(A), ids.pop(B)
    series = generate_uid()
    sops = _ingest(ctx, A, a_study, series, A_ID, A_NAME, A_ACCESSION, 2)
    b_series = generate_uid()
    b_sops = _ingest(ctx, B, b_study, b_series, B_ID, B_NAME, B_ACCESSION, 1)
    report_subjects = {}
    for study, facility in ((a_study, A), (b_study, B)):
        radiologist = _principal(f"rad-{facility}", Role.RADIOLOGIST, facility)
        with ctx.sessions() as session, session.begin():
            view = lifecycle.create_draft(session, radiologist, study, "Phổi sáng.", "Bình thường.", "vi")
            lifecycle.sign(session, radiologist, view.id)
            report_subjects[facility] = lifecycle.version_subject(view.id, 1)
    # derived work that failed, of each kind of subject and each facility: an instance's thumbnail, a series
    # document, a report version's SR (its subject "{report id}.{version}", not a UID of the study)
    failed = [(INSTANCE_DERIVED_KIND, sops[1]), (SERIES_METADATA_KIND, series), (INSTANCE_DERIVED_KIND, b_sops[0]),
              (SERIES_METADATA_KIND, b_series), (lifecycle.REPORT_SR_KIND, report_subjects[A]),
              (lifecycle.REPORT_SR_KIND, report_subjects[B])]
    _fail_tasks(ctx, failed)  # the tasks ingest and signing armed
    consult = consults.request_consult(ctx, _principal("rad_a", Role.RADIOLOGIST, A), a_study,
                                       question="Nốt mờ thuỳ trên?", to_facility=C)
    register_ae(ctx, "PEER_A", "127.0.0.1", 11112, facility=A, query=False, retrieve=False)
    register_ae(ctx, "PEER_ALL", "127.0.0.1", 11113, archive_wide=True, query=False, retrieve=False)
    digest = hash_password(PASSWORD)  # one argon2 hash for every account
    with ctx.sessions() as session, session.begin():
        for username, role, facility in ACCOUNTS.values():
            session.add(User(username=username, password_hash=digest, role=role.value, facility=facility,
                             full_name="", active=True))
        patient = create_token(session, "patient-a", Role.PATIENT, days=1, facility=A, patient_id=A_ID,
                               images=True)
    ids.update(study=a_study, series=series, sop=sops[0], failed_sop=sops[1], b_failed_sop=b_sops[0],
               b_series=b_series, a_report_task=report_subjects[A], b_report_task=report_subjects[B],
               consult_id=str(consult.consult.id), token_id=str(patient.id), patient_token=patient.secret)
    return ids, b_study


def _fail_tasks(ctx: AppContext, tasks: list[tuple[str, str]]) -> None:
    """These (kind, subject) derived tasks failed: the row ingest or signing armed, or a new one where a test of
    the matrix (a rejection of HOSP-B's own study) cancelled it since."""
    with ctx.sessions() as session, session.begin():
        for kind, subject in tasks:
            done = session.execute(update(DerivedTask).where(DerivedTask.kind == kind,
                                                             DerivedTask.subject_uid == subject)
                                   .values(state="failed", attempts=3, last_error="gave up"))
            if not done.rowcount:
                session.add(DerivedTask(kind=kind, subject_uid=subject, state="failed", attempts=3,
                                        last_error="gave up"))


CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)"')


def _csrf_of(client: TestClient, cookie: str) -> str:
    client.cookies.clear()
    client.cookies.set("pacs_session", cookie)
    page = client.get("/ui", headers={"Accept": "text/html"})
    found = CSRF_META.search(page.text)
    assert found and found.group(1), page.text[:500]
    return found.group(1)


def _subjects(ctx: AppContext, app: FastAPI, client: TestClient, patient_token: str) -> dict[str, Subject]:
    subjects = {"anonymous": Subject("anonymous", None, "")}
    with ctx.sessions() as session:
        for key, (username, role, facility) in ACCOUNTS.items():
            user = session.scalars(select(User).where(User.username == username)).one()
            token, _ttl = app.state.authenticator.issue_session_token(user)  # as POST /login issues it
            subjects[key] = Subject(key, role, facility, token)
    subjects["patient"] = Subject("patient", Role.PATIENT, A, patient_token)  # an API token put in the cookie
    return {k: s if s.role is None else Subject(s.key, s.role, s.facility, s.cookie, _csrf_of(client, s.cookie))
            for k, s in subjects.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root: Path = tmp_path_factory.mktemp("ui-matrix")
    ctx = AppContext.create(Settings(data_dir=root / "data",
                                     facility_names={A: "Bệnh viện A", B: "Bệnh viện B", C: "Bệnh viện C"}))
    try:
        migrate.upgrade(ctx.engine)
        ids, b_study = _populate(ctx)
        app = create_app(ctx)
        with TestClient(app, client=("10.16.0.4", 50000), follow_redirects=False,
                        headers={"Accept-Language": "en"}) as client:
            subjects = _subjects(ctx, app, client, ids.pop("patient_token"))
            tables = MetaData()
            tables.reflect(ctx.engine)
            yield World(ctx, app, client, ids, b_study, subjects, tables, app.openapi())
    finally:
        ctx.close()


# -- the routes ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UiRoute:
    method: str
    path: str
    declared: tuple[Capability | None, ...]  # the capabilities of its require_page dependencies (none: no session)
    page: Page | None


def _declared(dependant: Any) -> list[Capability | None]:
    """The capabilities of the :func:`require_page` dependencies of a route, however deep."""
    found: list[Capability | None] = []
    for sub in dependant.dependencies:
        call = sub.call
        if call is not None and getattr(call, "__qualname__", "").startswith("require_page."):
            found.append(inspect.getclosurevars(call).nonlocals["capability"])
        found += _declared(sub)
    return found


def ui_routes(app: FastAPI) -> list[UiRoute]:
    """Every route of the app whose path starts with ``/ui``, one per method."""
    routes = []
    for context in iter_route_contexts(app.routes):
        path = context.path or ""
        if not path.startswith("/ui"):
            continue
        dependant = getattr(context, "dependant", None)
        declared = tuple(_declared(dependant)) if dependant is not None else ()
        for method in sorted((context.methods or set()) - {"HEAD"}):
            routes.append(UiRoute(method, path, declared, PAGES.get((method, path))))
    return routes


def _fill(template: str, world: World) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in world.ids, f"{template}: no value for {{{name}}}: add it to the world (ids)"
        return world.ids[name]
    return re.sub(r"\{([^}/]+)\}", value, template)


def _url(route: UiRoute, world: World) -> str:
    assert route.page is not None
    url = _fill(route.path.replace("{name}", route.page.values.get("name", "{name}")), world)
    if route.method == "GET" and route.page.values and "{name}" not in route.path:
        url += "?" + "&".join(f"{k}={_fill(str(v), world)}" for k, v in route.page.values.items())
    return url


def _roles_with(capability: Capability | None) -> frozenset[Role]:
    return frozenset(r for r in PAGE_ROLES if capability is None or capability in ROLE_CAPABILITIES[r])


def _api_capability(openapi: dict[str, Any], operation: str) -> Capability | None:
    method, path = operation.split(" ", 1)
    op = openapi["paths"][path][method.lower()]
    for requirement in op.get("security") or []:
        if "bearer" in requirement:
            return Capability(requirement["bearer"][0]) if requirement["bearer"] else None
    raise AssertionError(f"{operation} has no bearer requirement")


def test_every_ui_route_is_classified_and_declares_the_api_capability(world: World) -> None:
    routes = ui_routes(world.app)
    missing = [f"{r.method} {r.path} (declares {r.declared})" for r in routes if r.page is None]
    assert not missing, "web page routes not classified in PAGES (say what each needs):\n" + "\n".join(missing)
    stale = sorted(set(PAGES) - {(r.method, r.path) for r in routes})
    assert not stale, f"PAGES lists routes the app does not have: {stale}"
    problems = []
    for route in routes:
        page = route.page
        assert page is not None
        if page.public:
            if route.declared:
                problems.append(f"{route.method} {route.path}: listed public but needs a session")
            continue
        if list(route.declared) != [page.capability]:
            problems.append(f"{route.method} {route.path}: declares {route.declared}, PAGES says {page.capability}")
        if page.api is None:
            assert page.why, f"{route.method} {route.path}: no API counterpart and no reason"
            continue
        api = _api_capability(world.openapi, page.api)
        if _roles_with(api) != _roles_with(page.capability):
            problems.append(f"{route.method} {route.path} admits {sorted(_roles_with(page.capability))}, "
                            f"{page.api} ({api}) admits {sorted(_roles_with(api))}")
    assert not problems, "\n".join(problems)
    assert len(routes) >= 60  # a broken enumeration (e.g. a FastAPI change of app.routes) finds few


# -- requests -----------------------------------------------------------------------------------------------------


def _send(world: World, method: str, url: str, subject: Subject, *, csrf: str | None = None,
          values: dict[str, Any] | None = None, body: str = "form", headers: dict[str, str] | None = None,
          accept: str = "text/html,*/*;q=0.8") -> Response:
    """One request standing alone: only ``subject``'s session cookie goes with it."""
    client = world.client
    client.cookies.clear()
    if subject.cookie:
        client.cookies.set("pacs_session", subject.cookie)
    sent = {"Accept": accept, **(headers or {})}
    filled = {k: _fill(str(v), world) for k, v in (values or {}).items()}
    if method == "GET":
        return client.get(url, headers=sent)
    if body == "json":
        if csrf:
            sent["X-CSRF-Token"] = csrf
        return client.request(method, url, json=filled, headers=sent)
    if body == "multipart":
        if csrf:
            sent["X-CSRF-Token"] = csrf
        return client.request(method, url, files={"files": ("x.dcm", b"not dicom", "application/dicom")},
                              headers=sent)
    if csrf:
        filled["csrf"] = csrf
    return client.request(method, url, data=filled, headers=sent)


def _leaks(response: Response, *, uid: str = "", typed: str = "", more: tuple[str, ...] = ()) -> list[str]:
    """HOSP-A's patient's markers in the answer (but one the user typed in the URL: a search form shows it)."""
    body = response.content.decode("utf-8", "replace")
    markers = [A_SHOWN, A_ID, A_ACCESSION, *([uid] if uid else []), *more]
    return [m for m in markers if m in body and m not in typed]


def _a_uids(world: World, route: UiRoute) -> tuple[str, ...]:
    """HOSP-A's series and instance UIDs, for the pages whose URL names none (lists, administration)."""
    return () if "{" in route.path else (world.ids["series"], world.ids["sop"], world.ids["failed_sop"])


def _shows_a(response: Response, world: World) -> bool:
    """The answer is HOSP-A's object itself: a page naming the patient (or the study, for the viewer's hand-off),
    a JPEG, a zip, or JSON."""
    kind = response.headers.get("content-type", "")
    if kind.startswith("text/html"):
        return A_SHOWN in response.text or world.ids["study"] in response.text
    return (kind == "image/jpeg" and response.content[:2] == b"\xff\xd8") or \
        (kind == "application/zip" and response.content[:2] == b"PK") or kind == "application/json"


def _refusal(page: Page, subject: Subject, no_session: int) -> int | None:
    """The status a page's rules give ``subject`` (``no_session`` without a session), or None: admitted."""
    if subject.role is None:
        return no_session
    if not subject.has_pages or (page.capability is not None and page.capability not in subject.capabilities):
        return 403
    if page.archive_wide and subject.facility:
        return 403
    if page.target and subject.facility == B:
        return 404
    return None


def _expected_get(page: Page, subject: Subject) -> int:
    if page.public:
        return 200
    refused = _refusal(page, subject, no_session=303)
    return page.ok if refused is None else refused


def test_get_matrix(world: World) -> None:
    """Every GET page × every subject: the status its role, capability and facility call for; no session → the
    sign-in page with ``next`` (401 for a JSON caller); nothing of HOSP-A's patient in any answer to HOSP-B."""
    started = time.perf_counter()
    routes = [r for r in ui_routes(world.app) if r.method == "GET"]
    failures: list[str] = []
    checked = 0
    for route in routes:
        assert route.page is not None
        url = _url(route, world)
        for subject in world.subjects.values():
            response = _send(world, "GET", url, subject)
            checked += 1
            want = _expected_get(route.page, subject)
            if response.status_code != want:
                failures.append(f"{subject.key:15} GET {url} -> {response.status_code}, expected {want}: "
                                f"{response.text[:160]!r}")
                continue
            if want == 303:
                location = urlsplit(response.headers["location"])
                if location.path != "/login" or parse_qs(location.query).get("next") != [url]:
                    failures.append(f"anonymous GET {url} -> {response.headers['location']}")
                answer = _send(world, "GET", url, subject, accept="application/json")
                checked += 1
                if answer.status_code != 401:
                    failures.append(f"anonymous JSON GET {url} -> {answer.status_code}, expected 401")
            if want == 403 and route.page.capability is not None and ROLE_REFUSED not in response.text \
                    and "may not" not in response.text:
                failures.append(f"{subject.key:15} GET {url} -> 403 without the refusal page: {response.text[:160]!r}")
            if want == 200 and route.page.target and not _shows_a(response, world):
                failures.append(f"{subject.key:15} GET {url} -> 200 but not HOSP-A's {route.page.target}: "
                                f"{response.headers.get('content-type')} {response.content[:120]!r}")
            if subject.facility == B and (leaked := _leaks(response, uid="" if "{" in route.path else
                                                           world.ids["study"], more=_a_uids(world, route))):
                failures.append(f"{subject.key:15} GET {url} -> {response.status_code} shows {leaked}")
    print(f"GET matrix: {len(routes)} routes x {len(world.subjects)} subjects = {checked} requests "
          f"in {time.perf_counter() - started:.2f} s")
    assert not failures, "\n".join(failures)


def _fingerprint(world: World) -> dict[str, str]:
    """A digest of every table of the index but the audit trail (refusals are audited; nothing else may change)
    and the API tokens' last use (a patient token in the cookie is looked up, and its use recorded)."""
    digests = {}
    with world.ctx.engine.connect() as connection:
        for name, table in sorted(world.tables.tables.items()):
            if name == AuditEvent.__tablename__:
                continue
            columns = [c for c in table.columns if c.name != "last_used_at"]
            rows = sorted(repr(tuple(row)) for row in connection.execute(select(*columns)))
            digests[name] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return digests


def _refused_to(world: World, response: Response, subject: Subject, page: Page) -> str:
    """Where a refusal sent the browser back to (with its flash cookie): '' when that page is a 404 or shows the
    refusal ``page.refused_to``, else what it shows."""
    location = response.headers.get("location", "")
    client = world.client
    client.cookies.clear()
    client.cookies.set("pacs_session", subject.cookie)
    if flash := response.cookies.get("pacs_flash"):
        client.cookies.set("pacs_flash", flash)
    landed = client.get(location, headers={"Accept": "text/html"})
    if landed.status_code == 404 or (page.refused_to and page.refused_to in landed.text):
        return ""
    return f"{location} -> {landed.status_code} {landed.text[:200]!r}"


def _expected_post(page: Page, subject: Subject) -> int | None:
    """The status for ``subject`` with a valid CSRF token; None: the request would act (not sent)."""
    return _refusal(page, subject, no_session=401)


def test_post_matrix(world: World) -> None:
    """Every state-changing page × every subject: without a valid CSRF token 403 (whoever asks); with one, 401
    without a session, 403 without the capability (or a configuration change by an administrator of one
    facility), 404 for HOSP-B on HOSP-A's study or consult. Afterwards every table but the audit trail holds what
    it held before."""
    started = time.perf_counter()
    routes = [r for r in ui_routes(world.app) if r.method != "GET"]
    before = _fingerprint(world)
    failures: list[str] = []
    checked = 0
    admin = world.subjects["archive_admin"]
    other_session = world.subjects["radiologist_b"].csrf
    # a visitor's token before sign-in (the sign-in form's): valid CSRF, no session
    world.client.cookies.clear()
    login = world.client.get("/login")
    nonce, visitor_csrf = login.cookies.get("pacs_login_nonce"), CSRF_META.search(login.text)
    assert nonce and visitor_csrf
    for route in routes:
        page = route.page
        assert page is not None
        url = _url(route, world)
        # 1. no valid CSRF token: refused before anything else, for the archive-wide administrator too
        for label, token, headers in (("no token", None, {}), ("forged token", "forged-" + admin.csrf[7:], {}),
                                      ("another session's token", other_session, {}),
                                      ("another site", admin.csrf, {"Origin": "https://evil.example"})):
            response = _send(world, route.method, url, admin, csrf=token, values=page.values, body=page.body,
                             headers=headers)
            checked += 1
            if response.status_code != 403 or CSRF_REFUSED not in response.text:
                failures.append(f"{label}: {route.method} {url} -> {response.status_code} {response.text[:160]!r}")
        # 2. a valid token: the session, the role, the facility decide
        for subject in world.subjects.values():
            want = _expected_post(page, subject)
            if want is None:
                continue
            if subject.role is None:
                world.client.cookies.clear()
                world.client.cookies.set("pacs_login_nonce", nonce)
                token = visitor_csrf.group(1)
            else:
                token = subject.csrf
            if subject.role is None:
                response = _send_keeping_cookies(world, route, url, token)
            else:
                response = _send(world, route.method, url, subject, csrf=token, values=page.values, body=page.body)
            checked += 1
            status = response.status_code
            if want == 404 and status == 303 and page.refused_to:
                if why := _refused_to(world, response, subject, page):
                    failures.append(f"{subject.key:15} {route.method} {url} -> 303 to {why}")
            elif status != want:
                failures.append(f"{subject.key:15} {route.method} {url} -> {status}, expected {want}: "
                                f"{response.text[:160]!r}")
            elif want == 403 and CSRF_REFUSED in response.text:
                failures.append(f"{subject.key:15} {route.method} {url} -> 403 for CSRF with a valid token")
            if subject.facility == B and (leaked := _leaks(response)):
                failures.append(f"{subject.key:15} {route.method} {url} -> {status} shows {leaked}")
    after = _fingerprint(world)
    changed = sorted(name for name in before if before[name] != after.get(name))
    print(f"POST/PUT matrix: {len(routes)} routes, {checked} requests in {time.perf_counter() - started:.2f} s")
    assert not failures, "\n".join(failures)
    assert not changed, f"refused requests changed tables: {changed}"


def _send_keeping_cookies(world: World, route: UiRoute, url: str, token: str) -> Response:
    """A visitor's request: its login-nonce cookie (set by the caller) and the sign-in form's token."""
    assert route.page is not None
    values = {k: _fill(str(v), world) for k, v in route.page.values.items()}
    headers = {"Accept": "text/html,*/*;q=0.8"}
    if route.page.body == "form":
        return world.client.request(route.method, url, data={**values, "csrf": token}, headers=headers)
    headers["X-CSRF-Token"] = token
    if route.page.body == "json":
        return world.client.request(route.method, url, json=values, headers=headers)
    return world.client.request(route.method, url, files={"files": ("x.dcm", b"x", "application/dicom")},
                                headers=headers)


def test_radiologist_of_b_cannot_open_a_study_page_by_url(world: World) -> None:
    """The issue's case, literally: HOSP-B's radiologist signs in through the sign-in form, aiming at HOSP-A's
    study page; the form sends them there and the page is a 404 that names nothing of it (the refusal audited).
    The same radiologist opens HOSP-B's study, and HOSP-A's radiologist HOSP-A's: the 404 is the facility rule."""
    a_study = world.ids["study"]
    client = world.client
    client.cookies.clear()
    form = client.get(f"/login?next=/ui/studies/{a_study}")
    token = CSRF_META.search(form.text)
    assert form.status_code == 200 and token
    signed_in = client.post("/login", data={"username": "rad_b", "password": PASSWORD, "csrf": token.group(1),
                                            "next": f"/ui/studies/{a_study}"})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == f"/ui/studies/{a_study}"
    session = signed_in.cookies.get("pacs_session")
    assert session
    client.cookies.clear()
    client.cookies.set("pacs_session", session)
    refused = client.get(f"/ui/studies/{a_study}", headers={"Accept": "text/html"})
    assert refused.status_code == 404 and "Page not found" in refused.text, refused.text[:500]
    assert not _leaks(refused) and "text/html" in refused.headers["content-type"]
    for path in (f"/ui/patients/{a_study}", f"/ui/reading/{a_study}", f"/ui/viewer/{a_study}",
                 f"/ui/studies/{a_study}/thumbnail.jpg"):
        other = client.get(path, headers={"Accept": "text/html,*/*;q=0.8"})
        assert other.status_code == 404 and not _leaks(other), (path, other.status_code)
    with world.ctx.sessions() as db:
        denied = db.scalars(select(AuditEvent).where(AuditEvent.actor == "rad_b", AuditEvent.outcome == "failure",
                                                     AuditEvent.study_instance_uid == a_study)).all()
    assert any(e.action == "study.view" for e in denied), [(e.action, e.detail) for e in denied]

    own = client.get(f"/ui/studies/{world.b_study}", headers={"Accept": "text/html"})
    assert own.status_code == 200 and "Bravo" in own.text and B_ID in own.text
    theirs = _send(world, "GET", f"/ui/studies/{a_study}", world.subjects["radiologist_a"])
    assert theirs.status_code == 200 and A_SHOWN in theirs.text and A_ID in theirs.text


def test_hosp_b_searches_never_find_hosp_a(world: World) -> None:
    """The lists by every filter that names HOSP-A's patient: nothing of it for HOSP-B's users, while their own
    study and order are there and HOSP-A's users find HOSP-A's (the searches are not empty by construction)."""
    searches = [f"/ui/studies?name={A_SHOWN}", f"/ui/studies?patient_id={A_ID}",
                f"/ui/studies?accession={A_ACCESSION}", f"/ui/studies?facility={A}", "/ui/studies?name=*",
                f"/ui/worklist?date={date.today():%Y-%m-%d}", f"/ui/worklist/table?date={date.today():%Y%m%d}",
                "/ui/consults?box=sent", "/ui/consults?box=inbox", "/ui/reading?assigned="]
    failures = []
    for key in ("radiologist_b", "technologist_b", "clinician_b", "admin_b"):
        subject = world.subjects[key]
        for url in searches:
            response = _send(world, "GET", url, subject)
            leaked = _leaks(response, uid=world.ids["study"], typed=url)
            if response.status_code not in (200, 403) or leaked:  # 403: a role without that list
                failures.append(f"{key} GET {url} -> {response.status_code} {leaked}")
        counted = _send(world, "GET", f"/ui/studies/updates?since=0&facility={A}", subject, accept="application/json")
        if counted.status_code != 200 or counted.json()["new"] != 0:
            failures.append(f"{key} counts HOSP-A's studies: {counted.text}")
        own = _send(world, "GET", "/ui/studies", subject)
        if B_ID not in own.text:
            failures.append(f"{key}: its own study is not on /ui/studies")
    assert not failures, "\n".join(failures)
    for key in ("technologist_a", "clinician_a"):
        found = _send(world, "GET", f"/ui/studies?patient_id={A_ID}", world.subjects[key])
        assert found.status_code == 200 and A_SHOWN in found.text, key
    worklist = _send(world, "GET", "/ui/worklist", world.subjects["technologist_a"])
    assert A_ACCESSION in worklist.text and B_ACCESSION not in worklist.text
    counted = _send(world, "GET", f"/ui/studies/updates?since=0&facility={A}", world.subjects["clinician_a"],
                    accept="application/json")
    assert counted.json()["new"] >= 1


def test_the_refused_requests_act_on_the_users_own_study(world: World) -> None:
    """The POSTs refused to HOSP-B on HOSP-A's study, sent by the same users with the same values to HOSP-B's own
    study, are not refused: the 404s above are the facility rule, not a bad form. (Deletion is left out: it
    would take HOSP-B's study from the module.)"""
    failures = []
    sent = 0
    for route in ui_routes(world.app):
        page = route.page
        assert page is not None
        if route.method == "GET" or page.target != "study" or "{sop}" in str(page.values) \
                or route.path.endswith("/delete"):
            continue
        subject = next(s for s in world.subjects.values() if s.facility == B and page.capability in s.capabilities
                       and not (page.archive_wide and s.facility))
        url = re.sub(r"\{study\}", world.b_study, route.path)
        values = {k: str(v).replace("{study}", world.b_study) for k, v in page.values.items()}
        response = _send(world, route.method, url, subject, csrf=subject.csrf, values=values, body=page.body)
        status = response.status_code
        if status in (401, 403, 404) or status >= 500:
            failures.append(f"{subject.key} {route.method} {url} -> {status} {response.text[:200]!r}")
        elif status == 303 and page.refused_to and not _refused_to(world, response, subject, page):
            failures.append(f"{subject.key} {route.method} {url} -> 303 to a refusal")
        sent += 1
    assert not failures, "\n".join(failures)
    assert sent >= 12, sent


def test_failed_tasks_page_shows_each_facility_its_own(world: World) -> None:
    """The failed derived work names instances: an administrator of one facility sees its own facility's, the
    archive-wide administrator every one (found by this matrix: the page listed every facility's)."""
    ids = world.ids
    _fail_tasks(world.ctx, [(INSTANCE_DERIVED_KIND, ids["failed_sop"]), (SERIES_METADATA_KIND, ids["series"]),
                            (INSTANCE_DERIVED_KIND, ids["b_failed_sop"]), (SERIES_METADATA_KIND, ids["b_series"]),
                            (lifecycle.REPORT_SR_KIND, ids["a_report_task"]),
                            (lifecycle.REPORT_SR_KIND, ids["b_report_task"])])
    a_tasks = (ids["failed_sop"], ids["series"], f">{ids['a_report_task']}<")  # thumbnail, series document, SR
    b_tasks = (ids["b_failed_sop"], ids["b_series"], f">{ids['b_report_task']}<")
    for key, own, other in (("admin_a", a_tasks, b_tasks), ("admin_b", b_tasks, a_tasks)):
        page = _send(world, "GET", "/ui/admin/tasks", world.subjects[key])
        assert page.status_code == 200 and "Retry task" not in page.text, key  # retrying is archive-wide only
        assert all(s in page.text for s in own) and not any(s in page.text for s in other), (
            key, [s for s in own if s not in page.text], [s for s in other if s in page.text])
    page = _send(world, "GET", "/ui/admin/tasks", world.subjects["archive_admin"])
    assert all(s in page.text for s in a_tasks + b_tasks) and "Retry task" in page.text


def test_pages_refuse_hosp_b_exactly_where_the_api_does(world: World) -> None:
    """For each page naming HOSP-A's study or consult whose API counterpart is a GET of the same object: the page
    and the API (with the same session, as a bearer token) both answer 404 to HOSP-B and 200 to HOSP-A."""
    failures, compared = [], 0
    for route in ui_routes(world.app):
        page = route.page
        assert page is not None
        if not page.target or page.api is None or not page.api.startswith("GET ") or "{" not in page.api:
            continue
        api_url = _fill(page.api.split(" ", 1)[1], world)
        for facility, want in ((A, 200), (B, 404)):
            subject = next(s for s in world.subjects.values() if s.facility == facility and s.has_pages
                           and page.capability in s.capabilities)
            page_status = _send(world, route.method, _url(route, world), subject, csrf=subject.csrf,
                                values=page.values, body=page.body).status_code
            world.client.cookies.clear()
            api_status = world.client.get(api_url, headers={"Authorization": f"Bearer {subject.cookie}",
                                                            "Accept": "*/*"}).status_code
            compared += 1
            if (page_status, api_status) != (want, want):
                failures.append(f"{subject.key}: {route.method} {route.path} -> {page_status}, "
                                f"{page.api} -> {api_status}; expected {want} from both")
    assert not failures, "\n".join(failures)
    assert compared >= 10, compared
