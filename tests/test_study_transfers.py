"""Moving studies in and out (issue 15, must-show 4 and 5): a live `pacs serve`, DCMTK storescu/storescp/dcmdump,
dciodvfy.

- a 300-slice CT (512×512, 16 bit, ~157 MB, one storescu association) downloads as archive.zip streamed to disk:
  DCMTK's dcmdump reads its DICOMDIR (dciodvfy finds no error in it), every Referenced File ID is in the zip with
  the SOP Instance UID the record names, and the server's peak RSS grows by far less than the zip's size;
- a study with an SR document gets the right leaf record type; a series zip holds that series only; `pacs study
  export` writes the same zip;
- an upload of a zip with a Vietnamese patient name is stored (QIDO-RS shows it, in the uploader's facility), again:
  duplicates; a form with a file and a zip holding a non-DICOM entry and a ``../evil`` entry reports both and
  writes nothing by name; a corrupt or truncated zip is a 400 and stores nothing;
- a study sent to a registered storescp reaches "all sent" and arrives whole; sending again re-sends; `pacs study
  send --wait` shows the same;
- refusals: patient token, clinician, technologist of the other facility (404), unknown destination, a destination
  of another facility; each audited; a consultant reads a study under an open consult but may not download it.
"""

from __future__ import annotations

import io
import re
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from pacs.aes import add_ae
from pacs.db.models import AuditEvent, DerivedTask, Instance, Patient, Series, Study
from tests.support.datasets import make_dataset, to_bytes
from tests.support.dcmtk import ReferenceStoreSCP, dcmtk, storescu
from tests.support.facilities import CT, FacilityArchive, json_error
from tests.support.net import free_port, wait_until
from tests.support.pacs_process import run_pacs
from tests.support.senders import send_dataset
from tests.support.stack import EmbeddedPacs

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SLICES = 300
RSS_GROWTH_LIMIT = 60 * MIB
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
VIETNAMESE = "Nguyễn^Thị Hồng"


def write_ct_series(folder: Path, study_uid: str, slices: int) -> list[Path]:
    """A CT series of 512×512 16-bit slices (a different image per slice), as files."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(15).integers(0, 4096, size=(512, 512), dtype=np.uint16)
    series_uid = generate_uid()
    paths = []
    for n in range(1, slices + 1):
        ds = make_dataset(SOPClassUID=CT, Modality="CT", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                          PatientID="BIG-CT", PatientName="TRAN^VAN^BIG", StudyDescription="CT 300 lát",
                          InstanceNumber=n, Rows=512, Columns=512, BitsAllocated=16, BitsStored=12, HighBit=11,
                          ImagePositionPatient=[0, 0, float(n)], PixelData=np.roll(base, n).tobytes())
        path = folder / f"ct{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sr_document(study_uid: str, patient_id: str) -> Dataset:
    """A minimal Basic Text SR (no pixel data) of the study."""
    ds = make_dataset(SOPClassUID=BASIC_TEXT_SR, Modality="SR", StudyInstanceUID=study_uid, PatientID=patient_id,
                      SeriesNumber=9, InstanceNumber=1)
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "PixelData"):
        delattr(ds, keyword)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    text = Dataset()
    text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", "Không thấy bất thường"
    text.ConceptNameCodeSequence = Sequence([code])
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([code])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20261128", "101500"
    ds.ContentSequence = Sequence([text])
    return ds


class Archive(FacilityArchive):
    def __init__(self, server: EmbeddedPacs, root: Path) -> None:
        super().__init__(server)
        self.root = root
        self.add_tokens(("tech-a", "technologist", "HOSP-A"), ("tech-b", "technologist", "HOSP-B"),
                        ("rad-a", "radiologist", "HOSP-A"), ("clin-a", "clinician", "HOSP-A"),
                        ("admin", "admin", ""), ("patient-a", "patient", "HOSP-A", {"patient_id": "SMALL-1"}))
        self.dest = ReferenceStoreSCP(root / "dest", free_port(), "DESTA").start()
        with server.ctx.sessions() as session, session.begin():
            add_ae(session, "DESTA", "127.0.0.1", self.dest.port, facility="HOSP-A", allow_query=False,
                   allow_retrieve=False)
            add_ae(session, "DESTB", "127.0.0.1", free_port(), facility="HOSP-B", allow_query=False,
                   allow_retrieve=False)
        # a small study of HOSP-A: a CT series of 3 and an SR document
        self.small, self.small_ct = generate_uid(), generate_uid()
        self.small_sops = [self.send_instance("MODA", PatientID="SMALL-1", PatientName="LE^VAN^NHO",
                                              StudyInstanceUID=self.small, SeriesInstanceUID=self.small_ct,
                                              InstanceNumber=n).SOPInstanceUID for n in (1, 2, 3)]
        sr = sr_document(self.small, "SMALL-1")
        assert send_dataset(server.port, sr, ExplicitVRLittleEndian, aet="MODA").status == 0
        self.small_sr, self.small_sr_series = sr.SOPInstanceUID, sr.SeriesInstanceUID

    def call(self, method: str, who: str | None, path: str, **kw: Any) -> Any:
        with self.http(who) as client:
            return client.request(method, path, **kw)

    def audit_count(self, action: str, outcome: str, actor: str | None = None) -> int:
        stmt = select(func.count()).select_from(AuditEvent).where(AuditEvent.action == action,
                                                                  AuditEvent.outcome == outcome)
        if actor is not None:  # an API token's principal is token:<name>
            stmt = stmt.where(AuditEvent.actor == f"token:{actor}")
        with self.server.ctx.read_sessions() as session:
            return session.scalar(stmt) or 0

    def stored_sops(self, sops: list[str]) -> set[str]:
        with self.server.ctx.read_sessions() as session:
            return set(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(sops))))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("transfers")
    server = EmbeddedPacs(root)
    archive = None
    try:
        archive = Archive(server, root)
        yield archive
    finally:
        if archive is not None:
            archive.dest.stop()
        server.close()


def status_kib(pid: int, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match, field
    return int(match.group(1)) * 1024


def reset_peak(pid: int) -> bool:
    """VmHWM back to the current RSS (Linux: 5 to clear_refs); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def download(archive: Archive, who: str, path: str, target: Path) -> int:
    """Stream ``path`` to ``target`` (never in memory); its size."""
    with archive.http(who) as client, client.stream("GET", path) as response:
        assert response.status_code == 200, response.read()[:300]
        assert response.headers["content-type"] == "application/zip"
        assert "attachment" in response.headers["content-disposition"]
        with target.open("wb") as fh:
            for chunk in response.iter_bytes():
                fh.write(chunk)
    return target.stat().st_size


def check_fileset(zip_path: Path, folder: Path) -> dict[str, str]:
    """Extract the zip; dcmdump reads its DICOMDIR; every leaf's Referenced File ID is a file of the zip holding
    the SOP instance the record names. Returns {SOP Instance UID: record type}."""
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        assert zf.namelist()[0] == "DICOMDIR"
        assert all(re.fullmatch(r"DICOM(/[A-Z0-9_]{1,8}){4}", n) for n in names - {"DICOMDIR"}), sorted(names)[:5]
        zf.extractall(folder)
    dump = subprocess.run([dcmtk("dcmdump"), str(folder / "DICOMDIR")], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "DirectoryRecordSequence" in dump.stdout, dump.stderr[-500:]
    dicomdir = pydicom.dcmread(folder / "DICOMDIR")
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    leaves: dict[str, str] = {}
    for record in dicomdir.DirectoryRecordSequence:
        if "ReferencedFileID" not in record:
            continue
        parts = record.ReferencedFileID
        parts = [parts] if isinstance(parts, str) else list(parts)
        assert "/".join(parts) in names, parts
        stored = pydicom.dcmread(folder.joinpath(*parts), stop_before_pixels=True)
        assert stored.SOPInstanceUID == record.ReferencedSOPInstanceUIDInFile
        assert stored.file_meta.TransferSyntaxUID == record.ReferencedTransferSyntaxUIDInFile
        leaves[str(stored.SOPInstanceUID)] = str(record.DirectoryRecordType)
    assert len(leaves) == len(names) - 1, "every file of the zip is referenced by the DICOMDIR"
    FileSet(folder / "DICOMDIR")  # pydicom follows every offset (raises on a broken tree)
    return leaves


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# -- download ---------------------------------------------------------------------------------------------------


def test_300_slice_study_downloads_as_a_streamed_zip_with_a_valid_dicomdir(archive: Archive,
                                                                         tmp_path: Path) -> None:
    started = time.monotonic()
    study = generate_uid()
    files = write_ct_series(tmp_path / "ct", study, SLICES)
    generated = time.monotonic() - started
    sent = storescu(archive.server.port, files, aet="MODA")
    assert sent.success, sent.output[-1500:]
    with archive.server.ctx.read_sessions() as session:
        sops = set(session.scalars(select(Instance.sop_instance_uid).join(Series).join(Study)
                                   .where(Study.study_instance_uid == study)))
    assert len(sops) == SLICES
    print(f"{SLICES} slices generated in {generated:.1f} s, sent (storescu) in "
          f"{time.monotonic() - started - generated:.1f} s")

    def derived_work_done() -> bool:  # thumbnails and metadata of the study: not counted as the export's memory
        with archive.server.ctx.read_sessions() as session:
            return not session.scalar(select(func.count()).select_from(DerivedTask).where(
                DerivedTask.state.in_(("pending", "queued", "running"))))

    wait_until(derived_work_done, timeout=300, interval=0.5, what="derived work of the CT")
    pid = archive.server.proc.proc.pid  # type: ignore[union-attr]
    download(archive, "tech-a", f"/api/studies/{archive.small}/archive.zip", tmp_path / "warm.zip")  # warm-up
    reset = reset_peak(pid)
    baseline = status_kib(pid, "VmRSS") if reset else status_kib(pid, "VmHWM")

    started = time.monotonic()
    target = tmp_path / "big.zip"
    size = download(archive, "tech-a", f"/api/studies/{study}/archive.zip", target)
    elapsed = time.monotonic() - started
    growth = status_kib(pid, "VmHWM") - baseline
    print(f"archive.zip of {SLICES} slices: {size / MIB:.0f} MiB in {elapsed:.1f} s; server peak RSS growth "
          f"{growth / MIB:.1f} MiB (baseline {baseline / MIB:.0f} MiB, peak reset: {reset})")
    assert size > SLICES * 512 * 512 * 2
    assert growth < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / MIB:.0f} MiB for a {size / MIB:.0f} MiB zip"

    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None  # every CRC right
    leaves = check_fileset(target, tmp_path / "big")
    assert set(leaves) == sops and set(leaves.values()) == {"IMAGE"}
    errors = dciodvfy_errors(tmp_path / "big" / "DICOMDIR")
    print(f"dciodvfy on the DICOMDIR: {len(errors)} error line(s) {errors[:3]}")
    assert not errors
    dicomdir = pydicom.dcmread(tmp_path / "big" / "DICOMDIR")
    patient = next(r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT")
    assert patient.PatientID == "BIG-CT"
    assert archive.audit_count("study.export", "success", "tech-a") >= 2


def test_study_with_an_sr_and_a_series_zip(archive: Archive, tmp_path: Path) -> None:
    size = download(archive, "rad-a", f"/api/studies/{archive.small}/archive.zip", tmp_path / "small.zip")
    leaves = check_fileset(tmp_path / "small.zip", tmp_path / "small")
    assert leaves == {**dict.fromkeys(archive.small_sops, "IMAGE"), archive.small_sr: "SR DOCUMENT"}
    assert not dciodvfy_errors(tmp_path / "small" / "DICOMDIR")
    dicomdir = pydicom.dcmread(tmp_path / "small" / "DICOMDIR")
    types = [str(r.DirectoryRecordType) for r in dicomdir.DirectoryRecordSequence]
    assert types[:2] == ["PATIENT", "STUDY"] and types.count("SERIES") == 2 and size > 0

    # one series: that series only
    download(archive, "clin-a", f"/api/studies/{archive.small}/series/{archive.small_ct}/archive.zip",
             tmp_path / "series.zip")
    leaves = check_fileset(tmp_path / "series.zip", tmp_path / "series")
    assert leaves == dict.fromkeys(archive.small_sops, "IMAGE")

    # the CLI writes the same file-set
    out = tmp_path / "cli.zip"
    run = run_pacs(["study", "export", archive.small, "-o", str(out)], archive.server.env)
    assert run.returncode == 0, run.stderr[-1000:]
    assert set(check_fileset(out, tmp_path / "cli")) == set(archive.small_sops) | {archive.small_sr}

    # unknown series of the study, unknown study: 404 (JSON)
    json_error(archive.call("GET", "rad-a", f"/api/studies/{archive.small}/series/{generate_uid()}/archive.zip"),
               404)
    json_error(archive.call("GET", "rad-a", f"/api/studies/{generate_uid()}/archive.zip"), 404)


def test_an_object_missing_from_the_store_breaks_the_download_instead_of_ending_it(archive: Archive,
                                                                                   tmp_path: Path) -> None:
    """A zip whose DICOMDIR names a file it does not hold would look whole: the stream stops with an error."""
    study = generate_uid()
    sops = [archive.send_instance("MODA", PatientID="LOST-1", StudyInstanceUID=study, InstanceNumber=n,
                                  PixelData=bytes(range(256)) * 4, Rows=32, Columns=32).SOPInstanceUID
            for n in (1, 2)]
    with archive.server.ctx.read_sessions() as session:
        key = session.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sops[1]))
    store = archive.server.ctx.store
    Path(store.root, *str(key).split("/")).unlink()  # type: ignore[attr-defined]
    with pytest.raises(httpx.HTTPError):
        download(archive, "tech-a", f"/api/studies/{study}/archive.zip", tmp_path / "broken.zip")
    assert f"export of study {study} stopped at {sops[1]}" in archive.server.proc.log_path.read_text()


# -- upload ------------------------------------------------------------------------------------------------------


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def vietnamese_instances(count: int) -> tuple[str, list[bytes], list[str]]:
    study, series = generate_uid(), generate_uid()
    datasets = [make_dataset(SOPClassUID=CT, Modality="CT", StudyInstanceUID=study, SeriesInstanceUID=series,
                             PatientID="UP-VN-1", PatientName=VIETNAMESE, InstanceNumber=n)
                for n in range(1, count + 1)]
    return study, [to_bytes(ds) for ds in datasets], [ds.SOPInstanceUID for ds in datasets]


def test_upload_a_zip_with_a_vietnamese_name_then_again(archive: Archive) -> None:
    study, blobs, sops = vietnamese_instances(3)
    body = zip_of({f"Bệnh nhân/ảnh {n}.dcm": blob for n, blob in enumerate(blobs, 1)})
    response = archive.call("POST", "tech-a", "/api/studies/upload", content=body,
                            headers={"Content-Type": "application/zip"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["totals"] == {"files": 3, "stored": 3, "duplicate": 0, "refused": 0}
    assert answer["studies"] == [study]
    assert {f["entry"] for f in answer["files"]} == {f"Bệnh nhân/ảnh {n}.dcm" for n in (1, 2, 3)}
    assert {f["sop_instance_uid"] for f in answer["files"]} == set(sops)

    found = archive.call("GET", "tech-a", "/dicom-web/studies", params={"StudyInstanceUID": study})
    assert found.status_code == 200, found.text
    assert found.json()[0]["00100010"]["Value"][0]["Alphabetic"] == VIETNAMESE
    series = archive.call("GET", "tech-a", f"/dicom-web/studies/{study}/instances").json()
    assert {i["00080018"]["Value"][0] for i in series} == set(sops)
    with archive.server.ctx.read_sessions() as session:
        facility, name = session.execute(select(Study.facility, Patient.patient_name).join(Patient)
                                         .where(Study.study_instance_uid == study)).one()
    assert facility == "HOSP-A" and name == VIETNAMESE  # the uploader's facility, the name as sent
    assert archive.call("GET", "tech-b", f"/dicom-web/studies/{study}/metadata").status_code == 404

    again = archive.call("POST", "tech-a", "/api/studies/upload", content=body,
                         headers={"Content-Type": "application/zip"})
    assert again.status_code == 200 and again.json()["totals"]["duplicate"] == 3, again.text
    assert archive.audit_count("study.upload", "success", "tech-a") >= 2


def test_upload_form_with_non_dicom_and_path_like_entries(archive: Archive, tmp_path: Path) -> None:
    _study, blobs, sops = vietnamese_instances(2)
    inner = zip_of({"ok.dcm": blobs[1], "readme.txt": b"not DICOM at all", "../evil": b"evil payload",
                    "../../evil.dcm": b"DICM? no", "sub/": b""})
    files = [("files", ("single.dcm", blobs[0], "application/dicom")),
             ("files", ("bundle.zip", inner, "application/zip"))]
    response = archive.call("POST", "tech-a", "/api/studies/upload", files=files)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["totals"] == {"files": 5, "stored": 2, "duplicate": 0, "refused": 3}, answer
    by_entry = {(f["file"], f.get("entry", "")): f for f in answer["files"]}
    assert by_entry[("single.dcm", "")]["status"] == "stored"
    assert by_entry[("bundle.zip", "ok.dcm")]["status"] == "stored"
    for name in ("readme.txt", "../evil", "../../evil.dcm"):
        refused = by_entry[("bundle.zip", name)]
        assert refused["status"] == "refused" and refused["reason"] == "C000" and refused["message"], refused
    assert archive.stored_sops(sops) == set(sops)
    # nothing was written by an entry's name, here or anywhere near
    for folder in (archive.root, archive.root.parent, Path(tempfile.gettempdir())):
        assert not list(folder.glob("evil*")), folder
    assert not [p for p in archive.root.rglob("evil*")]


def test_a_corrupt_or_truncated_zip_is_refused_and_stores_nothing(archive: Archive) -> None:
    _study, blobs, sops = vietnamese_instances(3)
    good = zip_of({f"{n}.dcm": blob for n, blob in enumerate(blobs)}, compression=zipfile.ZIP_STORED)
    corrupt = bytearray(good)
    middle = good.index(blobs[2][200:260])  # inside the last entry's data: its CRC no longer matches
    corrupt[middle:middle + 16] = b"\xff" * 16
    failures_before = archive.audit_count("study.upload", "failure", "tech-a")
    bomb = io.BytesIO()  # 100 MiB of zeros in a ~100 KiB zip: refused from its central directory alone
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.dcm", "w") as fh:
        for _ in range(100):
            fh.write(bytes(MIB))
    bodies = {"corrupt": bytes(corrupt), "truncated": good[: len(good) // 2], "no zip": b"PK\x03\x04 this is no zip",
              "not a zip at all": b"hello", "bomb": bomb.getvalue()}
    for what, body in bodies.items():
        response = archive.call("POST", "tech-a", "/api/studies/upload", content=body,
                                headers={"Content-Type": "application/zip"})
        message = json_error(response, 400)
        assert "nothing was stored" in message, (what, message)
        assert what != "bomb" or "zip bomb" in message, message
    assert archive.stored_sops(sops) == set()  # not even the entries before the bad one
    assert archive.audit_count("study.upload", "failure", "tech-a") == failures_before + len(bodies)
    json_error(archive.call("POST", "tech-a", "/api/studies/upload", content=b"{}",
                            headers={"Content-Type": "application/json"}), 415)
    json_error(archive.call("POST", "patient-a", "/api/studies/upload", content=good,
                            headers={"Content-Type": "application/zip"}), 403)
    json_error(archive.call("POST", "clin-a", "/api/studies/upload", content=good,
                            headers={"Content-Type": "application/zip"}), 403)
    assert archive.stored_sops(sops) == set()


# -- send --------------------------------------------------------------------------------------------------------


def wait_all_sent(archive: Archive, study: str, expected: int) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def sent() -> bool:
        nonlocal last
        response = archive.call("GET", "tech-a", f"/api/studies/{study}/send", params={"destination": "DESTA"})
        assert response.status_code == 200, response.text
        last = response.json()
        return last["sent"] == expected and last["pending"] == 0

    wait_until(sent, timeout=90, interval=0.5, what=f"{expected} instance(s) sent to DESTA")
    return last


def received_sops(archive: Archive) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archive.dest.received()}


def test_send_a_study_to_a_registered_peer_with_progress(archive: Archive) -> None:
    archive.dest.clear()
    everything = {*archive.small_sops, archive.small_sr}
    response = archive.call("POST", "tech-a", f"/api/studies/{archive.small}/send", json={"destination": "DESTA"})
    assert response.status_code == 202, response.text
    assert response.json()["queued"] == 4
    progress = wait_all_sent(archive, archive.small, 4)
    assert progress["total"] == 4 and progress["failed"] == 0 and progress["done"] is True
    assert received_sops(archive) == everything
    assert archive.audit_count("study.send", "success", "tech-a") >= 1

    # again, one series: those jobs go back to pending and are sent again
    archive.dest.clear()
    response = archive.call("POST", "rad-a", f"/api/studies/{archive.small}/send",
                            json={"destination": "DESTA", "series": [archive.small_ct]})
    assert response.status_code == 202 and response.json()["queued"] == 3, response.text
    wait_all_sent(archive, archive.small, 4)
    assert received_sops(archive) == set(archive.small_sops)

    # the CLI, waiting with its progress bar
    archive.dest.clear()
    run = run_pacs(["study", "send", archive.small, "--to", "DESTA", "--wait", "--timeout", "90"],
                   archive.server.env)
    assert run.returncode == 0, run.stdout[-500:] + run.stderr[-1000:]
    assert "4 sent, 0 failed, 0 pending" in run.stdout
    assert received_sops(archive) == everything


def test_refusals_are_clear_and_audited(archive: Archive) -> None:
    small = archive.small
    send_path = f"/api/studies/{small}/send"
    # capability: a patient and a clinician may not send; a patient may not export
    json_error(archive.call("POST", "patient-a", send_path, json={"destination": "DESTA"}), 403)
    json_error(archive.call("POST", "clin-a", send_path, json={"destination": "DESTA"}), 403)
    json_error(archive.call("GET", "patient-a", f"/api/studies/{small}/archive.zip"), 403)
    assert archive.audit_count("access.denied", "failure", "patient-a") >= 1
    assert archive.audit_count("access.denied", "failure", "clin-a") >= 1
    # a technologist of the other facility: A's study does not exist for them
    before = (archive.audit_count("study.export", "failure", "tech-b"),
              archive.audit_count("study.send", "failure", "tech-b"))
    json_error(archive.call("GET", "tech-b", f"/api/studies/{small}/archive.zip"), 404)
    json_error(archive.call("GET", "tech-b", f"/api/studies/{small}/series/{archive.small_ct}/archive.zip"), 404)
    json_error(archive.call("POST", "tech-b", send_path, json={"destination": "DESTB"}), 404)
    json_error(archive.call("GET", "tech-b", send_path, params={"destination": "DESTB"}), 404)
    assert archive.audit_count("study.export", "failure", "tech-b") == before[0] + 2
    assert archive.audit_count("study.send", "failure", "tech-b") >= before[1] + 1
    # destinations: unknown, and one of another facility (the study would leave for a facility that may not see it)
    failures = archive.audit_count("study.send", "failure", "tech-a")
    message = json_error(archive.call("POST", "tech-a", send_path, json={"destination": "NOSUCHAE"}), 400)
    assert "not a registered AE" in message
    message = json_error(archive.call("POST", "tech-a", send_path, json={"destination": "DESTB"}), 403)
    assert "HOSP-B" in message
    json_error(archive.call("POST", "tech-a", send_path, json={"destination": "DESTA", "series": [generate_uid()]}),
               404)
    assert archive.audit_count("study.send", "failure", "tech-a") == failures + 3
    with archive.server.ctx.read_sessions() as session:  # nothing queued for DESTB
        from pacs.db.models import ForwardJob

        assert not session.scalar(select(func.count()).select_from(ForwardJob)
                                  .where(ForwardJob.destination_ae == "DESTB"))


def test_a_consultant_reads_a_consulted_study_but_may_not_export_it(archive: Archive) -> None:
    """A consult lends B's radiologist one of A's studies to read (QIDO-RS answers), not to take away: archive.zip
    is 404 for them, as for any study they cannot see, and the refusal is audited."""
    archive.add_tokens(("rad-b", "radiologist", "HOSP-B"))
    study = archive.send_instance("MODA", PatientID="CONSULT-1", PatientName="TO^VAN^HAI").StudyInstanceUID
    opened = archive.call("POST", "clin-a", f"/api/studies/{study}/consults",
                          json={"to_facility": "HOSP-B", "question": "Xin ý kiến về tổn thương gan?"})
    assert opened.status_code == 201, opened.text
    seen = archive.call("GET", "rad-b", "/dicom-web/studies", params={"StudyInstanceUID": study})
    assert seen.status_code == 200 and len(seen.json()) == 1  # the consult grants reading
    before = archive.audit_count("study.export", "failure", "rad-b")
    json_error(archive.call("GET", "rad-b", f"/api/studies/{study}/archive.zip"), 404)
    assert archive.audit_count("study.export", "failure", "rad-b") == before + 1
    assert archive.call("GET", "clin-a", f"/api/studies/{study}/archive.zip").status_code == 200
