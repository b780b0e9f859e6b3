"""Every HTTP route × every role, generated from the live server's OpenAPI document (issue 3 must-show 1).

Each operation declares the capability it needs as the scope of the ``bearer`` security scheme
(viewer_api.security.require). A route added tomorrow is covered the day it is added: it is
either secured (and then checked here for every role) or listed in PUBLIC below, with the reason.
Scope checks: a user of another facility and a patient token never reach data outside their
scope, whichever route, UID or wildcard they try.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs.security.roles import ROLE_CAPABILITIES, Capability, Role, capabilities_of
from tests.support.datasets import make_dataset
from tests.support.inprocess import register_ae
from tests.support.senders import send_dataset
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

# Operations without a token, and why each holds no patient data.
PUBLIC_EXACT = {
    ("get", "/health"),  # readiness: the index and the store reachable (the older name of /health/ready)
    ("get", "/health/live"),  # the process answers
    ("get", "/health/ready"),  # the index, the store and the broker reachable; names the failed check
    # counters and queue depths, no patient data: PACS_METRICS_ALLOW peers (the test's loopback), or a token
    # with ops.metrics (tests/test_metrics_health.py checks the refusal)
    ("get", "/metrics"),
    ("post", "/api/auth/login"),  # takes a password, returns a token
    # an outside doctor's consult page and its answer form: the share link's token is the key (open_link)
    ("get", "/s/{token}/consult"),
    ("post", "/s/{token}/consult"),
    # share links (pacs.sharing): the unguessable token in the path is the credential; each open is checked
    # (expiry, revocation, birth date, per-address throttle) and audited by open_link
    ("get", "/s/{token}"),
    ("post", "/s/{token}"),  # the birth-date form
    ("get", "/s/{token}/report.pdf"),
    ("get", "/s/{token}/images/{n}.jpg"),
    ("get", "/s/{token}/viewer"),  # scope "study": a viewer session for that one study
    ("get", "/share-static/{name}"),  # the share pages' stylesheet and script: no data
}
PUBLIC_PREFIXES = (
    "/ohif",  # the viewer's static files; every data request it makes carries the token
    "/viewer/",  # the EMR's per-study viewer URL: a redirect to /ohif with the UID the EMR already has
)


@dataclass(frozen=True)
class Subject:
    name: str
    token: str | None
    role: Role | None
    capabilities: frozenset[Capability]


@dataclass(frozen=True)
class StudyRef:
    patient_id: str
    patient_name: str
    study: str
    series: str
    sop: str


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPacs]:
    server = EmbeddedPacs(tmp_path_factory.mktemp("matrix"))
    try:
        yield server
    finally:
        server.close()


def _send_study(pacs: EmbeddedPacs, aet: str, facility: str, patient_id: str, name: str) -> StudyRef:
    register_ae(pacs.ctx, aet, "127.0.0.1", 104, facility=facility)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop, PatientID=patient_id,
                      PatientName=name, Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    status = send_dataset(pacs.port, ds, ExplicitVRLittleEndian, aet=aet)
    assert status.status == 0, status
    return StudyRef(patient_id, name, study, series, sop)


@pytest.fixture(scope="module")
def world(pacs: EmbeddedPacs) -> dict[str, object]:
    a = _send_study(pacs, "MODA", "HOSP-A", "PAT-A-1", "ALPHA^ANNA")
    b = _send_study(pacs, "MODB", "HOSP-B", "PAT-B-1", "BRAVO^BINH")
    subjects = [Subject("anonymous", None, None, frozenset())]
    for role in Role:
        if role is Role.PATIENT:
            continue
        facility = "" if role is Role.ADMIN else "HOSP-A"
        subjects.append(Subject(role.value, pacs.token(role.value, facility=facility), role,
                                ROLE_CAPABILITIES[role]))
    subjects.append(Subject("patient", pacs.token("patient", name="patient-a", facility="HOSP-A",
                                                  patient_id="PAT-A-1"), Role.PATIENT, capabilities_of(Role.PATIENT)))
    subjects.append(Subject("patient+images", pacs.token("patient", name="patient-a-img", facility="HOSP-A",
                                                         patient_id="PAT-A-1", images=True),
                            Role.PATIENT, capabilities_of(Role.PATIENT, images_granted=True)))
    openapi = httpx.get(f"{pacs.http_url}/openapi.json", timeout=30).json()
    return {"a": a, "b": b, "subjects": subjects, "openapi": openapi,
            "other_facility": pacs.token("radiologist", name="radiologist-b", facility="HOSP-B")}


def _operations(openapi: dict) -> list[tuple[str, str, dict]]:
    ops = []
    for path, methods in openapi["paths"].items():
        for method, op in methods.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method, path, op))
    return ops


def _required_capability(op: dict) -> tuple[bool, Capability | None]:
    """(secured, capability) from the operation's security requirement."""
    for requirement in op.get("security") or []:
        if "bearer" in requirement:
            scopes = requirement["bearer"]
            return True, Capability(scopes[0]) if scopes else None
    return False, None


def _fill(path: str, ref: StudyRef) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1).lower()
        if "study" in name:
            return ref.study
        if "series" in name:
            return ref.series
        if "instance" in name or "sop" in name or "object" in name:
            return ref.sop
        if "frame" in name:
            return "1"
        if "tag" in name:
            return "7FE00010"
        return ref.study  # FHIR ids and the like: a study's own identifier is the best guess
    return re.sub(r"\{([^}/]+)\}", value, path)


@pytest.fixture(scope="module")
def http(pacs: EmbeddedPacs) -> Iterator[httpx.Client]:
    """One keep-alive client for the module's thousands of requests (a client per request costs its own TLS
    context and connection: most of this module's CPU time on the test's side)."""
    with httpx.Client(base_url=pacs.http_url, timeout=60) as client:
        yield client


def _call(http: httpx.Client, method: str, url: str, token: str | None, params: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs: dict = {"headers": headers, "params": params}
    if method == "post":
        kwargs["content"] = b"{}"
        headers["Content-Type"] = "application/json"
    http.cookies.clear()  # each call stands alone: nothing a previous answer set goes with it
    return http.request(method.upper(), url, **kwargs)


def test_every_route_is_secured_or_knowingly_public(world: dict) -> None:
    unsecured = [(m, p) for m, p, op in _operations(world["openapi"])
                 if not _required_capability(op)[0]
                 and (m, p) not in PUBLIC_EXACT and not p.startswith(PUBLIC_PREFIXES)]
    assert unsecured == [], f"routes without a bearer requirement and not listed as public: {unsecured}"
    assert len(_operations(world["openapi"])) >= 3


def test_role_by_route_matrix(world: dict, http: httpx.Client) -> None:
    """Each role × each secured route: 401 without a token, 403 without the capability, otherwise
    the route answers (not 401/403, never 500)."""
    a: StudyRef = world["a"]
    failures, checked = [], 0
    for method, path, op in _operations(world["openapi"]):
        secured, capability = _required_capability(op)
        if not secured:
            continue
        url = _fill(path, a)
        for subject in world["subjects"]:
            response = _call(http, method, url, subject.token)
            checked += 1
            if subject.token is None:
                expected_ok = response.status_code == 401
                want = "401"
            elif capability is not None and capability not in subject.capabilities:
                expected_ok = response.status_code == 403
                want = "403"
            else:
                expected_ok = response.status_code not in (401, 403) and response.status_code < 500
                want = "allowed (not 401/403/5xx)"
            if not expected_ok:
                failures.append(f"{subject.name:15} {method.upper()} {path} -> {response.status_code}, "
                                f"expected {want}: {response.text[:120]}")
            if response.status_code in (401, 403):
                assert response.headers["content-type"].startswith("application/json")
                assert set(response.json()) >= {"code", "message"}
    print(f"route matrix: {checked} requests")
    assert not failures, "\n".join(failures)


def _leaks(response: httpx.Response, ref: StudyRef) -> bool:
    body = response.text
    return response.status_code < 300 and (ref.patient_id in body or ref.patient_name.split("^")[0] in body
                                          or ref.study in body)


def test_other_facility_and_patient_tokens_never_see_out_of_scope_data(world: dict, http: httpx.Client) -> None:
    """Radiologist of hospital B vs hospital A's study; patient A's token vs patient B's study: by UID on
    every route, and by search with wildcards and includefield=all."""
    a: StudyRef = world["a"]
    b: StudyRef = world["b"]
    patient_img = next(s for s in world["subjects"] if s.name == "patient+images")
    cases = [("radiologist of B", world["other_facility"], a), ("patient A", patient_img.token, b)]
    failures, checked = [], 0
    for who, token, hidden in cases:
        for method, path, op in _operations(world["openapi"]):
            secured, _ = _required_capability(op)
            if not secured or method != "get":
                continue
            attempts = []
            if "{" in path:
                attempts.append((_fill(path, hidden), None))
            else:
                attempts += [(path, {"PatientName": "*"}), (path, {"includefield": "all"}),
                             (path, {"PatientID": hidden.patient_id}),
                             (path, {"patient.identifier": hidden.patient_id}),
                             (path, {"StudyInstanceUID": hidden.study}), (path, {"studyUID": hidden.study,
                                                                                  "seriesUID": hidden.series,
                                                                                  "objectUID": hidden.sop,
                                                                                  "requestType": "WADO"})]
            for url, params in attempts:
                response = _call(http, method, url, token, params)
                checked += 1
                if _leaks(response, hidden) or response.status_code >= 500:
                    failures.append(f"{who}: GET {url} {params} -> {response.status_code} {response.text[:150]}")
                if "{" in path and response.status_code not in (400, 403, 404, 406):
                    failures.append(f"{who}: GET {url} -> {response.status_code}, expected 404 (or 403)")
    print(f"scope checks: {checked} requests")
    assert not failures, "\n".join(failures)


def test_in_scope_access_works_for_the_same_routes(world: dict, http: httpx.Client) -> None:
    """The scope checks above are not vacuous: the same searches find the in-scope study."""
    a: StudyRef = world["a"]
    radiologist = next(s for s in world["subjects"] if s.name == "radiologist")
    response = _call(http, "get", "/dicom-web/studies", radiologist.token, {"PatientName": "*"})
    assert response.status_code == 200, response.text
    assert a.study in response.text and world["b"].study not in response.text
    response = _call(http, "get", f"/dicom-web/studies/{a.study}/metadata", radiologist.token)
    assert response.status_code == 200 and a.sop in response.text


def test_result_slip_route_is_share_create_and_facility_scoped(world: dict, http: httpx.Client) -> None:
    """POST /api/studies/{study}/slip.pdf (issue 14) is in the matrix above with share.create; a POST (which the
    GET-only scope checks above skip) for another facility's study is a 404 that names nothing of it."""
    operation = world["openapi"]["paths"]["/api/studies/{study}/slip.pdf"]["post"]
    assert _required_capability(operation) == (True, Capability.SHARE_CREATE)
    a: StudyRef = world["a"]
    response = _call(http, "post", f"/api/studies/{a.study}/slip.pdf", world["other_facility"])
    assert response.status_code == 404 and not _leaks(response, a), response.text
    clinician = next(s for s in world["subjects"] if s.name == "clinician")
    response = _call(http, "post", f"/api/studies/{a.study}/slip.pdf", clinician.token)
    assert response.status_code == 200 and response.headers["content-type"] == "application/pdf"


def test_share_link_viewer_session_never_sees_another_study(pacs: EmbeddedPacs, world: dict,
                                                            http: httpx.Client) -> None:
    """A share link of scope "study" for A (issue 14): its viewer session, on every secured GET route with B's
    UIDs and with wildcard searches, gets nothing of B; A's own metadata it reads."""
    a: StudyRef = world["a"]
    b: StudyRef = world["b"]
    radiologist = next(s for s in world["subjects"] if s.name == "radiologist")
    made = _call(http, "post", f"/api/studies/{a.study}/shares", radiologist.token)
    assert made.status_code == 400  # the body {} names no scope
    made = httpx.post(f"{pacs.http_url}/api/studies/{a.study}/shares", json={"scope": "study"}, timeout=30,
                      headers={"Authorization": f"Bearer {radiologist.token}"})
    assert made.status_code == 201, made.text
    path = "/s/" + made.json()["url"].split("/s/", 1)[1]
    handoff = httpx.get(f"{pacs.http_url}{path}/viewer", timeout=30)
    found = re.search(r'data-token="([^"]+)"', handoff.text)
    assert handoff.status_code == 200 and found is not None, handoff.text[:300]
    session_token = found.group(1)
    failures, checked = [], 0
    for method, route, op in _operations(world["openapi"]):
        secured, _ = _required_capability(op)
        if not secured or method != "get":
            continue
        attempts = [(_fill(route, b), None)] if "{" in route else [
            (route, {"PatientName": "*"}), (route, {"includefield": "all"}), (route, {"PatientID": b.patient_id}),
            (route, {"StudyInstanceUID": b.study})]
        for url, params in attempts:
            response = _call(http, method, url, session_token, params)
            checked += 1
            if _leaks(response, b) or response.status_code >= 500:
                failures.append(f"GET {url} {params} -> {response.status_code} {response.text[:150]}")
    print(f"share-session scope checks: {checked} requests")
    assert not failures, "\n".join(failures)
    response = _call(http, "get", f"/dicom-web/studies/{a.study}/metadata", session_token)
    assert response.status_code == 200 and a.sop in response.text
