"""QIDO-RS end to end (issue 6), in the embedded mode and the scaled configuration (`pacs api` + `pacs scp` +
`pacs worker` on PostgreSQL, S3 and Redis), with dicomweb-client as the client where it can say it.

The archive is tests.support.dicomweb_world: studies A1, A2 of patient PAT-A at facility HOSP-A and study
B1 of PAT-B at HOSP-B.
"""

from __future__ import annotations

import pytest

from pacs.dicomweb.qido_json import tag_of
from pacs.query.attributes import Level, supported_keywords
from tests.support.dicomweb_world import World, audit_count, shared_world

pytestmark = pytest.mark.integration

WORLD = "PAT-A\\PAT-B"  # the world's patients (other modules add others to the same archive)
STUDY_DEFAULT_TAGS = {"00080020", "00080030", "00080050", "00080056", "00080061", "00080090", "00081190", "00100010",
                      "00100020", "00100030", "00100040", "0020000D", "00200010", "00201206", "00201208",
                      "00100021", "00080080"}  # Issuer of Patient ID, Institution Name: the facility's label


@pytest.fixture(scope="module", params=["embedded", "scaled"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    return shared_world(request, tmp_path_factory)


def _uids(results: list[dict], tag: str = "0020000D") -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def test_search_studies_series_and_instances_with_filters(world: World) -> None:
    client = world.client()
    a1, a2, b1 = world.a1, world.a2, world.b1
    # Person names match without case or diacritics; the study result carries PS3.18's default attributes.
    found = client.search_for_studies(search_filters={"PatientName": "nguyen"})
    assert _uids(found) == {a1.study, a2.study}
    first = next(r for r in found if r["0020000D"]["Value"][0] == a1.study)
    assert set(first) == STUDY_DEFAULT_TAGS
    assert first["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Nguyễn^Văn An"}]}
    assert first["00100020"]["Value"] == ["PAT-A"] and first["00080050"]["Value"] == ["ACC-A1"]
    assert first["00080020"]["Value"] == ["20240105"] and first["00080061"]["Value"] == ["CT"]
    assert first["00201206"]["Value"] == [2] and first["00201208"]["Value"] == [3]
    assert first["00080056"]["Value"] == ["ONLINE"]
    assert first["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{a1.study}")

    assert _uids(client.search_for_studies(search_filters={"PatientID": "PAT-A", "StudyDate": "20240101-20240131"})) \
        == {a1.study}
    assert _uids(client.search_for_studies(search_filters={"00100020": "PAT-B"})) == {b1.study}  # by tag
    assert _uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR", "PatientID": WORLD})) \
        == {a2.study}
    assert _uids(client.search_for_studies(search_filters={"AccessionNumber": "ACC-A*"})) == {a1.study, a2.study}
    assert _uids(client.search_for_studies(search_filters={"StudyInstanceUID": f"{a2.study},{b1.study}"})) \
        == {a2.study, b1.study}

    # Series across studies carry the study attributes; within a study they do not need to.
    series = client.search_for_series(search_filters={"Modality": "CT", "PatientID": WORLD})
    assert _uids(series, "0020000E") == {*a1.series, *b1.series}
    assert all("00100020" in s and "00201209" in s for s in series)
    in_a1 = client.search_for_series(a1.study)
    assert _uids(in_a1, "0020000E") == set(a1.series) and all("00100020" not in s for s in in_a1)
    numbered = client.search_for_series(a1.study, search_filters={"SeriesNumber": "2"})
    assert _uids(numbered, "0020000E") == {a1.series[1]}
    assert numbered[0]["00201209"]["Value"] == [1] and numbered[0]["0008103E"]["Value"] == ["CT series 2"]

    # Instances: in a series, in a study, across studies.
    in_series = client.search_for_instances(a1.study, a1.series[0])
    assert _uids(in_series, "00080018") == set(a1.sops[a1.series[0]])
    assert {r["00280010"]["Value"][0] for r in in_series} == {16}
    assert in_series[0]["00081190"]["Value"][0].endswith(
        f"/studies/{a1.study}/series/{a1.series[0]}/instances/{in_series[0]['00080018']['Value'][0]}")
    assert _uids(client.search_for_instances(a1.study), "00080018") == set(a1.all_sops)
    across = client.search_for_instances(search_filters={"PatientID": "PAT-B"})
    assert _uids(across, "00080018") == set(b1.all_sops)
    assert all(r["00100020"]["Value"] == ["PAT-B"] and "0020000E" in r for r in across)


def test_no_match_is_200_with_an_empty_array(world: World) -> None:
    assert world.client().search_for_studies(search_filters={"PatientName": "NOBODY"}) == []
    with world.http() as http:
        response = http.get("/dicom-web/studies", params={"PatientName": "NOBODY"})
    assert response.status_code == 200 and response.json() == []
    assert response.headers["x-total-count"] == "0"
    assert response.headers["content-type"].startswith("application/dicom+json")


def test_total_count_header_and_count_resources_with_paging(world: World) -> None:
    a1 = world.a1
    patient_a = {*a1.all_sops, *world.a2.all_sops}  # other modules add other patients: count within the world
    seen: list[str] = []
    with world.http() as http:
        for offset in (0, 2):
            response = http.get("/dicom-web/instances", params={"PatientID": "PAT-A", "limit": "2",
                                                                "offset": str(offset)})
            assert response.status_code == 200, response.text
            assert response.headers["x-total-count"] == "4"
            page = [r["00080018"]["Value"][0] for r in response.json()]
            assert len(page) == 2
            seen += page
            if offset == 0:
                assert "2 additional results" in response.headers["warning"]
            else:
                assert "warning" not in response.headers
        assert len(seen) == 4 and set(seen) == patient_a  # disjoint pages covering every match
        past = http.get("/dicom-web/instances", params={"PatientID": "PAT-A", "limit": "2", "offset": "4"})
        assert past.json() == [] and past.headers["x-total-count"] == "4"
        filtered = http.get("/dicom-web/studies", params={"PatientID": "PAT-A", "limit": "1"})
        assert len(filtered.json()) == 1 and filtered.headers["x-total-count"] == "2"

        counts = {
            ("/dicom-web/count/studies", "PAT-A"): 2,
            ("/dicom-web/count/studies", "PAT-A\\PAT-B"): 3,
            ("/dicom-web/count/series", "PAT-A"): 3,
            ("/dicom-web/count/instances", "PAT-A"): 4,
            ("/dicom-web/count/instances", "PAT-B"): 2,
            (f"/dicom-web/count/studies/{a1.study}/series", ""): 2,
            (f"/dicom-web/count/studies/{a1.study}/instances", ""): 3,
            (f"/dicom-web/count/studies/{a1.study}/series/{a1.series[0]}/instances", ""): 2,
        }
        for (path, patient), expected in counts.items():
            params = {"limit": "1", "offset": "1", **({"PatientID": patient} if patient else {})}  # paging ignored
            response = http.get(path, params=params)
            assert response.status_code == 200 and response.json() == {"count": expected}, (path, response.text)
            assert response.headers["x-total-count"] == str(expected)


def test_includefield_all_and_named_fields(world: World) -> None:
    client = world.client()
    rich = client.search_for_studies(fields=["all"], search_filters={"StudyInstanceUID": world.a1.study})
    assert len(rich) == 1
    expected = {tag_of(k) for k in supported_keywords(Level.STUDY)} | STUDY_DEFAULT_TAGS
    assert set(rich[0]) == expected
    assert rich[0]["00081030"]["Value"] == ["CT study"]  # StudyDescription, not a default attribute
    instances = client.search_for_instances(world.a1.study, fields=["all"])
    assert {tag_of(k) for k in supported_keywords(Level.IMAGE)} <= set(instances[0])
    with world.http() as http:
        response = http.get("/dicom-web/studies", params=[("includefield", "StudyDescription,00081030"),
                                                          ("includefield", "SeriesDescription"),
                                                          ("PatientID", "PAT-B")])
        assert response.status_code == 200
        result = response.json()[0]
        assert result["00081030"]["Value"] == ["CT study"] and "0008103E" not in result
        assert "SeriesDescription" in response.headers["warning"]  # not held at the study level: said so


def test_fuzzy_matching_adds_prefix_matching_of_name_components(world: World) -> None:
    client = world.client()
    a_studies = {world.a1.study, world.a2.study}
    assert client.search_for_studies(search_filters={"PatientName": "ngu"}) == []
    assert _uids(client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "ngu"})) == a_studies
    assert _uids(client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "van"})) == a_studies
    assert _uids(client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "ngu^va"})) \
        == a_studies
    assert _uids(client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": "bin"})) \
        == {world.b1.study}
    for typed in ("nguyen van", "*nguyen van*", "*NGUYỄN VĂN AN*"):  # a space also matches the ^ separator
        assert _uids(client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": typed})) \
            == a_studies, typed
    assert client.search_for_studies(search_filters={"PatientName": "*nguyen van*"}) == []  # only when fuzzy


def test_facility_b_sees_none_of_facility_a_through_any_search(world: World) -> None:
    client = world.client(world.facility_b)
    b1, a1 = world.b1, world.a1
    assert _uids(client.search_for_studies(search_filters={"PatientName": "*"})) == {b1.study}
    assert _uids(client.search_for_studies(fields=["all"])) == {b1.study}
    assert _uids(client.search_for_series(search_filters={"PatientName": "*"}), "0020000E") == set(b1.series)
    assert _uids(client.search_for_instances(fields=["all"]), "00080018") == set(b1.all_sops)
    for filters in ({"PatientID": "PAT-A"}, {"StudyInstanceUID": a1.study}, {"PatientName": "nguyen"}):
        assert client.search_for_studies(search_filters=filters) == []
    with world.http(world.facility_b) as http:
        for path in ("/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances"):
            response = http.get(path, params={"includefield": "all", "PatientName": "*"})
            assert response.status_code == 200
            assert "PAT-A" not in response.text and a1.study not in response.text and "Nguy" not in response.text
        assert http.get("/dicom-web/count/studies").json() == {"count": 1}
        assert http.get("/dicom-web/count/instances").json() == {"count": 2}
        for path in (f"/dicom-web/studies/{a1.study}/series", f"/dicom-web/studies/{a1.study}/instances",
                     f"/dicom-web/studies/{a1.study}/series/{a1.series[0]}/instances",
                     f"/dicom-web/count/studies/{a1.study}/instances"):  # a study out of scope is not there: 404
            response = http.get(path, params={"PatientName": "*"})
            assert response.status_code == 404 and response.json()["code"] == "not_found", path
            assert "PAT-A" not in response.text
    with world.http() as http:  # a series of another study in the path is not there either, even for an admin
        response = http.get(f"/dicom-web/studies/{a1.study}/series/{b1.series[0]}/instances")
        assert response.status_code == 404


def test_patient_token_sees_only_that_patients_studies(world: World) -> None:
    client = world.client(world.patient_a)
    assert _uids(client.search_for_studies(search_filters={"PatientName": "*"})) == {world.a1.study, world.a2.study}
    assert client.search_for_studies(search_filters={"PatientID": "PAT-B"}) == []
    assert _uids(client.search_for_instances(), "00080018") == {*world.a1.all_sops, *world.a2.all_sops}
    with world.http(world.patient_a_no_images) as http:  # a patient token without images may not search
        response = http.get("/dicom-web/studies")
        assert response.status_code == 403 and response.json()["code"] == "forbidden"


@pytest.mark.parametrize(("path", "params", "says"), [
    ("/dicom-web/patients", {}, "unknown search resource"),
    ("/dicom-web/count/patients", {}, "unknown search resource"),
    ("/dicom-web/studies", {"StudyDate": "2024-01-01-2024"}, "StudyDate: malformed range"),
    ("/dicom-web/studies", {"StudyDate": "2024abcd"}, "not a DA value"),
    ("/dicom-web/studies", {"limit": "-1"}, "limit must be a non-negative integer"),
    ("/dicom-web/studies", {"offset": "abc"}, "offset must be a non-negative integer"),
    ("/dicom-web/studies", {"StudyInstanceUID": ",".join(f"1.2.{i}" for i in range(1001))}, "exceeds 1000"),
    ("/dicom-web/studies", {"StudyInstanceUID": "1.2.abc"}, "invalid UID"),
    ("/dicom-web/studies", {"Foo": "bar"}, "unknown attribute 'Foo'"),
    ("/dicom-web/studies", {"fuzzymatching": "maybe"}, "fuzzymatching must be true or false"),
    ("/dicom-web/studies", {"includefield": "Not-A-Keyword!"}, "malformed attribute ID"),
    ("/dicom-web/studies/not-a-uid/series", {}, "invalid StudyInstanceUID"),
    ("/dicom-web/count/series", {"limit": "1e3"}, "limit must be a non-negative integer"),
])
def test_malformed_parameters_are_400_with_a_json_reason(world: World, path: str, params: dict, says: str) -> None:
    with world.http() as http:
        response = http.get(path, params=params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == "invalid_request" and says in response.json()["message"]


def test_xml_is_not_acceptable_and_each_search_is_audited_once(world: World) -> None:
    with world.http() as http:
        response = http.get("/dicom-web/studies", headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
        assert response.status_code == 406 and response.json()["code"] == "not_acceptable"
        before = audit_count(world.server, "dicomweb.search", world.a1.study)
        assert http.get(f"/dicom-web/studies/{world.a1.study}/series").status_code == 200
        assert audit_count(world.server, "dicomweb.search", world.a1.study) == before + 1
