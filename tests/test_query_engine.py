"""The query engine (pacs.query.engine) on SQLite and PostgreSQL, over a small archive ingested
through the real ingest function: matching types, Vietnamese names, counts, hierarchy rules,
unknown keys, malformed values, limit/offset, and the indexes PostgreSQL uses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from pacs.db import migrate
from pacs.db.engine import make_engine, make_read_session_factory, make_session_factory
from pacs.ingest import Ingestor, IngestSource
from pacs.query.attributes import Level, Root, supported_keywords
from pacs.query.engine import IdentifierError, MatchValueError, Query, QueryEngine, QueryError, prepare
from storage import open_store
from tests.support.datasets import to_bytes
from tests.support.postgres import create_database, drop_database
from tests.support.query_archive import STUDIES, UID_ROOT, archive_datasets
from tests.support.tiers import starts_servers

# -- the test archive (tests/support/query_archive.py) -------------------------------------------


def uid(key: str) -> str:
    return STUDIES[key].uid


# -- fixtures -------------------------------------------------------------------------------------

@dataclass
class Archive:
    name: str
    engine: Engine
    query: QueryEngine

    def find(self, level: str, root: str = "STUDY_ROOT", returns: tuple[str, ...] = (), **filters: str) -> list[dict]:
        return list(self.query.search(Query(level, root, filters, returns)))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp(f"query-{request.param}")
    db_name = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'index.sqlite3'}"
    else:
        db_name, url = create_database()
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        ingestor = Ingestor(make_session_factory(engine), open_store(f"file://{tmp / 'objects'}"))
        for ds in archive_datasets():
            outcome = ingestor.ingest(to_bytes(ds), IngestSource("import"))
            assert outcome.ok, outcome.message
        yield Archive(request.param, engine, QueryEngine(make_read_session_factory(engine), batch_size=2))
    finally:
        engine.dispose()
        if db_name:
            drop_database(db_name)


def study_keys(rows: list[dict]) -> list[str]:
    by_uid = {s.uid: k for k, s in STUDIES.items()}
    return sorted(by_uid[r["StudyInstanceUID"]] for r in rows)


# -- matching -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("filters", "expected"), [
    ({"PatientID": "VN001"}, ["S1", "S2"]),
    ({"AccessionNumber": "ACC-00?"}, ["S1", "S2", "S3"]),
    ({"AccessionNumber": "XR*"}, ["S4", "S5"]),
    ({"AccessionNumber": "acc-001"}, []),  # single value matching is case-sensitive
    ({"PatientID": "' OR 1=1 --"}, []),  # values are bound, never SQL
    ({"PatientID": "%"}, []),  # SQL's wildcards are literals
    ({"StudyDate": "20260101-20260228"}, ["S1", "S2"]),
    ({"StudyDate": "20260201-"}, ["S2", "S4"]),  # an open range does not match the study without a date
    ({"StudyDate": "-20251231"}, ["S3"]),
    ({"StudyDate": "20260105"}, ["S1"]),
    ({"StudyDate": "20260105\\20251230"}, ["S1", "S3"]),  # multiple values: any of them
    ({"StudyInstanceUID": f"{UID_ROOT}.1\\{UID_ROOT}.3"}, ["S1", "S3"]),
    ({"StudyInstanceUID": f"{UID_ROOT}.4"}, ["S4"]),
    ({"ModalitiesInStudy": "MR"}, ["S1", "S5"]),
    ({"ModalitiesInStudy": "CT\\US"}, ["S1", "S2", "S3"]),
    ({"ModalitiesInStudy": "C"}, []),
    ({"StudyDescription": "ct*"}, ["S1", "S3"]),  # free text on its folded column
    ({"StudyDescription": "*sieu am*"}, ["S2"]),
    ({"PatientSex": "F"}, ["S3"]),
    ({"PatientBirthDate": "19700101-19851231"}, ["S1", "S2", "S4", "S5"]),
    ({"ModalitiesInStudy": "CT", "StudyDate": "20260101-"}, ["S1"]),
    ({"PatientID": "*", "StudyDate": "", "AccessionNumber": "*"}, ["S1", "S2", "S3", "S4", "S5"]),  # universal
])
def test_study_level_matching(archive: Archive, filters: dict[str, str], expected: list[str]) -> None:
    assert study_keys(archive.find("STUDY", **filters)) == expected


@pytest.mark.parametrize(("name", "expected"), [
    ("Nguyen^Van An", ["VN001"]),  # typed without diacritics, stored with them
    ("nguyễn^thị hà", ["VN002"]),  # the reverse: stored without, typed with
    ("NGUYỄN", ["VN001", "VN002"]),  # family name only
    ("nguy*", ["VN001", "VN002"]),
    ("*AN", ["VN001"]),
    ("Smith^John", ["EN003"]),
    ("Tran", []),
])
def test_person_names_match_with_and_without_diacritics(archive: Archive, name: str, expected: list[str]) -> None:
    rows = archive.find("PATIENT", "PATIENT_ROOT", ("PatientName",), PatientName=name)
    assert sorted(r["PatientID"] for r in rows) == expected
    if expected == ["VN001"]:
        assert rows[0]["PatientName"] == "Nguyễn^Văn An"  # returned exactly as stored


def test_computed_counts(archive: Archive) -> None:
    counts = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")
    patients = {r["PatientID"]: r for r in archive.find("PATIENT", "PATIENT_ROOT", counts, PatientID="*")}
    assert [patients["VN001"][k] for k in counts] == [2, 3, 6]
    assert [patients["EN003"][k] for k in counts] == [2, 2, 3]
    study = archive.find("STUDY", returns=("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
                         StudyInstanceUID=uid("S1"))
    assert [(r["NumberOfStudyRelatedSeries"], r["NumberOfStudyRelatedInstances"]) for r in study] == [(2, 4)]
    series = archive.find("SERIES", returns=("NumberOfSeriesRelatedInstances", "Modality"), StudyInstanceUID=uid("S1"))
    assert sorted((r["Modality"], r["NumberOfSeriesRelatedInstances"]) for r in series) == [("CT", 3), ("MR", 1)]
    # counts are return keys: a value sent for one is not matched
    assert len(archive.find("STUDY", NumberOfStudyRelatedInstances="99")) == 5


def test_series_and_image_levels(archive: Archive) -> None:
    series = archive.find("SERIES", returns=("SeriesNumber", "BodyPartExamined"), StudyInstanceUID=uid("S1"),
                          Modality="CT")
    assert [(r["SeriesInstanceUID"], r["SeriesNumber"], r["BodyPartExamined"], r["StudyInstanceUID"])
            for r in series] == [(STUDIES["S1"].series_uid(0), 1, "CHEST", uid("S1"))]
    images = archive.find("IMAGE", returns=("InstanceNumber", "Rows", "Columns", "SOPClassUID", "NumberOfFrames"),
                          StudyInstanceUID=uid("S1"), SeriesInstanceUID=STUDIES["S1"].series_uid(0))
    assert [r["InstanceNumber"] for r in images] == [1, 2, 3]
    assert all(r["Rows"] == 16 and r["Columns"] == 16 and r["NumberOfFrames"] is None for r in images)
    assert images[0]["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"
    one = archive.find("IMAGE", StudyInstanceUID=uid("S1"), SeriesInstanceUID=STUDIES["S1"].series_uid(0),
                       InstanceNumber="2")
    assert [r["SOPInstanceUID"] for r in one] == [f"{STUDIES['S1'].series_uid(0)}.2"]
    # Patient Root: every level above pinned by its unique key
    rows = archive.find("IMAGE", "PATIENT_ROOT", PatientID="VN001", StudyInstanceUID=uid("S2"),
                        SeriesInstanceUID=STUDIES["S2"].series_uid(0))
    assert len(rows) == 2 and set(rows[0]) == {"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}


def test_patient_attributes_at_lower_levels(archive: Archive) -> None:
    rows = archive.find("STUDY", returns=("PatientName", "PatientBirthDate"), PatientName="nguyen^van*")
    assert study_keys(rows) == ["S1", "S2"] and rows[0]["PatientName"] == "Nguyễn^Văn An"
    series = archive.find("SERIES", returns=("StudyDate", "PatientID"), StudyInstanceUID=uid("S4"))
    assert [(r["StudyDate"], r["PatientID"]) for r in series] == [("20260301", "EN003")]


# -- the hierarchy (PS3.4 C.4.1.2) ------------------------------------------------------------------

@pytest.mark.parametrize(("level", "root", "filters"), [
    ("SERIES", "STUDY_ROOT", {}),
    ("SERIES", "STUDY_ROOT", {"StudyInstanceUID": f"{UID_ROOT}.*"}),
    ("SERIES", "STUDY_ROOT", {"StudyInstanceUID": f"{UID_ROOT}.1\\{UID_ROOT}.2"}),
    ("IMAGE", "STUDY_ROOT", {"StudyInstanceUID": f"{UID_ROOT}.1"}),
    ("STUDY", "PATIENT_ROOT", {"PatientName": "NGUYEN*"}),
    ("STUDY", "PATIENT_ROOT", {"PatientID": "VN*"}),
    ("SERIES", "PATIENT_ROOT", {"StudyInstanceUID": f"{UID_ROOT}.1"}),
    ("PATIENT", "STUDY_ROOT", {}),
    ("WARD", "STUDY_ROOT", {}),
    ("STUDY", "WORKLIST", {}),
])
def test_identifiers_that_do_not_fit_the_model_are_refused(level: str, root: str, filters: dict[str, str]) -> None:
    with pytest.raises(IdentifierError):
        prepare(Query(level, root, filters))


def test_relational_queries_for_qido(archive: Archive) -> None:
    rows = list(archive.query.search(Query("SERIES", "STUDY_ROOT", {"Modality": "CT"}, relational=True)))
    assert sorted(r["SeriesInstanceUID"] for r in rows) == sorted([STUDIES["S1"].series_uid(0),
                                                                  STUDIES["S3"].series_uid(0)])


# -- unknown keys, malformed values ---------------------------------------------------------------

def test_unknown_keys_are_returned_empty_and_not_matched(archive: Archive) -> None:
    rows = archive.find("STUDY", returns=("PatientWeight", "SOPInstanceUID", "NoSuchKeyword"),
                        InstitutionAddress="NOWHERE", SeriesInstanceUID="9.9.9", StudyInstanceUID=uid("S3"))
    assert len(rows) == 1
    row = rows[0]
    assert row["StudyInstanceUID"] == uid("S3")
    for key in ("InstitutionAddress", "PatientWeight", "SOPInstanceUID", "NoSuchKeyword", "SeriesInstanceUID"):
        assert key in row and row[key] is None


@pytest.mark.parametrize(("filters", "error"), [
    ({"StudyDate": "2026-01-01-2027"}, "malformed range"),
    ({"StudyDate": "abc-def"}, "not a DA value"),
    ({"StudyDate": "-"}, "empty range"),
    ({"StudyInstanceUID": "\\".join(f"1.2.{i}" for i in range(5000))}, "exceeds 1000"),
    ({"AccessionNumber": "\\".join(f"A{i}" for i in range(101))}, "exceeds 100"),
    ({"ModalitiesInStudy": "\\".join(["CT"] * 1001)}, "exceeds 1000"),
])
def test_malformed_values_raise_a_typed_error(filters: dict[str, str], error: str) -> None:
    with pytest.raises(MatchValueError, match=error):
        prepare(Query("STUDY", "STUDY_ROOT", filters))


def test_malformed_numbers_and_limits() -> None:
    with pytest.raises(MatchValueError, match="not an integer"):
        prepare(Query("SERIES", "STUDY_ROOT", {"StudyInstanceUID": "1.2.3", "SeriesNumber": "1*"}))
    with pytest.raises(QueryError):
        prepare(Query("STUDY", limit=-1))


# -- limit, offset, count, streaming --------------------------------------------------------------

def test_limit_offset_and_count(archive: Archive) -> None:
    every = list(archive.query.search(Query("STUDY", "STUDY_ROOT", {})))
    assert study_keys(every) == ["S1", "S2", "S3", "S4", "S5"]
    page = archive.query.search(Query("STUDY", "STUDY_ROOT", {}, limit=2, offset=1))
    assert [r["StudyInstanceUID"] for r in page] == [r["StudyInstanceUID"] for r in every[1:3]]
    assert page.count() == 5  # matches in all, whatever the page
    assert archive.query.count(Query("STUDY", "STUDY_ROOT", {"ModalitiesInStudy": "MR"})) == 2
    assert archive.query.count(Query("IMAGE", "STUDY_ROOT", {"Modality": "CT"}, relational=True)) == 4
    assert list(archive.query.search(Query("STUDY", "STUDY_ROOT", {}, offset=10))) == []


def test_a_count_joins_only_the_tables_its_conditions_read(archive: Archive) -> None:
    """The study list returns patient names, but counting its matches needs no patient row (every study has
    exactly one): at 10^7 instances that join cost a second on the first page (bench/index_scale.py)."""
    listing = Query("STUDY", "STUDY_ROOT", {"StudyDate": "20230101-20231231"}, ("PatientName", "PatientID"), limit=3)
    assert "patient" not in str(prepare(listing).count_statement)
    assert "patient" in str(prepare(listing).statement)
    by_name = Query("STUDY", "STUDY_ROOT", {"PatientName": "NGUYEN*"}, ("PatientID",))
    assert "patient" in str(prepare(by_name).count_statement)
    instances = Query("IMAGE", "STUDY_ROOT", {"Modality": "CT"}, ("PatientName", "StudyDate"), relational=True)
    assert "study" not in str(prepare(instances).count_statement).replace("study_fk", "")
    for query in (listing, by_name, instances, Query("STUDY", "STUDY_ROOT", {}, ("PatientName",))):
        assert archive.query.count(query) == len(list(archive.query.search(
            Query(query.level, query.root, query.filters, query.returns, relational=query.relational))))


def test_a_date_range_is_not_walked_along_the_primary_key_but_keeps_its_order(archive: Archive) -> None:
    """Dates follow arrival order: a range from a day on is ordered by ``id + 0`` so PostgreSQL reads the date
    index instead of walking every older study (bench/index_scale.py: 540 -> 27 ms for a month at 10^7
    instances); the rows come in the same order."""
    ranged = Query("STUDY", "STUDY_ROOT", {"StudyDate": "19000101-29991231"}, ("StudyDate",))
    assert "study.id + " in str(prepare(ranged).statement)
    assert "study.id + " not in str(prepare(Query("STUDY", "STUDY_ROOT", {"StudyDate": "-29991231"})).statement)
    assert "study.id + " not in str(prepare(Query("STUDY", "STUDY_ROOT", {"StudyDate": "20230105"})).statement)
    every = [r for r in archive.query.search(Query("STUDY", "STUDY_ROOT", {}, ("StudyDate",))) if r["StudyDate"]]
    assert len(every) >= 2 and list(archive.query.search(ranged)) == every
    page = list(archive.query.search(Query("STUDY", "STUDY_ROOT", ranged.filters, ("StudyDate",), limit=2,
                                           offset=1)))
    assert page == every[1:3]


def test_rows_are_streamed_and_may_be_abandoned(archive: Archive) -> None:
    result = archive.query.search(Query("IMAGE", "STUDY_ROOT", {}, relational=True))  # batch_size=2
    rows = iter(result)
    first = next(rows)
    assert set(first) == {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}
    rows.close()  # type: ignore[attr-defined]  # releases the cursor and the session
    assert result.count() == 10


def test_supported_keywords_grow_with_the_level() -> None:
    assert "PatientName" in supported_keywords(Level.IMAGE) and "SOPInstanceUID" not in supported_keywords(Level.SERIES)
    assert Root.STUDY_ROOT.levels[0] is Level.STUDY


# -- indexes (PostgreSQL, realistic sizes) ----------------------------------------------------------

BIG_FILL = """
INSERT INTO patient (id, patient_id, issuer_of_patient_id, patient_name, patient_name_search, patient_birth_date,
                     patient_sex)
SELECT i, 'P' || i, '', 'NAME' || i || '^X', 'NAME' || i || '^X', '19800101', 'M' FROM generate_series(1, 10000) i;
INSERT INTO study (id, study_instance_uid, patient_fk, study_date, study_time, accession_number, study_id,
                   study_description, study_description_search, referring_physician_name, institution_name,
                   modalities_in_study, number_of_series, number_of_instances, specific_character_set)
SELECT i, '1.2.3.' || i, 1 + mod(i, 10000), to_char(DATE '2023-01-01' + mod(i, 1000), 'YYYYMMDD'), '120000',
       'A' || i, '', '', '', '', '', CASE WHEN mod(i, 100) = 0 THEN 'MG' ELSE 'CT\\SR' END, 2, 2, 'ISO_IR 192'
FROM generate_series(1, 20000) i;
INSERT INTO series (id, series_instance_uid, study_fk, modality, series_number, series_description,
                    body_part_examined, series_date, series_time, station_name, number_of_instances)
SELECT i, '1.2.4.' || i, 1 + mod(i, 20000),
       CASE WHEN mod(1 + mod(i, 20000), 100) = 0 THEN 'MG' WHEN i <= 20000 THEN 'CT' ELSE 'SR' END,
       1, '', '', '', '', '', 1
FROM generate_series(1, 40000) i;
INSERT INTO instance (id, sop_instance_uid, series_fk, sop_class_uid, instance_number, transfer_syntax_uid,
                      object_key, size, sha256, received_at, source, source_ae, source_address, version)
SELECT i, '1.2.5.' || i, i, '1.2.840.10008.5.1.4.1.1.2', 1, '1.2.840.10008.1.2.1', 'k' || i, 1, '', now(), 'import',
       '', '', 1
FROM generate_series(1, 40000) i;
ANALYZE;
"""


@pytest.fixture(scope="module")
@starts_servers
def big_pg() -> Iterator[Engine]:
    """20 000 studies in a database with a linguistic (ICU) collation, as production ones usually have:
    there a plain B-tree cannot serve LIKE 'ABC%' and only the text_pattern_ops indexes of 0002 can."""
    import psycopg
    from psycopg import sql

    from tests.support.postgres import ADMIN_URL

    name, url = create_database()  # a name the session's cleanup knows; recreated with the collation
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
                                 "LOCALE 'C.UTF-8'").format(sql.Identifier(name)))
        except psycopg.Error:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(BIG_FILL)
        yield engine
    finally:
        engine.dispose()
        drop_database(name)


def _scans(engine: Engine, statement, seqscan: bool = True) -> list[tuple[str, str, bool]]:  # type: ignore[no-untyped-def]
    """(node type, relation, has an index condition) of every scan in the plan."""
    import json

    compiled = statement.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        if not seqscan:
            conn.execute(text("SET enable_seqscan = off"))
        plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {compiled}")).scalar()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    out: list[tuple[str, str, bool]] = []

    def walk(node: dict) -> None:
        if "Scan" in node["Node Type"]:
            out.append((node["Node Type"], node.get("Relation Name") or node.get("Index Name", ""),
                        "Index Cond" in node or node["Node Type"].startswith("Bitmap")))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return out


@pytest.mark.parametrize(("level", "filters", "indexed"), [
    ("STUDY", {"PatientID": "P42"}, {"patient", "study"}),
    ("STUDY", {"PatientID": "P424*"}, {"patient", "study"}),
    ("STUDY", {"PatientName": "NAME42"}, {"patient", "study"}),  # family name only: = or LIKE 'NAME42^%'
    ("STUDY", {"PatientName": "NAME424*"}, {"patient", "study"}),
    ("STUDY", {"StudyDate": "20230105-20230106"}, {"study"}),
    ("STUDY", {"StudyDate": "20230105"}, {"study"}),
    ("STUDY", {"AccessionNumber": "A42"}, {"study", "patient"}),
    ("STUDY", {"AccessionNumber": "A420*"}, {"study", "patient"}),
    ("STUDY", {"StudyInstanceUID": "1.2.3.42\\1.2.3.43"}, {"study", "patient"}),
    ("STUDY", {"ModalitiesInStudy": "MG", "StudyDate": "20230105-20230110"}, {"study"}),
    ("SERIES", {"StudyInstanceUID": "1.2.3.42"}, {"study", "series"}),
    ("SERIES", {"SeriesInstanceUID": "1.2.4.42"}, {"study", "series"}),
    ("IMAGE", {"StudyInstanceUID": "1.2.3.42", "SeriesInstanceUID": "1.2.4.42"}, {"study", "series", "instance"}),
    ("IMAGE", {"SOPInstanceUID": "1.2.5.42"}, {"instance", "series"}),
])
def test_common_keys_are_answered_from_indexes_on_postgresql(big_pg: Engine, level: str, filters: dict[str, str],
                                                             indexed: set[str]) -> None:
    """The tables holding the keys (and those reached from a handful of matches) are read through
    indexes; how the planner joins a small result to the rest is its own business."""
    statement = prepare(Query(level, "STUDY_ROOT", filters, ("PatientName", "ModalitiesInStudy"),
                              relational=True)).statement
    scans = _scans(big_pg, statement)
    full = [s for s in scans if s[1] in indexed and (s[0] == "Seq Scan" or not s[2])]
    assert not full, scans


def test_modalities_in_study_has_an_index_path(big_pg: Engine) -> None:
    """multi_valued's LIKE '%\\MG\\%' has no index; the EXISTS on series.modality gives the planner one
    (it still prefers a scan of a table this small; with sequential scans priced out it must not need one)."""
    statement = prepare(Query("STUDY", "STUDY_ROOT", {"ModalitiesInStudy": "MG"})).statement
    scans = _scans(big_pg, statement, seqscan=False)
    assert not [s for s in scans if s[0] == "Seq Scan"], scans
    assert ("Index Scan", "series", True) in scans or ("Bitmap Heap Scan", "series", True) in scans, scans
    with big_pg.connect() as conn:
        assert len(conn.execute(statement).all()) == 200


def test_sqlite_has_no_pattern_indexes(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'i.sqlite3'}")
    migrate.upgrade(engine)
    with engine.connect() as conn:
        names = set(conn.scalars(text("SELECT name FROM sqlite_master WHERE type = 'index'")))
    engine.dispose()
    assert "ix_patient_patient_id_pattern" not in names and "ix_patient_patient_id" in names
