"""Facility scope over DICOM (issue 12, finding 2), attacked against a live SCP.

The attack: a registered workstation of hospital A found, retrieved (C-GET, C-MOVE) and got storage
commitment for every study of hospital B and saw B's worklist; an AE discontinued B's order over MPPS.
Here one in-process SCP (the same ``start_scp`` as ``pacs scp``, SQLite + files) holds two facilities'
studies, stored over C-STORE by each facility's modality, and one of B's studies shared with A. Each
service is asked as A's workstation (``WSA``), as an archive-wide node (``PROV``) and as an AE registered
with neither a facility nor ``--archive-wide`` (``NOSCOPE``), with pynetdicom and DCMTK's tools.

What each bad request gets: another facility's study, series, instance or patient is answered exactly
like an unknown one (no C-FIND match, 0 sub-operations with the same final status, *No such object
instance* 0x0112 in the commitment report, an unknown order for MPPS); an N-SET from another AE than the
step's creator gets 0x0112 like a step that does not exist.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import select, text

from dicom_scp.commitment_service import send_event_report
from dicom_scp.server import Listeners, start_scp
from pacs.ae_scope import NO_STUDIES, ae_scope, needs_scope_flag
from pacs.aes import AERecord, add_ae, lookup
from pacs.commitment.service import CommitmentConfig, CommitmentReporter, SopRef
from pacs.context import AppContext
from pacs.db import migrate
from pacs.dimse_status import NO_SUCH_SOP_INSTANCE
from pacs.ingest import Ingestor
from pacs.ris.models import ImagingOrder, PerformedProcedureStep
from pacs.ris.orders import NewOrder, OrderRecord, create_order, get_order
from pacs.security.access import share_study
from pacs.security.principal import UNRESTRICTED, AccessScope
from pacs.settings import Settings
from tests.support.commitment_modality import Modality
from tests.support.datasets import make_dataset
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.net import free_port
from tests.support.pacs_process import invoke_pacs, run_pacs
from tests.support.tiers import starts_servers

SC = str(SecondaryCaptureImageStorage)
S_FIND, P_FIND = StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind
S_GET, P_GET = StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet
S_MOVE, P_MOVE = StudyRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelMove
MWL, MPPS = ModalityWorklistInformationFind, ModalityPerformedProcedureStep

# study key -> (sending modality, Patient ID, patient name, instances)
STUDIES = {
    "A1": ("MODA", "SHARED1", "AN^A", 2),
    "B1": ("MODB", "SHARED1", "BINH^B", 1),  # the same local ID at B: another person
    "B2": ("MODB", "ONLYB", "ONLY^B", 1),  # a patient with studies at B only
    "B3": ("MODB", "SHAREDB", "SHARED^B", 1),  # shared with HOSP-A (pacs share add)
    "B4": ("MODB", "SHAREDB", "SHARED^B", 1),  # the same patient's study that is not shared
}


@dataclass
class Study:
    uid: str
    series: str
    sops: list[str]


@dataclass
class World:
    ctx: AppContext
    port: int
    studies: dict[str, Study]
    orders: dict[str, OrderRecord]
    dest: Receiver
    reporters: dict[str, Modality]
    dest_a: Receiver  # a workstation of HOSP-A registered as a move destination


@dataclass
class Receiver:
    """A C-MOVE destination: a pynetdicom Storage SCP that records what it receives."""

    port: int = field(default_factory=free_port)
    title: str = "DEST"
    received: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Receiver:
        ae = AE(ae_title=self.title)
        ae.add_supported_context(SecondaryCaptureImageStorage)
        ae.add_supported_context(Verification)  # as real storage SCPs do: what a refused move's association proposes
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def take(self) -> list[str]:
        with self._lock:
            out, self.received[:] = sorted(self.received), []
        return out


@pytest.fixture(scope="module")
@starts_servers
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("dimse-scope")
    ctx = AppContext.create(Settings(data_dir=root / "data", dicom_host="127.0.0.1", dicom_port=free_port()))
    migrate.upgrade(ctx.engine)
    reporters = {title: Modality(title).listen() for title in ("WSA", "PROV")}
    dest, dest_a = Receiver().start(), Receiver(title="DESTA").start()
    with ctx.sessions() as s, s.begin():
        for title, facility in (("MODA", "HOSP-A"), ("MODB", "HOSP-B"), ("CTA", "HOSP-A"), ("CTB", "HOSP-B")):
            add_ae(s, title, "127.0.0.1", free_port(), facility=facility)
        add_ae(s, "WSA", "127.0.0.1", reporters["WSA"].port, facility="HOSP-A")
        add_ae(s, "PROV", "127.0.0.1", reporters["PROV"].port, archive_wide=True)
        add_ae(s, "NOSCOPE", "127.0.0.1", free_port())  # in-process only: `pacs ae add` refuses this
        # a province-level node: every facility's studies may be moved to it
        add_ae(s, "DEST", "127.0.0.1", dest.port, allow_query=False, allow_store=False, archive_wide=True)
        add_ae(s, "DESTA", "127.0.0.1", dest_a.port, allow_query=False, allow_store=False, facility="HOSP-A")
    listeners: Listeners = start_scp(ctx, Ingestor(ctx.sessions, ctx.store))
    port = listeners.server_address[1]
    reporter = CommitmentReporter(ctx, send_event_report, CommitmentConfig(poll_s=0.2, network_timeout_s=10)).start()
    ctx.extras["commitment_reporter"] = reporter
    try:
        studies = {key: _store(port, *spec) for key, spec in STUDIES.items()}
        with ctx.sessions() as s, s.begin():
            share_study(s, studies["B3"].uid, "HOSP-A", shared_by="test")
            orders = {key: create_order(s, NewOrder(
                patient_id=f"P-{key}", patient_name=f"ORDER^{key}", modality="CT", station_ae_title="",
                start_date="20261206", start_time="0900", procedure_description="CT CHEST", facility=facility))
                for key, facility in (("OA", "HOSP-A"), ("OB", "HOSP-B"), ("ONONE", ""))}
        yield World(ctx, port, studies, orders, dest, reporters, dest_a)
    finally:
        reporter.stop()
        listeners.shutdown()
        dest.server.shutdown()
        dest_a.server.shutdown()
        for modality in reporters.values():
            modality.stop_listening()
        ctx.close()


def _associate(aet: str, port: int, *contexts: object, **kwargs: Any) -> Association:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS", **kwargs)
    assert assoc.is_established, f"{aet}: association not established"
    return assoc


def _store(port: int, sender: str, patient_id: str, name: str, count: int) -> Study:
    study = Study(generate_uid(), generate_uid(), [])
    assoc = _associate(sender, port, SecondaryCaptureImageStorage)
    try:
        for i in range(count):
            ds = make_dataset(StudyInstanceUID=study.uid, SeriesInstanceUID=study.series, PatientID=patient_id,
                              PatientName=name, InstanceNumber=i + 1)
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
            study.sops.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return study


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _find(world: World, aet: str, identifier: Dataset, model: object = S_FIND) -> tuple[list[Dataset], int]:
    """The matches and the final status of one C-FIND."""
    assoc = _associate(aet, world.port, model)
    try:
        matches, final = [], -1
        for status, found in assoc.send_c_find(identifier, model):
            assert status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                matches.append(found)
            else:
                final = int(status.Status)
        return matches, final
    finally:
        assoc.release()


def _study_uids(matches: list[Dataset]) -> set[str]:
    return {str(m.StudyInstanceUID) for m in matches}


def _keys(world: World, *keys: str) -> set[str]:
    return {world.studies[k].uid for k in keys}


# -- C-FIND ----------------------------------------------------------------------------------------


def test_c_find_sees_only_the_callers_facility_and_shares_at_every_level(world: World) -> None:
    everything = _identifier("STUDY", StudyInstanceUID="", PatientID="")
    wsa, status = _find(world, "WSA", everything)
    assert status == 0x0000 and _study_uids(wsa) == _keys(world, "A1", "B3")  # own study + the one shared
    prov, _ = _find(world, "PROV", everything)
    assert _study_uids(prov) == _keys(world, *STUDIES)  # archive-wide: both facilities
    nothing, status = _find(world, "NOSCOPE", everything)
    assert (nothing, status) == ([], 0x0000)  # registered without a facility or --archive-wide: nothing

    # B's study named by its UID, at the study, series and image level: no match, like an unknown UID
    b1, a1 = world.studies["B1"], world.studies["A1"]
    for identifier in (_identifier("STUDY", StudyInstanceUID=b1.uid),
                       _identifier("SERIES", StudyInstanceUID=b1.uid, SeriesInstanceUID=""),
                       _identifier("IMAGE", StudyInstanceUID=b1.uid, SeriesInstanceUID=b1.series, SOPInstanceUID="")):
        assert _find(world, "WSA", identifier) == ([], 0x0000)
        assert len(_find(world, "PROV", identifier)[0]) == 1
    images, _ = _find(world, "WSA", _identifier("IMAGE", StudyInstanceUID=a1.uid, SeriesInstanceUID=a1.series,
                                                SOPInstanceUID=""))
    assert sorted(str(m.SOPInstanceUID) for m in images) == sorted(a1.sops)

    # Patient Root, STUDY level under the shared local ID: A's study only, with A's patient name
    studies, _ = _find(world, "WSA", _identifier("STUDY", PatientID="SHARED1", StudyInstanceUID="", PatientName=""),
                       P_FIND)
    assert _study_uids(studies) == _keys(world, "A1") and {str(m.PatientName) for m in studies} == {"AN^A"}


def test_patient_level_never_reveals_a_patient_with_only_other_facilities_studies(world: World) -> None:
    patients, status = _find(world, "WSA", _identifier("PATIENT", PatientID="", PatientName="",
                                                       NumberOfPatientRelatedStudies=""), P_FIND)
    seen = sorted((str(m.PatientID), str(m.PatientName), int(m.NumberOfPatientRelatedStudies)) for m in patients)
    # ONLYB and B's SHARED1 are absent; SHAREDB is seen through the shared study and counts only that one
    assert status == 0x0000 and seen == [("SHARED1", "AN^A", 1), ("SHAREDB", "SHARED^B", 1)]
    assert _find(world, "WSA", _identifier("PATIENT", PatientID="ONLYB"), P_FIND) == \
        _find(world, "WSA", _identifier("PATIENT", PatientID="NOBODY"), P_FIND) == ([], 0x0000)
    every, _ = _find(world, "PROV", _identifier("PATIENT", PatientID="", NumberOfPatientRelatedStudies=""), P_FIND)
    assert sorted((str(m.PatientID), int(m.NumberOfPatientRelatedStudies)) for m in every) == \
        [("ONLYB", 1), ("SHARED1", 1), ("SHARED1", 1), ("SHAREDB", 2)]


def test_findscu_of_hospital_a_does_not_see_hospital_b(world: World) -> None:
    """The attack as reported, with DCMTK: every study of the shared Patient ID."""
    proc = subprocess.run([dcmtk("findscu"), "-S", "-aet", "WSA", "-aec", "PACS", "-k", "QueryRetrieveLevel=STUDY",
                           "-k", "PatientID=SHARED1", "-k", "StudyInstanceUID", "-k", "PatientName",
                           "127.0.0.1", str(world.port)], capture_output=True, text=True, timeout=60, env=dcmtk_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-2000:]
    assert world.studies["A1"].uid in output and "AN^A" in output
    assert world.studies["B1"].uid not in output and "BINH^B" not in output, output[-2000:]


# -- C-GET and C-MOVE ------------------------------------------------------------------------------


def _final_counts(status: Dataset) -> tuple[int, ...]:
    return tuple(int(status.get(k, 0) or 0) for k in ("Status", "NumberOfCompletedSuboperations",
                                                      "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))


def _get(world: World, aet: str, identifier: Dataset, model: object = S_GET) -> tuple[list[str], tuple[int, ...]]:
    """C-GET: the SOP Instance UIDs received and the final response's (status, completed, failed, warning)."""
    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = _associate(aet, world.port, model, SecondaryCaptureImageStorage,
                       ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        responses = [status for status, _ in assoc.send_c_get(identifier, model)]
    finally:
        assoc.release()
    return sorted(got), _final_counts(responses[-1])


def _move(world: World, aet: str, identifier: Dataset) -> tuple[list[str], tuple[int, ...]]:
    assoc = _associate(aet, world.port, S_MOVE)
    try:
        responses = [status for status, _ in assoc.send_c_move(identifier, "DEST", S_MOVE)]
    finally:
        assoc.release()
    return world.dest.take(), _final_counts(responses[-1])


def test_c_get_and_c_move_of_another_facilitys_study_send_nothing(world: World) -> None:
    a1, b1 = world.studies["A1"], world.studies["B1"]
    unknown = _identifier("STUDY", StudyInstanceUID=generate_uid())
    for retrieve in (_get, _move):
        refused = retrieve(world, "WSA", _identifier("STUDY", StudyInstanceUID=b1.uid))
        assert refused == ([], (0x0000, 0, 0, 0)) == retrieve(world, "WSA", unknown)  # like an unknown study
        image = _identifier("IMAGE", StudyInstanceUID=b1.uid, SeriesInstanceUID=b1.series, SOPInstanceUID=b1.sops[0])
        assert retrieve(world, "WSA", image) == ([], (0x0000, 0, 0, 0))
        assert retrieve(world, "WSA", _identifier("STUDY", StudyInstanceUID=a1.uid)) == (sorted(a1.sops),
                                                                                         (0x0000, 2, 0, 0))
        assert retrieve(world, "PROV", _identifier("STUDY", StudyInstanceUID=b1.uid)) == (b1.sops, (0x0000, 1, 0, 0))
        assert retrieve(world, "NOSCOPE", _identifier("STUDY", StudyInstanceUID=a1.uid))[0] == []
    # a whole patient by the shared local ID: only A's instances
    by_patient = _get(world, "WSA", _identifier("PATIENT", PatientID="SHARED1"), P_GET)
    assert by_patient == (sorted(a1.sops), (0x0000, 2, 0, 0))
    # the shared study of B is A's to retrieve, its unshared sibling is not
    assert _get(world, "WSA", _identifier("STUDY", StudyInstanceUID=world.studies["B3"].uid))[0] == \
        world.studies["B3"].sops
    assert _get(world, "WSA", _identifier("STUDY", StudyInstanceUID=world.studies["B4"].uid))[0] == []


def _move_to(world: World, aet: str, destination: str, identifier: Dataset) -> tuple[int, ...]:
    assoc = _associate(aet, world.port, S_MOVE)
    try:
        responses = [status for status, _ in assoc.send_c_move(identifier, destination, S_MOVE)]
    finally:
        assoc.release()
    return _final_counts(responses[-1])


def test_c_move_sends_only_what_the_destinations_facility_may_see(world: World) -> None:
    """A move carries a study only to a node whose facility may see it: A's workstation gets A's studies and
    B's study shared with A; an archive-wide peer cannot push B's unshared study to A's workstation."""
    a1, b1, b3 = world.studies["A1"], world.studies["B1"], world.studies["B3"]
    assert _move_to(world, "WSA", "DESTA", _identifier("STUDY", StudyInstanceUID=a1.uid)) == (0x0000, 2, 0, 0)
    assert world.dest_a.take() == sorted(a1.sops)
    assert _move_to(world, "PROV", "DESTA", _identifier("STUDY", StudyInstanceUID=b3.uid)) == (0x0000, 1, 0, 0)
    assert world.dest_a.take() == b3.sops  # shared with HOSP-A
    refused = _move_to(world, "PROV", "DESTA", _identifier("STUDY", StudyInstanceUID=b1.uid))
    assert refused[0] == 0xC000 and world.dest_a.take() == []  # B's study, not shared with A: nothing leaves
    # a patient-level move of a patient with studies at both: only what the destination may hold goes
    both = _identifier("PATIENT", PatientID="SHARED1")
    assoc = _associate("PROV", world.port, P_MOVE)
    try:
        final = [status for status, _ in assoc.send_c_move(both, "DESTA", P_MOVE)][-1]
    finally:
        assoc.release()
    assert _final_counts(final) == (0x0000, 2, 0, 0) and world.dest_a.take() == sorted(a1.sops)


@pytest.mark.parametrize("tool", ["getscu", "movescu"])
def test_dcmtk_retrieve_of_hospital_b_gets_nothing(world: World, tool: str, tmp_path: Path) -> None:
    b1 = world.studies["B1"]
    extra = ["-aem", "DEST"] if tool == "movescu" else []  # to the destination of the world; getscu: here
    proc = subprocess.run([dcmtk(tool), "-S", "-aet", "WSA", "-aec", "PACS", *extra,
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={b1.uid}",
                           "127.0.0.1", str(world.port)], capture_output=True, text=True, timeout=60, env=dcmtk_env(),
                          cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert list(tmp_path.iterdir()) == [] and world.dest.take() == []


# -- Modality Worklist and MPPS ----------------------------------------------------------------------


def _worklist(world: World, aet: str) -> list[str]:
    query = Dataset()
    query.AccessionNumber = ""
    query.PatientID = ""
    item = Dataset()
    item.ScheduledStationAETitle = ""
    query.ScheduledProcedureStepSequence = Sequence([item])
    matches, status = _find(world, aet, query, MWL)
    assert status == 0x0000
    return sorted(str(m.AccessionNumber) for m in matches)


def _accessions(world: World, *keys: str) -> list[str]:
    return sorted(world.orders[k].accession_number for k in keys)


def test_worklist_lists_only_the_callers_facility_orders(world: World) -> None:
    assert _worklist(world, "CTA") == _accessions(world, "OA")
    assert _worklist(world, "CTB") == _accessions(world, "OB")
    assert _worklist(world, "PROV") == _accessions(world, "OA", "OB", "ONONE")
    assert _worklist(world, "NOSCOPE") == []


def _n_create(world: World, aet: str, accession: str = "", study_uid: str = "") -> tuple[str, int]:
    ds = Dataset()
    ds.PatientID = "P-OB"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    item = Dataset()
    item.AccessionNumber = accession
    item.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = Sequence([item])
    uid = generate_uid()
    assoc = _associate(aet, world.port, MPPS)
    try:
        status, _ = assoc.send_n_create(ds, MPPS, uid)
    finally:
        assoc.release()
    return uid, int(status.Status)


def _n_set(world: World, aet: str, uid: str, state: str) -> int:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = state
    assoc = _associate(aet, world.port, MPPS)
    try:
        status, _ = assoc.send_n_set(ds, MPPS, uid)
    finally:
        assoc.release()
    return int(status.Status)


def _order_state(world: World, key: str) -> str:
    with world.ctx.read_sessions() as s:
        return get_order(s, world.orders[key].accession_number).state


def _step_order(world: World, uid: str) -> int | None:
    with world.ctx.read_sessions() as s:
        return s.scalar(select(PerformedProcedureStep.order_fk).where(PerformedProcedureStep.sop_instance_uid == uid))


def test_mpps_moves_an_order_only_from_its_facility_and_only_its_creator_updates_it(world: World) -> None:
    ob = world.orders["OB"]
    # A's modality names B's order (by accession, then by its Study Instance UID): the same answer as for an
    # order nobody knows, the step is linked to nothing, and B's order stays on B's worklist
    by_accession, status = _n_create(world, "CTA", accession=ob.accession_number)
    _, unknown_status = _n_create(world, "CTA", accession="NOSUCHORDER")
    by_study, study_status = _n_create(world, "CTA", study_uid=ob.study_instance_uid)
    assert status == unknown_status == study_status == 0x0000
    assert _step_order(world, by_accession) is None and _step_order(world, by_study) is None
    assert _order_state(world, "OB") == "scheduled" and ob.accession_number in _worklist(world, "CTB")
    # A's modality cannot end (discontinue) a step A did not create: 0x0112, like a step that does not exist
    assert _n_set(world, "CTA", by_accession, "DISCONTINUED") == 0x0000  # its own (unlinked) step
    step, status = _n_create(world, "CTB", accession=ob.accession_number)
    assert status == 0x0000 and _order_state(world, "OB") == "in-progress"
    assert _n_set(world, "CTA", step, "DISCONTINUED") == 0x0112 == _n_set(world, "CTA", generate_uid(), "COMPLETED")
    assert _n_set(world, "PROV", step, "DISCONTINUED") == 0x0112  # not even an archive-wide AE
    assert _order_state(world, "OB") == "in-progress"
    assert _n_set(world, "CTB", step, "COMPLETED") == 0x0000 and _order_state(world, "OB") == "completed"
    with world.ctx.read_sessions() as s:
        linked = s.scalar(select(ImagingOrder.id).where(ImagingOrder.accession_number == ob.accession_number))
    assert _step_order(world, step) == linked


# -- Storage Commitment -----------------------------------------------------------------------------


def _pairs(ds: Dataset, keyword: str) -> list[tuple[str, ...]]:
    out = []
    for item in ds.get(keyword, []):
        pair = (str(item.ReferencedSOPInstanceUID),)
        out.append((*pair, int(item.FailureReason)) if "FailureReason" in item else pair)
    return sorted(out)


def test_commitment_reports_another_facilitys_instances_as_not_archived(world: World) -> None:
    a_sop, b_sop, nowhere = world.studies["A1"].sops[0], world.studies["B1"].sops[0], generate_uid()
    refs = [SopRef(SC, uid) for uid in (a_sop, b_sop, nowhere)]
    wsa = world.reporters["WSA"]
    event_type, report = wsa.wait_report(wsa.commit(world.port, refs))
    assert event_type == 2 and _pairs(report, "ReferencedSOPSequence") == [(a_sop,)]
    assert _pairs(report, "FailedSOPSequence") == sorted([(b_sop, NO_SUCH_SOP_INSTANCE),
                                                          (nowhere, NO_SUCH_SOP_INSTANCE)])  # B's = unknown
    prov = world.reporters["PROV"]
    event_type, report = prov.wait_report(prov.commit(world.port, refs[:2]))
    assert event_type == 1 and _pairs(report, "ReferencedSOPSequence") == sorted([(a_sop,), (b_sop,)])


# -- the registry: scope of a record, `pacs ae add`, the migration ------------------------------------


def _record(facility: str = "", archive_wide: bool = False) -> AERecord:
    return AERecord("X", "127.0.0.1", 104, "", True, True, True, False, facility, archive_wide=archive_wide)


def test_scope_of_an_ae() -> None:
    assert ae_scope(None) == NO_STUDIES and ae_scope(_record()) == NO_STUDIES
    assert ae_scope(_record("HOSP-A")) == AccessScope(facilities=frozenset({"HOSP-A"}))
    assert ae_scope(_record(archive_wide=True)) == UNRESTRICTED
    assert needs_scope_flag(True, False, "", False) and needs_scope_flag(False, True, "", False)
    assert needs_scope_flag(True, True, "HOSP-A", True)  # not both
    assert not needs_scope_flag(False, False, "", False)  # store-only
    assert not needs_scope_flag(True, True, "HOSP-A", False) and not needs_scope_flag(True, True, "", True)


@pytest.mark.integration
def test_upgrade_keeps_facility_less_aes_archive_wide_and_ae_add_asks_for_a_scope(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ctx = AppContext.create(Settings(data_dir=data))
    try:
        cfg = migrate.alembic_config(ctx.engine.url.render_as_string(hide_password=False))
        with ctx.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0008")
            for title, facility in (("OLDWIDE", ""), ("OLDA", "HOSP-A")):
                conn.execute(text("INSERT INTO application_entity (ae_title, host, port, description, allow_store, "
                                  "allow_query, allow_retrieve, check_host, facility) "
                                  "VALUES (:t, '127.0.0.1', 104, '', 1, 1, 1, 0, :f)"), {"t": title, "f": facility})
        migrate.upgrade(ctx.engine)
        with ctx.read_sessions() as s:
            old_wide, old_a = lookup(s, "OLDWIDE"), lookup(s, "OLDA")
        assert old_wide is not None and old_wide.archive_wide  # saw everything before: still does
        assert old_a is not None and not old_a.archive_wide and ae_scope(old_a).facilities == {"HOSP-A"}
    finally:
        ctx.close()
    env = {"PACS_DATA_DIR": str(data)}
    bare = run_pacs(["ae", "add", "NEWWS", "127.0.0.1", "104"], env)
    assert bare.returncode == 1 and "--archive-wide" in bare.stderr, bare.stdout + bare.stderr
    both = invoke_pacs(["ae", "add", "NEWWS", "127.0.0.1", "104", "--facility", "HOSP-A", "--archive-wide"], env)
    assert both.returncode == 1 and "not both" in both.stderr, both.stdout + both.stderr
    store_only = invoke_pacs(["ae", "add", "NEWCT", "127.0.0.1", "104", "--no-query", "--no-retrieve"], env)
    assert store_only.returncode == 0, store_only.stdout + store_only.stderr
