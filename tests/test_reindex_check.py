"""`pacs reindex` and `pacs check` as real processes, against SQLite + filesystem and PostgreSQL + S3 (each
command runs as a process at least once per configuration; its other runs, for their logic, in-process with
tests.support.pacs_process.invoke_pacs: the same command code and exit codes without a new interpreter).

The archive is filled with `pacs import` (pydicom's whole test corpus, whose files share SOP Instance
UIDs so prior versions exist, and a generated CT series). C-FIND does not exist yet, so the comparison
after a rebuild is made on the index rows C-FIND and QIDO-RS will answer from: patients, studies, series,
instances and prior versions, with every attribute derived from the objects (not row ids or receive times).

Reindex replays objects in the order they were written. The filesystem store gives that order to the
microsecond, so the rebuilt index must be identical. The S3 server reports Last-Modified in whole seconds:
objects written in the same second cannot be ordered, and the rows whose "first seen wins" values or current
version depend on that order are reported by reindex (``ambiguous_order``); there the test requires those
rows to be the only differences.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.engine import make_engine, make_session_factory
from pacs.db.models import Instance, InstanceVersion, Patient, Series, Study
from pacs.ingest import Ingestor, IngestSource
from pacs.maintenance.reindex import IndexNotEmpty, reindex
from pacs.settings import Settings
from storage import ObjectInfo, ObjectStore
from storage.keys import instance_key
from tests.support.corpus import corpus_files
from tests.support.datasets import make_instance
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.postgres import create_database, drop_database
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.integration


@dataclass
class Archive:
    """An imported archive and how to throw its index away."""

    name: str
    env: dict[str, str]
    drop_index: Callable[[], None]
    imported: dict[str, int]

    def context(self) -> AppContext:
        return AppContext.create(Settings(data_dir=Path(self.env["PACS_DATA_DIR"]),
                                          database_url=self.env.get("PACS_DATABASE_URL", ""),
                                          storage_url=self.env.get("PACS_STORAGE_URL", "")))


def _pacs(args: list[str], env: dict[str, str], expect: int = 0, process: bool = True) -> str:
    result = run_pacs(args, env, timeout=300) if process else invoke_pacs(args, env)
    assert result.returncode == expect, f"pacs {args} exited {result.returncode}:\n{result.stdout[-3000:]}" \
                                        f"\n{result.stderr[-3000:]}"
    return result.stdout


def _import(path: Path, env: dict[str, str]) -> dict[str, int]:
    return json.loads(_pacs(["import", "--json", str(path)], env))["counts"]


@pytest.fixture(scope="module", params=["embedded", "scaled"])
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp(request.param)
    env = {"PACS_DATA_DIR": str(root / "data"), "PACS_LOG_LEVEL": "WARNING"}
    databases: list[str] = []
    if request.param == "embedded":
        def drop_index() -> None:
            for path in (root / "data").glob("index.sqlite3*"):
                path.unlink()
    else:
        s3: SeaweedS3 = request.getfixturevalue("s3_server")
        name, url = create_database()
        databases.append(name)
        env.update(PACS_DATABASE_URL=url, PACS_STORAGE_URL=s3.url_for(f"pacs-{uuid.uuid4().hex[:12]}"))

        def drop_index() -> None:  # a fresh, empty database in place of the old one
            name, url = create_database()
            databases.append(name)
            env["PACS_DATABASE_URL"] = url

    try:
        shutil.copytree(corpus_files()[0].parent, root / "input" / "corpus")  # one import for both: faster
        write_ct_series(root / "input" / "ct", slices=30, size=64)
        counts = _import(root / "input", env)
        assert counts["new-version"] > 0  # the corpus has files sharing SOP Instance UIDs
        yield Archive(request.param, env, drop_index, counts)
    finally:
        for name in databases:
            drop_database(name)


def snapshot(archive: Archive) -> dict[str, Any]:
    ctx = archive.context()
    try:
        return snapshot_of(ctx.sessions)
    finally:
        ctx.close()


def snapshot_of(sessions: sessionmaker[Session]) -> dict[str, Any]:
    """What a query answers from, keyed by UIDs (row ids and receive times legitimately differ)."""
    with sessions() as s:
        patients = sorted(s.execute(select(
            Patient.patient_id, Patient.issuer_of_patient_id, Patient.patient_name, Patient.patient_name_search,
            Patient.patient_birth_date, Patient.patient_sex)).all())
        studies = {row[0]: tuple(row[1:]) for row in s.execute(select(
            Study.study_instance_uid, Patient.patient_id, Patient.patient_name, Study.study_date,
            Study.study_time, Study.accession_number, Study.study_id, Study.study_description,
            Study.referring_physician_name, Study.institution_name, Study.specific_character_set,
            Study.modalities_in_study, Study.number_of_series, Study.number_of_instances,
        ).join(Patient, Patient.id == Study.patient_fk))}
        series = {row[0]: tuple(row[1:]) for row in s.execute(select(
            Series.series_instance_uid, Study.study_instance_uid, Series.modality, Series.series_number,
            Series.series_description, Series.body_part_examined, Series.series_date, Series.series_time,
            Series.station_name, Series.number_of_instances,
        ).join(Study, Study.id == Series.study_fk))}
        instances = {row[0]: tuple(row[1:]) for row in s.execute(select(
            Instance.sop_instance_uid, Series.series_instance_uid, Study.study_instance_uid,
            Patient.patient_id, Patient.patient_name, Instance.object_key, Instance.sha256, Instance.size,
            Instance.version, Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.instance_number,
            Instance.rows, Instance.columns, Instance.number_of_frames, Instance.thumbnail_key,
        ).join(Series, Series.id == Instance.series_fk).join(Study, Study.id == Series.study_fk)
         .join(Patient, Patient.id == Study.patient_fk))}
        versions = sorted(s.execute(select(
            InstanceVersion.sop_instance_uid, InstanceVersion.version, InstanceVersion.object_key,
            InstanceVersion.sha256, InstanceVersion.size, InstanceVersion.transfer_syntax_uid)).all())
    return {"counts": {"patients": len(patients), "studies": len(studies), "series": len(series),
                       "instances": len(instances), "versions": len(versions)},
            "patients": patients, "studies": studies, "series": series, "instances": instances,
            "versions": versions}


def query_answers(archive: Archive) -> dict[str, list[tuple]]:
    """Every answer the C-FIND engine gives at each level (all supported return keys), sorted."""
    from pacs.query.attributes import Level, Root, supported_keywords
    from pacs.query.engine import Query, QueryEngine

    ctx = archive.context()
    try:
        engine = QueryEngine(ctx.read_sessions)
        answers = {}
        for level in (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE):
            keys = supported_keywords(level)
            query = Query(level=level, root=Root.PATIENT_ROOT, filters={}, returns=keys, relational=True)
            answers[level.value] = sorted(tuple(str(row.get(k, "")) for k in keys) for row in engine.search(query))
        return answers
    finally:
        ctx.close()


def _all_keys(snap: dict[str, Any]) -> set[tuple[str, str]]:
    """(SOP Instance UID, object key) of every current and prior version."""
    return {(sop, row[4]) for sop, row in snap["instances"].items()} | {(v[0], v[2]) for v in snap["versions"]}


def _masked(snap: dict[str, Any], ambiguous: list[str]) -> dict[str, Any]:
    """The snapshot without the rows reindex reported as depending on an order the store cannot tell."""
    named: dict[str, set[str]] = {"patient": set(), "study": set(), "series": set(), "instance": set()}
    for entry in ambiguous:
        kind, _, uid = entry.partition(" ")
        named[kind].add(uid.split("/")[0] if kind == "patient" else uid)
    studies = {uid for uid, row in snap["studies"].items() if uid in named["study"] or row[0] in named["patient"]}
    series = {uid for uid, row in snap["series"].items() if uid in named["series"] or row[0] in studies}
    return {
        "patients": [row for row in snap["patients"] if row[0] not in named["patient"]],
        "studies": {uid: row for uid, row in snap["studies"].items() if uid not in studies},
        "series": {uid: row for uid, row in snap["series"].items() if uid not in series},
        "instances": {sop: row for sop, row in snap["instances"].items()
                      if sop not in named["instance"] and row[0] not in series and row[1] not in studies},
        "versions": [row for row in snap["versions"] if row[0] not in named["instance"]],
    }


def _rebuild(archive: Archive, expect: int = 0, upgrade: bool = True, process: bool = True) -> dict[str, Any]:
    archive.drop_index()
    if upgrade:  # reindex also creates the schema of an empty database itself
        _pacs(["db", "upgrade"], archive.env, process=False)  # as a process in tests/test_cli.py
    return json.loads(_pacs(["reindex", "--json"], archive.env, expect=expect, process=process))


def test_reindex_rebuilds_the_same_index(archive: Archive) -> None:
    before = snapshot(archive)
    answers_before = query_answers(archive)
    assert before["counts"]["instances"] == archive.imported["stored"] > 30
    assert before["counts"]["versions"] == archive.imported["new-version"]
    summary = _rebuild(archive)
    assert (summary["instances"], summary["versions"]) == (before["counts"]["instances"],
                                                           before["counts"]["versions"])
    assert summary["complete"] and not summary["corrupt"] and not summary["unparseable"]
    # the fragments ingest made are found again (single-version instances; the others' are made again by a task)
    firsts = sum(1 for row in before["instances"].values() if row[7] == 1)
    assert summary["fragments_linked"] == firsts and 0 < firsts < before["counts"]["instances"]
    after = snapshot(archive)
    assert after["counts"] == before["counts"]
    assert _all_keys(after) == _all_keys(before)
    ambiguous = summary["ambiguous_order"]
    answers_after = query_answers(archive)
    assert {k: len(v) for k, v in answers_after.items()} == {k: len(v) for k, v in answers_before.items()}
    if archive.name == "embedded":
        assert ambiguous == []
        assert answers_after == answers_before  # C-FIND answers exactly as before, at every level
    else:  # the rows reindex could not order are the only ones that may differ; most rows are compared
        assert len(_masked(after, ambiguous)["instances"]) > 0.5 * len(after["instances"])
    for part in ("patients", "studies", "series", "versions", "instances"):
        assert _masked(after, ambiguous)[part] == _masked(before, ambiguous)[part], part

    refused = invoke_pacs(["reindex"], archive.env)
    assert refused.returncode == 2 and "already holds" in refused.stderr and "--force" in refused.stderr
    forced = json.loads(_pacs(["reindex", "--force", "--json"], archive.env, process=False))
    assert (forced["instances"], forced["versions"], forced["bytes_read"]) == (0, 0, 0)
    assert forced["skipped_existing"] == summary["objects"]
    assert snapshot(archive) == after
    clean = json.loads(_pacs(["check", "--json"], archive.env, process=False))  # a process in the next test
    assert clean["ok"] and clean["checked"] == clean["listed"] == summary["objects"]


def _ct_slice_keys(ctx: AppContext, count: int) -> list[str]:
    """Keys of generated CT slices: one version each, so a lost one leaves no prior version to fall back on."""
    with ctx.sessions() as s:
        return list(s.scalars(select(Instance.object_key).join(Series, Series.id == Instance.series_fk)
                              .where(Series.series_description == "Axial 64x64", Instance.version == 1)
                              .order_by(Instance.object_key).limit(count)))


def test_check_and_reindex_report_a_corrupt_and_a_missing_object(archive: Archive) -> None:
    ctx = archive.context()
    corrupt, missing = _ct_slice_keys(ctx, 2)
    data = bytearray(ctx.store.get_bytes(corrupt))
    data[len(data) // 2] ^= 0x01  # one bit of pixel data
    ctx.store.put(corrupt, bytes(data), length=len(data))
    ctx.store.delete(missing)
    ctx.close()

    result = run_pacs(["check", "--json"], archive.env)
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert sorted((p["kind"], p["key"]) for p in report["problems"]) == [("corrupt", corrupt), ("missing", missing)]
    assert report["counts"] == {"corrupt": 1, "missing": 1}

    before = snapshot(archive)
    summary = _rebuild(archive, expect=1, upgrade=False, process=False)  # a process in the test above
    assert summary["corrupt"] == [corrupt] and not summary["complete"]
    after = snapshot(archive)
    assert after["counts"]["instances"] == before["counts"]["instances"] - 2
    indexed = {row[4] for row in after["instances"].values()}
    assert corrupt not in indexed and missing not in indexed
    # the corrupt object, no longer indexed, is an orphan: a warning (exit 0), no longer an error
    after_check = json.loads(_pacs(["check", "--json"], archive.env, expect=0, process=False))
    assert after_check["counts"] == {"orphan": 1} and after_check["ok"] and after_check["warnings"] == 1


# -- in process, on the embedded configuration: cases the corpus does not hold -----------------------------------


@dataclass
class Local:
    ctx: AppContext
    ingestor: Ingestor
    root: Path

    def ingest(self, **attributes: Any) -> None:
        assert self.ingestor.ingest(make_instance(**attributes), IngestSource("import")).ok

    def empty_index(self, name: str) -> sessionmaker[Session]:
        engine = make_engine(f"sqlite:///{self.root / name}")
        migrate.upgrade(engine)
        return make_session_factory(engine)


@pytest.fixture()
def local(tmp_path: Path) -> Iterator[Local]:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data"))
    migrate.upgrade(ctx.engine)
    yield Local(ctx, Ingestor(ctx.sessions, ctx.store), tmp_path)
    ctx.close()


def test_rebuild_follows_an_instance_whose_new_version_moved_to_another_study(local: Local) -> None:
    """The two objects are far apart in key order (different study folders): replay order still pairs them."""
    sop = generate_uid()
    local.ingest(SOPInstanceUID=sop, PatientName="FIRST^SENT")
    local.ingest(SOPInstanceUID=sop, PatientID="P-002", InstanceNumber=2)
    local.ingest(PatientID="P-002", InstanceNumber=3)
    rebuilt = local.empty_index("rebuilt.sqlite3")
    summary = reindex(rebuilt, local.ctx.store)
    assert (summary.instances, summary.versions, summary.ambiguous_order) == (2, 1, [])
    assert snapshot_of(rebuilt) == snapshot_of(local.ctx.sessions)
    assert snapshot_of(rebuilt)["counts"] == {"patients": 2, "studies": 3, "series": 3, "instances": 2,
                                              "versions": 1}


def test_force_puts_a_lost_older_version_back_in_order(local: Local) -> None:
    sop = generate_uid()
    for number in (1, 2, 3):
        local.ingest(SOPInstanceUID=sop, InstanceNumber=number)
    original = snapshot_of(local.ctx.sessions)
    with local.ctx.sessions() as s, s.begin():
        s.execute(delete(InstanceVersion).where(InstanceVersion.version == 1))
    summary = reindex(local.ctx.sessions, local.ctx.store, force=True)
    assert (summary.instances, summary.versions, summary.skipped_existing) == (0, 1, 2)
    assert snapshot_of(local.ctx.sessions) == original
    with pytest.raises(IndexNotEmpty, match="--force"):
        reindex(local.ctx.sessions, local.ctx.store)


class _SameInstantStore:
    """A store whose listing gives every object the same write time, like S3's whole seconds at worst."""

    def __init__(self, inner: ObjectStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for info in self._inner.list(prefix):
            yield ObjectInfo(info.key, info.size, datetime(2026, 1, 1, tzinfo=UTC))


def test_objects_written_in_the_same_instant_are_reported_where_their_order_matters(local: Local) -> None:
    study, sop = generate_uid(), generate_uid()
    local.ingest(StudyInstanceUID=study, SOPInstanceUID=sop, Modality="CT", PatientName="NGUYEN^AN")
    local.ingest(StudyInstanceUID=study, Modality="MR", PatientName="TRAN^BINH")
    local.ingest(StudyInstanceUID=study, SOPInstanceUID=sop, Modality="CT", PatientName="NGUYEN^AN", InstanceNumber=2)
    local.ingest(PatientID="P-OTHER")  # alone in its patient, study and series: nothing to report
    summary = reindex(local.empty_index("rebuilt.sqlite3"), _SameInstantStore(local.ctx.store))  # type: ignore[arg-type]
    assert (summary.instances, summary.versions) == (3, 1)
    assert summary.ambiguous_order == sorted([f"instance {sop}", "patient P-001/", f"study {study}"])


def test_an_object_acknowledged_before_the_leading_zero_rule_is_rebuilt_not_orphaned(local: Local) -> None:
    """New objects with a leading-zero UID component (``1.02.3``) are refused at ingest (PS3.5 §9.1), but one
    archived before that rule is an acknowledged image: reindex must index it, or a rebuilt index would
    leave it an orphan for ``pacs check --repair`` to collect."""
    legacy_study = "1.2.840.0010.5"
    data = make_instance(StudyInstanceUID=legacy_study, PatientID="P-LEGACY")
    ds = pydicom.dcmread(io.BytesIO(data))
    key = instance_key(legacy_study, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                       hashlib.sha256(data).hexdigest())
    local.ctx.store.put(key, data, length=len(data), content_type="application/dicom")
    assert not local.ingestor.ingest(data, IngestSource("import")).ok  # refused when it arrives today
    summary = reindex(local.ctx.sessions, local.ctx.store)
    assert (summary.instances, summary.unparseable) == (1, [])
    with local.ctx.sessions() as s:
        assert s.scalar(select(Study.study_instance_uid)) == legacy_study
