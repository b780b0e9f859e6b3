"""C-FIND end to end and the association policy.

`pacs serve` (embedded) and the scaled `pacs scp` (PostgreSQL, S3, Redis broker) are started as
real processes, loaded with the archive of tests/test_query_engine.py by DCMTK's storescu (from an
unregistered AE: storage stays open), and queried by DCMTK's findscu from an AE registered with
`pacs ae add`. Pure policy decisions and the adapter's decoding and cancel handling are checked
first, without a server.
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_scp import find_service
from pacs.ae_access import RegisteredAE, Service, decide, host_matches, service_of
from pacs.errors import IndexUnavailable
from pacs.security.principal import UNRESTRICTED
from tests.support.datasets import to_bytes
from tests.support.dcmtk import dcmtk, dcmtk_env, echoscu, storescu
from tests.support.fault_proxy import FaultProxy
from tests.support.inprocess import register_ae
from tests.support.pacs_process import PacsProcess
from tests.support.query_archive import PATIENTS, STUDIES, UID_ROOT, archive_datasets
from tests.support.stack import EmbeddedPacs, ScaledStack
from tests.support.tiers import starts_servers

FIND = str(StudyRootQueryRetrieveInformationModelFind)
P_FIND = str(PatientRootQueryRetrieveInformationModelFind)
MOVE = str(StudyRootQueryRetrieveInformationModelMove)
CT = str(CTImageStorage)
ECHO = str(Verification)
MWL, MPPS, COMMIT = str(ModalityWorklistInformationFind), str(ModalityPerformedProcedureStep), \
    str(StorageCommitmentPushModel)


# -- the policy, decided without a network ----------------------------------------------------------

def test_services_are_classified_by_sop_class() -> None:
    assert [service_of(u) for u in (ECHO, CT, FIND, P_FIND, MWL, MOVE, MPPS, COMMIT, "1.2.3.4")] == [
        Service.VERIFICATION, Service.STORE, Service.QUERY, Service.QUERY, Service.QUERY, Service.RETRIEVE,
        Service.OTHER, Service.OTHER, Service.OTHER]


@pytest.mark.parametrize("syntaxes", [[FIND], [ECHO, FIND], [CT, FIND], [MOVE], [MWL], [MPPS], [COMMIT]])
def test_unknown_aes_may_not_query_retrieve_or_use_the_ris_services(syntaxes: list[str]) -> None:
    decision = decide("STRANGER", "10.0.0.9", syntaxes, None)
    assert not decision.accept and decision.reject == (1, 1, 3)
    assert "STRANGER" in decision.reason


def test_unknown_aes_may_echo_and_store_unless_configured_otherwise() -> None:
    assert decide("STRANGER", "10.0.0.9", [ECHO, CT], None).accept
    assert decide("STRANGER", "10.0.0.9", [CT], None, accept_unknown_store_aes=False).reject == (1, 1, 3)
    mixed = decide("STRANGER", "10.0.0.9", [ECHO, CT], None, accept_unknown_store_aes=False)
    assert mixed.accept and mixed.refused == {CT}


def test_registered_aes_get_what_their_flags_allow() -> None:
    full = decide("VIEWER", "10.0.0.9", [FIND, MOVE, CT, MWL, MPPS], RegisteredAE("VIEWER", "10.0.0.5"))
    assert full.accept and full.refused == frozenset()
    no_query = RegisteredAE("CT01", "10.0.0.5", allow_query=False)
    only_find = decide("CT01", "10.0.0.5", [FIND], no_query)
    assert not only_find.accept and only_find.reject == (1, 1, 1) and "query" in only_find.reason
    mixed = decide("CT01", "10.0.0.5", [ECHO, CT, FIND, MWL], no_query)
    assert mixed.accept and mixed.refused == {FIND, MWL}  # it may still echo and store
    no_store = RegisteredAE("CT01", "10.0.0.5", allow_store=False)
    assert decide("CT01", "10.0.0.5", [CT], no_store).reject == (1, 1, 1)
    no_retrieve = RegisteredAE("CT01", "10.0.0.5", allow_retrieve=False)
    assert decide("CT01", "10.0.0.5", [FIND, MOVE], no_retrieve).refused == {MOVE}


def test_check_host_treats_an_ae_from_elsewhere_as_unknown() -> None:
    ae = RegisteredAE("VIEWER", "10.0.0.5", check_host=True)
    assert decide("VIEWER", "10.0.0.5", [FIND], ae).accept
    assert decide("VIEWER", "::ffff:10.0.0.5", [FIND], ae).accept
    impostor = decide("VIEWER", "10.0.0.6", [FIND], ae)
    assert not impostor.accept and impostor.reject == (1, 1, 3) and "10.0.0.6" in impostor.reason
    assert decide("VIEWER", "10.0.0.6", [CT], ae).accept  # storage stays open to unknown AEs by default
    named = RegisteredAE("VIEWER", "viewer.ward", check_host=True)
    resolve = {"viewer.ward": {"10.0.0.7"}}.get
    assert decide("VIEWER", "10.0.0.7", [FIND], named, resolve=lambda h: resolve(h) or set()).accept
    assert not decide("VIEWER", "10.0.0.8", [FIND], named, resolve=lambda h: resolve(h) or set()).accept
    assert host_matches("localhost", "127.0.0.1") and not host_matches("", "127.0.0.1")


# -- the adapter, without a network -----------------------------------------------------------------

def _raw_identifier(ds: Dataset, implicit: bool = False, tail: bytes = b"") -> Dataset:
    """``ds`` (then the raw ``tail`` elements) as pynetdicom hands it over: parsed lazily from the bytes."""
    from pynetdicom.dsutils import decode, encode

    encoded = encode(ds, implicit, True)
    assert encoded is not None
    return decode(io.BytesIO(encoded + tail), implicit, True)


def test_identifier_values_are_decoded_with_their_character_set() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.add_new(0x00080052, "CS", b"study")
    ds.PatientName = "Nguyễn^Văn*"
    ds.StudyInstanceUID = ["1.2.3", "1.2.4"]
    ds.ReferencedStudySequence = []
    ds.add_new(0x00111010, "LO", "private")
    series_number = struct.pack("<HHI", 0x0020, 0x0011, 4) + b"abc "  # not a number: the engine refuses it
    identifier = find_service.read_identifier(_raw_identifier(ds, implicit=True, tail=series_number))
    assert identifier.level == "STUDY"
    assert identifier.filters == {"PatientName": "Nguyễn^Văn*", "StudyInstanceUID": "1.2.3\\1.2.4",
                                  "SeriesNumber": "abc"}
    assert identifier.returns == ["ReferencedStudySequence"] and identifier.echo_empty == []
    latin1 = Dataset()
    latin1.SpecificCharacterSet = "ISO_IR 100"
    latin1.add_new(0x00100010, "PN", "Trần^Bình".encode())  # UTF-8 bytes under the Latin-1 label
    assert find_service.read_identifier(_raw_identifier(latin1)).filters["PatientName"] == "Trần^Bình"


class _StubEngine:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows, self.closed = rows, False

    def search(self, query: Any) -> Any:
        engine = self

        class Result:
            def __iter__(self) -> Iterator[dict[str, Any]]:
                try:
                    yield from engine.rows
                finally:
                    engine.closed = True
        return Result()


@dataclass
class _FakeEvent:
    identifier: Dataset
    cancel_after: int = 10**6
    asked: int = 0
    assoc: Any = field(default_factory=lambda: SimpleNamespace(requestor=SimpleNamespace(ae_title="QUERYSCU")))
    request: Any = field(default_factory=lambda: SimpleNamespace(AffectedSOPClassUID=FIND))

    @property
    def is_cancelled(self) -> bool:
        self.asked += 1
        return self.asked > self.cancel_after


def test_cancel_stops_the_responses_and_releases_the_query() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    engine = _StubEngine([{"StudyInstanceUID": f"1.2.{i}"} for i in range(50)])
    ctx = SimpleNamespace(settings=SimpleNamespace(assume_utf8_for_latin1=True, ae_title="PACS"))
    event = _FakeEvent(ds, cancel_after=2)
    responses = list(find_service.handle_find(event, engine, ctx, lambda ae, address: UNRESTRICTED))  # type: ignore[arg-type]
    assert [r[0] for r in responses] == [0xFF00, 0xFF00, 0xFE00] and engine.closed
    first = responses[0][1]
    assert first.SpecificCharacterSet == "ISO_IR 192" and first.QueryRetrieveLevel == "STUDY"
    assert first.RetrieveAETitle == "PACS" and first.StudyInstanceUID == "1.2.0"


def test_an_unreadable_index_is_out_of_resources() -> None:
    class Down:
        def search(self, query: Any) -> Any:
            def rows() -> Iterator[dict[str, Any]]:
                raise IndexUnavailable("index database unavailable")
                yield {}
            return rows()

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ctx = SimpleNamespace(settings=SimpleNamespace(assume_utf8_for_latin1=True, ae_title="PACS"))
    responses = list(find_service.handle_find(_FakeEvent(ds), Down(), ctx,  # type: ignore[arg-type]
                                              lambda ae, address: UNRESTRICTED))
    assert len(responses) == 1 and responses[0][0].Status == 0xA700
    assert responses[0][0].ErrorComment == "index database unavailable"


def test_c_find_is_dispatched_by_sop_class_between_services(tmp_path: Path) -> None:
    """pynetdicom keeps one C-FIND handler: the server binds a dispatcher for Query/Retrieve and the worklist."""
    from dicom_scp.server import _dispatch, service_bindings
    from pacs.context import AppContext
    from pacs.settings import Settings

    ctx = AppContext.create(Settings(data_dir=tmp_path))
    try:
        finds = [b for b in service_bindings(ctx, object()) if b[0] is evt.EVT_C_FIND]  # type: ignore[arg-type]
    finally:
        ctx.close()
    assert len(finds) == 1 and finds[0][1] is _dispatch  # Q/R FIND and the worklist share the event
    routes = finds[0][2][0]
    by_syntax = {syntax: handler for syntaxes, handler, _ in routes for syntax in syntaxes}
    assert by_syntax[FIND] is find_service.handle_find and by_syntax[P_FIND] is find_service.handle_find
    assert by_syntax[MWL] is not find_service.handle_find


# -- end to end -------------------------------------------------------------------------------------

@dataclass
class Server:
    kind: str
    port: int
    env: dict[str, str]
    proc: PacsProcess
    db_proxy: FaultProxy | None = None  # scaled: the SCP reaches PostgreSQL through it


def _start(kind: str, root: Path, request: pytest.FixtureRequest) -> EmbeddedPacs | ScaledStack:
    if kind == "embedded":
        return EmbeddedPacs(root)
    # no worker listens: derived work waits in the stack's own Redis queue (deleted when it closes)
    s3_url = request.getfixturevalue("s3_server").url_for(f"cfind-{uuid.uuid4().hex[:8]}")
    return ScaledStack(root, s3_url, db_proxy=True).up("scp")


@pytest.fixture(scope="module", params=["embedded", "scaled"])
@starts_servers
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(f"cfind-{request.param}")
    with _start(request.param, root, request) as archive:
        proc = archive.proc if isinstance(archive, EmbeddedPacs) else archive.scp
        files = []
        for i, ds in enumerate(archive_datasets()):
            files.append(root / f"{i:03d}.dcm")
            files[-1].write_bytes(to_bytes(ds))
        sent = storescu(archive.port, files, aet="MODALITY")  # not registered: storage is open by default
        assert sent.success and sent.returncode == 0, sent.output[-2000:]
        for title, query in (("QUERYSCU", True), ("NOQUERY", False)):
            register_ae(archive.ctx, title, "127.0.0.1", 104, archive_wide=True, query=query)
        yield Server(request.param, archive.port, archive.env, proc, getattr(archive, "db_proxy", None))
        assert proc.alive(), proc.log_tail()


@dataclass
class FindResult:
    returncode: int
    status: int | None  # the final response's status; None when no association
    comment: str
    responses: list[Dataset]
    output: str

    def uids(self, keyword: str = "StudyInstanceUID") -> list[str]:
        return sorted(str(r.get(keyword, "")) for r in self.responses)


_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")
_COMMENT = re.compile(r"\(0000,0902\)\s+LO\s+\[([^\]]*)\]")


def findscu(server: Server, tmp: Path, keys: list[str], model: str = "-S", aet: str = "QUERYSCU",
            query_file: Path | None = None) -> FindResult:
    out = tmp / f"rsp-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    cmd = [dcmtk("findscu"), "-d", model, "-aet", aet, "-aec", "PACS", "-X", "-od", str(out)]
    for key in keys:
        cmd += ["-k", key]
    cmd += ["127.0.0.1", str(server.port)] + ([str(query_file)] if query_file else [])
    proc = subprocess.run(cmd, capture_output=True, env=dcmtk_env(), timeout=60)
    output = (proc.stdout + proc.stderr).decode("utf-8", errors="replace")
    statuses = _STATUS.findall(output)
    comments = _COMMENT.findall(output)
    responses = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return FindResult(proc.returncode, int(statuses[-1], 16) if statuses else None,
                      comments[-1].strip() if comments else "", responses, output)


def uid(key: str) -> str:
    return STUDIES[key].uid


def uids(*keys: str) -> list[str]:
    return sorted(uid(k) for k in keys)


@pytest.mark.parametrize(("keys", "expected"), [
    (["PatientID=VN001"], ["S1", "S2"]),
    (["PatientID=VN00*"], ["S1", "S2", "S3"]),
    (["StudyDate=20260101-20260228"], ["S1", "S2"]),
    (["StudyDate=20260201-"], ["S2", "S4"]),
    ([f"StudyInstanceUID={UID_ROOT}.1\\{UID_ROOT}.4"], ["S1", "S4"]),
    (["ModalitiesInStudy=MR"], ["S1", "S5"]),
    (["AccessionNumber=XR-00?"], ["S4", "S5"]),
    (["PatientName=nguyen^van an"], ["S1", "S2"]),  # unaccented, lower case: finds 'Nguyễn^Văn An'
    (["SpecificCharacterSet=ISO_IR 192", "PatientName=NGUYỄN^THỊ*"], ["S3"]),  # accented: finds 'NGUYEN^THI HA'
    (["SpecificCharacterSet=ISO_IR 100", "PatientName=Nguyễn*"], ["S1", "S2", "S3"]),  # UTF-8 sent as Latin-1
    (["PatientName=Smith", "StudyDate=-20251231"], []),
])
def test_study_level_matches(server: Server, tmp_path: Path, keys: list[str], expected: list[str]) -> None:
    result = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys])
    assert result.returncode == 0 and result.status == 0, result.output[-3000:]
    assert result.uids() == uids(*expected)


def test_study_responses_carry_the_requested_keys_in_utf8(server: Server, tmp_path: Path) -> None:
    result = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY", "PatientID=VN001", "PatientName",
                                        "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                                        "NumberOfStudyRelatedInstances", "StudyDescription", "InstitutionAddress",
                                        "ReferencedStudySequence"])
    assert result.status == 0, result.output[-3000:]
    first = {str(r.StudyInstanceUID): r for r in result.responses}[uid("S1")]
    assert first.SpecificCharacterSet == "ISO_IR 192" and first.QueryRetrieveLevel == "STUDY"
    assert str(first.PatientName) == "Nguyễn^Văn An" and first.StudyDescription == "CT Ngực"
    assert first.StudyDate == "20260105" and list(first.ModalitiesInStudy) == ["CT", "MR"]
    assert (int(first.NumberOfStudyRelatedSeries), int(first.NumberOfStudyRelatedInstances)) == (2, 4)
    assert first.RetrieveAETitle == "PACS" and first.PatientID == "VN001"
    assert "InstitutionAddress" in first and first.InstitutionAddress == ""  # not indexed: returned empty
    assert "ReferencedStudySequence" in first and len(first.ReferencedStudySequence) == 0


def test_patient_root_levels(server: Server, tmp_path: Path) -> None:
    patients = findscu(server, tmp_path, ["QueryRetrieveLevel=PATIENT", "PatientName=Nguyen", "PatientID",
                                          "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances",
                                          "PatientBirthDate"], model="-P")
    assert patients.status == 0, patients.output[-3000:]
    assert patients.uids("PatientID") == ["VN001", "VN002"]
    vn001 = {r.PatientID: r for r in patients.responses}["VN001"]
    assert (int(vn001.NumberOfPatientRelatedStudies), int(vn001.NumberOfPatientRelatedInstances)) == (2, 6)
    assert str(vn001.PatientName) == PATIENTS["VN001"][0] and vn001.PatientBirthDate == "19800101"
    studies = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY", "PatientID=EN003", "StudyInstanceUID",
                                         "StudyDate=20260101-"], model="-P")
    assert studies.status == 0 and studies.uids() == uids("S4")
    s1 = STUDIES["S1"]
    images = findscu(server, tmp_path, ["QueryRetrieveLevel=IMAGE", "PatientID=VN001", f"StudyInstanceUID={s1.uid}",
                                        f"SeriesInstanceUID={s1.series_uid(0)}", "SOPInstanceUID", "InstanceNumber"],
                     model="-P")
    assert images.status == 0 and sorted(int(r.InstanceNumber) for r in images.responses) == [1, 2, 3]


def test_series_and_image_levels_in_study_root(server: Server, tmp_path: Path) -> None:
    s1 = STUDIES["S1"]
    series = findscu(server, tmp_path, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s1.uid}",
                                        "SeriesInstanceUID", "Modality", "SeriesNumber",
                                        "NumberOfSeriesRelatedInstances"])
    assert series.status == 0, series.output[-3000:]
    assert sorted((r.Modality, int(r.NumberOfSeriesRelatedInstances)) for r in series.responses) == [("CT", 3),
                                                                                                     ("MR", 1)]
    mr = findscu(server, tmp_path, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s1.uid}", "Modality=MR",
                                    "SeriesInstanceUID"])
    assert mr.uids("SeriesInstanceUID") == [s1.series_uid(1)]
    images = findscu(server, tmp_path, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={s1.uid}",
                                        f"SeriesInstanceUID={s1.series_uid(0)}", "InstanceNumber=2",
                                        "SOPInstanceUID", "SOPClassUID", "Rows"])
    assert images.status == 0 and images.uids("SOPInstanceUID") == [f"{s1.series_uid(0)}.2"]
    assert images.responses[0].Rows == 16 and images.responses[0].QueryRetrieveLevel == "IMAGE"


def test_unknown_keys_are_not_matched_and_come_back_empty(server: Server, tmp_path: Path) -> None:
    result = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY", "PatientID=VN001", "StudyInstanceUID",
                                        "InstitutionAddress=NOWHERE", "PatientWeight=70", "(0009,0010)=PRIVATE"])
    assert result.status == 0 and result.uids() == uids("S1", "S2"), result.output[-3000:]
    assert all(r.InstitutionAddress == "" and r.PatientWeight is None for r in result.responses)


@pytest.mark.parametrize(("keys", "status", "comment"), [
    (["QueryRetrieveLevel=STUDY", "StudyDate=2026-01-01-2027"], 0xC000, "malformed range"),
    (["QueryRetrieveLevel=STUDY", "StudyDate=abc"], 0xC000, "not a DA value"),
    (["QueryRetrieveLevel=SERIES", "Modality=CT"], 0xA900, "StudyInstanceUID"),
    (["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={UID_ROOT}.*"], 0xA900, "no relational queries"),
    (["QueryRetrieveLevel=PATIENT"], 0xA900, "not part of the Study Root"),
    (["QueryRetrieveLevel=WARD"], 0xA900, "unknown query level"),
    (["StudyInstanceUID"], 0xA900, "QueryRetrieveLevel"),
    (["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={UID_ROOT}.1", "SeriesNumber=x1"], 0xC000, "not an integer"),
])
def test_malformed_identifiers_get_a_failure_status(server: Server, tmp_path: Path, keys: list[str], status: int,
                                                    comment: str) -> None:
    result = findscu(server, tmp_path, keys)
    assert result.status == status, result.output[-3000:]
    assert comment in result.comment and result.responses == []


def test_five_thousand_uids_are_refused_and_the_server_carries_on(server: Server, tmp_path: Path) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = [f"{UID_ROOT}.9.{i}" for i in range(5000)]
    query.file_meta = FileMetaDataset()
    query.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    query.file_meta.MediaStorageSOPClassUID = FIND
    query.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "uids.dcm"
    query.save_as(path, enforce_file_format=True)
    result = findscu(server, tmp_path, [], query_file=path)
    assert result.status == 0xC000 and "exceeds 1000" in result.comment, result.output[-2000:]
    assert echoscu(server.port).returncode == 0
    again = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID=EN003"])
    assert again.status == 0 and again.uids() == uids("S4", "S5")


def test_unregistered_ae_is_rejected_at_association(server: Server, tmp_path: Path) -> None:
    result = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY"], aet="STRANGER")
    assert result.returncode != 0 and result.status is None
    assert "Association Rejected" in result.output and "Calling AE Title Not Recognized" in result.output
    assert "STRANGER" in server.proc.log_tail(200) and "rejected (1, 1, 3)" in server.proc.log_tail(200)
    assert echoscu(server.port, aet="STRANGER").returncode == 0  # verification stays open


def test_registered_ae_without_query_rights_is_refused(server: Server, tmp_path: Path) -> None:
    result = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY"], aet="NOQUERY")
    assert result.returncode != 0 and "Association Rejected" in result.output, result.output[-2000:]
    # proposing C-FIND together with Verification: accepted, the C-FIND context refused
    ae = AE(ae_title="NOQUERY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS")
    try:
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [ECHO]
        assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [FIND]
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


@pytest.mark.parametrize("server", ["scaled"], indirect=True)  # its database is the one that can be cut
def test_query_associations_wait_while_the_registry_is_unreachable(server: Server, tmp_path: Path) -> None:
    """Fail closed: without the AE registry a query association is rejected as transient; echo still works."""
    assert server.db_proxy is not None
    server.db_proxy.cut()
    try:
        result = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY"])
        assert "Association Rejected" in result.output and "Rejected Transient" in result.output, result.output
        assert echoscu(server.port).returncode == 0
    finally:
        server.db_proxy.start()
    again = findscu(server, tmp_path, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID=VN002"])
    assert again.status == 0 and again.uids() == uids("S3"), again.output[-2000:]
