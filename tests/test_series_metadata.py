"""Series metadata documents (DICOM JSON, bulk data as URIs) and representative thumbnails.

Unit tests of :mod:`pacs.dicomweb.metadata` on pydicom's corpus, then end to end: a CT series sent with
DCMTK to `pacs serve` (embedded) and to `pacs scp` + `pacs worker` (PostgreSQL, S3, Redis); the
document appears, follows added slices and a changed instance, and is not rebuilt per instance.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select, update

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import DerivedTask, Instance, Series, Study
from pacs.derived.kinds import INSTANCE_DERIVED_KIND, SERIES_METADATA_KIND
from pacs.derived.runner import run_derived_task
from pacs.dicomweb.metadata import (
    BULK_DATA_THRESHOLD,
    PIXEL_DATA_TAGS,
    JsonArrayWriter,
    bulk_data_uri,
    instance_json,
    instance_metadata,
    iter_bulk_uris,
    read_dataset,
)
from pacs.imaging.render import placeholder, thumbnail
from pacs.ingest import Ingestor, IngestSource
from pacs.ingest import service as ingest_service
from pacs.settings import Settings
from storage import InvalidKey, ObjectNotFound
from storage.keys import (
    instance_metadata_key,
    series_metadata_key,
    series_thumbnail_key,
    study_thumbnail_key,
    thumbnail_key,
)
from tests.support.corpus import corpus_dicom_files
from tests.support.datasets import make_dataset, make_instance, to_bytes
from tests.support.dcmtk import storescu
from tests.support.net import wait_until
from tests.support.seaweed import SeaweedS3
from tests.support.stack import EmbeddedPacs, ScaledStack

# --- pacs.dicomweb.metadata on the corpus -------------------------------------------------------------------------


def _metadata(data: bytes, **kwargs: Any) -> dict[str, Any]:
    return json.loads(instance_metadata(io.BytesIO(data), "1.2.3", "1.2.3.4", "1.2.3.4.5", **kwargs))


def _compare(orig: Dataset, back: Dataset, doc: dict[str, Any], where: str) -> list[str]:
    """Elements of ``orig`` whose value did not survive JSON -> Dataset.from_json (bulk data aside)."""
    problems = []
    for elem in orig:
        key = f"{elem.tag:08X}"
        if elem.tag & 0xFFFF == 0 or key not in doc or "BulkDataURI" in doc[key]:
            continue
        if elem.VR == "SQ":
            for i, (a, b) in enumerate(zip(elem.value, back[elem.tag].value, strict=True)):
                problems += _compare(a, b, doc[key]["Value"][i], f"{where}/{key}/{i}")
        elif elem.value != back[elem.tag].value and not (elem.is_empty and back[elem.tag].is_empty):
            problems.append(f"{where}/{key}: {elem.value!r:.60} became {back[elem.tag].value!r:.60}")
    return problems


def test_corpus_bulk_data_becomes_uris_and_the_rest_round_trips() -> None:
    checked, problems = 0, []
    for path in corpus_dicom_files():
        try:
            orig = pydicom.dcmread(path, force=True)
            str(orig.SOPInstanceUID)
        except Exception:
            continue  # not parseable at all: ingest refuses it, so it never gets metadata
        doc = _metadata(path.read_bytes())
        checked += 1
        for tag in PIXEL_DATA_TAGS:
            key = f"{tag:08X}"
            if tag in orig and not orig[tag].is_empty:
                assert "InlineBinary" not in doc[key], f"{path.name}: pixel data inlined"
                assert doc[key]["BulkDataURI"] == f"studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/bulkdata/{key}"
        inline = [e for e in _walk_elements(doc) if len(e.get("InlineBinary", "")) > BULK_DATA_THRESHOLD * 4 // 3 + 4]
        assert not inline, f"{path.name}: large InlineBinary"
        back = Dataset.from_json(doc, bulk_data_uri_handler=lambda _tag, _vr, _uri: b"")
        problems += _compare(orig, back, doc, path.name)
    assert checked > 150
    assert not problems, "\n".join(problems[:20])


def _walk_elements(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for element in doc.values():
        yield element
        if element.get("vr") == "SQ":
            for item in element.get("Value", []):
                yield from _walk_elements(item)


def test_pixel_data_is_never_read() -> None:
    data = pydicom.data.get_testdata_file("CT_small.dcm")
    with open(data, "rb") as fh:  # type: ignore[arg-type]
        ds = read_dataset(fh)
        doc = instance_json(ds, "1.2", "1.3", "1.4")
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
        assert raw.value is None  # still deferred: skipped while parsing, never loaded since
    assert doc["7FE00010"] == {"vr": "OW", "BulkDataURI": "studies/1.2/series/1.3/instances/1.4/bulkdata/7FE00010"}
    assert doc["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "CompressedSamples^CT1"}]}


@pytest.mark.parametrize(("name", "vr"), [("MR_small_implicit.dcm", "OW"), ("JPEG2000.dcm", "OB"),
                                          ("MR_small_bigendian.dcm", "OW")])
def test_pixel_data_vr_in_every_encoding(name: str, vr: str) -> None:
    doc = _metadata(Path(pydicom.data.get_testdata_file(name)).read_bytes())  # type: ignore[arg-type]
    assert doc["7FE00010"]["vr"] == vr and "BulkDataURI" in doc["7FE00010"]


def test_vietnamese_names_in_utf8() -> None:
    name = "Nguyễn^Văn Đức"
    doc = _metadata(to_bytes(make_dataset(PatientName=name, StudyDescription="Chụp cắt lớp")))
    assert doc["00100010"]["Value"] == [{"Alphabetic": name}]
    assert doc["00081030"]["Value"] == ["Chụp cắt lớp"]
    assert doc["00080005"]["Value"] == ["ISO_IR 192"]


def test_utf8_sent_under_latin1_label_follows_the_setting() -> None:
    name = "Trần^Thị Hồng"
    data = to_bytes(make_dataset(PatientName=name)).replace(b"ISO_IR 192", b"ISO_IR 100", 1)
    assert _metadata(data, assume_utf8_for_latin1=True)["00100010"]["Value"] == [{"Alphabetic": name}]
    assert _metadata(data)["00100010"]["Value"] != [{"Alphabetic": name}]  # read as Latin-1, as labelled


def test_nested_bulk_data_gets_its_tag_path() -> None:
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.SamplesPerPixel, icon.BitsAllocated = 1, 8
    icon.PixelData = np.zeros(64 * 64, np.uint8).tobytes()
    small = Dataset()
    small.add_new(0x00090010, "LO", "PACS TEST")  # private creator of the (0009,10xx) block
    small.add_new(0x00091010, "OB", b"\x01\x02\x03\x04")  # small: stays inline
    small.add_new(0x00091011, "OB", bytes(4000))  # large, two levels down
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3"
    inner.add_new(0x00090010, "LO", "PACS TEST")
    inner.add_new(0x00091100, "SQ", Sequence([small]))
    ds = make_dataset()
    ds.IconImageSequence = Sequence([icon])
    ds.ReferencedImageSequence = Sequence([Dataset(), inner])
    ds.EncapsulatedDocument = b"%PDF" + bytes(2000)
    doc = _metadata(to_bytes(ds))
    root = "studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/bulkdata/"
    assert doc["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"] == root + "00880200/0/7FE00010"
    nested = doc["00081140"]["Value"][1]["00091100"]["Value"][0]
    assert nested["00091010"] == {"vr": "OB", "InlineBinary": "AQIDBA=="}
    assert nested["00091011"]["BulkDataURI"] == root + "00081140/1/00091100/0/00091011"
    assert doc["00420011"]["BulkDataURI"] == root + "00420011"
    assert doc["7FE00010"]["BulkDataURI"] == root + "7FE00010"  # pixel data is bulk data even when small
    assert sorted(iter_bulk_uris(doc)) == sorted(root + p for p in (
        "00420011", "00880200/0/7FE00010", "00081140/1/00091100/0/00091011", "7FE00010"))
    assert doc["00081140"]["Value"][0] == {}


def test_bulk_data_uri_scheme_and_json_array_writer() -> None:
    assert bulk_data_uri("1.2", "1.3", "1.4", (0x00880200, 2, 0x7FE00010)) == \
        "studies/1.2/series/1.3/instances/1.4/bulkdata/00880200/2/7FE00010"
    out = io.BytesIO()
    writer = JsonArrayWriter(out)
    writer.add(b'{"a":1}')
    writer.add(io.BytesIO(b'{"b":2}'))
    assert writer.finish() == len(out.getvalue())
    assert json.loads(out.getvalue()) == [{"a": 1}, {"b": 2}]


def test_metadata_and_representative_keys_validate_uids() -> None:
    assert instance_metadata_key("1.2", "1.3", "1.4") == "derived/metadata/1.2/1.3/1.4.json"
    assert series_metadata_key("1.2", "1.3") == "derived/metadata/1.2/1.3.json"
    assert series_thumbnail_key("1.2", "1.3") == "derived/thumbnails/1.2/1.3.jpg"
    assert study_thumbnail_key("1.2") == "derived/thumbnails/1.2.jpg"
    for bad in ("../x", "1..2", "", "1.2/3", "1" * 65):
        with pytest.raises(InvalidKey):
            series_metadata_key("1.2", bad)
        with pytest.raises(InvalidKey):
            study_thumbnail_key(bad)
        with pytest.raises(InvalidKey):
            instance_metadata_key("1.2", "1.3", bad)


# --- the task handlers, in this process (SQLite + filesystem) -------------------------------------------

SOURCE = IngestSource("import")


@pytest.fixture()
def local(tmp_path: Path) -> Iterator[AppContext]:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "data", series_settle_s=0))
    migrate.upgrade(ctx.engine)
    yield ctx
    ctx.close()


def _run_tasks(ctx: AppContext, kind: str) -> dict[str, str]:
    """Run every row of ``kind`` once; {subject: result}."""
    with ctx.sessions() as s:
        rows = s.execute(select(DerivedTask.id, DerivedTask.subject_uid).where(DerivedTask.kind == kind)).all()
    return {subject: run_derived_task(ctx, task_id) for task_id, subject in rows}


def _task(ctx: AppContext, kind: str, subject: str) -> DerivedTask:
    with ctx.sessions() as s:
        return s.scalars(select(DerivedTask).where(DerivedTask.kind == kind, DerivedTask.subject_uid == subject)).one()


def test_every_stored_corpus_object_gets_its_fragment_and_every_series_its_document(local: AppContext) -> None:
    ingestor = Ingestor(local.sessions, local.store)
    stored = sum(ingestor.ingest(p.read_bytes(), SOURCE).ok for p in corpus_dicom_files())
    assert stored > 100
    with local.sessions() as s:
        first = s.execute(select(Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid)
                          .join(Series, Series.id == Instance.series_fk).join(Study, Study.id == Series.study_fk)
                          .where(Instance.version == 1)).all()
        left = set(s.scalars(select(DerivedTask.subject_uid).where(DerivedTask.kind == INSTANCE_DERIVED_KIND,
                                                                   DerivedTask.state == "pending")))
    # ingest made the first versions' fragments from the datasets it parsed; a new version's (the corpus repeats
    # some SOP Instance UIDs) is made by a worker once the version is committed
    assert len(first) > 80 and not left & {uids[2] for uids in first}
    assert all(local.store.exists(instance_metadata_key(*uids)) for uids in first)
    assert set(_run_tasks(local, INSTANCE_DERIVED_KIND).values()) == {"done"}  # placeholders at worst, never failed
    assert set(_run_tasks(local, SERIES_METADATA_KIND).values()) == {"done"}
    with local.sessions() as s:
        indexed = s.execute(select(Instance.sop_instance_uid, Series.metadata_key, Series.thumbnail_key)
                            .join(Series, Series.id == Instance.series_fk)).all()
    documents: dict[str, list[str]] = {}
    for _sop_uid, doc_key, thumb_key in indexed:
        assert doc_key and thumb_key and local.store.exists(thumb_key)
        if doc_key not in documents:
            documents[doc_key] = [_sop(e) for e in json.loads(local.store.get_bytes(doc_key))]
    assert sorted(sop for sops in documents.values() for sop in sops) == sorted(r[0] for r in indexed)


def test_series_task_waits_rebuilds_lost_fragments_and_notices_late_instances(
    local: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid, series_uid = "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1"
    ingestor = Ingestor(local.sessions, local.store)

    def send(number: int) -> str:
        sop = f"{series_uid}.{number}"
        assert ingestor.ingest(make_instance(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                                             SOPInstanceUID=sop, InstanceNumber=number), SOURCE).ok
        return sop

    # ingest makes a new instance's fragment itself (pacs.ingest.fragment); where it cannot, a worker does, and the
    # series waits for it
    monkeypatch.setattr(ingest_service, "make_fragment", lambda obj, **_: None)
    sops = [send(n) for n in (3, 1, 2)]
    assert _run_tasks(local, SERIES_METADATA_KIND) == {series_uid: "deferred"}  # no fragment built yet
    row = _task(local, SERIES_METADATA_KIND, series_uid)
    assert (row.state, row.attempts) == ("pending", 0) and row.last_error.startswith("deferred: 3 instance(s)")
    _run_tasks(local, INSTANCE_DERIVED_KIND)
    local.settings.series_settle_s = 60
    assert _run_tasks(local, SERIES_METADATA_KIND)[series_uid] == "deferred"  # the series is still arriving
    local.settings.series_settle_s = 0

    local.store.delete(instance_metadata_key(study_uid, series_uid, sops[0]))  # a lost fragment
    # and one a power cut left empty (fragments are put without forcing them to disk)
    local.store.put(instance_metadata_key(study_uid, series_uid, sops[1]), b"", durable=False)
    real_put = local.store.put
    late: list[str] = []

    def put_with_a_late_instance(key: str, *args: Any, **kwargs: Any) -> None:
        real_put(key, *args, **kwargs)
        if key == series_metadata_key(study_uid, series_uid) and not late:
            late.append(send(4))  # arrives while the document is being built

    monkeypatch.setattr(local.store, "put", put_with_a_late_instance)
    assert _run_tasks(local, SERIES_METADATA_KIND)[series_uid] == "deferred"  # built, but not marked done: it is stale
    assert _task(local, SERIES_METADATA_KIND, series_uid).state == "pending"
    assert local.store.exists(instance_metadata_key(study_uid, series_uid, sops[0]))  # made again
    assert _sop(json.loads(local.store.get_bytes(instance_metadata_key(study_uid, series_uid, sops[1])))) == sops[1]
    _run_tasks(local, INSTANCE_DERIVED_KIND)
    assert _run_tasks(local, SERIES_METADATA_KIND)[series_uid] == "done"
    doc = _series_document(local, study_uid, series_uid)
    assert doc is not None and [_sop(e) for e in doc] == [f"{series_uid}.{n}" for n in (1, 2, 3, 4)]
    row = _task(local, SERIES_METADATA_KIND, series_uid)
    assert (row.state, row.attempts) == ("done", 1)


# --- end to end ----------------------------------------------------------------------------------------


@dataclass
class Archive:
    port: int
    ctx: AppContext  # the test's own view of the archive's index and store
    log: Path  # where the process running derived work logs


def _series_document(ctx: AppContext, study_uid: str, series_uid: str) -> list[dict[str, Any]] | None:
    try:
        return json.loads(ctx.store.get_bytes(series_metadata_key(study_uid, series_uid)))
    except ObjectNotFound:
        return None


def _sop(entry: dict[str, Any]) -> str:
    return entry["00080018"]["Value"][0]


def _wait_document(archive: Archive, study_uid: str, series_uid: str, ready: Any, what: str) -> list[dict[str, Any]]:
    found: list[list[dict[str, Any]]] = []

    def check() -> bool:
        doc = _series_document(archive.ctx, study_uid, series_uid)
        if doc is not None and ready(doc):
            found.append(doc)
            return True
        return False

    wait_until(check, timeout=60, interval=0.3, what=what)
    return found[0]


def _builds(archive: Archive, series_uid: str) -> int:
    return archive.log.read_text(errors="replace").count(f"series {series_uid}: metadata document of")


def _send(port: int, files: list[Path]) -> None:
    result = storescu(port, files, "-xe")
    assert result.success and result.returncode == 0, result.output[-1500:]


def _series_document_follows_the_series(archive: Archive, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", slices=45, size=64)
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    study_uid, series_uid = str(heads[0].StudyInstanceUID), str(heads[0].SeriesInstanceUID)
    sops = [str(h.SOPInstanceUID) for h in heads]

    _send(archive.port, files[:40])
    doc = _wait_document(archive, study_uid, series_uid, lambda d: len(d) == 40, "the 40-instance document")
    assert [_sop(e) for e in doc] == sops[:40]  # Instance Number order
    for entry, sop in zip(doc, sops, strict=False):
        assert entry["7FE00010"] == {
            "vr": "OW", "BulkDataURI": f"studies/{study_uid}/series/{series_uid}/instances/{sop}/bulkdata/7FE00010"}
        assert entry["00100010"]["Value"] == [{"Alphabetic": "PHANTOM^CT"}]
    wait_until(lambda: archive.ctx.store.exists(study_thumbnail_key(study_uid)), timeout=30, what="study thumbnail")
    series_thumb = archive.ctx.store.get_bytes(series_thumbnail_key(study_uid, series_uid))
    # rendered once for the series from its middle slice; no slice has a thumbnail of its own (rendered on request)
    middle = thumbnail(pydicom.dcmread(files[20]), size=archive.ctx.settings.thumbnail_size)
    assert series_thumb == middle and series_thumb[:2] == b"\xff\xd8"
    assert not any(archive.ctx.store.exists(thumbnail_key(study_uid, series_uid, sop)) for sop in sops[:40])
    assert series_thumb != placeholder(archive.ctx.settings.thumbnail_size)  # a rendered slice
    assert archive.ctx.store.get_bytes(study_thumbnail_key(study_uid)) == series_thumb
    # the document and thumbnails are written before the build commits its row: wait for the commit
    wait_until(lambda: _builds(archive, series_uid) >= 1, timeout=10, what="the build's log line")
    with archive.ctx.sessions() as s:
        series = s.scalars(select(Series).where(Series.series_instance_uid == series_uid)).one()
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        assert series.metadata_key == series_metadata_key(study_uid, series_uid)
        assert series.thumbnail_key == series_thumbnail_key(study_uid, series_uid)
        assert study.thumbnail_key == study_thumbnail_key(study_uid)
    first_builds = _builds(archive, series_uid)

    changed = pydicom.dcmread(files[7])
    changed.ImageComments = "second version"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    _send(archive.port, [*files[40:], changed_path])

    def updated(d: list[dict[str, Any]]) -> bool:
        return len(d) == 45 and d[7].get("00204000", {}).get("Value") == ["second version"]

    doc = _wait_document(archive, study_uid, series_uid, updated, "the document with 5 more and a changed instance")
    assert [_sop(e) for e in doc] == sops
    assert all("00204000" not in e for i, e in enumerate(doc) if i != 7)
    # The log line follows the commit that follows the put: wait for it.
    wait_until(lambda: _builds(archive, series_uid) > first_builds, timeout=10, what="the rebuild's log line")
    builds = _builds(archive, series_uid)
    print(f"document builds: {first_builds} for 40 instances, {builds - first_builds} for 6 more")
    assert 1 <= first_builds <= 3 and builds - first_builds <= 3  # debounced: not once per instance (46)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("embedded-metadata"))
    try:
        yield Archive(pacs.port, pacs.ctx, pacs.proc.log_path)
    finally:
        pacs.close()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedS3) -> Iterator[Archive]:
    with ScaledStack(tmp_path_factory.mktemp("scaled-metadata"),
                     s3_server.url_for(f"pacs-{uuid.uuid4().hex[:10]}")) as stack:
        worker = stack.start_worker(concurrency=2)
        stack.start_scp()
        yield Archive(stack.port, stack.ctx, worker.log_path)


@pytest.mark.integration
def test_embedded_series_document_and_thumbnails(embedded: Archive, tmp_path: Path) -> None:
    _series_document_follows_the_series(embedded, tmp_path)


@pytest.mark.integration
def test_scaled_series_document_and_thumbnails(scaled: Archive, tmp_path: Path) -> None:
    _series_document_follows_the_series(scaled, tmp_path)


def test_a_series_whose_build_died_before_is_built_without_rendering_again(local: AppContext) -> None:
    """A poison object (one whose decode kills the process) in a series: the run after a crash builds the document
    with a placeholder thumbnail instead of decoding again, so the series still gets its metadata."""
    study_uid, series_uid = "1.2.826.0.1.3680043.10.2", "1.2.826.0.1.3680043.10.2.1"
    ingestor = Ingestor(local.sessions, local.store)
    for n in (1, 2):
        assert ingestor.ingest(make_instance(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                                             SOPInstanceUID=f"{series_uid}.{n}", InstanceNumber=n), SOURCE).ok
    with local.sessions() as s, s.begin():  # what the lease records when a process dies running the row
        s.execute(update(DerivedTask).where(DerivedTask.subject_uid == series_uid).values(crashes=1))
    assert _run_tasks(local, SERIES_METADATA_KIND) == {series_uid: "done"}
    row = _task(local, SERIES_METADATA_KIND, series_uid)
    assert "not rendered after a crash" in row.last_error, row.last_error
    thumb = local.store.get_bytes(series_thumbnail_key(study_uid, series_uid))
    assert thumb == placeholder(local.settings.thumbnail_size)
    doc = _series_document(local, study_uid, series_uid)
    assert doc is not None and [_sop(e) for e in doc] == [f"{series_uid}.{n}" for n in (1, 2)]
    # a later instance re-arms the row with its crashes forgotten: the thumbnail is rendered again
    assert ingestor.ingest(make_instance(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                                         SOPInstanceUID=f"{series_uid}.3", InstanceNumber=3), SOURCE).ok
    assert _run_tasks(local, SERIES_METADATA_KIND) == {series_uid: "done"}
    assert local.store.get_bytes(series_thumbnail_key(study_uid, series_uid)) != thumb
