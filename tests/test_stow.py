"""STOW-RS (issue 6): the multipart reader, then `pacs serve` (embedded) and `pacs api` + `pacs scp` +
`pacs worker` on PostgreSQL + S3 + Redis (scaled) driven over HTTP, by dicomweb-client and by DCMTK.

Must-shows marked (S) run in both configurations: dicomweb-client's ``store_instances``; every pydicom corpus
file either stored (found by QIDO-RS, stored byte for byte) or refused with a reason for its kind; a study
sent by STOW-RS found by ``findscu`` and retrieved by ``getscu``. The others run embedded: a 2 GB request
refused with 413 before it is sent (Content-Length) and a chunked body refused once it passes the limit,
both storing nothing; 415; a study UID mismatch; 401/403; an oversized part and a malformed body.

The scaled configuration is tests.support.stack.scaled_api.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select as sql_select

from pacs.context import AppContext
from pacs.db.models import AuditEvent, Instance, InstanceVersion
from pacs.dicomweb.multipart_reader import MultipartError, MultipartReader
from pacs.dicomweb.stow import StowItem, StowResult, failure_reason
from pacs.ingest import IngestOutcome, IngestStatus
from pacs.ingest.parsing import RejectReason
from pacs.security.accounts import create_token
from tests.support.corpus import corpus_files
from tests.support.datasets import dataset_bytes, make_dataset, make_instance, to_bytes
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.inprocess import register_ae
from tests.support.seaweed import SeaweedS3
from tests.support.stack import EmbeddedPacs, scaled_api

pytestmark = pytest.mark.integration

BOUNDARY = "stow-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
PREAMBLE = b"\x00" * 128 + b"DICM"
MAX_REQUEST = 4 * 1024 * 1024  # embedded server: PACS_MAX_REQUEST_BYTES
MAX_OBJECT = 1024 * 1024  # embedded server: PACS_MAX_OBJECT_BYTES
BODY_TIMEOUT_S = 5  # embedded server: PACS_HTTP_REQUEST_TIMEOUT_S
CT = "1.2.840.10008.5.1.4.1.1.2"


def multipart(parts: list[bytes], content_type: str = "application/dicom") -> bytes:
    body = b"".join(f"\r\n--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + p for p in parts)
    return body + f"\r\n--{BOUNDARY}--\r\n".encode()


# -- the multipart reader (pure) ----------------------------------------------------------------------


class _Parts:
    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], bytearray]] = []

    def begin_part(self, headers: dict[str, str]) -> None:
        self.parts.append((headers, bytearray()))

    def part_data(self, data: bytes) -> None:
        self.parts[-1][1].extend(data)

    def end_part(self) -> None:
        pass


def _read(body: bytes, boundary: str, chunk_sizes: Iterator[int]) -> list[tuple[dict[str, str], bytes]]:
    sink = _Parts()
    reader = MultipartReader(boundary, sink)
    pos = 0
    while pos < len(body):
        size = next(chunk_sizes)
        reader.feed(body[pos:pos + size])
        pos += size
    reader.close()
    return [(h, bytes(b)) for h, b in sink.parts]


def test_multipart_reader_splits_parts_whatever_the_chunking() -> None:
    """Parts that contain CRLFs, almost-boundaries and boundary-like bytes come out exactly, for chunk
    sizes from 1 byte up, with a preamble, transport padding, a part without headers and an epilogue."""
    rng = random.Random(6)
    payloads = [b"", b"\r\n", f"\r\n--{BOUNDARY[:-1]}x".encode(), f"--{BOUNDARY}".encode() + b"no CRLF before",
                bytes(rng.getrandbits(8) for _ in range(5000)), b"\r\n\r\n" * 100]
    body = b"preamble to skip\r\n"
    for i, payload in enumerate(payloads):
        head = b"" if i == 2 else f"Content-Type: application/dicom\r\nContent-Location: /p{i}\r\n".encode()
        body += f"--{BOUNDARY}  \t\r\n".encode() + head + b"\r\n" + payload + b"\r\n"
    body += f"--{BOUNDARY}--\r\nepilogue ignored --{BOUNDARY}\r\n".encode()
    for sizes in (iter(lambda: 1, None), iter(lambda: 7, None), iter(lambda: 1 << 20, None),
                  iter(lambda: rng.randint(1, 300), None)):
        parts = _read(body, BOUNDARY, sizes)
        assert [p for _, p in parts] == payloads
        assert parts[0][0] == {"content-type": "application/dicom", "content-location": "/p0"}
        assert parts[2][0] == {}
    # the first delimiter may start the body (no CRLF before it), as dicomweb-client's does not
    assert [p for _, p in _read(f"--{BOUNDARY}\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), BOUNDARY,
                                iter(lambda: 2, None))] == [b"abc"]


@pytest.mark.parametrize(("body", "message"), [
    (f"\r\n--{BOUNDARY}\r\n\r\nabc".encode(), "no closing boundary"),
    (f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom".encode(), "inside the headers"),
    (b"x" * 70_000, "no boundary delimiter"),
    (f"\r\n--{BOUNDARY}garbage\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), "malformed boundary delimiter"),
    (f"\r\n--{BOUNDARY}\r\nbad header line\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), "malformed header line"),
    (f"\r\n--{BOUNDARY}\r\nX: {'y' * 20000}\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), "headers of part 1 exceed"),
    (b"", "before its first boundary"),
])
def test_multipart_reader_refuses_malformed_bodies(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        _read(body, BOUNDARY, iter(lambda: 4096, None))


def test_multipart_reader_refuses_a_boundary_rfc2046_does_not_allow() -> None:
    for boundary in ("", "x" * 71, "bad\r\nboundary", "ends with space "):
        with pytest.raises(MultipartError, match="invalid multipart boundary"):
            MultipartReader(boundary, _Parts())


def test_failure_reasons_and_http_status_follow_ps3_18() -> None:
    """The STOW-RS table (ingest outcome -> Failure Reason) and Table 10.5.3-1 (200 / 202 / 409)."""
    cases = {IngestOutcome(IngestStatus.STORED): None, IngestOutcome(IngestStatus.DUPLICATE): None,
             IngestOutcome(IngestStatus.STORAGE_UNAVAILABLE): 0xA700,
             IngestOutcome(IngestStatus.INDEX_UNAVAILABLE): 0xA701}
    for reason, code in ((RejectReason.TOO_LARGE, 0xA702), (RejectReason.MISMATCH, 0xA900),
                         (RejectReason.NOT_DICOM, 0xC000), (RejectReason.INVALID_UID, 0xC001),
                         (RejectReason.TRUNCATED, 0xC002), (RejectReason.MISSING_ATTRIBUTE, 0xC003),
                         (RejectReason.NOT_STORABLE, 0xC004)):
        cases[IngestOutcome(IngestStatus.REJECTED, "x", reason=reason)] = code
    assert {o: failure_reason(o) for o in cases} == cases
    ok, bad = StowItem(1, "1.2", "1.3", "1.4", series_instance_uid="1.5"), StowItem(2, failure_reason=0xA700)
    assert [StowResult([ok]).http_status, StowResult([ok, bad]).http_status, StowResult([bad]).http_status] == [
        200, 202, 409]
    body = StowResult([ok, bad]).response("http://h/dicom-web")
    assert body["00081190"] == {"vr": "UR", "Value": ["http://h/dicom-web/studies/1.4"]}
    assert body["00081198"]["Value"] == [{"00081150": {"vr": "UI"}, "00081155": {"vr": "UI"},
                                          "00081197": {"vr": "US", "Value": [0xA700]}}]
    assert body["00081199"]["Value"][0]["00081190"]["Value"] == [
        "http://h/dicom-web/studies/1.4/series/1.5/instances/1.3"]


# -- servers ------------------------------------------------------------------------------------------


@dataclass
class Archive:
    mode: str
    http_url: str
    dicom_port: int
    env: dict[str, str]
    ctx: AppContext  # the test's own view of the same index and store

    def token(self, role: str, name: str, facility: str = "") -> str:
        """An API token made with the accounts service `pacs token create` uses (no CLI process per token)."""
        with self.ctx.sessions() as session, session.begin():
            return create_token(session, name, role, days=1, facility=facility).secret

    def instance(self, sop: str) -> Instance | None:
        with self.ctx.sessions() as session:
            return session.scalars(sql_select(Instance).where(Instance.sop_instance_uid == sop)).one_or_none()

    def stored_keys(self, sop: str) -> dict[str, str]:
        """sha256 -> object key of every stored version (current and prior) of an instance."""
        with self.ctx.sessions() as session:
            rows = session.execute(sql_select(Instance.sha256, Instance.object_key)
                                   .where(Instance.sop_instance_uid == sop)).all()
            rows += session.execute(sql_select(InstanceVersion.sha256, InstanceVersion.object_key)
                                    .where(InstanceVersion.sop_instance_uid == sop)).all()
        return dict(rows)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    server = EmbeddedPacs(tmp_path_factory.mktemp("stow-embedded"),
                          {"PACS_MAX_REQUEST_BYTES": str(MAX_REQUEST), "PACS_MAX_OBJECT_BYTES": str(MAX_OBJECT),
                           "PACS_HTTP_REQUEST_TIMEOUT_S": str(BODY_TIMEOUT_S)})
    try:
        yield Archive("embedded", server.http_url, server.port, server.env, server.ctx)
    finally:
        server.close()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedS3) -> Iterator[Archive]:
    """`pacs api` + `pacs scp` + `pacs worker` on PostgreSQL, the S3 server and Redis."""
    stack = scaled_api(tmp_path_factory.mktemp("stow-scaled"), s3_server)
    try:
        yield Archive("scaled", stack.http_url, stack.port, stack.env, stack.ctx)
    finally:
        stack.close()


@pytest.fixture(scope="module", params=["embedded", "scaled"])
def archive(request: pytest.FixtureRequest) -> Archive:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def tech_token(archive: Archive) -> str:
    return archive.token("technologist", name=f"stow-tech-{archive.mode}")


@pytest.fixture(scope="module")
def embedded_token(embedded: Archive) -> str:
    return embedded.token("technologist", name="stow-tech")


def stow(archive: Archive, token: str, body: bytes, study: str | None = None,
         content_type: str = MULTIPART) -> httpx.Response:
    url = f"{archive.http_url}/dicom-web/studies" + (f"/{study}" if study else "")
    return httpx.post(url, content=body, timeout=120,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": content_type,
                               "Accept": "application/dicom+json"})


def response_dataset(response: httpx.Response) -> Dataset:
    assert response.headers["content-type"] == "application/dicom+json", response.text[:300]
    return Dataset.from_json(response.json())


def study_datasets(count: int, **attrs: object) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=i + 1, **attrs)
            for i in range(count)]


# -- (S) dicomweb-client --------------------------------------------------------------------------------


def test_dicomweb_client_store_instances(archive: Archive, tech_token: str) -> None:
    """(S) dicomweb-client's store_instances: every instance in the Referenced SOP Sequence with its Retrieve
    URL; stored byte for byte (pydicom writes a dataset built in memory without the 128-byte preamble: we add
    exactly that); found by QIDO-RS and retrievable by WADO-RS; audited under the token's name and role."""
    datasets = study_datasets(3, PatientID="STOW-DWC", PatientName="STOW^CLIENT", Modality="CT", SOPClassUID=CT)
    study = datasets[0].StudyInstanceUID
    client = DICOMwebClient(url=f"{archive.http_url}/dicom-web", headers={"Authorization": f"Bearer {tech_token}"})
    sent = {}
    for ds in datasets:
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds)
        sent[ds.SOPInstanceUID] = buf.getvalue()
    response = client.store_instances(datasets[:2])
    assert "FailedSOPSequence" not in response
    # URLs are built from the Host header; dicomweb-client sends one without the port, hence paths only
    assert urlsplit(response.RetrieveURL).path == f"/dicom-web/studies/{study}"
    refs = {item.ReferencedSOPInstanceUID: item for item in response.ReferencedSOPSequence}
    assert set(refs) == {ds.SOPInstanceUID for ds in datasets[:2]}
    response = client.store_instances(datasets[2:], study_instance_uid=study)  # POST /studies/{study}
    refs.update({item.ReferencedSOPInstanceUID: item for item in response.ReferencedSOPSequence})
    for ds in datasets:
        item = refs[ds.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == CT
        assert urlsplit(item.RetrieveURL).path == (f"/dicom-web/studies/{study}/series/"
                                                   f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
        row = archive.instance(ds.SOPInstanceUID)
        assert row is not None and row.source == "stow"
        assert archive.ctx.store.get_bytes(row.object_key) == PREAMBLE + sent[ds.SOPInstanceUID]
    found = client.search_for_instances(study_instance_uid=study)
    assert sorted(r["00080018"]["Value"][0] for r in found) == sorted(sent)
    retrieved = client.retrieve_instance(study, datasets[0].SeriesInstanceUID, datasets[0].SOPInstanceUID)
    assert retrieved.PixelData == datasets[0].PixelData and retrieved.PatientID == "STOW-DWC"
    with archive.ctx.sessions() as session:
        events = session.scalars(sql_select(AuditEvent).where(AuditEvent.study_instance_uid == study)).all()
    stores = [e for e in events if e.action == "instance.store"]
    assert len(stores) == 3
    assert {(e.actor, e.role) for e in stores} == {(f"token:stow-tech-{archive.mode}", "technologist")}
    assert all("transport=stow" in e.detail and e.patient_id == "STOW-DWC" for e in stores)
    summaries = [e for e in events if e.action == "stow"]
    assert [(e.outcome, e.actor) for e in summaries] == [("success", f"token:stow-tech-{archive.mode}")] * 2
    assert "stored=2 failed=0" in summaries[0].detail and "stored=1 failed=0" in summaries[1].detail


# -- (S) the pydicom corpus ----------------------------------------------------------------------------


def _expected_refusal(path: Path, data: bytes) -> tuple[int, str] | None:
    """What STOW-RS must say about a corpus file, decided with pydicom (not our parser): None when it is a
    storable PS3.10 instance, else (Failure Reason, a phrase the Error Comment must hold)."""
    if data[128:132] != b"DICM" and data[:2] != b"\x02\x00":
        try:
            bare = pydicom.dcmread(io.BytesIO(data), force=True)
            is_dataset = "SOPInstanceUID" in bare and "SOPClassUID" in bare
        except Exception:
            is_dataset = False
        return (0xC000, "no File Meta") if is_dataset else (0xC000, "not a DICOM")
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
        return 0xC004, "DICOMDIR"
    if "truncated" in path.name:
        return 0xC002, "truncated"
    if "TransferSyntaxUID" not in ds.file_meta:
        return 0xC000, "Transfer Syntax"
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "")).strip():
            return 0xC003, f"missing {keyword}"
    return None


def test_every_corpus_file_is_stored_byte_for_byte_or_refused_with_its_reason(archive: Archive,
                                                                               tech_token: str) -> None:
    """(S) All pydicom test files in one STOW-RS request (2.6 MB), each a part. The response lists the stored
    ones in the Referenced SOP Sequence and the refused ones in the Failed SOP Sequence, both in request
    order, so each item is matched to its file. Stored: found by QIDO-RS, bytes in the store exactly (a later
    file with the same SOP Instance UID keeps the earlier one as a prior version). Refused: the Failure Reason
    and an Error Comment for its kind: no File Meta Information, not DICOM, truncated, missing UID, DICOMDIR."""
    files = [(path, path.read_bytes()) for path in corpus_files()]
    expected = [(path, data, _expected_refusal(path, data)) for path, data in files]
    response = stow(archive, tech_token, multipart([data for _, data in files]))
    assert response.status_code == 202, response.text[:500]
    result = response_dataset(response)
    to_store = [(path, data) for path, data, refusal in expected if refusal is None]
    to_refuse = [(path, data, refusal) for path, data, refusal in expected if refusal is not None]
    assert len(result.ReferencedSOPSequence) == len(to_store) and len(result.FailedSOPSequence) == len(to_refuse), (
        [i.ReferencedSOPInstanceUID for i in result.FailedSOPSequence])
    stored: dict[str, list[bytes]] = {}
    for (path, data), item in zip(to_store, result.ReferencedSOPSequence, strict=True):
        sop = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True).SOPInstanceUID)
        assert item.ReferencedSOPInstanceUID == sop, path.name
        stored.setdefault(sop, []).append(data)
    problems, kinds = [], set()
    for (path, _, (reason, phrase)), item in zip(to_refuse, result.FailedSOPSequence, strict=True):
        comment = str(item[0x0000, 0x0902].value) if (0x0000, 0x0902) in item else ""
        if item.FailureReason != reason or phrase.lower() not in comment.lower():
            problems.append(f"{path.name}: expected {reason:04X} '{phrase}', got {item.FailureReason:04X} {comment!r}")
        kinds.add(phrase.split()[0])
    assert not problems, "\n".join(problems)
    assert kinds >= {"no", "not", "truncated", "missing", "DICOMDIR"}, kinds  # every kind of refusal was seen
    assert len(stored) > 100
    by_series: dict[tuple[str, str], set[str]] = {}
    for sop, versions in stored.items():
        ds = pydicom.dcmread(io.BytesIO(versions[-1]), stop_before_pixels=True)
        by_series.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), set()).add(sop)
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {tech_token}"}) as http:
        for (study, series), sops in by_series.items():
            found = http.get(f"{archive.http_url}/dicom-web/studies/{study}/series/{series}/instances",
                             params={"SOPInstanceUID": ",".join(sorted(sops))})
            assert found.status_code == 200, found.text[:300]
            assert {r["00080018"]["Value"][0] for r in found.json()} == sops
    for sop, versions in stored.items():
        keys = archive.stored_keys(sop)
        for data in versions:
            digest = hashlib.sha256(data).hexdigest()
            assert digest in keys, f"{sop}: a sent version is not stored"
            assert archive.ctx.store.get_bytes(keys[digest]) == data
        row = archive.instance(sop)
        assert row is not None and row.sha256 == hashlib.sha256(versions[-1]).hexdigest()


# -- (S) DCMTK findscu / getscu --------------------------------------------------------------------------


def test_stow_study_is_found_by_findscu_and_retrieved_by_getscu(archive: Archive, tech_token: str,
                                                                 tmp_path: Path) -> None:
    """(S) A study sent by STOW-RS is a study like any other for DIMSE peers: findscu finds it, getscu
    receives its instances with the dataset bytes that were posted."""
    datasets = study_datasets(2, PatientID="STOW-DIMSE", Modality="CT", SOPClassUID=CT)
    study = datasets[0].StudyInstanceUID
    files = {ds.SOPInstanceUID: to_bytes(ds) for ds in datasets}
    response = stow(archive, tech_token, multipart(list(files.values())))
    assert response.status_code == 200, response.text[:500]
    register_ae(archive.ctx, "STOWSCU", "127.0.0.1", 104, archive_wide=True)
    find = _dcmtk("findscu", archive, ["-S", "-aet", "STOWSCU", "-aec", "PACS", "-k", "QueryRetrieveLevel=STUDY",
                                       "-k", f"StudyInstanceUID={study}", "-k", "PatientID",
                                       "-k", "NumberOfStudyRelatedInstances"])
    assert find.returncode == 0, find.stdout + find.stderr
    output = find.stdout + find.stderr
    assert study in output and "STOW-DIMSE" in output and "[2 ]" in output, output[-2000:]
    out = tmp_path / "get"
    out.mkdir()
    get = _dcmtk("getscu", archive, ["-S", "+B", "-aet", "STOWSCU", "-aec", "PACS", "-od", str(out),
                                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"])
    assert get.returncode == 0, (get.stdout + get.stderr)[-2000:]
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    assert sorted(received) == sorted(files)
    for sop, path in received.items():
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(files[sop])


def _dcmtk(tool: str, archive: Archive, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(tool), "-v", *args, "127.0.0.1", str(archive.dicom_port)], capture_output=True,
                          text=True, env=dcmtk_env(), timeout=120)


# -- request size: 413 before the body is sent, nothing stored (embedded) ---------------------------------


@dataclass
class RawResult:
    status: int
    body: bytes
    sent: int  # body bytes the client managed to send before the answer


def raw_post(url: str, path: str, headers: dict[str, str], body: Iterator[bytes], timeout: float = 60) -> RawResult:
    """POST over a plain socket, sending body chunks until the server answers (as a client that does not
    wait for the whole body to be accepted would): the test sees how much had gone out by then."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((head + "\r\n").encode())
    sock.setblocking(False)
    sent, pending, response = 0, b"", b""
    deadline = time.monotonic() + timeout
    body_done = False
    try:
        while time.monotonic() < deadline and not _complete(response):
            writers = [sock] if not body_done else []
            readable, writable, _ = select.select([sock], writers, [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                response += data
                continue
            if writable:
                if not pending:
                    pending = next(body, b"")
                    if not pending:
                        body_done = True
                        continue
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    body_done = True  # the server closed its side: read what it said
                    continue
                sent += n
                pending = pending[n:]
    finally:
        sock.close()
    head_bytes, _, rest = response.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1]) if head_bytes.startswith(b"HTTP/1.1 ") else 0
    return RawResult(status, rest, sent)


def _complete(response: bytes) -> bool:
    head, sep, rest = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return False


def _filler(first: bytes, total: int, chunked: bool) -> Iterator[bytes]:
    """``total`` bytes of a multipart body: a first part holding a valid instance, then a part of zeros."""
    lead = (f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + first
            + f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())

    def frame(chunk: bytes) -> bytes:
        return f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk

    yield frame(lead)
    left = total - len(lead)
    block = b"\x00" * (1024 * 1024)
    while left > 0:
        yield frame(block[:left])
        left -= len(block)
    if chunked:
        yield b"0\r\n\r\n"


def test_two_gigabyte_request_is_refused_before_it_is_sent(embedded: Archive, embedded_token: str) -> None:
    """Content-Length: 2 GB → 413 as soon as the headers arrive; the client had sent a few MB at most, and the
    valid instance at the start of the body is not stored."""
    ds = make_dataset()
    size = 2 * 1024**3
    result = raw_post(embedded.http_url, "/dicom-web/studies",
                      {"Authorization": f"Bearer {embedded_token}", "Content-Type": MULTIPART,
                       "Content-Length": str(size)}, _filler(to_bytes(ds), size, chunked=False))
    assert result.status == 413, result
    assert json.loads(result.body)["code"] == "payload_too_large"
    assert result.sent < 64 * 1024 * 1024, f"{result.sent} bytes went out before the 413"
    assert embedded.instance(ds.SOPInstanceUID) is None


def test_chunked_body_over_the_limit_is_refused_once_it_passes_it(embedded: Archive, embedded_token: str) -> None:
    """No Content-Length (chunked): 413 once the body passes PACS_MAX_REQUEST_BYTES (4 MiB here), long before
    the client's 2 GB are sent; the complete, valid first part is not stored either."""
    ds = make_dataset()
    result = raw_post(embedded.http_url, "/dicom-web/studies",
                      {"Authorization": f"Bearer {embedded_token}", "Content-Type": MULTIPART,
                       "Transfer-Encoding": "chunked"}, _filler(to_bytes(ds), 2 * 1024**3, chunked=True))
    assert result.status == 413, result
    assert "exceeds the limit" in json.loads(result.body)["message"]
    assert MAX_REQUEST < result.sent < 64 * 1024 * 1024, f"{result.sent} bytes went out before the 413"
    assert embedded.instance(ds.SOPInstanceUID) is None


def test_a_body_that_stalls_gets_408_and_stores_nothing(embedded: Archive, embedded_token: str) -> None:
    """A client that sends one complete instance and then nothing more (slowloris) is answered 408 after
    PACS_HTTP_REQUEST_TIMEOUT_S (5 s here) and the instance it did send is not stored."""
    ds = make_dataset()
    first = f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(ds)
    parts = urlsplit(embedded.http_url)
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(f"POST /dicom-web/studies HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     f"Authorization: Bearer {embedded_token}\r\nContent-Type: {MULTIPART}\r\n"
                     f"Content-Length: {len(first) + 100}\r\n\r\n".encode() + first)
        response = b""
        while not _complete(response) and (data := sock.recv(65536)):
            response += data
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert BODY_TIMEOUT_S <= time.monotonic() - started < BODY_TIMEOUT_S + 30
    assert embedded.instance(ds.SOPInstanceUID) is None


# -- refusals (embedded) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "",
                                          'multipart/related; type="application/dicom+json"; boundary=x',
                                          "multipart/form-data; boundary=x"])
def test_wrong_content_type_is_415_and_stores_nothing(embedded: Archive, embedded_token: str,
                                                      content_type: str) -> None:
    data = make_instance()
    response = stow(embedded, embedded_token, multipart([data]) if "boundary" in content_type else data,
                    content_type=content_type)
    assert response.status_code == 415, response.text
    assert response.json()["code"] == "unsupported_media_type"
    assert embedded.instance(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID) is None


def test_bare_application_dicom_body_stores_one_instance(embedded: Archive, embedded_token: str) -> None:
    """One instance as the whole body (Content-Type: application/dicom) is stored; a client that accepts only
    XML answers gets 406 before its body is read."""
    ds = make_dataset()
    response = httpx.post(f"{embedded.http_url}/dicom-web/studies", content=to_bytes(ds), timeout=60,
                          headers={"Authorization": f"Bearer {embedded_token}", "Content-Type": "application/dicom",
                                   "Accept": "application/dicom+xml"})
    assert response.status_code == 406 and embedded.instance(ds.SOPInstanceUID) is None
    response = stow(embedded, embedded_token, to_bytes(ds), content_type="application/dicom")
    assert response.status_code == 200, response.text
    assert response_dataset(response).ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    row = embedded.instance(ds.SOPInstanceUID)
    assert row is not None and embedded.ctx.store.get_bytes(row.object_key) == to_bytes(ds)


def test_instances_of_another_study_than_the_url_fail_with_a900_and_are_not_stored(
        embedded: Archive, embedded_token: str) -> None:
    ours = study_datasets(1)[0]
    others = study_datasets(2)
    body = multipart([to_bytes(ds) for ds in others])
    response = stow(embedded, embedded_token, body, study=ours.StudyInstanceUID)
    assert response.status_code == 409, response.text
    result = response_dataset(response)
    assert result.RetrieveURL.endswith(f"/dicom-web/studies/{ours.StudyInstanceUID}")
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in result.FailedSOPSequence] == [
        (ds.SOPInstanceUID, 0xA900) for ds in others]
    assert "study" in str(result.FailedSOPSequence[0][0x0000, 0x0902].value).lower()
    assert all(embedded.instance(ds.SOPInstanceUID) is None for ds in others)
    # mixed: the matching instance is stored (202), the other is not
    response = stow(embedded, embedded_token, multipart([to_bytes(ours), to_bytes(others[0])]),
                    study=ours.StudyInstanceUID)
    assert response.status_code == 202, response.text
    result = response_dataset(response)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [ours.SOPInstanceUID]
    assert [i.FailureReason for i in result.FailedSOPSequence] == [0xA900]
    assert embedded.instance(ours.SOPInstanceUID) is not None and embedded.instance(others[0].SOPInstanceUID) is None
    assert stow(embedded, embedded_token, body, study="1.2.x").status_code == 400


def test_without_token_401_and_without_study_store_403(embedded: Archive) -> None:
    ds = make_dataset()
    response = httpx.post(f"{embedded.http_url}/dicom-web/studies", content=multipart([to_bytes(ds)]),
                          headers={"Content-Type": MULTIPART}, timeout=60)
    assert response.status_code == 401 and response.json()["code"] == "unauthenticated"
    clinician = embedded.token("clinician", name="stow-clinician")
    response = stow(embedded, clinician, multipart([to_bytes(ds)]))
    assert response.status_code == 403 and "study.store" in response.json()["message"]
    assert embedded.instance(ds.SOPInstanceUID) is None


def test_oversized_and_foreign_parts_fail_alone_and_malformed_bodies_store_nothing(
        embedded: Archive, embedded_token: str) -> None:
    """A part over PACS_MAX_OBJECT_BYTES (1 MiB here) → A702, a JSON part → C000, a bare dataset → C000;
    the valid part beside them is stored (202). A body cut before its closing boundary → 400, nothing stored."""
    good, big, bare = make_dataset(), make_dataset(Rows=1024, Columns=1024), make_dataset()
    big.PixelData = b"\x01" * (1024 * 1024)
    body = (f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(good)
            + f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + to_bytes(big)
            + f"\r\n--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n".encode() + b'{"00100010": {}}'
            + f"\r\n--{BOUNDARY}\r\n\r\n".encode() + dataset_bytes(to_bytes(bare))
            + f"\r\n--{BOUNDARY}--".encode())
    response = stow(embedded, embedded_token, body)
    assert response.status_code == 202, response.text
    result = response_dataset(response)
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [good.SOPInstanceUID]
    failed = [(i.ReferencedSOPInstanceUID, i.FailureReason, str(i[0x0000, 0x0902].value))
              for i in result.FailedSOPSequence]
    assert failed[0][:2] == (big.SOPInstanceUID, 0xA702) and "exceeds" in failed[0][2]
    assert failed[1][1] == 0xC000 and "application/json" in failed[1][2]
    assert failed[2][:2] == (bare.SOPInstanceUID, 0xC000) and "File Meta" in failed[2][2]
    assert embedded.instance(big.SOPInstanceUID) is None and embedded.instance(bare.SOPInstanceUID) is None
    cut = multipart([make_instance(SOPInstanceUID=(sop := generate_uid()))])[:-8]
    response = stow(embedded, embedded_token, cut)
    assert response.status_code == 400 and "closing boundary" in response.json()["message"]
    assert embedded.instance(sop) is None
    response = stow(embedded, embedded_token, multipart([]))
    assert response.status_code == 400 and "no instance" in response.json()["message"]
