"""Embedded mode end to end: `pacs serve` on a temporary data folder, driven by DCMTK and pynetdicom."""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from bench.generate_ct import write_ct_series
from pacs.context import AppContext
from pacs.db.models import Instance, InstanceVersion, Patient, Series, Study
from storage.keys import series_thumbnail_key, thumbnail_key
from tests.support.corpus import corpus_dicom_files
from tests.support.datasets import dataset_bytes, make_dataset
from tests.support.dcmtk import STORESCU_TS_OPTION, ReferenceStoreSCP, echoscu, storescu, storescu_each
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import PacsProcess
from tests.support.senders import send_dataset, send_file_raw
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration


@dataclass
class Server:
    proc: PacsProcess
    port: int
    ctx: AppContext  # the test's own view of the same index and store, read-only by convention


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pacs = EmbeddedPacs(tmp_path_factory.mktemp("embedded"))
    try:
        yield Server(pacs.proc, pacs.port, pacs.ctx)
    finally:
        pacs.close()


def _stored(server: Server, sop_uid: str) -> Instance | None:
    with server.ctx.sessions() as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one_or_none()


def test_echoscu(server: Server) -> None:
    result = echoscu(server.port)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture()
def reference_scp(tmp_path: Path) -> Iterator[ReferenceStoreSCP]:
    ref = ReferenceStoreSCP(tmp_path / "reference", free_port(), unique_names=True).start()
    yield ref
    ref.stop()


@dataclass
class Sent:
    """One corpus file as it was sent: the sender, the status it got and the dataset bytes that were on the wire."""

    path: Path
    sop_uid: str
    tsyntax: str
    sender: str
    status: int | None
    comment: str
    on_wire: list[bytes]


def _send_corpus(server: Server, reference_scp: ReferenceStoreSCP) -> list[Sent]:
    """storescu's files go in one association to the reference storescp and in one to the server (each file in
    its own transfer syntax); the reference's files, in the order they came, are what storescu put on the wire.
    The others go one by one through the raw pynetdicom sender, whose wire bytes are the file's own."""
    by_dcmtk: list[tuple[Path, str, str]] = []
    by_pynetdicom: list[tuple[Path, str, str]] = []
    for path in corpus_dicom_files():
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True)
            tsyntax, sop_uid = str(meta.file_meta.TransferSyntaxUID), str(meta.SOPInstanceUID)
        except Exception:
            tsyntax, sop_uid = "", ""
        if tsyntax in STORESCU_TS_OPTION and tsyntax != "1.2.840.10008.1.2.1.99":
            by_dcmtk.append((path, tsyntax, sop_uid))
        else:
            by_pynetdicom.append((path, tsyntax, sop_uid))
    files = [path for path, _, _ in by_dcmtk]
    to_reference = storescu_each(reference_scp.port, files, aec=reference_scp.aet)
    received = iter(reference_scp.received_in_order())
    wire = [[dataset_bytes(next(received).read_bytes())] if r.status == 0 else [] for r in to_reference]
    assert next(received, None) is None, "the reference received objects nobody sent"
    sent = [Sent(path, sop_uid, tsyntax, "storescu", r.status, r.error_comment, on_wire)
            for (path, tsyntax, sop_uid), r, on_wire in zip(by_dcmtk, storescu_each(server.port, files), wire,
                                                            strict=True)]
    for path, tsyntax, sop_uid in by_pynetdicom:
        raw = send_file_raw(server.port, path)
        on_wire = [dataset_bytes(path.read_bytes())] if raw.status is not None else []
        sent.append(Sent(path, sop_uid, tsyntax, "pynetdicom", raw.status, raw.error_comment, on_wire))
    return sent


def _stored_versions(server: Server, sop_uid: str) -> tuple[bytes | None, list[bytes]]:
    """The current object of ``sop_uid`` (None: not indexed) and every prior version kept, as dataset bytes."""
    current = _stored(server, sop_uid)
    with server.ctx.sessions() as s:
        keys = list(s.scalars(select(InstanceVersion.object_key).where(InstanceVersion.sop_instance_uid == sop_uid)))
    data = [dataset_bytes(server.ctx.store.get_bytes(k)) for k in keys]
    return (dataset_bytes(server.ctx.store.get_bytes(current.object_key)) if current else None), data


def test_whole_pydicom_corpus_is_stored_exactly_or_refused_with_a_reason(
    server: Server, reference_scp: ReferenceStoreSCP
) -> None:
    """Every corpus file, sent the way a modality would, is either stored with exactly the dataset
    bytes that were on the wire, or refused with a failure status and an Error Comment.

    storescu (proposing the file's own transfer syntax) re-encodes some datasets while sending (it
    drops trailing padding, for one), so what it put on the wire is taken from DCMTK's storescp in
    bit-preserving mode receiving the same send. Syntaxes DCMTK 3.6.7 cannot propose (deflate,
    HTJ2K, video...) go through a raw pynetdicom sender, whose wire bytes are the file's own.

    The corpus has files sharing a SOP Instance UID (one image in several syntaxes): all are sent before
    anything is checked, so the last one stored is the current object and the earlier ones must be among
    the versions kept (duplicate policy ``version``).
    """
    tally: Counter[str] = Counter()
    problems: list[str] = []
    sent = _send_corpus(server, reference_scp)
    last_stored = {s.sop_uid: s for s in sent if s.status == 0}
    for s in sent:
        if s.status is None:
            tally["unsendable"] += 1  # no peer could read the file to send it: it never reached us
            continue
        if s.status == 0:
            current, prior = _stored_versions(server, s.sop_uid)
            if current is None:
                problems.append(f"{s.path.name}: Success but not indexed")
                continue
            if len(s.on_wire) != 1:
                problems.append(f"{s.path.name}: reference receiver got {len(s.on_wire)} objects")
            elif last_stored[s.sop_uid] is s and current != s.on_wire[0]:
                problems.append(f"{s.path.name}: stored dataset differs from the bytes sent ({s.sender}, {s.tsyntax})")
            elif s.on_wire[0] not in (current, *prior):
                problems.append(f"{s.path.name}: no stored version has the bytes sent ({s.sender}, {s.tsyntax})")
            tally[f"stored via {s.sender}"] += 1
        else:
            if not s.comment:
                problems.append(f"{s.path.name}: failure 0x{s.status:04X} without an Error Comment")
            tally[f"refused 0x{s.status:04X}"] += 1
    print(dict(tally))
    assert not problems, "\n".join(problems)
    assert tally["stored via storescu"] > 100 and tally["stored via pynetdicom"] >= 1
    assert sum(v for k, v in tally.items() if k.startswith("refused")) >= 1
    assert echoscu(server.port).returncode == 0  # still up


def test_generated_ct_series_is_stored_with_thumbnails(server: Server, tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "ct", slices=100, size=256)
    result = storescu(server.port, files, "-xe")
    assert result.status == 0 and result.returncode == 0, result.output[-2000:]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    with server.ctx.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == first.StudyInstanceUID)).one()
        assert (study.number_of_instances, study.number_of_series, study.modalities_in_study) == (100, 1, "CT")

    def series_thumbnail() -> bool:
        with server.ctx.sessions() as s:
            return bool(s.scalar(select(Series.thumbnail_key)
                                 .where(Series.series_instance_uid == first.SeriesInstanceUID)))

    # one thumbnail for the series (its middle slice), not one per slice: those are rendered when asked for
    wait_until(series_thumbnail, timeout=120, what="the series thumbnail")
    assert not server.ctx.store.exists(
        thumbnail_key(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID))
    thumb = server.ctx.store.get_bytes(series_thumbnail_key(first.StudyInstanceUID, first.SeriesInstanceUID))
    image = Image.open(io.BytesIO(thumb))
    assert image.format == "JPEG" and max(image.size) == 128
    assert image.getextrema()[1] > 200 and image.getextrema()[0] < 30  # windowed phantom: bone and air


def test_four_modalities_at_once(server: Server, tmp_path: Path) -> None:
    """Four DCMTK senders on four associations into one study: every image stored, counts exact."""
    from concurrent.futures import ThreadPoolExecutor

    study = make_dataset().StudyInstanceUID
    batches = [write_ct_series(tmp_path / f"s{i}", slices=15, size=64, study_uid=study) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: storescu(server.port, files, "-xe", aet=f"CT{len(files)}"), batches))
    assert all(r.status == 0 and r.returncode == 0 for r in results)
    with server.ctx.sessions() as s:
        row = s.scalars(select(Study).where(Study.study_instance_uid == study)).one()
        assert (row.number_of_instances, row.number_of_series) == (60, 4)


def test_vietnamese_name_round_trips_and_is_searchable(server: Server, tmp_path: Path) -> None:
    ds = make_dataset(PatientName="Nguyễn^Văn An", PatientID="VN-0001", SpecificCharacterSet="ISO_IR 192")
    path = tmp_path / "vn.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert storescu(server.port, [path]).status == 0
    inst = _stored(server, ds.SOPInstanceUID)
    assert inst is not None
    back = pydicom.dcmread(io.BytesIO(server.ctx.store.get_bytes(inst.object_key)))
    assert str(back.PatientName) == "Nguyễn^Văn An"
    with server.ctx.sessions() as s:
        patient = s.scalars(select(Patient).where(Patient.patient_id == "VN-0001")).one()
        assert patient.patient_name == "Nguyễn^Văn An" and patient.patient_name_search == "NGUYEN^VAN AN"


def test_duplicates_and_new_versions_over_dimse(server: Server, tmp_path: Path) -> None:
    ds = make_dataset()
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    ds.save_as(a, enforce_file_format=True)
    assert storescu(server.port, [a, a]).status == 0
    first = _stored(server, ds.SOPInstanceUID)
    ds.PatientName = "FIXED^NAME"
    ds.save_as(b, enforce_file_format=True)
    assert storescu(server.port, [b]).status == 0
    second = _stored(server, ds.SOPInstanceUID)
    assert first is not None and second is not None
    assert (first.version, second.version) == (1, 2) and first.object_key != second.object_key
    old = dataset_bytes(server.ctx.store.get_bytes(first.object_key))
    assert old == dataset_bytes(a.read_bytes())  # the old version stays retrievable


@pytest.mark.parametrize(("uid", "where"), [("../../etc", "SOPInstanceUID"), ("1.2.abc.4", "StudyInstanceUID"),
                                            ("1.2.3/../../x", "SeriesInstanceUID")])
def test_path_like_uids_are_refused_and_write_nothing(server: Server, uid: str, where: str) -> None:
    before = _files(server)
    ds = make_dataset(**{where: uid})
    result = send_dataset(server.port, ds, "1.2.840.10008.1.2.1")
    assert result.status == 0xC001, result
    assert where in result.error_comment
    assert _files(server) == before
    assert not any(".." in p or "etc" in p.split(os.sep)[-1:] for p in _all_paths(server))


def test_truncated_and_non_dicom_files_are_refused(server: Server, tmp_path: Path) -> None:
    before = _files(server)
    ds = make_dataset()
    path = tmp_path / "t.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    # storescu refuses to read a truncated file itself; a raw sender puts it on the wire as it is.
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-100])
    raw = send_file_raw(server.port, cut)
    assert raw.status == 0xC002 and "truncated" in raw.error_comment, raw
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(data[:132] + data[132:400] + b"this is not a DICOM element stream" * 40)
    junk_result = send_file_raw(server.port, junk)
    assert junk_result.status is not None and junk_result.status != 0 and junk_result.error_comment
    assert _files(server) == before
    assert echoscu(server.port).returncode == 0


def _files(server: Server) -> set[str]:
    return {o.key for o in server.ctx.store.list("dicom/")}


def _all_paths(server: Server) -> list[str]:
    root = server.ctx.settings.data_dir.resolve()
    return [str(p) for p in root.parent.rglob("*")]
