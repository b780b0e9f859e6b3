"""C-MOVE and C-GET SCP end to end: `pacs serve` (SQLite + files) and `pacs scp` (PostgreSQL + S3 +
Redis), driven by DCMTK's movescu and getscu, delivering to DCMTK's storescp in bit-preserving mode.

Objects must arrive with exactly the dataset bytes that are in the store; an object whose stored
transfer syntax the receiver does not accept arrives decompressed to little endian.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet
from sqlalchemy import func, select, update

from bench.generate_ct import write_ct_series
from dicom_scp.get_service import NotSendable, converted_copy
from pacs.aes import add_ae
from pacs.context import AppContext
from pacs.db import migrate
from pacs.db.models import ApplicationEntity, DerivedTask, Instance, Patient, Series, Study
from pacs.ingest import Ingestor, IngestSource
from pacs.retrieve import (
    IdentifierMismatch,
    InvalidKeyValue,
    Level,
    Model,
    iter_items,
    parse_identifier,
    plan,
)
from pacs.security.principal import UNRESTRICTED
from pacs.settings import Settings
from tests.support.corpus import corpus_dicom_files
from tests.support.datasets import dataset_bytes, make_instance
from tests.support.dcmtk import STORESCU_TS_OPTION, ReferenceStoreSCP, dcmtk, dcmtk_env, echoscu, storescu
from tests.support.net import free_port, port_open, wait_until
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.seaweed import SeaweedS3
from tests.support.stack import EmbeddedPacs, ScaledStack
from tests.support.tiers import starts_servers

CORPUS = ("JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm")
CALLING_AES = ("MOVESCU", "GETSCU", "PYSCU")

_STATUS_RE = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")
_COMMENT_RE = re.compile(r"\(0000,0902\)\s+LO\s+\[([^\]]*)\]")


# -- identifier validation (no server) -------------------------------------------------------------


def _identifier(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_identifier_unique_keys_per_level_and_model() -> None:
    study, series = generate_uid(), generate_uid()
    req = parse_identifier(_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=f"{study}\\{series}"),
                           Model.STUDY_ROOT)
    assert req.level is Level.STUDY and req.study_uids == (study, series)
    req = parse_identifier(_identifier(QueryRetrieveLevel="PATIENT", PatientID="P1"), Model.PATIENT_ROOT)
    assert req.patient_id == "P1" and not req.study_uids
    req = parse_identifier(_identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                                       SOPInstanceUID="1.2.3\\1.2.4"), Model.STUDY_ROOT)
    assert req.sop_uids == ("1.2.3", "1.2.4") and req.series_uids == (series,)
    refused = [
        (_identifier(StudyInstanceUID=study), Model.STUDY_ROOT, IdentifierMismatch),  # no level
        (_identifier(QueryRetrieveLevel="PATIENT", PatientID="P1"), Model.STUDY_ROOT, IdentifierMismatch),
        (_identifier(QueryRetrieveLevel="STUDY"), Model.STUDY_ROOT, IdentifierMismatch),  # no unique key
        (_identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=study), Model.STUDY_ROOT, IdentifierMismatch),
        (_identifier(QueryRetrieveLevel="PATIENT", PatientID="P*"), Model.PATIENT_ROOT, InvalidKeyValue),
        (_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.abc"), Model.STUDY_ROOT, InvalidKeyValue),
        (_identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=f"{study}\\{series}", SeriesInstanceUID=series),
         Model.STUDY_ROOT, InvalidKeyValue),  # a higher-level key must be single
        (_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="\\".join(f"1.2.{i}" for i in range(5000))),
         Model.STUDY_ROOT, InvalidKeyValue),
    ]
    for identifier, model, error in refused:
        with pytest.raises(error):
            parse_identifier(identifier, model)


def test_plan_counts_then_pages_through_rows(tmp_path: Path) -> None:
    ctx = AppContext.create(Settings(data_dir=tmp_path))
    try:
        migrate.upgrade(ctx.engine)
        ingestor = Ingestor(ctx.sessions, ctx.store)
        study, series = generate_uid(), generate_uid()
        sops = [generate_uid() for _ in range(7)]
        for i, sop in enumerate(sops):
            outcome = ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series,
                                                    SOPInstanceUID=sop, InstanceNumber=i + 1),
                                      IngestSource("import"))
            assert outcome.ok, outcome.message
        ingestor.ingest(make_instance(), IngestSource("import"))  # another study: not matched
        request = parse_identifier(_identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=study,
                                               SeriesInstanceUID=series), Model.STUDY_ROOT)
        retrieve = plan(ctx.read_sessions, request, scope=UNRESTRICTED)
        assert retrieve.count == 7
        assert retrieve.syntaxes == (("1.2.840.10008.5.1.4.1.1.7", str(ExplicitVRLittleEndian)),)
        items = list(iter_items(ctx.read_sessions, retrieve, page_size=3))
        assert [i.sop_instance_uid for i in items] == sops
        assert all(ctx.store.exists(i.object_key) for i in items)
        # Rows stored after the plan are not sent: the count given as sub-operations stays true.
        ingestor.ingest(make_instance(StudyInstanceUID=study, SeriesInstanceUID=series), IngestSource("import"))
        assert len(list(iter_items(ctx.read_sessions, retrieve, page_size=3))) == 7
    finally:
        ctx.close()


# -- servers and peers ------------------------------------------------------------------------------


class BitPreservingStoreSCP(ReferenceStoreSCP):
    """storescp with +B: writes the dataset bytes exactly as they came off the wire.

    ``accept_all`` (+xa) takes every transfer syntax DCMTK knows; without it storescp accepts only
    the uncompressed ones.
    """

    def __init__(self, out_dir: Path, port: int, aet: str, accept_all: bool = True) -> None:
        super().__init__(out_dir, port, aet)
        self.accept_all = accept_all

    def start(self) -> BitPreservingStoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = (self.out_dir.parent / f"storescp-{self.aet}.log").open("ab")
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "+B", *(["+xa"] if self.accept_all else []), "-aet", self.aet,
             "-od", str(self.out_dir), str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
        wait_until(lambda: port_open(self.port), what=f"storescp {self.aet}")
        return self


@dataclass
class Pacs:
    mode: str
    proc: PacsProcess
    port: int
    env: dict[str, str]
    ctx: AppContext  # the test's own view of the same index and store
    root: Path
    ref: BitPreservingStoreSCP = field(init=False)  # accepts every syntax
    plain: BitPreservingStoreSCP = field(init=False)  # uncompressed only

    def register(self, title: str, port: int = 104, cli: bool = False) -> None:
        """`pacs ae add` the way an operator would, or the same call in-process (a CLI start costs ~1 s)."""
        if cli:
            result = run_pacs(["ae", "add", title, "127.0.0.1", str(port), "--archive-wide"], self.env)
            assert result.returncode == 0, result.stdout + result.stderr
            return
        with self.ctx.sessions() as session, session.begin():
            add_ae(session, title, "127.0.0.1", port, archive_wide=True)

    def stored_bytes(self, sop_uid: str) -> bytes:
        with self.ctx.read_sessions() as s:
            key = s.scalar(select(Instance.object_key).where(Instance.sop_instance_uid == sop_uid))
        assert key, f"{sop_uid} is not stored"
        return self.ctx.store.get_bytes(key)


def _with_peers(pacs: Pacs) -> Pacs:
    pacs.ref = BitPreservingStoreSCP(pacs.root / "ref", free_port(), "REFSCP").start()
    pacs.plain = BitPreservingStoreSCP(pacs.root / "plain", free_port(), "PLAINSCP", accept_all=False).start()
    for title in CALLING_AES:
        pacs.register(title, cli=title in ("MOVESCU", "GETSCU"))
    pacs.register(pacs.ref.aet, pacs.ref.port)
    pacs.register(pacs.plain.aet, pacs.plain.port)
    return pacs


def _stop_peers(pacs: Pacs) -> None:
    for peer in (getattr(pacs, "ref", None), getattr(pacs, "plain", None)):
        if peer is not None:
            peer.stop()


@pytest.fixture(scope="module")
@starts_servers
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    root = tmp_path_factory.mktemp("retrieve-embedded")
    running = EmbeddedPacs(root)
    pacs: Pacs | None = None
    try:
        pacs = _with_peers(Pacs("embedded", running.proc, running.port, running.env, running.ctx, root))
        yield pacs
    finally:
        if pacs is not None:
            _stop_peers(pacs)
        running.close()


@pytest.fixture(scope="module")
@starts_servers
def scaled(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedS3) -> Iterator[Pacs]:
    """`pacs scp` alone: retrieves need no worker (derived tasks wait in a queue of this test's own)."""
    root = tmp_path_factory.mktemp("retrieve-scaled")
    with ScaledStack(root, s3_server.url_for(f"pacs-retrieve-{uuid.uuid4().hex[:8]}")).up("scp") as stack:
        pacs = _with_peers(Pacs("scaled", stack.scp, stack.port, stack.env, stack.ctx, root))
        try:
            yield pacs
        finally:
            _stop_peers(pacs)


@dataclass
class LoadedStudy:
    study_uid: str
    series_uids: list[str]  # the two CT series
    sop_uids: list[str]  # every instance of the study
    originals: dict[str, Path]  # SOP Instance UID -> the file that was sent
    j2k_sop_uid: str


def _load_study(pacs: Pacs, workdir: Path) -> LoadedStudy:
    """Two CT series (10 slices of 64x64, Explicit VR LE) and three compressed corpus objects, each
    moved into the study as an instance of its own (the two MR_small files share their UIDs)."""
    study_uid = generate_uid()
    ct = [write_ct_series(workdir / f"ct{i}", slices=10, size=64, study_uid=study_uid) for i in (1, 2)]
    result = storescu(pacs.port, ct[0] + ct[1], "-xe")
    assert result.status == 0 and result.returncode == 0, result.output[-2000:]
    corpus = {p.name: p for p in corpus_dicom_files()}
    originals = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in ct[0] + ct[1]}
    j2k_sop = ""
    for name in CORPUS:
        ds = pydicom.dcmread(corpus[name])
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = "PH0001"
        path = workdir / "corpus" / name
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)  # pixel data stays encapsulated as it was
        ts = str(ds.file_meta.TransferSyntaxUID)
        result = storescu(pacs.port, [path], STORESCU_TS_OPTION[ts])
        assert result.status == 0, (name, result.output[-2000:])
        originals[ds.SOPInstanceUID] = path
        if ts == "1.2.840.10008.1.2.4.91":
            j2k_sop = ds.SOPInstanceUID
    series = [pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID for files in ct]
    return LoadedStudy(study_uid, series, list(originals), originals, j2k_sop)


@pytest.fixture(scope="module", params=["embedded", "scaled"])
@starts_servers  # through getfixturevalue, which the collection does not see
def pacs(request: pytest.FixtureRequest) -> Pacs:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def study(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> LoadedStudy:
    return _load_study(pacs, tmp_path_factory.mktemp(f"study-{pacs.mode}"))


@pytest.fixture(scope="module")
def embedded_study(embedded: Pacs, tmp_path_factory: pytest.TempPathFactory) -> LoadedStudy:
    return _load_study(embedded, tmp_path_factory.mktemp("study-embedded-only"))


# -- DCMTK SCUs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScuResult:
    returncode: int
    status: int | None  # the final response's status
    error_comment: str
    output: str


def _run_scu(tool: str, pacs: Pacs, args: list[str]) -> ScuResult:
    proc = subprocess.run([dcmtk(tool), "-d", *args, "127.0.0.1", str(pacs.port)], capture_output=True, text=True,
                          env=dcmtk_env(), timeout=120)
    output = proc.stdout + proc.stderr
    statuses = _STATUS_RE.findall(output)
    comments = _COMMENT_RE.findall(output)
    return ScuResult(proc.returncode, int(statuses[-1], 16) if statuses else None,
                     comments[-1].strip() if comments else "", output)


def movescu(pacs: Pacs, destination: str, keys: dict[str, str], model: str = "-S",
            extra: tuple[str, ...] = ()) -> ScuResult:
    args = [model, "-aet", "MOVESCU", "-aec", "PACS", "-aem", destination, *extra]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    return _run_scu("movescu", pacs, args)


def getscu(pacs: Pacs, out_dir: Path, keys: dict[str, str], model: str = "-S", aet: str = "GETSCU",
           extra: tuple[str, ...] = ()) -> ScuResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [model, "+B", "-aet", aet, "-aec", "PACS", "-od", str(out_dir), *extra]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    return _run_scu("getscu", pacs, args)


def _by_sop(files: list[Path]) -> dict[str, Path]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}


def _assert_as_stored(pacs: Pacs, received: dict[str, Path], expected: list[str]) -> None:
    assert sorted(received) == sorted(expected)
    for sop, path in received.items():
        assert dataset_bytes(path.read_bytes()) == dataset_bytes(pacs.stored_bytes(sop)), sop


# -- C-MOVE and C-GET, both modes -----------------------------------------------------------------


def test_move_study_arrives_byte_identical(pacs: Pacs, study: LoadedStudy) -> None:
    pacs.ref.clear()
    result = movescu(pacs, pacs.ref.aet, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study.study_uid})
    assert result.status == 0x0000, result.output[-3000:]
    received = _by_sop(pacs.ref.received())
    _assert_as_stored(pacs, received, study.sop_uids)
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for p in received.values()}
    assert {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"} <= syntaxes  # as stored


def test_get_series_arrives_byte_identical(pacs: Pacs, study: LoadedStudy, tmp_path: Path) -> None:
    result = getscu(pacs, tmp_path / "get", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study.study_uid,
                                             "SeriesInstanceUID": study.series_uids[1]})
    assert result.status == 0x0000 and result.returncode == 0, result.output[-3000:]
    received = _by_sop(sorted((tmp_path / "get").iterdir()))
    series_sops = [s for s, p in study.originals.items()
                   if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == study.series_uids[1]]
    assert len(series_sops) == 10
    _assert_as_stored(pacs, received, series_sops)


# -- refusals, fallback, cancel (embedded) --------------------------------------------------------


def test_move_to_unregistered_destination_is_refused(embedded: Pacs, embedded_study: LoadedStudy) -> None:
    result = movescu(embedded, "NOWHERE", {"QueryRetrieveLevel": "STUDY",
                                           "StudyInstanceUID": embedded_study.study_uid})
    assert result.status == 0xA801, result.output[-2000:]


def test_identifier_without_unique_key_is_refused_and_server_keeps_serving(embedded: Pacs,
                                                                          tmp_path: Path) -> None:
    result = movescu(embedded, embedded.ref.aet, {"QueryRetrieveLevel": "STUDY", "PatientID": "PH0001"})
    assert result.status == 0xA900, result.output[-2000:]
    assert "StudyInstanceUID" in result.error_comment
    result = getscu(embedded, tmp_path / "get", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3.x"})
    assert result.status in (0xA900, 0xC000), result.output[-2000:]
    assert echoscu(embedded.port).returncode == 0
    assert embedded.proc.alive()


@contextlib.contextmanager
def _get_association(pacs: Pacs, aet: str = "PYSCU") -> Iterator[Association]:
    """A pynetdicom C-GET association (DCMTK's command line cannot carry 5000 UIDs)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", pacs.port, ae_title="PACS")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def _final_get_status(assoc: Association, identifier: Dataset, root: str = "study") -> Dataset:
    model = (StudyRootQueryRetrieveInformationModelGet if root == "study"
             else PatientRootQueryRetrieveInformationModelGet)
    return list(assoc.send_c_get(identifier, model))[-1][0]


def test_oversized_uid_list_is_refused_with_a_reason(embedded: Pacs) -> None:
    uids = "\\".join(generate_uid() for _ in range(5000))
    with _get_association(embedded) as assoc:
        status = _final_get_status(assoc, _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=uids))
        assert status.Status == 0xC000 and "exceeds" in status.ErrorComment
        status = _final_get_status(assoc, _identifier(QueryRetrieveLevel="PATIENT", PatientID="NO-SUCH-PATIENT"),
                                   root="patient")
        assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 0  # nothing matched
    assert echoscu(embedded.port).returncode == 0


def test_retrieve_rights_are_checked_per_request(embedded: Pacs, embedded_study: LoadedStudy) -> None:
    """The association policy admits only AEs with retrieve rights; rights revoked while an
    association is open are still enforced on its next request."""
    identifier = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=embedded_study.study_uid)
    with _get_association(embedded) as assoc:
        with embedded.ctx.sessions() as s, s.begin():
            s.execute(update(ApplicationEntity).where(ApplicationEntity.ae_title == "PYSCU")
                      .values(allow_retrieve=False))
        try:
            status = _final_get_status(assoc, identifier)
        finally:
            with embedded.ctx.sessions() as s, s.begin():
                s.execute(update(ApplicationEntity).where(ApplicationEntity.ae_title == "PYSCU")
                          .values(allow_retrieve=True))
    assert status.Status == 0x0124 and "not allowed to retrieve" in status.ErrorComment


def test_destination_without_the_stored_syntax_gets_it_decompressed(embedded: Pacs,
                                                                    embedded_study: LoadedStudy) -> None:
    embedded.plain.clear()
    sop = embedded_study.j2k_sop_uid
    original = pydicom.dcmread(embedded_study.originals[sop])
    result = movescu(embedded, embedded.plain.aet, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": embedded_study.study_uid,
        "SeriesInstanceUID": original.SeriesInstanceUID, "SOPInstanceUID": sop})
    assert result.status == 0x0000, result.output[-2000:]
    [received] = embedded.plain.received()
    ds = pydicom.dcmread(received)
    assert ds.SOPInstanceUID == sop
    assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_patient_root_move_of_a_patient(embedded: Pacs, embedded_study: LoadedStudy) -> None:
    embedded.ref.clear()
    result = movescu(embedded, embedded.ref.aet, {"QueryRetrieveLevel": "PATIENT", "PatientID": "PH0001"},
                     model="-P")
    assert result.status == 0x0000, result.output[-2000:]
    with embedded.ctx.read_sessions() as s:
        total = s.scalar(select(func.count()).select_from(Instance).join(Series).join(Study).join(Patient)
                         .where(Patient.patient_id == "PH0001")) or 0
    assert len(embedded.ref.received()) == total >= 23  # every study of PH0001


# -- one large series: cancel, memory (embedded) --------------------------------------------------


@pytest.fixture(scope="module")
def large_series(embedded: Pacs, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, int]:
    """200 slices of 256x256 (25 MiB of pixel data), with the server's derived work finished."""
    files = write_ct_series(tmp_path_factory.mktemp("large"), slices=200, size=256, patient_id="PH0002")
    result = storescu(embedded.port, files, "-xe")
    assert result.status == 0, result.output[-2000:]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)

    def settled() -> bool:
        with embedded.ctx.read_sessions() as s:
            return not s.scalar(select(func.count()).select_from(DerivedTask)
                                .where(DerivedTask.state.in_(("pending", "queued"))))

    wait_until(settled, timeout=60, interval=0.5, what="derived work (thumbnails) to finish")
    return first.StudyInstanceUID, first.SeriesInstanceUID, sum(f.stat().st_size for f in files)


def test_move_honours_cancel(embedded: Pacs, large_series: tuple[str, str, int]) -> None:
    embedded.ref.clear()
    study_uid, series_uid, _ = large_series
    result = movescu(embedded, embedded.ref.aet, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study_uid,
                                                  "SeriesInstanceUID": series_uid}, extra=("--cancel", "3"))
    assert result.status == 0xFE00, result.output[-2000:]
    time.sleep(0.3)
    assert 3 <= len(embedded.ref.received()) < 200


def test_get_of_a_large_series_streams_it(embedded: Pacs, large_series: tuple[str, str, int],
                                          tmp_path: Path) -> None:
    """Resident memory of `pacs serve` while getscu retrieves 25 MiB grows by far less than that."""
    study_uid, series_uid, series_bytes = large_series
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
    warm = getscu(embedded, tmp_path / "warm", keys)  # first-use allocations, imports
    assert warm.status == 0, warm.output[-2000:]
    baseline = embedded.proc.rss_bytes()
    peak, samples = baseline, 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not done.is_set():
            peak = max(peak, embedded.proc.rss_bytes())
            samples += 1
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = getscu(embedded, tmp_path / "get", keys)
    finally:
        done.set()
        sampler.join()
    assert result.status == 0, result.output[-2000:]
    assert len(list((tmp_path / "get").iterdir())) == 200
    growth = peak - baseline
    print(f"series {series_bytes / 2**20:.1f} MiB, server RSS {baseline / 2**20:.0f} MiB, "
          f"peak growth during C-GET {growth / 2**20:.2f} MiB ({samples} samples)")
    assert samples >= 20  # the sampler really watched the transfer
    assert growth < series_bytes / 4


@pytest.mark.parametrize("primitive", ["C_STORE", "N_EVENT_REPORT"])
def test_a_response_taken_by_the_reactor_goes_back_to_the_sender(primitive: str) -> None:
    """The pynetdicom race worked around in pacs.dimse_responses, replayed by hand (C-STORE: forwarding and
    retrieve sub-operations; N-EVENT-REPORT: storage-commitment reports)."""
    from pynetdicom import dimse_primitives
    from pynetdicom.association import Association as _Association

    from pacs.dimse_responses import keeper_for

    assoc = _Association(AE(), "requestor")
    keeper = keeper_for(assoc)
    assert keeper_for(assoc) is keeper  # installed once
    rsp = getattr(dimse_primitives, primitive)()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0x0000
    with keeper.sending():
        assoc._serve_request(rsp, 1)  # what the reactor does with a message it takes off the queue
    assert assoc.dimse.get_msg(block=False) == (1, rsp)
    assoc._serve_request(rsp, 1)  # not sending: pynetdicom's own handling (logged and dropped)
    assert assoc.dimse.get_msg(block=False) == (None, None)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm", "CT_small.dcm"])
def test_conversion_fallback_keeps_pixels_and_uid(name: str) -> None:
    path = {p.name: p for p in corpus_dicom_files()}[name]
    original = pydicom.dcmread(path)
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        with converted_copy(path, target) as copy:
            ds = pydicom.dcmread(copy)
        assert ds.file_meta.TransferSyntaxUID == target
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_big_endian_objects_are_only_sent_as_stored() -> None:
    path = {p.name: p for p in corpus_dicom_files()}["MR_small_bigendian.dcm"]
    with pytest.raises(NotSendable), converted_copy(path, ExplicitVRLittleEndian):
        pass
